"""Priority scores for row updates, after the Ekko paper (OSDI'22, section 4).

Ekko ranks each row update by

    p = (p_g + p_u) * p_m

* ``p_g`` -- the update's magnitude (the L2 norm of the change to the row)
  divided by the model's running average magnitude: a change much larger than
  usual matters more to inference quality;
* ``p_u`` -- a bonus for rows that are *new* (never written before, old version
  0): a replica without the row serves a zero/default embedding, the worst case;
* ``p_m`` -- the model's share of inference traffic: an update to a model that
  serves 1% of requests matters less than one serving 60%.

:class:`EkkoScorer` computes this vectorized per batch.  Beyond the paper:

* the running average is *time-decayed* (half-life :attr:`ScorerConfig.average_halflife_s`)
  rather than per-update, so it means the same thing whatever the batch sizes
  and publishing rates, and it tracks a learning-rate schedule;
* ``p_g`` is normalised by the average *before* the batch is folded in, so a
  batch that is uniformly larger than usual (a learning-rate spike, a bad
  trainer) ranks above routine traffic instead of normalising itself away;
* ``p_g`` is capped (:attr:`ScorerConfig.max_gradient_ratio`) so one outlier
  cannot push every other row's priority into float32 noise, and so waiting
  time (aging, :mod:`prioritizer.queue`) still orders rows within a bounded
  horizon;
* an unknown magnitude (NaN) scores ``p_g = 1`` (an average update) rather than
  0 or dropping the row; :func:`magnitude_from_values` lets the caller fill it
  from the stored row first;
* traffic shares can be changed at runtime (:meth:`EkkoScorer.set_weights`),
  for instance when the model-state manager moves traffic off a corrupted model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol

import numpy as np

from ekko.core.errors import UsageError

#: default half-life (seconds) of the running-average magnitude: long enough to
#: average over many publishes, short enough to follow a learning-rate schedule.
DEFAULT_AVERAGE_HALFLIFE_S = 60.0
#: default cap on p_g (update magnitude / average magnitude).
DEFAULT_MAX_GRADIENT_RATIO = 100.0
#: averages below this are treated as this, so an all-zero history does not
#: divide by zero (then every non-zero update gets the capped p_g).
MIN_AVERAGE_MAGNITUDE = 1e-12


class Scorer(Protocol):
    """Anything that scores a batch of row updates of one model.

    ``score(model, impact, is_new, now) -> scores``:

    Args:
        model: the model the rows belong to.
        impact: float32 ``(n,)`` magnitude of each change (L2 norm of new - old),
            NaN where unknown.
        is_new: bool ``(n,)``: the row had never been written (old version 0).
        now: current time, seconds (sans-IO: the caller's clock).

    Returns:
        float32 ``(n,)`` scores, finite and >= 0; higher is more urgent.
        A scorer may keep per-model state (a running average), so calls
        should come in time order.
    """

    def __call__(self, model: str, impact: np.ndarray, is_new: np.ndarray, now: float) -> np.ndarray: ...


@dataclass(frozen=True)
class ModelWeights:
    """Per-model factors of the Ekko priority.

    Attributes:
        traffic_share: ``p_m``, the model's share of inference traffic, in [0, 1].
            Multiplies the whole score: rows of a model serving no traffic score 0
            (they still converge, through aging and anti-entropy).
        new_row_bonus: ``p_u``, added to ``p_g`` for a row never written before.
            In units of "average updates": 1.0 makes a new row rank like an
            update twice the average magnitude.
    """

    traffic_share: float = 1.0
    new_row_bonus: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.traffic_share <= 1.0:
            raise UsageError(f"traffic_share must be in [0, 1], got {self.traffic_share}")
        if not (self.new_row_bonus >= 0.0 and math.isfinite(self.new_row_bonus)):
            raise UsageError(f"new_row_bonus must be finite and >= 0, got {self.new_row_bonus}")


@dataclass(frozen=True)
class ScorerConfig:
    """Configuration of :class:`EkkoScorer`.

    Attributes:
        default: weights of a model not listed in ``models``.
        models: per-model weights, model name -> :class:`ModelWeights`.
        average_halflife_s: half-life, seconds, of the running average of update
            magnitude.  The average is ``sum(w_i * x_i) / sum(w_i)`` over past
            known magnitudes ``x_i`` with ``w_i = 2 ** (-(now - t_i) / halflife)``.
        max_gradient_ratio: cap on ``p_g``; scores are at most
            ``(max_gradient_ratio + new_row_bonus) * traffic_share``.
    """

    default: ModelWeights = field(default_factory=ModelWeights)
    models: Mapping[str, ModelWeights] = field(default_factory=dict)
    average_halflife_s: float = DEFAULT_AVERAGE_HALFLIFE_S
    max_gradient_ratio: float = DEFAULT_MAX_GRADIENT_RATIO

    def __post_init__(self) -> None:
        if not self.average_halflife_s > 0:
            raise UsageError(f"average_halflife_s must be > 0, got {self.average_halflife_s}")
        if not self.max_gradient_ratio > 0:
            raise UsageError(f"max_gradient_ratio must be > 0, got {self.max_gradient_ratio}")

    @classmethod
    def from_traffic(cls, shares: Mapping[str, float], new_row_bonus: float = 1.0, **kw: Any) -> "ScorerConfig":
        """Config from inference traffic per model (any units; normalised to shares)."""
        total = float(sum(shares.values()))
        if not total > 0:
            raise UsageError("traffic must sum to > 0")
        return cls(models={m: ModelWeights(v / total, new_row_bonus) for m, v in shares.items()}, **kw)


class _RunningAverage:
    """Time-decayed mean of magnitudes: O(1) state, batch updates."""

    __slots__ = ("total", "weight", "t")

    def __init__(self) -> None:
        self.total = 0.0
        self.weight = 0.0
        self.t: float | None = None

    def decay_to(self, now: float, halflife: float) -> None:
        if self.t is not None and now > self.t:
            f = 2.0 ** (-(now - self.t) / halflife)
            self.total *= f
            self.weight *= f
        if self.t is None or now > self.t:
            self.t = now

    @property
    def mean(self) -> float | None:
        return self.total / self.weight if self.weight > 0 else None


class EkkoScorer:
    """The Ekko priority ``p = (p_g + p_u) * p_m``, vectorized, with a running average per model.

    Args:
        config: weights and averaging; see :class:`ScorerConfig`.

    Example:
        >>> import numpy as np
        >>> s = EkkoScorer(ScorerConfig(models={"ads": ModelWeights(traffic_share=0.5, new_row_bonus=2.0)}))
        >>> # first batch: no history, so p_g is relative to this batch's mean (2.0)
        >>> s("ads", np.array([1.0, 3.0], np.float32), np.array([False, True]), now=0.0).tolist()
        [0.25, 1.75]
        >>> # unknown magnitude: p_g = 1 (an average update)
        >>> s("ads", np.array([np.nan, 4.0], np.float32), np.array([False, False]), now=0.0).tolist()
        [0.5, 1.0]
    """

    def __init__(self, config: ScorerConfig | None = None) -> None:
        self.config = config or ScorerConfig()
        self._weights: dict[str, ModelWeights] = dict(self.config.models)
        self._avg: dict[str, _RunningAverage] = {}

    def weights(self, model: str) -> ModelWeights:
        return self._weights.get(model, self.config.default)

    def set_weights(self, model: str, weights: ModelWeights) -> None:
        """Change a model's traffic share / new-row bonus from now on."""
        self._weights[model] = weights

    def average(self, model: str, now: float) -> float | None:
        """The model's running average magnitude at ``now`` (None before any known one)."""
        avg = self._avg.get(model)
        if avg is None:
            return None
        avg.decay_to(now, self.config.average_halflife_s)
        return avg.mean

    def __call__(self, model: str, impact: np.ndarray, is_new: np.ndarray, now: float) -> np.ndarray:
        impact = np.asarray(impact, dtype=np.float32)
        is_new = np.asarray(is_new, dtype=bool)
        if impact.shape != is_new.shape or impact.ndim != 1:
            raise UsageError(f"impact {impact.shape} and is_new {is_new.shape} must be equal 1-D shapes")
        w = self.weights(model)
        cfg = self.config
        # negative or infinite magnitudes are caller bugs or overflow; treat them as unknown
        known = np.isfinite(impact) & (impact >= 0)
        all_known = bool(known.all())
        x = impact if all_known else impact[known]
        avg = self._avg.get(model)
        if avg is None:
            avg = self._avg[model] = _RunningAverage()
        avg.decay_to(now, cfg.average_halflife_s)
        batch_sum = float(x.sum(dtype=np.float64))
        base = avg.mean
        if base is None and x.shape[0]:
            base = batch_sum / x.shape[0]          # cold start: relative to this batch
        if base is None:
            p_g = np.ones(impact.shape, np.float32)
        else:
            p_g = impact * np.float32(1.0 / max(base, MIN_AVERAGE_MAGNITUDE))
            if not all_known:
                p_g[~known] = 1.0
            np.minimum(p_g, np.float32(cfg.max_gradient_ratio), out=p_g)
        avg.total += batch_sum
        avg.weight += x.shape[0]
        score = p_g
        if w.new_row_bonus:
            score = score + np.float32(w.new_row_bonus) * is_new
        if w.traffic_share != 1.0:
            score = score * np.float32(w.traffic_share)
        return score.astype(np.float32, copy=False)

    score = __call__


def _bf16_to_f32(a: np.ndarray) -> np.ndarray:
    # bfloat16 travels as the top 16 bits of a float32
    return (a.astype(np.uint32) << 16).view(np.float32)


def magnitude_from_values(old: Any, new: Any, dtype: str | None = None) -> np.ndarray:
    """Row L2 norms of the change ``new - old``, as float32 ``(n,)``: the ``impact`` of an update.

    Use it to fill unknown (NaN) impacts from the replica's stored rows before
    scoring.  Works on numpy arrays (any float dtype; pass ``dtype="bfloat16"``
    for bf16 carried as uint16 bits, as on the wire) and on torch tensors on any
    device (reduced on that device; only the ``(n,)`` result is copied back).
    ``old=None`` means the rows were never written: the norm of ``new``.
    Accumulates in float32 at least, so float16 rows do not overflow.

    Example:
        >>> import numpy as np
        >>> magnitude_from_values(np.array([[0, 0], [1, 1]], np.float32), np.array([[3, 4], [1, 1]], np.float32))
        array([5., 0.], dtype=float32)
    """
    if hasattr(new, "detach"):     # a torch tensor: stay on its device, no torch import here
        d = new.detach().float()
        if old is not None:
            d = d - old.detach().float()
        return d.norm(dim=1).cpu().numpy().astype(np.float32, copy=False)
    new = np.asarray(new)
    if new.ndim != 2:
        raise UsageError(f"values must be (n, dim), got shape {new.shape}")
    conv = _bf16_to_f32 if dtype == "bfloat16" else (lambda a: np.asarray(a, dtype=np.float32))
    d = conv(new)
    if old is not None:
        d = d - conv(np.asarray(old))
    # einsum avoids materialising d*d and is faster than np.linalg.norm for this shape
    return np.sqrt(np.einsum("ij,ij->i", d, d, dtype=np.float32))


def fill_unknown_impact(impact: np.ndarray | None, old: Any, new: Any, dtype: str | None = None) -> np.ndarray:
    """``impact`` with its NaN entries replaced by :func:`magnitude_from_values` of those rows.

    ``impact=None`` means all unknown.  ``old`` may be None (all rows new).
    Only the unknown rows are reduced.
    """
    if impact is None:
        return magnitude_from_values(old, new, dtype)
    impact = np.asarray(impact, dtype=np.float32)
    unknown = np.isnan(impact)
    if not unknown.any():
        return impact
    out = impact.copy()
    idx = np.flatnonzero(unknown)
    # torch tensors take a list index (no torch import here); numpy takes the array
    sel = idx.tolist() if hasattr(new, "detach") else idx
    sub_new = new[sel] if hasattr(new, "detach") else np.asarray(new)[sel]
    sub_old = None if old is None else (old[sel] if hasattr(old, "detach") else np.asarray(old)[sel])
    out[idx] = magnitude_from_values(sub_old, sub_new, dtype)
    return out
