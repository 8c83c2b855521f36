"""Tests for ekko.core.version: packed versions, the hybrid logical clock, knowledge vectors."""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ekko.core.errors import ProtocolError, UsageError
from ekko.core.version import (HLC_EPOCH_MS, HLC_LOGICAL_BITS, MAX_COUNTER, MAX_ORIGIN, HybridClock, Knowledge, Version,
                          counters_of, origin_id, origins_of, pack)

counters = st.integers(0, MAX_COUNTER)
origins = st.integers(0, MAX_ORIGIN)
versions = st.builds(Version, counters, origins)


# -- packing -----------------------------------------------------------------------------------
@given(a=versions, b=versions)
def test_pack_order_is_version_order(a, b):
    pa, pb = a.packed, b.packed
    assert (pa < pb) == ((a.counter, a.origin) < (b.counter, b.origin)) == (a < b)
    assert (pa == pb) == (a == b)
    # the same holds for the int64 arrays the hot paths compare
    arr = np.array([pa, pb], dtype=np.int64)
    assert bool(arr[0] < arr[1]) == (a < b)


@given(v=versions)
def test_pack_roundtrip(v):
    p = v.packed
    assert 0 <= p < 2 ** 63  # fits a non-negative int64
    assert Version.unpack(p) == v
    assert int(counters_of(np.array([p]))[0]) == v.counter
    assert int(origins_of(np.array([p]))[0]) == v.origin


@given(vs=st.lists(versions, min_size=1, max_size=50))
def test_sorting_packed_sorts_versions(vs):
    packed = np.array([v.packed for v in vs], dtype=np.int64)
    assert [Version.unpack(p) for p in np.sort(packed)] == sorted(vs)
    assert Version.unpack(packed.max()) == max(vs)


@pytest.mark.parametrize("c,o", [(-1, 1), (MAX_COUNTER + 1, 1), (1, -1), (1, MAX_ORIGIN + 1)])
def test_pack_rejects_out_of_range(c, o):
    with pytest.raises(UsageError):
        pack(c, o)


def test_origin_id():
    assert origin_id("17") == 17 and origin_id(17) == 17
    a = origin_id("trainer-a")
    assert 1 <= a <= MAX_ORIGIN and a == origin_id("trainer-a") and a != origin_id("trainer-b")
    for bad in ("0", str(MAX_ORIGIN + 1), 0, "", None):
        with pytest.raises(UsageError):
            origin_id(bad)  # type: ignore[arg-type]


# -- hybrid logical clock ----------------------------------------------------------------------
def test_hlc_tracks_wall_time():
    c = HybridClock()
    first = c.reserve(HLC_EPOCH_MS + 1000)
    assert first == 1000 << HLC_LOGICAL_BITS
    assert c.reserve(HLC_EPOCH_MS + 2000) == 2000 << HLC_LOGICAL_BITS


def test_hlc_reserve_block():
    c = HybridClock()
    a = c.reserve(HLC_EPOCH_MS + 5, n=10)
    b = c.reserve(HLC_EPOCH_MS + 5, n=1)
    assert b == a + 10 and c.last == b
    with pytest.raises(UsageError):
        c.reserve(HLC_EPOCH_MS, n=0)


def test_hlc_strictly_increasing_when_wall_clock_goes_back():
    rng = random.Random(7)
    c = HybridClock()
    now = HLC_EPOCH_MS + 10_000
    last = -1
    for _ in range(5000):
        now += rng.choice([-5000, -1, 0, 0, 1, 3, 250])   # steps back, stalls, jumps
        n = rng.randint(1, 300)
        first = c.reserve(now, n)
        assert first > last
        last = first + n - 1
        assert c.last == last


def test_hlc_floor_survives_restart_with_clock_behind():
    c = HybridClock()
    c.reserve(HLC_EPOCH_MS + 10_000, n=5)
    saved = c.last
    # restart with the wall clock an hour behind: the floor keeps counters increasing
    c2 = HybridClock(floor=saved)
    assert c2.reserve(HLC_EPOCH_MS + 10_000 - 3_600_000) == saved + 1
    # a clock before the epoch is not negative
    assert HybridClock().reserve(0) == 1


def test_hlc_observe():
    c = HybridClock()
    c.observe(1_000_000)
    assert c.reserve(HLC_EPOCH_MS) == 1_000_001
    c.observe(5)  # never moves back
    assert c.reserve(HLC_EPOCH_MS) == 1_000_002


def test_hlc_exhaustion():
    c = HybridClock(floor=MAX_COUNTER - 2)
    assert c.reserve(HLC_EPOCH_MS, n=2) == MAX_COUNTER - 1
    with pytest.raises(UsageError):
        c.reserve(HLC_EPOCH_MS)


# -- knowledge ---------------------------------------------------------------------------------
def test_knowledge_advance_only_forward():
    k = Knowledge()
    assert k[3] == 0 and len(k) == 0
    assert k.advance(3, 10)
    assert not k.advance(3, 10) and not k.advance(3, 4)
    assert k[3] == 10
    assert k.advance(3, 11) and k[3] == 11
    assert not k.advance(4, 0) and len(k) == 1  # counter 0 is "nothing known"


@given(a=st.dictionaries(st.integers(1, 50), st.integers(0, 1000)),
       b=st.dictionaries(st.integers(1, 50), st.integers(0, 1000)))
def test_knowledge_merge_is_pointwise_max(a, b):
    ka, kb = Knowledge(a), Knowledge(b)
    before = ka.copy()
    moved = ka.merge(kb)
    want = {o: max(a.get(o, 0), b.get(o, 0)) for o in set(a) | set(b)}
    assert all(ka[o] == c for o, c in want.items())
    assert moved == (ka != before)
    assert ka.dominates(kb) and ka.dominates(before)
    # merge is commutative and idempotent; a plain mapping merges the same way
    kb2 = Knowledge(b)
    kb2.merge(a)
    assert kb2 == ka
    assert not ka.merge(kb)
    k3 = Knowledge(a)
    k3.merge(Knowledge(b).as_dict())
    assert k3 == ka


def test_knowledge_dominates():
    assert Knowledge({1: 5, 2: 3}).dominates(Knowledge({1: 5}))
    assert not Knowledge({1: 5}).dominates(Knowledge({1: 5, 2: 1}))
    assert Knowledge().dominates(Knowledge())


@settings(max_examples=200)
@given(k=st.dictionaries(st.integers(1, 20), st.integers(0, 100)),
       vs=st.lists(st.tuples(st.integers(1, 110), st.integers(0, 25)), max_size=60))
def test_knowledge_covers_matches_scalar_definition(k, vs):
    kn = Knowledge(k)
    packed = np.array([pack(c, o) for c, o in vs], dtype=np.int64)
    got = kn.covers(packed)
    assert got.dtype == bool and got.shape == packed.shape
    want = [o in k and k[o] > 0 and c <= k[o] for c, o in vs]
    assert got.tolist() == want


def test_knowledge_covers_empty():
    assert Knowledge().covers(np.array([pack(1, 1)])).tolist() == [False]
    assert Knowledge({1: 9}).covers(np.zeros(0, np.int64)).shape == (0,)


def test_knowledge_digest():
    assert Knowledge().digest == 0
    k = Knowledge({1: 5, 2: 7})
    d = k.digest
    assert d != 0 and 0 < d < 2 ** 64
    # insertion order does not matter; equal vectors, equal digests
    assert Knowledge({2: 7, 1: 5}).digest == d
    # the cached digest is invalidated by any advance
    k.advance(1, 6)
    assert k.digest != d
    assert Knowledge({1: 6, 2: 7}).digest == k.digest
    # a copy carries the digest and then diverges independently
    c = k.copy()
    assert c.digest == k.digest
    c.advance(3, 1)
    assert c.digest != k.digest and k[3] == 0


@given(a=st.dictionaries(st.integers(1, MAX_ORIGIN), st.integers(1, MAX_COUNTER), max_size=8),
       b=st.dictionaries(st.integers(1, MAX_ORIGIN), st.integers(1, MAX_COUNTER), max_size=8))
def test_knowledge_digest_equal_iff_equal(a, b):
    assert (Knowledge(a).digest == Knowledge(b).digest) == (a == b)


@given(k=st.dictionaries(st.integers(1, MAX_ORIGIN), st.integers(0, MAX_COUNTER), max_size=20))
def test_knowledge_wire_roundtrip(k):
    kn = Knowledge(k)
    wire = kn.to_wire()
    assert wire == sorted(wire)
    back = Knowledge.from_wire(wire)
    assert back == kn and back.digest == kn.digest
    import msgpack
    assert Knowledge.from_wire(msgpack.unpackb(msgpack.packb(wire))) == kn


def test_knowledge_from_wire_accepts_tuples_and_duplicates():
    assert Knowledge.from_wire([(1, 5), [1, 9], [1, 2]])[1] == 9


@pytest.mark.parametrize("data", [
    None, 5, "x", {1: 2}, (1, 2), b"\x00",
    [1], [[1]], [[1, 2, 3]], [[0, 5]], [[MAX_ORIGIN + 1, 5]], [[-1, 5]], [[1, -1]], [[1, MAX_COUNTER + 1]],
    [[True, 5]], [[1, False]], [[1.0, 5]], [[1, 5.0]], [["1", 5]], [[1, None]], [None], ["ab"],
    [[1, 2]] * (MAX_ORIGIN + 1),
])
def test_knowledge_from_wire_rejects(data):
    with pytest.raises(ProtocolError) as ei:
        Knowledge.from_wire(data)
    assert ei.value.reason == "bad_knowledge"


def test_covers_table_matches_binary_search():
    """Knowledge.covers by origin table (greatest origin <= COVERS_TABLE_ORIGINS), by a
    loop over a few origins and by binary search give the same answers, unknown origins
    and edge values included."""
    from ekko.core.version import COVERS_TABLE_ORIGINS, pack
    rng = np.random.default_rng(5)
    for small in (True, False):
        for _ in range(50):
            k = Knowledge()
            pool = np.arange(1, 60) if small else np.r_[np.arange(COVERS_TABLE_ORIGINS + 1, COVERS_TABLE_ORIGINS + 20),
                                                        [3, 9, MAX_ORIGIN]]
            origins = rng.choice(pool, int(rng.integers(1, 20)), replace=False)
            for o in origins:
                k.advance(int(o), int(rng.integers(1, 1000)))
            asked = rng.choice(np.r_[origins, [0, 2, 61, MAX_ORIGIN, COVERS_TABLE_ORIGINS + 2]], 400)
            packed = np.array([pack(int(c), int(o)) for c, o in zip(rng.integers(0, 1100, 400), asked)], np.int64)
            known = dict(k.items())
            want = np.array([int(o) in known and int(c) <= known[int(o)]
                             for o, c in zip(packed & MAX_ORIGIN, packed >> 16)])
            assert (k.covers(packed) == want).all()
