"""Placement of shards across a DC's members (issue #18): who holds what, and what moves."""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ekko.core.errors import ProtocolError, UsageError
from ekko.core.spec import MAX_REPLICAS_PER_SHARD, ModelSpec, TableSpec
from p2p.placement import Placement
from p2p.topology import Topology

SHARDS = 256


def spec(r: int, shards: int = SHARDS) -> ModelSpec:
    return ModelSpec("m", [TableSpec("emb", rows=shards * 64, dim=4, shards=shards),
                           TableSpec("mlp", rows=4, dim=4, dense=True)], replicas_per_shard=r)


def placement(members: dict[str, str], me: str | None = None, version: int = 1) -> Placement:
    topo = Topology(gateways_per_dc=2)
    topo.update(members, version)
    me = me or next(iter(members))
    return Placement(topo, me, members[me])


def holder_sets(p: Placement, s: ModelSpec, dc: str) -> list[frozenset[str]]:
    return [frozenset(row) for row in p.holders(s, "emb", dc).tolist()]


def cluster(dcs: int, per_dc: int) -> dict[str, str]:
    return {f"dc{d}-r{i}": f"dc{d}" for d in range(1, dcs + 1) for i in range(1, per_dc + 1)}


@pytest.mark.parametrize("r", [1, 2, 3, 5])
def test_every_shard_has_r_distinct_holders_in_every_dc(r):
    members = cluster(3, 4)
    p = placement(members)
    for dc in ("dc1", "dc2", "dc3"):
        h = p.holders(spec(r), "emb", dc)
        assert h.shape == (SHARDS, min(r, 4))
        for row in h.tolist():
            assert len(set(row)) == len(row)
            assert all(members[n] == dc for n in row)


def test_members_hold_each_shard_exactly_r_times_and_the_spread_is_near_even():
    members = cluster(1, 3)
    s = spec(1, shards=1024)
    p = placement(members)
    held = np.array([p.held(s, "emb", node=n, dc="dc1") for n in members])
    assert (held.sum(axis=0) == 1).all()
    shares = held.sum(axis=1) / 1024
    # binomial(1024, 1/3): sd 1.5 points; the hash is fixed, so this is deterministic
    assert shares.max() <= 0.37, shares


def test_dense_tables_and_unplaced_models_are_held_everywhere():
    members = cluster(2, 3)
    p = placement(members, "dc2-r3")
    assert p.held(spec(1), "mlp").all()
    assert p.held(spec(0), "emb").all()
    assert p.holders(spec(0), "emb", "dc2").shape == (SHARDS, 3)
    assert not spec(0).placed and not spec(1).placed_table("mlp") and spec(1).placed_table("emb")


def test_every_node_computes_the_same_holders_whatever_order_it_learned_members_in():
    members = cluster(3, 5)
    items = list(members.items())
    random.Random(4).shuffle(items)
    a = placement(members, "dc1-r1")
    b = placement(dict(items), "dc3-r5")
    for dc in ("dc1", "dc2", "dc3"):
        assert (a.holders(spec(2), "emb", dc) == b.holders(spec(2), "emb", dc)).all()


def test_the_rank0_gateway_of_a_shard_is_one_of_its_holders():
    members = cluster(3, 4)
    p = placement(members)
    for dc in ("dc1", "dc2", "dc3"):
        gw = p.topology.gateways("m", "emb", SHARDS, dc)[:, 0]
        h = p.holders(spec(1), "emb", dc)[:, 0]
        assert (gw == h).all()


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 9), r=st.integers(1, 4), joiner=st.integers(0, 1 << 30))
def test_a_member_joining_moves_only_the_shards_it_now_holds(n, r, joiner):
    before = cluster(1, n)
    after = dict(before, **{f"new-{joiner}": "dc1"})
    old = holder_sets(placement(before), spec(r), "dc1")
    new = holder_sets(placement(after), spec(r), "dc1")
    for o, w in zip(old, new):
        if o != w:
            assert f"new-{joiner}" in w            # it moved only to the newcomer...
            assert len(o - w) == (1 if len(o) == r else 0)   # ...displacing at most one holder
            assert w - {f"new-{joiner}"} <= o


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 9), r=st.integers(1, 4), gone=st.integers(0, 8))
def test_a_member_leaving_moves_only_the_shards_it_held(n, r, gone):
    before = cluster(1, n)
    leaver = f"dc1-r{gone % n + 1}"
    after = {k: v for k, v in before.items() if k != leaver}
    old = holder_sets(placement(before), spec(r), "dc1")
    new = holder_sets(placement(after), spec(r), "dc1")
    for o, w in zip(old, new):
        if leaver not in o:
            assert o == w
        else:
            assert o - {leaver} <= w and leaver not in w


def test_holders_follow_the_member_list_version():
    topo = Topology(gateways_per_dc=1)
    topo.update(cluster(1, 2), version=1)
    p = Placement(topo, "dc1-r1", "dc1")
    assert set(p.holders(spec(1), "emb", "dc1").ravel()) == {"dc1-r1", "dc1-r2"}
    topo.update({"dc1-r1": "dc1"}, version=2)        # dc1-r2 died
    assert p.held(spec(1), "emb").all()


def test_owners_name_each_shards_first_holder_or_this_node_for_the_shards_it_keeps():
    members = cluster(2, 3)
    s = spec(1)
    p = placement(members, "dc1-r2")
    first = p.holders(s, "emb", "dc1")[:, 0]
    assert (p.owners(s, "emb") == first).all()
    kept = np.zeros(SHARDS, bool)
    kept[:10] = True                     # e.g. shards not handed over yet
    got = p.owners(s, "emb", kept=kept)
    assert (got[:10] == "dc1-r2").all() and (got[10:] == first[10:]).all()
    far = p.owners(s, "emb", "dc2", kept=kept)     # another DC's: no one keeps for it here
    assert all(members[n] == "dc2" for n in far) and (far == p.holders(s, "emb", "dc2")[:, 0]).all()


def test_an_override_replaces_rendezvous_and_a_bad_one_is_refused():
    topo = Topology(gateways_per_dc=1)
    topo.update(cluster(1, 3), version=1)
    pin = Placement(topo, "dc1-r1", "dc1",
                    override=lambda spec, table, dc, ranked: np.full((ranked.shape[0], 1), "dc1-r3", dtype=object))
    assert pin.held(spec(1), "emb", node="dc1-r3").all() and not pin.held(spec(1), "emb").any()
    bad = Placement(topo, "dc1-r1", "dc1", override=lambda *a: np.zeros((3, 1), dtype=object))
    with pytest.raises(UsageError, match="one row per shard"):
        bad.holders(spec(1), "emb", "dc1")


@pytest.mark.parametrize("r", [-1, MAX_REPLICAS_PER_SHARD + 1, 1.5, True, "2"])
def test_a_bad_replication_factor_is_refused(r):
    with pytest.raises(UsageError, match="replicas_per_shard"):
        ModelSpec("m", [TableSpec("emb", rows=8, dim=2)], replicas_per_shard=r)
    with pytest.raises(ProtocolError):
        ModelSpec.from_dict({"name": "m", "tables": [{"name": "emb", "rows": 8, "dim": 2}], "replicas_per_shard": r})


def test_the_replication_factor_travels_and_is_part_of_the_models_identity():
    s = spec(2)
    assert ModelSpec.from_dict(s.to_dict()) == s
    assert "replicas_per_shard" not in spec(0).to_dict()          # replicated models encode as before
    assert not s.same_tables(spec(1)) and s.same_tables(spec(2))
