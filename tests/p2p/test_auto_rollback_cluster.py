"""Automatic rollback on the simulated network: quality reports -> corrupted -> one rollback everywhere."""

from __future__ import annotations

import random

from cluster import Trainer, digests, make_cluster
from ekko.core.config import NodeConfig
from ekko.core.version import HLC_EPOCH_MS, HLC_LOGICAL_BITS

CTR = 0.04
N_ONLINE, N_BASE = 200_000, 20_000
WARMUP = 20


def until(net) -> int:
    return (int(HLC_EPOCH_MS + net.now * 1000) - HLC_EPOCH_MS) << HLC_LOGICAL_BITS | 0xFF


def report(net, monitors, rngs, degrade):
    """One quality window at each monitor replica (binomial CTR noise)."""
    for nid, rng in zip(monitors, rngs):
        p = CTR * (1 - degrade)
        net.call(nid, "report_quality", "ranker", "baseline", "ctr",
                 rng.gauss(CTR, (CTR * (1 - CTR) / N_BASE) ** 0.5), N_BASE, net.now)
        net.call(nid, "report_quality", "ranker", "online", "ctr",
                 rng.gauss(p, (p * (1 - p) / N_ONLINE) ** 0.5), N_ONLINE, net.now, until_counter=until(net))


def scenario(seed, same_streams):
    net = make_cluster(dcs=2, per_dc=3, seed=seed, config=NodeConfig(quality_warmup_windows=WARMUP))
    net.run(2.0)
    trainer = Trainer(net, "n0-0", seed=seed)
    for _ in range(3):
        trainer.publish("emb", 300)
        trainer.publish("mlp", 64)
        net.run(net.now + 0.1)
    net.run(net.now + 3)
    good = digests(net)
    assert len(good) == 1
    net.call("n0-0", "take_cut", "ranker", "validated", net.now)
    monitors = ["n0-1", "n1-0"]
    rngs = [random.Random(seed) for _ in monitors] if same_streams else [random.Random(seed + i) for i in range(2)]
    for _ in range(WARMUP + 10):                      # clean windows: warm-up, then healthy
        report(net, monitors, rngs, 0.0)
        net.run(net.now + 0.2)
    assert all(net.nodes[m].quality.state("ranker").value == "healthy" for m in monitors)
    for _ in range(3):                                 # the harmful burst
        trainer.publish("emb", 300)
        trainer.publish("mlp", 64)
        net.run(net.now + 0.1)
    onset = net.now
    assert digests(net) != good
    windows = 0
    while windows < 200 and not any(net.nodes[m].rollbacks for m in monitors):
        report(net, monitors, rngs, 0.05)              # online CTR 5 % below baseline
        net.run(net.now + 0.2)
        windows += 1
    assert windows < 200, "5% degradation detected"
    assert net.run_until(lambda: digests(net) == good, timeout=30), "every replica back at the cut"
    return net, trainer, windows, onset


def test_quality_degradation_rolls_every_replica_back_to_the_healthy_cut():
    net, trainer, windows, _ = scenario(seed=31, same_streams=False)
    print(f"\nauto rollback after {windows} degraded windows")
    for nid, node in net.nodes.items():
        (rid,) = node.rollbacks                        # one rollback for the incident, everywhere
        assert rid == "auto.ranker.1"
        (inc,) = node.quality.incidents("ranker")
        assert inc.cut == "validated" and inc.metric == "ctr" and inc.restored_at is not None, nid
        q = node.status()["models"]["ranker"]["quality"]
        assert q["epoch"] == 1 and q["incidents"][0]["cut"] == "validated"
    # After the rollback the model is healthy again and new updates apply normally.
    assert all(n.quality.state("ranker").value != "corrupted" for n in net.nodes.values())
    trainer.truth = {t: {} for t in trainer.truth}
    trainer.publish("emb", 100)
    net.run(net.now + 5)
    from cluster import converged
    assert converged(net, trainer)


def test_replicas_detecting_at_once_start_one_identical_rollback():
    # Identical quality streams at two monitors: both turn corrupted in the same window,
    # before either hears of the other, and build records of the same incident.
    net, _, _, _ = scenario(seed=32, same_streams=True)
    records = {repr(sorted(n.rollbacks["auto.ranker.1"].items())) for n in net.nodes.values()}
    assert len(records) == 1
    assert all(len(n.rollbacks) == 1 for n in net.nodes.values())
    detectors = {n.quality.incidents("ranker")[0].detected_by for n in net.nodes.values()}
    assert len(detectors) == 1                         # the merged record names one detector everywhere


def test_pinned_baseline_holds_its_cut_and_follows_a_re_pin():
    net = make_cluster(dcs=2, per_dc=3, seed=33)
    base = net.nodes["n1-2"]
    base.set_baseline_pin("c1")
    net.run(2.0)
    trainer = Trainer(net, "n0-0", seed=33)
    for _ in range(3):
        trainer.publish("emb", 300)
        net.run(net.now + 0.1)
    net.call("n0-0", "take_cut", "ranker", "c1", net.now)
    net.run(net.now + 5)
    others = [n for n in net.nodes if n != "n1-2"]
    at_c1 = digests(net, others)
    assert len(at_c1) == 1 and digests(net, ["n1-2"]) == at_c1     # reached its pinned cut
    for _ in range(3):
        trainer.publish("emb", 300)
        net.run(net.now + 0.1)
    net.run(net.now + 5)
    assert digests(net, ["n1-2"]) == at_c1, "the baseline stays at c1"
    assert digests(net, others) != at_c1 and len(digests(net, others)) == 1
    # Peers pushed it nothing, it asks only up to its cut (its pull requests carry the cut
    # as a ceiling) and stops asking once there: the baseline had nothing to refuse.
    assert base.counters["baseline_ae_skipped"] > 0
    assert base.counters["baseline_held_rows"] == 0
    net.call("n0-0", "take_cut", "ranker", "c2", net.now)
    net.run(net.now + 1)
    base.set_baseline_pin("c2")                                     # re-pin: it catches up
    assert net.run_until(lambda: digests(net) == digests(net, others), timeout=30)
    for _ in range(2):
        trainer.publish("emb", 300)
        net.run(net.now + 0.1)
    net.run(net.now + 5)
    assert digests(net, ["n1-2"]) != digests(net, others)
    base.set_baseline_pin("")                                       # unpinned: an ordinary replica again
    assert net.run_until(lambda: len(digests(net)) == 1, timeout=30)
