"""The "top k%" threshold: a streaming quantile of recent scores, per model, with an error bound.

Ekko marks an update high-priority when its score is above a k-th percentile
threshold "estimated from recent history".  Here recent history is a window of
the last ``window`` scores of a model, cut into consecutive *epochs* of
``window`` scores (or fewer, when ``window_s`` seconds pass first).  During an
epoch a fixed-size uniform reservoir (Vitter's Algorithm R, applied to whole
batches with numpy) samples it; when the epoch ends the sample is sorted and
becomes the *reference*, and the threshold is the reference's empirical
``(1 - k)`` quantile.  Before the first epoch ends the running reservoir is the
reference (a uniform sample of everything seen so far).

Error bound.  The reference is a uniform sample of ``m = min(sample_size,
epoch length)`` scores drawn without replacement from its epoch.  By the
Dvoretzky-Kiefer-Wolfowitz inequality with Massart's constant (which also holds
for sampling without replacement: Greene & Wellner, 2017, show the
finite-population case concentrates at least as well), with probability at
least ``1 - delta`` the sample's empirical CDF is within
``sqrt(ln(2/delta) / (2m))`` of the epoch's at every point at once; taking the
quantile at a sample index adds at most ``1/m``.  So, with probability at least
``1 - delta``, the fraction of that epoch's scores below the threshold is
within

    eps(m, delta) = sqrt(ln(2 / delta) / (2 m)) + 1 / m

of ``1 - k`` (:func:`rank_error_bound`); for a stream that is stationary over
the epoch the same holds against the true distribution.  With the defaults
(m = 16384, delta = 1e-6) eps = 0.0211: asking for the top 5% gives a
threshold whose exact rank is between the top 2.9% and the top 7.1%, and
typically (one standard deviation, ``sqrt(k(1-k)/m)``) within 0.17 points.

Why this and not a sketch over the whole stream (KLL, t-digest): the bound is
against *recent* scores, which is what a drifting distribution (a learning-rate
schedule, a new trainer) needs; memory is ``2 * sample_size`` float32 per model
whatever the rate; and a batch update costs one vectorized pass.  The price is
lag: the threshold describes the previous epoch, at most ``2 * window`` scores
(or ``2 * window_s`` seconds) old.

Randomness comes only from the generator passed in.
"""

from __future__ import annotations

import math

import numpy as np

from ekko.core.errors import UsageError

#: default reservoir size per model (float32 each, two reservoirs per model).
DEFAULT_SAMPLE_SIZE = 16384
#: default epoch length in scores: 8 samples' worth, so one epoch is a
#: reasonably recent window yet long enough to smooth batch-to-batch noise.
DEFAULT_WINDOW = 8 * DEFAULT_SAMPLE_SIZE
#: default failure probability quoted for the error bound.
DEFAULT_DELTA = 1e-6
#: an epoch cut short by ``window_s`` must still hold this many scores, so a
#: slow model does not get a threshold from a handful of samples.
MIN_EPOCH_SCORES = 1024


def rank_error_bound(m: int, delta: float = DEFAULT_DELTA) -> float:
    """Rank error that a threshold from a uniform sample of ``m`` exceeds with probability <= ``delta``.

    Example:
        >>> round(rank_error_bound(16384, 1e-6), 4)
        0.0211
    """
    if m <= 0:
        return 1.0
    if not 0 < delta < 1:
        raise UsageError(f"delta must be in (0, 1), got {delta}")
    return min(1.0, math.sqrt(math.log(2.0 / delta) / (2.0 * m)) + 1.0 / m)


class EpochQuantile:
    """Quantiles of the last complete epoch of a stream, from a uniform sample of it.

    Args:
        sample_size: reservoir size ``m`` (sets the error bound).
        window: scores per epoch (>= ``sample_size``).
        window_s: also end an epoch after this many seconds (when it holds at
            least :data:`MIN_EPOCH_SCORES` scores); None = by count only.
        rng: the seeded generator all sampling draws from.

    Example:
        >>> import numpy as np
        >>> q = EpochQuantile(sample_size=1000, window=10_000, rng=np.random.default_rng(7))
        >>> q.update(np.random.default_rng(1).random(25_000))
        >>> q.epochs, abs(q.quantile(0.9) - 0.9) <= rank_error_bound(1000)
        (2, True)
    """

    def __init__(self, sample_size: int = DEFAULT_SAMPLE_SIZE, window: int = DEFAULT_WINDOW,
                 window_s: float | None = None, rng: np.random.Generator | None = None) -> None:
        if sample_size < 1 or window < sample_size:
            raise UsageError(f"need 1 <= sample_size <= window, got {sample_size}, {window}")
        if window_s is not None and not window_s > 0:
            raise UsageError(f"window_s must be > 0, got {window_s}")
        self.sample_size = int(sample_size)
        self.window = int(window)
        self.window_s = window_s
        self.rng = rng if rng is not None else np.random.default_rng(0)
        self._res = np.empty(self.sample_size, dtype=np.float32)
        self._seen = 0                   # scores seen in the current epoch
        self._epoch_start: float | None = None
        self._ref: np.ndarray | None = None   # sorted sample of the last complete epoch
        self._cur_sorted: np.ndarray | None = None   # cache of sorted(current reservoir)
        self.epochs = 0

    @property
    def reference_size(self) -> int:
        """Size of the sample quantiles come from (0 before any score)."""
        if self._ref is not None:
            return int(self._ref.shape[0])
        return min(self._seen, self.sample_size)

    def _absorb(self, x: np.ndarray) -> None:
        """Algorithm R on a batch that fits in the current epoch."""
        n, c, b = self.sample_size, self._seen, x.shape[0]
        fill = min(max(n - c, 0), b)
        if fill:
            self._res[c:c + fill] = x[:fill]
        rest = x[fill:]
        if rest.shape[0]:
            # the j-th score of the stream (1-based) enters with probability n/j ...
            j = np.arange(c + fill + 1, c + b + 1, dtype=np.float64)
            keep = np.flatnonzero(self.rng.random(rest.shape[0]) * j < n)
            if keep.shape[0]:
                # ... replacing a uniform slot; later scores overwrite earlier ones, as in
                # the sequential algorithm (numpy gives no order for repeated indices, so
                # keep the last write per slot explicitly).
                slots = self.rng.integers(0, n, size=keep.shape[0])
                rs, first = np.unique(slots[::-1], return_index=True)
                self._res[rs] = rest[keep[keep.shape[0] - 1 - first]]
        self._seen = c + b
        self._cur_sorted = None

    def _close_epoch(self) -> None:
        m = min(self._seen, self.sample_size)
        self._ref = np.sort(self._res[:m])
        self._seen = 0
        self._epoch_start = None
        self._cur_sorted = None
        self.epochs += 1

    def update(self, values: np.ndarray, now: float | None = None) -> None:
        """Add a batch of values (NaN ones are ignored)."""
        x = np.asarray(values, dtype=np.float32).ravel()
        if x.shape[0] and np.isnan(x).any():
            x = x[~np.isnan(x)]
        if now is not None:
            if self._epoch_start is None:
                self._epoch_start = now
            elif (self.window_s is not None and now - self._epoch_start >= self.window_s
                  and self._seen >= MIN_EPOCH_SCORES):
                self._close_epoch()
                self._epoch_start = now
        while x.shape[0]:
            room = self.window - self._seen
            self._absorb(x[:room])
            x = x[room:]
            if self._seen >= self.window:
                self._close_epoch()

    def sample(self) -> np.ndarray:
        """The sorted reference sample (a view; do not modify)."""
        if self._ref is not None:
            return self._ref
        if self._cur_sorted is None:
            self._cur_sorted = np.sort(self._res[:min(self._seen, self.sample_size)])
        return self._cur_sorted

    def quantile(self, q: float) -> float:
        """Empirical ``q`` quantile of the reference sample: its element of index
        ``floor(q * m)`` (NaN before any value)."""
        s = self.sample()
        m = s.shape[0]
        if m == 0:
            return math.nan
        return float(s[min(m - 1, max(0, int(math.floor(q * m))))])


class ThresholdTracker:
    """Per-model "top ``k_percent``%" thresholds over recent scores.

    A score is *high* when it is ``>=`` its model's threshold, the empirical
    ``(1 - k)`` quantile of the model's reference sample (:class:`EpochQuantile`);
    ties at the threshold are all high, so a distribution with a heavy atom (all
    new rows scoring the same) can mark more than ``k`` of the rows.  Before a
    model has any history nothing of it is high: call :meth:`update` with a
    batch before classifying it (``Prioritizer`` does).

    Args:
        k_percent: the share of updates that should be high priority, in [0, 100].
        sample_size, window, window_s: per-model estimator settings, see
            :class:`EpochQuantile`; the rank error is bounded by
            :func:`rank_error_bound` of the reference sample size.
        rng: seeded generator (or an int seed) all models' sampling draws from.

    Example:
        >>> import numpy as np
        >>> t = ThresholdTracker(k_percent=10, sample_size=2000, window=20_000, rng=1)
        >>> t.update("ads", np.arange(10_000, dtype=np.float32))
        >>> t.is_high("ads", np.array([100.0, 9_500.0])).tolist()
        [False, True]
        >>> 8_800 < t.threshold("ads") < 9_200
        True
    """

    def __init__(self, k_percent: float, sample_size: int = DEFAULT_SAMPLE_SIZE, window: int = DEFAULT_WINDOW,
                 window_s: float | None = None, rng: np.random.Generator | int = 0) -> None:
        if not 0.0 <= k_percent <= 100.0:
            raise UsageError(f"k_percent must be in [0, 100], got {k_percent}")
        self.k = k_percent / 100.0
        self.sample_size, self.window, self.window_s = sample_size, window, window_s
        self.rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        self._est: dict[str, EpochQuantile] = {}
        self._cache: dict[str, tuple[int, int, float]] = {}   # model -> (epochs, seen, threshold)

    def estimator(self, model: str) -> EpochQuantile:
        est = self._est.get(model)
        if est is None:
            est = self._est[model] = EpochQuantile(self.sample_size, self.window, self.window_s, self.rng)
        return est

    def update(self, model: str, scores: np.ndarray, now: float | None = None) -> None:
        """Add a batch of a model's scores to its history (``now`` only matters with ``window_s``)."""
        self.estimator(model).update(scores, now)

    def threshold(self, model: str) -> float:
        """The model's current threshold (+inf without history or with k = 0; -inf with k = 100)."""
        if self.k <= 0.0:
            return math.inf
        if self.k >= 1.0:
            return -math.inf
        est = self._est.get(model)
        if est is None or est.reference_size == 0:
            return math.inf
        key = (est.epochs, est._seen if est._ref is None else -1)
        hit = self._cache.get(model)
        if hit is not None and hit[:2] == key:
            return hit[2]
        th = est.quantile(1.0 - self.k)
        self._cache[model] = (*key, th)
        return th

    def is_high(self, model: str, scores: np.ndarray) -> np.ndarray:
        """Bool per score: at or above the model's threshold."""
        return np.asarray(scores) >= np.float32(self.threshold(model))

    def error_bound(self, model: str, delta: float = DEFAULT_DELTA) -> float:
        """Rank error of the model's threshold, exceeded with probability <= ``delta``."""
        est = self._est.get(model)
        return rank_error_bound(est.reference_size if est else 0, delta)
