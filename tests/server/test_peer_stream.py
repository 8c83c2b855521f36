"""The peer stream (issue #15): one ordered WebSocket per peer instead of a POST per message."""

from __future__ import annotations

import asyncio
import time

import numpy as np

from aiohttp import web

from ekko.core.codec import Keyring, MsgType, decode_frame
from ekko.core.messages import Outgoing
from ekko.server.daemon import DRAIN_TIMEOUT_S
from ekko.server.http_api import STREAM_ENDPOINT
from ekko.server.transport import GOSSIP_PATH, STREAM_PATH, HttpTransport
from test_daemon import start_site, tcp_daemon, wait_async

def gossip(address: str, n: int, pad: int = 0) -> Outgoing:
    return Outgoing("peer", address, MsgType.GOSSIP, {"from": "me", "n": n, "pad": np.random.default_rng(n).bytes(pad)})


async def _recorder(stream: bool) -> tuple[web.AppRunner, str, list[tuple[str, int]]]:
    """A peer that records (how, n) of every frame it gets; with ``stream`` False it has
    only the POST endpoint, like a daemon from before the stream."""
    got: list[tuple[str, int]] = []

    async def post(request: web.Request) -> web.Response:
        got.append(("post", decode_frame(await request.read()).body["n"]))
        return web.Response(status=204)

    streams: set[web.WebSocketResponse] = set()

    async def ws(request: web.Request) -> web.WebSocketResponse:
        resp = web.WebSocketResponse()
        await resp.prepare(request)
        streams.add(resp)
        async for msg in resp:
            got.append(("stream", decode_frame(msg.data).body["n"]))
        return resp

    async def close_streams(_app: web.Application) -> None:   # as the daemon does at shutdown
        for resp in list(streams):
            await resp.close()

    app = web.Application()
    app.on_shutdown.append(close_streams)
    app.router.add_post(GOSSIP_PATH, post)
    if stream:
        app.router.add_get(STREAM_PATH, ws)
    return (*await _serve(app), got)


async def _serve(app: web.Application) -> tuple[web.AppRunner, str]:
    """Serve ``app`` on a free loopback port: its runner and ``host:port``."""
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"127.0.0.1:{site._server.sockets[0].getsockname()[1]}"   # type: ignore[union-attr]


async def test_a_peers_messages_arrive_in_order_on_one_stream():
    runner, address, got = await _recorder(stream=True)
    t = HttpTransport()
    await t.start()
    try:
        # 12.8 MB: more than the socket buffers hold, so the writer awaits drains in between
        for n in range(200):
            assert t.send(gossip(address, n, pad=64 << 10))
            if n % 50 == 49:   # a link holds MAX_PEER_BACKLOG messages
                assert await t.flush(10)
        await wait_async(lambda: len(got) == 200, 10, "every frame")
        assert got == [("stream", n) for n in range(200)]
        assert t.streams_opened == 1 and t.sent["GOSSIP"] == 200 and not t.failures
        # Unmasked (transport.unmask), and aiohttp's server took every frame so.
        assert [link.ws._writer.use_mask for link in t._links.values()] == [False]
    finally:
        await t.close()
        await runner.cleanup()


async def test_a_peer_without_the_stream_gets_a_post_per_message():
    runner, address, got = await _recorder(stream=False)
    t = HttpTransport()
    await t.start()
    try:
        for n in range(5):
            assert t.send(gossip(address, n))
        assert await t.flush(10)
        assert got == [("post", n) for n in range(5)] and not t.failures and t.streams_opened == 0
    finally:
        await t.close()
        await runner.cleanup()


async def test_a_legacy_peers_refusal_fails_that_message_only():
    async def refuse(request: web.Request) -> web.Response:   # the second message only
        return web.Response(status=403 if decode_frame(await request.read()).body["n"] == 1 else 204)

    app = web.Application()
    app.router.add_post(GOSSIP_PATH, refuse)
    runner, address = await _serve(app)
    t = HttpTransport()
    await t.start()
    try:
        for n in range(3):
            assert t.send(gossip(address, n))
        assert await t.flush(10)
        assert t.failures == {"http_403": 1} and t.sent["GOSSIP"] == 2
    finally:
        await t.close()
        await runner.cleanup()


async def test_a_closed_stream_is_reopened_for_the_next_message():
    runner, address, got = await _recorder(stream=True)
    t = HttpTransport()
    await t.start()
    try:
        assert t.send(gossip(address, 0)) and await t.flush(10)
        await wait_async(lambda: len(got) == 1, 10, "the first frame")
        await runner.cleanup()   # the peer goes away (closing its end of the stream) ...
        runner, address2, got = await _recorder(stream=True)
        # ... and comes back on another port; the old link fails (or backs off), the new one works
        assert t.send(gossip(address2, 1)) and await t.flush(10)
        await wait_async(lambda: got == [("stream", 1)], 10, "the frame after the restart")
        assert t.streams_opened == 2
    finally:
        await t.close()
        await runner.cleanup()


async def test_daemons_talk_over_streams_and_shutdown_does_not_wait_for_them(tmp_path):
    a = tcp_daemon(tmp_path, "a", "dc1")
    b = tcp_daemon(tmp_path, "b", "dc1", seeds=[a.address])
    runners = [await start_site(a), await start_site(b)]
    try:
        await wait_async(lambda: "b" in a.node.members.members and "a" in b.node.members.members, 20, "join")
        await wait_async(lambda: a.transport.streams_opened >= 1 and b.transport.streams_opened >= 1
                         and a.api.ingest.streams and b.api.ingest.streams, 20, "streams both ways")
        assert not a.transport.failures.get("http_401") and a.api.in_flight == 0   # streams are not requests
        t0 = time.monotonic()
        await runners.pop().cleanup()   # b stops while a's stream to it is open
        assert time.monotonic() - t0 < DRAIN_TIMEOUT_S / 2
        assert not b.api.ingest.streams
    finally:
        for r in runners:
            await r.cleanup()


async def test_a_stranger_on_a_stream_is_refused_frame_by_frame(tmp_path):
    """A frame signed with a wrong key gets a refusal on the stream (counted http_401 by the
    sender, bad_mac by the receiver) and the stream stays open for the next one."""
    a = tcp_daemon(tmp_path, "a", "dc1", key=b"the-cluster-key-0123456789abcdef")
    runner = await start_site(a)
    t = HttpTransport(Keyring.single(b"a-wrong-key-0123456789abcdef0000"))
    await t.start()
    try:
        for n in range(3):
            assert t.send(gossip(a.address, n))
        await wait_async(lambda: t.failures["http_401"] == 3, 10, "three refusals")
        assert t.streams_opened == 1 and t.sent["GOSSIP"] == 3
        assert a.metrics.rejects.labels("/v1/gossip", "bad_mac")._value.get() == 3
    finally:
        await t.close()
        await runner.cleanup()


async def test_a_write_the_peer_does_not_take_closes_the_stream_after_the_timeout():
    """A stopped peer (here: one that never reads) fills the socket buffers; the write that
    then waits longer than timeout_s fails as "timeout" and drops the stream, so the link
    does not stay stuck behind it."""
    stuck = asyncio.Event()

    async def never_reads(request: web.Request) -> web.WebSocketResponse:
        resp = web.WebSocketResponse()
        await resp.prepare(request)
        await stuck.wait()
        return resp

    app = web.Application()
    app.router.add_get(STREAM_PATH, never_reads)
    runner, address = await _serve(app)
    t = HttpTransport(timeout_s=1.0, backlog=1000, max_in_flight=1000)
    await t.start()
    try:
        for n in range(600):   # 38 MB of incompressible frames: more than loopback buffers hold
            assert t.send(gossip(address, n, pad=64 << 10))
        await wait_async(lambda: t.failures["timeout"] >= 1, 20, "a write to time out")
        assert t.sent["GOSSIP"] < 600
    finally:
        stuck.set()
        await t.close()
        await runner.cleanup()


async def test_a_reset_during_the_upgrade_ends_quietly(tmp_path, monkeypatch, caplog):
    """A peer (or a proxy) that resets the connection while the stream is being upgraded,
    after the answer's headers were started: the daemon answers nothing more and logs no
    traceback (it returned the half-prepared WebSocketResponse once, and aiohttp's
    write_eof on it raised RuntimeError: seen in bench/nemesis.py)."""
    import logging
    a = tcp_daemon(tmp_path, "a", "dc1")
    runner = await start_site(a)

    upgrades = []

    async def reset(self, request):
        if self._payload_writer is not None:   # as aiohttp's prepare: a second call returns
            return self._payload_writer
        upgrades.append(request)
        self._pre_start(request)
        await web.StreamResponse.prepare(self, request)   # the 101's headers started
        request.transport.abort()                         # and the peer resets
        raise ConnectionResetError("reset by the test")
    monkeypatch.setattr(web.WebSocketResponse, "prepare", reset)
    caplog.set_level(logging.ERROR)
    t = HttpTransport(None)
    await t.start()
    try:
        t.send(gossip(a.address, 0))
        await wait_async(lambda: upgrades, 10, "the upgrade")
        await asyncio.sleep(0.5)
        assert not [r.getMessage() for r in caplog.records if r.exc_info or "Unhandled" in r.getMessage()]
        assert a.metrics.rejects.labels(STREAM_ENDPOINT, "reset")._value.get() >= 1
    finally:
        await t.close()
        await runner.cleanup()
