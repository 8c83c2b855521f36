"""Rollback with real daemons: six replicas in two DCs go back to a cut exactly."""

from __future__ import annotations

import time

import numpy as np
import pytest

from ekko.sdk.client import Client
from ekko.core.spec import ModelSpec, TableSpec
from procs import DaemonGroup, get_json, table_digests, wait_for
from test_daemon_procs import CONVERGE_TIMEOUT_S, POLL_S, Publisher, register

pytestmark = pytest.mark.slow


def test_six_daemons_roll_back_to_a_cut(tmp_path):
    spec = ModelSpec("ranker", [TableSpec("emb", rows=200_000, dim=32, shards=16)])
    pub = Publisher(spec, origin=9, seed=5)
    with DaemonGroup(tmp_path) as g:
        seed = g.spawn("r0-0", "dc0")
        procs = [seed] + [g.spawn(f"r{d}-{i}", f"dc{d}", seeds=[seed.address])
                          for d in range(2) for i in range(3) if (d, i) != (0, 0)]
        for p in procs:
            p.wait_healthy()
        wait_for(lambda: all(sum(m["state"] == "alive" for m in get_json(p.address, "/v1/status?cluster=1")["members"])
                             == len(procs) for p in procs), CONVERGE_TIMEOUT_S, 0.2, "all six to see each other")
        ingest = procs[1]
        register(ingest.address, spec)
        wait_for(lambda: all(table_digests(p.address, "ranker") is not None for p in procs), CONVERGE_TIMEOUT_S,
                 0.1, "the catalog to reach every replica")

        pub.publish(ingest.address, "emb", 50_000)                        # good rows
        good = pub.digests()
        wait_for(lambda: all(table_digests(p.address, "ranker") == good for p in procs), CONVERGE_TIMEOUT_S,
                 POLL_S, "six replicas to converge on the good rows")
        client = Client(ingest.address)
        cut = client.cut("ranker", "validated")
        wait_for(lambda: all(any(c["name"] == cut for c in Client(p.address).cuts("ranker")) for p in procs),
                 CONVERGE_TIMEOUT_S, 0.1, "the cut to reach every replica")

        pub.publish(ingest.address, "emb", 50_000)                        # harmful rows
        bad = pub.digests()
        wait_for(lambda: all(table_digests(p.address, "ranker") == bad for p in procs), CONVERGE_TIMEOUT_S,
                 POLL_S, "the harmful rows to spread")

        t0 = time.monotonic()
        out = Client(procs[4].address).rollback("ranker", cut)           # started at a replica of the other DC
        assert out["ok"]
        wait_for(lambda: all(table_digests(p.address, "ranker") == good for p in procs), CONVERGE_TIMEOUT_S,
                 POLL_S, "every replica back at the cut")
        restore_s = time.monotonic() - t0

        # Updates published after the rollback (here by a second trainer) apply everywhere.
        pub2 = Publisher(spec, origin=10, seed=6)
        new_ids, new_vals = pub2.publish(ingest.address, "emb", 1000)
        wait_for(lambda: all(np.array_equal(Client(p.address).read_rows("ranker", "emb", new_ids).numpy(), new_vals)
                             for p in procs), CONVERGE_TIMEOUT_S, POLL_S, "post-rollback rows everywhere")
        print(f"\n[rollback] six daemons back at the cut {restore_s:.2f} s after the rollback call")
        g.terminate_all(procs)
