"""Run a scenario: every system on the same WAN, workload and seed.

Systems built from the production node (:class:`ekko.node.ReplicaNode` driven
by :class:`simulator.replicas.SimCluster`), differing only in configuration:

* ``ekko`` -- the scenario's node config: gateways, shard versions, eager push.
* ``ekko-no-gateways`` -- anti-entropy with shard versions, random partners in
  any DC, no eager push (the paper's ablation step without local leaders).
* ``ekko-full-scan`` -- as above but without shard versions: every round asks
  for every shard (the paper's first ablation step).
* ``random-gossip`` -- rumor-mongering push to random peers (no topology) plus
  random-partner anti-entropy.
* ``fifo`` -- ``ekko`` with FIFO link queues (the scheduler's baseline).

Baselines with their own small drivers (:mod:`simulator.baselines`):
``direct-push``, ``adam-2pc``, ``broadcast``.

Each system runs in a fresh :class:`Simulation` with the scenario's seed, so the
workload (drawn from its own derived stream) is identical across systems.
"""

from __future__ import annotations

import time
import tracemalloc
from typing import Any, Callable

import numpy as np

from ekko.chain import PublisherChain
from ekko.delta import WIRE_DTYPES
from ekko.version import HLC_EPOCH_MS, counters_of
from simulator.events import Simulation
from simulator.measure import LatencyRecorder
from simulator.network import WanNetwork
from simulator.replicas import SimCluster
from simulator.scenario import Scenario
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
    if system in ("ekko", "fifo"):
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


def _batch_values(sc: Scenario, batch: UpdateBatch, rng: np.random.Generator, with_values: bool):
    if not with_values:
        return None
    t = sc.model.table(batch.table)
    return rng.standard_normal((len(batch.ids), t.dim)).astype(WIRE_DTYPES[t.dtype])


def run_ekko_family(sc: Scenario, system: str, progress: Progress | None = None,
                    queue_factory=None) -> dict[str, Any]:
    sim = Simulation(sc.seed)
    net = WanNetwork(sim, sc.wan)
    with_values = sc.with_values
    cfg = node_config_for(sc, system)
    cluster = SimCluster(sim, net, cfg, with_values=with_values, shared_membership=not with_values,
                         queue_factory=queue_factory)
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

    def on_batch(batch: UpdateBatch) -> None:
        if not len(batch.ids):
            return
        t = sc.model.table(batch.table)
        values = _batch_values(sc, batch, rng, with_values)
        frame = chain.frame(sc.model, {batch.table: (batch.ids, values)}, now_ms=HLC_EPOCH_MS + sim.now * 1000,
                            impact={batch.table: batch.impact})
        versions = chain.versions_of(frame)[batch.table]
        rec.track(batch.table, batch.ids, versions, sim.now, sc.samples_per_batch, sample_rng,
                  cls=_impact_class(batch.impact, batch.ids, versions))
        truth.note(batch.table, batch.ids, versions, values, t.row_bytes)
        cluster.call(ingest, "publish", frame.body, sim.now)
        chain.acked(frame)

    workload = Workload(sc.workload, sim.derive_np_rng("workload"))
    workload.drive(sim, on_batch, until=sc.duration_s)
    return _run_and_collect(sc, system, sim, net, cluster, rec, truth, progress)


def _impact_class(impact: np.ndarray, ids: np.ndarray, versions: np.ndarray) -> str:
    return ""


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
    step = max(0.5, end / 100)
    t = 0.0
    converged_at = None
    while t < end:
        t = min(end, t + step)
        sim.run(until=t)
        if progress:
            progress(system, t, end)
        if t >= sc.duration_s and converged_at is None and _converged(sc, cluster, truth):
            converged_at = t
            break
    wall = time.perf_counter() - wall0
    lat = rec.summary()
    return {
        "latency_s": {k: lat[k] for k in ("intra_dc", "cross_dc", "all")},
        "latency_per_dc_s": lat["per_dc"],
        "latency_by_class_s": rec.by_class(),
        "unapplied_samples": lat["missing"],
        "wan_bytes": int(net.wan_bytes_total),
        "wan_bytes_by_link": {f"{a}->{b}": int(v) for (a, b), v in sorted(net.wan_bytes.items())},
        "wan_bytes_min": int(truth.bytes_published * (len(sc.wan.dc_names) - 1)),
        "bytes_by_message": dict(sorted(cluster.bytes_by_type.items())),
        "rows_published": truth.rows_published,
        "converged": converged_at is not None,
        "converged_at_s": converged_at,
        "events": sim.events,
        "wall_s": wall,
        "rejected": dict(cluster.rejected),
        "_latency_matrix": rec.matrix(),
        "_replica_dcs": rec.dcs,
    }


def run_scenario(sc: Scenario, systems: list[str] | None = None, progress: Progress | None = None
                 ) -> dict[str, Any]:
    """Run every system of a scenario; returns the ``results.json`` structure
    (plus private ``_``-prefixed arrays for the plots)."""
    from simulator.baselines import run_baseline

    systems = systems or sc.systems
    tracemalloc.start()
    wall0 = time.perf_counter()
    out: dict[str, Any] = {}
    events = 0
    for system in systems:
        if system in ("direct-push", "adam-2pc", "broadcast"):
            res = run_baseline(sc, system, progress)
        elif system == "fifo":
            from simulator.prioritized import fifo_queue_factory
            res = run_ekko_family(sc, system, progress, queue_factory=fifo_queue_factory(sc))
        else:
            res = run_ekko_family(sc, system, progress)
        events += res["events"]
        out[system] = res
    wall = time.perf_counter() - wall0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"scenario": sc.name, "seed": sc.seed, "replicas": sc.replicas, "dcs": sc.wan.dc_names,
            "training_dc": sc.training_dc, "mode": "full" if sc.with_values else "metadata",
            "duration_s": sc.duration_s, "events": events, "wall_s": wall,
            "events_per_s": events / wall if wall > 0 else 0.0, "peak_traced_mb": peak / 2**20,
            "systems": out}
