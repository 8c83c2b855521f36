"""Signed reads (issue #17): a daemon that holds any key (a cluster key, peer keys, with
or without reader keys) answers every GET but /healthz only with a signature by a peer
key, or by a reader key allowed the model read; ``open_metrics`` opens /metrics alone;
a daemon without keys stays open.  The project's own readers sign."""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import pytest
from aiohttp.test_utils import TestClient, TestServer

from ekko.core import read_auth
from ekko.core.chain import PublisherChain
from ekko.core.codec import Keyring, MsgType, PublisherGrant, ReaderGrant, encode_frame
from ekko.core.errors import ProtocolError
from ekko.core.keyring import validate
from ekko.core.spec import ModelSpec, TableSpec
from ekko.sdk.ack import KeyRejected
from ekko.sdk.client import Client
from ekko.server.daemon import Daemon
from ekko.server.http_api import HANDLER_ARGS
from test_daemon import CFG, SPEC, make_client, post, publish_body, rejects, start_site, tcp_daemon

PEER, ANY_READER, RANKER_READER = b"peer-secret-0123456", b"reader-secret-any-01", b"reader-secret-ranker"
TRAINER = b"trainer-secret-ranker"
RING = Keyring({1: PEER, 7: ANY_READER, 8: RANKER_READER}, primary=1,
               readers={7: ReaderGrant(), 8: ReaderGrant(frozenset({"ranker"}))})
#: a second model, for reads a key is not allowed.
ADS = ModelSpec("ads", [TableSpec("emb", rows=100, dim=4)])
ROWS = "/v1/models/ranker/tables/emb/rows?ids=1,2"
#: every read of the API (but /healthz), with the model each names.
READS = ("/v1/status", "/v1/status?cluster=1", "/metrics", ROWS, "/v1/models/ranker",
         "/v1/models/ranker/knowledge", "/v1/models/ranker/changes", "/v1/models/ranker/shared",
         "/v1/models/ranker/cuts", "/v1/models/ranker/rollbacks")


def signed(kid: int, secret: bytes, path: str, now: float | None = None) -> dict[str, str]:
    return {read_auth.HEADER: read_auth.sign(Keyring({kid: secret}), "GET", path,
                                             time.time() if now is None else now)}


async def get(client, path: str, headers: dict[str, str] | None = None) -> int:
    resp = await client.get(path, headers=headers or {})
    await resp.read()
    return resp.status


async def answer(client, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    resp = await client.get(path, headers=headers or {})
    raw = await resp.read()
    return resp.status, (json.loads(raw) if resp.content_type == "application/json" else {})


async def keyed_client(tmp_path, key, open_metrics: bool = False, node_id: str = "r1"):
    """A daemon with ``key`` (and ``open_metrics``) behind the aiohttp test client, both
    models registered with a peer-signed frame."""
    d = Daemon(node_id, "dc1", "127.0.0.1:1", [], tmp_path / node_id, CFG, key=key, device="cpu",
               open_metrics=open_metrics)
    server = TestServer(d.app)
    await server.start_server(**HANDLER_ARGS)
    client = TestClient(server)
    await client.start_server()
    for spec in (SPEC, ADS):
        reg = encode_frame(MsgType.REGISTER_MODEL, {"spec": spec.to_dict()}, Keyring({1: PEER}))
        assert (await post(client, "/v1/models", reg))[0] == 200
    return d, client


async def test_a_cluster_key_alone_makes_every_read_signed(tmp_path):
    """The issue's bar: with only a cluster key (``--key-file``), unsigned reads get 401 and
    reads signed by the cluster key work."""
    d, client = await keyed_client(tmp_path, PEER)            # bytes: what --key-file gives
    try:
        assert not d.keyring.read_acl                          # no reader key at all
        assert await get(client, "/healthz") == 200            # probes stay open
        for path in READS:
            status, body = await answer(client, path)
            assert (status, body.get("reason")) == (401, "unauthenticated"), (path, status, body)
            assert await get(client, path, {read_auth.HEADER: "garbage"}) == 401, path
            assert await get(client, path, signed(1, b"another-cluster-key", path)) == 401, path
            assert await get(client, path, signed(1, PEER, path)) == 200, path
        # a signature is for one path and one method
        assert await get(client, ROWS, signed(1, PEER, "/v1/status")) == 401
        resp = await client.head("/v1/status")
        assert resp.status == 401                              # HEAD runs the handler too
        resp = await client.head("/v1/status", headers={read_auth.HEADER: read_auth.sign(
            Keyring({1: PEER}), "HEAD", "/v1/status", time.time())})
        assert resp.status == 200
        counted = rejects(d.metrics.render().decode())
        assert counted[("/v1/status", "unauthenticated")] >= 3
        # writes are frames, signed as before: unchanged
        pc = PublisherChain(origin=3)
        f = publish_body(pc, "emb", np.array([1]), np.ones((1, 8), np.float32))
        assert (await post(client, "/v1/publish", encode_frame(MsgType.PUBLISH, f.body, Keyring({1: PEER}))))[0] == 200
    finally:
        await client.close()


async def test_open_metrics_opens_metrics_alone(tmp_path):
    d, client = await keyed_client(tmp_path, Keyring({1: PEER}), open_metrics=True)
    try:
        resp = await client.get("/metrics")
        assert resp.status == 200 and b"ekko_" in await resp.read()     # a Prometheus scrape
        assert await get(client, "/healthz") == 200
        for path in READS:
            if path != "/metrics":
                assert await get(client, path) == 401, path
                assert await get(client, path, signed(1, PEER, path)) == 200, path
    finally:
        await client.close()


async def test_reader_and_publisher_keys_read_what_they_are_allowed(tmp_path):
    ring = Keyring({1: PEER, 8: RANKER_READER, 9: TRAINER}, primary=1,
                   grants={9: PublisherGrant(frozenset({"ranker"}))}, readers={8: ReaderGrant(frozenset({"ranker"}))})
    d, client = await keyed_client(tmp_path, ring)
    try:
        ads_rows = "/v1/models/ads/tables/emb/rows?ids=1"
        assert await get(client, ROWS, signed(8, RANKER_READER, ROWS)) == 200
        for path in (ads_rows, "/v1/models/ads", "/v1/models/ads/knowledge", "/v1/models/ads/changes"):
            status, body = await answer(client, path, signed(8, RANKER_READER, path))
            assert (status, body.get("reason")) == (403, "forbidden"), path          # model A reads model B
        assert await get(client, "/v1/status", signed(8, RANKER_READER, "/v1/status")) == 200   # no one model
        # a publisher key reads the rollbacks of its models (its rollback watch), nothing else
        mine, theirs = "/v1/models/ranker/rollbacks", "/v1/models/ads/rollbacks"
        assert await get(client, mine, signed(9, TRAINER, mine)) == 200
        assert await get(client, theirs, signed(9, TRAINER, theirs)) == 403
        for path in ("/v1/status", "/metrics", ROWS):
            assert await get(client, path, signed(9, TRAINER, path)) == 403, path
    finally:
        await client.close()


async def test_reads_need_a_signature_of_a_key_allowed_to_read(tmp_path):
    d, client = await make_client(tmp_path, key=RING)
    try:
        reg = encode_frame(MsgType.REGISTER_MODEL, {"spec": SPEC.to_dict()}, Keyring({1: PEER}))
        assert (await post(client, "/v1/models", reg))[0] == 200
        rows = "/v1/models/ranker/tables/emb/rows?ids=1,2"
        assert await get(client, "/healthz") == 200                                   # probes stay open
        for path in ("/v1/status", "/metrics", rows, "/v1/models/ranker", "/v1/models/ranker/changes"):
            assert await get(client, path) == 401, path                               # unsigned
        assert await get(client, rows, signed(7, ANY_READER, rows)) == 200
        assert await get(client, rows, signed(8, RANKER_READER, rows)) == 200
        assert await get(client, rows, signed(1, PEER, rows)) == 200                  # a peer key reads too
        assert await get(client, "/metrics", signed(8, RANKER_READER, "/metrics")) == 200
        other = "/v1/models/ads/knowledge"
        assert await get(client, other, signed(8, RANKER_READER, other)) == 403      # not its model
        assert await get(client, rows, signed(8, RANKER_READER, "/v1/status")) == 401  # signed another path
        assert await get(client, rows, signed(8, b"wrong-secret-xxxxxx", rows)) == 401
        stale = time.time() - read_auth.MAX_SKEW_S - 5
        assert await get(client, rows, signed(8, RANKER_READER, rows, now=stale)) == 401
        # a reader key signs reads only, never a frame
        pc = PublisherChain(origin=3)
        f = publish_body(pc, "emb", np.array([1]), np.ones((1, 8), np.float32))
        body = encode_frame(MsgType.PUBLISH, f.body, Keyring({8: RANKER_READER}))
        status, raw, _ = await post(client, "/v1/publish", body)
        assert status == 403 and b"reader key" in raw
    finally:
        await client.close()


async def test_without_any_key_reads_stay_open(tmp_path):
    d, client = await make_client(tmp_path, key=None)
    try:
        reg = encode_frame(MsgType.REGISTER_MODEL, {"spec": SPEC.to_dict()}, None)
        assert (await post(client, "/v1/models", reg))[0] == 200
        for path in ("/v1/status", "/metrics", ROWS, "/v1/models/ranker/knowledge", "/v1/models/ranker/changes"):
            assert await get(client, path) == 200, path
        assert await get(client, "/v1/status", {read_auth.HEADER: "garbage"}) == 200   # not looked at
    finally:
        await client.close()


async def test_the_client_signs_its_reads(tmp_path):
    d = tcp_daemon(tmp_path, "a", "dc1", key=RING)
    runner = await start_site(d)
    try:
        await asyncio.to_thread(Client(d.address, key=Keyring({1: PEER})).register, SPEC)
        reader = Client(d.address, key=Keyring({8: RANKER_READER}))
        assert (await asyncio.to_thread(reader.read_versions, "ranker", "emb", [1, 2])).tolist() == [0, 0]
        assert "ranker" in (await asyncio.to_thread(reader.status))["models"]
        with pytest.raises(KeyRejected):
            await asyncio.to_thread(Client(d.address).status)                      # unsigned: 401
    finally:
        await runner.cleanup()


def _every_read(c: Client, since: str) -> dict:
    """Each read method of the client once (what a caller with the cluster key does)."""
    return {"read": c.read("ranker", "emb", [1, 2]).versions.tolist(), "spec": c.spec("ranker").name,
            "changes": c.changes("ranker", since, wait=0.0).tables.keys(),
            "watch": next(iter(c.watch("ranker", since=since, wait=0.5))).tables.keys(),
            "status": "ranker" in c.status(cluster=True)["models"], "cuts": c.cuts("ranker"),
            "healthz": c.healthz()}


async def test_the_client_signs_every_read_with_a_cluster_key(tmp_path):
    d = tcp_daemon(tmp_path, "a", "dc1", key=PEER)
    runner = await start_site(d)
    try:
        c = Client(d.address, key=PEER)
        await asyncio.to_thread(c.register, SPEC)
        since = (await asyncio.to_thread(c.changes, "ranker")).cursor
        await _publish(d.address, publish_body(PublisherChain(origin=3), "emb", np.array([1]),
                                               np.ones((1, 8), np.float32)))
        got = await asyncio.wait_for(asyncio.to_thread(_every_read, c, since), 60)
        assert got["read"][0] > 0 and got["read"][1] == 0 and got["spec"] == "ranker"
        assert list(got["changes"]) == ["emb"] and list(got["watch"]) == ["emb"]
        assert got["status"] and got["cuts"] == [] and got["healthz"]
        for call in (lambda u: u.status(), lambda u: u.read("ranker", "emb", [1]), lambda u: u.changes("ranker"),
                     lambda u: u.spec("ranker"), lambda u: u.cuts("ranker")):
            with pytest.raises(KeyRejected):
                await asyncio.to_thread(call, Client(d.address))                   # unsigned: 401
        # the CLI's reads sign with --key-file
        from ekko.cli.main import main as ekko_main
        key_file = tmp_path / "cluster.key"
        key_file.write_bytes(PEER)
        key_file.chmod(0o600)
        for argv in (["cuts", "--model", "ranker"], ["status"], ["members"]):
            argv = [*argv, "--peer", d.address]
            assert await asyncio.to_thread(ekko_main, [*argv, "--key-file", str(key_file)]) == 0, argv
            assert await asyncio.to_thread(ekko_main, argv) != 0, argv
    finally:
        await runner.cleanup()


async def _publish(address: str, f) -> None:
    import aiohttp
    async with aiohttp.ClientSession() as s:
        async with s.post(f"http://{address}/v1/publish", data=encode_frame(MsgType.PUBLISH, f.body,
                                                                            Keyring({1: PEER}))) as r:
            assert r.status == 200, await r.text()


async def test_a_publishers_rollback_watch_signs_its_reads(tmp_path):
    from ekko.sdk.async_publisher import AsyncPublisher
    ring = Keyring({1: PEER, 9: TRAINER}, primary=1, grants={9: PublisherGrant(frozenset({"ranker"}))})
    d = tcp_daemon(tmp_path, "a", "dc1", key=ring)
    runner = await start_site(d)
    try:
        await asyncio.to_thread(Client(d.address, key=PEER).register, SPEC)
        for i, key in enumerate((PEER, Keyring({9: TRAINER}))):
            async with AsyncPublisher([d.address], origin=i + 1, key=key, state_dir=tmp_path / f"pub{i}") as pub:
                got = await pub._transport.get_json("/v1/models/ranker/rollbacks", 5.0)
                assert got is not None and "rollbacks" in got[0], key
        async with AsyncPublisher([d.address], origin=5, state_dir=tmp_path / "pub-unsigned") as pub:
            assert await pub._transport.get_json("/v1/models/ranker/rollbacks", 5.0) is None   # 401
    finally:
        await runner.cleanup()


async def test_the_join_check_signs_with_the_cluster_key(tmp_path):
    """A daemon asks its seeds for their members before it joins: with a key, signed."""
    from ekko.server.join_check import live_namesake
    a = tcp_daemon(tmp_path, "a", "dc1", key=PEER)
    runner = await start_site(a)
    try:
        elsewhere = "127.0.0.1:1"
        assert await live_namesake("a", elsewhere, [a.address], keyring=Keyring.single(PEER)) == a.address
        assert await live_namesake("a", elsewhere, [a.address]) is None          # unsigned: 401, not seen
        # and a daemon started under a's name through a keyed seed is refused
        twin = Daemon("a", "dc1", "127.0.0.1:1", [a.address], tmp_path / "twin", CFG, key=PEER, device="cpu")
        with pytest.raises(Exception, match="alive in the cluster"):
            await twin._on_startup(twin.app)
    finally:
        await runner.cleanup()


def test_sign_and_verify():
    kr = Keyring({4: b"reader-secret-0123"})
    h = read_auth.sign(kr, "GET", "/v1/status?cluster=1", now=1000.0)
    assert read_auth.verify(kr, h, "GET", "/v1/status?cluster=1", now=1000.0 + read_auth.MAX_SKEW_S - 1) == 4
    for header, path, now in ((h, "/v1/status", 1000.0), (h, "/v1/status?cluster=1", 1000.0 + 2 * read_auth.MAX_SKEW_S),
                              (None, "/x", 1000.0), ("v1 4 x y", "/x", 1000.0), ("v2 4 1 ab", "/x", 1000.0),
                              ("v1 9 1000000 ab", "/x", 1000.0)):
        with pytest.raises(ProtocolError) as e:
            read_auth.verify(kr, header, "GET", path, now)
        assert e.value.reason == "unauthenticated"


def test_keyring_files_hold_reader_keys():
    import base64
    sec = base64.b64encode(b"r" * 32).decode()
    kr = validate({"format": 1, "primary": 1, "keys": [
        {"id": 1, "role": "peer", "secret": sec}, {"id": 5, "role": "reader", "secret": sec, "models": ["ranker"]},
        {"id": 6, "role": "reader", "secret": sec}]})
    assert kr.read_acl and not kr.is_peer(5) and kr.reader(5).allows("ranker") and not kr.reader(5).allows("ads")
    assert kr.reader(6).allows("ads") and kr.is_peer(1) and not kr.acl
    with pytest.raises(Exception, match="origins"):
        validate({"format": 1, "primary": 1, "keys": [{"id": 1, "role": "peer", "secret": sec},
                                                      {"id": 5, "role": "reader", "secret": sec, "origins": [1]}]})


def test_ekko_daemon_with_a_key_file_and_open_metrics(tmp_path, capsys):
    """The real command line: ``--key-file`` makes reads signed, ``--open-metrics`` opens
    /metrics alone, ``ekko status --key-file`` signs."""
    from ekko.cli.main import main as ekko_main
    from procs import DaemonGroup, get_json, http
    key_file = tmp_path / "cluster.key"
    key_file.write_bytes(PEER + b"\n")
    key_file.chmod(0o600)
    with DaemonGroup(tmp_path) as g:
        a = g.start("a", "dc1", extra=["--key-file", str(key_file), "--open-metrics"])
        b = g.start("b", "dc1", seeds=[a.address], extra=["--key-file", str(key_file)])
        status, raw, _ = http("GET", f"http://{a.address}/metrics")
        assert status == 200 and b"ekko_" in raw                          # a scraper needs no key
        assert http("GET", f"http://{b.address}/metrics")[0] == 401       # not opened there
        for p in (a, b):
            status, raw, _ = http("GET", f"http://{p.address}/v1/status")
            assert status == 401 and json.loads(raw)["reason"] == "unauthenticated"
            assert get_json(p.address, "/v1/status", key=PEER)["node_id"] == p.node_id
            assert http("GET", f"http://{p.address}/healthz")[0] == 200
        capsys.readouterr()
        assert ekko_main(["status", "--peer", b.address, "--key-file", str(key_file), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["node_id"] == "b"
        assert ekko_main(["status", "--peer", b.address, "--json"]) != 0
        assert "401" in capsys.readouterr().err
