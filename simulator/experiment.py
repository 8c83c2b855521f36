"""Run a scenario: every system on the same WAN, workload and seed.

Systems built from the production node (:class:`ekko.replica.node.ReplicaNode` driven
by :class:`simulator.replicas.SimCluster`), differing only in configuration:

* ``ekko`` -- the scenario's node config: gateways, shard versions, eager push.
* ``ekko-no-gateways`` -- anti-entropy with shard versions, random partners in
  any DC, no eager push (the paper's ablation step without local leaders).
* ``ekko-full-scan`` -- as above but without shard versions: every round asks for
  every shard, and the responder finds what the requester lacks by comparing the
  version of every row of those shards (no recent-row index; the paper's first
  ablation step).
* ``random-gossip`` -- rumor-mongering push to random peers (no topology) plus
  random-partner anti-entropy.
* ``fifo`` -- ``ekko`` with FIFO link queues (the scheduler's baseline).

The full-scan step.  In the paper a sync without shard versions compares the version
of every parameter of a terabyte-scale model, which costs CPU time in proportion to
the model.  Here that cost is counted, not assumed: with ``use_shard_versions=False``
the production node scans every row of each requested shard and counts the rows it
compared (``rows_walked``), and the endpoint CPU model (:mod:`simulator.cpu`, a
scenario's ``[cpu]`` table, constants measured by ``bench/sim_cpu_costs.py``) charges
every ekko-family system alike for messages, applied rows, rows walked -- scaled by
the table's ``cold_rows``, the rows a real replica holds that the run never updates
(``paper``: a 1e9-row user table, from the Ekko abstract's "over a billion users") --
and index candidates.  Without a ``[cpu]`` table nothing is charged and the full scan
comes out about as fast as ``ekko-no-gateways``: its answers still carry only the
changed rows, a scan is then free, and it even skips the summary -> digest round trip
that shard versions add.  With the ``paper`` constants one full scan of the ``emb``
table costs a replica about 1e9 * 3.95 ns = 4 s of its one core, more than the 1 s
anti-entropy interval, so the replicas' cores saturate and ``ekko-full-scan`` does not
converge within the run (see the README's simulator section for measured figures); no
scenario value was changed to get there.

Baselines with their own small drivers (:mod:`simulator.baselines`):
``direct-push``, ``adam-2pc``, ``broadcast``.

Each system runs in a fresh :class:`Simulation` with the scenario's seed, so the
workload (drawn from its own derived stream) is identical across systems.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ekko.core.chain import PublisherChain
from ekko.core.delta import WIRE_DTYPES
from ekko.core.errors import UsageError
from ekko.core.version import HLC_EPOCH_MS
from simulator.cpu import CpuModel
from simulator.events import Simulation
from simulator.measure import LatencyRecorder, peak_rss_mb
from simulator.network import WanNetwork
from simulator.replicas import SimCluster
from simulator.scenario import MODEL_NAME, Scenario
from simulator.workload import UpdateBatch, Workload

#: bytes of id + version each row costs on the wire besides its value.
ROW_META_BYTES = 16
#: origin id of the simulated trainer.
TRAINER_ORIGIN = 1
Progress = Callable[[str, float, float], None]


def place_replicas(sc: Scenario) -> list[tuple[str, str]]:
    """Replicas spread evenly over the DCs, round-robin: (node id, dc)."""
    dcs = sc.wan.dc_names
    return [(f"r{i:05d}", dcs[i % len(dcs)]) for i in range(sc.replicas)]


def node_config_for(sc: Scenario, system: str):
    base = sc.node
    if system in ("ekko", "fifo", "ekko-uncongested"):
        return base
    if system == "ekko-no-gateways":
        return base.replace(push=False, use_gateways=False)
    if system == "ekko-full-scan":
        return base.replace(push=False, use_gateways=False, use_shard_versions=False)
    if system == "random-gossip":
        return base.replace(push=True, push_mode="random", use_gateways=False)
    raise ValueError(system)


class Truth:
    """What the trainer published: the latest version (and value) of every row."""

    def __init__(self, sc: Scenario, with_values: bool) -> None:
        self.versions = {t.name: np.zeros(t.rows, np.int64) for t in sc.model.tables}
        self.values = ({t.name: np.zeros((t.rows, t.dim), WIRE_DTYPES[t.dtype]) for t in sc.model.tables}
                       if with_values else None)
        self.rows_published = 0
        self.bytes_published = 0

    def note(self, table: str, ids: np.ndarray, versions: np.ndarray, values: np.ndarray | None, row_bytes: int):
        self.versions[table][ids] = versions
        if self.values is not None and values is not None:
            self.values[table][ids] = values
        self.rows_published += len(ids)
        self.bytes_published += len(ids) * (row_bytes + ROW_META_BYTES)


def _batch_values(sc: Scenario, batch: UpdateBatch, rng: np.random.Generator, truth: "Truth"):
    """New row values whose change has exactly the batch's impact as its L2 norm (so a
    replica that misses an update is off by that much: what the scheduler ranks by)."""
    if truth.values is None:
        return None
    t = sc.model.table(batch.table)
    old = truth.values[batch.table][batch.ids].astype(np.float64)
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
    agreement: "_ClassAgreement | None" = None
    workload: Workload | None = None


def run_ekko_family(sc: Scenario, system: str, progress: Progress | None = None,
                    queue_factory=None, workers: int = 1) -> dict[str, Any]:
    """Run one ekko-family system of a scenario and collect its results.

    ``workers > 1`` splits the DCs over that many processes (:mod:`simulator.parallel`);
    the same seed and worker count give the same results.
    """
    if workers > 1:
        from simulator.parallel import run_partitioned

        return run_partitioned(sc, system, workers, progress, queue_factory)
    run = build_ekko_family(sc, system, queue_factory)
    out = _run_and_collect(sc, system, run.sim, run.net, run.cluster, run.rec, run.truth, progress)
    if run.meter is not None:
        out["weighted_staleness_error"] = run.meter.total
    if run.agreement is not None:
        run.agreement.weights = _access_weights(sc, run.workload)
        out["class_agreement"] = run.agreement.summary()
    cluster = run.cluster
    if cluster.nodes and any(n.prioritizer is not None for n in cluster.nodes.values()):
        out["wan_budget_bytes_per_s"] = None if system == "ekko-uncongested" else (
            float(sc.scheduler["wan_budget_bytes_per_s"]) if "wan_budget_bytes_per_s" in sc.scheduler else
            float(sc.scheduler.get("wan_budget_fraction_of_burst", 0.3)) * offered_burst_bytes_per_s(sc))
        out["offered_burst_bytes_per_s"] = offered_burst_bytes_per_s(sc)
    return out


def build_ekko_family(sc: Scenario, system: str, queue_factory=None,
                      owned: frozenset[str] | None = None) -> EkkoRun:
    """Build one ekko-family system of a scenario: replicas, trainer, samples, at time 0
    (of the replicas ``owned`` only, in a partitioned run's worker: :class:`SimCluster`)."""
    sim = Simulation(sc.seed)
    net = WanNetwork(sim, sc.wan)
    with_values = sc.with_values
    cfg = node_config_for(sc, system)
    cpu = CpuModel(sc.cpu, sc.scan_scale()) if sc.cpu is not None else None
    cluster = SimCluster(sim, net, cfg, with_values=with_values, shared_membership=not with_values,
                         queue_factory=queue_factory, node_kwargs=scheduler_kwargs(sc, system), cpu=cpu,
                         owned=owned)
    placement = place_replicas(sc)
    for nid, dc in placement:
        cluster.add_replica(nid, dc)
    cluster.bootstrap_membership()
    cluster.register_everywhere(sc.model)
    ingest = next(n for n, dc in placement if dc == sc.training_dc)
    rec = LatencyRecorder([n for n, _ in placement], [dc for _, dc in placement], sc.training_dc)
    cluster.on_apply.append(lambda nid, m, t, res, src, now: rec.applied(nid, t, res.ids, res.versions, now))
    truth = Truth(sc, with_values)
    chain = PublisherChain(TRAINER_ORIGIN)
    rng = sim.derive_np_rng("values")
    sample_rng = sim.derive_np_rng("samples")
    high_cut = _high_impact_cut(sc)
    # The class of an update is the one the publishing replica's scheduler gives it
    # (``high`` = its estimate of the top k%), so latency is measured by the class
    # the queues act on; how well that estimate matches the top k% in hindsight is
    # reported separately (``class_agreement``).
    prio = getattr(cluster.nodes.get(ingest), "prioritizer", None)
    decided: list[Any] = []
    if prio is not None and high_cut is not None:
        prio.observers.append(lambda model, table, rows: decided.append(rows))
    agreement = _ClassAgreement(sc) if prio is not None and high_cut is not None else None

    def on_batch(batch: UpdateBatch) -> None:
        if not len(batch.ids):
            return
        t = sc.model.table(batch.table)
        values = _batch_values(sc, batch, rng, truth)
        frame = chain.frame(sc.model, {batch.table: (batch.ids, values)}, now_ms=HLC_EPOCH_MS + sim.now * 1000,
                            impact={batch.table: batch.impact})
        versions = chain.versions_of(frame)[batch.table]
        truth.note(batch.table, batch.ids, versions, values, t.row_bytes)
        decided.clear()
        emitted = sim.now
        # (A partitioned run's workers all draw every batch, so truth and samples agree;
        # only the worker that owns the ingest replica publishes: SimCluster.call.)
        cluster.call(ingest, "publish", frame.body, sim.now)
        chain.acked(frame)
        if high_cut is None:
            rec.track(batch.table, batch.ids, versions, emitted, sc.samples_per_batch, sample_rng)
            # tracked after the publish: the publishing replica applied these rows at emission
            rec.applied(ingest, batch.table, batch.ids, versions, emitted)
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
            # replica applied these rows at emission
            rec.applied(ingest, batch.table, ids, vers, emitted)

    workload = Workload(sc.workload, sim.derive_np_rng("workload"))
    workload.drive(sim, on_batch, until=sc.duration_s)
    meter = None
    if sc.scheduler is not None and with_values:
        meter = StalenessMeter(sc, workload, cluster, truth)
        step = float(sc.scheduler.get("staleness_interval_s", 0.05))
        # Offset by half a step so samples never coincide with batch emissions.
        sim.every(step, lambda: meter.sample(step), start=step / 2)
    return EkkoRun(sim, net, cluster, rec, truth, meter, agreement, workload)


def _high_impact_cut(sc: Scenario) -> float | None:
    """Impact above which an update counts as "high" for the per-class latencies: the
    (100 - k)th percentile of the workload's log-normal impact (the scheduler's own
    threshold estimates the same quantile online)."""
    if sc.scheduler is None or not sc.workload.sparse:
        return None
    from statistics import NormalDist
    k = float(sc.scheduler.get("k_percent", 5.0))
    sigma = sc.workload.sparse[0].impact_sigma
    return float(np.exp(sigma * NormalDist().inv_cdf(1 - k / 100)))


def _access_weights(sc: Scenario, workload: Workload) -> dict[str, np.ndarray]:
    """Each row's share of inference lookups: its Zipf popularity, normalised per table."""
    weights: dict[str, np.ndarray] = {}
    for st in sc.workload.sparse:
        z = workload.zipf(st.model, st.table)
        rank = np.empty(st.rows, np.float64)
        rank[z.ids_of_ranks(np.arange(1, st.rows + 1))] = np.arange(1, st.rows + 1)
        w = rank ** -st.zipf_s
        weights[st.table] = w / w.sum()
    return weights


class _ClassAgreement:
    """How well the scheduler's online top-k% matches the top k% in hindsight.

    Hindsight priority of an update = its impact (the change's L2 norm) times its
    row's true share of lookups, i.e. what the update adds to the access-weighted
    staleness error per unit time it is missing; the cut is the (100 - k)th
    percentile of that over every update of the run.  Reported as precision
    (share of updates the scheduler marked high that are in the hindsight top k%)
    and recall (share of the hindsight top k% that it marked high).
    """

    def __init__(self, sc: Scenario) -> None:
        self.k = float(sc.scheduler.get("k_percent", 5.0)) if sc.scheduler else 5.0
        self.parts: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]] = []
        self.weights: dict[str, np.ndarray] = {}

    def note(self, batch: UpdateBatch, rows: Any) -> None:
        order = np.argsort(batch.ids)
        pos = order[np.searchsorted(batch.ids[order], rows.ids)]
        self.parts.append((batch.table, rows.ids, batch.impact[pos].astype(np.float64), rows.high))

    def summary(self) -> dict[str, float]:
        if not self.parts:
            return {}
        prio = np.concatenate([imp * self.weights[t][ids] for t, ids, imp, _ in self.parts])
        high = np.concatenate([h for *_, h in self.parts])
        top = prio >= np.quantile(prio, 1 - self.k / 100)
        both = float(np.count_nonzero(top & high))
        return {"decided_high_fraction": float(high.mean()), "precision": both / max(1, int(high.sum())),
                "recall": both / max(1, int(top.sum()))}


class StalenessMeter:
    """Integrates the access-weighted squared error of every replica against the trainer.

    At each sample: sum over replicas and rows of ``w(row) * ||replica - trainer||^2``,
    with ``w`` the row's access frequency (its Zipf popularity, normalised), times
    the sampling step.  Needs full mode (values).
    """

    def __init__(self, sc: Scenario, workload: Workload, cluster: SimCluster, truth: Truth) -> None:
        self.sc, self.cluster, self.truth = sc, cluster, truth
        self.weights = _access_weights(sc, workload)
        self.total = 0.0

    def sample(self, dt: float) -> None:
        for table, w in self.weights.items():
            want_v = self.truth.versions[table]
            want = self.truth.values[table]
            for nid in self.cluster.live():
                ts = self.cluster.nodes[nid].table_store(MODEL_NAME, table)
                # Only rows not at the trainer's version can differ: compare just those.
                lag = np.flatnonzero(ts.versions != want_v)
                if len(lag):
                    got = ts.values.numpy()[lag].astype(np.float64)
                    err = ((got - want[lag].astype(np.float64)) ** 2).sum(axis=1)
                    self.total += float((err * w[lag]).sum()) * dt


def _converged(sc: Scenario, cluster: SimCluster, truth: Truth) -> bool:
    for nid in cluster.live():
        node = cluster.nodes[nid]
        for t in sc.model.tables:
            ts = node.table_store(sc.model.name, t.name)
            if not np.array_equal(ts.versions, truth.versions[t.name]):
                return False
            if truth.values is not None and ts.values is not None:
                if not np.array_equal(ts.values.numpy().view(truth.values[t.name].dtype), truth.values[t.name]):
                    return False
    return True


def _run_and_collect(sc, system, sim, net, cluster, rec, truth, progress) -> dict[str, Any]:
    end = sc.duration_s + sc.settle_s
    wall0 = time.perf_counter()
    t = 0.0
    converged_at = None
    while t < end:
        t = min(end, t + progress_step(sc))
        sim.run(until=t)
        if progress:
            progress(system, t, end)
        if t >= sc.duration_s and converged_at is None and _converged(sc, cluster, truth):
            converged_at = t
            break
    wall = time.perf_counter() - wall0
    nodes = cluster.nodes.values()
    return collect_results(
        sc, rec, truth, wan_bytes=net.wan_bytes, bytes_by_type=cluster.bytes_by_type,
        converged_at=converged_at, events=sim.events, wall=wall, rejected=cluster.rejected,
        rows_scanned=sum(n.counters["rows_scanned"] for n in nodes),
        rows_walked=sum(n.counters["rows_walked"] for n in nodes),
        cpu=cluster.cpu.summary() if cluster.cpu is not None else None)


def progress_step(sc: Scenario) -> float:
    """Simulated seconds between progress reports and convergence checks."""
    return max(0.5, (sc.duration_s + sc.settle_s) / 100)


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


def _run_system(sc: Scenario, system: str, progress: Progress | None = None, workers: int = 1) -> dict[str, Any]:
    from simulator.baselines import run_baseline

    if system in ("direct-push", "adam-2pc", "broadcast"):
        return run_baseline(sc, system, progress)
    return run_ekko_family(sc, system, progress, workers=workers)


def run_scenario(sc: Scenario, systems: list[str] | None = None, progress: Progress | None = None,
                 jobs: int = 1, workers: int = 1) -> dict[str, Any]:
    """Run every system of a scenario; returns the ``results.json`` structure
    (plus private ``_``-prefixed arrays for the plots).

    ``jobs > 1`` runs systems in that many worker processes (no progress callbacks).
    Each system runs in its own fresh simulation from the scenario's seed, so the
    results are the same as one after the other; only ``wall_s`` differs.
    ``workers > 1`` instead splits each ekko-family system's DCs over that many
    processes (:mod:`simulator.parallel`; the baselines run in one); the two do not mix.
    """
    systems = systems or sc.systems
    if jobs > 1 and workers > 1:
        raise UsageError("use either jobs (systems side by side) or workers (one system split by DC), not both")
    wall0 = time.perf_counter()
    if workers > 1:
        got = [_run_system(sc, system, progress, workers) for system in systems]
    elif jobs > 1 and len(systems) > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(min(jobs, len(systems))) as pool:
            got = pool.starmap(_run_system, [(sc, system) for system in systems], chunksize=1)
    else:
        got = [_run_system(sc, system, progress) for system in systems]
    out = dict(zip(systems, got))
    events = sum(res["events"] for res in got)
    wall = time.perf_counter() - wall0
    return {"scenario": sc.name, "seed": sc.seed, "replicas": sc.replicas, "dcs": sc.wan.dc_names,
            "training_dc": sc.training_dc, "mode": "full" if sc.with_values else "metadata",
            "duration_s": sc.duration_s, "workers": workers, "events": events, "wall_s": wall,
            "events_per_s": events / wall if wall > 0 else 0.0, "peak_rss_mb": peak_rss_mb(),
            "systems": out}
