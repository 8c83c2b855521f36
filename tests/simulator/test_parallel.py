"""Partitioned runs (simulator.parallel): DCs split over worker processes."""

from __future__ import annotations

import multiprocessing as mp
import sys

import numpy as np
import pytest

import simulator.parallel as parallel
from ekko.core.errors import UsageError
from simulator.experiment import run_ekko_family, run_scenario
from simulator.parallel import partition_dcs, run_partitioned
from simulator.scenario import load_scenario

# (monkeypatched failures below reach the workers only when they fork)
pytestmark = pytest.mark.skipif("fork" not in mp.get_all_start_methods() or sys.platform != "linux",
                                reason="these tests patch the workers through fork")


def small_paper(replicas: int = 36, duration: float = 1.0, settle: float = 3.0):
    sc = load_scenario("paper")
    sc.replicas, sc.duration_s, sc.settle_s = replicas, duration, settle
    return sc


def comparable(res: dict) -> dict:
    """A results entry without its time figures (they vary run to run)."""
    out = {k: v for k, v in res.items() if k not in ("wall_s", "partition_timing", "_latency_matrix")}
    out["_latency_matrix"] = np.nan_to_num(res["_latency_matrix"], nan=-1.0).tolist()
    return out


# -- the DC split ----------------------------------------------------------------------------

def _prop(table):
    return lambda a, b: table.get((a, b), table.get((b, a)))


def test_partition_balances_load_first_then_maximises_lookahead():
    prop = _prop({("a", "b"): 0.010, ("a", "c"): 0.050, ("a", "d"): 0.060,
                  ("b", "c"): 0.040, ("b", "d"): 0.070, ("c", "d"): 0.005})
    load = {"a": 10, "b": 10, "c": 10, "d": 10}
    groups, la = partition_dcs(["a", "b", "c", "d"], load, prop, 2)
    # {a,b} | {c,d} is balanced and keeps the two close pairs together: lookahead 40 ms
    assert groups == [["a", "b"], ["c", "d"]] and la == pytest.approx(0.040)
    # an uneven load wins over lookahead: d alone carries half the replicas
    groups, la = partition_dcs(["a", "b", "c", "d"], {**load, "d": 30}, prop, 2)
    assert groups == [["a", "b", "c"], ["d"]] and la == pytest.approx(0.005)


def test_partition_greedy_above_the_exhaustive_limit(monkeypatch):
    monkeypatch.setattr(parallel, "MAX_ASSIGNMENTS", 1)
    dcs = [f"d{i}" for i in range(6)]
    load = {dc: 10 * (i + 1) for i, dc in enumerate(dcs)}
    groups, la = partition_dcs(dcs, load, lambda a, b: 0.03, 2)
    assert sorted(dc for g in groups for dc in g) == sorted(dcs)
    per = [sum(load[dc] for dc in g) for g in groups]
    assert max(per) - min(per) <= 10 and la == pytest.approx(0.03)


@pytest.mark.parametrize("workers", [0, 7])
def test_partition_refuses_more_workers_than_dcs(workers):
    dcs = [f"d{i}" for i in range(6)]
    with pytest.raises(UsageError, match="between 1 and the number of DCs"):
        partition_dcs(dcs, {dc: 1 for dc in dcs}, lambda a, b: 0.03, workers)


# -- whole runs --------------------------------------------------------------------------------

def test_two_workers_simulate_what_one_process_does():
    sc = small_paper()
    one = run_ekko_family(sc, "ekko")
    two = run_ekko_family(sc, "ekko", workers=2)
    part = two["partition"]
    assert part["workers"] == 2 and sorted(sum(part["dcs"], [])) == sorted(sc.wan.dc_names)
    assert part["messages_exchanged"] > 0 and two["partition_timing"]["advances"] > 0
    # the split is real: each worker's replicas' latencies came from that worker
    assert two["converged"] and one["converged"] and two["unapplied_samples"] == 0
    assert two["rows_published"] == one["rows_published"]
    assert two["wan_bytes"] == pytest.approx(one["wan_bytes"], rel=0.02)
    for scope in ("intra_dc", "cross_dc"):
        assert two["latency_s"][scope]["n"] == one["latency_s"][scope]["n"]
        assert two["latency_s"][scope]["mean"] == pytest.approx(one["latency_s"][scope]["mean"], rel=0.05)
    assert set(two["bytes_by_message"]) == set(one["bytes_by_message"])


def test_same_seed_and_workers_give_the_same_results():
    sc = small_paper(duration=0.6, settle=2.0)
    a = run_partitioned(sc, "ekko", 3)
    b = run_partitioned(sc, "ekko", 3)
    assert comparable(a) == comparable(b)
    assert a["partition"]["workers"] == 3 and len(a["partition_timing"]["worker_cpu_s"]) == 3


def test_run_scenario_splits_ekko_systems_and_keeps_baselines_whole():
    sc = small_paper(replicas=18, duration=0.5, settle=2.0)
    res = run_scenario(sc, ["ekko", "direct-push"], workers=2)
    assert res["workers"] == 2
    assert res["systems"]["ekko"]["partition"]["workers"] == 2
    assert "partition" not in res["systems"]["direct-push"]
    with pytest.raises(UsageError, match="not both"):
        run_scenario(sc, ["ekko", "direct-push"], jobs=2, workers=2)


def test_a_lookahead_longer_than_the_wan_is_caught(monkeypatch):
    """The causality check: were the lookahead longer than the least propagation between
    the workers' DCs, a message would arrive in time a worker has already simulated."""
    real = parallel.partition_dcs

    def too_long(*args, **kw):
        groups, la = real(*args, **kw)
        return groups, la * 20

    monkeypatch.setattr(parallel, "partition_dcs", too_long)
    with pytest.raises(RuntimeError, match="causality"):
        run_partitioned(small_paper(duration=0.5, settle=1.0), "ekko", 2)


def test_a_failing_worker_stops_the_run(monkeypatch):
    def boom(*args, **kw):
        raise ValueError("injected")

    monkeypatch.setattr(parallel, "converged", boom)
    with pytest.raises(RuntimeError, match="injected"):
        run_partitioned(small_paper(duration=0.5, settle=1.0), "ekko", 2)


def test_bad_requests_are_refused_before_anything_runs():
    with pytest.raises(UsageError, match="workers must be"):
        run_partitioned(small_paper(), "ekko", 0)
    with pytest.raises(UsageError, match="scheduler"):
        run_partitioned(load_scenario("congestion"), "ekko", 2)
