"""Row audits of a replica: :class:`RowAudit`, a component the replica node holds.

Knowledge says which counters a replica holds every row of, and a pull answers only
rows above the requester's knowledge.  So two replicas can hold different rows *below*
a knowledge they share, and nothing else would ever compare them.  It happens at the
limit of rule K2 (``docs/design.md``): a member answers a gap probe "nothing", then gets
rows of the gap from an ingest that loses its disk before it answers; the prober closes
the gap without them, and the rows live on only where they had arrived.

Each shard version therefore carries the shard's row hash
(:meth:`ekko.core.store.TableStore.shard_row_hashes`), and anti-entropy's digest answer
carries the row hashes apart.  Where two replicas' shard versions differ *only* in the
row hash, the requester audits the shard instead of pulling it:

* ``GOSSIP{k="aud"}``: per shard, the requester's row hashes over
  :data:`AUDIT_BUCKETS` consecutive row ranges;
* the partner compares them with its own and asks, with the repair request of
  :mod:`rollback.repair` (``GOSSIP{k="rep"}``: its versions of every row of the
  buckets that differ), whether the requester holds better versions;
* the requester answers with the rows it holds better and asks back for those it holds
  worse; rows a repair answer brings are pushed on like an ingest's, so the one replica
  that learns them passes them to its DC and the other DCs' gateways.

An audited shard is audited again at most every :data:`AUDIT_EVERY_ROUNDS`
anti-entropy rounds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ekko.core.codec import MsgType, array_from_wire, array_to_wire, field
from ekko.core.errors import ProtocolError
from ekko.core.messages import Outgoing

if TYPE_CHECKING:
    from ekko.core.spec import TableSpec
    from p2p.host import NodeServices
    from rollback.repair import Repair

#: row ranges a shard is split into for an audit: what one ``aud`` entry carries (8 bytes
#: each).  More buckets name fewer rows per difference, at more bytes per request.
AUDIT_BUCKETS = 64
#: most rows one audit answer compares per table (the rest waits for the next audit).
AUDIT_MAX_ROWS = 1 << 14
#: most shards one audit request names.
MAX_AUDIT_SHARDS = 256
#: anti-entropy rounds before a shard audited with a partner is audited again.
AUDIT_EVERY_ROUNDS = 8


def bucket_rows(spec: TableSpec, shard: int) -> tuple[int, int, int]:
    """``(lo, hi, rows per bucket)`` of a shard's audit buckets; hi == lo: no rows.

    Example:
        >>> from ekko.core.spec import TableSpec
        >>> bucket_rows(TableSpec("t", rows=1000, dim=1, shards=4), 1)
        (250, 500, 4)
    """
    lo, hi = spec.shard_range(shard)
    return lo, hi, max(1, -(-(hi - lo) // AUDIT_BUCKETS))


class RowAudit:
    """Audits of shards whose rows differ under equal knowledge; asks and answers.

    Args:
        host: the replica (:class:`p2p.host.NodeServices`).
        repair: the rollback's repair (its row comparison carries the audit's last step).

    Example (through the replica node, which holds one):
        >>> from ekko.replica.node import ReplicaNode
        >>> n = ReplicaNode("r1", "dc1", "127.0.0.1:1", device="cpu")
        >>> n.audit.due("m", "t", np.array([3]), 0.0).tolist(), n.audit.due("m", "t", np.array([3]), 0.0).tolist()
        ([3], [])
    """

    def __init__(self, host: NodeServices, repair: Repair) -> None:
        self.host = host
        self.repair = repair
        self._audited_at: dict[tuple[str, str, int], float] = {}

    def due(self, model: str, table: str, shards: np.ndarray, now: float) -> np.ndarray:
        """Which of ``shards`` to audit now (not audited within the last
        :data:`AUDIT_EVERY_ROUNDS` anti-entropy rounds); those are marked as audited."""
        wait = AUDIT_EVERY_ROUNDS * self.host.config.ae_interval
        keep = []
        for s in shards.tolist():
            key = (model, table, int(s))
            if now - self._audited_at.get(key, -np.inf) >= wait:
                self._audited_at[key] = now
                keep.append(s)
        if len(self._audited_at) > 4 * MAX_AUDIT_SHARDS:
            self._audited_at = {k: t for k, t in self._audited_at.items() if now - t < wait}
        return np.asarray(keep, np.int64)

    def request(self, partner: str, shards: dict[str, dict[str, np.ndarray]]) -> None:
        """Send ``partner`` our bucket row hashes of ``shards`` (model -> table -> shards)."""
        mem = self.host.members.get(partner)
        if mem is None:
            return
        out: dict[str, dict[str, list[Any]]] = {}
        count = 0
        for name, tables in shards.items():
            m = self.host.models[name]
            for table, ss in tables.items():
                ts = m.store.table(table)
                for s in ss.tolist()[:max(0, MAX_AUDIT_SHARDS - count)]:
                    lo, hi, per = bucket_rows(ts.spec, s)
                    if hi > lo:
                        out.setdefault(name, {}).setdefault(table, []).append(
                            [s, array_to_wire(ts.bucket_row_hashes(lo, hi, per))])
                        count += 1
        if out:
            self.host.counters["audits_sent"] += 1
            self.host.counters["audited_shards"] += count
            self.host.send(Outgoing(partner, mem.address, MsgType.GOSSIP,
                                    {"k": "aud", "from": self.host.node_id, "models": out}))

    def on_request(self, body: dict[str, Any], now: float) -> None:
        """A peer's bucket row hashes: ask it about the rows of every bucket that differs."""
        sender = field(body, "from", str)
        models = field(body, "models", dict)
        asks: list[tuple[str, str, np.ndarray]] = []
        count = 0
        for name, tables in models.items():   # validated whole before anything is sent
            m = self.host.models.get(name)
            if m is None or not isinstance(tables, dict):
                continue
            for table, entries in tables.items():
                if not m.spec.has_table(table):
                    continue
                if not isinstance(entries, list):
                    raise ProtocolError("bad audit entries", "bad_body")
                ts = m.store.table(table)
                spec = ts.spec
                rows: list[np.ndarray] = []
                budget = AUDIT_MAX_ROWS
                for e in entries:
                    count += 1
                    if count > MAX_AUDIT_SHARDS or not isinstance(e, list) or len(e) != 2:
                        raise ProtocolError("bad audit entry", "bad_body")
                    s = e[0]
                    if not isinstance(s, int) or not 0 <= s < spec.num_shards:
                        raise ProtocolError("audit shard out of range", "bad_body")
                    lo, hi, per = bucket_rows(spec, s)
                    if hi == lo:
                        raise ProtocolError("audit of a shard without rows", "bad_body")
                    n = -(-(hi - lo) // per)
                    theirs = array_from_wire(e[1], np.uint64, n, "audit hashes")
                    held = m.held(table)
                    if held is not None and not held[s]:
                        continue   # a placed shard not kept here: nothing to compare
                    for b in np.flatnonzero(ts.bucket_row_hashes(lo, hi, per) != theirs).tolist():
                        a = lo + b * per
                        got = np.arange(a, min(hi, a + per, a + budget), dtype=np.int64)
                        if len(got):
                            rows.append(got)
                            budget -= len(got)
                if rows:
                    asks.append((name, table, np.concatenate(rows)))
        mem = self.host.members.get(sender)
        if mem is None:
            return
        for name, table, ids in asks:
            self.host.counters["audit_rows_compared"] += len(ids)
            self.repair.ask(sender, mem.address, name, table, ids)
