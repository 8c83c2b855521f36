"""Prometheus metrics of one replica daemon.

Each :class:`DaemonMetrics` has its own :class:`prometheus_client.CollectorRegistry`
(never the process-global one), so several daemons in one process -- tests,
``ekko demo`` -- keep separate numbers.

Three kinds of metrics:

* counters the daemon increments as things happen (rejected requests by
  reason, bytes per peer DC in each direction, transport failures);
* latency histograms in seconds, buckets :data:`LATENCY_BUCKETS_S`: publish
  acknowledgement, apply, push queueing (fed a whole taken batch at once by
  :class:`TimedLinkQueue`) and the freshness lag, sampled every
  :data:`FRESHNESS_SAMPLE_INTERVAL_S`;
* a collector that reads the node's state at scrape time (the node's own event
  counters, freshness lag per model, models, rows, push queue depth).  Scrapes
  run in an HTTP handler on the event loop thread, the only thread that touches
  the node, so reading it there is safe.
"""

from __future__ import annotations

import gc
import threading
import time
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Iterable, Iterator

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from ekko.core.codec import MsgType
from p2p.outbound import LinkQueue, QueuedRows, QueueFactory

if TYPE_CHECKING:
    from ekko.replica.node import ReplicaNode

#: label value for a peer whose DC we do not know yet (e.g. a seed before it answered).
UNKNOWN_DC = "unknown"
#: upper bounds (seconds) of the latency histograms' buckets: 1 ms to 1 min, about 2.5x
#: apart -- a LAN push waits milliseconds, a publish acknowledgement tens of them (an
#: fsync), a WAN lag seconds, an outage minutes (+Inf holds the rest).
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: seconds between two samples of each model's freshness lag into its histogram.
FRESHNESS_SAMPLE_INTERVAL_S = 1.0
#: the endpoint whose successful answers are publish acknowledgements.
PUBLISH_ENDPOINT = "/v1/publish"
#: ``source`` label of the apply histogram for each message that carries deltas.
APPLY_SOURCES = {MsgType.PUBLISH: "publish", MsgType.PUSH: "push", MsgType.PULL_RESPONSE: "pull"}
#: ``link`` label of the push queueing histogram: a peer in this replica's DC, or in another.
LINK_KINDS = ("lan", "wan")


class RowHistogram(Collector):
    """A Prometheus histogram fed whole arrays of observations at once (one bincount,
    not a Python call per row): the push queueing time of every row of a batch.

    Args:
        name, documentation: as for :class:`prometheus_client.Histogram` (``name`` in
            base units, e.g. ``..._seconds``).
        labelnames / label_values: the label names, and the label value tuples exported
            from the start (at zero) so that dashboards see the series before traffic.
        buckets: increasing finite upper bounds; +Inf is added.

    Example:
        >>> h = RowHistogram("wait_seconds", "Wait", ["link"], [("lan",)], buckets=(0.01, 0.1))
        >>> h.observe(np.array([0.005, 0.05, 0.05, 3.0]), "lan")
        >>> [(s.labels["le"], s.value) for s in next(iter(h.collect())).samples if s.name.endswith("_bucket")]
        [('0.01', 1.0), ('0.1', 3.0), ('+Inf', 4.0)]
    """

    def __init__(self, name: str, documentation: str, labelnames: list[str],
                 label_values: Iterable[tuple[str, ...]] = (), buckets: Iterable[float] = LATENCY_BUCKETS_S) -> None:
        self.name, self.documentation, self.labelnames = name, documentation, list(labelnames)
        self.bounds = np.asarray(tuple(buckets), dtype=np.float64)
        if not len(self.bounds) or not np.all(np.diff(self.bounds) > 0) or not np.isfinite(self.bounds).all():
            raise ValueError(f"{name}: buckets must be finite and increasing, got {self.bounds.tolist()}")
        self._counts: dict[tuple[str, ...], np.ndarray] = {}
        self._sums: dict[tuple[str, ...], float] = {}
        for values in label_values:
            self._child(tuple(values))

    def _child(self, labels: tuple[str, ...]) -> np.ndarray:
        c = self._counts.get(labels)
        if c is None:
            if len(labels) != len(self.labelnames):
                raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {labels}")
            c = self._counts[labels] = np.zeros(len(self.bounds) + 1, np.int64)
            self._sums[labels] = 0.0
        return c

    def observe(self, values: np.ndarray, *labels: str) -> None:
        """Count every value of ``values`` (seconds) under the label values ``labels``."""
        if not len(values):
            return
        c = self._child(labels)
        # side="left": a value equal to a bound belongs to that bound's bucket (le = "<=").
        c += np.bincount(np.searchsorted(self.bounds, values, side="left"), minlength=len(c))
        self._sums[labels] += float(np.sum(values))

    def collect(self) -> Iterable[Metric]:
        h = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for labels in sorted(self._counts):
            cum = np.cumsum(self._counts[labels])
            les = [repr(float(b)) for b in self.bounds] + ["+Inf"]
            h.add_metric(list(labels), list(zip(les, cum.astype(float).tolist())), self._sums[labels])
        yield h


class TimedLinkQueue:
    """A :class:`p2p.outbound.LinkQueue` that reports how long each row it hands out waited.

    It wraps the node's own queue and keeps the protocol sans-IO: the wait is the
    ``now`` that :meth:`take` is given minus each row's ``enqueued_at`` (both on the
    node's clock), reported to ``observe(waits)``.  Everything else is the inner
    queue's (``stats()`` of a priority queue included).

    Example:
        >>> from p2p.outbound import FifoLinkQueue
        >>> seen = []
        >>> q = TimedLinkQueue(FifoLinkQueue(), seen.append)
        >>> q.put(QueuedRows("m", "t", np.array([1, 2]), np.array([5, 5]), 8), now=10.0)
        >>> _ = q.take(now=10.25, max_bytes=1000)
        >>> seen[0].tolist(), q.rows
        ([0.25, 0.25], 0)
    """

    def __init__(self, inner: LinkQueue, observe: Callable[[np.ndarray], None]) -> None:
        self.inner = inner
        self.observe = observe

    def put(self, rows: QueuedRows, now: float) -> None:
        self.inner.put(rows, now)

    def take(self, now: float, max_bytes: int) -> list[QueuedRows]:
        batches = self.inner.take(now, max_bytes)
        for b in batches:
            if b.enqueued_at is not None:
                self.observe(np.maximum(now - b.enqueued_at, 0.0))
        return batches

    def next_ready(self, now: float) -> float | None:
        return self.inner.next_ready(now)

    @property
    def rows(self) -> int:
        return self.inner.rows

    @property
    def dropped(self) -> int:
        return self.inner.dropped

    def __getattr__(self, name: str) -> Any:
        # Only for what the LinkQueue interface does not name (e.g. a priority queue's stats()).
        if name == "inner":   # not set yet (a copy being built): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)


class _NodeCollector(Collector):
    """Reads a :class:`ReplicaNode` at scrape time."""

    def __init__(self, node: "ReplicaNode") -> None:
        self.node = node

    def collect(self) -> Iterable[Metric]:
        node = self.node
        events = CounterMetricFamily("ekko_node_events", "Protocol events counted by the replica node",
                                     labels=["event"])
        for name, value in sorted(node.counters.items()):
            events.add_metric([name], float(value))
        yield events

        lag = GaugeMetricFamily("ekko_freshness_lag_seconds",
                                "How far this replica's newest applied update trails the newest seen anywhere",
                                labels=["model"])
        dc_lag = GaugeMetricFamily("ekko_cluster_freshness_lag_seconds",
                                   "Worst freshness lag among live members of a DC (from gossiped heads)",
                                   labels=["model", "dc"])
        rows = GaugeMetricFamily("ekko_written_rows", "Rows that hold a published value",
                                 labels=["model", "table"])
        head = GaugeMetricFamily("ekko_model_head_counter", "Greatest version counter applied here",
                                 labels=["model"])
        worst: dict[tuple[str, str], float] = {}
        for member in node.cluster_view():
            if member["state"] == "dead":
                continue
            for model, s in member["lag_s"].items():
                key = (model, member["dc"])
                # No data yet while others have some: unboundedly behind (+Inf).
                worst[key] = max(worst.get(key, 0.0), float("inf") if s is None else float(s))
        for name, m in node.models.items():
            own = node.freshness_lag(name)
            lag.add_metric([name], float("inf") if own is None else own)
            head.add_metric([name], float(m.head))
            for t in m.spec.tables:
                # Kept by the store as rows are written: a scrape does not scan the table.
                rows.add_metric([name, t.name], float(m.store.table(t.name).written_rows()))
        for (model, dc), s in sorted(worst.items()):
            dc_lag.add_metric([model, dc], s)
        yield lag
        yield dc_lag
        yield rows
        yield head

        # Model-state manager (rollback.manager): one series per model and state, 1 for the current one.
        mstate = GaugeMetricFamily("ekko_model_state", "Model state here (1 = current): warmup, healthy, "
                                   "uncertain, corrupted", labels=["model", "state"])
        cstate = GaugeMetricFamily("ekko_model_cluster_state", "Worst model state gossiped by live replicas "
                                   "(1 = current)", labels=["model", "state"])
        incidents = CounterMetricFamily("ekko_model_incidents", "Corruption incidents of a model (detected here "
                                        "or learnt from peers; the cluster-wide incident number)", labels=["model"])
        states = node.model_states() if node.models else {}
        for name, st in sorted(states.items()):
            for value in ("warmup", "healthy", "uncertain", "corrupted"):
                mstate.add_metric([name, value], float(st["state"] == value))
                cstate.add_metric([name, value], float(st["cluster_state"] == value))
            incidents.add_metric([name], float(st["epoch"]))
        yield mstate
        yield cstate
        yield incidents

        models = GaugeMetricFamily("ekko_models", "Models registered on this replica")
        models.add_metric([], float(len(node.models)))
        yield models

        depth = GaugeMetricFamily("ekko_push_queue_rows", "Rows waiting in outbound push queues (all links)")
        depth.add_metric([], float(sum(q.rows for q in node.queues.values())))
        yield depth
        # Priority queues count by class (high/low): depth, bytes sent, queueing latency.
        stats = [q.stats() for q in node.queues.values() if hasattr(q, "stats")]
        if stats:
            by_cls = GaugeMetricFamily("ekko_push_queue_class_rows", "Rows waiting in push queues by class",
                                       labels=["class"])
            sent = CounterMetricFamily("ekko_push_sent_bytes", "Push bytes sent by class", labels=["class"])
            lat = CounterMetricFamily("ekko_push_queue_latency_seconds_sum",
                                      "Total queueing latency of pushed rows by class", labels=["class"])
            cnt = CounterMetricFamily("ekko_push_queue_latency_rows", "Pushed rows by class", labels=["class"])
            for cls in ("high", "low"):
                by_cls.add_metric([cls], float(sum(getattr(st, f"rows_{cls}") for st in stats)))
                sent.add_metric([cls], float(sum(getattr(st, f"sent_bytes_{cls}") for st in stats)))
                lat.add_metric([cls], float(sum(getattr(st, f"latency_sum_{cls}") for st in stats)))
                cnt.add_metric([cls], float(sum(getattr(st, f"sent_rows_{cls}") for st in stats)))
            yield by_cls
            yield sent
            yield lat
            yield cnt
        dropped = CounterMetricFamily("ekko_push_queue_dropped_rows",
                                      "Rows dropped by full push queues (left to anti-entropy)")
        dropped.add_metric([], float(sum(q.dropped for q in node.queues.values())))
        yield dropped

        members = GaugeMetricFamily("ekko_members", "Members known to this replica by state", labels=["state"])
        by_state: dict[str, int] = {"alive": 0, "suspect": 0, "dead": 0}
        for mem in node.members.members.values():
            by_state[mem.state.name.lower()] = by_state.get(mem.state.name.lower(), 0) + 1
        for state, n in by_state.items():
            members.add_metric([state], float(n))
        yield members


#: upper bounds (seconds) of the garbage-collector pause histogram's buckets.
GC_PAUSE_BUCKETS_S = (0.0001, 0.001, 0.005, 0.02, 0.1, 0.5)


class GcPauses(Collector):
    """Pauses of Python's cyclic garbage collector in this process, by generation
    (``ekko_gc_pause_seconds``): a full collection walks every tracked object, and a
    pause stops the event loop and whatever publish or push it was serving.

    One hook per process (``gc.callbacks``), installed by the first instance; every
    daemon's registry may export it (daemons in one process share the collector).

    Example:
        >>> import gc
        >>> pauses = GcPauses()
        >>> _ = gc.collect()
        >>> pauses.count[2] >= 1
        True
    """

    _lock = threading.Lock()
    _installed: "GcPauses | None" = None

    def __new__(cls) -> "GcPauses":
        with cls._lock:
            if cls._installed is None:
                self = super().__new__(cls)
                self.count = [0, 0, 0]
                self.seconds = [0.0, 0.0, 0.0]
                self.buckets = [[0] * (len(GC_PAUSE_BUCKETS_S) + 1) for _ in range(3)]
                self._started = 0.0
                gc.callbacks.append(self._hook)
                cls._installed = self
            return cls._installed

    def __init__(self) -> None:  # state lives in __new__: one per process
        pass

    def _hook(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        g = min(int(info.get("generation", 2)), 2)
        took = time.perf_counter() - self._started
        self.count[g] += 1
        self.seconds[g] += took
        b = self.buckets[g]
        b[next((i for i, ub in enumerate(GC_PAUSE_BUCKETS_S) if took <= ub), len(GC_PAUSE_BUCKETS_S))] += 1

    def collect(self) -> Iterable[Metric]:
        h = HistogramMetricFamily("ekko_gc_pause_seconds", "Pauses of the cyclic garbage collector in this "
                                  "process, by generation (2: a full collection)", labels=["generation"])
        for g in range(3):
            cum, acc = [], 0
            for ub, n in zip((*GC_PAUSE_BUCKETS_S, float("inf")), self.buckets[g]):
                acc += n
                cum.append((repr(ub) if ub != float("inf") else "+Inf", acc))
            h.add_metric([str(g)], cum, self.seconds[g])
        yield h


class _WalCollector(Collector):
    """Reads the daemon's write-ahead log (:class:`ekko.replica.wal.GroupCommitLog`) at scrape time."""

    def __init__(self, get_wal: Callable[[], Any]) -> None:
        self.get_wal = get_wal

    def collect(self) -> Iterable[Metric]:
        wal = self.get_wal()
        if wal is None:
            return
        w = wal.writer
        for name, doc, value in (
                ("ekko_wal_records", "Records appended to the write-ahead log", wal.records),
                ("ekko_wal_bytes", "Bytes appended to the write-ahead log", wal.bytes),
                ("ekko_wal_fsyncs", "fsyncs of the write-ahead log (group commit: one per batch)", w.fsyncs),
                ("ekko_wal_fsync_seconds", "Time spent in write-ahead log fsyncs", w.fsync_seconds),
                ("ekko_wal_failures", "Write-ahead log writes that failed", wal.failures)):
            c = CounterMetricFamily(name, doc)
            c.add_metric([], float(value))
            yield c
        st = wal.replay_stats
        for name, doc, value in (
                ("ekko_wal_replayed_records", "Records replayed from the write-ahead log at start", st.records),
                ("ekko_wal_dropped_bytes", "Bytes of torn or corrupt log tail dropped at start", st.dropped_bytes)):
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], float(value))
            yield g


class DaemonMetrics:
    """The metrics of one daemon, in a registry of its own.

    Args:
        node: the replica node whose state is exported at scrape time (optional:
            :meth:`attach` may bind it later).

    Example:
        >>> m = DaemonMetrics()
        >>> m.reject("publish", "bad_magic")
        >>> b"ekko_rejects_total" in m.render()
        True
    """

    def __init__(self, node: "ReplicaNode | None" = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.rejects = Counter("ekko_rejects", "Requests rejected for bad input, by endpoint and reason",
                               ["endpoint", "reason"], registry=r)
        self.requests = Counter("ekko_http_requests", "HTTP requests served, by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.internal_errors = Counter("ekko_internal_errors", "Unexpected exceptions (bugs), by place",
                                       ["where"], registry=r)
        self.bytes_sent = Counter("ekko_bytes_sent", "Frame bytes sent to peers, by peer DC and message type",
                                  ["peer_dc", "msg_type"], registry=r)
        self.frames = Counter("ekko_peer_frames", "Frames peer sends needed, by outcome: encoded, or reused "
                              "(the frame of an equal send to another peer: a push's DC fan-out)", ["outcome"],
                              registry=r)
        self.bytes_received = Counter("ekko_bytes_received",
                                      "Frame bytes received from peers, by sender DC and message type",
                                      ["peer_dc", "msg_type"], registry=r)
        self.send_failures = Counter("ekko_send_failures", "Peer sends that failed or were dropped, by reason",
                                     ["peer_dc", "reason"], registry=r)
        self.published_rows = Counter("ekko_published_rows", "Rows accepted by /v1/publish", ["model"],
                                      registry=r)
        self.routed_parts = Counter("ekko_routed_parts",
                                    "Parts of placed models' publishes and reads sent on to the replicas "
                                    "that keep their shards (ekko.server.placed_routes)", registry=r)
        self.shadowed_rows = Counter("ekko_shadowed_rows",
                                     "Published rows that did not apply because the ingest replica already "
                                     "held a greater version (a publisher clock ahead, or another publisher)",
                                     ["model"], registry=r)
        self.snapshots = Counter("ekko_snapshots", "Snapshots written, by outcome", ["outcome"], registry=r)
        self.snapshot_seconds = Gauge("ekko_last_snapshot_seconds", "Duration of the last snapshot write",
                                      registry=r)
        self.heap_trim_seconds = Histogram(
            "ekko_heap_trim_seconds", "Duration of one return of free heap pages to the OS (malloc_trim)",
            buckets=(1e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1), registry=r)
        self.snapshot_saved_rows = Gauge(
            "ekko_last_snapshot_saved_rows",
            "Rows written while the last snapshot was read, whose old values it kept aside (copy-on-write)",
            registry=r)
        self.sends_in_flight = Gauge("ekko_sends_in_flight", "Peer sends in flight", registry=r)
        # Back-pressure: refusals by bound, and the quantities the bounds apply to.
        self.backpressure = Counter("ekko_backpressure_rejects",
                                    "Publishes refused with 429/503 because a bound was passed, by bound",
                                    ["bound"], registry=r)
        self.publish_bytes_in_flight = Gauge("ekko_publish_bytes_in_flight",
                                             "Bytes of publish bodies admitted and not yet answered", registry=r)
        self.outbound_bytes = Gauge("ekko_outbound_bytes_queued",
                                    "Estimated bytes of peer messages queued in the HTTP transport", registry=r)
        self.push_backlog_rows = Gauge("ekko_push_backlog_rows", "Rows waiting in outbound push queues",
                                       registry=r)
        self.wal_retained_bytes = Gauge("ekko_wal_retained_bytes",
                                        "Bytes of write-ahead log not yet covered by a snapshot", registry=r)
        self.resident_bytes = Gauge("ekko_process_resident_bytes", "Resident memory of the daemon process",
                                    registry=r)
        # Latency histograms (seconds, LATENCY_BUCKETS_S).
        self.publish_ack_seconds = Histogram(
            "ekko_publish_ack_seconds", "Publishes acknowledged: time from the request arriving to its "
            "acknowledgement (applied and durable)", registry=r, buckets=LATENCY_BUCKETS_S)
        self.apply_seconds = Histogram(
            "ekko_apply_seconds", "Frames with deltas taken by the node, by source: checks, the apply to the "
            "tables and queueing the rows for push", ["source"], registry=r, buckets=LATENCY_BUCKETS_S)
        for source in APPLY_SOURCES.values():
            self.apply_seconds.labels(source)
        self.freshness_lag_sampled = Histogram(
            "ekko_freshness_lag_sampled_seconds", "The freshness lag of each model (ekko_freshness_lag_seconds), "
            f"sampled every {FRESHNESS_SAMPLE_INTERVAL_S:g} s (not while this replica has nothing of a model "
            "that others have: the gauge then reads +Inf)",
            ["model"], registry=r, buckets=LATENCY_BUCKETS_S)
        self.push_queue_wait = RowHistogram(
            "ekko_push_queue_wait_seconds", "Time each pushed row waited in its link queue before it was sent, "
            "by link (lan: a peer in this DC, wan: another DC)", ["link"], [(k,) for k in LINK_KINDS])
        r.register(self.push_queue_wait)
        r.register(GcPauses())
        self._next_freshness_sample = float("-inf")
        self._node_collector: _NodeCollector | None = None
        if node is not None:
            self.attach(node)

    def attach(self, node: "ReplicaNode") -> None:
        if self._node_collector is not None:
            self.registry.unregister(self._node_collector)
        self._node_collector = _NodeCollector(node)
        self.registry.register(self._node_collector)

    def watch_push_queues(self, node: "ReplicaNode") -> None:
        """Time the rows of every link queue ``node`` makes from now on
        (:class:`TimedLinkQueue` around its queue factory): ``ekko_push_queue_wait_seconds``."""
        push = node.eager_push
        inner: QueueFactory = push.queue_factory
        local_dc = node.dc

        def timed(peer: str, peer_dc: str) -> LinkQueue:
            link = LINK_KINDS[0] if peer_dc == local_dc else LINK_KINDS[1]
            return TimedLinkQueue(inner(peer, peer_dc), lambda waits: self.push_queue_wait.observe(waits, link))
        push.queue_factory = timed

    def applying(self, msg_type: MsgType) -> ContextManager[None]:
        """Time the block (the node taking one frame) in ``ekko_apply_seconds`` when
        ``msg_type`` carries deltas (:data:`APPLY_SOURCES`); a block that raises is not counted.

        Example:
            >>> m = DaemonMetrics()
            >>> with m.applying(MsgType.PUSH):
            ...     pass
            >>> b'ekko_apply_seconds_count{source="push"} 1.0' in m.render()
            True
        """
        source = APPLY_SOURCES.get(msg_type)
        return nullcontext() if source is None else self._timed(self.apply_seconds.labels(source))

    @staticmethod
    @contextmanager
    def _timed(hist: Any) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        hist.observe(time.perf_counter() - t0)

    def request_done(self, endpoint: str, status: int, seconds: float) -> None:
        """Count an answered request; a successful publish is also a publish acknowledgement
        that took ``seconds`` since the request arrived."""
        self.requests.labels(endpoint, str(status)).inc()
        if endpoint == PUBLISH_ENDPOINT and status == 200:
            self.publish_ack_seconds.observe(seconds)

    def sample_freshness(self, now: float) -> None:
        """Sample each model's freshness lag into ``ekko_freshness_lag_sampled_seconds``, at most
        every :data:`FRESHNESS_SAMPLE_INTERVAL_S` (``now``: the node's clock; the driver calls
        this after each tick)."""
        if now < self._next_freshness_sample or self._node_collector is None:
            return
        self._next_freshness_sample = now + FRESHNESS_SAMPLE_INTERVAL_S
        node = self._node_collector.node
        for name in node.models:
            lag = node.freshness_lag(name)
            if lag is not None:   # unbounded: +Inf would make the histogram's sum useless for good
                self.freshness_lag_sampled.labels(name).observe(lag)

    def watch_wal(self, get_wal: Callable[[], Any]) -> None:
        """Export the write-ahead log that ``get_wal()`` returns (None: nothing) at scrape time."""
        self.registry.register(_WalCollector(get_wal))

    def set_pressure(self, publish_bytes: int, outbound_bytes: int, push_rows: int, wal_bytes: int,
                     rss: int) -> None:
        """The quantities the back-pressure bounds apply to (:meth:`ekko.server.backpressure.PublishGate.gauges`)."""
        self.publish_bytes_in_flight.set(publish_bytes)
        self.outbound_bytes.set(outbound_bytes)
        self.push_backlog_rows.set(push_rows)
        self.wal_retained_bytes.set(wal_bytes)
        self.resident_bytes.set(rss)

    def reject(self, endpoint: str, reason: str) -> None:
        self.rejects.labels(endpoint, reason).inc()

    def render(self) -> bytes:
        """The registry in Prometheus text format."""
        return generate_latest(self.registry)
