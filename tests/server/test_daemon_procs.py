"""End-to-end tests with real ``ekko daemon`` processes on loopback.

Publishers here build frames with :class:`ekko.core.chain.PublisherChain` and POST
them with urllib (not the SDK), so these tests pin the HTTP contract itself.
Expected table digests are computed independently by applying the same
deltas to a local :class:`ekko.core.store.ModelStore`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from ekko.core.chain import PendingFrame, PublisherChain
from ekko.core.codec import MsgType
from ekko.core.delta import Delta
from ekko.core.spec import ModelSpec
from ekko.core.spec import TableSpec
from ekko.core.store import ModelStore
from procs import REPO, DaemonGroup, get_json, http, post_frame, read_rows, table_digests, wait_for

pytestmark = pytest.mark.slow

#: seconds a cluster gets to converge after a publish (local preset: rounds every 0.2-0.25 s;
#: generous because the test machine may be shared and small).
CONVERGE_TIMEOUT_S = 60.0
#: seconds between polls of nine replicas' status (each poll hashes changed shards).
POLL_S = 0.25


class Publisher:
    """Publishes random rows through the HTTP API and keeps the expected state."""

    def __init__(self, spec: ModelSpec, origin: int, seed: int) -> None:
        self.spec = spec
        self.chain = PublisherChain(origin=origin)
        self.rng = np.random.default_rng(seed)
        self.truth = ModelStore(spec, device="cpu")

    def publish(self, address: str, table: str, n: int, per_frame: int = 10_000) -> tuple[np.ndarray, np.ndarray]:
        t = self.spec.table(table)
        ids = self.rng.choice(t.rows, n, replace=False).astype(np.int64)
        vals = self.rng.standard_normal((n, t.dim)).astype(np.float32)
        for lo in range(0, n, per_frame):
            part = slice(lo, lo + per_frame)
            f = self.chain.frame(self.spec, {table: (ids[part], vals[part])}, now_ms=time.time() * 1000)
            status, ack = post_frame(address, "/v1/publish", MsgType.PUBLISH, f.body)
            assert status == 200, ack
            assert ack["rows"] == len(ids[part]) and ack["max_counter"] == f.last_counter
            self.chain.acked(f)
            self._record(f, table, ids[part], vals[part])
        return ids, vals

    def _record(self, f: PendingFrame, table: str, ids: np.ndarray, vals: np.ndarray) -> None:
        versions = self.chain.versions_of(f)[table]
        self.truth.table(table).apply(Delta(self.spec.name, table, ids, versions, vals))

    def digests(self) -> dict[str, str]:
        return {t.name: self.truth.table(t.name).digest() for t in self.spec.tables}


def register(address: str, spec: ModelSpec) -> None:
    status, ack = post_frame(address, "/v1/models", MsgType.REGISTER_MODEL, {"spec": spec.to_dict()})
    assert status == 200 and ack["ok"], ack


def test_publish_read_sigterm_restart(tmp_path):
    spec = ModelSpec("ranker", [TableSpec("emb", rows=100_000, dim=64)])
    pub = Publisher(spec, origin=42, seed=1)
    with DaemonGroup(tmp_path) as g:
        a = g.start("solo", "dc1")
        register(a.address, spec)
        ids, vals = pub.publish(a.address, "emb", 50_000)
        sel = pub.rng.choice(len(ids), 1000, replace=False)
        got, versions = read_rows(a.address, "ranker", "emb", ids[sel])
        assert np.array_equal(got, vals[sel])
        assert np.array_equal(versions, pub.truth.table("emb").versions[ids[sel]])
        # JSON reads agree with msgpack reads
        q = ",".join(map(str, ids[sel[:200]]))
        status, raw, _ = http("GET", f"http://{a.address}/v1/models/ranker/tables/emb/rows?ids={q}")
        js = json.loads(raw)
        assert status == 200 and np.array_equal(np.array(js["values"], np.float32), vals[sel[:200]])
        want = pub.digests()
        assert table_digests(a.address, "ranker") == want
        st = get_json(a.address, "/v1/status")
        assert st["models"]["ranker"]["tables"]["emb"]["written_rows"] == 50_000
        incarnation = st["incarnation"]

        assert a.terminate() == 0, a.log()
        assert (a.data_dir / "models" / "ranker" / "manifest.json").exists()

        b = g.start("solo", "dc1", port=a.port, data_dir=a.data_dir)
        assert table_digests(b.address, "ranker") == want
        got, versions2 = read_rows(b.address, "ranker", "emb", ids[sel])
        assert np.array_equal(got, vals[sel]) and np.array_equal(versions2, versions)
        st = get_json(b.address, "/v1/status")
        assert st["incarnation"] > incarnation
        assert st["models"]["ranker"]["head"] == int(pub.truth.table("emb").versions.max() >> 16)
        # and it keeps taking publishes that chain on the ones before the restart
        pub.publish(b.address, "emb", 1000)
        assert table_digests(b.address, "ranker") == pub.digests()
        assert b.terminate() == 0, b.log()


def test_nine_daemons_converge_then_survive_a_crash(tmp_path):
    spec = ModelSpec("ranker", [TableSpec("emb", rows=100_000, dim=32, shards=16)])
    pub = Publisher(spec, origin=7, seed=2)
    with DaemonGroup(tmp_path) as g:
        t0 = time.monotonic()
        seed = g.spawn("n0-0", "dc0")
        procs = [seed] + [g.spawn(f"n{d}-{i}", f"dc{d}", seeds=[seed.address])
                          for d in range(3) for i in range(3) if (d, i) != (0, 0)]
        for p in procs:
            p.wait_healthy()

        def all_joined() -> bool:
            for p in procs:
                members = get_json(p.address, "/v1/status?cluster=1")["members"]
                if sum(m["state"] == "alive" for m in members) != len(procs):
                    return False
            return True

        wait_for(all_joined, CONVERGE_TIMEOUT_S, 0.2, "all nine to see each other")
        ingest = next(p for p in procs if p.node_id == "n1-1")
        register(ingest.address, spec)
        wait_for(lambda: all(table_digests(p.address, "ranker") is not None for p in procs), CONVERGE_TIMEOUT_S,
                 0.1, "the catalog to reach every replica")
        startup = time.monotonic() - t0

        t1 = time.monotonic()
        pub.publish(ingest.address, "emb", 20_000)
        want = pub.digests()
        wait_for(lambda: all(table_digests(p.address, "ranker") == want for p in procs), CONVERGE_TIMEOUT_S,
                 POLL_S, "nine replicas to converge")
        first = time.monotonic() - t1

        # `ekko status` against a live cluster
        env = dict(os.environ, COLUMNS="200")  # rich wraps to 80 columns when not on a terminal
        out = subprocess.run([sys.executable, "-m", "ekko.cli.main", "status", "--peer", ingest.address, "--cluster"],
                             cwd=REPO, capture_output=True, text=True, timeout=60, env=env)
        assert out.returncode == 0, out.stderr
        assert all(p.node_id in out.stdout for p in procs) and want["emb"][:12] in out.stdout
        out = subprocess.run([sys.executable, "-m", "ekko.cli.main", "status", "--peer", ingest.address, "--json"],
                             cwd=REPO, capture_output=True, text=True, timeout=60)
        assert json.loads(out.stdout)["models"]["ranker"]["tables"]["emb"]["digest"] == want["emb"]

        victim = next(p for p in procs if p.node_id == "n2-1")
        victim.kill()
        live = [p for p in procs if p is not victim]
        t2 = time.monotonic()
        pub.publish(ingest.address, "emb", 20_000)
        want2 = pub.digests()
        assert want2 != want
        wait_for(lambda: all(table_digests(p.address, "ranker") == want2 for p in live), CONVERGE_TIMEOUT_S,
                 POLL_S, "the eight survivors to converge")
        second = time.monotonic() - t2
        # the failure detector notices the crash
        wait_for(lambda: {m["node_id"]: m["state"] for m in get_json(ingest.address, "/v1/status?cluster=1")
                          ["members"]}.get("n2-1") == "dead", CONVERGE_TIMEOUT_S, 0.2, "n2-1 to be declared dead")
        print(f"\nnine daemons: startup+join {startup:.1f}s, converge 20k rows {first:.2f}s, "
              f"after SIGKILL {second:.2f}s")
        codes = g.terminate_all(live)
        assert set(codes.values()) == {0}, (codes, [p.log() for p in live if codes[p.node_id]])
