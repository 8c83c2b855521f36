"""A record of every row a replica applies, with its wall-clock time (for benches).

``ekko daemon --apply-trace DIR`` (``EKKO_APPLY_TRACE``) appends, for each row that
takes a new version here, one fixed-size record ``(t, id, version, source)`` to
``DIR/<model>.<table>.applies``: ``t`` the wall-clock time (``time.time()``) of the
apply, ``source`` its :data:`SOURCES` code (a publish received here, a push, a pull
answer ...).  A bench reads the files after the daemons stop and knows exactly when
each row of each update became readable on each replica, without polling them: polls
are load on the daemons, and a poll period blurs what it times (``bench/fidelity.py``
is the user).

The records are written from the apply hook (:attr:`ReplicaNode.on_apply`), one
``write`` of a whole applied batch; the file is buffered and flushed when the daemon
stops, so a daemon killed with SIGKILL may lose its tail.  A restart appends to the
same files.  A rollback's restores are not applies and are not recorded.  Not for
production: the files grow by 25 bytes per applied row.

Example::

    >>> import tempfile, numpy as np
    >>> from ekko.core.store import ApplyResult
    >>> d = tempfile.mkdtemp()
    >>> tr = ApplyTrace(d)
    >>> tr.on_apply("m", "emb", ApplyResult(np.array([3, 5]), np.array([70, 71]), np.zeros(2, np.int64)), "push")
    >>> tr.close()
    >>> rec = read_trace(f"{d}/m.emb.applies")
    >>> rec["id"].tolist(), rec["version"].tolist(), [SOURCES[c] for c in rec["source"]]
    ([3, 5], [70, 71], ['push', 'push'])
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from ekko.core.errors import UsageError

#: one record per applied row (little-endian, packed: 25 bytes).
RECORD = np.dtype([("t", "<f8"), ("id", "<i8"), ("version", "<i8"), ("source", "u1")])
#: the apply sources (:meth:`ReplicaNode.apply_delta`'s ``source``), by record code; others are "other".
SOURCES = ("other", "publish", "push", "pull", "local", "restore")
_CODE = {s: i for i, s in enumerate(SOURCES)}
#: file name suffix of a trace file.
SUFFIX = ".applies"
#: model and table names as they go into file names (spec names already are; this guards the path).
_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


def trace_path(directory: str | Path, model: str, table: str) -> Path:
    """The trace file of one table: ``DIR/<model>.<table>.applies``."""
    return Path(directory) / f"{_SAFE.sub('_', model)}.{_SAFE.sub('_', table)}{SUFFIX}"


def read_trace(path: str | Path) -> np.ndarray:
    """The records of one trace file (a :data:`RECORD` array, in apply order).

    A torn last record (a daemon killed mid-write) is dropped."""
    data = Path(path).read_bytes()
    whole = len(data) - len(data) % RECORD.itemsize
    return np.frombuffer(data[:whole], RECORD)


def first_times(rec: np.ndarray, ids: np.ndarray, versions: np.ndarray) -> np.ndarray:
    """For each row ``(ids[i], versions[i])``, the first time the traced replica held that
    version or a newer one (NaN: never), from its apply trace ``rec``
    (:func:`ekko.server.apply_trace.read_trace`).  A row only ever takes newer versions,
    so that is the time of the first record of the row at or above the version.

    Example:
        >>> rec = np.array([(1.0, 7, 10, 2), (2.0, 7, 20, 2), (1.5, 8, 5, 2)], RECORD)
        >>> first_times(rec, np.array([7, 7, 8, 9]), np.array([10, 15, 6, 1])).tolist()
        [1.0, 2.0, nan, nan]
    """
    n = len(ids)
    if not n:
        return np.zeros(0)
    # Queries and records in one order: by id, then version, a query before a record of equal
    # version (that record satisfies it); each query's answer is the next record after it.
    all_ids = np.concatenate([np.asarray(ids, np.int64), rec["id"]])
    all_v = np.concatenate([np.asarray(versions, np.int64), rec["version"]])
    is_rec = np.concatenate([np.zeros(n, np.int8), np.ones(len(rec), np.int8)])
    order = np.lexsort((is_rec, all_v, all_ids))
    pos = np.empty(len(order), np.int64)
    pos[order] = np.arange(len(order))
    # next_rec[k] = the sorted position of the first record at or after sorted position k
    sorted_is_rec = is_rec[order].astype(bool)
    big = len(order)
    marks = np.where(sorted_is_rec, np.arange(big), big)
    next_rec = np.minimum.accumulate(marks[::-1])[::-1]
    nxt = next_rec[pos[:n]]
    out = np.full(n, np.nan)
    ok = nxt < big
    hit = order[nxt[ok]]                         # index into the concatenation (a record)
    same = all_ids[hit] == np.asarray(ids, np.int64)[ok]
    idx = np.flatnonzero(ok)[same]
    out[idx] = rec["t"][hit[same] - n]
    return out


def trace_visibility(rec: np.ndarray, publishes: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """When each publish ``(ids, versions)`` became visible at the traced replica: when its
    last row did (NaN: some row never did)."""
    if not publishes:
        return np.zeros(0)
    ids = np.concatenate([i for i, _ in publishes])
    vs = np.concatenate([v for _, v in publishes])
    t = first_times(rec, ids, vs)
    bounds = np.cumsum([0] + [len(i) for i, _ in publishes])
    # np.max propagates NaN: a publish with any row never seen is never visible.
    return np.array([t[a:b].max() if b > a else np.nan for a, b in zip(bounds[:-1], bounds[1:])])


class ApplyTrace:
    """Appends every applied row of a node to per-table trace files (see the module doc).

    Args:
        directory: where the files go (created if missing).
        clock: the wall clock, ``time.time`` (a bench compares times across processes).

    Attach with ``node.on_apply.append(trace.on_apply)``; :meth:`close` at shutdown.
    """

    def __init__(self, directory: str | Path, clock: Any = time.time) -> None:
        self.directory = Path(directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"apply trace directory {self.directory}: {e.strerror or e}") from None
        self.clock = clock
        self._files: dict[tuple[str, str], BinaryIO] = {}
        self.rows = 0

    def on_apply(self, model: str, table: str, res: Any, source: str) -> None:
        """The node's apply hook: one record per row of ``res``."""
        n = len(res)
        if not n:
            return
        f = self._files.get((model, table))
        if f is None:
            f = self._files[(model, table)] = open(trace_path(self.directory, model, table), "ab")
        rec = np.empty(n, RECORD)
        rec["t"] = self.clock()
        rec["id"] = np.asarray(res.ids)
        rec["version"] = np.asarray(res.versions)
        rec["source"] = _CODE.get(source, 0)
        f.write(rec.tobytes())
        self.rows += n

    def close(self) -> None:
        """Flush and close every file (the daemon's shutdown calls it)."""
        for f in self._files.values():
            f.close()
        self._files.clear()
