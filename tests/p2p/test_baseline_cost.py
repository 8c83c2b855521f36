"""A pinned baseline must not slow its DC nor draw more bytes than an ordinary replica.

It used to be picked as a gateway (cross-DC pushes stopped at it, its DC waited for
anti-entropy) and as everyone's anti-entropy partner (offered every row beyond its cut,
every round, and refusing them): 70x the bytes, freshness from 42 ms to 560 ms.
"""

from __future__ import annotations

import numpy as np
import pytest

from cluster import Trainer, make_cluster

#: publishes measured per run.
ROUNDS = 30


def _run(pin: bool, seed: int = 1) -> tuple[list[float], dict[str, int], object]:
    """DC peers' freshness lags (sorted), bytes received per node, and the net."""
    net = make_cluster(dcs=2, per_dc=3, seed=seed)
    base = net.nodes["n1-2"]
    net.run(2.0)
    tr = Trainer(net, "n0-0", seed=seed)
    for _ in range(2):
        tr.publish("emb", 300)
        net.run(net.now + 0.1)
    net.call("n0-0", "take_cut", "ranker", "c1", net.now)
    net.run(net.now + 2)
    if pin:
        base.set_baseline_pin("c1")
    net.run(net.now + 1)
    net.bytes_to.clear()
    peers = ["n1-0", "n1-1"]
    lags: list[float] = []
    for _ in range(ROUNDS):
        top = int(tr.publish("emb", 200).max())
        t0, pending = net.now, set(peers)
        while pending and net.now < t0 + 3:
            net.run(net.now + 0.002)
            for k in list(pending):
                if int(net.nodes[k].table_store("ranker", "emb").versions.max()) >= top:
                    lags.append(net.now - t0)
                    pending.discard(k)
        assert not pending, "every DC peer got the publish"
        net.run(t0 + 0.25)
    return sorted(lags), dict(net.bytes_to), net


def test_a_baseline_costs_its_dc_neither_freshness_nor_bytes():
    plain, plain_bytes, _ = _run(pin=False)
    pinned, pinned_bytes, net = _run(pin=True)
    base = net.nodes["n1-2"]
    p50 = lambda xs: xs[len(xs) // 2]  # noqa: E731
    p90 = lambda xs: xs[int(len(xs) * 0.9)]  # noqa: E731
    print(f"\nDC peers' freshness p50/p90: plain {p50(plain):.3f}/{p90(plain):.3f}s, "
          f"with a baseline {p50(pinned):.3f}/{p90(pinned):.3f}s; bytes to the baseline "
          f"{pinned_bytes['n1-2']}, to an ordinary replica {pinned_bytes['n1-1']}")
    assert p50(pinned) <= 1.5 * p50(plain) and p90(pinned) <= 1.5 * p90(plain)
    assert pinned_bytes["n1-2"] <= 1.2 * pinned_bytes["n1-1"]
    assert base.counters["baseline_held_rows"] == 0       # nothing was offered that it had to refuse
    t = base.spec("ranker").table("emb")
    for node in net.nodes.values():     # nobody picks it as a gateway or a push/AE partner
        node.peers.refresh_topology()
        assert "n1-2" not in set(np.asarray(node.topology.gateways("ranker", "emb", t.num_shards, "dc1")).ravel())
        assert "n1-2" not in node.peers.ordinary()


def test_a_ceiling_caps_the_rows_and_the_knowledge_of_a_pull_answer():
    from ekko.core.codec import Frame, MsgType, delta_from_wire
    from ekko.core.errors import ProtocolError
    from ekko.core.version import Knowledge

    net = make_cluster(dcs=1, per_dc=2, seed=5)
    net.run(2.0)
    tr = Trainer(net, "n0-0", seed=5)
    tr.publish("emb", 500)
    net.run(net.now + 1)
    a = net.nodes["n0-0"]
    cut = a.take_cut("ranker", "c1", net.now, broadcast=False)
    tr.publish("emb", 500)
    net.run(net.now + 1)
    spec = a.spec("ranker").table("emb")
    shards = list(range(spec.num_shards))
    entries = [[s, Knowledge().to_wire(), None, None] for s in shards]
    ceil = [cut.knowledge.get(("emb", s), Knowledge()).to_wire() for s in shards]
    body = {"from": "n0-1", "back": False, "models": {"ranker": {"emb": entries}}}
    a.drain()
    a.receive(Frame(MsgType.PULL_REQUEST, dict(body, ceil={"ranker": {"emb": ceil}})), net.now)
    (out,) = [o for o in a.drain() if o.msg_type == MsgType.PULL_RESPONSE]
    rows = 0
    for s, kw, _, dw in out.body["models"]["ranker"]["emb"]:
        want = cut.knowledge.get(("emb", s), Knowledge())
        assert Knowledge.from_wire(kw) == Knowledge({o: c for o, c in want.items() if c})   # clamped to the ceiling
        if dw is not None:
            d = delta_from_wire(dw, a.table_spec)
            assert cut.covers(spec, d.ids, d.versions).all()
            rows += len(d)
    assert rows > 0 and a.counters["ceiling_held_rows"] > 0
    # Ceilings that do not match the entries are refused whole.
    for bad in ({"ranker": {"emb": ceil[:-1]}}, {"other": {"emb": ceil}}, ["x"]):
        with pytest.raises(ProtocolError):
            a.receive(Frame(MsgType.PULL_REQUEST, dict(body, ceil=bad)), net.now)
