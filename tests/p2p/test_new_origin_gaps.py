"""A new publisher's first frames: every replica's knowledge of it completes within a
probe round, not after ``gap_probe_after x (1 + tier)``, while it keeps publishing.

A publisher cannot tell a first start from a lost state dir, so its first frame to
each shard is linked from just below its own counters (``RESTART_LINK``) and every
replica holds a gap from counter 0 that only probes close (:mod:`p2p.gaps`).  The
ingest probed it at once; the other replicas waited their tier, and anti-entropy does
not spread the ingest's closed gap to shards that pushes keep in motion.
"""

from __future__ import annotations

from ekko.core.chain import PublisherChain
from ekko.core.config import NodeConfig
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
