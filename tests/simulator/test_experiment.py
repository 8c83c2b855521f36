"""The scenario runner: real nodes on the simulated WAN, baselines, reports, determinism."""

from __future__ import annotations

import dataclasses
import json

import pytest

from simulator.experiment import run_scenario
from simulator.report import public, write_results
from simulator.scenario import load_scenario, parse_scenario

SMALL = {
    "scenario": {"name": "small", "seed": 3, "duration_s": 3, "settle_s": 20, "replicas": 9,
                 "systems": ["ekko", "ekko-no-gateways", "direct-push", "adam-2pc", "broadcast"],
                 "samples_per_batch": 2},
    "wan": {"dcs": ["a", "b", "c"], "rtt_ms": {"a-b": 60, "a-c": 120, "b-c": 90}, "background_load": 0.5},
    "node": {"preset": "wan"},
    "table": [{"name": "emb", "rows": 2000, "dim": 64, "shards": 4}],   # paper-sized rows
    "workload": {"batch_interval_s": 0.2, "sparse": [{"table": "emb", "rows_per_s": 500}]},
    "baselines": {"checkpoint_interval_s": 60, "checkpoint_validate_s": 10},
}


@pytest.fixture(scope="module")
def results():
    return run_scenario(parse_scenario(SMALL))


def test_results_have_the_documented_shape(results):
    for key in ("scenario", "seed", "replicas", "dcs", "events", "wall_s", "events_per_s"):
        assert key in results
    for name, r in results["systems"].items():
        for scope in ("intra_dc", "cross_dc", "all"):
            assert set(r["latency_s"][scope]) >= {"mean", "p50", "p99"}
        assert r["wan_bytes"] > 0 and r["wan_bytes_min"] > 0 and isinstance(r["converged"], bool)


def test_every_system_delivers_everything(results):
    for name, r in results["systems"].items():
        assert r["converged"], name
        assert r["unapplied_samples"] == 0, name


def test_the_shape_of_the_comparison(results):
    s = {k: v["latency_s"]["cross_dc"]["mean"] for k, v in results["systems"].items()}
    assert s["ekko"] < s["ekko-no-gateways"]          # eager push through gateways beats pull-only
    assert s["broadcast"] > 10 * s["ekko"]            # checkpoints wait for the next interval
    e = results["systems"]["ekko"]
    assert e["wan_bytes"] < results["systems"]["direct-push"]["wan_bytes"]
    assert e["wan_bytes"] <= 1.25 * e["wan_bytes_min"]   # the bound for the paper scenario


def test_intra_dc_is_faster_than_cross_dc_for_ekko(results):
    lat = results["systems"]["ekko"]["latency_s"]
    assert lat["intra_dc"]["mean"] < lat["cross_dc"]["mean"]


def test_same_seed_same_results():
    cfg = json.loads(json.dumps(SMALL))
    cfg["scenario"]["systems"] = ["ekko", "adam-2pc"]
    # Twice in this process, and once with the systems in worker processes (--jobs).
    a, b, c = (public(run_scenario(parse_scenario(cfg), jobs=jobs)) for jobs in (1, 1, 2))
    for r in (a, b, c):
        r.pop("wall_s"), r.pop("events_per_s"), r.pop("peak_rss_mb")
        for s in r["systems"].values():
            s.pop("wall_s")
    assert a == b == c


def test_report_files(results, tmp_path):
    paths = write_results(results, tmp_path)
    data = json.loads(paths["results"].read_text())
    assert data["systems"]["ekko"]["converged"] is True
    for key in ("latency_cdf", "latency_per_dc", "wan_bytes"):
        assert paths[key].stat().st_size > 1000
    assert "| ekko |" in paths["summary"].read_text()


def test_shipped_scenarios_load():
    for name in ("paper", "congestion"):
        sc = load_scenario(name)
        assert sc.replicas > 0 and sc.systems
    with pytest.raises(Exception):
        load_scenario("no-such-scenario")


def test_congestion_classes_are_the_schedulers_decisions():
    """A small congestion run: samples are classed by the publishing replica's scheduler,
    the three systems see the same decisions, and the report says how they match hindsight."""
    sc = load_scenario("congestion")
    # the last batch (at 3.0) comes before the first convergence check (at 3.5)
    sc.replicas, sc.duration_s, sc.settle_s = 3, 3.05, 30.0
    b = sc.workload.bursts[0]
    sc.workload = dataclasses.replace(sc.workload, bursts=(dataclasses.replace(b, t0=1.0, t1=2.0),))
    res = run_scenario(sc, ["ekko", "fifo"])["systems"]
    for name in ("ekko", "fifo"):
        r = res[name]
        assert r["converged"]
        assert set(r["latency_by_class_s"]) == {"high", "low"}
        agree = r["class_agreement"]
        assert 0.02 < agree["decided_high_fraction"] < 0.15
        assert 0.0 <= agree["precision"] <= 1.0 and 0.0 <= agree["recall"] <= 1.0
    assert res["ekko"]["class_agreement"] == res["fifo"]["class_agreement"]
    assert res["ekko"]["latency_by_class_s"]["high"]["n"] == res["fifo"]["latency_by_class_s"]["high"]["n"]
    # the publishing replica holds its rows at once: no sample waits for it
    assert res["ekko"]["latency_by_class_s"]["high"]["p50"] < 0.5
