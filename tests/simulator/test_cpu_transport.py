"""The CPU model's transport terms (receive/send, per message and per byte), the shared
core pool (``[cpu] shared_cores``) and the checks of a ``[cpu]`` table."""

from __future__ import annotations

import copy

import pytest

from ekko.core.codec import MsgType
from ekko.core.errors import UsageError
from ekko.core.spec import ModelSpec, TableSpec
from ekko.replica.node import ReplicaNode
from simulator.cpu import TRANSPORT_FIELDS, CpuCosts, CpuModel
from simulator.experiment import run_scenario
from simulator.parallel import run_partitioned
from simulator.scenario import load_scenario, parse_scenario
from tests.simulator.test_cpu import TINY, _pair

RECV_MSG, RECV_BYTE, SEND_MSG, SEND_BYTE = 1e-3, 1e-6, 2e-3, 3e-6
TRANSPORT = CpuCosts(0, 0, 0, 0, recv_per_message_s=RECV_MSG, recv_s_per_byte=RECV_BYTE,
                     send_per_message_s=SEND_MSG, send_s_per_byte=SEND_BYTE)
SPEC = ModelSpec("m", tables=[TableSpec("emb", rows=100, dim=8)])


def _spied_pair(costs: CpuCosts):
    """Two replicas with a model (so anti-entropy summaries flow) and a log of every
    delivered message as (src, dst, wire size)."""
    sim, cluster, a, b = _pair(costs)
    cluster.register_everywhere(SPEC)
    got: list[tuple[str, str, int]] = []
    orig = cluster._deliver

    def spy(src, dst, payload):
        got.append((src, dst, payload[2]))
        orig(src, dst, payload)

    cluster._deliver = spy
    return sim, cluster, a, got


def test_each_transport_term_is_charged_per_message_and_per_byte():
    """Only transport costs: all busy time is sends (each its size) and receives (each its size)."""
    sim, cluster, _, got = _spied_pair(TRANSPORT)
    sim.run(until=3.0)
    assert len(got) > 10
    sent, delivered = cluster.net.sent, cluster.net.delivered
    assert delivered == len(got) and sent - delivered <= 2       # at most one in flight each way
    sizes = {size for _, _, size in got}
    assert len(sizes) == 1                                       # equal-digest summaries
    size = sizes.pop()
    want = delivered * (RECV_MSG + size * RECV_BYTE) + sent * (SEND_MSG + size * SEND_BYTE)
    assert cluster.cpu.busy_s == pytest.approx(want, rel=1e-9)


def test_a_received_message_of_known_size_and_its_replies():
    """A 10 kB message (a size the test injects): its receive terms plus a send term per reply,
    the replies' sizes being those the cluster put on the WAN (``bytes_by_type``)."""
    sim, cluster, _, _ = _spied_pair(TRANSPORT)
    sim.run(until=0.001)
    busy0, sent0, bytes0 = cluster.cpu.busy_s, cluster.net.sent, sum(cluster.bytes_by_type.values())
    start = max(sim.now, cluster.cpu.busy_until("a"))
    body = {"k": "g", "from": "b", "members": []}
    # Taken now (a deferred receive is _deliver's: see the tests below).
    cluster._take("b", "a", (MsgType.GOSSIP, body, 10_000), 10_000)
    replies, reply_bytes = cluster.net.sent - sent0, sum(cluster.bytes_by_type.values()) - bytes0
    want = RECV_MSG + 10_000 * RECV_BYTE + replies * SEND_MSG + reply_bytes * SEND_BYTE
    assert cluster.cpu.busy_s - busy0 == pytest.approx(want, rel=1e-9)
    assert cluster.cpu.busy_until("a") == pytest.approx(start + want, rel=1e-9)


def test_transport_cost_formula():
    m = CpuModel(TRANSPORT)
    assert m.transport_cost(None, 0, 0) == 0.0                     # a tick that sends nothing
    assert m.transport_cost(None, 2, 300) == pytest.approx(2 * SEND_MSG + 300 * SEND_BYTE)
    assert m.transport_cost(500, 0, 0) == pytest.approx(RECV_MSG + 500 * RECV_BYTE)
    node = ReplicaNode("r0", "dc0", "r0", with_values=False)
    assert m.charge(node, 1.0, m.transport_cost(500, 1, 100)) == pytest.approx(
        1.0 + RECV_MSG + 500 * RECV_BYTE + SEND_MSG + 100 * SEND_BYTE)


def test_zero_defaults_charge_exactly_as_before():
    """Without transport keys the charge is the old one to the last bit."""
    plain = CpuCosts.from_dict({"per_message_s": 0.25, "apply_s_per_row": 0, "scan_s_per_row": 0,
                                "index_s_per_row": 0})
    assert all(getattr(plain, k) == 0.0 for k in TRANSPORT_FIELDS)
    assert not plain.charges_transport and plain.shared_cores is None
    assert TRANSPORT.charges_transport
    sim, cluster, _, got = _spied_pair(plain)
    sim.run(until=3.0)
    assert got and cluster.cpu.busy_s == 0.25 * cluster.cpu.charges
    assert not plain.defers_receive
    paper = load_scenario("paper").cpu      # calibrated on real daemons (bench/daemon_costs.py)
    assert paper is not None and paper.charges_transport and paper.defers_receive and paper.shared_cores is None
    assert "shared_cores" not in CpuModel(paper).summary()


def test_a_cpu_table_sets_the_transport_terms_and_the_pool():
    cfg = copy.deepcopy(TINY)
    cfg["cpu"] = {"per_message_s": 1e-5, "apply_s_per_row": 0, "scan_s_per_row": 0, "index_s_per_row": 0,
                  "recv_per_message_s": 1.6e-5, "recv_s_per_byte": 8e-10, "send_per_message_s": 3.3e-5,
                  "send_s_per_byte": 2e-9, "shared_cores": 2, "measured_by": "a note"}
    got = parse_scenario(cfg).cpu
    assert (got.recv_per_message_s, got.recv_s_per_byte, got.send_per_message_s, got.send_s_per_byte,
            got.shared_cores) == (1.6e-5, 8e-10, 3.3e-5, 2e-9, 2)
    assert got.charges_transport


def _flood(costs: CpuCosts, replicas: int = 9, messages: int = 10) -> float:
    """Every replica handles ``messages`` messages arriving at 0; when all work is done."""
    cpu = CpuModel(costs)
    nodes = [ReplicaNode(f"r{i}", "dc0", f"r{i}", with_values=False) for i in range(replicas)]
    done = 0.0
    for _ in range(messages):
        for node in nodes:
            done = max(done, cpu.charge(node, 0.0))
    return done


def test_shared_cores_queue_work_across_replicas():
    each = CpuCosts(1e-3, 0, 0, 0)
    two = CpuCosts(1e-3, 0, 0, 0, shared_cores=2)
    # 9 replicas x 10 ms of work: 10 ms with a core each, 90 ms / 2 cores = 45 ms shared.
    assert _flood(each) == pytest.approx(0.010)
    assert _flood(two) == pytest.approx(0.045)
    assert _flood(two) / _flood(each) == pytest.approx(4.5)
    # As many cores as replicas: the same as a core each.
    assert _flood(CpuCosts(1e-3, 0, 0, 0, shared_cores=9)) == pytest.approx(0.010)


def test_a_replica_still_does_one_thing_at_a_time_on_a_pool():
    cpu = CpuModel(CpuCosts(1e-3, 0, 0, 0, shared_cores=4))
    node = ReplicaNode("r0", "dc0", "r0", with_values=False)
    assert [cpu.charge(node, 0.0) for _ in range(3)] == pytest.approx([0.001, 0.002, 0.003])
    other = ReplicaNode("r1", "dc0", "r1", with_values=False)
    assert cpu.charge(other, 0.0) == pytest.approx(0.001)      # a free core: no wait
    assert cpu.summary()["shared_cores"] == 4


def test_shared_cores_in_a_scenario_slow_the_cluster():
    """9 replicas on 1 shared core with a heavy (10 ms) per-message cost: replies wait for
    the other replicas' work, so rows arrive later than with a core each."""
    base = copy.deepcopy(TINY)
    base["scenario"]["systems"] = ["ekko-no-gateways"]
    base["cpu"] = {"per_message_s": 1e-2, "apply_s_per_row": 0, "scan_s_per_row": 0, "index_s_per_row": 0}
    shared = copy.deepcopy(base)
    shared["cpu"]["shared_cores"] = 1
    own, pooled = (run_scenario(parse_scenario(c))["systems"]["ekko-no-gateways"] for c in (base, shared))
    assert pooled["cpu"]["shared_cores"] == 1 and "shared_cores" not in own["cpu"]
    assert pooled["cpu"]["max_backlog_s"] > 2 * own["cpu"]["max_backlog_s"]
    assert pooled["latency_s"]["all"]["mean"] > own["latency_s"]["all"]["mean"]


@pytest.mark.parametrize("key, value, words", [
    ("recv_s_per_byte", -1e-9, "recv_s_per_byte"),
    ("send_per_message_s", "1e-5", "send_per_message_s"),
    ("recv_per_message_s", True, "recv_per_message_s"),
    ("send_s_per_byte", float("nan"), "send_s_per_byte"),
    ("per_message_s", "x", "per_message_s"),
    ("shared_cores", 0, "shared_cores"),
    ("shared_cores", -2, "shared_cores"),
    ("shared_cores", 1.5, "shared_cores"),
    ("shared_cores", "2", "shared_cores"),
])
def test_bad_cpu_values_are_refused_clearly(key, value, words):
    cfg = copy.deepcopy(TINY)
    cfg["cpu"] = {"per_message_s": 1e-5, "apply_s_per_row": 0, "scan_s_per_row": 0, "index_s_per_row": 0,
                  key: value}
    with pytest.raises(UsageError, match=words):
        parse_scenario(cfg)


def test_a_partitioned_run_refuses_a_shared_pool():
    cfg = copy.deepcopy(TINY)
    cfg["cpu"] = {"per_message_s": 1e-5, "apply_s_per_row": 0, "scan_s_per_row": 0, "index_s_per_row": 0,
                  "shared_cores": 2}
    with pytest.raises(UsageError, match="shared_cores"):
        run_partitioned(parse_scenario(cfg), "ekko", workers=2)


# --------------------------------------------------------------------------- deferred receive, publish path
WAKE = 5e-4
DEFERRED = CpuCosts(0, 0, 0, 0, recv_per_message_s=RECV_MSG, recv_s_per_byte=RECV_BYTE, wake_s=WAKE)


def _taken(cluster) -> list[tuple[float, str, int]]:
    """Spy on when each message takes effect at its receiver: (time, dst, size)."""
    got: list[tuple[float, str, int]] = []
    orig = cluster._take

    def spy(src, dst, payload, received_bytes=None):
        got.append((cluster.sim.now, dst, payload[2]))
        orig(src, dst, payload, received_bytes)

    cluster._take = spy
    return got


def test_a_message_takes_effect_after_the_wake_and_its_receive_in_arrival_order():
    sim, cluster, _, _ = _pair(DEFERRED)
    sim.run(until=0.5)
    taken = _taken(cluster)
    t0 = max(sim.now, cluster.cpu.busy_until("a"))
    body = {"k": "g", "from": "b", "members": []}
    cluster._deliver("b", "a", (MsgType.GOSSIP, body, 10_000))
    cluster._deliver("b", "a", (MsgType.GOSSIP, body, 2_000))
    first = t0 + WAKE + RECV_MSG + 10_000 * RECV_BYTE
    # the second arrived with the first, but a's core is busy receiving the first
    assert cluster.cpu.busy_until("a") == pytest.approx(first + RECV_MSG + 2_000 * RECV_BYTE)
    assert taken == []                                   # nothing took effect on arrival
    sim.run(until=first + 0.01)
    mine = [(t, size) for t, dst, size in taken if dst == "a" and size in (10_000, 2_000)]
    assert [size for _, size in mine] == [10_000, 2_000]
    assert mine[0][0] == pytest.approx(first)
    assert mine[1][0] == pytest.approx(first + RECV_MSG + 2_000 * RECV_BYTE)


def test_a_message_waiting_for_a_crashed_receiver_is_lost():
    sim, cluster, a, _ = _pair(DEFERRED)
    sim.run(until=0.5)
    rx0 = a.counters["rx_gossip"]
    cluster._deliver("b", "a", (MsgType.GOSSIP, {"k": "g", "from": "b", "members": []}, 10_000))
    cluster.net.crash("a")
    sim.run(until=0.6)
    assert a.counters["rx_gossip"] == rx0


def test_without_receive_terms_a_message_takes_effect_on_arrival():
    sim, cluster, _, _ = _pair(TRANSPORT.__class__(0, 0, 0, 0, send_per_message_s=SEND_MSG))
    taken = _taken(cluster)
    cluster._deliver("b", "a", (MsgType.GOSSIP, {"k": "g", "from": "b", "members": []}, 10_000))
    assert taken == [(sim.now, "a", 10_000)]


PUB = CpuCosts(0, 0, 0, 0, publisher_per_message_s=2e-3, publisher_s_per_byte=1e-8,
               publish_recv_per_message_s=1e-3, publish_recv_s_per_byte=2e-8, wake_s=WAKE)


def test_a_publish_takes_the_publisher_the_hop_the_wake_and_the_ingest_receive():
    sim, cluster, _, _ = _pair(PUB)
    sim.run(until=0.5)
    t0 = max(sim.now, cluster.cpu.busy_until("a"))
    at: list[float] = []
    cluster.publish("a", 100_000, lambda: at.append(sim.now))
    assert at == []
    sim.run(until=1.0)
    want = t0 + 2e-3 + 100_000 * 1e-8 + WAKE + 1e-3 + 100_000 * 2e-8   # intra-DC RTT 0 in _pair
    assert at == [pytest.approx(want)]
    assert PUB.publisher_s(100_000) == pytest.approx(3e-3)
    assert PUB.receive_s(100_000, publish=True) == pytest.approx(3e-3)


def test_publishes_queue_behind_the_publisher_and_share_a_pool():
    one = CpuCosts(**{**{k: getattr(PUB, k) for k in ("per_message_s", "apply_s_per_row", "scan_s_per_row",
                                                      "index_s_per_row")},
                      **{k: getattr(PUB, k) for k in ("publisher_per_message_s", "publisher_s_per_byte",
                                                      "publish_recv_per_message_s", "publish_recv_s_per_byte",
                                                      "wake_s")}, "shared_cores": 1})
    sim, cluster, _, _ = _pair(one)
    sim.run(until=0.5)
    at: list[float] = []
    t0 = max(sim.now, cluster.cpu.busy_until("a"))
    for _ in range(2):
        cluster.publish("a", 0, lambda: at.append(sim.now))
    sim.run(until=1.0)
    # one core: publisher 2 ms, (wake) ingest 1 ms, publisher 2 ms -- it waited for the first's
    # receive to free the core -- then (wake) ingest 1 ms
    assert at[0] == pytest.approx(t0 + 2e-3 + WAKE + 1e-3)
    assert at[1] == pytest.approx(t0 + 2e-3 + WAKE + 1e-3 + 2e-3 + WAKE + 1e-3)


def test_a_publish_is_immediate_without_receive_costs():
    sim, cluster, _, _ = _pair(CpuCosts(1e-3, 0, 0, 0))
    at: list[float] = []
    cluster.publish("a", 100_000, lambda: at.append(sim.now))
    assert at == [sim.now]


def test_the_publish_fields_are_read_from_a_cpu_table():
    cfg = copy.deepcopy(TINY)
    cfg["cpu"] = {"per_message_s": 1e-5, "apply_s_per_row": 0, "scan_s_per_row": 0, "index_s_per_row": 0,
                  "publisher_per_message_s": 2e-3, "publish_recv_s_per_byte": 1e-8, "wake_s": 4e-4}
    got = parse_scenario(cfg).cpu
    assert (got.publisher_per_message_s, got.publish_recv_s_per_byte, got.wake_s) == (2e-3, 1e-8, 4e-4)
    assert got.defers_receive and not got.charges_transport
    cfg["cpu"]["wake_s"] = -1.0
    with pytest.raises(UsageError, match="wake_s"):
        parse_scenario(cfg)


# --------------------------------------------------------------------------- the WAN emulator's thread
PROXY = CpuCosts(0, 0, 0, 0, proxy_per_message_s=4e-4, proxy_s_per_byte=1e-9)


def test_peer_messages_wait_for_the_emulator_thread_in_the_order_sent():
    from ekko.core.messages import Outgoing
    sim, cluster, a, _ = _pair(PROXY)
    sim.run(until=0.5)
    left: list[float] = []
    net = cluster.net

    class Spy:
        """The cluster's network, noting when each message may leave."""

        def send(self, src, dst, payload, nbytes, on_deliver, at=None):
            left.append(at)
            return net.send(src, dst, payload, nbytes, on_deliver, at)

        def __getattr__(self, name):
            return getattr(net, name)

    cluster.net = Spy()
    t0 = max(sim.now, cluster.cpu.busy_until("proxy"))
    body = {"k": "sum", "from": "a", "scope": ["dc", 0], "models": {}}
    a._out += [Outgoing("b", "b", MsgType.GOSSIP, dict(body)) for _ in range(3)]
    cluster.flush(a)
    assert len(left) == 3
    each = [left[0] - t0, left[1] - left[0], left[2] - left[1]]
    assert each[0] == pytest.approx(each[1]) == pytest.approx(each[2])   # one thread: one after the other
    assert each[0] > 4e-4                                                # 0.4 ms + its bytes
    assert cluster.cpu.busy_until("proxy") == pytest.approx(left[2])


def test_no_emulator_no_wait():
    assert not CpuCosts(1e-3, 0, 0, 0).has_proxy and PROXY.has_proxy
    assert PROXY.proxy_s(1000) == pytest.approx(4e-4 + 1e-6)


# --------------------------------------------------------------------------- daemon identities
def test_daemon_identities_name_address_and_incarnation_like_a_daemon():
    from simulator.replicas import DAEMON_INCARNATION
    from simulator.truth import place_replicas
    cfg = copy.deepcopy(TINY)
    cfg["scenario"]["daemon_identities"] = True
    sc = parse_scenario(cfg)
    names = place_replicas(sc)
    assert names[:4] == [("a-r1", "a"), ("b-r1", "b"), ("c-r1", "c"), ("a-r2", "a")]
    assert len({n for n, _ in names}) == 9
    assert [n for n, _ in place_replicas(parse_scenario(copy.deepcopy(TINY)))][:2] == ["r00000", "r00001"]
    from simulator.ekko_run import build_ekko_family
    run = build_ekko_family(sc, "ekko")
    node = run.cluster.nodes["a-r1"]
    assert node.members.me.address == "10.0.0.0:27070" and node.members.me.incarnation == DAEMON_INCARNATION
    assert run.cluster.address_of("b-r1") == "10.0.0.1:27070"
    run.sim.run(until=sc.duration_s + sc.settle_s)
    from simulator.truth import converged
    assert converged(sc, run.cluster, run.truth)      # seeds and gossip route by address


def test_daemon_identities_must_be_a_bool():
    cfg = copy.deepcopy(TINY)
    cfg["scenario"]["daemon_identities"] = "yes"
    with pytest.raises(UsageError, match="daemon_identities"):
        parse_scenario(cfg)
