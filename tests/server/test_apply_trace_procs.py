"""``ekko daemon --apply-trace DIR`` on real processes (issue #16): every applied row is
recorded with its wall time and source, flushed when the daemon stops; bench/fidelity.py
times visibility from these files instead of polling the daemons."""

from __future__ import annotations

import time

import numpy as np

from ekko.core.spec import ModelSpec, TableSpec
from ekko.core.version import counters_of
from ekko.sdk.publisher import Publisher
from ekko.server.apply_trace import SOURCES, read_trace, trace_path
from tests.procs import DaemonGroup, get_json, wait_for

SPEC = ModelSpec("m", tables=[TableSpec("emb", rows=1000, dim=4)])


def test_each_applied_row_is_traced_with_its_time_and_source(tmp_path):
    with DaemonGroup(tmp_path) as g:
        a = g.start("a", "dc1", extra=["--apply-trace", str(tmp_path / "trace-a")])
        b = g.start("b", "dc1", seeds=[a.address], extra=["--apply-trace", str(tmp_path / "trace-b")])
        ids = np.array([3, 7, 900], np.int64)
        pub = Publisher([a.address], origin="trace-test", state_dir=tmp_path / "pub")
        try:
            pub.register(SPEC)
            wait_for(lambda: "m" in get_json(b.address, "/v1/status")["models"], 60, what="b to learn the model")
            t0 = time.time()
            ack = pub.publish_many("m", {"emb": (ids, np.ones((3, 4), np.float32))})
            t1 = time.time()
        finally:
            pub.close()
        versions = np.asarray(ack.versions["emb"], np.int64)
        wait_for(lambda: get_json(b.address, "/v1/status")["models"]["m"]["head"] >= int(counters_of(versions).max()),
                 60, 0.1, "b to apply the publish")
        g.terminate_all([a, b])          # each flushes its trace as it stops

    got_a = read_trace(trace_path(tmp_path / "trace-a", "m", "emb"))
    got_b = read_trace(trace_path(tmp_path / "trace-b", "m", "emb"))
    assert sorted(got_a["id"].tolist()) == ids.tolist()
    assert {SOURCES[c] for c in got_a["source"]} == {"publish"}
    assert t0 <= got_a["t"].min() and got_a["t"].max() <= t1                  # applied during the call
    assert sorted(zip(got_a["id"].tolist(), got_a["version"].tolist())) == sorted(zip(ids.tolist(), versions.tolist()))
    assert sorted(got_b["id"].tolist()) == ids.tolist()
    assert {SOURCES[c] for c in got_b["source"]} <= {"push", "pull"}
    assert got_b["t"].min() >= got_a["t"].min()                               # the peer applied after the ingest
