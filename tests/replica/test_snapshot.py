"""Tests for ekko.replica.snapshot: round trips, atomic replacement, and refusal of corrupt snapshots."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import ekko.replica.snapshot as snap
from ekko.core.delta import WIRE_DTYPES, Delta
from ekko.core.errors import ProtocolError, UsageError
from ekko.replica.snapshot import list_snapshot_models, load_snapshot, save_snapshot
from ekko.core.spec import ModelSpec, TableSpec
from ekko.core.store import ModelStore, to_wire_values
from ekko.core.version import pack

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

SPEC = ModelSpec("ranker", tables=[
    TableSpec("user", rows=300, dim=8, shards=4),
    TableSpec("item", rows=120, dim=5, dtype="float16"),
    TableSpec("ctx", rows=64, dim=3, dtype="bfloat16", shards=2),
    TableSpec("mlp", rows=10, dim=16, dtype="float64", dense=True),
], traffic_share=0.5)

META = {"knowledge": {"user": {0: {1: 77, 2: 5}}, "item": {}}, "hlc_floor": 123456789, "node": "r1",
        "raw": b"\x00\x01", "list": [1, 2.5, None, True]}


def populated(spec=SPEC, seed=0, device="cpu") -> ModelStore:
    ms = ModelStore(spec, device=device)
    rng = np.random.default_rng(seed)
    for t in spec.tables:
        n = t.rows // 2
        ids = rng.choice(t.rows, n, replace=False).astype(np.int64)
        wd = np.dtype(WIRE_DTYPES[t.dtype])
        # arbitrary bit patterns, NaNs and infinities included
        vals = rng.integers(0, 256, n * t.dim * wd.itemsize, dtype=np.uint8).view(wd).reshape(n, t.dim)
        vers = np.array([pack(int(c), int(o)) for c, o in zip(rng.integers(1, 10 ** 9, n), rng.integers(1, 9, n))])
        ms.table(t.name).apply(Delta(spec.name, t.name, ids, vers, vals, rng.random(n) < 0.1))
    return ms


def assert_same_state(a: ModelStore, b: ModelStore) -> None:
    for t in a.spec.tables:
        x, y = a.table(t.name), b.table(t.name)
        assert np.array_equal(x.versions, y.versions) and x.versions.dtype == y.versions.dtype == np.int64
        assert np.array_equal(x.tombstone, y.tombstone) and y.tombstone.dtype == np.bool_
        if x.values is None:
            assert y.values is None
            continue
        assert y.values.dtype == x.values.dtype and y.values.shape == x.values.shape
        assert to_wire_values(x.values).tobytes() == to_wire_values(y.values).tobytes()
        assert x.digest() == y.digest()


@pytest.mark.parametrize("device", DEVICES)
def test_roundtrip(tmp_path, device):
    ms = populated(device=device)
    where = save_snapshot(tmp_path, ms, META)
    assert where == tmp_path / "models" / "ranker"
    got = load_snapshot(tmp_path, SPEC, device)
    assert got is not None
    store, meta = got
    assert meta == META
    assert_same_state(ms, store)
    for t in SPEC.tables:
        assert store.table(t.name).values.device.type == device
        assert store.table(t.name).device.type == device


def test_layout_and_manifest(tmp_path):
    save_snapshot(tmp_path, populated(), META)
    d = tmp_path / "models" / "ranker"
    files = sorted(p.name for p in d.iterdir())
    assert files == sorted(["manifest.json", "meta.msgpack"] + [f"t{i:04d}.{k}" for i in range(4) for k in
                                                                ("versions.npy", "tombstone.npy", "values.bin")])
    man = json.loads((d / "manifest.json").read_text())
    body = man["body"]
    assert body["format"] == snap.SNAPSHOT_FORMAT and body["spec"] == SPEC.to_dict()
    for i, (t, e) in enumerate(zip(SPEC.tables, body["tables"])):
        assert e["name"] == t.name
        for kind, file in (("versions", "versions.npy"), ("tombstone", "tombstone.npy"), ("values", "values.bin")):
            path = d / f"t{i:04d}.{file}"
            assert e[kind]["file"] == path.name and e[kind]["size"] == path.stat().st_size
            assert len(e[kind]["blake2b"]) == 64
        assert e["values"]["size"] == t.rows * t.row_bytes
    assert np.load(d / "t0000.versions.npy").dtype == np.int64
    assert np.load(d / "t0000.tombstone.npy").dtype == np.bool_
    # the values file is the raw tensor (bfloat16 as its int16 bits)
    raw = np.fromfile(d / "t0002.values.bin", dtype="<i2").reshape(64, 3)
    ms = populated()
    assert np.array_equal(raw, ms.table("ctx").values.view(torch.int16).numpy())


def test_missing_snapshot(tmp_path):
    assert load_snapshot(tmp_path, SPEC, "cpu") is None
    assert list_snapshot_models(tmp_path) == []
    assert list_snapshot_models(tmp_path / "does-not-exist") == []


def test_list_models(tmp_path):
    other = ModelSpec("b-model", tables=[TableSpec("t", rows=3, dim=1)])
    save_snapshot(tmp_path, ModelStore(other, device="cpu"), {})
    save_snapshot(tmp_path, populated(), {})
    (tmp_path / "models" / ".ranker.tmp").mkdir()          # debris of a crashed save
    (tmp_path / "models" / ".x.old").mkdir()                # no manifest: not a snapshot
    (tmp_path / "models" / "notes.txt").write_text("hi")    # not a directory
    assert list_snapshot_models(tmp_path) == ["b-model", "ranker"]
    # a model directory without its manifest is listed: loading it reports the damage
    (tmp_path / "models" / "broken").mkdir()
    assert list_snapshot_models(tmp_path) == ["b-model", "broken", "ranker"]


def test_overwrite_replaces_and_cleans_up(tmp_path):
    save_snapshot(tmp_path, populated(seed=1), {"gen": 1})
    second = populated(seed=2)
    save_snapshot(tmp_path, second, {"gen": 2})
    store, meta = load_snapshot(tmp_path, SPEC, "cpu")
    assert meta == {"gen": 2}
    assert_same_state(second, store)
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["ranker"]


def test_loaded_store_keeps_applying_and_stays_monotonic(tmp_path):
    ms = populated()
    save_snapshot(tmp_path, ms, {})
    store, _ = load_snapshot(tmp_path, SPEC, "cpu")
    t = store.table("user")
    row = int(np.flatnonzero(t.versions > 0)[0])
    v = int(t.versions[row])
    stale = t.apply(Delta("ranker", "user", np.array([row]), np.array([v - 1]), np.ones((1, 8), np.float32)))
    assert len(stale) == 0                                  # versions did not go backwards across the restart
    assert len(t.apply(Delta("ranker", "user", np.array([row]), np.array([v + 1]), np.ones((1, 8), np.float32))))
    assert t.values[row].tolist() == [1.0] * 8
    assert t.digest() != ms.table("user").digest()


def test_metadata_mode_store(tmp_path):
    ms = ModelStore(SPEC, device="cpu", with_values=False)
    ms.table("user").apply(Delta("ranker", "user", np.array([3]), np.array([9])))
    save_snapshot(tmp_path, ms, {})
    assert not list((tmp_path / "models" / "ranker").glob("*.values.bin"))
    store, _ = load_snapshot(tmp_path, SPEC, "cpu")
    assert store.table("user").values is None and store.table("user").versions[3] == 9


def test_traffic_share_may_change(tmp_path):
    save_snapshot(tmp_path, populated(), {})
    moved = ModelSpec(SPEC.name, tables=SPEC.tables, traffic_share=0.9)
    assert load_snapshot(tmp_path, moved, "cpu") is not None


@pytest.mark.parametrize("spec", [
    ModelSpec("ranker", tables=SPEC.tables[:3]),                                        # a table fewer
    ModelSpec("ranker", tables=(TableSpec("user", rows=300, dim=9, shards=4),) + SPEC.tables[1:]),   # other dim
    ModelSpec("ranker", tables=(TableSpec("user", rows=301, dim=8, shards=4),) + SPEC.tables[1:]),   # other rows
    ModelSpec("ranker", tables=(TableSpec("user", rows=300, dim=8, shards=5),) + SPEC.tables[1:]),   # other shards
    ModelSpec("ranker", tables=SPEC.tables[1:] + SPEC.tables[:1]),                      # other order
    ModelSpec("ranker", tables=(TableSpec("user", rows=300, dim=8, shards=4, dtype="float16"),) + SPEC.tables[1:]),
])
def test_spec_mismatch_refused(tmp_path, spec):
    save_snapshot(tmp_path, populated(), {})
    with pytest.raises(ProtocolError) as ei:
        load_snapshot(tmp_path, spec, "cpu")
    assert ei.value.reason == "bad_snapshot"


def _snapshot_files(tmp_path) -> list[Path]:
    return sorted((tmp_path / "models" / "ranker").iterdir())


def _expect_bad(tmp_path):
    with pytest.raises(ProtocolError) as ei:
        load_snapshot(tmp_path, SPEC, "cpu")
    assert ei.value.reason == "bad_snapshot"


def test_every_file_byte_flip_detected(tmp_path):
    """One flipped bit anywhere -- values, versions, tombstones, meta, manifest -- is refused."""
    save_snapshot(tmp_path, populated(), META)
    files = _snapshot_files(tmp_path)
    assert len(files) == 14
    rng = np.random.default_rng(0)
    for path in files:
        data = path.read_bytes()
        for off in {0, len(data) // 2, len(data) - 1, int(rng.integers(len(data)))}:
            for bit in (0, 7):
                bad = bytearray(data)
                bad[off] ^= 1 << bit
                path.write_bytes(bytes(bad))
                _expect_bad(tmp_path)
        path.write_bytes(data)
    load_snapshot(tmp_path, SPEC, "cpu")   # restored: loads again


@pytest.mark.parametrize("damage", ["truncate", "extend", "delete", "empty"])
def test_damaged_files_detected(tmp_path, damage):
    save_snapshot(tmp_path, populated(), META)
    for path in _snapshot_files(tmp_path):
        data = path.read_bytes()
        if damage == "truncate":
            path.write_bytes(data[:-1])
        elif damage == "extend":
            path.write_bytes(data + b"\0")
        elif damage == "delete":
            path.unlink()
        else:
            path.write_bytes(b"")
        _expect_bad(tmp_path)
        path.write_bytes(data)


def _rewrite_manifest(tmp_path, edit):
    """Edit the manifest body and re-seal it, to reach the checks behind the checksum."""
    p = tmp_path / "models" / "ranker" / "manifest.json"
    man = json.loads(p.read_text())
    edit(man["body"])
    man["blake2b"] = snap._manifest_checksum(man["body"])
    p.write_text(json.dumps(man))


@pytest.mark.parametrize("edit", [
    lambda b: b.update(format=snap.SNAPSHOT_FORMAT + 1),
    lambda b: b.update(spec={**b["spec"], "tables": b["spec"]["tables"][:1]}),
    lambda b: b.update(spec="nonsense"),
    lambda b: b["tables"][0].update(name="other"),
    lambda b: b["tables"].pop(),
    lambda b: b["tables"][1]["values"].update(size=1),
    lambda b: b["tables"][1]["values"].update(blake2b="0" * 64),
    lambda b: b["tables"][1]["versions"].update(file="../../etc/passwd"),
    lambda b: b["tables"][0].pop("tombstone"),
    lambda b: b.update(meta=None),
    lambda b: b.pop("tables"),
])
def test_resealed_manifest_edits_refused(tmp_path, edit):
    save_snapshot(tmp_path, populated(), META)
    _rewrite_manifest(tmp_path, edit)
    _expect_bad(tmp_path)


def test_wrong_array_contents_refused(tmp_path):
    """Arrays of the wrong dtype or shape are refused even when their checksums match."""
    save_snapshot(tmp_path, populated(), META)
    d = tmp_path / "models" / "ranker"
    np.save(d / "t0000.versions.npy", np.zeros(300, np.int32))
    np.save(d / "t0000.tombstone.npy", np.zeros(299, bool))

    def reseal(body):
        for kind in ("versions", "tombstone"):
            data = (d / f"t0000.{kind}.npy").read_bytes()
            import hashlib
            body["tables"][0][kind].update(size=len(data), blake2b=hashlib.blake2b(data, digest_size=32).hexdigest())
    _rewrite_manifest(tmp_path, reseal)
    _expect_bad(tmp_path)


def test_failed_save_keeps_previous(tmp_path, monkeypatch):
    first = populated(seed=1)
    save_snapshot(tmp_path, first, {"gen": 1})
    calls = {"n": 0}
    real = snap._write_file

    def failing(path, fill):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("disk full")
        return real(path, fill)

    monkeypatch.setattr(snap, "_write_file", failing)
    with pytest.raises(OSError):
        save_snapshot(tmp_path, populated(seed=2), {"gen": 2})
    monkeypatch.undo()
    store, meta = load_snapshot(tmp_path, SPEC, "cpu")
    assert meta == {"gen": 1}
    assert_same_state(first, store)
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["ranker"]


def test_failed_rename_restores_previous(tmp_path, monkeypatch):
    save_snapshot(tmp_path, populated(seed=1), {"gen": 1})
    real = os.rename

    def rename(src, dst):
        if str(src).endswith(".ranker.tmp"):
            raise OSError("rename failed")
        return real(src, dst)

    monkeypatch.setattr(snap.os, "rename", rename)
    with pytest.raises(OSError):
        save_snapshot(tmp_path, populated(seed=2), {"gen": 2})
    monkeypatch.undo()
    assert load_snapshot(tmp_path, SPEC, "cpu")[1] == {"gen": 1}
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["ranker"]


def test_crash_between_renames_recovers_previous(tmp_path):
    first = populated(seed=1)
    save_snapshot(tmp_path, first, {"gen": 1})
    models = tmp_path / "models"
    # what a crash right after "rename current -> .old" leaves behind
    os.rename(models / "ranker", models / ".ranker.old")
    shutil.copytree(models / ".ranker.old", models / ".ranker.tmp")
    assert list_snapshot_models(tmp_path) == ["ranker"]
    store, meta = load_snapshot(tmp_path, SPEC, "cpu")
    assert meta == {"gen": 1}
    assert_same_state(first, store)
    # the next save completes the job and leaves one directory
    save_snapshot(tmp_path, populated(seed=3), {"gen": 3})
    assert sorted(p.name for p in models.iterdir()) == ["ranker"]
    assert load_snapshot(tmp_path, SPEC, "cpu")[1] == {"gen": 3}


def test_stale_tmp_from_crashed_save_is_ignored_and_cleaned(tmp_path):
    save_snapshot(tmp_path, populated(seed=1), {"gen": 1})
    tmp = tmp_path / "models" / ".ranker.tmp"
    tmp.mkdir()
    (tmp / "manifest.json").write_text("{half written")
    assert load_snapshot(tmp_path, SPEC, "cpu")[1] == {"gen": 1}
    save_snapshot(tmp_path, populated(seed=2), {"gen": 2})
    assert not tmp.exists() and load_snapshot(tmp_path, SPEC, "cpu")[1] == {"gen": 2}


def test_files_and_dirs_are_fsynced(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}") if os.path.exists(f"/proc/self/fd/{fd}") else fd)
        return real(fd)

    monkeypatch.setattr(snap.os, "fsync", fsync)
    save_snapshot(tmp_path, populated(), META)
    names = {os.path.basename(str(p)) for p in synced}
    # 12 table files, meta, manifest, the temporary directory and the models directory
    assert len(synced) == 16
    assert {"manifest.json", "meta.msgpack", "t0003.values.bin", "models", ".ranker.tmp"} <= names


def test_unpackable_meta_refused_before_writing(tmp_path):
    with pytest.raises(UsageError):
        save_snapshot(tmp_path, populated(), {"x": object()})
    assert not (tmp_path / "models" / "ranker").exists()


def test_unsafe_model_name_refused(tmp_path):
    # ModelSpec refuses such names itself; the snapshot keeps its own guard (defence in
    # depth), so forge a spec past the constructor's check to exercise it.
    store = ModelStore(ModelSpec("m", tables=[TableSpec("t", rows=2, dim=1)]), device="cpu")
    object.__setattr__(store.spec, "name", "m\n")
    with pytest.raises(UsageError):
        save_snapshot(tmp_path, store, {})
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())
