"""One ekko-family system on its simulated WAN: build it (:func:`build_ekko_family`: replicas,
trainer, samples, scheduler), run it to convergence and collect its ``results.json`` entry.

Used by :mod:`simulator.experiment` (one process) and :mod:`simulator.parallel` (DCs
split over processes), which both sit above this module.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ekko.core.chain import PublisherChain
from ekko.core.errors import UsageError
from ekko.core.delta import WIRE_DTYPES
from ekko.core.hashed import values_of, with_keys
from ekko.core.hashed_slots import HashedSlots
from ekko.core.version import HLC_EPOCH_MS
from simulator.cpu import CpuModel
from simulator.events import Simulation
from simulator.measure import LatencyRecorder
from simulator.network import WanNetwork
from simulator.progress import progress_step
from simulator.replicas import SimCluster
from simulator.scenario import Scenario
from simulator.staleness import ClassAgreement, StalenessMeter, high_impact_cut
from simulator.truth import ROW_META_BYTES, TRAINER_ORIGIN, Truth, converged, place_replicas
from simulator.workload import UpdateBatch, Workload


def node_config_for(sc: Scenario, system: str):
    base = sc.node
    if system in ("ekko", "fifo", "ekko-uncongested", "ekko-replicated"):
        return base
    if system == "ekko-no-gateways":
        return base.replace(push=False, use_gateways=False)
    if system == "ekko-full-scan":
        return base.replace(push=False, use_gateways=False, use_shard_versions=False)
    if system == "random-gossip":
        return base.replace(push=True, push_mode="random", use_gateways=False)
    raise ValueError(system)


def _batch_values(sc: Scenario, batch: UpdateBatch, rng: np.random.Generator, truth: "Truth"):
    """New row values whose change has exactly the batch's impact as its L2 norm (so a
    replica that misses an update is off by that much: what the scheduler ranks by)."""
    if truth.values is None:
        return None
    t = sc.model.table(batch.table)
    old = values_of(truth.values[batch.table][batch.ids], t).astype(np.float64)
    step = rng.standard_normal((len(batch.ids), t.dim))
    step *= (batch.impact / np.linalg.norm(step, axis=1))[:, None]
    return (old + step).astype(WIRE_DTYPES[t.dtype])


def offered_burst_bytes_per_s(sc: Scenario) -> float:
    """Update bytes per second one WAN link is offered at the workload's peak (every
    update crosses each link once: value + id + version)."""
    peak = 1.0
    for b in sc.workload.bursts:
        peak = max(peak, b.multiplier)
    return sum(t.rows_per_s * peak * (sc.model.table(t.table).row_bytes + ROW_META_BYTES)
               for t in sc.workload.sparse)


def scheduler_kwargs(sc: Scenario, system: str) -> Callable[[str], dict[str, Any]] | None:
    """Per-DC node arguments that put the priority scheduler (or its FIFO baseline) on
    the push path, with the scenario's WAN budget."""
    if sc.scheduler is None or system not in ("ekko", "fifo", "ekko-uncongested"):
        return None
    from prioritizer import (LinkBudgets, Prioritizer, ThresholdTracker, fifo_queue_factory,
                             priority_queue_factory)
    cfg = sc.scheduler
    k = float(cfg.get("k_percent", 5.0))
    if "wan_budget_bytes_per_s" in cfg:
        rate = float(cfg["wan_budget_bytes_per_s"])
    else:
        rate = float(cfg.get("wan_budget_fraction_of_burst", 0.3)) * offered_burst_bytes_per_s(sc)
    budgets = (LinkBudgets(default_bytes_per_s=float("inf"), intra_dc_bytes_per_s=float("inf"))
               if system == "ekko-uncongested" else
               LinkBudgets(default_bytes_per_s=rate, intra_dc_bytes_per_s=float("inf")))
    seed = sc.seed

    def kwargs(dc: str) -> dict[str, Any]:
        prio = Prioritizer(threshold=ThresholdTracker(k, rng=seed))
        factory = fifo_queue_factory(dc, budgets) if system == "fifo" else priority_queue_factory(dc, budgets)
        return {"prioritizer": prio, "queue_factory": factory}

    return kwargs


@dataclass
class EkkoRun:
    """One ekko-family system set up on its simulated WAN, ready to run: what
    :func:`build_ekko_family` made and :func:`run_ekko_family` (or the partitioned
    driver, :mod:`simulator.parallel`) runs and collects."""

    sim: Simulation
    net: WanNetwork
    cluster: SimCluster
    rec: LatencyRecorder
    truth: "Truth"
    meter: "StalenessMeter | None" = None
    agreement: "ClassAgreement | None" = None
    workload: Workload | None = None



def build_ekko_family(sc: Scenario, system: str, queue_factory=None,
                      owned: frozenset[str] | None = None) -> EkkoRun:
    """Build one ekko-family system of a scenario: replicas, trainer, samples, at time 0
    (of the replicas ``owned`` only, in a partitioned run's worker: :class:`SimCluster`)."""
    if system == "ekko-replicated":
        # The same protocol with every shard on every replica: what a placed model's
        # bytes and memory per replica are held against, in the same run.
        sc = dataclasses.replace(sc, model=dataclasses.replace(sc.model, replicas_per_shard=0))
    elif sc.model.placed and owned is not None:
        raise UsageError("a placed model (replicas_per_shard) is not modelled in a partitioned run: drop --workers")
    sim = Simulation(sc.seed)
    net = WanNetwork(sim, sc.wan)
    with_values = sc.with_values
    cfg = node_config_for(sc, system)
    cpu = CpuModel(sc.cpu, sc.scan_scale()) if sc.cpu is not None else None
    cluster = SimCluster(sim, net, cfg, with_values=with_values, shared_membership=not with_values,
                         daemon_identities=sc.daemon_identities,
                         queue_factory=queue_factory, node_kwargs=scheduler_kwargs(sc, system), cpu=cpu,
                         owned=owned)
    placement = place_replicas(sc)
    for nid, dc in placement:
        cluster.add_replica(nid, dc)
    cluster.bootstrap_membership()
    cluster.register_everywhere(sc.model)
    ingest = next(n for n, dc in placement if dc == sc.training_dc)
    rec = LatencyRecorder([n for n, _ in placement], [dc for _, dc in placement], sc.training_dc)
    holders_of = None
    if sc.model.placed:
        # Each shard's rows are published to its holder in the training DC (what the daemon
        # a publisher talks to does by relaying), and followed at the holders only.
        view = cluster.nodes[ingest]
        view.peers.refresh_topology()
        order = [n for n, _ in placement]
        holders_of = {}
        for t in sc.model.tables:
            expect = np.zeros((t.num_shards, len(order)), bool)
            for dc in sc.wan.dc_names:
                for j, node in enumerate(order):
                    if placement[j][1] == dc:
                        expect[:, j] = view.placement.held(sc.model, t.name, node=node, dc=dc)
            rec.expect(t.name, expect, t.shard_rows)
            holders_of[t.name] = view.placement.owners(sc.model, t.name, sc.training_dc)
    cluster.on_apply.append(lambda nid, m, t, res, src, now: rec.applied(nid, t, res.ids, res.versions, now))
    truth = Truth(sc, with_values)
    chain = PublisherChain(TRAINER_ORIGIN)
    rng = sim.derive_np_rng("values")
    sample_rng = sim.derive_np_rng("samples")
    high_cut = high_impact_cut(sc)
    # The class of an update is the one the publishing replica's scheduler gives it
    # (``high`` = its estimate of the top k%), so latency is measured by the class
    # the queues act on; how well that estimate matches the top k% in hindsight is
    # reported separately (``class_agreement``).
    prio = getattr(cluster.nodes.get(ingest), "prioritizer", None)
    decided: list[Any] = []
    if prio is not None and high_cut is not None:
        prio.observers.append(lambda model, table, rows: decided.append(rows))
    agreement = ClassAgreement(sc) if prio is not None and high_cut is not None else None
    # A hashed table's batches name feature keys; the publisher assigns their slots (and
    # evicts) as the SDK does, and the rows carry the keys.
    slots = {t.name: HashedSlots(t) for t in sc.model.tables if t.hashed}

    def on_batch(batch: UpdateBatch) -> None:
        if not len(batch.ids):
            return
        t = sc.model.table(batch.table)
        keys = None
        if t.hashed:
            keys = batch.ids
            batch = batch._replace(ids=slots[t.name].assign(keys))
            truth.keys_evicted = sum(s.evicted for s in slots.values())
        values = _batch_values(sc, batch, rng, truth)
        if keys is not None and values is not None:
            values = with_keys(values, keys, t)
        parts = [(ingest, batch, values)]
        if holders_of is not None and batch.table in holders_of:
            dest = holders_of[batch.table][t.shards_of(batch.ids)]
            parts = [(node, batch._replace(ids=batch.ids[dest == node], impact=batch.impact[dest == node]),
                      None if values is None else values[dest == node]) for node in sorted(set(dest.tolist()))]
        for to, part, vals in parts:
            frame = chain.frame(sc.model, {part.table: (part.ids, vals)}, now_ms=HLC_EPOCH_MS + sim.now * 1000,
                                impact={part.table: part.impact})
            versions = chain.versions_of(frame)[part.table]
            truth.note(part.table, part.ids, versions, vals, t.row_bytes)
            # Later frames chain on this one (it is taken in order, deferred or not).
            chain.acked(frame)
            emitted = sim.now
            if high_cut is None:
                # Tracked at emission, in every worker of a partitioned run alike (whoever owns
                # the ingest replica, and however long the publish takes to reach it).
                rec.track(part.table, part.ids, versions, emitted, sc.samples_per_batch, sample_rng)
            # The publish reaches the ingest replica now, or after the publisher's and the
            # replica's receive work when the CPU model charges them (SimCluster.publish).
            cluster.publish(to, len(part.ids) * (t.row_bytes + ROW_META_BYTES),
                            lambda part=part, frame=frame, versions=versions, emitted=emitted, to=to:
                            ingest_batch(part, frame, versions, emitted, to))

    def ingest_batch(batch: UpdateBatch, frame: Any, versions: np.ndarray, emitted: float, ingest: str) -> None:
        decided.clear()
        # (A partitioned run's workers all draw every batch, so truth and samples agree;
        # only the worker that owns the ingest replica publishes: SimCluster.call.)
        cluster.call(ingest, "publish", frame.body, sim.now)
        if high_cut is None:
            # the publishing replica applied these rows now
            rec.applied(ingest, batch.table, batch.ids, versions, sim.now)
            return
        if decided:
            rows = decided[0]
            ids, vers, high = rows.ids, rows.versions, rows.high
            if agreement is not None:
                agreement.note(batch, rows)
        else:
            # no scheduler on the path: classify by the impact cut (the same top k%)
            ids, vers, high = batch.ids, versions, batch.impact >= high_cut
        for cls, sel in (("high", high), ("low", ~high)):
            rec.track(batch.table, ids[sel], vers[sel], emitted, sc.samples_per_batch, sample_rng, cls=cls)
        if decided:
            # tracked after the publish (the class is decided there): the publishing
            # replica applied these rows now
            rec.applied(ingest, batch.table, ids, vers, sim.now)

    workload = Workload(sc.workload, sim.derive_np_rng("workload"))
    workload.drive(sim, on_batch, until=sc.duration_s)
    meter = None
    if sc.scheduler is not None and with_values:
        meter = StalenessMeter(sc, workload, cluster, truth)
        step = float(sc.scheduler.get("staleness_interval_s", 0.05))
        # Offset by half a step so samples never coincide with batch emissions.
        sim.every(step, lambda: meter.sample(step), start=step / 2)
    return EkkoRun(sim, net, cluster, rec, truth, meter, agreement, workload)



def run_and_collect(sc, system, sim, net, cluster, rec, truth, progress) -> dict[str, Any]:
    end = sc.duration_s + sc.settle_s
    wall0 = time.perf_counter()
    t = 0.0
    converged_at = None
    while t < end:
        t = min(end, t + progress_step(sc))
        sim.run(until=t)
        if progress:
            progress(system, t, end)
        if t >= sc.duration_s and converged_at is None and converged(sc, cluster, truth):
            converged_at = t
            break
    wall = time.perf_counter() - wall0
    nodes = cluster.nodes.values()
    out = collect_results(
        sc, rec, truth, wan_bytes=net.wan_bytes, bytes_by_type=cluster.bytes_by_type,
        converged_at=converged_at, events=sim.events, wall=wall, rejected=cluster.rejected,
        rows_scanned=sum(n.counters["rows_scanned"] for n in nodes),
        rows_walked=sum(n.counters["rows_walked"] for n in nodes),
        cpu=cluster.cpu.summary() if cluster.cpu is not None else None)
    out["per_replica"] = per_replica(sc, cluster)
    return out


def per_replica(sc: Scenario, cluster: SimCluster) -> dict[str, Any]:
    """Per live replica: frame bytes sent plus received (LAN and WAN), and table memory --
    values of the shards it keeps (every shard unless placed) plus 9 bytes a row of
    versions and tombstones -- against a replica holding the whole model."""
    live = cluster.live()
    traffic = np.array([cluster.bytes_in.get(n, 0) + cluster.bytes_out.get(n, 0) for n in live], np.float64)
    full = sum(t.rows * (t.row_bytes + 9) for t in sc.model.tables)
    table = []
    for n in live:
        total = 0
        for t in sc.model.tables:
            ts = cluster.nodes[n].table_store(sc.model.name, t.name)
            kept = t.rows if ts.blocks is None else int(ts.blocks.held.sum()) * t.shard_rows
            total += kept * t.row_bytes + t.rows * 9
        table.append(total)
    tb = np.array(table, np.float64)
    return {"replicas": len(live), "traffic_bytes_mean": float(traffic.mean()) if len(live) else 0.0,
            "traffic_bytes_max": float(traffic.max()) if len(live) else 0.0,
            "table_bytes_mean": float(tb.mean()) if len(live) else 0.0,
            "table_bytes_max": float(tb.max()) if len(live) else 0.0, "table_bytes_full": full}



def collect_results(sc: Scenario, rec: LatencyRecorder, truth: Truth, *, wan_bytes: dict[tuple[str, str], int],
                    bytes_by_type: dict[str, int], converged_at: float | None, events: int, wall: float,
                    rejected: dict[str, int], rows_scanned: int, rows_walked: int,
                    cpu: dict[str, float] | None) -> dict[str, Any]:
    """One ekko-family system's entry of ``results.json`` (plus private plot arrays)."""
    lat = rec.summary()
    return {
        "latency_s": {k: lat[k] for k in ("intra_dc", "cross_dc", "all")},
        "latency_per_dc_s": lat["per_dc"],
        "latency_by_class_s": rec.by_class(),
        "unapplied_samples": lat["missing"],
        "wan_bytes": int(sum(wan_bytes.values())),
        "wan_bytes_by_link": {f"{a}->{b}": int(v) for (a, b), v in sorted(wan_bytes.items())},
        "wan_bytes_min": int(truth.bytes_published * (len(sc.wan.dc_names) - 1)),
        "bytes_by_message": dict(sorted(bytes_by_type.items())),
        "rows_published": truth.rows_published,
        "keys_evicted": truth.keys_evicted,
        "converged": converged_at is not None,
        "converged_at_s": converged_at,
        "events": events,
        "wall_s": wall,
        "rejected": dict(rejected),
        "rows_scanned": rows_scanned,
        "rows_walked": rows_walked,
        "cpu": cpu,
        "_latency_matrix": rec.matrix(),
        "_replica_dcs": rec.dcs,
    }
