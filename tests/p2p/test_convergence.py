"""Cluster behaviour on the in-memory network under simulated time (seeded, repeatable)."""

from __future__ import annotations

import numpy as np
import pytest

from cluster import SPEC, Trainer, converged, digests, make_cluster
from ekko.core.config import NodeConfig, preset
from ekko.core.spec import ModelSpec, TableSpec
from p2p.memnet import Faults

LOSSY = Faults(loss=0.10, duplicate=0.10, jitter=0.02)


def knowledge_converged(net, model="ranker") -> bool:
    seen = set()
    for nid, node in net.nodes.items():
        if nid in net.dead:
            continue
        m = node.models[model]
        seen.add(tuple(tuple(m.shard_digests(t.name).tolist()) for t in m.spec.tables))
    return len(seen) == 1


def publish_stream(net, trainer, rounds=20, rows=100, gap=0.05, on_round=None):
    for i in range(rounds):
        trainer.publish("emb", rows)
        if i % 5 == 0:
            trainer.publish("mlp", 64)
        if on_round:
            on_round(i)
        net.run(net.now + gap)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_converges_with_loss_duplication_and_reordering(seed):
    net = make_cluster(dcs=3, per_dc=5, seed=seed, faults=LOSSY)
    net.run(3.0)
    trainer = Trainer(net, "n0-0", seed=seed)
    publish_stream(net, trainer)
    assert net.run_until(lambda: converged(net, trainer), timeout=30), "values did not converge"
    assert net.run_until(lambda: knowledge_converged(net), timeout=30), "knowledge did not converge"
    assert len(digests(net)) == 1
    assert net.messages["PUSH"] > 0 and net.messages["PULL_RESPONSE"] > 0


def _rank0_gateway(net, dc: str) -> str:
    node = net.nodes["n0-0"]
    node.peers.refresh_topology()
    gw = node.topology.gateways("ranker", "emb", SPEC.table("emb").num_shards, dc)
    ids, counts = np.unique(gw[:, 0].astype(str), return_counts=True)
    return str(ids[counts.argmax()])


def test_converges_with_a_gateway_killed_mid_stream():
    net = make_cluster(dcs=3, per_dc=5, seed=7, faults=Faults(loss=0.05, jitter=0.01))
    net.run(3.0)
    trainer = Trainer(net, "n0-0", seed=7)
    victim = _rank0_gateway(net, "dc1")
    publish_stream(net, trainer, rounds=30, on_round=lambda i: net.kill(victim) if i == 10 else None)
    live = [n for n in net.nodes if n != victim]
    assert net.run_until(lambda: converged(net, trainer, live), timeout=40)
    assert len(digests(net, live)) == 1
    # The dead gateway is detected and its shards' roles move to the next-ranked member.
    net.run(net.now + NodeConfig().dead_after + 1)
    node = net.nodes["n1-0" if victim != "n1-0" else "n1-1"]
    assert node.members.get(victim).state.name == "DEAD"
    node.peers.refresh_topology()
    assert victim not in node.topology.gateways("ranker", "emb", SPEC.table("emb").num_shards, "dc1").ravel()


def test_converges_after_a_partition_heals():
    net = make_cluster(dcs=3, per_dc=5, seed=11)
    net.run(3.0)
    trainer = Trainer(net, "n0-0", seed=11)
    net.partition([{"dc0", "dc1"}, {"dc2"}])
    publish_stream(net, trainer, rounds=10)
    net.run(net.now + 2)
    dc2 = [n for n in net.nodes if n.startswith("n2-")]
    assert not converged(net, trainer, dc2), "the partitioned DC cannot have the updates yet"
    assert converged(net, trainer, [n for n in net.nodes if not n.startswith("n2-")])
    net.heal()
    assert net.run_until(lambda: converged(net, trainer), timeout=30)
    assert net.run_until(lambda: knowledge_converged(net), timeout=30)


def test_same_seed_same_run():
    def run(seed):
        net = make_cluster(dcs=2, per_dc=3, seed=seed, faults=LOSSY)
        net.run(2.0)
        trainer = Trainer(net, "n0-0", seed=seed)
        publish_stream(net, trainer, rounds=5)
        net.run(net.now + 5)
        return dict(net.messages), dict(net.bytes_between), sorted(digests(net))

    assert run(5) == run(5)
    assert run(5) != run(6)


def test_catalog_spreads_from_any_replica():
    net = make_cluster(dcs=2, per_dc=3, seed=2)
    extra = ModelSpec("other", [TableSpec("e", rows=10, dim=2)])
    net.run(1.0)
    net.call("n1-2", "register_model", extra, net.now)
    assert net.run_until(lambda: all("other" in n.models for n in net.nodes.values()), timeout=10)


def test_capped_pull_answers_still_converge():
    """Tiny pull answers force Scuttlebutt's partial-knowledge rule over many rounds."""
    cfg = NodeConfig(pull_response_bytes=2048, push=False)
    net = make_cluster(dcs=2, per_dc=3, seed=4, config=cfg)
    net.run(2.0)
    trainer = Trainer(net, "n0-0", seed=4)
    publish_stream(net, trainer, rounds=5, rows=300)
    assert net.run_until(lambda: converged(net, trainer), timeout=120)
    assert net.run_until(lambda: knowledge_converged(net), timeout=60)


def test_wan_bytes_per_published_byte(capsys):
    """30 replicas in 3 DCs: bytes crossing DC boundaries per published byte <= 1.25 x (DCs - 1)."""
    spec = ModelSpec("ranker", [TableSpec("emb", rows=100_000, dim=64, shards=64)])
    net = make_cluster(dcs=3, per_dc=10, seed=3, spec=spec)
    net.run(3.0)
    trainer = Trainer(net, "n0-0", spec=spec, seed=3)
    before = net.wan_bytes()
    rounds, rows = 20, 1000
    for _ in range(rounds):
        trainer.publish("emb", rows)
        net.run(net.now + 0.1)
    assert net.run_until(lambda: converged(net, trainer), timeout=30)
    assert net.run_until(lambda: knowledge_converged(net), timeout=30)
    published = rounds * rows * (64 * 4 + 16)          # values + id + version
    ratio = (net.wan_bytes() - before) / published
    with capsys.disabled():
        print(f"\n[wan] cross-DC bytes per published byte: {ratio:.3f} (bound {1.25 * 2:.2f}, min 2.00)")
    assert ratio <= 1.25 * 2


def test_idle_traffic_with_10k_shards(capsys):
    spec = ModelSpec("ranker", [TableSpec("emb", rows=10_000 * 16, dim=8, shards=10_000)])
    net = make_cluster(dcs=3, per_dc=10, seed=5, spec=spec, config=preset("wan"))
    net.run(10.0)
    trainer = Trainer(net, "n0-0", spec=spec, seed=5)
    trainer.publish("emb", 2000)
    assert net.run_until(lambda: knowledge_converged(net), timeout=60)
    net.run(net.now + 5)
    total0, wan0 = sum(net.bytes_between.values()), net.wan_bytes()
    span = 20.0
    net.run(net.now + span)
    per_replica = (sum(net.bytes_between.values()) - total0) / span / 30
    wan_per_replica = (net.wan_bytes() - wan0) / span / 30
    with capsys.disabled():
        print(f"\n[idle] 10k shards, 30 replicas: {per_replica:.0f} B/s per replica "
              f"(all gossip + anti-entropy), {wan_per_replica:.0f} B/s of it cross-DC")
    assert per_replica < 5000
