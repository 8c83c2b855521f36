"""Row audits on real daemons: rows one daemon holds below the knowledge every daemon
shares reach the others (:mod:`p2p.audit`).

The state is what rule K2's limit leaves (a gap closed while one replica held rows of
it): here a daemon is stopped, its snapshot is given newer versions of some rows below
its knowledge (as a disk that held them would), and it is started again.  A pull cannot
bring those rows anywhere (every daemon's knowledge already covers them); audits do.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from ekko import Publisher
from ekko.core.delta import Delta
from ekko.core.spec import ModelSpec, TableSpec
from ekko.core.version import ORIGIN_BITS
from ekko.replica.snapshot import load_snapshot, save_snapshot
from procs import DaemonGroup, get_json, http, read_rows, table_digests, wait_for

pytestmark = pytest.mark.slow

SPEC = ModelSpec("m", [TableSpec("emb", rows=20_000, dim=8, shards=8)])
#: seconds for replicas to converge on a loaded 2-core machine.
CONVERGE_S = 60.0


def _audits(address: str) -> float:
    text = http("GET", f"http://{address}/metrics")[1].decode()
    got = re.search(r'^ekko_node_events_total\{event="audits_sent"\} (\S+)$', text, re.M)
    return float(got.group(1)) if got else 0.0


def test_rows_a_restarted_daemon_holds_below_everyones_knowledge_reach_every_daemon(tmp_path):
    rng = np.random.default_rng(3)
    with DaemonGroup(tmp_path) as g:
        a = g.start("a", "dc0")
        procs = [a] + [g.spawn(n, dc, seeds=[a.address]) for n, dc in (("b", "dc0"), ("c", "dc1"), ("d", "dc1"))]
        for p in procs:
            p.wait_healthy()
        with Publisher([a.address], origin="t") as pub:
            pub.register(SPEC)
            wait_for(lambda: all(table_digests(p.address, "m") for p in procs), CONVERGE_S, 0.2, "the model everywhere")
            for _ in range(5):
                ids = rng.choice(SPEC.table("emb").rows, 2000, replace=False).astype(np.int64)
                pub.publish("m", "emb", ids, rng.standard_normal((len(ids), 8)).astype(np.float32))
        wait_for(lambda: len({str(table_digests(p.address, "m")) for p in procs}) == 1, CONVERGE_S, 0.2,
                 "the daemons to converge")
        d = procs[-1]
        assert d.terminate() == 0
        # Newer versions of 12 rows of the first publish: one counter above each, below
        # the knowledge of every shard (the later publishes touched every shard).
        store, meta = load_snapshot(d.data_dir, SPEC, "cpu")
        ts = store.table("emb")
        first = np.flatnonzero(ts.versions)[:: max(1, int(np.count_nonzero(ts.versions)) // 12)][:12]
        order = np.argsort(ts.versions[first])
        rows = first[order]
        versions = ts.versions[rows] + (1 << ORIGIN_BITS)
        values = rng.standard_normal((len(rows), 8)).astype(np.float32)
        assert len(ts.apply(Delta("m", "emb", rows, versions, values))) == len(rows)
        save_snapshot(d.data_dir, store, meta)
        d.start()
        d.wait_healthy()
        assert np.array_equal(read_rows(d.address, "m", "emb", rows)[0], values)

        def everywhere() -> bool:
            return all(np.array_equal(read_rows(p.address, "m", "emb", rows)[0], values) for p in procs)

        wait_for(everywhere, CONVERGE_S, 0.5, "the rows at every daemon")
        wait_for(lambda: len({str(table_digests(p.address, "m")) for p in procs}) == 1, CONVERGE_S, 0.2,
                 "the daemons to converge again")
        assert sum(_audits(p.address) for p in procs) > 0
        status = get_json(a.address, "/v1/status")
        assert status["models"]["m"]["tables"]["emb"]["digest"] == table_digests(d.address, "m")["emb"]
