"""Durable publishes with real ``ekko daemon`` processes: SIGKILL right after the ack.

A daemon acknowledges a publish only once its frame is fsynced in the write-ahead
log (``durability = "wal"``, the default).  These tests kill the acknowledging
daemon with SIGKILL the moment the publisher returns -- no drain, no final
snapshot (``snapshot_interval = 0``, so no snapshot was ever written) -- and check
that after a restart on the same data dir the values come back exactly.

In the three-daemon test the peers are frozen (SIGSTOP) while the publish is
acknowledged and eager push is off, so the rows cannot reach them before the kill:
the test checks that they indeed lack the rows, which leaves the acknowledging
replica's log as the only copy.
"""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from procs import DaemonGroup, get_json, http, read_rows, table_digests, wait_for

from ekko.core.chain import PublisherChain
from ekko.core.codec import MsgType, encode_frame
from ekko.sdk.publisher import Publisher
from ekko.core.spec import ModelSpec, TableSpec

pytestmark = pytest.mark.slow

#: seconds for a restarted replica to catch up and the cluster to agree (shared, small machine).
CONVERGE_TIMEOUT_S = 60.0
#: seconds between checks that a replica received no more pull requests from frozen peers.
FREEZE_SETTLE_S = 1.0
SPEC = ModelSpec("ranker", [TableSpec("emb", rows=50_000, dim=16, shards=8)])


def write_config(root: Path, name: str, **node: object) -> list[str]:
    """A ``[node]`` TOML config; returns the daemon flags that load it."""
    # (repr(v), not a !r conversion: that one applied to the whole expression and wrote
    # booleans as the strings 'true'/'false', which the [node] type check now refuses.)
    lines = ["[node]"] + [f"{k} = {str(v).lower() if isinstance(v, bool) else repr(v)}" for k, v in node.items()]
    path = root / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return ["--config", str(path)]


def batches(rng: np.random.Generator, n_frames: int, rows: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Disjoint random row ids (so every published value stays the latest) and values."""
    ids = rng.permutation(SPEC.table("emb").rows)[: n_frames * rows].astype(np.int64)
    return [(ids[i * rows:(i + 1) * rows], rng.standard_normal((rows, 16)).astype(np.float32))
            for i in range(n_frames)]


def assert_reads_back(address: str, published: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> None:
    for ids, vals, versions in published:
        got, got_versions = read_rows(address, "ranker", "emb", ids)
        assert np.array_equal(got, vals), f"{address}: values differ"
        assert np.array_equal(got_versions, versions), f"{address}: versions differ"


def test_single_daemon_sigkill_right_after_the_ack_loses_nothing(tmp_path):
    """No peer can supply the rows here: only the write-ahead log can bring them back."""
    flags = write_config(tmp_path, "solo", snapshot_interval=0)
    rng = np.random.default_rng(11)
    with DaemonGroup(tmp_path) as g:
        a = g.start("solo", "dc1", extra=flags)
        published = []
        with Publisher([a.address], origin="trainer-kill", state_dir=tmp_path / "pub", timeout=60) as p:
            p.register(SPEC)
            frames = batches(rng, 6, 2000)
            for ids, vals in frames[:5]:
                ack = p.publish("ranker", "emb", ids, vals)
                published.append((ids, vals, ack.versions["emb"]))
            # One more frame, by hand, so that the test can replay its exact bytes later (a
            # publisher that never saw the ack retries with the same versions).
            chain = PublisherChain(origin=77)
            ids, vals = frames[5]
            frame = chain.frame(SPEC, {"emb": (ids, vals)}, now_ms=time.time() * 1000)
            data = encode_frame(MsgType.PUBLISH, frame.body)
            status, raw, _ = http("POST", f"http://{a.address}/v1/publish", data)
            a.kill()  # SIGKILL the moment the acknowledgement is in
            assert status == 200, raw
        published.append((ids, vals, chain.versions_of(frame)["emb"]))
        assert not (a.data_dir / "models").exists(), "a snapshot was written; the test would prove nothing"

        t0 = time.monotonic()
        b = g.start("solo", "dc1", port=a.port, data_dir=a.data_dir, extra=flags)
        restart_s = time.monotonic() - t0
        rec = get_json(b.address, "/v1/status")["durability"]["recovery"]
        assert rec["wal_frames"] == 6 and rec["wal_refused"] == 0, rec
        assert_reads_back(b.address, published)
        before = table_digests(b.address, "ranker")
        # the retry after the crash is answered idempotently: 200, nothing applied, nothing changed
        status, raw, _ = http("POST", f"http://{b.address}/v1/publish", data)
        assert status == 200 and b'"applied": 0' in raw, raw
        assert table_digests(b.address, "ranker") == before
        print(f"\nsingle daemon: restart to healthy after SIGKILL {restart_s:.2f}s "
              f"(WAL replay {rec['seconds']:.3f}s, {rec['wal_frames']} frames, {rec['wal_rows_applied']} rows)")
        assert b.terminate() == 0, b.log()
        # a clean stop snapshots and empties the log: the next start replays nothing
        c = g.start("solo", "dc1", port=a.port, data_dir=a.data_dir, extra=flags)
        assert get_json(c.address, "/v1/status")["durability"]["recovery"]["wal_frames"] == 0
        assert table_digests(c.address, "ranker") == before
        # The SDK across a SIGKILL: the replica dies while a publish is under way; the SDK
        # keeps re-sending the same frame until the restarted replica acknowledges it.
        ids, vals = batches(rng, 1, 1000)[0]
        with Publisher([c.address], origin="trainer-kill-2", state_dir=tmp_path / "pub", timeout=120) as p:
            p.register(SPEC)
            fut = p.publish_async("ranker", "emb", ids, vals)
            c.kill()
            d = g.start("solo", "dc1", port=a.port, data_dir=a.data_dir, extra=flags)
            ack = fut.result(timeout=150)
        got, versions = read_rows(d.address, "ranker", "emb", ids)
        assert np.array_equal(got, vals) and np.array_equal(versions, ack.versions["emb"])
        assert d.terminate() == 0, d.log()


def received_row_bytes(address: str) -> float:
    """Bytes of PULL_RESPONSE and PUSH frames a replica received from its peers."""
    _, raw, _ = http("GET", f"http://{address}/metrics")
    pattern = r'^ekko_bytes_received_total\{[^}]*msg_type="(?:PULL_RESPONSE|PUSH)"[^}]*\} (\S+)$'
    return sum(float(m.group(1)) for m in re.finditer(pattern, raw.decode(), re.MULTILINE))


def pull_requests_received(address: str) -> float:
    _, raw, _ = http("GET", f"http://{address}/metrics")
    pattern = r'^ekko_bytes_received_total\{[^}]*msg_type="PULL_REQUEST"[^}]*\} (\S+)$'
    return sum(float(m.group(1)) for m in re.finditer(pattern, raw.decode(), re.MULTILINE))


def wait_quiet(address: str) -> None:
    """Until the replica's count of pull requests received stops moving (its peers are frozen)."""
    time.sleep(FREEZE_SETTLE_S)
    last = pull_requests_received(address)
    for _ in range(int(CONVERGE_TIMEOUT_S / FREEZE_SETTLE_S)):
        time.sleep(FREEZE_SETTLE_S)
        now = pull_requests_received(address)
        if now == last:
            return
        last = now
    raise AssertionError("pull requests kept arriving from frozen peers")


def test_three_daemons_acked_publish_survives_sigkill_of_the_acknowledging_replica(tmp_path):
    # Eager push off: rows reach peers only by anti-entropy pulls, which frozen peers cannot make.
    flags = write_config(tmp_path, "cluster", snapshot_interval=0, push=False)
    rng = np.random.default_rng(12)
    with DaemonGroup(tmp_path) as g:
        a = g.start("a", "dc1", extra=flags)
        b = g.spawn("b", "dc1", seeds=[a.address], extra=flags)
        c = g.spawn("c", "dc1", seeds=[a.address], extra=flags)
        b.wait_healthy()
        c.wait_healthy()
        procs = [a, b, c]
        wait_for(lambda: all(sum(m["state"] == "alive" for m in get_json(p.address, "/v1/status?cluster=1")
                                 ["members"]) == 3 for p in procs), CONVERGE_TIMEOUT_S, 0.2, "all three to join")
        (ids0, vals0), (ids1, vals1), (ids2, vals2) = batches(rng, 3, 3000)
        with Publisher([a.address], origin="trainer-3", state_dir=tmp_path / "pub", timeout=60) as p:
            p.register(SPEC)
            ack0 = p.publish("ranker", "emb", ids0, vals0)
            wait_for(lambda: len({str(table_digests(x.address, "ranker")) for x in procs}) == 1, CONVERGE_TIMEOUT_S,
                     0.2, "the first publish to reach every replica")
            for peer in (b, c):
                peer.proc.send_signal(signal.SIGSTOP)
            # A pull request a peer sent just before it froze is still answered (A POSTs the
            # answer, which waits in the frozen peer's socket): wait until A has processed every
            # such request, so that no answer is built after the publish and carries its rows.
            wait_quiet(a.address)
            try:
                ack1 = p.publish("ranker", "emb", ids1, vals1)
                a.kill()  # the acknowledging replica dies right after the ack
            finally:
                for peer in (b, c):
                    peer.proc.send_signal(signal.SIGCONT)
        for peer in (b, c):
            _, versions = read_rows(peer.address, "ranker", "emb", ids1)
            assert (versions < ack1.versions["emb"]).all(), f"{peer.node_id} got the rows before the kill"
        # While it is down the publisher goes on at another replica (same origin, same state dir).
        with Publisher([b.address], origin="trainer-3", state_dir=tmp_path / "pub", timeout=60) as p:
            p.register(SPEC)
            ack2 = p.publish("ranker", "emb", ids2, vals2)
        published = [(ids0, vals0, ack0.versions["emb"]), (ids1, vals1, ack1.versions["emb"]),
                     (ids2, vals2, ack2.versions["emb"])]

        t0 = time.monotonic()
        a2 = g.start("a", "dc1", port=a.port, data_dir=a.data_dir, seeds=[b.address], extra=flags)
        restart_s = time.monotonic() - t0
        rec = get_json(a2.address, "/v1/status")["durability"]["recovery"]
        assert rec["wal_frames"] == 2, rec
        assert_reads_back(a2.address, published[:2])
        procs = [a2, b, c]
        wait_for(lambda: len({str(table_digests(x.address, "ranker")) for x in procs}) == 1, CONVERGE_TIMEOUT_S,
                 0.2, "the three replicas to agree")
        caught_up_s = time.monotonic() - t0
        for x in procs:
            assert_reads_back(x.address, published)
        # Catch-up moved about the one publish it missed, not the table: no full resync.
        row_bytes = 16 * 4 + 16
        got = received_row_bytes(a2.address)
        assert got < 2 * len(ids2) * row_bytes, (got, len(ids2) * row_bytes)
        print(f"\nthree daemons: acknowledging replica back {restart_s:.2f}s after restart "
              f"(WAL replay {rec['seconds']:.3f}s), all three agree {caught_up_s:.2f}s after restart; "
              f"catch-up received {got / 1e3:.0f} kB of rows (the missed publish: "
              f"{len(ids2) * row_bytes / 1e3:.0f} kB; all three: {3 * len(ids2) * row_bytes / 1e3:.0f} kB)")
        codes = g.terminate_all(procs)
        assert set(codes.values()) == {0}, codes
