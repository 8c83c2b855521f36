"""Fault-injection harness (issue 7): seeded chaos runs of the real node code, invariants checked.

``ekko sim faults --seeds N [--seed S] [--replicas R] --out DIR`` runs N scenarios
(seeds S, S+1, ...).  Each one drives real :class:`ekko.node.ReplicaNode` objects in
full mode (real values) through :class:`simulator.replicas.SimCluster` on a
:class:`simulator.network.WanNetwork` of :data:`NUM_DCS` data centres, with a small
model (:data:`SPEC`: one sparse and one dense table).  Everything below is drawn from
the seed, so a failing seed replays exactly with ``--seed S --seeds 1``.

Injected (per seed, during the first :data:`FAULT_PHASE_S` simulated seconds):

* message loss (a background probability and timed loss spikes), duplication, and
  reordering with delay spikes of up to :data:`MAX_REORDER_DELAY_MS`;
* partitions: random halves of the replicas, one DC isolated, and a one-way cut
  between two DCs, each for a few seconds;
* replica crashes and restarts: at crash time the node's durable state is taken
  (``export_state`` + a copy of its store, what a snapshot at shutdown holds); the
  restart builds a *new* :class:`ReplicaNode` (higher incarnation, fresh rng) and
  installs that state with :meth:`ReplicaNode.import_state`, as the daemon does;
* a publisher (:class:`ekko.chain.PublisherChain`) publishing every
  :data:`PUBLISH_INTERVAL_S` to the ingest replica, or to another live replica
  (same chain) while the ingest is down.  A frame counts as acknowledged when
  ``publish`` returned; a refused frame is retried, like the SDK does.

The pull answer budget is made small (:data:`PULL_RESPONSE_BYTES`) so that truncated
answers (``cut_below``) are exercised, not only the happy path.

Then every fault stops (heal, loss 0, every crashed replica restarted; duplication and
reordering stay on) and the harness checks:

1. convergence: within :data:`CONVERGENCE_BOUND_S` simulated seconds every replica
   holds bit-identical versions and values to the publisher's latest state, and its
   knowledge of every shard covers the publisher's last counter there;
2. (no lost acknowledged update: implied by 1, every publish counted was acknowledged);
3. monotonicity: every :data:`SAMPLE_INTERVAL_S`, and right after each restart, each
   replica's per-row versions and per-shard knowledge are compared with its previous
   sample (kept across restarts by node id): nothing may go backwards;
4. idempotence: a random subset (up to :data:`REPLAY_FRAMES`) of frames delivered
   during the run, publishes included, is delivered again to the same replicas; after
   :data:`REPLAY_QUIET_S` seconds, versions, values and knowledge must be unchanged.

Each violation names the seed, the invariant and the first divergence (replica,
table, row or shard).  What is not injected: corrupt or malicious frames (invariant
6), rollbacks (5), loss of state since the last snapshot (a crash here keeps the
state of the moment it crashed), clock skew, and faults of the publisher itself.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ekko.chain import PendingFrame, PublisherChain
from ekko.codec import MsgType
from ekko.config import NodeConfig
from ekko.errors import ProtocolError, UsageError
from ekko.node import ReplicaNode
from ekko.spec import ModelSpec, TableSpec
from ekko.store import ModelStore
from ekko.version import HLC_EPOCH_MS, Knowledge, counters_of
from simulator.events import Simulation
from simulator.network import WanConfig, WanNetwork
from simulator.replicas import SimCluster

#: the model every scenario publishes: small enough for full mode in CI.
MODEL_NAME = "chaos"
SPEC = ModelSpec(MODEL_NAME, [TableSpec("emb", rows=512, dim=4, shards=8),
                              TableSpec("dense", rows=16, dim=8, dense=True)])
#: data centres of every scenario (replicas are placed round-robin over them).
NUM_DCS = 3
#: default replicas (3 DCs x 3).
DEFAULT_REPLICAS = 9
#: origin id of the publisher.
PUBLISHER_ORIGIN = 1
#: simulated seconds during which faults are injected and the publisher publishes.
FAULT_PHASE_S = 12.0
#: seconds between two publishes.
PUBLISH_INTERVAL_S = 0.2
#: most rows of the sparse table in one publish.
MAX_ROWS_PER_PUBLISH = 24
#: convergence bound: simulated seconds after the faults stop.
CONVERGENCE_BOUND_S = 60.0
#: step at which convergence is checked after the faults stop.
CHECK_STEP_S = 0.5
#: seconds between monotonicity samples.
SAMPLE_INTERVAL_S = 0.25
#: delivered frames kept (reservoir sample) for the idempotence replay.
REPLAY_FRAMES = 300
#: simulated seconds run before and after the replay (state compared across it).
REPLAY_QUIET_S = 3.0
#: pull answer budget, bytes: small so answers get truncated (``cut_below``).
PULL_RESPONSE_BYTES = 2048
#: background loss, duplication, reordering drawn in [0, these].
MAX_LOSS = 0.08
MAX_DUPLICATE = 0.08
MAX_REORDER = 0.15
#: bound of a reordering delay spike, ms.
MAX_REORDER_DELAY_MS = 1500.0
#: loss probability during a loss spike.
LOSS_SPIKE = 0.5
#: timed fault episodes per seed, and their length bounds (seconds).
MIN_EPISODES, MAX_EPISODES = 3, 7
MIN_EPISODE_S, MAX_EPISODE_S = 0.5, 4.0
#: most replicas down at once (never all of them).
MAX_DOWN = 2
#: one-way RTT range between DCs, ms.
MIN_RTT_MS, MAX_RTT_MS = 30.0, 160.0

EPISODE_KINDS = ("partition_halves", "isolate_dc", "one_way_cut", "crash", "loss_spike")
INVARIANTS = ("convergence", "monotonicity", "idempotence")


@dataclass
class Episode:
    """One timed fault: ``kind`` from :data:`EPISODE_KINDS`, active on ``[start, start + length)``."""

    start: float
    length: float
    kind: str
    args: tuple[Any, ...] = ()


@dataclass
class FaultPlan:
    """The faults of one seed, all drawn from it.

    Example:
        >>> p = FaultPlan.draw(3, ["r0", "r1", "r2"], ["dc0", "dc1", "dc2"])
        >>> p == FaultPlan.draw(3, ["r0", "r1", "r2"], ["dc0", "dc1", "dc2"])
        True
        >>> all(0 <= e.start < FAULT_PHASE_S for e in p.episodes)
        True
    """

    loss: float
    duplicate: float
    reorder: float
    reorder_delay_ms: float
    rtt_ms: dict[tuple[str, str], float]
    episodes: list[Episode] = field(default_factory=list)

    @classmethod
    def draw(cls, seed: int, nodes: list[str], dcs: list[str]) -> "FaultPlan":
        rng = random.Random(f"ekko-faults/{seed}")
        rtt = {(a, b): round(rng.uniform(MIN_RTT_MS, MAX_RTT_MS), 1)
               for i, a in enumerate(dcs) for b in dcs[i + 1:]}
        plan = cls(loss=rng.uniform(0, MAX_LOSS), duplicate=rng.uniform(0, MAX_DUPLICATE),
                   reorder=rng.uniform(0, MAX_REORDER), reorder_delay_ms=rng.uniform(50, MAX_REORDER_DELAY_MS),
                   rtt_ms=rtt)
        for _ in range(rng.randint(MIN_EPISODES, MAX_EPISODES)):
            kind = rng.choice(EPISODE_KINDS)
            start = rng.uniform(0.5, FAULT_PHASE_S - 0.5)
            length = min(rng.uniform(MIN_EPISODE_S, MAX_EPISODE_S), FAULT_PHASE_S - start)
            if kind == "partition_halves":
                shuffled = nodes[:]
                rng.shuffle(shuffled)
                half = rng.randint(1, len(nodes) - 1) if len(nodes) > 1 else 1
                args: tuple[Any, ...] = (tuple(sorted(shuffled[:half])),)
            elif kind == "isolate_dc":
                args = (rng.choice(dcs),)
            elif kind == "one_way_cut":
                a, b = rng.sample(dcs, 2) if len(dcs) > 1 else (dcs[0], dcs[0])
                args = (a, b)
            elif kind == "crash":
                args = (rng.choice(nodes),)
            else:
                args = ()
            plan.episodes.append(Episode(start, length, kind, args))
        plan.episodes.sort(key=lambda e: e.start)
        return plan


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


class FaultRun:
    """One seeded chaos scenario: build, inject, heal, check.

    Example:
        >>> r = FaultRun(seed=1).run()        # doctest: +SKIP
        >>> r["violations"]                   # doctest: +SKIP
        []
    """

    def __init__(self, seed: int, replicas: int = DEFAULT_REPLICAS, config: NodeConfig | None = None) -> None:
        if replicas < 2:
            raise UsageError("--replicas must be >= 2")
        self.seed = seed
        self.sim = Simulation(seed)
        self.dcs = [f"dc{i}" for i in range(min(NUM_DCS, replicas))]
        self.node_ids = [f"r{i}" for i in range(replicas)]
        self.node_dc = {n: self.dcs[i % len(self.dcs)] for i, n in enumerate(self.node_ids)}
        self.plan = FaultPlan.draw(seed, self.node_ids, self.dcs)
        wan = WanConfig(self.dcs, rtt_ms=self.plan.rtt_ms, loss=self.plan.loss, duplicate=self.plan.duplicate,
                        reorder=self.plan.reorder, reorder_delay_ms=self.plan.reorder_delay_ms, jitter_ms=5.0)
        self.net = WanNetwork(self.sim, wan)
        self.config = config or NodeConfig(pull_response_bytes=PULL_RESPONSE_BYTES)
        self.cluster = _RecordingCluster(self.sim, self.net, self.config, with_values=True)
        for n in self.node_ids:
            self.cluster.add_replica(n, self.node_dc[n])
        self.cluster.bootstrap_membership()
        self.cluster.register_everywhere(SPEC)
        self.ingest = self.node_ids[0]
        self.rng = self.sim.derive_rng("harness")
        self.np_rng = self.sim.derive_np_rng("values")
        self.chain = PublisherChain(PUBLISHER_ORIGIN)
        self.truth_v = {t.name: np.zeros(t.rows, np.int64) for t in SPEC.tables}
        self.truth_x = {t.name: np.zeros((t.rows, t.dim), np.float32) for t in SPEC.tables}
        self.pending: PendingFrame | None = None
        self.faults: Counter[str] = Counter()
        self.violations: dict[str, Violation] = {}
        self.samples: dict[str, tuple[dict[str, np.ndarray], dict[tuple[str, int], dict[int, int]]]] = {}
        self.restarts: Counter[str] = Counter()
        self.isolated: list[Any] | None = None

    # -- recording -------------------------------------------------------------------
    def _violate(self, invariant: str, replica: str, **kw: Any) -> None:
        cur = self.violations.get(invariant)
        if cur is None:
            self.violations[invariant] = Violation(self.seed, invariant, replica, **kw)
        else:
            cur.count += 1

    def _sample(self, nid: str) -> None:
        """Invariant 3: compare a live replica with its previous sample, then keep this one."""
        node = self.cluster.nodes[nid]
        vers = {t.name: node.table_store(MODEL_NAME, t.name).versions.copy() for t in SPEC.tables}
        know = _knowledge(node)
        prev = self.samples.get(nid)
        if prev is not None:
            pv, pk = prev
            for t, old in pv.items():
                back = np.flatnonzero(vers[t] < old)
                if len(back):
                    r = int(back[0])
                    self._violate("monotonicity", nid, table=t, row=r,
                                  detail=f"row version {int(old[r])} -> {int(vers[t][r])} at t={self.sim.now:.3f}")
            for (t, s), entries in pk.items():
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
    def _publish(self) -> None:
        if self.pending is None:
            n = self.rng.randint(1, MAX_ROWS_PER_PUBLISH)
            tables: dict[str, tuple[np.ndarray, np.ndarray]] = {}
            for t in SPEC.tables:
                if t.dense and self.rng.random() > 0.3:
                    continue
                k = t.rows if t.dense else min(n, t.rows)
                ids = np.sort(self.np_rng.choice(t.rows, size=k, replace=False)).astype(np.int64)
                tables[t.name] = (ids, self.np_rng.standard_normal((k, t.dim)).astype(np.float32))
            self.pending = self.chain.frame(SPEC, tables, now_ms=HLC_EPOCH_MS + self.sim.now * 1000)
            self._pending_tables = tables
        live = self.cluster.live()
        target = self.ingest if self.ingest in live else self.rng.choice(live)
        if target != self.ingest:
            self.faults["publishes_rerouted"] += 1
        try:
            self.cluster.call(target, "publish", self.pending.body, self.sim.now)
        except (ProtocolError, UsageError) as e:
            self.faults["publishes_refused"] += 1
            self.faults[f"publish_refused:{getattr(e, 'reason', 'usage')}"] += 1
            return  # retried next interval, same frame
        self.cluster.keep(("publisher", target, (MsgType.PUBLISH, self.pending.body)))
        self.chain.acked(self.pending)
        versions = self.chain.versions_of(self.pending)
        for t, (ids, vals) in self._pending_tables.items():
            self.truth_v[t][ids] = versions[t]
            self.truth_x[t][ids] = vals
        self.faults["publishes"] += 1
        self.pending = None

    # -- faults ------------------------------------------------------------------------
    def _crash(self, nid: str, length: float) -> None:
        live = self.cluster.live()
        if nid not in live or len(self.node_ids) - len(live) >= MAX_DOWN or len(live) <= 1:
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

    def _apply_partition(self) -> None:
        self.net.heal()
        if self.isolated is not None:
            self.net.partition(self.isolated)

    def _start(self, e: Episode) -> None:
        if e.kind == "crash":
            self._crash(e.args[0], e.length)
            return
        self.faults[e.kind] += 1
        if e.kind == "partition_halves":
            self.net.heal()
            self.net.partition([list(e.args[0])])
        elif e.kind == "isolate_dc":
            self.net.heal()
            self.net.partition([[e.args[0]]])
        elif e.kind == "one_way_cut":
            self.net.cut(*e.args)
        elif e.kind == "loss_spike":
            self.net.set_loss(LOSS_SPIKE)
        self.sim.schedule(e.length, self._end, e)

    def _end(self, e: Episode) -> None:
        if e.kind == "loss_spike":
            self.net.set_loss(self.plan.loss)
        elif e.kind == "one_way_cut":
            self.net.uncut(*e.args)
        else:
            self.net.heal()

    def _stop_faults(self) -> None:
        self.net.heal()
        self.net.set_loss(0.0)

    # -- checks ------------------------------------------------------------------------
    def _divergence(self) -> tuple[str, dict[str, Any]] | None:
        """The first replica (and table, row or shard) not at the publisher's state."""
        heads: dict[tuple[str, int], int] = {}
        for t in SPEC.tables:
            c = counters_of(self.truth_v[t.name])
            for s in range(t.num_shards):
                lo, hi = t.shard_range(s)
                heads[(t.name, s)] = int(c[lo:hi].max(initial=0))
        for nid in self.node_ids:
            node = self.cluster.nodes[nid]
            for t in SPEC.tables:
                ts = node.table_store(MODEL_NAME, t.name)
                bad = np.flatnonzero(ts.versions != self.truth_v[t.name])
                if len(bad):
                    r = int(bad[0])
                    return nid, {"table": t.name, "row": r, "detail": f"version {int(ts.versions[r])}, publisher "
                                 f"{int(self.truth_v[t.name][r])} ({len(bad)} rows differ)"}
                vals = ts.values.numpy()
                bad = np.flatnonzero((vals.view(np.uint32) != self.truth_x[t.name].view(np.uint32)).any(axis=1))
                if len(bad):
                    return nid, {"table": t.name, "row": int(bad[0]),
                                 "detail": f"values differ at equal versions ({len(bad)} rows)"}
            know = _knowledge(node)
            for (t, s), head in heads.items():
                have = know.get((t, s), {}).get(PUBLISHER_ORIGIN, 0)
                if head and have < head:
                    return nid, {"table": t, "shard": s,
                                 "detail": f"knowledge {have} below the publisher's last counter {head}"}
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
        for e in self.plan.episodes:
            sim.schedule_at(e.start, self._start, e)
        publishing = sim.every(PUBLISH_INTERVAL_S, self._publish, start=PUBLISH_INTERVAL_S / 2)
        sampling = sim.every(SAMPLE_INTERVAL_S, self._sample_all, start=SAMPLE_INTERVAL_S / 3)
        sim.run(until=FAULT_PHASE_S)
        publishing.cancel()
        while self.pending is not None:  # the last frame: retry until acknowledged
            self._publish()
        self._stop_faults()
        # Restart whoever is still down (their pending restarts become no-ops).
        for nid in self.node_ids:
            if not self.net.is_up(nid):
                sim.schedule(0.0, self._restart_now, nid)
        sim.run(until=sim.now + 1e-6)
        end = FAULT_PHASE_S + CONVERGENCE_BOUND_S
        converged_after = None
        while True:
            div = self._divergence()
            if div is None:
                converged_after = sim.now - FAULT_PHASE_S
                break
            if sim.now >= end:
                nid, where = div
                where["detail"] = f"not converged {CONVERGENCE_BOUND_S:g} s after faults stopped: {where['detail']}"
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
        return {"seed": self.seed, "converged_after_s": converged_after, "faults": dict(sorted(self.faults.items())),
                "frames_delivered": self.cluster.delivered_frames, "frames_replayed": replayed,
                "messages_dropped": dict(self.net.dropped), "duplicated": self.net.duplicated,
                "rejected": dict(self.cluster.rejected), "events": sim.events,
                "violations": [v.to_dict() for v in self.violations.values()],
                "wall_s": time.perf_counter() - wall0}

    def _restart_now(self, nid: str) -> None:
        node = self.cluster.nodes[nid]
        # The crashed object still holds exactly what it held at the crash.
        self._restart(nid, (node.models[MODEL_NAME].store.copy(), node.export_state(MODEL_NAME),
                            node.members.me.incarnation))


def run_faults(seeds: int, first_seed: int = 0, replicas: int = DEFAULT_REPLICAS,
               out: Path | str | None = None, config: NodeConfig | None = None) -> dict[str, Any]:
    """Run ``seeds`` scenarios from ``first_seed``; write ``results.json`` under ``out``.

    Example:
        >>> res = run_faults(1, first_seed=4)     # doctest: +SKIP
        >>> res["seeds"], res["violations"]       # doctest: +SKIP
        (1, [])
    """
    if seeds < 1:
        raise UsageError("--seeds must be >= 1")
    wall0 = time.perf_counter()
    per_seed = [FaultRun(s, replicas, config).run() for s in range(first_seed, first_seed + seeds)]
    totals: Counter[str] = Counter()
    for r in per_seed:
        totals.update(r["faults"])
        totals.update({"messages_duplicated": r["duplicated"]})
        totals.update({f"messages_dropped_{k}": v for k, v in r["messages_dropped"].items()})
    conv = [r["converged_after_s"] for r in per_seed if r["converged_after_s"] is not None]
    result = {"seeds": seeds, "first_seed": first_seed, "replicas": replicas, "dcs": min(NUM_DCS, replicas),
              "convergence_bound_s": CONVERGENCE_BOUND_S, "fault_phase_s": FAULT_PHASE_S,
              "violations": [v for r in per_seed for v in r["violations"]],
              "faults": dict(sorted(totals.items())),
              "max_converged_after_s": max(conv) if conv else None,
              "per_seed": per_seed, "wall_s": time.perf_counter() - wall0}
    if out is not None:
        path = Path(out)
        path.mkdir(parents=True, exist_ok=True)
        (path / "results.json").write_text(json.dumps(result, indent=2, sort_keys=True))
    return result
