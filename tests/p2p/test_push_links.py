"""Publish-chain links on push frames: knowledge advances at every replica a push reaches.

Without them a replica's knowledge moved only by anti-entropy (an epidemic through
its DC), so every round found unequal shard versions and re-listed thousands of rows
the partner already held; at 10,000 simulated replicas that was most of the run.
"""

import numpy as np
import pytest

from cluster import SPEC, Trainer, converged, make_cluster
from ekko.core.codec import Frame, MsgType, array_to_wire, delta_to_wire
from ekko.core.config import NodeConfig
from ekko.core.delta import Delta
from ekko.core.errors import ProtocolError
from ekko.core.version import HLC_EPOCH_MS
from ekko.core.version import pack as pack_version
from p2p.outbound import FifoLinkQueue, QueuedRows


def knowledge(node, table="emb"):
    m = node.models["ranker"]
    return {s: dict(m.shard(table, s).knowledge.items()) for s in range(SPEC.table(table).num_shards)}


def assert_pushes_carry_knowledge(cfg, dcs, seed, batches):
    """Publish ``batches`` 300-row batches at n0-0 with anti-entropy off (``cfg``): only
    pushes can move knowledge, and every replica must end with the ingest's."""
    net = make_cluster(dcs=dcs, per_dc=3, seed=seed, config=cfg)
    net.run(2.0)
    trainer = Trainer(net, "n0-0", seed=seed)
    for _ in range(batches):
        trainer.publish("emb", 300)
        net.run(net.now + 0.2)
    net.run(net.now + 1.0)
    assert converged(net, trainer)
    want = knowledge(net.nodes["n0-0"])
    assert any(want[s] for s in want)              # the ingest learnt its chains
    for nid, node in net.nodes.items():
        assert knowledge(node) == want, nid        # and every replica holds the same knowledge
    assert sum(n.counters["push_links"] for n in net.nodes.values()) > 0
    return net


def test_pushes_carry_the_ingest_knowledge_to_every_replica():
    assert_pushes_carry_knowledge(NodeConfig(ae_interval=1e6), dcs=3, seed=5, batches=6)


def test_links_survive_only_whole_batches_in_the_fifo_queue():
    links = np.array([[0, 1, 0, 10]], np.int64)
    q = FifoLinkQueue()
    q.put(QueuedRows("m", "t", np.array([1, 2]), np.array([5, 5]), 8, links=links), now=0.0)
    (b,) = q.take(0.0, 10_000)
    assert b.links is links                         # taken whole: the links go along
    q.put(QueuedRows("m", "t", np.array([1, 2]), np.array([5, 5]), 8, links=links), now=0.0)
    q.put(QueuedRows("m", "t", np.array([2, 3]), np.array([9, 9]), 8), now=0.0)
    first, second = q.take(0.0, 10_000)
    # A linked batch stays whole when a later one re-queues its row 2: taking the row out
    # would void its links (row 2 goes twice, at the version current when each is sent).
    assert first.ids.tolist() == [1, 2] and first.links is links and second.ids.tolist() == [2, 3]
    q.put(QueuedRows("m", "t", np.array([1, 2]), np.array([5, 5]), 8), now=0.0)
    q.put(QueuedRows("m", "t", np.array([2, 3]), np.array([9, 9]), 8), now=0.0)
    first, second = q.take(0.0, 10_000)
    assert first.ids.tolist() == [1] and second.ids.tolist() == [2, 3]   # unlinked: coalesced
    q.put(QueuedRows("m", "t", np.array([1, 2, 3]), np.array([5, 5, 5]), 8, links=links), now=0.0)
    part = q.take(0.0, 2 * (8 + 16))
    assert [len(p) for p in part] == [2] and part[0].links is None   # split by the byte budget


def _push(node, links):
    spec = SPEC.table("emb")
    ids = np.arange(4, dtype=np.int64)
    d = Delta("ranker", "emb", ids, np.full(4, pack_version(1000, 7)), np.ones((4, spec.dim), np.float32))
    body = {"from": "x", "dc": node.dc, "deltas": [delta_to_wire(d)], "links": links}
    node.receive(Frame(MsgType.PUSH, body), node_now := 1.0, "x")
    return node_now


@pytest.mark.parametrize("links", [
    [array_to_wire(np.array([[99, 7, 0, 1000]], np.int64))],       # shard out of range
    [array_to_wire(np.array([[0, 7, 5, 5]], np.int64))],           # after must be below upto
    [array_to_wire(np.array([[0, 0, 0, 5]], np.int64))],           # origin 0 is not a publisher
    [array_to_wire(np.array([[0, 7, -1, 5]], np.int64))],          # unchained: nothing to link
    [b"\x00" * 31],                                                # not whole rows
    ["links"],                                                     # not bytes
    [None, None],                                                  # one entry per delta
    [array_to_wire(np.array([[0, 7, 0, 1 << 60]], np.int64))],     # far beyond the clock
])
def test_bad_links_are_refused_and_change_nothing(links):
    net = make_cluster(dcs=1, per_dc=2, seed=1)
    net.run(1.0)
    node = net.nodes["n0-1"]
    before = (node.table_store("ranker", "emb").versions.copy(), knowledge(node))
    with pytest.raises(ProtocolError):
        _push(node, links)
    assert np.array_equal(node.table_store("ranker", "emb").versions, before[0])
    assert knowledge(node) == before[1]


def test_a_valid_link_advances_knowledge_and_a_gap_waits():
    net = make_cluster(dcs=1, per_dc=2, seed=1)
    net.run(1.0)
    node = net.nodes["n0-1"]
    shard = int(SPEC.table("emb").shard_of(0))
    _push(node, [array_to_wire(np.array([[shard, 7, 2000, 3000]], np.int64))])
    assert knowledge(node)[shard].get(7, 0) == 0     # its predecessor (up to 2000) is missing
    _push(node, [array_to_wire(np.array([[shard, 7, 0, 2000]], np.int64))])
    assert knowledge(node)[shard][7] == 3000         # the gap closed: both links hold


def test_a_batch_over_the_frame_budget_keeps_its_links_split_by_shard():
    # A 1k-row batch of dim-64 rows is over the default 256 KiB push frame: the queue
    # splits it between shards, each frame with the links of the shards it holds whole.
    rows = np.arange(6, dtype=np.int64) * 100              # shards 0, 0, 1, 1, 2, 2 below
    shards = np.array([0, 0, 1, 1, 2, 2])
    links = np.array([[0, 1, 0, 10], [1, 1, 0, 11], [2, 1, 0, 12]], np.int64)
    q = FifoLinkQueue()
    q.put(QueuedRows("m", "t", rows, np.full(6, 5), 8, links=links, shards=shards), now=0.0)
    first = q.take(0.0, 3 * (8 + 16))                       # room for 3 rows: 2 go (shard 0 whole)
    second = q.take(0.0, 10_000)
    assert [len(b) for b in first + second] == [2, 4]
    assert first[0].links.tolist() == [[0, 1, 0, 10]]
    assert second[0].links.tolist() == [[1, 1, 0, 11], [2, 1, 0, 12]]
    # A shard larger than the budget alone is split, and only its link is lost.
    q.put(QueuedRows("m", "t", rows, np.full(6, 5), 8, links=links, shards=np.array([0, 0, 0, 0, 1, 2])), now=0.0)
    (part,) = q.take(0.0, 3 * (8 + 16))
    assert len(part) == 3 and part.links is None
    (rest,) = q.take(0.0, 10_000)
    assert rest.links.tolist() == [[1, 1, 0, 11], [2, 1, 0, 12]]


def test_knowledge_follows_pushes_of_batches_over_the_frame_budget():
    # Anti-entropy off, frames of 2 KiB: each 300-row batch (dim 8: 48 B a row on the
    # wire) travels in several frames, and knowledge must still move with them.
    net = assert_pushes_carry_knowledge(NodeConfig(ae_interval=1e6, push_frame_bytes=2048, lan_push_frame_bytes=2048), dcs=2, seed=7,
                                        batches=4)
    assert sum(n.counters["push_frames_sent"] for n in net.nodes.values()) > 4 * 5   # they were split


def test_a_dc_fan_out_shares_one_wire_form_per_slice():
    # Every link queue of the ingest's DC fan-out splits the same batch at the same shard
    # boundaries: the peers' PUSH bodies share one deltas list per slice, which is what
    # lets the daemon's transport encode each frame once (ekko_peer_frames_total).
    cfg = NodeConfig(ae_interval=1e6, push_frame_bytes=2048, lan_push_frame_bytes=2048)
    net = make_cluster(dcs=1, per_dc=3, seed=8, config=cfg)
    net.run(2.0)
    ingest = net.nodes["n0-0"]
    sent = []
    real = ingest.send
    ingest.send = lambda out: (sent.append(out), real(out))[1]
    trainer = Trainer(net, "n0-0", seed=8)
    trainer.publish("emb", 300)                     # 300 x 48 B: several 2 KiB frames per peer
    net.run(net.now + 0.5)
    pushes = [o for o in sent if o.msg_type == MsgType.PUSH]
    by_peer = {}
    for o in pushes:
        by_peer.setdefault(o.dst, []).append(o.body["deltas"])
    assert set(by_peer) == {"n0-1", "n0-2"} and len(by_peer["n0-1"]) > 1
    assert [id(d) for d in by_peer["n0-1"]] == [id(d) for d in by_peer["n0-2"]]
    assert converged(net, trainer)


class _FenceRow:
    """A rollback fence that refuses one row (the real ones refuse a rolled-back range)."""

    def __init__(self, row: int) -> None:
        self.row = row

    def __bool__(self) -> bool:
        return True

    def mask(self, model, table, ids, versions):
        return ids == self.row


@pytest.mark.parametrize("fenced", [False, True])
def test_a_gateway_forwards_the_links_of_a_push_whose_rows_it_already_holds_newer(fenced):
    # A gateway (n1-0) already holds row 0 at a newer version of the same origin -- a later
    # publish that reached it round another gateway first -- when the ingest's push of the
    # earlier frame arrives.  It must still forward that frame's link to its DC peers,
    # with row 0 at the version it holds; without the link their chain waits for a probe.
    # But a row it refused (fenced: held below the pushed version) voids the link.
    net = make_cluster(dcs=2, per_dc=3, seed=3, config=NodeConfig(ae_interval=1e6))
    net.run(2.0)
    gw = net.nodes["n1-0"]
    spec = SPEC.table("emb")
    shard = int(spec.shard_of(0))
    ids = np.arange(4, dtype=np.int64)
    newer = Delta("ranker", "emb", ids[:1], np.full(1, pack_version(1500, 7)), np.full((1, spec.dim), 2.0, np.float32))
    gw.receive(Frame(MsgType.PUSH, {"from": "n1-1", "dc": "dc1", "deltas": [delta_to_wire(newer)]}), net.now, "n1-1")
    if fenced:
        gw.rollback_protocol.fence = _FenceRow(2)
    sent = []
    real = gw.send
    gw.send = lambda out: (sent.append(out), real(out))[1]
    older = Delta("ranker", "emb", ids, np.full(4, pack_version(1000, 7)), np.ones((4, spec.dim), np.float32))
    link = array_to_wire(np.array([[shard, 7, 0, 1000]], np.int64))
    gw.receive(Frame(MsgType.PUSH, {"from": "n0-0", "dc": "dc0", "deltas": [delta_to_wire(older)], "links": [link]}),
               net.now, "n0-0")
    net.run(net.now + 0.1)
    fwd = [o for o in sent if o.msg_type == MsgType.PUSH]
    assert {o.dst for o in fwd} == {"n1-1", "n1-2"}
    v_new, v_old = pack_version(1500, 7), pack_version(1000, 7)
    for nid in ("n1-1", "n1-2"):
        peer = net.nodes[nid]
        vers = peer.table_store("ranker", "emb").versions[ids].tolist()
        if fenced:
            assert knowledge(peer)[shard].get(7, 0) == 0, nid                  # no link: row 2 is missing
            assert vers == [0, v_old, 0, v_old]                                # the rows that took here
        else:
            assert knowledge(peer)[shard].get(7, 0) == 1000, nid               # the link went on
            assert vers == [v_new, v_old, v_old, v_old]                        # row 0 as held


def test_a_publishers_frames_cross_to_each_dc_by_one_gateway():
    """Every frame of one publisher goes to the same gateway of each other DC, so that
    DC's members get the frames in order on one stream and their chains never wait on
    a reordering (chosen by each batch's first shard, consecutive frames took different
    gateways: on real daemons under load the far DCs' chains waited seconds, past
    gap_probe_after).  Two publishers may use different gateways."""
    net = make_cluster(dcs=3, per_dc=3, seed=3)
    net.run(2.0)
    ingest = net.nodes["n0-0"]
    gw = ingest.topology.gateways("ranker", "emb", SPEC.table("emb").num_shards, "dc1")
    assert len(set(gw[:, 0].tolist())) > 1, "the test needs a DC whose shards have different gateways"
    crossed: dict[int, dict[str, set[str]]] = {}
    first_shards = set()
    for origin in (5, 6):
        trainer = Trainer(net, "n0-0", origin=origin, seed=origin)
        for _ in range(12):
            t = SPEC.table("emb")
            ids = trainer.rng.choice(t.rows, size=50, replace=False).astype(np.int64)
            first_shards.add(int(t.shard_of(int(ids[0]))))
            frame = trainer.chain.frame(SPEC, {"emb": (ids, np.ones((50, t.dim), np.float32))},
                                        now_ms=HLC_EPOCH_MS + net.now * 1000)
            ingest.publish(frame.body, net.now)
            trainer.chain.acked(frame)
            for out in ingest.drain():
                dst = net.nodes.get(out.dst or net.by_address.get(out.address, ""))
                if out.msg_type == MsgType.PUSH and dst is not None and dst.dc != ingest.dc:
                    crossed.setdefault(origin, {}).setdefault(dst.dc, set()).add(dst.node_id)
    assert len({gw[s, 0] for s in first_shards}) > 1     # the first shards alone would have spread them
    for origin, by_dc in crossed.items():
        assert sorted(by_dc) == ["dc1", "dc2"], origin
        assert all(len(nodes) == 1 for nodes in by_dc.values()), (origin, by_dc)
