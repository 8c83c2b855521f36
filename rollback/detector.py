"""The model-state manager's anomaly detector: online vs baseline, CUSUM.

Every replica serves two copies of a model: the *online* one, updated within
seconds, and a *baseline* whose parameters are a few minutes old and which
takes a small slice (< 1 %) of the traffic.  Inference reports quality samples
for both (a CTR or AUC over ``count`` impressions, a loss over ``count``
examples ...).  A harmful update shows up as the online model doing worse than
its own recent past, the baseline; a change of the traffic itself (time of day,
a campaign) moves both and cancels out in the difference.

The statistic, per (model, metric):

1. **Pairing.**  Online and baseline samples are pooled, weighted by
   ``count``, until both sides hold at least ``min_count``; then one *window*
   is closed.  Each side's pooled value is a count-weighted mean.  A side whose
   pending samples are older than ``max_skew_s`` is dropped, so a window never
   compares two far-apart stretches of time.
2. **Orientation and count normalisation.**  ``x = s * (online - baseline)``
   with ``s = +1`` when higher is worse (a loss), ``-1`` when lower is worse
   (CTR, AUC): ``x > 0`` always means "online is worse".  The variance of a
   window mean over ``n`` events is ``sigma_1**2 / n`` (binomial CTR: ``sigma_1
   = sqrt(p (1 - p))``), so ``Var(x) = sigma_1**2 * (1/n_online + 1/n_base)``
   and ``u = x / sqrt(1/n_online + 1/n_base)`` has the per-event scale
   ``sigma_1`` whatever the window sizes.
3. **Robust noise scale.**  ``sigma_1`` is learnt from *successive
   differences* of ``u``: ``E[(u_t - u_{t-1})**2] / 2 = sigma_1**2`` for any
   constant mean, so a degradation (a level shift in ``u``) does not inflate
   the noise estimate and mask itself; it costs one outlying difference, which
   is clipped.  During the warm-up the estimate is a trimmed mean over all
   warm-up windows (differences beyond ``TRIM_MADS`` robust deviations are
   dropped); afterwards an EWMA with weight ``noise_alpha`` follows slow
   changes, updated only while the model is HEALTHY and with each difference
   clipped at ``z_clip`` standard deviations.
4. **Standardise and clip.**  ``z = clip(u / sigma_1, -z_clip, z_clip)``:
   one bad window (a logging glitch) moves the statistic by at most
   ``z_clip - k``.
5. **One-sided CUSUM** (Page 1954): ``S = min(cusum_cap, max(0, S + z - k))``
   with ``k = design_shift / 2``.  It is the quickest detector of a step change
   of ``design_shift`` standard deviations for a given false-alarm rate
   (Lorden 1971).  ``z`` is fed to it directly, not an EWMA of it: smoothing
   first would correlate the inputs and void the ARL relationship below that
   the thresholds are chosen by.  An EWMA of ``x`` is kept for the status view
   (the estimated effect size), not for the decision.
6. **States, with hysteresis.**  ``S >= h_warn`` -> UNCERTAIN, ``S >= h_alarm``
   -> CORRUPTED; either returns to HEALTHY only once ``S <= h_clear``.  A
   CORRUPTED model stays CORRUPTED until the statistic has decayed (after a
   rollback the windows are clean again and ``S`` falls by about ``k`` per
   window; ``cusum_cap`` bounds how long that takes).  A model's state is the
   worst over its metrics.  Before its warm-up is complete a metric is in
   WARMUP and never alarms.

Choosing the parameters (the standard CUSUM average-run-length relationship,
Siegmund's approximation, :func:`cusum_arl`)::

    ARL(shift) ~= (exp(-2 D b) + 2 D b - 1) / (2 D**2),  D = shift - k,
                                                         b = h + 1.166

``ARL(0)`` is the mean number of clean windows between false alarms and
``ARL(shift)`` the mean detection delay in windows.  With ``k = 0.5``:
``h = 8`` gives ARL(0) ~ 19 000 windows (UNCERTAIN now and then),
``h = 14`` gives ~ 7.7 million (a false CORRUPTED about once in 15 years of
one-minute windows per metric, before noise-estimate error; the tests measure
it with the estimate learnt from data); a 1.44 sigma shift is then found in
about 16 windows.  To detect a smaller shift pick ``design_shift`` near it
(``k`` = half of it) and raise ``h`` to keep ARL(0): :func:`alarm_threshold`
solves for ``h``.  ``warmup_windows`` sets how well ``sigma_1`` is known: the
successive-difference estimate has a relative error of about
``1 / sqrt(warmup_windows)``; an underestimate inflates every ``z``, so keep it
at 50 or more.  Each monitored metric adds its own false-alarm chances (the
model state is the worst of them).

Example:
    >>> det = QualityDetector(DetectorConfig(warmup_windows=3))
    >>> for t in range(4):
    ...     _ = det.observe("ranker", "baseline", "ctr", 0.0400 + 0.0001 * (t % 2), 10_000, now=60.0 * t)
    ...     change = det.observe("ranker", "online", "ctr", 0.0400 + 0.0001 * (t % 3), 1_000_000, now=60.0 * t)
    >>> det.state("ranker")
    <ModelState.HEALTHY: 'healthy'>
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from ekko.core.errors import UsageError

#: metric direction: larger values are better (CTR, AUC); a drop is a degradation.
HIGHER_IS_BETTER = "higher_is_better"
#: metric direction: smaller values are better (log loss, latency); a rise is a degradation.
LOWER_IS_BETTER = "lower_is_better"
#: the two variants inference reports.
VARIANTS = ("online", "baseline")
#: Siegmund's correction to the CUSUM threshold in the ARL approximation.
SIEGMUND_CORRECTION = 1.166
#: warm-up trimming: successive differences beyond this many robust (MAD) deviations
#: are left out of the initial noise estimate.
TRIM_MADS = 5.0
#: MAD -> standard deviation for a normal distribution.
MAD_TO_SIGMA = 1.4826
#: floor on the per-event noise scale, so identical online and baseline streams do not
#: divide by zero; any real metric's noise is far above it.
MIN_UNIT_SIGMA = 1e-12

DEFAULT_METRICS: Mapping[str, str] = {
    "ctr": HIGHER_IS_BETTER, "auc": HIGHER_IS_BETTER, "logloss": LOWER_IS_BETTER, "loss": LOWER_IS_BETTER,
}


class ModelState(str, enum.Enum):
    """Health of a model as the detector sees it (ordered by severity)."""

    WARMUP = "warmup"
    HEALTHY = "healthy"
    UNCERTAIN = "uncertain"
    CORRUPTED = "corrupted"

    @property
    def severity(self) -> int:
        return _SEVERITY[self]


_SEVERITY = {ModelState.WARMUP: 0, ModelState.HEALTHY: 1, ModelState.UNCERTAIN: 2, ModelState.CORRUPTED: 3}


def cusum_arl(k: float, h: float, shift: float = 0.0) -> float:
    """Siegmund's approximation of a one-sided CUSUM's average run length, in windows.

    Args:
        k: reference value (allowance), in standard deviations.
        h: decision threshold, in standard deviations.
        shift: true mean of the standardised input (0 = in control).

    Example:
        >>> round(cusum_arl(0.5, 5.0))
        938
        >>> round(cusum_arl(0.5, 14.0, shift=1.44), 1)
        15.6
    """
    d = shift - k
    b = h + SIEGMUND_CORRECTION
    if abs(d) < 1e-9:
        return b * b
    return (math.exp(-2.0 * d * b) + 2.0 * d * b - 1.0) / (2.0 * d * d)


def alarm_threshold(arl0: float, k: float) -> float:
    """The CUSUM threshold ``h`` whose in-control ARL is ``arl0`` windows (bisection).

    Example:
        >>> round(alarm_threshold(7.7e6, 0.5), 1)
        14.0
    """
    if arl0 <= 1 or k <= 0:
        raise UsageError("alarm_threshold needs arl0 > 1 and k > 0")
    lo, hi = 0.0, 1.0
    while cusum_arl(k, hi) < arl0:
        hi *= 2.0
    for _ in range(100):
        mid = (lo + hi) / 2.0
        lo, hi = (mid, hi) if cusum_arl(k, mid) < arl0 else (lo, mid)
    return hi


@dataclass(frozen=True, slots=True)
class DetectorConfig:
    """Every knob of :class:`QualityDetector`; see the module docstring for how to choose them.

    Attributes:
        metrics: metric name -> :data:`HIGHER_IS_BETTER` or :data:`LOWER_IS_BETTER`.
            A sample of a metric not listed is refused (:class:`UsageError`): guessing a
            direction would alarm on improvements.
        warmup_windows: windows used to learn the noise scale before any alarm.
        design_shift: the degradation, in standard deviations of one window's
            difference, that the CUSUM is tuned to find fastest; ``k = design_shift / 2``.
        h_warn: CUSUM level for UNCERTAIN (standard deviations).
        h_alarm: CUSUM level for CORRUPTED.
        h_clear: level at or below which UNCERTAIN/CORRUPTED return to HEALTHY.
        cusum_cap: ceiling on the statistic, so that recovery after a long bad spell
            takes at most ``(cusum_cap - h_clear) / k`` clean windows.
        z_clip: standardised inputs (and noise-update differences) are clipped here.
        noise_alpha: EWMA weight of the post-warm-up noise update (memory about
            ``1 / noise_alpha`` windows).
        effect_alpha: EWMA weight of the reported effect size (status only).
        min_count: events (impressions, examples) each side must pool before a window closes.
        max_skew_s: pending samples older than this (seconds) are dropped unpaired.
        count_weighting: scale the difference by ``sqrt(1/n_online + 1/n_base)``
            (the metric's window variance is ~ 1 / count); False treats every window alike.
    """

    metrics: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_METRICS))
    warmup_windows: int = 50
    design_shift: float = 1.0
    h_warn: float = 8.0
    h_alarm: float = 14.0
    h_clear: float = 2.0
    cusum_cap: float = 21.0
    z_clip: float = 5.0
    noise_alpha: float = 0.02
    effect_alpha: float = 0.1
    min_count: float = 1.0
    max_skew_s: float = 300.0
    count_weighting: bool = True

    def __post_init__(self) -> None:
        for name, direction in self.metrics.items():
            if direction not in (HIGHER_IS_BETTER, LOWER_IS_BETTER):
                raise UsageError(f"metric {name!r}: direction must be {HIGHER_IS_BETTER!r} or {LOWER_IS_BETTER!r}")
        if not isinstance(self.warmup_windows, int) or self.warmup_windows < 3:
            raise UsageError("warmup_windows must be an int >= 3 (differences need a few windows)")
        if not self.design_shift > 0:
            raise UsageError("design_shift must be > 0")
        if not 0 <= self.h_clear < self.h_warn <= self.h_alarm <= self.cusum_cap:
            raise UsageError("need 0 <= h_clear < h_warn <= h_alarm <= cusum_cap")
        if not self.z_clip > self.design_shift / 2:
            raise UsageError("z_clip must exceed k = design_shift / 2")
        for name in ("noise_alpha", "effect_alpha"):
            if not 0 < getattr(self, name) <= 1:
                raise UsageError(f"{name} must be in (0, 1]")
        if not self.min_count > 0 or not self.max_skew_s > 0:
            raise UsageError("min_count and max_skew_s must be > 0")

    @property
    def k(self) -> float:
        """CUSUM reference value (allowance), standard deviations."""
        return self.design_shift / 2.0

    def arl(self, h: float, shift: float = 0.0) -> float:
        """:func:`cusum_arl` at this config's ``k``."""
        return cusum_arl(self.k, h, shift)


@dataclass(frozen=True, slots=True)
class StateChange:
    """A model moved between states.

    Attributes:
        model: the model.
        old, new: states before and after.
        at: the ``now`` of the sample that moved it.
        metric: the metric whose window caused it.
        statistic: that metric's CUSUM value after the window.
        effect: EWMA relative degradation of that metric (0.05 = online 5 % worse).
    """

    model: str
    old: ModelState
    new: ModelState
    at: float
    metric: str
    statistic: float
    effect: float


class _Side:
    """Pending, not yet paired samples of one variant."""

    __slots__ = ("sum_vc", "sum_c", "since")

    def __init__(self) -> None:
        self.sum_vc = 0.0
        self.sum_c = 0.0
        self.since = 0.0

    def clear(self) -> None:
        self.sum_vc = 0.0
        self.sum_c = 0.0


class _Track:
    """CUSUM state of one (model, metric)."""

    __slots__ = ("sign", "online", "baseline", "windows", "warm_u", "sigma", "last_u", "s", "state",
                 "effect_x", "level", "z_last")

    def __init__(self, sign: float) -> None:
        self.sign = sign
        self.online = _Side()
        self.baseline = _Side()
        self.windows = 0
        self.warm_u: list[float] | None = []
        self.sigma = 0.0
        self.last_u: float | None = None
        self.s = 0.0
        self.state = ModelState.WARMUP
        self.effect_x = 0.0
        self.level = 0.0
        self.z_last = 0.0


class _Model:
    __slots__ = ("tracks", "state", "since")

    def __init__(self, now: float) -> None:
        self.tracks: dict[str, _Track] = {}
        self.state = ModelState.WARMUP
        self.since = now


class QualityDetector:
    """Online-vs-baseline anomaly detector for every model on a replica (sans-IO).

    Feed it every quality sample inference reports; it returns a
    :class:`StateChange` when a model's state moves.  Time is an argument.

    Args:
        config: a :class:`DetectorConfig` (default: CTR/AUC/loss metrics, k = 0.5,
            h_warn = 8, h_alarm = 14, 50 warm-up windows).

    Example:
        >>> import random
        >>> rng = random.Random(7)
        >>> det = QualityDetector(DetectorConfig(warmup_windows=20))
        >>> def window(t, online_ctr):
        ...     det.observe("m", "baseline", "ctr", rng.gauss(0.04, 0.002), 10_000, now=t)
        ...     return det.observe("m", "online", "ctr", rng.gauss(online_ctr, 0.0002), 1_000_000, now=t)
        >>> changes = [window(t, 0.04) for t in range(100)]
        >>> det.state("m").value
        'healthy'
        >>> changes = [c for c in (window(t, 0.036) for t in range(100, 200)) if c]
        >>> [c.new.value for c in changes]
        ['uncertain', 'corrupted']
    """

    def __init__(self, config: DetectorConfig | None = None) -> None:
        self.config = config or DetectorConfig()
        self._models: dict[str, _Model] = {}

    # -- input ----------------------------------------------------------------------------
    def observe(self, model: str, variant: str, metric: str, value: float, count: float,
                now: float) -> StateChange | None:
        """Take one quality sample; returns the model's state change, if any.

        Args:
            model: model name.
            variant: ``"online"`` or ``"baseline"``.
            metric: a metric named in the config.
            value: the metric over the sample (a mean over ``count`` events).
            count: events behind ``value`` (> 0); the weight of the sample.
            now: current time, seconds.
        """
        cfg = self.config
        if variant != "online" and variant != "baseline":
            raise UsageError(f"variant must be 'online' or 'baseline', got {variant!r}")
        if not (isinstance(value, (int, float)) and math.isfinite(value)):
            raise UsageError(f"{model}/{metric}: value must be a finite number, got {value!r}")
        if not (isinstance(count, (int, float)) and math.isfinite(count) and count > 0):
            raise UsageError(f"{model}/{metric}: count must be a positive number, got {count!r}")
        direction = cfg.metrics.get(metric)
        if direction is None:  # checked before any state is created: a refused sample changes nothing
            raise UsageError(f"metric {metric!r} has no direction in DetectorConfig.metrics")
        m = self._models.get(model)
        if m is None:
            m = self._models[model] = _Model(now)
        tr = m.tracks.get(metric)
        if tr is None:
            tr = m.tracks[metric] = _Track(1.0 if direction == LOWER_IS_BETTER else -1.0)

        on, base = tr.online, tr.baseline
        horizon = now - cfg.max_skew_s
        if on.sum_c and on.since < horizon:
            on.clear()
        if base.sum_c and base.since < horizon:
            base.clear()
        side = on if variant == "online" else base
        if not side.sum_c:
            side.since = now
        side.sum_vc += value * count
        side.sum_c += count
        if on.sum_c < cfg.min_count or base.sum_c < cfg.min_count:
            return None
        n_on, n_base = on.sum_c, base.sum_c
        v_on, v_base = on.sum_vc / n_on, base.sum_vc / n_base
        on.clear()
        base.clear()
        self._window(tr, v_on, v_base, n_on, n_base)
        return self._update_model(model, m, metric, tr, now)

    def reset(self, model: str) -> None:
        """Zero every CUSUM of a model (after a rollback was verified); keeps the noise scale."""
        m = self._models.get(model)
        if m is None:
            return
        for tr in m.tracks.values():
            tr.s = 0.0
            tr.effect_x = 0.0
            if tr.state in (ModelState.UNCERTAIN, ModelState.CORRUPTED):
                tr.state = ModelState.HEALTHY
        if m.state in (ModelState.UNCERTAIN, ModelState.CORRUPTED):
            m.state = ModelState.HEALTHY

    def forget(self, model: str) -> None:
        """Drop a model (it was removed); a later sample starts a new warm-up."""
        self._models.pop(model, None)

    # -- the statistic --------------------------------------------------------------------
    def _window(self, tr: _Track, v_on: float, v_base: float, n_on: float, n_base: float) -> None:
        cfg = self.config
        x = tr.sign * (v_on - v_base)
        u = x / math.sqrt(1.0 / n_on + 1.0 / n_base) if cfg.count_weighting else x
        tr.windows += 1
        tr.level = v_base if tr.windows == 1 else tr.level + cfg.effect_alpha * (v_base - tr.level)
        tr.effect_x += cfg.effect_alpha * (x - tr.effect_x)
        last, tr.last_u = tr.last_u, u
        if tr.warm_u is not None:
            tr.warm_u.append(u)
            if len(tr.warm_u) >= cfg.warmup_windows:
                tr.sigma = _initial_sigma(tr.warm_u)
                tr.warm_u = None
                tr.state = ModelState.HEALTHY
            return
        sigma = tr.sigma
        z = u / sigma
        clip = cfg.z_clip
        if z > clip:
            z = clip
        elif z < -clip:
            z = -clip
        tr.z_last = z
        s = tr.s + z - cfg.k
        s = 0.0 if s < 0.0 else (cfg.cusum_cap if s > cfg.cusum_cap else s)
        tr.s = s
        # The noise scale follows slow drift, but only on windows believed clean: learning
        # from a degraded stretch would widen sigma and hide the degradation.
        if tr.state is ModelState.HEALTHY and last is not None:
            d2 = (u - last) ** 2 / 2.0
            cap = (clip * sigma) ** 2
            var = sigma * sigma
            var += cfg.noise_alpha * ((d2 if d2 < cap else cap) - var)
            tr.sigma = max(math.sqrt(var), MIN_UNIT_SIGMA)
        if s >= cfg.h_alarm:
            tr.state = ModelState.CORRUPTED
        elif s >= cfg.h_warn:
            if tr.state is ModelState.HEALTHY:
                tr.state = ModelState.UNCERTAIN
        elif s <= cfg.h_clear:
            tr.state = ModelState.HEALTHY

    def _update_model(self, model: str, m: _Model, metric: str, tr: _Track, now: float) -> StateChange | None:
        worst = max((t.state for t in m.tracks.values()), key=_SEVERITY.__getitem__)
        if worst is m.state:
            return None
        old, m.state, m.since = m.state, worst, now
        return StateChange(model, old, worst, now, metric, tr.s, _relative(tr))

    # -- output ---------------------------------------------------------------------------
    def state(self, model: str) -> ModelState:
        """A model's current state (WARMUP for a model never seen)."""
        m = self._models.get(model)
        return m.state if m is not None else ModelState.WARMUP

    def statistic(self, model: str, metric: str) -> float | None:
        """The CUSUM statistic of one (model, metric); None before its first sample."""
        m = self._models.get(model)
        tr = m.tracks.get(metric) if m is not None else None
        return tr.s if tr is not None else None

    def snapshot(self) -> dict[str, Any]:
        """JSON-ready status: per model its state and, per metric, the statistic and its inputs."""
        out: dict[str, Any] = {}
        for name, m in sorted(self._models.items()):
            metrics = {}
            for metric, tr in sorted(m.tracks.items()):
                metrics[metric] = {
                    "state": tr.state.value,
                    "windows": tr.windows,
                    "warmup_left": max(0, self.config.warmup_windows - tr.windows) if tr.warm_u is not None else 0,
                    "cusum": tr.s,
                    "h_warn": self.config.h_warn,
                    "h_alarm": self.config.h_alarm,
                    "last_z": tr.z_last,
                    "unit_sigma": tr.sigma,
                    "relative_degradation": _relative(tr),
                    "baseline_level": tr.level,
                }
            out[name] = {"state": m.state.value, "since": m.since, "metrics": metrics}
        return out


def _relative(tr: _Track) -> float:
    return tr.effect_x / abs(tr.level) if tr.level else 0.0


def _initial_sigma(us: list[float]) -> float:
    """Trimmed successive-difference scale of the warm-up windows (see the module docstring)."""
    diffs = sorted(b - a for a, b in zip(us, us[1:]))
    n = len(diffs)
    med = diffs[n // 2] if n % 2 else (diffs[n // 2 - 1] + diffs[n // 2]) / 2.0
    dev = sorted(abs(d - med) for d in diffs)
    mad = dev[n // 2] if n % 2 else (dev[n // 2 - 1] + dev[n // 2]) / 2.0
    limit = TRIM_MADS * MAD_TO_SIGMA * mad
    kept = [d for d in diffs if abs(d - med) <= limit] if mad > 0 else diffs
    var = sum(d * d for d in kept) / (2.0 * len(kept))
    return max(math.sqrt(var), MIN_UNIT_SIGMA)
