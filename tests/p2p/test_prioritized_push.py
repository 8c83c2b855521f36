"""The priority scheduler on the push path: under a tight WAN budget, high-impact rows cross first."""

import numpy as np

from cluster import SPEC, Trainer, converged, make_cluster
from ekko.config import NodeConfig
from prioritizer import LinkBudgets, Prioritizer, ThresholdTracker, fifo_queue_factory, priority_queue_factory

# 40 KB/s across DCs: a 2000-row burst of 48-byte rows (~96 KB) takes ~2.4 s to drain.
BUDGET = LinkBudgets(default_bytes_per_s=40_000, intra_dc_bytes_per_s=float("inf"), min_burst_bytes=4096,
                     burst_s=0.05)


def run(factory_fn, seed=3):
    cfg = NodeConfig(push_grace=30.0)     # anti-entropy must not overtake the queues under test
    net = make_cluster(dcs=2, per_dc=2, seed=seed, config=cfg, node_kwargs=lambda dc: {
        "prioritizer": Prioritizer(threshold=ThresholdTracker(10, rng=seed)),
        "queue_factory": factory_fn(dc)})
    net.run(2.0)
    trainer = Trainer(net, "n0-0", seed=seed)
    rng = np.random.default_rng(seed)
    ids = rng.choice(SPEC.table("emb").rows, size=2000, replace=False).astype(np.int64)
    impact = rng.lognormal(0, 0.5, size=len(ids)).astype(np.float32)
    top = impact >= np.quantile(impact, 0.95)
    impact[top] *= 20                                          # 5% of the rows move the model a lot
    versions = trainer.publish("emb", 0, impact=impact, ids=ids)
    arrival = np.full(len(ids), np.nan)
    remote = net.nodes["n1-1"]
    t0 = net.now
    while net.now < t0 + 30 and np.isnan(arrival).any():
        net.run(net.now + 0.05)
        have = remote.table_store("ranker", "emb").versions[ids] >= versions
        arrival[have & np.isnan(arrival)] = net.now - t0
    assert net.run_until(lambda: converged(net, trainer), timeout=60)
    return arrival, top


def test_high_impact_rows_cross_a_congested_link_first(capsys):
    prio, top = run(lambda dc: priority_queue_factory(dc, BUDGET))
    fifo, _ = run(lambda dc: fifo_queue_factory(dc, BUDGET))
    hi_p, lo_p = np.median(prio[top]), np.median(prio[~top])
    hi_f = np.median(fifo[top])
    with capsys.disabled():
        print(f"\n[prio] median arrival: priority high {hi_p:.2f}s low {lo_p:.2f}s; fifo high {hi_f:.2f}s")
    assert hi_p * 4 < lo_p            # high rows go first
    assert hi_p * 4 < hi_f            # FIFO makes them wait behind the burst
    assert not np.isnan(prio).any()   # and low rows still arrive
