"""Issue 13's fault classes in the fault harness: one focused run per bug, and proof that
each fails when the protocol rule that fixed it is taken away (monkeypatched here).

The runs use small hand-written plans (:class:`simulator.faults.FaultPlan` with chosen
episodes, 4 replicas in 2 DCs, no background loss), so each bug is met on purpose and
every run takes a few seconds.
"""

from __future__ import annotations

import sys

import numpy as np

import ekko.core.chain as chain_mod
import ekko.replica.node as node_mod
import p2p.audit as audit_mod
import p2p.gap_probe as gaps_mod
import p2p.sync as sync_mod
import rollback.cuts as cuts_mod
from ekko.core.config import NodeConfig
from simulator.fault_plan import Episode, FaultConfig, FaultPlan
from simulator.faults import FaultRun, run_faults

NODES = ["r0", "r1", "r2", "r3"]
DCS = ["dc0", "dc1"]
#: every issue-13 probability off: the runs below hold only the episodes they name.
QUIET = dict(replicas=4, dcs=2, fault_phase_s=5.0, convergence_bound_s=30.0, min_episodes=0, max_episodes=0,
             rollback_prob=0.0, second_rollback_prob=0.0, publisher_restart_prob=0.0, blind_restart_prob=0.0,
             foreign_restart_prob=0.0, backup_restart_prob=0.0, foreign_start_prob=0.0, disk_loss_prob=0.0,
             chain_gap_prob=0.0, chain_gap_lost_prob=0.0, publisher_cut_prob=0.0, max_loss=0.0,
             max_duplicate=0.0, max_reorder=0.0)


def _run(episodes: list[Episode], seed: int = 1, config: NodeConfig | None = None, **faults) -> dict:
    cfg = FaultConfig(**{**QUIET, **faults})
    plan = FaultPlan.draw(seed, NODES, DCS, cfg)
    plan.episodes = sorted(episodes, key=lambda e: (e.start, e.kind))
    return FaultRun(seed, faults=cfg, plan=plan, config=config).run()


def _kinds(res: dict) -> set[str]:
    return {v["invariant"] for v in res["violations"]}


def _no_gap_probes(monkeypatch) -> None:
    monkeypatch.setattr(gaps_mod.GapProbe, "round", lambda self, now: None)


def _no_row_audits(monkeypatch) -> None:
    """Row audits (:mod:`p2p.audit`) repair, later, rows a replica lacks below a knowledge
    every replica shares; a control of a rule that keeps knowledge honest turns them off
    too, so that the harness sees the knowledge claimed without its rows (which a cut
    taken meanwhile would trust, rule K6)."""
    monkeypatch.setattr(audit_mod.RowAudit, "request", lambda self, partner, shards: None)


# -- bug 1: a publisher whose chains point at frames this cluster never saw --------------
def test_foreign_chain_at_start_completes_knowledge():
    """A trainer restored from backup into a new cluster: its heads name counters below its
    first frame here.  Gap probes close those gaps: knowledge completes, and a rollback to
    a cut taken afterwards keeps its acknowledged rows."""
    res = _run([Episode(2.0, 1.0, "rollback", ("r1", "r2"))], foreign_start_prob=1.0)
    assert res["faults"]["publisher_start_foreign_chain"] == 1 and res["faults"]["rollback"] == 1
    assert res["violations"] == [] and res["protocol"]["gaps_closed"] > 0


def test_foreign_chain_without_gap_probes_is_caught(monkeypatch):
    _no_gap_probes(monkeypatch)
    res = _run([], foreign_start_prob=1.0)
    assert "convergence" in _kinds(res)
    assert any("knowledge of origin" in v["detail"] for v in res["violations"])


def test_foreign_chain_after_a_restart_completes_knowledge():
    """The state dir served another cluster while the publisher was away (same origin)."""
    res = _run([Episode(1.5, 0.5, "publisher_restart", ("foreign", False))])
    assert res["faults"]["publisher_restart_foreign_chain"] == 1 and res["faults"]["foreign_chain_heads"] > 0
    assert res["violations"] == []


# -- bug 2: knowledge behind after mixed faults (a link lost everywhere; pending caps) -----
GAP_LOST = [Episode(1.0, 1.5, "chain_gap", (2, True))]


def test_chain_gap_lost_with_the_ingest_disk_closes():
    """The isolated ingest acknowledges two frames and loses its disk before the heal: the
    frames after them chain on a link no replica holds.  Knowledge still reaches every
    counter published (the lost frames' included), and the rows agree everywhere."""
    res = _run(GAP_LOST)
    f = res["faults"]
    assert f["chain_gap"] == 1 and f["chain_gap_disk_loss"] == 1 and f["restart_empty"] == 1
    assert f["chain_gap_frames_at_isolated_ingest"] == 2 and f["rows_at_risk_with_lost_disk"] > 0
    assert res["violations"] == [] and res["protocol"]["gaps_closed"] > 0


def test_chain_gap_lost_without_gap_probes_is_caught(monkeypatch):
    _no_gap_probes(monkeypatch)
    res = _run(GAP_LOST)
    assert "convergence" in _kinds(res)
    assert any("knowledge of origin" in v["detail"] for v in res["violations"])


PENDING = GAP_LOST + [Episode(3.0, 1.0, "loss_spike")]


def test_pending_chains_dropped_everywhere_still_complete(monkeypatch):
    """Cap 1: shard 7's last intervals are dropped at all four replicas (knowledge stayed at
    793614, below the last counter 1254416, with nothing pending anywhere): a dropped
    interval's end stays as a gap to probe, and knowledge completes."""
    monkeypatch.setattr(sync_mod, "MAX_PENDING_CHAINS", 1)
    res = _run(PENDING, loss_spike=0.4)
    assert res["protocol"]["pending_chains_dropped"] > 0
    assert res["violations"] == []


def test_dropped_intervals_without_their_gap_are_caught(monkeypatch):
    monkeypatch.setattr(sync_mod, "MAX_PENDING_CHAINS", 1)
    monkeypatch.setattr(sync_mod.ShardSync, "gap_origins", lambda self: list(self.pending))
    res = _run(PENDING, loss_spike=0.4)
    assert "convergence" in _kinds(res)


# -- stale chains: a publisher without state, or restored from an old backup --------------
#: a chain gap: the ingest is cut off from its peers, and after one frame the publisher
#: fails over, so the ingest lacks the frame that follows; the publisher restarts from the
#: backup of its first start (no heads: every shard chained from 0) and reaches the still
#: isolated ingest again, whose knowledge is evidence that the chain is stale.
STALE = [Episode(0.2, 3.0, "chain_gap", (1, False)), Episode(0.55, 0.1, "publisher_restart", ("backup", False))]
#: the same with a backup taken after the ingest's last frame: for shards the lost-sight
#: frames touched, the ingest's knowledge equals the backup's head -- no evidence.
STALE_NO_EVIDENCE = [Episode(1.0, 3.0, "chain_gap", (1, False)),
                     Episode(2.4, 0.5, "publisher_restart", ("backup", False))]


def test_publisher_restored_from_an_old_backup_is_relinked():
    """The ingest was cut off while frames went elsewhere; the publisher comes back with a
    backup of its state from before that and publishes to the ingest.  Trusting the
    backup's heads would claim the frames the ingest lacks; the restarted publisher
    links from below its own frames instead, and the gap is probed."""
    res = _run(STALE)
    f = res["faults"]
    assert f["publisher_restart_from_backup"] == 1 and f["publisher_restart_from_empty_backup"] == 1
    # A restarted publisher never trusts its heads (PublisherChain.restart): its first frame
    # per shard carries RESTART_LINK, and the gap before it is probed and closed.
    assert f["publishes_rerouted"] > 0 and res["protocol"]["gaps_closed"] > 0
    assert res["violations"] == []


def test_stale_chain_without_evidence_at_the_ingest():
    """The backup (1.1 s) names the ingest's own last frame as head of the shards that the
    frames acknowledged elsewhere (1.3-2.3 s) touched, so the ingest has no evidence of a
    stale chain; trusting the backup's heads, it ended without 15 rows under complete
    knowledge.  PublisherChain.restart does not trust them."""
    assert _run(STALE_NO_EVIDENCE)["violations"] == []


def test_stale_chain_taken_at_its_word_is_caught(monkeypatch):
    """Both rules off -- the publisher trusts its backup's heads and the ingest does not
    relink on evidence -- and the ingest claims frames it never gets."""
    monkeypatch.setattr(chain_mod.PublisherChain, "restart",
                        classmethod(lambda cls, state, origin: cls.restore(state, origin)))
    monkeypatch.setattr(node_mod.ReplicaNode, "_checked_after",
                        lambda self, sync, origin, after, first, upto: (after, False))
    _no_row_audits(monkeypatch)
    res = _run(STALE)
    assert "convergence" in _kinds(res)


def test_trusted_heads_without_evidence_are_caught(monkeypatch):
    """The publisher trusts its backup's heads at an ingest with no evidence of staleness."""
    monkeypatch.setattr(chain_mod.PublisherChain, "restart",
                        classmethod(lambda cls, state, origin: cls.restore(state, origin)))
    _no_row_audits(monkeypatch)
    assert "convergence" in _kinds(_run(STALE_NO_EVIDENCE))


def test_publisher_restart_without_state_same_origin():
    """RESTART_LINK: the first frame per shard is linked from just below itself and the gap
    before it probed at once; the publisher's counters stay new (invariant 'publisher')."""
    res = _run([Episode(1.5, 0.5, "publisher_restart", ("same_origin", True))])
    f = res["faults"]
    assert f["publisher_restart_same_origin"] == 1 and f["publisher_origins"] == 1
    assert res["violations"] == [] and res["protocol"]["gaps_closed"] > 0


def test_restart_link_at_a_replica_that_has_not_heard_its_peers():
    """The ingest restarts (from its durable state) cut off from its peers; the publisher,
    restarted without state, publishes RESTART_LINK frames to it.  Its urgent probes
    close 7 gaps within 0.1 s with no member asked: 71 rows published while it was down
    stay missing there under complete knowledge."""
    res = _run([Episode(1.0, 1.8, "crash", ("r0",)), Episode(2.8, 1.5, "partition_halves", (("r0",),)),
                Episode(2.5, 0.4, "publisher_restart", ("same_origin", True))])
    assert res["violations"] == []


# -- bug 3: a rollback restored rows to versions older than the cut -----------------------
#: the cut-taker is cut off while frames are acknowledged elsewhere: its knowledge lags the
#: publisher's acknowledged heads when the publisher asks it for a cut.
LAGGING_CUT = [Episode(1.0, 1.5, "partition_halves", (("r1",),)), Episode(2.0, 1.5, "rollback", ("r1", "r2"))]


def test_publisher_cut_keeps_acknowledged_rows():
    res = _run(LAGGING_CUT, publisher_cut_prob=1.0)
    assert res["faults"]["publisher_cut"] == 1 and res["faults"]["rollback"] == 1
    assert res["violations"] == []


def test_publisher_cut_that_does_not_wait_is_caught(monkeypatch):
    monkeypatch.setattr(node_mod.ReplicaNode, "uncovered", lambda self, model, origin, heads: [])
    res = _run(LAGGING_CUT, publisher_cut_prob=1.0)
    assert "convergence" in _kinds(res)


# -- bug 4: an empty replica pulls from a peer that has not applied a rollback yet ---------
def _pull_fence_removed(monkeypatch) -> None:
    """Fence.mask answers 'nothing fenced' to the pull-answer rule only (the apply path
    still drops fenced rows): the requester adopts the peer's knowledge past them."""
    orig = cuts_mod.Fence.mask

    def mask(self, model, table, ids, versions):
        if sys._getframe(1).f_code.co_name == "on_pull_response":
            return np.zeros(len(versions), bool)
        return orig(self, model, table, ids, versions)

    monkeypatch.setattr(cuts_mod.Fence, "mask", mask)


# -- the default parameters: every new class in a few seeds ------------------------------
#: seeds whose plans hold, together, every issue-13 class: 6 (chain gap with disk loss, a
#: disk loss, a foreign restart), 10 (backup, foreign and same-origin restarts, a disk
#: loss), 15 (chain gap with disk loss, same-origin restart), 17 (foreign start).
DEFAULT_SEEDS = (6, 10, 15, 17)


def test_default_seeds_inject_the_new_classes_without_violations():
    per = [run_faults(1, first_seed=s)["per_seed"][0] for s in DEFAULT_SEEDS]
    assert [v for r in per for v in r["violations"]] == []
    total: dict[str, int] = {}
    for r in per:
        for k, v in r["faults"].items():
            total[k] = total.get(k, 0) + v
    for kind in ("publisher_restart_same_origin", "publisher_restart_foreign_chain", "publisher_restart_from_backup",
                 "publisher_start_foreign_chain", "disk_loss", "restart_empty", "chain_gap", "chain_gap_disk_loss",
                 "publisher_cut"):
        assert total.get(kind, 0) > 0, kind
    assert sum(r["protocol"]["gaps_closed"] for r in per) > 0


# -- protocol bugs the new classes found (reported; xfail until fixed) --------------------
def test_seed_7_rollback_restores_a_row_held_above_the_cut():
    """Seed 7: the isolated ingest r0 acknowledges row 28 at counter 537602 (chain gap);
    the failed-over publisher overwrites it elsewhere at 742401, which r0 pulls at 4.48 s;
    the cut r0 takes at 7.06 s covers 537602, not 742401.  The rollback at 8.62 s fences
    742401; r0's history from before the cut was released, so every replica ends at 0."""
    assert FaultRun(7).run()["violations"] == []
