"""The fault-injection harness: a CI batch with no violations, exact replay, and proof it can fail."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import ekko.core.store as store_mod
import p2p.sync as sync_mod
import rollback.cuts as cuts_mod
from ekko.core.errors import UsageError
from p2p.audit import RowAudit
from simulator.fault_plan import FaultConfig, FaultPlan
from simulator.faults import FaultRun, run_faults
from simulator.scenario import load_scenario

#: seeds of the CI batch: 0-10 hold every fault kind, rollbacks and both publisher
#: restarts included (about 2-4 s a seed on the shared two-core machine).
CI_SEEDS = 11
#: issue 7's fault classes only (issue 13's probabilities at 0): the seeds below replay
#: exactly what they did when their regressions were found.  Issue 13's classes have
#: their own tests (test_fault_gaps.py).
LEGACY = FaultConfig(blind_restart_prob=0.0, foreign_restart_prob=0.0, backup_restart_prob=0.0,
                     foreign_start_prob=0.0, disk_loss_prob=0.0, chain_gap_prob=0.0, chain_gap_lost_prob=0.0,
                     publisher_cut_prob=0.0)
#: the CI batch must stay well within the issue's 5 minutes on two cores.  Bounded in CPU
#: seconds of this process (about 35 s measured), which other jobs on the machine do not inflate.
CI_CPU_BOUND_S = 120


def _strip(res: dict) -> dict:
    out = json.loads(json.dumps(res))
    out.pop("wall_s", None)
    out.pop("cpu_s", None)
    for s in out.get("per_seed", []):
        s.pop("wall_s", None)
    return out


@pytest.fixture(scope="module")
def batch():
    return run_faults(CI_SEEDS, first_seed=0, faults=LEGACY)


def test_ci_batch_has_no_violations(batch):
    assert batch["seeds"] == CI_SEEDS
    assert batch["violations"] == []
    assert all(s["converged_after_s"] is not None for s in batch["per_seed"])


def test_ci_batch_injects_every_kind_of_fault(batch):
    f = batch["faults"]
    for kind in ("crash", "restart", "partition_halves", "isolate_dc", "one_way_cut", "loss_spike",
                 "messages_dropped_loss", "messages_dropped_partition", "messages_dropped_cut",
                 "messages_duplicated", "publishes",
                 "cut", "rollback", "rollback_with_replicas_down", "rollback_during_partition",
                 "publisher_crash", "publisher_restart_with_state", "publisher_restart_new_origin",
                 "publisher_acks_lost", "publish_retries_after_lost_ack"):
        assert f.get(kind, 0) > 0, kind
    assert sum(s["frames_replayed"] for s in batch["per_seed"]) > 0
    assert set(batch["invariants"]) == {"convergence", "monotonicity", "idempotence", "fence", "publisher"}
    assert batch["cpu_s"] < CI_CPU_BOUND_S


def test_publisher_restarts_keep_or_change_the_origin(batch):
    """Seed 4 loses the publisher's state (a new origin, two in all, after an applied but
    unacknowledged frame); seed 10 keeps it and re-sends the pending frame with the same
    versions to the replica that had applied it: 0 rows apply again."""
    by_seed = {s["seed"]: s for s in batch["per_seed"]}
    f4, f10 = by_seed[4]["faults"], by_seed[10]["faults"]
    assert f4["publisher_restart_new_origin"] == 1 and f4["publisher_origins"] == 2
    assert f4["publisher_acks_lost"] == 1
    assert f10["publisher_restart_with_state"] == 1 and f10["publisher_origins"] == 1
    assert f10["publish_retries_after_lost_ack"] >= 1
    assert by_seed[4]["violations"] == by_seed[10]["violations"] == []


# Regression (rollback repair, rollback/protocol.py): seed 2 restarts a replica while a
# rollback happens; it restores rows it has no history for to version 0 and its 8 repair
# requests were lost in a loss spike -- it stayed at 0 for good.  Seed 7: a truncated pull
# answer advanced knowledge past a cut version at replicas that never held the fenced
# version, so they never repaired that row.  Both converge since repair counts peers that
# answered and a peer holding an older version asks back.
def test_rollbacks_during_faults_converge(batch):
    by_seed = {s["seed"]: s for s in batch["per_seed"]}
    assert len(by_seed[2]["rollbacks"]) == 2 and by_seed[2]["faults"]["rollback_with_replicas_down"] >= 1
    assert len(by_seed[7]["rollbacks"]) == 1
    for seed in (2, 7):
        assert by_seed[seed]["violations"] == [] and by_seed[seed]["converged_after_s"] is not None


def test_a_fence_that_fences_nothing_is_caught(monkeypatch):
    """A broken fence (rolled-back versions are never refused, so nothing is restored)."""
    monkeypatch.setattr(cuts_mod.Fence, "mask", lambda self, model, table, ids, versions:
                        np.zeros(len(versions), bool))
    res = FaultRun(0, faults=LEGACY).run()
    assert res["rollbacks"]
    kinds = {v["invariant"] for v in res["violations"]}
    assert {"fence", "convergence"} <= kinds
    fence = next(v for v in res["violations"] if v["invariant"] == "fence")
    assert fence["seed"] == 0 and fence["replica"] and "row" in fence and "fenced version" in fence["detail"]


def test_a_store_reapplying_equal_versions_is_caught(monkeypatch):
    """A broken store where an equal version wins again: the publisher's retry of a frame
    whose acknowledgement was lost applies rows a second time (seed 10)."""
    orig = store_mod.TableStore.apply

    def apply_equal(self, delta, capture_old=False, **hints):
        if len(delta):
            same = self.versions[delta.ids] == delta.versions
            self.versions[delta.ids[same]] -= 1
        return orig(self, delta, capture_old, **hints)

    monkeypatch.setattr(store_mod.TableStore, "apply", apply_equal)
    res = FaultRun(10, faults=LEGACY).run()
    idem = [v for v in res["violations"] if v["invariant"] == "idempotence"]
    assert idem and any("retried publish applied" in v["detail"] for v in idem)


def test_a_seed_replays_exactly():
    assert _strip(FaultRun(4, faults=LEGACY).run()) == _strip(FaultRun(4, faults=LEGACY).run())  # publisher restart and rollback
    assert FaultPlan.draw(3, ["r0", "r1"], ["dc0", "dc1"]) != FaultPlan.draw(4, ["r0", "r1"], ["dc0", "dc1"])


def test_knowledge_past_the_cut_is_caught(monkeypatch):
    """A broken ShardSync.learn that ignores cut_below adopts knowledge of rows it never
    got: those rows are never pulled again, so replicas do not converge."""
    orig = sync_mod.ShardSync.learn
    monkeypatch.setattr(sync_mod.ShardSync, "learn",
                        lambda self, theirs, cut_below, pending=(): orig(self, theirs, None, pending))
    res = run_faults(1, first_seed=0, faults=LEGACY)
    kinds = {v["invariant"] for v in res["violations"]}
    assert "convergence" in kinds
    v = res["violations"][0]
    assert v["seed"] == 0 and v["replica"] and v["table"] and ("row" in v or "shard" in v)


def test_push_links_that_skip_the_chain_are_caught(monkeypatch):
    """A broken apply_links that jumps knowledge to a link's end without its predecessor
    claims rows that a lost push never delivered: replicas do not converge."""
    import p2p.push as push_mod

    def jump(shards, links, waiting=None):
        moved = []
        for s, origin, _after, upto in links:
            sync = shards.setdefault(s, sync_mod.ShardSync())
            if sync.knowledge.advance(origin, upto):
                moved.append(s)
        return moved

    monkeypatch.setattr(push_mod, "apply_links", jump)
    # Row audits would repair the rows later (every replica then holds the same knowledge
    # and only rows differ below it): the control shows the knowledge claimed without them.
    monkeypatch.setattr(RowAudit, "request", lambda self, partner, shards: None)
    res = run_faults(2, first_seed=0, faults=LEGACY)
    assert "convergence" in {v["invariant"] for v in res["violations"]}


def test_a_store_taking_older_versions_is_caught(monkeypatch):
    """A broken store where every incoming version wins (older ones included) makes
    rows go backwards under reordering: monotonicity (and convergence) catch it."""
    orig = store_mod.TableStore.apply

    def apply_anything(self, delta, capture_old=False, **hints):
        if len(delta):
            self.versions[delta.ids] = np.minimum(self.versions[delta.ids], delta.versions - 1)
        return orig(self, delta, capture_old, **hints)

    monkeypatch.setattr(store_mod.TableStore, "apply", apply_anything)
    res = run_faults(1, first_seed=0, faults=LEGACY)
    kinds = {v["invariant"] for v in res["violations"]}
    assert "monotonicity" in kinds
    mono = next(v for v in res["violations"] if v["invariant"] == "monotonicity")
    assert mono["seed"] == 0 and "row" in mono and "->" in mono["detail"]


def test_replayed_frames_that_change_state_are_caught(monkeypatch):
    """A node that applies a replayed publish again with fresh versions breaks idempotence."""
    run = FaultRun(1, faults=LEGACY)
    orig_replay = run._replay

    def bump_then_replay():
        n = orig_replay()
        node = run.cluster.nodes[run.node_ids[-1]]
        node.table_store("chaos", "emb").versions[5] += 1  # a replay "changed" a row
        return n

    run._replay = bump_then_replay
    res = run.run()
    assert [v["invariant"] for v in res["violations"]] == ["idempotence"]
    assert res["violations"][0]["row"] == 5


def test_cli_writes_results(tmp_path):
    out = tmp_path / "faults"
    p = subprocess.run([sys.executable, "-c", "import sys; from ekko.cli.main import main; sys.exit(main())", "sim", "faults", "--seeds", "1", "--seed", "5",
                        "--replicas", "4", "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr + p.stdout
    data = json.loads((out / "results.json").read_text())
    assert data["seeds"] == 1 and data["violations"] == [] and data["replicas"] == 4
    assert "wall_s" in data and data["faults"]["publishes"] > 0


# Regression: seed 136 crashes the ingest while it holds pending publish chains.  Before
# the fix, the lost chains left knowledge stuck below a gap on every replica, equal
# knowledge digests stopped anti-entropy, and rows whose pushes were lost never arrived.
# Fixed twice over: pending chains are part of the snapshot state, and the shard version
# mixes in the greatest version held, so replicas with equal knowledge but different
# rows still compare.
def test_seed_136_converges():
    assert FaultRun(136, faults=LEGACY).run()["violations"] == []


def test_shipped_faults_scenario_drives_the_harness(tmp_path):
    sc = load_scenario("faults")
    assert sc.seeds == 50 and sc.seed == 0 and sc.faults == FaultConfig()  # the file documents the defaults
    mine = tmp_path / "mine.toml"
    mine.write_text("[scenario]\nseeds = 1\nseed = 5\n[faults]\nreplicas = 4\nfault_phase_s = 6.0\n")
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-m", "ekko.cli.main", "sim", "run", str(mine), "--quiet", "--out", str(out)], check=False,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr + p.stdout
    data = json.loads((out / "results.json").read_text())
    assert data["seeds"] == 1 and data["first_seed"] == 5 and data["replicas"] == 4
    assert data["config"]["fault_phase_s"] == 6.0 and data["violations"] == []
    p = subprocess.run([sys.executable, "-m", "ekko.cli.main", "sim", "list"], check=False, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "faults" in p.stdout


def test_bad_fault_parameters_are_refused():
    with pytest.raises(UsageError, match="unknown keys"):
        FaultConfig.from_dict({"replica": 3})
    with pytest.raises(UsageError, match="probability"):
        FaultConfig(rollback_prob=1.5)
    with pytest.raises(UsageError, match="integer"):
        FaultConfig.from_dict({"replicas": 2.5})


# Regression (rollback/protocol.py): seed 47 rolls back twice; the second cut covers
# versions the first rollback fenced, and the undo history still held them, so the second
# restore brought a fenced version back (fence and convergence violated).  The restore now
# skips every fenced version.
def test_seed_47_second_rollback_restores_no_fenced_version():
    res = FaultRun(47, faults=LEGACY).run()
    assert len(res["rollbacks"]) == 2 and res["violations"] == []


# Regression (rollback/protocol.py, rollback/cuts.py): seed 56 restarts the publisher
# without state (a new origin) just before a rollback started at a replica that had not
# heard of that origin yet; its updates up to the rollback point were never fenced.
def test_seed_56_fences_a_publisher_origin_the_rollbacker_did_not_know():
    res = FaultRun(56, faults=LEGACY).run()
    assert res["faults"]["publisher_restart_new_origin"] == 1 and res["rollbacks"]
    assert res["violations"] == []
