"""Tests for ekko.core.store: apply semantics, order-insensitivity, digest, restore, scan, dtypes.

The order-insensitivity property is checked against a pure-Python reference
model of the rule "a row takes an update only when its version is strictly
greater; a tombstone resets the row to zeros".
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ekko.core.delta import WIRE_DTYPES, Delta
from ekko.core.errors import UsageError
from ekko.core.spec import ModelSpec, TableSpec
from ekko.core.store import ApplyResult, ModelStore, TableStore, from_wire_values, to_wire_values
from ekko.core.version import Knowledge, pack

DEVICE = "cpu"


def store(rows=20, dim=3, dtype="float32", shards=None, with_values=True):
    return TableStore(TableSpec("t", rows=rows, dim=dim, dtype=dtype, shards=shards), device=DEVICE,
                      with_values=with_values)


def delta(ids, versions, values=None, tombstone=None, dim=3, dtype=np.float32):
    ids = np.asarray(ids, np.int64)
    if values is None:
        values = np.asarray([[float(v)] * dim for v in versions], dtype=dtype).reshape(len(ids), dim)
    return Delta("m", "t", ids, np.asarray(versions, np.int64), values,
                 None if tombstone is None else np.asarray(tombstone, bool))


def row(ts, i):
    return ts.values[i].tolist()


# -- the apply rule ----------------------------------------------------------------------------
def test_row_changes_only_on_strictly_greater_version():
    ts = store()
    r = ts.apply(delta([1], [10]))
    assert len(r) == 1 and row(ts, 1) == [10.0] * 3 and ts.versions[1] == 10
    # equal version: no change, even with other values
    r = ts.apply(delta([1], [10], values=np.full((1, 3), 99, np.float32)))
    assert len(r) == 0 and row(ts, 1) == [10.0] * 3
    # lower version: no change
    r = ts.apply(delta([1], [9]))
    assert len(r) == 0 and row(ts, 1) == [10.0] * 3 and ts.versions[1] == 10
    # greater version: change
    r = ts.apply(delta([1], [11]))
    assert r.ids.tolist() == [1] and row(ts, 1) == [11.0] * 3 and ts.versions[1] == 11
    # untouched rows stay zero at version 0
    assert ts.versions[0] == 0 and row(ts, 0) == [0.0] * 3


def test_mixed_winners_and_losers():
    ts = store()
    ts.apply(delta([1, 2, 3], [10, 10, 10]))
    r = ts.apply(delta([1, 2, 3, 4], [9, 11, 10, 1]))
    assert sorted(r.ids.tolist()) == [2, 4]
    assert ts.versions[[1, 2, 3, 4]].tolist() == [10, 11, 10, 1]
    assert [row(ts, i)[0] for i in (1, 2, 3, 4)] == [10.0, 11.0, 10.0, 1.0]


def test_duplicates_in_one_delta_resolve_to_greatest_version():
    ts = store()
    d = delta([5, 5, 7, 5, 7], [3, 9, 4, 6, 2])
    r = ts.apply(d)
    assert sorted(r.ids.tolist()) == [5, 7]   # each changed row reported once
    assert len(set(r.ids.tolist())) == len(r)
    assert ts.versions[5] == 9 and row(ts, 5) == [9.0] * 3
    assert ts.versions[7] == 4 and row(ts, 7) == [4.0] * 3
    got = dict(zip(r.ids.tolist(), zip(r.versions.tolist(), r.old_versions.tolist())))
    assert got == {5: (9, 0), 7: (4, 0)}


def test_duplicates_some_stale():
    ts = store()
    ts.apply(delta([5], [5]))
    # copies below, equal to and above the stored version
    r = ts.apply(delta([5, 5, 5, 5], [4, 5, 8, 7]))
    assert r.ids.tolist() == [5] and r.versions.tolist() == [8] and r.old_versions.tolist() == [5]
    assert row(ts, 5) == [8.0] * 3
    # the same (id, version) twice is one update: reported once
    r = ts.apply(delta([6, 6], [3, 3]))
    assert r.ids.tolist() == [6] and row(ts, 6) == [3.0] * 3


def test_empty_delta():
    ts = store()
    r = ts.apply(Delta("m", "t", np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 3), np.float32)))
    assert len(r) == 0 and r.ids.dtype == np.int64


def test_tombstone_resets_row_to_zeros():
    ts = store()
    ts.apply(delta([2, 3], [5, 5]))
    r = ts.apply(delta([2, 3], [6, 6], tombstone=[True, False]))
    assert len(r) == 2
    assert row(ts, 2) == [0.0] * 3 and ts.tombstone[2] and ts.versions[2] == 6
    assert row(ts, 3) == [6.0] * 3 and not ts.tombstone[3]
    # a newer write revives the row and clears the flag
    ts.apply(delta([2], [7]))
    assert row(ts, 2) == [7.0] * 3 and not ts.tombstone[2]
    # an older tombstone does nothing
    ts.apply(delta([2], [6], tombstone=[True]))
    assert row(ts, 2) == [7.0] * 3 and not ts.tombstone[2]


def test_tombstone_does_not_modify_callers_values():
    ts = store()
    d = delta([1, 2], [5, 5], tombstone=[True, False])
    before = d.values.copy()
    ts.apply(d)
    assert np.array_equal(d.values, before)


def test_tombstone_only_delta_without_values():
    ts = store()
    ts.apply(delta([4, 5], [1, 1]))
    r = ts.apply(Delta("m", "t", np.array([4, 5]), np.array([2, 2]), None, np.array([True, True])))
    assert len(r) == 2 and row(ts, 4) == [0.0] * 3 and row(ts, 5) == [0.0] * 3
    assert ts.tombstone[4] and ts.tombstone[5]


def test_valueless_delta_rejected_without_state_change():
    ts = store()
    ts.apply(delta([1, 2], [5, 5]))
    before = (ts.versions.copy(), ts.tombstone.copy(), ts.values.clone(), ts.digest())
    bad = Delta("m", "t", np.array([1, 2]), np.array([9, 9]), None, np.array([True, False]))
    with pytest.raises(UsageError):
        ts.apply(bad)
    with pytest.raises(UsageError):
        ts.apply(Delta("m", "t", np.array([1]), np.array([9])))
    assert np.array_equal(ts.versions, before[0]) and np.array_equal(ts.tombstone, before[1])
    assert torch.equal(ts.values, before[2]) and ts.digest() == before[3]
    # the real update still applies afterwards
    assert len(ts.apply(delta([1, 2], [9, 9]))) == 2


def test_apply_result_and_capture_old():
    ts = store()
    ts.apply(delta([1, 2], [5, 6]))
    r = ts.apply(delta([1, 2, 3], [7, 6, 2]), capture_old=True)
    assert isinstance(r, ApplyResult)
    order = np.argsort(r.ids)
    assert r.ids[order].tolist() == [1, 3]
    assert r.versions[order].tolist() == [7, 2]
    assert r.old_versions[order].tolist() == [5, 0]
    assert r.old_values is not None and r.old_values.dtype == np.float32
    assert r.old_values[order].tolist() == [[5.0] * 3, [0.0] * 3]
    assert ts.apply(delta([1], [8])).old_values is None  # only when asked
    # nothing won: empty result
    r = ts.apply(delta([1], [1]), capture_old=True)
    assert len(r) == 0


def test_capture_old_then_restore_undoes_apply():
    ts = store(rows=50)
    rng = np.random.default_rng(3)
    ts.apply(delta(np.arange(0, 50, 2), rng.integers(1, 100, 25)))
    before = (ts.versions.copy(), ts.tombstone.copy(), ts.values.clone(), ts.digest())
    old_tomb = ts.tombstone.copy()
    r = ts.apply(delta(np.arange(50), np.full(50, 60), tombstone=rng.random(50) < 0.3), capture_old=True)
    assert ts.digest() != before[3]
    ts.restore_rows(r.ids, r.old_versions, r.old_values, old_tomb[r.ids])
    assert np.array_equal(ts.versions, before[0]) and np.array_equal(ts.tombstone, before[1])
    assert torch.equal(ts.values, before[2]) and ts.digest() == before[3]


def test_restore_rows_can_lower_versions():
    ts = store()
    ts.apply(delta([1, 2], [10, 10]))
    ts.restore_rows(np.array([1]), np.array([3]), np.full((1, 3), 7, np.float32), np.array([False]))
    assert ts.versions[1] == 3 and row(ts, 1) == [7.0] * 3 and ts.versions[2] == 10
    # after a rollback a later update (greater than the restored version) applies normally
    assert len(ts.apply(delta([1], [4]))) == 1 and row(ts, 1) == [4.0] * 3
    ts.restore_rows(np.array([2]), np.array([0]), np.zeros((1, 3), np.float32), np.array([True]))
    assert ts.tombstone[2] and ts.versions[2] == 0
    ts.restore_rows(np.zeros(0, np.int64), np.zeros(0, np.int64), None)  # no-op
    with pytest.raises(UsageError):
        ts.restore_rows(np.array([1]), np.array([1]), None)


def test_metadata_mode():
    ts = store(with_values=False)
    assert ts.values is None
    r = ts.apply(Delta("m", "t", np.array([1, 2]), np.array([4, 5])))
    assert len(r) == 2 and ts.versions[[1, 2]].tolist() == [4, 5]
    assert len(ts.apply(delta([1], [9]))) == 1   # values ignored
    for call in (ts.digest, lambda: ts.read(np.array([1]))):
        with pytest.raises(UsageError):
            call()
    t = ts.take("m", np.array([1]))
    assert t.values is None and t.versions.tolist() == [9]


def test_read_and_take():
    ts = store()
    ts.apply(delta([3, 4], [5, 6], tombstone=[False, True]))
    assert ts.read(np.array([3])).tolist() == [[5.0] * 3]
    t = ts.take("m", np.array([3, 4, 0]))
    assert t.ids.tolist() == [3, 4, 0] and t.versions.tolist() == [5, 6, 0]
    assert t.values.tolist() == [[5.0] * 3, [0.0] * 3, [0.0] * 3]
    assert t.tombstone.tolist() == [False, True, False]
    assert ts.take("m", np.array([3])).tombstone is None
    # take() output is a valid delta that another store can apply
    other = store()
    other.apply(t.take(np.array([0, 1])))
    assert other.digest() != store().digest() and other.tombstone[4]


def test_max_counter():
    ts = store()
    assert ts.max_counter() == 0
    ts.apply(delta([1, 2], [pack(7, 3), pack(5, 9)]))
    assert ts.max_counter() == 7


def test_model_store():
    ms = ModelStore(ModelSpec("m", tables=[TableSpec("a", rows=4, dim=2), TableSpec("b", rows=3, dim=1,
                                                                                      dtype="float16")]),
                    device=DEVICE)
    assert ms.table("b").values.dtype == torch.float16 and ms.table("a").values.shape == (4, 2)
    with pytest.raises(UsageError):
        ms.table("c")


# -- digest ------------------------------------------------------------------------------------
def test_digest_equal_exactly_when_values_equal():
    a, b = store(rows=100, shards=7), store(rows=100, shards=7)
    assert a.digest() == b.digest()
    a.apply(delta([5, 60], [1, 2]))
    assert a.digest() != b.digest()
    b.apply(delta([60], [2]))
    assert a.digest() != b.digest()
    b.apply(delta([5], [1]))
    assert a.digest() == b.digest()
    # values only: the same values under other versions digest the same
    c = store(rows=100, shards=7)
    c.apply(delta([5, 60], [1, 2]))
    c.restore_rows(np.array([5]), np.array([77]), np.ones((1, 3), np.float32))   # same values, other version
    assert c.digest() == a.digest()
    c.restore_rows(np.array([5]), np.array([1]), np.full((1, 3), 2, np.float32))  # same version, other values
    assert c.digest() != a.digest()


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
def test_digest_sees_every_element(dtype):
    rows, dim = 40, 5
    ts = store(rows=rows, dim=dim, dtype=dtype, shards=6)
    rng = np.random.default_rng(0)
    wd = np.dtype(WIRE_DTYPES[dtype])
    base = rng.standard_normal((rows, dim)).astype(np.float32)
    vals = to_wire_values(torch.from_numpy(base).to(ts.values.dtype))
    ts.apply(Delta("m", "t", np.arange(rows, dtype=np.int64), np.ones(rows, np.int64), vals))
    seen = {ts.digest()}
    version = 2
    for i in range(rows):
        for j in range(0, dim, 2):
            cur = to_wire_values(ts.read(np.array([i])))
            cur = cur.copy()
            # flip the lowest bit of one element
            cur.view(np.dtype(f"u{wd.itemsize}"))[0, j] ^= 1
            ts.apply(Delta("m", "t", np.array([i]), np.array([version]), cur))
            version += 1
            d = ts.digest()
            assert d not in seen, (i, j)
            seen.add(d)


def test_digest_cache_invalidated_by_writes():
    ts = store(rows=100, shards=10)
    d0 = ts.digest()
    assert ts.digest() == d0            # cached, stable
    ts.apply(delta([55], [1]))          # a write after digest() ...
    d1 = ts.digest()
    assert d1 != d0                     # ... changes the next digest
    ts.apply(delta([55], [1]))          # a refused write changes nothing
    assert ts.digest() == d1
    ts.restore_rows(np.array([55]), np.array([0]), np.zeros((1, 3), np.float32))
    assert ts.digest() == d0            # restoring the values restores the digest
    ts.apply(delta([99], [3], tombstone=[True]))  # a tombstone over zeros: values unchanged
    assert ts.digest() == d0


def test_digest_matches_fresh_computation():
    """The per-shard cache gives what a store built from scratch with the same values gives."""
    rng = np.random.default_rng(5)
    a = store(rows=300, shards=9)
    for k in range(20):
        ids = rng.choice(300, 25, replace=False)
        a.apply(delta(ids, np.full(25, k + 1), values=rng.standard_normal((25, 3)).astype(np.float32)))
        a.digest()  # interleave digests with writes
    b = store(rows=300, shards=9)
    b.apply(Delta("m", "t", np.arange(300, dtype=np.int64), np.ones(300, np.int64), to_wire_values(a.values)))
    assert a.digest() == b.digest()


# -- scan_newer --------------------------------------------------------------------------------
def test_scan_newer():
    ts = store(rows=100, shards=4)   # 25 rows per shard
    vs = {3: pack(10, 1), 7: pack(4, 2), 12: pack(8, 1), 20: pack(2, 1), 30: pack(1, 1)}
    ts.apply(delta(list(vs), list(vs.values())))
    ids, vers = ts.scan_newer(0, Knowledge())
    assert ids.tolist() == [20, 7, 12, 3]               # version order, only written rows, only shard 0
    assert vers.tolist() == [vs[i] for i in ids.tolist()]
    assert ids.dtype == np.int64
    ids, _ = ts.scan_newer(0, Knowledge({1: 8}))        # origin 1 up to counter 8 known
    assert ids.tolist() == [7, 3]
    ids, _ = ts.scan_newer(0, Knowledge({1: 100, 2: 3}))
    assert ids.tolist() == [7]
    ids, _ = ts.scan_newer(0, Knowledge({1: 100, 2: 4}))
    assert ids.tolist() == []
    ids, _ = ts.scan_newer(1, Knowledge())
    assert ids.tolist() == [30]
    assert ts.scan_newer(3, Knowledge())[0].tolist() == []


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2 ** 32 - 1))
def test_scan_newer_property(seed):
    r = random.Random(seed)
    ts = store(rows=64, shards=4)
    n = r.randint(0, 64)
    ids = r.sample(range(64), n)
    vers = [pack(r.randint(1, 30), r.randint(1, 4)) for _ in ids]
    ts.apply(delta(ids, vers))
    k = Knowledge({o: r.randint(0, 30) for o in range(1, 5) if r.random() < 0.7})
    for shard in range(4):
        got_ids, got_v = ts.scan_newer(shard, k)
        lo, hi = ts.spec.shard_range(shard)
        want = {i for i, v in zip(ids, vers) if lo <= i < hi and not (v >> 16 <= k[v & 0xFFFF])}
        assert set(got_ids.tolist()) == want and len(got_ids) == len(want)
        assert (np.diff(got_v) >= 0).all()
        assert got_v.tolist() == ts.versions[got_ids].tolist()


# -- dtypes ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64", "float32"])
def test_dtype_roundtrip(dtype):
    ts = store(rows=10, dim=4, dtype=dtype)
    wd = np.dtype(WIRE_DTYPES[dtype])
    rng = np.random.default_rng(1)
    # arbitrary bit patterns (NaNs and infinities included) must survive bit for bit
    bits = rng.integers(0, 256, 3 * 4 * wd.itemsize, dtype=np.uint8).view(wd).reshape(3, 4)
    ts.apply(Delta("m", "t", np.array([1, 5, 9]), np.array([1, 1, 1]), bits))
    back = ts.take("m", np.array([1, 5, 9]))
    assert back.values.dtype == wd and back.values.tobytes() == bits.tobytes()
    assert ts.values.dtype == {"float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
                               "float32": torch.float32}[dtype]
    back.check(ts.spec)


def test_bfloat16_values_are_real_bfloat16():
    x = torch.tensor([[1.5, -2.0, 3.140625]], dtype=torch.bfloat16)
    wire = to_wire_values(x)
    assert wire.dtype == np.uint16
    ts = store(rows=4, dim=3, dtype="bfloat16")
    ts.apply(Delta("m", "t", np.array([2]), np.array([1]), wire))
    assert ts.values[2].tolist() == [1.5, -2.0, 3.140625]
    assert torch.equal(from_wire_values(wire, "bfloat16", torch.device("cpu")), x)


# -- order-insensitivity against a reference model ---------------------------------------------
class Reference:
    """Pure-Python model of the apply rule."""

    def __init__(self, rows: int, dim: int) -> None:
        self.rows = {i: (0, False, (0.0,) * dim) for i in range(rows)}
        self.dim = dim

    def apply(self, ids, versions, values, tombs) -> None:
        for i, v, x, t in zip(ids, versions, values, tombs):
            if v > self.rows[i][0]:
                self.rows[i] = (v, t, (0.0,) * self.dim if t else tuple(x))


def _update(i: int, v: int, dim: int) -> tuple[tuple[float, ...], bool]:
    """The update (id, version) carries: a function of both, as in a real system."""
    r = random.Random(i * 1_000_003 + v)
    return tuple(float(np.float32(r.uniform(-4, 4))) for _ in range(dim)), r.random() < 0.2


@st.composite
def delta_batches(draw):
    rows = draw(st.integers(1, 40))
    dim = draw(st.integers(1, 4))
    n_deltas = draw(st.integers(1, 8))
    pairs = st.tuples(st.integers(0, rows - 1), st.integers(1, 12))   # narrow versions: many ties and dups
    batches = [draw(st.lists(pairs, min_size=0, max_size=30)) for _ in range(n_deltas)]
    return rows, dim, batches


def _as_delta(batch, dim):
    ids = [i for i, _ in batch]
    vers = [v for _, v in batch]
    upd = [_update(i, v, dim) for i, v in batch]
    vals = np.array([u[0] for u in upd], np.float32).reshape(len(batch), dim)
    tombs = np.array([u[1] for u in upd], bool)
    return Delta("m", "t", np.array(ids, np.int64), np.array(vers, np.int64), vals, tombs), upd


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=delta_batches(), seed=st.integers(0, 2 ** 32 - 1), shards=st.integers(1, 5))
def test_apply_order_insensitive_and_matches_reference(case, seed, shards):
    rows, dim, batches = case
    shards = min(shards, rows)
    r = random.Random(seed)
    deltas = [_as_delta(b, dim) for b in batches]
    # replays: some deltas arrive twice
    deltas += [deltas[r.randrange(len(deltas))] for _ in range(r.randint(0, 3))]
    stores = []
    for _ in range(2):
        order = deltas[:]
        r.shuffle(order)
        ts = TableStore(TableSpec("t", rows=rows, dim=dim, shards=shards), device=DEVICE)
        for d, _ in order:
            ts.digest()          # digests interleaved with writes must not go stale
            ts.apply(d)
        stores.append(ts)
    a, b = stores
    assert np.array_equal(a.versions, b.versions)
    assert np.array_equal(a.tombstone, b.tombstone)
    assert a.values.numpy().tobytes() == b.values.numpy().tobytes()
    assert a.digest() == b.digest()
    ref = Reference(rows, dim)
    for d, upd in deltas:
        ref.apply(d.ids.tolist(), d.versions.tolist(), [u[0] for u in upd], [u[1] for u in upd])
    for i in range(rows):
        v, t, x = ref.rows[i]
        assert a.versions[i] == v and bool(a.tombstone[i]) == t, i
        assert tuple(a.values[i].tolist()) == x, i


@settings(max_examples=100, deadline=None)
@given(case=delta_batches())
def test_split_and_merged_deltas_agree(case):
    """Applying deltas one by one equals applying their concatenation at once."""
    rows, dim, batches = case
    deltas = [_as_delta(b, dim)[0] for b in batches]
    one = TableStore(TableSpec("t", rows=rows, dim=dim), device=DEVICE)
    for d in deltas:
        one.apply(d)
    merged = TableStore(TableSpec("t", rows=rows, dim=dim), device=DEVICE)
    r = merged.apply(Delta.concat(deltas))
    assert len(set(r.ids.tolist())) == len(r)
    assert np.array_equal(one.versions, merged.versions) and np.array_equal(one.tombstone, merged.tombstone)
    assert torch.equal(one.values, merged.values) and one.digest() == merged.digest()


@pytest.mark.parametrize("seed", range(6))
def test_shard_row_hashes_kept_by_writes_equal_hashes_taken_afresh(seed):
    """Applies (duplicate ids, older versions that lose, tombstones) and restores (versions
    down, rows emptied) keep the row hashes as a hash of the versions from scratch gives."""
    rng = np.random.default_rng(seed)
    spec = TableSpec("t", rows=500, dim=2, shards=7)
    ts = TableStore(spec, device="cpu")
    for step in range(40):
        n = int(rng.integers(1, 60))
        ids = rng.integers(0, spec.rows, n)
        if rng.random() < 0.3:
            ts.restore_rows(np.unique(ids), rng.integers(0, 50, len(np.unique(ids))) * (rng.random() < 0.8),
                            np.zeros((len(np.unique(ids)), 2), np.float32))
        else:
            tomb = rng.random(n) < 0.1 if rng.random() < 0.3 else None
            ts.apply(Delta("m", "t", ids, rng.integers(1, 100, n), rng.standard_normal((n, 2)).astype(np.float32),
                           tomb))
        fresh = TableStore(spec, device="cpu", with_values=False)
        fresh.versions = ts.versions.copy()
        assert np.array_equal(ts.shard_row_hashes(), fresh.shard_row_hashes()), step
    held = [s for s in range(spec.num_shards) if ts.versions[slice(*spec.shard_range(s))].any()]
    assert (ts.shard_row_hashes()[held] != 0).all()
    # A copy (what a snapshot or a restarted simulated replica takes) hashes the same.
    ms = ModelStore(ModelSpec("m", [spec]), device="cpu")
    ms.tables["t"] = ts
    assert np.array_equal(ms.copy().table("t").shard_row_hashes(), ts.shard_row_hashes())


def test_one_version_more_or_less_changes_its_shards_row_hash_only():
    spec = TableSpec("t", rows=100, dim=1, shards=4)
    a, b = TableStore(spec, device="cpu"), TableStore(spec, device="cpu")
    d = Delta("m", "t", np.arange(0, 100, 3), np.arange(1, 35), np.ones((34, 1), np.float32))
    a.apply(d)
    b.apply(d)
    assert np.array_equal(a.shard_row_hashes(), b.shard_row_hashes())
    b.apply(Delta("m", "t", np.array([30]), np.array([40]), np.ones((1, 1), np.float32)))   # shard 1
    assert (a.shard_row_hashes() != b.shard_row_hashes()).tolist() == [False, True, False, False]
    with pytest.raises(UsageError):
        a.bucket_row_hashes(0, 101, 8)
