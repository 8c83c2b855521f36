"""Latency histograms of ``/metrics`` and the written-rows gauge (issue 19).

* :class:`RowHistogram` (a whole batch of observations at once) exports exactly what
  prometheus_client's own :class:`~prometheus_client.Histogram` would for the same values;
* a real publish on one daemon is counted as a publish acknowledgement and as an apply;
  two daemons in two DCs count the pushed rows' queueing on a ``wan`` link, the apply
  of the push on the receiver, and sample each model's freshness lag;
* ``ekko_written_rows`` is kept as rows are written: a scrape reads no whole version
  array, and the count stays right through applies, restores and a snapshot load.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ekko.core.chain import PublisherChain
from ekko.core.codec import MsgType, encode_frame
from ekko.core.delta import Delta
from ekko.core.spec import ModelSpec, TableSpec
from ekko.core.store import TableStore
from ekko.replica.node import ReplicaNode
from ekko.server.metrics import LATENCY_BUCKETS_S, DaemonMetrics, RowHistogram, TimedLinkQueue
from p2p.outbound import FifoLinkQueue, QueuedRows
from test_daemon import (SPEC, _post_raw, make_client, metrics_text, post, publish_body, register, start_site,
                         tcp_daemon, wait_async)


def samples(text: str, family: str) -> dict[tuple, float]:
    """``{(sample name, sorted labels): value}`` of one family in Prometheus text."""
    for fam in text_string_to_metric_families(text):
        if fam.name == family:
            return {(s.name, tuple(sorted(s.labels.items()))): s.value for s in fam.samples}
    raise AssertionError(f"{family} not exported:\n{text}")


def count(text: str, family: str, **labels: str) -> float:
    """The ``_count`` of one series of a histogram; 0 for a series not created yet."""
    return samples(text, family).get((f"{family}_count", tuple(sorted(labels.items()))), 0.0)


def test_buckets_are_increasing_seconds_from_milliseconds_to_a_minute():
    b = np.array(LATENCY_BUCKETS_S)
    assert (np.diff(b) > 0).all() and b[0] <= 0.001 and b[-1] >= 60


def test_row_histogram_exports_what_prometheus_client_would_for_the_same_values():
    values = np.r_[np.random.default_rng(1).exponential(0.2, 500), LATENCY_BUCKETS_S[:3], 0.0, 1e4]
    mine = CollectorRegistry()
    h = RowHistogram("wait_seconds", "Wait", ["link"], [("lan",), ("wan",)])
    mine.register(h)
    h.observe(values[:200], "wan")
    h.observe(values[200:], "wan")     # two batches add up
    ref = CollectorRegistry()
    r = Histogram("wait_seconds", "Wait", ["link"], registry=ref, buckets=LATENCY_BUCKETS_S)
    for v in values:
        r.labels("wan").observe(float(v))
    r.labels("lan")
    got, want = samples(generate_latest(mine).decode(), "wait_seconds"), samples(generate_latest(ref).decode(),
                                                                                 "wait_seconds")
    want = {k: v for k, v in want.items() if not k[0].endswith("_created")}
    assert got.keys() == want.keys()
    for k in got:
        assert got[k] == pytest.approx(want[k]), k
    with pytest.raises(ValueError, match="labels"):
        h.observe(values, "wan", "extra")
    with pytest.raises(ValueError, match="increasing"):
        RowHistogram("x_seconds", "X", [], buckets=(1.0, 0.5))


def test_timed_queue_reports_each_rows_wait_and_forwards_the_rest():
    waits: list[np.ndarray] = []
    q = TimedLinkQueue(FifoLinkQueue(max_rows=4), waits.append)
    q.put(QueuedRows("m", "t", np.array([1, 2]), np.array([5, 5]), 8), now=1.0)
    q.put(QueuedRows("m", "t", np.array([3]), np.array([6]), 8), now=1.5)
    q.put(QueuedRows("m", "t", np.array([4, 5]), np.array([6, 6]), 8), now=1.75)   # over the bound: drops [1, 2]
    assert q.rows == 3 and q.dropped == 2 and q.next_ready(2.0) == 2.0
    taken = q.take(now=2.0, max_bytes=10_000)
    assert sum(len(b) for b in taken) == 3 and q.rows == 0
    assert sorted(np.concatenate(waits).tolist()) == [0.25, 0.25, 0.5]
    assert not hasattr(q, "stats")          # a FIFO queue has none; a priority queue's would show


async def test_a_publish_is_counted_as_an_acknowledgement_and_an_apply(tmp_path):
    d, client = await make_client(tmp_path)
    try:
        text = await metrics_text(client)
        assert count(text, "ekko_publish_ack_seconds") == 0
        assert count(text, "ekko_apply_seconds", source="publish") == 0
        assert count(text, "ekko_push_queue_wait_seconds", link="wan") == 0   # exported before any traffic
        assert (await register(client))[0] == 200
        pc = PublisherChain(origin=3)
        f = publish_body(pc, "emb", np.arange(100), np.ones((100, 8), np.float32))
        status, _, _ = await post(client, "/v1/publish", encode_frame(MsgType.PUBLISH, f.body))
        assert status == 200
        # a refused publish is no acknowledgement and applies nothing
        assert (await post(client, "/v1/publish", b"garbage"))[0] == 400
        text = await metrics_text(client)
        assert count(text, "ekko_publish_ack_seconds") == 1
        assert count(text, "ekko_apply_seconds", source="publish") == 1
        ack = samples(text, "ekko_publish_ack_seconds")
        assert 0 < ack[("ekko_publish_ack_seconds_sum", ())] < 60
        assert ack[("ekko_publish_ack_seconds_bucket", (("le", "+Inf"),))] == 1
    finally:
        await client.close()


async def test_two_dcs_count_push_queueing_the_pushed_apply_and_sample_freshness(tmp_path):
    a = tcp_daemon(tmp_path, "a", "dc1")
    b = tcp_daemon(tmp_path, "b", "dc2", seeds=[a.address])
    runners = [await start_site(a), await start_site(b)]
    try:
        status, _ = await _post_raw(a.address, "/v1/models", encode_frame(MsgType.REGISTER_MODEL,
                                                                          {"spec": SPEC.to_dict()}))
        assert status == 200
        await wait_async(lambda: "ranker" in b.node.models and "b" in a.node.members.members, 20, "catalog")
        f = publish_body(PublisherChain(origin=5), "emb", np.arange(500), np.ones((500, 8), np.float32))
        assert (await _post_raw(a.address, "/v1/publish", encode_frame(MsgType.PUBLISH, f.body)))[0] == 200

        def counted(d, family: str, **labels: str) -> float:
            return count(d.metrics.render().decode(), family, **labels)
        await wait_async(lambda: counted(b, "ekko_apply_seconds", source="push") >= 1, 20, "push applied on b")
        assert counted(a, "ekko_push_queue_wait_seconds", link="wan") == 500   # each pushed row once
        assert counted(a, "ekko_push_queue_wait_seconds", link="lan") == 0
        await wait_async(lambda: counted(b, "ekko_freshness_lag_sampled_seconds", model="ranker") >= 1
                         and counted(a, "ekko_freshness_lag_sampled_seconds", model="ranker") >= 1,
                         20, "freshness samples")
    finally:
        for r in runners:
            await r.cleanup()


# ------------------------------------------------------------------------ written rows

class _Watched(np.ndarray):
    """A version array that counts whole-array reads (ufuncs and numpy functions on it)."""

    full_reads = 0

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        _Watched._note(inputs)
        inputs = tuple(np.asarray(x) if isinstance(x, _Watched) else x for x in inputs)
        return getattr(ufunc, method)(*inputs, **kwargs)

    def __array_function__(self, func, types, args, kwargs):
        _Watched._note(args)
        args = tuple(np.asarray(x) if isinstance(x, _Watched) else x for x in args)
        return func(*args, **kwargs)

    @staticmethod
    def _note(xs) -> None:
        if any(isinstance(x, _Watched) and x.size >= WATCHED_ROWS for x in xs):
            _Watched.full_reads += 1


WATCHED_ROWS = 10_000


def test_a_scrape_does_not_count_over_the_whole_table():
    spec = ModelSpec("m", [TableSpec("t", rows=WATCHED_ROWS, dim=2)])
    node = ReplicaNode("r1", "dc1", "127.0.0.1:1", device="cpu")
    node.register_model(spec, 0.0)
    ts = node.table_store("m", "t")
    node.apply_local(Delta("m", "t", np.arange(10), np.full(10, 1 << 20), np.ones((10, 2), np.float32)), 0.0)
    ts.versions = ts.versions.view(_Watched)
    m = DaemonMetrics(node)
    m.render()                              # the first look at a replaced array counts it once
    _Watched.full_reads = 0
    node.apply_local(Delta("m", "t", np.arange(5, 15), np.full(10, 2 << 20), np.ones((10, 2), np.float32)), 1.0)
    text = m.render().decode()
    assert 'ekko_written_rows{model="m",table="t"} 15.0' in text
    assert _Watched.full_reads == 0


def test_written_rows_stay_right_through_applies_restores_and_loads():
    ts = TableStore(TableSpec("t", rows=100, dim=1), device="cpu", with_values=False)
    rng = np.random.default_rng(7)

    def check() -> None:
        assert ts.written_rows() == int((ts.versions > 0).sum())
    for step in range(1, 30):
        ids = rng.integers(0, 100, 20)              # repeats inside a delta, and rows written again
        vers = rng.integers(1, 40, 20) + (step << 8)
        ts.apply(Delta("m", "t", ids, vers.astype(np.int64), None, np.ones(20, bool)))
        check()
        back = np.unique(rng.integers(0, 100, 10))  # a rollback: some rows to never-written, some not
        ts.restore_rows(back, np.where(rng.random(len(back)) < 0.5, 0, step << 8).astype(np.int64), None)
        check()
    loaded = np.zeros(100, np.int64)
    loaded[[3, 4]] = 9
    ts.versions = loaded                            # what a snapshot load does
    assert ts.written_rows() == 2
    ts.apply(Delta("m", "t", np.array([4, 5]), np.array([10, 10]), None, np.ones(2, bool)))
    assert ts.written_rows() == 3


def test_latency_metric_names_follow_prometheus_conventions():
    text = DaemonMetrics().render().decode()
    hist = {f.name: f for f in text_string_to_metric_families(text) if f.type == "histogram"}
    assert {"ekko_publish_ack_seconds", "ekko_apply_seconds", "ekko_push_queue_wait_seconds",
            "ekko_freshness_lag_sampled_seconds"} <= hist.keys()
    for name in hist:
        assert name.endswith("_seconds")
    les = [s.labels["le"] for s in hist["ekko_publish_ack_seconds"].samples if s.name.endswith("_bucket")]
    assert [float(x) for x in les[:-1]] == list(LATENCY_BUCKETS_S) and les[-1] == "+Inf"
    assert re.search(r'ekko_apply_seconds_count\{source="pull"\} 0\.0', text)
