"""Tests for ekko.core.spec: validation, the shard function, (de)serialization."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ekko.core.errors import ProtocolError, UsageError
from ekko.core.spec import (DEFAULT_SHARD_ROWS, MAX_ROW_DIM, MAX_SHARDS_PER_TABLE, MAX_TABLE_ROWS, MAX_TABLES_PER_MODEL,
                       ModelSpec, TableSpec, check_name)


# -- names -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["a", "emb_user", "A-1.b", "x" * 64, "0"])
def test_valid_names(name):
    assert check_name("table", name) == name


@pytest.mark.parametrize("name", ["", "_a", ".a", "-a", "a b", "a/b", "x" * 65, "é", None, 3, b"ab", pytest.param(
    "a\n")])
def test_invalid_names(name):
    with pytest.raises(UsageError):
        check_name("table", name)
    with pytest.raises(ProtocolError):
        check_name("table", name, error=ProtocolError)


# -- TableSpec ---------------------------------------------------------------------------------
def test_table_defaults():
    t = TableSpec("t", rows=10, dim=4)
    assert t.dtype == "float32" and not t.dense
    assert t.num_shards == 1 and t.shard_rows == 10
    assert t.row_bytes == 16
    big = TableSpec("t", rows=3 * DEFAULT_SHARD_ROWS + 1, dim=1)
    assert big.num_shards == 4


@pytest.mark.parametrize("dtype,nbytes", [("float32", 4), ("float16", 2), ("bfloat16", 2), ("float64", 8)])
def test_row_bytes(dtype, nbytes):
    assert TableSpec("t", rows=2, dim=3, dtype=dtype).row_bytes == 3 * nbytes


@pytest.mark.parametrize("kwargs", [
    dict(rows=0, dim=1), dict(rows=-1, dim=1), dict(rows=MAX_TABLE_ROWS + 1, dim=1), dict(rows=1.5, dim=1),
    dict(rows=1, dim=0), dict(rows=1, dim=MAX_ROW_DIM + 1), dict(rows=1, dim="4"),
    dict(rows=4, dim=1, dtype="int8"), dict(rows=4, dim=1, dtype="float"),
    dict(rows=4, dim=1, shards=0), dict(rows=4, dim=1, shards=5), dict(rows=4, dim=1, shards=2.0),
    dict(rows=MAX_SHARDS_PER_TABLE + 10, dim=1, shards=MAX_SHARDS_PER_TABLE + 1),
])
def test_table_rejects(kwargs):
    with pytest.raises(UsageError):
        TableSpec("t", **kwargs)


def test_table_frozen():
    t = TableSpec("t", rows=4, dim=1)
    with pytest.raises(AttributeError):
        t.rows = 5  # type: ignore[misc]


@settings(max_examples=300, deadline=None)
@given(rows=st.integers(1, 5000), data=st.data())
def test_shard_function_consistent(rows, data):
    shards = data.draw(st.integers(1, min(rows, 64)))
    t = TableSpec("t", rows=rows, dim=1, shards=shards)
    all_rows = np.arange(rows, dtype=np.int64)
    s = t.shards_of(all_rows)
    assert s.dtype == np.int64
    # every row lands in a declared shard, and the scalar and vector functions agree
    assert s.min() == 0 and s.max() < t.num_shards
    assert all(t.shard_of(int(r)) == int(s[r]) for r in data.draw(st.lists(st.integers(0, rows - 1), max_size=20)))
    # the shard function is monotone (contiguous ranges) and each row lies in its shard's range
    assert (np.diff(s) >= 0).all()
    for shard in np.unique(s).tolist():
        lo, hi = t.shard_range(shard)
        members = np.flatnonzero(s == shard)
        assert members[0] == lo and members[-1] == hi - 1
    # the non-empty ranges partition [0, rows)
    covered = np.zeros(rows, dtype=int)
    for shard in range(t.num_shards):
        lo, hi = t.shard_range(shard)
        covered[lo:max(lo, hi)] += 1
    assert (covered == 1).all()


def test_shard_ranges_never_inverted():
    t = TableSpec("t", rows=10, dim=1, shards=7)
    for shard in range(t.num_shards):
        lo, hi = t.shard_range(shard)
        assert lo <= hi


def test_shard_range_last_shorter():
    t = TableSpec("t", rows=10, dim=1, shards=3)
    assert [t.shard_range(s) for s in range(3)] == [(0, 4), (4, 8), (8, 10)]
    assert t.shards_of(np.array([0, 3, 4, 9])).tolist() == [0, 0, 1, 2]


@given(rows=st.integers(1, 10_000), dim=st.integers(1, 512), dtype=st.sampled_from(
    ["float32", "float16", "bfloat16", "float64"]), dense=st.booleans(), data=st.data())
def test_table_dict_roundtrip(rows, dim, dtype, dense, data):
    shards = data.draw(st.none() | st.integers(1, min(rows, 100)))
    t = TableSpec("tab", rows=rows, dim=dim, dtype=dtype, shards=shards, dense=dense)
    assert TableSpec.from_dict(t.to_dict()) == t


@pytest.mark.parametrize("d", [
    None, 5, "x", [], {}, {"name": "t"}, {"name": "t", "rows": 4}, {"rows": 4, "dim": 2},
    {"name": "t", "rows": "4", "dim": 2}, {"name": "t", "rows": 4, "dim": 2, "dtype": "int32"},
    {"name": "t", "rows": 4, "dim": 2, "shards": 99}, {"name": "bad name", "rows": 4, "dim": 2},
    {"name": 7, "rows": 4, "dim": 2}, {"name": "t", "rows": -4, "dim": 2},
    {"name": "t", "rows": 4, "dim": 2, "dtype": ["float32"]},
])
def test_table_from_dict_rejects_with_protocol_error(d):
    with pytest.raises(ProtocolError) as ei:
        TableSpec.from_dict(d)
    assert ei.value.reason == "bad_spec"


# -- ModelSpec ---------------------------------------------------------------------------------
def _model(**kw):
    return ModelSpec("m", tables=[TableSpec("a", rows=10, dim=2), TableSpec("b", rows=5, dim=3, dtype="float16")], **kw)


def test_model_basics():
    m = _model(traffic_share=0.25)
    assert isinstance(m.tables, tuple)
    assert m.table("b").dtype == "float16"
    assert m.has_table("a") and not m.has_table("c")
    with pytest.raises(UsageError):
        m.table("c")


@pytest.mark.parametrize("kwargs", [
    dict(tables=[]), dict(tables=[TableSpec("a", rows=1, dim=1)] * 2),
    dict(tables=[TableSpec("a", rows=1, dim=1)], traffic_share=0),
    dict(tables=[TableSpec("a", rows=1, dim=1)], traffic_share=1.5),
    dict(tables=[TableSpec("a", rows=1, dim=1)], traffic_share="1"),
    dict(tables=[TableSpec(f"t{i}", rows=1, dim=1) for i in range(MAX_TABLES_PER_MODEL + 1)]),
])
def test_model_rejects(kwargs):
    with pytest.raises(UsageError):
        ModelSpec("m", **kwargs)


def test_model_rejects_bad_name():
    with pytest.raises(UsageError):
        ModelSpec("no/slash", tables=[TableSpec("a", rows=1, dim=1)])


def test_model_dict_roundtrip():
    m = _model(traffic_share=0.5)
    assert ModelSpec.from_dict(m.to_dict()) == m
    # the dict survives msgpack (what the wire does to it)
    import msgpack
    assert ModelSpec.from_dict(msgpack.unpackb(msgpack.packb(m.to_dict()))) == m


@pytest.mark.parametrize("d", [
    None, 3, "m", [], {}, {"name": "m"}, {"name": "m", "tables": "x"}, {"name": "m", "tables": []},
    {"name": "m", "tables": [{"name": "a"}]}, {"name": "m", "tables": [None]},
    {"name": "m", "tables": [{"name": "a", "rows": 1, "dim": 1}], "traffic_share": "lots"},
    {"name": "m", "tables": [{"name": "a", "rows": 1, "dim": 1}], "traffic_share": None},
    {"name": "m", "tables": [{"name": "a", "rows": 1, "dim": 1}], "traffic_share": 2.0},
    {"name": "m", "tables": [{"name": "a", "rows": 1, "dim": 1}], "traffic_share": [1]},
    {"name": "m", "tables": [{"name": "a", "rows": 1, "dim": 1}] * 2},
    {"name": "", "tables": [{"name": "a", "rows": 1, "dim": 1}]},
])
def test_model_from_dict_rejects_with_protocol_error(d):
    with pytest.raises(ProtocolError) as ei:
        ModelSpec.from_dict(d)
    assert ei.value.reason == "bad_spec"
