"""Rollback across a simulated cluster: exact restore everywhere, fences, late replicas."""

from __future__ import annotations

from cluster import Trainer, converged, digests, make_cluster
from ekko.core.version import HLC_EPOCH_MS, HLC_LOGICAL_BITS
from p2p.memnet import Faults


def until(net) -> int:
    # The rollback point: the HLC counter of "now" on the trainer's clock (what the CLI uses).
    return (int(HLC_EPOCH_MS + net.now * 1000) - HLC_EPOCH_MS) << HLC_LOGICAL_BITS | 0xFF


def setup(seed, faults=None):
    net = make_cluster(dcs=2, per_dc=3, seed=seed, faults=faults or Faults())
    net.run(2.0)
    trainer = Trainer(net, "n0-0", seed=seed)
    for _ in range(5):                                   # good updates
        trainer.publish("emb", 300)
        trainer.publish("mlp", 64)
        net.run(net.now + 0.1)
    assert net.run_until(lambda: converged(net, trainer), timeout=20)
    good = digests(net)
    assert len(good) == 1
    cut = net.call("n0-0", "take_cut", "ranker", "validated", net.now)
    return net, trainer, cut, good


def harmful(net, trainer, rounds=5):
    frames = []
    orig_call = net.call

    def capture(node_id, fn, *args, **kw):
        if fn == "publish":
            frames.append(args[0])
        return orig_call(node_id, fn, *args, **kw)

    net.call = capture
    try:
        for _ in range(rounds):
            trainer.publish("emb", 300)
            trainer.publish("mlp", 64)
            net.run(net.now + 0.1)
    finally:
        net.call = orig_call
    return frames


def test_rollback_restores_every_replica_exactly_and_fences_replays():
    net, trainer, cut, good = setup(seed=21)
    frames = harmful(net, trainer)
    net.run(net.now + 3)
    assert digests(net) != good
    net.call("n1-2", "rollback", "ranker", cut, until(net), net.now)   # any replica may start it
    assert net.run_until(lambda: digests(net) == good, timeout=30), "every replica back at the cut"
    # Harmful frames replayed afterwards change nothing, wherever they arrive.
    for body in frames:
        net.call("n1-0", "publish", body, net.now)
    net.run(net.now + 3)
    assert digests(net) == good
    assert net.nodes["n1-0"].counters["fenced_rows"] > 0
    # Updates published after the rollback apply normally everywhere.
    trainer.truth = {t: {} for t in trainer.truth}
    trainer.publish("emb", 200)
    assert net.run_until(lambda: converged(net, trainer), timeout=20)


def test_a_replica_partitioned_during_the_rollback_converges_after_the_heal():
    net, trainer, cut, good = setup(seed=22)
    harmful(net, trainer)
    net.run(net.now + 3)
    net.partition([{"n1-1"}, {n for n in net.nodes if n != "n1-1"}])
    net.call("n0-1", "rollback", "ranker", cut, until(net), net.now)
    others = [n for n in net.nodes if n != "n1-1"]
    assert net.run_until(lambda: digests(net, others) == good, timeout=30)
    assert digests(net, ["n1-1"]) != good
    net.heal()
    assert net.run_until(lambda: digests(net) == good, timeout=30)


def test_replicas_without_undo_history_repair_from_peers():
    net, trainer, cut, good = setup(seed=23)
    harmful(net, trainer)
    net.run(net.now + 3)
    for nid in ("n1-0", "n1-1"):
        net.nodes[nid].undo = None          # as if their history had been discarded
    net.call("n0-0", "rollback", "ranker", cut, until(net), net.now)
    assert net.run_until(lambda: digests(net) == good, timeout=40)


def test_rollback_under_message_loss():
    net, trainer, cut, good = setup(seed=24, faults=Faults(loss=0.1, duplicate=0.05, jitter=0.01))
    harmful(net, trainer)
    net.run(net.now + 5)
    net.call("n0-0", "rollback", "ranker", cut, until(net), net.now)
    assert net.run_until(lambda: digests(net) == good, timeout=60)
