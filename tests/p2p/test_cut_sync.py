"""Cuts are durable and replicated: kept in snapshot state, learnt by late and restarted replicas."""

from __future__ import annotations

import random

import pytest

from cluster import SPEC, Trainer, digests, make_cluster
from ekko.core.codec import Frame, MsgType
from ekko.core.errors import ProtocolError
from ekko.replica.node import ReplicaNode
from rollback.cut_sync import MAX_CUT_NAMES


def _node(nid: str, dc: str, seeds=("n0-0",), incarnation: int = 1) -> ReplicaNode:
    return ReplicaNode(nid, dc, nid, rng=random.Random(hash(nid) & 0xFFFF), seeds=list(seeds), device="cpu",
                       incarnation=incarnation)


def _names(node: ReplicaNode, model: str = "ranker") -> list[str]:
    return [c.name for c in node.cuts.named(model)]


def test_a_late_replica_learns_older_cuts_and_can_roll_back_to_them():
    net = make_cluster(dcs=2, per_dc=2, seed=41)
    net.run(2.0)
    tr = Trainer(net, "n0-0", seed=41)
    tr.publish("emb", 300)
    net.run(net.now + 1)
    good = digests(net)
    net.call("n0-0", "take_cut", "ranker", "good", net.now)
    net.run(net.now + 0.5)
    tr.publish("emb", 300)
    net.run(net.now + 1)
    late = _node("n1-9", "dc1")
    net.add(late)
    assert net.run_until(lambda: "good" in _names(late), timeout=10), "the late replica learns the cut"
    assert late.counters["cuts_learnt"] == 1
    # Its time is the taker's, as wall time.
    taker = net.nodes["n0-0"]
    assert late.cut_wall_time(late.cuts.get("ranker", "good")) == pytest.approx(
        taker.cut_wall_time(taker.cuts.get("ranker", "good")))
    assert net.run_until(lambda: len(digests(net)) == 1, timeout=10)
    net.call("n1-9", "rollback", "ranker", "good", taker.models["ranker"].head, net.now)   # started there
    assert net.run_until(lambda: digests(net) == good, timeout=30), "every replica back at the cut"


def test_a_replica_down_when_a_cut_was_taken_learns_it_after_it_comes_back():
    net = make_cluster(dcs=2, per_dc=3, seed=42)
    net.run(2.0)
    tr = Trainer(net, "n0-0", seed=42)
    tr.publish("emb", 200)
    net.run(net.now + 1)
    net.kill("n1-1")
    net.call("n0-0", "take_cut", "ranker", "c1", net.now)
    net.call("n0-1", "take_cut", "ranker", "c2", net.now)
    net.run(net.now + 1)
    down = net.nodes["n1-1"]
    assert _names(down) == []
    net.replace(down)
    assert net.run_until(lambda: _names(down) == ["c1", "c2"], timeout=15)
    # Every replica ends with the same set, and then stops asking.
    assert len({tuple(_names(n)) for n in net.nodes.values()}) == 1
    asked = sum(n.counters["cut_lists_asked"] for n in net.nodes.values())
    net.run(net.now + 5)
    assert sum(n.counters["cut_lists_asked"] for n in net.nodes.values()) == asked


def test_cuts_survive_a_restart_from_snapshot_state_and_older_state_still_loads():
    net = make_cluster(dcs=1, per_dc=2, seed=43)
    net.run(2.0)
    tr = Trainer(net, "n0-0", seed=43)
    tr.publish("emb", 200)
    net.run(net.now + 1)
    a = net.nodes["n0-1"]
    net.call("n0-0", "take_cut", "ranker", "kept", net.now)
    net.run(net.now + 1)
    at = a.cut_wall_time(a.cuts.get("ranker", "kept"))
    store, state = a.models["ranker"].store.copy(), a.export_state("ranker")
    again = ReplicaNode("n0-1", "dc0", "n0-1", device="cpu", incarnation=2)
    again.wall_offset_s = a.wall_offset_s + 1000.0       # a new process: protocol time restarted
    again.import_state(SPEC, store, state, 0.0)
    cut = again.cuts.get("ranker", "kept")
    assert again.cut_wall_time(cut) == pytest.approx(at)
    assert cut.knowledge == a.cuts.get("ranker", "kept").knowledge
    assert cut.seq == 0          # no undo history survived: it restores by its knowledge
    # A snapshot written before cuts were kept has none, and still loads.
    old = {k: v for k, v in state.items() if k != "cuts"}
    older = ReplicaNode("n0-1", "dc0", "n0-1", device="cpu", incarnation=3)
    older.import_state(SPEC, a.models["ranker"].store.copy(), old, 0.0)
    assert _names(older) == []


def test_bad_cuts_in_snapshot_state_load_nothing():
    net = make_cluster(dcs=1, per_dc=2, seed=44)
    net.run(1.0)
    net.call("n0-0", "take_cut", "ranker", "c", net.now)
    a = net.nodes["n0-0"]
    state = a.export_state("ranker")
    state["cuts"][0][0]["knowledge"] = [["emb", 999, {}]]          # a shard the table lacks
    again = ReplicaNode("n0-0", "dc0", "n0-0", device="cpu", incarnation=2)
    with pytest.raises(ProtocolError) as e:
        again.import_state(SPEC, a.models["ranker"].store.copy(), state, 0.0)
    assert e.value.reason == "bad_snapshot" and "ranker" not in again.models and not _names(again)


def test_bad_cut_sync_messages_are_refused_and_change_nothing():
    net = make_cluster(dcs=1, per_dc=2, seed=45)
    net.run(1.0)
    net.call("n0-0", "take_cut", "ranker", "c", net.now)
    b = net.nodes["n0-1"]
    before = _names(b)
    bad = [
        (MsgType.GOSSIP, {"k": "cl", "from": "n0-0", "m": "ranker", "names": ["x"] * (MAX_CUT_NAMES + 1)}),
        (MsgType.GOSSIP, {"k": "cl", "from": "n0-0", "m": "ranker", "names": ["../etc"]}),
        (MsgType.CUT, {"from": "n0-0", "cut": dict(net.nodes["n0-0"].cut_to_wire(
            net.nodes["n0-0"].cuts.get("ranker", "c")), name="d", knowledge=[["nope", 0, {}]])}),
        (MsgType.CUT, {"from": "n0-0", "cut": net.nodes["n0-0"].cut_to_wire(
            net.nodes["n0-0"].cuts.get("ranker", "c")) | {"name": "e"}, "at": -5.0}),
    ]
    for t, body in bad:
        with pytest.raises(ProtocolError):
            b.receive(Frame(t, body), net.now)
    gossip = net.nodes["n0-0"].gossiper.gossip_body(False)
    gossip["cd"] = {"ranker": "not a digest"}
    with pytest.raises(ProtocolError):
        b.receive(Frame(MsgType.GOSSIP, gossip), net.now)
    assert _names(b) == before and not b.drain()
