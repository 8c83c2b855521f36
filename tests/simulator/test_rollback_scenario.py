"""The shipped ``rollback`` scenario, small: detection by the real manager, one automatic
rollback, every replica exactly at the cut state plus the updates published afterwards."""

from __future__ import annotations

import json

import pytest

from ekko.cli.main import main
from ekko.core.errors import UsageError
from simulator.rollback_experiment import RollbackParams, run_rollback
from simulator.scenario import load_scenario


@pytest.mark.parametrize("mode,replicas", [("full", 12), ("metadata", 24)])
def test_rollback_scenario_detects_and_restores_every_replica_exactly(mode, replicas):
    sc = load_scenario("rollback")
    sc.replicas, sc.mode = replicas, mode
    res = run_rollback(sc)
    print(f"\n{mode}: detect {res['time_to_detect_s']}, restore {res['time_to_restore_s']}")
    assert res["detected"] and res["exact"], res.get("rows_not_exact")
    assert res["incidents"] == 1 and res["rollback_records"] == ["auto.model.1"]
    # The newest cut taken before the burst; the one taken during it is never chosen.
    assert res["chosen_cut"] == res["newest_cut_before_burst"]
    assert res["replicas_learnt"] == replicas and res["time_to_restore_s"]["n"] == replicas
    assert 0 < res["first_detection_s"] < 20                      # ~15 windows of 0.5 s
    assert res["time_to_restore_s"]["max"] < 2.0                   # one WAN message after detection
    assert res["rows_published_after_rollback"] > 0                # later updates applied (exact above)
    assert res["harmful_share_peak"] > 0.5 and res["harmful_share_end"] == 0.0


def test_cli_writes_results_json(tmp_path, monkeypatch):
    toml = tmp_path / "rb.toml"
    text = (load_scenario.__globals__["resources"].files("simulator")
            .joinpath("scenarios", "rollback.toml").read_text())
    toml.write_text(text.replace("replicas = 2000", "replicas = 6"))
    assert main(["sim", "run", str(toml), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["exact"] and {"p50", "p99", "max"} <= set(res["time_to_detect_s"])


def test_bad_rollback_parameters_are_refused():
    for bad in [{"burst_t0_s": 40, "burst_t1_s": 30}, {"cut_times_s": [45]}, {"nosuch": 1},
                {"warmup_windows": 100}]:
        with pytest.raises(UsageError):
            RollbackParams.from_dict(bad)
