"""The undo history round-trips through a snapshot (rollback.undo UndoImage + ekko.replica.snapshot).

Rule K7 of docs/design.md: a restarted replica restores exactly what it would have
without the restart, from the history kept with its last snapshot.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from ekko.core.delta import Delta
from ekko.core.errors import UsageError
from ekko.replica.snapshot import _manifest_checksum, load_snapshot, load_undo, save_snapshot
from ekko.core.spec import ModelSpec, TableSpec
from ekko.core.store import ApplyResult, ModelStore, to_wire_values
from ekko.core.version import Knowledge, pack
from rollback.cuts import Cut
from rollback.undo import UndoHistory, capture_before_restore
from rollback.undo_image import UndoImage

SPEC = ModelSpec("m", [TableSpec("t", rows=40, dim=3, shards=2), TableSpec("h", rows=16, dim=2, dtype="bfloat16"),
                       TableSpec("e", rows=8, dim=2)])  # "e" never written: no history files
ORIGINS = (1, 2, 3)


def _run(history: UndoHistory, store: ModelStore, rng: np.random.Generator, steps: int) -> int:
    """Random applies and restores (as a rollback writes them) on tables t and h; returns the last seq."""
    seq = 0
    counter = 1
    for _ in range(steps):
        seq += 1
        table = "t" if rng.random() < 0.7 else "h"
        ts = store.table(table)
        spec = SPEC.table(table)
        ids = np.sort(rng.choice(spec.rows, int(rng.integers(1, 9)), replace=False)).astype(np.int64)
        if rng.random() < 0.15 and (ts.versions[ids] > 0).any():
            # a restore to older versions (values restored too), recorded like the node does
            new = ts.versions[ids] // 2
            new = np.where(new > 0, ts.versions[ids] - 1, 0)
            r = capture_before_restore(ts, ids, new)
            vals = rng.standard_normal((len(ids), spec.dim)).astype(np.float32)
            if spec.dtype == "bfloat16":
                vals = (vals.view(np.uint32) >> 16).astype(np.uint16)
            ts.restore_rows(ids, new, np.where(new[:, None] > 0, vals, 0).astype(vals.dtype))
            history.record("m", table, seq, r)
            continue
        versions = np.array([pack(counter + i, int(rng.choice(ORIGINS))) for i in range(len(ids))], np.int64)
        counter += len(ids)
        vals = rng.standard_normal((len(ids), spec.dim)).astype(np.float32)
        if spec.dtype == "bfloat16":
            vals = (vals.view(np.uint32) >> 16).astype(np.uint16)
        r = ts.apply(Delta("m", table, ids, versions, vals), capture_old=True)
        history.record("m", table, seq, r)
    return seq


def _cuts(rng: np.random.Generator, n: int) -> list[Cut]:
    out = []
    for k in range(n):
        know = {}
        for t in SPEC.tables:
            for s in range(t.num_shards):
                know[(t.name, s)] = Knowledge({o: int(rng.integers(0, 400)) for o in ORIGINS})
        out.append(Cut(f"c{k}", "m", 0.0, know, seq=0))
    return out


def _same_answers(h1: UndoHistory, h2: UndoHistory, store: ModelStore, cuts: list[Cut]) -> int:
    """Both histories give the same targets and restores for every cut; returns rows restored."""
    restored = 0
    for cut in cuts:
        for t in SPEC.tables:
            rows = cut.rows_to_restore(t, store.table(t.name).versions)
            a = h1.values_at_cut("m", t.name, rows, cut.covered_fn(t))
            b = h2.values_at_cut("m", t.name, rows, cut.covered_fn(t))
            for x, y in zip(a, b):
                assert (x is None and y is None) or np.array_equal(x, y)
            # and the fused restore writes the same rows into two copies of the store
            s1, s2 = store.copy(), store.copy()
            o1 = h1.restore_at_cut("m", t.name, s1.table(t.name), rows, cut.covered_fn(t))
            o2 = h2.restore_at_cut("m", t.name, s2.table(t.name), rows, cut.covered_fn(t))
            assert o1.restored == o2.restored and np.array_equal(o1.incomplete, o2.incomplete)
            restored += o1.restored
            assert np.array_equal(s1.table(t.name).versions, s2.table(t.name).versions)
            assert np.array_equal(to_wire_values(s1.table(t.name).values), to_wire_values(s2.table(t.name).values))
    return restored


@pytest.mark.parametrize("mode", ["memory", "tiny-blocks", "spill", "discard"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_history_round_trips_through_the_snapshot(tmp_path, mode, seed):
    rng = np.random.default_rng(seed)
    kw: dict = {}
    if mode == "tiny-blocks":
        kw = {"block_bytes": 64}
    elif mode == "spill":
        kw = {"block_bytes": 200, "spill_dir": tmp_path / "spill"}
    elif mode == "discard":
        kw = {"block_bytes": 200}
    budget = 3000 if mode in ("spill", "discard") else 1 << 20
    h1 = UndoHistory(budget, **kw)
    store = ModelStore(SPEC, device="cpu")
    last = _run(h1, store, rng, 120)
    if mode == "spill":
        assert h1.stats()["spilled_segments"] > 0
    if mode == "discard":
        assert h1.horizon("m") > 0
    image = h1.export_model("m", seq=last + 5)
    save_snapshot(tmp_path / "d", store, {}, undo=image)
    got = load_undo(tmp_path / "d", SPEC)
    assert got is not None and got.damaged is None
    assert (got.seq, got.horizon) == (last + 5, h1.horizon("m"))
    assert set(got.tables) == {"t", "h"} and got.nbytes == image.nbytes
    h2 = UndoHistory(1 << 20)
    h2.import_model(got)
    assert h2.horizon("m") == h1.horizon("m")
    assert _same_answers(h1, h2, load_snapshot(tmp_path / "d", SPEC, "cpu")[0], _cuts(rng, 6)) > 0
    # records after the import need seq >= the image's
    with pytest.raises(UsageError, match="backwards"):
        h2.record("m", "t", last + 4, ApplyResult(np.array([1]), np.array([pack(999, 1)]), np.array([0]),
                                                  np.zeros((1, 3), np.float32)))
    h2.record("m", "t", last + 5, ApplyResult(np.array([1]), np.array([pack(999, 1)]), np.array([0]),
                                              np.zeros((1, 3), np.float32)))
    h1.close()


def test_snapshot_without_history_and_empty_history(tmp_path):
    store = ModelStore(SPEC, device="cpu")
    save_snapshot(tmp_path, store, {})
    assert load_undo(tmp_path, SPEC) is None
    assert load_undo(tmp_path / "nothing", SPEC) is None
    save_snapshot(tmp_path, store, {}, undo=UndoHistory(1 << 20).export_model("m", seq=7))
    img = load_undo(tmp_path, SPEC)
    assert (img.seq, img.horizon, img.tables, img.damaged) == (7, 0, {}, None)


def _saved(tmp_path) -> tuple[UndoHistory, int]:
    h = UndoHistory(1 << 20, block_bytes=256)
    store = ModelStore(SPEC, device="cpu")
    last = _run(h, store, np.random.default_rng(4), 60)
    save_snapshot(tmp_path, store, {"k": 1}, undo=h.export_model("m", seq=last))
    return h, last


@pytest.mark.parametrize("part", ["ids", "old", "recs", "values"])
@pytest.mark.parametrize("damage", ["flip", "truncate", "extend", "delete"])
def test_damaged_history_loads_empty_and_the_tables_still_load(tmp_path, part, damage):
    h, last = _saved(tmp_path)
    path = tmp_path / "models" / "m" / f"t0000.undo.{part}.bin"
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x10
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(bytes(data[:-5]))
    elif damage == "extend":
        path.write_bytes(bytes(data) + b"\0" * 8)
    else:
        path.unlink()
    img = load_undo(tmp_path, SPEC)
    assert img is not None and img.damaged and img.tables == {}
    assert img.seq == img.horizon == last
    store, meta = load_snapshot(tmp_path, SPEC, "cpu")  # the model itself is fine
    assert meta == {"k": 1}
    fresh = UndoHistory(1 << 20)
    fresh.import_model(img)
    assert fresh.horizon("m") == last


def _reseal(tmp_path, edit) -> None:
    p = tmp_path / "models" / "m" / "manifest.json"
    manifest = json.loads(p.read_text())
    edit(manifest["body"]["undo"])
    manifest["blake2b"] = _manifest_checksum(manifest["body"])
    p.write_text(json.dumps(manifest))


@pytest.mark.parametrize("edit", [
    lambda u: u.update(format=99),
    lambda u: u.update(horizon=-1),
    lambda u: u["tables"][0].update(name="nope"),
    lambda u: u["tables"][0].update(dim=5),
    lambda u: u["tables"][0]["segments"].append([1, 1]),
    lambda u: u["tables"][0]["segments"].__setitem__(0, [0, 3]),
    lambda u: u["tables"].append(u["tables"][0]),
    lambda u: u.update(tables="x"),
], ids=["format", "horizon", "table", "dim", "segments", "zero-records", "twice", "tables"])
def test_resealed_manifest_edits_give_a_damaged_history(tmp_path, edit):
    _, last = _saved(tmp_path)
    _reseal(tmp_path, edit)
    img = load_undo(tmp_path, SPEC)
    assert img.damaged and img.tables == {} and img.seq == last
    load_snapshot(tmp_path, SPEC, "cpu")


def test_a_manifest_without_seq_gives_an_empty_image(tmp_path):
    _saved(tmp_path)
    _reseal(tmp_path, lambda u: u.pop("seq"))
    img = load_undo(tmp_path, SPEC)
    assert img.damaged and (img.seq, img.horizon, img.tables) == (0, 0, {})


def test_rows_outside_the_table_are_refused(tmp_path):
    h = UndoHistory(1 << 20)
    h.record("m", "e", 1, ApplyResult(np.array([3]), np.array([5]), np.array([0]), np.zeros((1, 2), np.float32)))
    img = h.export_model("m")
    small = ModelSpec("m", [TableSpec("t", rows=40, dim=3, shards=2), TableSpec("h", rows=16, dim=2, dtype="bfloat16"),
                            TableSpec("e", rows=3, dim=2)])
    save_snapshot(tmp_path, ModelStore(small, device="cpu"), {}, undo=img)
    got = load_undo(tmp_path, small)
    assert got.damaged and "outside" in got.damaged


def test_import_checks_and_budget():
    h = UndoHistory(1 << 20, block_bytes=1)
    store = ModelStore(SPEC, device="cpu")
    last = _run(h, store, np.random.default_rng(8), 40)
    img = h.export_model("m")
    assert img.seq == last
    with pytest.raises(UsageError, match="below"):
        h.export_model("m", seq=last - 1)
    with pytest.raises(UsageError, match="exists already"):
        h.import_model(img)
    # out-of-order segments are refused and nothing is installed
    segs = img.tables["t"]
    bad = UndoImage("m", img.seq, 0, {"t": segs[::-1]})
    fresh = UndoHistory(1 << 20)
    with pytest.raises(UsageError, match="out of order"):
        fresh.import_model(bad)
    assert fresh.stats()["segments"] == 0
    with pytest.raises(UsageError, match="beyond"):
        fresh.import_model(UndoImage("m", 0, 0, img.tables))
    # an image over the budget keeps its newest part, and the horizon says so
    tight = UndoHistory(img.nbytes // 2)
    tight.import_model(img)
    assert tight.stats()["memory_bytes"] <= img.nbytes // 2
    assert 0 < tight.horizon("m") <= last + 1


def test_node_counts_an_unusable_history_and_keeps_seq_monotonic():
    from ekko.replica.node import ReplicaNode

    n = ReplicaNode("r1", "dc1", "127.0.0.1:1", device="cpu")
    n.register_model(SPEC, now=0.0)
    assert n.import_undo(UndoImage("m", 50, 50, {}, damaged="checksum")) == "checksum"
    assert n._seq == 50 and n.undo.horizon("m") == 50 and n.counters["undo_history_unusable"] == 1
    assert n.export_undo("m").seq == 50
