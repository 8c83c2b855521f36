"""Baselines and cuts on real daemons: a pinned baseline costs its DC no convergence and
no extra bytes; cuts survive a restart and reach a daemon started later; re-pin with
the CLI, no restart."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import numpy as np
import pytest

from ekko.sdk.client import Client
from ekko.core.errors import EkkoError
from ekko.core.spec import ModelSpec, TableSpec
from procs import REPO, DaemonGroup, get_json, http, table_digests, wait_for
from test_daemon_procs import CONVERGE_TIMEOUT_S, POLL_S, Publisher, register

pytestmark = pytest.mark.slow

#: most bytes a baseline may receive, relative to an ordinary replica of its DC (issue #13).
BYTES_BAR = 1.2


def _bytes_received(address: str) -> float:
    raw = http("GET", f"http://{address}/metrics")[1].decode()
    return sum(float(m.group(1)) for m in re.finditer(r"^ekko_bytes_received_total\{[^}]*\} (\S+)$", raw, re.M))


def _cut_names(address: str) -> list[str]:
    try:
        return [c["name"] for c in Client(address).cuts("ranker")]
    except EkkoError:          # the model has not reached it yet
        return []


def _cli(*argv: str) -> str:
    out = subprocess.run([sys.executable, "-m", "ekko.cli.main", *argv], cwd=REPO, capture_output=True, text=True,
                         timeout=120, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_a_baseline_costs_its_dc_no_convergence_and_no_extra_bytes(tmp_path):
    spec = ModelSpec("ranker", [TableSpec("emb", rows=100_000, dim=32, shards=16)])
    pub = Publisher(spec, origin=9, seed=7)
    with DaemonGroup(tmp_path) as g:
        seed = g.spawn("r0-0", "dc0")
        procs = [seed] + [g.spawn(f"r{d}-{i}", f"dc{d}", seeds=[seed.address])
                          for d in range(2) for i in range(3) if (d, i) != (0, 0)]
        for p in procs:
            p.wait_healthy()
        wait_for(lambda: all(sum(m["state"] == "alive" for m in get_json(p.address, "/v1/status?cluster=1")["members"])
                             == len(procs) for p in procs), CONVERGE_TIMEOUT_S, 0.2, "all six to see each other")
        ingest, base = procs[0], procs[5]
        peers = [p for p in procs if p.dc == base.dc and p is not base]
        register(ingest.address, spec)
        wait_for(lambda: all(table_digests(p.address, "ranker") is not None for p in procs), CONVERGE_TIMEOUT_S,
                 0.1, "the catalog to reach every replica")
        pub.publish(ingest.address, "emb", 5000)
        at_cut = pub.digests()
        wait_for(lambda: all(table_digests(p.address, "ranker") == at_cut for p in procs), CONVERGE_TIMEOUT_S,
                 POLL_S, "six replicas to converge")
        Client(ingest.address).cut("ranker", "validated")
        wait_for(lambda: any(c["name"] == "validated" for c in Client(base.address).cuts("ranker")),
                 CONVERGE_TIMEOUT_S, 0.1, "the cut to reach the baseline")
        assert "validated" in _cli("baseline", "--peer", base.address, "--model", "ranker", "--pin", "validated")
        wait_for(lambda: all(any(m["node_id"] == base.node_id and m["role"] == "baseline"
                                 for m in get_json(p.address, "/v1/status?cluster=1")["members"]) for p in procs),
                 CONVERGE_TIMEOUT_S, 0.2, "every replica to know the baseline")
        before = {p.node_id: _bytes_received(p.address) for p in (base, *peers)}
        lags = []
        for _ in range(8):
            ids, vals = pub.publish(ingest.address, "emb", 4000)
            t0 = time.monotonic()
            for p in peers:
                wait_for(lambda p=p: np.array_equal(Client(p.address).read_rows("ranker", "emb", ids[-3:]).numpy(),
                                                    vals[-3:]), CONVERGE_TIMEOUT_S, 0.005, f"{p.node_id} to get it")
                lags.append(time.monotonic() - t0)
            time.sleep(0.2)
        wait_for(lambda: all(table_digests(p.address, "ranker") == pub.digests() for p in procs if p is not base),
                 CONVERGE_TIMEOUT_S, POLL_S, "every ordinary replica to converge")
        time.sleep(2.0)   # a few anti-entropy rounds with the baseline lagging at its cut
        got = {nid: _bytes_received(p.address) - before[nid] for nid, p in
               ((p.node_id, p) for p in (base, *peers))}
        assert table_digests(base.address, "ranker") == at_cut, "the baseline holds its cut"
        ordinary = min(got[p.node_id] for p in peers)
        print(f"\n[baseline] DC peers' lag p50 {sorted(lags)[len(lags) // 2] * 1e3:.0f} ms; bytes received: "
              f"baseline {got[base.node_id] / 1e6:.2f} MB, ordinary {ordinary / 1e6:.2f} MB")
        # The old code offered the baseline every row beyond its cut every round (tens of x).
        assert got[base.node_id] <= BYTES_BAR * ordinary
        assert Client(base.address).status()["baseline_pin"] == "validated"
        # Unpinned through the CLI: it catches up, no restart.
        assert "ordinary replica" in _cli("baseline", "--peer", base.address, "--model", "ranker", "--unpin")
        wait_for(lambda: table_digests(base.address, "ranker") == pub.digests(), CONVERGE_TIMEOUT_S, POLL_S,
                 "the unpinned replica to catch up")
        g.terminate_all(procs)


def test_cuts_survive_a_restart_and_reach_a_daemon_started_later(tmp_path):
    spec = ModelSpec("ranker", [TableSpec("emb", rows=10_000, dim=8, shards=4)])
    pub = Publisher(spec, origin=11, seed=8)
    with DaemonGroup(tmp_path) as g:
        a = g.start("a", "dc0")
        b = g.start("b", "dc0", seeds=[a.address])
        register(a.address, spec)
        wait_for(lambda: table_digests(b.address, "ranker") is not None, CONVERGE_TIMEOUT_S, 0.1, "the catalog")
        pub.publish(a.address, "emb", 1000)
        Client(a.address).cut("ranker", "c1")
        wait_for(lambda: _cut_names(b.address) == ["c1"], CONVERGE_TIMEOUT_S, 0.1, "the cut to reach b")
        taken = Client(a.address).cuts("ranker")[0]["taken_at"]
        assert abs(taken - time.time()) < 120
        assert _cli("baseline", "--peer", b.address, "--model", "ranker", "--pin", "c1")
        assert b.terminate() == 0
        b.start()
        b.wait_healthy()
        (c,) = Client(b.address).cuts("ranker")                         # from its snapshot
        assert c["name"] == "c1" and abs(c["taken_at"] - taken) < 1e-3 and c["pinned"]
        assert Client(b.address).status()["baseline_pin"] == "c1"      # the pin set by the CLI survived
        late = g.start("late", "dc0", seeds=[a.address])                # never saw the cut being taken
        wait_for(lambda: _cut_names(late.address) == ["c1"], CONVERGE_TIMEOUT_S, 0.1,
                 "the late daemon to learn the cut")
        assert abs(Client(late.address).cuts("ranker")[0]["taken_at"] - taken) < 1e-3
        out = _cli("cuts", "--peer", late.address, "--model", "ranker")
        assert "c1" in out and "(learnt)" in out
        # A rollback to the learnt cut works from the late daemon.
        pub.publish(a.address, "emb", 500)
        assert Client(late.address).rollback("ranker", "c1")["ok"]
        g.terminate_all([a, b, late])
