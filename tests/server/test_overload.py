"""Back-pressure: publishes past a bound get 429/503 with Retry-After and change nothing;
under sustained overload real daemons keep their memory bounded and converge afterwards.

The first tests run the daemon in process and push one bound at a time over its
limit.  The last one drives real ``ekko daemon`` processes with more publish
traffic than they can absorb (``bench/overload.py`` has the driver and a longer
run), samples their RSS from ``/proc``, and prints the peak.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import threading

import numpy as np
import pytest
from procs import REPO
from test_daemon import SPEC, digests, make_client, post, publish_body, register

from ekko.core.chain import PublisherChain
from ekko.core.codec import MsgType, encode_frame
from ekko.core.config import NodeConfig

sys.path.insert(0, str(REPO / "bench"))
import overload


def backpressure(text: str) -> dict[str, float]:
    return {m.group(1): float(m.group(2))
            for m in re.finditer(r'^ekko_backpressure_rejects_total\{bound="([^"]+)"\} (\S+)$', text, re.MULTILINE)}


def frame_bytes(pc: PublisherChain, rng, n: int = 200) -> tuple[object, bytes]:
    f = publish_body(pc, "emb", rng.choice(5000, n, replace=False), rng.standard_normal((n, 8)).astype(np.float32))
    return f, encode_frame(MsgType.PUBLISH, f.body)


async def assert_refused(client, data: bytes, status: int, reason: str) -> None:
    before = await digests(client)
    got, raw, headers = await post(client, "/v1/publish", data)
    assert got == status and json.loads(raw)["reason"] == reason, raw
    assert headers["Retry-After"] == "1"
    assert await digests(client) == before


async def test_publish_bytes_in_flight_bound_answers_429(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    pc = PublisherChain(origin=3)
    d, client = await make_client(tmp_path, config=NodeConfig(snapshot_interval=0, max_publish_bytes_in_flight=1000))
    try:
        await register(client)
        # Hold the first publish in flight: its fsync does not finish until the gate opens.
        gate = threading.Event()
        real = d.wal.writer.process
        monkeypatch.setattr(d.wal.writer, "process", lambda items: (gate.wait(10), real(items))[1])
        _, d1 = frame_bytes(pc, rng)
        first = asyncio.ensure_future(post(client, "/v1/publish", d1))
        while d.gate.publish_bytes == 0:
            await asyncio.sleep(0.01)
        _, d2 = frame_bytes(pc, rng)
        await assert_refused(client, d2, 429, "queue_full")
        gate.set()
        assert (await first)[0] == 200  # one publish is always admitted, whatever its size
        assert d.gate.publish_bytes == 0
        assert (await post(client, "/v1/publish", d2))[0] == 200  # the same bytes succeed later
        text = await (await client.get("/metrics")).text()
        assert backpressure(text) == {"publish_bytes": 1.0}
        assert 'ekko_rejects_total{endpoint="/v1/publish",reason="queue_full"} 1.0' in text
    finally:
        await client.close()


async def test_rss_bound_answers_503(tmp_path):
    rng = np.random.default_rng(2)
    _, client = await make_client(tmp_path, config=NodeConfig(snapshot_interval=0, max_rss_bytes=1))
    try:
        await register(client)
        await assert_refused(client, frame_bytes(PublisherChain(origin=4), rng)[1], 503, "memory")
        text = await (await client.get("/metrics")).text()
        assert backpressure(text) == {"rss": 1.0}
        assert float(re.search(r"^ekko_process_resident_bytes (\S+)$", text, re.MULTILINE).group(1)) > 1 << 20
    finally:
        await client.close()


async def test_wal_bound_starts_a_snapshot_and_answers_429_until_it_is_written(tmp_path):
    rng = np.random.default_rng(3)
    pc = PublisherChain(origin=5)
    d, client = await make_client(tmp_path, config=NodeConfig(snapshot_interval=0, max_wal_bytes=20_000))
    try:
        await register(client)
        f, data = frame_bytes(pc, rng, n=800)  # ~30 KB of log: over the bound once written
        assert (await post(client, "/v1/publish", data))[0] == 200
        pc.acked(f)
        assert d.wal.retained_bytes > 20_000
        _, data2 = frame_bytes(pc, rng)
        await assert_refused(client, data2, 429, "queue_full")
        # the refusal started a snapshot; once it is written the log is released and publishes go on
        for _ in range(200):
            if d.wal.retained_bytes < 20_000:
                break
            await asyncio.sleep(0.02)
        assert (tmp_path / "r1" / "models" / "ranker").is_dir()
        assert (await post(client, "/v1/publish", data2))[0] == 200
        assert backpressure(await (await client.get("/metrics")).text()) == {"wal_bytes": 1.0}
    finally:
        await client.close()


@pytest.mark.parametrize("bound", ["outbound_bytes", "push_backlog"])
async def test_queue_bounds_answer_429(tmp_path, monkeypatch, bound):
    rng = np.random.default_rng(4)
    cfg = NodeConfig(snapshot_interval=0, max_outbound_bytes=1000, max_push_backlog_rows=10)
    d, client = await make_client(tmp_path, config=cfg)
    try:
        await register(client)
        if bound == "outbound_bytes":
            d.gate.outbound_bytes = 5000  # peer sends queued in the transport
        else:
            monkeypatch.setattr(d.gate, "push_backlog_rows", lambda: 11)
        await assert_refused(client, frame_bytes(PublisherChain(origin=6), rng)[1], 429, "queue_full")
        assert backpressure(await (await client.get("/metrics")).text()) == {bound: 1.0}
    finally:
        await client.close()


@pytest.mark.slow
def test_sustained_overload_keeps_memory_bounded_and_converges(tmp_path):
    """Two real daemons, publishers that ignore Retry-After and keep 12 publishes of 256 KiB in
    flight for a few seconds against a 1 MiB in-flight bound: the daemons answer 429, their
    peak RSS stays within a stated bound above their idle RSS, and once the load stops both
    hold exactly the acknowledged publishes."""
    res = overload.run(tmp_path, replicas=2, seconds=5.0, clients=12, rows_per_frame=2048, dim=32,
                       max_publish_bytes_in_flight=1 << 20, node_extra=f"undo_bytes = {16 << 20}\n")
    print("\n" + res.report())
    assert res.refused > 0, "the load never passed a bound: the test proves nothing"
    assert res.acked > 0 and res.errors == 0
    assert res.converged, "replicas did not converge on the acknowledged publishes"
    for name, (idle, peak) in res.rss.items():
        assert peak - idle < overload.RSS_GROWTH_BOUND, (name, idle >> 20, peak >> 20)


async def test_sdk_backs_off_on_503_and_retries_the_same_versions(tmp_path):
    """The SDK waits Retry-After (plus jitter) and re-sends the same frame until a bound clears."""
    from ekko.sdk.async_publisher import AsyncPublisher

    d, client = await make_client(tmp_path, config=NodeConfig(snapshot_interval=0, max_rss_bytes=1))
    try:
        await register(client)
        endpoint = f"{client.server.host}:{client.server.port}"
        async with AsyncPublisher([endpoint], origin="bp", state_dir=tmp_path / "pub", timeout=30) as pub:
            await pub.register(SPEC)
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            task = asyncio.ensure_future(pub.publish("ranker", "emb", [1, 2, 3], np.ones((3, 8), np.float32)))
            while backpressure(await (await client.get("/metrics")).text()).get("rss", 0) < 2:
                await asyncio.sleep(0.05)
            d.gate.config = d.config.replace(max_rss_bytes=0)  # memory "freed": the bound clears
            ack = await asyncio.wait_for(task, 30)
            assert loop.time() - t0 >= 1.0  # waited at least Retry-After once
        versions = d.node.table_store("ranker", "emb").versions[[1, 2, 3]]
        assert np.array_equal(versions, ack.versions["emb"])  # the versions of the first attempt
        assert backpressure(await (await client.get("/metrics")).text())["rss"] >= 2
    finally:
        await client.close()
