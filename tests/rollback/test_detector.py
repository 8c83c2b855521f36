"""QualityDetector: measured detection delay and false-alarm rate, plus behaviour tests.

Traffic model the measurements assume (stated so the figures can be judged):

* the metric is a CTR around ``P0 = 4 %`` with a +-20 % diurnal swing (period one
  day of one-minute windows) that moves online and baseline alike;
* one window = one minute; the online model serves ``N_ONLINE`` = 2 M impressions per
  window (about 33 k impressions/s) times a per-window traffic factor drawn
  uniformly in [0.8, 1.2]; the baseline takes 1 % of that (about 20 k impressions);
* clicks are binomial, so a window's CTR has its real sampling noise: the
  baseline's dominates, ``sqrt(p (1 - p) / 20 000) ~ 0.0014``, and a 5 % relative
  degradation of the online CTR (0.04 -> 0.038) is about 1.44 standard deviations
  of one window's online - baseline difference;
* inference reports one baseline and one online sample per window, so one window
  is two ``observe`` calls ("samples").

Run with ``pytest -s`` to see the figures.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from ekko.core.errors import UsageError
from rollback.detector import (LOWER_IS_BETTER, DetectorConfig, ModelState, QualityDetector, alarm_threshold,
                               cusum_arl)

P0 = 0.04
N_ONLINE = 2_000_000
BASELINE_SHARE = 0.01
WINDOW_S = 60.0
DIURNAL_WINDOWS = 1440
#: the degradation the detection test injects (relative drop of the online CTR).
DEGRADATION = 0.05
#: clean windows after warm-up before the degradation starts.
CLEAN_BEFORE = 30
#: detection bounds, in windows after the first degraded window (2 samples per window).
#: Siegmund's ARL at k = 0.5, h = 14 and a 1.44 sigma shift is 15.6 windows.
MEDIAN_DELAY_BOUND = 20
MAX_DELAY_BOUND = 45
DETECTION_TRIALS = 200
CLEAN_SEEDS = 1000
CLEAN_WINDOWS = 1000
MAX_FALSE_ALARM_RATE = 0.01


def ctr_streams(seed: int, trials: int, windows: int, degrade_at: int | None = None,
                rel: float = DEGRADATION) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-window online/baseline CTRs and impression counts, shape (trials, windows)."""
    rng = np.random.default_rng(seed)
    t = np.arange(windows)
    phase = rng.uniform(0, 2 * np.pi, (trials, 1))
    p = P0 * (1 + 0.2 * np.sin(2 * np.pi * t / DIURNAL_WINDOWS + phase))
    traffic = rng.uniform(0.8, 1.2, (trials, windows))
    n_on = np.round(N_ONLINE * traffic).astype(np.int64)
    n_base = np.round(N_ONLINE * BASELINE_SHARE * traffic).astype(np.int64)
    p_on = p.copy()
    if degrade_at is not None:
        p_on[:, degrade_at:] *= 1 - rel
    return rng.binomial(n_on, p_on) / n_on, n_on, rng.binomial(n_base, p) / n_base, n_base


def run_stream(det: QualityDetector, v_on, n_on, v_base, n_base, model: str = "m"):
    """Feed one stream; returns (first CORRUPTED window, first UNCERTAIN window), None when never."""
    first_uncertain = None
    for w in range(len(v_on)):
        det.observe(model, "baseline", "ctr", float(v_base[w]), int(n_base[w]), now=WINDOW_S * w)
        change = det.observe(model, "online", "ctr", float(v_on[w]), int(n_on[w]), now=WINDOW_S * w)
        if change is not None:
            if change.new is ModelState.UNCERTAIN and first_uncertain is None:
                first_uncertain = w
            if change.new is ModelState.CORRUPTED:
                return w, first_uncertain
    return None, first_uncertain


def test_detects_5pct_degradation_within_bound():
    cfg = DetectorConfig()
    start = cfg.warmup_windows + CLEAN_BEFORE
    v_on, n_on, v_base, n_base = ctr_streams(1, DETECTION_TRIALS, start + 4 * MAX_DELAY_BOUND, degrade_at=start)
    delays, warn_delays, early = [], [], 0
    for i in range(DETECTION_TRIALS):
        alarm, warn = run_stream(QualityDetector(cfg), v_on[i], n_on[i], v_base[i], n_base[i])
        assert alarm is not None, f"trial {i}: never flagged"
        if alarm < start:
            early += 1
            continue
        delays.append(alarm - start + 1)
        if warn is not None and warn >= start:
            warn_delays.append(warn - start + 1)
    d = np.array(delays)
    shift = DEGRADATION * P0 / math.sqrt(P0 * (1 - P0) * (1 / (N_ONLINE * BASELINE_SHARE) + 1 / N_ONLINE))
    print(f"\n[detector] {DEGRADATION:.0%} CTR drop ({shift:.2f} sigma/window), {DETECTION_TRIALS} trials: "
          f"windows to CORRUPTED median {np.median(d):.0f}, p90 {np.percentile(d, 90):.0f}, max {d.max()}, "
          f"min {d.min()} (x2 samples; Siegmund ARL {cfg.arl(cfg.h_alarm, shift):.1f}); "
          f"to UNCERTAIN median {np.median(warn_delays):.0f}; alarms before injection: {early}")
    assert early == 0
    assert np.median(d) <= MEDIAN_DELAY_BOUND
    assert d.max() <= MAX_DELAY_BOUND


def test_false_alarm_rate_on_clean_streams():
    cfg = DetectorConfig()
    windows = cfg.warmup_windows + CLEAN_WINDOWS
    alarms = uncertain = 0
    batch = 200
    for b in range(CLEAN_SEEDS // batch):
        v_on, n_on, v_base, n_base = ctr_streams(1000 + b, batch, windows)
        for i in range(batch):
            alarm, warn = run_stream(QualityDetector(cfg), v_on[i], n_on[i], v_base[i], n_base[i])
            alarms += alarm is not None
            uncertain += warn is not None
    rate = alarms / CLEAN_SEEDS
    print(f"\n[detector] clean streams: {alarms}/{CLEAN_SEEDS} reached CORRUPTED within {CLEAN_WINDOWS} windows "
          f"after warm-up (rate {rate:.2%}; ideal known-sigma ARL0 {cfg.arl(cfg.h_alarm):.3g} windows); "
          f"{uncertain}/{CLEAN_SEEDS} touched UNCERTAIN (ARL0 at h_warn {cfg.arl(cfg.h_warn):.3g})")
    assert rate < MAX_FALSE_ALARM_RATE


def test_warmup_never_alarms_then_catches_a_model_bad_from_the_start():
    cfg = DetectorConfig()
    v_on, n_on, v_base, n_base = ctr_streams(5, 1, cfg.warmup_windows + 60, degrade_at=0, rel=0.2)
    det = QualityDetector(cfg)
    states = []
    for w in range(v_on.shape[1]):
        det.observe("m", "baseline", "ctr", float(v_base[0, w]), int(n_base[0, w]), now=WINDOW_S * w)
        det.observe("m", "online", "ctr", float(v_on[0, w]), int(n_on[0, w]), now=WINDOW_S * w)
        states.append(det.state("m"))
    assert all(s is ModelState.WARMUP for s in states[:cfg.warmup_windows - 1])
    # Successive differences ignore the constant offset, so the noise scale is not inflated by it.
    assert states[-1] is ModelState.CORRUPTED


def test_recovers_to_healthy_when_the_statistic_decays():
    cfg = DetectorConfig()
    start = cfg.warmup_windows + 10
    v_on, n_on, v_base, n_base = ctr_streams(9, 1, start + 300, degrade_at=start)
    # the degradation is fixed (rolled back) 60 windows after it began; same seed = same
    # diurnal phase and traffic, only the online clicks are drawn without the drop
    clean_on, _, _, _ = ctr_streams(9, 1, start + 300)
    v_on[0, start + 60:] = clean_on[0, start + 60:]
    det = QualityDetector(cfg)
    changes = []
    for w in range(v_on.shape[1]):
        det.observe("m", "baseline", "ctr", float(v_base[0, w]), int(n_base[0, w]), now=WINDOW_S * w)
        c = det.observe("m", "online", "ctr", float(v_on[0, w]), int(n_on[0, w]), now=WINDOW_S * w)
        if c:
            changes.append((w, c.new))
    seq = [s for _, s in changes]
    assert seq[:2] == [ModelState.HEALTHY, ModelState.UNCERTAIN] and ModelState.CORRUPTED in seq
    assert seq[-1] is ModelState.HEALTHY
    healed = changes[-1][0] - (start + 60)
    expected = (cfg.cusum_cap - cfg.h_clear) / cfg.k
    print(f"\n[detector] back to HEALTHY {healed} windows after the fix ((cap - h_clear) / k = {expected:.0f})")
    fastest = (cfg.cusum_cap - cfg.h_clear) / (cfg.z_clip + cfg.k)   # every window at -z_clip
    assert fastest <= healed <= expected * 1.5


def test_lower_is_better_metric_and_direction():
    cfg = DetectorConfig(metrics={"loss": LOWER_IS_BETTER}, warmup_windows=20)
    rng = np.random.default_rng(3)
    det = QualityDetector(cfg)
    for w in range(20 + 10):
        det.observe("m", "baseline", "loss", 0.5 + rng.normal(0, 0.01), 1000, now=w)
        det.observe("m", "online", "loss", 0.5 + rng.normal(0, 0.001), 100_000, now=w)
    assert det.state("m") is ModelState.HEALTHY
    # an improvement (lower loss) must not alarm
    for w in range(30, 200):
        det.observe("m", "baseline", "loss", 0.5 + rng.normal(0, 0.01), 1000, now=w)
        det.observe("m", "online", "loss", 0.45 + rng.normal(0, 0.001), 100_000, now=w)
    assert det.state("m") is ModelState.HEALTHY
    for w in range(200, 260):
        det.observe("m", "baseline", "loss", 0.5 + rng.normal(0, 0.01), 1000, now=w)
        det.observe("m", "online", "loss", 0.52 + rng.normal(0, 0.001), 100_000, now=w)
    assert det.state("m") is ModelState.CORRUPTED
    snap = det.snapshot()["m"]
    assert snap["state"] == "corrupted" and snap["metrics"]["loss"]["relative_degradation"] > 0.02


def test_pairing_pools_by_count_and_drops_stale_samples():
    cfg = DetectorConfig(warmup_windows=3, max_skew_s=100.0)
    det = QualityDetector(cfg)
    # online reports 4x as often as baseline: four samples pool into one window
    for k in range(4):
        det.observe("m", "online", "ctr", 0.04, 1000, now=float(k))
    assert det.snapshot()["m"]["metrics"]["ctr"]["windows"] == 0
    det.observe("m", "baseline", "ctr", 0.04, 100, now=4.0)
    assert det.snapshot()["m"]["metrics"]["ctr"]["windows"] == 1
    # a lone baseline sample older than max_skew_s is dropped, not paired with a much later online one
    det.observe("m", "baseline", "ctr", 0.01, 100, now=10.0)
    det.observe("m", "online", "ctr", 0.04, 1000, now=500.0)
    assert det.snapshot()["m"]["metrics"]["ctr"]["windows"] == 1


def test_reset_and_bad_input():
    det = QualityDetector(DetectorConfig(warmup_windows=3))
    with pytest.raises(UsageError):
        det.observe("m", "shadow", "ctr", 0.1, 10, now=0.0)
    with pytest.raises(UsageError):
        det.observe("m", "online", "latency_p99", 0.1, 10, now=0.0)
    with pytest.raises(UsageError):
        det.observe("m", "online", "ctr", float("nan"), 10, now=0.0)
    with pytest.raises(UsageError):
        det.observe("m", "online", "ctr", 0.1, 0, now=0.0)
    with pytest.raises(UsageError):
        DetectorConfig(h_warn=20.0, h_alarm=10.0)
    assert det.state("never-seen") is ModelState.WARMUP
    rng = np.random.default_rng(0)
    for w in range(40):
        det.observe("m", "baseline", "ctr", 0.04 + rng.normal(0, 0.001), 10_000, now=w)
        det.observe("m", "online", "ctr", (0.04 if w < 3 else 0.03) + rng.normal(0, 0.001), 10_000, now=w)
    assert det.state("m") is ModelState.CORRUPTED
    det.reset("m")
    assert det.state("m") is ModelState.HEALTHY and det.snapshot()["m"]["metrics"]["ctr"]["cusum"] == 0.0


def test_arl_helpers_match_the_documented_table():
    assert round(cusum_arl(0.5, 5.0)) == 938          # textbook value (Montgomery): 938
    assert cusum_arl(0.5, 14.0) > 5e6
    assert 14 < cusum_arl(0.5, 14.0, shift=1.44) < 17
    h = alarm_threshold(1e6, 0.5)
    assert math.isclose(cusum_arl(0.5, h), 1e6, rel_tol=1e-6)
