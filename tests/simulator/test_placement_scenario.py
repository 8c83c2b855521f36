"""A placed model in the simulator (issue #18): each shard's rows are published to its
holder, followed at the holders only, and converge bit for bit there; per replica, the
run reports traffic and table memory against the same protocol with every shard on every
replica (``ekko-replicated``)."""

from __future__ import annotations

import dataclasses

import pytest

from ekko.core.errors import UsageError
from simulator.experiment import run_scenario
from simulator.report import summary
from simulator.scenario import load_scenario, parse_scenario


def small(mode: str, **scenario) -> dict:
    return {"scenario": {"replicas": 9, "duration_s": 4, "settle_s": 20, "mode": mode,
                         "systems": ["ekko", "ekko-replicated"], "replicas_per_shard": 1, **scenario},
            "wan": {"dcs": ["a", "b", "c"], "training_dc": "a", "rtt_ms": 40},
            "node": {"preset": "wan"},
            "table": [{"name": "emb", "rows": 8192, "dim": 16, "shards": 64},
                      {"name": "mlp", "rows": 16, "dim": 16, "dense": True}],
            "workload": {"batch_interval_s": 0.1, "sparse": [{"table": "emb", "rows_per_s": 4000}],
                         "dense": [{"table": "mlp", "period_s": 1.0}]}}


@pytest.mark.parametrize("mode", ["full", "metadata"])
def test_a_placed_model_converges_at_its_holders_with_a_third_of_the_memory_and_traffic(mode):
    res = run_scenario(parse_scenario(small(mode), "placed"))
    placed, full = res["systems"]["ekko"], res["systems"]["ekko-replicated"]
    assert placed["converged"] and full["converged"]     # bit for bit at the holders in full mode
    assert placed["unapplied_samples"] == 0 == full["unapplied_samples"]
    p, f = placed["per_replica"], full["per_replica"]
    # 3 replicas a DC, one holder a shard: values of about a third of the shards
    assert p["table_bytes_mean"] < 0.45 * f["table_bytes_mean"] and f["table_bytes_mean"] == f["table_bytes_full"]
    assert p["traffic_bytes_mean"] < 0.6 * f["traffic_bytes_mean"]
    assert "x replicated" in summary(res)


def test_the_shipped_placement_scenario_parses_and_bad_factors_are_refused():
    sc = load_scenario("placement")
    assert sc.model.replicas_per_shard == 1 and "ekko-replicated" in sc.systems
    d = small("metadata", replicas_per_shard=-1)
    with pytest.raises(UsageError, match="replicas_per_shard"):
        parse_scenario(d)
    d = small("metadata")
    d["scheduler"] = {}
    with pytest.raises(UsageError, match="placed"):
        parse_scenario(d)
    with pytest.raises(UsageError, match="partitioned"):
        run_scenario(dataclasses.replace(parse_scenario(small("metadata")), systems=["ekko"]), workers=2)
