"""Per-row popularity for the priority score: how often a row is touched, relative to the average.

The Ekko paper weights an update by ``p_m``, its *model's* share of inference
traffic.  Inside one model the same argument holds row by row: a stale value of
a row that 10% of lookups read costs far more than a stale value of a row read
once an hour (recommendation embeddings are Zipf-skewed: a few hot rows take
most lookups).  So the scheduler multiplies the score by a per-row factor

    p_a = rate(row) / mean rate of the rows being updated

where ``rate`` is a time-decayed count of the row's updates.  Training touches
a row when a training example looks it up, so a row's update rate follows its
share of traffic; the replica that schedules the push learns it from the
stream it already sees, with no extra metadata from the publisher and no
assumption about the distribution.  (A trainer publishes a row at most once
per batch, so the rate of the very hottest rows saturates at the batch rate:
they are still ranked above every colder row, just by a smaller factor.)

Memory is bounded whatever the table size: rates live in ``buckets`` float64
counters per (model, table), indexed by a multiplicative hash of the row id
(rows that collide share a counter and look a little warmer; with
``buckets`` >= rows, ids below ``buckets`` never collide).

Sans-IO: time is an argument; decay is exact (``2 ** (-(now - t) / halflife)``)
and done lazily with a per-table scale, so an update costs O(batch), not
O(buckets).
"""

from __future__ import annotations

import math

import numpy as np

from ekko.core.errors import UsageError

#: default counters per (model, table): 2**18 float64 = 2 MiB.
DEFAULT_BUCKETS = 1 << 18
#: default half-life of the update-rate estimate, seconds: as the scorer's
#: running average magnitude (DEFAULT_AVERAGE_HALFLIFE_S), long enough to
#: count many updates of warm rows, short enough to follow a trend.
DEFAULT_RATE_HALFLIFE_S = 60.0
#: renormalise the lazy decay scale before it could overflow float64.
_MAX_LOG2_SCALE = 900.0
#: Fibonacci hashing multiplier (2**64 / golden ratio).
_HASH_MUL = np.uint64(0x9E3779B97F4A7C15)


class _TableRates:
    __slots__ = ("counts", "mean_total", "mean_weight", "t_mean", "t_ref")

    def __init__(self, buckets: int) -> None:
        self.counts = np.zeros(buckets, np.float64)
        self.t_ref: float | None = None   # counts are in units of 2**((t - t_ref)/halflife)
        self.mean_total = 0.0             # decayed sum of the rates seen at updates
        self.mean_weight = 0.0            # decayed number of updates
        self.t_mean: float | None = None


class AccessTracker:
    """Time-decayed update rate per row, as a factor relative to the average updated row.

    Args:
        buckets: counters per (model, table), a power of two.
        halflife_s: half-life of the rate estimate, seconds.

    Example:
        >>> import numpy as np
        >>> a = AccessTracker(buckets=1024)
        >>> _ = a.observe("m", "t", np.array([1, 2]), now=0.0)
        >>> [round(float(x), 2) for x in a.observe("m", "t", np.array([1, 3]), now=0.0)]  # row 1 seen twice
        [1.6, 0.8]
    """

    def __init__(self, buckets: int = DEFAULT_BUCKETS, halflife_s: float = DEFAULT_RATE_HALFLIFE_S) -> None:
        if buckets < 1 or buckets & (buckets - 1):
            raise UsageError(f"buckets must be a power of two >= 1, got {buckets}")
        if not (halflife_s > 0 and math.isfinite(halflife_s)):
            raise UsageError(f"halflife_s must be finite and > 0, got {halflife_s}")
        self.buckets = int(buckets)
        self.halflife_s = float(halflife_s)
        self._bits = self.buckets.bit_length() - 1
        self._tables: dict[tuple[str, str], _TableRates] = {}

    def _slots(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        if self._bits == 0:
            return np.zeros(ids.shape, np.int64)
        small = ids < self.buckets
        if small.all() and (ids >= 0).all():
            return ids                      # exact: no collisions for small tables
        h = (ids.astype(np.uint64) * _HASH_MUL) >> np.uint64(64 - self._bits)
        return h.astype(np.int64)

    def observe(self, model: str, table: str, ids: np.ndarray, now: float) -> np.ndarray:
        """Count one update of each row in ``ids`` at ``now`` and return its ``p_a`` (float32).

        ``p_a`` is the row's decayed update count (this update included) over the
        decayed mean of that count across the updates seen so far (this batch
        included), so it averages about 1 over updates.  Rows of one batch should
        be distinct (a batch that repeats a row counts it once).
        """
        ids = np.asarray(ids, dtype=np.int64)
        n = ids.shape[0]
        if n == 0:
            return np.zeros(0, np.float32)
        st = self._tables.get((model, table))
        if st is None:
            st = self._tables[(model, table)] = _TableRates(self.buckets)
        if st.t_ref is None:
            st.t_ref = now
        e = (now - st.t_ref) / self.halflife_s
        if e > _MAX_LOG2_SCALE:
            st.counts *= 2.0 ** (-e)
            st.t_ref, e = now, 0.0
        w = 2.0 ** e                         # one update now, in units at t_ref
        slots = self._slots(ids)
        st.counts[slots] += w
        rate = st.counts[slots] * (1.0 / w)  # decayed count at now (>= 1)
        if st.t_mean is not None and now > st.t_mean:
            f = 2.0 ** (-(now - st.t_mean) / self.halflife_s)
            st.mean_total *= f
            st.mean_weight *= f
        if st.t_mean is None or now > st.t_mean:
            st.t_mean = now
        st.mean_total += float(rate.sum())
        st.mean_weight += n
        return (rate * (st.mean_weight / st.mean_total)).astype(np.float32)
