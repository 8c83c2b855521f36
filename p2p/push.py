"""Eager push and membership gossip for :class:`ekko.replica.node.ReplicaNode` (a mixin)."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

import numpy as np

from ekko.core.codec import (
    MAX_DELTAS_PER_MSG,
    MsgType,
    array_from_wire,
    array_to_wire,
    delta_from_wire,
    delta_to_wire,
    field,
    int_field,
)
from ekko.core.delta import Delta
from ekko.core.errors import ProtocolError, UsageError
from rollback.protocol import MAX_ROLLBACK_RECORDS
from ekko.core.messages import DeltaFacts, Outgoing
from ekko.core.parse_cache import freeze
from ekko.core.spec import ModelSpec
from ekko.core.store import ApplyResult
from ekko.core.version import MAX_COUNTER, MAX_ORIGIN, ORIGIN_BITS
from p2p.membership import MemberState, parse_entries, roles_of
from p2p.outbound import QueuedRows
from p2p.sync import apply_links

if TYPE_CHECKING:  # the node class defines the per-model state
    from ekko.replica.node import _Model

#: wait before asking a link queue again when it reported ready but yielded nothing.
PUSH_RETRY_S = 0.001
#: most publishers (origins) one push delta may carry chain links for, per shard.
MAX_LINK_ORIGINS = 4
#: share of gossip rounds spent on a partner in our own DC.
LOCAL_GOSSIP_SHARE = 0.75


def _aligned(d: Delta, res: ApplyResult, per_row: np.ndarray) -> np.ndarray:
    """``per_row`` (aligned with ``d.ids``) picked for the rows an apply changed (``res.ids``)."""
    if len(res) == len(d) and res.ids is d.ids:
        return per_row
    order = np.argsort(d.ids, kind="stable")
    pos = np.searchsorted(d.ids[order], res.ids)
    return per_row[order][np.minimum(pos, len(order) - 1)]


def _impact_of(d: Delta, res: ApplyResult) -> np.ndarray | None:
    """The publisher's impact metadata of the rows an apply changed (aligned with res.ids)."""
    if d.impact is None or not len(res):
        return None
    return _aligned(d, res, d.impact)


def _priority_to_wire(b: QueuedRows) -> list[bytes] | None:
    """A pushed batch's scores and classes, so the next hop ranks the rows as the
    publisher's replica did (it knows the publisher's magnitude; a gateway does not)."""
    if b.scores is None or b.high is None:
        return None
    return [array_to_wire(np.asarray(b.scores, np.float32)), np.packbits(np.asarray(b.high, bool)).tobytes()]


def _priority_from_wire(e: Any, n: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Inverse of :func:`_priority_to_wire` for a delta of ``n`` rows; None when absent."""
    if e is None:
        return None
    if not isinstance(e, list) or len(e) != 2:
        raise ProtocolError("bad push priority entry", "bad_body")
    scores = array_from_wire(e[0], np.float32, n, "scores")
    if not (np.isfinite(scores) & (scores >= 0)).all():
        raise ProtocolError("push scores must be finite and >= 0", "bad_body")
    if not isinstance(e[1], bytes) or len(e[1]) != (n + 7) // 8:
        raise ProtocolError("bad push classes", "bad_body")
    high = np.unpackbits(np.frombuffer(e[1], np.uint8), count=n).astype(bool)
    return scores, high


class PushGossipMixin:
    """Push queues, fan-out, and gossip of members, catalog and rollbacks."""

    # ------------------------------------------------------------------ internals: push
    def _incarnation(self) -> int:
        me = self.members.get(self.node_id)
        return me.incarnation if me is not None else 0

    def _live_peers(self, dc: str | None = None) -> list[str]:
        """Live members other than us (in ``dc`` when given); cached per membership version."""
        version = self.members.version
        hit = self._peers_cache.get(dc)
        if hit is not None and hit[0] == version:
            return hit[1]
        # From the member list's own cache (one list per DC, shared by every node that
        # shares the list, as in the simulator's shared mode): dropping ourselves is a
        # C-level copy, not a walk over every member in Python.
        live = self.members.live_ids(dc)
        try:
            i = live.index(self.node_id) if dc is None or dc == self.dc else -1
        except ValueError:
            i = -1
        peers = live[:i] + live[i + 1:] if i >= 0 else live
        self._peers_cache[dc] = (version, peers)
        return peers

    def _ordinary_peers(self, dc: str | None = None) -> list[str]:
        """:meth:`_live_peers` less pinned baselines (they take no pushes and start their
        own anti-entropy rounds, capped at their cut: see :meth:`set_baseline_pin`)."""
        peers = self._live_peers(dc)
        version = self.members.version
        hit = self._peers_cache.get(("ordinary", dc))
        if hit is not None and hit[0] == version and hit[2] is peers:
            return hit[1]
        get = self.members.members.get
        out = [p for p in peers if not getattr(get(p), "role", "")]
        if len(out) == len(peers):
            out = peers
        self._peers_cache[("ordinary", dc)] = (version, out, peers)
        return out

    def _refresh_topology(self) -> None:
        if self.topology.version == self.members.version:
            return  # cheap check first: building the live map walks every member
        alive = self.members.alive()
        # Pinned baselines are never gateways: a cross-DC push or pull reaching one would
        # stop at its cut instead of reaching its DC.  A DC of baselines only keeps them
        # (it must still hear from the others).
        ordinary_dcs = {mem.dc for mem in alive if not mem.role}
        live = {mem.node_id: mem.dc for mem in alive if not mem.role or mem.dc not in ordinary_dcs}
        self.topology.update(live, self.members.version)

    def _enqueue(self, peer: str, rows: QueuedRows, now: float) -> None:
        q = self.queues.get(peer)
        if q is None:
            mem = self.members.get(peer)
            q = self.queues[peer] = self.queue_factory(peer, mem.dc if mem else "")
        q.put(rows, now)

    def _queued(self, m: _Model, table: str, res: ApplyResult, now: float, impact: np.ndarray | None = None,
                links: np.ndarray | None = None) -> QueuedRows:
        rb = m.spec.table(table).row_bytes
        if self.prioritizer is None:
            return QueuedRows(m.spec.name, table, res.ids, res.versions, rb, links=links)
        # The scheduler's queues reorder and split batches, so chain links do not survive
        # them: with a scheduler, knowledge off the ingest advances by anti-entropy only.
        return self.prioritizer.queued_rows(m.spec.name, table, res.ids, res.versions, rb, now,
                                            impact=impact, old_versions=res.old_versions)

    def _push_random(self, m: _Model, table: str, res: ApplyResult, now: float, exclude: str = "") -> None:
        peers = [p for p in self._ordinary_peers() if p != exclude]
        rows = self._queued(m, table, res, now)
        for peer in self.rng.sample(peers, min(self.config.random_fanout, len(peers))):
            self._enqueue(peer, rows, now)

    def _push_from_ingest(self, m: _Model, table: str, res: ApplyResult, now: float,
                          impact: np.ndarray | None = None,
                          links: np.ndarray | None = None) -> None:
        if not len(res):
            return
        if self.config.push_mode == "random":
            self._push_random(m, table, res, now)
            return
        spec = m.spec.table(table)
        rows = self._queued(m, table, res, now, impact, links)
        for peer in self._ordinary_peers(self.dc):
            self._enqueue(peer, rows, now)
        self._refresh_topology()
        # One copy per remote DC, to the rank-0 gateway of the batch's first shard:
        # each member of that DC then gets the batch in one frame from it (per-shard
        # gateways would multiply LAN frames by the shards a batch touches), and WAN
        # load still spreads over the DC's members as batches hit different shards.
        lead = int(spec.shard_of(int(res.ids[0])))
        for dc in self.topology.dcs():
            if dc == self.dc:
                continue
            gw = self.topology.gateways(m.spec.name, table, spec.num_shards, dc)
            if gw.shape[1] == 0:
                continue
            self._enqueue(str(gw[lead, 0]), rows, now)

    def flush(self, now: float) -> None:
        """Turn ready queued rows into PUSH frames (as far as each link's budget allows)."""
        # The same batch is usually queued for many peers (a DC fan-out): build its
        # wire form once per flush.
        built: dict[tuple[int, ...], tuple[list[dict[str, Any]], int, list[QueuedRows]]] = {}
        next_push = float("inf")
        for peer, q in self.queues.items():
            ready = q.next_ready(now)
            while ready is not None and ready <= now:
                batches = q.take(now, self.config.push_frame_bytes)
                if not batches:
                    # The queue said "ready" but gave nothing (a budget rounding edge):
                    # look again a moment later rather than spinning at this instant.
                    ready = now + PUSH_RETRY_S
                    break
                key = tuple(id(b.ids) for b in batches)
                got = built.get(key)
                if got is None:
                    # Keep the batches alive with their wire form: ids are only unique
                    # among live objects.
                    got = built[key] = (*self._push_deltas(batches), batches)
                self._send_push(peer, got[0], got[1], got[2])
                ready = q.next_ready(now)
            if ready is not None and ready < next_push:
                next_push = ready
        self._next_push = next_push

    def _push_deltas(self, batches: list[QueuedRows]) -> tuple[list[dict[str, Any]], int, dict[str, list]]:
        """Wire deltas of queued batches, their value bytes left out in metadata mode, and
        the optional per-delta fields (``prio``, ``links``) that some batch carries."""
        deltas = []
        prio: list[list[bytes] | None] = []
        links: list[bytes | None] = []
        extra = 0
        for b in batches:
            m = self.models.get(b.model)
            if m is None:
                continue
            ts = m.store.table(b.table)
            d = ts.take(b.model, b.ids)
            deltas.append(delta_to_wire(d))
            prio.append(_priority_to_wire(b))
            links.append(array_to_wire(b.links) if b.links is not None else None)
            if d.values is None:
                extra += len(d) * ts.spec.row_bytes
        optional = {k: v for k, v in (("prio", prio), ("links", links)) if any(x is not None for x in v)}
        return deltas, extra, optional

    def _send_push(self, peer: str, deltas: list[dict[str, Any]], extra: int,
                   optional: dict[str, list] | None = None) -> None:
        mem = self.members.get(peer)
        if mem is None or mem.state == MemberState.DEAD:
            return
        if deltas:
            self.counters["push_frames_sent"] += 1
            body = {"from": self.node_id, "dc": self.dc, "deltas": deltas}
            if optional:
                body.update(optional)   # "prio", "links": older receivers ignore them
            self._out.append(Outgoing(peer, mem.address, MsgType.PUSH, body, extra))

    def _on_push(self, body: dict[str, Any], now: float) -> None:
        # field() for each, only when the plain lookups do not already show the right
        # types (it raises the same errors in the same order).
        sender, sender_dc, raw = body.get("from"), body.get("dc"), body.get("deltas")
        if type(sender) is not str or type(sender_dc) is not str or type(raw) is not list:
            sender = field(body, "from", str)
            sender_dc = field(body, "dc", str)
            raw = field(body, "deltas", list)
        prio_raw, links_raw = body.get("prio"), body.get("links")
        if prio_raw is not None and type(prio_raw) is not list:
            prio_raw = field(body, "prio", list, optional=True, default=None)
        if links_raw is not None and type(links_raw) is not list:
            links_raw = field(body, "links", list, optional=True, default=None)
        cache = self.parse_cache
        companions = (prio_raw, links_raw, self.with_values)
        parsed = cache.get(raw, companions, self._same_specs) if cache is not None else None
        if parsed is None:
            parsed = self._parse_push(raw, prio_raw, links_raw, frozen=cache is not None)
            if cache is not None:
                cache.put(raw, companions, parsed[4], parsed)
        deltas, prio, links, top, _, facts = parsed
        self.refuse_future((), now, "push", known=top)
        # A push from another DC reached us as that shard's gateway: forward it over
        # the LAN.  Pushes from our own DC stop here, so there are no loops.
        rumor = self.config.push and self.config.push_mode == "random"
        forward = sender_dc != self.dc and self.config.push and not rumor
        peers = [p for p in self._ordinary_peers(self.dc) if p != sender] if forward else []
        for i, d in enumerate(deltas):
            m = self.models[d.model]
            f = facts[i]
            res = self._apply(m, d, now, "push", f)
            ls = links[i] if links else None
            if ls is not None and not self._baseline_pin:
                # The frame carries every row of these publish-chain links: knowledge
                # advances here as it did at the ingest, so anti-entropy finds equal shard
                # versions instead of re-listing rows every replica already holds.
                self.counters["push_links"] += len(f.links)
                waiting: list[int] = []
                m.dirty[d.table].update(apply_links(m.shards[d.table], f.links, waiting))
                for s in waiting:
                    self._note_waiting(m, d.table, s, now)
            # Forwarded rows keep the links only when every row went on (see QueuedRows.links).
            fwd_links = ls if ls is not None and len(res) == len(d) else None
            if rumor and len(res):
                # Rumor mongering: pass on only what was new to us, so it dies out.
                self._push_random(m, d.table, res, now, exclude=sender)
                forward = True
            elif forward and len(res):
                pr = prio[i] if prio else None
                if pr is not None and self.prioritizer is not None:
                    # Rank as the publisher's replica did: same score, same class.
                    rows = QueuedRows(m.spec.name, d.table, res.ids, res.versions, m.spec.table(d.table).row_bytes,
                                      scores=_aligned(d, res, pr[0]), high=_aligned(d, res, pr[1]))
                else:
                    rows = self._queued(m, d.table, res, now, _impact_of(d, res), fwd_links)
                for p in peers:
                    self._enqueue(p, rows, now)
        self.counters["push_frames_received"] += 1
        if forward:
            self.flush(now)

    def _parse_push(self, raw: list[Any], prio_raw: list[Any] | None, links_raw: list[Any] | None,
                    frozen: bool = False) -> tuple[list[Delta], list[Any], list[Any], int, tuple[Any, ...],
                                                   list[DeltaFacts]]:
        """Decode and validate a push's deltas, priorities and chain links, whole:
        ``(deltas, prio, links, top counter, (model, table, spec) per delta, facts)``."""
        if len(raw) > MAX_DELTAS_PER_MSG:
            raise ProtocolError("too many deltas in one push", "too_large")
        deltas = [delta_from_wire(d, self.table_spec, values_required=self.with_values) for d in raw]
        if prio_raw is not None and len(prio_raw) != len(deltas):
            raise ProtocolError("push priorities do not match its deltas", "bad_body")
        prio = [_priority_from_wire(e, len(d)) for e, d in zip(prio_raw, deltas)] if prio_raw else []
        if links_raw is not None and len(links_raw) != len(deltas):
            raise ProtocolError("push chain links do not match its deltas", "bad_body")
        links = [self._links_from_wire(e, d) for e, d in zip(links_raw, deltas)] if links_raw else []
        top = max([int(d.versions.max()) >> ORIGIN_BITS for d in deltas if len(d)]
                  + [int(ls[:, 3].max()) for ls in links if ls is not None and len(ls)], default=0)
        specs = tuple((d.model, d.table, self.table_spec(d.model, d.table)) for d in deltas)
        facts = []
        for i, (d, (_, _, spec)) in enumerate(zip(deltas, specs)):
            srt = np.sort(d.ids)
            shards = spec.shards_of(d.ids)
            shard_max = np.zeros(spec.num_shards, np.int64)
            np.maximum.at(shard_max, shards, d.versions)
            ls = links[i] if links else None
            facts.append(DeltaFacts(not bool((srt[1:] == srt[:-1]).any()), shards, shard_max,
                                    int(d.versions.max()) if len(d) else 0, ls.tolist() if ls is not None else None))
            if frozen:  # shared with other receivers (ParseCache)
                freeze(d.ids, d.versions, d.values, d.tombstone, d.impact, shards, shard_max)
        return deltas, prio, links, top, specs, facts

    def _same_specs(self, specs: tuple[Any, ...]) -> bool:
        models = self.models
        for name, table, spec in specs:  # table_spec(name, table) is spec, without the calls
            m = models.get(name)
            if m is None or spec is None:
                return False
            for t in m.spec.tables:
                if t.name == table:
                    if t is not spec:
                        return False
                    break
            else:
                return False
        return True

    def _links_from_wire(self, e: Any, d: Delta) -> np.ndarray | None:
        """A push delta's chain links (int64 ``[shard, origin, after, upto]`` rows) or
        None; checked whole before anything applies."""
        if e is None:
            return None
        spec = self.table_spec(d.model, d.table)
        if not isinstance(e, bytes) or len(e) % 32 or len(e) // 32 > spec.num_shards * MAX_LINK_ORIGINS:
            raise ProtocolError("bad push chain links", "bad_body")
        a = array_from_wire(e, np.int64, len(e) // 32, "links", width=4)
        s, o, after, upto = a.T
        if not ((s >= 0) & (s < spec.num_shards) & (o >= 1) & (o <= MAX_ORIGIN) & (after >= 0)
                & (after < upto) & (upto <= MAX_COUNTER)).all():
            raise ProtocolError("bad push chain link", "bad_body")
        return a

    # ------------------------------------------------------------------ internals: gossip
    def catalog_digest(self) -> int:
        if self._catalog_digest is None:
            h = hashlib.blake2b(digest_size=8)
            for name in sorted(self.models):
                h.update(repr(self.models[name].spec.to_dict()).encode())
            self._catalog_digest = int.from_bytes(h.digest(), "little")
        return self._catalog_digest

    def _gossip_body(self, req: bool, with_catalog: bool = False, to_dc: str | None = None) -> dict[str, Any]:
        mem = self.members.gossip_entries(self.rng, prefer_dc=to_dc)
        body: dict[str, Any] = {"k": "g", "from": self.node_id, "mem": mem,
                                "cat": self.catalog_digest(), "req": req,
                                "heads": {n: m.head for n, m in self.models.items()}}
        roles = roles_of(self.members, mem)
        if roles:
            body["roles"] = roles   # optional: older peers ignore it
        if with_catalog:
            body["specs"] = [m.spec.to_dict() for m in self.models.values()]
        if self.rollbacks:
            body["rb"] = list(self.rollbacks.values())[-MAX_ROLLBACK_RECORDS:]
        if self.models:
            body["ms"] = self._model_states_wire()
            cd = self._cut_digests_wire()
            if cd:
                body["cd"] = cd   # optional: per model, the digest of its named cuts
        return body

    def _gossip_round(self, now: float) -> None:
        if self.static_membership:
            return
        self.members.tick(now)
        died = self.members.check(now)
        if died:
            self.counters["members_died"] += len(died)
        local = self._live_peers(self.dc)
        peers = self._live_peers()
        # Mostly gossip inside the DC (cheap, and DC members watch each other for
        # gateway failover); now and then across, so DCs keep seeing each other.
        pool = local if local and self.rng.random() < LOCAL_GOSSIP_SHARE else peers
        if pool:
            peer = self.members.get(self.rng.choice(pool))
            self._out.append(Outgoing(peer.node_id, peer.address, MsgType.GOSSIP,
                                      self._gossip_body(True, to_dc=peer.dc)))
        if len(peers) < 2 or self.rng.random() < 0.05:
            # Keep contacting seeds while we know few peers (join), and now and then
            # afterwards so a partitioned-off node finds its way back.
            for s in self.seeds:
                self._out.append(Outgoing("", s, MsgType.GOSSIP, self._gossip_body(True)))

    def _on_gossip(self, body: dict[str, Any], now: float) -> None:
        sender = field(body, "from", str)
        entries = parse_entries(field(body, "mem", list), body.get("roles"))
        cat = int_field(body, "cat", 0, (1 << 64) - 1)
        req = field(body, "req", bool)
        heads = field(body, "heads", dict, optional=True, default={})
        specs = None
        if "specs" in body:
            specs = [ModelSpec.from_dict(s) for s in field(body, "specs", list)]
        rbs = field(body, "rb", list, optional=True, default=[])
        if len(rbs) > MAX_ROLLBACK_RECORDS:
            raise ProtocolError("too many rollback records", "bad_body")
        # A record's id must be a string to be looked up (a list id crashed this as a TypeError).
        # A known id with other content is a concurrent record of the same incident: merge it.
        new_rbs = [rb for rb in rbs if isinstance(rb, dict)
                   and (not isinstance(rb.get("id"), str) or self.rollbacks.get(rb["id"]) != rb)]
        for rb in new_rbs:  # validated before anything changes: a refused gossip changes nothing
            self._parse_rollback(rb, now)
        states = self._parse_model_states(body["ms"]) if "ms" in body else None
        cuts_differ = self._parse_cut_digests(body["cd"]) if "cd" in body else []
        self.members.merge(entries, now)
        if isinstance(heads, dict):
            # Heads beyond our clock + skew bound are dropped: they would fake everyone's lag.
            horizon = self.counter_horizon(now)
            self.peer_heads[sender] = {k: v for k, v in heads.items()
                                       if isinstance(k, str) and isinstance(v, int) and 0 <= v <= horizon}
        for spec in specs or ():
            try:
                self.register_model(spec, now)
            except UsageError:
                self.counters["catalog_conflicts"] += 1
        for rb in new_rbs:
            self._apply_rollback(rb, now)
        if states is not None:
            self.peer_model_states[sender] = states
        if cuts_differ:
            self._ask_cuts(sender, cuts_differ)
        if req:
            mem = self.members.get(sender)
            if mem is not None:
                self._out.append(Outgoing(sender, mem.address, MsgType.GOSSIP,
                                          self._gossip_body(False, with_catalog=cat != self.catalog_digest(),
                                                            to_dc=mem.dc)))
        elif cat != self.catalog_digest() and specs is None:
            # They have models we lack (or the reverse): ask with our catalog attached.
            mem = self.members.get(sender)
            if mem is not None:
                self._out.append(Outgoing(sender, mem.address, MsgType.GOSSIP,
                                          self._gossip_body(True, with_catalog=True)))
