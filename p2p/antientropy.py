"""State-based anti-entropy of a replica: :class:`AntiEntropy`, a component the replica node holds.

Digest-gated: a 64-bit digest per table over the scope's shards, then per-shard
versions, then pulls (:mod:`p2p.pull`) of the rows the requester's knowledge does not
cover, or, for shards whose versions differ only in their row hash, an audit
(:mod:`p2p.audit`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ekko.core.codec import (
    MsgType,
    array_from_wire,
    array_to_wire,
    field,
)
from ekko.core.config import MAX_SHARDS_PER_PULL
from ekko.core.errors import ProtocolError
from ekko.core.hash64 import mix64 as _mix
from ekko.core.messages import Outgoing

if TYPE_CHECKING:
    from p2p.audit import RowAudit
    from p2p.host import NodeServices
    from p2p.pull import Pulls
    from rollback.protocol import RollbackProtocol

_SHARD_SALT = np.uint64(0x9E3779B97F4A7C15)


_SALTS: dict[int, np.ndarray] = {}


def _shard_salts(n: int) -> np.ndarray:
    """``arange(n) * _SHARD_SALT`` (uint64, wrapping), computed once per table width."""
    got = _SALTS.get(n)
    if got is None:
        got = _SALTS[n] = np.arange(n, dtype=np.uint64) * _SHARD_SALT
        got.flags.writeable = False
    return got


#: scope digests remembered by their inputs (:func:`_scope_digest`); emptied when full.
SCOPE_DIGEST_MEMO_ENTRIES = 1 << 12
_SCOPE_DIGESTS: dict[tuple[bytes, bytes | None], int] = {}


def _scope_digest(digests: np.ndarray, mask: np.ndarray | None) -> int:
    # Replicas in sync hold equal shard versions, so the same inputs come back from
    # every replica of a DC round after round: look them up before mixing.
    key = (digests.tobytes(), None if mask is None else mask.tobytes())
    got = _SCOPE_DIGESTS.get(key)
    if got is None:
        mixed = _mix(digests ^ _shard_salts(len(digests)))
        if mask is not None:
            mixed = mixed[mask]
        got = int(np.bitwise_xor.reduce(mixed)) if len(mixed) else 0
        if len(_SCOPE_DIGESTS) >= SCOPE_DIGEST_MEMO_ENTRIES:
            _SCOPE_DIGESTS.clear()   # a pure function of the key: forgetting is safe
        _SCOPE_DIGESTS[key] = got
    return got


def _parse_fill(raw: Any) -> dict[tuple[str, str], list[int]]:
    """A summary's optional ``fill`` (``{model: {table: [shards]}}``), checked; {} when absent."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ProtocolError("bad fill list", "bad_body")
    out: dict[tuple[str, str], list[int]] = {}
    for name, tables in raw.items():
        if not isinstance(tables, dict):
            raise ProtocolError("bad fill list", "bad_body")
        for table, shards in tables.items():
            if not isinstance(shards, list) or len(shards) > MAX_SHARDS_PER_PULL or not all(
                    isinstance(s, int) and s >= 0 for s in shards):
                raise ProtocolError("bad fill list", "bad_body")
            out[(name, table)] = shards
    return out


class AntiEntropy:
    """Anti-entropy rounds every ``ae_interval``: partners, summaries and digests.

    Owns the WAN pairing walk (cursor, pairings, per-partner scope masks); the pulls
    that differing digests lead to are :class:`p2p.pull.Pulls`.

    Args:
        host: the replica (:class:`p2p.host.NodeServices`).
        pulls: the pull component (requests are sent through it).
        rollback: the rollback component (a pinned baseline's rounds stop at its cut).
        audit: the row audit component (shards that differ only in their rows).

    Example (through the replica node, which holds one):
        >>> from ekko.replica.node import ReplicaNode
        >>> n = ReplicaNode("r1", "dc1", "127.0.0.1:1", device="cpu")
        >>> n.anti_entropy.round(0.0), n.drain()     # no models: nothing to compare
        (None, [])
    """

    def __init__(self, host: NodeServices, pulls: Pulls, rollback: RollbackProtocol, audit: RowAudit) -> None:
        self.host = host
        self.pulls = pulls
        self.rollback = rollback
        self.audit = audit
        self._wan_cursor = 0
        self._pairings: list[tuple[str, int]] = []
        self._pairings_key: tuple[int, int] | None = None
        # ("wan", rank) scope masks per partner, for one topology version (_scope_masks).
        self._wan_masks: dict[Any, Any] = {}

    # ------------------------------------------------------------------ internals: anti-entropy
    def _scope_masks(self, scope: list[Any], partner: str) -> dict[tuple[str, str], np.ndarray | None]:
        """Shards (per table) that this node exchanges with ``partner`` under ``scope``.
        None means every shard."""
        out: dict[tuple[str, str], np.ndarray | None] = {}
        kind = scope[0]
        if kind in ("dc", "any"):
            for name, m in self.host.models.items():
                for t in m.spec.tables:
                    held = m.held(t.name)
                    if held is None:
                        out[(name, t.name)] = None
                        continue
                    # A placed table: the shards we keep that the placement gives the partner
                    # (during a hand-off the giver's scope holds the shard and the taker's
                    # does not: their digests differ, the giver lists it, the taker pulls).
                    mask = held & self.host.assigned(m.spec, t.name, node=partner)
                    if mask.any():
                        out[(name, t.name)] = mask
            return out
        # ("wan", rank): shards where we are both gateways of that rank in our DCs.
        rank = int(scope[1])
        pmem = self.host.members.get(partner)
        if pmem is None:
            return out
        self.host.peers.refresh_topology()
        # The answer only changes with the gateway choice (the topology's version) and the
        # models: remember it per (rank, partner) -- every round asks again.  Callers only
        # read the returned dict.
        memo = self._wan_masks
        version = self.host.topology.version
        if memo.get(None) != version:
            memo.clear()
            memo[None] = version
        key = (rank, partner, pmem.dc)
        hit = memo.get(key)
        specs = tuple(m.spec for m in self.host.models.values())
        if hit is not None and len(hit[0]) == len(specs) and all(a is b for a, b in zip(hit[0], specs)):
            return self._kept(hit[1])
        memo[key] = (specs, out)
        for name, m in self.host.models.items():
            for t in m.spec.tables:
                mine = self.host.placement.gateways(m.spec, t.name, self.host.dc)
                theirs = self.host.placement.gateways(m.spec, t.name, pmem.dc)
                if mine.shape[1] <= rank or theirs.shape[1] <= rank:
                    continue
                mask = (mine[:, rank] == self.host.node_id) & (theirs[:, rank] == partner)
                if mask.any():
                    out[(name, t.name)] = mask
        return self._kept(out)

    def _kept(self, masks: dict[tuple[str, str], np.ndarray | None]) -> dict[tuple[str, str], np.ndarray | None]:
        """WAN scope masks less the placed shards not kept here yet (given by the placement,
        not yet taken by :meth:`p2p.handoff.HandOff.round`); the memo holds them whole."""
        out = masks
        for (name, table), mask in masks.items():
            held = self.host.models[name].held(table) if name in self.host.models else None
            if held is not None and mask is not None and not held[mask].all():
                if out is masks:
                    out = dict(masks)
                kept = mask & held
                if kept.any():
                    out[(name, table)] = kept
                else:
                    del out[(name, table)]
        return out

    def round(self, now: float) -> None:
        if not self.host.models:
            return
        if self.rollback.baseline_pin and self._baseline_at_cut():
            # Nothing to pull: every round would have a peer walk the rows newer than our
            # cut (all it holds since) only to send none of them.
            self.host.counters["baseline_ae_skipped"] += 1
            return
        # Never a pinned baseline as partner: it refuses rows beyond its cut, so a round
        # with it would repair nothing here and offer it rows it cannot take; it starts
        # its own rounds, with its cut as the ceiling of what it asks for.
        if not self.host.config.use_gateways:
            peers = self.host.peers.ordinary()
            if peers:
                self._start_sync(self.host.rng.choice(peers), ["any"], now)
            return
        local = self.host.peers.ordinary(self.host.dc)
        if local:
            self._start_sync(self.host.rng.choice(local), ["dc"], now)
        # Cross-DC: walk our (remote DC, rank, partner) pairings round-robin, a few
        # per round; each pairs shards we gateway at some rank with the remote
        # gateway of the same rank.
        pairings = self._wan_pairings()
        for _ in range(min(self.host.config.wan_partners_per_round, len(pairings))):
            self._wan_cursor = (self._wan_cursor + 1) % len(pairings)
            partner, rank = pairings[self._wan_cursor]
            self._start_sync(partner, ["wan", rank], now)

    def _baseline_at_cut(self) -> bool:
        """A pinned baseline holds everything its cut covers, in every model (a model
        whose cut is not known here has nothing to pull: the cut comes by gossip)."""
        for name, m in self.host.models.items():
            cut = self.rollback.pinned_cut(name)
            if cut is None:
                continue
            for (table, s), k in cut.knowledge.items():
                shards = m.shards.get(table)
                sync = shards.get(s) if shards is not None else None
                if sync is None or not sync.knowledge.dominates(k):
                    return False
        return True

    def _wan_pairings(self) -> list[tuple[str, int]]:
        self.host.peers.refresh_topology()
        key = (self.host.members.version, len(self.host.models))
        if self._pairings_key == key:
            return self._pairings
        found: set[tuple[str, int]] = set()
        for remote_dc in self.host.topology.dcs():
            if not self.host.topology.graph.linked(self.host.dc, remote_dc):
                continue
            for name, m in self.host.models.items():
                for t in m.spec.tables:
                    mine = self.host.placement.gateways(m.spec, t.name, self.host.dc)
                    theirs = self.host.placement.gateways(m.spec, t.name, remote_dc)
                    for r in range(min(mine.shape[1], theirs.shape[1])):
                        hit = mine[:, r] == self.host.node_id
                        if hit.any():
                            found.update((str(p), r) for p in np.unique(theirs[hit, r].astype(str)).tolist())
        self._pairings = sorted(found)
        self.host.rng.shuffle(self._pairings)
        self._pairings_key = key
        return self._pairings

    def _start_sync(self, partner: str, scope: list[Any], now: float) -> None:
        mem = self.host.members.get(partner)
        if mem is None:
            return
        masks = self._scope_masks(scope, partner)
        if not masks:
            return
        if self._all_in_motion(masks, now):
            return
        self.host.counters["ae_rounds"] += 1
        if not self.host.config.use_shard_versions:
            # Ablation: no shard versions -- ask for every shard in scope every round.
            req = {}
            for (name, table), mask in masks.items():
                shards = np.flatnonzero(mask) if mask is not None else np.arange(
                    self.host.models[name].spec.table(table).num_shards)
                req.setdefault(name, {})[table] = shards.tolist()
            self.pulls.send_pull_request(partner, req, back=True)
            return
        sums: dict[str, dict[str, int]] = {}
        fill: dict[str, dict[str, list[int]]] = {}
        for (name, table), mask in masks.items():
            m = self.host.models[name]
            sums.setdefault(name, {})[table] = _scope_digest(m.shard_digests(table), mask)
            if m.filling[table] and mask is not None:
                mine = [s for s in m.filling[table] if mask[s]]
                if mine:
                    fill.setdefault(name, {})[table] = mine
        # "rh": our digests hold the row hashes (a partner from before the row audits
        # ignores the field, finds the digests differ and answers without them).
        body = {"k": "sum", "from": self.host.node_id, "scope": scope, "models": sums, "rh": True}
        if fill:
            # Placed shards still filling here: the partner lists them even when the scope's
            # digests are equal, so that we learn whether a settled holder has them so.
            body["fill"] = fill
        self.host.send(Outgoing(partner, mem.address, MsgType.GOSSIP, body))

    def _all_in_motion(self, masks: dict[tuple[str, str], np.ndarray | None], now: float) -> bool:
        """True (and the round is skipped) when the partner's digests could only lead to
        shards this replica leaves alone: every shard in scope is in motion
        (:meth:`p2p.pull.Pulls.unsettled`) and none fills.

        Under a steady stream of publishes every shard is in motion all the time, and
        each round's summary and the partner's digests (the shard versions of every
        shard in scope, computed and compared at both ends) ended in nothing: their
        knowledge differs by the pushes in flight.  The deferral's bound still holds: a
        shard not asked for within ``AE_DEFER_ROUNDS`` rounds is not in motion, and the
        next round goes ahead (and asks for it).
        """
        if not self.pulls.defers():
            return False
        shards = 0
        for (name, table), mask in masks.items():
            m = self.host.models[name]
            if m.filling[table]:
                return False   # placed shards filling here settle on a digest exchange
            ss = np.flatnonzero(mask) if mask is not None else np.arange(m.spec.table(table).num_shards)
            if not self.pulls.all_moving(m, table, ss, now):
                return False
            shards += len(ss)
        self.host.counters["ae_rounds_in_motion"] += 1
        self.host.counters["ae_deferred_shards"] += shards
        return True

    def _parse_scope(self, body: dict[str, Any]) -> list[Any]:
        scope = field(body, "scope", list)
        if not scope or scope[0] not in ("dc", "any", "wan") or (
                scope[0] == "wan" and (len(scope) != 2 or not isinstance(scope[1], int) or not 0 <= scope[1] < 16)):
            raise ProtocolError("bad scope", "bad_body")
        return scope

    def on_summary(self, body: dict[str, Any], now: float) -> None:
        sender = field(body, "from", str)
        scope = self._parse_scope(body)
        sums = field(body, "models", dict)
        mem = self.host.members.get(sender)
        if mem is None:
            return
        with_rows = body.get("rh") is True   # the sender's digests hold the row hashes
        their_fill = _parse_fill(body.get("fill"))
        masks = self._scope_masks(scope, sender)
        out: dict[str, dict[str, list[bytes]]] = {}
        row_hashes: dict[str, dict[str, bytes]] = {}
        fill_flags: dict[str, dict[str, bytes]] = {}
        for (name, table), mask in masks.items():
            theirs = sums.get(name, {}).get(table) if isinstance(sums.get(name), dict) else None
            m = self.host.models[name]
            base = m.shard_digests(table, rows=False)
            rows = m.store.table(table).shard_row_hashes() if with_rows else None
            if theirs is not None and theirs == _scope_digest(base if rows is None else base ^ rows, mask):
                filling = their_fill.get((name, table))
                if filling is None:
                    continue
                # Equal, but the partner fills some: list those, and say which we fill too.
                shards = np.asarray(sorted(set(filling)), np.int64)
                shards = shards[shards < len(base)]
                if mask is not None:
                    shards = shards[mask[shards]]
                if not len(shards):
                    continue
            else:
                shards = np.flatnonzero(mask) if mask is not None else np.arange(len(base))
            if m.filling[table]:
                fill_flags.setdefault(name, {})[table] = np.packbits(
                    np.isin(shards, np.fromiter(m.filling[table], np.int64))).tobytes()
            # The shard versions without the row hashes (what every version compares),
            # and the row hashes apart, so that the partner can tell a shard that differs
            # only in its rows (an audit) from one to pull.
            out.setdefault(name, {})[table] = [array_to_wire(shards.astype(np.int64)), array_to_wire(base[shards])]
            if rows is not None:
                row_hashes.setdefault(name, {})[table] = array_to_wire(rows[shards])
        if out:
            answer = {"k": "dig", "from": self.host.node_id, "scope": scope, "models": out}
            if row_hashes:
                answer["rh"] = row_hashes
            if fill_flags:
                answer["fill"] = fill_flags
            self.host.send(Outgoing(sender, mem.address, MsgType.GOSSIP, answer))

    def _settle_filling(self, m: Any, table: str, shards: np.ndarray, differ: np.ndarray, their_rows: Any,
                        flags: Any, n: int) -> None:
        """Placed shards filling here that equal the partner's (shard version and rows) stop
        filling when the partner does not fill them itself -- or when neither side holds
        anything of them (a new model: nothing anywhere to wait for)."""
        if their_rows is None:
            return   # a partner from before the row hashes: versions alone do not prove rows
        rows = array_from_wire(their_rows, np.uint64, n, "row hashes")
        same = ~differ & (m.store.table(table).shard_row_hashes()[shards] == rows)
        theirs_fill = np.zeros(n, bool)
        if isinstance(flags, dict) and isinstance(flags.get(table), bytes) and len(flags[table]) == (n + 7) // 8:
            theirs_fill = np.unpackbits(np.frombuffer(flags[table], np.uint8), count=n).astype(bool)
        filling = m.filling[table]
        for i in np.flatnonzero(same).tolist():
            s = int(shards[i])
            if s in filling and (not theirs_fill[i] or m.empty(table, s)):
                del filling[s]
                self.host.counters["fills_settled"] += 1

    def on_digests(self, body: dict[str, Any], now: float) -> None:
        sender = field(body, "from", str)
        self._parse_scope(body)
        models = field(body, "models", dict)
        row_hashes = field(body, "rh", dict, optional=True, default={})   # absent from older partners
        fill_flags = field(body, "fill", dict, optional=True, default={})
        req: dict[str, dict[str, list[int]]] = {}
        audits: dict[str, dict[str, np.ndarray]] = {}
        for name, tables in models.items():
            m = self.host.models.get(name)
            if m is None or not isinstance(tables, dict):
                continue
            rh = row_hashes.get(name, {})
            if not isinstance(rh, dict):
                raise ProtocolError("bad row hashes", "bad_body")
            for table, pair in tables.items():
                if not m.spec.has_table(table) or not isinstance(pair, list) or len(pair) != 2:
                    continue
                spec = m.spec.table(table)
                if not isinstance(pair[0], bytes) or len(pair[0]) % 8:
                    raise ProtocolError("bad digests", "bad_body")
                n = len(pair[0]) // 8
                if n > spec.num_shards:
                    raise ProtocolError("bad digests", "bad_body")
                shards = array_from_wire(pair[0], np.int64, n, "shards")
                theirs = array_from_wire(pair[1], np.uint64, n, "digests")
                if n and (shards.min() < 0 or shards.max() >= spec.num_shards):
                    raise ProtocolError("shard out of range", "bad_body")
                mine = m.shard_digests(table, rows=False)[shards]
                differ = mine != theirs
                held = m.held(table)
                if held is not None:
                    differ &= held[shards]   # a placed table: pull only shards kept here
                    theirs_rows_ok = held[shards]
                else:
                    theirs_rows_ok = None
                if table in rh:
                    # Equal but for the row hash: equal knowledge and greatest version, yet
                    # different rows below them.  A pull would bring nothing; audit them.
                    their_rows = array_from_wire(rh[table], np.uint64, n, "row hashes")
                    only_rows = ~differ & (m.store.table(table).shard_row_hashes()[shards] != their_rows)
                    if theirs_rows_ok is not None:
                        only_rows &= theirs_rows_ok
                    if only_rows.any() and not self.rollback.baseline_pin:
                        due = self.audit.due(name, table, shards[only_rows], now)
                        if len(due):
                            audits.setdefault(name, {})[table] = due
                if m.filling[table]:
                    self._settle_filling(m, table, shards, differ, rh.get(table), fill_flags.get(name), n)
                diff = shards[differ]
                if len(diff):
                    diff = self.pulls.unsettled(m, table, diff, now)
                if len(diff):
                    req.setdefault(name, {})[table] = diff.tolist()
        if req:
            self.pulls.send_pull_request(sender, req, back=True)
        if audits:
            self.audit.request(sender, audits)
