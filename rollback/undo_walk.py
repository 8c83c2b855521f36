"""The undo history's walk (:mod:`rollback.undo`): per row, the newest recorded old version
a cut covers, found segment by segment newest first, each segment vectorized (a row ->
position map, one ``covered`` call on the candidate entries), stopping once every row
is resolved, so old and spilled history is read only for rows that need it.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ekko.core.errors import UsageError
from rollback.undo_log import Segment, TableLog

#: a dense row -> position map is used while it costs at most this many slots per row
#: or entry involved in a lookup; beyond it (a huge, sparsely touched table) a sorted
#: search is used instead, so a lookup never allocates memory proportional to the table.
DENSE_MAP_SLOTS_PER_ROW = 32

#: ``covered(ids, packed_versions) -> bool array``: True where the cut includes that
#: version of that row (see :meth:`rollback.cuts.Cut.covered_fn`).
CoveredFn = Callable[[np.ndarray, np.ndarray], np.ndarray]
#: ``arrays(segment) -> (ids, old versions, values)``: :meth:`SegmentStore.arrays`.
ArraysFn = Callable[[Segment], tuple[np.ndarray, np.ndarray, "np.ndarray | None"]]


def walk(log: TableLog, rows: np.ndarray, covered: CoveredFn, arrays: ArraysFn
         ) -> tuple[list[tuple[Segment, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]], np.ndarray]:
    """Newest-first scan of a sealed log (no pending records): per segment that resolves
    rows, (segment, entry positions, row positions, versions, values); and which rows
    were resolved.  ``arrays(segment)`` gives a segment's arrays (read back if spilled)."""
    n = len(rows)
    loc = Locator(rows, max(log.max_id, int(rows.max())), sum(
        int(s.rec_starts[-1]) for s in log.segments))
    resolved = np.zeros(n, dtype=bool)
    mark = np.empty(n, dtype=np.int64)
    pieces: list[tuple[Segment, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]] = []
    remaining = n
    for seg in reversed(log.segments):
        ids, old, values = arrays(seg)
        p = loc.find(ids)
        # cand None = every entry of the segment: a big bad delta is often all relevant,
        # and skipping the gathers then saves a third of the walk.
        cand: np.ndarray | None = None
        hit = p >= 0
        if not hit.all():
            cand = np.flatnonzero(hit)
            if len(cand) == 0:
                continue
            p = p[cand]
        keep = ~resolved[p]
        if not keep.all():
            cand = np.flatnonzero(keep) if cand is None else cand[keep]
            p = p[keep]
        ov = old if cand is None else old[cand]
        ok = np.asarray(covered(ids if cand is None else ids[cand], np.abs(ov)), dtype=bool)
        if ok.shape != ov.shape:
            raise UsageError("covered() must return one bool per version")
        ok |= ov == 0
        if not ok.all():
            cand = np.flatnonzero(ok) if cand is None else cand[ok]
            p, ov = p[ok], ov[ok]
        if cand is None:
            cand = np.arange(len(ids))
        pc = p
        if len(cand) == 0:
            continue
        if seg.multi and len(cand) > 1:
            cand, pc, ov = newest_per_row(cand, pc, ov, mark)
        resolved[pc] = True
        pieces.append((seg, cand, pc, ov, values))
        remaining -= len(pc)
        if remaining == 0:
            break
    loc.release()
    return pieces, resolved


def newest_per_row(cand: np.ndarray, pc: np.ndarray, ov: np.ndarray, mark: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Within one segment keep, per row, only its last (newest) candidate entry."""
    k = np.arange(len(pc))
    mark[pc] = k
    if (mark[pc] == k).all():   # every row once: whichever write won, each reads back its own index
        return cand, pc, ov
    order = np.argsort(pc, kind="stable")
    spc = pc[order]
    last = np.empty(len(spc), bool)
    last[:-1] = spc[1:] != spc[:-1]
    last[-1] = True
    sel = np.sort(order[last])
    return cand[sel], pc[sel], ov[sel]


class Locator:
    """Row id -> position in the looked-up rows (-1 when absent), vectorized."""

    def __init__(self, rows: np.ndarray, max_id: int, entries: int) -> None:
        self.rows = rows
        size = max_id + 1
        if size <= DENSE_MAP_SLOTS_PER_ROW * (len(rows) + entries):
            dt = np.int32 if len(rows) < (1 << 31) else np.int64
            self.pos: np.ndarray | None = np.full(size, -1, dtype=dt)
            self.pos[rows] = np.arange(len(rows), dtype=dt)
            if (self.pos[rows] != np.arange(len(rows))).any():
                raise UsageError("rows_changed_after must not repeat a row")
            self.sorted = self.order = None
        else:
            self.pos = None
            self.order = np.argsort(rows, kind="stable")
            self.sorted = rows[self.order]
            if len(rows) > 1 and (self.sorted[1:] == self.sorted[:-1]).any():
                raise UsageError("rows_changed_after must not repeat a row")

    def find(self, ids: np.ndarray) -> np.ndarray:
        if self.pos is not None:
            if len(ids) and int(ids.max()) >= len(self.pos):
                inside = ids < len(self.pos)
                out = np.full(len(ids), -1, np.int64)
                out[inside] = self.pos[ids[inside]]
                return out
            return self.pos[ids]
        assert self.sorted is not None and self.order is not None
        j = np.searchsorted(self.sorted, ids)
        np.minimum(j, len(self.sorted) - 1, out=j)
        hit = self.sorted[j] == ids
        return np.where(hit, self.order[j], -1)

    def release(self) -> None:
        self.pos = self.sorted = self.order = None
