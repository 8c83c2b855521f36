"""Publisher clocks ahead of the ingest replica: refused past a small bound, and a
publish whose rows lose to greater versions is told which rows and by what version.

Repro 6 of the rollback-correctness issue: a publisher 240 s ahead (inside the 300 s
``max_clock_skew``) was accepted, and a later publish to the same rows from a correct
clock got 200 with ``applied: 0`` and nothing else.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from ekko.core.chain import PublisherChain
from ekko.core.codec import MsgType, encode_frame
from ekko.core.config import MAX_PUBLISH_AHEAD_S, NodeConfig
from ekko.core.errors import ProtocolError
from ekko.replica.node import ReplicaNode
from ekko.core.spec import ModelSpec, TableSpec
from test_daemon import make_client, metrics_text, post, register

SPEC = ModelSpec("ranker", [TableSpec("emb", rows=5000, dim=8, shards=8),
                            TableSpec("half", rows=300, dim=4, dtype="bfloat16")])
ROWS = np.arange(10, 20, dtype=np.int64)


def _frame(pc: PublisherChain, ahead_s: float, seed: int):
    vals = np.random.default_rng(seed).standard_normal((len(ROWS), 8)).astype(np.float32)
    return pc.frame(SPEC, {"emb": (ROWS, vals)}, now_ms=(time.time() + ahead_s) * 1000.0)


def _node() -> ReplicaNode:
    n = ReplicaNode("r1", "dc1", "127.0.0.1:1", device="cpu", config=NodeConfig())
    n.wall_offset_s = 0.0          # protocol time is Unix time, as in the daemon
    n.register_model(SPEC, now=time.time())
    return n


def test_a_publish_far_ahead_of_the_ingest_clock_is_refused_and_changes_nothing():
    n = _node()
    f = _frame(PublisherChain(origin=3), 240.0, 0)
    with pytest.raises(ProtocolError) as e:
        n.publish(f.body, time.time())
    assert e.value.reason == "future_version" and "ahead" in str(e.value)
    assert not (n.table_store("ranker", "emb").versions > 0).any()
    assert n.counters["refused_future_frames"] == 1


def test_a_publish_within_the_bound_applies():
    n = _node()
    ack = n.publish(_frame(PublisherChain(origin=3), MAX_PUBLISH_AHEAD_S / 2, 0).body, time.time())
    assert ack.applied == len(ROWS) and not ack.shadowed


def test_a_shadowed_publish_is_told_which_rows_and_by_what_version():
    n = _node()
    ahead = _frame(PublisherChain(origin=3), MAX_PUBLISH_AHEAD_S / 2, 0)
    n.publish(ahead.body, time.time())
    late = _frame(PublisherChain(origin=4), 0.0, 1)
    ack = n.publish(late.body, time.time())
    assert ack.applied == 0
    ids, by = ack.shadowed["emb"]
    order = np.argsort(ROWS)
    assert np.array_equal(np.sort(ids), ROWS)
    assert np.array_equal(by[np.argsort(ids)], PublisherChain.versions_of(None, ahead)["emb"][order])
    assert n.counters["shadowed_rows"] == len(ROWS)
    # A re-send of the winning frame is not "shadowed": it is the same version.
    assert not n.publish(ahead.body, time.time()).shadowed


async def test_the_daemon_reports_shadowed_rows_and_counts_them(tmp_path):
    d, client = await make_client(tmp_path)
    try:
        await register(client, SPEC)
        first = _frame(PublisherChain(origin=3), MAX_PUBLISH_AHEAD_S / 2, 0)
        status, body, _ = await post(client, "/v1/publish", encode_frame(MsgType.PUBLISH, first.body))
        assert status == 200, body
        late = _frame(PublisherChain(origin=4), 0.0, 1)
        status, body, _ = await post(client, "/v1/publish", encode_frame(MsgType.PUBLISH, late.body))
        ack = json.loads(body)
        assert status == 200 and ack["applied"] == 0
        assert ack["shadowed"]["emb"]["count"] == len(ROWS)
        assert sorted(ack["shadowed"]["emb"]["ids"]) == ROWS.tolist()
        assert 'ekko_shadowed_rows_total{model="ranker"} 10.0' in await metrics_text(client)
        far = _frame(PublisherChain(origin=5), 240.0, 2)
        status, body, _ = await post(client, "/v1/publish", encode_frame(MsgType.PUBLISH, far.body))
        assert status == 400 and json.loads(body)["reason"] == "future_version"
    finally:
        await client.close()
