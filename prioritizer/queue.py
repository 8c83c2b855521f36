"""Per-link outbound queues: priority with aging, coalescing, a byte budget and a memory bound.

:class:`PriorityLinkQueue` and :class:`FifoBudgetQueue` implement
:class:`p2p.outbound.LinkQueue` (put / take / next_ready / rows / dropped).
Both hold row *references* (the node reads current values when it sends), both
coalesce a row queued again into its queued entry, both spend a
:class:`~prioritizer.budget.TokenBucket` and both bound their memory.  They
differ only in order: priority with aging, or first-in-first-out (the ``fifo``
baseline the simulator compares against).

Priority order.  Each queued row has an *effective priority* that grows with
its waiting time (aging), so nothing starves:

    eff(now) = u + B * high + (now - enqueued_at) / aging_s,
    u = score / (score + score_scale),     B = promote_after_s / aging_s

``score`` is the row's priority (:mod:`prioritizer.scoring`; NaN counts as 0),
``high`` whether it was queued as high priority (``QueuedRows.high``, or its
score at or above the model's top-k% threshold).  The score enters through
``u``, a monotone map onto [0, 1) (``score_scale`` is the score that maps to
0.5), so that the other two terms mean the same whatever the scores:
``aging_s`` is the wait that outweighs any difference in score (within a
class, rows more than ``aging_s`` apart in age go oldest first), and ``B`` is
the head start of the high class.  With ``promote_after_s >= aging_s`` (B >= 1)
a high row goes before every low row queued less than
``promote_after_s - aging_s`` earlier than it; a low row goes before a high
row queued ``promote_after_s + aging_s`` or more after it.

Because aging is *additive* and the same for every row,
``eff(now) = key + now / aging_s`` with a per-row constant

    key = u + B * high - enqueued_at / aging_s,

so the order never changes while rows wait: it is decided once, at put time,
and the queue keeps rows sorted by a static key (a row re-queued keeps the
greater of its two keys: "the greater priority").

High rows go first and at once.  A row is *high-ish* at ``now`` when
``eff(now) >= B``: every high row, and every low row that has waited
``promote_after_s - u * aging_s`` (at most ``promote_after_s``).  High-ish rows
are always a prefix of the key order.  They may spend the whole token bucket;
other rows only what is above ``high_reserve`` (a fraction of the burst), so a
high row arriving behind a backlog of low ones finds budget and leaves
immediately, and low rows use what remains.

Starvation bound.  A row (high or low) queued at ``t0`` is overtaken only by
rows with a greater key, and a row queued at ``t`` has a greater key only if
``t < t0 + promote_after_s + aging_s =: T`` (its ``u`` and boost can make up at
most ``B + 1`` of age).  So at most ``Q0 + lam * (T - t0)`` bytes go before it
(``Q0`` queued ahead at ``t0``, ``lam`` the arrival rate in bytes/s), and with
the link spending its rate ``R`` it is sent by about
``t0 + (Q0 + lam * (T - t0) + frame) / R``: finite even when ``lam > R``
(``tests/prioritizer/test_prioritizer_queue.py`` checks this bound).  It can
still be *dropped* before that when the queue is over its bound: dropping takes
the lowest keys, and anti-entropy repairs dropped rows.

Memory bound.  At most ``max_rows`` rows (and ``max_backlog_bytes`` wire
bytes, if set) stay queued after a put; beyond that the lowest-priority rows
(FIFO: the oldest, as :class:`p2p.outbound.FifoLinkQueue`) are dropped, down to
``1 - drop_slack`` of the bound so that the O(queue) selection runs once per
``drop_slack`` of the bound, not on every put.

Data structures (:class:`prioritizer.queue_slots.RowSlots`), for throughput
(``bench/scheduler.py``): slots in numpy
arrays (a free list recycles them); a vectorized cuckoo hash index
(:mod:`prioritizer.rowindex`) from (table, row id) to slot for coalescing; and a
*head*: the slots whose key is above a cut ``theta``, kept sorted.  Puts add
rows above the cut to an unsorted incoming list, a take sorts that (small) list
and merges it in, and takes a prefix.  When the head runs dry it is refilled with the top
:data:`HEAD_TARGET_ROWS` (or 1/16 of a deeper queue, so that refills, each
O(queue), stay O(1) per row taken) by one ``argpartition`` over the queue.  Every put and
take is a handful of vectorized passes over the batch or frame.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ekko.core.errors import UsageError
from p2p.outbound import DEFAULT_QUEUE_ROWS, QueuedRows
from prioritizer.budget import TokenBucket
from prioritizer.quantile import ThresholdTracker
from prioritizer.queue_slots import (
    MAX_ROW_ID,
    ROW_ID_BITS,
    ROW_OVERHEAD_BYTES,
    RowSlots,
)

#: scores are clipped to [0, MAX_SCORE] (an infinite score would map to NaN).
MAX_SCORE = 1e30
#: default score that maps to the middle of the [0, 1) priority range: 1.0 is an
#: update of average magnitude to a model with all the traffic (Ekko scoring).
DEFAULT_SCORE_SCALE = 1.0
#: default wait that outweighs any difference in score.
DEFAULT_AGING_S = 2.0
#: default head start of high rows, in seconds of waiting.
DEFAULT_PROMOTE_AFTER_S = 10.0
#: default fraction of the bucket's burst that only high-ish rows may spend.
DEFAULT_HIGH_RESERVE = 0.25
#: default hysteresis of the memory bound (drop to 15/16 of it).
DEFAULT_DROP_SLACK = 1.0 / 16
#: a row becomes high-ish this far (in key units, plus a few ulps of the key's
#: magnitude) before the exact instant, so a take at the instant ``next_ready``
#: computed is not lost to rounding and a driver never spins on it.
_KEY_EPS = 1e-9
_KEY_REL_EPS = 1e-15
#: upper bounds (seconds) of the queueing-latency histogram buckets; the last
#: bucket (above the largest bound) is open.
LATENCY_BOUNDS_S = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0,
                    20.0, 50.0, 100.0, 300.0)
_LAT_BOUNDS = np.array(LATENCY_BOUNDS_S)




@dataclass(frozen=True)
class QueueConfig:
    """Settings of a :class:`PriorityLinkQueue` (the bucket is passed separately).

    Attributes:
        max_rows: bound on rows queued; beyond it the lowest-priority rows are dropped.
        max_backlog_bytes: bound on the wire bytes the queued rows would cost
            (``16 + row_bytes`` each), or None for none.  Bounds the time the
            backlog takes to drain at the link's rate.
        drop_slack: when over a bound, drop down to ``(1 - drop_slack)`` of it.
        score_scale: the score that maps to 0.5 in the bounded priority
            ``u = score / (score + score_scale)``.
        aging_s: seconds of waiting that add 1.0 to a row's effective priority,
            i.e. outweigh any difference in score.
        promote_after_s: head start of high rows, in seconds of aging; also the
            longest a low row waits before it may spend the high reserve.  Keep it
            >= ``aging_s`` so that fresh high rows beat fresh low rows of any score.
        high_reserve: fraction of the bucket's burst that low rows leave for
            high-ish ones (0 disables the reserve).

    Example:
        >>> QueueConfig(max_rows=1000, aging_s=1.0).promote_after_s
        10.0
    """

    max_rows: int = DEFAULT_QUEUE_ROWS
    max_backlog_bytes: int | None = None
    drop_slack: float = DEFAULT_DROP_SLACK
    score_scale: float = DEFAULT_SCORE_SCALE
    aging_s: float = DEFAULT_AGING_S
    promote_after_s: float = DEFAULT_PROMOTE_AFTER_S
    high_reserve: float = DEFAULT_HIGH_RESERVE

    def __post_init__(self) -> None:
        if self.max_rows < 1:
            raise UsageError(f"max_rows must be >= 1, got {self.max_rows}")
        if self.max_backlog_bytes is not None and self.max_backlog_bytes < 1:
            raise UsageError(f"max_backlog_bytes must be >= 1 or None, got {self.max_backlog_bytes}")
        if not 0 <= self.drop_slack < 1:
            raise UsageError(f"drop_slack must be in [0, 1), got {self.drop_slack}")
        if not (self.score_scale > 0 and math.isfinite(self.score_scale)):
            raise UsageError(f"score_scale must be finite and > 0, got {self.score_scale}")
        if not (self.aging_s > 0 and math.isfinite(self.aging_s)):
            raise UsageError(f"aging_s must be finite and > 0, got {self.aging_s}")
        if not (self.promote_after_s >= 0 and math.isfinite(self.promote_after_s)):
            raise UsageError(f"promote_after_s must be finite and >= 0, got {self.promote_after_s}")
        if not 0 <= self.high_reserve < 1:
            raise UsageError(f"high_reserve must be in [0, 1), got {self.high_reserve}")


@dataclass(frozen=True, slots=True)
class QueueStats:
    """A snapshot of a queue's counters ("high"/"low" is the class rows were queued with).

    Attributes:
        rows_high, rows_low, bytes_high, bytes_low: current depth (bytes = wire bytes).
        sent_rows_high, sent_rows_low, sent_bytes_high, sent_bytes_low: taken so far.
        dropped_rows_high, dropped_rows_low: dropped over the bound so far.
        coalesced: puts of a row that was already queued (merged, not added).
        latency_counts_high, latency_counts_low: histogram of queueing latency
            (take time - first enqueue time) of taken rows, one count per bucket of
            :data:`LATENCY_BOUNDS_S` plus a last, open bucket.
        latency_sum_high, latency_sum_low: total latency, seconds.
        latency_max_high, latency_max_low: largest latency seen, seconds.
    """

    rows_high: int
    rows_low: int
    bytes_high: int
    bytes_low: int
    sent_rows_high: int
    sent_rows_low: int
    sent_bytes_high: int
    sent_bytes_low: int
    dropped_rows_high: int
    dropped_rows_low: int
    coalesced: int
    latency_counts_high: tuple[int, ...]
    latency_counts_low: tuple[int, ...]
    latency_sum_high: float
    latency_sum_low: float
    latency_max_high: float
    latency_max_low: float

    def latency_quantile(self, q: float, high: bool = True) -> float:
        """Upper bound of the histogram bucket holding the ``q`` quantile (NaN if none;
        inf if it is in the open bucket)."""
        counts = np.array(self.latency_counts_high if high else self.latency_counts_low)
        total = int(counts.sum())
        if total == 0:
            return math.nan
        i = int(np.searchsorted(np.cumsum(counts), q * total, side="left"))
        return LATENCY_BOUNDS_S[i] if i < len(LATENCY_BOUNDS_S) else math.inf


class _RowQueue:
    """Shared link-queue logic: validation, keys, the token bucket and reserve, frames, counters.

    The rows themselves live in a :class:`~prioritizer.queue_slots.RowSlots` it holds.
    Subclasses choose the key (:meth:`_keys`), the high-ish cut and the reserve.
    Rows are sent in descending key order.
    """

    def __init__(self, bucket: TokenBucket | None, max_rows: int, max_backlog_bytes: int | None,
                 drop_slack: float, reserve_bytes: float) -> None:
        self.bucket = bucket
        self._slots = RowSlots(max_rows, max_backlog_bytes, drop_slack)
        self._reserve = float(reserve_bytes)
        self._t_origin: float | None = None
        # counters of what was sent
        self._sent_rows = [0, 0]
        self._sent_bytes = [0, 0]
        self._lat_counts = [np.zeros(len(LATENCY_BOUNDS_S) + 1, np.int64) for _ in range(2)]
        self._lat_sum = [0.0, 0.0]
        self._lat_max = [0.0, 0.0]
        self._out_parts: list[tuple[np.ndarray, ...]] = []   # taken rows awaiting _frames

    @property
    def max_rows(self) -> int:
        return self._slots.max_rows

    @property
    def max_backlog_bytes(self) -> int | None:
        return self._slots.max_backlog_bytes

    @property
    def drop_slack(self) -> float:
        return self._slots.drop_slack

    # -- LinkQueue --------------------------------------------------------------------------
    @property
    def rows(self) -> int:
        """Rows currently queued."""
        return self._slots.rows

    @property
    def dropped(self) -> int:
        """Rows dropped so far because the queue was over its bound."""
        return self._slots.dropped_cls[0] + self._slots.dropped_cls[1]

    @property
    def queued_bytes(self) -> int:
        """Wire bytes the queued rows would cost."""
        return self._slots.bytes

    def _classify(self, rows: QueuedRows, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Clean float32 scores in [0, MAX_SCORE] and the high flag per row."""
        if rows.scores is None:
            score = np.zeros(n, np.float32)
        else:
            score = np.asarray(rows.scores, dtype=np.float32)
            if score.shape != (n,):
                raise UsageError(f"scores must have shape ({n},), got {score.shape}")
            # NaN -> 0 (fmax ignores NaN) and clip: a bad score must not poison the order
            score = np.minimum(np.fmax(score, np.float32(0.0)), np.float32(MAX_SCORE))
        if rows.high is not None:
            high = np.asarray(rows.high, dtype=bool)
            if high.shape != (n,):
                raise UsageError(f"high must have shape ({n},), got {high.shape}")
        else:
            high = self._default_high(rows, score, n)
        return score, high

    def _default_high(self, rows: QueuedRows, score: np.ndarray, n: int) -> np.ndarray:
        return np.zeros(n, dtype=bool)

    def _keys(self, score: np.ndarray, high: np.ndarray, now: float, n: int) -> np.ndarray:
        raise NotImplementedError

    def _highish_cut(self, now: float) -> float:
        """Rows with key >= this may spend the reserve at ``now``."""
        return -math.inf

    def put(self, rows: QueuedRows, now: float) -> None:
        """Queue rows; a row already queued keeps the greater version, the greater
        priority (key and score), high if either was high, and its first enqueue time."""
        n = len(rows)
        if n == 0:
            return
        ids = np.asarray(rows.ids)
        vers = np.asarray(rows.versions, dtype=np.int64)
        if ids.ndim != 1 or ids.dtype.kind not in "iu" or vers.shape != (n,):
            raise UsageError("ids must be a 1-D integer array and versions int64 of the same shape")
        ids = ids.astype(np.int64, copy=False)
        if int(ids.min()) < 0 or int(ids.max()) > MAX_ROW_ID:
            raise UsageError(f"row ids must be in 0..{MAX_ROW_ID}")
        nb = ROW_OVERHEAD_BYTES + int(rows.row_bytes)
        if self.bucket is not None and nb > self.bucket.burst:
            raise UsageError(f"a {nb}-byte row can never fit the link's {self.bucket.burst:.0f}-byte burst")
        tid = self._slots.table_id(rows.model, rows.table, int(rows.row_bytes))
        if self._t_origin is None:
            self._t_origin = now
        rk = ids | np.int64(tid << ROW_ID_BITS)
        score, high = self._classify(rows, n)
        key = self._keys(score, high, now, n)

        self._slots.add(rk, vers, key, score, high, nb, now)

    # -- sending ----------------------------------------------------------------------------
    def take(self, now: float, max_bytes: int) -> list[QueuedRows]:
        """Remove and return the rows to send now: the longest prefix of the priority
        order that fits ``max_bytes`` (at least one row) and the token bucket, low
        rows leaving the high reserve untouched.  Spends the bucket."""
        if self._slots.rows == 0:
            return []
        tokens = self.bucket.available(now) if self.bucket is not None else math.inf
        cut = self._highish_cut(now)
        used = 0
        cap_bytes = -1
        taken = False
        while self._slots.rows:
            h = self._slots.merged_head()
            hnk, hnb = self._slots.hnk, self._slots.hnb
            if cap_bytes < 0:
                cap_bytes = max(int(max_bytes), int(hnb[0]))
            l_all = min(cap_bytes, tokens) - used
            l_low = min(cap_bytes, tokens - self._reserve) - used
            if l_all < self._slots.min_nb:
                break
            # no row is smaller than min_nb, so this many rows always overflow l_all
            limit = min(h.shape[0], int(l_all // self._slots.min_nb) + 1)
            cs = np.cumsum(hnb[:limit])
            # high-ish rows (key >= cut) are a prefix: they may spend l_all, the rest l_low
            n_hi = limit if cut == -math.inf else int(np.searchsorted(hnk[:limit], -cut, side="right"))
            n = int(np.searchsorted(cs[:n_hi], l_all, side="right"))
            if n == n_hi and n_hi < limit:
                n += int(np.searchsorted(cs[n_hi:], l_low, side="right"))
            if n == 0:
                break
            used += int(cs[n - 1])
            self._slots.head, self._slots.hnk, self._slots.hnb = h[n:], hnk[n:], hnb[n:]
            self._take_rows(h[:n], hnb[:n], now)
            taken = True
            if n < h.shape[0]:
                break
        if not taken:
            return []
        if self.bucket is not None:
            ok = self.bucket.consume(used, now)
            assert ok, "take selected more than the bucket held"
        return self._frames()

    def _take_rows(self, sel: np.ndarray, nb: np.ndarray, now: float) -> None:
        """Gather what the frames need, count the rows sent, and release them."""
        hi = self._slots.high[sel]
        t0 = self._slots.t0[sel]
        rk = self._slots.rk[sel]
        self._out_parts.append((rk, self._slots.ver[sel], self._slots.score[sel], hi, t0))
        lat = now - t0
        np.maximum(lat, 0.0, out=lat)
        n_hi = int(np.count_nonzero(hi))
        for c, cnt in ((1, n_hi), (0, sel.shape[0] - n_hi)):
            if cnt == 0:
                continue
            if cnt == sel.shape[0]:
                lt, b = lat, nb
            else:
                m = hi if c == 1 else ~hi
                lt, b = lat[m], nb[m]
            self._sent_rows[c] += cnt
            self._sent_bytes[c] += int(b.sum())
            self._lat_counts[c] += np.bincount(np.searchsorted(_LAT_BOUNDS, lt, side="left"),
                                               minlength=len(LATENCY_BOUNDS_S) + 1)
            self._lat_sum[c] += float(lt.sum())
            self._lat_max[c] = max(self._lat_max[c], float(lt.max()))
        self._slots.release(sel, rk, hi, nb)

    def _frames(self) -> list[QueuedRows]:
        parts, self._out_parts = self._out_parts, []
        if len(parts) == 1:
            rk, ver, sc, hg, t0 = parts[0]
        else:
            rk, ver, sc, hg, t0 = (np.concatenate(x) for x in zip(*parts))
        tids = rk >> ROW_ID_BITS
        ids = rk & np.int64(MAX_ROW_ID)
        t_first = int(tids[0])
        if (tids == t_first).all():
            groups = [(t_first, None)]
        else:
            # one QueuedRows per table, tables in the order their best row comes, rows
            # in priority order within each
            order = np.argsort(tids, kind="stable")
            st = tids[order]
            starts = np.flatnonzero(np.r_[True, st[1:] != st[:-1]])
            ends = np.r_[starts[1:], st.shape[0]]
            firsts = order[starts]
            groups = [(int(st[a]), order[a:b]) for _, a, b in sorted(zip(firsts.tolist(), starts, ends))]
        out = []
        for t, g in groups:
            model, table, row_bytes = self._slots.tables[t]
            pick = (lambda a: a) if g is None else (lambda a: a[g])
            out.append(QueuedRows(model, table, pick(ids), pick(ver), row_bytes,
                                  scores=pick(sc), high=pick(hg),
                                  enqueued_at=pick(t0)))
        return out

    def next_ready(self, now: float) -> float | None:
        """Earliest time :meth:`take` returns rows, assuming no further puts; None when empty."""
        if self._slots.rows == 0:
            return None
        if self.bucket is None or self.bucket.unlimited:
            return now
        self._slots.merged_head()
        b = float(self._slots.hnb[0])
        key = -float(self._slots.hnk[0])
        wait_all = self.bucket.time_until(b, now)
        if key >= self._highish_cut(now):
            return now + wait_all
        t_low = now + self.bucket.time_until(b + self._reserve, now)
        t_high = max(self._highish_at(key), now + wait_all)
        return min(t_low, t_high)

    def _highish_at(self, key: float) -> float:
        return math.inf

    def stats(self) -> QueueStats:
        """Counters for metrics: depth, bytes sent, drops and queueing latency, by class."""
        return QueueStats(
            rows_high=self._slots.rows_high, rows_low=self._slots.rows - self._slots.rows_high,
            bytes_high=self._slots.bytes_high, bytes_low=self._slots.bytes - self._slots.bytes_high,
            sent_rows_high=self._sent_rows[1], sent_rows_low=self._sent_rows[0],
            sent_bytes_high=self._sent_bytes[1], sent_bytes_low=self._sent_bytes[0],
            dropped_rows_high=self._slots.dropped_cls[1], dropped_rows_low=self._slots.dropped_cls[0],
            coalesced=self._slots.coalesced,
            latency_counts_high=tuple(int(x) for x in self._lat_counts[1]),
            latency_counts_low=tuple(int(x) for x in self._lat_counts[0]),
            latency_sum_high=self._lat_sum[1], latency_sum_low=self._lat_sum[0],
            latency_max_high=self._lat_max[1], latency_max_low=self._lat_max[0])


class PriorityLinkQueue(_RowQueue):
    """Link queue in priority order with aging, a high-priority reserve, coalescing and a bound.

    See the module docstring for the order, the reserve and the starvation bound.

    Args:
        bucket: the link's token bucket (None = unlimited; e.g.
            ``LinkBudgets().bucket(local_dc, peer_dc)``).
        config: bounds and aging; see :class:`QueueConfig`.
        threshold: classifies rows put with ``high=None`` but with scores (the
            queue only reads it; whoever scores updates it once per batch).

    Example:
        >>> import numpy as np
        >>> from p2p.outbound import QueuedRows
        >>> q = PriorityLinkQueue()
        >>> q.put(QueuedRows("m", "t", np.array([1, 2, 3]), np.array([5, 5, 5]), 8,
        ...                  scores=np.array([0.5, 3.0, 1.0], np.float32)), now=0.0)
        >>> q.put(QueuedRows("m", "t", np.array([4]), np.array([6]), 8,
        ...                  scores=np.array([0.1], np.float32), high=np.array([True])), now=0.5)
        >>> q.put(QueuedRows("m", "t", np.array([1]), np.array([9]), 8,
        ...                  scores=np.array([0.2], np.float32)), now=1.0)   # coalesces into row 1
        >>> [(f.ids.tolist(), f.versions.tolist()) for f in q.take(now=1.0, max_bytes=48)]
        [([4, 2], [6, 5])]
        >>> [f.ids.tolist() for f in q.take(now=1.0, max_bytes=1000)], q.rows
        ([[3, 1]], 0)
    """

    def __init__(self, bucket: TokenBucket | None = None, config: QueueConfig | None = None,
                 threshold: ThresholdTracker | None = None) -> None:
        cfg = config or QueueConfig()
        reserve = 0.0 if bucket is None or bucket.unlimited else cfg.high_reserve * bucket.burst
        super().__init__(bucket, cfg.max_rows, cfg.max_backlog_bytes, cfg.drop_slack, reserve)
        self.config = cfg
        self.threshold = threshold
        self._inv_aging = 1.0 / cfg.aging_s
        self._boost = cfg.promote_after_s / cfg.aging_s

    def _default_high(self, rows: QueuedRows, score: np.ndarray, n: int) -> np.ndarray:
        if self.threshold is not None and rows.scores is not None:
            return self.threshold.is_high(rows.model, score)
        return np.zeros(n, dtype=bool)

    def _keys(self, score: np.ndarray, high: np.ndarray, now: float, n: int) -> np.ndarray:
        # time relative to the first put keeps the float64 keys small and exact
        base = -(now - self._t_origin) * self._inv_aging
        sc = score.astype(np.float64)
        key = sc / (sc + self.config.score_scale)
        key += base
        if high.any():
            key += high * self._boost
        return key

    def _highish_cut(self, now: float) -> float:
        if self._t_origin is None:
            return -math.inf
        cut = self._boost - (now - self._t_origin) * self._inv_aging
        return cut - (_KEY_EPS + abs(cut) * _KEY_REL_EPS)

    def _highish_at(self, key: float) -> float:
        return self._t_origin + (self._boost - key) * self.config.aging_s


class FifoBudgetQueue(_RowQueue):
    """First-in-first-out link queue with the same bucket, coalescing and bound (the ``fifo`` baseline).

    A row queued again keeps its first position and its newest version.  Scores
    and the high flag are carried (coalesced, and reported in :meth:`stats` by
    class) but never change the order.  Over the bound the *oldest* rows are
    dropped, as :class:`p2p.outbound.FifoLinkQueue` does (``drop="newest"``
    drops the youngest instead).

    Args:
        bucket: the link's token bucket (None = unlimited).
        max_rows, max_backlog_bytes, drop_slack: the bound, as in :class:`QueueConfig`.
        drop: ``"oldest"`` or ``"newest"``.

    Example:
        >>> import numpy as np
        >>> from p2p.outbound import QueuedRows
        >>> q = FifoBudgetQueue(TokenBucket(rate_bytes_per_s=240, burst_bytes=48))
        >>> q.put(QueuedRows("m", "t", np.array([1, 2]), np.array([5, 5]), 8), now=0.0)
        >>> q.put(QueuedRows("m", "t", np.array([2, 3]), np.array([9, 9]), 8), now=0.0)
        >>> [(f.ids.tolist(), f.versions.tolist()) for f in q.take(now=0.0, max_bytes=10_000)]
        [([1, 2], [5, 9])]
        >>> q.next_ready(now=0.0)
        0.1
    """

    def __init__(self, bucket: TokenBucket | None = None, max_rows: int = DEFAULT_QUEUE_ROWS,
                 max_backlog_bytes: int | None = None, drop_slack: float = DEFAULT_DROP_SLACK,
                 drop: str = "oldest") -> None:
        if drop not in ("oldest", "newest"):
            raise UsageError(f"drop must be 'oldest' or 'newest', got {drop!r}")
        QueueConfig(max_rows=max_rows, max_backlog_bytes=max_backlog_bytes, drop_slack=drop_slack)  # validate
        super().__init__(bucket, max_rows, max_backlog_bytes, drop_slack, 0.0)
        self._slots.drop_highest_keys = drop == "oldest"
        self._seq = 0.0

    def _keys(self, score: np.ndarray, high: np.ndarray, now: float, n: int) -> np.ndarray:
        # earlier puts get greater keys; coalescing keeps the greater, i.e. the first place
        key = -(self._seq + np.arange(n, dtype=np.float64))
        self._seq += n
        return key
