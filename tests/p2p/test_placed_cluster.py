"""A placed model (issue #18) on simulated 3x3 clusters of real nodes: each replica keeps
only the shards the placement gives it, rows published to their holders reach the holders
of every DC, and shards follow the member list -- a dead holder's shards are taken and
filled by the next-ranked member, a joiner's are handed over and dropped by the old
holders only once the joiner covers them."""

from __future__ import annotations

import random

import numpy as np
import pytest

from cluster import Trainer, make_cluster
from ekko.core.errors import ProtocolError, UsageError
from ekko.core.spec import ModelSpec, TableSpec
from ekko.replica.node import ReplicaNode

SHARDS = 48
SPEC = ModelSpec("ranker", [TableSpec("emb", rows=SHARDS * 32, dim=8, shards=SHARDS),
                            TableSpec("mlp", rows=64, dim=16, dense=True)], replicas_per_shard=1)
EMB = SPEC.table("emb")


class PlacedTrainer:
    """Publishes each shard's rows to its holder in the ingest DC (what the SDK is to do):
    one publisher chain per holder, as separate publishers would."""

    def __init__(self, net, dc: str = "dc0", seed: int = 0) -> None:
        self.net, self.dc = net, dc
        self.rng = np.random.default_rng(seed)
        self.truth: dict[int, np.ndarray] = {}
        self.trainers: dict[str, Trainer] = {}

    def holders(self) -> np.ndarray:
        """Each shard's holder in the ingest DC, as a live node of that DC sees it."""
        node = next(n for nid, n in self.net.nodes.items() if n.dc == self.dc and nid not in self.net.dead)
        node.peers.refresh_topology()
        return node.placement.holders(SPEC, "emb", self.dc)[:, 0]

    def publish(self, n: int) -> None:
        ids = self.rng.choice(EMB.rows, n, replace=False).astype(np.int64)
        owner = self.holders()[EMB.shards_of(ids)]
        for node in np.unique(owner).tolist():
            tr = self.trainers.get(node)
            if tr is None:
                tr = self.trainers[node] = Trainer(self.net, node, origin=len(self.trainers) + 1, spec=SPEC,
                                                    seed=len(self.trainers))
            tr.publish("emb", 0, ids=ids[owner == node])
            self.truth.update(tr.truth["emb"])


def holders_of(net, dc: str) -> dict[int, list[str]]:
    """Per shard, the live nodes of ``dc`` that keep it."""
    out: dict[int, list[str]] = {s: [] for s in range(SHARDS)}
    for nid, node in net.nodes.items():
        if node.dc != dc or nid in net.dead or "ranker" not in node.models:
            continue
        for s in np.flatnonzero(node.models["ranker"].held("emb")).tolist():
            out[s].append(nid)
    return out


def exact_everywhere(net, tr: PlacedTrainer, dcs=("dc0", "dc1", "dc2")) -> bool:
    """Every published row reads back exactly from the holder of its shard in every DC,
    and every shard has exactly one holder per DC."""
    keys = np.array(sorted(tr.truth), dtype=np.int64)
    want = np.stack([tr.truth[k] for k in keys.tolist()])
    shards = EMB.shards_of(keys)
    for dc in dcs:
        h = holders_of(net, dc)
        if any(len(v) != 1 for v in h.values()):
            return False
        for s in np.unique(shards).tolist():
            sel = shards == s
            got = net.nodes[h[s][0]].read_rows("ranker", "emb", keys[sel]).numpy()
            if not np.array_equal(got, want[sel]):
                return False
    return True


def settled(seed: int):
    net = make_cluster(dcs=3, per_dc=3, seed=seed, spec=SPEC)
    # Registered at n0-0 before it knew anyone: it kept every shard, then handed them over.
    assert net.run_until(lambda: all(len(v) == 1 for dc in ("dc0", "dc1", "dc2")
                                     for v in holders_of(net, dc).values()), timeout=30)
    return net


@pytest.mark.parametrize("seed", [1, 2])
def test_each_replica_keeps_its_shards_only_and_rows_reach_their_holders_everywhere(seed):
    net = settled(seed)
    tr = PlacedTrainer(net, seed=seed)
    for _ in range(8):
        tr.publish(200)
        net.run(net.now + 0.05)
    assert net.run_until(lambda: exact_everywhere(net, tr), timeout=30)
    full = EMB.rows * EMB.row_bytes
    for nid, node in net.nodes.items():
        ts = node.models["ranker"].store.table("emb")
        held = ts.held()
        assert ts.values.numel() * 4 <= 0.45 * full, (nid, held.sum())
        # no versions outside the kept shards; the dense table is everywhere
        assert not ts.versions[~np.repeat(held, EMB.shard_rows)[:EMB.rows]].any()
        assert node.models["ranker"].held("mlp") is None
    # r = 1: nothing crosses the LAN in the ingest DC but what the placement asks
    assert sum(n.counters["unheld_rows_dropped"] for n in net.nodes.values()) == 0


def test_a_dead_holders_shards_are_taken_and_filled_by_the_next_ranked_member():
    net = settled(3)
    tr = PlacedTrainer(net, seed=3)
    for _ in range(5):
        tr.publish(300)
    assert net.run_until(lambda: exact_everywhere(net, tr), timeout=30)
    lost = [s for s, h in holders_of(net, "dc1").items() if h == ["n1-1"]]
    assert lost
    net.kill("n1-1")
    assert net.run_until(lambda: exact_everywhere(net, tr), timeout=60)
    now_held = holders_of(net, "dc1")
    assert all(now_held[s] and now_held[s][0] != "n1-1" for s in lost)
    assert sum(net.nodes[n].counters["shards_taken"] for n in ("n1-0", "n1-2")) >= len(lost)
    tr.publish(300)      # and publishing goes on with the new placement
    assert net.run_until(lambda: exact_everywhere(net, tr), timeout=30)


def covered(net, tr: PlacedTrainer, dc: str) -> list[int]:
    """Shards of which no live replica of ``dc`` holds every published row exactly."""
    keys = np.array(sorted(tr.truth), dtype=np.int64)
    want = np.stack([tr.truth[k] for k in keys.tolist()])
    shards = EMB.shards_of(keys)
    bad = []
    for s, h in holders_of(net, dc).items():
        sel = shards == s
        if sel.any() and not any(np.array_equal(net.nodes[n].read_rows("ranker", "emb", keys[sel]).numpy(), want[sel])
                                 for n in h):
            bad.append(s)
    return bad


def test_a_joiners_shards_are_handed_over_and_dropped_only_once_it_covers_them():
    net = settled(4)
    tr = PlacedTrainer(net, seed=4)
    for _ in range(5):
        tr.publish(300)
    assert net.run_until(lambda: exact_everywhere(net, tr), timeout=30)
    joiner = ReplicaNode("n2-9", "dc2", "n2-9", config=net.nodes["n2-0"].config, rng=random.Random(9),
                         seeds=["n0-0"], device="cpu", now=net.now)
    net.add(joiner)
    uncovered: list[tuple[float, list[int]]] = []

    def settled_again() -> bool:
        # Rule P1 at every step: every shard's rows stay whole at some replica of dc2.
        bad = covered(net, tr, "dc2")
        if bad:
            uncovered.append((net.now, bad))
        return ("ranker" in joiner.models and joiner.models["ranker"].held("emb").any()
                and exact_everywhere(net, tr))

    assert net.run_until(settled_again, timeout=60, step=0.02)
    assert not uncovered, uncovered[:3]
    taken = joiner.models["ranker"].held("emb")
    assert not taken.all()
    assert sum(n.counters["shards_dropped"] for n in net.nodes.values() if n.dc == "dc2") >= int(taken.sum())
    tr.publish(300)      # the joiner's shards now take their rows from the ingest DC
    assert net.run_until(lambda: exact_everywhere(net, tr), timeout=30)


def test_rows_for_a_shard_not_held_are_refused_at_the_ingest_and_change_nothing():
    net = settled(5)
    node = net.nodes["n0-1"]
    held = node.models["ranker"].held("emb")
    other = int(np.flatnonzero(~held)[0])
    tr = Trainer(net, "n0-1", origin=7, spec=SPEC)
    before = node.models["ranker"].store.table("emb").versions.copy()
    with pytest.raises(ProtocolError, match="not held by this replica") as e:
        tr.publish("emb", 0, ids=np.array([other * EMB.shard_rows], np.int64))
    assert e.value.reason == "not_holder"
    assert (node.models["ranker"].store.table("emb").versions == before).all()


def test_cuts_and_rollbacks_of_a_placed_model_are_refused_for_now():
    net = settled(6)
    with pytest.raises(UsageError, match="placed"):
        net.call("n0-0", "take_cut", "ranker", "c1", net.now)
