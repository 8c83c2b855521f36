"""PriorityLinkQueue and FifoBudgetQueue: coalescing, order, aging, budget, bound, metrics."""

from __future__ import annotations

import ast
import math
import pathlib

import numpy as np
import pytest

from ekko.core.errors import UsageError
from p2p.outbound import QueuedRows
from prioritizer import (FifoBudgetQueue, LinkBudgets, PriorityLinkQueue, QueueConfig, ThresholdTracker,
                         TokenBucket, fifo_queue_factory, priority_queue_factory)
from prioritizer.queue import LATENCY_BOUNDS_S

RB = 84            # value bytes: 100 wire bytes per row


def rows(ids, version=1, scores=None, high=None, model="m", table="t", row_bytes=RB):
    ids = np.asarray(ids, dtype=np.int64)
    vers = np.broadcast_to(np.asarray(version, dtype=np.int64), ids.shape).copy()
    sc = None if scores is None else np.broadcast_to(np.asarray(scores, np.float32), ids.shape).copy()
    hi = None if high is None else np.broadcast_to(np.asarray(high, bool), ids.shape).copy()
    return QueuedRows(model, table, ids, vers, row_bytes, scores=sc, high=hi)


def sent(frames):
    """[(id, version)] in frame order."""
    return [(int(i), int(v)) for f in frames for i, v in zip(f.ids, f.versions)]


def drain_ids(q, now, max_bytes=1 << 30):
    out = []
    while q.rows:
        got = q.take(now, max_bytes)
        assert got, "take returned nothing from a non-empty unlimited queue"
        out += [int(i) for f in got for i in f.ids]
    return out


# -- coalescing ------------------------------------------------------------------------------
def test_coalescing_keeps_latest_version_and_first_enqueue_time():
    q = PriorityLinkQueue()
    q.put(rows([1, 2], version=5, scores=1.0), now=0.0)
    q.put(rows([2, 3], version=9, scores=1.0), now=1.0)
    q.put(rows([1], version=3, scores=1.0), now=2.0)          # older version: ignored
    assert q.rows == 3 and q.stats().coalesced == 2
    frames = q.take(now=3.0, max_bytes=10_000)
    got = {int(i): (int(v), float(t)) for f in frames for i, v, t in zip(f.ids, f.versions, f.enqueued_at)}
    assert got == {1: (5, 0.0), 2: (9, 0.0), 3: (9, 1.0)}


def test_coalescing_keeps_greater_priority_either_way():
    # row 1 first high-scored then low-scored: stays ahead of row 2 (score 1)
    q = PriorityLinkQueue()
    q.put(rows([1], scores=50.0), now=0.0)
    q.put(rows([2], scores=1.0), now=0.0)
    q.put(rows([1], version=2, scores=0.01), now=0.0)
    assert [i for i, _ in sent(q.take(0.0, 100))] == [1]
    # and low first, then high: promoted ahead
    q = PriorityLinkQueue()
    q.put(rows([1], scores=0.01), now=0.0)
    q.put(rows([2], scores=1.0), now=0.0)
    q.put(rows([1], version=2, scores=50.0), now=0.0)
    f = q.take(0.0, 100)
    assert sent(f) == [(1, 2)] and f[0].scores.tolist() == [50.0]


def test_coalescing_high_flag_is_sticky_and_counted():
    q = PriorityLinkQueue()
    q.put(rows([1, 2], scores=1.0, high=False), now=0.0)
    q.put(rows([2], scores=1.0, high=True), now=0.0)
    st = q.stats()
    assert (st.rows_high, st.rows_low, st.bytes_high) == (1, 1, 100)
    q.put(rows([2], scores=1.0, high=False), now=0.0)       # does not demote
    assert q.stats().rows_high == 1


def test_duplicates_inside_one_batch_fold():
    q = PriorityLinkQueue()
    q.put(QueuedRows("m", "t", np.array([7, 7, 8, 7]), np.array([3, 9, 1, 4]), RB,
                     scores=np.array([0.1, 0.2, 0.3, 9.0], np.float32), high=np.array([False, False, False, True])),
          now=0.0)
    assert q.rows == 2 and q.stats().rows_high == 1
    f = q.take(0.0, 100)
    assert sent(f) == [(7, 9)] and f[0].scores.tolist() == [9.0] and f[0].high.tolist() == [True]


@pytest.mark.parametrize("make", [lambda: PriorityLinkQueue(), lambda: FifoBudgetQueue()])
def test_put_leaves_the_callers_arrays_alone(make):
    # the node puts one QueuedRows on every link's queue
    r = QueuedRows("m", "t", np.array([3, 3, 1, 2]), np.array([5, 9, 1, 1]), RB,
                   scores=np.array([0.5, np.nan, -1.0, 2.0], np.float32), high=np.array([False, True, False, False]))
    before = [a.copy() for a in (r.ids, r.versions, r.scores, r.high)]
    q1, q2 = make(), make()
    q1.put(r, now=0.0)
    q2.put(r, now=0.0)
    for a, b in zip((r.ids, r.versions, r.scores, r.high), before):
        np.testing.assert_array_equal(a, b)
    assert sorted(sent(q1.take(0.0, 10_000))) == sorted(sent(q2.take(0.0, 10_000))) == [(1, 1), (2, 1), (3, 9)]


def test_same_row_id_in_two_tables_is_two_rows():
    q = PriorityLinkQueue()
    q.put(rows([1], table="a"), now=0.0)
    q.put(rows([1], table="b"), now=0.0)
    assert q.rows == 2
    frames = q.take(0.0, 10_000)
    assert sorted((f.table, f.ids.tolist()) for f in frames) == [("a", [1]), ("b", [1])]


# -- order -----------------------------------------------------------------------------------
def test_high_before_low_whatever_the_scores():
    rng = np.random.default_rng(0)
    q = PriorityLinkQueue()
    # low rows with big scores (another model's scale), high rows with tiny ones
    q.put(rows(np.arange(0, 200), scores=rng.uniform(10, 1e4, 200), high=False, model="big"), now=0.0)
    q.put(rows(np.arange(1000, 1200), scores=rng.uniform(0, 0.01, 200), high=True, model="small"), now=0.1)
    order = drain_ids(q, now=0.2, max_bytes=1_000)
    assert set(order[:200]) == set(range(1000, 1200))
    assert set(order[200:]) == set(range(200))


def test_within_a_class_higher_score_first_and_threshold_classifies():
    tr = ThresholdTracker(k_percent=10, sample_size=1000, window=10_000, rng=0)
    scores = np.linspace(0.0, 10.0, 100, dtype=np.float32)
    tr.update("m", scores)
    q = PriorityLinkQueue(threshold=tr)
    q.put(rows(np.arange(100), scores=scores), now=0.0)        # high=None: the tracker decides
    st = q.stats()
    assert st.rows_high == 10
    order = drain_ids(q, now=0.0, max_bytes=100)
    assert order == list(range(99, -1, -1))


def test_high_reserve_lets_a_high_row_go_at_once():
    b = TokenBucket(rate_bytes_per_s=10_000, burst_bytes=10_000)
    q = PriorityLinkQueue(b, QueueConfig(high_reserve=0.25))
    q.put(rows(np.arange(500), scores=1.0, high=False), now=0.0)
    first = q.take(0.0, 1 << 20)
    assert sum(f.nbytes for f in first) == 7_500                  # burst minus the reserve
    assert q.take(0.0, 1 << 20) == []                             # low rows leave the reserve alone
    q.put(rows([9999], scores=0.5, high=True), now=0.0)
    assert q.next_ready(0.0) == 0.0
    assert sent(q.take(0.0, 1 << 20)) == [(9999, 1)]              # immediately
    # low rows wait until the bucket holds a row above the reserve again
    t = q.next_ready(0.0)
    assert t == pytest.approx((100 + 2_500 - 2_400) / 10_000)
    assert q.take(t - 1e-4, 1 << 20) == []
    assert len(sent(q.take(t, 1 << 20))) == 1


def test_aging_sends_a_low_row_under_a_constant_high_stream_within_the_bound():
    """A constant stream of high rows at twice the link rate, and one low row.

    The queue's documented bound: a row queued at t0 is overtaken only by rows
    queued before T = t0 + promote_after_s + aging_s, so at most
    Q0 + lam * (T - t0) bytes go before it, and the link sends R bytes/s.
    """
    R, burst, dt = 100_000.0, 20_000.0, 0.01
    cfg = QueueConfig(aging_s=1.0, promote_after_s=3.0, high_reserve=0.25, max_rows=1 << 22)
    q = PriorityLinkQueue(TokenBucket(R, burst), cfg)
    rng = np.random.default_rng(1)
    per_step = 20                                   # 20 rows * 100 B every 10 ms = 200 kB/s = 2R
    lam = per_step * 100 / dt
    next_id, now, t0, q0, sent_at = 0, 0.0, None, None, None
    while now < 40.0 and sent_at is None:
        q.put(rows(np.arange(next_id, next_id + per_step), scores=rng.uniform(0, 100, per_step), high=True),
              now)
        next_id += per_step
        if t0 is None and now >= 1.0:
            t0, q0 = now, q.queued_bytes
            q.put(rows([10 ** 9], scores=0.0, high=False), now)
        while True:
            got = q.take(now, int(burst))
            if not got:
                break
            if any(10 ** 9 in f.ids for f in got):
                sent_at = now
        now = round(now + dt, 9)
    T = t0 + cfg.promote_after_s + cfg.aging_s
    # + one step's arrivals (puts are discrete) and one frame of slack for the bucket granularity
    bound = t0 + (q0 + lam * (T - t0) + per_step * 100 + burst) / R + dt
    assert sent_at is not None, "the low row starved"
    assert sent_at <= bound
    # and it did wait behind the high rows for at least its head start minus aging
    assert sent_at - t0 >= cfg.promote_after_s - cfg.aging_s
    assert q.dropped == 0


# -- bound -------------------------------------------------------------------------------------
def test_bounded_memory_under_overload_drops_lowest_priority():
    cfg = QueueConfig(max_rows=1_000, drop_slack=0.1)
    q = PriorityLinkQueue(config=cfg)
    rng = np.random.default_rng(2)
    total = 0
    for i in range(30):
        q.put(rows(np.arange(total, total + 300), scores=rng.random(300), high=False), now=i * 0.01)
        total += 300
        assert q.rows <= cfg.max_rows
        assert q.rows + q.dropped == total
    # storage does not grow with the overload
    assert q._slots.cap <= 4 * cfg.max_rows and q._slots.index.capacity <= 16 * cfg.max_rows
    # high rows push out low ones, never the reverse
    q.put(rows(np.arange(10 ** 6, 10 ** 6 + 500), scores=0.0, high=True), now=1.0)
    st = q.stats()
    assert st.rows_high == 500 and st.dropped_rows_high == 0
    assert st.dropped_rows_low == q.dropped


def test_backlog_bytes_bound():
    q = PriorityLinkQueue(config=QueueConfig(max_backlog_bytes=50_000, drop_slack=0.0))
    q.put(rows(np.arange(400), scores=1.0), now=0.0)
    q.put(rows(np.arange(1000, 1100), scores=1.0, row_bytes=984, table="wide"), now=0.0)
    assert q.queued_bytes <= 50_000
    assert q.rows + q.dropped == 500


def test_fifo_bound_drops_oldest_or_newest():
    q = FifoBudgetQueue(max_rows=10, drop_slack=0.0)
    q.put(rows(np.arange(8)), now=0.0)
    q.put(rows(np.arange(8, 12)), now=1.0)
    assert q.rows == 10 and q.dropped == 2
    assert drain_ids(q, 2.0) == list(range(2, 12))
    q = FifoBudgetQueue(max_rows=10, drop_slack=0.0, drop="newest")
    q.put(rows(np.arange(8)), now=0.0)
    q.put(rows(np.arange(8, 12)), now=1.0)
    assert drain_ids(q, 2.0) == list(range(10))


# -- FIFO ------------------------------------------------------------------------------------
def test_fifo_order_ignores_scores_and_keeps_first_position():
    q = FifoBudgetQueue()
    q.put(rows([5, 6], scores=[0.0, 9.0], high=[False, True]), now=0.0)
    q.put(rows([7], scores=100.0, high=True), now=1.0)
    q.put(rows([5], version=4, scores=0.0), now=2.0)             # keeps its first place
    f = q.take(3.0, 10_000)
    assert sent(f) == [(5, 4), (6, 1), (7, 1)]
    assert f[0].enqueued_at.tolist() == [0.0, 0.0, 1.0]
    assert q.stats().sent_rows_high == 2                        # the class is still reported


# -- budget, next_ready, frames --------------------------------------------------------------
@pytest.mark.parametrize("make", [lambda b: PriorityLinkQueue(b), lambda b: FifoBudgetQueue(b)])
def test_bytes_taken_never_exceed_rate_times_time_plus_burst(make):
    rng = np.random.default_rng(3)
    R, burst = 50_000.0, 8_000.0
    q = make(TokenBucket(R, burst))
    log = []                                    # (time, bytes)
    now = 0.0
    for step in range(1500):
        now += float(rng.exponential(0.01))
        if rng.random() < 0.5:
            n = int(rng.integers(1, 40))
            rb = int(rng.choice([84, 484]))
            q.put(rows(rng.integers(0, 5_000, n), scores=rng.random(n), high=rng.random(n) < 0.2,
                       row_bytes=rb, table=f"t{rb}"), now)
        got = q.take(now, int(rng.choice([100, 1_000, 20_000])))
        if got:
            log.append((now, sum(f.nbytes for f in got)))
    t = np.array([x[0] for x in log])
    b = np.cumsum([x[1] for x in log])
    assert len(log) > 100 and b[-1] > 0.5 * R * now         # the link was busy
    for i in range(len(t)):
        # bytes in takes at times in [t_i, t_j], for every j >= i
        in_window = b[i:] - (b[i - 1] if i else 0)
        assert (in_window <= R * (t[i:] - t[i]) + burst + 1e-3).all()


def test_next_ready_is_when_take_succeeds():
    q = PriorityLinkQueue(TokenBucket(1_000, 1_000), QueueConfig(high_reserve=0.0))
    assert q.next_ready(0.0) is None
    q.put(rows(np.arange(30), scores=1.0, high=True), now=0.0)
    assert q.next_ready(0.0) == 0.0
    assert len(sent(q.take(0.0, 1 << 20))) == 10
    t = q.next_ready(0.0)
    assert t == pytest.approx(0.1)
    assert q.take(t - 1e-6, 1 << 20) == []
    assert len(sent(q.take(t, 1 << 20))) == 1


def test_next_ready_counts_promotion_of_a_low_row():
    # a low row that cannot use the reserve becomes high-ish at promote_after_s
    b = TokenBucket(1_000, 1_000)
    q = PriorityLinkQueue(b, QueueConfig(high_reserve=0.95, promote_after_s=5.0, aging_s=1.0))
    q.put(rows([1], scores=0.0, high=False), now=0.0)
    t = q.next_ready(0.0)
    assert t == pytest.approx(5.0)
    assert q.take(4.99, 1 << 20) == []
    assert sent(q.take(t, 1 << 20)) == [(1, 1)]


@pytest.mark.parametrize("t0", [0.0, 1e6, 3e7, 1e9])
def test_next_ready_promotion_instant_is_takeable_after_long_uptime(t0):
    # keys grow with time since the first put; the high-ish cut must stay rounding-safe
    q = PriorityLinkQueue(TokenBucket(1_000, 1_000), QueueConfig(high_reserve=0.95, promote_after_s=5.0,
                                                                 aging_s=1.0))
    q.put(rows([0], high=True), now=0.0)                         # fixes the key origin at 0
    assert sent(q.take(0.0, 1_000)) == [(0, 1)]
    q.put(rows([1], scores=0.3), now=t0)
    t = q.next_ready(t0)
    assert t0 < t <= t0 + 5.0
    assert sent(q.take(t, 1_000)) == [(1, 1)]


def test_unlimited_and_fifo_next_ready():
    q = FifoBudgetQueue()
    assert q.next_ready(3.0) is None
    q.put(rows([1]), now=0.0)
    assert q.next_ready(3.0) == 3.0


def test_frames_respect_max_bytes_but_carry_at_least_one_row():
    q = PriorityLinkQueue()
    q.put(rows(np.arange(50), scores=1.0), now=0.0)
    f = q.take(0.0, 1_050)
    assert sum(x.nbytes for x in f) == 1_000
    q2 = PriorityLinkQueue()
    q2.put(rows([1, 2], row_bytes=5_000), now=0.0)
    assert len(sent(q2.take(0.0, 100))) == 1                    # bigger than max_bytes: one row


def test_frames_group_tables_in_priority_order():
    q = PriorityLinkQueue()
    q.put(rows([1, 2], scores=[5.0, 0.1], table="a"), now=0.0)
    q.put(rows([3], scores=1.0, table="b", model="m2"), now=0.0)
    f = q.take(0.0, 10_000)
    assert [(x.model, x.table, x.ids.tolist()) for x in f] == [("m", "a", [1, 2]), ("m2", "b", [3])]


# -- metrics ---------------------------------------------------------------------------------
def test_latency_and_bytes_by_class():
    q = PriorityLinkQueue()
    q.put(rows([1], scores=1.0, high=True), now=0.0)
    q.put(rows([2, 3], scores=1.0, high=False), now=0.5)
    q.take(2.0, 10_000)
    st = q.stats()
    assert (st.sent_rows_high, st.sent_rows_low, st.sent_bytes_high, st.sent_bytes_low) == (1, 2, 100, 200)
    assert st.latency_sum_high == pytest.approx(2.0) and st.latency_sum_low == pytest.approx(3.0)
    assert st.latency_max_low == pytest.approx(1.5)
    assert sum(st.latency_counts_high) == 1 and sum(st.latency_counts_low) == 2
    assert st.latency_quantile(0.5, high=False) == 2.0          # the bucket holding 1.5 s
    assert len(st.latency_counts_high) == len(LATENCY_BOUNDS_S) + 1
    assert math.isnan(PriorityLinkQueue().stats().latency_quantile(0.5))


# -- misuse ----------------------------------------------------------------------------------
def test_rejects_bad_input():
    q = PriorityLinkQueue(TokenBucket(1_000, 500))
    with pytest.raises(UsageError):
        q.put(rows([1], row_bytes=1_000), now=0.0)               # can never fit the burst
    with pytest.raises(UsageError):
        q.put(rows([-1]), now=0.0)
    with pytest.raises(UsageError):
        q.put(QueuedRows("m", "t", np.array([1, 2]), np.array([1]), RB), now=0.0)
    q.put(rows([1], row_bytes=RB), now=0.0)
    with pytest.raises(UsageError):
        q.put(rows([2], row_bytes=RB + 1), now=0.0)              # a table's row size is fixed
    for bad in (dict(max_rows=0), dict(aging_s=0), dict(high_reserve=1.0), dict(drop_slack=1.0),
                dict(score_scale=0)):
        with pytest.raises(UsageError):
            QueueConfig(**bad)


def test_nan_and_negative_scores_are_zero():
    q = PriorityLinkQueue()
    q.put(rows([1, 2, 3], scores=[np.nan, -5.0, 0.5]), now=0.0)
    assert drain_ids(q, 0.0, 100)[0] == 3


# -- wiring ----------------------------------------------------------------------------------
def test_factories_give_each_link_its_budget():
    lb = LinkBudgets.from_capacity({("us", "eu"): 1e9}, update_share=0.2)
    pq = priority_queue_factory("us", lb)("peer-1", "eu")
    fq = fifo_queue_factory("us", lb)("peer-2", "ap")
    assert pq.bucket.rate == 25e6 and fq.bucket.rate == lb.default_bytes_per_s
    for q in (pq, fq):
        for attr in ("put", "take", "next_ready", "rows", "dropped"):
            assert hasattr(q, attr)


def test_prioritizer_package_is_sans_io():
    """No clock, sleep, global randomness, sockets or asyncio in the scheduler."""
    banned = {"time", "random", "asyncio", "socket", "aiohttp", "threading", "datetime"}
    root = pathlib.Path(__file__).resolve().parents[2] / "prioritizer"
    for path in root.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module.split(".")[0]]
            assert not banned.intersection(names), f"{path.name} imports {banned.intersection(names)}"
        assert "np.random.default_rng()" not in path.read_text().replace(" ", "")
