"""Snapshots of a replica's model state on local disk, written atomically.

A replica snapshots each model so that a restart resumes from its last state
(values, versions, tombstones and the node's knowledge vectors) instead of
pulling everything again, and so that versions never go backwards across
restarts (invariant 3 of the design).

Layout, one directory per model::

    data_dir/models/<model>/
        manifest.json        format version, spec, and for every file: name, size, blake2b
        t0000.versions.npy   int64 packed versions, shape (rows,)
        t0000.tombstone.npy  bool tombstone flags, shape (rows,)
        t0000.values.bin     raw little-endian bytes of the values (bfloat16 as int16 bits)
        ...                  (tNNNN = the table's position in the spec)
        meta.msgpack         the caller's metadata (the node keeps knowledge vectors there)
        t0000.undo.*.bin     the table's undo history, when one is kept (see below)

Writes are atomic: everything goes to ``.<model>.tmp`` beside the model
directory, every file and the directory are fsynced, the current directory is
renamed to ``.<model>.old``, the new one is renamed into place, and only then
is the old one removed.  A crash leaves either the previous snapshot or the new
one; if it strikes between the two renames, :func:`load_snapshot` finds the
previous one under ``.<model>.old``.  One writer per model at a time.

The undo history (:class:`rollback.undo_image.UndoImage`, optional): per table with
history, four raw little-endian files -- ``undo.ids.bin`` and ``undo.old.bin``
(int64 per entry), ``undo.recs.bin`` (int64 ``[entries, seq]`` per record) and
``undo.values.bin`` (the old values in the wire dtype) -- with every segment's
``[records, entries]``, the image's ``seq`` and ``horizon`` and ``UNDO_FORMAT`` in
the manifest's ``undo`` entry.  It is as big as the history (``undo_bytes`` at
most, plus what was spilled), written from the history's own arrays.
:func:`load_undo` reads it back segment by segment; a damaged history never
fails the snapshot: the image comes back empty with the reason (the tables
still load).

Loading checks the manifest's own checksum, every file's size and checksum, the
format version and the spec, and raises :class:`~ekko.core.errors.ProtocolError`
with reason ``"bad_snapshot"`` on any mismatch: a corrupt snapshot is bad input
from the past, and the caller falls back to syncing from peers.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, BinaryIO

import msgpack
import numpy as np
import torch

from ekko.core.delta import WIRE_DTYPES
from ekko.core.errors import ProtocolError, UsageError
from ekko.core.frozen import FROZEN_BLOCK_BYTES, FrozenValues
from ekko.core.shard_blocks import ShardBlocks
from ekko.core.fsutil import fsync_dir
from ekko.core.spec import NAME_RE, ModelSpec, TableSpec
from ekko.core.store import TORCH_DTYPES, ModelStore, TableStore, default_device
from rollback.undo_image import UndoImage, UndoSegmentImage

#: snapshot layout version; a loader refuses other versions.
SNAPSHOT_FORMAT = 1
#: layout version of the undo history inside a snapshot; other versions are ignored (no history).
UNDO_FORMAT = 1
MANIFEST = "manifest.json"
META = "meta.msgpack"
#: values are moved through host memory in chunks of about this many bytes.
CHUNK_BYTES = 64 << 20
#: largest manifest or meta file read back (they hold specs and knowledge vectors, not values).
MAX_SMALL_FILE = 256 << 20
_HASH_BYTES = 32


def _models_dir(data_dir: str | os.PathLike) -> Path:
    return Path(data_dir) / "models"


def _check_model_name(name: str) -> None:
    # fullmatch: NAME_RE.match with '$' lets a trailing newline through, and the name
    # becomes a directory name here.
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise UsageError(f"invalid model name {name!r}")


def _bad(msg: str) -> ProtocolError:
    return ProtocolError(f"bad snapshot: {msg}", "bad_snapshot")


class _HashingWriter:
    """File writer that hashes and counts what goes through it."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.h = hashlib.blake2b(digest_size=_HASH_BYTES)
        self.size = 0

    def write(self, b: Any) -> int:
        mv = memoryview(b).cast("B")
        self.h.update(mv)
        self.size += len(mv)
        return self.f.write(mv)

    def entry(self, name: str) -> dict[str, Any]:
        return {"file": name, "size": self.size, "blake2b": self.h.hexdigest()}


def _write_file(path: Path, fill) -> dict[str, Any]:
    """Create ``path``, let ``fill(writer)`` write it, fsync; returns its manifest entry."""
    with open(path, "wb") as f:
        w = _HashingWriter(f)
        fill(w)
        f.flush()
        os.fsync(f.fileno())
    return w.entry(path.name)



def _host_array(block: torch.Tensor) -> np.ndarray:
    """A block of values as a little-endian host numpy array (bfloat16 as int16 bits)."""
    chunk = block.detach().to("cpu").contiguous()
    if chunk.dtype == torch.bfloat16:
        chunk = chunk.view(torch.int16)
    a = chunk.numpy()
    return a.astype(a.dtype.newbyteorder("<"), copy=False)


def _manifest_checksum(body: dict[str, Any]) -> str:
    canon = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.blake2b(canon, digest_size=_HASH_BYTES).hexdigest()


def save_snapshot(data_dir: str | os.PathLike, model_store: ModelStore, meta: dict[str, Any],
                  undo: UndoImage | None = None, frozen: dict[str, FrozenValues] | None = None) -> Path:
    """Write a model's state to ``data_dir/models/<model>/``, replacing the previous snapshot atomically.

    Args:
        data_dir: the replica's data directory (created if missing).
        model_store: the model's tables; values may live on any device.
        meta: msgpack-able metadata stored beside the tables (integer keys allowed),
            e.g. the node's knowledge vectors and HLC floor.
        undo: the model's undo history, taken in the same instant as ``model_store``
            (:meth:`rollback.undo.UndoHistory.export_model`); read back by :func:`load_undo`.
        frozen: values to write instead of ``model_store``'s, by table name: views of the
            live tables at the instant of ``model_store`` (:meth:`ModelStore.freeze`), read
            block by block, so that the snapshot needs no copy of the tables.

    Returns:
        The model's snapshot directory.

    Raises:
        UsageError: ``meta`` cannot be packed, or the model name is not a safe file name.
        OSError: the disk refused; the previous snapshot is then left in place.

    Example:
        >>> import tempfile, numpy as np
        >>> from ekko import Delta, ModelSpec, TableSpec
        >>> ms = ModelStore(ModelSpec("m", tables=[TableSpec("t", rows=4, dim=2)]), device="cpu")
        >>> _ = ms.table("t").apply(Delta("m", "t", np.array([1]), np.array([5]), np.ones((1, 2), np.float32)))
        >>> d = tempfile.mkdtemp()
        >>> save_snapshot(d, ms, {"knowledge": {1: 5}}).name
        'm'
        >>> store, meta = load_snapshot(d, ms.spec, "cpu")
        >>> store.table("t").values[1].tolist(), meta
        ([1.0, 1.0], {'knowledge': {1: 5}})
    """
    spec = model_store.spec
    _check_model_name(spec.name)
    try:
        meta_bytes = msgpack.packb(meta, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as e:
        raise UsageError(f"snapshot meta is not msgpack-able: {e}") from None
    models = _models_dir(data_dir)
    models.mkdir(parents=True, exist_ok=True)
    final, tmp, old = models / spec.name, models / f".{spec.name}.tmp", models / f".{spec.name}.old"
    if tmp.exists():
        shutil.rmtree(tmp)       # a crashed earlier save
    tmp.mkdir()
    try:
        tables = []
        for i, t in enumerate(spec.tables):
            ts = model_store.table(t.name)
            stem = f"t{i:04d}"
            entry: dict[str, Any] = {
                "name": t.name,
                "versions": _write_file(tmp / f"{stem}.versions.npy",
                                        lambda w, a=ts.versions: np.save(w, np.ascontiguousarray(a, "<i8"))),
                "tombstone": _write_file(tmp / f"{stem}.tombstone.npy",
                                         lambda w, a=ts.tombstone: np.save(w, np.ascontiguousarray(a, "?"))),
                "values": None,
            }
            if ts.blocks is not None:
                # A placed table's values hold only its held shards, packed: the map says where.
                entry["blocks"] = ts.blocks.to_list()
            view = (frozen or {}).get(t.name)
            if view is not None:
                rows_per_block = max(1, FROZEN_BLOCK_BYTES // max(1, t.row_bytes))

                def fill(w, v=view, k=rows_per_block):
                    for lo in range(0, v.rows, k):
                        w.write(_host_array(v.block(lo, min(v.rows, lo + k))))

                entry["values"] = _write_file(tmp / f"{stem}.values.bin", fill)
            elif ts.values is not None:
                rows_per_chunk = max(1, CHUNK_BYTES // max(1, t.row_bytes))

                def fill(w, v=ts.values, k=rows_per_chunk):
                    for lo in range(0, v.shape[0], k):
                        w.write(_host_array(v[lo:lo + k]))

                entry["values"] = _write_file(tmp / f"{stem}.values.bin", fill)
            tables.append(entry)
        meta_entry = _write_file(tmp / META, lambda w: w.write(meta_bytes))
        body = {"format": SNAPSHOT_FORMAT, "model": spec.name, "spec": spec.to_dict(), "tables": tables,
                "meta": meta_entry}
        if undo is not None:
            body["undo"] = _write_undo(tmp, spec, undo)
        manifest = {"body": body, "blake2b": _manifest_checksum(body)}
        _write_file(tmp / MANIFEST, lambda w: w.write(json.dumps(manifest, indent=1).encode()))
        fsync_dir(tmp)
        # Swap: keep the previous snapshot until the new one is in place.
        if final.exists():
            if old.exists():
                shutil.rmtree(old)   # left by a crash after a completed swap
            os.rename(final, old)
        os.rename(tmp, final)
        fsync_dir(models)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if not final.exists() and old.exists():
            os.rename(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return final


def _write_undo(tmp: Path, spec: ModelSpec, image: UndoImage) -> dict[str, Any]:
    """Write an undo image's files into ``tmp``; returns the manifest's ``undo`` entry."""
    if image.model != spec.name:
        raise UsageError(f"undo image of {image.model!r} given for model {spec.name!r}")
    tables = []
    for i, t in enumerate(spec.tables):
        segs = image.tables.get(t.name)
        if not segs:
            continue
        stem = f"t{i:04d}.undo"

        def fill(w, part, segs=segs):
            for sg in segs:
                if part == "recs":
                    a = np.stack([np.diff(sg.rec_starts), sg.rec_seqs], axis=1)
                else:
                    a = getattr(sg, part)
                w.write(np.ascontiguousarray(a, a.dtype.newbyteorder("<")))

        v0 = segs[0].values
        tables.append({
            "name": t.name, "dtype": None if v0 is None else v0.dtype.name,
            "dim": 0 if v0 is None else int(v0.shape[1]),
            "segments": [[len(sg.rec_seqs), len(sg.ids)] for sg in segs],
            "ids": _write_file(tmp / f"{stem}.ids.bin", lambda w: fill(w, "ids")),
            "old": _write_file(tmp / f"{stem}.old.bin", lambda w: fill(w, "old_versions")),
            "recs": _write_file(tmp / f"{stem}.recs.bin", lambda w: fill(w, "recs")),
            "values": None if v0 is None else _write_file(tmp / f"{stem}.values.bin", lambda w: fill(w, "values")),
        })
    return {"format": UNDO_FORMAT, "seq": int(image.seq), "horizon": int(image.horizon), "tables": tables}


def list_snapshot_models(data_dir: str | os.PathLike) -> list[str]:
    """Names of the models that have a snapshot under ``data_dir``, sorted.

    Example:
        >>> import tempfile
        >>> list_snapshot_models(tempfile.mkdtemp())
        []
    """
    models = _models_dir(data_dir)
    if not models.is_dir():
        return []
    names = set()
    for p in models.iterdir():
        name = p.name
        if name.startswith(".") and name.endswith(".old"):
            name = name[1:-4]   # a swap interrupted between its renames
        if NAME_RE.fullmatch(name) and _resolve_dir(models, name) is not None:
            names.add(name)
    return sorted(names)


def _read_small(path: Path, entry: Any) -> bytes:
    if path.stat().st_size > MAX_SMALL_FILE:
        raise _bad(f"{path.name} is larger than {MAX_SMALL_FILE} bytes")
    data = path.read_bytes()
    if entry is not None:
        _check_bytes(path.name, data, entry)
    return data


def _check_entry(entry: Any, want_name: str) -> None:
    if (not isinstance(entry, dict) or entry.get("file") != want_name or not isinstance(entry.get("size"), int)
            or not isinstance(entry.get("blake2b"), str)):
        raise _bad(f"manifest entry for {want_name} is malformed")


def _check_bytes(name: str, data: bytes, entry: dict[str, Any]) -> None:
    if len(data) != entry["size"] or hashlib.blake2b(data, digest_size=_HASH_BYTES).hexdigest() != entry["blake2b"]:
        raise _bad(f"{name} does not match its checksum")


def _hash_file(path: Path, entry: dict[str, Any]) -> None:
    h = hashlib.blake2b(digest_size=_HASH_BYTES)
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            h.update(chunk)
            size += len(chunk)
    if size != entry["size"] or h.hexdigest() != entry["blake2b"]:
        raise _bad(f"{path.name} does not match its checksum")


def _load_array(path: Path, entry: Any, dtype: np.dtype, rows: int) -> np.ndarray:
    _check_entry(entry, path.name)
    _hash_file(path, entry)
    try:
        a = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise _bad(f"{path.name}: {e}") from None
    if a.dtype != dtype or a.shape != (rows,):
        raise _bad(f"{path.name}: expected {dtype.name} of shape ({rows},), got {a.dtype} {a.shape}")
    return np.ascontiguousarray(a)


def _load_values(path: Path, entry: Any, spec: TableSpec, device: torch.device,
                 rows: int | None = None) -> torch.Tensor:
    """Stream the values file onto ``device`` while hashing it; checks size and checksum.
    ``rows``: rows of packed values (a placed table), default the spec's."""
    _check_entry(entry, path.name)
    wire = np.dtype(WIRE_DTYPES[spec.dtype]).newbyteorder("<")
    rows = spec.rows if rows is None else rows
    want = rows * spec.width * wire.itemsize
    if entry["size"] != want:
        raise _bad(f"{path.name}: {entry['size']} bytes, the spec needs {want}")
    values = torch.empty(rows, spec.width, dtype=TORCH_DTYPES[spec.dtype], device=device)
    rows_per_chunk = max(1, CHUNK_BYTES // spec.row_bytes)
    buf = np.empty((rows_per_chunk, spec.width), dtype=wire)
    h = hashlib.blake2b(digest_size=_HASH_BYTES)
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size != want:
            raise _bad(f"{path.name} has the wrong size")
        for lo in range(0, rows, rows_per_chunk):
            part = buf[:min(rows_per_chunk, rows - lo)]
            mv = memoryview(part).cast("B")
            if f.readinto(mv) != len(mv):
                raise _bad(f"{path.name} is truncated")
            h.update(mv)
            native = part.astype(part.dtype.newbyteorder("="), copy=False)
            t = torch.from_numpy(native.view(np.int16)).view(torch.bfloat16) if spec.dtype == "bfloat16" \
                else torch.from_numpy(native)
            values[lo:lo + len(part)].copy_(t)  # synchronous: buf is reused for the next chunk
    if h.hexdigest() != entry["blake2b"]:
        raise _bad(f"{path.name} does not match its checksum")
    return values


def _resolve_dir(models: Path, name: str) -> Path | None:
    """The directory to load: the model's, or the previous one if a swap stopped halfway."""
    final = models / name
    if final.is_dir():
        return final   # its manifest may be missing: then loading says the snapshot is bad
    old = models / f".{name}.old"
    if not final.exists() and (old / MANIFEST).is_file():
        return old   # the swap stopped between its renames: the previous snapshot is whole
    return None


def _manifest_body(where: Path) -> dict[str, Any]:
    """The manifest's body, its checksum and format checked."""
    manifest = json.loads(_read_small(where / MANIFEST, None))
    body = manifest["body"]
    if not isinstance(body, dict) or manifest.get("blake2b") != _manifest_checksum(body):
        raise _bad("manifest does not match its checksum")
    if body.get("format") != SNAPSHOT_FORMAT:
        raise _bad(f"format {body.get('format')!r}, this build reads {SNAPSHOT_FORMAT}")
    return body


class _EntryReader:
    """Reads consecutive little-endian arrays from one file, hashing as it goes."""

    def __init__(self, path: Path, entry: Any) -> None:
        _check_entry(entry, path.name)
        self.entry = entry
        self.f = open(path, "rb")
        if os.fstat(self.f.fileno()).st_size != entry["size"]:
            self.f.close()
            raise _bad(f"{path.name} has the wrong size")
        self.h = hashlib.blake2b(digest_size=_HASH_BYTES)
        self.name = path.name

    def read(self, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        a = np.empty(shape, dtype.newbyteorder("<"))
        mv = memoryview(a).cast("B")
        if self.f.readinto(mv) != len(mv):
            raise _bad(f"{self.name} is truncated")
        self.h.update(mv)
        return a.astype(dtype.newbyteorder("="), copy=False)

    def finish(self) -> None:
        extra = self.f.read(1)
        self.f.close()
        if extra or self.h.hexdigest() != self.entry["blake2b"]:
            raise _bad(f"{self.name} does not match its checksum")

    def close(self) -> None:
        self.f.close()


def _read_undo(where: Path, spec: ModelSpec, u: dict[str, Any], seq: int) -> UndoImage:
    horizon = u["horizon"]
    if not isinstance(horizon, int) or horizon < 0 or not isinstance(u["tables"], list):
        raise _bad("undo entry is malformed")
    index = {t.name: i for i, t in enumerate(spec.tables)}
    tables: dict[str, list[UndoSegmentImage]] = {}
    i64 = np.dtype(np.int64)
    for e in u["tables"]:
        name = e["name"]
        if name not in index or name in tables:
            raise _bad(f"undo history names unknown table {name!r}")
        t = spec.table(name)
        wire = np.dtype(WIRE_DTYPES[t.dtype])
        if e["dtype"] is not None and (e["dtype"] != wire.name or e["dim"] != t.width):
            raise _bad(f"undo history of {name} holds {e['dtype']} x {e['dim']}, the spec {wire.name} x {t.width}")
        segs = e["segments"]
        if not isinstance(segs, list) or not all(isinstance(x, list) and len(x) == 2 and all(
                isinstance(k, int) and k > 0 for k in x) for x in segs):
            raise _bad(f"undo segments of {name} are malformed")
        stem = f"t{index[name]:04d}.undo"
        files = {"ids": e["ids"], "old": e["old"], "recs": e["recs"]}
        if e["dtype"] is not None:
            files["values"] = e["values"]
        # Sizes first: a file's size must be what the segments say before anything is allocated.
        entries, records = sum(x[1] for x in segs), sum(x[0] for x in segs)
        want = {"ids": 8 * entries, "old": 8 * entries, "recs": 16 * records,
                "values": entries * t.width * wire.itemsize}
        readers: dict[str, _EntryReader] = {}
        try:
            for part, entry in files.items():
                _check_entry(entry, f"{stem}.{part}.bin")
                if entry["size"] != want[part]:
                    raise _bad(f"{stem}.{part}.bin: {entry['size']} bytes, its segments need {want[part]}")
                readers[part] = _EntryReader(where / f"{stem}.{part}.bin", entry)
            out = []
            for nrec, n in segs:
                ids = readers["ids"].read(i64, (n,))
                if int(ids.min()) < 0 or int(ids.max()) >= t.rows:
                    raise _bad(f"undo history of {name} names rows outside the table")
                old = readers["old"].read(i64, (n,))
                recs = readers["recs"].read(i64, (nrec, 2))
                starts = np.zeros(nrec + 1, np.int64)
                np.cumsum(recs[:, 0], out=starts[1:])
                values = readers["values"].read(wire, (n, t.width)) if "values" in readers else None
                out.append(UndoSegmentImage(ids, old, values, starts, np.ascontiguousarray(recs[:, 1])))
            for r in readers.values():
                r.finish()
        finally:
            for r in readers.values():
                r.close()
        tables[name] = out
    return UndoImage(spec.name, seq, horizon, tables)


def load_undo(data_dir: str | os.PathLike, spec: ModelSpec) -> UndoImage | None:
    """The undo history kept with a model's snapshot (see the module docstring).

    Never raises for a damaged history: the image then holds no tables, its
    ``horizon`` is its ``seq`` (nothing from before is restorable) and ``damaged``
    says why; the caller logs and counts it.  Checks of the records' order and
    layout are :meth:`rollback.undo.UndoHistory.import_model`'s.

    Returns:
        The image, or None when there is no snapshot, its manifest is unusable (then
        :func:`load_snapshot` refuses it too) or it keeps no history.

    Example:
        >>> import tempfile, numpy as np
        >>> from ekko import Delta
        >>> from rollback.undo import UndoHistory
        >>> ms = ModelStore(ModelSpec("m", tables=[TableSpec("t", rows=4, dim=2)]), device="cpu")
        >>> h = UndoHistory(1 << 20)
        >>> h.record("m", "t", 1, ms.table("t").apply(Delta("m", "t", np.array([1]), np.array([5]),
        ...                                                 np.ones((1, 2), np.float32)), capture_old=True))
        >>> d = tempfile.mkdtemp()
        >>> _ = save_snapshot(d, ms, {}, undo=h.export_model("m", seq=3))
        >>> img = load_undo(d, ms.spec)
        >>> img.seq, img.tables["t"][0].ids.tolist(), img.tables["t"][0].old_versions.tolist()
        (3, [1], [0])
    """
    _check_model_name(spec.name)
    where = _resolve_dir(_models_dir(data_dir), spec.name)
    if where is None:
        return None
    try:
        body = _manifest_body(where)
    except (ProtocolError, OSError, ValueError, KeyError, TypeError):
        return None
    u = body.get("undo")
    if u is None:
        return None
    seq = u.get("seq") if isinstance(u, dict) else None
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        return UndoImage(spec.name, 0, 0, {}, damaged="undo entry has no valid seq")
    try:
        if u.get("format") != UNDO_FORMAT:
            raise _bad(f"undo format {u.get('format')!r}, this build reads {UNDO_FORMAT}")
        return _read_undo(where, spec, u, seq)
    except (ProtocolError, OSError, ValueError, KeyError, TypeError, AttributeError, IndexError, MemoryError) as e:
        return UndoImage(spec.name, seq, seq, {}, damaged=f"{type(e).__name__}: {e}")


def _same_tables(a: ModelSpec, b: ModelSpec) -> bool:
    # traffic_share may change between runs without touching the stored state; the
    # placement (replicas_per_shard) decides which shards a store holds, so it may not
    return a.name == b.name and a.tables == b.tables and a.replicas_per_shard == b.replicas_per_shard


def load_snapshot(data_dir: str | os.PathLike, spec: ModelSpec,
                  device: torch.device | str | None = None) -> tuple[ModelStore, dict[str, Any]] | None:
    """Load a model's snapshot, verified, onto ``device``; None when there is none.

    Args:
        data_dir: the replica's data directory.
        spec: the model's current spec; the snapshot's tables must match it.
        device: where the values go; default CUDA when available, else CPU.

    Returns:
        ``(model_store, meta)``, or None when no snapshot of this model exists.

    Raises:
        ProtocolError: reason ``"bad_snapshot"``: a file is missing, truncated or
            fails its checksum, the format is unknown, or the tables differ from ``spec``.

    Example:
        >>> import tempfile
        >>> spec = ModelSpec("ranker", tables=[TableSpec("emb", rows=8, dim=4, dtype="bfloat16")])
        >>> d = tempfile.mkdtemp()
        >>> load_snapshot(d, spec) is None
        True
        >>> _ = save_snapshot(d, ModelStore(spec, device="cpu"), {})
        >>> store, meta = load_snapshot(d, spec, device="cpu")
        >>> store.table("emb").values.dtype, meta
        (torch.bfloat16, {})
    """
    _check_model_name(spec.name)
    device = torch.device(device) if device is not None else default_device()
    models = _models_dir(data_dir)
    where = _resolve_dir(models, spec.name)
    if where is None:
        return None
    try:
        body = _manifest_body(where)
        stored = ModelSpec.from_dict(body["spec"])
        if not _same_tables(stored, spec):
            raise _bad(f"snapshot of {stored.name} holds other tables than the spec given")
        entries = body["tables"]
        if not isinstance(entries, list) or [e.get("name") if isinstance(e, dict) else None
                                             for e in entries] != [t.name for t in spec.tables]:
            raise _bad("manifest tables do not match the spec")
        meta_entry = body["meta"]
        _check_entry(meta_entry, META)
        meta = msgpack.unpackb(_read_small(where / META, meta_entry), raw=False, strict_map_key=False)
        if not isinstance(meta, dict):
            raise _bad("meta is not a map")
        store = ModelStore(spec, device=device, with_values=False)
        for i, (t, e) in enumerate(zip(spec.tables, entries)):
            stem = f"t{i:04d}"
            ts: TableStore = store.table(t.name)
            ts.versions = _load_array(where / f"{stem}.versions.npy", e["versions"], np.dtype(np.int64), t.rows)
            ts.tombstone = _load_array(where / f"{stem}.tombstone.npy", e["tombstone"], np.dtype(np.bool_), t.rows)
            if (ts.versions < 0).any():
                raise _bad(f"{stem}.versions.npy holds negative versions")
            if e.get("blocks") is not None:
                try:
                    ts.blocks = ShardBlocks.from_list(t, e["blocks"])
                except UsageError as err:
                    raise _bad(f"{stem}: {err}") from None
            if e["values"] is not None:   # None: saved from a metadata-mode store
                ts.values = _load_values(where / f"{stem}.values.bin", e["values"], t, device,
                                         rows=None if ts.blocks is None else ts.blocks.rows)
        return store, meta
    except ProtocolError as e:
        if e.reason == "bad_snapshot":
            raise
        raise _bad(str(e)) from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError, msgpack.UnpackException) as e:
        # json/msgpack/np errors, missing files and keys, wrong types in a damaged manifest
        raise _bad(f"{type(e).__name__}: {e}") from None
