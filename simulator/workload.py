"""Update workloads: which rows trainers change, how many, and when.

Everything is drawn from a numpy ``Generator`` the caller passes (``sim.np_rng``
or ``sim.derive_np_rng("workload")``), so a seed fixes the workload.

Model of a sparse table (recommendation embeddings):

* Popularity is Zipf: the row of popularity rank ``k`` (1-based) is updated with
  probability proportional to ``k ** -s``.  ``s`` around 1 is typical of
  user/item embeddings (a few hot rows take most updates).  Ranks map to row ids
  through a fixed affine bijection (``id = (a * rank + b) mod rows``) so hot rows
  are spread over the table's contiguous shards instead of all sitting in shard 0.
* Brand-new rows: a ``new_row_fraction`` of each batch's updates create rows that
  never existed (new users, new items).  They take the next unused ranks (the
  cold tail), so afterwards they are drawn like any other existing row.
  ``initial_rows`` < ``rows`` leaves that headroom; once the table is full, new-row
  draws become ordinary updates (counted in ``Workload.new_rows_exhausted``).
* Rate: ``rows_per_s`` updates per second, emitted every ``batch_interval_s`` as
  one batch (Poisson-sized around the mean by default).  Updates to one row inside
  a batch collapse into one, as a trainer publishes a row's latest value once, so
  a batch of hot rows holds fewer ids than were drawn.
* Bursts multiply the rate during ``[t0, t1)`` (e.g. a breaking-news spike);
  overlapping bursts multiply.
* Impact (the scheduler's update magnitude): log-normal per row, new rows
  scaled by ``new_row_impact`` since a fresh embedding moves far from its init.

Dense tables (MLP weights, chunked one row per chunk) are replaced whole every
``period_s``: a batch with every row id.

Example:
    >>> import numpy as np
    >>> cfg = WorkloadConfig(sparse=[SparseTable("m", "emb", rows=10_000, rows_per_s=1000)],
    ...                      dense=[DenseTable("m", "mlp", rows=8, period_s=1.0)])
    >>> w = Workload(cfg, np.random.default_rng(0))
    >>> [(round(b.time, 1), b.table, len(b.ids) > 0) for b in w.batches(until=1.0)][-3:]
    [(0.9, 'emb', True), (1.0, 'emb', True), (1.0, 'mlp', True)]
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import numpy as np

from ekko.core.errors import UsageError

__all__ = ["ZipfRows", "SparseTable", "DenseTable", "Burst", "WorkloadConfig", "UpdateBatch", "Workload",
           "WorkloadDriver"]

#: largest table ZipfRows scrambles: a * rank stays below 2**62, so int64 never overflows.
MAX_ZIPF_ROWS = 1 << 31
#: ZipfRows draws this many extra candidates per round (rejection-inversion accepts
#: well over 90% for s in (0, 3]); fewer rounds, little waste.
_ZIPF_OVERDRAW = 1.15
#: bound on one batch, a guard against a rate typo (1e12 rows/s) exhausting memory.
MAX_BATCH_ROWS = 1 << 24


class ZipfRows:
    """Zipf-distributed row ids over ``[0, rows)``, sampled vectorized with numpy.

    Rejection-inversion sampling (Hörmann and Derflinger 1996): O(1) memory and
    time per sample whatever the table size, any exponent ``s >= 0`` (0 is uniform).

    Args:
        rows: table size (ids are ``0..rows-1``), at most ``MAX_ZIPF_ROWS``.
        s: Zipf exponent; rank k is drawn with probability proportional to ``k**-s``.
        rng: numpy Generator (also picks the scrambling bijection).
        scramble: map ranks to ids through an affine bijection (spreads hot rows
            across shards); False makes the id equal to ``rank - 1``.

    Example:
        >>> z = ZipfRows(1_000_000, 1.1, np.random.default_rng(1))
        >>> ids = z.sample(100_000)
        >>> ids.dtype, int(ids.min()) >= 0, int(ids.max()) < 1_000_000
        (dtype('int64'), True, True)
        >>> bool(np.isin(ids, z.top_ids(10)).mean() > 0.3)  # 10 rows of a million take >30%
        True
    """

    def __init__(self, rows: int, s: float, rng: np.random.Generator, scramble: bool = True) -> None:
        if not 0 < rows <= MAX_ZIPF_ROWS:
            raise UsageError(f"rows must be in 1..{MAX_ZIPF_ROWS}, got {rows}")
        if not 0.0 <= s <= 10.0:
            raise UsageError(f"Zipf exponent must be in [0, 10], got {s}")
        self.rows, self.s, self.rng = int(rows), float(s), rng
        if scramble and rows > 1:
            a = int(rng.integers(rows // 3 + 1, rows)) | 1
            while math.gcd(a, rows) != 1:
                a += 1
            self._a, self._b = a % rows, int(rng.integers(0, rows))
        else:
            self._a, self._b = 1, 0
        self._consts: dict[int, tuple[float, float, float]] = {}

    # helpers of the sampler, vectorized; stable near 0 where the closed forms lose precision
    def _h_integral(self, x: np.ndarray | float) -> Any:
        log_x = np.log(x)
        return _helper2((1.0 - self.s) * log_x) * log_x

    def _h(self, x: np.ndarray | float) -> Any:
        return np.exp(-self.s * np.log(x))

    def _h_integral_inverse(self, x: np.ndarray) -> np.ndarray:
        t = np.maximum(x * (1.0 - self.s), -1.0)
        return np.exp(_helper1(t) * x)

    def _constants(self, n: int) -> tuple[float, float, float]:
        c = self._consts.get(n)
        if c is None:
            x1 = float(self._h_integral(1.5)) - 1.0
            xn = float(self._h_integral(n + 0.5))
            squeeze = 2.0 - float(self._h_integral_inverse(np.array(self._h_integral(2.5) - self._h(2.0))))
            c = self._consts[n] = (x1, xn, squeeze)
            if len(self._consts) > 64:  # active size changes as rows are born; keep the cache small
                self._consts.pop(next(iter(self._consts)))
        return c

    def sample_ranks(self, size: int, active: int | None = None) -> np.ndarray:
        """``size`` 1-based popularity ranks over the ``active`` (default all) most popular rows."""
        n = self.rows if active is None else int(active)
        if not 0 < n <= self.rows:
            raise UsageError(f"active must be in 1..{self.rows}, got {n}")
        if size <= 0:
            return np.empty(0, np.int64)
        x1, xn, squeeze = self._constants(n)
        out = np.empty(size, np.int64)
        filled = 0
        while filled < size:
            want = size - filled
            u = xn + self.rng.random(int(want * _ZIPF_OVERDRAW) + 8) * (x1 - xn)
            x = self._h_integral_inverse(u)
            k = np.clip(np.floor(x + 0.5), 1, n)
            ok = (k - x <= squeeze) | (u >= self._h_integral(k + 0.5) - self._h(k))
            got = k[ok][:want].astype(np.int64)
            out[filled:filled + got.size] = got
            filled += got.size
        return out

    def ids_of_ranks(self, ranks: np.ndarray) -> np.ndarray:
        """Row ids of 1-based ranks (the fixed bijection)."""
        r = np.asarray(ranks, np.int64) - 1
        return (r * self._a + self._b) % self.rows

    def sample(self, size: int, active: int | None = None) -> np.ndarray:
        """``size`` row ids (int64, repeats included) drawn by popularity."""
        return self.ids_of_ranks(self.sample_ranks(size, active))

    def top_ids(self, k: int) -> np.ndarray:
        """Ids of the ``k`` most popular rows, most popular first."""
        return self.ids_of_ranks(np.arange(1, min(k, self.rows) + 1))


def _helper1(x: np.ndarray) -> np.ndarray:
    """log1p(x) / x, continuous at 0."""
    x = np.asarray(x, np.float64)
    small = np.abs(x) <= 1e-8
    safe = np.where(small, 1.0, x)
    return np.where(small, 1.0 - x * (0.5 - x * (1.0 / 3.0 - 0.25 * x)), np.log1p(safe) / safe)


def _helper2(x: Any) -> Any:
    """expm1(x) / x, continuous at 0."""
    x = np.asarray(x, np.float64)
    small = np.abs(x) <= 1e-8
    safe = np.where(small, 1.0, x)
    return np.where(small, 1.0 + x * 0.5 * (1.0 + x / 3.0 * (1.0 + 0.25 * x)), np.expm1(safe) / safe)


# --- configuration ---------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class SparseTable:
    """Update stream of one embedding table.

    Args:
        model, table: names, as in the model's spec.
        rows: table capacity; ids are ``0..rows-1``.
        rows_per_s: mean row updates drawn per second (before a batch collapses
            repeats of one row).
        zipf_s: popularity exponent (0 = uniform; ~1 typical; higher = more skew).
        initial_rows: rows existing at time 0 (default: all); the rest is
            headroom for brand-new rows.
        new_row_fraction: share [0, 1] of updates that create a brand-new row.
        impact_sigma: sigma of the log-normal impact (mu = 0, so median impact 1).
        new_row_impact: impact multiplier of brand-new rows.

    Example:
        >>> SparseTable("ads", "user", rows=1 << 20, rows_per_s=5e4, initial_rows=1 << 19,
        ...             new_row_fraction=0.01).rows_per_s
        50000.0
    """

    model: str
    table: str
    rows: int
    rows_per_s: float
    zipf_s: float = 1.05
    initial_rows: int | None = None
    new_row_fraction: float = 0.0
    impact_sigma: float = 1.0
    new_row_impact: float = 4.0

    def __post_init__(self) -> None:
        if not 0 < self.rows <= MAX_ZIPF_ROWS:
            raise UsageError(f"{self.model}/{self.table}: rows must be in 1..{MAX_ZIPF_ROWS}")
        if not self.rows_per_s >= 0:
            raise UsageError(f"{self.model}/{self.table}: rows_per_s must be >= 0")
        if self.initial_rows is not None and not 0 < self.initial_rows <= self.rows:
            raise UsageError(f"{self.model}/{self.table}: initial_rows must be in 1..rows")
        if not 0.0 <= self.new_row_fraction <= 1.0:
            raise UsageError(f"{self.model}/{self.table}: new_row_fraction must be in [0, 1]")
        if self.impact_sigma < 0 or self.new_row_impact <= 0:
            raise UsageError(f"{self.model}/{self.table}: impact_sigma >= 0 and new_row_impact > 0")


@dataclass(frozen=True, slots=True)
class DenseTable:
    """A dense table replaced whole every ``period_s`` seconds.

    Args:
        model, table: names.
        rows: rows (tensor chunks) in the table; every one is in each batch.
        period_s: seconds between full updates.
        offset_s: time of the first update (default ``period_s``).
        impact: impact given to every row.
    """

    model: str
    table: str
    rows: int
    period_s: float
    offset_s: float | None = None
    impact: float = 1.0

    def __post_init__(self) -> None:
        if not 0 < self.rows <= MAX_BATCH_ROWS or not self.period_s > 0:
            raise UsageError(f"{self.model}/{self.table}: rows in 1..{MAX_BATCH_ROWS} and period_s > 0")


@dataclass(frozen=True, slots=True)
class Burst:
    """Multiply update rates by ``multiplier`` during ``[t0, t1)`` seconds.

    Args:
        t0, t1: start and end, simulated seconds.
        multiplier: rate factor (> 0; 1 does nothing, 0.5 halves).
        model, table: restrict to one model and/or table (None: all sparse tables).
    """

    t0: float
    t1: float
    multiplier: float
    model: str | None = None
    table: str | None = None

    def __post_init__(self) -> None:
        if not self.t1 > self.t0 or not self.multiplier > 0:
            raise UsageError("a burst needs t1 > t0 and multiplier > 0")

    def applies(self, t: SparseTable) -> bool:
        return (self.model is None or self.model == t.model) and (self.table is None or self.table == t.table)


@dataclass(frozen=True, slots=True)
class WorkloadConfig:
    """Everything a :class:`Workload` emits.

    Args:
        sparse: embedding-table update streams.
        dense: dense tables updated whole, periodically.
        bursts: rate multipliers over time windows.
        batch_interval_s: seconds between sparse batches (each covers the
            interval before its timestamp).
        poisson: draw each batch's update count from Poisson(rate * interval);
            False uses the mean, carrying the fractional part to the next batch.
    """

    sparse: Sequence[SparseTable] = ()
    dense: Sequence[DenseTable] = ()
    bursts: Sequence[Burst] = field(default_factory=tuple)
    batch_interval_s: float = 0.1
    poisson: bool = True

    def __post_init__(self) -> None:
        if not self.batch_interval_s > 0:
            raise UsageError("batch_interval_s must be > 0")
        names = [(t.model, t.table) for t in [*self.sparse, *self.dense]]
        if len(set(names)) != len(names):
            raise UsageError("each (model, table) may appear once in a workload")


class UpdateBatch(NamedTuple):
    """One publish: rows of one table changed by a trainer.

    Attributes:
        time: simulated seconds when the batch is ready to publish.
        model, table: where the rows live.
        ids: int64 row ids, unique within the batch (not sorted).
        impact: float32 magnitude of each row's change, aligned with ``ids``.
    """

    time: float
    model: str
    table: str
    ids: np.ndarray
    impact: np.ndarray


# --- the generator -------------------------------------------------------------------------

class _SparseState:
    __slots__ = ("spec", "zipf", "existing", "carry", "updates", "new_rows")

    def __init__(self, spec: SparseTable, rng: np.random.Generator) -> None:
        self.spec = spec
        self.zipf = ZipfRows(spec.rows, spec.zipf_s, rng)
        self.existing = spec.rows if spec.initial_rows is None else spec.initial_rows
        self.carry = 0.0
        self.updates = 0
        self.new_rows = 0


class Workload:
    """Generates :class:`UpdateBatch` es from a :class:`WorkloadConfig`, in time order.

    Args:
        config: what to generate.
        rng: numpy Generator; the same seed gives the same batches.

    Attributes:
        updates: row updates drawn so far (before in-batch collapsing).
        new_rows: brand-new rows created so far.
        new_rows_exhausted: new-row draws that found the table full.

    Example:
        >>> from simulator.events import Simulation
        >>> sim = Simulation(seed=1)
        >>> w = Workload(WorkloadConfig(sparse=[SparseTable("m", "t", 1000, rows_per_s=200)]), sim.np_rng)
        >>> got = []
        >>> driver = w.drive(sim, got.append)
        >>> _ = sim.run(until=1.05)
        >>> len(got), got[-1].time
        (10, 1.0)
    """

    def __init__(self, config: WorkloadConfig, rng: np.random.Generator) -> None:
        self.config, self.rng = config, rng
        self._sparse = [_SparseState(s, rng) for s in config.sparse]
        self.new_rows_exhausted = 0

    @property
    def updates(self) -> int:
        return sum(s.updates for s in self._sparse)

    @property
    def new_rows(self) -> int:
        return sum(s.new_rows for s in self._sparse)

    def zipf(self, model: str, table: str) -> ZipfRows:
        """The popularity sampler of a sparse table (e.g. for ``top_ids``)."""
        for s in self._sparse:
            if (s.spec.model, s.spec.table) == (model, table):
                return s.zipf
        raise UsageError(f"no sparse table {model}/{table} in this workload")

    def rate(self, spec: SparseTable, a: float, b: float) -> float:
        """Mean updates of ``spec`` in ``(a, b]``: rows_per_s integrated with the bursts."""
        cuts = sorted({a, b, *(x for br in self.config.bursts if br.applies(spec)
                               for x in (br.t0, br.t1) if a < x < b)})
        total = 0.0
        for lo, hi in zip(cuts, cuts[1:]):
            mult = 1.0
            for br in self.config.bursts:
                if br.applies(spec) and br.t0 <= lo and hi <= br.t1:
                    mult *= br.multiplier
            total += (hi - lo) * mult
        return spec.rows_per_s * total

    def batches(self, until: float, start: float = 0.0) -> Iterator[UpdateBatch]:
        """Batches with ``start < time <= until``, in time order (ties: config order, sparse first).

        The generator is stateful (tables grow, carry accumulates): consume it once.
        """
        dt = self.config.batch_interval_s
        heap: list[tuple[float, int, int]] = []
        # (time, source index, step): integer step avoids accumulating float error
        for i in range(len(self._sparse)):
            heap.append((start + dt, i, 1))
        for j, d in enumerate(self.config.dense):
            first = d.period_s if d.offset_s is None else d.offset_s
            k0 = 0
            while first + k0 * d.period_s <= start:
                k0 += 1
            heap.append((first + k0 * d.period_s, len(self._sparse) + j, k0))
        heapq.heapify(heap)
        eps = dt * 1e-9
        while heap and heap[0][0] <= until + eps:
            t, src, step = heapq.heappop(heap)
            if src < len(self._sparse):
                yield self._sparse_batch(self._sparse[src], t - dt, t)
                heapq.heappush(heap, (start + (step + 1) * dt, src, step + 1))
            else:
                d = self.config.dense[src - len(self._sparse)]
                yield UpdateBatch(t, d.model, d.table, np.arange(d.rows, dtype=np.int64),
                                  np.full(d.rows, d.impact, np.float32))
                first = d.period_s if d.offset_s is None else d.offset_s
                heapq.heappush(heap, (first + (step + 1) * d.period_s, src, step + 1))

    def _sparse_batch(self, st: _SparseState, a: float, b: float) -> UpdateBatch:
        spec, rng = st.spec, self.rng
        mean = self.rate(spec, a, b)
        if self.config.poisson:
            n = int(rng.poisson(mean))
        else:
            st.carry += mean
            n = int(st.carry)
            st.carry -= n
        if n > MAX_BATCH_ROWS:
            raise UsageError(f"{spec.model}/{spec.table}: {n} updates in one batch exceeds "
                             f"MAX_BATCH_ROWS={MAX_BATCH_ROWS}; lower rows_per_s or batch_interval_s")
        n_new = int(rng.binomial(n, spec.new_row_fraction)) if spec.new_row_fraction and n else 0
        room = spec.rows - st.existing
        if n_new > room:
            self.new_rows_exhausted += n_new - room
            n_new = room
        old = np.unique(st.zipf.sample(n - n_new, st.existing)) if n > n_new else np.empty(0, np.int64)
        new = st.zipf.ids_of_ranks(np.arange(st.existing + 1, st.existing + n_new + 1))
        st.existing += n_new
        st.updates += n
        st.new_rows += n_new
        ids = np.concatenate([old, new]) if n_new else old
        impact = rng.lognormal(0.0, spec.impact_sigma, ids.size).astype(np.float32)
        if n_new:
            impact[old.size:] *= spec.new_row_impact
        return UpdateBatch(b, spec.model, spec.table, ids, impact)

    def drive(self, sim: Any, on_batch: Callable[[UpdateBatch], Any], until: float = math.inf) -> "WorkloadDriver":
        """Deliver batches on ``sim`` at their times: ``on_batch(batch)``, until ``until``.

        Batches are generated one at a time as the clock reaches them, so memory
        does not grow with the horizon.
        """
        return WorkloadDriver(sim, self.batches(until, start=sim.now), on_batch)


class WorkloadDriver:
    """Feeds a batch iterator into a simulation; made by :meth:`Workload.drive`."""

    __slots__ = ("sim", "_it", "_on_batch", "_handle", "delivered")

    def __init__(self, sim: Any, it: Iterator[UpdateBatch], on_batch: Callable[[UpdateBatch], Any]) -> None:
        self.sim, self._it, self._on_batch = sim, it, on_batch
        self.delivered = 0
        self._handle = None
        self._next()

    def _next(self) -> None:
        batch = next(self._it, None)
        self._handle = None if batch is None else self.sim.schedule_at(batch.time, self._fire, batch)

    def _fire(self, batch: UpdateBatch) -> None:
        self._next()  # queue the next one first: on_batch may stop the driver
        self.delivered += 1
        self._on_batch(batch)

    def stop(self) -> None:
        if self._handle is not None:
            self.sim.cancel(self._handle)
            self._handle = None
