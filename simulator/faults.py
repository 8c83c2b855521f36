"""Fault-injection harness (issue 7): seeded chaos runs of the real node code, invariants checked.

``ekko sim faults --seeds N [--seed S] [--replicas R] --out DIR`` runs N scenarios
(seeds S, S+1, ...).  Each one drives real :class:`ekko.replica.node.ReplicaNode` objects in
full mode (real values) through :class:`simulator.replicas.SimCluster` on a
:class:`simulator.network.WanNetwork` of :attr:`FaultConfig.dcs` data centres, with a
small model (:data:`SPEC`: one sparse and one dense table).  Everything below is drawn
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
   replica holds bit-identical versions and values to the expected state, and its
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
pull rows; pending chain intervals dropped at the cap).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from ekko.core.chain import PendingFrame, PublisherChain
from ekko.core.codec import MsgType, array_from_wire
from ekko.core.config import NodeConfig
from ekko.core.errors import ProtocolError, UsageError
from ekko.replica.node import ReplicaNode
from ekko.core.spec import ModelSpec, TableSpec
from ekko.core.store import ModelStore
from ekko.core.version import (
    HLC_EPOCH_MS,
    HLC_LOGICAL_BITS,
    MAX_ORIGIN,
    HybridClock,
    Knowledge,
    counters_of,
)
from rollback.cuts import Cut
from simulator.events import Simulation
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
from simulator.network import WanConfig, WanNetwork
from simulator.replicas import SimCluster

#: the model every scenario publishes: small enough for full mode in CI.
MODEL_NAME = "chaos"
SPEC = ModelSpec(MODEL_NAME, [TableSpec("emb", rows=512, dim=4, shards=8),
                              TableSpec("dense", rows=16, dim=8, dense=True)])
#: origin id of the first publisher (a publisher restarting without state takes the next).
PUBLISHER_ORIGIN = 1
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
#: the publisher backs its state up this often (what a ``backup`` restart restores).
BACKUP_INTERVAL_S = 1.0
#: node counters summed per seed (``protocol`` in the results): evidence that the rules
#: for gaps, stale chains and fenced pulls ran.
PROTOCOL_COUNTERS = ("gap_probes_sent", "gaps_closed", "stale_chains", "pull_fenced_rows", "fenced_rows")


@dataclass
class Violation:
    """An invariant broken in one seed: its first divergence (``count`` = how many seen)."""

    seed: int
    invariant: str
    replica: str
    table: str | None = None
    row: int | None = None
    shard: int | None = None
    detail: str = ""
    count: int = 1

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


__all__ = ["CONVERGENCE_BOUND_S", "DEFAULT_CONFIG", "DEFAULT_REPLICAS", "EPISODE_KINDS", "EXTRA_KINDS",
           "FAULT_PHASE_S", "INVARIANTS", "LOSS_KINDS", "NUM_DCS", "RESTART_MODES", "Episode", "FaultConfig", "FaultPlan", "FaultRun",
           "FaultScenario", "RefRollback", "Violation", "parse_fault_scenario", "run_faults"]


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

    def _deliver(self, src: str, dst: str, payload: tuple[MsgType, dict[str, Any]]) -> None:
        self.keep((src, dst, payload))
        super()._deliver(src, dst, payload)


def _knowledge(node: ReplicaNode) -> dict[tuple[str, int], dict[int, int]]:
    """Per (table, shard): ``{origin: counter}``, through the node's public export."""
    raw = node.export_state(MODEL_NAME)["knowledge"]
    return {(t, s): dict(Knowledge.from_wire(w).items()) for t, entries in raw.items() for s, w in entries}


@dataclass
class _Frame:
    """A frame some replica accepted: the reference model's record of it."""

    origin: int
    tables: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]  # table -> (ids, versions, values)
    acked: bool


class FaultRun:
    """One seeded chaos scenario: build, inject, heal, check.

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
        self.cluster.on_apply.append(self._on_apply)
        self.ingest = self.node_ids[0]
        self.rng = self.sim.derive_rng("harness")
        self.np_rng = self.sim.derive_np_rng("values")
        self.faults: Counter[str] = Counter()
        # -- the publisher and the reference model
        self.chain: PublisherChain | None = PublisherChain(PUBLISHER_ORIGIN)
        self.origins_used: set[int] = set()
        self.issued_top: dict[int, int] = {}       # origin -> greatest counter it handed out
        # Draws for foreign and backup states: their own stream, so the other draws keep theirs.
        self.chain_rng = self.sim.derive_rng("publisher-states")
        self.backups: list[tuple[float, int, str]] = []   # (time, origin, PublisherChain.state() JSON)
        self._last_backup = -float("inf")
        self.publisher_down_at = 0.0
        if self.plan.foreign_start:
            # A trainer restored from backup into this (new) cluster: its heads name counters
            # below its first frame here that this cluster never saw.
            first = int(cfg.publish_interval_s / 2 * 1000) << HLC_LOGICAL_BITS
            self.chain = PublisherChain.restart(
                self._foreign_state({"origin": PUBLISHER_ORIGIN, "clock": 0, "heads": []}, 0, first - 1),
                PUBLISHER_ORIGIN)
            self.faults["publisher_start_foreign_chain"] += 1
        self.frames: list[_Frame] = []
        self.frames_by_key: dict[tuple[int, int], _Frame] = {}
        self.pending: PendingFrame | None = None
        self._pending_tables: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.pending_target: str | None = None     # replica that applied the pending frame (ack lost)
        self.publisher_saved: tuple[bytes, bytes | None] | None = None
        self.ref_rollbacks: list[RefRollback] = []
        self.cuts: dict[str, Cut] = {}
        self.cut_cover: dict[str, dict[tuple[str, int], dict[int, int]]] = {}   # publisher cuts: acked heads
        self.seen_rollbacks: dict[str, set[str]] = {n: set() for n in self.node_ids}
        # -- lost disks and chain gaps
        #: per table, per disk loss: (lo, hi) per row -- that row's versions in (lo, hi] may be
        #: lost (only the lost replica held them); the check accepts either outcome.
        self.lost: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {t.name: [] for t in SPEC.tables}
        self.lost_down: set[str] = set()           # down with their disk lost: they come back empty
        # (table, shard, origin) -> counter ranges only a lost disk knew of (see _mark_lost).
        self.unknown_ranges: dict[tuple[str, int, int], list[tuple[int, int]]] = {}
        self.disk_losses: Counter[str] = Counter()  # node id -> disk losses so far
        self.retired: Counter[str] = Counter()      # protocol counters of replaced node objects
        self.avoid: str | None = None              # the isolated ingest of a chain gap
        self.gap_frames_left = 0
        self._flex: dict[str, dict[int, dict[int, np.ndarray]]] = {}
        # -- bookkeeping
        self.violations: dict[str, Violation] = {}
        self.samples: dict[str, tuple[dict[str, np.ndarray], dict[tuple[str, int], dict[int, int]]]] = {}
        self.restarts: Counter[str] = Counter()
        self.active: Counter[str] = Counter()

    # -- recording -------------------------------------------------------------------
    def _violate(self, invariant: str, replica: str, **kw: Any) -> None:
        cur = self.violations.get(invariant)
        if cur is None:
            self.violations[invariant] = Violation(self.seed, invariant, replica, **kw)
        else:
            cur.count += 1

    def _applied_rollbacks(self, nid: str) -> list[RefRollback]:
        """Reference rollbacks this replica has applied (sticky across its restarts)."""
        seen = self.seen_rollbacks[nid]
        seen.update(r.rid for r in self.ref_rollbacks if r.rid in self.cluster.nodes[nid].rollbacks)
        return [r for r in self.ref_rollbacks if r.rid in seen]

    def _fenced_for(self, rbs: list[RefRollback], table: TableSpec, ids: np.ndarray,
                    versions: np.ndarray) -> np.ndarray:
        out = np.zeros(len(versions), bool)
        for r in rbs:
            out |= r.fenced(table, ids, versions)
        return out

    def _on_apply(self, nid: str, model: str, table: str, res: Any, source: str, now: float) -> None:
        """Invariant 5 on every apply: no version a rollback this replica applied fences."""
        if not self.ref_rollbacks or model != MODEL_NAME:
            return
        rbs = self._applied_rollbacks(nid)
        if not rbs:
            return
        t = SPEC.table(table)
        bad = np.flatnonzero(self._fenced_for(rbs, t, res.ids, res.versions))
        if len(bad):
            r = int(res.ids[bad[0]])
            self._violate("fence", nid, table=table, row=r,
                          detail=f"applied fenced version {int(res.versions[bad[0]])} from {source} at t={now:.3f}")

    def _sample(self, nid: str) -> None:
        """Invariants 3 and 5: compare a live replica with its previous sample, keep this one."""
        node = self.cluster.nodes[nid]
        vers = {t.name: node.table_store(MODEL_NAME, t.name).versions.copy() for t in SPEC.tables}
        know = _knowledge(node)
        rbs = self._applied_rollbacks(nid) if self.ref_rollbacks else []
        prev = self.samples.get(nid)
        for t in SPEC.tables:
            if rbs:
                held = np.flatnonzero(vers[t.name] > 0)
                bad = held[self._fenced_for(rbs, t, held, vers[t.name][held])]
                if len(bad):
                    r = int(bad[0])
                    self._violate("fence", nid, table=t.name, row=r,
                                  detail=f"holds fenced version {int(vers[t.name][r])} at t={self.sim.now:.3f} "
                                         f"({len(bad)} rows)")
            if prev is None:
                continue
            old = prev[0][t.name]
            back = np.flatnonzero(vers[t.name] < old)
            if len(back) and rbs:
                # A rollback this replica applied may take a fenced version back.
                back = back[~self._fenced_for(rbs, t, back, old[back])]
            if len(back):
                r = int(back[0])
                self._violate("monotonicity", nid, table=t.name, row=r,
                              detail=f"row version {int(old[r])} -> {int(vers[t.name][r])} at t={self.sim.now:.3f}")
        if prev is not None:
            for (t, s), entries in prev[1].items():
                cur = know.get((t, s), {})
                for o, c in entries.items():
                    if cur.get(o, 0) < c:
                        self._violate("monotonicity", nid, table=t, shard=s,
                                      detail=f"knowledge of origin {o}: {c} -> {cur.get(o, 0)} at "
                                             f"t={self.sim.now:.3f}")
        self.samples[nid] = (vers, know)

    def _sample_all(self) -> None:
        for nid in self.cluster.live():
            self._sample(nid)

    # -- publisher ---------------------------------------------------------------------
    def _record_frame(self, frame: PendingFrame, tables: dict[str, tuple[np.ndarray, np.ndarray]],
                      acked: bool) -> None:
        """Reference model: a replica accepted ``frame`` (recorded once per frame)."""
        key = (frame.body["origin"], frame.first_counter)
        got = self.frames_by_key.get(key)
        if got is not None:
            got.acked |= acked
            return
        versions = _versions_of(frame)
        f = _Frame(frame.body["origin"], {t: (ids, versions[t], vals.copy()) for t, (ids, vals) in tables.items()},
                   acked)
        self.frames.append(f)
        self.frames_by_key[key] = f

    def _new_frame(self) -> None:
        assert self.chain is not None
        n = self.rng.randint(1, self.cfg.max_rows_per_publish)
        tables: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for t in SPEC.tables:
            if t.dense and self.rng.random() > 0.3:
                continue
            k = t.rows if t.dense else min(n, t.rows)
            ids = np.sort(self.np_rng.choice(t.rows, size=k, replace=False)).astype(np.int64)
            tables[t.name] = (ids, self.np_rng.standard_normal((k, t.dim)).astype(np.float32))
        origin = self.chain.origin
        top = self.issued_top.get(origin, 0)
        self.pending = self.chain.frame(SPEC, tables, now_ms=HLC_EPOCH_MS + self.sim.now * 1000)
        if self.pending.first_counter <= top:
            self._violate("publisher", f"origin {origin}", detail=f"counter {self.pending.first_counter} handed "
                          f"out again (origin already used up to {top}) at t={self.sim.now:.3f}")
        self.issued_top[origin] = max(top, self.pending.last_counter)
        self.origins_used.add(origin)
        self._pending_tables = tables
        self.pending_target = None

    def _publish(self) -> None:
        if self.chain is None:
            return  # the publisher is down
        if self.pending is None:
            self._new_frame()
        assert self.pending is not None
        live = self.cluster.live()
        if self.avoid is not None and self.gap_frames_left <= 0 and len(live) > 1:
            # A chain gap: the isolated ingest is out of the publisher's reach too now.
            target = self.rng.choice([n for n in live if n != self.avoid])
        else:
            target = self.ingest if self.ingest in live else self.rng.choice(live)
        if target != self.ingest:
            self.faults["publishes_rerouted"] += 1
        try:
            ack = self.cluster.call(target, "publish", self.pending.body, self.sim.now)
        except (ProtocolError, UsageError) as e:
            self.faults["publishes_refused"] += 1
            self.faults[f"publish_refused:{getattr(e, 'reason', 'usage')}"] += 1
            return  # retried next interval, same frame
        if self.pending_target == target:
            # A retry of a frame this replica already applied (its ack was lost): a no-op.
            self.faults["publish_retries_after_lost_ack"] += 1
            if ack.applied:
                self._violate("idempotence", target, detail=f"a retried publish applied {ack.applied} rows again "
                              f"at t={self.sim.now:.3f}")
        self.cluster.keep(("publisher", target, (MsgType.PUBLISH, self.pending.body)))
        self._record_frame(self.pending, self._pending_tables, acked=True)
        self.chain.acked(self.pending)
        self.faults["publishes"] += 1
        if self.avoid is not None and target == self.avoid:
            self.gap_frames_left -= 1
            self.faults["chain_gap_frames_at_isolated_ingest"] += 1
        self.pending = None
        self.pending_target = None
        if self.sim.now - self._last_backup >= BACKUP_INTERVAL_S:
            self._last_backup = self.sim.now
            self.backups.append((self.sim.now, self.chain.origin, json.dumps(self.chain.state())))

    def _publisher_crash(self, e: Episode) -> None:
        if self.chain is None:
            return
        mode, ack_lost = _restart_mode(e.args[0]), e.args[1]
        if ack_lost:
            # The frame reached a replica, which applied it; the acknowledgement never
            # came back because the publisher died first.
            if self.pending is None:
                self._new_frame()
            assert self.pending is not None
            live = self.cluster.live()
            target = self.ingest if self.ingest in live else self.rng.choice(live)
            try:
                self.cluster.call(target, "publish", self.pending.body, self.sim.now)
                self.cluster.keep(("publisher", target, (MsgType.PUBLISH, self.pending.body)))
                self._record_frame(self.pending, self._pending_tables, acked=False)
                self.pending_target = target
                self.faults["publisher_acks_lost"] += 1
            except (ProtocolError, UsageError):
                pass
        # What the SDK has on disk: the chain state and the pending frame, serialized.
        pend = None
        if self.pending is not None:
            p = self.pending
            pend = msgpack.packb({"model": p.model, "body": p.body, "heads": [[t, s, c] for (t, s), c in p.heads.items()],
                                  "first": p.first_counter, "last": p.last_counter, "rows": p.rows,
                                  "tables": {t: [ids.tolist(), vals.tobytes()] for t, (ids, vals)
                                             in self._pending_tables.items()}, "target": self.pending_target,
                                  "target_losses": self.disk_losses[self.pending_target or ""]},
                                 use_bin_type=True)
        self.publisher_saved = (json.dumps(self.chain.state()).encode(), pend)
        self.chain = None
        self.publisher_down_at = self.sim.now
        self.faults["publisher_crash"] += 1
        self.sim.schedule(e.length, self._publisher_restart, mode)

    def _publisher_restart(self, mode: str) -> None:
        if self.chain is not None or self.publisher_saved is None:
            return
        state_raw, pend_raw = self.publisher_saved
        self.publisher_saved = None
        state = json.loads(state_raw)
        if mode != "state":
            # Whatever the pending frame was, this publisher does not have it: it is not re-sent
            # (a replica that applied it keeps it; the reference model has it as accepted).
            self.pending = None
            self.pending_target = None
            self._pending_tables = {}
        self._reach_ingest_again()
        if mode in ("same_origin", "foreign", "backup"):
            self._publisher_restart_same_origin(mode, state)
        elif mode == "state":
            chain = PublisherChain.restart(state, state["origin"])   # as the SDK starts
            pending = None
            if pend_raw is not None:
                r = msgpack.unpackb(pend_raw, raw=False, strict_map_key=False)
                pending = PendingFrame(r["model"], r["body"], {(t, int(s)): int(c) for t, s, c in r["heads"]},
                                       int(r["first"]), int(r["last"]), int(r["rows"]))
                # As the SDK does: counters of a frame that may have reached a replica are never reused.
                chain.clock.observe(pending.last_counter)
                sent = _versions_of(self.pending) if self.pending is not None else {}
                got = _versions_of(pending)
                if sent.keys() != got.keys() or any(not np.array_equal(sent[t], got[t]) for t in sent):
                    self._violate("publisher", f"origin {chain.origin}", detail="the restored pending frame does "
                                  "not carry the versions it had before the restart")
                self._pending_tables = {t: (np.asarray(ids, np.int64),
                                            np.frombuffer(vals, np.float32).reshape(len(ids), -1).copy())
                                        for t, (ids, vals) in r["tables"].items()}
                self.pending_target = r["target"]
                if r["target"] is not None and self.disk_losses[r["target"]] != r.get("target_losses", 0):
                    self.pending_target = None  # that replica lost its disk since: the frame is new there
            self.pending = pending
            self.chain = chain
            self.faults["publisher_restart_with_state"] += 1
        else:
            # State lost: by the rule of PublisherChain.restore, a new origin.
            origin = max(self.origins_used | {state["origin"]}) + 1
            if origin > MAX_ORIGIN:
                raise UsageError("out of publisher origins")
            self.chain = PublisherChain.restore(None, origin)
            self.faults["publisher_restart_new_origin"] += 1

    def _reach_ingest_again(self) -> None:
        """A restarted publisher tries its first endpoint first: during a chain gap it reaches
        the isolated ingest for one more frame (after a backup restart, a stale chain there)."""
        if self.avoid is not None:
            self.gap_frames_left = max(self.gap_frames_left, 1)

    def _publisher_restart_same_origin(self, mode: str, state: dict[str, Any]) -> None:
        """Issue 13's restarts: the same origin without its state, with a foreign state, or
        with an older backup of its state."""
        origin = int(state["origin"])
        now_counter = int(self.sim.now * 1000) << HLC_LOGICAL_BITS   # the HLC's physical part now
        top = self.issued_top.get(origin, 0)
        if mode == "same_origin":
            # As the SDK without its state dir: RESTART_LINK links, a fresh clock.  The clock
            # starts at the wall time, above every counter this origin handed out unless its
            # HLC ran ahead of the wall clock (> 256 rows/ms) -- which an SDK without state
            # could not know; the harness floors it then (counted), so the "publisher"
            # invariant keeps testing the protocol and not this impossibility.
            chain = PublisherChain.restore(None, origin, history_known=False)
            if top >= now_counter:
                chain.clock = HybridClock(top)
                self.faults["publisher_clock_floored"] += 1
            self.faults["publisher_restart_same_origin"] += 1
        elif mode == "foreign":
            # Its state dir was used against another cluster while it was away: heads of some
            # shards advanced to counters (handed out there) that this cluster never saw.
            chain = PublisherChain.restart(self._foreign_state(state, max(top, int(state["clock"])), now_counter - 1),
                                           origin)
            self.faults["publisher_restart_foreign_chain"] += 1
        else:
            # Restored from an older backup of its state dir: a stale chain (heads behind what
            # this cluster holds); the clock's physical part keeps counters new.
            olds = [b for t, o, b in self.backups if o == origin and t <= self.publisher_down_at - 0.5]
            if olds:
                backup = json.loads(self.chain_rng.choice(olds))
            else:
                backup = {"origin": origin, "clock": 0, "heads": []}   # the state dir of its first start
                self.faults["publisher_restart_from_empty_backup"] += 1
            chain = PublisherChain.restart(backup, origin)
            self.faults["publisher_restart_from_backup"] += 1
        self.chain = chain

    def _foreign_state(self, state: dict[str, Any], lo: int, hi: int) -> dict[str, Any]:
        """``state`` with the heads of a random set of shards moved to counters in ``(lo, hi]``
        (published to another cluster), its clock past them."""
        rng = self.chain_rng
        shards = [(MODEL_NAME, t.name, s) for t in SPEC.tables for s in range(t.num_shards)]
        heads = {(m, t, int(s)): int(c) for m, t, s, c in state.get("heads", [])}
        top = int(state.get("clock", 0))
        for key in rng.sample(shards, rng.randint(1, len(shards))):
            base = max(lo, heads.get(key, 0))
            if hi > base + 1:
                heads[key] = rng.randint(base + 1, hi)
                top = max(top, heads[key])
                self.faults["foreign_chain_heads"] += 1
        origin = int(state["origin"])
        self.issued_top[origin] = max(self.issued_top.get(origin, 0), top)   # handed out, elsewhere
        return {**state, "clock": top, "heads": [[m, t, s, c] for (m, t, s), c in sorted(heads.items())]}

    # -- rollbacks ---------------------------------------------------------------------
    def _take_cut(self, e: Episode) -> None:
        live = self.cluster.live()
        taker = e.args[0] if e.args[0] in live else self.rng.choice(live)
        if self.chain is not None and self.cfg.publisher_cut_prob and \
                self.chain_rng.random() < self.cfg.publisher_cut_prob:
            # The publisher takes it (Publisher.cut): the replica waits until its knowledge
            # covers every head the publisher had acknowledged, as the daemon does.
            heads = [(t, s, c) for (m, t, s), c in sorted(self.chain.heads.items()) if m == MODEL_NAME]
            self._publisher_cut(e, taker, self.chain.origin, heads, self.sim.now)
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
                          frozenset(self.origins_used), self.sim.now)
        record = self.cluster.call(who, "rollback", MODEL_NAME, name, until, self.sim.now)
        if record["id"] != ref.rid:
            raise RuntimeError(f"rollback record id {record['id']} is not {ref.rid}")
        self.ref_rollbacks.append(ref)
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
        self._sample(nid)
        if lose_disk and any(r.rid in node.rollbacks and not any(
                r.rid in self.cluster.nodes[n].rollbacks for n in self.node_ids if n != nid and n not in self.lost_down)
                for r in self.ref_rollbacks):
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
            if self.pending_target == nid:
                self.pending_target = None   # a retry there applies the frame anew: not a replay
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
            self.seen_rollbacks[nid] = set()
            self.samples.pop(nid, None)
            self.faults["restart_empty"] += 1
        else:
            assert durable is not None
            store, state, _ = durable
            node.import_state(SPEC, store, state, self.sim.now)
            self.faults["restart"] += 1
        self.cluster.restart(nid, node)
        self._sample(nid)

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
        """Reference model: the row versions only ``nid`` holds may be lost with its disk.

        Per row, ``nid``'s version ``l`` against the greatest version ``h`` any other replica
        holds (live, or down with its durable state): the versions in ``(h, l]`` when
        ``l > h``; ``l`` alone when it is older but no other replica holds it exactly (a
        rollback may still need it).  A message in flight may yet deliver some of them, so
        the check accepts the row with or without them (but every replica must agree).
        """
        holders = [self.cluster.nodes[n] for n in self.node_ids if n != nid and n not in self.lost_down]
        node = self.cluster.nodes[nid]
        # Counters of an origin in a shard that only ``nid`` knew of (its knowledge or waiting
        # intervals beyond every holder's): a frame there whose rows were all superseded at
        # ``nid`` leaves no trace anywhere, so no replica can know to wait for it.
        theirs = [_known_tops(h) for h in holders]
        for key, top in _known_tops(node).items():
            elsewhere = max((t.get(key, 0) for t in theirs), default=0)
            if top > elsewhere:
                self.unknown_ranges.setdefault(key, []).append((elsewhere, top))
        at_risk = 0
        for t in SPEC.tables:
            mine = node.table_store(MODEL_NAME, t.name).versions.copy()
            if holders:
                others = np.stack([h.table_store(MODEL_NAME, t.name).versions for h in holders])
                h = others.max(axis=0)
                exact = (others == mine).any(axis=0)
            else:
                h = np.zeros_like(mine)
                exact = np.zeros(len(mine), bool)
            sel = (mine > 0) & ~exact
            if sel.any():
                lo = np.where(sel, np.where(mine > h, h, mine - 1), 0)
                hi = np.where(sel, mine, 0)
                self.lost[t.name].append((lo, hi))
                at_risk += int(sel.sum())
            # Versions ``nid`` held and then overwrote (its undo history) that no other
            # replica holds: a rollback to a cut covering one of them restores the newest
            # surviving version below it instead.
            for ids, old in _history(node, t.name):
                keep = old > 0
                if holders:
                    keep &= ~(others[:, ids] == old).any(axis=0)
                ids, old = ids[keep], old[keep]
                while len(ids):   # a row overwritten several times: one layer per version
                    _, first = np.unique(ids, return_index=True)
                    lo = np.zeros(t.rows, np.int64)
                    hi = np.zeros(t.rows, np.int64)
                    hi[ids[first]] = old[first]
                    lo[ids[first]] = old[first] - 1
                    self.lost[t.name].append((lo, hi))
                    rest = np.ones(len(ids), bool)
                    rest[first] = False
                    ids, old = ids[rest], old[rest]
        if at_risk:
            self.faults["rows_at_risk_with_lost_disk"] += at_risk
            # A replay of a frame delivered before the loss could bring back a version the
            # cluster lost for good: that is not a replay of anything the cluster still holds.
            self.faults["replay_frames_dropped_at_disk_loss"] += len(self.cluster.replay_log)
            self.cluster.replay_log.clear()

    def _lost_mask(self, table: str, ids: np.ndarray, versions: np.ndarray) -> np.ndarray:
        out = np.zeros(len(ids), bool)
        for lo, hi in self.lost[table]:
            out |= (versions > lo[ids]) & (versions <= hi[ids])
        return out

    # -- chain gaps ----------------------------------------------------------------------
    def _chain_gap(self, e: Episode) -> None:
        """The ingest is cut off from every peer while the publisher still reaches it for
        ``frames`` more frames; then the publisher fails over to other replicas, whose
        frames chain on ones they never got (a gap at each of them until the heal)."""
        frames, _ = e.args
        if self.ingest not in self.cluster.live() or self.avoid is not None:
            self.faults["chain_gap_skipped"] += 1
            return
        self.faults["chain_gap"] += 1
        self.net.heal()
        self.net.partition([[self.ingest]])
        self.active["partition"] += 1
        self.avoid = self.ingest
        self.gap_frames_left = int(frames)
        self.sim.schedule(e.length, self._chain_gap_end, e)

    def _chain_gap_end(self, e: Episode) -> None:
        _, lose_disk = e.args
        if lose_disk and self.avoid in self.cluster.live():
            # Lost with its disk before the heal: the frames only it acknowledged are lost
            # everywhere, and only gap probes can close the gap they leave.
            self.faults["chain_gap_disk_loss"] += 1
            self._crash(self.avoid, 1.0, lose_disk=True)
        self.avoid = None
        self.gap_frames_left = 0
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
            self._publisher_crash(e)
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
        """The reference state: per row, the greatest accepted version no rollback fenced
        (``without_lost``: and that no disk loss may have taken, :meth:`_mark_lost`)."""
        ver = {t.name: np.zeros(t.rows, np.int64) for t in SPEC.tables}
        val = {t.name: np.zeros((t.rows, t.dim), np.float32) for t in SPEC.tables}
        for f in self.frames:
            for tname, (ids, versions, values) in f.tables.items():
                t = SPEC.table(tname)
                keep = ~self._fenced_for(self.ref_rollbacks, t, ids, versions) & (versions > ver[tname][ids])
                if without_lost:
                    keep &= ~self._lost_mask(tname, ids, versions)
                ver[tname][ids[keep]] = versions[keep]
                val[tname][ids[keep]] = values[keep]
        return ver, val

    def _maybe_lost(self, want: tuple[dict[str, np.ndarray], dict[str, np.ndarray]]
                    ) -> dict[str, dict[int, dict[int, np.ndarray]]]:
        """Rows whose expected version a disk loss may have taken: per table, row -> every
        version the row may end at (from the expected one without lost versions up to
        the expected one) -> its value."""
        if not any(self.lost.values()):
            return {}
        low_v, low_x = self.expected(without_lost=True)
        want_v = want[0]
        out: dict[str, dict[int, dict[int, np.ndarray]]] = {}
        for t in SPEC.tables:
            rows = np.flatnonzero(want_v[t.name] != low_v[t.name])
            if not len(rows):
                continue
            per = out[t.name] = {int(r): {int(low_v[t.name][r]): low_x[t.name][r]} for r in rows}
            for f in self.frames:
                if t.name not in f.tables:
                    continue
                ids, versions, values = f.tables[t.name]
                sel = np.flatnonzero(np.isin(ids, rows))
                if not len(sel):
                    continue
                ok = ~self._fenced_for(self.ref_rollbacks, t, ids[sel], versions[sel])
                for i in sel[ok].tolist():
                    r, v = int(ids[i]), int(versions[i])
                    if int(low_v[t.name][r]) < v <= int(want_v[t.name][r]):
                        per[r][v] = values[i]
        return out

    def _heads(self) -> dict[tuple[str, int, int], int]:
        """Per (table, shard, origin): the greatest counter of any accepted frame, leaving
        out rows a lost disk may have taken: a frame lost whole at the *tail* of an
        origin's chain in a shard (no later frame links on it) is known to nobody, so no
        replica can know to wait for it (harmless: its rows are gone).  Lost frames that a
        later frame links on still count, through that frame's greater counter."""
        heads: dict[tuple[str, int, int], int] = {}
        for f in self.frames:
            for tname, (ids, versions, _) in f.tables.items():
                # (fenced versions too: a replica that rolled them back holds older ones, so a
                # lost disk's marks do not name them; frames after the rollback link past them)
                keep = ~self._lost_mask(tname, ids, versions) & \
                    ~self._fenced_for(self.ref_rollbacks, SPEC.table(tname), ids, versions)
                ids, versions = ids[keep], versions[keep]
                if not len(ids):
                    continue
                shards = SPEC.table(tname).shards_of(ids)
                c = counters_of(versions)
                for s in np.unique(shards).tolist():
                    key = (tname, s, f.origin)
                    heads[key] = max(heads.get(key, 0), int(c[shards == s].max()))
        # A head inside a range only a lost disk knew of, with no later frame past it, is
        # known to nobody (its rows were superseded there): the knowledge before it counts.
        for key, ranges in self.unknown_ranges.items():
            h = heads.get(key)
            for lo, hi in ranges:
                if h is not None and lo < h <= hi:
                    below = [int(c) for f in self.frames if f.origin == key[2] and key[0] in f.tables
                             for c in _shard_counters(f, key[0], key[1]) if c <= lo]
                    heads[key] = max(below, default=0)
                    h = heads[key]
        return heads

    def _divergence(self, want: tuple[dict[str, np.ndarray], dict[str, np.ndarray]],
                    heads: dict[tuple[str, int, int], int]) -> tuple[str, dict[str, Any]] | None:
        """The first replica (and table, row or shard) not at the expected state."""
        want_v, want_x = want
        flex = self._flex
        first = self.cluster.nodes[self.node_ids[0]]
        for nid in self.node_ids:
            node = self.cluster.nodes[nid]
            for t in SPEC.tables:
                ts = node.table_store(MODEL_NAME, t.name)
                maybe = flex.get(t.name)
                if maybe:
                    # Rows a disk loss may have taken: any version they may end at, the same everywhere.
                    vals = ts.values.numpy()
                    ref = first.table_store(MODEL_NAME, t.name).versions
                    for r, choices in maybe.items():
                        v = int(ts.versions[r])
                        if v not in choices or v != int(ref[r]) or \
                                (vals[r].view(np.uint32) != choices[v].view(np.uint32)).any():
                            return nid, {"table": t.name, "row": r, "detail": f"version {v} (replica "
                                         f"{self.node_ids[0]}: {int(ref[r])}), expected one of {sorted(choices)} "
                                         "the same everywhere (a lost disk held the newest), with its value"}
                bad = np.flatnonzero(ts.versions != want_v[t.name])
                if maybe:
                    bad = bad[~np.isin(bad, np.fromiter(maybe, np.int64, len(maybe)))]
                if len(bad):
                    r = int(bad[0])
                    return nid, {"table": t.name, "row": r, "detail": f"version {int(ts.versions[r])}, expected "
                                 f"{int(want_v[t.name][r])} ({len(bad)} rows differ)"}
                vals = ts.values.numpy()
                bad = np.flatnonzero((vals.view(np.uint32) != want_x[t.name].view(np.uint32)).any(axis=1))
                if maybe:
                    bad = bad[~np.isin(bad, np.fromiter(maybe, np.int64, len(maybe)))]
                if len(bad):
                    return nid, {"table": t.name, "row": int(bad[0]),
                                 "detail": f"values differ at equal versions ({len(bad)} rows)"}
            know = _knowledge(node)
            for (t, s, o), head in heads.items():
                have = know.get((t, s), {}).get(o, 0)
                if have < head:
                    return nid, {"table": t, "shard": s,
                                 "detail": f"knowledge of origin {o} is {have}, below its last counter {head}"}
        return None

    def _state(self) -> dict[str, Any]:
        out = {}
        for nid, node in self.cluster.nodes.items():
            out[nid] = ({t.name: (node.table_store(MODEL_NAME, t.name).versions.copy(),
                                  node.table_store(MODEL_NAME, t.name).values.numpy().copy()) for t in SPEC.tables},
                        _knowledge(node))
        return out

    def _replay(self) -> int:
        """Deliver a random subset of recorded frames again; returns how many."""
        log = self.cluster.replay_log
        picked = self.rng.sample(log, self.rng.randint(len(log) // 2, len(log))) if log else []
        for src, dst, payload in picked:
            msg_type, body = payload
            if msg_type == MsgType.PUBLISH:
                try:
                    self.cluster.call(dst, "publish", body, self.sim.now)
                except (ProtocolError, UsageError):
                    self.faults["replayed_publish_refused"] += 1
            else:
                self.cluster._deliver(src, dst, payload)
        return len(picked)

    def _compare(self, before: dict[str, Any], after: dict[str, Any]) -> None:
        for nid, (tables, know) in before.items():
            tables2, know2 = after[nid]
            for t, (v, x) in tables.items():
                v2, x2 = tables2[t]
                bad = np.flatnonzero((v != v2) | (x.view(np.uint32) != x2.view(np.uint32)).any(axis=1))
                if len(bad):
                    r = int(bad[0])
                    self._violate("idempotence", nid, table=t, row=r,
                                  detail=f"replay changed the row: version {int(v[r])} -> {int(v2[r])}")
            if know != know2:
                (t, s) = next(k for k in sorted(set(know) | set(know2)) if know.get(k) != know2.get(k))
                self._violate("idempotence", nid, table=t, shard=s,
                              detail=f"replay changed knowledge {know.get((t, s))} -> {know2.get((t, s))}")

    # -- driver ------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Run the scenario; returns this seed's summary (``violations`` as dicts)."""
        wall0 = time.perf_counter()
        sim = self.sim
        phase = self.cfg.fault_phase_s
        for e in self.plan.episodes:
            sim.schedule_at(e.start, self._start, e)
        interval = self.cfg.publish_interval_s
        publishing = sim.every(interval, self._publish, start=interval / 2)
        sampling = sim.every(SAMPLE_INTERVAL_S, self._sample_all, start=SAMPLE_INTERVAL_S / 3)
        sim.run(until=phase)
        publishing.cancel()
        if self.chain is None:  # the publisher is still down: it comes back now
            sim.schedule(0.0, self._publisher_restart, self._final_restart_mode())
            sim.run(until=sim.now + 1e-6)
        while self.pending is not None:  # the last frame: retry until acknowledged
            self._publish()
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
            if seen != (len(self.ref_rollbacks), len(self.frames)):
                seen = (len(self.ref_rollbacks), len(self.frames))
                want = self.expected()
                self._flex = self._maybe_lost(want)
                heads = self._heads()
            div = self._divergence(want, heads)
            if div is None:
                converged_after = sim.now - phase
                break
            if sim.now >= end:
                nid, where = div
                where["detail"] = (f"not converged {self.cfg.convergence_bound_s:g} s after faults stopped: "
                                   f"{where['detail']}")
                self._violate("convergence", nid, **where)
                break
            sim.run(until=min(end, sim.now + CHECK_STEP_S))
        replayed = 0
        if converged_after is not None:
            sim.run(until=sim.now + REPLAY_QUIET_S)
            before = self._state()
            replayed = self._replay()
            sim.run(until=sim.now + REPLAY_QUIET_S)
            self._compare(before, self._state())
        sampling.cancel()
        self._sample_all()
        self.faults["frames_accepted"] = len(self.frames)
        self.faults["publisher_origins"] = len(self.origins_used)
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
                "rollbacks": [{"id": r.rid, "cut": r.cut, "at": round(r.at, 6)} for r in self.ref_rollbacks],
                "violations": [v.to_dict() for v in self.violations.values()],
                "wall_s": time.perf_counter() - wall0}

    def _final_restart_mode(self) -> str:
        """How the publisher restart still due at the end of the fault phase comes back."""
        last = [e for e in self.plan.episodes if e.kind == "publisher_restart" and e.start <= self.publisher_down_at]
        return _restart_mode(last[-1].args[0]) if last else "state"

    def _restart_now(self, nid: str) -> None:
        node = self.cluster.nodes[nid]
        if nid in self.lost_down:
            self._restart(nid, None)
            return
        # The crashed object still holds exactly what it held at the crash.
        self._restart(nid, (node.models[MODEL_NAME].store.copy(), node.export_state(MODEL_NAME),
                            node.members.me.incarnation))


def _restart_mode(arg: bool | str) -> str:
    """A publisher restart episode's mode (the first stream draws a bool: keep state or not)."""
    if isinstance(arg, bool):
        return "state" if arg else "new_origin"
    if arg not in RESTART_MODES:
        raise UsageError(f"unknown publisher restart mode {arg!r}")
    return arg


def _history(node: ReplicaNode, table: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(ids, overwritten versions)`` of ``node``'s undo history of ``table``."""
    if node.undo is None or MODEL_NAME not in node.models:
        return []
    image = node.undo.export_model(MODEL_NAME, node._seq)
    return [(seg.ids, seg.old_versions) for seg in image.tables.get(table, [])]


def _known_tops(node: ReplicaNode) -> dict[tuple[str, int, int], int]:
    """Per (table, shard, origin): the greatest counter ``node``'s knowledge or waiting
    intervals name."""
    out: dict[tuple[str, int, int], int] = {}
    m = node.models.get(MODEL_NAME)
    if m is None:
        return out
    for t, shards in m.shards.items():
        for s, sync in shards.items():
            for o, c in sync.knowledge.items():
                out[(t, s, o)] = max(out.get((t, s, o), 0), c)
            for o, ivs in sync.pending.items():
                out[(t, s, o)] = max(out.get((t, s, o), 0), max(u for _, u in ivs))
    return out


def _shard_counters(f: "_Frame", table: str, shard: int) -> np.ndarray:
    ids, versions, _ = f.tables[table]
    return counters_of(versions[SPEC.table(table).shards_of(ids) == shard])


def _versions_of(frame: PendingFrame) -> dict[str, np.ndarray]:
    """The packed versions of a frame per table, decoded from its body."""
    return {d["t"]: array_from_wire(d["v"], np.int64, d["n"], "versions") for d in frame.body["deltas"]}


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
