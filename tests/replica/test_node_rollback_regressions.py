"""Rollback regressions found by the fault harness: fences survive a restart, cover unknown origins."""

from __future__ import annotations

import numpy as np
import pytest

from ekko.core.chain import PublisherChain
from ekko.core.codec import Frame, MsgType
from ekko.core.errors import ProtocolError
from ekko.replica.node import ReplicaNode
from ekko.core.spec import ModelSpec, TableSpec
from ekko.core.version import HLC_EPOCH_MS, HLC_LOGICAL_BITS

SPEC = ModelSpec("m", [TableSpec("t", rows=64, dim=2, shards=4)])


def _frame(chain: PublisherChain, ids: list[int], value: float, t_s: float) -> dict:
    vals = np.full((len(ids), 2), value, np.float32)
    f = chain.frame(SPEC, {"t": (np.array(ids), vals)}, now_ms=HLC_EPOCH_MS + t_s * 1000)
    chain.acked(f)
    return f.body


def _rolled_back_node() -> tuple[ReplicaNode, dict]:
    node = ReplicaNode("a", "dc0", "a:1", device="cpu")
    node.register_model(SPEC, 0.0)
    chain = PublisherChain(1)
    node.publish(_frame(chain, [1, 2, 3], 1.0, 1.0), 1.0)
    node.take_cut("m", "good", 1.5, broadcast=False)
    bad = _frame(chain, [2, 3, 40], 9.0, 2.0)
    node.publish(bad, 2.0)
    until = (3000 << HLC_LOGICAL_BITS) | 0xFF
    node.rollback("m", "good", until, 3.0)
    assert node.read_rows("m", "t", np.array([2, 40])).tolist() == [[1.0, 1.0], [0.0, 0.0]]
    return node, bad


def test_fences_survive_a_restart_from_snapshot_state():
    node, bad = _rolled_back_node()
    store, state = node.models["m"].store.copy(), node.export_state("m")
    again = ReplicaNode("a", "dc0", "a:1", device="cpu", incarnation=2)
    again.import_state(SPEC, store, state, 4.0)
    # A lagging peer (or a replayed frame) brings the rolled-back update again: refused.
    again.publish(bad, 4.5)
    assert again.read_rows("m", "t", np.array([2, 40])).tolist() == [[1.0, 1.0], [0.0, 0.0]]
    assert again.counters["fenced_rows"] == 3


def test_a_bad_rollback_record_in_snapshot_state_is_refused():
    node, _ = _rolled_back_node()
    store, state = node.models["m"].store.copy(), node.export_state("m")
    state["rollbacks"][0]["upper"] = [[-1, 5]]
    again = ReplicaNode("a", "dc0", "a:1", device="cpu", incarnation=2)
    with pytest.raises(ProtocolError) as e:
        again.import_state(SPEC, store, state, 4.0)
    assert e.value.reason == "bad_snapshot" and "m" not in again.models


def test_a_later_bad_record_leaves_no_fence_behind():
    node, _ = _rolled_back_node()
    store, state = node.models["m"].store.copy(), node.export_state("m")
    broken = dict(state["rollbacks"][0], id="second", upper="nonsense")
    state["rollbacks"].append(broken)
    again = ReplicaNode("a", "dc0", "a:1", device="cpu", incarnation=2)
    with pytest.raises(ProtocolError):
        again.import_state(SPEC, store, state, 4.0)
    assert not again.rollbacks and not len(again.fence)


def test_a_rollback_fences_origins_the_replica_has_not_heard_of():
    """Fault seed 56: a publisher that lost its state took a new origin and published just
    before the rollback, at replicas the rolling-back one had not heard from; its updates up
    to the rollback point must be fenced everywhere too."""
    node, _ = _rolled_back_node()                 # knows origin 1 only
    other = ReplicaNode("b", "dc0", "b:1", device="cpu")
    other.register_model(SPEC, 0.0)
    newcomer = PublisherChain(2)                  # restarted without state: a new origin
    early = _frame(newcomer, [5, 6], 7.0, 2.5)    # before the rollback point (3.0 s)
    other.publish(early, 2.6)
    record = node.rollbacks[next(iter(node.rollbacks))]
    other.receive(Frame(MsgType.ROLLBACK, {"from": "a", "rb": record}), 3.1)
    assert other.read_rows("m", "t", np.array([5, 6])).tolist() == [[0.0, 0.0], [0.0, 0.0]]
    node.publish(early, 3.2)                      # arriving late at the rolling-back replica
    assert node.read_rows("m", "t", np.array([5, 6])).tolist() == [[0.0, 0.0], [0.0, 0.0]]
    later = _frame(newcomer, [5], 8.0, 4.0)       # after the rollback point: applies
    node.publish(later, 4.0)
    assert node.read_rows("m", "t", np.array([5])).tolist() == [[8.0, 8.0]]
