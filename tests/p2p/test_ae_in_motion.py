"""Anti-entropy leaves shards in motion alone (issue #15), and still repairs lost pushes.

Under steady publishing every shard differs between two replicas only by the pushes in
flight; pulling those rows as well sent them twice.  A shard is left alone while pushes
reach it within ``push_grace``, it waits on no chain, and it was asked for within
``AE_DEFER_ROUNDS`` rounds.  The faults below are the ones each of those conditions is
there for.
"""

import numpy as np

from cluster import Trainer, converged, make_cluster
from ekko.core.codec import MsgType
from ekko.core.config import AE_DEFER_ROUNDS, NodeConfig
from ekko.core.spec import ModelSpec, TableSpec
from p2p.memnet import Faults

ONE_SHARD = ModelSpec("ranker", [TableSpec("emb", rows=4096, dim=8, shards=1)])


def lose_next_frame(net, trainer, node_id, ids=None):
    """Publish 64 rows through ``trainer`` while ``node_id`` drops every PUSH frame, for
    0.1 s (pushes in flight arrive within it); the drop is checked to have happened."""
    node = net.nodes[node_id]
    real = node.receive
    dropped = []

    def receive(frame, now, src=""):
        if frame.msg_type == MsgType.PUSH:
            dropped.append(now)
            return
        real(frame, now, src)

    node.receive = receive
    trainer.publish("emb", 64, ids=ids)
    net.run(net.now + 0.1)
    node.receive = real
    assert dropped, "no push was lost"


def steady(net, trainers, seconds, every=0.05, rows=64, ranges=None):
    """Publish ``rows`` per trainer every ``every`` seconds; trainer i writes only ids in
    ``ranges[i]`` when given (each trainer's truth then stays its own)."""
    end = net.now + seconds
    while net.now < end:
        for i, t in enumerate(trainers):
            ids = None
            if ranges is not None:
                lo, hi = ranges[i]
                ids = t.rng.choice(np.arange(lo, hi, dtype=np.int64), size=rows, replace=False)
            t.publish("emb", rows, ids=ids)
        net.run(net.now + every)


def pulled(net):
    return sum(n.counters["applied_rows_pull"] for n in net.nodes.values())


def test_steady_publishing_pulls_far_fewer_rows_with_shards_in_motion_left_alone():
    got = {}
    for defer in (True, False):
        # Pushes take tens of ms, as on a loaded host: rounds see them in flight.
        net = make_cluster(dcs=2, per_dc=3, seed=3, config=NodeConfig(ae_defer_in_motion=defer),
                           faults=Faults(latency=0.03, wan_latency=0.08, jitter=0.02))
        net.run(2.0)
        trainer = Trainer(net, "n0-0", seed=3)
        steady(net, [trainer], 4.0, rows=256)
        net.run(net.now + 3.0)
        assert converged(net, trainer), defer
        got[defer] = (pulled(net), sum(n.counters["pull_requests_sent"] for n in net.nodes.values()),
                      sum(n.counters["ae_deferred_shards"] for n in net.nodes.values()))
    (rows_on, reqs_on, deferred_on), (rows_off, reqs_off, deferred_off) = got[True], got[False]
    assert deferred_on > 0 and deferred_off == 0
    assert reqs_on < reqs_off / 2, got
    assert rows_on <= rows_off, got


def test_a_lost_last_push_is_pulled_once_the_shard_settles():
    cfg = NodeConfig()
    net = make_cluster(dcs=1, per_dc=3, seed=4, config=cfg, spec=ONE_SHARD)
    net.run(2.0)
    trainer = Trainer(net, "n0-0", seed=4, spec=ONE_SHARD)
    steady(net, [trainer], 1.0)
    lose_next_frame(net, trainer, "n0-2")   # the last frame: nothing after it shows a gap
    assert not converged(net, trainer, ["n0-2"])
    # Settled after push_grace; then the next rounds pull it.
    assert net.run_until(lambda: converged(net, trainer, ["n0-2"]), timeout=cfg.push_grace + 4 * cfg.ae_interval)


def test_a_lost_push_followed_by_more_frames_is_pulled_at_once():
    # Origin 1 loses a frame at n0-2 and goes on publishing: its next frame's link waits
    # there on the lost one.  Origin 2 keeps the shard's knowledge moving, so only the
    # waiting chain ends the deferral (without that rule it would last AE_DEFER_ROUNDS).
    cfg = NodeConfig(gap_probe_after=60.0)    # no gap probe: anti-entropy alone repairs
    net = make_cluster(dcs=1, per_dc=3, seed=5, config=cfg, spec=ONE_SHARD)
    net.run(2.0)
    lossy = Trainer(net, "n0-0", origin=1, seed=5, spec=ONE_SHARD)
    busy = Trainer(net, "n0-1", origin=2, seed=9, spec=ONE_SHARD)
    ranges = [(2048, 4096), (0, 2048)]
    steady(net, [lossy, busy], 1.0, ranges=ranges)
    # As if n0-2 had just asked a peer for the shard: the deferral's cap is 2 s away.
    net.nodes["n0-2"].models["ranker"].pulled_at["emb"][:] = net.now
    lose_next_frame(net, lossy, "n0-2", ids=np.arange(3000, 3064, dtype=np.int64))
    t0 = net.now
    while not converged(net, lossy, ["n0-2"]):
        assert net.now - t0 < 3 * cfg.ae_interval + 0.2, "a waiting chain must not be deferred"
        steady(net, [lossy, busy], 0.05, ranges=ranges)


def test_a_quiet_origins_lost_push_is_pulled_within_the_defer_bound():
    # Origin 1's last frame is lost at n0-2 while origin 2 keeps the shard moving: no
    # chain of origin 1 waits there, and only the AE_DEFER_ROUNDS cap ends the deferral.
    cfg = NodeConfig(gap_probe_after=60.0)
    net = make_cluster(dcs=1, per_dc=3, seed=6, config=cfg, spec=ONE_SHARD, faults=Faults(latency=0.03, jitter=0.02))
    net.run(2.0)
    quiet = Trainer(net, "n0-0", origin=1, seed=6, spec=ONE_SHARD)
    busy = Trainer(net, "n0-1", origin=2, seed=7, spec=ONE_SHARD)
    steady(net, [quiet, busy], 1.0, ranges=[(2048, 4096), (0, 2048)])
    lose_next_frame(net, quiet, "n0-2", ids=np.arange(3000, 3064, dtype=np.int64))
    deferred0 = net.nodes["n0-2"].counters["ae_deferred_shards"]
    t0 = net.now
    while not converged(net, quiet, ["n0-2"]):
        assert net.now - t0 < (AE_DEFER_ROUNDS + 3) * cfg.ae_interval, "deferred past its bound"
        busy.publish("emb", 64, ids=np.arange(0, 64, dtype=np.int64))
        net.run(net.now + 0.05)
    assert net.nodes["n0-2"].counters["ae_deferred_shards"] > deferred0   # it was deferred meanwhile


def test_rounds_skip_their_summary_while_every_shard_is_in_motion_and_resume_after():
    # Steady publishing keeps the one shard in motion everywhere (pushes take tens of ms,
    # as on a loaded host, so rounds see them in flight): a round's summary and the
    # partner's digests could only end in a deferral, so most rounds send nothing -- but
    # not all: the shard is asked for at least every AE_DEFER_ROUNDS rounds.
    cfg = NodeConfig()
    net = make_cluster(dcs=1, per_dc=3, seed=8, config=cfg, spec=ONE_SHARD, faults=Faults(latency=0.03, jitter=0.02))
    net.run(2.0)
    trainer = Trainer(net, "n0-0", seed=8, spec=ONE_SHARD)
    node = net.nodes["n0-2"]
    before = (node.counters["ae_rounds"], node.counters["ae_rounds_in_motion"])
    steady(net, [trainer], 4.0)
    sent = node.counters["ae_rounds"] - before[0]
    skipped = node.counters["ae_rounds_in_motion"] - before[1]
    rounds = 4.0 / cfg.ae_interval
    assert skipped >= rounds / 2, (sent, skipped)
    assert sent >= 4.0 / (AE_DEFER_ROUNDS * cfg.ae_interval) - 1, (sent, skipped)   # the deferral's bound
    # Publishing stops: after push_grace the shard settles and every round goes ahead.
    net.run(net.now + cfg.push_grace + cfg.ae_interval)
    settled = node.counters["ae_rounds"]
    net.run(net.now + 10 * cfg.ae_interval)
    assert node.counters["ae_rounds"] - settled >= 9
    assert converged(net, trainer)


def test_a_lost_push_is_repaired_with_rounds_skipped_meanwhile():
    # Pushes to n0-2 are lost now and then under steady publishing by one origin: each
    # loss leaves a chain waiting there at the next frame, which ends the motion, so its
    # rounds go ahead and pull what was lost.
    cfg = NodeConfig(gap_probe_after=60.0)    # no gap probe: anti-entropy alone repairs
    net = make_cluster(dcs=1, per_dc=3, seed=9, config=cfg, spec=ONE_SHARD, faults=Faults(latency=0.03, jitter=0.02))
    net.run(2.0)
    trainer = Trainer(net, "n0-0", seed=9, spec=ONE_SHARD)
    for _ in range(5):
        steady(net, [trainer], 0.5)
        lose_next_frame(net, trainer, "n0-2")
    steady(net, [trainer], 1.0)
    assert net.nodes["n0-2"].counters["ae_rounds_in_motion"] > 0
    assert net.run_until(lambda: converged(net, trainer), timeout=cfg.push_grace + 4 * cfg.ae_interval)
