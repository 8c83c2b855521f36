"""Security: keyring rotation with no downtime, publisher authorization, and versions
that cannot be right (beyond the clock-skew bound, or inside a fenced range).

Rotation and authorization run real daemons on loopback in the test's event loop; the
version checks run on sans-IO nodes with simulated time, plus one daemon-level check.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time

import numpy as np
import pytest

from ekko.core.chain import PublisherChain
from ekko.cli.main import main as ekko_main
from ekko.core.codec import Keyring, MsgType, decode_frame, delta_to_wire, encode_frame
from ekko.core.config import MAX_CLOCK_SKEW_S, MAX_PUBLISH_AHEAD_S, NodeConfig
from ekko.server.daemon import Daemon
from ekko.core.errors import ProtocolError, UsageError
from ekko.core.keyring import load_keyring
from ekko.replica.node import ReplicaNode
from ekko.core.spec import ModelSpec, TableSpec
from ekko.core.version import HLC_EPOCH_MS, HLC_LOGICAL_BITS
from procs import DaemonGroup, post_frame, wait_for
from test_daemon import (
    CFG,
    SPEC,
    _post_raw,
    digests,
    make_client,
    metrics_text,
    post,
    publish_body,
    register,
    rejects,
    start_site,
    wait_async,
)
from test_daemon import free_port as _free_port


def keys(*argv) -> None:
    assert ekko_main(["keys", *map(str, argv)]) == 0


def distribute(master, *targets) -> None:
    """What config management does: copy the operator's keyring to each host (mode kept)."""
    for t in targets:
        shutil.copy2(master, t)


def keyed_daemon(tmp_path, node_id: str, ring, seeds=()) -> Daemon:
    return Daemon(node_id, "dc1", f"127.0.0.1:{_free_port()}", list(seeds), tmp_path / node_id, CFG,
                  device="cpu", keyring_file=ring)


# --------------------------------------------------------------------------- frame MACs
async def test_a_daemon_told_to_sign_with_hmac_talks_with_one_signing_with_blake3(tmp_path):
    """The upgrade path from daemons that verify only HMAC-SHA256: ``frame_mac`` makes a
    daemon sign so whatever its keyring says (also after a reload); both verify both."""
    ring = tmp_path / "ring.json"
    keys("new", ring, "--id", 1)
    old = Daemon("old", "dc1", f"127.0.0.1:{_free_port()}", [], tmp_path / "old", CFG, device="cpu",
                 keyring_file=ring, frame_mac="hmac-sha256")
    new = keyed_daemon(tmp_path, "new", ring, seeds=[old.address])
    assert (old.keyring.mac, new.keyring.mac) == ("hmac-sha256", "blake3")
    runners = [await start_site(d) for d in (old, new)]
    pc = PublisherChain(origin=5)
    try:
        hmac_kr = load_keyring(ring).with_mac("hmac-sha256")
        assert (await _post_raw(new.address, "/v1/models", encode_frame(MsgType.REGISTER_MODEL,
                                                                        {"spec": SPEC.to_dict()}, hmac_kr)))[0] == 200
        await wait_async(lambda: all("ranker" in d.node.models for d in (old, new)), 20, "catalog")
        for target, kr in ((old, load_keyring(ring)), (new, hmac_kr)):
            f = publish_body(pc, "emb", np.arange(50) + 100 * pc.origin, np.ones((50, 8), np.float32))
            assert (await _post_raw(target.address, "/v1/publish", encode_frame(MsgType.PUBLISH, f.body, kr)))[0] == 200
            pc.acked(f)
            want = target.node.status()["models"]["ranker"]["tables"]["emb"]["digest"]
            await wait_async(lambda: all(d.node.status()["models"]["ranker"]["tables"]["emb"]["digest"] == want
                                         for d in (old, new)), 20, "convergence")
        assert old.transport.keyring.mac == "hmac-sha256" and new.transport.keyring.mac == "blake3"
        assert old.reload_keyring() and old.keyring.mac == old.transport.keyring.mac == "hmac-sha256"
        for d in (old, new):
            assert d.transport.failures.get("http_401", 0) == 0, d.transport.failures
    finally:
        for r in runners:
            await r.cleanup()
    with pytest.raises(UsageError, match="frame MAC"):
        Daemon("x", "dc1", "127.0.0.1:1", [], tmp_path / "x", CFG, device="cpu", frame_mac="md5")


# --------------------------------------------------------------------------- rotation
async def test_rotation_procedure_keeps_the_cluster_talking(tmp_path):
    """add everywhere (verify-only) -> promote everywhere -> remove the old key, with a
    publish after every step converging on all three replicas and no frame refused."""
    master = tmp_path / "ring.json"
    keys("new", master, "--id", 1)
    rings = [tmp_path / f"ring-{n}.json" for n in "abc"]
    distribute(master, *rings)
    a = keyed_daemon(tmp_path, "a", rings[0])
    b = keyed_daemon(tmp_path, "b", rings[1], seeds=[a.address])
    c = keyed_daemon(tmp_path, "c", rings[2], seeds=[a.address])
    daemons = [a, b, c]
    runners = [await start_site(d) for d in daemons]
    pc = PublisherChain(origin=5)
    rng = np.random.default_rng(5)

    async def publish_and_converge(kr: Keyring, step: str) -> None:
        f = publish_body(pc, "emb", rng.choice(5000, 200, replace=False),
                         rng.standard_normal((200, 8)).astype(np.float32))
        status, raw = await _post_raw(a.address, "/v1/publish", encode_frame(MsgType.PUBLISH, f.body, kr))
        assert status == 200, (step, raw)
        pc.acked(f)
        want = a.node.status()["models"]["ranker"]["tables"]["emb"]["digest"]
        await wait_async(lambda: all("ranker" in d.node.models and d.node.status()["models"]["ranker"]["tables"]
                                     ["emb"]["digest"] == want for d in daemons), 20, f"convergence after {step}")

    def reload_all() -> None:
        distribute(master, *rings)
        for d in daemons:
            assert d.reload_keyring()

    try:
        old = load_keyring(master)
        assert (await _post_raw(a.address, "/v1/models", encode_frame(MsgType.REGISTER_MODEL,
                                                                      {"spec": SPEC.to_dict()}, old)))[0] == 200
        await wait_async(lambda: all("ranker" in d.node.models for d in daemons), 20, "catalog")
        await publish_and_converge(old, "start")

        keys("add", master, "--id", 2)
        reload_all()
        assert all(sorted(d.keyring.keys) == [1, 2] and d.keyring.primary == 1 for d in daemons)
        await publish_and_converge(old, "add")

        keys("promote", master, "--id", 2)
        distribute(master, rings[0])  # mid-rollout: a signs with key 2, b and c still with key 1
        assert a.reload_keyring() and a.keyring.primary == 2 and b.keyring.primary == 1
        await publish_and_converge(old, "promote on a only")
        reload_all()
        new = load_keyring(master)
        await publish_and_converge(new, "promote")

        keys("remove", master, "--id", 1)
        reload_all()
        assert all(sorted(d.keyring.keys) == [2] for d in daemons)
        before = {d.node.node_id: d.node.status()["models"]["ranker"]["tables"]["emb"]["digest"]
                                  for d in daemons}
        f = publish_body(pc, "emb", np.arange(10), np.ones((10, 8), np.float32))
        status, raw = await _post_raw(a.address, "/v1/publish", encode_frame(MsgType.PUBLISH, f.body, old))
        assert status == 401 and json.loads(raw)["reason"] == "bad_mac", "the removed key no longer works"
        assert {d.node.node_id: d.node.status()["models"]["ranker"]["tables"]["emb"]["digest"]
                for d in daemons} == before
        await publish_and_converge(new, "remove")
        for d in daemons:
            assert d.transport.failures.get("http_401", 0) == 0, (d.node.node_id, d.transport.failures)
            assert d.metrics.rejects.labels("/v1/gossip", "bad_mac")._value.get() == 0
            assert d.keyring_reloads.labels("ok")._value.get() == (4 if d is a else 3)
    finally:
        for r in runners:
            await r.cleanup()


async def test_promoting_before_adding_everywhere_breaks_the_cluster(tmp_path):
    """The control: skip the verify-only step and the peers refuse each other's frames."""
    master = tmp_path / "ring.json"
    keys("new", master, "--id", 1)
    ra, rb = tmp_path / "ra.json", tmp_path / "rb.json"
    distribute(master, ra, rb)
    a = keyed_daemon(tmp_path, "a", ra)
    b = keyed_daemon(tmp_path, "b", rb, seeds=[a.address])
    runners = [await start_site(d) for d in (a, b)]
    try:
        await wait_async(lambda: "b" in a.node.members.members and "a" in b.node.members.members, 20, "join")
        keys("add", master, "--id", 2)
        keys("promote", master, "--id", 2)
        distribute(master, ra)
        assert a.reload_keyring()
        await wait_async(lambda: b.metrics.rejects.labels("/v1/gossip", "bad_mac")._value.get() > 0, 20,
                         "b to refuse a's frames signed with a key it does not hold")
    finally:
        for r in runners:
            await r.cleanup()


async def test_a_bad_keyring_reload_keeps_the_current_keys(tmp_path):
    ring = tmp_path / "ring.json"
    keys("new", ring, "--id", 1)
    d, client = await make_client(tmp_path, key=None)
    d2 = keyed_daemon(tmp_path, "k", ring)
    try:
        assert not d.reload_keyring(), "no keyring file: nothing to reload"
        kr = d2.keyring
        os.chmod(ring, 0o644)
        assert not d2.reload_keyring() and d2.keyring is kr and d2.transport.keyring is kr
        os.chmod(ring, 0o600)
        ring.write_text("{}")
        assert not d2.reload_keyring() and d2.keyring is kr
        assert d2.keyring_reloads.labels("error")._value.get() == 2
        assert "ekko_keyring_reloads_total" in d2.metrics.render().decode()
    finally:
        await client.close()
    with pytest.raises(UsageError, match="not both"):
        Daemon("x", "dc1", "127.0.0.1:1", [], tmp_path / "x", CFG, key=b"k" * 16, keyring_file=ring)
    os.chmod(ring, 0o644)
    with pytest.raises(UsageError, match="chmod 600"):
        keyed_daemon(tmp_path, "y", ring)


def test_sighup_reloads_the_keyring_of_a_real_daemon(tmp_path):
    """``ekko daemon --keyring``: rotate with kill -HUP, no restart."""
    ring = tmp_path / "ring.json"
    keys("new", ring, "--id", 1)
    k1 = load_keyring(ring)
    spec = ModelSpec("m", [TableSpec("t", rows=100, dim=4)])
    with DaemonGroup(tmp_path) as g:
        p = g.start("a", "dc1", extra=["--keyring", str(ring)])
        assert post_frame(p.address, "/v1/models", MsgType.REGISTER_MODEL, {"spec": spec.to_dict()}, k1)[0] == 200
        assert post_frame(p.address, "/v1/models", MsgType.REGISTER_MODEL, {"spec": spec.to_dict()})[0] == 401
        keys("add", ring, "--id", 2)
        keys("promote", ring, "--id", 2)
        keys("remove", ring, "--id", 1)
        k2 = load_keyring(ring)
        p.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: post_frame(p.address, "/v1/models", MsgType.REGISTER_MODEL,
                                    {"spec": spec.to_dict()}, k2)[0] == 200, 30, what="the new key to work")
        status, body = post_frame(p.address, "/v1/models", MsgType.REGISTER_MODEL, {"spec": spec.to_dict()}, k1)
        assert status == 401 and body["reason"] == "bad_mac"
        assert p.proc.poll() is None, "SIGHUP reloads; it does not stop the daemon"
        # operator commands sign with the keyring too
        assert ekko_main(["cut", "--peer", p.address, "--model", "m", "--name", "after-rotation",
                          "--keyring", str(ring)]) == 0
        assert "keyring reloaded" in p.log()
        assert p.terminate() == 0


# --------------------------------------------------------------------------- publisher authorization
OTHER = ModelSpec("other", [TableSpec("emb", rows=100, dim=8)])


def acl_ring(tmp_path):
    ring = tmp_path / "cluster.json"
    keys("new", ring, "--id", 1)
    keys("add", ring, "--id", 9, "--publisher", "--model", "ranker", "--origin", 7)
    keys("add", ring, "--id", 10, "--publisher", "--origin", 8)  # any model, origin 8 only
    trainer = tmp_path / "trainer.json"
    keys("add", trainer, "--id", 9, "--from", ring)
    return ring, load_keyring(ring), load_keyring(trainer)


async def test_publisher_authorization(tmp_path):
    ring, cluster, trainer = acl_ring(tmp_path)
    peer = Keyring({1: cluster.keys[1]})
    d = Daemon("r1", "dc1", "127.0.0.1:1", [], tmp_path / "r1", CFG, device="cpu", keyring_file=ring)
    from aiohttp.test_utils import TestClient, TestServer

    from ekko.server.http_api import HANDLER_ARGS
    server = TestServer(d.app)
    await server.start_server(**HANDLER_ARGS)
    client = TestClient(server)
    await client.start_server()
    try:
        assert (await register(client, SPEC, trainer))[0] == 200, "a publisher may register its own model"
        status, err = await register(client, OTHER, trainer)
        assert status == 403 and err["reason"] == "forbidden" and "may not write model 'other'" in err["error"]
        assert (await register(client, OTHER, peer))[0] == 200, "peers (operators) register any model"

        ok = publish_body(PublisherChain(origin=7), "emb", np.arange(50), np.ones((50, 8), np.float32))
        status, raw, _ = await post(client, "/v1/publish", encode_frame(MsgType.PUBLISH, ok.body, trainer))
        assert status == 200, raw
        before = await digests(client, peer)
        state_before = d.node.export_state("ranker")

        wrong_model = publish_body(PublisherChain(origin=7), "emb", np.arange(5), np.ones((5, 8), np.float32),
                                   spec=OTHER)
        wrong_origin = publish_body(PublisherChain(origin=8), "emb", np.arange(5), np.full((5, 8), 2, np.float32))
        cases = [
            ("wrong model", encode_frame(MsgType.PUBLISH, wrong_model.body, trainer), 403,
             "publisher key 9 may not write model 'other' as origin 7"),
            ("wrong origin", encode_frame(MsgType.PUBLISH, wrong_origin.body, trainer), 403,
             "publisher key 9 may not write model 'ranker' as origin 8"),
            ("peer key", encode_frame(MsgType.PUBLISH, wrong_origin.body, peer), 403,
             "must be signed with a publisher key"),
            ("no key", encode_frame(MsgType.PUBLISH, wrong_origin.body), 401, "unauthenticated"),
            ("wrong key", encode_frame(MsgType.PUBLISH, ok.body, Keyring({9: b"not-the-trainer-key"})), 401,
             "MAC check failed"),
        ]
        for name, frame, want, text in cases:
            status, raw, _ = await post(client, "/v1/publish", frame)
            js = json.loads(raw)
            assert status == want and text in js["error"], (name, status, js)
        # a publisher key is no peer credential: no gossip, no cuts, no rollback
        for path, t, body in (("/v1/gossip", MsgType.GOSSIP, {"k": "g", "from": "x"}),
                              ("/v1/cuts", MsgType.CUT, {"model": "ranker"}),
                              ("/v1/rollback", MsgType.ROLLBACK, {"model": "ranker", "cut": "c"})):
            status, raw, _ = await post(client, path, encode_frame(t, body, trainer))
            assert status == 403 and "publisher key" in json.loads(raw)["error"], (path, raw)
        assert await digests(client, peer) == before and d.node.export_state("ranker") == state_before
        counted = rejects(await metrics_text(client, peer))
        assert counted[("/v1/publish", "forbidden")] == 3 and counted[("/v1/publish", "unauthenticated")] == 1
        assert counted[("/v1/gossip", "forbidden")] == 1 and counted[("/v1/models", "forbidden")] == 1

        # key 10: any model, origin 8 only
        k10 = Keyring({10: cluster.keys[10]})
        status, raw, _ = await post(client, "/v1/publish", encode_frame(MsgType.PUBLISH, wrong_origin.body, k10))
        assert status == 200, raw
        other8 = publish_body(PublisherChain(origin=8), "emb", np.arange(5), np.ones((5, 8), np.float32), spec=OTHER)
        assert (await post(client, "/v1/publish", encode_frame(MsgType.PUBLISH, other8.body, k10)))[0] == 200

        # the SDK signs with the primary key of a keyring file given as a Path
        from ekko.core.errors import RemoteError
        from ekko.sdk.async_publisher import AsyncPublisher
        url = str(client.make_url("")).rstrip("/")
        trainer_file = tmp_path / "trainer.json"
        async with AsyncPublisher([url], origin=7, key=trainer_file, state_dir=tmp_path / "pub7") as pub:
            await pub.register(SPEC)
            ack = await pub.publish("ranker", "emb", np.arange(60, 70), np.full((10, 8), 3, np.float32))
            assert ack.rows == 10
        async with AsyncPublisher([url], origin=8, key=trainer_file, state_dir=tmp_path / "pub8") as pub:
            await pub.register(SPEC)
            with pytest.raises(RemoteError, match="may not write") as e:
                await pub.publish("ranker", "emb", np.arange(5), np.ones((5, 8), np.float32))
            assert e.value.status == 403
    finally:
        await client.close()


async def test_without_publisher_keys_publishing_stays_open(tmp_path):
    ring = tmp_path / "ring.json"
    keys("new", ring, "--id", 1)
    peer = load_keyring(ring)
    d, client = await make_client(tmp_path, key=peer)
    try:
        assert not peer.acl
        assert (await register(client, SPEC, peer))[0] == 200
        f = publish_body(PublisherChain(origin=123), "emb", np.arange(5), np.ones((5, 8), np.float32))
        assert (await post(client, "/v1/publish", encode_frame(MsgType.PUBLISH, f.body, peer)))[0] == 200
    finally:
        await client.close()
    d2, client = await make_client(tmp_path, node_id="r2")
    try:  # no key at all: as before, anyone may publish
        assert (await register(client))[0] == 200
        f = publish_body(PublisherChain(origin=9), "emb", np.arange(5), np.ones((5, 8), np.float32))
        assert (await post(client, "/v1/publish", encode_frame(MsgType.PUBLISH, f.body)))[0] == 200
    finally:
        await client.close()


# --------------------------------------------------------------------------- impossible versions
SMALL = ModelSpec("m", [TableSpec("t", rows=64, dim=2, shards=4)])


def _node(name: str = "a", **cfg) -> ReplicaNode:
    n = ReplicaNode(name, "dc1", name, config=NodeConfig(**cfg), device="cpu")
    n.register_model(SMALL, 0.0)
    return n


def _frame(pc: PublisherChain, ids, at_s: float, value: float = 1.0):
    """A publish whose HLC wall time is ``at_s`` seconds of simulated time (the simulator's clock basis)."""
    ids = np.asarray(ids, np.int64)
    return pc.frame(SMALL, {"t": (ids, np.full((len(ids), 2), value, np.float32))},
                    now_ms=HLC_EPOCH_MS + at_s * 1000)


def _wire(msg_type, body):
    return decode_frame(encode_frame(msg_type, body))


def _versions(n: ReplicaNode) -> np.ndarray:
    return n.table_store("m", "t").versions.copy()


def test_versions_beyond_the_skew_bound_are_refused_whole():
    now = 100.0
    a = _node()
    assert a.counter_horizon(now) >> HLC_LOGICAL_BITS == (now + MAX_CLOCK_SKEW_S) * 1000
    pc = PublisherChain(origin=3)
    # A publish may be only max_publish_ahead ahead (its rows would shadow later updates);
    # peers' frames up to max_clock_skew (below).
    ok = _frame(pc, [1, 2], now + MAX_PUBLISH_AHEAD_S - 1)  # a publisher clock 9 s ahead: still believable
    assert a.publish(ok.body, now).applied == 2
    pc.acked(ok)
    head, vers = a.model_head("m"), _versions(a)
    future = _frame(pc, [3, 40], now + MAX_PUBLISH_AHEAD_S + 1)
    with pytest.raises(ProtocolError, match="ahead of this replica's clock") as e:
        a.publish(future.body, now)
    assert e.value.reason == "future_version" and a.counters["refused_future_frames"] == 1
    assert np.array_equal(_versions(a), vers) and a.model_head("m") == head, "nothing applied, head not dragged"
    # later the same frame is fine: the bound moves with the replica's clock
    assert a.publish(future.body, now + 2).applied == 2

    # a push from a peer: one future row refuses the whole frame, the good rows too
    b = _node("b")
    rows = _frame(PublisherChain(origin=4), [5, 6], now)
    bad = _frame(PublisherChain(origin=5), [7], now + 10 * MAX_CLOCK_SKEW_S)
    push = {"from": "a", "dc": "dc1", "deltas": rows.body["deltas"] + bad.body["deltas"]}
    with pytest.raises(ProtocolError) as e:
        b.receive(_wire(MsgType.PUSH, push), now)
    assert e.value.reason == "future_version"
    assert not _versions(b).any() and b.model_head("m") == 0
    b.receive(_wire(MsgType.PUSH, {**push, "deltas": rows.body["deltas"]}), now)
    assert (_versions(b) > 0).sum() == 2

    # a pull response whose knowledge claims a future counter: adopting it would skip updates
    far = a.counter_horizon(now) + (5 << HLC_LOGICAL_BITS)
    resp = {"from": "a", "models": {"m": {"t": [[0, [[4, far]], None, None]]}}}
    with pytest.raises(ProtocolError) as e:
        b.receive(_wire(MsgType.PULL_RESPONSE, resp), now)
    assert e.value.reason == "future_version"
    assert b.models["m"].shards["t"].get(0) is None or b.models["m"].shards["t"][0].knowledge[4] < far

    # a rollback record whose fence reaches beyond the bound would drop updates yet to come
    b.take_cut("m", "c", now)
    record = {"id": "x.m.c", "model": "m", "cut": b.cuts.get("m", "c").to_wire(), "upper": [[4, far]]}
    with pytest.raises(ProtocolError) as e:
        b.receive(_wire(MsgType.ROLLBACK, {"from": "a", "rb": record}), now)
    assert e.value.reason == "future_version" and not b.rollbacks and not len(b.fence)

    # gossiped heads beyond the bound are ignored (they would fake every replica's lag)
    b.members.heard_from("a", now)
    gossip = {"k": "g", "from": "a", "mem": [], "cat": 0, "req": False, "heads": {"m": far, "x": 5}}
    b.receive(_wire(MsgType.GOSSIP, gossip), now)
    assert b.peer_heads["a"] == {"x": 5}


def test_skew_bound_is_configurable_and_can_be_off():
    pc = PublisherChain(origin=3)
    tight = _node(max_clock_skew=5.0)
    with pytest.raises(ProtocolError):
        tight.publish(_frame(pc, [1], 16.0).body, 10.0)
    assert tight.publish(_frame(PublisherChain(origin=3), [1], 14.0).body, 10.0).applied == 1
    off = _node(max_clock_skew=float("inf"), max_publish_ahead=float("inf"))
    assert off.publish(_frame(PublisherChain(origin=3), [1], 10**6).body, 0.0).applied == 1
    with pytest.raises(UsageError, match="max_clock_skew"):
        NodeConfig(max_clock_skew=0)


async def test_daemon_refuses_publishes_from_the_future(tmp_path):
    d, client = await make_client(tmp_path)
    try:
        await register(client)
        before = await digests(client)
        pc = PublisherChain(origin=3)
        f = pc.frame(SPEC, {"emb": (np.arange(5), np.ones((5, 8), np.float32))},
                     now_ms=(time.time() + 2 * MAX_CLOCK_SKEW_S) * 1000)
        status, raw, _ = await post(client, "/v1/publish", encode_frame(MsgType.PUBLISH, f.body))
        assert status == 400 and json.loads(raw)["reason"] == "future_version", raw
        assert await digests(client) == before
        text = await metrics_text(client)
        assert 'ekko_node_events_total{event="refused_future_frames"} 1.0' in text
        assert rejects(text)[("/v1/publish", "future_version")] == 1
        ok = publish_body(PublisherChain(origin=4), "emb", np.arange(5), np.ones((5, 8), np.float32))
        assert (await post(client, "/v1/publish", encode_frame(MsgType.PUBLISH, ok.body)))[0] == 200
    finally:
        await client.close()


def test_fenced_rows_never_apply_whatever_frame_carries_them():
    """After a rollback, the rolled-back versions come back by publish replay, by push from a
    replica that has not heard of the rollback, and in pull answers: every copy is dropped
    and counted, and the frame's other rows apply normally."""
    a = _node()
    pc = PublisherChain(origin=3)
    good = _frame(pc, np.arange(8), 1.0, value=1.0)
    a.publish(good.body, 1.0)
    pc.acked(good)
    a.take_cut("m", "good", 1.5)
    harmful = _frame(pc, np.arange(8), 2.0, value=666.0)
    a.publish(harmful.body, 2.0)
    pc.acked(harmful)
    until = int((2.5 * 1000)) << HLC_LOGICAL_BITS
    a.rollback("m", "good", until, 3.0)
    want_v, want_x = _versions(a), a.read_rows("m", "t", np.arange(8)).clone()
    assert np.array_equal(want_x.numpy(), np.ones((8, 2), np.float32)), "the rollback restored the cut"
    fenced = a.counters["fenced_rows"]

    # publish replay of the harmful frame: accepted as a no-op, nothing applied
    assert a.publish(harmful.body, 4.0).applied == 0
    assert a.counters["fenced_rows"] == fenced + 8
    # a push from a replica that has not heard of the rollback, with a legitimate newer row beside them
    later = _frame(pc, [20], 5.0, value=7.0)
    push = {"from": "b", "dc": "dc1", "deltas": harmful.body["deltas"] + later.body["deltas"]}
    a.receive(_wire(MsgType.PUSH, push), 5.0)
    assert a.counters["fenced_rows"] == fenced + 16
    assert a.read_rows("m", "t", np.array([20])).tolist() == [[7.0, 7.0]], "the newer row applies"
    # a pull answer carrying them, shard by shard
    spec = SMALL.table("t")
    ids = np.arange(8)
    harmful_v = pc.versions_of(harmful)["t"]
    from ekko.core.delta import Delta
    entries = []
    for s in np.unique(spec.shards_of(ids)).tolist():
        sel = spec.shards_of(ids) == s
        dlt = Delta("m", "t", ids[sel], harmful_v[sel], np.full((sel.sum(), 2), 666.0, np.float32))
        entries.append([s, [], None, delta_to_wire(dlt)])
    a.receive(_wire(MsgType.PULL_RESPONSE, {"from": "b", "models": {"m": {"t": entries}}}), 6.0)
    assert a.counters["fenced_rows"] == fenced + 24
    got_v = _versions(a)
    assert np.array_equal(got_v[:8], want_v[:8])
    assert np.array_equal(a.read_rows("m", "t", np.arange(8)).numpy(), want_x.numpy()), "fenced values never apply"


def test_a_refused_frame_is_no_evidence_of_life():
    # Anyone can post garbage naming a member: only a frame that passed validation may
    # count as that member's heartbeat, or a dead peer could be kept looking alive.
    from p2p.membership import MemberState

    now = 5.0
    a, b = _node("a"), _node("b")
    b.members.merge([a.members.me], now)
    b.members.members["a"].state = MemberState.SUSPECT
    with pytest.raises(ProtocolError):
        b.receive(_wire(MsgType.PUSH, {"from": "a", "dc": "dc1", "deltas": "not a list"}), now)
    assert b.members.members["a"].state == MemberState.SUSPECT
    b.receive(_wire(MsgType.GOSSIP, {"k": "g", "from": "a", "mem": [], "cat": 0, "req": False}), now)
    assert b.members.members["a"].state == MemberState.ALIVE


def test_a_gossip_with_bad_model_states_merges_nothing():
    # Gossip is validated whole before anything merges: a bad model-state map must not
    # leave the sender's member entries (or anything else) behind.
    a, b = _node("a"), _node("b")
    gossip = {"k": "g", "from": "a", "mem": [a.members.me.to_wire()], "cat": 0, "req": False, "ms": ["not", "a", "map"]}
    with pytest.raises(ProtocolError):
        b.receive(_wire(MsgType.GOSSIP, gossip), 5.0)
    assert b.members.get("a") is None and "a" not in b.peer_model_states
    b.receive(_wire(MsgType.GOSSIP, {**gossip, "ms": {"m": "corrupted"}}), 5.0)
    assert b.members.get("a") is not None and b.peer_model_states["a"] == {"m": "corrupted"}
