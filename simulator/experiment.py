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
from typing import Any

from ekko.core.errors import UsageError
from simulator.baselines import run_baseline
from simulator.ekko_run import (build_ekko_family, offered_burst_bytes_per_s, run_and_collect)
from simulator.measure import peak_rss_mb
from simulator.parallel import run_partitioned
from simulator.progress import Progress
from simulator.scenario import Scenario
from simulator.staleness import access_weights



def run_ekko_family(sc: Scenario, system: str, progress: Progress | None = None,
                    queue_factory=None, workers: int = 1) -> dict[str, Any]:
    """Run one ekko-family system of a scenario and collect its results.

    ``workers > 1`` splits the DCs over that many processes (:mod:`simulator.parallel`);
    the same seed and worker count give the same results.
    """
    if workers > 1:
        if sc.model.placed and system != "ekko-replicated":
            raise UsageError("a placed model (replicas_per_shard) is not modelled in a partitioned run: "
                             "drop --workers")
        return run_partitioned(sc, system, workers, progress, queue_factory)
    run = build_ekko_family(sc, system, queue_factory)
    out = run_and_collect(sc, system, run.sim, run.net, run.cluster, run.rec, run.truth, progress)
    if run.meter is not None:
        out["weighted_staleness_error"] = run.meter.total
    if run.agreement is not None:
        run.agreement.weights = access_weights(sc, run.workload)
        out["class_agreement"] = run.agreement.summary()
    cluster = run.cluster
    if cluster.nodes and any(n.prioritizer is not None for n in cluster.nodes.values()):
        out["wan_budget_bytes_per_s"] = None if system == "ekko-uncongested" else (
            float(sc.scheduler["wan_budget_bytes_per_s"]) if "wan_budget_bytes_per_s" in sc.scheduler else
            float(sc.scheduler.get("wan_budget_fraction_of_burst", 0.3)) * offered_burst_bytes_per_s(sc))
        out["offered_burst_bytes_per_s"] = offered_burst_bytes_per_s(sc)
    return out


def _run_system(sc: Scenario, system: str, progress: Progress | None = None, workers: int = 1) -> dict[str, Any]:
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
