"""Cuts and rollback for :class:`ekko.node.ReplicaNode` (a mixin: the node's state lives there).

A cut is a named point: every shard's knowledge.  A rollback record (cut + an HLC
rollback point) is applied here, sent to every peer and gossiped; the versions it
fences never apply again.  Restored rows are compared with random peers for a few
rounds because state-based sync may have skipped the newest version the cut covers.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ekko.codec import MsgType, array_from_wire, array_to_wire, delta_to_wire, field
from ekko.delta import WIRE_DTYPES
from ekko.errors import ProtocolError, UsageError
from ekko.node_types import Outgoing
from ekko.spec import check_name
from ekko.version import MAX_COUNTER, MAX_ORIGIN, Knowledge, origins_of
from rollback.cuts import Cut

#: rollback records kept for gossip (newest first); a replica that was away catches up from them.
MAX_ROLLBACK_RECORDS = 32
#: distinct peers (or every other member, when fewer) a replica compares the rows a rollback
#: restored with: it asks one random peer per anti-entropy round, so the best value spreads
#: like a rumour.  Rounds whose request or answer is lost do not count (every request is
#: answered), so a replica partitioned off or restarting during the rollback still repairs.
REPAIR_ROUNDS = 8
#: most anti-entropy rounds a replica keeps asking while fewer peers than that have answered.
REPAIR_MAX_ASKS = 1 << 12
#: most rows one repair request names per table.
MAX_REPAIR_ROWS = 1 << 16



class RollbackMixin:
    """Cut, rollback, fence and repair behaviour of a replica node."""

    # ------------------------------------------------------------------ cuts and rollback
    def _knowledge_of(self, model: str) -> dict[tuple[str, int], Knowledge]:
        m = self._model(model)
        return {(t, s): sync.knowledge for t, shards in m.shards.items() for s, sync in shards.items()}

    def take_cut(self, model: str, name: str, now: float, broadcast: bool = True) -> Cut:
        """Record a named restore point of ``model``: its per-shard knowledge now.

        With ``broadcast`` the cut is sent to every live peer, so a rollback to it can
        be started at any replica.
        """
        check_name("cut", name)
        cut = self.cuts.take(model, name, now, self._knowledge_of(model), self._seq)
        if broadcast:
            for peer in self._live_peers():
                mem = self.members.get(peer)
                self._out.append(Outgoing(peer, mem.address, MsgType.CUT, {"from": self.node_id, "cut": cut.to_wire()}))
        return cut

    def _on_cut(self, body: dict[str, Any], now: float) -> None:
        cut = Cut.from_wire(body.get("cut"))
        if cut.model not in self.models:
            return
        try:
            self.cuts.get(cut.model, cut.name)
        except UsageError:
            # Our own apply seq is unknown for a foreign cut: the restore walks by the
            # cut's knowledge, which is what defines it.
            self.cuts.add(Cut(cut.name, cut.model, cut.taken_at, cut.knowledge, 0))

    def rollback(self, model: str, cut: Cut | str, until_counter: int, now: float) -> dict[str, Any]:
        """Roll ``model`` back to ``cut`` everywhere: restore here, then tell every peer.

        Every version of the model newer than the cut and at most ``until_counter``, of
        every origin, including publishers this replica has not heard of yet (an
        HLC counter: the caller's wall clock at the decision, so harmful updates still
        in flight are caught too) is fenced: never applied or served again.  Updates
        published afterwards carry greater counters and apply normally.

        Returns the rollback record (also gossiped until it ages out).
        """
        m = self._model(model)
        if isinstance(cut, str):
            cut = self.cuts.get(model, cut)
        if not 0 < until_counter <= MAX_COUNTER:
            raise UsageError("until_counter must be a positive HLC counter")
        origins: set[int] = set()
        for shards in m.shards.values():
            for sync in shards.values():
                origins.update(o for o, _ in sync.knowledge.items())
        for t in m.spec.tables:
            v = m.store.table(t.name).versions
            written = v[v > 0]
            if len(written):
                origins.update(np.unique(origins_of(written)).tolist())
        record = {"id": f"{self.node_id}.{model}.{cut.name}.{until_counter}", "model": model,
                  "cut": cut.to_wire(), "upper": [[o, until_counter] for o in [0, *sorted(origins)]]}
        self._apply_rollback(record, now)
        for peer in self._live_peers():
            mem = self.members.get(peer)
            self._out.append(Outgoing(peer, mem.address, MsgType.ROLLBACK, {"from": self.node_id, "rb": record}))
        return record

    def _apply_rollback(self, record: dict[str, Any], now: float) -> bool:
        """Restore the rows a rollback record covers; idempotent per record id."""
        rid = field(record, "id", str)
        if rid in self.rollbacks:
            return False
        model = field(record, "model", str)
        cut = Cut.from_wire(record.get("cut"))
        upper_raw = field(record, "upper", list)
        if len(upper_raw) > MAX_ORIGIN or not all(
                isinstance(e, list) and len(e) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in e)
                and 0 <= e[0] <= MAX_ORIGIN and 0 < e[1] <= MAX_COUNTER for e in upper_raw):
            raise ProtocolError("bad rollback point", "bad_body")
        m = self.models.get(model)
        if m is None or cut.model != model:
            return False  # not ours (yet): the record comes again with gossip
        self.rollbacks[rid] = record
        while len(self.rollbacks) > MAX_ROLLBACK_RECORDS:
            del self.rollbacks[next(iter(self.rollbacks))]
        self.fence.add(m.spec, cut, {o: c for o, c in upper_raw})
        restored = 0
        for t in m.spec.tables:
            ts = m.store.table(t.name)
            rows = cut.rows_to_restore(t, ts.versions)
            if len(rows):
                # Only rows holding a fenced version go back; newer, legitimate updates stay.
                rows = rows[self.fence.mask(model, t.name, rows, ts.versions[rows])]
            if not len(rows):
                continue
            if self.undo is not None:
                self._seq += 1
                # The cut covers what an earlier rollback fenced too: never restore that.
                in_cut = cut.covered_fn(t)

                def covered(ids: np.ndarray, v: np.ndarray, _in_cut=in_cut, _table=t.name) -> np.ndarray:
                    return _in_cut(ids, v) & ~self.fence.mask(model, _table, ids, v)
                out = self.undo.restore_at_cut(model, t.name, ts, rows, covered, seq=self._seq)
                missing = out.incomplete
            else:
                missing = rows
            if len(missing):
                # No history for these: hold nothing rather than a fenced value; peers fill in.
                n = len(missing)
                ts.restore_rows(missing, np.zeros(n, np.int64),
                                np.zeros((n, t.dim), WIRE_DTYPES[t.dtype]) if ts.values is not None else None)
            restored += len(rows)
            m.index[t.name].note_applied(rows, ts.versions[rows], now, self.config.index_rows)
            m.recompute_top(t.name, rows)
            # State-based sync skips superseded versions, so our history may miss the newest
            # version the cut covers: compare every restored row with peers for a few rounds.
            prev = self._repair.get((model, t.name))
            self._repair[(model, t.name)] = rows if prev is None else np.union1d(prev, rows)
        self._repair_rounds = REPAIR_MAX_ASKS
        self._repair_answered = set()
        self.counters["rollbacks"] += 1
        self.counters["rolled_back_rows"] += restored
        return True

    def _repair_round(self, now: float) -> None:
        if not self._repair:
            return
        answered = self._repair_answered
        if self._repair_rounds <= 0 or len(answered) >= min(REPAIR_ROUNDS, len(self.members.members) - 1):
            self._repair.clear()
            return
        self._repair_rounds -= 1
        peers = self._live_peers()
        if not peers:
            return
        fresh = [p for p in peers if p not in answered]
        peer = self.members.get(self.rng.choice(fresh or peers))
        for (model, table), rows in self._repair.items():
            ts = self.models[model].store.table(table)
            for lo in range(0, len(rows), MAX_REPAIR_ROWS):
                ids = rows[lo:lo + MAX_REPAIR_ROWS]
                self._out.append(Outgoing(peer.node_id, peer.address, MsgType.GOSSIP, {
                    "k": "rep", "from": self.node_id, "m": model, "t": table, "ids": array_to_wire(ids),
                    "v": array_to_wire(ts.versions[ids])}))

    def _on_repair_answer(self, sender: str) -> None:
        """A peer answered a repair request (with better rows or none): it has compared."""
        if self._repair:
            self._repair_answered.add(sender)

    def _on_repair(self, body: dict[str, Any], now: float) -> None:
        """A peer asks whether we hold better (greater, unfenced) versions of some rows."""
        sender = field(body, "from", str)
        spec = self.table_spec(field(body, "m", str), field(body, "t", str))
        if spec is None:
            return
        raw = field(body, "ids", bytes)
        if len(raw) % 8 or len(raw) // 8 > MAX_REPAIR_ROWS:
            raise ProtocolError("bad repair request", "bad_body")
        n = len(raw) // 8
        ids = array_from_wire(raw, np.int64, n, "ids")
        theirs = array_from_wire(body.get("v"), np.int64, n, "versions")
        if n and (ids.min() < 0 or ids.max() >= spec.rows):
            raise ProtocolError("repair row out of range", "bad_body")
        mem = self.members.get(sender)
        m = self.models[body["m"]]
        ts = m.store.table(spec.name)
        better = ids[ts.versions[ids] > theirs]
        if mem is None:
            return
        behind = ts.versions[ids] < theirs
        if behind.any():
            # They hold a better version than ours.  We may never have held the fenced
            # version that made them restore the row (a truncated pull answer advanced our
            # knowledge past the cut version while the row held a now-fenced one), so we
            # would never repair it ourselves: ask them back, and keep comparing it with
            # other peers so the value spreads like a rumour.
            worse = ids[behind]
            worse = worse[~self.fence.mask(m.spec.name, spec.name, worse, theirs[behind])]
            if len(worse):
                key = (m.spec.name, spec.name)
                if not self._repair:
                    self._repair_answered = set()
                    self._repair_rounds = REPAIR_MAX_ASKS
                prev = self._repair.get(key)
                self._repair[key] = worse if prev is None else np.union1d(prev, worse)
                self._out.append(Outgoing(sender, mem.address, MsgType.GOSSIP, {
                    "k": "rep", "from": self.node_id, "m": m.spec.name, "t": spec.name,
                    "ids": array_to_wire(worse), "v": array_to_wire(ts.versions[worse])}))
        if not len(better):
            # Answer anyway: the requester counts peers that compared, not requests sent.
            self._out.append(Outgoing(sender, mem.address, MsgType.PULL_RESPONSE,
                                      {"from": self.node_id, "models": {}, "rep": True}))
            return
        d = ts.take(m.spec.name, better)
        shards = spec.shards_of(better)
        entries = []
        for s in np.unique(shards).tolist():
            sel = shards == s
            entries.append([s, [], None, delta_to_wire(d.take(sel))])
        self._out.append(Outgoing(sender, mem.address, MsgType.PULL_RESPONSE,
                                  {"from": self.node_id, "models": {m.spec.name: {spec.name: entries}}, "rep": True}))
