"""A new publisher's first frames: every replica's knowledge of it completes within a
probe round, not after ``gap_probe_after x (1 + tier)``, while it keeps publishing.

A publisher cannot tell a first start from a lost state dir, so its first frame to
each shard is linked from just below its own counters (``RESTART_LINK``) and every
replica holds a gap from counter 0 that only probes close (:mod:`p2p.gaps`).  The
ingest probed it at once; the other replicas waited their tier, and anti-entropy does
not spread the ingest's closed gap to shards that pushes keep in motion.
"""

from __future__ import annotations

import numpy as np

from ekko.core.chain import PublisherChain
from ekko.core.codec import MsgType
from ekko.core.config import NodeConfig
from ekko.core.version import ORIGIN_BITS
from tests.p2p.cluster import Trainer, make_cluster

#: seconds a gap waits before its first probe here: far longer than the test's bound.
PROBE_AFTER_S = 6.0
#: the new publisher publishes every PUBLISH_EVERY_S for PUBLISH_FOR_S; every replica must
#: know what it had acknowledged by KNOWN_BY_S, while pushes keep every shard in motion.
PUBLISH_EVERY_S = 0.1
PUBLISH_FOR_S = 1.0
KNOWN_BY_S = 0.7


def lagging(net, origin: int, heads: dict) -> list[tuple[str, int, int, int]]:
    """(node, shard, knowledge, head) where a node's knowledge of ``origin`` is behind
    ``heads`` (the publisher's acknowledged chain heads at some time)."""
    out = []
    for (model, table, s), head in heads.items():
        for nid, node in net.nodes.items():
            sync = node.models[model].shards[table].get(s)
            k = sync.knowledge[origin] if sync is not None else 0
            if k < head:
                out.append((nid, s, k, head))
    return out


def test_a_new_publishers_gaps_close_everywhere_within_a_probe_round():
    cfg = NodeConfig(gap_probe_after=PROBE_AFTER_S)
    net = make_cluster(3, 3, seed=5, config=cfg)
    net.run(cfg.dead_after + 1.0)   # members known: gaps may close
    trainer = Trainer(net, "n0-0", origin=7, seed=1)
    trainer.chain = PublisherChain.restart(None, 7)   # as the SDK starts: history unknown
    t0 = net.now
    heads = None
    while net.now - t0 < PUBLISH_FOR_S - 1e-9:
        trainer.publish("emb", 64)
        net.run(net.now + PUBLISH_EVERY_S)
        if heads is None and net.now - t0 >= KNOWN_BY_S - 1e-9:
            heads = dict(trainer.chain.heads)
    # Before (the far replicas waiting for their tier, then anti-entropy from the
    # ingest): 50 of 144 (node, shard) pairs still knew nothing of the origin at 1.0 s.
    behind = lagging(net, 7, heads)
    assert not behind, f"{len(behind)} (node, shard) behind, e.g. {behind[:5]}"
    probing = [nid for nid, n in net.nodes.items() if n.counters["gap_probes_sent"]]
    assert len(probing) == len(net.nodes)   # each closed its own gap, none waited a tier


def test_a_gap_answer_holds_exactly_the_probed_publishers_rows_in_range():
    """A probe with several publishers of one shard (the shard's origins read once):
    each entry's answer carries that publisher's rows with counters in (lo, hi], in
    counter order, and no other's."""
    import numpy as np

    from ekko.core.codec import MsgType
    from ekko.core.version import ORIGIN_BITS
    net = make_cluster(1, 2, seed=3)
    net.run(1.0)
    node = net.nodes["n0-0"]
    ts = node.models["ranker"].store.table("emb")
    spec = ts.spec
    a, b = spec.shard_range(0)
    rows = np.arange(a, a + 12)
    origins = np.array([5, 6, 5, 5, 9, 6, 5, 6, 9, 5, 6, 5])
    counters = np.array([3, 4, 10, 7, 8, 12, 20, 30, 2, 5, 1, 15])
    ts.versions[rows] = (counters << ORIGIN_BITS) | origins
    other = spec.shard_range(1)[0]
    ts.versions[other] = (6 << ORIGIN_BITS) | 5      # origin 5, counter 6, another shard
    node.drain()
    node.gap_probe.on_query({"from": "n0-1", "gaps": [["ranker", "emb", 0, 5, 4, 15], ["ranker", "emb", 0, 6, 0, 12],
                                                      ["ranker", "emb", 0, 7, 0, 100]]}, net.now)
    answers = [o for o in node.drain() if o.msg_type == MsgType.GOSSIP and o.body.get("k") == "ga"]
    assert len(answers) == 1
    got = {}
    for e in answers[0].body["gaps"]:
        ids = np.frombuffer(e[8]["ids"], "<i8").tolist() if e[8] is not None else []
        got[e[3]] = ids

    def want(o, lo, hi):
        pick = [(c, r) for r, oo, c in zip(rows.tolist(), origins.tolist(), counters.tolist()) if oo == o and lo < c <= hi]
        return [r for _, r in sorted(pick)]
    assert got == {5: want(5, 4, 15), 6: want(6, 0, 12), 7: []}
    assert got[5] == [a + 9, a + 3, a + 2, a + 11] and got[6] == [a + 10, a + 1, a + 5]
