"""Endpoint CPU time of the simulated replica nodes (a core per replica, or a shared pool).

The WAN model (:mod:`simulator.network`) charges bytes, queueing and propagation;
this module charges the time a replica's CPU spends handling what it receives.
Every handled message, timer tick or local call (one :meth:`SimCluster.flush
<simulator.replicas.SimCluster.flush>`) costs::

    per_message_s
    + rows_applied  * apply_s_per_row
    + rows_walked   * scan_s_per_row * (rows + cold_rows) / rows    (per table)
    + rows_indexed  * index_s_per_row
    + recv_per_message_s + recv_bytes * recv_s_per_byte         (a received message only)
    + sum over sent messages of (send_per_message_s + size * send_s_per_byte)

where the counts come from the production node itself: ``rows_applied`` from its
apply hook, ``rows_walked`` from ``ReplicaNode.rows_walked_by_table`` (rows compared by
whole-shard scans: the full-scan ablation, or the index's fallback below its
watermark) and ``rows_indexed`` = ``counters["rows_scanned"] - counters["rows_walked"]``
(candidate rows the recent-row index compared).  The constants are measured on the
production code paths by ``bench/sim_cpu_costs.py``; a scenario records them in its
``[cpu]`` table.  ``cold_rows`` (per table, ``[[table]] cold_rows``) are rows a real
replica holds but the workload never updates; the simulator does not allocate them,
it only charges a whole-shard scan for walking them too.

The transport terms (all 0 unless a ``[cpu]`` table sets them, so a scenario without
them is charged exactly as before) cover what a bare ``node.receive`` leaves out:
``recv_per_message_s`` the stream receive and ``decode_frame``'s fixed overhead,
``recv_s_per_byte`` its per-byte work (HMAC, msgpack, copies; decompression when
compressed); ``send_per_message_s`` and ``send_s_per_byte`` the encode (msgpack, HMAC)
and the socket write of each message sent.  Sizes are those the simulator puts on the
WAN: the encoded frame plus ``Outgoing.extra_bytes`` (the value bytes of metadata mode).
``bench/daemon_costs.py`` calibrates them on whole daemons (the receive: a peer
daemon's CPU per push; the send: one more destination of the daemon's transport).

The publish path and the receive delay (0 unless set): ``publisher_per_message_s`` +
``bytes * publisher_s_per_byte`` is the publisher's work before a publish leaves (on a
core of its own, :data:`PUBLISHER_ID`, or the shared pool); the publish then takes half
the intra-DC RTT and ``wake_s``, and the ingest replica's receive of it
(``publish_recv_per_message_s`` + ``bytes * publish_recv_s_per_byte``: HTTP, decode,
HMAC, the write-ahead log append) before it applies.  ``wake_s`` delays every received
message (event-loop wake-ups, the kernel's loopback: time that occupies no core).
``proxy_per_message_s`` + ``bytes * proxy_s_per_byte`` is a WAN emulator's work per peer
message (:data:`PROXY_ID`, one thread; ``bench/fidelity.py``'s proxy on the host the
daemons share): a message goes on when it has forwarded it.

Shared host: ``shared_cores = K`` runs every replica's work on one FIFO pool of K cores
for the whole cluster (N daemons on one K-core machine, as in a loopback comparison with
real daemons) instead of a core per replica.  A replica still does one thing at a time
(a daemon's event loop is one thread): its work starts when both it and a pool core are
free, on the core that frees first, in the order the work was charged.

Timing rule: without receive-side terms (``recv_*``, ``publish_*``, ``wake_s``) a node
handles a message when it arrives -- its state changes then -- and what it sends in
reply leaves at ``max(now, cpu_free_at) + cost``; ``cpu_free_at`` then moves to that
time (the cheapest rule: no events for idle nodes).  With them, a message takes effect
only once its core has received it: at ``max(arrival + wake_s, cpu_free_at)`` plus the
receive (:meth:`CpuModel.reserve`), in arrival order; then the rest is charged as
above.  The node's timers run on the same core: a tick that falls while the core is
busy waits until it is free (the driver reschedules it).

What is modelled and what is not:

* one core per replica for sync work (or a pool of ``shared_cores`` for all), busy in
  FIFO order; no parallel scan threads, no batching of several pending requests into
  one scan;
* without receive-side terms, state changes are not deferred while the core is busy:
  a row received by a busy node is readable (and counted as applied, for latency) on
  arrival; only what the node sends is delayed.  This flatters a busy node's own
  freshness, never its peers';
* CPU times are constants (medians): no variance, no time-slicing (the pool is FIFO),
  so tails under contention come out narrower than a real host's;
* no load shedding: requests that arrive while busy all wait (in arrival order);
* decoding, HMAC and transport costs are not in ``per_message_s`` (it times a bare
  ``node.receive`` of a decoded small frame) but in the transport terms above; a body
  sent to k peers is charged k sends (calibrated as the marginal write, the one
  encode being in the receive of what caused it), and the in-DC/cross-DC difference
  in compression is not modelled (one per-byte constant each way);
* a partitioned run (``--workers``) cannot share one pool across its processes:
  ``shared_cores`` needs a single-process run;
* ``apply_s_per_row`` is measured for the scenario's embedding width and charged
  alike for every table;
* baselines with their own drivers (``direct-push``, ``adam-2pc``, ``broadcast``)
  are not charged: the model is uniform over the ekko family (every system run by
  :class:`~simulator.replicas.SimCluster`).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ekko.core.errors import UsageError

if TYPE_CHECKING:
    from ekko.replica.node import ReplicaNode

__all__ = ["COST_FIELDS", "MAX_COLD_ROWS", "MAX_COST_S", "MAX_SHARED_CORES", "PROXY_ID", "PUBLISHER_ID", "CpuCosts",
           "CpuModel"]

#: sanity bound on any one measured cost constant (a typo guard: a second per row is no CPU).
MAX_COST_S = 1.0
#: sanity bound on a table's cold rows (10^13 rows is petabytes of embeddings).
MAX_COLD_ROWS = 10**13
#: sanity bound on ``[cpu] shared_cores`` (one host's cores).
MAX_SHARED_CORES = 4096
#: the cost constants a ``[cpu]`` table must give (the model's original four).
REQUIRED_FIELDS = ("per_message_s", "apply_s_per_row", "scan_s_per_row", "index_s_per_row")
#: the transport costs a ``[cpu]`` table may give; absent = 0 (not charged).
TRANSPORT_FIELDS = ("recv_per_message_s", "recv_s_per_byte", "send_per_message_s", "send_s_per_byte")
#: the publish path and the receive latency a ``[cpu]`` table may give; absent = 0 (not modelled).
PUBLISH_FIELDS = ("publish_recv_per_message_s", "publish_recv_s_per_byte", "publisher_per_message_s",
                  "publisher_s_per_byte", "wake_s")
#: a WAN emulator every peer message crosses (a loopback comparison's proxy); absent = 0 (none).
PROXY_FIELDS = ("proxy_per_message_s", "proxy_s_per_byte")
#: every cost constant, in seconds.
COST_FIELDS = REQUIRED_FIELDS + TRANSPORT_FIELDS + PUBLISH_FIELDS + PROXY_FIELDS
#: the pseudo-node the trainer's (publisher's) CPU time is charged to.
PUBLISHER_ID = "publisher"
#: the pseudo-node of the WAN emulator's one thread.
PROXY_ID = "proxy"


@dataclass(frozen=True, slots=True)
class CpuCosts:
    """Measured cost constants of the CPU model, in seconds.

    Args:
        per_message_s: handling one message or tick (a bare ``node.receive`` of a small frame).
        apply_s_per_row: ``TableStore.apply``, per applied row.
        scan_s_per_row: the full-scan comparison (``TableStore.scan_newer``), per row walked.
        index_s_per_row: the recent-row index lookup (``RecentIndex.newer_than_many``),
            per candidate row it compared.
        recv_per_message_s: per received message: stream receive + frame decode overhead.
        recv_s_per_byte: per received byte: HMAC, msgpack, copies (and decompression).
        send_per_message_s: per sent message (each destination): encode + socket write.
        send_s_per_byte: per sent byte: HMAC + encode + the socket write.
        publish_recv_per_message_s: the ingest replica's receive of one publish (HTTP, decode,
            HMAC, the write-ahead log append) beyond the node work.
        publish_recv_s_per_byte: its per-byte part.
        publisher_per_message_s: the publisher's (SDK's) work before a publish leaves it.
        publisher_s_per_byte: its per-byte part.
        wake_s: time a received message waits that is neither CPU nor wire (event-loop
            wake-ups, the kernel's loopback): it delays the receive, it occupies no core.
        proxy_per_message_s: a WAN emulator's CPU per forwarded peer message (one thread
            on the host: ``bench/fidelity.py``'s proxy); a message leaves when it is done.
        proxy_s_per_byte: its per-byte part.
        shared_cores: None = a core per replica; K = one FIFO pool of K cores for all.

    Example:
        >>> c = CpuCosts(per_message_s=2e-5, apply_s_per_row=1e-7, scan_s_per_row=2e-9, index_s_per_row=5e-8)
        >>> c.per_message_s, c.send_s_per_byte, c.shared_cores
        (2e-05, 0.0, None)
    """

    per_message_s: float
    apply_s_per_row: float
    scan_s_per_row: float
    index_s_per_row: float
    recv_per_message_s: float = 0.0
    recv_s_per_byte: float = 0.0
    send_per_message_s: float = 0.0
    send_s_per_byte: float = 0.0
    publish_recv_per_message_s: float = 0.0
    publish_recv_s_per_byte: float = 0.0
    publisher_per_message_s: float = 0.0
    publisher_s_per_byte: float = 0.0
    wake_s: float = 0.0
    proxy_per_message_s: float = 0.0
    proxy_s_per_byte: float = 0.0
    shared_cores: int | None = None

    def __post_init__(self) -> None:
        for name in COST_FIELDS:
            v = getattr(self, name)
            if (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                    or not 0.0 <= v <= MAX_COST_S):
                raise UsageError(f"cpu.{name} must be a number of seconds in [0, {MAX_COST_S}], got {v!r}")
        k = self.shared_cores
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_SHARED_CORES):
            raise UsageError(f"cpu.shared_cores must be a whole number of cores in [1, {MAX_SHARED_CORES}], "
                             f"got {k!r}")

    @property
    def charges_transport(self) -> bool:
        """Whether any transport term is non-zero (else message sizes need not be counted)."""
        return any(getattr(self, name) for name in TRANSPORT_FIELDS)

    @property
    def defers_receive(self) -> bool:
        """Whether a received message takes effect only once its core has received it
        (any receive-side term set: ``recv_*``, ``publish_*``, ``wake_s``)."""
        return any(getattr(self, name) for name in ("recv_per_message_s", "recv_s_per_byte", "wake_s")
                   + PUBLISH_FIELDS)

    def receive_s(self, nbytes: int, publish: bool = False) -> float:
        """CPU seconds of receiving one message of ``nbytes`` (a publish, or a peer message)."""
        if publish:
            return self.publish_recv_per_message_s + nbytes * self.publish_recv_s_per_byte
        return self.recv_per_message_s + nbytes * self.recv_s_per_byte

    @property
    def has_proxy(self) -> bool:
        """Whether peer messages cross a WAN emulator that costs CPU."""
        return bool(self.proxy_per_message_s or self.proxy_s_per_byte)

    def proxy_s(self, nbytes: int) -> float:
        """CPU seconds the WAN emulator spends forwarding one message of ``nbytes``."""
        return self.proxy_per_message_s + nbytes * self.proxy_s_per_byte

    def publisher_s(self, nbytes: int) -> float:
        """CPU seconds the publisher spends on one publish of ``nbytes`` before it leaves."""
        return self.publisher_per_message_s + nbytes * self.publisher_s_per_byte

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CpuCosts:
        """From a scenario's ``[cpu]`` table (other keys such as ``measured_by`` are notes).

        The four original constants are required; the transport terms default to 0 and
        ``shared_cores`` to a core per replica.  Values are checked as given (a string
        such as ``"1e-5"`` is refused, not converted).
        """
        missing = [k for k in REQUIRED_FIELDS if k not in d]
        if missing:
            raise UsageError(f"[cpu] needs {missing[0]}")
        kw: dict[str, Any] = {k: d[k] for k in COST_FIELDS if k in d}
        if "shared_cores" in d:
            kw["shared_cores"] = d["shared_cores"]
        return cls(**kw)


class CpuModel:
    """Per-replica CPU busy time, charged from the node's own work counters.

    Args:
        costs: the measured constants.
        scan_scale: per table name, ``(rows + cold_rows) / rows``: how many rows a
            whole-shard scan of the real table walks per simulated row (default 1).

    Example:
        >>> from ekko.replica.node import ReplicaNode
        >>> node = ReplicaNode("r0", "dc0", "r0", with_values=False)
        >>> cpu = CpuModel(CpuCosts(1e-3, 0.0, 1e-6, 0.0), scan_scale={"emb": 10.0})
        >>> cpu.charge(node, now=5.0)        # an idle node: its sends leave after 1 ms
        5.001
        >>> node.rows_walked_by_table[("model", "emb")] += 100   # it scanned 100 rows
        >>> round(cpu.charge(node, now=5.0), 6)  # busy until 5.001, then 1 ms + 100*10*1 us
        5.003
    """

    __slots__ = ("_applied", "_pool", "_seen", "busy_s", "charges", "costs", "free_at", "max_backlog_s",
                 "scan_scale")

    def __init__(self, costs: CpuCosts, scan_scale: Mapping[str, float] | None = None) -> None:
        self.costs = costs
        self.scan_scale = dict(scan_scale or {})
        for t, v in self.scan_scale.items():
            if not math.isfinite(v) or v < 1.0:
                raise UsageError(f"scan scale of table {t!r} must be >= 1, got {v!r}")
        self.free_at: dict[str, float] = {}
        self.busy_s = 0.0          # CPU seconds charged, all nodes
        self.charges = 0
        self.max_backlog_s = 0.0   # longest wait of a node's sends behind its busy core
        self._seen: dict[str, tuple[float, int]] = {}
        self._applied: dict[str, int] = {}
        # shared_cores: when each core of the pool is next free (a min-heap).
        self._pool: list[float] | None = [0.0] * costs.shared_cores if costs.shared_cores else None

    def note_applied(self, node_id: str, rows: int) -> None:
        """Rows a node applied (from its apply hook) since its last charge."""
        self._applied[node_id] = self._applied.get(node_id, 0) + rows

    def busy_until(self, node_id: str) -> float:
        """When ``node_id`` has done the work charged so far (0 if never charged)."""
        return self.free_at.get(node_id, 0.0)

    def transport_cost(self, recv_bytes: int | None, sent: int, sent_bytes: int) -> float:
        """Seconds of transport work: one received message of ``recv_bytes`` (None: none
        received, a tick or local call) and ``sent`` messages of ``sent_bytes`` in all.

        Example:
            >>> m = CpuModel(CpuCosts(0, 0, 0, 0, recv_per_message_s=1e-5, recv_s_per_byte=1e-9,
            ...                       send_per_message_s=2e-5, send_s_per_byte=2e-9))
            >>> round(m.transport_cost(1000, 3, 3000), 9)   # 1e-5 + 1e-6 + 6e-5 + 6e-6
            7.7e-05
        """
        c = self.costs
        cost = sent * c.send_per_message_s + sent_bytes * c.send_s_per_byte
        if recv_bytes is not None:
            cost += c.recv_per_message_s + recv_bytes * c.recv_s_per_byte
        return cost

    def reserve(self, node_id: str, now: float, cost_s: float) -> float:
        """Occupy ``node_id``'s core (and a pool core, when shared) for ``cost_s`` from when
        both are free at or after ``now``; returns when that work is done.  The receive of
        a message (before it takes effect) and the publisher's work are charged so.

        Example:
            >>> m = CpuModel(CpuCosts(0, 0, 0, 0, shared_cores=1))
            >>> m.reserve("a", 1.0, 0.5), m.reserve("b", 1.0, 0.5)   # one core: b waits for a
            (1.5, 2.0)
        """
        start = self.free_at.get(node_id, 0.0)
        if start < now:
            start = now
        pool = self._pool
        if pool is not None and pool[0] > start:
            start = pool[0]
        if start - now > self.max_backlog_s:
            self.max_backlog_s = start - now
        done = start + cost_s
        if pool is not None:
            heapq.heapreplace(pool, done)
        self.free_at[node_id] = done
        self.busy_s += cost_s
        return done

    def charge(self, node: ReplicaNode, now: float, extra_s: float = 0.0) -> float:
        """Charge one handled message/tick/call of ``node``; returns when its sends leave.

        ``extra_s`` is added to the work (the :meth:`transport_cost` of the message).
        """
        nid = node.node_id
        c = self.costs
        walked = 0.0
        by_table = node.rows_walked_by_table
        if by_table:
            scale = self.scan_scale
            for (_, table), n in by_table.items():
                walked += n * scale.get(table, 1.0)
        cnt = node.counters
        # get(), not [] (the same 0 when absent): a Counter's __missing__ is a Python call.
        indexed = cnt.get("rows_scanned", 0) - cnt.get("rows_walked", 0)
        seen = self._seen.get(nid)
        prev_w, prev_i = seen if seen is not None else (0.0, 0)
        if walked < prev_w or indexed < prev_i:  # a restarted node: new counters
            prev_w, prev_i = 0.0, 0
        if seen is None or seen[0] != walked or seen[1] != indexed:
            self._seen[nid] = (walked, indexed)   # as before: the counters seen at this charge
        cost = (c.per_message_s + self._applied.pop(nid, 0) * c.apply_s_per_row
                + (walked - prev_w) * c.scan_s_per_row + (indexed - prev_i) * c.index_s_per_row)
        if extra_s:
            cost += extra_s
        start = self.free_at.get(nid, 0.0)
        if start < now:
            start = now
        pool = self._pool
        if pool is not None and pool[0] > start:
            start = pool[0]      # the node is ready, but every core of the host is busy
        if start - now > self.max_backlog_s:
            self.max_backlog_s = start - now
        done = start + cost
        if pool is not None:
            heapq.heapreplace(pool, done)   # on the core that freed first
        self.free_at[nid] = done
        self.busy_s += cost
        self.charges += 1
        return done

    def summary(self) -> dict[str, float]:
        """What the model charged (for ``results.json``; ``shared_cores`` only when set)."""
        out: dict[str, float] = {"busy_s_total": self.busy_s, "charges": self.charges,
                                 "max_backlog_s": self.max_backlog_s}
        if self.costs.shared_cores:
            out["shared_cores"] = self.costs.shared_cores
        return out
