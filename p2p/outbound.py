"""Per-peer outbound queues for the eager-push path.

The push path is state-based: a queue holds *references* to rows (table, row
id, the version that was current when queued, a priority score) and the node
reads the rows' current values from its store when it sends them.  So a row
queued twice travels once, as its latest value, and queue memory is a few
bytes per row whatever the row width.

:class:`LinkQueue` is the interface; :class:`FifoLinkQueue` is the plain
first-in-first-out implementation.  The priority scheduler in
:mod:`prioritizer` provides another with the same interface, and the node takes
a factory so either can be plugged in.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np

#: default bound on rows held per link queue; beyond it the oldest (FIFO) or
#: lowest-priority rows are dropped and left to anti-entropy.
DEFAULT_QUEUE_ROWS = 1 << 20


@dataclass(frozen=True, slots=True)
class QueuedRows:
    """A batch of row references queued for one peer.

    Attributes:
        model, table: where the rows live.
        ids: int64 row ids.
        versions: packed versions current when queued (int64).
        row_bytes: wire bytes of one row's value (for budgets).
        scores: float32 priority per row, or None (FIFO).
        high: bool per row: above the high-priority threshold, or None.
        enqueued_at: float64 time each row was (first) queued.
    """

    model: str
    table: str
    ids: np.ndarray
    versions: np.ndarray
    row_bytes: int
    scores: np.ndarray | None = None
    high: np.ndarray | None = None
    enqueued_at: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @property
    def nbytes(self) -> int:
        """Wire bytes these rows cost: id + version + value each."""
        return len(self) * (16 + self.row_bytes)


class LinkQueue(Protocol):
    """What the push path needs from a per-peer outbound queue.

    Implementations are sans-IO: time comes in as ``now`` (seconds).
    """

    def put(self, rows: QueuedRows, now: float) -> None:
        """Queue rows; a row already queued keeps the later version (coalescing)."""

    def take(self, now: float, max_bytes: int) -> list[QueuedRows]:
        """Remove and return rows to send now, at most ``max_bytes`` of them (at least one
        row if any is ready), honouring the queue's own budget if it has one."""

    def next_ready(self, now: float) -> float | None:
        """Earliest time at which :meth:`take` may return rows, or None when empty."""

    @property
    def rows(self) -> int:
        """Rows currently queued."""

    @property
    def dropped(self) -> int:
        """Rows dropped so far because the queue was over its bound (anti-entropy covers them)."""


QueueFactory = Callable[[str, str], LinkQueue]
"""``factory(peer_id, peer_dc) -> LinkQueue``: one queue per outbound link."""


class FifoLinkQueue:
    """First-in-first-out link queue with coalescing and a row bound.

    Coalescing is per (model, table, row): a row put again while queued keeps
    its first position and its newer version.  When over ``max_rows`` the
    oldest batches are dropped; anti-entropy repairs whatever a push missed.

    Example:
        >>> import numpy as np
        >>> q = FifoLinkQueue(max_rows=100)
        >>> q.put(QueuedRows("m", "t", np.array([1, 2]), np.array([5, 5]), 8), now=0.0)
        >>> q.put(QueuedRows("m", "t", np.array([2, 3]), np.array([9, 9]), 8), now=0.1)
        >>> [(b.ids.tolist(), b.versions.tolist()) for b in q.take(now=0.2, max_bytes=10_000)]
        [([1, 2, 3], [5, 9, 9])]
    """

    def __init__(self, max_rows: int = DEFAULT_QUEUE_ROWS) -> None:
        self.max_rows = max_rows
        # (model, table) -> OrderedDict row -> (version, enqueued_at); insertion order is FIFO
        # order within a table, and batches interleave tables through self._order.
        self._tables: dict[tuple[str, str], "OrderedDict[int, tuple[int, float]]"] = {}
        self._row_bytes: dict[tuple[str, str], int] = {}
        self._order: "OrderedDict[tuple[str, str], None]" = OrderedDict()
        self._rows = 0
        self._dropped = 0

    @property
    def rows(self) -> int:
        return self._rows

    @property
    def dropped(self) -> int:
        return self._dropped

    def put(self, rows: QueuedRows, now: float) -> None:
        key = (rows.model, rows.table)
        tab = self._tables.setdefault(key, OrderedDict())
        self._row_bytes[key] = rows.row_bytes
        self._order.setdefault(key, None)
        before = len(tab)
        for rid, ver in zip(rows.ids.tolist(), rows.versions.tolist()):
            cur = tab.get(rid)
            if cur is None:
                tab[rid] = (ver, now)
            elif ver > cur[0]:
                tab[rid] = (ver, cur[1])
        self._rows += len(tab) - before
        while self._rows > self.max_rows:
            k = next(iter(self._order))
            t = self._tables[k]
            excess = min(len(t), self._rows - self.max_rows)
            for _ in range(excess):
                t.popitem(last=False)
            self._rows -= excess
            self._dropped += excess
            if not t:
                del self._tables[k], self._order[k]

    def take(self, now: float, max_bytes: int) -> list[QueuedRows]:
        out: list[QueuedRows] = []
        budget = max_bytes
        while self._order and budget > 0:
            key = next(iter(self._order))
            tab = self._tables[key]
            rb = self._row_bytes[key] + 16
            n = max(1, budget // rb) if not out else budget // rb
            if n == 0:
                break
            items = [tab.popitem(last=False) for _ in range(min(n, len(tab)))]
            ids = np.fromiter((i for i, _ in items), np.int64, len(items))
            vers = np.fromiter((v for _, (v, _) in items), np.int64, len(items))
            at = np.fromiter((t for _, (_, t) in items), np.float64, len(items))
            out.append(QueuedRows(key[0], key[1], ids, vers, self._row_bytes[key], enqueued_at=at))
            self._rows -= len(items)
            budget -= len(items) * rb
            if not tab:
                del self._tables[key], self._order[key]
        return out

    def next_ready(self, now: float) -> float | None:
        return now if self._rows else None
