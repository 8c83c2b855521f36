"""Storage of the undo history (:mod:`rollback.undo`): per-table logs of segments, kept
within a memory budget by spilling the oldest to ``.npy`` files (or discarding them,
which moves a model's horizon), and within a spill budget likewise.

:class:`SegmentStore` owns the bytes; :class:`rollback.undo.UndoHistory` decides what
to record and how to walk it.  Segments are never written after they are made (an
export refers to their arrays).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

import numpy as np

#: bookkeeping bytes charged per record besides its arrays (record start + seq).
RECORD_OVERHEAD_BYTES = 16
#: a record this large (or of ``block_bytes``, when smaller) is a segment of its own, as it
#: came: pooling it would copy it once more (issue #15: pooling 1k-row records into 4 MiB
#: blocks was 5-8% of a receiving daemon's CPU), and at 64 MiB of history this bounds the
#: segments at ~1k.
OWN_SEGMENT_BYTES = 64 << 10


@dataclass(slots=True)
class Segment:
    """Records of one table, in apply order; ``ids is None`` once spilled."""

    ids: np.ndarray | None
    old_versions: np.ndarray | None
    values: np.ndarray | None
    rec_starts: np.ndarray          # entry offset of each record, plus the end
    rec_seqs: np.ndarray            # seq of each record
    max_id: int
    nbytes: int
    path: str | None = None

    @property
    def first_seq(self) -> int:
        return int(self.rec_seqs[0])

    @property
    def last_seq(self) -> int:
        return int(self.rec_seqs[-1])

    @property
    def multi(self) -> bool:
        """More than one record: a row may appear more than once."""
        return len(self.rec_seqs) > 1


class TableLog:
    """One (model, table)'s history: sealed segments oldest first, then the pending small
    records (``(seq, ids, old versions, values)``) not yet pooled into a segment."""

    __slots__ = ("segments", "pending", "pending_bytes", "has_values", "dim", "dtype", "max_id")

    def __init__(self) -> None:
        self.segments: list[Segment] = []
        self.pending: list[tuple[int, np.ndarray, np.ndarray, np.ndarray | None]] = []
        self.pending_bytes = 0
        self.has_values: bool | None = None
        self.dim = 0
        self.dtype: np.dtype | None = None
        self.max_id = -1


class SegmentStore:
    """Every table's log and the history's byte accounting.

    Args:
        max_bytes: bytes kept in memory; beyond it the oldest segments (across every
            table) spill to ``spill_dir``, or are discarded when it is None.
        spill_dir: where spilled segments go (created), or None.
        max_spill_bytes: bound on spilled bytes (oldest discarded first); None = no bound.
        block_bytes: small records are pooled into segments of about this size.

    ``horizon``: per model, the oldest seq still fully restorable.
    """

    def __init__(self, max_bytes: int, spill_dir: str | None, max_spill_bytes: int | None,
                 block_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.block_bytes = block_bytes
        self.max_spill_bytes = max_spill_bytes
        self.spill_dir = spill_dir
        if self.spill_dir is not None:
            os.makedirs(self.spill_dir, exist_ok=True)
        self.logs: dict[tuple[str, str], TableLog] = {}
        self.horizon: dict[str, int] = {}
        self.mem_bytes = 0
        self.spill_bytes = 0
        self.spill_counter = 0

    def log(self, model: str, table: str) -> TableLog:
        """The table's log, created empty on first use."""
        log = self.logs.get((model, table))
        if log is None:
            log = self.logs[(model, table)] = TableLog()
        return log

    def add(self, log: TableLog, seq: int, ids: np.ndarray, old: np.ndarray, values: np.ndarray | None) -> None:
        """Keep one checked record (arrays owned by the log from now on), then hold the budget."""
        n = len(ids)
        top = int(ids.max())
        log.max_id = max(log.max_id, top)
        nbytes = ids.nbytes + old.nbytes + (values.nbytes if values is not None else 0) + RECORD_OVERHEAD_BYTES
        self.mem_bytes += nbytes
        if nbytes >= min(self.block_bytes, OWN_SEGMENT_BYTES):
            self.seal(log)
            log.segments.append(Segment(ids, old, values, np.array([0, n], np.int64), np.array([seq], np.int64),
                                        top, nbytes))
        else:
            log.pending.append((seq, ids, old, values))
            log.pending_bytes += nbytes
            if log.pending_bytes >= self.block_bytes:
                self.seal(log)
        self.enforce_budget()

    def seal(self, log: TableLog) -> None:
        """Pool the log's pending small records into one segment."""
        if not log.pending:
            return
        recs = log.pending
        counts = [len(r[1]) for r in recs]
        starts = np.zeros(len(recs) + 1, np.int64)
        np.cumsum(counts, out=starts[1:])
        ids = np.concatenate([r[1] for r in recs])
        old = np.concatenate([r[2] for r in recs])
        values = np.concatenate([r[3] for r in recs]) if log.has_values else None
        seqs = np.array([r[0] for r in recs], np.int64)
        log.segments.append(Segment(ids, old, values, starts, seqs, int(ids.max()), log.pending_bytes))
        log.pending = []
        log.pending_bytes = 0

    def enforce_budget(self) -> None:
        """Spill (or discard, moving the horizon) the oldest segments until memory is within budget."""
        while self.mem_bytes > self.max_bytes:
            oldest: tuple[int, TableLog, str] | None = None
            for (model, _), log in self.logs.items():
                first = None
                for seg in log.segments:
                    if seg.path is None:
                        first = seg.first_seq
                        break
                if first is None and log.pending:
                    first = log.pending[0][0]
                if first is not None and (oldest is None or first < oldest[0]):
                    oldest = (first, log, model)
            if oldest is None:
                return
            _, log, model = oldest
            seg = next((s for s in log.segments if s.path is None), None)
            if seg is None:
                self.seal(log)
                seg = next(s for s in log.segments if s.path is None)
            if self.spill_dir is not None:
                self.spill(seg)
            else:
                log.segments.remove(seg)
                self.mem_bytes -= seg.nbytes
                self.horizon[model] = max(self.horizon.get(model, 0), seg.last_seq + 1)
        if self.max_spill_bytes is not None:
            self.enforce_spill_budget()

    def spill(self, seg: Segment) -> None:
        assert self.spill_dir is not None and seg.ids is not None and seg.old_versions is not None
        self.spill_counter += 1
        path = os.path.join(self.spill_dir, f"seg-{self.spill_counter:010d}")
        os.makedirs(path, exist_ok=True)
        np.save(os.path.join(path, "ids.npy"), seg.ids)
        np.save(os.path.join(path, "old_versions.npy"), seg.old_versions)
        if seg.values is not None:
            np.save(os.path.join(path, "values.npy"), np.ascontiguousarray(seg.values))
        seg.path = path
        seg.ids = seg.old_versions = seg.values = None
        self.mem_bytes -= seg.nbytes
        self.spill_bytes += seg.nbytes

    def enforce_spill_budget(self) -> None:
        assert self.max_spill_bytes is not None
        while self.spill_bytes > self.max_spill_bytes:
            oldest = None
            for (model, _), log in self.logs.items():
                for seg in log.segments:
                    if seg.path is not None and (oldest is None or seg.first_seq < oldest[0].first_seq):
                        oldest = (seg, log, model)
                    break  # spilled segments are the oldest of their table
            if oldest is None:
                return
            seg, log, model = oldest
            log.segments.remove(seg)
            self.drop_segment(seg)
            self.horizon[model] = max(self.horizon.get(model, 0), seg.last_seq + 1)

    def drop_segment(self, seg: Segment) -> None:
        if seg.path is not None:
            shutil.rmtree(seg.path, ignore_errors=True)
            self.spill_bytes -= seg.nbytes
        else:
            self.mem_bytes -= seg.nbytes

    def arrays(self, seg: Segment) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """A segment's (ids, old versions, values), read back from disk when spilled."""
        if seg.path is None:
            assert seg.ids is not None and seg.old_versions is not None
            return seg.ids, seg.old_versions, seg.values
        ids = np.load(os.path.join(seg.path, "ids.npy"))
        old = np.load(os.path.join(seg.path, "old_versions.npy"))
        vpath = os.path.join(seg.path, "values.npy")
        # Memory-mapped: a lookup gathers only the rows it restores from a spilled segment.
        values = np.load(vpath, mmap_mode="r") if os.path.exists(vpath) else None
        return ids, old, values

    def forget_before(self, model: str, seq: int) -> None:
        """Drop history no live cut needs: records with seq < ``seq`` (whole segments).

        Moves :meth:`horizon` to at least ``seq``: cuts older than that are no longer restorable.
        """
        seq = int(seq)
        for (m, _), log in self.logs.items():
            if m != model:
                continue
            keep = []
            for seg in log.segments:
                if seg.last_seq < seq:
                    self.drop_segment(seg)
                else:
                    keep.append(seg)
            log.segments = keep
            if log.pending and log.pending[0][0] < seq:
                kept = [r for r in log.pending if r[0] >= seq]
                freed = sum(record_bytes(r) for r in log.pending) - sum(record_bytes(r) for r in kept)
                log.pending = kept
                log.pending_bytes -= freed
                self.mem_bytes -= freed
        self.horizon[model] = max(self.horizon.get(model, 0), seq)

    def drop_model(self, model: str) -> None:
        """Forget every table of a model (it was removed)."""
        for key in [k for k in self.logs if k[0] == model]:
            log = self.logs.pop(key)
            for seg in log.segments:
                self.drop_segment(seg)
            self.mem_bytes -= log.pending_bytes
        self.horizon.pop(model, None)

    def stats(self) -> dict[str, int]:
        """Bytes in memory and spilled, segment count (for status and tests)."""
        segs = sum(len(log.segments) for log in self.logs.values())
        spilled = sum(1 for log in self.logs.values() for s in log.segments if s.path is not None)
        return {"memory_bytes": self.mem_bytes, "spilled_bytes": self.spill_bytes, "segments": segs,
                "spilled_segments": spilled}


def record_bytes(rec: tuple[int, np.ndarray, np.ndarray, np.ndarray | None]) -> int:
    _, ids, old, values = rec
    return ids.nbytes + old.nbytes + (values.nbytes if values is not None else 0) + RECORD_OVERHEAD_BYTES
