"""Per-replica undo history: the old versions and values of every row an apply changed.

On every apply the node calls :meth:`UndoHistory.record` with the store's
:class:`~ekko.core.store.ApplyResult` (``apply(..., capture_old=True)``): for each
row that took a new version, the version and value it had *before*.  To roll a
table back to a cut, :meth:`UndoHistory.values_at_cut` walks each row's
history backwards and returns, per row, the newest old version that the cut
covers, with its value -- the row's state at the cut.  :meth:`restore_at_cut`
does the same walk and writes the targets straight into the store (the path a
node should use: no output array the size of the restore).

The walk.  Segments are scanned newest first; inside each, everything is
vectorized: a row -> position map finds the entries of the wanted rows, one
call of the cut's ``covered`` predicate tests their old versions, and rows
resolved in a newer segment are skipped.  It stops once every row is resolved,
so old and spilled history is read only for rows that need it.  (Concatenating
all segments first would read the whole history, values included, on every
rollback.)

Layout.  Records are kept per (model, table) as *segments*: a large record is a
segment by itself (kept without a copy); small records are pooled and sealed
into one segment once they reach ``block_bytes``, so the number of segments
stays about ``max_bytes / block_bytes`` whatever the apply rate.  Inside a
segment entries are in apply order; segments are in apply (``seq``) order.

Bounded memory.  When the history holds more than ``max_bytes`` the oldest
segments (smallest ``seq``, across every table) leave memory: to ``spill_dir``
as ``.npy`` files (values are memory-mapped back, so a lookup reads only the
rows it needs) when one is given, else they are discarded.  Discarding moves
the model's :meth:`horizon`: cuts with ``seq >= horizon(model)`` are fully
restorable; older cuts may leave rows incomplete, which
:meth:`values_at_cut` reports so the caller repairs them from peers.

Sequence numbers.  ``seq`` is the node's local apply counter, non-decreasing
across calls (one apply touching several tables may share one seq).  A cut
taken when the counter stood at ``c`` (the next apply gets ``seq >= c``) needs
every record with ``seq >= c``.

Restores must be recorded too.  A rollback writes rows with
:meth:`~ekko.core.store.TableStore.restore_rows`; record that write as well
(``restore_at_cut(..., seq=...)`` does, or :func:`capture_before_restore`) so
that a later rollback to a cut that covers the rolled-back versions of some
origin but not the restored ones still finds the right state.

Durability.  The history lives in memory, so a replica would restart without it
and restore the rows it held to nothing.  :meth:`UndoHistory.export_model` gives
an :class:`UndoImage` of one model's history -- references to its immutable
arrays, taken in the same instant as the store copy of a snapshot, no copy of the
values -- which :mod:`ekko.replica.snapshot` writes beside the tables; at start
:meth:`UndoHistory.import_model` installs it before the write-ahead log is
replayed (the node's apply seq continues above the image's ``seq``, so replayed
records come after the restored ones and cuts keep their meaning).

Known gap: :class:`~ekko.core.store.ApplyResult` carries no old *tombstone* flags,
so a row whose state at the cut was a tombstone comes back as zeros with the
tombstone flag clear (same values, so value digests still agree).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np

from ekko.core.errors import UsageError

if TYPE_CHECKING:
    from ekko.core.store import ApplyResult, TableStore

#: records smaller than this are pooled into one segment; a bigger one is a segment itself.
DEFAULT_BLOCK_BYTES = 4 << 20
#: bookkeeping bytes charged per record besides its arrays (record start + seq).
RECORD_OVERHEAD_BYTES = 16
#: a dense row -> position map is used while it costs at most this many slots per row
#: or entry involved in a lookup; beyond it (a huge, sparsely touched table) a sorted
#: search is used instead, so a lookup never allocates memory proportional to the table.
DENSE_MAP_SLOTS_PER_ROW = 32
#: restore_at_cut writes a whole in-memory segment at least this big straight from the
#: history (one index_copy_ of it amortizes the call); smaller pieces are pooled.
RESTORE_DIRECT_BYTES = 16 << 20
#: restore_at_cut pools smaller pieces through a scratch buffer of at most this many
#: bytes, kept between calls, written one chunk per restore_rows.
RESTORE_CHUNK_BYTES = 64 << 20

#: ``covered(ids, packed_versions) -> bool array``: True where the cut includes that
#: version of that row (see :meth:`rollback.cuts.Cut.covered_fn`).
CoveredFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True, slots=True)
class RestoreOutcome:
    """What :meth:`UndoHistory.restore_at_cut` did.

    Attributes:
        restored: rows written back to their state at the cut.
        incomplete: row ids whose history does not reach back to the cut (left as
            they were): repair them from a peer.
    """

    restored: int
    incomplete: np.ndarray


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


@dataclass(slots=True)
class _Segment:
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


class _TableLog:
    __slots__ = ("segments", "pending", "pending_bytes", "has_values", "dim", "dtype", "max_id")

    def __init__(self) -> None:
        self.segments: list[_Segment] = []
        self.pending: list[tuple[int, np.ndarray, np.ndarray, np.ndarray | None]] = []
        self.pending_bytes = 0
        self.has_values: bool | None = None
        self.dim = 0
        self.dtype: np.dtype | None = None
        self.max_id = -1


class UndoHistory:
    """Bounded history of the rows each apply overwrote, for rollback to a cut.

    Args:
        max_bytes: bytes of history kept in memory (ids, versions, values).
        spill_dir: where segments over the budget go (``.npy`` files); None
            discards them, moving :meth:`horizon` forward.
        max_spill_bytes: bound on spilled bytes (oldest discarded first); None = no bound.
        block_bytes: small records are pooled into segments of about this size.

    Example:
        >>> import numpy as np
        >>> from ekko.core.store import ApplyResult
        >>> h = UndoHistory(max_bytes=1 << 20)
        >>> # seq 1: row 5 went from never-written to version 10; seq 2: from 10 to 20
        >>> h.record("m", "t", 1, ApplyResult(np.array([5]), np.array([10]), np.array([0]), np.zeros((1, 2), np.float32)))
        >>> h.record("m", "t", 2, ApplyResult(np.array([5]), np.array([20]), np.array([10]), np.ones((1, 2), np.float32)))
        >>> ids, versions, values, complete = h.values_at_cut("m", "t", np.array([5]), lambda i, v: v <= 10)
        >>> ids.tolist(), versions.tolist(), values.tolist(), complete.tolist()
        ([5], [10], [[1.0, 1.0]], [True])
    """

    def __init__(self, max_bytes: int, spill_dir: str | os.PathLike | None = None,
                 max_spill_bytes: int | None = None, block_bytes: int = DEFAULT_BLOCK_BYTES) -> None:
        if max_bytes < 0 or block_bytes <= 0:
            raise UsageError("max_bytes must be >= 0 and block_bytes > 0")
        self.max_bytes = int(max_bytes)
        self.block_bytes = int(block_bytes)
        self.max_spill_bytes = max_spill_bytes
        self.spill_dir = os.fspath(spill_dir) if spill_dir is not None else None
        if self.spill_dir is not None:
            os.makedirs(self.spill_dir, exist_ok=True)
        self._logs: dict[tuple[str, str], _TableLog] = {}
        self._horizon: dict[str, int] = {}
        self._last_seq = -1
        self._mem_bytes = 0
        self._spill_bytes = 0
        self._spill_counter = 0
        self._scratch: np.ndarray | None = None

    # -- writes ---------------------------------------------------------------------------
    def record(self, model: str, table: str, seq: int, result: "ApplyResult") -> None:
        """Remember what an apply overwrote.

        Keeps references to ``result``'s arrays of old values (the store hands
        out fresh ones); ids and versions are copied.

        Args:
            model, table: where the apply happened.
            seq: the node's apply sequence number, non-decreasing across calls.
            result: the store's :class:`~ekko.core.store.ApplyResult` (``capture_old=True``
                on a store with values).
        """
        seq = int(seq)
        if seq < self._last_seq:
            raise UsageError(f"undo seq went backwards: {seq} after {self._last_seq}")
        self._last_seq = seq
        n = len(result)
        if n == 0:
            return
        log = self._logs.get((model, table))
        if log is None:
            log = self._logs[(model, table)] = _TableLog()
        values = result.old_values
        if log.has_values is None:
            log.has_values = values is not None
            if values is not None:
                log.dim, log.dtype = int(values.shape[1]), values.dtype
        if (values is not None) != log.has_values:
            raise UsageError(f"{model}/{table}: old values must be captured on every apply or on none "
                             "(apply with capture_old=True)")
        if values is not None and (values.ndim != 2 or values.shape != (n, log.dim) or values.dtype != log.dtype):
            raise UsageError(f"{model}/{table}: old values must be ({n}, {log.dim}) {log.dtype}")
        ids = np.array(result.ids, dtype=np.int64, copy=True)
        old = np.array(result.old_versions, dtype=np.int64, copy=True)
        if old.shape != (n,):
            raise UsageError(f"{model}/{table}: old_versions must have shape ({n},)")
        tomb = getattr(result, "old_tombstone", None)
        if tomb is not None and tomb.any():
            # A tombstone is kept as its version negated (packed versions are > 0 and a
            # never-written row, version 0, is no tombstone): no extra array per record.
            old[tomb] = -old[tomb]
        top = int(ids.max())
        log.max_id = max(log.max_id, top)
        nbytes = ids.nbytes + old.nbytes + (values.nbytes if values is not None else 0) + RECORD_OVERHEAD_BYTES
        self._mem_bytes += nbytes
        if nbytes >= self.block_bytes:
            self._seal(log)
            log.segments.append(_Segment(ids, old, values, np.array([0, n], np.int64), np.array([seq], np.int64),
                                         top, nbytes))
        else:
            log.pending.append((seq, ids, old, values))
            log.pending_bytes += nbytes
            if log.pending_bytes >= self.block_bytes:
                self._seal(log)
        self._enforce_budget()

    def forget_before(self, model: str, seq: int) -> None:
        """Drop history no live cut needs: records with seq < ``seq`` (whole segments).

        Moves :meth:`horizon` to at least ``seq``: cuts older than that are no longer restorable.
        """
        seq = int(seq)
        for (m, _), log in self._logs.items():
            if m != model:
                continue
            keep = []
            for seg in log.segments:
                if seg.last_seq < seq:
                    self._drop_segment(seg)
                else:
                    keep.append(seg)
            log.segments = keep
            if log.pending and log.pending[0][0] < seq:
                kept = [r for r in log.pending if r[0] >= seq]
                freed = sum(_record_bytes(r) for r in log.pending) - sum(_record_bytes(r) for r in kept)
                log.pending = kept
                log.pending_bytes -= freed
                self._mem_bytes -= freed
        self._horizon[model] = max(self._horizon.get(model, 0), seq)

    def drop_model(self, model: str) -> None:
        """Forget every table of a model (it was removed)."""
        for key in [k for k in self._logs if k[0] == model]:
            log = self._logs.pop(key)
            for seg in log.segments:
                self._drop_segment(seg)
            self._mem_bytes -= log.pending_bytes
        self._horizon.pop(model, None)

    def close(self) -> None:
        """Delete every spill file this history wrote and release the restore scratch buffer."""
        for model in {k[0] for k in self._logs}:
            self.drop_model(model)
        self._scratch = None

    # -- durability -----------------------------------------------------------------------
    def export_model(self, model: str, seq: int | None = None) -> UndoImage:
        """One model's history as an :class:`UndoImage`, for a snapshot.

        Cheap and consistent: the image refers to the history's arrays, which are never
        written after a record (pending small records are concatenated, at most
        ``block_bytes`` per table; spilled segments are read back, values memory-mapped),
        so take it in the same instant as the store copy and write it anywhere later.

        Args:
            seq: the caller's apply counter now (default: the last recorded seq).
        """
        seq = self._last_seq if seq is None else int(seq)
        if seq < self._last_seq:
            raise UsageError(f"export seq {seq} is below the last recorded seq {self._last_seq}")
        tables: dict[str, list[UndoSegmentImage]] = {}
        for (m, table), log in self._logs.items():
            if m != model:
                continue
            segs = []
            for seg in log.segments:
                ids, old, values = self._arrays(seg)
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
        return UndoImage(model, max(seq, 0), self.horizon(model), tables)

    def import_model(self, image: UndoImage) -> None:
        """Install a model's history from an :class:`UndoImage` (at start, before any apply of it).

        The image's segments become the model's oldest history; its horizon and seq are
        kept (records recorded afterwards need ``seq >= image.seq``).  The budget holds
        as for records: the oldest segments spill or are discarded when the image (with
        what the history holds already) is over ``max_bytes``.

        Raises:
            UsageError: the model already has history here, or the image is inconsistent
                (nothing is installed then).
        """
        model = image.model
        if any(k[0] == model for k in self._logs):
            raise UsageError(f"undo history of {model!r} exists already; import it before any apply")
        seq = int(image.seq)
        if seq < 0 or int(image.horizon) < 0:
            raise UsageError("undo image seq and horizon must be >= 0")
        logs: dict[tuple[str, str], _TableLog] = {}
        total = 0
        for table, segs in image.tables.items():
            log = _TableLog()
            last = -1
            for s in segs:
                seg = _check_segment_image(table, s, log, last, seq)
                last = seg.last_seq
                log.segments.append(seg)
                log.max_id = max(log.max_id, seg.max_id)
                total += seg.nbytes
            if log.segments:
                logs[(model, table)] = log
        self._logs.update(logs)
        self._mem_bytes += total
        self._horizon[model] = max(self._horizon.get(model, 0), int(image.horizon))
        self._last_seq = max(self._last_seq, seq)
        self._enforce_budget()

    # -- reads ----------------------------------------------------------------------------
    def horizon(self, model: str) -> int:
        """Oldest seq still fully restorable: a cut with ``cut.seq >= horizon`` has all its history."""
        return self._horizon.get(model, 0)

    def values_at_cut(self, model: str, table: str, rows_changed_after: np.ndarray, covered: CoveredFn
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
        """Restore targets of rows whose current version the cut does not cover.

        For each row, the newest recorded old version (newest by apply order, so
        earlier restores are walked through correctly) that ``covered`` accepts is
        its state at the cut; old version 0 (never written) is always accepted and
        restores the value recorded with it, the store's never-written zeros (a
        store only ever holds version 0 with zeros: applies write versions > 0, and
        restores to version 0 write back what was recorded with it, so this is
        not re-checked on the restore path).  Segments are scanned newest first, each one vectorized
        (a row -> position map, one ``covered`` call on the candidate entries),
        and the scan stops as soon as every row is resolved, so old and spilled
        history is read only for rows that need it.

        Args:
            model, table: the table.
            rows_changed_after: unique int64 row ids.
            covered: ``covered(ids, packed_versions) -> bool`` for the cut (per-shard
                knowledge needs the row); see :meth:`rollback.cuts.Cut.covered_fn`.

        Returns:
            ``(ids, versions, values, complete)``: the same rows, in the order they
            were found (newest segment first, then the incomplete ones); their target
            packed versions; target values ``(n, dim)`` in the wire dtype (None when
            the table keeps no values or has no history); and ``complete``, False
            where the history does not reach back to the cut (version 0 and zeros
            are returned there: repair those rows from a peer instead).
        """
        rows = np.asarray(rows_changed_after, dtype=np.int64)
        if rows.ndim != 1:
            raise UsageError("rows_changed_after must be a 1-D array of row ids")
        n = len(rows)
        log = self._logs.get((model, table))
        if n and int(rows.min()) < 0:
            raise UsageError("row ids must be >= 0")
        if log is None or n == 0:
            values = (np.zeros((n, log.dim), log.dtype) if log is not None and log.has_values else None)
            return rows.copy(), np.zeros(n, np.int64), values, np.zeros(n, bool)
        pieces, resolved = self._walk(log, rows, covered)

        out_ids = np.empty(n, np.int64)
        out_versions = np.zeros(n, np.int64)
        complete = np.zeros(n, bool)
        out_values = np.empty((n, log.dim), log.dtype) if log.has_values else None
        off = 0
        for seg, cand, pc, ov, values in pieces:
            k = len(cand)
            out_ids[off:off + k] = rows[pc]
            out_versions[off:off + k] = np.abs(ov)  # tombstones are recorded negated
            complete[off:off + k] = True
            if out_values is not None:
                np.take(values, cand, axis=0, out=out_values[off:off + k])
            off += k
        if off < n:
            rest = np.flatnonzero(~resolved)
            out_ids[off:] = rows[rest]
            if out_values is not None:
                out_values[off:] = 0
        return out_ids, out_versions, out_values, complete

    def restore_at_cut(self, model: str, table: str, store: "TableStore", rows_changed_after: np.ndarray,
                       covered: CoveredFn, seq: int | None = None) -> "RestoreOutcome":
        """Put rows back to the cut state in ``store``: :meth:`values_at_cut` fused with the write.

        The same walk as :meth:`values_at_cut`, but the targets go straight to
        :meth:`TableStore.restore_rows` without an output array the size of the
        restore: a whole in-memory segment of at least ``RESTORE_DIRECT_BYTES`` is
        written from the history's own array; smaller pieces are pooled through a
        scratch buffer of at most ``RESTORE_CHUNK_BYTES`` that is kept between calls
        (so it is not page-faulted in again), and written one chunk at a time --
        each ``restore_rows`` is one parallel ``index_copy_``, and a few large ones
        beat many small ones.  Rows the history cannot restore are left alone and
        returned for repair from a peer.

        Args:
            model, table, rows_changed_after, covered: as for :meth:`values_at_cut`.
            store: the table's store.
            seq: when given, the restore itself is recorded under this apply seq
                (recommended, see the module docstring); costs a read of the rows'
                current values.
        """
        rows = np.asarray(rows_changed_after, dtype=np.int64)
        if rows.ndim != 1:
            raise UsageError("rows_changed_after must be a 1-D array of row ids")
        if len(rows) and int(rows.min()) < 0:
            raise UsageError("row ids must be >= 0")
        log = self._logs.get((model, table))
        if log is None or len(rows) == 0:
            return RestoreOutcome(0, rows.copy())
        pieces, resolved = self._walk(log, rows, covered)

        def write(ids: np.ndarray, versions: np.ndarray, values: np.ndarray | None) -> None:
            tomb = versions < 0   # recorded negated: the row was a tombstone at the cut
            versions = np.abs(versions)
            if seq is not None:
                self.record(model, table, seq, capture_before_restore(store, ids, versions))
            store.restore_rows(ids, versions, values, tombstone=tomb if tomb.any() else None)

        restored = 0
        pending: list[tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]] = []
        pending_rows = 0
        row_bytes = log.dim * log.dtype.itemsize if log.has_values and log.dtype is not None else 0
        chunk_rows = max(1, RESTORE_CHUNK_BYTES // row_bytes) if row_bytes else 1 << 62
        for seg, cand, pc, ov, values in pieces:
            ids = rows[pc]
            restored += len(ids)
            if values is not None and seg.path is None and len(cand) == len(values) \
                    and values.nbytes >= RESTORE_DIRECT_BYTES:
                write(ids, ov, values)      # a whole big segment: cand is 0..len-1, no copy
                continue
            while len(ids):
                k = min(len(ids), chunk_rows - pending_rows)
                pending.append((ids[:k], ov[:k], values, cand[:k]))
                pending_rows += k
                ids, ov, cand = ids[k:], ov[k:], cand[k:]
                if pending_rows == chunk_rows:
                    write(*self._pool(pending, pending_rows, log))
                    pending, pending_rows = [], 0
        if pending:
            write(*self._pool(pending, pending_rows, log))
        return RestoreOutcome(restored, rows[~resolved])

    def _pool(self, pending: list[tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]], n: int,
              log: _TableLog) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Concatenate pieces' ids and versions, and gather their values into the kept scratch buffer."""
        ids = np.concatenate([p[0] for p in pending])
        versions = np.concatenate([p[1] for p in pending])
        if not log.has_values:
            return ids, versions, None
        scratch = self._scratch
        if scratch is None or scratch.dtype != log.dtype or scratch.shape[1] != log.dim or scratch.shape[0] < n:
            scratch = self._scratch = np.empty((n, log.dim), log.dtype)
        off = 0
        for _, _, values, cand in pending:
            k = len(cand)
            np.take(values, cand, axis=0, out=scratch[off:off + k])
            off += k
        return ids, versions, scratch[:n]

    def _walk(self, log: _TableLog, rows: np.ndarray, covered: CoveredFn
              ) -> tuple[list[tuple[_Segment, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]], np.ndarray]:
        """Newest-first scan: per segment, (segment, entry positions, row positions, versions, values)."""
        n = len(rows)
        self._seal(log)
        loc = _Locator(rows, max(log.max_id, int(rows.max())), sum(
            int(s.rec_starts[-1]) for s in log.segments))
        resolved = np.zeros(n, dtype=bool)
        mark = np.empty(n, dtype=np.int64)
        pieces: list[tuple[_Segment, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]] = []
        remaining = n
        for seg in reversed(log.segments):
            ids, old, values = self._arrays(seg)
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
                cand, pc, ov = _newest_per_row(cand, pc, ov, mark)
            resolved[pc] = True
            pieces.append((seg, cand, pc, ov, values))
            remaining -= len(pc)
            if remaining == 0:
                break
        loc.release()
        return pieces, resolved

    def stats(self) -> dict[str, int]:
        """Bytes in memory and spilled, segment count (for status and tests)."""
        segs = sum(len(log.segments) for log in self._logs.values())
        spilled = sum(1 for log in self._logs.values() for s in log.segments if s.path is not None)
        return {"memory_bytes": self._mem_bytes, "spilled_bytes": self._spill_bytes, "segments": segs,
                "spilled_segments": spilled}

    # -- internals ------------------------------------------------------------------------
    def _seal(self, log: _TableLog) -> None:
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
        log.segments.append(_Segment(ids, old, values, starts, seqs, int(ids.max()), log.pending_bytes))
        log.pending = []
        log.pending_bytes = 0

    def _enforce_budget(self) -> None:
        while self._mem_bytes > self.max_bytes:
            oldest: tuple[int, _TableLog, str] | None = None
            for (model, _), log in self._logs.items():
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
                self._seal(log)
                seg = next(s for s in log.segments if s.path is None)
            if self.spill_dir is not None:
                self._spill(seg)
            else:
                log.segments.remove(seg)
                self._mem_bytes -= seg.nbytes
                self._horizon[model] = max(self._horizon.get(model, 0), seg.last_seq + 1)
        if self.max_spill_bytes is not None:
            self._enforce_spill_budget()

    def _spill(self, seg: _Segment) -> None:
        assert self.spill_dir is not None and seg.ids is not None and seg.old_versions is not None
        self._spill_counter += 1
        path = os.path.join(self.spill_dir, f"seg-{self._spill_counter:010d}")
        os.makedirs(path, exist_ok=True)
        np.save(os.path.join(path, "ids.npy"), seg.ids)
        np.save(os.path.join(path, "old_versions.npy"), seg.old_versions)
        if seg.values is not None:
            np.save(os.path.join(path, "values.npy"), np.ascontiguousarray(seg.values))
        seg.path = path
        seg.ids = seg.old_versions = seg.values = None
        self._mem_bytes -= seg.nbytes
        self._spill_bytes += seg.nbytes

    def _enforce_spill_budget(self) -> None:
        assert self.max_spill_bytes is not None
        while self._spill_bytes > self.max_spill_bytes:
            oldest = None
            for (model, _), log in self._logs.items():
                for seg in log.segments:
                    if seg.path is not None and (oldest is None or seg.first_seq < oldest[0].first_seq):
                        oldest = (seg, log, model)
                    break  # spilled segments are the oldest of their table
            if oldest is None:
                return
            seg, log, model = oldest
            log.segments.remove(seg)
            self._drop_segment(seg)
            self._horizon[model] = max(self._horizon.get(model, 0), seg.last_seq + 1)

    def _drop_segment(self, seg: _Segment) -> None:
        if seg.path is not None:
            shutil.rmtree(seg.path, ignore_errors=True)
            self._spill_bytes -= seg.nbytes
        else:
            self._mem_bytes -= seg.nbytes

    def _arrays(self, seg: _Segment) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        if seg.path is None:
            assert seg.ids is not None and seg.old_versions is not None
            return seg.ids, seg.old_versions, seg.values
        ids = np.load(os.path.join(seg.path, "ids.npy"))
        old = np.load(os.path.join(seg.path, "old_versions.npy"))
        vpath = os.path.join(seg.path, "values.npy")
        # Memory-mapped: a lookup gathers only the rows it restores from a spilled segment.
        values = np.load(vpath, mmap_mode="r") if os.path.exists(vpath) else None
        return ids, old, values


def _check_segment_image(table: str, s: UndoSegmentImage, log: _TableLog, after_seq: int, max_seq: int
                         ) -> _Segment:
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
    return _Segment(ids, old, values, starts, seqs, int(ids.max()), nbytes)


def _record_bytes(rec: tuple[int, np.ndarray, np.ndarray, np.ndarray | None]) -> int:
    _, ids, old, values = rec
    return ids.nbytes + old.nbytes + (values.nbytes if values is not None else 0) + RECORD_OVERHEAD_BYTES


def _newest_per_row(cand: np.ndarray, pc: np.ndarray, ov: np.ndarray, mark: np.ndarray
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


class _Locator:
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


def capture_before_restore(store: "TableStore", ids: np.ndarray, new_versions: np.ndarray) -> "ApplyResult":
    """What :meth:`TableStore.restore_rows` is about to overwrite, as an ApplyResult to record.

    Example:
        >>> import numpy as np
        >>> from ekko.core.spec import TableSpec
        >>> from ekko.core.store import TableStore
        >>> ts = TableStore(TableSpec("t", rows=4, dim=2), device="cpu")
        >>> r = capture_before_restore(ts, np.array([1]), np.array([0]))
        >>> r.old_versions.tolist(), r.old_values.shape
        ([0], (1, 2))
    """
    from ekko.core.store import ApplyResult, to_wire_values

    ids = np.asarray(ids, dtype=np.int64)
    old_values = to_wire_values(store.read(ids)) if store.values is not None else None
    return ApplyResult(ids, np.asarray(new_versions, dtype=np.int64), store.versions[ids], old_values,
                       store.tombstone[ids])
