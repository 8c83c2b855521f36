"""A table's values as they were at one instant, read block by block while applies go on.

A snapshot must hold every row as it was at one instant (the log is rotated there),
and cloning a whole table for it costs the table's size again in memory (+256 MB of
peak RSS for a 1M x 64 float32 table) and one long copy on the event loop. Writing the
live tensor straight to disk instead would mix old and new rows.

:class:`FrozenValues` is copy-on-write at row granularity. From :meth:`TableStore.freeze`
on, every write of the store first saves the old values of the rows it is about to
change, unless the snapshot's reader is already past them or they were saved before;
:meth:`FrozenValues.block` copies a block of the live tensor and puts the saved rows
back into it. The extra memory is the rows written while the snapshot is being read
(plus one block), not the table.

Threads: :meth:`block` must run on the thread that writes the store (the event loop in
the daemon), so that no write happens half-way through a copy; a reader on another
thread passes ``run`` to hop there (:func:`call_on_loop`).

Example:
    >>> import numpy as np
    >>> from ekko.core.delta import Delta
    >>> from ekko.core.spec import TableSpec
    >>> from ekko.core.store import TableStore
    >>> ts = TableStore(TableSpec("t", rows=4, dim=1), device="cpu")
    >>> frozen = ts.freeze()
    >>> _ = ts.apply(Delta("m", "t", np.array([2]), np.array([5]), np.ones((1, 1), np.float32)))
    >>> ts.values[:, 0].tolist(), frozen.block(0, 4)[:, 0].tolist()
    ([0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0])
    >>> frozen.close()
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from typing import Callable, Protocol, TypeVar

import numpy as np
import torch

#: bytes of values copied on the writing thread per :meth:`FrozenValues.block` call of a
#: snapshot: small enough that applies wait at most a few milliseconds behind one.
FROZEN_BLOCK_BYTES = 8 << 20
#: seconds a reader on another thread waits for the loop to copy one block before it
#: gives up (the snapshot then fails; the loop may be stopping).
LOOP_HOP_TIMEOUT_S = 60.0

T = TypeVar("T")


class FreezableTable(Protocol):
    """What a view needs of its table (:class:`ekko.core.store.TableStore`; named here
    structurally so that this module does not import the store that imports it)."""

    values: torch.Tensor | None

    def _unfreeze(self, frozen: "FrozenValues") -> None: ...


class FrozenValues:
    """The values of one :class:`~ekko.core.store.TableStore` at the instant of
    :meth:`TableStore.freeze`, read in ascending row blocks (see the module doc).

    Attributes:
        rows, dim, dtype: the table's shape and torch dtype.
        saved_rows: rows whose old values were saved so far (for metrics and tests).
    """

    def __init__(self, store: FreezableTable, run: Callable[[Callable[[], T]], T] | None = None) -> None:
        if store.values is None:
            raise ValueError("a store without values has nothing to freeze")
        self._store = store
        self._run = run
        self.rows, self.dim = int(store.values.shape[0]), int(store.values.shape[1])
        self.dtype = store.values.dtype
        # Rows below _done were handed out by block(); they need no saving any more.
        self._done = 0
        self._saved = np.zeros(self.rows, dtype=bool)
        self._saved_ids: list[np.ndarray] = []        # each ascending
        self._saved_values: list[torch.Tensor] = []   # on the CPU, row i of each = id i's value
        self.saved_rows = 0
        self._closed = False

    # -- the writer's side (called by TableStore before every write of values) ---------
    def before_write(self, ids: np.ndarray) -> None:
        """Save the current values of the rows in ``ids`` that the reader still needs."""
        ids = ids[ids >= self._done] if self._done else ids
        if not len(ids):
            return
        ids = ids[~self._saved[ids]]
        if not len(ids):
            return
        ids = np.unique(ids)   # sorted, and a repeated id saved once
        self._saved[ids] = True
        values = self._store.values
        assert values is not None
        self._saved_values.append(
            values.index_select(0, torch.from_numpy(ids).to(values.device)).to("cpu"))
        self._saved_ids.append(ids)
        self.saved_rows += len(ids)

    # -- the reader's side -------------------------------------------------------------
    def block(self, lo: int, hi: int) -> torch.Tensor:
        """Rows ``lo:hi`` as they were at the freeze, a CPU tensor of their own.

        Blocks must be read in order, each starting where the last ended.
        """
        if self._run is not None:
            return self._run(lambda: self._block(lo, hi))
        return self._block(lo, hi)

    def _block(self, lo: int, hi: int) -> torch.Tensor:
        if self._closed:
            raise RuntimeError("frozen values read after close()")
        if lo != self._done or not lo < hi <= self.rows:
            raise ValueError(f"block {lo}:{hi} out of order (next row {self._done}, {self.rows} rows)")
        values = self._store.values
        assert values is not None
        out = values[lo:hi].detach().to("cpu", copy=True)
        keep_ids, keep_values = [], []
        for ids, vals in zip(self._saved_ids, self._saved_values):
            a, b = np.searchsorted(ids, [lo, hi])
            if a < b:
                out[torch.from_numpy(ids[a:b] - lo)] = vals[a:b]
            if b < len(ids):          # rows beyond this block: still needed
                keep_ids.append(ids[b:])
                keep_values.append(vals[b:])
        self._saved_ids, self._saved_values = keep_ids, keep_values
        self._done = hi
        return out

    def close(self) -> None:
        """Stop saving rows (the store forgets this view); reads fail from now on."""
        if not self._closed:
            self._closed = True
            self._store._unfreeze(self)
            self._saved_ids, self._saved_values = [], []


def call_on_loop(loop: asyncio.AbstractEventLoop,
                 timeout: float = LOOP_HOP_TIMEOUT_S) -> Callable[[Callable[[], T]], T]:
    """A ``run`` for :class:`FrozenValues` read on a worker thread: ``run(fn)`` calls ``fn``
    on ``loop``'s thread and returns its result (or raises its exception)."""
    def run(fn: Callable[[], T]) -> T:
        fut: concurrent.futures.Future = concurrent.futures.Future()

        def go() -> None:
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except BaseException as e:  # noqa: BLE001 -- handed to the waiting thread
                    fut.set_exception(e)

        loop.call_soon_threadsafe(go)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise
    return run
