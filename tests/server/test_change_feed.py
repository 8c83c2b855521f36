"""``GET /v1/models/{model}/changes`` and ``Client.changes``/``Client.watch``: the change
feed an external cache follows (issue #17)."""

from __future__ import annotations

import asyncio
import threading

import msgpack
import numpy as np
import torch

from ekko.core.chain import PublisherChain
from ekko.core.codec import MsgType, encode_frame
from ekko.sdk.client import Client
from test_daemon import SPEC, make_client, post, publish_body, register, start_site, tcp_daemon


async def get_changes(client, query: str, model: str = "ranker"):
    resp = await client.get(f"/v1/models/{model}/changes{query}")
    raw = await resp.read()
    return resp.status, (msgpack.unpackb(raw, raw=False) if resp.status == 200 else raw)


async def publish(client, pc, ids, vals, table="emb"):
    f = publish_body(pc, table, np.asarray(ids), vals)
    status, body, _ = await post(client, "/v1/publish", encode_frame(MsgType.PUBLISH, f.body))
    assert status == 200, body
    pc.acked(f)
    return f


def rows_of(answer, table="emb"):
    t = answer["tables"][table]
    ids = np.frombuffer(t["ids"], "<i8")
    return ids, np.frombuffer(t["versions"], "<i8"), np.frombuffer(t["values"], "<f4").reshape(t["n"], t["dim"])


async def test_the_feed_gives_changed_rows_with_values_after_a_cursor(tmp_path):
    d, client = await make_client(tmp_path)
    pc = PublisherChain(origin=3)
    try:
        await register(client)
        status, start = await get_changes(client, "")
        assert status == 200 and start["tables"] == {} and not start["reset"]
        f1 = await publish(client, pc, [5, 1, 7], np.full((3, 8), 1.5, np.float32))
        f2 = await publish(client, pc, [7, 20], np.full((2, 8), 2.5, np.float32))
        status, got = await get_changes(client, f"?since={start['cursor']}")
        assert status == 200 and not got["reset"] and not got["more"]
        ids, versions, values = rows_of(got)
        assert ids.tolist() == [1, 5, 7, 20]
        v1, v2 = pc.versions_of(f1)["emb"], pc.versions_of(f2)["emb"]
        assert versions.tolist() == [v1[1], v1[0], v2[0], v2[1]]       # row 7: its newest version once
        assert values[:, 0].tolist() == [1.5, 1.5, 2.5, 2.5]
        _, again = await get_changes(client, f"?since={got['cursor']}")
        assert again["tables"] == {} and again["cursor"] == got["cursor"]
        _, limited = await get_changes(client, f"?since={start['cursor']}&limit=1")
        assert limited["more"] and rows_of(limited)[0].tolist() == [1, 5, 7]     # one whole record
    finally:
        await client.close()


async def test_a_long_poll_answers_when_rows_change(tmp_path):
    d, client = await make_client(tmp_path)
    pc = PublisherChain(origin=3)
    try:
        await register(client)
        _, start = await get_changes(client, "")
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        waiting = asyncio.create_task(get_changes(client, f"?since={start['cursor']}&wait=20"))
        await asyncio.sleep(0.3)
        assert not waiting.done()
        await publish(client, pc, [42], np.ones((1, 8), np.float32))
        status, got = await asyncio.wait_for(waiting, 10)
        assert status == 200 and rows_of(got)[0].tolist() == [42]
        assert loop.time() - t0 < 10                             # not the whole wait
        t1 = loop.time()
        _, empty = await get_changes(client, f"?since={got['cursor']}&wait=0.3")
        assert empty["tables"] == {} and loop.time() - t1 >= 0.25   # nothing new: waited, then answered
    finally:
        await client.close()


async def test_a_rollback_is_a_change_with_the_restored_versions(tmp_path):
    d, client = await make_client(tmp_path)
    pc = PublisherChain(origin=3)
    try:
        await register(client)
        f1 = await publish(client, pc, [1, 2], np.full((2, 8), 1.0, np.float32))
        assert (await post(client, "/v1/cuts", encode_frame(MsgType.CUT, {"model": "ranker", "name": "c"})))[0] == 200
        _, before = await get_changes(client, "")
        await publish(client, pc, [2, 3], np.full((2, 8), 9.0, np.float32))
        status, _, _ = await post(client, "/v1/rollback", encode_frame(MsgType.ROLLBACK, {"model": "ranker", "cut": "c"}))
        assert status == 200
        _, got = await get_changes(client, f"?since={before['cursor']}")
        ids, versions, values = rows_of(got)
        assert ids.tolist() == [2, 3]
        assert versions.tolist() == [pc.versions_of(f1)["emb"][1], 0]      # back to the cut: row 3 unwritten
        assert values[:, 0].tolist() == [1.0, 0.0]
    finally:
        await client.close()


async def test_bad_requests_and_foreign_cursors(tmp_path):
    d, client = await make_client(tmp_path)
    try:
        await register(client)
        assert (await get_changes(client, "", model="nope"))[0] == 404
        for q in ("?since=x", "?since=1-2-3", "?since=1-0&wait=-1", "?since=1-0&wait=nan", "?since=1-0&wait=999",
                  "?since=1-0&limit=0", "?since=1-0&limit=abc"):
            status, body = await get_changes(client, q)
            assert status == 400, (q, body)
        status, got = await get_changes(client, "?since=1-0")        # another process's cursor
        assert status == 200 and got["reset"] and got["tables"] == {}
    finally:
        await client.close()


async def test_client_watch_follows_the_feed_of_a_real_server(tmp_path):
    d = tcp_daemon(tmp_path, "a", "dc1")
    runner = await start_site(d)
    pc = PublisherChain(origin=4)
    try:
        c = Client(d.address, timeout=10)
        await asyncio.to_thread(c.register, SPEC)
        first = await asyncio.to_thread(c.changes, "ranker")
        got: list = []
        done = threading.Event()

        def follow():
            for ch in c.watch("ranker", since=first.cursor, wait=5):
                got.append(ch)
                if sum(len(r.ids) for x in got for r in x.tables.values()) >= 3:
                    done.set()
                    return

        th = threading.Thread(target=follow, daemon=True)
        th.start()
        await asyncio.sleep(0.2)
        f = publish_body(pc, "emb", np.array([8, 9, 10]), np.full((3, 8), 4.0, np.float32))
        await asyncio.to_thread(c._ok, "POST", "/v1/publish", encode_frame(MsgType.PUBLISH, f.body))
        assert await asyncio.to_thread(done.wait, 20)
        rows = got[0].tables["emb"]
        assert rows.ids.tolist() == [8, 9, 10] and torch.equal(rows.values, torch.full((3, 8), 4.0))
        assert rows.versions.tolist() == pc.versions_of(f)["emb"].tolist()
        th.join(10)
    finally:
        await runner.cleanup()


def test_client_changes_refuses_a_bad_wait():
    import pytest

    from ekko.core.errors import UsageError
    with pytest.raises(UsageError, match="wait"):
        Client("127.0.0.1:1").changes("m", wait=-1)


async def test_client_reads_reuse_one_connection_and_survive_its_close(tmp_path):
    """Reads keep their connection (one per thread); a connection the server dropped is
    replaced once, transparently."""
    d = tcp_daemon(tmp_path, "a", "dc1")
    runner = await start_site(d)
    try:
        c = Client(d.address, timeout=10)
        await asyncio.to_thread(c.register, SPEC)

        def reads():
            c.read_rows("ranker", "emb", [1, 2])
            first = c._local.conn
            c.read_versions("ranker", "emb", [3])
            assert c._local.conn is first                      # kept alive
            first.sock.close()                                 # as if the daemon closed it while idle
            assert c.read_versions("ranker", "emb", [3]).tolist() == [0]
            assert c._local.conn is not first
            c.close()
            assert c._local.conn is None
        await asyncio.to_thread(reads)
    finally:
        await runner.cleanup()
