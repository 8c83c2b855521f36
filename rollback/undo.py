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
segment by itself (kept without a copy; "large" is ``OWN_SEGMENT_BYTES``, or
``block_bytes`` when smaller); small records are pooled and sealed into one
segment once they reach ``block_bytes``, so the number of segments stays at most
about ``max_bytes / min(block_bytes, OWN_SEGMENT_BYTES)`` whatever the apply rate.  Inside a
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

Modules.  :mod:`rollback.undo_log` stores the segments within the budgets,
:mod:`rollback.undo_walk` walks them, :mod:`rollback.undo_image` converts a model's
history to and from an :class:`UndoImage`; this module decides what is recorded and
restored.

Known gap: :class:`~ekko.core.store.ApplyResult` carries no old *tombstone* flags,
so a row whose state at the cut was a tombstone comes back as zeros with the
tombstone flag clear (same values, so value digests still agree).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ekko.core.errors import UsageError
from rollback.undo_image import UndoImage, image_tables, logs_from_image
from rollback.undo_log import SegmentStore, TableLog
from rollback.undo_walk import CoveredFn, walk

if TYPE_CHECKING:
    from ekko.core.store import ApplyResult, TableStore


#: records smaller than this are pooled into one segment; a bigger one is a segment itself.
DEFAULT_BLOCK_BYTES = 4 << 20
#: restore_at_cut writes a whole in-memory segment at least this big straight from the
#: history (one index_copy_ of it amortizes the call); smaller pieces are pooled.
RESTORE_DIRECT_BYTES = 16 << 20
#: restore_at_cut pools smaller pieces through a scratch buffer of at most this many
#: bytes, kept between calls, written one chunk per restore_rows.
RESTORE_CHUNK_BYTES = 64 << 20


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
        self._store = SegmentStore(int(max_bytes), os.fspath(spill_dir) if spill_dir is not None else None,
                                   max_spill_bytes, int(block_bytes))
        self._last_seq = -1
        self._scratch: np.ndarray | None = None

    @property
    def max_bytes(self) -> int:
        return self._store.max_bytes

    @property
    def block_bytes(self) -> int:
        return self._store.block_bytes

    @property
    def max_spill_bytes(self) -> int | None:
        return self._store.max_spill_bytes

    @property
    def spill_dir(self) -> str | None:
        return self._store.spill_dir

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
        log = self._store.log(model, table)
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
        self._store.add(log, seq, ids, old, values)

    def forget_before(self, model: str, seq: int) -> None:
        """Drop history no live cut needs: records with seq < ``seq`` (whole segments).

        Moves :meth:`horizon` to at least ``seq``: cuts older than that are no longer restorable.
        """
        self._store.forget_before(model, int(seq))

    def drop_model(self, model: str) -> None:
        """Forget every table of a model (it was removed)."""
        self._store.drop_model(model)

    def close(self) -> None:
        """Delete every spill file this history wrote and release the restore scratch buffer."""
        for model in {k[0] for k in self._store.logs}:
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
        tables = image_tables(self._store, model)
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
        if any(k[0] == model for k in self._store.logs):
            raise UsageError(f"undo history of {model!r} exists already; import it before any apply")
        seq = int(image.seq)
        if seq < 0 or int(image.horizon) < 0:
            raise UsageError("undo image seq and horizon must be >= 0")
        logs, total = logs_from_image(image, seq)
        self._store.logs.update(logs)
        self._store.mem_bytes += total
        self._store.horizon[model] = max(self._store.horizon.get(model, 0), int(image.horizon))
        self._last_seq = max(self._last_seq, seq)
        self._store.enforce_budget()

    # -- reads ----------------------------------------------------------------------------
    def horizon(self, model: str) -> int:
        """Oldest seq still fully restorable: a cut with ``cut.seq >= horizon`` has all its history."""
        return self._store.horizon.get(model, 0)

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
        log = self._store.logs.get((model, table))
        if n and int(rows.min()) < 0:
            raise UsageError("row ids must be >= 0")
        if log is None or n == 0:
            values = (np.zeros((n, log.dim), log.dtype) if log is not None and log.has_values else None)
            return rows.copy(), np.zeros(n, np.int64), values, np.zeros(n, bool)
        self._store.seal(log)
        pieces, resolved = walk(log, rows, covered, self._store.arrays)

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
        log = self._store.logs.get((model, table))
        if log is None or len(rows) == 0:
            return RestoreOutcome(0, rows.copy())
        self._store.seal(log)
        pieces, resolved = walk(log, rows, covered, self._store.arrays)

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
              log: TableLog) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
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

    def stats(self) -> dict[str, int]:
        """Bytes in memory and spilled, segment count (for status and tests)."""
        return self._store.stats()


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
