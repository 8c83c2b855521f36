"""The write-ahead log: record format, torn tails, rotation, group commit, and the daemon's
replay after a crash (in process; the SIGKILL tests are in ``test_durability_procs.py``)."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time

import numpy as np
import pytest
import torch
from test_daemon import digests, make_client, post, publish_body, register

from ekko.core.chain import PublisherChain
from ekko.core.codec import MsgType, encode_frame
from ekko.core.config import NodeConfig
from ekko.server.daemon import Daemon
from ekko.server.persistence import export_model_state
from ekko.replica.wal import (
    KIND_PUBLISH,
    KIND_SPEC,
    RECORD,
    SEGMENT_MAGIC,
    GroupCommitLog,
    ReplayStats,
    WalError,
    encode_record,
    list_segments,
    read_segment,
    segment_path,
)


def payloads(directory) -> list[bytes]:
    return [r.payload for r in GroupCommitLog(directory).replay()]


# --------------------------------------------------------------------------- the log itself
async def test_append_durable_replay_in_order(tmp_path):
    log = GroupCommitLog(tmp_path)
    assert list(log.replay()) == []
    log.start()
    tickets = [log.append(KIND_PUBLISH, f"r{i}".encode() * (i + 1)) for i in range(50)]
    await log.durable(tickets[-1])
    assert log.pending_records == 0
    await log.close()
    recs = list(GroupCommitLog(tmp_path).replay())
    assert [r.payload for r in recs] == [f"r{i}".encode() * (i + 1) for i in range(50)]
    assert {r.kind for r in recs} == {KIND_PUBLISH}
    # a restarted log never appends to an old segment
    log2 = GroupCommitLog(tmp_path)
    list(log2.replay())
    log2.start()
    await log2.durable(log2.append(KIND_SPEC, b"{}"))
    await log2.close()
    assert len(list_segments(tmp_path)) == 2
    assert payloads(tmp_path)[-1] == b"{}" and len(payloads(tmp_path)) == 51


async def test_concurrent_appends_share_fsyncs(tmp_path):
    """Group commit: 200 concurrent publishes cost far fewer than 200 fsyncs."""
    log = GroupCommitLog(tmp_path)
    log.start()
    base = log.writer.fsyncs

    async def one(i: int) -> None:
        await asyncio.sleep(0)
        await log.durable(log.append(KIND_PUBLISH, os.urandom(1000)))

    await asyncio.gather(*(one(i) for i in range(200)))
    fsyncs = log.writer.fsyncs - base
    await log.close()
    assert len(payloads(tmp_path)) == 200
    assert 1 <= fsyncs < 50, fsyncs


def damage(path, cut: str) -> None:
    """What a crash mid-write (or a bad disk) leaves at the end of a segment whose last
    record holds 300 bytes."""
    size = path.stat().st_size
    last = size - (RECORD.size + 300)
    with open(path, "r+b") as f:
        if cut == "mid_payload":
            f.truncate(size - 100)
        elif cut == "mid_header":
            f.truncate(last + 3)
        elif cut == "flipped_byte":
            f.seek(last + RECORD.size + 150)
            b = f.read(1)
            f.seek(last + RECORD.size + 150)
            f.write(bytes([b[0] ^ 0x40]))
        else:
            f.seek(0, os.SEEK_END)
            f.write(os.urandom(37))


@pytest.mark.parametrize("cut", ["mid_payload", "mid_header", "flipped_byte", "garbage_appended"])
async def test_torn_or_corrupt_tail_is_dropped_by_its_checksum(tmp_path, cut):
    log = GroupCommitLog(tmp_path)
    log.start()
    for i in range(5):
        await log.durable(log.append(KIND_PUBLISH, bytes([i]) * 300))
    await log.close()
    (seq,) = list_segments(tmp_path)
    path = segment_path(tmp_path, seq)
    damage(path, cut)
    stats = ReplayStats()
    got = [r.payload for r in read_segment(path, seq, stats)]
    want = 5 if cut == "garbage_appended" else 4
    assert got == [bytes([i]) * 300 for i in range(want)]
    assert len(stats.bad_segments) == 1 and stats.dropped_bytes > 0
    # and a log opened over it replays the same, then appends after it in a new segment
    log2 = GroupCommitLog(tmp_path)
    assert [r.payload for r in log2.replay()] == got
    assert log2.replay_stats.dropped_bytes == stats.dropped_bytes
    log2.start()
    await log2.durable(log2.append(KIND_PUBLISH, b"after"))
    await log2.close()
    assert payloads(tmp_path) == [*got, b"after"]


def test_record_format_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError):
        encode_record(99, b"x")
    # a segment with a wrong header is dropped whole
    p = segment_path(tmp_path, 1)
    p.write_bytes(b"NOTAWAL!" + encode_record(KIND_PUBLISH, b"x"))
    stats = ReplayStats()
    assert list(read_segment(p, 1, stats)) == [] and stats.bad_segments
    # an empty segment (crash right after creation) is fine
    p.write_bytes(b"")
    assert list(read_segment(p, 1, ReplayStats())) == []
    p.write_bytes(SEGMENT_MAGIC)
    assert list(read_segment(p, 1, ReplayStats())) == []


async def test_rotation_and_release_bound_the_log(tmp_path):
    log = GroupCommitLog(tmp_path)
    log.start()
    for _ in range(10):
        log.append(KIND_PUBLISH, b"a" * 1000)
    covered = log.rotate()
    t = log.append(KIND_PUBLISH, b"b" * 10)
    await log.durable(t)
    assert log.retained_bytes > 10_000
    log.release_before(covered)
    await log.flush()
    assert list_segments(tmp_path) == [covered]
    assert log.retained_bytes < 100
    await log.close()
    assert payloads(tmp_path) == [b"b" * 10]


async def test_a_failed_write_fails_its_waiters_and_the_log_recovers(tmp_path, monkeypatch):
    log = GroupCommitLog(tmp_path)
    log.start()
    real = log.writer.process
    calls = {"n": 0}

    def flaky(items):
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(28, "No space left on device")
        return real(items)

    monkeypatch.setattr(log.writer, "process", flaky)
    t = log.append(KIND_PUBLISH, b"lost")
    with pytest.raises(WalError):
        await log.durable(t)
    with pytest.raises(WalError):  # asked again later: still not durable
        await log.durable(t)
    await log.durable(log.append(KIND_PUBLISH, b"kept"))  # a new segment is started
    await log.close()
    assert b"kept" in payloads(tmp_path)
    assert log.failures == 1


async def test_appends_while_an_fsync_runs_wait_for_the_next_one(tmp_path, monkeypatch):
    """A record appended during a batch's fsync is not acknowledged by that fsync."""
    log = GroupCommitLog(tmp_path)
    log.start()
    gate = threading.Event()
    real = log.writer.process

    def slow(items):
        gate.wait(5)
        return real(items)

    monkeypatch.setattr(log.writer, "process", slow)
    first = asyncio.ensure_future(log.durable(log.append(KIND_PUBLISH, b"1")))
    await asyncio.sleep(0.05)
    second = asyncio.ensure_future(log.durable(log.append(KIND_PUBLISH, b"2")))
    await asyncio.sleep(0.05)
    assert not first.done() and not second.done()
    gate.set()
    await asyncio.wait_for(asyncio.gather(first, second), 5)
    assert log.batches == 2
    await log.close()


# --------------------------------------------------------------------------- the daemon's replay
async def crash(d: Daemon, client) -> None:
    """Leave the daemon as SIGKILL would: no drain, no final snapshot, nothing flushed
    beyond what was already acknowledged."""
    d._stopped = True  # shutdown() becomes a no-op
    for t in d._tasks:
        t.cancel()
    await asyncio.gather(*d._tasks, return_exceptions=True)
    await d.transport.close()
    if d.wal is not None:
        d.wal._io.shutdown(wait=True)
        if d.wal.writer._fd is not None:
            os.close(d.wal.writer._fd)  # no final fsync
    d._unlock_data_dir()
    await client.close()


async def publish(client, pc: PublisherChain, rng, n: int = 300, send: bool = True):
    """Publish ``n`` random rows; ``send=False`` versions a frame that "another replica"
    acknowledged, so this replica's next frame waits on a gap."""
    ids = rng.choice(5000, n, replace=False)
    f = publish_body(pc, "emb", ids, rng.standard_normal((n, 8)).astype(np.float32))
    data = encode_frame(MsgType.PUBLISH, f.body)
    if send:
        status, raw, _ = await post(client, "/v1/publish", data)
        assert status == 200, raw
    pc.acked(f)
    return f, data


async def test_crash_after_ack_loses_nothing_and_chains_come_back(tmp_path):
    rng = np.random.default_rng(1)
    pc = PublisherChain(origin=9)
    d, client = await make_client(tmp_path)
    await register(client)
    for _ in range(3):
        await publish(client, pc, rng)
    # a frame whose chain cannot close yet (its predecessor was "lost"): it waits as a pending chain
    await publish(client, pc, rng, send=False)
    gap, _ = await publish(client, pc, rng)
    _, last_bytes = await publish(client, pc, rng)
    before = await digests(client)
    state = export_model_state(d.node, "ranker")
    assert state["pending"], "the test needs a pending chain"
    assert not (tmp_path / "r1" / "models").exists(), "no snapshot was taken: only the WAL holds the rows"
    await crash(d, client)

    d2, client2 = await make_client(tmp_path)
    try:
        assert d2.recovery["wal_frames"] == 5 and d2.recovery["wal_dropped_bytes"] == 0
        assert await digests(client2) == before
        assert export_model_state(d2.node, "ranker") == state
        # the publisher retries its last frame (it never saw the ack): answered idempotently
        status, raw, _ = await post(client2, "/v1/publish", last_bytes)
        assert status == 200 and json.loads(raw)["applied"] == 0
        assert await digests(client2) == before
        # and its next frame chains on: knowledge reaches it
        nxt, _ = await publish(client2, pc, rng)
        k = export_model_state(d2.node, "ranker")["knowledge"]["emb"]
        assert max(c for _, kv in k for o, c in kv if o == 9) < gap.first_counter  # the gap still holds
        assert export_model_state(d2.node, "ranker")["pending"]
        assert nxt.rows == 300
    finally:
        await client2.close()


async def test_daemon_drops_a_torn_last_record_and_keeps_the_rest(tmp_path):
    """A crash mid-write leaves a partial record: that publish was never acknowledged, so
    dropping it loses nothing acknowledged; every record before it is replayed."""
    rng = np.random.default_rng(7)
    pc = PublisherChain(origin=12)
    d, client = await make_client(tmp_path)
    await register(client)
    for _ in range(3):
        await publish(client, pc, rng)
    acked = await digests(client)
    ids = rng.choice(5000, 300, replace=False)
    torn = encode_frame(MsgType.PUBLISH, publish_body(pc, "emb", ids,
                                                      rng.standard_normal((300, 8)).astype(np.float32)).body)
    assert (await post(client, "/v1/publish", torn))[0] == 200
    await crash(d, client)
    (seq,) = list_segments(tmp_path / "r1" / "wal")
    path = segment_path(tmp_path / "r1" / "wal", seq)
    # the last record loses its end, as if the crash hit while it was being written
    os.truncate(path, path.stat().st_size - len(torn) // 2)
    d2, client2 = await make_client(tmp_path)
    try:
        assert d2.recovery["wal_frames"] == 3 and d2.recovery["wal_dropped_bytes"] > 0
        assert await digests(client2) == acked
        # the publisher, never having seen an ack for the torn frame, re-sends it: it applies
        status, raw, _ = await post(client2, "/v1/publish", torn)
        assert status == 200 and json.loads(raw)["applied"] == 300
    finally:
        await client2.close()


async def test_snapshot_truncates_the_log_and_replay_covers_the_rest(tmp_path):
    rng = np.random.default_rng(2)
    pc = PublisherChain(origin=5)
    d, client = await make_client(tmp_path)
    await register(client)
    for _ in range(4):
        await publish(client, pc, rng, n=500)
    wal_dir = tmp_path / "r1" / "wal"
    big = d.wal.retained_bytes
    assert await d.snapshot() == 1
    await d.wal.flush()
    assert len(list_segments(wal_dir)) == 1 and d.wal.retained_bytes < big / 10
    for _ in range(2):
        await publish(client, pc, rng, n=500)
    before = await digests(client)
    state = export_model_state(d.node, "ranker")
    await crash(d, client)

    d2, client2 = await make_client(tmp_path)
    try:
        assert d2.restored == ["ranker"]
        assert d2.recovery["wal_frames"] == 2  # only what the snapshot did not cover
        assert await digests(client2) == before
        assert export_model_state(d2.node, "ranker") == state
    finally:
        await client2.close()  # clean shutdown: the final snapshot releases the replayed segments
    assert sum(p.stat().st_size for p in wal_dir.iterdir()) <= len(SEGMENT_MAGIC) * 2


async def test_a_snapshot_taken_while_publishes_apply_holds_its_instant(tmp_path, monkeypatch):
    """A snapshot reads the tables block by block while publishes go on (copy-on-write,
    ``ekko.core.frozen``): what it writes is the state of the instant its log rotation
    marks, not a mix, and the log after that instant brings a restart to the rest."""
    import ekko.replica.snapshot as snapshot_mod
    from ekko.replica.snapshot import load_snapshot

    monkeypatch.setattr(snapshot_mod, "FROZEN_BLOCK_BYTES", 8 * 4 * 64)   # 64 rows a block: 79 blocks
    slow_write = snapshot_mod._HashingWriter.write

    def write(self, b):          # a slow disk: publishes arrive while the values are read
        time.sleep(0.003)
        return slow_write(self, b)

    monkeypatch.setattr(snapshot_mod._HashingWriter, "write", write)
    rng = np.random.default_rng(4)
    pc = PublisherChain(origin=6)
    d, client = await make_client(tmp_path)
    await register(client)
    for _ in range(3):
        await publish(client, pc, rng, n=1000)
    instant = d.node.models["ranker"].store.copy()
    taking = asyncio.create_task(d.snapshot())   # freezes before this coroutine's next await
    during = 0
    while not taking.done():
        await publish(client, pc, rng, n=1000)
        during += 1
    assert await taking == 1
    assert during >= 2 and d.metrics.snapshot_saved_rows._value.get() > 0, "no publish overlapped the read"
    on_disk, _ = load_snapshot(tmp_path / "r1", instant.spec, "cpu")
    live = d.node.models["ranker"].store.table("emb")
    assert not torch.equal(live.values, instant.table("emb").values)
    assert torch.equal(on_disk.table("emb").values, instant.table("emb").values)
    assert np.array_equal(on_disk.table("emb").versions, instant.table("emb").versions)
    before = await digests(client)
    await crash(d, client)

    d2, client2 = await make_client(tmp_path)
    try:
        assert d2.recovery["wal_frames"] == during
        assert await digests(client2) == before
    finally:
        await client2.close()


async def test_a_failed_snapshot_leaves_no_copy_on_write_view_open(tmp_path, monkeypatch):
    """A view left open would save rows on every later write: whatever fails, the
    snapshot closes the views it opened."""
    import ekko.replica.snapshot as snapshot_mod
    import ekko.server.persistence as persistence_mod

    rng = np.random.default_rng(5)
    pc = PublisherChain(origin=7)
    d, client = await make_client(tmp_path)
    try:
        await register(client)
        await publish(client, pc, rng)
        table = d.node.models["ranker"].store.table("emb")
        # The write fails; then the export of the node's state, after the freeze.
        for module, name, error in ((snapshot_mod, "save_snapshot", OSError),
                                    (persistence_mod, "export_model_state", RuntimeError)):
            def fail(*a, error=error, **k):
                raise error("injected")

            with monkeypatch.context() as mp:
                mp.setattr(module, name, fail)
                with pytest.raises(error):
                    await d.snapshot()
            assert not table._frozen, name
        await publish(client, pc, rng)                                   # and writes go on
    finally:
        await client.close()


async def test_model_registered_after_the_last_snapshot_is_replayed_too(tmp_path):
    """The catalog is written with snapshots; the log carries the spec before a model's first publish."""
    rng = np.random.default_rng(3)
    pc = PublisherChain(origin=4)
    d, client = await make_client(tmp_path)
    await register(client)
    await publish(client, pc, rng)
    before = await digests(client)
    await crash(d, client)
    d2, client2 = await make_client(tmp_path)
    try:
        assert "ranker" in d2.node.models and await digests(client2) == before
    finally:
        await client2.close()


async def test_durability_none_keeps_no_log(tmp_path):
    rng = np.random.default_rng(4)
    pc = PublisherChain(origin=3)
    d, client = await make_client(tmp_path, config=NodeConfig(snapshot_interval=0, durability="none"))
    await register(client)
    await publish(client, pc, rng)
    assert d.wal is None and not (tmp_path / "r1" / "wal").exists()
    await crash(d, client)
    d2, client2 = await make_client(tmp_path, config=NodeConfig(snapshot_interval=0, durability="none"))
    try:
        assert "ranker" not in d2.node.models  # the ablation: an unsnapshotted publish is gone
    finally:
        await client2.close()


async def test_switching_to_durability_none_still_replays_the_old_log(tmp_path):
    rng = np.random.default_rng(5)
    d, client = await make_client(tmp_path)
    await register(client)
    await publish(client, PublisherChain(origin=8), rng)
    before = await digests(client)
    await crash(d, client)
    cfg = NodeConfig(snapshot_interval=0, durability="none")
    d2, client2 = await make_client(tmp_path, config=cfg)
    try:
        assert d2.wal is None and d2.recovery["wal_frames"] == 1
        assert await digests(client2) == before
        assert not (tmp_path / "r1" / "wal").exists()  # folded into a snapshot, then dropped
    finally:
        await crash(d2, client2)
    _, client3 = await make_client(tmp_path, config=cfg)
    try:
        assert await digests(client3) == before
    finally:
        await client3.close()


async def test_wal_metrics_are_exported(tmp_path):
    rng = np.random.default_rng(6)
    _, client = await make_client(tmp_path)
    try:
        await register(client)
        await publish(client, PublisherChain(origin=2), rng)
        text = await (await client.get("/metrics")).text()
        assert "ekko_wal_records_total 2.0" in text  # the spec and the frame
        assert "ekko_wal_fsyncs_total" in text and "ekko_wal_retained_bytes" in text
    finally:
        await client.close()



def test_records_survive_short_writes(tmp_path, monkeypatch):
    """The I/O thread writes each record's header and payload with one writev and goes on
    after a short write: with the kernel taking at most 7 bytes a call, the records read
    back whole, with their checksums."""
    real = os.writev

    def short(fd, parts):
        head = b"".join(bytes(p) for p in parts)[:7]
        return real(fd, [head])

    monkeypatch.setattr(os, "writev", short)

    async def go():
        log = GroupCommitLog(tmp_path)
        log.start()
        tickets = [log.append(KIND_PUBLISH, bytes([i]) * (i * 5 + 1)) for i in range(6)]
        await log.durable(tickets[-1])
        await log.close()
        return log.bytes

    written = asyncio.run(go())
    monkeypatch.setattr(os, "writev", real)
    assert payloads(tmp_path) == [bytes([i]) * (i * 5 + 1) for i in range(6)]
    assert written == sum(len(encode_record(KIND_PUBLISH, bytes([i]) * (i * 5 + 1))) for i in range(6))
