"""Publisher SDK against the in-process stand-in daemon (tests/sdk/test_sdk_server.py).

Covers: round trips for every dtype, input validation that changes nothing,
idempotent retries with the same versions, failover, Retry-After, deadlines with
the frame kept and re-sent first, persistence across restarts (counters and
pending frames), the origin lock, HMAC, definitive refusals, auto-registration
on 404, publish_async snapshots and ordering, and the chain: after each scenario
the replica's per-shard knowledge of our origin reaches our last counter (a
broken chain would leave it behind).
"""

from __future__ import annotations

import asyncio
import json
import socket
import time

import numpy as np
import pytest
import torch
from torch import nn

from ekko.core.errors import RemoteError, UsageError
from ekko.sdk.ack import PublishAck, PublishError
from ekko.sdk.async_publisher import AsyncPublisher
from ekko.sdk.endpoints import normalize_endpoint
from ekko.sdk.publisher import Publisher
from ekko.sdk.state import PublisherState, pending_frames
from ekko.core.spec import ModelSpec, TableSpec
from ekko.core.store import to_wire_values
from ekko.core.version import ORIGIN_BITS, counters_of, origin_id, origins_of
from test_sdk_server import FakeDaemon, Fault

SPEC = ModelSpec("ranker", [
    TableSpec("f32", rows=1000, dim=4, shards=4),
    TableSpec("f16", rows=100, dim=3, dtype="float16"),
    TableSpec("bf16", rows=100, dim=3, dtype="bfloat16"),
    TableSpec("f64", rows=100, dim=2, dtype="float64"),
])
TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def dead_endpoint() -> str:
    """An address nothing listens on (bound, then closed)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"127.0.0.1:{port}"


#: seconds a fake daemon's knowledge may take to close a new publisher's gaps.
CHAIN_COMPLETE_S = 5.0


@pytest.fixture
def pub(srv, tmp_path):
    with Publisher([srv.endpoint], origin="trainer-a", state_dir=tmp_path, timeout=10) as p:
        p.register(SPEC)
        yield p


def assert_chain_complete(srv: FakeDaemon, pub: Publisher, table: str = "f32") -> None:
    """The replica's knowledge of our origin covers everything it holds from us (within a
    few timer rounds: a new publisher's first frames leave a gap that a probe closes)."""
    deadline = time.monotonic() + CHAIN_COMPLETE_S
    while True:
        try:
            return _assert_chain_complete(srv, pub, table)
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _assert_chain_complete(srv: FakeDaemon, pub: Publisher, table: str = "f32") -> None:
    t = SPEC.table(table)
    _, vers = srv.rows(SPEC.name, table)
    mine = vers[(vers > 0) & (origins_of(vers) == pub.origin)]
    for s in range(t.num_shards):
        lo, hi = t.shard_range(s)
        v = vers[lo:hi]
        v = v[(v > 0) & (origins_of(v) == pub.origin)]
        if len(v):
            assert srv.knowledge(SPEC.name, table, s, pub.origin) >= int(counters_of(v).max()), f"shard {s}"
    assert len(mine)


def test_roundtrip_every_dtype(srv, pub):
    rng = np.random.default_rng(0)
    for t in SPEC.tables:
        ids = rng.choice(t.rows, 10, replace=False)
        vals = torch.randn(10, t.dim, dtype=torch.float64)
        ack = pub.publish(SPEC.name, t.name, torch.from_numpy(ids), vals)
        assert isinstance(ack, PublishAck)
        assert (ack.model, ack.rows, ack.applied) == (SPEC.name, 10, 10)
        assert ack.endpoint == normalize_endpoint(srv.endpoint)
        got_vals, got_vers = srv.rows(SPEC.name, t.name)
        want = to_wire_values(vals.to(TORCH[t.dtype]))
        assert np.array_equal(got_vals[ids].view(np.uint8), want.view(np.uint8))
        assert np.array_equal(got_vers[ids], ack.versions[t.name])
        assert (origins_of(ack.versions[t.name]) == pub.origin).all()
        assert ack.max_counter == int(counters_of(ack.versions[t.name]).max())
    assert_chain_complete(srv, pub)


def test_versions_increase_in_row_order_and_across_publishes(srv, pub):
    a = pub.publish("ranker", "f32", [5, 1, 900], np.ones((3, 4), np.float32))
    b = pub.publish("ranker", "f32", np.array([1], np.int32), np.zeros((1, 4), np.float32))
    va, vb = a.versions["f32"], b.versions["f32"]
    assert (np.diff(va) > 0).all() and vb[0] > va.max()
    vals, vers = srv.rows("ranker", "f32")
    assert vals[1].tolist() == [0.0] * 4 and vers[1] == vb[0] and vers[900] == va[2]


def test_publish_many_one_frame(srv, pub):
    ack = pub.publish_many("ranker", {"f32": ([1, 2], torch.ones(2, 4)), "f16": ([3], torch.ones(1, 3))})
    assert ack.rows == 3 and set(ack.versions) == {"f32", "f16"}
    assert srv.count("/v1/publish") == 1


@pytest.mark.parametrize("table,ids,values,impact,match", [
    ("f32", [1, 2], torch.ones(3, 4), None, "shape"),
    ("f32", [1, 2], torch.ones(2, 5), None, "shape"),
    ("f32", [1, 1], torch.ones(2, 4), None, "duplicate"),
    ("f32", [-1], torch.ones(1, 4), None, "out of range"),
    ("f32", [1000], torch.ones(1, 4), None, "out of range"),
    ("f32", np.array([2 ** 63 + 5], np.uint64), torch.ones(1, 4), None, "out of range"),
    ("f32", [1.5], torch.ones(1, 4), None, "integers"),
    ("f32", torch.tensor([1.0]), torch.ones(1, 4), None, "integers"),
    ("f32", [[1]], torch.ones(1, 4), None, "1-D"),
    ("f32", [1], torch.ones(1, 4, dtype=torch.int64), None, "floating"),
    ("f32", [1], torch.tensor([[1.0, float("nan"), 0, 0]]), None, "NaN"),
    ("f16", [1], torch.full((1, 3), 1e6), None, "NaN or infinity"),   # overflows float16
    ("f32", [1], torch.ones(1, 4), [-1.0], "impact"),
    ("f32", [1], torch.ones(1, 4), [1.0, 2.0], "impact"),
    ("nope", [1], torch.ones(1, 4), None, "no table"),
    ("f32", [], torch.ones(0, 4), None, "nothing to publish"),
])
def test_bad_input_changes_nothing(srv, pub, table, ids, values, impact, match):
    clock = pub._core.chain.clock.last
    before = srv.count("/v1/publish")
    with pytest.raises(UsageError, match=match):
        pub.publish("ranker", table, ids, values, impact)
    with pytest.raises(UsageError, match=match):
        pub.publish_async("ranker", table, ids, values, impact)
    assert pub._core.chain.clock.last == clock and srv.count("/v1/publish") == before
    assert pub.pending_models == []


def test_unregistered_model_and_closed(srv, tmp_path):
    p = Publisher([srv.endpoint], origin="x", state_dir=tmp_path)
    with pytest.raises(UsageError, match="register"):
        p.publish("ranker", "f32", [1], torch.ones(1, 4))
    p.close()
    with pytest.raises(UsageError, match="closed"):
        p.register(SPEC)


def test_lost_ack_is_retried_with_the_same_versions(srv, pub):
    srv.faults.append(Fault("apply_then_reset"))
    ack = pub.publish("ranker", "f32", [7, 8], torch.ones(2, 4))
    assert srv.count("/v1/publish") == 2
    assert srv.bodies[-1] == srv.bodies[-2]          # the same frame, byte for byte
    assert ack.applied == 0                          # the second delivery changed nothing
    _, vers = srv.rows("ranker", "f32")
    assert np.array_equal(vers[[7, 8]], ack.versions["f32"])
    assert_chain_complete(srv, pub)


def test_failover_to_the_next_endpoint(srv, tmp_path):
    dead = dead_endpoint()
    with Publisher([dead, srv.endpoint], origin="fo", state_dir=tmp_path, timeout=10) as p:
        p.register(SPEC)
        ack = p.publish("ranker", "f32", [1], torch.ones(1, 4))
        assert ack.endpoint == normalize_endpoint(srv.endpoint)
        # sticky: the next publish goes straight to the endpoint that answered
        n = srv.count("/v1/publish")
        p.publish("ranker", "f32", [2], torch.ones(1, 4))
        assert srv.count("/v1/publish") == n + 1


def test_retry_after_is_honoured(srv, pub):
    srv.faults.append(Fault("status", status=429, retry_after=0.6))
    t0 = time.monotonic()
    pub.publish("ranker", "f32", [3], torch.ones(1, 4))
    assert time.monotonic() - t0 >= 0.55
    assert [s for p, s in srv.log if p == "/v1/publish"][-2:] == [429, 200]


def test_5xx_then_success(srv, pub):
    for _ in range(3):
        srv.faults.append(Fault("status", status=503))
    ack = pub.publish("ranker", "f32", [3], torch.ones(1, 4))
    assert ack.rows == 1 and srv.count("/v1/publish") == 4


def test_deadline_keeps_the_frame_and_resends_it_first(srv, tmp_path):
    with Publisher([srv.endpoint], origin="dl", state_dir=tmp_path, timeout=1.0) as p:
        p.register(SPEC)
        first = p.publish("ranker", "f32", [1, 2], torch.ones(2, 4))
        srv.stop()
        t0 = time.monotonic()
        with pytest.raises(PublishError) as ei:
            p.publish("ranker", "f32", [2, 3], torch.full((2, 4), 2.0))
        assert 0.9 <= time.monotonic() - t0 < 5
        assert ei.value.pending and ei.value.attempts >= 2 and "kept" in str(ei.value)
        assert p.pending_models == ["ranker"]
        # still down: the next publish fails without sending its own rows
        with pytest.raises(PublishError) as ei2:
            p.publish("ranker", "f32", [9], torch.ones(1, 4))
        assert not ei2.value.pending and "not sent" in str(ei2.value)
        srv.restart()
        third = p.publish("ranker", "f32", [3, 4], torch.full((2, 4), 3.0))
        assert p.pending_models == []
    vals, vers = srv.rows("ranker", "f32")
    assert vals[2].tolist() == [2.0] * 4 and vals[3].tolist() == [3.0] * 4 and vers[9] == 0
    # the kept frame went out before the third one, and both chained properly
    assert int(counters_of(vers[2])) > int(counters_of(first.versions["f32"].max()))
    assert vers[3] == third.versions["f32"][0] > vers[2]
    assert srv.knowledge("ranker", "f32", 0, origin_id("dl")) == int(counters_of(third.versions["f32"]).max())


def test_counters_increase_across_restarts(srv, tmp_path):
    with Publisher([srv.endpoint], origin="rs", state_dir=tmp_path) as p:
        p.register(SPEC)
        a = p.publish("ranker", "f32", [1], torch.ones(1, 4))
    st = PublisherState(tmp_path, "rs")
    state, pending = st.load()
    st.close()
    assert pending == {} and not (tmp_path / "rs.json").exists()   # the record holds the chain
    assert state["origin"] == origin_id("rs") and state["clock"] >= int(counters_of(a.versions["f32"][0]))
    assert state["heads"] == [["ranker", "f32", 0, int(counters_of(a.versions["f32"][0]))]]
    # Push the saved clock far ahead of wall time: a restart must continue above it.
    state["clock"] += 10 ** 9
    st = PublisherState(tmp_path, "rs")
    st.save_pending([], state)
    st.close()
    with Publisher([srv.endpoint], origin="rs", state_dir=tmp_path) as p:
        p.register(SPEC)
        b = p.publish("ranker", "f32", [1], torch.ones(1, 4))
    assert int(counters_of(b.versions["f32"][0])) > state["clock"]
    assert pending_frames(tmp_path, "rs") == {}


def test_the_clock_floor_of_an_earlier_versions_json_is_honoured(srv, tmp_path):
    with Publisher([srv.endpoint], origin="old", state_dir=tmp_path) as p:
        p.register(SPEC)
        p.publish("ranker", "f32", [1], torch.ones(1, 4))
    # A state dir that an earlier version also wrote <origin>.json into, with a floor
    # far above the records' (its publisher ran far ahead of wall time).
    floor = PublisherState(tmp_path, "old")
    clock = floor.load()[0]["clock"] + 10 ** 9
    floor.close()
    (tmp_path / "old.json").write_text(json.dumps({"origin": origin_id("old"), "clock": clock, "heads": []}))
    with Publisher([srv.endpoint], origin="old", state_dir=tmp_path) as p:
        p.register(SPEC)
        b = p.publish("ranker", "f32", [1], torch.ones(1, 4))
    assert int(counters_of(b.versions["f32"][0])) > clock
    (tmp_path / "old.json").write_text(json.dumps({"origin": origin_id("someone-else"), "clock": 1, "heads": []}))
    with pytest.raises(UsageError, match="another origin"):
        Publisher([srv.endpoint], origin="old", state_dir=tmp_path)


def test_losing_the_unsynced_record_after_an_ack_never_reuses_a_counter(srv, tmp_path):
    """The record written after an acknowledgement is not synced.  A machine crash that
    loses it (here: it is torn) leaves the durable record before it, which holds the
    acknowledged frame and a floor above its counters: the restart re-sends that frame
    (changing nothing) and hands out counters above it."""
    with Publisher([srv.endpoint], origin="lost", state_dir=tmp_path) as p:
        p.register(SPEC)
        p.publish("ranker", "f32", [1], torch.ones(1, 4))
        a = p.publish("ranker", "f32", [2], torch.full((1, 4), 2.0))
    # the slot whose record has the higher sequence number (bytes 8-16 of its header)
    newest = max(tmp_path.glob("lost.pending.*"), key=lambda f: int.from_bytes(f.read_bytes()[8:16], "little"))
    newest.write_bytes(newest.read_bytes()[:40])          # the last write, torn by the crash
    assert list(pending_frames(tmp_path, "lost")) == ["ranker"]   # the durable record before it
    with Publisher([srv.endpoint], origin="lost", state_dir=tmp_path) as p:
        assert p._core.chain.clock.last >= int(counters_of(a.versions["f32"][0]))
        p.register(SPEC)
        p.flush()                                          # re-sends the acknowledged frame
        b = p.publish("ranker", "f32", [3], torch.ones(1, 4))
    assert int(counters_of(b.versions["f32"][0])) > int(counters_of(a.versions["f32"][0]))
    vals, vers = srv.rows("ranker", "f32")
    assert vals[2].tolist() == [2.0] * 4 and vers[2] == a.versions["f32"][0]


def test_pending_frame_survives_a_restart(srv, tmp_path):
    dead = dead_endpoint()
    with Publisher([dead], origin="crash", state_dir=tmp_path, timeout=0.5) as p:
        p._core._specs["ranker"] = SPEC          # registered earlier, as far as this process knows
        with pytest.raises(PublishError):
            p.publish("ranker", "f32", [4], torch.full((1, 4), 4.0))
        kept = p._core._pending["ranker"]
    assert list(pending_frames(tmp_path, "crash")) == ["ranker"]
    with Publisher([srv.endpoint], origin="crash", state_dir=tmp_path) as p:
        assert p.pending_models == ["ranker"]
        assert p._core.chain.clock.last >= kept.last_counter   # its counters are never reused
        p.register(SPEC)
        p.flush()
        assert p.pending_models == []
        b = p.publish("ranker", "f32", [5], torch.ones(1, 4))
    vals, vers = srv.rows("ranker", "f32")
    assert vals[4].tolist() == [4.0] * 4
    assert int(counters_of(vers[4])) == kept.first_counter < int(counters_of(b.versions["f32"][0]))
    assert pending_frames(tmp_path, "crash") == {}


def test_one_live_publisher_per_origin(srv, tmp_path):
    with Publisher([srv.endpoint], origin="solo", state_dir=tmp_path):
        with pytest.raises(UsageError, match="another publisher"):
            Publisher([srv.endpoint], origin="solo", state_dir=tmp_path)
        Publisher([srv.endpoint], origin="other", state_dir=tmp_path).close()
    Publisher([srv.endpoint], origin="solo", state_dir=tmp_path).close()   # released on close


def test_state_dir_from_environment(srv, tmp_path, monkeypatch):
    monkeypatch.setenv("EKKO_STATE_DIR", str(tmp_path / "env"))
    with Publisher([srv.endpoint], origin="envy") as p:
        p.register(SPEC)
        p.publish("ranker", "f32", [1], torch.ones(1, 4))
    assert list((tmp_path / "env").glob("envy.pending.*"))


def test_hmac_key(tmp_path):
    with FakeDaemon(key=b"k" * 16) as s:
        with Publisher([s.endpoint], origin="signed", key=b"k" * 16, state_dir=tmp_path) as p:
            p.register(SPEC)
            assert p.publish("ranker", "f32", [1], torch.ones(1, 4)).rows == 1
        with Publisher([s.endpoint], origin="unsigned", state_dir=tmp_path) as p:
            with pytest.raises(RemoteError) as ei:
                p.register(SPEC)
            assert ei.value.status == 401
        with Publisher([s.endpoint], origin="wrongkey", key="w" * 16, state_dir=tmp_path) as p:
            p._core._specs["ranker"] = SPEC
            with pytest.raises(RemoteError) as ei:
                p.publish("ranker", "f32", [2], torch.ones(1, 4))
            assert ei.value.status == 401 and "cluster key" in str(ei.value)
            assert p.pending_models == ["ranker"]   # kept: restarting with the right key re-signs it
        with Publisher([s.endpoint], origin="wrongkey", key="k" * 16, state_dir=tmp_path) as p:
            p.register(SPEC)
            p.flush()
        vals, _ = s.rows("ranker", "f32")
        assert vals[2].tolist() == [1.0] * 4


def test_definitive_refusal_drops_the_frame(srv, pub):
    srv.faults.append(Fault("status", status=400))
    with pytest.raises(RemoteError) as ei:
        pub.publish("ranker", "f32", [1], torch.ones(1, 4))
    assert ei.value.status == 400 and pub.pending_models == []
    ack = pub.publish("ranker", "f32", [1], torch.full((1, 4), 2.0))
    assert ack.rows == 1
    assert_chain_complete(srv, pub)


def test_register_conflict(srv, pub):
    with pytest.raises(RemoteError) as ei:
        pub.register(ModelSpec("ranker", [TableSpec("f32", rows=5, dim=4)]))
    assert ei.value.status == 409
    assert pub.register(SPEC) is False   # same spec again: fine, not new


def test_unknown_model_at_failover_replica_is_registered(tmp_path):
    with FakeDaemon(node_id="a") as a, FakeDaemon(node_id="b") as b:
        with Publisher([a.endpoint, b.endpoint], origin="reg", state_dir=tmp_path) as p:
            assert p.register(SPEC) is True
            a.faults.append(Fault("status", status=503))
            ack = p.publish("ranker", "f32", [1], torch.ones(1, 4))
            assert ack.endpoint == normalize_endpoint(b.endpoint)
            assert [s for path, s in b.log] == [404, 200, 200]   # publish, register, publish
        vals, _ = b.rows("ranker", "f32")
        assert vals[1].tolist() == [1.0] * 4


def test_publish_async_snapshots_values_and_keeps_order(srv, pub):
    x = torch.zeros(1, 4)
    futs = []
    for step in range(20):
        x.add_(1.0)                              # the "training loop" keeps updating in place
        futs.append(pub.publish_async("ranker", "f32", [0], x))
    acks = [f.result(10) for f in futs]
    vals, vers = srv.rows("ranker", "f32")
    assert vals[0].tolist() == [20.0] * 4
    assert vers[0] == acks[-1].versions["f32"][0]
    assert all(a.versions["f32"][0] < b.versions["f32"][0] for a, b in zip(acks, acks[1:]))


def test_values_on_any_device_and_dtype(srv, pub):
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        v = torch.arange(8, dtype=torch.float64, device=dev).reshape(2, 4) / 3
        pub.publish("ranker", "f32", torch.tensor([10, 11], device=dev), v[:, :])
        vals, _ = srv.rows("ranker", "f32")
        assert np.array_equal(vals[[10, 11]], (v.cpu().numpy()).astype(np.float32))
        nc = torch.arange(9, dtype=torch.float32, device=dev).reshape(3, 3).t()  # non-contiguous
        pub.publish("ranker", "f16", [0, 1, 2], nc[:, :])
        vals, _ = srv.rows("ranker", "f16")
        assert np.array_equal(vals[:3], nc.cpu().numpy().astype(np.float16))


def test_register_module_builds_the_spec(srv, pub):
    m = nn.ModuleDict({"user": nn.Embedding(50, 8), "bag": nn.EmbeddingBag(20, 4, mode="sum"),
                       "mlp": nn.Sequential(nn.Linear(12, 3000), nn.ReLU(), nn.Linear(3000, 1))})
    spec = pub.register_module(m, "rec", traffic_share=0.5)
    t = {x.name: x for x in spec.tables}
    assert (t["user"].rows, t["user"].dim, t["user"].dense) == (50, 8, False)
    assert (t["bag"].rows, t["bag"].dim) == (20, 4)
    assert (t["mlp_0_weight"].rows, t["mlp_0_weight"].dim, t["mlp_0_weight"].dense) == (36, 1024, True)
    assert (t["mlp_0_bias"].rows, t["mlp_0_bias"].dim) == (3, 1024)
    assert (t["mlp_2_bias"].rows, t["mlp_2_bias"].dim) == (1, 1)
    assert spec.traffic_share == 0.5 and pub.spec("rec") == spec
    assert srv.call(lambda: srv.node.spec("rec")) == spec
    with pytest.raises(UsageError, match="dtype"):
        bad = nn.Module()
        bad.p = nn.Parameter(torch.zeros(3, dtype=torch.int32), requires_grad=False)
        pub.register_module(bad, "bad")


def test_endpoints_and_origin_normalisation(tmp_path):
    assert normalize_endpoint("h:1/") == "http://h:1"
    assert normalize_endpoint("https://h:1") == "https://h:1"
    with pytest.raises(UsageError):
        normalize_endpoint("ftp://h")
    with pytest.raises(UsageError):
        Publisher([], state_dir=tmp_path)
    with pytest.raises(UsageError):
        Publisher("h:1", origin="", state_dir=tmp_path)
    p = Publisher("h:1,h:2", origin="17", state_dir=tmp_path)
    assert p.endpoints == ["http://h:1", "http://h:2"] and p.origin == 17
    p.close()


async def test_async_publisher_core(srv, tmp_path):
    async with AsyncPublisher([srv.endpoint], origin="aio", state_dir=tmp_path) as pub:
        assert await pub.register(SPEC) is True
        # Two models' publishes run concurrently; one model's are serialized in order.
        other = ModelSpec("other", [TableSpec("t", rows=10, dim=1)])
        await pub.register(other)
        results = await asyncio.gather(*[pub.publish("ranker", "f32", [i % 3], torch.full((1, 4), float(i)))
                                         for i in range(12)],
                                       pub.publish("other", "t", [1], torch.ones(1, 1)))
        counters = [int(counters_of(r.versions["f32"][0])) for r in results[:12]]
        assert counters == sorted(counters)
    vals, vers = srv.rows("ranker", "f32")
    assert vals[:3, 0].tolist() == [9.0, 10.0, 11.0]
    assert (vers[:3] >> ORIGIN_BITS).tolist() == counters[-3:]


def test_host_values_are_prepared_without_torch(monkeypatch):
    # A training process runs torch with an OpenMP team; on a busy host waking it for a
    # publish's copy and finiteness check cost tens of ms.  Host values of a float table
    # are copied and checked with numpy, and equal what torch's conversion gives.
    from ekko.sdk.prepare import prepare_publish
    spec = ModelSpec("m", [TableSpec("f32", rows=10, dim=4), TableSpec("f16", rows=10, dim=4, dtype="float16"),
                           TableSpec("bf16", rows=10, dim=4, dtype="bfloat16")])
    v64 = np.random.default_rng(0).standard_normal((2, 4)) * 1000
    want = {t: to_wire_values(torch.from_numpy(v64).to(TORCH[t_dtype]))
            for t, t_dtype in (("f32", "float32"), ("f16", "float16"), ("bf16", "bfloat16"))}

    def no_torch(*a, **k):
        raise AssertionError("torch used for host values")

    inputs = (v64, torch.from_numpy(v64.copy()))
    with monkeypatch.context() as mp:
        mp.setattr(torch, "isfinite", no_torch)
        mp.setattr(torch, "from_numpy", no_torch)
        for t in ("f32", "f16"):
            for values in inputs:
                got = prepare_publish(spec, {t: ([1, 2], values)}).tables[t][1]
                assert got.dtype == want[t].dtype and np.array_equal(got, want[t])
        with pytest.raises(UsageError, match="NaN"):
            prepare_publish(spec, {"f32": ([1], np.array([[0, np.inf, 0, 0]]))})
    # bfloat16 has no numpy dtype: torch converts it, to the same bits as before.
    got = prepare_publish(spec, {"bf16": ([1, 2], v64)}).tables["bf16"][1]
    assert np.array_equal(got, want["bf16"])
    # The copy is owned: writing the caller's array afterwards changes nothing sent.
    src = np.ones((1, 4), np.float32)
    p = prepare_publish(spec, {"f32": ([3], src)})
    src[:] = 7
    assert p.tables["f32"][1].tolist() == [[1, 1, 1, 1]]
