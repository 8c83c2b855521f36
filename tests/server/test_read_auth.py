"""Signed reads (issue #17): with reader keys in a daemon's keyring, every GET but
/healthz needs a signature by a peer key or a reader key allowed the model read."""

from __future__ import annotations

import time

import numpy as np
import pytest

from ekko.core import read_auth
from ekko.core.chain import PublisherChain
from ekko.core.codec import Keyring, MsgType, ReaderGrant, encode_frame
from ekko.core.errors import ProtocolError
from ekko.core.keyring import validate
from ekko.sdk.ack import KeyRejected
from ekko.sdk.client import Client
from test_daemon import SPEC, make_client, post, publish_body, start_site, tcp_daemon

PEER, ANY_READER, RANKER_READER = b"peer-secret-0123456", b"reader-secret-any-01", b"reader-secret-ranker"
RING = Keyring({1: PEER, 7: ANY_READER, 8: RANKER_READER}, primary=1,
               readers={7: ReaderGrant(), 8: ReaderGrant(frozenset({"ranker"}))})


def signed(kid: int, secret: bytes, path: str, now: float | None = None) -> dict[str, str]:
    return {read_auth.HEADER: read_auth.sign(Keyring({kid: secret}), "GET", path,
                                             time.time() if now is None else now)}


async def get(client, path: str, headers: dict[str, str] | None = None) -> int:
    resp = await client.get(path, headers=headers or {})
    await resp.read()
    return resp.status


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


async def test_without_reader_keys_reads_stay_open(tmp_path):
    d, client = await make_client(tmp_path, key=Keyring({1: PEER}))
    try:
        assert await get(client, "/v1/status") == 200
        assert await get(client, "/v1/status", {read_auth.HEADER: "garbage"}) == 200   # not looked at
    finally:
        await client.close()


async def test_the_client_signs_its_reads(tmp_path):
    import asyncio
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
