"""The recent changes of a replica's tables, in the order they happened: the change feed.

An external cache (a serving process's copy of some rows, a feature store) follows a
replica by asking "what changed since my cursor?" (``GET /v1/models/{m}/changes``,
:meth:`ekko.sdk.client.Client.watch`).  :class:`ChangeLog` keeps, per model, a bounded
list of records ``(seq, table, ids)``: one per apply (a publish, a push, a pull answer)
and one per rollback restore.  ``seq`` counts records of this log; a cursor is
``"<epoch>-<seq>"``, the epoch naming this log (a daemon process: its incarnation), so a
cursor from another process, or one older than what the log still holds, is answered
with a *reset*: the reader must reload the rows it caches and go on from the cursor of
the answer.  Values are not kept here: an answer carries each changed row's value and
version as the replica holds them when it answers (at least as new as the change; a
row changed twice is sent once).

Rules (what a reader may rely on):

* every row that changes on this replica after cursor ``c`` is in an answer to ``c`` or
  to a later cursor, unless that answer says ``reset``;
* a reset says nothing about which rows changed: reload (or drop) the cache;
* rows come with their version: a reader keeps a row only if its version is not older
  than the one it holds... except after a rollback, where versions go *back*: a rollback
  restore is a change like any other and its rows come with the restored (older)
  versions, so a reader takes what the feed says.

Sans-IO: no clocks, no sockets; the daemon feeds it from the node's hooks.

Example:
    >>> import numpy as np
    >>> log = ChangeLog(epoch=7, max_rows=10)
    >>> c0 = log.cursor("m")
    >>> log.note("m", "emb", np.array([3, 5]))
    >>> log.note("m", "emb", np.array([5, 9]))
    >>> got = log.since("m", c0)
    >>> got.reset, {t: ids.tolist() for t, ids in got.tables.items()}, got.cursor
    (False, {'emb': [3, 5, 9]}, '7-2')
    >>> log.since("m", got.cursor).tables
    {}
    >>> log.since("m", "6-1").reset        # another process's cursor
    True
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from ekko.core.errors import UsageError

#: rows the log keeps over all models; older records drop out (readers behind them reset).
DEFAULT_MAX_ROWS = 1 << 21
#: rows one answer carries at most (whole records; at least one record).
MAX_ANSWER_ROWS = 1 << 16


@dataclass(frozen=True, slots=True)
class Changes:
    """One answer: the rows of each table changed after the cursor asked with (sorted,
    unique), the cursor to ask with next, and whether the reader must reset."""

    tables: dict[str, np.ndarray]
    cursor: str
    reset: bool
    more: bool


class ChangeLog:
    """Bounded per-model record of changed rows (see the module doc).

    Args:
        epoch: names this log in cursors (a daemon uses its incarnation).
        max_rows: rows kept over all models.
    """

    def __init__(self, epoch: int, max_rows: int = DEFAULT_MAX_ROWS) -> None:
        if max_rows < 1:
            raise UsageError("a change log keeps at least one row")
        self.epoch = int(epoch)
        self.max_rows = max_rows
        self._records: dict[str, deque[tuple[int, str, np.ndarray]]] = {}
        self._seq: dict[str, int] = {}
        self._dropped: dict[str, int] = {}   # per model: the greatest seq that dropped out
        self._rows = 0
        self._order: deque[str] = deque()    # models of the records, oldest first (for dropping)

    def note(self, model: str, table: str, ids: np.ndarray) -> None:
        """Record that rows ``ids`` of ``model.table`` changed (after the change)."""
        if not len(ids):
            return
        seq = self._seq.get(model, 0) + 1
        self._seq[model] = seq
        self._records.setdefault(model, deque()).append((seq, table, np.array(ids, dtype=np.int64)))
        self._order.append(model)
        self._rows += len(ids)
        while self._rows > self.max_rows and len(self._order) > 1:
            old = self._order.popleft()
            s, _, dropped = self._records[old].popleft()
            self._dropped[old] = s
            self._rows -= len(dropped)

    def cursor(self, model: str) -> str:
        """The cursor of "now" for ``model``: an answer to it holds what changes next."""
        return f"{self.epoch}-{self._seq.get(model, 0)}"

    def since(self, model: str, cursor: str, max_rows: int = MAX_ANSWER_ROWS) -> Changes:
        """What changed in ``model`` after ``cursor`` (at most ``max_rows`` rows, in whole
        records, at least one); a malformed cursor is a :class:`UsageError`."""
        epoch, seq = parse_cursor(cursor)
        head = self._seq.get(model, 0)
        if epoch != self.epoch or seq > head or seq < self._dropped.get(model, 0):
            return Changes({}, self.cursor(model), reset=True, more=False)
        picked: dict[str, list[np.ndarray]] = {}
        rows, last = 0, seq
        for s, table, ids in self._records.get(model, ()):
            if s <= seq:
                continue
            if rows and rows + len(ids) > max_rows:
                break
            picked.setdefault(table, []).append(ids)
            rows += len(ids)
            last = s
        tables = {t: np.unique(np.concatenate(parts)) for t, parts in picked.items()}
        return Changes(tables, f"{self.epoch}-{last}", reset=False, more=last < head)

    def newest(self, model: str) -> int:
        """The seq of ``model``'s newest record (0: none)."""
        return self._seq.get(model, 0)


def parse_cursor(cursor: str) -> tuple[int, int]:
    """``"<epoch>-<seq>"`` -> ``(epoch, seq)``; anything else is a :class:`UsageError`.

    Example:
        >>> parse_cursor("17-4")
        (17, 4)
    """
    head, sep, tail = cursor.partition("-")
    if not sep or not head.isdigit() or not tail.isdigit() or len(cursor) > 48:
        raise UsageError(f"a cursor is EPOCH-SEQ (two whole numbers), got {cursor[:48]!r}")
    return int(head), int(tail)
