"""A placed table's store keeps only its held shards, packed (issue #18): it must behave,
on those shards, exactly as a full store does, refuse the others, and hand shards over."""

from __future__ import annotations

import numpy as np
import pytest

from ekko.core.delta import Delta
from ekko.core.errors import ProtocolError, UsageError
from ekko.core.hashed import with_keys
from ekko.core.shard_blocks import ShardBlocks
from ekko.core.spec import ModelSpec, TableSpec
from ekko.core.store import ModelStore, TableStore, to_wire_values
from ekko.replica.snapshot import load_snapshot, save_snapshot

SPEC = TableSpec("emb", rows=1200, dim=3, shards=12)      # 100 rows a shard
HELD = np.zeros(12, bool)
HELD[[1, 4, 5, 11]] = True


def rows_of(shards, rng, n):
    """``n`` random row ids inside ``shards`` (repeats allowed)."""
    s = rng.choice(np.flatnonzero(shards), n)
    return s * SPEC.shard_rows + rng.integers(0, SPEC.shard_rows, n)


def random_delta(rng, n=60, step=0):
    ids = rows_of(HELD, rng, n)
    versions = rng.integers(1, 50, n) + step * 100
    values = rng.standard_normal((n, SPEC.dim)).astype(np.float32)
    tomb = rng.random(n) < 0.1
    return Delta("m", "emb", ids, versions, values, tomb if tomb.any() else None)


def assert_same_on(held, full: TableStore, packed: TableStore):
    ids = np.flatnonzero(np.repeat(held, SPEC.shard_rows))
    assert (full.versions == packed.versions).all()
    assert (full.tombstone == packed.tombstone).all()
    assert full.read(ids).equal(packed.read(ids))
    assert full.written_rows() == packed.written_rows()
    assert (full.shard_row_hashes() == packed.shard_row_hashes()).all()


def test_a_packed_store_allocates_only_its_shards_and_matches_a_full_store_on_them():
    rng = np.random.default_rng(1)
    full = TableStore(SPEC, device="cpu")
    packed = TableStore(SPEC, device="cpu", held=HELD)
    assert tuple(packed.values.shape) == (4 * SPEC.shard_rows, SPEC.dim)
    # values of 4 shards of 12; versions and tombstones (9 bytes a row) stay whole
    assert packed.nbytes == 4 * SPEC.shard_rows * SPEC.row_bytes + 9 * SPEC.rows
    assert full.nbytes == SPEC.rows * (SPEC.row_bytes + 9)
    for step in range(30):
        d = random_delta(rng, step=step % 7)
        a, b = full.apply(d, capture_old=True), packed.apply(d, capture_old=True)
        assert a.ids.tolist() == b.ids.tolist() and a.versions.tolist() == b.versions.tolist()
        for x, y in ((a.old_values, b.old_values), (a.old_tombstone, b.old_tombstone)):
            assert (x is None and y is None) or np.array_equal(x, y)
    for _ in range(3):   # a rollback puts rows back
        ids = np.unique(rows_of(HELD, rng, 40))
        vals = rng.standard_normal((len(ids), SPEC.dim)).astype(np.float32)
        vers = rng.integers(0, 20, len(ids))
        full.restore_rows(ids, vers, vals)
        packed.restore_rows(ids, vers, vals)
    assert_same_on(HELD, full, packed)
    ids = np.flatnonzero(full.versions)
    t1, t2 = full.take("m", ids), packed.take("m", ids)
    assert (t1.values == t2.values).all() and (t1.versions == t2.versions).all()


def test_rows_of_a_shard_not_held_are_refused_and_change_nothing():
    rng = np.random.default_rng(2)
    packed = TableStore(SPEC, device="cpu", held=HELD)
    packed.apply(random_delta(rng))
    before = (packed.versions.copy(), packed.values.clone(), packed.shard_row_hashes().copy())
    bad_ids = np.array([150, 250])           # shard 1 is held, shard 2 is not
    d = Delta("m", "emb", bad_ids, np.array([999, 999]), np.ones((2, SPEC.dim), np.float32))
    with pytest.raises(UsageError, match=r"shards not held here: \[2\]"):
        packed.apply(d)
    with pytest.raises(UsageError, match="not held"):
        packed.restore_rows(bad_ids, np.array([1, 1]), np.ones((2, SPEC.dim), np.float32))
    with pytest.raises(UsageError, match="not held"):
        packed.read(np.array([0]))
    assert (packed.versions == before[0]).all() and packed.values.equal(before[1])
    assert (packed.shard_row_hashes() == before[2]).all()


def test_drop_forgets_a_shard_and_hold_takes_one_over_growing_the_values():
    rng = np.random.default_rng(3)
    full = TableStore(SPEC, device="cpu")
    packed = TableStore(SPEC, device="cpu", held=HELD)
    for step in range(5):
        d = random_delta(rng, step=step)
        full.apply(d)
        packed.apply(d)
    packed.drop([4])
    assert not packed.held()[4] and not packed.versions[400:500].any()
    full.restore_rows(np.flatnonzero(full.versions[400:500]) + 400, np.zeros(int((full.versions[400:500] > 0).sum()),
                      np.int64), np.zeros((int((full.versions[400:500] > 0).sum()), SPEC.dim), np.float32))
    held = packed.held()
    assert_same_on(held, full, packed)
    # three shards taken over: the freed block first, then the values grow
    packed.hold([0, 7, 9])
    assert packed.held()[[0, 7, 9]].all() and packed.values.shape[0] >= 6 * SPEC.shard_rows
    assert not packed.read(np.arange(0, 100)).any() and not packed.versions[:100].any()
    assert_same_on(held, full, packed)        # the shards held all along kept their rows
    now = packed.held()
    d = Delta("m", "emb", rows_of(now, rng, 80), rng.integers(200, 300, 80),
              rng.standard_normal((80, SPEC.dim)).astype(np.float32))
    full.apply(d)
    packed.apply(d)
    assert_same_on(now, full, packed)


def test_hold_and_drop_need_a_packed_store_and_wait_for_a_snapshot_reading_it():
    with pytest.raises(UsageError, match="not placed"):
        TableStore(SPEC, device="cpu").hold([1])
    packed = TableStore(SPEC, device="cpu", held=HELD)
    view = packed.freeze()
    with pytest.raises(UsageError, match="snapshot"):
        packed.drop([1])
    view.close()
    packed.drop([1])


def test_a_hashed_placed_table_finds_its_keys_in_its_packed_slots():
    spec = TableSpec("h", dim=2, keys="int64", capacity=1 << 12, shards=8)
    held = np.zeros(8, bool)
    held[[2, 6]] = True
    ts = TableStore(spec, device="cpu", held=held)
    keys = np.array([k for k in range(10**12, 10**12 + 4000) if held[spec.key_shards([k])[0]]][:50])
    slots = np.concatenate([np.flatnonzero(spec.key_shards(keys) == s) * 0 + spec.shard_range(s)[0]
                            + np.arange((spec.key_shards(keys) == s).sum()) for s in (2, 6)])
    order = np.concatenate([np.flatnonzero(spec.key_shards(keys) == s) for s in (2, 6)])
    keys = keys[order]
    vals = with_keys(np.ones((len(keys), 2), np.float32), keys, spec)
    ts.apply(Delta("m", "h", slots, np.full(len(keys), 5), vals))
    assert ts.lookup(keys).tolist() == slots.tolist()
    ts.drop([6])
    in6 = slots >= spec.shard_range(6)[0]
    assert (ts.lookup(keys[in6]) == -1).all() and (ts.lookup(keys[~in6]) == slots[~in6]).all()


@pytest.mark.parametrize("frozen", [False, True])
def test_a_placed_models_snapshot_round_trips_its_block_map(tmp_path, frozen):
    rng = np.random.default_rng(4)
    mspec = ModelSpec("m", [SPEC, TableSpec("mlp", rows=4, dim=3, dense=True)], replicas_per_shard=1)
    store = ModelStore(mspec, device="cpu", held={"emb": HELD})
    ts = store.table("emb")
    for step in range(4):
        ts.apply(random_delta(rng, step=step))
    ts.drop([5])
    ts.hold([0, 3])      # a freed block reused, then a grown one
    ts.apply(Delta("m", "emb", np.array([5, 350]), np.array([999, 999]), np.ones((2, SPEC.dim), np.float32)))
    if frozen:
        copy, views = store.freeze()
        ts.apply(Delta("m", "emb", np.array([5]), np.array([1500]), np.full((1, SPEC.dim), 7, np.float32)))
        try:
            save_snapshot(tmp_path, copy, {}, frozen=views)
        finally:
            for v in views.values():
                v.close()
        ts.restore_rows(np.array([5]), np.array([999]), np.ones((1, SPEC.dim), np.float32))
    else:
        save_snapshot(tmp_path, store, {})
    back, _ = load_snapshot(tmp_path, mspec, device="cpu")
    got = back.table("emb")
    assert (got.held() == ts.held()).all() and got.blocks.blocks == ts.blocks.blocks
    assert_same_on(ts.held(), ts, got)
    assert back.table("mlp").blocks is None


def test_a_damaged_block_map_is_refused():
    with pytest.raises(UsageError, match="block map"):
        ShardBlocks.from_list(SPEC, [2, *([0] * 12)])          # block 0 used twice
    with pytest.raises(UsageError, match="block map"):
        ShardBlocks.from_list(SPEC, [1, 1] + [-1] * 11)        # block out of range
    with pytest.raises(UsageError, match="ints"):
        ShardBlocks.from_list(SPEC, [1, 0])
    b = ShardBlocks(SPEC, HELD)
    assert ShardBlocks.from_list(SPEC, b.to_list()).block_of.tolist() == b.block_of.tolist()


def test_the_values_of_a_shard_sit_in_one_block_and_the_digest_covers_held_shards_only():
    rng = np.random.default_rng(5)
    a = TableStore(SPEC, device="cpu", held=HELD)
    other = HELD.copy()
    other[0] = True
    b = TableStore(SPEC, device="cpu", held=other)
    for step in range(3):
        d = random_delta(rng, step=step)
        a.apply(d)
        b.apply(d)
    lo, hi = a.blocks.shard_span(11)
    assert a.values[lo:hi].equal(a.read(np.arange(1100, 1200)))
    assert to_wire_values(a.values).shape[0] == a.blocks.rows
    assert a.digest() != b.digest()          # b keeps shard 0 too (all zeros), a does not
    b.drop([0])
    assert a.digest() == b.digest()


def test_snapshot_of_a_placed_model_needs_the_same_replication_factor(tmp_path):
    mspec = ModelSpec("m", [SPEC], replicas_per_shard=1)
    save_snapshot(tmp_path, ModelStore(mspec, device="cpu", held={"emb": HELD}), {})
    with pytest.raises(ProtocolError, match="other tables"):
        load_snapshot(tmp_path, ModelSpec("m", [SPEC], replicas_per_shard=2), device="cpu")
