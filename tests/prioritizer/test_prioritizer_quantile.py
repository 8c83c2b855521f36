"""The top-k% threshold: measured rank error on random streams against the documented bound.

Each check below asserts the bound at failure probability DELTA; a test makes
a few hundred checks, so by the union bound it would fail on fewer than 1 in
1000 random seeds.  Seeds are fixed, so the tests are deterministic.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from ekko.core.errors import UsageError
from prioritizer import EpochQuantile, ThresholdTracker, rank_error_bound
from prioritizer.quantile import MIN_EPOCH_SCORES

DELTA = 1e-6
SAMPLE, WINDOW = 4096, 32768


def feed(tracker, model, stream, rng, check):
    """Feed ``stream`` in random-sized batches, calling ``check()`` after each."""
    i = 0
    while i < stream.shape[0]:
        b = int(rng.choice([1, 17, 500, 3_000, 8_000, 20_000]))
        tracker.update(model, stream[i:i + b])
        i += b
        check(i)


@pytest.mark.parametrize("k", [1.0, 5.0, 20.0])
@pytest.mark.parametrize("dist", ["uniform", "pareto", "abs_cauchy"])
def test_rank_error_within_bound_on_stationary_streams(dist, k):
    rng = np.random.default_rng(int(k * 10) + len(dist))
    n = 400_000
    # streams and their exact CDFs
    if dist == "uniform":
        stream, cdf = rng.random(n), (lambda x: x)
    elif dist == "pareto":           # alpha 1.1: infinite variance
        stream, cdf = rng.pareto(1.1, n) + 1.0, (lambda x: 1.0 - x ** -1.1)
    else:                            # no mean at all
        stream, cdf = np.abs(rng.standard_cauchy(n)), (lambda x: 2.0 / math.pi * math.atan(x))
    stream = stream.astype(np.float32)
    tr = ThresholdTracker(k, sample_size=SAMPLE, window=WINDOW, rng=rng)
    errors = []

    def check(_):
        est = tr.estimator("m")
        if est.reference_size < 1_000:
            return
        th = tr.threshold("m")
        err = abs(cdf(float(th)) - (1.0 - k / 100.0))
        errors.append(err)
        assert err <= tr.error_bound("m", DELTA), (len(errors), err)

    feed(tr, "m", stream, rng, check)
    assert len(errors) > 40
    # and typically far inside the worst-case bound: about sqrt(k(1-k)/m)
    typical = math.sqrt(k / 100 * (1 - k / 100) / SAMPLE)
    assert float(np.median(errors)) < 4 * typical


@pytest.mark.parametrize("k", [5.0, 30.0])
def test_rank_error_within_bound_on_a_drifting_stream(k):
    """Mean moves by 1 sigma per 50k scores; the bound holds against the reference epoch."""
    rng = np.random.default_rng(7)
    n = 500_000
    stream = (rng.standard_normal(n) + np.arange(n) / 50_000).astype(np.float32)
    tr = ThresholdTracker(k, sample_size=SAMPLE, window=WINDOW, rng=rng)
    checks = []

    def check(_):
        est = tr.estimator("m")
        if est.epochs == 0:
            return
        ref = stream[(est.epochs - 1) * WINDOW: est.epochs * WINDOW]   # the last complete epoch
        th = tr.threshold("m")
        err = abs(float(np.mean(ref < th)) - (1.0 - k / 100.0))
        checks.append((err, th))
        assert err <= tr.error_bound("m", DELTA)

    feed(tr, "m", stream, rng, check)
    assert len(checks) > 30
    # the threshold follows the drift: near the end it sits about 10 sigma above the start
    assert checks[-1][1] - checks[0][1] > 7.0


def test_before_the_first_epoch_the_running_sample_is_used():
    rng = np.random.default_rng(3)
    tr = ThresholdTracker(10, sample_size=SAMPLE, window=WINDOW, rng=rng)
    x = rng.random(20_000).astype(np.float32)
    tr.update("m", x)
    assert tr.estimator("m").epochs == 0 and tr.estimator("m").reference_size == SAMPLE
    assert abs(float(tr.threshold("m")) - 0.9) <= tr.error_bound("m", DELTA)


def test_reservoir_is_uniform_over_the_epoch():
    """Inclusion frequency of each stream position: 10 of 100 kept, so 0.1 each."""
    rng = np.random.default_rng(11)
    trials, n, w = 3_000, 10, 100
    full = np.zeros(w)
    half = np.zeros(w // 2)
    for _ in range(trials):
        q = EpochQuantile(sample_size=n, window=w, rng=rng)
        cuts = np.sort(rng.choice(np.arange(1, w), 4, replace=False))
        parts = np.split(np.arange(w, dtype=np.float32), cuts)
        seen = 0
        for p in parts:
            if seen < w // 2 <= seen + p.shape[0]:
                q.update(p[: w // 2 - seen])
                half[q.sample().astype(int)] += 1            # mid-epoch: a sample of the first 50
                q.update(p[w // 2 - seen:])
            else:
                q.update(p)
            seen += p.shape[0]
        assert q.epochs == 1
        full[q.sample().astype(int)] += 1
    for counts, p in ((full, n / w), (half, n / (w // 2))):
        sigma = math.sqrt(trials * p * (1 - p))
        assert np.abs(counts - trials * p).max() < 5 * sigma


def test_time_window_closes_epochs_only_with_enough_scores():
    rng = np.random.default_rng(5)
    q = EpochQuantile(sample_size=256, window=1 << 20, window_s=1.0, rng=rng)
    q.update(rng.random(100), now=0.0)
    q.update(rng.random(100), now=5.0)          # a second passed, but too few scores
    assert q.epochs == 0
    q.update(rng.random(MIN_EPOCH_SCORES), now=5.5)
    q.update(rng.random(10) + 100, now=6.0)     # now it closes, before taking these in
    assert q.epochs == 1 and q.sample().max() < 1.0


def test_threshold_semantics():
    rng = np.random.default_rng(0)
    x = rng.random(10_000).astype(np.float32)
    assert not ThresholdTracker(5).is_high("never-seen", x).any()       # no history: nothing high
    none, every = ThresholdTracker(0, rng=rng), ThresholdTracker(100, rng=rng)
    none.update("m", x)
    every.update("m", x)
    assert not none.is_high("m", x).any() and every.is_high("m", x).all()
    # ties at the threshold are all high
    tied = ThresholdTracker(5, sample_size=1000, window=10_000, rng=rng)
    tied.update("m", np.r_[np.zeros(900), np.ones(100)].astype(np.float32))
    assert tied.is_high("m", np.array([0.0, 1.0], np.float32)).tolist() == [False, True]
    # models are independent
    tied.update("other", (x * 1000).astype(np.float32))
    assert tied.threshold("other") > 900 and tied.threshold("m") == 1.0
    # NaN scores are ignored by the history
    nan = ThresholdTracker(50, sample_size=100, window=1000, rng=rng)
    nan.update("m", np.array([np.nan, 1.0, 2.0, np.nan], np.float32))
    assert nan.estimator("m").reference_size == 2


def test_bound_formula_and_validation():
    assert rank_error_bound(0) == 1.0
    assert rank_error_bound(16384, 1e-6) == pytest.approx(math.sqrt(math.log(2e6) / 32768) + 1 / 16384)
    assert rank_error_bound(100, 1e-6) > rank_error_bound(10_000, 1e-6)
    with pytest.raises(UsageError):
        ThresholdTracker(101)
    with pytest.raises(UsageError):
        EpochQuantile(sample_size=10, window=5)
    with pytest.raises(UsageError):
        rank_error_bound(10, 0.0)


def test_same_seed_same_thresholds():
    x = np.random.default_rng(9).random(100_000).astype(np.float32)
    a, b = ThresholdTracker(5, rng=42), ThresholdTracker(5, rng=42)
    for i in range(0, x.shape[0], 7_000):
        a.update("m", x[i:i + 7_000])
        b.update("m", x[i:i + 7_000])
        assert a.threshold("m") == b.threshold("m")
