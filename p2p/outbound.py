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

from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Protocol

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
        links: publish-chain links, int64 rows ``[shard, origin, after, upto]``, these rows
            complete: every row the publisher sent for that shard in that frame is
            here, so a receiver may advance its knowledge as the ingest did.  A
            selection of rows keeps the links of the shards it holds whole and drops
            the others (:func:`_select`; without ``shards`` it drops them all).
        shards: the shard of each row, rows grouped by shard (with ``links``): the
            FIFO queue then splits a batch at shard boundaries, so a batch over a
            frame's budget still carries its links, each with the frame that holds
            its shard's rows.
    """

    model: str
    table: str
    ids: np.ndarray
    versions: np.ndarray
    row_bytes: int
    scores: np.ndarray | None = None
    high: np.ndarray | None = None
    enqueued_at: np.ndarray | None = None
    links: np.ndarray | None = None
    shards: np.ndarray | None = None

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

    Batches are kept as arrays (no per-row Python work).  Coalescing is per
    (model, table, row): a row put again while queued leaves its old place and
    joins the tail with its newer version (with eager flushing the queue is
    nearly always short, so this is a few vector ops) -- except from a batch that
    carries publish-chain links, which stays whole: taking a row out would void
    its links and leave its receivers' chains waiting for a gap probe and a pull
    (4 publishers on 3x3 daemons: 10-80k of ~190k rows by pull at the far DCs).
    Such a row goes twice, each time at the version current when it is sent.
    When over ``max_rows`` the oldest batches are dropped; anti-entropy repairs
    whatever a push missed.

    Example:
        >>> import numpy as np
        >>> q = FifoLinkQueue(max_rows=100)
        >>> q.put(QueuedRows("m", "t", np.array([1, 2]), np.array([5, 5]), 8), now=0.0)
        >>> q.put(QueuedRows("m", "t", np.array([2, 3]), np.array([9, 9]), 8), now=0.1)
        >>> [(b.ids.tolist(), b.versions.tolist()) for b in q.take(now=0.2, max_bytes=10_000)]
        [([1], [5]), ([2, 3], [9, 9])]
    """

    def __init__(self, max_rows: int = DEFAULT_QUEUE_ROWS) -> None:
        self.max_rows = max_rows
        self._q: deque[QueuedRows] = deque()
        self._rows = 0
        self._dropped = 0

    @property
    def rows(self) -> int:
        return self._rows

    @property
    def dropped(self) -> int:
        return self._dropped

    def put(self, rows: QueuedRows, now: float) -> None:
        if not len(rows):
            return
        if self._q:
            kept: deque[QueuedRows] = deque()
            for b in self._q:
                if b.model == rows.model and b.table == rows.table and b.links is None:
                    stale = np.isin(b.ids, rows.ids)
                    if stale.any():
                        self._rows -= int(stale.sum())
                        b = _select(b, ~stale)
                        if not len(b):
                            continue
                kept.append(b)
            self._q = kept
        at = rows.enqueued_at if rows.enqueued_at is not None else _times(len(rows), now)
        self._q.append(QueuedRows(rows.model, rows.table, rows.ids, rows.versions, rows.row_bytes,
                                  rows.scores, rows.high, at, rows.links, rows.shards))
        self._rows += len(rows)
        while self._rows > self.max_rows:
            b = self._q.popleft()
            self._rows -= len(b)
            self._dropped += len(b)

    def take(self, now: float, max_bytes: int) -> list[QueuedRows]:
        out: list[QueuedRows] = []
        budget = max_bytes
        while self._q and budget > 0:
            b = self._q[0]
            per = b.row_bytes + 16
            n = budget // per
            if n == 0 and not out:
                n = 1
            if n == 0:
                break
            if n < len(b) and b.links is not None and b.shards is not None:
                k = _shard_boundary(b.shards, n)
                if k == 0 and out:
                    break   # the rest of the budget would split a shard: next frame
                n = k or n
            if n >= len(b):
                self._q.popleft()
                out.append(b)
                taken = len(b)
            else:
                out.append(_select(b, slice(0, n)))
                self._q[0] = _select(b, slice(n, None))
                taken = n
            self._rows -= taken
            budget -= taken * per
        return out

    def next_ready(self, now: float) -> float | None:
        return now if self._rows else None


_TIMES: list[Any] = [None]


def _times(n: int, now: float) -> np.ndarray:
    """``np.full(n, now)``, read-only and shared by the queues that ask in a row: a
    fan-out puts the same batch into every peer's queue at one instant."""
    got = _TIMES[0]
    if got is None or got[0] != n or got[1] != now or type(got[1]) is not type(now):
        a = np.full(n, now)
        a.flags.writeable = False
        got = _TIMES[0] = (n, now, a)
    return got[2]


def _shard_boundary(shards: np.ndarray, n: int) -> int:
    """The greatest ``0 < k <= n`` that ends a run of equal shards (rows grouped by
    shard), so that a split there leaves every shard whole on one side; 0 when the first
    run is longer than ``n`` (a split must cut that shard, and its link is lost)."""
    cuts = np.flatnonzero(shards[1:n + 1] != shards[:n]) + 1
    return int(cuts[-1]) if len(cuts) else 0


def _select(b: QueuedRows, idx: Any) -> QueuedRows:
    """A part of a batch.  It keeps the chain links of the shards whose every row of the
    batch it holds (known only with ``b.shards``); the others are dropped.

    Example:
        >>> b = QueuedRows("m", "t", np.array([7, 8, 9]), np.array([5, 5, 5]), 8,
        ...                links=np.array([[0, 1, 0, 4], [1, 1, 0, 5]]), shards=np.array([0, 0, 1]))
        >>> _select(b, slice(0, 2)).links.tolist(), _select(b, slice(1, 3)).links.tolist()
        ([[0, 1, 0, 4]], [[1, 1, 0, 5]])
    """
    pick = lambda a: None if a is None else a[idx]  # noqa: E731
    links = None
    if b.links is not None and b.shards is not None:
        chosen = np.zeros(len(b), bool)
        chosen[idx] = True
        inside, outside = b.shards[chosen], b.shards[~chosen]
        keep = np.isin(b.links[:, 0], inside) & ~np.isin(b.links[:, 0], outside)
        if keep.any():
            links = b.links[keep]
    return QueuedRows(b.model, b.table, b.ids[idx], b.versions[idx], b.row_bytes, pick(b.scores), pick(b.high),
                      pick(b.enqueued_at), links, pick(b.shards) if links is not None else None)
