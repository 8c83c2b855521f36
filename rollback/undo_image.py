"""The undo history as a snapshot keeps it (:mod:`rollback.undo`): :class:`UndoImage` and
:class:`UndoSegmentImage`, what :meth:`UndoHistory.export_model` gives and
:meth:`UndoHistory.import_model` installs (:mod:`ekko.replica.snapshot` writes and reads
them), and the checks an image passes before any of it is installed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ekko.core.errors import UsageError
from rollback.undo_log import RECORD_OVERHEAD_BYTES, Segment, SegmentStore, TableLog


@dataclass(frozen=True, slots=True)
class UndoSegmentImage:
    """One segment of an :class:`UndoImage`: entries in apply order and their records.

    Attributes:
        ids, old_versions: int64 ``(n,)``; an old version is negated where the row was a
            tombstone (as the history keeps it).
        values: ``(n, dim)`` old values in the wire dtype, None for a metadata-mode table.
        rec_starts: int64 ``(records + 1,)``: entry offset of each record, then ``n``.
        rec_seqs: int64 ``(records,)``: each record's apply seq, non-decreasing.
    """

    ids: np.ndarray
    old_versions: np.ndarray
    values: np.ndarray | None
    rec_starts: np.ndarray
    rec_seqs: np.ndarray


@dataclass(frozen=True, slots=True)
class UndoImage:
    """The undo history of one model, to keep with its snapshot (:meth:`UndoHistory.export_model`).

    Attributes:
        model: the model.
        seq: the apply seq when the image was taken: every record has ``seq <=`` this,
            and the node resumes numbering above it.
        horizon: the model's :meth:`UndoHistory.horizon` then.
        tables: per table, its segments oldest first (tables without history left out).
        damaged: why a stored history could not be read (the image then holds no
            tables and ``horizon == seq``: nothing before the restart is restorable here).
    """

    model: str
    seq: int
    horizon: int
    tables: dict[str, list[UndoSegmentImage]]
    damaged: str | None = None

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays (what the history charges, less per-record overhead)."""
        return sum(s.ids.nbytes + s.old_versions.nbytes + (s.values.nbytes if s.values is not None else 0)
                   for segs in self.tables.values() for s in segs)


def image_tables(store: SegmentStore, model: str) -> dict[str, list[UndoSegmentImage]]:
    """Per table of ``model``, its segments oldest first as images (references to the
    history's arrays; pending small records concatenated; spilled ones read back)."""
    tables: dict[str, list[UndoSegmentImage]] = {}
    for (m, table), log in store.logs.items():
        if m != model:
            continue
        segs = []
        for seg in log.segments:
            ids, old, values = store.arrays(seg)
            segs.append(UndoSegmentImage(ids, old, values, seg.rec_starts, seg.rec_seqs))
        if log.pending:
            recs = log.pending
            starts = np.zeros(len(recs) + 1, np.int64)
            np.cumsum([len(r[1]) for r in recs], out=starts[1:])
            segs.append(UndoSegmentImage(
                np.concatenate([r[1] for r in recs]), np.concatenate([r[2] for r in recs]),
                np.concatenate([r[3] for r in recs]) if log.has_values else None,
                starts, np.array([r[0] for r in recs], np.int64)))
        if segs:
            tables[table] = segs
    return tables


def logs_from_image(image: UndoImage, seq: int) -> tuple[dict[tuple[str, str], TableLog], int]:
    """The image's tables as checked logs, and their bytes (raises before anything is installed)."""
    logs: dict[tuple[str, str], TableLog] = {}
    total = 0
    for table, segs in image.tables.items():
        log = TableLog()
        last = -1
        for s in segs:
            seg = check_segment_image(table, s, log, last, seq)
            last = seg.last_seq
            log.segments.append(seg)
            log.max_id = max(log.max_id, seg.max_id)
            total += seg.nbytes
        if log.segments:
            logs[(image.model, table)] = log
    return logs, total


def check_segment_image(table: str, s: UndoSegmentImage, log: TableLog, after_seq: int, max_seq: int
                        ) -> Segment:
    """A segment image as a history segment, checked; sets the log's value layout on first use."""
    def bad(msg: str) -> UsageError:
        return UsageError(f"undo image of table {table!r}: {msg}")

    ids, old, values, starts, seqs = s.ids, s.old_versions, s.values, s.rec_starts, s.rec_seqs
    for name, a in (("ids", ids), ("old_versions", old), ("rec_starts", starts), ("rec_seqs", seqs)):
        if not isinstance(a, np.ndarray) or a.dtype != np.int64 or a.ndim != 1:
            raise bad(f"{name} must be a 1-D int64 array")
    n = len(ids)
    if n == 0 or len(old) != n or len(seqs) == 0 or len(starts) != len(seqs) + 1:
        raise bad("array lengths disagree")
    if int(starts[0]) != 0 or int(starts[-1]) != n or (np.diff(starts) <= 0).any():
        raise bad("record starts are not increasing from 0 to the entry count")
    if int(seqs[0]) < max(after_seq, 0) or (np.diff(seqs) < 0).any() or int(seqs[-1]) > max_seq:
        raise bad("record seqs are out of order or beyond the image's seq")
    if int(ids.min()) < 0:
        raise bad("negative row id")
    if log.has_values is None:
        log.has_values = values is not None
        if values is not None:
            if values.ndim != 2:
                raise bad("values must be 2-D")
            log.dim, log.dtype = int(values.shape[1]), values.dtype
    if (values is not None) != log.has_values or (
            values is not None and (values.shape != (n, log.dim) or values.dtype != log.dtype)):
        raise bad("values do not match the entries or the table's other segments")
    nbytes = ids.nbytes + old.nbytes + (values.nbytes if values is not None else 0) \
        + RECORD_OVERHEAD_BYTES * len(seqs)
    return Segment(ids, old, values, starts, seqs, int(ids.max()), nbytes)
