"""Hand-off of placed shards: :class:`HandOff`, a component the replica node holds (issue #18).

A placed model's holders follow the member list (:mod:`p2p.placement`).  Every
anti-entropy round each replica compares the shards it keeps with the shards the
placement now gives it:

* a shard it is newly given is *taken* at once: a zeroed block, empty knowledge.
  Anti-entropy fills it -- from a holder of its DC (the old holder keeps it meanwhile,
  and its scope with this replica includes it) or across the WAN (holders are the
  first gateways of their shard);
* a shard it keeps but is no longer given is *handed over*: it asks each holder the
  placement names in its DC (``"ho"``: its knowledge of the shard, and the rows it holds
  above that knowledge) whether that holder already covers it.  A holder says yes
  (``"hoa"``) only when it keeps the shard, its knowledge dominates, and it holds each of
  those rows at that version or newer.  The shard is dropped once every holder the
  placement names said yes *to the state the replica still has* (its shard version is
  unchanged since it asked); otherwise it asks again next round.

So a shard is never dropped before ``r`` holders of its DC hold everything the dropping
replica held (while the DC has ``r`` members besides it): rule P1 in ``docs/design.md``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ekko.core.codec import MsgType, array_from_wire, array_to_wire, field
from ekko.core.config import MAX_HELD_ROWS_PER_SHARD, MAX_SHARDS_PER_PULL
from ekko.core.errors import ProtocolError, UsageError
from ekko.core.messages import Outgoing
from ekko.core.version import Knowledge

if TYPE_CHECKING:
    from p2p.host import NodeServices
    from p2p.model_state import ModelState

ShardKey = tuple[str, str, int]


class HandOff:
    """Takes the placed shards a replica is given and hands over those it no longer is.

    Args:
        host: the replica (:class:`p2p.host.NodeServices`).

    Example (through the replica node, which holds one):
        >>> from ekko.replica.node import ReplicaNode
        >>> n = ReplicaNode("r1", "dc1", "127.0.0.1:1", device="cpu")
        >>> n.handoff.round(0.0), n.drain()     # no placed models: nothing to do
        (None, [])
    """

    def __init__(self, host: NodeServices) -> None:
        self.host = host
        #: per shard being handed over: the shard version asked about, the member list
        #: version it was asked under, and the holders that said they cover it.
        self._asked: dict[ShardKey, tuple[int, int, set[str]]] = {}

    # ------------------------------------------------------------------ the giver
    def round(self, now: float) -> None:
        """Take newly given shards; ask the holders of shards no longer given."""
        for m in self.host.models.values():
            if not m.spec.placed:
                continue
            self.take(m, now)
            bound = self.host.config.knowledge_bound()
            for t in m.spec.tables:
                stale = [s for s, at in m.filling[t.name].items() if now - at > bound]
                for s in stale:
                    # No settled holder confirmed it (every holder of the shard was filling:
                    # a new model, or several holders replaced at once): by now anti-entropy
                    # has brought what any holder had.
                    del m.filling[t.name][s]
                    self.host.counters["fills_timed_out"] += 1
            for t in m.spec.tables:
                held = m.held(t.name)
                if held is None:
                    continue
                extra = np.flatnonzero(held & ~self.host.assigned(m.spec, t.name))
                if len(extra):
                    self._ask(m, t.name, extra)

    def take(self, m: ModelState, now: float) -> None:
        """Take every shard of ``m`` the placement now gives this replica and it does not
        keep yet (a zeroed block each; anti-entropy fills them)."""
        for t in m.spec.tables:
            held = m.held(t.name)
            if held is None:
                continue
            new = np.flatnonzero(self.host.assigned(m.spec, t.name) & ~held)
            if not len(new):
                continue
            try:
                m.store.table(t.name).hold(new)
            except UsageError:
                continue    # a snapshot is reading the table: the next round takes them
            self.host.counters["shards_taken"] += len(new)
            for s in new.tolist():
                self._asked.pop((m.spec.name, t.name, s), None)
                m.filling[t.name][s] = now

    def _ask(self, m: ModelState, table: str, extra: np.ndarray) -> None:
        name = m.spec.name
        holders = self.host.placement.holders(m.spec, table, self.host.dc)
        digests = m.shard_digests(table)
        version = self.host.members.version
        ts = m.store.table(table)
        by_holder: dict[str, list[int]] = {}
        entries: dict[int, list[Any]] = {}
        for s in extra.tolist()[:MAX_SHARDS_PER_PULL]:
            others = [h for h in holders[s].tolist() if h != self.host.node_id]
            if not others:
                continue   # no other member of the DC to hand it to: keep it
            sync = m.shards[table].get(s)
            know = sync.knowledge if sync is not None else Knowledge()
            ids, vers = ts.scan_newer(s, know)
            if len(ids) > MAX_HELD_ROWS_PER_SHARD:
                continue   # too much above knowledge: anti-entropy first
            key = (name, table, s)
            got = self._asked.get(key)
            if got is None or got[0] != int(digests[s]) or got[1] != version:
                self._asked[key] = (int(digests[s]), version, set())
            entries[s] = [s, know.to_wire(), array_to_wire(ids), array_to_wire(vers)]
            for h in others:
                if h not in self._asked[key][2]:
                    by_holder.setdefault(h, []).append(s)
        for h, shards in by_holder.items():
            mem = self.host.members.get(h)
            if mem is None:
                continue
            self.host.counters["handoff_queries_sent"] += 1
            self.host.send(Outgoing(h, mem.address, MsgType.GOSSIP, {
                "k": "ho", "from": self.host.node_id, "model": name, "table": table,
                "shards": [entries[s] for s in shards]}))

    def on_answer(self, body: dict[str, Any], now: float) -> None:
        sender = field(body, "from", str)
        name, table = field(body, "model", str), field(body, "table", str)
        ok = field(body, "ok", list)
        m = self.host.models.get(name)
        if m is None or not m.spec.has_table(table) or m.held(table) is None:
            return
        n = m.spec.table(table).num_shards
        if len(ok) > n or not all(isinstance(s, int) and 0 <= s < n for s in ok):
            raise ProtocolError("bad hand-off answer", "bad_body")
        digests = m.shard_digests(table)
        version = self.host.members.version
        holders = self.host.placement.holders(m.spec, table, self.host.dc)
        held = m.held(table)
        want = self.host.assigned(m.spec, table)
        for s in ok:
            key = (name, table, s)
            got = self._asked.get(key)
            if got is None or got[0] != int(digests[s]) or got[1] != version:
                continue   # it answered about a state we no longer have: ask again
            got[2].add(sender)
            others = {h for h in holders[s].tolist() if h != self.host.node_id}
            if others and others <= got[2] and held[s] and not want[s]:
                self._drop(m, table, s)

    def _drop(self, m: ModelState, table: str, s: int) -> None:
        try:
            m.store.table(table).drop([s])
        except UsageError:
            return     # a snapshot is reading the table: the next round asks again
        m.forget_shard(table, s)     # its gaps go with its chain state (GapProbes.round)
        self._asked.pop((m.spec.name, table, s), None)
        self.host.counters["shards_dropped"] += 1

    # ------------------------------------------------------------------ the taker
    def on_query(self, body: dict[str, Any], now: float) -> None:
        sender = field(body, "from", str)
        name, table = field(body, "model", str), field(body, "table", str)
        entries = field(body, "shards", list)
        m = self.host.models.get(name)
        if m is None or not m.spec.has_table(table):
            return    # the catalog may lag: the giver asks again
        spec = m.spec.table(table)
        if len(entries) > MAX_SHARDS_PER_PULL:
            raise ProtocolError("too many shards in a hand-off query", "too_large")
        parsed = []
        for e in entries:
            if not isinstance(e, list) or len(e) != 4 or not isinstance(e[0], int) or not 0 <= e[0] < spec.num_shards:
                raise ProtocolError("bad hand-off entry", "bad_body")
            if not isinstance(e[2], bytes) or len(e[2]) % 8 or len(e[2]) // 8 > MAX_HELD_ROWS_PER_SHARD:
                raise ProtocolError("bad hand-off rows", "bad_body")
            k = len(e[2]) // 8
            ids = array_from_wire(e[2], np.int64, k, "hand-off ids")
            vers = array_from_wire(e[3], np.int64, k, "hand-off versions")
            if k and (spec.shards_of(ids) != e[0]).any():
                raise ProtocolError("hand-off rows outside their shard", "bad_body")
            parsed.append((e[0], Knowledge.from_wire(e[1]), ids, vers))
        mem = self.host.members.get(sender)
        held = m.held(table)
        if mem is None or held is None:
            return
        want = self.host.assigned(m.spec, table)
        versions = m.store.table(table).versions
        ok = []
        for s, theirs, ids, vers in parsed:
            sync = m.shards[table].get(s)
            mine = sync.knowledge if sync is not None else Knowledge()
            if held[s] and want[s] and mine.dominates(theirs) and (versions[ids] >= vers).all():
                ok.append(s)
        self.host.send(Outgoing(sender, mem.address, MsgType.GOSSIP,
                                {"k": "hoa", "from": self.host.node_id, "model": name, "table": table, "ok": ok}))
