"""A hashed table in the simulator (issue #18): the shipped ``hashed`` scenario's publisher
assigns slots and evicts as the SDK does, the real nodes converge bit for bit (keys
included), and the baselines draw the same slots."""

from __future__ import annotations

import dataclasses

import pytest

from ekko.core.errors import UsageError
from simulator.experiment import run_scenario
from simulator.scenario import load_scenario, parse_scenario


def test_the_hashed_scenario_evicts_and_converges_bit_for_bit():
    sc = dataclasses.replace(load_scenario("hashed"), duration_s=6.0, systems=["ekko", "direct-push"])
    assert sc.model.table("ads").hashed and sc.workload.sparse[0].rows == 4 * sc.model.table("ads").rows
    res = run_scenario(sc)
    ekko = res["systems"]["ekko"]
    assert ekko["converged"] and ekko["unapplied_samples"] == 0
    assert ekko["keys_evicted"] > 1000, "the feature space is 4x the capacity: keys are evicted"
    assert res["systems"]["direct-push"]["converged"]


@pytest.mark.parametrize("bad", [
    {"table": [{"name": "ads", "keys": "int64", "capacity": 64, "dim": 4}], "scheduler": {}},
    {"table": [{"name": "emb", "rows": 64, "dim": 4}], "key_space": 100},
    {"table": [{"name": "ads", "keys": "int64", "capacity": 64, "dim": 4}], "key_space": 0},
])
def test_bad_hashed_scenarios_are_refused(bad):
    d = {"scenario": {"replicas": 3}, "table": bad["table"],
         "workload": {"sparse": [{"table": bad["table"][0]["name"], "rows_per_s": 10,
                                  **({"key_space": bad["key_space"]} if "key_space" in bad else {})}]}}
    if "scheduler" in bad:
        d["scheduler"] = bad["scheduler"]
    with pytest.raises(UsageError):
        parse_scenario(d)
