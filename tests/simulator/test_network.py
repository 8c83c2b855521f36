"""WAN model: analytic delays, queueing, shared links, faults, accounting."""

from __future__ import annotations

import math

import pytest

from ekko.core.codec import Keyring, MsgType, encode_frame
from ekko.core.errors import UsageError
from simulator import network as nw
from simulator.events import Simulation
from simulator.network import WanNetwork
from simulator.wan_config import WanConfig

MBIT = 1e6


def make(cfg: WanConfig, seed: int = 1, layout: dict[str, str] | None = None):
    sim = Simulation(seed)
    net = WanNetwork(sim, cfg)
    for node, dc in (layout or {"a1": "a", "a2": "a", "b1": "b", "b2": "b"}).items():
        net.add_node(node, dc)
    log: list = []

    def deliver(src, dst, payload):
        log.append((sim.now, src, dst, payload))

    return sim, net, log, deliver


def two_dc(**kw) -> WanConfig:
    base = dict(rtt_ms={("a", "b"): 80.0}, intra_dc_rtt_ms=0.4, nic_bps=100 * MBIT, wan_capacity_bps=10 * MBIT)
    base.update(kw)
    return WanConfig(["a", "b"], **base)


def test_single_intra_dc_message_matches_analytic_delay():
    sim, net, log, deliver = make(two_dc())
    nbytes = 12_500  # 100 kbit: 1 ms at 100 Mbit/s
    assert net.send("a1", "a2", "m", nbytes, deliver)
    sim.run()
    expected = nbytes * 8 / (100 * MBIT) + 0.4e-3 / 2 + nbytes * 8 / (100 * MBIT)
    assert log == [(pytest.approx(expected, abs=1e-12), "a1", "a2", "m")]
    assert net.wan_bytes_total == 0


def test_single_cross_dc_message_matches_analytic_delay_with_background_load():
    sim, net, log, deliver = make(two_dc(background_load=0.75))
    nbytes = 12_500
    net.send("a1", "b1", "m", nbytes, deliver)
    sim.run()
    nic = nbytes * 8 / (100 * MBIT)
    wan = nbytes * 8 / (10 * MBIT * 0.25)
    assert log[0][0] == pytest.approx(nic + wan + 0.040 + nic, abs=1e-12)
    assert net.link_rate_bps("a", "b") == pytest.approx(2.5 * MBIT)


def test_frame_size_comes_from_the_codec():
    sim, net, log, deliver = make(two_dc())
    frame = encode_frame(MsgType.GOSSIP, {"members": list(range(100))}, Keyring({1: b"k" * 16}))
    net.send_frame("a1", "b1", frame, deliver)
    sim.run()
    assert log[0][3] is frame
    assert net.wan_bytes == {("a", "b"): len(frame)}
    assert net.node_bytes("a1") == (len(frame), 0) and net.node_bytes("b1") == (0, len(frame))


def test_back_to_back_sends_queue_at_the_sender_nic():
    sim, net, log, deliver = make(two_dc())
    ser = 12_500 * 8 / (100 * MBIT)
    for k in range(5):
        net.send("a1", "a2", k, 12_500, deliver)
    assert net.egress_backlog_s("a1") == pytest.approx(5 * ser)
    sim.run()
    times = [t for t, *_ in log]
    assert [p for *_, p in log] == list(range(5))  # FIFO
    # k-th leaves the NIC at (k+1)*ser; the receiver NIC keeps pace, so +prop +ser each
    assert times == [pytest.approx((k + 1) * ser + 0.2e-3 + ser, abs=1e-12) for k in range(5)]


def test_receiver_nic_is_a_shared_fifo():
    sim, net, log, deliver = make(two_dc(wan_capacity_bps=1e15))
    ser = 12_500 * 8 / (100 * MBIT)
    net.send("a1", "b1", "x", 12_500, deliver)
    net.send("a2", "b1", "y", 12_500, deliver)
    sim.run()
    # both reach b1 at the same time; the second waits for the first on b1's ingress
    (t1, *_), (t2, *_) = log
    assert t2 - t1 == pytest.approx(ser, abs=1e-12)


def test_wan_link_is_a_shared_bottleneck_reduced_by_background_load():
    def finish(load: float) -> tuple[float, list[str]]:
        cfg = two_dc(nic_bps=10_000 * MBIT, background_load=load)
        sim, net, log, deliver = make(cfg)
        for k in range(50):
            net.send("a1", "b1", f"x{k}", 125_000, deliver)  # 1 Mbit each
            net.send("a2", "b2", f"y{k}", 125_000, deliver)
        sim.run()
        return log[-1][0], [p[0] for *_, p in log]

    t0, order = finish(0.0)
    # 100 Mbit over a 10 Mbit/s link: 10 s, plus propagation and tiny NIC times
    assert t0 == pytest.approx(10.0 + 0.040, abs=2e-3)
    assert order[:4] == ["x", "y", "x", "y"]  # both senders share the link, FIFO by arrival
    t_half, _ = finish(0.5)
    assert t_half == pytest.approx(20.0 + 0.040, abs=2e-3)


def test_links_are_per_ordered_pair_and_capacity_overrides():
    cfg = two_dc(nic_bps=10_000 * MBIT, wan_capacity_overrides={("b", "a"): 20 * MBIT})
    sim, net, log, deliver = make(cfg)
    net.send("a1", "b1", "ab", 1_250_000, deliver)  # 10 Mbit: 1 s on a->b
    net.send("b1", "a1", "ba", 1_250_000, deliver)  # 0.5 s on b->a, not behind a->b
    sim.run()
    done = {p: t for t, _, _, p in log}
    nic = 2 * 1e-3  # 10 Mbit through two 10 Gbit/s NICs
    assert done["ba"] == pytest.approx(0.5 + 0.040 + nic, abs=1e-9)
    assert done["ab"] == pytest.approx(1.0 + 0.040 + nic, abs=1e-9)
    net.set_wan_capacity("a", "b", 5 * MBIT)
    assert net.link_rate_bps("a", "b") == pytest.approx(5 * MBIT)


def test_backlog_and_runtime_background_load():
    sim, net, log, deliver = make(two_dc(nic_bps=10_000 * MBIT))
    net.send("a1", "b1", 0, 1_250_000, deliver)
    sim.run(until=0.01)
    assert net.wan_backlog_s("a", "b") == pytest.approx(1.0 - 0.01, abs=1e-3)
    net.set_background_load("a", "b", 0.5)
    sim.run()
    net.send("a1", "b1", 1, 1_250_000, deliver)
    t_start = sim.now
    sim.run()
    assert log[-1][0] - t_start == pytest.approx(2.0 + 0.040 + 2e-3, abs=1e-9)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_loss_rate_within_statistical_bounds(p):
    n = 20_000
    sim, net, log, deliver = make(two_dc(loss=p, nic_bps=1e12, wan_capacity_bps=1e12))
    for k in range(n):
        net.send("a1", "b1", k, 100, deliver)
    sim.run()
    lost = net.dropped[nw.DROP_LOSS]
    sigma = math.sqrt(n * p * (1 - p))
    assert abs(lost - n * p) < 5 * sigma
    assert lost + len(log) == n == net.sent
    # lost messages still used the link
    assert net.wan_bytes_total == 100 * n


def test_per_pair_loss_override_and_set_loss():
    cfg = two_dc(loss_overrides={("a", "b"): 1.0})
    sim, net, log, deliver = make(cfg)
    for k in range(20):
        net.send("a1", "b1", k, 100, deliver)
        net.send("b1", "a1", k, 100, deliver)
        net.send("a1", "a2", k, 100, deliver)
    sim.run()
    assert net.dropped[nw.DROP_LOSS] == 20 and len(log) == 40
    net.set_loss(0.0, "a", "b")
    net.send("a1", "b1", "ok", 100, deliver)
    sim.run()
    assert log[-1][3] == "ok"


def test_partition_blocks_across_groups_and_heal_restores():
    layout = {"a1": "a", "a2": "a", "b1": "b", "c1": "c"}
    cfg = WanConfig(["a", "b", "c"], rtt_ms=50.0)
    sim, net, log, deliver = make(cfg, layout=layout)
    net.partition([{"a"}, {"b1"}])  # c1 is in no group: it forms the third group
    assert not net.send("a1", "b1", 1, 100, deliver)
    assert not net.send("c1", "a2", 2, 100, deliver)
    assert net.send("a1", "a2", 3, 100, deliver)
    sim.run()
    assert [p for *_, p in log] == [3]
    assert net.dropped[nw.DROP_PARTITION] == 2
    net.heal()
    assert net.send("a1", "b1", 4, 100, deliver) and net.send("c1", "a2", 5, 100, deliver)
    sim.run()
    assert sorted(p for *_, p in log) == [3, 4, 5]


def test_partition_drops_messages_in_flight():
    sim, net, log, deliver = make(two_dc())
    net.send("a1", "b1", "doomed", 100, deliver)
    sim.run(until=0.010)  # on the wire: 40 ms propagation
    net.partition([{"a"}, {"b"}])
    sim.run()
    assert log == [] and net.dropped[nw.DROP_PARTITION] == 1


def test_partition_groups_must_not_overlap():
    sim, net, log, deliver = make(two_dc())
    with pytest.raises(UsageError):
        net.partition([{"a", "b1"}, {"b1"}])


def test_cut_is_one_directional():
    sim, net, log, deliver = make(two_dc())
    net.cut("a", "b")
    assert not net.send("a1", "b1", "ab", 100, deliver)
    assert net.send("b1", "a1", "ba", 100, deliver)
    sim.run()
    assert [p for *_, p in log] == ["ba"] and net.dropped[nw.DROP_CUT] == 1
    net.uncut("a", "b")
    assert net.send("a1", "b1", "ab2", 100, deliver)


def test_crash_drops_in_flight_and_restart_does_not_resurrect():
    sim, net, log, deliver = make(two_dc())
    drops = []
    net.on_drop = lambda s, d, p, cause: drops.append((s, d, p, cause))
    net.send("a1", "b1", "in-flight", 100, deliver)
    net.send("a1", "b2", "other", 100, deliver)
    sim.run(until=0.010)
    net.crash("b1")
    assert not net.is_up("b1")
    assert not net.send("a1", "b1", "to-dead", 100, deliver)
    assert not net.send("b1", "a1", "from-dead", 100, deliver)
    net.restart("b1")
    sim.run()
    assert [p for *_, p in log] == ["other"]
    assert net.dropped == {nw.DROP_DST_CRASHED: 1, nw.DROP_DST_DOWN: 1, nw.DROP_SRC_DOWN: 1}
    assert ("a1", "b1", "in-flight", nw.DROP_DST_CRASHED) in drops
    # after the restart it talks again
    net.send("a1", "b1", "fresh", 100, deliver)
    sim.run()
    assert log[-1][3] == "fresh"


def test_crash_drops_messages_still_in_the_sender_nic_and_on_ingress():
    sim, net, log, deliver = make(two_dc())
    ser = 12_500 * 8 / (100 * MBIT)  # 1 ms
    for k in range(5):
        net.send("a1", "b1", k, 12_500, deliver)
    sim.run(until=2.5 * ser)  # two have left the NIC
    net.crash("a1")
    net.restart("a1")
    assert net.egress_backlog_s("a1") == 0.0
    sim.run()
    assert [p for *_, p in log] == [0, 1]  # already on the WAN: delivered
    assert net.dropped[nw.DROP_SRC_CRASHED] == 3
    # receiver crash while the message sits in its ingress queue
    net.send("a2", "a1", "x", 12_500, deliver)
    sim.run(until=sim.now + 1.5 * ser + 0.2e-3)
    net.crash("a1")
    sim.run()
    assert net.dropped[nw.DROP_DST_CRASHED] == 1 and log[-1][3] == 1


def test_duplicate_and_reorder_and_jitter():
    sim, net, log, deliver = make(two_dc(duplicate=1.0, reorder_delay_ms=5.0))
    net.send("a1", "b1", "d", 100, deliver)
    sim.run()
    assert [p for *_, p in log] == ["d", "d"] and net.duplicated == 1

    sim, net, log, deliver = make(two_dc(reorder=0.5, reorder_delay_ms=50.0, nic_bps=1e12, wan_capacity_bps=1e12))
    for k in range(200):
        net.send("a1", "b1", k, 100, deliver)
    sim.run()
    order = [p for *_, p in log]
    assert sorted(order) == list(range(200)) and order != list(range(200))
    assert max(t for t, *_ in log) < 0.040 + 0.050 + 1e-6

    sim, net, log, deliver = make(two_dc(jitter_ms=3.0, nic_bps=1e12, wan_capacity_bps=1e12))
    for k in range(200):
        net.send("a1", "b1", k, 100, deliver)
    sim.run()
    lat = [t for t, *_ in log]
    assert all(0.040 <= t < 0.043 + 1e-6 for t in lat) and max(lat) - min(lat) > 2e-3


def test_same_seed_same_delivery_trace():
    def trace(seed):
        sim, net, log, deliver = make(two_dc(loss=0.2, jitter_ms=2.0, duplicate=0.1, reorder=0.1,
                                             reorder_delay_ms=10.0), seed=seed)
        for k in range(300):
            net.send(["a1", "a2", "b1"][k % 3], ["b2", "b1", "a2"][k % 3], k, 1000 + k, deliver)
        sim.run()
        return log, dict(net.dropped)

    assert trace(4) == trace(4)
    assert trace(4) != trace(5)


def test_byte_and_message_accounting():
    cfg = two_dc(per_message_overhead_bytes=40)
    sim, net, log, deliver = make(cfg)
    net.send("a1", "b1", 0, 1000, deliver)
    net.send("a1", "b2", 0, 500, deliver)
    net.send("b1", "a1", 0, 200, deliver)
    net.send("a1", "a2", 0, 300, deliver)
    net.send("a1", "a1", "self", 7, deliver)  # loopback: no NIC, no WAN
    sim.run()
    assert net.wan_bytes == {("a", "b"): 1040 + 540, ("b", "a"): 240}
    assert net.wan_bytes_total == 1040 + 540 + 240
    assert net.node_bytes("a1") == (1040 + 540 + 340 + 47, 240 + 47)
    assert net.node_messages("a1") == (4, 2)
    assert net.sent == net.delivered == 5
    assert log[0][0] == 0.0 and log[0][3] == "self"


def test_config_validation_and_presets():
    with pytest.raises(UsageError):
        WanConfig(["a", "b", "c"], rtt_ms={("a", "b"): 10.0})  # missing pairs
    with pytest.raises(UsageError):
        WanConfig(["a", "a"])
    with pytest.raises(UsageError):
        WanConfig(["a", "b"], loss=1.5)
    with pytest.raises(UsageError):
        WanConfig(["a", "b"], background_load=1.0)
    with pytest.raises(UsageError):
        WanConfig(["a", "b"], loss_overrides={("a", "zz"): 0.1})
    with pytest.raises(UsageError):
        WanConfig(["a", "b"], rtt_ms=[[0, 1]])
    m = WanConfig(["a", "b"], rtt_ms=[[0, 10], [30, 0]])
    assert m.rtt_s("a", "b") == pytest.approx(0.010) and m.rtt_s("b", "a") == pytest.approx(0.030)
    asym = WanConfig(["a", "b"], rtt_ms={("a", "b"): 10.0, ("b", "a"): 20.0})
    assert asym.rtt_s("b", "a") == pytest.approx(0.020)
    u = WanConfig.uniform(["x", "y"], rtt_ms=70.0, wan_capacity_bps=1e8)
    assert u.rtt_s("x", "y") == pytest.approx(0.070) and u.rtt_s("x", "x") == pytest.approx(0.0005)
    sim = Simulation(0)
    net = WanNetwork(sim, u)
    net.add_node("n", "x")
    with pytest.raises(UsageError):
        net.add_node("n", "x")
    with pytest.raises(UsageError):
        net.add_node("m", "nowhere")
    assert net.nodes_in("x") == ["n"] and net.dc_of("n") == "x" and net.nodes == ["n"]
    net.add_node("o", "y")
    assert net.dcs == ["x", "y"] and net.rtt_s("n", "o") == pytest.approx(0.070)


def test_many_nodes_and_messages_fast_enough():
    # 2,000 nodes in 4 DCs, 60k messages: guards against per-node or O(n) work per message
    cfg = WanConfig.uniform(4, rtt_ms=60.0, jitter_ms=1.0, loss=0.01)
    sim = Simulation(2)
    net = WanNetwork(sim, cfg)
    nodes = [f"n{i}" for i in range(2000)]
    for i, n in enumerate(nodes):
        net.add_node(n, f"dc{i % 4}")
    got = [0]

    def deliver(s, d, p):
        got[0] += 1

    rng = sim.rng
    for k in range(60_000):
        net.send(nodes[rng.randrange(2000)], nodes[rng.randrange(2000)], k, 2000, deliver)
    sim.run()
    assert got[0] + net.dropped[nw.DROP_LOSS] == 60_000


def test_repeated_crash_and_restart_are_idempotent():
    sim, net, log, deliver = make(two_dc())
    net.crash("b1")
    net.crash("b1")
    net.restart("b1")
    net.restart("b1")
    assert net.is_up("b1") and net.send("a1", "b1", "x", 100, deliver)
    net.crash("a2")
    assert net.send("a1", "b1", "y", 100, deliver)  # other nodes unaffected
    sim.run()
    assert [p for *_, p in log] == ["x", "y"]


def test_delivery_times_match_an_independent_simpy_model():
    """The analytic FIFO servers give exactly what a process-per-message SimPy model gives."""
    simpy = pytest.importorskip("simpy")
    import numpy as np

    n_nodes, n_dcs, n_msgs = 40, 3, 1500
    nic, link, rtt_ms, lan_rtt_ms, load = 1e9, 50e6, 30.0, 0.4, 0.3
    rng = np.random.default_rng(11)
    times = np.cumsum(rng.exponential(1e-4, n_msgs)).tolist()
    src = rng.integers(0, n_nodes, n_msgs).tolist()
    dst = ((np.array(src) + rng.integers(1, n_nodes, n_msgs)) % n_nodes).tolist()
    size = rng.integers(100, 50_000, n_msgs).tolist()

    sim = Simulation(0)
    net = WanNetwork(sim, WanConfig.uniform(n_dcs, rtt_ms=rtt_ms, intra_dc_rtt_ms=lan_rtt_ms, nic_bps=nic,
                                            wan_capacity_bps=link, background_load=load))
    for i in range(n_nodes):
        net.add_node(i, f"dc{i % n_dcs}")
    ours: dict[int, float] = {}
    for k in range(n_msgs):
        sim.schedule_at(times[k], net.send, src[k], dst[k], k, size[k],
                        lambda s, d, p: ours.__setitem__(p, sim.now))
    sim.run()

    env = simpy.Environment()
    out_q = [simpy.Resource(env) for _ in range(n_nodes)]
    in_q = [simpy.Resource(env) for _ in range(n_nodes)]
    links = {(a, b): simpy.Resource(env) for a in range(n_dcs) for b in range(n_dcs)}
    ref: dict[int, float] = {}

    def message(k):
        yield env.timeout(times[k])
        s, d, nb = src[k], dst[k], size[k]
        with out_q[s].request() as r:
            yield r
            yield env.timeout(nb * 8 / nic)
        a, b = s % n_dcs, d % n_dcs
        if a != b:
            with links[a, b].request() as r:
                yield r
                yield env.timeout(nb * 8 / (link * (1 - load)))
        yield env.timeout((rtt_ms if a != b else lan_rtt_ms) * 1e-3 / 2)
        with in_q[d].request() as r:
            yield r
            yield env.timeout(nb * 8 / nic)
        ref[k] = env.now

    for k in range(n_msgs):
        env.process(message(k))
    env.run()
    assert ours.keys() == ref.keys()
    worst = max(abs(ours[k] - ref[k]) for k in ref)
    assert worst < 1e-9
    assert max(ref.values()) > times[-1] + 0.5  # the links really were congested
