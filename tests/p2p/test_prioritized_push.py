"""The priority scheduler on the push path: under a tight WAN budget, high-impact rows cross first."""

import numpy as np
import pytest

from cluster import SPEC, Trainer, converged, make_cluster
from ekko.core.codec import Frame, MsgType, delta_to_wire
from ekko.core.config import NodeConfig
from ekko.core.delta import Delta
from ekko.core.errors import ProtocolError
from ekko.core.version import pack as pack_version
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


def test_gateways_rank_forwarded_rows_with_the_publishers_scores():
    """Push frames carry each row's score and class: the remote gateway queues them for its
    DC with the publisher replica's ranking instead of re-scoring without the impact."""
    cfg = NodeConfig(push_grace=30.0)
    prios = []

    def kwargs(dc):
        prios.append((dc, Prioritizer(threshold=ThresholdTracker(10, rng=1))))
        return {"prioritizer": prios[-1][1], "queue_factory": priority_queue_factory(dc, LinkBudgets.unlimited())}

    net = make_cluster(dcs=2, per_dc=2, seed=1, config=cfg, node_kwargs=kwargs)
    net.run(2.0)
    sent = []
    for dc, p in prios:
        if dc == "dc0":
            p.observers.append(lambda m, t, rows: sent.append(rows))
    forwarded = []
    for node in net.nodes.values():
        if node.dc != "dc1":
            continue
        orig = node.eager_push.enqueue

        def spy(peer, rows, now, orig=orig):
            forwarded.append(rows)
            orig(peer, rows, now)
        node.eager_push.enqueue = spy
    trainer = Trainer(net, "n0-0", seed=1)
    rng = np.random.default_rng(1)
    ids = rng.choice(SPEC.table("emb").rows, size=300, replace=False).astype(np.int64)
    trainer.publish("emb", 0, impact=rng.lognormal(0, 1, size=len(ids)).astype(np.float32), ids=ids)
    assert net.run_until(lambda: converged(net, trainer), timeout=30)
    assert sent and forwarded
    pub = {int(i): (float(s), bool(h)) for r in sent for i, s, h in zip(r.ids, r.scores, r.high)}
    fwd = {int(i): (float(s), bool(h)) for r in forwarded for i, s, h in zip(r.ids, r.scores, r.high)}
    assert set(fwd) <= set(pub) and len(fwd) == len(pub)
    assert all(fwd[i] == pub[i] for i in fwd)
    assert any(h for _, h in fwd.values()) and not all(h for _, h in fwd.values())


def test_malformed_push_priorities_are_rejected_without_a_state_change():
    net = make_cluster(dcs=2, per_dc=1, seed=2, config=NodeConfig(push_grace=30.0), node_kwargs=lambda dc: {
        "prioritizer": Prioritizer(), "queue_factory": priority_queue_factory(dc, LinkBudgets.unlimited())})
    net.run(2.0)
    node = net.nodes["n1-0"]
    ids = np.array([1, 2, 3], np.int64)
    d = Delta("ranker", "emb", ids, np.array([pack_version(5, 1)] * 3, np.int64),
              np.ones((3, 8), np.float32))
    before = node.table_store("ranker", "emb").versions.copy()
    good = [np.ones(3, np.float32).tobytes(), np.packbits([1, 0, 0]).tobytes()]
    for bad in ([good, good],                                               # one entry per delta
                [[np.ones(2, np.float32).tobytes(), good[1]]],              # wrong length
                [[np.full(3, np.nan, np.float32).tobytes(), good[1]]],      # not finite
                [[good[0], b"\x00\x00"]],                                   # classes of the wrong size
                ["x"]):
        body = {"from": "n0-0", "dc": "dc0", "deltas": [delta_to_wire(d)], "prio": bad}
        with pytest.raises(ProtocolError):
            node.receive(Frame(MsgType.PUSH, body), net.now)
        assert np.array_equal(node.table_store("ranker", "emb").versions, before)
    body = {"from": "n0-0", "dc": "dc0", "deltas": [delta_to_wire(d)], "prio": [good]}
    node.receive(Frame(MsgType.PUSH, body), net.now)
    assert (node.table_store("ranker", "emb").versions[ids] == pack_version(5, 1)).all()
