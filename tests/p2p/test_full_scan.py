"""The full scan (``use_shard_versions=False``): every row of a requested shard is compared,
it finds exactly what the recent-row index finds, and the node counts what it compared."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from ekko.core.chain import PublisherChain
from ekko.core.codec import Frame, MsgType
from ekko.core.config import NodeConfig
from ekko.core.delta import Delta
from ekko.replica.node import ReplicaNode
from ekko.core.spec import ModelSpec, TableSpec
from ekko.core.store import TableStore
from ekko.core.version import HLC_EPOCH_MS, ORIGIN_BITS, Knowledge, counters_of
from p2p.membership import Member
from p2p.sync import RecentIndex

SPEC = ModelSpec("ranker", [TableSpec("emb", rows=4096, dim=8, shards=16)])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.tuples(st.integers(0, 199), st.integers(1, 3)), min_size=1, max_size=25),
                min_size=1, max_size=10),
       st.lists(st.tuples(st.integers(0, 7), st.dictionaries(st.integers(1, 4), st.integers(0, 80), max_size=3)),
                min_size=1, max_size=8))
def test_full_scan_finds_what_the_index_finds(batches, asks):
    """Random states (several origins, per-shard knowledge): scanning every row of a shard
    answers exactly the index lookup (same rows, same version order)."""
    spec = TableSpec("t", rows=200, dim=1, shards=8)
    ts = TableStore(spec, device="cpu", with_values=False)
    ix = RecentIndex()
    c = 1
    for b in batches:
        ids = np.array([r for r, _ in b], np.int64)
        origins = np.array([o for _, o in b], np.int64)
        res = ts.apply(Delta("m", "t", ids, (np.arange(c, c + len(ids), dtype=np.int64) << ORIGIN_BITS) | origins))
        ix.note_applied(res.ids, res.versions, now=float(c), limit=1 << 20)   # no watermark: index only
        c += len(ids)
    shards = [s for s, _ in asks]
    theirs = [Knowledge(k) for _, k in asks]
    mine = [Knowledge({o: c for o in range(1, 5)})] * len(asks)
    got = ix.newer_than_many(ts, shards, theirs, mine)
    assert ix.rows_walked == 0
    for (gi, gv), s, t in zip(got, shards, theirs):
        wi, wv = ts.scan_newer(s, t)
        assert gi.tolist() == wi.tolist() and gv.tolist() == wv.tolist()


def _node(full_scan: bool) -> ReplicaNode:
    cfg = NodeConfig(use_shard_versions=not full_scan)
    node = ReplicaNode("a", "dc0", "a", config=cfg, device="cpu")
    node.register_model(SPEC, 0.0)
    node.members.merge([Member("req", "dc1", "req", 1, 1)], 0.0)
    node.drain()
    return node


def _same_state(nodes: list[ReplicaNode], rng: np.random.Generator, batches: int = 12) -> None:
    chain = PublisherChain(1)
    for b in range(batches):
        ids = rng.choice(4096, size=int(rng.integers(1, 120)), replace=False).astype(np.int64)
        vals = rng.standard_normal((len(ids), 8)).astype(np.float32)
        frame = chain.frame(SPEC, {"emb": (ids, vals)}, now_ms=HLC_EPOCH_MS + b * 100)
        for n in nodes:
            n.publish(frame.body, b * 0.1)
            n.drain()
        chain.acked(frame)


def _pull(node: ReplicaNode, asks: list[tuple[int, Knowledge]]) -> dict:
    body = {"from": "req", "back": False,
            "models": {"ranker": {"emb": [[s, k.to_wire(), None, None] for s, k in asks]}}}
    node.receive(Frame(MsgType.PULL_REQUEST, body), 10.0, "req")
    out = node.drain()
    assert len(out) == 1 and out[0].msg_type == MsgType.PULL_RESPONSE
    return out[0].body


def test_nodes_answer_a_pull_alike_with_or_without_shard_versions():
    rng = np.random.default_rng(7)
    idx, full = _node(full_scan=False), _node(full_scan=True)
    _same_state([idx, full], rng)
    top = int(counters_of(idx.table_store("ranker", "emb").versions).max())
    for _ in range(5):
        shards = sorted(rng.choice(16, size=int(rng.integers(1, 17)), replace=False).tolist())
        asks = [(s, Knowledge({1: int(rng.integers(0, top + 1))}) if rng.random() < 0.8 else Knowledge())
                for s in shards]
        assert _pull(idx, asks) == _pull(full, asks)


def test_rows_scanned_counts_rows_compared():
    rng = np.random.default_rng(3)
    idx, full = _node(full_scan=False), _node(full_scan=True)
    _same_state([idx, full], rng)
    shards = [0, 5, 9]
    _pull(idx, [(s, Knowledge()) for s in shards])
    _pull(full, [(s, Knowledge()) for s in shards])
    # Full scan: every row of the three requested shards (256 rows each), nothing from an index.
    assert full.counters["rows_scanned"] == full.counters["rows_walked"] == 3 * 256
    assert full.rows_walked_by_table[("ranker", "emb")] == 3 * 256
    # Index: just the distinct rows written in those shards (the index's candidates).
    written = np.flatnonzero(idx.table_store("ranker", "emb").versions)
    want = int(np.isin(SPEC.table("emb").shards_of(written), shards).sum())
    assert 0 < want < 3 * 256
    assert idx.counters["rows_scanned"] == want and idx.counters["rows_walked"] == 0
    assert not idx.rows_walked_by_table


def test_full_scan_requester_lists_no_held_rows_and_scans_nothing():
    """Without an index the requester does not list rows above its knowledge (that would be
    a second full scan); the wire stays valid for a peer running the index mode."""
    full, idx = _node(full_scan=True), _node(full_scan=False)
    _same_state([full], np.random.default_rng(5), batches=2)
    _same_state([idx], np.random.default_rng(5), batches=3)   # the same two batches and one more
    full.pulls.send_pull_request("req", {"ranker": {"emb": list(range(16))}}, back=False)
    (out,) = full.drain()
    assert all(e[2] is None for e in out.body["models"]["ranker"]["emb"])
    assert full.counters["rows_scanned"] == 0
    idx.receive(Frame(MsgType.PULL_REQUEST, {**out.body, "from": "req"}), 10.0, "req")
    (answer,) = idx.drain()
    got = sum(e[3]["n"]
              for e in answer.body["models"]["ranker"]["emb"] if e[3] is not None)
    assert got > 0   # the rows of the third batch
