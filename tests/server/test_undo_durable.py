"""The undo history survives a restart with the snapshot (issue #13 item 3, rule K7 of docs/design.md).

In-process daemons on a temporary data dir: publish V, take a cut, publish V' over the
same rows, snapshot, crash (no shutdown snapshot), restart, roll back to the cut: the
rows hold exactly V.  Before the history was kept with the snapshot, the restarted
replica had no history and restored those rows to "never written" (zeros).
"""

from __future__ import annotations

import json

import numpy as np

from ekko.core.chain import PublisherChain
from ekko.core.codec import MsgType, encode_frame
from ekko.server.daemon import Daemon
from ekko.core.store import to_wire_values
from rollback.cuts import Cut
from test_daemon import make_client, post, publish_body, register


async def _publish(client, pc: PublisherChain, table: str, ids: np.ndarray, vals: np.ndarray) -> None:
    f = publish_body(pc, table, ids, vals)
    status, body, _ = await post(client, "/v1/publish", encode_frame(MsgType.PUBLISH, f.body))
    assert status == 200, body
    pc.acked(f)


def _bf16(vals: np.ndarray) -> np.ndarray:
    import torch

    return to_wire_values(torch.from_numpy(vals).to(torch.bfloat16))


def _crash(d: Daemon) -> None:
    """Make the coming shutdown behave like SIGKILL for the data dir: no final snapshot
    (the write-ahead log keeps what was acknowledged since the last one)."""

    async def no_snapshot() -> int:
        return 0

    d.snapshot = no_snapshot  # type: ignore[method-assign]


async def test_rollback_after_crash_restores_the_cut_values_from_the_persisted_history(tmp_path):
    rng = np.random.default_rng(13)
    pc = PublisherChain(origin=21)
    a = rng.choice(5000, 400, replace=False)           # V at the cut, V' before the snapshot
    b = rng.choice(np.setdiff1d(np.arange(5000), a), 300, replace=False)  # V, V', then V'' in the log only
    h = rng.choice(300, 50, replace=False)               # a bfloat16 table too
    v_a = rng.standard_normal((len(a), 8)).astype(np.float32)
    v_b = rng.standard_normal((len(b), 8)).astype(np.float32)
    v_h = _bf16(rng.standard_normal((len(h), 4)).astype(np.float32))
    d, client = await make_client(tmp_path)
    try:
        await register(client)
        await _publish(client, pc, "emb", a, v_a)
        await _publish(client, pc, "emb", b, v_b)
        await _publish(client, pc, "half", h, v_h)
        emb = d.node.table_store("ranker", "emb")
        at_cut = {"emb": emb.versions.copy(), "half": d.node.table_store("ranker", "half").versions.copy()}
        cut = d.node.take_cut("ranker", "good", d.clock())
        cut_wire = cut.to_wire()
        # V' over the same rows
        await _publish(client, pc, "emb", a, rng.standard_normal((len(a), 8)).astype(np.float32))
        await _publish(client, pc, "emb", b, rng.standard_normal((len(b), 8)).astype(np.float32))
        await _publish(client, pc, "half", h, _bf16(rng.standard_normal((len(h), 4)).astype(np.float32)))
        assert await d.snapshot() == 1
        # V'' after the snapshot: only in the write-ahead log, replayed at restart on top of
        # the restored history (its record must come after it).
        await _publish(client, pc, "emb", b, rng.standard_normal((len(b), 8)).astype(np.float32))
        seq_before = d.node._seq
        _crash(d)
    finally:
        await client.close()

    d2, client2 = await make_client(tmp_path)
    try:
        assert d2.restored == ["ranker"]
        assert d2.recovery["wal_frames"] >= 1
        try:
            cut2 = d2.node.cuts.get("ranker", "good")   # cuts kept with the snapshot
        except Exception:
            # As a peer's broadcast (or a snapshot that keeps cuts) would bring it back.
            cut2 = Cut.from_wire(cut_wire)
            d2.node.cuts.add(cut2)
        assert d2.node.cuts.restorable(cut2)
        status, body, _ = await post(client2, "/v1/rollback",
                                     encode_frame(MsgType.ROLLBACK, {"model": "ranker", "cut": "good"}))
        assert status == 200, body
        emb2 = d2.node.table_store("ranker", "emb")
        half2 = d2.node.table_store("ranker", "half")
        assert np.array_equal(emb2.versions, at_cut["emb"]), "every row back at its version at the cut"
        assert np.array_equal(half2.versions, at_cut["half"])
        np.testing.assert_array_equal(emb2.values[a].numpy(), v_a)
        np.testing.assert_array_equal(emb2.values[b].numpy(), v_b)
        np.testing.assert_array_equal(to_wire_values(half2.values[h]), v_h)
        # Apply seqs continue above the restored records: the node's counter never goes back.
        assert d2.node._seq > seq_before
        st = json.loads(await (await client2.get("/v1/status")).read())
        assert st["models"]["ranker"]
    finally:
        await client2.close()


async def test_a_damaged_history_still_restores_the_model(tmp_path):
    """A history whose files fail their checksum: the model loads (values, versions), the
    history starts empty and is counted, and the seq still continues above the snapshot's."""
    rng = np.random.default_rng(14)
    pc = PublisherChain(origin=22)
    ids = rng.choice(5000, 200, replace=False)
    d, client = await make_client(tmp_path)
    try:
        await register(client)
        await _publish(client, pc, "emb", ids, rng.standard_normal((len(ids), 8)).astype(np.float32))
        await _publish(client, pc, "emb", ids, rng.standard_normal((len(ids), 8)).astype(np.float32))
        versions = d.node.table_store("ranker", "emb").versions.copy()
        seq_before = d.node._seq
    finally:
        await client.close()   # the final snapshot, with the history
    path = tmp_path / "r1" / "models" / "ranker" / "t0000.undo.values.bin"
    data = bytearray(path.read_bytes())
    data[100] ^= 1
    path.write_bytes(bytes(data))
    d2, client2 = await make_client(tmp_path)
    try:
        assert d2.restored == ["ranker"]
        assert np.array_equal(d2.node.table_store("ranker", "emb").versions, versions)
        assert d2.node.counters["undo_history_unusable"] == 1
        assert d2.node.undo.stats()["segments"] == 0
        assert d2.node._seq >= seq_before and d2.node.undo.horizon("ranker") >= seq_before
    finally:
        await client2.close()
