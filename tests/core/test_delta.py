"""Tests for ekko.core.delta: latest_per_row, take, concat, check."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ekko.core.delta import WIRE_DTYPES, Delta
from ekko.core.errors import ProtocolError, UsageError
from ekko.core.spec import TableSpec

SPEC = TableSpec("t", rows=100, dim=3)


def mk(ids, versions, values=None, tombstone=None, impact=None, dim=3):
    ids = np.asarray(ids, dtype=np.int64)
    if values is None:
        values = np.arange(len(ids) * dim, dtype=np.float32).reshape(len(ids), dim)
    return Delta("m", "t", ids, np.asarray(versions, dtype=np.int64), values,
                 None if tombstone is None else np.asarray(tombstone, dtype=bool),
                 None if impact is None else np.asarray(impact, dtype=np.float32))


def test_len_and_nbytes():
    d = mk([1, 2], [5, 6], tombstone=[0, 1], impact=[1, 2])
    assert len(d) == 2
    assert d.nbytes == 16 + 16 + 24 + 2 + 8
    assert Delta("m", "t", np.zeros(0, np.int64), np.zeros(0, np.int64)).nbytes == 0


# -- latest_per_row ----------------------------------------------------------------------------
def test_latest_per_row_picks_greatest_version():
    d = mk([5, 3, 5, 5, 3], [10, 7, 30, 20, 8], tombstone=[0, 0, 1, 0, 0], impact=[1, 2, 3, 4, 5])
    got = d.latest_per_row()
    by_id = {int(i): k for k, i in enumerate(got.ids)}
    assert sorted(by_id) == [3, 5]
    assert got.versions[by_id[5]] == 30 and got.versions[by_id[3]] == 8
    # the whole row travels with its version: values, tombstone and impact of position 2 / 4
    assert got.values[by_id[5]].tolist() == d.values[2].tolist()
    assert got.values[by_id[3]].tolist() == d.values[4].tolist()
    assert bool(got.tombstone[by_id[5]]) and not got.tombstone[by_id[3]]
    assert got.impact[by_id[5]] == 3 and got.impact[by_id[3]] == 5


def test_latest_per_row_no_duplicates_is_identity():
    d = mk([4, 1, 9], [1, 2, 3])
    assert d.latest_per_row() is d
    one = mk([4], [1])
    assert one.latest_per_row() is one


@settings(max_examples=200)
@given(rows=st.lists(st.tuples(st.integers(0, 20), st.integers(1, 10 ** 12)), min_size=0, max_size=60,
                     unique_by=lambda r: r[1]))
def test_latest_per_row_property(rows):
    ids = [r[0] for r in rows]
    vers = [r[1] for r in rows]
    d = mk(ids, vers, values=np.array([[v, -v, i] for i, v in zip(ids, vers)], dtype=np.float64).reshape(-1, 3),
           impact=np.arange(len(ids)))
    got = d.latest_per_row()
    want = {}
    for i, v in zip(ids, vers):
        want[i] = max(want.get(i, 0), v)
    assert sorted(got.ids.tolist()) == sorted(want)
    assert len(set(got.ids.tolist())) == len(got)
    for i, v, x in zip(got.ids.tolist(), got.versions.tolist(), got.values.tolist()):
        assert want[i] == v and x == [v, -v, i]


# -- take --------------------------------------------------------------------------------------
def test_take_mask_and_indices():
    d = mk([1, 2, 3], [4, 5, 6], tombstone=[1, 0, 1], impact=[7, 8, 9])
    a = d.take(np.array([True, False, True]))
    b = d.take(np.array([0, 2]))
    for x in (a, b):
        assert x.ids.tolist() == [1, 3] and x.versions.tolist() == [4, 6]
        assert x.values.tolist() == [d.values[0].tolist(), d.values[2].tolist()]
        assert x.tombstone.tolist() == [True, True] and x.impact.tolist() == [7, 9]
        assert (x.model, x.table) == ("m", "t")
    none = Delta("m", "t", np.array([1, 2]), np.array([3, 4])).take(np.array([1]))
    assert none.values is None and none.tombstone is None and none.impact is None
    assert none.ids.tolist() == [2]


# -- concat ------------------------------------------------------------------------------------
def test_concat():
    a = mk([1, 2], [3, 4], tombstone=[1, 0])
    b = mk([5], [6], impact=[2.5])
    c = Delta.concat([a, b])
    assert c.ids.tolist() == [1, 2, 5] and c.versions.tolist() == [3, 4, 6]
    assert c.values.tolist() == a.values.tolist() + b.values.tolist()
    # missing tombstones fill with False, missing impact with NaN
    assert c.tombstone.tolist() == [True, False, False]
    assert np.isnan(c.impact[:2]).all() and c.impact[2] == 2.5
    assert c.tombstone.dtype == np.bool_ and c.impact.dtype == np.float32
    c.check(SPEC)


def test_concat_edge_cases():
    a = mk([1], [2])
    assert Delta.concat([a]) is a
    both_none = Delta.concat([mk([1], [2]), mk([3], [4])])
    assert both_none.tombstone is None and both_none.impact is None
    with pytest.raises(UsageError):
        Delta.concat([])
    with pytest.raises(UsageError):
        Delta.concat([a, Delta("m", "t", np.array([1]), np.array([3]))])
    meta = Delta.concat([Delta("m", "t", np.array([1]), np.array([3])), Delta("m", "t", np.array([2]), np.array([4]))])
    assert meta.values is None and meta.ids.tolist() == [1, 2]


# -- check -------------------------------------------------------------------------------------
def test_check_accepts_valid():
    mk([0, 99], [1, 2], tombstone=[0, 1], impact=[0, 1]).check(SPEC)
    Delta("m", "t", np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 3), np.float32)).check(SPEC)
    Delta("m", "t", np.array([1]), np.array([1])).check(SPEC)  # metadata mode: no values


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
def test_check_wire_dtype(dtype):
    spec = TableSpec("t", rows=10, dim=2, dtype=dtype)
    ok = Delta("m", "t", np.array([1]), np.array([1]), np.zeros((1, 2), WIRE_DTYPES[dtype]))
    ok.check(spec)
    other = np.float64 if dtype != "float64" else np.float32
    with pytest.raises(UsageError):
        Delta("m", "t", np.array([1]), np.array([1]), np.zeros((1, 2), other)).check(spec)


BAD = {
    "ids dtype": lambda: Delta("m", "t", np.array([1], np.int32), np.array([1]), np.zeros((1, 3), np.float32)),
    "ids 2-D": lambda: Delta("m", "t", np.array([[1]]), np.array([1]), np.zeros((1, 3), np.float32)),
    "id negative": lambda: mk([-1], [1]),
    "id too large": lambda: mk([100], [1]),
    "versions dtype": lambda: Delta("m", "t", np.array([1]), np.array([1.0]), np.zeros((1, 3), np.float32)),
    "versions shape": lambda: Delta("m", "t", np.array([1]), np.array([1, 2]), np.zeros((1, 3), np.float32)),
    "version zero": lambda: mk([1], [0]),
    "version negative": lambda: mk([1], [-5]),
    "values dim": lambda: mk([1], [1], values=np.zeros((1, 4), np.float32), dim=4),
    "values rows": lambda: mk([1], [1], values=np.zeros((2, 3), np.float32)),
    "values 1-D": lambda: mk([1], [1], values=np.zeros(3, np.float32)),
    "values dtype": lambda: mk([1], [1], values=np.zeros((1, 3), np.float64)),
    "tombstone dtype": lambda: Delta("m", "t", np.array([1]), np.array([1]), None, np.array([1], np.uint8)),
    "tombstone shape": lambda: mk([1], [1], tombstone=[0, 1]),
    "impact dtype": lambda: Delta("m", "t", np.array([1]), np.array([1]), None, None, np.array([1.0])),
    "impact shape": lambda: mk([1], [1], impact=[1, 2]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_check_rejects(case):
    d = BAD[case]()
    with pytest.raises(UsageError):
        d.check(SPEC)
    with pytest.raises(ProtocolError):
        d.check(SPEC, error=ProtocolError)
