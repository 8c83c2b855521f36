"""Hashed tables (issue #18) in one process: the spec, the key bytes a row carries, the
publisher's slot assignment with eviction, and a replica store's key map, which must
end where the publisher's assignment is whatever order the writes arrive in."""

from __future__ import annotations

import numpy as np
import pytest

from ekko.core.delta import Delta
from ekko.core.errors import ProtocolError, UsageError
from ekko.core.hashed import check_keys, keys_of, values_of, with_keys
from ekko.core.key_index import DELETED_KEY, EMPTY_KEY, KeyIndex, KeyMap
from ekko.core.spec import ModelSpec, TableSpec
from ekko.core.store import TableStore
from ekko.core.hashed_slots import HashedSlots


def test_a_hashed_spec_has_capacity_rows_key_columns_and_round_trips():
    t = TableSpec("ads", dim=6, keys="int64", capacity=1000, eviction="lfu")
    assert (t.rows, t.hashed, t.key_cols, t.width, t.row_bytes) == (1000, True, 2, 8, 32)
    assert TableSpec("h", dim=6, dtype="float16", keys="int64", capacity=8).width == 10
    assert TableSpec("h", dim=6, dtype="float64", keys="int64", rows=8).width == 7
    assert TableSpec.from_dict(t.to_dict()) == t
    assert ModelSpec.from_dict(ModelSpec("m", [t]).to_dict()).tables[0] == t
    dense = TableSpec("e", rows=10, dim=4)
    assert "keys" not in dense.to_dict() and dense.width == 4 and not dense.hashed


@pytest.mark.parametrize("kw", [
    {"dim": 4, "keys": "uuid", "capacity": 8},
    {"dim": 4, "keys": "int64", "capacity": 8, "eviction": "fifo"},
    {"dim": 4, "keys": "int64", "capacity": 8, "rows": 9},
    {"dim": 4, "keys": "int64", "capacity": 8, "dense": True},
    {"dim": 4, "keys": "int64"},
    {"rows": 8, "dim": 4, "capacity": 8},
    {"rows": 8, "dim": 4, "eviction": "lru"},
    {"dim": 4, "keys": "int64", "capacity": 10, "shards": 7},
])
def test_bad_hashed_specs_are_refused(kw):
    with pytest.raises(UsageError):
        TableSpec("t", **kw)
    with pytest.raises(ProtocolError):
        TableSpec.from_dict({"name": "t", "rows": kw.get("capacity", 8), "dim": 4, "keys": "uuid"})


def test_key_shards_spread_keys_evenly_and_are_fixed():
    t = TableSpec("ads", dim=1, keys="int64", capacity=1 << 16, shards=16)
    keys = np.random.default_rng(0).integers(-2**63 + 2, 2**63 - 1, 160_000, dtype=np.int64)
    counts = np.bincount(t.key_shards(keys), minlength=16)
    assert counts.min() > 9_500 and counts.max() < 10_500
    # Documented, so every replica and publisher agrees: splitmix64's finalizer of the
    # key's 64 bits, modulo the shards -- here written out with Python integers.
    mask = (1 << 64) - 1

    def shard(k: int) -> int:
        x = k & mask
        x ^= x >> 30
        x = (x * 0xBF58476D1CE4E5B9) & mask
        x ^= x >> 27
        x = (x * 0x94D049BB133111EB) & mask
        return (x ^ (x >> 31)) % 16
    some = [0, 1, -1, 2**63 - 1, -2**63 + 2, 10**15]
    assert t.key_shards(some).tolist() == [shard(k) for k in some]


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
def test_a_row_carries_its_key_bit_for_bit_in_every_dtype(dtype):
    from ekko.core.delta import WIRE_DTYPES
    t = TableSpec("h", dim=3, dtype=dtype, keys="int64", capacity=16)
    keys = np.array([0, 1, -1, 2**63 - 1, DELETED_KEY + 1, -2**40], np.int64)
    vals = np.ones((len(keys), 3), WIRE_DTYPES[dtype])
    rows = with_keys(vals, keys, t)
    assert rows.shape == (len(keys), t.width) and rows.dtype == WIRE_DTYPES[dtype]
    assert keys_of(rows, t).tolist() == keys.tolist()
    assert np.array_equal(values_of(rows, t), vals)
    # Through a store (torch, index_copy_) and back, the key bytes are unchanged.
    ts = TableStore(t, device="cpu")
    ts.apply(Delta("m", "h", np.arange(len(keys), dtype=np.int64), np.arange(1, len(keys) + 1), rows))
    assert keys_of(ts.values, t)[:len(keys)].tolist() == keys.tolist()
    assert keys_of(ts.values, t)[len(keys):].tolist() == [EMPTY_KEY] * (16 - len(keys))


def test_reserved_and_malformed_keys_are_refused():
    for bad in ([EMPTY_KEY], [1, DELETED_KEY], [[1, 2]], [1.5], np.array([2**63], np.uint64)):
        with pytest.raises(UsageError):
            check_keys(np.array(bad) if not isinstance(bad, np.ndarray) else bad)
    assert check_keys(np.array([3, -4], np.int32)).dtype == np.int64


def test_slot_assignment_evicts_least_recent_or_least_frequent_in_the_keys_region():
    t = TableSpec("h", dim=1, keys="int64", capacity=8, shards=2, eviction="lru")
    s = HashedSlots(t)
    keys = np.arange(100, 200, dtype=np.int64)
    region = t.key_shards(keys)
    a = keys[region == 0][:4]
    b = keys[region == 1][:4]
    s.assign(a)
    s.assign(b)
    s.assign(a[1:])                        # a[0] is now the least recent of region 0
    newcomer = keys[region == 0][4:5]
    slot = s.assign(newcomer)
    assert s.index.lookup(a[:1]).tolist() == [-1] and s.evicted == 1
    assert int(slot[0]) // s.index.region_slots == 0, "a key takes a slot of its own shard"
    assert (s.index.lookup(b) >= 0).all(), "region 1 is untouched"
    f = HashedSlots(TableSpec("h", dim=1, keys="int64", capacity=4, shards=1, eviction="lfu"))
    k = np.array([1, 2, 3, 4], np.int64)
    f.assign(k)
    for _ in range(3):
        f.assign(k[[0, 2, 3]])             # key 2 used once, the others four times
    f.assign(np.array([9], np.int64))
    assert f.index.lookup(np.array([2])).tolist() == [-1]


def test_a_full_region_without_eviction_refuses_and_changes_nothing():
    s = HashedSlots(TableSpec("h", dim=1, keys="int64", capacity=4, shards=1))
    s.assign(np.array([1, 2, 3, 4], np.int64))
    with pytest.raises(UsageError, match="eviction is 'none'"):
        s.assign(np.array([1, 5], np.int64))
    assert s.index.lookup(np.array([1, 2, 3, 4, 5])).tolist() == [0, 1, 2, 3, -1]
    lru = HashedSlots(TableSpec("h", dim=1, keys="int64", capacity=4, shards=1, eviction="lru"))
    with pytest.raises(UsageError, match="publish fewer keys at once"):
        lru.assign(np.arange(5, dtype=np.int64))
    assert len(lru.index) == 0 and lru.evicted == 0


def _writes(seed: int, n_publishes: int = 30):
    """A publisher's writes to a small hashed table (many evictions, some keys coming
    back): [(slots, versions, rows)], and its final assignment."""
    rng = np.random.default_rng(seed)
    t = TableSpec("h", dim=2, keys="int64", capacity=32, shards=4, eviction="lru")
    s = HashedSlots(t)
    pool = rng.integers(-2**62, 2**62, 90, dtype=np.int64)
    out, v = [], 1
    for _ in range(n_publishes):
        keys = np.unique(rng.choice(pool, rng.integers(1, 6)))
        slots = s.assign(keys)
        vals = rng.standard_normal((len(keys), 2)).astype(np.float32)
        out.append((slots, np.arange(v, v + len(keys), dtype=np.int64), with_keys(vals, keys, t)))
        v += len(keys)
    return t, s, pool, out


@pytest.mark.parametrize("seed", range(8))
def test_a_stores_key_map_ends_at_the_publishers_assignment_in_any_arrival_order(seed):
    t, s, pool, writes = _writes(seed)
    assert s.evicted > 0
    ts = TableStore(t, device="cpu")
    ts.key_map()                                  # built now: kept incrementally from here
    rng = np.random.default_rng(100 + seed)
    for i in rng.permutation(len(writes)):        # pushes and pulls arrive in any order
        slots, versions, rows = writes[i]
        ts.apply(Delta("m", "h", slots, versions, rows))
    want = s.index.lookup(pool)
    assert ts.lookup(pool).tolist() == want.tolist()
    # A map built afresh from the same rows agrees.
    ts.values = ts.values.clone()
    assert ts.lookup(pool).tolist() == want.tolist()
    held_slots, held_keys = ts.held_keys()
    assert sorted(held_keys.tolist()) == sorted(pool[want >= 0].tolist())


def test_tombstones_and_restores_move_keys_out_of_and_back_into_the_map():
    t = TableSpec("h", dim=1, keys="int64", capacity=8, shards=1)
    ts = TableStore(t, device="cpu")
    rows = with_keys(np.ones((2, 1), np.float32), np.array([7, 8]), t)
    ts.apply(Delta("m", "h", np.array([0, 1]), np.array([5, 5]), rows))
    assert ts.lookup([7, 8]).tolist() == [0, 1]
    ts.apply(Delta("m", "h", np.array([1]), np.array([6]), rows[1:], tombstone=np.array([True])))
    assert ts.lookup([7, 8]).tolist() == [0, -1]
    ts.restore_rows(np.array([1]), np.array([5]), rows[1:])          # a rollback puts 8 back
    assert ts.lookup([7, 8]).tolist() == [0, 1]
    ts.restore_rows(np.array([0]), np.array([0]), np.zeros((1, t.width), np.float32))
    assert ts.lookup([7, 8]).tolist() == [-1, 1]
    with pytest.raises(UsageError):
        TableStore(TableSpec("e", rows=4, dim=1), device="cpu").lookup([1])


def test_key_map_keeps_the_greater_version_of_a_key_held_twice():
    m = KeyMap(4)
    v = np.array([3, 9, 0, 0])
    m.rebind(np.array([0, 1]), np.array([42, 42]), v)       # a stale copy and the latest
    assert m.lookup(np.array([42])).tolist() == [1]
    v[0] = 10                                                # the stale slot rewritten: 42 stays at 1
    m.rebind(np.array([0]), np.array([EMPTY_KEY]), v)
    assert m.lookup(np.array([42])).tolist() == [1]
    v[2] = 2                                                 # an older copy arriving late loses
    m.rebind(np.array([2]), np.array([42]), v)
    assert m.lookup(np.array([42])).tolist() == [1] and m.keys_of(np.array([2])).tolist() == [EMPTY_KEY]


def test_key_index_regions_and_claims():
    ix = KeyIndex(10, regions=3)                 # regions of 4, 4 and 2 slots
    got = ix.insert(np.array([1, 2, 3]), regions=np.array([2, 2, 0]))
    assert got.tolist() == [8, 9, 0] and ix.free_in(np.array([0, 1, 2])).tolist() == [3, 4, 0]
    with pytest.raises(UsageError, match="in region 2"):
        ix.insert(np.array([4]), regions=np.array([2]))
    ix.remove(np.array([1]))
    assert ix.insert(np.array([4]), regions=np.array([2])).tolist() == [8]
    c = KeyIndex(10, regions=3)
    c.claim(np.array([50, 60]), np.array([1, 9]))
    assert c.lookup(np.array([50, 60])).tolist() == [1, 9] and c.free_in(np.array([0, 2])).tolist() == [3, 1]
    assert c.insert(np.array([70, 80]), regions=np.array([0, 2])).tolist() == [0, 8]
    for keys, slots in (([50], [2]), ([51], [1]), ([52, 53], [3, 3]), ([54], [10])):
        with pytest.raises(UsageError):
            c.claim(np.array(keys), np.array(slots))


@pytest.mark.parametrize("seed", range(5))
def test_lru_victims_from_the_pool_equal_a_ranking_afresh(seed):
    """The LRU pool (ranked once, consumed across publishes) picks exactly the victims a
    full ranking would, through touches, evictions, re-inserts and excluded slots."""
    rng = np.random.default_rng(seed)
    ix = KeyIndex(600, regions=3)
    keys = rng.integers(-2**62, 2**62, 600)
    ix.insert(keys, regions=rng.integers(0, 3, 600) * 0 + np.arange(600) // 200)
    ix.touch(np.arange(600), 0)
    tick = 0
    for _ in range(40):
        tick += 1
        ix.touch(rng.choice(600, rng.integers(1, 80), replace=False), tick)
        r = int(rng.integers(0, 3))
        n = int(rng.integers(1, 30))
        lo = 200 * r
        exclude = rng.choice(np.arange(lo, lo + 200), rng.integers(0, 5), replace=False)
        ranked = ix._ranked(n + len(exclude), "lru", r)
        want = ranked[~np.isin(ranked, exclude)][:n]
        got = ix.victims(n, "lru", region=r, exclude=exclude)
        assert got.tolist() == want.tolist()
        ix.free(got)
        fresh = ix.insert(rng.integers(-2**62, 2**62, len(got)), regions=np.full(len(got), r))
        ix.touch(fresh, tick)


def test_a_row_carrying_the_reserved_key_marker_is_refused_before_anything_changes():
    from ekko.core.errors import ProtocolError as PE
    from ekko.core.hashed import KEY_BIAS
    t = TableSpec("h", dim=2, keys="int64", capacity=8)
    rows = with_keys(np.ones((2, 2), np.float32), np.array([5, 6]), t)
    rows[1, 2:] = np.array([DELETED_KEY ^ KEY_BIAS], "<i8").view(np.float32)
    d = Delta("m", "h", np.array([0, 1]), np.array([1, 2]), rows)
    with pytest.raises(PE, match="reserved"):
        d.check(t, error=PE)
