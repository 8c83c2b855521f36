"""Row audits (:mod:`p2p.audit`): rows held differently below a knowledge every replica
shares are found by the row hash in the shard versions and spread by the repair exchange."""

from __future__ import annotations

import numpy as np
import pytest

from cluster import Trainer, make_cluster
from ekko.core.delta import Delta
from ekko.core.errors import ProtocolError
from ekko.core.version import ORIGIN_BITS, counters_of
from p2p import antientropy
from p2p.audit import AUDIT_BUCKETS, RowAudit, bucket_rows
from p2p.memnet import Faults

LOSSY = Faults(loss=0.10, duplicate=0.10, jitter=0.02)


def _settled_cluster(seed: int = 0, faults: Faults | None = None):
    net = make_cluster(dcs=3, per_dc=3, seed=seed, faults=faults)
    net.run(3.0)
    trainer = Trainer(net, "n0-0", seed=seed)
    for _ in range(10):
        trainer.publish("emb", 200)
        net.run(net.now + 0.05)
    assert net.run_until(lambda: _same_everywhere(net), timeout=30)
    return net, trainer


def _same_everywhere(net, rows: np.ndarray | None = None) -> bool:
    """Every live node holds the same versions and values (of ``rows``, or all), and the
    same shard versions."""
    nodes = [n for nid, n in net.nodes.items() if nid not in net.dead]
    ref = nodes[0].models["ranker"]
    for node in nodes[1:]:
        m = node.models["ranker"]
        for t in m.spec.tables:
            a, b = ref.store.table(t.name), m.store.table(t.name)
            sel = slice(None) if rows is None or t.name != "emb" else rows
            if not np.array_equal(a.versions[sel], b.versions[sel]) or not np.array_equal(
                    a.values[sel].numpy(), b.values[sel].numpy()):
                return False
            if rows is None and not np.array_equal(ref.shard_digests(t.name), m.shard_digests(t.name)):
                return False
    return True


def _rows_below_knowledge_in_one_dc(net, dc: str = "dc1", n: int = 7, seed: int = 5) -> np.ndarray:
    """What rule K2's limit leaves (a probe answered before the rows came, from an ingest
    that then lost its disk): the replicas of one DC hold newer versions of ``n`` rows,
    below the knowledge every replica has."""
    rng = np.random.default_rng(seed)
    some = next(node for node in net.nodes.values() if node.dc == dc)
    m0 = some.models["ranker"]
    ts0 = m0.store.table("emb")
    rows = np.sort(rng.choice(ts0.spec.rows, n, replace=False)).astype(np.int64)
    versions = np.empty(n, np.int64)
    for i, r in enumerate(rows.tolist()):
        s = int(ts0.spec.shards_of(np.array([r]))[0])
        top = m0.shard("emb", s).knowledge[1]
        have = int(counters_of(ts0.versions[r]))
        assert top > have, "the row's shard must know counters above the row's version"
        versions[i] = ((have + top) // 2 + 1) << ORIGIN_BITS | 1   # below the shard's knowledge
    values = rng.standard_normal((n, ts0.spec.dim)).astype(np.float32)
    for node in net.nodes.values():
        if node.dc == dc:
            m = node.models["ranker"]
            res = node.apply_delta(m, Delta("ranker", "emb", rows, versions, values), net.now, source="pull")
            assert len(res) == n
    return rows


def test_rows_held_below_equal_knowledge_reach_every_replica():
    net, _ = _settled_cluster()
    know = {nid: {s: dict(sync.knowledge.items()) for s, sync in n.models["ranker"].shards["emb"].items()}
            for nid, n in net.nodes.items()}
    rows = _rows_below_knowledge_in_one_dc(net)
    assert not _same_everywhere(net, rows)
    assert net.run_until(lambda: _same_everywhere(net), timeout=10), "the rows did not spread"
    # By audits, and without any knowledge moving: the rows were below it all along.
    assert sum(n.counters["audits_sent"] for n in net.nodes.values()) > 0
    assert know == {nid: {s: dict(sync.knowledge.items()) for s, sync in n.models["ranker"].shards["emb"].items()}
                    for nid, n in net.nodes.items()}


def test_without_audits_the_rows_stay_in_one_dc(monkeypatch):
    """Control: with the audit request turned off, anti-entropy sees the shard versions
    differ and pulls, but a pull brings only rows above the requester's knowledge."""
    monkeypatch.setattr(RowAudit, "request", lambda self, partner, shards: None)
    net, _ = _settled_cluster()
    rows = _rows_below_knowledge_in_one_dc(net)
    assert not net.run_until(lambda: _same_everywhere(net, rows), timeout=10)


@pytest.mark.parametrize("seed", [0, 1])
def test_audits_stay_rare_in_a_lossy_run(seed):
    """Pushes lost or reordered can leave rows above an equal knowledge different for a
    moment (a pull would bring them too); those few shards are audited, rate-limited,
    and once converged nothing is audited any more.  (3-6 audits in ~2,000 rounds.)"""
    net, trainer = _settled_cluster(seed, LOSSY)
    for _ in range(20):
        trainer.publish("emb", 100)
        net.run(net.now + 0.05)
    assert net.run_until(lambda: _same_everywhere(net), timeout=30)
    count = lambda k: sum(n.counters[k] for n in net.nodes.values())  # noqa: E731
    audits = count("audits_sent")
    assert audits <= count("ae_rounds") / 100
    net.run(net.now + 5.0)
    assert count("audits_sent") == audits


def test_a_bad_audit_request_is_refused_and_sends_nothing():
    net, _ = _settled_cluster()
    node = net.nodes["n0-1"]
    node.drain()
    good = [0, np.zeros(AUDIT_BUCKETS, np.uint64).tobytes()]
    for bad in ([99, good[1]], [0, b"\x00" * 7], [0], "x", [0, good[1], 1]):
        with pytest.raises(ProtocolError):
            node.audit.on_request({"from": "n1-0", "models": {"ranker": {"emb": [good, bad]}}}, net.now)
        assert node.drain() == []
    node.audit.on_request({"from": "n1-0", "models": {"ranker": {"emb": [good]}}}, net.now)
    (out,) = node.drain()   # a repair ask of the rows of every bucket holding any row
    ts = node.models["ranker"].store.table("emb")
    lo, hi, per = bucket_rows(ts.spec, 0)
    held = np.flatnonzero(ts.bucket_row_hashes(lo, hi, per) != 0)
    want = (lo + held[:, None] * per + np.arange(per)).ravel()
    assert 0 < len(held) < AUDIT_BUCKETS
    assert out.body["k"] == "rep" and np.frombuffer(out.body["ids"], np.int64).tolist() == want.tolist()


def test_a_partner_from_before_the_row_audits_compares_shard_versions_as_before():
    """Mixed versions during an upgrade: a summary without "rh" is compared with the
    shard versions without row hashes (in sync: no answer), and a digest answer without
    "rh" leads to pulls of the shards that differ, never to an audit."""
    net, _ = _settled_cluster()
    a, b = net.nodes["n0-0"], net.nodes["n1-0"]
    a.drain()
    m = a.models["ranker"]
    scope = ["dc"]
    old_sums = {"ranker": {t.name: antientropy._scope_digest(m.shard_digests(t.name, rows=False), None)
                           for t in m.spec.tables}}
    a.anti_entropy.on_summary({"k": "sum", "from": "n0-1", "scope": scope, "models": old_sums}, net.now)
    assert a.drain() == []                      # in sync by the old rule
    a.anti_entropy.on_summary({"k": "sum", "from": "n0-1", "scope": scope, "models": old_sums, "rh": True},
                              net.now)
    (dig,) = a.drain()                          # the new rule: these sums lack the row hashes
    assert dig.body["k"] == "dig" and "rh" in dig.body
    # Rows only b's DC holds below the knowledge: b's answer without "rh" (an older b)
    # brings no audit; with it, one.
    _rows_below_knowledge_in_one_dc(net, dc=b.dc)
    b.drain()
    b.anti_entropy.on_summary({"k": "sum", "from": "n0-0", "scope": ["dc"], "models": {}, "rh": True}, net.now)
    (dig,) = b.drain()
    old_dig = {k: v for k, v in dig.body.items() if k != "rh"}
    before = a.counters["audits_sent"]
    a.anti_entropy.on_digests(old_dig, net.now)
    assert a.counters["audits_sent"] == before
    a.anti_entropy.on_digests(dig.body, net.now)
    assert a.counters["audits_sent"] == before + 1
