"""In-process tests of the daemon's HTTP API, error paths, transport and persistence.

Each test runs real aiohttp servers on loopback in the test's event loop (the
aiohttp test client, or AppRunner sites on free ports for multi-replica
cases); the subprocess tests are in ``test_daemon_procs.py``.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time

import msgpack
import numpy as np
import pytest
import torch
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from ekko.core import read_auth
from ekko.core.chain import PublisherChain
from ekko.core.codec import MAX_FRAME_BYTES, Keyring, MsgType, delta_to_wire, encode_frame
from ekko.core.config import NodeConfig, preset
from ekko.server.daemon import Daemon
from ekko.server.http_api import HANDLER_ARGS
from ekko.server.operator_api import MAX_READ_IDS
from ekko.server.persistence import export_model_state, import_model_state
from ekko.core.delta import Delta
from ekko.server.transport import RECONNECT_MIN_S, HttpTransport
from ekko.core.messages import Outgoing
from ekko.replica.node import ReplicaNode
from ekko.replica.snapshot import load_snapshot
from ekko.core.spec import ModelSpec, TableSpec
from ekko.core.key_index import EMPTY_KEY
from ekko.core.version import HLC_EPOCH_MS, pack
from p2p.memnet import MemNet
from procs import free_port

SPEC = ModelSpec("ranker", [TableSpec("emb", rows=5000, dim=8, shards=8),
                            TableSpec("half", rows=300, dim=4, dtype="bfloat16")])
KEY = b"cluster-key-0123"
CFG = NodeConfig(snapshot_interval=0)


def now_ms() -> float:
    return time.time() * 1000.0


def publish_body(pc: PublisherChain, table: str, ids: np.ndarray, vals: np.ndarray, spec: ModelSpec = SPEC):
    frame = pc.frame(spec, {table: (ids.astype(np.int64), vals)}, now_ms=now_ms())
    return frame


async def make_client(tmp_path, key=None, config: NodeConfig = CFG, node_id: str = "r1") -> tuple[Daemon, TestClient]:
    d = Daemon(node_id, "dc1", "127.0.0.1:1", [], tmp_path / node_id, config, key=key, device="cpu")
    server = TestServer(d.app)
    await server.start_server(**HANDLER_ARGS)  # TestServer drops constructor kwargs; these reach the runner
    client = TestClient(server)
    await client.start_server()
    return d, client


async def post(client: TestClient, path: str, data: bytes):
    resp = await client.post(path, data=data)
    body = await resp.read()
    return resp.status, body, resp.headers


async def register(client: TestClient, spec: ModelSpec = SPEC, keyring: Keyring | None = None):
    status, body, _ = await post(client, "/v1/models",
                                 encode_frame(MsgType.REGISTER_MODEL, {"spec": spec.to_dict()}, keyring))
    return status, json.loads(body)


def rejects(metrics_text: str) -> dict[tuple[str, str], float]:
    out = {}
    for m in re.finditer(r'^ekko_rejects_total\{endpoint="([^"]+)",reason="([^"]+)"\} (\S+)$', metrics_text, re.M):
        out[(m.group(1), m.group(2))] = float(m.group(3))
    return out


async def metrics_text(client: TestClient, key: Keyring | bytes | None = None) -> str:
    """``/metrics``; signed with ``key`` (a keyed daemon refuses unsigned reads)."""
    resp = await client.get("/metrics", headers=read_auth.read_headers(key, "/metrics"))
    assert resp.status == 200
    return await resp.text()


async def digests(client: TestClient, key: Keyring | bytes | None = None) -> dict:
    resp = await client.get("/v1/status", headers=read_auth.read_headers(key, "/v1/status"))
    assert resp.status == 200, await resp.text()
    st = await resp.json()
    return {m: {t: i["digest"] for t, i in v["tables"].items()} for m, v in st["models"].items()}


# --------------------------------------------------------------------------- endpoints
async def test_register_publish_read_status_metrics(tmp_path):
    d, client = await make_client(tmp_path)
    try:
        assert (await client.get("/healthz")).status == 200
        status, ack = await register(client)
        assert status == 200 and ack == {"ok": True, "created": True}
        status, ack = await register(client)
        assert status == 200 and ack == {"ok": True, "created": False}
        other = ModelSpec("ranker", [TableSpec("emb", rows=10, dim=8)])
        status, err = await register(client, other)
        assert status == 409 and err["reason"] == "spec_conflict" and "different spec" in err["error"]

        rng = np.random.default_rng(0)
        pc = PublisherChain(origin=7)
        ids = rng.choice(5000, 1200, replace=False)
        vals = rng.standard_normal((1200, 8)).astype(np.float32)
        f = publish_body(pc, "emb", ids, vals)
        status, body, _ = await post(client, "/v1/publish", encode_frame(MsgType.PUBLISH, f.body))
        ack = json.loads(body)
        assert status == 200, body
        assert ack == {"ok": True, "rows": 1200, "applied": 1200, "max_counter": f.last_counter}
        pc.acked(f)
        half_ids = np.arange(0, 300, 3)
        half_vals = rng.standard_normal((len(half_ids), 4)).astype(np.float32)
        half_bits = torch.from_numpy(half_vals).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        f2 = publish_body(pc, "half", half_ids, half_bits)
        status, body, _ = await post(client, "/v1/publish", encode_frame(MsgType.PUBLISH, f2.body))
        assert status == 200, body

        # JSON read: exact float32 values and the versions the chain assigned
        sel = ids[:50]
        resp = await client.get(f"/v1/models/ranker/tables/emb/rows?ids={','.join(map(str, sel))}")
        assert resp.status == 200
        js = await resp.json()
        assert js["ids"] == sel.tolist() and js["dim"] == 8 and js["dtype"] == "float32"
        assert np.array_equal(np.array(js["values"], np.float32), vals[:50])
        assert js["versions"] == pc.versions_of(f)["emb"][:50].tolist()
        # msgpack read
        resp = await client.get(f"/v1/models/ranker/tables/emb/rows?ids={','.join(map(str, sel))}&format=msgpack")
        assert resp.status == 200 and resp.content_type == "application/msgpack"
        m = msgpack.unpackb(await resp.read())
        assert m["n"] == 50 and m["dim"] == 8 and m["dtype"] == "float32"
        assert np.array_equal(np.frombuffer(m["ids"], "<i8"), sel)
        assert np.array_equal(np.frombuffer(m["values"], "<f4").reshape(50, 8), vals[:50])
        assert np.array_equal(np.frombuffer(m["versions"], "<i8"), pc.versions_of(f)["emb"][:50])
        # bfloat16: msgpack carries the raw bits, JSON the widened floats
        q = ",".join(map(str, half_ids))
        m = msgpack.unpackb(await (await client.get(f"/v1/models/ranker/tables/half/rows?ids={q}&format=msgpack")).read())
        assert np.array_equal(np.frombuffer(m["values"], "<u2").reshape(-1, 4), half_bits)
        js = await (await client.get(f"/v1/models/ranker/tables/half/rows?ids={q}")).json()
        widened = torch.from_numpy(half_bits.view(np.int16)).view(torch.bfloat16).float().numpy()
        assert np.array_equal(np.array(js["values"], np.float32), widened)
        # unwritten rows read as zeros with version 0; an empty id list is fine
        js = await (await client.get("/v1/models/ranker/tables/half/rows?ids=1")).json()
        assert js["versions"] == [0] and js["values"] == [[0.0] * 4]
        js = await (await client.get("/v1/models/ranker/tables/emb/rows?ids=")).json()
        assert js["ids"] == [] and js["values"] == []

        st = await (await client.get("/v1/status")).json()
        assert st["node_id"] == "r1" and st["dc"] == "dc1" and st["incarnation"] > 1_600_000_000 * 10**9
        emb = st["models"]["ranker"]["tables"]["emb"]
        assert emb["written_rows"] == 1200 and emb["shards"] == 8 and len(emb["digest"]) == 32
        assert st["models"]["ranker"]["head"] == f2.last_counter
        st = await (await client.get("/v1/status?cluster=1")).json()
        assert [x["node_id"] for x in st["members"]] == ["r1"] and st["members"][0]["state"] == "alive"

        text = await metrics_text(client)
        assert 'ekko_node_events_total{event="published_rows"} 1300.0' in text
        assert 'ekko_written_rows{model="ranker",table="emb"} 1200.0' in text
        assert 'ekko_freshness_lag_seconds{model="ranker"} 0.0' in text
        assert "ekko_push_queue_rows 0.0" in text and "ekko_models 1.0" in text
        assert 'ekko_published_rows_total{model="ranker"} 1300.0' in text
    finally:
        await client.close()


def _garbage_cases(valid_publish: bytes) -> list[tuple[str, bytes, int, str]]:
    """(name, body, expected status, expected reason) for /v1/publish."""
    bad_magic = b"XX" + valid_publish[2:]
    return [
        ("empty", b"", 400, "truncated"),
        ("garbage", b"\x00garbage, not a frame at all" * 3, 400, "bad_magic"),
        ("truncated", valid_publish[: len(valid_publish) // 2], 400, "truncated"),
        ("bad_magic", bad_magic, 400, "bad_magic"),
        ("future_version", valid_publish[:2] + b"\x09" + valid_publish[3:], 400, "bad_version"),
        ("bad_body", encode_frame(MsgType.PUBLISH, {"model": 5}), 400, "bad_body"),
        ("wrong_type", encode_frame(MsgType.GOSSIP, {"k": "g"}), 400, "bad_type"),
        ("unknown_model", encode_frame(MsgType.PUBLISH, {"model": "nope", "origin": 1, "deltas": []}), 404,
         "unknown_model"),
    ]


async def test_bad_input_is_rejected_counted_and_changes_nothing(tmp_path):
    d, client = await make_client(tmp_path)
    try:
        await register(client)
        pc = PublisherChain(origin=3)
        rng = np.random.default_rng(1)
        f = publish_body(pc, "emb", np.arange(100), rng.standard_normal((100, 8)).astype(np.float32))
        good = encode_frame(MsgType.PUBLISH, f.body)
        assert (await post(client, "/v1/publish", good))[0] == 200
        pc.acked(f)
        before = await digests(client)
        knowledge_before = export_model_state(d.node, "ranker")

        # a publish that is valid as a frame but whose versions lie about the origin
        f_bad = publish_body(PublisherChain(origin=4), "emb", np.arange(10), np.ones((10, 8), np.float32))
        f_bad.body["origin"] = 3
        # a row id out of range, a wrong-width values array
        d_oob = Delta("ranker", "emb", np.array([5000]), np.array([pack(10**12, 3)]), np.ones((1, 8), np.float32))
        oob = {"model": "ranker", "origin": 3, "deltas": [delta_to_wire(d_oob)], "chains": {}}
        wide = delta_to_wire(Delta("ranker", "emb", np.array([1]), np.array([pack(10**12, 3)]),
                                   np.ones((1, 8), np.float32)))
        wide["x"] = wide["x"] + b"\0\0\0\0"
        cases = _garbage_cases(good) + [
            ("bad_origin", encode_frame(MsgType.PUBLISH, f_bad.body), 400, "bad_version"),
            ("row_out_of_range", encode_frame(MsgType.PUBLISH, oob), 400, None),
            ("wrong_width", encode_frame(MsgType.PUBLISH, {"model": "ranker", "origin": 3, "deltas": [wide]}), 400,
             "bad_body"),
            ("unknown_table", encode_frame(MsgType.PUBLISH, {"model": "ranker", "origin": 3, "deltas": [
                {**delta_to_wire(d_oob), "t": "nope"}]}), 404, "unknown_table"),
        ]
        for name, body, want_status, want_reason in cases:
            status, raw, _ = await post(client, "/v1/publish", body)
            js = json.loads(raw)
            assert status == want_status, (name, status, js)
            assert set(js) == {"error", "reason"} and js["error"], name
            if want_reason is not None:
                assert js["reason"] == want_reason, (name, js)
        # the same garbage at the other frame endpoints
        for path in ("/v1/gossip", "/v1/models"):
            status, raw, _ = await post(client, path, b"\x00garbage")
            assert status == 400 and json.loads(raw)["reason"] == "truncated"
            status, raw, _ = await post(client, path, good[: len(good) - 7])
            assert status == 400
        # peer messages with bad bodies: validated before any state changes
        bad_peer = [
            encode_frame(MsgType.GOSSIP, {"k": "zzz", "from": "x"}),
            encode_frame(MsgType.PULL_REQUEST, {"from": "x", "back": True, "models": {"ranker": {"emb": [[99, [], None, None]]}}}),
            encode_frame(MsgType.PUSH, {"from": "x", "dc": "dc2", "deltas": [wide]}),
            encode_frame(MsgType.PUBLISH, f.body),  # publish is not a peer message
        ]
        for body in bad_peer:
            status, raw, _ = await post(client, "/v1/gossip", body)
            assert 400 <= status < 500, raw
        # wrong method / path: JSON 4xx too
        resp = await client.get("/v1/publish")
        assert resp.status == 405 and (await resp.json())["reason"] == "method_not_allowed"
        resp = await client.get("/nope")
        assert resp.status == 404 and (await resp.json())["reason"] == "not_found"

        counted = rejects(await metrics_text(client))
        for name, _, _, reason in cases:
            if reason is not None:
                assert counted.get(("/v1/publish", reason), 0) >= 1, (name, counted)
        assert counted[("/v1/gossip", "truncated")] == 2
        assert sum(v for (ep, _), v in counted.items() if ep == "/v1/gossip") >= 2 + len(bad_peer)

        assert await digests(client) == before
        assert export_model_state(d.node, "ranker") == knowledge_before
        assert (await client.get("/healthz")).status == 200
        # and it still takes good input
        f2 = publish_body(pc, "emb", np.arange(100, 110), np.ones((10, 8), np.float32))
        assert (await post(client, "/v1/publish", encode_frame(MsgType.PUBLISH, f2.body)))[0] == 200
        assert await digests(client) != before
    finally:
        await client.close()


async def test_read_errors(tmp_path):
    d, client = await make_client(tmp_path)
    try:
        await register(client)
        cases = [
            ("/v1/models/nope/tables/emb/rows?ids=1", 404, "unknown_model"),
            ("/v1/models/ranker/tables/nope/rows?ids=1", 404, "unknown_table"),
            ("/v1/models/ranker/tables/emb/rows", 400, "bad_ids"),
            ("/v1/models/ranker/tables/emb/rows?ids=1,x", 400, "bad_ids"),
            ("/v1/models/ranker/tables/emb/rows?ids=1,,2", 400, "bad_ids"),
            ("/v1/models/ranker/tables/emb/rows?ids=-1", 400, "bad_ids"),
            ("/v1/models/ranker/tables/emb/rows?ids=5000", 400, "bad_ids"),
            ("/v1/models/ranker/tables/emb/rows?ids=99999999999999999999999", 400, "bad_ids"),
            ("/v1/models/ranker/tables/emb/rows?ids=1&format=xml", 400, "bad_format"),
            ("/v1/models/ranker/tables/emb/rows?ids=" + ",".join(["1"] * (MAX_READ_IDS + 1)), 413, "too_many_ids"),
            ("/v1/status?cluster=maybe", 400, "bad_query"),
        ]
        for url, want_status, want_reason in cases:
            resp = await client.get(url)
            js = await resp.json()
            assert (resp.status, js["reason"]) == (want_status, want_reason), (url[:80], js)
        # the cap itself is allowed (and the long request line is accepted)
        resp = await client.get("/v1/models/ranker/tables/emb/rows?format=msgpack&ids="
                                + ",".join(str(i % 5000) for i in range(MAX_READ_IDS)))
        assert resp.status == 200
        assert msgpack.unpackb(await resp.read())["n"] == MAX_READ_IDS
        counted = rejects(await metrics_text(client))
        assert counted[("/v1/models/{model}/tables/{table}/rows", "bad_ids")] == 6
    finally:
        await client.close()


async def test_oversized_bodies_get_413(tmp_path):
    d, client = await make_client(tmp_path)
    try:
        await register(client)
        before = await digests(client)
        # Declared too large: refused from the headers, without reading the body.
        port = client.server.port
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(f"POST /v1/publish HTTP/1.1\r\nHost: x\r\nContent-Length: {MAX_FRAME_BYTES + 1}\r\n"
                f"Content-Type: application/octet-stream\r\n\r\n".encode())
        await w.drain()
        head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 413"), head
        w.close()
        # Really too large, sent chunked (no Content-Length): aiohttp stops at client_max_size.
        async def chunks():
            block = b"\0" * (1 << 20)
            for _ in range((MAX_FRAME_BYTES >> 20) + 2):
                yield block
        try:
            resp = await client.post("/v1/publish", data=chunks())
            assert resp.status == 413
            js = await resp.json()
            assert js["reason"] == "too_large" and "MAX_FRAME_BYTES" in js["error"]
        except (ConnectionError, OSError) as e:  # the server may close while we still write
            pytest.fail(f"no 413 answer: {e!r}")
        counted = rejects(await metrics_text(client))
        assert counted[("/v1/publish", "too_large")] == 2
        assert await digests(client) == before
        assert (await client.get("/healthz")).status == 200
    finally:
        await client.close()


async def test_hmac_required_when_keyed(tmp_path):
    kr = Keyring.single(KEY)
    d, client = await make_client(tmp_path, key=KEY)
    try:
        spec_body = {"spec": SPEC.to_dict()}
        cases = [
            (encode_frame(MsgType.REGISTER_MODEL, spec_body), "unauthenticated"),
            (encode_frame(MsgType.REGISTER_MODEL, spec_body, Keyring.single(b"another-key-456")), "bad_mac"),
            (encode_frame(MsgType.REGISTER_MODEL, spec_body, Keyring({9: KEY})), "bad_mac"),  # unknown key id
        ]
        tampered = bytearray(encode_frame(MsgType.REGISTER_MODEL, spec_body, kr))
        tampered[20] ^= 1
        cases.append((bytes(tampered), "bad_mac"))
        for body, reason in cases:
            status, raw, _ = await post(client, "/v1/models", body)
            assert status == 401 and json.loads(raw)["reason"] == reason
            status, raw, _ = await post(client, "/v1/gossip", body)
            assert status == 401
        assert (await client.get("/v1/status")).status == 401              # reads are signed too
        assert (await digests(client, kr)) == {}
        counted = rejects(await metrics_text(client, kr))
        assert counted[("/v1/models", "bad_mac")] == 3 and counted[("/v1/models", "unauthenticated")] == 1
        status, ack = await register(client, keyring=kr)
        assert status == 200 and ack["created"]
    finally:
        await client.close()


async def test_draining_refuses_writes_and_fails_healthz(tmp_path):
    d, client = await make_client(tmp_path)
    try:
        d.draining = True
        resp = await client.get("/healthz")
        assert resp.status == 503 and resp.headers["Retry-After"] == "1"
        status, raw, headers = await post(client, "/v1/models", encode_frame(MsgType.REGISTER_MODEL,
                                                                             {"spec": SPEC.to_dict()}))
        assert status == 503 and headers["Retry-After"] == "1"
        assert "ranker" not in d.node.models
        st = await (await client.get("/v1/status")).json()
        assert st["serving"] is False
    finally:
        await client.close()


async def test_overload_answers_429_with_retry_after(tmp_path, monkeypatch):
    import ekko.server.http_api

    d, client = await make_client(tmp_path)
    try:
        monkeypatch.setattr(ekko.server.http_api, "MAX_CONCURRENT_REQUESTS", 0)
        status, raw, headers = await post(client, "/v1/models", encode_frame(MsgType.REGISTER_MODEL,
                                                                             {"spec": SPEC.to_dict()}))
        assert status == 429 and headers["Retry-After"] == "1" and json.loads(raw)["reason"] == "overloaded"
        assert "ranker" not in d.node.models
        assert (await client.get("/healthz")).status == 200  # probes are never shed
        monkeypatch.undo()
        assert (await register(client))[0] == 200
    finally:
        await client.close()


# --------------------------------------------------------------------------- persistence
async def test_restart_restores_values_versions_and_knowledge(tmp_path):
    d, client = await make_client(tmp_path)
    rng = np.random.default_rng(5)
    pc = PublisherChain(origin=11)
    try:
        await register(client)
        for _ in range(3):
            ids = rng.choice(5000, 700, replace=False)
            f = publish_body(pc, "emb", ids, rng.standard_normal((700, 8)).astype(np.float32))
            assert (await post(client, "/v1/publish", encode_frame(MsgType.PUBLISH, f.body)))[0] == 200
            pc.acked(f)
        before = await digests(client)
        state = export_model_state(d.node, "ranker")
        assert state["knowledge"]["emb"], "chained publishes advance knowledge"
        versions = d.node.table_store("ranker", "emb").versions.copy()
    finally:
        await client.close()  # cleanup writes the final snapshot

    d2, client2 = await make_client(tmp_path)
    try:
        assert d2.restored == ["ranker"]
        assert await digests(client2) == before
        assert export_model_state(d2.node, "ranker")["knowledge"] == state["knowledge"]
        assert np.array_equal(d2.node.table_store("ranker", "emb").versions, versions)
        assert d2.node.models["ranker"].head == state["head"]
        # the publisher's chain continues across the replica restart: knowledge jumps again
        ids = rng.choice(5000, 100, replace=False)
        f = publish_body(pc, "emb", ids, rng.standard_normal((100, 8)).astype(np.float32))
        assert (await post(client2, "/v1/publish", encode_frame(MsgType.PUBLISH, f.body)))[0] == 200
        k = export_model_state(d2.node, "ranker")["knowledge"]["emb"]
        assert max(c for _, kv in k for o, c in kv if o == 11) == f.last_counter
    finally:
        await client2.close()


async def test_restored_replica_serves_pulls_from_an_empty_peer(tmp_path):
    """The recent-row index is not persisted; a restored replica must still hand its rows
    to a peer that pulls (else the peer adopts its knowledge without the rows)."""
    d, client = await make_client(tmp_path)
    rng = np.random.default_rng(9)
    pc = PublisherChain(origin=2)
    try:
        await register(client)
        for table, n, dim in (("emb", 3000, 8), ("half", 200, 4)):
            ids = rng.choice(SPEC.table(table).rows, n, replace=False)
            vals = rng.standard_normal((n, dim)).astype(np.float32)
            if table == "half":
                vals = torch.from_numpy(vals).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
            f = publish_body(pc, table, ids, vals)
            assert (await post(client, "/v1/publish", encode_frame(MsgType.PUBLISH, f.body)))[0] == 200
            pc.acked(f)
        want = await digests(client)
    finally:
        await client.close()

    store, meta = load_snapshot(tmp_path / "r1", SPEC, "cpu")
    net = MemNet(seed=1)
    cfg = preset("local")
    a = ReplicaNode("a", "dc1", "a", config=cfg, device="cpu")
    import_model_state(a, SPEC, store, meta, 0.0)
    b = ReplicaNode("b", "dc1", "b", config=cfg, device="cpu", seeds=["a"])
    for n in (a, b):  # protocol time starts at 0 here, the rows carry the real clock's versions
        n.wall_offset_s = time.time()
    net.add(a)
    net.add(b)
    ok = net.run_until(lambda: "ranker" in b.models and {t: i["digest"] for t, i in
                                                         b.status()["models"]["ranker"]["tables"].items()}
                       == want["ranker"], timeout=30)
    assert ok, b.status()["models"].get("ranker")
    assert b.models["ranker"].shards["emb"] and all(
        b.models["ranker"].shards["emb"][s].knowledge == a.models["ranker"].shards["emb"][s].knowledge
        for s in a.models["ranker"].shards["emb"])


async def test_a_data_dir_serves_one_daemon_only(tmp_path):
    from ekko.core.errors import UsageError

    d, client = await make_client(tmp_path)
    try:
        await register(client)
        other = Daemon("r1", "dc1", "127.0.0.1:1", [], tmp_path / "r1", CFG, device="cpu")
        server = TestServer(other.app)
        with pytest.raises(UsageError, match="in use"):
            await server.start_server(**HANDLER_ARGS)
        assert not (tmp_path / "r1" / "models").exists()  # the refused daemon wrote nothing
    finally:
        await client.close()
    assert (tmp_path / "r1" / "models" / "ranker").exists()
    d2, client2 = await make_client(tmp_path)  # the lock went with the first daemon
    try:
        assert d2.restored == ["ranker"]
    finally:
        await client2.close()


async def test_periodic_snapshots(tmp_path):
    d, client = await make_client(tmp_path, config=NodeConfig(snapshot_interval=0.2))
    try:
        await register(client)

        async def count() -> float:
            m = re.search(r'^ekko_snapshots_total\{outcome="ok"\} (\S+)$', await metrics_text(client), re.M)
            return float(m.group(1)) if m else 0.0

        end = time.monotonic() + 20
        while await count() < 2:
            assert time.monotonic() < end, "no periodic snapshots"
            await asyncio.sleep(0.05)
        assert (tmp_path / "r1" / "models" / "ranker" / "manifest.json").exists()
        assert (tmp_path / "r1" / "catalog.json").exists()
    finally:
        await client.close()


# --------------------------------------------------------------------------- transport and clusters
async def start_site(d: Daemon) -> web.AppRunner:
    runner = web.AppRunner(d.app, **HANDLER_ARGS)
    await runner.setup()
    await web.TCPSite(runner, d.host, d.port).start()
    return runner


def tcp_daemon(tmp_path, node_id: str, dc: str, seeds=(), key=None) -> Daemon:
    return Daemon(node_id, dc, f"127.0.0.1:{free_port()}", list(seeds), tmp_path / node_id, CFG, key=key,
                  device="cpu")


async def wait_async(pred, timeout: float, what: str):
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_two_daemons_converge_over_http_and_count_bytes(tmp_path):
    a = tcp_daemon(tmp_path, "a", "dc1")
    b = tcp_daemon(tmp_path, "b", "dc2", seeds=[a.address])
    runners = [await start_site(a), await start_site(b)]
    try:
        status, _ = await _post_raw(a.address, "/v1/models", encode_frame(MsgType.REGISTER_MODEL,
                                                                          {"spec": SPEC.to_dict()}))
        assert status == 200
        # b learns the model from a's gossiped catalog; only then can a's push land there
        await wait_async(lambda: "ranker" in b.node.models and "b" in a.node.members.members, 20, "catalog")
        pc = PublisherChain(origin=5)
        rng = np.random.default_rng(3)
        f = publish_body(pc, "emb", rng.choice(5000, 2000, replace=False),
                         rng.standard_normal((2000, 8)).astype(np.float32))
        assert (await _post_raw(a.address, "/v1/publish", encode_frame(MsgType.PUBLISH, f.body)))[0] == 200
        want = a.node.status()["models"]["ranker"]["tables"]["emb"]["digest"]
        await wait_async(lambda: "ranker" in b.node.models and
                         b.node.status()["models"]["ranker"]["tables"]["emb"]["digest"] == want, 20, "convergence")
        # b applied the push before a saw b's 204, so wait for a's side of the count
        await wait_async(lambda: a.metrics.bytes_sent.labels("dc2", "PUSH")._value.get() > 0, 10, "push bytes")
        text = a.metrics.render().decode()
        assert re.search(r'ekko_bytes_sent_total\{msg_type="PUSH",peer_dc="dc2"\} [1-9]', text), text
        assert re.search(r'ekko_bytes_received_total\{msg_type="GOSSIP",peer_dc="dc2"\} [1-9]', text)
        text_b = b.metrics.render().decode()
        assert re.search(r'ekko_bytes_received_total\{msg_type="PUSH",peer_dc="dc1"\} [1-9]', text_b)
    finally:
        for r in runners:
            await r.cleanup()


async def test_keyed_cluster_refuses_a_stranger(tmp_path):
    a = tcp_daemon(tmp_path, "a", "dc1", key=KEY)
    b = tcp_daemon(tmp_path, "b", "dc1", seeds=[a.address], key=KEY)
    c = tcp_daemon(tmp_path, "c", "dc1", seeds=[a.address], key=b"not-the-cluster-key")
    runners = [await start_site(x) for x in (a, b, c)]
    try:
        kr = Keyring.single(KEY)
        assert (await _post_raw(a.address, "/v1/models",
                                encode_frame(MsgType.REGISTER_MODEL, {"spec": SPEC.to_dict()}, kr)))[0] == 200
        await wait_async(lambda: "ranker" in b.node.models, 20, "b to learn the model")
        await wait_async(lambda: a.metrics.rejects.labels("/v1/gossip", "bad_mac")._value.get() > 0, 20,
                         "a to refuse c's gossip")
        assert "ranker" not in c.node.models and "c" not in a.node.members.members
        assert c.transport.failures["http_401"] > 0
    finally:
        for r in runners:
            await r.cleanup()


async def _post_raw(address: str, path: str, data: bytes) -> tuple[int, bytes]:
    import aiohttp
    async with aiohttp.ClientSession() as s:
        async with s.post(f"http://{address}{path}", data=data) as resp:
            return resp.status, await resp.read()


async def test_transport_counts_failures_and_bounds_in_flight():
    # a listener that accepts and never answers: the stream's upgrade hangs until its timeout
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    silent = f"127.0.0.1:{sock.getsockname()[1]}"
    dead = f"127.0.0.1:{free_port()}"
    failed: list[str] = []
    t = HttpTransport(max_in_flight=6, backlog=3, timeout_s=3,
                      on_failed=lambda out, reason: failed.append(reason))
    await t.start()
    try:
        msg = lambda addr: Outgoing("x", addr, MsgType.GOSSIP, {"k": "g", "from": "me"})  # noqa: E731
        # a refused connection fails the link's whole queue ...
        assert [t.send(msg(dead)) for _ in range(3)] == [True] * 3
        await wait_async(lambda: t.failures["connect"] == 3, 10, "the refused link to fail")
        # ... and the refusing peer is left alone for a while: its next message fails unencoded
        encoded = t.frames_encoded
        assert not t.send(msg(dead)) and t.failures["connect"] == 4 and t.frames_encoded == encoded
        results = [t.send(msg(silent)) for _ in range(5)]
        # three queued on the silent peer's link (the backlog); the rest dropped at once
        assert results == [True, True, True, False, False]
        assert t.failures["dropped_backlog"] == 2
        await asyncio.sleep(2 * RECONNECT_MIN_S)   # the dead peer's first back-off is over
        results = [t.send(msg(dead)) for _ in range(3)]
        assert results == [True, True, True] and t.in_flight == 6
        assert not t.send(msg(dead)) and t.failures["dropped_in_flight"] == 1
        assert await t.flush(10)
        # the upgrade that hangs times out; the dead peer refused again
        assert t.failures["connect"] == 7 and t.failures["timeout"] == 3
        assert t.in_flight == 0 and sorted(set(failed)) == sorted(set(t.failures))
    finally:
        await t.close()
        sock.close()


# --------------------------------------------------------------------------- command line
def test_daemon_settings_merge_file_and_flags(tmp_path):
    from ekko.cli.main import build_parser, daemon_settings
    from ekko.core.errors import UsageError

    cfg = tmp_path / "replica.toml"
    cfg.write_text('[node]\npreset = "wan"\nae_interval = 0.7\n\n[daemon]\nnode_id = "r9"\ndc = "dcx"\n'
                   'listen = "127.0.0.1:7000"\nseeds = ["127.0.0.1:7001"]\ndata_dir = "/tmp/r9"\n')
    parse = build_parser().parse_args
    settings, config = daemon_settings(parse(["daemon", "--config", str(cfg), "--dc", "dcy",
                                              "--seed", "127.0.0.1:7002"]))
    assert (settings["node_id"], settings["dc"], settings["seeds"]) == ("r9", "dcy", ["127.0.0.1:7002"])
    assert settings["torch_threads"] == 1
    assert config.preset == "wan" and config.ae_interval == 0.7 and config.gossip_interval == 1.0
    _, config = daemon_settings(parse(["daemon", "--config", str(cfg), "--preset", "local"]))
    assert config.preset == "local" and config.ae_interval == 0.7 and config.gossip_interval == 0.2
    with pytest.raises(UsageError, match="--dc"):
        daemon_settings(parse(["daemon", "--node-id", "a", "--listen", "127.0.0.1:1", "--data-dir", "/tmp/a"]))
    bad = tmp_path / "bad.toml"
    bad.write_text('[daemon]\nnode_idd = "x"\n')
    with pytest.raises(UsageError, match="node_idd"):
        daemon_settings(parse(["daemon", "--config", str(bad)]))
    bad.write_text('[node]\nae_intervall = 1\n')
    with pytest.raises(UsageError, match="ae_intervall"):
        daemon_settings(parse(["daemon", "--config", str(bad), "--node-id", "a", "--dc", "d", "--listen",
                               "127.0.0.1:1", "--data-dir", "/tmp/a"]))


def test_cli_exit_codes_and_status_rendering(capsys):
    import io

    from rich.console import Console

    from ekko.cli.main import main, render_status

    assert main(["daemon", "--node-id", "x"]) == 2
    assert "missing" in capsys.readouterr().err
    assert main(["status", "--peer", f"127.0.0.1:{free_port()}"]) == 1
    assert "cannot reach" in capsys.readouterr().err

    st = {"node_id": "r1", "dc": "dc1", "address": "127.0.0.1:7000", "incarnation": 5, "serving": True,
          "models": {"ranker": {"head": 123, "lag_s": 0.25, "traffic_share": 1.0, "tables": {
              "emb": {"rows": 100, "dim": 8, "dtype": "float32", "shards": 2, "dense": False, "written_rows": 7,
                      "digest": "0123456789abcdef0123456789abcdef"}}}},
          "members": [{"node_id": "r1", "dc": "dc1", "address": "127.0.0.1:7000", "state": "alive",
                       "incarnation": 5, "lag_s": {"ranker": 0.0}},
                      {"node_id": "r2", "dc": "dc2", "address": "127.0.0.1:7001", "state": "dead",
                       "incarnation": 3, "lag_s": {"ranker": 1.5}}]}
    buf = io.StringIO()
    render_status(st, Console(file=buf, width=200))
    out = buf.getvalue()
    for text in ("ranker", "emb", "0123456789ab", "250 ms", "r2", "dc2", "dead", "1.5 s", "cluster (2 members)"):
        assert text in out, text
    assert "0123456789abc" not in out  # digest shown as a prefix


# --------------------------------------------------------------------------- structural fuzz
_FUZZ_VALUES = [None, -1, 0, 1, 2**63 - 1, 2**64 - 1, "x", "", b"", b"\x00" * 8, b"\x01" * 7, [], {}, [[1, 2]],
                [1], 1.5, True, False, {"x": 1}, [None, None, None, None], "emb", "ranker", 3, 10**6]
#: mutated messages the structural fuzz sends (seeded; a few seconds).
FUZZ_MESSAGES = 800


def _traffic_corpus() -> list[tuple[MsgType, dict]]:
    """Real message bodies of every type, recorded from two nodes exchanging a few publishes."""
    from ekko.core.codec import decode_frame

    cfg = preset("local")
    nodes = {"a": ReplicaNode("a", "dc1", "a", config=cfg, device="cpu", seeds=["b"]),
             "b": ReplicaNode("b", "dc2", "b", config=cfg, device="cpu", seeds=["a"])}
    for n in nodes.values():  # the publisher's clock below runs 1000 s ahead of the nodes' time
        n.wall_offset_s = HLC_EPOCH_MS / 1000 + 2000
    nodes["a"].register_model(SPEC, 0.0)
    pc = PublisherChain(origin=3)
    rng = np.random.default_rng(0)
    out: list[tuple[MsgType, dict]] = [(MsgType.REGISTER_MODEL, {"spec": SPEC.to_dict()})]
    now = 0.0
    lost_push = False
    for step in range(60):
        now += 0.1
        if step in (5, 20, 40):
            f = pc.frame(SPEC, {"emb": (rng.choice(5000, 100, replace=False),
                                        rng.standard_normal((100, 8)).astype(np.float32))},
                         now_ms=HLC_EPOCH_MS + 10**6 + now * 1000)
            out.append((MsgType.PUBLISH, f.body))
            nodes["a"].publish(f.body, now)
            pc.acked(f)
        for n in nodes.values():
            n.tick(now)
        for _ in range(5):
            for n in nodes.values():
                for o in n.drain():
                    out.append((o.msg_type, o.body))
                    if o.msg_type == MsgType.PUSH and not lost_push:
                        # Lose the first push: its chain links would otherwise keep the two
                        # nodes' knowledge equal, and anti-entropy would never pull.
                        lost_push = True
                        continue
                    nodes[o.dst or o.address].receive(decode_frame(encode_frame(o.msg_type, o.body)), now)
    return out


def _mutate(body: dict, rng) -> dict:
    import copy

    body = copy.deepcopy(body)

    def paths(obj, prefix=()):
        if prefix:
            yield prefix
        if isinstance(obj, dict):
            for k, v in obj.items():
                yield from paths(v, prefix + (k,))
        elif isinstance(obj, list):
            for i, v in enumerate(obj[:6]):
                yield from paths(v, prefix + (i,))

    where = list(paths(body))
    for _ in range(rng.choice([1, 1, 2, 3])):
        p = rng.choice(where)
        parent = body
        try:
            for k in p[:-1]:
                parent = parent[k]
            if rng.random() < 0.15 and isinstance(parent, dict):
                del parent[p[-1]]
            else:
                parent[p[-1]] = copy.deepcopy(rng.choice(_FUZZ_VALUES))
        except (KeyError, IndexError, TypeError):
            pass  # an earlier mutation removed the path
    return body


async def test_structurally_mutated_messages_never_cause_a_500(tmp_path):
    """Well-framed messages with wrong field types, missing fields, out-of-range numbers and
    wrong-length arrays, at every endpoint: 4xx or accepted, never a 5xx, still serving."""
    import random

    corpus = _traffic_corpus()
    assert {t for t, _ in corpus} == {MsgType.REGISTER_MODEL, MsgType.PUBLISH, MsgType.GOSSIP,
                                      MsgType.PULL_REQUEST, MsgType.PULL_RESPONSE, MsgType.PUSH}
    d, client = await make_client(tmp_path)
    path_of = {MsgType.PUBLISH: "/v1/publish", MsgType.REGISTER_MODEL: "/v1/models"}
    try:
        for t, body in corpus:  # the real traffic first, so senders and the model are known
            status, raw, _ = await post(client, path_of.get(t, "/v1/gossip"), encode_frame(t, body))
            assert status in (200, 204), raw
        rng = random.Random(1)
        seen: dict[int, int] = {}
        for _ in range(FUZZ_MESSAGES):
            t, body = rng.choice(corpus)
            try:
                frame = encode_frame(t, _mutate(body, rng))
            except (OverflowError, ValueError, TypeError):
                continue  # not encodable (e.g. an int over 64 bits)
            status, raw, _ = await post(client, path_of.get(t, "/v1/gossip"), frame)
            seen[status] = seen.get(status, 0) + 1
            assert status < 500, (t.name, raw[:300])
            if status >= 400:
                js = json.loads(raw)
                assert js["error"] and js["reason"]
        assert seen.get(400, 0) > FUZZ_MESSAGES // 4, seen  # the fuzz mostly hits validation
        assert not re.search(r"^ekko_internal_errors_total\{", await metrics_text(client), re.M)
        assert (await client.get("/healthz")).status == 200
    finally:
        await client.close()


async def test_hashed_reads_by_key_and_their_errors(tmp_path):
    """A hashed table's rows by key (found or not) and by slot, its key listing, and bad
    key reads refused with the reason counted; a dense table refuses keys."""
    from ekko.core.hashed import with_keys
    spec = ModelSpec("ads", [TableSpec("h", dim=2, keys="int64", capacity=64, shards=2),
                             TableSpec("e", rows=10, dim=2)])
    d, client = await make_client(tmp_path)
    try:
        assert (await register(client, spec))[0] == 200
        pc = PublisherChain(3)
        keys = np.array([10**15, -5], np.int64)
        rows = with_keys(np.array([[1, 2], [3, 4]], np.float32), keys, spec.table("h"))
        frame = pc.frame(spec, {"h": (np.array([7, 40]), rows)}, now_ms=time.time() * 1000)
        assert (await post(client, "/v1/publish", encode_frame(MsgType.PUBLISH, frame.body)))[0] == 200
        js = await (await client.get(f"/v1/models/ads/tables/h/rows?keys={10**15},9,-5")).json()
        assert (js["ids"], js["found"], js["keys"]) == ([7, -1, 40], [True, False, True], [10**15, 9, -5])
        assert js["values"] == [[1, 2], [0, 0], [3, 4]] and js["versions"][1] == 0 and js["dim"] == 2
        js = await (await client.get("/v1/models/ads/tables/h/rows?ids=40,0")).json()
        assert (js["keys"], js["values"]) == ([-5, EMPTY_KEY], [[3, 4], [0, 0]])
        listing = msgpack.unpackb(await (await client.get("/v1/models/ads/tables/h/keys")).read())
        assert np.frombuffer(listing["slots"], "<i8").tolist() == [7, 40]
        assert np.frombuffer(listing["keys"], "<i8").tolist() == [10**15, -5]
        cases = [
            (f"/v1/models/ads/tables/h/rows?keys={EMPTY_KEY}", 400, "bad_ids"),
            ("/v1/models/ads/tables/h/rows?keys=1,x", 400, "bad_ids"),
            (f"/v1/models/ads/tables/h/rows?keys={2**63}", 400, "bad_ids"),
            ("/v1/models/ads/tables/e/rows?keys=1", 400, "bad_ids"),
            ("/v1/models/ads/tables/e/keys", 404, "unknown_table"),
            ("/v1/models/ads/tables/h/rows?keys=" + ",".join(["1"] * (MAX_READ_IDS + 1)), 413, "too_many_ids"),
        ]
        for url, want_status, want_reason in cases:
            resp = await client.get(url)
            js = await resp.json()
            assert (resp.status, js["reason"]) == (want_status, want_reason), (url[:80], js)
    finally:
        await client.close()
