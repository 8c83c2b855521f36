"""The key-to-slot index of hashed tables (issue #18): against a dict, on whole arrays."""

from __future__ import annotations

import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ekko.core.errors import UsageError
from ekko.core.key_index import DELETED_KEY, EMPTY_KEY, KeyIndex


def _consistent(ix: KeyIndex, ref: dict[int, int]) -> None:
    """The index holds exactly ``ref`` (key -> slot), each slot once, and its free stack
    holds every other slot."""
    keys = np.fromiter(ref, np.int64, len(ref))
    assert ix.lookup(keys).tolist() == [ref[k] for k in keys.tolist()]
    assert len(ix) == len(ref) and ix.free_slots == ix.capacity - len(ref)
    assert len(set(ref.values())) == len(ref)
    held = np.flatnonzero(ix.keys_of(np.arange(ix.capacity)) != EMPTY_KEY)
    assert sorted(held.tolist()) == sorted(ref.values())
    free = ix._free[:ix.free_slots]
    assert sorted(free.tolist()) == sorted(set(range(ix.capacity)) - set(ref.values()))


# A small key space makes repeats, re-inserts after removal and long probe runs common;
# the extremes of int64 (but the two reserved values) are in it.
KEYS = st.one_of(st.integers(-40, 40), st.sampled_from([DELETED_KEY + 1, 2**63 - 1, -2**62, 2**40]))
OPS = st.lists(st.tuples(st.sampled_from(["insert", "remove", "lookup"]), st.lists(KEYS, max_size=30)),
               min_size=1, max_size=40)


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 64), OPS)
def test_interleaved_inserts_removals_and_lookups_match_a_dict(capacity, ops):
    ix, ref = KeyIndex(capacity), {}
    for op, raw in ops:
        keys = np.array(raw, np.int64)
        if op == "insert":
            new = {k for k in raw if k not in ref}
            if len(new) > capacity - len(ref):
                with pytest.raises(UsageError):
                    ix.insert(keys)
            else:
                slots = ix.insert(keys)
                for k, s in zip(raw, slots.tolist()):
                    assert ref.setdefault(k, s) == s
        elif op == "remove":
            freed = ix.remove(keys)
            assert sorted(freed.tolist()) == sorted(ref.pop(k) for k in set(raw) if k in ref)
        else:
            assert ix.lookup(keys).tolist() == [ref.get(k, -1) for k in raw]
        _consistent(ix, ref)


def test_churn_past_the_tombstone_limit_rebuilds_and_keeps_every_slot():
    rng = np.random.default_rng(1)
    ix, ref = KeyIndex(1000), {}
    rebuilt = 0
    for step in range(60):
        gone = rng.choice(list(ref), min(len(ref), 300), replace=False) if ref else np.zeros(0, np.int64)
        before = ix.tombstones
        ix.remove(np.asarray(gone, np.int64))
        rebuilt += ix.tombstones < before + len(gone)
        for k in np.asarray(gone).tolist():
            del ref[k]
        new = rng.integers(-2**62, 2**62, ix.free_slots)
        for k, s in zip(new.tolist(), ix.insert(new).tolist()):
            ref.setdefault(k, s)
        _consistent(ix, ref)
    assert rebuilt > 0 and len(ix) == 1000


def test_bad_input_is_refused_and_changes_nothing():
    ix = KeyIndex(3)
    ix.insert(np.array([1, 2]))
    for bad in (np.array([EMPTY_KEY]), np.array([3, DELETED_KEY]), np.array([[1]]), np.array([1.5])):
        with pytest.raises(UsageError):
            ix.insert(bad)
    with pytest.raises(UsageError, match="2 new keys but 1 free slots"):
        ix.insert(np.array([7, 8, 1]))
    assert ix.lookup(np.array([1, 2, 3, 7])).tolist() == [0, 1, -1, -1] and ix.free_slots == 1
    for cap in (0, -1, 2**40):
        with pytest.raises(UsageError):
            KeyIndex(cap)
    with pytest.raises(UsageError):
        ix.touch(np.array([3]), 1)
    with pytest.raises(UsageError):
        ix.victims(1, "fifo")


def test_victims_by_recency_and_by_frequency():
    ix = KeyIndex(5)
    slots = ix.insert(np.array([10, 20, 30, 40]))
    ix.touch(slots[[0, 1, 2, 3]], 1)
    ix.touch(slots[[0, 0, 2]], 2)       # 10 used three times, 30 twice, both at tick 2
    ix.touch(slots[[1]], 3)             # 20 used twice, last at tick 3
    assert ix.keys_of(ix.victims(2, "lru")).tolist() == [40, 10]
    assert ix.keys_of(ix.victims(3, "lfu")).tolist() == [40, 30, 20]
    ix.remove(np.array([40]))
    assert ix.keys_of(ix.victims(9, "lru")).tolist() == [10, 30, 20]
    fresh = ix.insert(np.array([50]))   # a new key starts unused, whatever its slot held
    assert ix.uses[fresh].tolist() == [0] and ix.keys_of(ix.victims(1, "lfu")).tolist() == [50]


def test_a_million_keys_get_distinct_slots_and_look_up_the_same():
    """A million random int64 keys (five times issue #18's convergence test): distinct
    slots, the same slots looked up in another order; the time bound is loose (a shared
    2-core host: 0.6 s to insert, 0.1 s to look up measured here), a guard against a
    slow path, not a benchmark."""
    rng = np.random.default_rng(7)
    keys = rng.integers(-2**63 + 2, 2**63 - 1, 1_000_000, dtype=np.int64)
    ix = KeyIndex(1_000_000)
    t0 = time.perf_counter()
    slots = ix.insert(keys)
    t_insert = time.perf_counter() - t0
    t0 = time.perf_counter()
    again = ix.lookup(keys[::-1])
    t_lookup = time.perf_counter() - t0
    assert np.array_equal(again, slots[::-1]) and len(np.unique(slots)) == len(ix)
    assert t_insert < 10 and t_lookup < 10, (t_insert, t_lookup)   # generous: a shared 2-core host
