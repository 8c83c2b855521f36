"""Fault-injection harness (issue 7): seeded chaos runs of the real node code, invariants checked.

``ekko sim faults --seeds N [--seed S] [--replicas R] --out DIR`` runs N scenarios
(seeds S, S+1, ...).  Each one drives real :class:`ekko.node.ReplicaNode` objects in
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
* a publisher (:class:`ekko.chain.PublisherChain`) publishing every
  :attr:`FaultConfig.publish_interval_s` to the ingest replica, or to another live
  replica (same chain) while the ingest is down.  A frame counts as acknowledged when
  ``publish`` returned; a refused frame is retried, like the SDK does;
* publisher restarts: the publisher goes down for a while, sometimes right after a
  replica applied its frame but before the acknowledgement arrived (the frame stays
  pending).  Half of the restarts keep the persisted state (the SDK's
  ``<origin>.json`` = :meth:`PublisherChain.state` and ``<origin>.pending``, both
  serialized and read back): the publisher keeps its origin and re-sends the pending
  frame with the same versions first.  The other half lose it and, by the rule of
  :meth:`PublisherChain.restore`, take a *new* origin;
* rollbacks: a cut is taken at a random replica (``take_cut``, broadcast), and a
  moment later a random live replica that knows the cut rolls the model back to it
  (``rollback``, the rollback point being its clock as an HLC counter, as the daemon
  does), often while a partition or a crash is active, so some replicas learn of it
  only from gossip or after their restart.

The pull answer budget is made small (:attr:`FaultConfig.pull_response_bytes`) so that
truncated answers (``cut_below``) are exercised, not only the happy path.

The harness keeps its own **reference model**, the trainer-side truth: every frame a
replica accepted (its rows, versions and values), the origins each publisher
incarnation used, and for each rollback the cut's knowledge (the cut's definition)
and the rollback point the harness chose.  A version is *fenced* when its counter is
above the cut's knowledge of its (table, shard, origin) and at most the rollback
point, for every origin that had published; the expected state of a row is its
greatest published version that no rollback fenced (the state at the cut plus what
was published after the rollback).  Nothing of it is read from a replica.

Then every fault stops (heal, loss 0, every crashed replica and the publisher
restarted; duplication and reordering stay on) and the harness checks:

1. convergence: within :attr:`FaultConfig.convergence_bound_s` simulated seconds every
   replica holds bit-identical versions and values to the expected state, and its
   knowledge of every shard covers every counter each origin published there;
2. no lost acknowledged update: implied by 1 (the expected state holds every
   acknowledged frame; a publisher restart loses none);
3. monotonicity: every :data:`SAMPLE_INTERVAL_S`, and right after each restart, each
   replica's per-row versions and per-shard knowledge are compared with its previous
   sample (kept across restarts by node id): nothing may go backwards, except a row
   whose previous version a rollback the replica has applied fenced;
4. idempotence: a random subset (up to :data:`REPLAY_FRAMES`) of frames delivered
   during the run, publishes and rollbacks included, is delivered again to the same
   replicas; after :data:`REPLAY_QUIET_S` seconds, versions, values and knowledge must
   be unchanged.  A publisher retrying a frame its replica already applied must see
   0 rows applied;
5. fence: once a replica has applied a rollback (tracked by node id, across its
   restarts), no apply there and no sample of its rows may show a version that
   rollback fenced;
6. publisher: after a restart with state, the pending frame goes out with the very
   versions it had, and new counters exceed every counter the origin handed out.

Each violation names the seed, the invariant and the first divergence (replica,
table, row or shard).  What is not injected: corrupt or malicious frames (design
invariant 6), loss of replica state since the last snapshot (a crash here keeps the
state of the moment it crashed), and clock skew.
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

from ekko.chain import PendingFrame, PublisherChain
from ekko.codec import MsgType, array_from_wire
from ekko.config import NodeConfig
from ekko.errors import ProtocolError, UsageError
from ekko.node import ReplicaNode
from ekko.spec import ModelSpec, TableSpec
from ekko.store import ModelStore
from ekko.version import (
    HLC_EPOCH_MS,
    HLC_LOGICAL_BITS,
    MAX_ORIGIN,
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
    NUM_DCS,
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
           "FAULT_PHASE_S", "INVARIANTS", "NUM_DCS", "Episode", "FaultConfig", "FaultPlan", "FaultRun",
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
                 faults: FaultConfig | None = None) -> None:
        cfg = faults or DEFAULT_CONFIG
        if replicas is not None and replicas != cfg.replicas:
            cfg = FaultConfig(**{**asdict(cfg), "replicas": replicas})
        self.cfg = cfg
        self.seed = seed
        self.sim = Simulation(seed)
        self.dcs = [f"dc{i}" for i in range(min(cfg.dcs, cfg.replicas))]
        self.node_ids = [f"r{i}" for i in range(cfg.replicas)]
        self.node_dc = {n: self.dcs[i % len(self.dcs)] for i, n in enumerate(self.node_ids)}
        self.plan = FaultPlan.draw(seed, self.node_ids, self.dcs, cfg)
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
        # -- the publisher and the reference model
        self.chain: PublisherChain | None = PublisherChain(PUBLISHER_ORIGIN)
        self.origins_used: set[int] = set()
        self.issued_top: dict[int, int] = {}       # origin -> greatest counter it handed out
        self.frames: list[_Frame] = []
        self.frames_by_key: dict[tuple[int, int], _Frame] = {}
        self.pending: PendingFrame | None = None
        self._pending_tables: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.pending_target: str | None = None     # replica that applied the pending frame (ack lost)
        self.publisher_saved: tuple[bytes, bytes | None] | None = None
        self.ref_rollbacks: list[RefRollback] = []
        self.cuts: dict[str, Cut] = {}
        self.seen_rollbacks: dict[str, set[str]] = {n: set() for n in self.node_ids}
        # -- bookkeeping
        self.faults: Counter[str] = Counter()
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
        self.pending = None
        self.pending_target = None

    def _publisher_crash(self, e: Episode) -> None:
        if self.chain is None:
            return
        with_state, ack_lost = e.args
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
                                             in self._pending_tables.items()}, "target": self.pending_target},
                                 use_bin_type=True)
        self.publisher_saved = (json.dumps(self.chain.state()).encode(), pend)
        self.chain = None
        self.faults["publisher_crash"] += 1
        self.sim.schedule(e.length, self._publisher_restart, with_state)

    def _publisher_restart(self, with_state: bool) -> None:
        if self.chain is not None or self.publisher_saved is None:
            return
        state_raw, pend_raw = self.publisher_saved
        self.publisher_saved = None
        state = json.loads(state_raw)
        if with_state:
            chain = PublisherChain.restore(state, state["origin"])
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
            self.pending = pending
            self.chain = chain
            self.faults["publisher_restart_with_state"] += 1
        else:
            # State lost: by the rule of PublisherChain.restore, a new origin.
            origin = max(self.origins_used | {state["origin"]}) + 1
            if origin > MAX_ORIGIN:
                raise UsageError("out of publisher origins")
            self.chain = PublisherChain.restore(None, origin)
            self.pending = None
            self.pending_target = None
            self.faults["publisher_restart_new_origin"] += 1

    # -- rollbacks ---------------------------------------------------------------------
    def _take_cut(self, e: Episode) -> None:
        live = self.cluster.live()
        taker = e.args[0] if e.args[0] in live else self.rng.choice(live)
        name = f"cut{len(self.cuts)}"
        self.cuts[name] = self.cluster.call(taker, "take_cut", MODEL_NAME, name, self.sim.now)
        self.faults["cut"] += 1
        self.sim.schedule(e.length, self._rollback, name, taker)

    def _rollback(self, name: str, taker: str) -> None:
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
        who = self.rng.choice(knows)
        ms = int(self.sim.now * 1000)
        until = (max(1, ms) << HLC_LOGICAL_BITS) | ((1 << HLC_LOGICAL_BITS) - 1)
        cut = self.cuts[name]
        ref = RefRollback(f"{who}.{MODEL_NAME}.{name}.{until}", name,
                          {k: dict(v.items()) for k, v in cut.knowledge.items()}, until,
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
    def _crash(self, nid: str, length: float) -> None:
        live = self.cluster.live()
        if nid not in live or len(self.node_ids) - len(live) >= self.cfg.max_down or len(live) <= 1:
            self.faults["crash_skipped"] += 1
            return
        node = self.cluster.nodes[nid]
        self._sample(nid)
        durable = (node.models[MODEL_NAME].store.copy(), node.export_state(MODEL_NAME),
                   node.members.me.incarnation)
        self.cluster.crash(nid)
        self.faults["crash"] += 1
        self.sim.schedule(length, self._restart, nid, durable)

    def _restart(self, nid: str, durable: tuple[ModelStore, dict[str, Any], int]) -> None:
        if self.net.is_up(nid):
            return
        store, state, incarnation = durable
        self.restarts[nid] += 1
        node = ReplicaNode(nid, self.node_dc[nid], nid, config=self.config,
                           rng=self.sim.derive_rng(f"node/{nid}/restart{self.restarts[nid]}"), now=self.sim.now,
                           incarnation=incarnation + 1, seeds=[n for n in self.node_ids if n != nid], device="cpu",
                           with_values=True)
        node.import_state(SPEC, store, state, self.sim.now)
        self.cluster.restart(nid, node)
        self.faults["restart"] += 1
        self._sample(nid)

    def _start(self, e: Episode) -> None:
        if e.kind == "crash":
            self._crash(e.args[0], e.length)
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
    def expected(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """The reference state: per row, the greatest accepted version no rollback fenced."""
        ver = {t.name: np.zeros(t.rows, np.int64) for t in SPEC.tables}
        val = {t.name: np.zeros((t.rows, t.dim), np.float32) for t in SPEC.tables}
        for f in self.frames:
            for tname, (ids, versions, values) in f.tables.items():
                t = SPEC.table(tname)
                keep = ~self._fenced_for(self.ref_rollbacks, t, ids, versions) & (versions > ver[tname][ids])
                ver[tname][ids[keep]] = versions[keep]
                val[tname][ids[keep]] = values[keep]
        return ver, val

    def _heads(self) -> dict[tuple[str, int, int], int]:
        """Per (table, shard, origin): the greatest counter of any accepted frame."""
        heads: dict[tuple[str, int, int], int] = {}
        for f in self.frames:
            for tname, (ids, versions, _) in f.tables.items():
                shards = SPEC.table(tname).shards_of(ids)
                c = counters_of(versions)
                for s in np.unique(shards).tolist():
                    key = (tname, s, f.origin)
                    heads[key] = max(heads.get(key, 0), int(c[shards == s].max()))
        return heads

    def _divergence(self, want: tuple[dict[str, np.ndarray], dict[str, np.ndarray]],
                    heads: dict[tuple[str, int, int], int]) -> tuple[str, dict[str, Any]] | None:
        """The first replica (and table, row or shard) not at the expected state."""
        want_v, want_x = want
        for nid in self.node_ids:
            node = self.cluster.nodes[nid]
            for t in SPEC.tables:
                ts = node.table_store(MODEL_NAME, t.name)
                bad = np.flatnonzero(ts.versions != want_v[t.name])
                if len(bad):
                    r = int(bad[0])
                    return nid, {"table": t.name, "row": r, "detail": f"version {int(ts.versions[r])}, expected "
                                 f"{int(want_v[t.name][r])} ({len(bad)} rows differ)"}
                vals = ts.values.numpy()
                bad = np.flatnonzero((vals.view(np.uint32) != want_x[t.name].view(np.uint32)).any(axis=1))
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
            sim.schedule(0.0, self._publisher_restart, self._final_restart_with_state())
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
        want = self.expected()
        heads = self._heads()
        converged_after = None
        while True:
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
        return {"seed": self.seed, "converged_after_s": converged_after, "faults": dict(sorted(self.faults.items())),
                "frames_delivered": self.cluster.delivered_frames, "frames_replayed": replayed,
                "messages_dropped": dict(self.net.dropped), "duplicated": self.net.duplicated,
                "rejected": dict(self.cluster.rejected), "events": sim.events,
                "rollbacks": [{"id": r.rid, "cut": r.cut, "at": round(r.at, 6)} for r in self.ref_rollbacks],
                "violations": [v.to_dict() for v in self.violations.values()],
                "wall_s": time.perf_counter() - wall0}

    def _final_restart_with_state(self) -> bool:
        """Whether the publisher restart still due at the end of the fault phase keeps state."""
        last = [e for e in self.plan.episodes if e.kind == "publisher_restart"]
        return bool(last[-1].args[0]) if last else True

    def _restart_now(self, nid: str) -> None:
        node = self.cluster.nodes[nid]
        # The crashed object still holds exactly what it held at the crash.
        self._restart(nid, (node.models[MODEL_NAME].store.copy(), node.export_state(MODEL_NAME),
                            node.members.me.incarnation))


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
    for r in per_seed:
        totals.update(r["faults"])
        totals.update({"messages_duplicated": r["duplicated"]})
        totals.update({f"messages_dropped_{k}": v for k, v in r["messages_dropped"].items()})
    conv = [r["converged_after_s"] for r in per_seed if r["converged_after_s"] is not None]
    result = {"seeds": seeds, "first_seed": first_seed, "replicas": cfg.replicas, "dcs": min(cfg.dcs, cfg.replicas),
              "convergence_bound_s": cfg.convergence_bound_s, "fault_phase_s": cfg.fault_phase_s,
              "config": asdict(cfg), "invariants": list(INVARIANTS),
              "violations": [v for r in per_seed for v in r["violations"]],
              "faults": dict(sorted(totals.items())),
              "max_converged_after_s": max(conv) if conv else None,
              "per_seed": per_seed, "wall_s": time.perf_counter() - wall0, "cpu_s": time.process_time() - cpu0}
    if out is not None:
        path = Path(out)
        path.mkdir(parents=True, exist_ok=True)
        (path / "results.json").write_text(json.dumps(result, indent=2, sort_keys=True))
    return result
