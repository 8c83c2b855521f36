"""The replica store: each table a tensor updated in place, with per-row versions.

Values live in a torch tensor on the replica's device (CUDA when available);
per-row packed versions (:mod:`ekko.core.version`) live in a CPU numpy array because
the protocol scans and compares them on the CPU, and only the rows that win are
copied to the device.  Applying a delta is vectorized end to end: a gather of
the current versions, a compare, a scatter of the winners' versions and one
scatter of the winning rows (numpy's fancy assignment in host memory, ``index_copy_``
on a device).  Duplicate ids inside one delta (rare)
are detected with one sort and collapsed among the winners to the greatest
version of each.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from ekko.core.delta import Delta
from ekko.core.errors import UsageError
from ekko.core.frozen import FrozenValues
from ekko.core.hash64 import mark_changes, row_marks
from ekko.core.hugepages import zeros_tensor
from ekko.core.key_index import KeyMap
from ekko.core.shard_blocks import ShardBlocks
from ekko.core.store_keys import KeyedRows
from ekko.core.store_shards import HeldShards
from ekko.core.spec import ModelSpec, TableSpec
from ekko.core.version import Knowledge, counters_of

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "float64": torch.float64}


def default_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def to_wire_values(t: torch.Tensor) -> np.ndarray:
    """A (CPU or device) tensor as the numpy array the wire carries (bf16 as uint16 bits)."""
    t = t.detach().to("cpu")
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def _tensor(a: np.ndarray) -> torch.Tensor:
    """``torch.from_numpy`` of an array that may be read-only (a parsed payload shared
    by simulated receivers, :mod:`ekko.core.parse_cache`): torch cannot share those, so copy."""
    return torch.from_numpy(a if a.flags.writeable else a.copy())


def from_wire_values(a: np.ndarray, dtype: str, device: torch.device) -> torch.Tensor:
    """The inverse of :func:`to_wire_values`, landing on ``device``."""
    t = _tensor(a.view(np.int16)).view(torch.bfloat16) if dtype == "bfloat16" else _tensor(a)
    return t.to(device, non_blocking=True)


@dataclass(frozen=True, slots=True)
class ApplyResult:
    """What an apply changed: the rows that took a new version.

    Attributes:
        ids: int64 row ids that changed (each at most once).
        versions: their new packed versions.
        old_versions: their versions before the apply (0 = never written).
        old_values: their values before the apply as a wire array, when asked for
            (the undo history of :mod:`rollback` uses it), else None.
        old_tombstone: whether each row was a tombstone before the apply, when asked
            for (with ``old_values``), else None: a rollback must restore deletes too.
    """

    ids: np.ndarray
    versions: np.ndarray
    old_versions: np.ndarray
    old_values: np.ndarray | None = None
    old_tombstone: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.ids.shape[0])


_EMPTY = np.zeros(0, np.int64)


class TableStore(HeldShards, KeyedRows):
    """One table on one replica: values on the device, versions on the CPU.

    Args:
        spec: the table's spec.
        device: where the values live; default :func:`default_device`.
        with_values: False keeps versions only (the simulator's metadata mode).
        held: bool per shard: keep values only for these shards, packed one block per
            shard (:class:`~ekko.core.shard_blocks.ShardBlocks`; a placed model, issue
            #18); None: every shard, ``values[i]`` is row ``i``.  Rows of a shard not
            held are refused (:class:`UsageError`, nothing changes); versions and
            tombstones stay full-length.

    Example:
        >>> import numpy as np
        >>> ts = TableStore(TableSpec("t", rows=10, dim=2), device="cpu")
        >>> d = Delta("m", "t", np.array([4, 4]), np.array([7, 9]), np.array([[1, 1], [2, 2]], np.float32))
        >>> r = ts.apply(d)
        >>> r.ids.tolist(), ts.values[4].tolist(), int(ts.versions[4])
        ([4], [2.0, 2.0], 9)
        >>> half = TableStore(TableSpec("t", rows=10, dim=2, shards=2), device="cpu", held=np.array([False, True]))
        >>> tuple(half.values.shape), half.read(np.array([7])).tolist()
        ((5, 2), [[0.0, 0.0]])
    """

    def __init__(self, spec: TableSpec, device: torch.device | str | None = None, with_values: bool = True,
                 held: np.ndarray | None = None) -> None:
        self.spec = spec
        #: which shards' values are kept and where (None: all, ``values[i]`` is row ``i``).
        self.blocks: ShardBlocks | None = ShardBlocks(spec, held) if held is not None else None
        self.device = torch.device(device) if device is not None else default_device()
        # np.full, not np.zeros: touch every page now rather than fault them in on the
        # first applies (calloc maps zero pages lazily).
        self.versions = np.full(spec.rows, 0, dtype=np.int64)
        self.tombstone = np.zeros(spec.rows, dtype=bool)
        # The tombstone array while it is known to hold no tombstone (None once one may
        # have been written): clearing flags in it is then a no-op that applies skip -- a
        # scatter into a cold array at every replica.  Only this class writes the array in
        # place; one assigned from outside (a snapshot load, a copy) is not this object.
        self._tomb_clean: np.ndarray | None = self.tombstone
        self.values: torch.Tensor | None = (
            zeros_tensor((spec.rows if self.blocks is None else self.blocks.rows, spec.width),
                         TORCH_DTYPES[spec.dtype], self.device)
            if with_values else None)
        self._shard_hash: dict[int, bytes] = {}
        self._dirty = np.ones(spec.num_shards, dtype=bool)
        self._tags = _EMPTY  # scratch for apply's duplicate check, grown on demand
        # Rows with a version (written_rows), kept by apply and restore_rows; counted
        # afresh once when ``versions`` is an array this object did not count (a load).
        self._written = 0
        self._written_of: np.ndarray | None = self.versions
        # Per shard, the xor of the marks of its rows (shard_row_hashes), kept the same way:
        # apply and restore_rows update it, an array assigned from outside is hashed afresh.
        self._row_hash = np.zeros(spec.num_shards, dtype=np.uint64)
        self._row_hash_of: np.ndarray | None = self.versions
        #: a one-element int64 array (shared memory, ``ekko.server.shared_tables``) counted up
        #: before and after every write of ``values``: odd while a write is under way, so a
        #: reader in another process can tell a torn read and retry (a seqlock).  None: unused.
        self.write_seq: np.ndarray | None = None
        # Point-in-time views being read (a snapshot): each saves rows before they change.
        self._frozen: list[FrozenValues] = []
        # A hashed table's key -> slot map (lookup), built on first use from the keys the
        # rows hold; then apply and restore_rows only note the slots they write, and the
        # next lookup rebinds those (a slot written many times is rebound once, and the
        # apply path, which every push takes, pays nothing: rebinding 1k rows cost 1.4 ms).
        # Built afresh when ``values`` is a tensor this object did not map (a snapshot
        # load, a copy, shared memory) or when more than store_keys.KEY_MAP_MAX_PENDING slots wait.
        # A lock, since a serving thread looks up while the replica's thread applies.
        self._key_map: KeyMap | None = None
        self._key_map_of: torch.Tensor | None = None
        self._key_pending: list[np.ndarray] = []
        self._key_pending_rows = 0
        self._key_lock = threading.Lock()

    # -- writes -----------------------------------------------------------------------------
    def apply(self, delta: Delta, capture_old: bool = False, distinct: bool | None = None,
              shards: np.ndarray | None = None) -> ApplyResult:
        """Apply a delta in place; rows change only where the incoming version is greater.

        Several copies of one row in the delta resolve to the greatest version (copies
        with the same id and version are one update; any of them is taken).  The delta
        must already be validated (:meth:`Delta.check`); a delta the store cannot take
        raises :class:`UsageError` before anything changes.

        ``distinct`` (whether ``delta.ids`` has no repeats) and ``shards`` (the shard of
        each of ``delta.ids``) are what a caller may already know of the ids, to save
        computing them again; None = unknown.  A push fanned out to many simulated
        replicas shares one parsed delta, so its receivers learn them once.
        """
        n = len(delta)
        if n == 0:
            return ApplyResult(_EMPTY, _EMPTY, _EMPTY)
        if self.values is not None and delta.values is None and (delta.tombstone is None
                                                                 or not delta.tombstone.all()):
            raise UsageError(f"{delta.model}/{delta.table}: delta without values for a store with values")
        ids, inc = delta.ids, delta.versions
        # Where the rows sit in ``values``; refuses rows of shards not held, before any change.
        at = self._pos(ids)
        # Duplicate ids are rare (a publisher sends each row once per publish): one sort
        # detects them (sequential, cheaper than any check on the version array with
        # cold caches), and only then are the winners collapsed.
        dups = False
        if distinct is not None:
            dups = not distinct
        elif n > 1:
            s = np.sort(ids)
            dups = bool((s[1:] == s[:-1]).any())
        old = self.versions[ids]
        win = inc > old
        if win.all():
            pos = None
            wid, old_w, new_w = ids, old, inc
        else:
            pos = np.flatnonzero(win)
            if len(pos) == 0:
                return ApplyResult(_EMPTY, _EMPTY, _EMPTY)
            wid, old_w, new_w = ids[pos], old[pos], inc[pos]
        if dups and len(wid) > 1:
            keep = self._one_per_row(wid, old_w, new_w)
            if keep is not None:
                pos = keep if pos is None else pos[keep]
                wid, old_w, new_w = wid[keep], old_w[keep], new_w[keep]
        # positions of the winners in ``values`` (``pos`` indexes the delta's rows)
        wat = wid if self.blocks is None else (at if pos is None else at[pos])
        self.versions[wid] = new_w
        self._written += int(np.count_nonzero(old_w == 0))
        self._rehash_rows(wid, old_w, new_w, shards if wid is ids else None)
        old_values = None
        old_tomb = self.tombstone[wid] if capture_old else None  # fancy indexing: a copy
        tomb = None
        if delta.tombstone is not None:
            tomb = delta.tombstone if pos is None else delta.tombstone[pos]
        if self.values is not None:
            if self._frozen:
                self._before_write(wat)
            host = self._host_view()
            on_host = host is not None and (delta.values is None or delta.values.dtype == host.dtype)
            # The row positions as a tensor: for the undo capture and a device's writes only.
            idx = None if on_host and not capture_old else _tensor(wat).to(self.device, non_blocking=True)
            if capture_old:
                old_values = to_wire_values(self.values.index_select(0, idx))
            if on_host:
                rows: Any = 0   # all tombstones (checked above)
                if delta.values is not None:
                    rows = delta.values if pos is None else delta.values[pos]
                    if tomb is not None and tomb.any():
                        rows = rows.copy()   # it may be the caller's array
                        rows[tomb] = 0
                self._begin_write()
                host[wat] = rows
            elif delta.values is not None:
                src = from_wire_values(delta.values if pos is None else delta.values[pos], self.spec.dtype,
                                       self.device)
                if tomb is not None and tomb.any():
                    # Copy first: on the CPU ``src`` may alias the caller's array.
                    src = src.clone()
                    src[_tensor(tomb).to(self.device)] = 0
                self._begin_write()
                self.values.index_copy_(0, idx, src)
            else:  # all tombstones, checked above
                self._begin_write()
                self.values.index_fill_(0, idx, 0)
            self._end_write()
        if tomb is not None:
            self.tombstone[wid] = tomb
            self._tomb_clean = None
        elif self._tomb_clean is not self.tombstone:
            self.tombstone[wid] = False
        if self._key_map is not None:
            self._note_written(wid)
        self._mark_dirty(wid, shards if wid is ids else None)
        return ApplyResult(wid, new_w, old_w, old_values, old_tomb)

    def _one_per_row(self, wid: np.ndarray, old_w: np.ndarray, new_w: np.ndarray) -> np.ndarray | None:
        """None when the winning ids are distinct, else positions of one greatest copy per id.

        Uses the version array as scratch instead of a lexsort of the delta (which cost
        4x the rest of the apply at 5% duplicates): each position writes a distinct
        negative tag to its row, and a row whose tag is not its own was written twice.
        The caller then overwrites every tagged row with its version.
        """
        m = len(wid)
        if len(self._tags) < m:
            self._tags = -1 - np.arange(max(m, 2 * len(self._tags)), dtype=np.int64)
        tag = self._tags[:m]
        v = self.versions
        try:
            v[wid] = tag
            if np.array_equal(v[wid], tag):
                return None
            # Duplicates: tags are negative, so the maximum is the greatest copy's version;
            # then tag again among the greatest copies to keep exactly one per row.
            np.maximum.at(v, wid, new_w)
            best = np.flatnonzero(v[wid] == new_w)
            v[wid[best]] = tag[:len(best)]
            return best[v[wid[best]] == tag[:len(best)]]
        except BaseException:
            v[wid] = old_w   # every copy of a row saw the same old version
            raise

    def restore_rows(self, ids: np.ndarray, versions: np.ndarray, values: np.ndarray | None,
                     tombstone: np.ndarray | None = None) -> None:
        """Overwrite rows unconditionally (rollback); versions may go *down* here only.

        Used by :mod:`rollback` to put rows back at a cut; ids must be unique.
        """
        if len(ids) == 0:
            return
        if self.values is not None and values is None:
            raise UsageError("restore_rows needs values on a store with values")
        at = self._pos(np.asarray(ids, np.int64))   # refuses shards not held, before any change
        old = self.versions[ids]
        self._written += int(np.count_nonzero(versions)) - int(np.count_nonzero(old))
        self.versions[ids] = versions
        self._rehash_rows(ids, old, versions, None)
        if tombstone is not None:
            self.tombstone[ids] = tombstone
            self._tomb_clean = None
        elif self._tomb_clean is not self.tombstone:
            self.tombstone[ids] = False
        if self.values is not None:
            if self._frozen:
                self._before_write(at)
            host = self._host_view()
            values = np.ascontiguousarray(values)
            self._begin_write()
            if host is not None and values.dtype == host.dtype:
                host[at] = values
            else:
                idx = _tensor(np.ascontiguousarray(at)).to(self.device)
                self.values.index_copy_(0, idx, from_wire_values(values, self.spec.dtype, self.device))
            self._end_write()
        if self._key_map is not None:
            self._note_written(np.asarray(ids, np.int64))
        self._mark_dirty(ids)

    def _host_view(self) -> np.ndarray | None:
        """``values`` as a numpy array sharing its memory, in the wire's dtype (bfloat16 as
        its uint16 bits), when they are in host memory; else None.

        Rows are written through it: numpy's fancy assignment copies a row at a time
        (a memcpy each), where ``index_copy_`` on the CPU goes element by element --
        1.2-2.8x the time for 1k and 10k random rows of 64 float32 into a 1M-row table
        here (timed with warm and with flushed caches), at every replica for every update.
        """
        v = self.values
        if v is None or v.device.type != "cpu" or not v.is_contiguous():
            return None
        if v.dtype == torch.bfloat16:
            return v.view(torch.int16).numpy().view(np.uint16)
        return v.numpy()

    def _begin_write(self) -> None:
        """Open a write of ``values`` for readers in other processes (:attr:`write_seq` odd)."""
        if self.write_seq is not None:
            self.write_seq[0] += 1

    def _end_write(self) -> None:
        """Close a write opened by :meth:`_begin_write` (:attr:`write_seq` even again).

        On a GPU the write is only queued on the stream when the call returns; a reader
        in another process trusts an even counter to mean no write is under way, so the
        stream is drained first (shared tables only: :attr:`write_seq` is None otherwise,
        and applies stay asynchronous)."""
        if self.write_seq is not None:
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()
            self.write_seq[0] += 1

    # -- point-in-time views ------------------------------------------------------------------
    def freeze(self, run: Callable[[Callable[[], Any]], Any] | None = None) -> FrozenValues:
        """A view of ``values`` as they are now, read block by block while writes go on
        (copy-on-write: :mod:`ekko.core.frozen`); :meth:`FrozenValues.close` it when done.
        ``run`` hops a reader on another thread to the writing one (``call_on_loop``)."""
        frozen = FrozenValues(self, run)
        self._frozen.append(frozen)
        return frozen

    def _unfreeze(self, frozen: FrozenValues) -> None:
        self._frozen = [f for f in self._frozen if f is not frozen]

    def _before_write(self, ids: np.ndarray) -> None:
        for f in self._frozen:
            f.before_write(ids)

    def _rehash_rows(self, ids: np.ndarray, old: np.ndarray, new: np.ndarray, shards: np.ndarray | None) -> None:
        """Rows ``ids`` (distinct) went from versions ``old`` to ``new``: swap their marks
        in the shard row hashes."""
        if self._row_hash_of is not self.versions:
            return   # hashed afresh when next asked for
        x = mark_changes(ids, old, new)
        if self.spec.num_shards == 1:
            self._row_hash[0] ^= np.bitwise_xor.reduce(x)
            return
        sh = self.spec.shards_of(ids) if shards is None else shards
        if len(sh) > 64:
            # A publish or push arrives grouped by shard: xor each run first, since
            # bitwise_xor.at costs 15 ns a row (152 us for 10k rows, a run-wise pass 30).
            starts = np.flatnonzero(sh[1:] != sh[:-1])
            if len(starts) < len(sh) // 8:
                starts = np.concatenate(([0], starts + 1))
                x, sh = np.bitwise_xor.reduceat(x, starts), sh[starts]
        np.bitwise_xor.at(self._row_hash, sh, x)

    def _mark_dirty(self, ids: np.ndarray, shards: np.ndarray | None = None) -> None:
        # A scatter of True, not np.unique: the latter sorts and costs more than the apply.
        if self.spec.num_shards == 1:
            self._dirty[0] = True
        else:
            self._dirty[self.spec.shards_of(ids) if shards is None else shards] = True

    # -- reads ------------------------------------------------------------------------------
    def written_rows(self) -> int:
        """Rows that hold a version (a value or a tombstone), without a scan of the table:
        kept up to date by :meth:`apply` and :meth:`restore_rows`.

        Example:
            >>> ts = TableStore(TableSpec("t", rows=10, dim=1), device="cpu", with_values=False)
            >>> _ = ts.apply(Delta("m", "t", np.array([1, 2, 2]), np.array([5, 5, 6]), None))
            >>> ts.written_rows()
            2
        """
        if self._written_of is not self.versions:   # assigned from outside (a snapshot load)
            self._written = int(np.count_nonzero(self.versions))
            self._written_of = self.versions
        return self._written

    def shard_row_hashes(self) -> np.ndarray:
        """Per shard, the xor of :func:`~ekko.core.hash64.row_marks` of every row it holds
        (uint64; 0 for a shard with no row): equal on two replicas when they hold the same
        versions of the same rows.  Part of the shard versions anti-entropy compares, so a
        row one replica holds below a knowledge both share is noticed (:mod:`p2p.audit`).
        Kept by :meth:`apply` and :meth:`restore_rows` at O(rows written); read-only.

        Example:
            >>> ts = TableStore(TableSpec("t", rows=8, dim=1, shards=2), device="cpu", with_values=False)
            >>> _ = ts.apply(Delta("m", "t", np.array([1, 6]), np.array([5, 5]), None))
            >>> h = ts.shard_row_hashes().copy()
            >>> ts.restore_rows(np.array([6]), np.array([0]), None)
            >>> bool(h[0] == ts.shard_row_hashes()[0]), int(ts.shard_row_hashes()[1])
            (True, 0)
        """
        if self._row_hash_of is not self.versions:
            fresh = np.zeros(self.spec.num_shards, np.uint64)
            if self.spec.rows:   # trailing shards may hold no rows (TableSpec.shard_range)
                got = self.bucket_row_hashes(0, self.spec.rows, self.spec.shard_rows)
                fresh[:len(got)] = got
            self._row_hash, self._row_hash_of = fresh, self.versions
        return self._row_hash

    def bucket_row_hashes(self, lo: int, hi: int, bucket_rows: int) -> np.ndarray:
        """The xor of the row marks of rows ``[lo, hi)`` in consecutive buckets of
        ``bucket_rows`` rows (the last may be shorter); computed from the versions."""
        if not 0 <= lo < hi <= self.spec.rows or bucket_rows < 1:
            raise UsageError(f"bad row range [{lo}, {hi}) / {bucket_rows} of table {self.spec.name}")
        marks = row_marks(np.arange(lo, hi, dtype=np.int64), self.versions[lo:hi])
        return np.bitwise_xor.reduceat(marks, np.arange(0, hi - lo, bucket_rows))

    def read(self, ids: np.ndarray) -> torch.Tensor:
        """Values of rows (a copy, on the store's device)."""
        if self.values is None:
            raise UsageError("this store keeps no values (metadata mode)")
        return self.values.index_select(0, _tensor(self._pos(np.asarray(ids, np.int64))).to(self.device))

    def take(self, model: str, ids: np.ndarray) -> Delta:
        """The current state of rows as a delta (values, versions, tombstones)."""
        ids = np.asarray(ids, dtype=np.int64)
        values = to_wire_values(self.read(ids)) if self.values is not None else None
        tomb = self.tombstone[ids]
        return Delta(model, self.spec.name, ids, self.versions[ids], values, tomb if tomb.any() else None)

    def scan_newer(self, shard: int, knowledge: Knowledge) -> tuple[np.ndarray, np.ndarray]:
        """Vectorized scan of a shard: ids and versions not covered by ``knowledge``.

        Returned in version order (counter order, as Scuttlebutt sends them).
        """
        lo, hi = self.spec.shard_range(shard)
        v = self.versions[lo:hi]
        mask = v > 0
        if len(knowledge):
            mask &= ~knowledge.covers(v)
        ids = np.flatnonzero(mask).astype(np.int64) + lo
        vers = v[mask]
        order = np.argsort(vers, kind="stable")
        return ids[order], vers[order]

    def max_counter(self) -> int:
        return int(counters_of(self.versions.max(initial=0)))

    def digest(self) -> str:
        """Hash of the row values in row order (values only), hex.

        Equal across replicas exactly when their values are bit-identical (of the shards
        held here, for a packed store).  Kept per shard and recomputed only for shards
        written since the last call.
        """
        if self.values is None:
            raise UsageError("this store keeps no values (metadata mode)")
        held = self.held()
        for s in np.flatnonzero(self._dirty).tolist():
            if not held[s]:
                self._shard_hash[s] = b""   # values not kept here: not part of the digest
                continue
            lo, hi = self.spec.shard_range(s) if self.blocks is None else self.blocks.shard_span(s)
            chunk = self.values[lo:hi].detach().to("cpu").contiguous()
            raw = chunk.view(torch.uint8).numpy() if chunk.numel() else b""
            self._shard_hash[s] = hashlib.blake2b(raw, digest_size=16).digest()
        self._dirty[:] = False
        h = hashlib.blake2b(digest_size=16)
        for s in range(self.spec.num_shards):
            h.update(self._shard_hash[s])
        return h.hexdigest()


class ModelStore:
    """All tables of one model on one replica.

    Example:
        >>> ms = ModelStore(ModelSpec("m", tables=[TableSpec("t", rows=4, dim=2)]), device="cpu")
        >>> ms.table("t").spec.rows
        4
    """

    def __init__(self, spec: ModelSpec, device: torch.device | str | None = None, with_values: bool = True,
                 held: dict[str, np.ndarray] | None = None) -> None:
        """``held``: per table, the shards whose values to keep (a placed model; tables not
        named keep every shard)."""
        self.spec = spec
        held = held or {}
        self.tables = {t.name: TableStore(t, device, with_values, held.get(t.name)) for t in spec.tables}

    def copy(self) -> "ModelStore":
        """A point-in-time copy (versions, tombstones, values cloned on their own device):
        what a snapshot writer or a restarted simulated replica takes."""
        out = ModelStore(self.spec, device="cpu", with_values=False)
        for name, ts in self.tables.items():
            c = out.tables[name]
            c.device = ts.device
            c.versions = ts.versions.copy()
            c.tombstone = ts.tombstone.copy()
            c.values = ts.values.detach().clone() if ts.values is not None else None
            c.blocks = ts.blocks.copy() if ts.blocks is not None else None
        return out

    def freeze(self, run: Callable[[Callable[[], Any]], Any] | None = None
               ) -> tuple["ModelStore", dict[str, FrozenValues]]:
        """A point-in-time state without the cost of a copy of the values: versions and
        tombstones copied, and for each table with values a :class:`FrozenValues` view
        (copy-on-write) to read them from.  What a daemon's snapshot takes; close every
        view when it is written."""
        out = ModelStore(self.spec, device="cpu", with_values=False)
        views: dict[str, FrozenValues] = {}
        try:
            for name, ts in self.tables.items():
                c = out.tables[name]
                c.device = ts.device
                c.versions = ts.versions.copy()
                c.tombstone = ts.tombstone.copy()
                c.blocks = ts.blocks.copy() if ts.blocks is not None else None
                if ts.values is not None:
                    views[name] = ts.freeze(run)
        except BaseException:
            for v in views.values():
                v.close()
            raise
        return out, views

    def table(self, name: str) -> TableStore:
        try:
            return self.tables[name]
        except KeyError:
            raise UsageError(f"model {self.spec.name} has no table {name!r}") from None
