"""Eager push of a replica: :class:`EagerPush`, a component the replica node holds.

The ingest replica pushes new rows to its DC and to the rank-0 gateway of each other
DC; a replica that gets a push from another DC forwards it over its LAN.  Rows wait
in one outbound queue per link (FIFO, or the priority scheduler's) until a flush
turns them into ``PUSH`` frames.  Membership gossip is :mod:`p2p.gossip`.
"""

from __future__ import annotations

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
)
from ekko.core.delta import Delta
from ekko.core.errors import ProtocolError
from ekko.core.messages import DeltaFacts, Outgoing
from ekko.core.parse_cache import freeze
from ekko.core.store import ApplyResult
from ekko.core.version import MAX_COUNTER, MAX_ORIGIN, ORIGIN_BITS
from p2p.membership import MemberState
from p2p.outbound import LinkQueue, QueuedRows, QueueFactory
from p2p.sync import apply_links

if TYPE_CHECKING:
    from ekko.core.parse_cache import ParseCache
    from p2p.gap_probe import GapProbe
    from p2p.host import NodeServices
    from p2p.model_state import ModelState
    from rollback.protocol import RollbackProtocol

#: wait before asking a link queue again when it reported ready but yielded nothing.
PUSH_RETRY_S = 0.001
#: most publishers (origins) one push delta may carry chain links for, per shard.
MAX_LINK_ORIGINS = 4


def _aligned(d: Delta, res: ApplyResult, per_row: np.ndarray) -> np.ndarray:
    """``per_row`` (aligned with ``d.ids``) picked for the rows an apply changed (``res.ids``)."""
    if len(res) == len(d) and res.ids is d.ids:
        return per_row
    order = np.argsort(d.ids, kind="stable")
    pos = np.searchsorted(d.ids[order], res.ids)
    return per_row[order][np.minimum(pos, len(order) - 1)]


def _slice_key(b: QueuedRows) -> tuple[Any, ...]:
    """What makes two queued batches the same rows: the memory their ids and versions
    sit at.  Every link queue of a DC fan-out holds the same batch and splits it at the
    same shard boundaries, so their slices are views at equal addresses and lengths, and
    the peers get one wire form (and, in the transport, one encoded frame).  Addresses
    are unique among live arrays, and :meth:`EagerPush.flush` keeps the batches alive."""
    return (b.model, b.table, b.ids.__array_interface__["data"][0], len(b),
            b.versions.__array_interface__["data"][0], b.links is not None)


def impact_of(d: Delta, res: ApplyResult) -> np.ndarray | None:
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


class EagerPush:
    """Push queues and fan-out: rows out of the ingest and forwarded rows, as PUSH frames.

    Args:
        host: the replica (:class:`p2p.host.NodeServices`).
        queue_factory: builds the outbound queue of each link (the scheduler's hook).
        prioritizer: scores each pushed batch once (:class:`prioritizer.Prioritizer`);
            None = plain FIFO batches.
        gaps: the gap probe component (pushed chain links may leave a shard waiting).
        rollback: the rollback component (a pinned baseline adopts no pushed links).

    Example (through the replica node, which holds one):
        >>> from ekko.replica.node import ReplicaNode
        >>> n = ReplicaNode("r1", "dc1", "127.0.0.1:1", device="cpu")
        >>> n.eager_push.queues is n.queues, n.next_deadline() == 0.0
        (True, True)
    """

    def __init__(self, host: NodeServices, queue_factory: QueueFactory, prioritizer: Any,
                 gaps: GapProbe, rollback: RollbackProtocol) -> None:
        self.host = host
        self.queue_factory = queue_factory
        self.queues: dict[str, LinkQueue] = {}
        # Shared parse results of push payloads (ekko.core.parse_cache); the simulator sets one.
        self.parse_cache: ParseCache | None = None
        self.prioritizer = prioritizer
        self.gaps = gaps
        self.rollback = rollback
        #: when a queue is next ready (the node's push timer).
        self.next_push = float("inf")
        #: a flush left ready rows queued for want of room at the driver (host.push_room):
        #: the driver flushes again when a link drains, not the push timer.
        self.held_back = False

    def enqueue(self, peer: str, rows: QueuedRows, now: float) -> None:
        q = self.queues.get(peer)
        if q is None:
            mem = self.host.members.get(peer)
            q = self.queues[peer] = self.queue_factory(peer, mem.dc if mem else "")
        q.put(rows, now)

    def queued(self, m: ModelState, table: str, res: ApplyResult, now: float, impact: np.ndarray | None = None,
                links: np.ndarray | None = None) -> QueuedRows:
        spec = m.spec.table(table)
        rb = spec.row_bytes
        if self.prioritizer is None:
            if links is None:
                return QueuedRows(m.spec.name, table, res.ids, res.versions, rb)
            # Rows grouped by shard: a batch over a frame's budget is then split between
            # shards, and each part keeps the links of the shards it carries.
            shards = spec.shards_of(res.ids)
            order = np.argsort(shards, kind="stable")
            return QueuedRows(m.spec.name, table, res.ids[order], res.versions[order], rb, links=links,
                              shards=shards[order])
        # The scheduler's queues reorder and split batches, so chain links do not survive
        # them: with a scheduler, knowledge off the ingest advances by anti-entropy only.
        return self.prioritizer.queued_rows(m.spec.name, table, res.ids, res.versions, rb, now,
                                            impact=impact, old_versions=res.old_versions)

    def push_random(self, m: ModelState, table: str, res: ApplyResult, now: float, exclude: str = "") -> None:
        peers = [p for p in self.host.peers.ordinary() if p != exclude]
        rows = self.queued(m, table, res, now)
        for peer in self.host.rng.sample(peers, min(self.host.config.random_fanout, len(peers))):
            self.enqueue(peer, rows, now)

    def push_from_ingest(self, m: ModelState, table: str, res: ApplyResult, now: float,
                          impact: np.ndarray | None = None,
                          links: np.ndarray | None = None, origin: int | None = None) -> None:
        """Push rows this replica took first (a publish, a repair) to its DC and to one
        gateway of every other DC.  ``origin``: the publisher of the rows (a publish),
        whose frames then all cross by the same gateway of each DC."""
        if not len(res):
            return
        if self.host.config.push_mode == "random":
            self.push_random(m, table, res, now)
            return
        if m.spec.placed_table(table):
            self._push_to_holders(m, table, res, now, impact, links, every_dc=True)
            return
        spec = m.spec.table(table)
        rows = self.queued(m, table, res, now, impact, links)
        for peer in self.host.peers.ordinary(self.host.dc):
            self.enqueue(peer, rows, now)
        self.host.peers.refresh_topology()
        # One copy per remote DC, to one gateway there: each member of that DC then gets
        # the batch in one frame from it (per-shard gateways would multiply LAN frames by
        # the shards a batch touches).  A publisher's frames all cross by the same one,
        # the rank-0 gateway of shard ``origin mod shards``, so that the DC's members get
        # them in order on that gateway's stream, as their chain links need.  (Chosen by
        # each batch's first shard, consecutive frames of one publisher crossed by
        # different gateways and reached the others out of order; under load a gateway
        # ran seconds behind, the chains waited past gap_probe_after, and the probes'
        # answers -- every member's rows of the range -- fed the overload: four
        # publishers, 3x3 daemons, bench/throughput.py.)  WAN load spreads over a DC's
        # members by publisher; rows without a publisher (a repair) by first shard.
        lead = (origin % spec.num_shards if origin is not None
                else int(spec.shard_of(int(res.ids[0]))))
        for dc in self.host.topology.dcs():
            if dc == self.host.dc:
                continue
            gw = self.host.topology.gateways(m.spec.name, table, spec.num_shards, dc)
            if gw.shape[1] == 0:
                continue
            self.enqueue(str(gw[lead, 0]), rows, now)

    def _push_to_holders(self, m: ModelState, table: str, res: ApplyResult, now: float,
                         impact: np.ndarray | None, links: np.ndarray | None, every_dc: bool,
                         exclude: str = "") -> None:
        """Rows of a placed table go to the holders of their shards only: the other holders
        in this DC and, with ``every_dc``, the first holder (rank-0 gateway) of each shard
        in every other DC -- one part per destination, each with the chain links of the
        shards it carries whole (a shard's rows all go to the same places)."""
        spec = m.spec
        shards = spec.table(table).shards_of(res.ids)
        dest: dict[str, np.ndarray] = {}
        self.host.peers.refresh_topology()
        mine = self.host.placement.holders(spec, table, self.host.dc)[shards]
        for node in np.unique(mine).tolist() if mine.size else []:
            if node != self.host.node_id and node != exclude:
                dest[node] = (mine == node).any(axis=1)
        if every_dc:
            for dc in self.host.topology.dcs():
                if dc == self.host.dc:
                    continue
                gw = self.host.placement.gateways(spec, table, dc)
                if gw.shape[1] == 0:
                    continue
                first = gw[shards, 0]
                for node in np.unique(first).tolist():
                    dest[node] = first == node
        for node, mask in dest.items():
            part = ApplyResult(res.ids[mask], res.versions[mask], res.old_versions[mask])
            part_links = None
            if links is not None:
                part_links = links[np.isin(links[:, 0], shards[mask])]
                part_links = part_links if len(part_links) else None
            self.enqueue(node, self.queued(m, table, part, now, None if impact is None else impact[mask],
                                           part_links), now)

    def flush(self, now: float) -> None:
        """Turn ready queued rows into PUSH frames (as far as each link's budget allows)."""
        # The same batch is usually queued for many peers (a DC fan-out): build its
        # wire form once per flush.
        built: dict[tuple[int, ...], tuple[list[dict[str, Any]], int, list[QueuedRows]]] = {}
        next_push = float("inf")
        cfg = self.host.config
        room_of = self.host.push_room
        self.held_back = False
        for peer, q in self.queues.items():
            ready = q.next_ready(now)
            mem = self.host.members.get(peer)
            frame_bytes = (cfg.lan_push_frame_bytes if mem is not None and mem.dc == self.host.dc
                           else cfg.push_frame_bytes)
            room = room_of(peer) if room_of is not None and ready is not None and ready <= now else None
            while ready is not None and ready <= now:
                if room is not None:
                    if room <= 0:
                        # The link to the peer is full: the rows wait here, where later
                        # batches join them in bigger frames, until the driver reports the
                        # link drained (no timer: waiting for room is not a deadline).
                        self.held_back = True
                        ready = None
                        break
                    room -= 1
                batches = q.take(now, frame_bytes)
                if not batches:
                    # The queue said "ready" but gave nothing (a budget rounding edge):
                    # look again a moment later rather than spinning at this instant.
                    ready = now + PUSH_RETRY_S
                    break
                key = tuple(_slice_key(b) for b in batches)
                got = built.get(key)
                if got is None:
                    # Keep the batches alive with their wire form: ids are only unique
                    # among live objects.
                    got = built[key] = (*self._push_deltas(batches), batches)
                self._send_push(peer, got[0], got[1], got[2])
                ready = q.next_ready(now)
            if ready is not None and ready < next_push:
                next_push = ready
        self.next_push = next_push

    def _push_deltas(self, batches: list[QueuedRows]) -> tuple[list[dict[str, Any]], int, dict[str, list]]:
        """Wire deltas of queued batches, their value bytes left out in metadata mode, and
        the optional per-delta fields (``prio``, ``links``) that some batch carries."""
        deltas = []
        prio: list[list[bytes] | None] = []
        links: list[bytes | None] = []
        extra = 0
        for b in batches:
            m = self.host.models.get(b.model)
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
        mem = self.host.members.get(peer)
        if mem is None or mem.state == MemberState.DEAD:
            return
        if deltas:
            self.host.counters["push_frames_sent"] += 1
            self.host.counters["push_deltas_sent"] += len(deltas)
            body = {"from": self.host.node_id, "dc": self.host.dc, "deltas": deltas}
            if optional:
                body.update(optional)   # "prio", "links": older receivers ignore them
            self.host.send(Outgoing(peer, mem.address, MsgType.PUSH, body, extra))

    def on_push(self, body: dict[str, Any], now: float) -> None:
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
        companions = (prio_raw, links_raw, self.host.with_values)
        parsed = cache.get(raw, companions, self._same_specs) if cache is not None else None
        if parsed is None:
            parsed = self._parse_push(raw, prio_raw, links_raw, frozen=cache is not None)
            if cache is not None:
                cache.put(raw, companions, parsed[4], parsed)
        deltas, prio, links, top, _, facts = parsed
        self.host.refuse_future((), now, "push", known=top)
        # A push from another DC reached us as that shard's gateway: forward it over
        # the LAN.  Pushes from our own DC stop here, so there are no loops.
        rumor = self.host.config.push and self.host.config.push_mode == "random"
        forward = sender_dc != self.host.dc and self.host.config.push and not rumor
        peers = [p for p in self.host.peers.ordinary(self.host.dc) if p != sender] if forward else []
        for i, d in enumerate(deltas):
            m = self.host.models[d.model]
            f = facts[i]
            res = self.host.apply_delta(m, d, now, "push", f)
            ls = links[i] if links else None
            if ls is not None and not self.rollback.baseline_pin:
                # The frame carries every row of these publish-chain links: knowledge
                # advances here as it did at the ingest, so anti-entropy finds equal shard
                # versions instead of re-listing rows every replica already holds.
                self.host.counters["push_links"] += len(f.links)
                waiting: list[int] = []
                held = m.held(d.table)
                # A placed table: knowledge only of the shards kept here.
                flinks = f.links if held is None else [lk for lk in f.links if held[lk[0]]]
                moved = apply_links(m.shards[d.table], flinks, waiting)
                m.dirty[d.table].update(moved)
                # Whole publish chains arrive by push here: these shards are in motion,
                # and anti-entropy leaves them alone a while (ModelState.in_motion).
                m.pushed_at[d.table][moved] = now
                for s in waiting:
                    self.gaps.note_waiting(m, d.table, s, now)
            # Forwarded rows keep the links only when every row of the delta goes on (see
            # QueuedRows.links).  A row already held here at a newer version -- a later
            # publish of the origin that came round by another gateway first -- reflects
            # this publish all the same: it goes on at the version held, and the links with
            # it (dropping them left the peers' chains waiting for a gap probe and a pull:
            # 4 publishers, 3x3 daemons).  A row held below its pushed version (refused
            # here, e.g. beyond a rollback's fence) voids them.
            fwd, fwd_links = res, None
            if ls is not None:
                if len(res) == len(d):
                    fwd_links = ls
                elif forward and not rumor:
                    held = m.store.table(d.table).versions[d.ids]
                    if (held >= d.versions).all():
                        fwd, fwd_links = ApplyResult(d.ids, held, held), ls
            if rumor and len(res):
                # Rumor mongering: pass on only what was new to us, so it dies out.
                self.push_random(m, d.table, res, now, exclude=sender)
                forward = True
            elif forward and len(fwd) and m.spec.placed_table(d.table):
                # To the other holders of these shards in this DC (none when r = 1).
                self._push_to_holders(m, d.table, fwd, now, impact_of(d, fwd), fwd_links, every_dc=False,
                                      exclude=sender)
            elif forward and len(fwd):
                pr = prio[i] if prio else None
                rows: QueuedRows | None
                if pr is not None and self.prioritizer is not None:
                    # Rank as the publisher's replica did: same score, same class (the
                    # scheduler's queues void links: only what changed here goes on).
                    rows = (QueuedRows(m.spec.name, d.table, res.ids, res.versions, m.spec.table(d.table).row_bytes,
                                       scores=_aligned(d, res, pr[0]), high=_aligned(d, res, pr[1]))
                            if len(res) else None)
                else:
                    rows = self.queued(m, d.table, fwd, now, impact_of(d, fwd), fwd_links)
                if rows is not None:
                    for p in peers:
                        self.enqueue(p, rows, now)
        self.host.counters["push_frames_received"] += 1
        if forward:
            self.flush(now)

    def _parse_push(self, raw: list[Any], prio_raw: list[Any] | None, links_raw: list[Any] | None,
                    frozen: bool = False) -> tuple[list[Delta], list[Any], list[Any], int, tuple[Any, ...],
                                                   list[DeltaFacts]]:
        """Decode and validate a push's deltas, priorities and chain links, whole:
        ``(deltas, prio, links, top counter, (model, table, spec) per delta, facts)``."""
        if len(raw) > MAX_DELTAS_PER_MSG:
            raise ProtocolError("too many deltas in one push", "too_large")
        deltas = [delta_from_wire(d, self.host.table_spec, values_required=self.host.with_values) for d in raw]
        if prio_raw is not None and len(prio_raw) != len(deltas):
            raise ProtocolError("push priorities do not match its deltas", "bad_body")
        prio = [_priority_from_wire(e, len(d)) for e, d in zip(prio_raw, deltas)] if prio_raw else []
        if links_raw is not None and len(links_raw) != len(deltas):
            raise ProtocolError("push chain links do not match its deltas", "bad_body")
        links = [self._links_from_wire(e, d) for e, d in zip(links_raw, deltas)] if links_raw else []
        top = max([int(d.versions.max()) >> ORIGIN_BITS for d in deltas if len(d)]
                  + [int(ls[:, 3].max()) for ls in links if ls is not None and len(ls)], default=0)
        specs = tuple((d.model, d.table, self.host.table_spec(d.model, d.table)) for d in deltas)
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
        models = self.host.models
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
        spec = self.host.table_spec(d.model, d.table)
        if not isinstance(e, bytes) or len(e) % 32 or len(e) // 32 > spec.num_shards * MAX_LINK_ORIGINS:
            raise ProtocolError("bad push chain links", "bad_body")
        a = array_from_wire(e, np.int64, len(e) // 32, "links", width=4)
        s, o, after, upto = a.T
        if not ((s >= 0) & (s < spec.num_shards) & (o >= 1) & (o <= MAX_ORIGIN) & (after >= 0)
                & (after < upto) & (upto <= MAX_COUNTER)).all():
            raise ProtocolError("bad push chain link", "bad_body")
        return a

