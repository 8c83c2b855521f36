"""Per-row popularity (AccessTracker) and how the Prioritizer uses it."""

import numpy as np
import pytest

from ekko.core.errors import UsageError
from prioritizer import Prioritizer, ThresholdTracker
from prioritizer.popularity import AccessTracker


def zipf_batches(rng, rows=2_000, s=1.05, n=200, batches=300):
    p = np.arange(1, rows + 1, dtype=np.float64) ** -s
    p /= p.sum()
    for _ in range(batches):
        yield np.unique(rng.choice(rows, size=n, p=p))


def test_factor_follows_update_rate_and_averages_one():
    a = AccessTracker(buckets=4096)
    rng = np.random.default_rng(0)
    for i, ids in enumerate(zipf_batches(rng)):
        f = a.observe("m", "t", ids, now=i * 0.1)
    # rank 1 (row 0) is updated in nearly every batch, rank 1000 rarely
    f0 = a.observe("m", "t", np.array([0, 999]), now=30.0)
    assert f0[0] > 20 * f0[1]
    # normalised by the mean over updates: a batch of typical updates averages about 1
    assert 0.3 < float(f.mean()) < 3.0


def test_rates_decay_with_half_life():
    a = AccessTracker(buckets=64, halflife_s=10.0)
    for t in range(10):
        a.observe("m", "t", np.array([1]), now=float(t))
    st = a._tables[("m", "t")]
    rate_now = st.counts[1] * 2.0 ** (-(9.0 - st.t_ref) / 10.0)
    expected = sum(2.0 ** (-(9 - t) / 10.0) for t in range(10))
    assert rate_now == pytest.approx(expected)
    # a long pause renormalises without overflow and keeps the decayed value
    f = a.observe("m", "t", np.array([1, 2]), now=1e5)
    assert np.isfinite(f).all() and f[0] == pytest.approx(f[1], rel=1e-6)


def test_memory_is_bounded_and_large_ids_hash():
    a = AccessTracker(buckets=1024)
    ids = np.array([5, 1 << 40, (1 << 46) + 3], np.int64)
    f = a.observe("m", "t", ids, now=0.0)
    assert f.shape == (3,) and np.isfinite(f).all()
    assert a._tables[("m", "t")].counts.shape == (1024,)
    assert a.observe("m", "t", np.zeros(0, np.int64), now=0.0).shape == (0,)
    with pytest.raises(UsageError):
        AccessTracker(buckets=1000)
    with pytest.raises(UsageError):
        AccessTracker(halflife_s=0)


def test_popular_rows_rank_above_equal_changes_to_cold_rows():
    rng = np.random.default_rng(2)
    p = Prioritizer(threshold=ThresholdTracker(5, rng=0))
    with_access = []
    for i, ids in enumerate(zipf_batches(rng, batches=200)):
        r = p.queued_rows("m", "t", ids, np.full(len(ids), i + 1), 256, now=i * 0.1,
                          impact=np.ones(len(ids), np.float32))
        with_access.append(r)
    last = with_access[-1]
    # equal magnitudes: only popularity separates rows, hot rows first
    hot = last.ids < 10
    assert hot.any() and last.scores[hot].min() > np.median(last.scores)
    assert last.high[last.ids < 3].all()
    # the paper's score alone (access=False) cannot tell them apart
    q = Prioritizer(access=False)
    r = q.queued_rows("m", "t", last.ids, last.versions, 256, now=0.0, impact=np.ones(len(last.ids), np.float32))
    assert np.unique(r.scores).size == 1


def test_new_row_bonus_only_where_impact_is_unknown():
    p = Prioritizer(access=False)
    ids = np.arange(4)
    imp = np.array([1.0, 1.0, np.nan, np.nan], np.float32)
    r = p.queued_rows("m", "t", ids, np.full(4, 9), 256, now=0.0, impact=imp, old_versions=np.array([0, 3, 0, 3]))
    # known impact: the first write scores like any other row of that magnitude;
    # unknown impact: p_g = 1, plus the bonus for the row never written
    assert r.scores[0] == r.scores[1]
    assert r.scores[2] == pytest.approx(r.scores[3] + 1.0)
    # explicit flags are taken as given
    r = p.queued_rows("m", "t", ids, np.full(4, 9), 256, now=0.0, impact=imp, is_new=np.array([1, 0, 0, 0], bool))
    assert r.scores[0] > r.scores[1]
    with pytest.raises(UsageError):
        p.queued_rows("m", "t", ids, np.full(4, 9), 256, now=0.0, impact=imp, old_versions=np.zeros(3))


def test_observers_see_every_classified_batch():
    p = Prioritizer()
    seen = []
    p.observers.append(lambda model, table, rows: seen.append((model, table, len(rows), rows.high.dtype)))
    p.queued_rows("m", "t", np.arange(3), np.ones(3), 8, now=0.0, impact=np.ones(3, np.float32))
    assert seen == [("m", "t", 3, np.dtype(bool))]
