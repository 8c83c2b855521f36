"""The priority scheduler chosen by configuration: node queues and /metrics by class."""

import numpy as np
import pytest

from ekko.core.config import NodeConfig, config_from_dict
from ekko.core.errors import UsageError
from ekko.server.metrics import DaemonMetrics
from ekko.replica.node import ReplicaNode
from ekko.core.spec import ModelSpec, TableSpec
from prioritizer import PriorityLinkQueue


def test_config_validates_scheduler_fields():
    assert config_from_dict({"scheduler": "priority", "wan_update_bytes_per_s": 1e6}).scheduler == "priority"
    with pytest.raises(UsageError):
        NodeConfig(scheduler="lifo")
    with pytest.raises(UsageError):
        NodeConfig(k_percent=0)


def test_priority_scheduler_from_config_builds_budgeted_queues_and_metrics():
    from ekko.core.chain import PublisherChain
    from ekko.core.version import HLC_EPOCH_MS
    from p2p.membership import Member

    cfg = NodeConfig(scheduler="priority", wan_update_bytes_per_s=10_000)
    node = ReplicaNode("a", "dc1", "a:1", config=cfg, device="cpu")
    node.members.merge([Member("b", "dc2", "b:1", 1, 1)], now=0.0)
    spec = ModelSpec("m", [TableSpec("t", rows=20_000, dim=8)])
    node.register_model(spec, 0.0)
    chain = PublisherChain(origin=3)
    ids = np.arange(10_000, dtype=np.int64)   # 480 kB of rows: more than the 256 kB burst
    impact = np.ones(10_000, np.float32)
    impact[:10] = 100.0
    frame = chain.frame(spec, {"t": (ids, np.ones((10_000, 8), np.float32))}, now_ms=HLC_EPOCH_MS,
                        impact={"t": impact})
    node.publish(frame.body, 0.0)
    q = node.queues["b"]
    assert isinstance(q, PriorityLinkQueue)
    sent = [o for o in node.drain() if o.dst == "b"]
    assert sent, "the budget's burst lets the first rows out at once"
    assert q.rows > 0, "a 10 kB/s budget cannot carry them all at once"
    assert node.next_deadline() < float("inf"), "the node asks to be woken when the budget refills"
    text = DaemonMetrics(node).render().decode()
    assert 'ekko_push_queue_class_rows{class="low"}' in text
    assert 'ekko_push_sent_bytes_total{class="high"}' in text
