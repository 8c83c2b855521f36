"""The endpoint CPU model: busy nodes send later, in order; ticks wait; scenario keys;
and on a tiny paper-like scenario it is what makes the full scan slower."""

from __future__ import annotations

import copy

import pytest

from ekko.core.codec import MsgType
from ekko.core.config import NodeConfig
from ekko.core.errors import UsageError
from ekko.replica.node import ReplicaNode
from simulator.cpu import CpuCosts, CpuModel
from simulator.events import Simulation
from simulator.experiment import run_scenario
from simulator.network import WanNetwork
from simulator.wan_config import WanConfig
from simulator.replicas import SimCluster
from simulator.scenario import load_scenario, parse_scenario


def test_send_at_delays_and_keeps_fifo():
    sim = Simulation(seed=1)
    net = WanNetwork(sim, WanConfig(["a", "b"], rtt_ms=10, nic_bps=8e9, wan_capacity_bps=8e9))
    net.add_node("x", "a"), net.add_node("y", "a"), net.add_node("z", "b")
    got = []

    def deliver(s, d, p):
        got.append((p, round(sim.now, 6)))

    net.send("x", "y", "first", 1000, deliver, at=0.5)      # its CPU finishes at 0.5 s
    net.send("x", "y", "second", 1000, deliver, at=0.5)
    net.send("x", "z", "far", 1000, deliver, at=0.7)
    net.send("y", "x", "idle", 1000, deliver)               # another node is not delayed
    net.send("x", "x", "self", 10, deliver, at=0.9)
    sim.run()
    assert [p for p, _ in got] == ["idle", "first", "second", "far", "self"]
    t = dict(got)
    assert t["idle"] < 0.001 and 0.5 < t["first"] < t["second"] < 0.501
    assert 0.705 < t["far"] < 0.706 and t["self"] == 0.9


def test_charge_accumulates_busy_time_from_the_nodes_counters():
    node = ReplicaNode("r0", "dc0", "r0", with_values=False)
    cpu = CpuModel(CpuCosts(per_message_s=0.01, apply_s_per_row=0.001, scan_s_per_row=1e-4, index_s_per_row=1e-3),
                   scan_scale={"emb": 100.0})
    assert cpu.charge(node, 1.0) == pytest.approx(1.01)
    cpu.note_applied("r0", 10)
    node.rows_walked_by_table[("m", "emb")] += 5          # 5 simulated rows = 500 real ones
    node.rows_walked_by_table[("m", "mlp")] += 3          # no cold rows: 3
    node.counters["rows_walked"] += 8
    node.counters["rows_scanned"] += 8 + 4                # and 4 index candidates
    # busy until 1.01; 0.01 + 10*0.001 + (500+3)*1e-4 + 4*1e-3
    assert cpu.charge(node, 1.0) == pytest.approx(1.01 + 0.01 + 0.01 + 0.0503 + 0.004)
    assert cpu.max_backlog_s == pytest.approx(0.01)
    assert cpu.charge(node, 5.0) == pytest.approx(5.01)   # idle again: only the message
    fresh = ReplicaNode("r0", "dc0", "r0", with_values=False)   # restarted: counters from zero
    assert cpu.charge(fresh, 6.0) == pytest.approx(6.01)


def test_bad_costs_and_scales_are_refused():
    with pytest.raises(UsageError):
        CpuCosts(per_message_s=-1, apply_s_per_row=0, scan_s_per_row=0, index_s_per_row=0)
    with pytest.raises(UsageError):
        CpuCosts.from_dict({"per_message_s": 1e-5})
    with pytest.raises(UsageError):
        CpuModel(CpuCosts(0, 0, 0, 0), scan_scale={"emb": 0.5})


def _pair(cost: CpuCosts | None):
    sim = Simulation(seed=2)
    net = WanNetwork(sim, WanConfig.uniform(1, intra_dc_rtt_ms=0.0))
    cluster = SimCluster(sim, net, NodeConfig(), with_values=False, shared_membership=True,
                         cpu=CpuModel(cost) if cost else None)
    a, b = cluster.add_replica("a", "dc0"), cluster.add_replica("b", "dc0")
    return sim, cluster, a, b


def test_busy_node_replies_late_and_in_order_and_its_ticks_wait():
    sim, cluster, a, _ = _pair(CpuCosts(per_message_s=0.25, apply_s_per_row=0, scan_s_per_row=0,
                                        index_s_per_row=0))
    seen = []
    orig = cluster._deliver

    def spy(src, dst, payload):
        seen.append((round(sim.now, 3), src, dst, payload[1].get("n")))
        orig(src, dst, payload)

    cluster._deliver = spy
    sim.run(until=0.01)                       # the first ticks of both nodes (0.25 s each)
    busy0 = cluster.cpu.busy_until("a")
    assert busy0 == pytest.approx(0.25)
    # Three small messages from b to a: a handles each at arrival (in order), but its CPU
    # serves them one after the other, after the tick it is still busy with.
    for i in range(3):
        cluster.net.send("b", "a", (MsgType.GOSSIP, {"k": "g", "from": "b", "n": i, "members": []}), 100,
                         cluster._deliver)
    sim.run(until=0.1)
    assert [s[3] for s in seen if s[2] == "a" and s[3] is not None] == [0, 1, 2]
    assert cluster.cpu.busy_until("a") == pytest.approx(busy0 + 0.75)
    ticks = []
    real_tick = a.tick
    a.tick = lambda now: (ticks.append(now), real_tick(now))[1]
    a._next_gossip = a._next_ae = 0.2                         # a timer due while busy (until 1.0)
    cluster._arm(a)
    sim.run(until=1.5)
    assert ticks and ticks[0] == pytest.approx(1.0)

TINY = {
    "scenario": {"name": "tiny-paper", "seed": 4, "duration_s": 3, "settle_s": 25, "replicas": 9,
                 "systems": ["ekko-no-gateways", "ekko-full-scan"], "samples_per_batch": 2, "mode": "metadata"},
    "wan": {"dcs": ["a", "b", "c"], "rtt_ms": {"a-b": 60, "a-c": 120, "b-c": 90}, "background_load": 0.5},
    "node": {"preset": "wan"},
    "table": [{"name": "emb", "rows": 2000, "dim": 64, "shards": 4}],
    "workload": {"batch_interval_s": 0.2, "sparse": [{"table": "emb", "rows_per_s": 500}]},
}


def _cross_mean(cfg) -> dict[str, float]:
    res = run_scenario(parse_scenario(cfg))
    return {k: v["latency_s"]["cross_dc"]["mean"] for k, v in res["systems"].items()}


def test_full_scan_is_slower_only_through_the_cpu_model():
    """Same protocols, same seed: with the paper's measured constants and many cold rows
    the full scan is clearly slower than shard versions; without the CPU model it is not
    (so this fails if the model, the cold rows or the real full scan is removed)."""
    paper = load_scenario("paper")
    costs = {k: getattr(paper.cpu, k) for k in ("per_message_s", "apply_s_per_row", "scan_s_per_row",
                                                 "index_s_per_row")}
    on = copy.deepcopy(TINY)
    on["cpu"] = costs
    on["table"][0]["cold_rows"] = 200_000_000    # a ~0.8 s scan of the table (4 shards) per pull
    off = copy.deepcopy(TINY)
    with_cpu, without = _cross_mean(on), _cross_mean(off)
    assert with_cpu["ekko-full-scan"] > 3 * with_cpu["ekko-no-gateways"]
    assert without["ekko-full-scan"] < 1.25 * without["ekko-no-gateways"]
    # The CPU charges of a sync with shard versions are small.
    assert with_cpu["ekko-no-gateways"] < 1.25 * without["ekko-no-gateways"]


def test_scenario_keys():
    sc = load_scenario("paper")
    assert sc.cpu is not None and sc.cold_rows["emb"] > 0
    assert sc.scan_scale()["emb"] == pytest.approx((20000 + sc.cold_rows["emb"]) / 20000)
    bad = copy.deepcopy(TINY)
    bad["table"][0]["cold_rows"] = -1
    with pytest.raises(UsageError):
        parse_scenario(bad)
    bad["table"][0]["cold_rows"] = 10
    bad["cpu"] = {"per_message_s": "x", "apply_s_per_row": 0, "scan_s_per_row": 0, "index_s_per_row": 0}
    with pytest.raises(UsageError):
        parse_scenario(bad)
    assert parse_scenario(TINY).cpu is None
