"""Repair of the rows a rollback restored: compare them with random peers for a few rounds.

State-based sync keeps only each row's newest version, so a replica's undo history
may lack the newest version a cut covers.  :class:`Repair` asks one random peer per
anti-entropy round whether it holds better (greater, unfenced) versions of the
restored rows (``GOSSIP{k="rep"}``), answers such asks (``PULL_RESPONSE`` with
``rep``), and stops once enough distinct peers have answered.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ekko.core.codec import MsgType, array_from_wire, array_to_wire, delta_to_wire, field
from ekko.core.errors import ProtocolError
from ekko.core.messages import Outgoing
from rollback.cuts import Fence
from rollback.host import RollbackHost

#: distinct peers (or every other member, when fewer) a replica compares the rows a rollback
#: restored with: it asks one random peer per anti-entropy round, so the best value spreads
#: like a rumour.  Rounds whose request or answer is lost do not count (every request is
#: answered), so a replica partitioned off or restarting during the rollback still repairs.
REPAIR_ROUNDS = 8
#: most anti-entropy rounds a replica keeps asking while fewer peers than that have answered.
REPAIR_MAX_ASKS = 1 << 12
#: most rows one repair request names per table.
MAX_REPAIR_ROWS = 1 << 16


class Repair:
    """Rows to compare with peers after a rollback, and the asking and answering.

    Args:
        host: the replica (:class:`rollback.host.RollbackHost`: node id, rng,
            models, member list, live peers, send).
        fence: the replica's fence (a better version a peer holds may be fenced here).

    Example (through the replica node, which holds one):
        >>> from ekko.replica.node import ReplicaNode
        >>> n = ReplicaNode("r1", "dc1", "127.0.0.1:1", device="cpu")
        >>> n.rollback_protocol.repair.round(0.0), n.drain()
        (None, [])
    """

    def __init__(self, host: RollbackHost, fence: Fence) -> None:
        self.host = host
        self.fence = fence
        self._repair: dict[tuple[str, str], np.ndarray] = {}
        self._repair_rounds = 0
        self._repair_answered: set[str] = set()  # peers that answered the current repair

    def restart(self) -> None:
        """A new rollback restarts the count of answering peers (even where it restored
        nothing here): answers given before it compared pre-rollback values."""
        self._repair_rounds = REPAIR_MAX_ASKS
        self._repair_answered = set()

    def round(self, now: float) -> None:
        if not self._repair:
            return
        answered = self._repair_answered
        if self._repair_rounds <= 0 or len(answered) >= min(REPAIR_ROUNDS, len(self.host.members.members) - 1):
            self._repair.clear()
            return
        self._repair_rounds -= 1
        peers = self.host.live_peers()
        if not peers:
            return
        fresh = [p for p in peers if p not in answered]
        peer = self.host.members.get(self.host.rng.choice(fresh or peers))
        for (model, table), rows in self._repair.items():
            for lo in range(0, len(rows), MAX_REPAIR_ROWS):
                self.ask(peer.node_id, peer.address, model, table, rows[lo:lo + MAX_REPAIR_ROWS])

    def ask(self, peer: str, address: str, model: str, table: str, ids: np.ndarray) -> None:
        """Ask ``peer`` whether it holds better (greater, unfenced) versions of rows ``ids``."""
        versions = self.host.models[model].store.table(table).versions[ids]
        self.host.send(Outgoing(peer, address, MsgType.GOSSIP, {
            "k": "rep", "from": self.host.node_id, "m": model, "t": table, "ids": array_to_wire(ids),
            "v": array_to_wire(versions)}))

    def schedule(self, model: str, table: str, rows: np.ndarray) -> None:
        """Compare ``rows`` with peers in the coming rounds (a repair under way just grows)."""
        if not self._repair:
            self._repair_rounds = REPAIR_MAX_ASKS
            self._repair_answered = set()
        prev = self._repair.get((model, table))
        self._repair[(model, table)] = rows if prev is None else np.union1d(prev, rows)

    def on_answer(self, sender: str) -> None:
        """A peer answered a repair request (with better rows or none): it has compared."""
        if self._repair:
            self._repair_answered.add(sender)

    def on_request(self, body: dict[str, Any], now: float) -> None:
        """A peer asks whether we hold better (greater, unfenced) versions of some rows."""
        sender = field(body, "from", str)
        spec = self.host.table_spec(field(body, "m", str), field(body, "t", str))
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
        mem = self.host.members.get(sender)
        m = self.host.models[body["m"]]
        ts = m.store.table(spec.name)
        held = m.held(spec.name)
        if held is not None:   # a placed table: only the rows of shards kept here compare
            keep = held[spec.shards_of(ids)]
            ids, theirs = ids[keep], theirs[keep]
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
                self.schedule(m.spec.name, spec.name, worse)
                self.ask(sender, mem.address, m.spec.name, spec.name, worse)
        if not len(better):
            # Answer anyway: the requester counts peers that compared, not requests sent.
            self.host.send(Outgoing(sender, mem.address, MsgType.PULL_RESPONSE,
                                      {"from": self.host.node_id, "models": {}, "rep": True}))
            return
        d = ts.take(m.spec.name, better)
        shards = spec.shards_of(better)
        entries = []
        for s in np.unique(shards).tolist():
            sel = shards == s
            entries.append([s, [], None, delta_to_wire(d.take(sel))])
        self.host.send(Outgoing(sender, mem.address, MsgType.PULL_RESPONSE,
                                  {"from": self.host.node_id, "models": {m.spec.name: {spec.name: entries}}, "rep": True}))
