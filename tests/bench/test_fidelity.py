"""bench/fidelity.py: config loading and validation, the statistics and ratios on hand-made
samples, and the simulator side of a tiny config end to end.

No real daemons here: a real run starts one daemon per replica (torch imports, start-up of
several seconds each on a shared 2-core machine), well over the ~20 s a CI test may take;
``python bench/fidelity.py CONFIG --quick`` is the smoke run of that side.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from ekko.core import read_auth
from ekko.core.errors import UsageError
from ekko.core.spec import TableSpec
from ekko.core.version import pack

REPO = Path(__file__).resolve().parents[2]


def _load():
    spec = importlib.util.spec_from_file_location("bench_fidelity", REPO / "bench" / "fidelity.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_fidelity"] = mod
    spec.loader.exec_module(mod)
    return mod


fid = _load()

TINY = {
    "fidelity": {"name": "tiny", "seed": 3, "replicas_per_dc": 2, "preset": "local", "settle_s": 5},
    "wan": {"dcs": ["a", "b"], "rtt_ms": {"a-b": 40}, "intra_dc_rtt_ms": 0.2, "per_message_overhead_bytes": 100},
    "workload": {"rows": 2000, "dim": 4, "zipf_s": 1.05, "rows_per_batch": 50, "batches_per_s": 5,
                 "duration_s": 1.0},
    "cpu": {"per_message_s": 3.58e-05, "apply_s_per_row": 1.26e-07, "scan_s_per_row": 3.95e-09,
            "index_s_per_row": 2.26e-08},
}


def with_change(path: str, value):
    d = copy.deepcopy(TINY)
    *head, last = path.split(".")
    node = d
    for k in head:
        node = node.setdefault(k, {})
    if value is None:
        node.pop(last, None)
    else:
        node[last] = value
    return d


# --------------------------------------------------------------------------- config
@pytest.mark.parametrize("name", ["dc3x3_low", "dc3x3_high", "dc2x6"])
def test_shipped_configs_load_with_paper_rtts_and_cpu(name):
    from simulator.scenario import load_scenario
    cfg = fid.load_config(name)
    paper = load_scenario("paper")
    for (a, b), ms in cfg.rtt_ms.items():
        assert paper.wan.rtt_s(a, b) * 1000 == pytest.approx(ms)
    assert cfg.dcs == paper.wan.dc_names[:len(cfg.dcs)]
    # the paper's calibrated costs, on one shared host of 2 cores (the machine the daemons share)
    # with the WAN emulator's thread on it (no emulator in the paper's deployment)
    host_only = ("shared_cores", "proxy_per_message_s", "proxy_s_per_byte")
    assert {k: v for k, v in cfg.cpu.items() if k not in host_only} == {
        k: getattr(paper.cpu, k) for k in cfg.cpu if k not in host_only}
    assert cfg.cpu["shared_cores"] == 2 and paper.cpu.shared_cores is None
    assert cfg.cpu["proxy_per_message_s"] > 0 and not paper.cpu.has_proxy
    assert paper.cpu.defers_receive and paper.cpu.wake_s > 0
    assert cfg.replicas == (12 if name == "dc2x6" else 9)


def test_high_config_has_a_higher_rate_than_low():
    assert fid.load_config("dc3x3_high").batches_per_s > fid.load_config("dc3x3_low").batches_per_s


def test_unknown_config_name_lists_the_shipped_ones():
    with pytest.raises(UsageError, match="dc3x3_low"):
        fid.load_config("no-such-config")


def test_unparsable_file_is_a_clear_error(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("[fidelity\n")
    with pytest.raises(UsageError, match="cannot parse"):
        fid.load_config(str(p))


@pytest.mark.parametrize("path,value,match", [
    ("wan.dcs", ["a"], "at least 2 distinct"),
    ("wan.dcs", ["a", "a"], "at least 2 distinct"),
    ("wan.rtt_ms", {"a-c": 10}, "two known DCs"),
    ("wan.rtt_ms", {}, "lacks DC pairs"),
    ("wan.rtt_ms", {"a-b": -1}, r"wan.rtt_ms.a-b must be a number"),
    ("workload.rows_per_batch", None, "workload.rows_per_batch is required"),
    ("workload.batches_per_s", 0, "batches_per_s must be a number"),
    ("workload.dim", 2.5, "dim must be an integer"),
    ("workload.zipf_s", "high", "zipf_s must be a number"),
    ("fidelity.preset", "fast", "preset must be one of"),
    ("fidelity.replicas_per_dc", 40, "at most 64 real daemons"),
    ("cpu.per_message_s", None, r"\[cpu\] needs per_message_s"),
    ("extra", {"x": 1}, "unknown tables"),
])
def test_bad_configs_are_refused_with_what_is_wrong(path, value, match):
    with pytest.raises(UsageError, match=match):
        fid.parse_config(with_change(path, value))


def test_quick_shortens_only_the_duration():
    cfg = fid.parse_config(with_change("workload.duration_s", 600))
    q = fid.quick(cfg)
    assert q.duration_s == fid.QUICK_DURATION_S and q.batches_per_s == cfg.batches_per_s
    assert cfg.duration_s == 600   # the original is left alone


def test_scenario_mirrors_the_config():
    cfg = fid.parse_config(TINY)
    sc = fid.build_scenario(cfg)
    assert sc.replicas == 4 and sc.wan.dc_names == ["a", "b"] and sc.training_dc == "a"
    assert sc.wan.rtt_s("a", "b") == pytest.approx(0.040)
    assert sc.workload.batch_interval_s == pytest.approx(0.2)
    assert sc.workload.sparse[0].rows_per_s == pytest.approx(250)
    assert sc.cpu.per_message_s == pytest.approx(3.58e-05)
    assert sc.samples_per_batch == 50   # every row of a batch tracked


# --------------------------------------------------------------------------- statistics
def test_percentiles_ignore_and_count_never_visible():
    p = fid.percentiles([0.1, 0.2, 0.3, 0.4, float("nan")])
    assert p["p50"] == pytest.approx(0.25) and p["n"] == 4 and p["missing"] == 1
    assert math.isnan(fid.percentiles([float("nan")])["p90"])


def test_summarize_splits_intra_and_cross_and_drops_the_ingest():
    # replicas: ingest (a), a2 (a), b1 (b), b2 (b); two publishes sent at 10 and 11
    lat = np.array([[0.0, 0.01, 0.05, 0.07],
                    [0.0, 0.03, 0.06, 0.20]])
    s = fid.summarize(lat, np.array([10.0, 11.0]), ["a", "a", "b", "b"], 0, "a", {"a->b": 5, "b->a": 1})
    assert s["intra_dc"]["n"] == 2 and s["intra_dc"]["p50"] == pytest.approx(0.02)
    assert s["cross_dc"]["n"] == 4 and s["cross_dc"]["p50"] == pytest.approx(0.065)
    assert s["converge_s"] == pytest.approx(0.20)   # 11.20 - 11.0
    assert s["wan_bytes_total"] == 6


def test_summarize_without_convergence_gives_nan():
    lat = np.array([[0.0, float("nan"), 0.1]])
    s = fid.summarize(lat, np.array([1.0]), ["a", "a", "b"], 0, "a", {})
    assert math.isnan(s["converge_s"]) and s["intra_dc"]["missing"] == 1


def test_ratio_and_targets():
    real = {"intra_dc": {"p50": 0.010, "p90": 0.020, "p99": 0.030},
            "cross_dc": {"p50": 0.100, "p90": 0.200, "p99": 0.300},
            "wan_bytes": {"a->b": 1000, "b->a": 100}, "wan_bytes_total": 1100, "converge_s": 0.5}
    sim = {"intra_dc": {"p50": 0.012, "p90": 0.030, "p99": 0.001},
           "cross_dc": {"p50": 0.080, "p90": 0.210, "p99": 0.300},
           "wan_bytes": {"a->b": 1050, "b->a": 200}, "wan_bytes_total": 1250, "converge_s": 0.25}
    r = fid.compare(real, sim)
    assert r["intra_dc"]["p50"] == pytest.approx(1.2) and r["converge_s"] == pytest.approx(0.5)
    met = r["targets"]["met"]
    assert met["intra_dc p50"] and not met["intra_dc p90"]          # 1.2 ok, 1.5 not
    assert met["cross_dc p50"] and met["cross_dc p90"]              # 0.8, 1.05
    assert "intra_dc p99" not in met                                # p99: reported, no target
    assert met["wan_bytes a->b"] and not met["wan_bytes b->a"]      # 1.05 ok, 2.0 not
    assert r["targets"]["all_met"] is False
    assert fid.within(0.9, 0.1) and not fid.within(float("nan"), 1.0)
    assert math.isnan(fid.ratio(1.0, 0))


def test_publish_targets_and_covers():
    t = TableSpec("t", rows=100, dim=2, shards=2)
    ids = np.array([1, 2, 99])
    versions = np.array([pack(5, 1), pack(6, 1), pack(7, 1)])
    want = fid.publish_targets(t, ids, versions)
    assert want == {(0, 1): 6, (1, 1): 7}
    assert fid.covers({(0, 1): 9, (1, 1): 7}, want) and not fid.covers({(0, 1): 6, (1, 1): 6}, want)
    assert fid.publish_targets_all(t, [(ids[:2], versions[:2]), (ids[2:], versions[2:])]) == want


def _trace(*rows):
    from ekko.server.apply_trace import RECORD
    return np.array(list(rows), RECORD)


def test_first_times_takes_the_first_apply_at_or_above_the_version():
    rec = _trace((1.0, 7, 10, 2), (2.0, 7, 20, 2), (3.0, 7, 30, 3), (1.5, 8, 5, 2), (0.5, 1, 1, 1))
    got = fid.first_times(rec, np.array([7, 7, 7, 7, 8, 8, 9, 1]), np.array([5, 10, 11, 31, 5, 6, 1, 1]))
    assert got[:3].tolist() == [1.0, 1.0, 2.0] and math.isnan(got[3])   # 31: never that new
    assert got[4] == 1.5 and math.isnan(got[5]) and math.isnan(got[6]) and got[7] == 0.5
    assert fid.first_times(rec, np.zeros(0, np.int64), np.zeros(0, np.int64)).shape == (0,)
    assert np.isnan(fid.first_times(_trace(), np.array([1]), np.array([1]))).all()


def test_first_times_matches_a_row_by_row_scan():
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 50, 400)
    versions = np.arange(400) * 3 + rng.integers(0, 3, 400)     # later applies carry greater versions
    rec = _trace(*[(float(i), int(r), int(v), 2) for i, (r, v) in enumerate(zip(ids, versions))])
    q_ids, q_v = rng.integers(0, 55, 300), rng.integers(0, 1300, 300)
    want = [next((float(t) for t, r, v, _ in rec.tolist() if r == qi and v >= qv), math.nan)
            for qi, qv in zip(q_ids.tolist(), q_v.tolist())]
    got = fid.first_times(rec, q_ids, q_v)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(got[~np.isnan(got)], np.array(want)[~np.isnan(want)])


def test_trace_visibility_is_the_last_row_and_nan_if_any_row_is_missing():
    rec = _trace((1.0, 1, 5, 2), (2.0, 2, 5, 2), (4.0, 3, 9, 2))
    got = fid.trace_visibility(rec, [(np.array([1, 2]), np.array([5, 5])), (np.array([3, 4]), np.array([9, 9])),
                                     (np.array([3]), np.array([8]))])
    assert got[0] == 2.0 and math.isnan(got[1]) and got[2] == 4.0


def test_apply_trace_round_trip_and_torn_tail(tmp_path):
    from ekko.core.store import ApplyResult
    from ekko.server.apply_trace import SOURCES, ApplyTrace, read_trace, trace_path
    tr = ApplyTrace(tmp_path / "t", clock=lambda: 12.5)
    tr.on_apply("m", "emb", ApplyResult(np.array([3, 5]), np.array([70, 71]), np.zeros(2, np.int64)), "publish")
    tr.on_apply("m", "emb", ApplyResult(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)), "pull")
    tr.on_apply("m", "other", ApplyResult(np.array([1]), np.array([2]), np.zeros(1, np.int64)), "pull")
    tr.close()
    path = trace_path(tmp_path / "t", "m", "emb")
    rec = read_trace(path)
    assert rec["t"].tolist() == [12.5, 12.5] and [SOURCES[c] for c in rec["source"]] == ["publish", "publish"]
    assert read_trace(trace_path(tmp_path / "t", "m", "other"))["id"].tolist() == [1]
    with open(path, "ab") as f:
        f.write(b"\x01\x02")   # a torn record (killed mid-write) is dropped
    assert len(read_trace(path)) == 2 and tr.rows == 3


def test_table_lines_show_every_figure_and_the_verdict():
    real = {"intra_dc": {"p50": 0.010, "p90": 0.020, "p99": 0.030},
            "cross_dc": {"p50": 0.100, "p90": 0.200, "p99": 0.300},
            "wan_bytes": {"a->b": 1000}, "wan_bytes_total": 1000, "converge_s": 0.5}
    lines = fid.table_lines(real, real, fid.compare(real, real))
    text = "\n".join(lines)
    assert "latency cross_dc p90" in text and "WAN bytes a->b" in text and "time to converge" in text
    assert "MISSED" not in text and text.count("ok") == 5


# --------------------------------------------------------------------------- sim side
def test_sim_side_of_a_tiny_config_end_to_end():
    cfg = fid.parse_config(TINY)
    out = fid.run_sim(cfg)
    batches = fid.workload_batches(fid.build_scenario(cfg))
    assert out["publishes"] == len(batches) >= 4
    assert out["intra_dc"]["n"] == len(batches) and out["cross_dc"]["n"] == 2 * len(batches)
    assert out["intra_dc"]["missing"] == 0 and out["cross_dc"]["missing"] == 0
    # Cross-DC latency is at least the one-way propagation (20 ms); intra-DC far below it.
    assert out["cross_dc"]["p50"] >= 0.020 > out["intra_dc"]["p90"]
    assert set(out["wan_bytes"]) <= {"a->b", "b->a"} and out["wan_bytes"]["a->b"] > 0
    # Every published row crossed a->b at least once (value + id + version).
    rows = sum(len(b.ids) for b in batches)
    assert out["wan_bytes"]["a->b"] >= rows * (4 * 4 + 16)
    assert 0.020 <= out["converge_s"] < cfg.settle_s


def test_main_sim_only_writes_the_json(tmp_path, capsys):
    cfg_path = tmp_path / "tiny.toml"
    cfg_path.write_text(TOML_TINY)
    assert fid.main([str(cfg_path), "--sim-only", "--out", str(tmp_path)]) == 0
    import json
    doc = json.loads((tmp_path / "fidelity.json").read_text())
    assert doc["config"] == "tiny" and doc["sim"]["publishes"] >= 4 and "load_average" in doc
    assert "where the definitions differ" in capsys.readouterr().out


def test_main_refuses_a_bad_config(tmp_path, capsys):
    p = tmp_path / "bad.toml"
    p.write_text('[wan]\ndcs = ["a"]\n')
    assert fid.main([str(p), "--sim-only", "--out", str(tmp_path)]) == 2
    assert "at least 2 distinct" in capsys.readouterr().err
    assert not (tmp_path / "fidelity.json").exists()


TOML_TINY = """
[fidelity]
name = "tiny"
replicas_per_dc = 2
settle_s = 5
[wan]
dcs = ["a", "b"]
[wan.rtt_ms]
"a-b" = 40
[workload]
rows = 2000
dim = 4
rows_per_batch = 50
batches_per_s = 5
duration_s = 1.0
"""


def test_sustained_flags_a_growing_backlog():
    steady = np.full((50, 3), 0.1)
    assert fid.sustained(steady)
    growing = np.linspace(0.1, 5.0, 50)[:, None] * np.ones((1, 3))
    assert not fid.sustained(growing)


def test_docstring_examples():
    import doctest
    res = doctest.testmod(fid)
    assert res.failed == 0 and res.attempted >= 8


def test_knowledge_poller_keeps_changes_with_the_poll_before():
    """Against a stand-in HTTP server whose knowledge moves once: two changes, each with
    ``before <= at``, the second bracketed by the poll that missed it."""
    import json
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    state = {"counter": 3}
    signed = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 -- the http.server API
            signed.append(read_auth.HEADER in self.headers)
            body = json.dumps({"tables": {fid.TABLE: [[0, [[1, state["counter"]]], 0]]}}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    stop = threading.Event()
    poller = fid.KnowledgePoller(f"127.0.0.1:{srv.server_address[1]}", 0.01, stop, key="cluster-key-0123")
    try:
        poller.start()
        time.sleep(0.1)
        moved = time.monotonic()
        state["counter"] = 9
        time.sleep(0.1)
    finally:
        stop.set()
        poller.join(5)
        srv.shutdown()
    assert [c[2] for c in poller.changes] == [{(0, 1): 3}, {(0, 1): 9}]
    before, at, _ = poller.changes[1]
    assert before < at and before <= moved + 0.01 and at >= moved - 0.01
    assert poller.polls >= 5 and poller.errors == 0
    assert poller.latest() == {(0, 1): 9}
    assert signed and all(signed), "every poll is signed with the cluster key"


def test_median_run_takes_each_figure_s_median_and_keeps_the_runs():
    def run(p50, wan, sustained=True):
        return {"intra_dc": {"p50": p50, "n": 10}, "cross_dc": {"p50": p50 * 4, "n": 10}, "wan_bytes": {"a->b": wan},
                "wan_bytes_total": wan, "converge_s": p50, "sustained": sustained, "how": {"first": p50}}
    runs = [run(0.010, 100), run(0.030, 300, sustained=False), run(0.020, 200)]
    m = fid.median_run(runs)
    assert m["intra_dc"]["p50"] == 0.020 and m["cross_dc"]["p50"] == 0.080
    assert m["wan_bytes"] == {"a->b": 200} and m["wan_bytes_total"] == 200
    assert m["sustained"] is False and m["how"] == {"first": 0.010} and len(m["runs"]) == 3
    assert fid.median_run(runs[:1]) is runs[0]


def test_main_refuses_bad_repeats(capsys):
    assert fid.main(["dc3x3_low", "--repeats", "0"]) == 2
    assert "--repeats" in capsys.readouterr().err
