"""The fault-injecting proxy against a trivial echo server: delay, partition, reset,
stall, HTTP status counting and the /proc source classifier."""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter

import pytest

from ekko.testing.faultproxy import FaultProxy, HttpStatusScanner, ProcessSources, ProxyThread

#: seconds a test waits for an echo that should come.
ECHO_TIMEOUT_S = 5.0


async def echo_server():
    async def handle(r, w):
        try:
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            w.close()
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def roundtrip(port: int, payload: bytes = b"ping") -> tuple[bytes, float]:
    t0 = time.monotonic()
    r, w = await asyncio.open_connection("127.0.0.1", port)
    try:
        w.write(payload)
        await w.drain()
        got = await asyncio.wait_for(r.readexactly(len(payload)), ECHO_TIMEOUT_S)
        return got, time.monotonic() - t0
    finally:
        w.close()


@pytest.fixture
async def setup():
    """An echo server in dcB behind a proxy that classifies every client as dcA."""
    server, port = await echo_server()
    proxy = FaultProxy(classify=lambda peer, route_port: "dcA", seed=1)
    pport = await proxy.add_route("echo", "dcB", ("127.0.0.1", port))
    yield proxy, pport
    await proxy.close()
    server.close()


async def test_forwards_and_delays_by_dc_pair(setup):
    proxy, port = setup
    got, fast = await roundtrip(port)
    assert got == b"ping"
    proxy.set_rtt("dcA", "dcB", 0.3)
    got, slow = await roundtrip(port)
    assert got == b"ping" and slow >= 0.3 > fast
    proxy.set_rtt("dcA", "dcC", 5.0)  # another pair: no effect on this one
    assert (await roundtrip(port))[1] < 2.0


async def test_partition_refuses_new_and_resets_live_connections(setup):
    proxy, port = setup
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(b"a")
    assert await r.readexactly(1) == b"a"
    assert proxy.partition("dcB", "dcA") == 1
    with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
        w.write(b"b")
        await w.drain()
        await asyncio.wait_for(r.readexactly(1), ECHO_TIMEOUT_S)
    w.close()
    with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
        await roundtrip(port)
    assert proxy.counts["refused_partition"] == 1 and proxy.counts["reset_partition"] == 1
    proxy.heal_all()
    assert (await roundtrip(port))[0] == b"ping"


async def test_reset_probability_one_resets_every_connection(setup):
    proxy, port = setup
    proxy.set_reset_prob("dcA", "dcB", 1.0)
    with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
        await roundtrip(port)
    assert proxy.counts["reset_random"] == 1
    proxy.heal("dcA", "dcB")
    assert (await roundtrip(port))[0] == b"ping"


async def test_stall_holds_bytes_then_delivers(setup):
    proxy, port = setup
    proxy.stall("dcA", "dcB", 0.4)
    got, took = await roundtrip(port)
    assert got == b"ping" and took >= 0.35


async def test_bandwidth_cap_paces_bytes(setup):
    proxy, port = setup
    proxy.set_bandwidth("dcA", "dcB", 200_000)  # 100 kB at 200 kB/s: >= 0.5 s (the directions overlap)
    got, took = await roundtrip(port, b"x" * 100_000)
    assert len(got) == 100_000 and took >= 0.5


async def test_counts_bytes_per_directed_dc_pair(setup):
    proxy, port = setup
    await roundtrip(port, b"x" * 3000)
    await roundtrip(port, b"y" * 500)
    # dcA (the classified client) sent 3500 bytes to dcB, whose echo sent them back.
    assert proxy.bytes_by_pair == {("dcA", "dcB"): 3500, ("dcB", "dcA"): 3500}


async def test_unclassified_connections_count_no_bytes():
    server, port = await echo_server()
    proxy = FaultProxy(classify=lambda peer, route_port: None)
    pport = await proxy.add_route("echo", "dcB", ("127.0.0.1", port))
    try:
        assert (await roundtrip(pport))[0] == b"ping"
        assert not proxy.bytes_by_pair
    finally:
        await proxy.close()
        server.close()


def test_http_status_scanner_follows_keepalive_answers_split_anywhere():
    stream = (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
              b"HTTP/1.1 204 No Content\r\n\r\n"
              b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 3\r\nRetry-After: 1\r\n\r\nbye")
    for step in (1, 7, len(stream)):
        c = Counter()
        s = HttpStatusScanner(c)
        for i in range(0, len(stream), step):
            s.feed(stream[i:i + step])
        assert c == Counter({200: 1, 204: 1, 503: 1}), step


def test_process_sources_classify_this_process_through_a_thread_proxy():
    sources = ProcessSources()
    sources.register(os.getpid(), "dcA")

    async def serve():
        return await echo_server()
    with ProxyThread(FaultProxy(sources)) as pt:
        server, port = pt.call(serve)
        pport = pt.call(pt.proxy.add_route, "echo", "dcB", ("127.0.0.1", port))
        pt.call(pt.proxy.partition, "dcA", "dcB")
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            asyncio.run(roundtrip(pport))
        pt.call(pt.proxy.heal_all)
        sources.unregister(os.getpid())
        pt.call(pt.proxy.partition, "dcA", "dcB")  # an unregistered source gets no faults
        assert asyncio.run(roundtrip(pport))[0] == b"ping"
        assert pt.proxy.counts["unclassified"] == 1
        pt.call(server.close)
