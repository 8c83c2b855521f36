"""Fault-injection harness (issue 7): seeded chaos runs of the real node code, invariants checked.

``ekko sim faults --seeds N [--seed S] [--replicas R] --out DIR`` runs N scenarios
(seeds S, S+1, ...).  Each one drives real :class:`ekko.replica.node.ReplicaNode` objects in
full mode (real values) through :class:`simulator.replicas.SimCluster` on a
:class:`simulator.network.WanNetwork` of :attr:`FaultConfig.dcs` data centres, with a
small model (:data:`SPEC`: a sparse, a dense and a hashed table).  Everything below is drawn
from the seed, so a failing seed replays exactly with ``--seed S --seeds 1``.  The
parameters are the fields of :class:`FaultConfig`; the shipped scenario
``simulator/scenarios/faults.toml`` sets them (``ekko sim run faults``).

Injected (per seed, during the first :attr:`FaultConfig.fault_phase_s` simulated seconds):

* message loss (a background probability and timed loss spikes), duplication, and
  reordering with delay spikes of up to :attr:`FaultConfig.max_reorder_delay_ms`;
* partitions: random halves of the replicas, one DC isolated, and a one-way cut
  between two DCs, each for a few seconds;
* replica crashes and restarts: at crash time the node's durable state is taken
  (``export_state`` + a copy of its store, what a snapshot at shutdown holds); the
  restart builds a *new* :class:`ReplicaNode` (higher incarnation, fresh rng) and
  installs that state with :meth:`ReplicaNode.import_state`, as the daemon does;
* a publisher (:class:`ekko.core.chain.PublisherChain`) publishing every
  :attr:`FaultConfig.publish_interval_s` to the ingest replica, or to another live
  replica (same chain) while the ingest is down.  A frame counts as acknowledged when
  ``publish`` returned; a refused frame is retried, like the SDK does;
* publisher restarts: the publisher goes down for a while, sometimes right after a
  replica applied its frame but before the acknowledgement arrived (the frame stays
  pending).  It comes back in one of five modes (:data:`RESTART_MODES`):

  - ``state``: keeps the persisted state (the SDK's ``<origin>.json`` =
    :meth:`PublisherChain.state` and ``<origin>.pending``, both serialized and read
    back): same origin, the pending frame re-sent first with the same versions;
  - ``new_origin``: lost it and takes a *new* origin;
  - ``same_origin``: lost it and keeps its origin, as the SDK without its state dir
    does (``PublisherChain.restore(None, origin, history_known=False)``, a fresh
    :class:`HybridClock`): its first frame per shard carries ``RESTART_LINK`` and the
    ingest probes the gap before it at once.  The fresh clock starts at the wall time,
    above every counter the origin handed out unless its HLC ran ahead of the wall
    clock; the harness then floors it (counted as ``publisher_clock_floored``, never
    seen with these rates) -- an SDK without state could not, and the rule that
    counters are never handed out twice is the SDK's to keep, not the replicas';
  - ``foreign``: its state dir was used against another cluster meanwhile (same
    origin): the heads of a random set of shards point at counters handed out there,
    which this cluster never sees (bug 1 of issue 13);
  - ``backup``: restored from an older backup of its state (taken every
    :data:`BACKUP_INTERVAL_S`, or the empty state of its first start): a *stale*
    chain, heads behind what this cluster holds, which the ingest must relink.

  With :attr:`FaultConfig.foreign_start_prob` the first publisher also *starts* with
  a foreign state (a trainer restored from backup into a new cluster);
* replicas lost with their disk (``disk_loss``): a crash whose restart comes back with
  an empty store and no protocol state (a new data dir: no knowledge, pending chains,
  cuts or rollbacks; higher incarnation; the model registered again, as the operator
  or the catalog gossip does), only while another replica stays up.  Frames only it
  held are genuinely lost (see the reference model below);
* chain gaps (``chain_gap``): the ingest is cut off from every peer while the
  publisher still reaches it for 1-4 frames; then the publisher fails over to other
  replicas, whose frames chain on frames they never got, for the rest of the episode.
  In :attr:`FaultConfig.chain_gap_lost_prob` of them the ingest also loses its disk
  before the heal: its frames are lost everywhere and only gap probes
  (:mod:`p2p.gaps`) can close the gap (bug 2 of issue 13);
* rollbacks: a cut is taken at a random replica (``take_cut``, broadcast) -- in
  :attr:`FaultConfig.publisher_cut_prob` of them by the publisher, as ``Publisher.cut``
  does: the replica first waits (up to :data:`PUBLISHER_CUT_WAIT_S`) until its knowledge
  covers every head the publisher had acknowledged, and the reference model's cut
  keeps those frames (bug 3 of issue 13: a rollback reverted acknowledged rows) -- and a
  moment later a random live replica that knows the cut rolls the model back to it
  (``rollback``, the rollback point being its clock as an HLC counter, as the daemon
  does), often while a partition or a crash is active, so some replicas learn of it
  only from gossip or after their restart.

The pull answer budget is made small (:attr:`FaultConfig.pull_response_bytes`) so that
truncated answers (``cut_below``) are exercised, not only the happy path.

The harness keeps its own **reference model**, the trainer-side truth: every frame a
replica accepted (its rows, versions and values), the origins each publisher
incarnation used, and for each rollback the cut's knowledge (the cut's definition)
and the rollback point the harness chose, and which row versions a lost disk may have
taken.  A version is *fenced* when its counter is
above the cut's knowledge of its (table, shard, origin) and at most the rollback
point, for every origin that had published; the expected state of a row is its
greatest published version that no rollback fenced (the state at the cut plus what
was published after the rollback).  When a replica loses its disk, each row's
version there ``l`` is compared with the greatest version ``h`` any other replica holds
(live, or down with its durable state): the versions in ``(h, l]`` (or ``l`` alone
when older but held nowhere else) *may be lost* -- a message in flight may still
deliver them.  Replay frames recorded before such a loss are dropped (a replay could
resurrect what the cluster lost).  Nothing of the model is read from a replica but
these holdings at the moment of a loss.

Then every fault stops (heal, loss 0, every crashed replica and the publisher
restarted; duplication and reordering stay on) and the harness checks:

1. convergence: within :attr:`FaultConfig.convergence_bound_s` simulated seconds every
   replica holds bit-identical versions and values to the expected state (a hashed
   table's keys included: its key map finds every expected key in its slot), and its
   knowledge of every shard covers every counter each origin published there (frames
   lost with a disk included when a later frame links on them: closing such gaps is
   what gap probes are for; a frame lost at the tail of an origin's chain in a shard
   is known to no replica and is left out, as are rolled-back versions, which later
   frames link past).  A row
   whose expected version may have been lost may end at any accepted, unfenced
   version between the expected state without the lost versions and the expected
   state -- the same version, with its value, at every replica;
2. no lost acknowledged update: implied by 1 (the expected state holds every
   acknowledged frame; a publisher restart loses none);
3. monotonicity: every :data:`SAMPLE_INTERVAL_S`, and right after each restart, each
   replica's per-row versions and per-shard knowledge are compared with its previous
   sample (kept across restarts by node id): nothing may go backwards, except a row
   whose previous version a rollback the replica has applied fenced (a replica lost
   with its disk starts its samples afresh);
4. idempotence: a random subset (up to :data:`REPLAY_FRAMES`) of frames delivered
   during the run, publishes and rollbacks included, is delivered again to the same
   replicas; after :data:`REPLAY_QUIET_S` seconds, versions, values and knowledge must
   be unchanged.  A publisher retrying a frame its replica already applied must see
   0 rows applied;
5. fence: once a replica has applied a rollback (tracked by node id, across its
   restarts; a replica lost with its disk must learn it again), no apply there and no
   sample of its rows may show a version that rollback fenced;
6. publisher: after a restart with state, the pending frame goes out with the very
   versions it had, and new counters exceed every counter the origin handed out.

Each violation names the seed, the invariant and the first divergence (replica,
table, row or shard).  What is not injected: corrupt or malicious frames (design
invariant 6), loss of replica state since the last snapshot (a crash here keeps the
state of the moment it crashed, a disk loss all of it), and clock skew.

Per seed, ``faults`` counts every fault injected (the new classes as
``publisher_restart_same_origin``, ``publisher_restart_foreign_chain``,
``publisher_restart_from_backup``, ``publisher_start_foreign_chain``, ``disk_loss``,
``restart_empty``, ``chain_gap``, ``chain_gap_disk_loss``, ``rows_maybe_lost`` /
``rows_lost``, ...), and ``protocol`` sums the node counters that show the rules ran
(:data:`PROTOCOL_COUNTERS`: gap probes and closed gaps, relinked stale chains, fenced
pull rows, row audits and the rows repairs pushed on; pending chain intervals dropped
at the cap).
"""


from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from ekko.core.codec import MsgType
from ekko.core.config import NodeConfig
from ekko.core.errors import ProtocolError, UsageError
from ekko.core.store import ModelStore
from ekko.core.version import HLC_LOGICAL_BITS
from ekko.replica.node import ReplicaNode
from rollback.cuts import Cut
from simulator.events import Simulation
from simulator.fault_checks import InvariantChecker, Violation
from simulator.fault_plan import (
    CONVERGENCE_BOUND_S,
    DEFAULT_CONFIG,
    DEFAULT_REPLICAS,
    EPISODE_KINDS,
    EXTRA_KINDS,
    FAULT_PHASE_S,
    INVARIANTS,
    LOSS_KINDS,
    NUM_DCS,
    RESTART_MODES,
    Episode,
    FaultConfig,
    FaultPlan,
    FaultScenario,
    RefRollback,
    parse_fault_scenario,
)
from simulator.fault_publisher import BACKUP_INTERVAL_S, PUBLISHER_ORIGIN, FaultPublisher, restart_mode
from simulator.fault_reference import MODEL_NAME, SPEC, ReferenceModel
from simulator.network import WanNetwork
from simulator.wan_config import WanConfig
from simulator.replicas import SimCluster

#: step at which convergence is checked after the faults stop.
CHECK_STEP_S = 0.5
#: seconds between monotonicity and fence samples.
SAMPLE_INTERVAL_S = 0.25
#: delivered frames kept (reservoir sample) for the idempotence replay.
REPLAY_FRAMES = 300
#: simulated seconds run before and after the replay (state compared across it).
REPLAY_QUIET_S = 3.0
#: longest the harness lets a publisher's cut wait for the replica's knowledge to cover
#: its acknowledged heads (the daemon allows MAX_CUT_WAIT_S = 60 s; a trainer retries
#: a cut that failed), and how often it looks again (the daemon's CUT_WAIT_POLL_S).
PUBLISHER_CUT_WAIT_S = 5.0
CUT_WAIT_POLL_S = 0.02
#: node counters summed per seed (``protocol`` in the results): evidence that the rules
#: for gaps, stale chains and fenced pulls ran.
PROTOCOL_COUNTERS = ("gap_probes_sent", "gaps_closed", "stale_chains", "pull_fenced_rows", "fenced_rows",
                     "audits_sent", "audited_shards", "audit_rows_compared", "repaired_rows_pushed")

__all__ = ["BACKUP_INTERVAL_S", "CONVERGENCE_BOUND_S", "DEFAULT_CONFIG", "DEFAULT_REPLICAS", "EPISODE_KINDS", "EXTRA_KINDS",
           "FAULT_PHASE_S", "INVARIANTS", "LOSS_KINDS", "NUM_DCS", "RESTART_MODES", "Episode", "FaultConfig", "FaultPlan", "FaultRun",
           "FaultScenario", "PUBLISHER_ORIGIN", "RefRollback", "Violation", "parse_fault_scenario", "run_faults"]


class _RecordingCluster(SimCluster):
    """A :class:`SimCluster` that keeps a reservoir sample of delivered frames."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.replay_log: list[tuple[str, str, Any]] = []
        self.delivered_frames = 0
        self._replay_rng = self.sim.derive_rng("replay-log")

    def keep(self, item: tuple[str, str, Any]) -> None:
        self.delivered_frames += 1
        if len(self.replay_log) < REPLAY_FRAMES:
            self.replay_log.append(item)
        else:
            j = self._replay_rng.randrange(self.delivered_frames)
            if j < REPLAY_FRAMES:
                self.replay_log[j] = item

    def _deliver(self, src: str, dst: str, payload: tuple[MsgType, dict[str, Any], int]) -> None:
        self.keep((src, dst, payload))
        super()._deliver(src, dst, payload)


class FaultRun:
    """One seeded chaos scenario: build, inject, heal, check.

    The driver: it injects the plan's faults into the cluster and heals them; the
    publisher (:class:`FaultPublisher`), the reference model (:class:`ReferenceModel`)
    and the invariant checks (:class:`InvariantChecker`) are objects it holds.

    Example:
        >>> r = FaultRun(seed=1).run()        # doctest: +SKIP
        >>> r["violations"]                   # doctest: +SKIP
        []
    """

    def __init__(self, seed: int, replicas: int | None = None, config: NodeConfig | None = None,
                 faults: FaultConfig | None = None, plan: FaultPlan | None = None) -> None:
        cfg = faults or DEFAULT_CONFIG
        if replicas is not None and replicas != cfg.replicas:
            cfg = FaultConfig(**{**asdict(cfg), "replicas": replicas})
        self.cfg = cfg
        self.seed = seed
        self.sim = Simulation(seed)
        self.dcs = [f"dc{i}" for i in range(min(cfg.dcs, cfg.replicas))]
        self.node_ids = [f"r{i}" for i in range(cfg.replicas)]
        self.node_dc = {n: self.dcs[i % len(self.dcs)] for i, n in enumerate(self.node_ids)}
        self.plan = plan if plan is not None else FaultPlan.draw(seed, self.node_ids, self.dcs, cfg)
        wan = WanConfig(self.dcs, rtt_ms=self.plan.rtt_ms, loss=self.plan.loss, duplicate=self.plan.duplicate,
                        reorder=self.plan.reorder, reorder_delay_ms=self.plan.reorder_delay_ms, jitter_ms=5.0)
        self.net = WanNetwork(self.sim, wan)
        self.config = config or NodeConfig(pull_response_bytes=cfg.pull_response_bytes)
        self.cluster = _RecordingCluster(self.sim, self.net, self.config, with_values=True)
        for n in self.node_ids:
            self.cluster.add_replica(n, self.node_dc[n])
        self.cluster.bootstrap_membership()
        self.cluster.register_everywhere(SPEC)
        # The trainer-side truth, and the checks against it (invariant 5 on every apply).
        self.ref = ReferenceModel()
        self.checks = InvariantChecker(seed, self.sim, self.cluster, self.ref, self.node_ids)
        self.cluster.on_apply.append(self.checks.on_apply)
        self.ingest = self.node_ids[0]
        self.rng = self.sim.derive_rng("harness")
        self.faults: Counter[str] = Counter()
        # Draws for foreign and backup states: their own stream, so the other draws keep theirs.
        self.chain_rng = self.sim.derive_rng("publisher-states")
        self.disk_losses: Counter[str] = Counter()  # node id -> disk losses so far
        self.pub = FaultPublisher(self.sim, self.cluster, cfg, self.ingest, self.rng, self.chain_rng, self.faults,
                                  self.checks, self.ref, self.disk_losses, foreign_start=self.plan.foreign_start)
        self.cuts: dict[str, Cut] = {}
        self.cut_cover: dict[str, dict[tuple[str, int], dict[int, int]]] = {}   # publisher cuts: acked heads
        # -- lost disks
        self.lost_down: set[str] = set()           # down with their disk lost: they come back empty
        self.retired: Counter[str] = Counter()      # protocol counters of replaced node objects
        self._flex: dict[str, dict[int, dict[int, np.ndarray]]] = {}
        self.restarts: Counter[str] = Counter()
        self.active: Counter[str] = Counter()

    # -- rollbacks ---------------------------------------------------------------------
    def _take_cut(self, e: Episode) -> None:
        live = self.cluster.live()
        taker = e.args[0] if e.args[0] in live else self.rng.choice(live)
        if self.pub.chain is not None and self.cfg.publisher_cut_prob and \
                self.chain_rng.random() < self.cfg.publisher_cut_prob:
            # The publisher takes it (Publisher.cut): the replica waits until its knowledge
            # covers every head the publisher had acknowledged, as the daemon does.
            heads = [(t, s, c) for (m, t, s), c in sorted(self.pub.chain.heads.items()) if m == MODEL_NAME]
            self._publisher_cut(e, taker, self.pub.chain.origin, heads, self.sim.now)
            return
        self._cut_now(e, taker, None)

    def _publisher_cut(self, e: Episode, taker: str, origin: int, heads: list[tuple[str, int, int]],
                       since: float) -> None:
        if taker not in self.cluster.live() or self.sim.now - since > PUBLISHER_CUT_WAIT_S:
            self.faults["publisher_cut_failed"] += 1   # the request fails; the trainer would retry
            return
        if self.cluster.nodes[taker].uncovered(MODEL_NAME, origin, heads):
            self.sim.schedule(CUT_WAIT_POLL_S, self._publisher_cut, e, taker, origin, heads, since)
            return
        self.faults["publisher_cut"] += 1
        self._cut_now(e, taker, (origin, heads))

    def _cut_now(self, e: Episode, taker: str, cover: tuple[int, list[tuple[str, int, int]]] | None) -> None:
        name = f"cut{len(self.cuts)}"
        self.cuts[name] = self.cluster.call(taker, "take_cut", MODEL_NAME, name, self.sim.now)
        if cover is not None:
            # Reference model: a publisher's cut keeps every frame it had acknowledged.
            origin, heads = cover
            self.cut_cover[name] = {(t, s): {origin: c} for t, s, c in heads}
        self.faults["cut"] += 1
        self.sim.schedule(e.length, self._rollback, name, taker, e.args[1] if len(e.args) > 1 else None)

    def _rollback(self, name: str, taker: str, prefer: str | None = None) -> None:
        live = self.cluster.live()
        knows = []
        for n in live:
            try:
                self.cluster.nodes[n].cuts.get(MODEL_NAME, name)
                knows.append(n)
            except UsageError:
                pass
        if not knows:
            self.faults["rollback_skipped_cut_unknown"] += 1
            return
        who = prefer if prefer in knows else self.rng.choice(knows)
        ms = int(self.sim.now * 1000)
        until = (max(1, ms) << HLC_LOGICAL_BITS) | ((1 << HLC_LOGICAL_BITS) - 1)
        cut = self.cuts[name]
        lower = {k: dict(v.items()) for k, v in cut.knowledge.items()}
        for k, heads in self.cut_cover.get(name, {}).items():
            for o, c in heads.items():
                lower.setdefault(k, {})[o] = max(lower.get(k, {}).get(o, 0), c)
        ref = RefRollback(f"{who}.{MODEL_NAME}.{name}.{until}", name, lower, until,
                          frozenset(self.pub.origins_used), self.sim.now)
        record = self.cluster.call(who, "rollback", MODEL_NAME, name, until, self.sim.now)
        if record["id"] != ref.rid:
            raise RuntimeError(f"rollback record id {record['id']} is not {ref.rid}")
        self.ref.rollbacks.append(ref)
        self.faults["rollback"] += 1
        down = len(self.node_ids) - len(live)
        if down:
            self.faults["rollback_with_replicas_down"] += 1
        if self.active["partition"] or self.active["one_way_cut"]:
            self.faults["rollback_during_partition"] += 1
        if who != taker:
            self.faults["rollback_at_other_replica"] += 1

    # -- replica faults ------------------------------------------------------------------
    def _crash(self, nid: str, length: float, lose_disk: bool = False) -> None:
        live = self.cluster.live()
        if nid not in live or len(self.node_ids) - len(live) >= self.cfg.max_down or len(live) <= 1:
            self.faults["disk_loss_skipped" if lose_disk else "crash_skipped"] += 1
            return
        node = self.cluster.nodes[nid]
        self.checks.sample(nid)
        if lose_disk and any(r.rid in node.rollbacks and not any(
                r.rid in self.cluster.nodes[n].rollbacks for n in self.node_ids if n != nid and n not in self.lost_down)
                for r in self.ref.rollbacks):
            # The only replica holding a rollback record: losing it would lose the rollback
            # (the reference model does not follow a rollback that may or may not exist).
            self.faults["disk_loss_skipped_sole_rollback_holder"] += 1
            return
        if lose_disk:
            # Lost with its disk: it comes back empty (a new data dir).  Whatever only it held
            # is gone -- the reference model notes those row versions as possibly lost.
            self._mark_lost(nid)
            self.cluster.crash(nid)
            self.lost_down.add(nid)
            self.disk_losses[nid] += 1
            if self.pub.pending_target == nid:
                self.pub.pending_target = None   # a retry there applies the frame anew: not a replay
            self.faults["disk_loss"] += 1
            if nid == self.ingest:
                self.faults["disk_loss_of_ingest"] += 1
            self.sim.schedule(length, self._restart, nid, None)
            return
        durable = (node.models[MODEL_NAME].store.copy(), node.export_state(MODEL_NAME),
                   node.members.me.incarnation)
        self.cluster.crash(nid)
        self.faults["crash"] += 1
        self.sim.schedule(length, self._restart, nid, durable)

    def _restart(self, nid: str, durable: tuple[ModelStore, dict[str, Any], int] | None) -> None:
        if self.net.is_up(nid):
            return
        old = self.cluster.nodes[nid]
        self._retire(old)
        self.restarts[nid] += 1
        empty = durable is None or nid in self.lost_down
        incarnation = old.members.me.incarnation   # (a daemon takes time_ns(): higher, state or not)
        node = ReplicaNode(nid, self.node_dc[nid], nid, config=self.config,
                           rng=self.sim.derive_rng(f"node/{nid}/restart{self.restarts[nid]}"), now=self.sim.now,
                           incarnation=incarnation + 1, seeds=[n for n in self.node_ids if n != nid], device="cpu",
                           with_values=True)
        if empty:
            # A new data dir: no rows, no knowledge, no cuts or rollbacks.  The model comes back as
            # the operator (or the catalog gossip) registers it; everything else from peers.
            node.register_model(SPEC, self.sim.now)
            self.lost_down.discard(nid)
            self.checks.seen_rollbacks[nid] = set()
            self.checks.samples.pop(nid, None)
            self.faults["restart_empty"] += 1
        else:
            assert durable is not None
            store, state, _ = durable
            node.import_state(SPEC, store, state, self.sim.now)
            self.faults["restart"] += 1
        self.cluster.restart(nid, node)
        self.checks.sample(nid)

    def _retire(self, node: ReplicaNode) -> None:
        """Keep the protocol counters of a node object about to be replaced."""
        for k in PROTOCOL_COUNTERS:
            self.retired[k] += int(node.counters.get(k, 0))
        m = node.models.get(MODEL_NAME)
        if m is not None:
            self.retired["pending_chains_dropped"] += sum(sync.dropped for shards in m.shards.values()
                                                          for sync in shards.values())

    def _protocol(self) -> dict[str, int]:
        out = Counter(self.retired)
        for nid in self.node_ids:
            node = self.cluster.nodes[nid]
            for k in PROTOCOL_COUNTERS:
                out[k] += int(node.counters.get(k, 0))
            m = node.models.get(MODEL_NAME)
            if m is not None:
                out["pending_chains_dropped"] += sum(sync.dropped for shards in m.shards.values()
                                                     for sync in shards.values())
        return {k: out[k] for k in (*PROTOCOL_COUNTERS, "pending_chains_dropped")}

    def _mark_lost(self, nid: str) -> None:
        """Reference model: the row versions only ``nid`` holds may be lost with its disk
        (:meth:`ReferenceModel.mark_lost`)."""
        holders = [self.cluster.nodes[n] for n in self.node_ids if n != nid and n not in self.lost_down]
        at_risk = self.ref.mark_lost(self.cluster.nodes[nid], holders)
        if at_risk:
            self.faults["rows_at_risk_with_lost_disk"] += at_risk
            # A replay of a frame delivered before the loss could bring back a version the
            # cluster lost for good: that is not a replay of anything the cluster still holds.
            self.faults["replay_frames_dropped_at_disk_loss"] += len(self.cluster.replay_log)
            self.cluster.replay_log.clear()

    # -- chain gaps and network faults ---------------------------------------------------
    def _chain_gap(self, e: Episode) -> None:
        """The ingest is cut off from every peer while the publisher still reaches it for
        ``frames`` more frames; then the publisher fails over to other replicas, whose
        frames chain on ones they never got (a gap at each of them until the heal)."""
        frames, _ = e.args
        if self.ingest not in self.cluster.live() or self.pub.avoid is not None:
            self.faults["chain_gap_skipped"] += 1
            return
        self.faults["chain_gap"] += 1
        self.net.heal()
        self.net.partition([[self.ingest]])
        self.active["partition"] += 1
        self.pub.avoid = self.ingest
        self.pub.gap_frames_left = int(frames)
        self.sim.schedule(e.length, self._chain_gap_end, e)

    def _chain_gap_end(self, e: Episode) -> None:
        _, lose_disk = e.args
        if lose_disk and self.pub.avoid in self.cluster.live():
            # Lost with its disk before the heal: the frames only it acknowledged are lost
            # everywhere, and only gap probes can close the gap they leave.
            self.faults["chain_gap_disk_loss"] += 1
            self._crash(self.pub.avoid, 1.0, lose_disk=True)
        self.pub.avoid = None
        self.pub.gap_frames_left = 0
        self.net.heal()
        self.active["partition"] = 0

    def _start(self, e: Episode) -> None:
        if e.kind == "crash":
            self._crash(e.args[0], e.length)
            return
        if e.kind == "disk_loss":
            self._crash(e.args[0], e.length, lose_disk=True)
            return
        if e.kind == "chain_gap":
            self._chain_gap(e)
            return
        if e.kind == "rollback":
            self._take_cut(e)
            return
        if e.kind == "publisher_restart":
            self.pub.crash(e)
            return
        self.faults[e.kind] += 1
        if e.kind == "partition_halves":
            self.net.heal()
            self.net.partition([list(e.args[0])])
            self.active["partition"] += 1
        elif e.kind == "isolate_dc":
            self.net.heal()
            self.net.partition([[e.args[0]]])
            self.active["partition"] += 1
        elif e.kind == "one_way_cut":
            self.net.cut(*e.args)
            self.active["one_way_cut"] += 1
        elif e.kind == "loss_spike":
            self.net.set_loss(self.cfg.loss_spike)
        self.sim.schedule(e.length, self._end, e)

    def _end(self, e: Episode) -> None:
        if e.kind == "loss_spike":
            self.net.set_loss(self.plan.loss)
        elif e.kind == "one_way_cut":
            self.net.uncut(*e.args)
            self.active["one_way_cut"] -= 1
        else:
            self.net.heal()
            self.active["partition"] = 0

    def _stop_faults(self) -> None:
        self.net.heal()
        self.net.set_loss(0.0)

    # -- checks ------------------------------------------------------------------------
    def expected(self, without_lost: bool = False) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """The reference state (:meth:`ReferenceModel.expected`)."""
        return self.ref.expected(without_lost)

    def _replay(self) -> int:
        """Deliver a random subset of recorded frames again; returns how many."""
        log = self.cluster.replay_log
        picked = self.rng.sample(log, self.rng.randint(len(log) // 2, len(log))) if log else []
        for src, dst, payload in picked:
            msg_type, body = payload[:2]   # (type, body, wire size): SimCluster.flush
            if msg_type == MsgType.PUBLISH:
                try:
                    self.cluster.call(dst, "publish", body, self.sim.now)
                except (ProtocolError, UsageError):
                    self.faults["replayed_publish_refused"] += 1
            else:
                self.cluster._deliver(src, dst, payload)
        return len(picked)

    # -- driver ------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Run the scenario; returns this seed's summary (``violations`` as dicts)."""
        wall0 = time.perf_counter()
        sim = self.sim
        phase = self.cfg.fault_phase_s
        for e in self.plan.episodes:
            sim.schedule_at(e.start, self._start, e)
        interval = self.cfg.publish_interval_s
        publishing = sim.every(interval, self.pub.publish, start=interval / 2)
        sampling = sim.every(SAMPLE_INTERVAL_S, self.checks.sample_all, start=SAMPLE_INTERVAL_S / 3)
        sim.run(until=phase)
        publishing.cancel()
        if self.pub.chain is None:  # the publisher is still down: it comes back now
            sim.schedule(0.0, self.pub.restart, self._final_restart_mode())
            sim.run(until=sim.now + 1e-6)
        while self.pub.pending is not None:  # the last frame: retry until acknowledged
            self.pub.publish()
        self._stop_faults()
        # Restart whoever is still down (their pending restarts become no-ops).
        for nid in self.node_ids:
            if not self.net.is_up(nid):
                sim.schedule(0.0, self._restart_now, nid)
        sim.run(until=sim.now + 1e-6)
        end = phase + self.cfg.convergence_bound_s
        converged_after = None
        seen: tuple[int, int] | None = None
        while True:
            # A rollback scheduled inside the fault phase may fire after it ends: the
            # expected state follows the reference whenever it changed.
            if seen != (len(self.ref.rollbacks), len(self.ref.frames)):
                seen = (len(self.ref.rollbacks), len(self.ref.frames))
                want = self.expected()
                self._flex = self.ref.maybe_lost(want)
                heads = self.ref.heads()
            div = self.checks.divergence(want, heads, self._flex)
            if div is None:
                converged_after = sim.now - phase
                break
            if sim.now >= end:
                nid, where = div
                where["detail"] = (f"not converged {self.cfg.convergence_bound_s:g} s after faults stopped: "
                                   f"{where['detail']}")
                self.checks.violate("convergence", nid, **where)
                break
            sim.run(until=min(end, sim.now + CHECK_STEP_S))
        replayed = 0
        if converged_after is not None:
            sim.run(until=sim.now + REPLAY_QUIET_S)
            before = self.checks.state()
            replayed = self._replay()
            sim.run(until=sim.now + REPLAY_QUIET_S)
            self.checks.compare(before, self.checks.state())
        sampling.cancel()
        self.checks.sample_all()
        self.faults["frames_accepted"] = len(self.ref.frames)
        self.faults["publisher_origins"] = len(self.pub.origins_used)
        if self._flex:
            rows = [(t, r) for t, per in self._flex.items() for r in per]
            self.faults["rows_maybe_lost"] = len(rows)
            fin = {t.name: self.cluster.nodes[self.node_ids[0]].table_store(MODEL_NAME, t.name).versions
                   for t in SPEC.tables}
            self.faults["rows_lost"] = sum(int(fin[t][r]) < int(want[0][t][r]) for t, r in rows)
        return {"seed": self.seed, "converged_after_s": converged_after, "faults": dict(sorted(self.faults.items())),
                "protocol": self._protocol(),
                "frames_delivered": self.cluster.delivered_frames, "frames_replayed": replayed,
                "messages_dropped": dict(self.net.dropped), "duplicated": self.net.duplicated,
                "rejected": dict(self.cluster.rejected), "events": sim.events,
                "rollbacks": [{"id": r.rid, "cut": r.cut, "at": round(r.at, 6)} for r in self.ref.rollbacks],
                "violations": [v.to_dict() for v in self.checks.violations.values()],
                "wall_s": time.perf_counter() - wall0}

    def _final_restart_mode(self) -> str:
        """How the publisher restart still due at the end of the fault phase comes back."""
        last = [e for e in self.plan.episodes if e.kind == "publisher_restart" and e.start <= self.pub.down_at]
        return restart_mode(last[-1].args[0]) if last else "state"

    def _restart_now(self, nid: str) -> None:
        node = self.cluster.nodes[nid]
        if nid in self.lost_down:
            self._restart(nid, None)
            return
        # The crashed object still holds exactly what it held at the crash.
        self._restart(nid, (node.models[MODEL_NAME].store.copy(), node.export_state(MODEL_NAME),
                            node.members.me.incarnation))


def run_faults(seeds: int, first_seed: int = 0, replicas: int | None = None,
               out: Path | str | None = None, config: NodeConfig | None = None,
               faults: FaultConfig | None = None, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Run ``seeds`` scenarios from ``first_seed``; write ``results.json`` under ``out``.

    ``progress(done)`` is called after each seed.

    Example:
        >>> res = run_faults(1, first_seed=4)     # doctest: +SKIP
        >>> res["seeds"], res["violations"]       # doctest: +SKIP
        (1, [])
    """
    if seeds < 1:
        raise UsageError("--seeds must be >= 1")
    cfg = faults or DEFAULT_CONFIG
    if replicas is not None and replicas != cfg.replicas:
        cfg = FaultConfig(**{**asdict(cfg), "replicas": replicas})
    wall0, cpu0 = time.perf_counter(), time.process_time()
    per_seed = []
    for s in range(first_seed, first_seed + seeds):
        per_seed.append(FaultRun(s, config=config, faults=cfg).run())
        if progress is not None:
            progress(len(per_seed))
    totals: Counter[str] = Counter()
    protocol: Counter[str] = Counter()
    for r in per_seed:
        protocol.update(r["protocol"])
        totals.update(r["faults"])
        totals.update({"messages_duplicated": r["duplicated"]})
        totals.update({f"messages_dropped_{k}": v for k, v in r["messages_dropped"].items()})
    conv = [r["converged_after_s"] for r in per_seed if r["converged_after_s"] is not None]
    result = {"seeds": seeds, "first_seed": first_seed, "replicas": cfg.replicas, "dcs": min(cfg.dcs, cfg.replicas),
              "convergence_bound_s": cfg.convergence_bound_s, "fault_phase_s": cfg.fault_phase_s,
              "config": asdict(cfg), "invariants": list(INVARIANTS),
              "violations": [v for r in per_seed for v in r["violations"]],
              "faults": dict(sorted(totals.items())), "protocol": dict(sorted(protocol.items())),
              "max_converged_after_s": max(conv) if conv else None,
              "per_seed": per_seed, "wall_s": time.perf_counter() - wall0, "cpu_s": time.process_time() - cpu0}
    if out is not None:
        path = Path(out)
        path.mkdir(parents=True, exist_ok=True)
        (path / "results.json").write_text(json.dumps(result, indent=2, sort_keys=True))
    return result
