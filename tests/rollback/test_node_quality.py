"""ReplicaNode.report_quality: validation (nothing changes on a bad sample), auto cuts as targets."""

from __future__ import annotations

import pytest

from ekko.core.config import NodeConfig
from ekko.core.errors import UsageError
from ekko.replica.node import ReplicaNode
from ekko.core.spec import ModelSpec, TableSpec

SPEC = ModelSpec("m", [TableSpec("t", rows=16, dim=4, shards=2)])


def node(**cfg):
    n = ReplicaNode("r1", "dc1", "127.0.0.1:1", device="cpu", config=NodeConfig(**cfg))
    n.register_model(SPEC, now=0.0)
    return n


def test_bad_reports_raise_and_change_nothing():
    n = node()
    for args in [("nosuch", "online", "ctr", 0.1, 10), ("m", "shadow", "ctr", 0.1, 10),
                 ("m", "online", "nosuch", 0.1, 10), ("m", "online", "ctr", float("inf"), 10),
                 ("m", "online", "ctr", 0.1, 0)]:
        with pytest.raises(UsageError):
            n.report_quality(*args, now=1.0)
    with pytest.raises(UsageError):
        n.report_quality("m", "online", "ctr", 0.1, 10, now=1.0, until_counter=0)
    assert n.quality.counters["samples"] == 0 and n.quality.detector.snapshot() == {}
    assert n.status()["models"]["m"]["quality"]["state"] == "warmup"


def test_automatic_cuts_are_known_to_the_manager():
    n = node(auto_cut_interval=1.0)
    for t in range(1, 30):
        n.tick(float(t))
    names = [c.name for c in n.cuts.cuts("m")]
    assert names and {c["name"] for c in n.quality.cut_health("m")} == set(names)
