"""A rollback restores deletes: a row that was a tombstone at the cut is a tombstone again."""

from __future__ import annotations

import numpy as np

from ekko.core.delta import Delta
from ekko.replica.node import ReplicaNode
from ekko.core.spec import ModelSpec, TableSpec
from ekko.core.version import Knowledge, pack

SPEC = ModelSpec("m", [TableSpec("t", rows=16, dim=4, shards=2)])


def delta(ids, counter, value=1.0, tomb=None):
    ids = np.asarray(ids, np.int64)
    return Delta("m", "t", ids, np.full(len(ids), pack(counter, 1), np.int64),
                 np.full((len(ids), 4), value, np.float32), tomb)


def test_rollback_restores_tombstones_and_values():
    n = ReplicaNode("r1", "dc1", "127.0.0.1:1", device="cpu")
    n.register_model(SPEC, now=0.0)
    n.apply_local(delta([1, 2, 3], 10, 1.0), now=0.0)
    n.apply_local(delta([2], 20, 0.0, tomb=np.array([True])), now=0.0)      # row 2 deleted
    ts = n.table_store("m", "t")
    # apply_local does not chain knowledge: give the cut the knowledge it stands for.
    cut = n.cuts.take("m", "good", 1.0, {("t", 0): Knowledge({1: 20}), ("t", 1): Knowledge({1: 20})}, n._seq)
    before = (ts.versions.copy(), ts.tombstone.copy(), n.read_rows("m", "t", np.arange(16)).clone())
    assert ts.tombstone[2]
    n.apply_local(delta([1, 2, 9], 30, 7.0), now=2.0)                       # harmful: row 2 revived
    assert not ts.tombstone[2]
    n.rollback("m", cut, until_counter=40, now=3.0)
    assert np.array_equal(ts.versions, before[0])
    assert np.array_equal(ts.tombstone, before[1]), "the delete is restored"
    assert np.array_equal(n.read_rows("m", "t", np.arange(16)), before[2])
