"""Partitioned runs: one ekko-family system simulated by several processes, DCs split among them.

Why: a 10,000-replica run spends nearly all its time in the replicas' own protocol
code, and one Python process uses one core.  The DCs are nearly independent -- a DC
hears from another only through messages that cross the WAN -- so each worker
process simulates the replicas of some DCs and the workers swap the messages that
cross between them.

How (a conservative parallel discrete-event simulation, null-message style):
every worker builds only its own replicas (:attr:`SimCluster.owned`); the others
exist there as members and WAN endpoints, so memory is split too.  A message from
one of its replicas to another worker's replica goes through the sender's NIC and
the WAN link here, then leaves as an *export*: its arrival time at the receiver,
which is at least the one-way propagation between the two DCs after the event that
sent it (:meth:`WanNetwork.set_remote`).  With ``L`` the least such propagation
between DCs of different workers (the *lookahead*), nothing a worker does at or
after time ``c`` reaches another worker before ``c + L``.  So after each advance a
worker sends every peer a report -- "I have run everything before ``c``", with the
messages it exported -- and a worker may run up to the least reported clock plus
``L``.  Advances are ``L / REPORTS_PER_LOOKAHEAD`` long at most, so a worker whose
peer is busy keeps going in small steps up to a lookahead ahead instead of waiting
at a barrier (the DCs' load comes in bursts that do not line up).  Imports enter the
event queue after local events of the same instant, by sender, then send order
(:meth:`WanNetwork.import_arrival`), whatever moment their report arrived, so the
run is deterministic.  The coordinator (this process) joins at every progress step
to check convergence everywhere and report progress.

What is the same as one process: the model -- every replica, message, queue and
CPU charge is simulated exactly as in :func:`simulator.experiment.run_ekko_family`
-- and determinism: the same seed and worker count give the same ``results.json``.
What differs: the order of events at *exactly* the same simulated time in
different DCs, and random streams shared by a process (the WAN's loss/jitter draws,
timer jitter), so figures match a one-process run closely but not to the last bit.
Every worker draws the whole workload (it is cheap next to the replicas), so truth
and latency samples agree without being sent; only the worker that owns the ingest
replica publishes (:meth:`SimCluster.call`).  ``events`` sums the workers' events.

Not supported: the priority scheduler (its latency classes come from the ingest
replica's decisions, which only one worker sees), and faults injected by a driver
(crash, partition) -- ``run_ekko_family`` has none.  Workers start with ``fork`` where
there is one (no re-import), else ``spawn``.

Example:
    >>> from simulator.scenario import load_scenario
    >>> sc = load_scenario("paper"); sc.replicas = 30; sc.duration_s = 1.0; sc.settle_s = 2.0
    >>> res = run_partitioned(sc, "ekko", workers=2)
    >>> res["converged"], res["partition"]["workers"]
    (True, 2)
"""

from __future__ import annotations

import itertools
import math
import os
import multiprocessing as mp
import queue
import time
import traceback
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ekko.core.errors import UsageError
from simulator.events import Simulation
from simulator.ekko_run import EkkoRun, build_ekko_family, collect_results
from simulator.measure import self_peak_rss_mb
from simulator.network import WanNetwork
from simulator.progress import Progress, progress_step
from simulator.scenario import Scenario
from simulator.truth import converged, place_replicas

__all__ = ["MAX_WORKERS", "partition_dcs", "run_partitioned"]

#: most worker processes one run may use.
MAX_WORKERS = 16
#: DC-to-worker assignments tried exhaustively up to this many; above, DCs are dealt greedily.
MAX_ASSIGNMENTS = 100_000
#: clock reports a worker sends its peers per lookahead of simulated time: finer reports
#: let a worker whose peer is busy run ahead in smaller steps, up to one lookahead.
REPORTS_PER_LOOKAHEAD = 4
#: seconds the coordinator waits for a worker's report before checking they are all alive.
POLL_S = 1.0


def partition_dcs(dcs: Sequence[str], load: dict[str, int], propagation_s: Callable[[str, str], float],
                  workers: int) -> tuple[list[list[str]], float]:
    """Split DCs over ``workers``: the most even replica load first, then the longest
    lookahead (least one-way propagation between DCs of different workers).

    Returns ``(groups, lookahead_s)``.  Deterministic (ties: first in enumeration order).

    Example:
        >>> prop = {("a", "b"): 0.01, ("a", "c"): 0.05, ("b", "c"): 0.05}
        >>> f = lambda x, y: prop.get((x, y)) or prop[(y, x)]
        >>> partition_dcs(["a", "b", "c"], {"a": 5, "b": 5, "c": 10}, f, 2)
        ([['a', 'b'], ['c']], 0.05)
    """
    n = len(dcs)
    if not 1 <= workers <= n:
        raise UsageError(f"workers must be between 1 and the number of DCs ({n}), got {workers}")

    def cost(assign: Sequence[int]) -> tuple[int, float]:
        per = [0] * workers
        for dc, w in zip(dcs, assign):
            per[w] += load.get(dc, 0)
        la = min((min(propagation_s(a, b), propagation_s(b, a))
                  for (a, wa), (b, wb) in itertools.combinations(zip(dcs, assign), 2) if wa != wb),
                 default=float("inf"))
        return max(per), -la

    best: tuple[tuple[int, float], list[int]] | None = None
    if workers ** n <= MAX_ASSIGNMENTS:
        for assign in itertools.product(range(workers), repeat=n):
            # canonical labelling (worker ids in order of first use) and no idle worker
            first = [assign.index(w) if w in assign else n for w in range(workers)]
            if first != sorted(first) or n in first:
                continue
            c = cost(assign)
            if best is None or c < best[0]:
                best = (c, list(assign))
    else:  # greedy: the heaviest DC to the lightest worker
        per = [0] * workers
        assign = [0] * n
        for i in sorted(range(n), key=lambda i: (-load.get(dcs[i], 0), i)):
            w = min(range(workers), key=lambda w: (per[w], w))
            assign[i] = w
            per[w] += load.get(dcs[i], 0)
        best = (cost(assign), assign)
    assert best is not None
    groups = [[dc for dc, w in zip(dcs, best[1]) if w == k] for k in range(workers)]
    return groups, -best[0][1]


def run_partitioned(sc: Scenario, system: str, workers: int, progress: Progress | None = None,
                    queue_factory=None) -> dict[str, Any]:
    """Run one ekko-family system over ``workers`` processes; returns its results entry
    (as :func:`simulator.experiment.run_ekko_family`) plus ``partition`` (the DC groups,
    the lookahead, messages exchanged) and ``partition_timing`` (advances, each worker's
    CPU, waits and peak RSS)."""
    if not isinstance(workers, int) or not 1 <= workers <= MAX_WORKERS:
        raise UsageError(f"workers must be an integer in 1..{MAX_WORKERS}, got {workers!r}")
    if sc.scheduler is not None:
        raise UsageError("a partitioned run (workers > 1) does not support a [scheduler] scenario: its latency "
                         "classes come from the ingest replica's decisions, which only one worker sees")
    if workers > 1 and sc.cpu is not None and sc.cpu.shared_cores:
        raise UsageError("a partitioned run (workers > 1) cannot model [cpu] shared_cores: one pool of cores "
                         "for the whole cluster needs every replica in one process")
    # The plan needs only the placement and the WAN: each worker then builds its own
    # replicas alone (no copy of the others' stores).
    net = WanNetwork(Simulation(sc.seed), sc.wan)
    load = {dc: 0 for dc in net.dcs}
    for _, dc in place_replicas(sc):
        load[dc] += 1
    groups, lookahead = partition_dcs(net.dcs, load, net.dc_propagation_s, workers)
    if workers > 1 and not lookahead > 0:
        raise UsageError("a partitioned run needs a positive propagation delay between DCs of different workers")
    owner = {dc: k for k, g in enumerate(groups) for dc in g}

    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    inboxes = [ctx.Queue() for _ in range(workers)]
    to_coord = ctx.Queue()
    verdicts = [ctx.Queue() for _ in range(workers)]
    wall0 = time.perf_counter()
    procs = [ctx.Process(target=_worker, name=f"ekko-sim-worker-{k}",
                         args=(k, sc, system, queue_factory, owner, lookahead, inboxes, to_coord, verdicts[k]),
                         daemon=True)
             for k in range(workers)]
    for p in procs:
        p.start()
    try:
        converged_at, advances, parts = _coordinate(sc, system, workers, procs, to_coord, verdicts, progress)
        for p in procs:
            p.join()
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join()
    wall = time.perf_counter() - wall0

    rec, truth = parts[0]["rec"], parts[0]["truth"]
    for part in parts:
        rec.adopt_columns(*part["cols"])
    pairs = np.sum([part["wan_pairs"] for part in parts], axis=0).tolist()
    bytes_by_type: dict[str, int] = {}
    rejected: dict[str, int] = {}
    for part in parts:
        for src, dst in ((part["bytes_by_type"], bytes_by_type), (part["rejected"], rejected)):
            for key, v in src.items():
                dst[key] = dst.get(key, 0) + v
    cpus = [part["cpu"] for part in parts if part["cpu"] is not None]
    cpu = None if not cpus else {"busy_s_total": sum(c["busy_s_total"] for c in cpus),
                                 "charges": sum(c["charges"] for c in cpus),
                                 "max_backlog_s": max(c["max_backlog_s"] for c in cpus)}
    out = collect_results(sc, rec, truth, wan_bytes=net.wan_bytes_of(pairs), bytes_by_type=bytes_by_type,
                          converged_at=converged_at, events=sum(part["events"] for part in parts), wall=wall,
                          rejected=rejected, rows_scanned=sum(part["rows_scanned"] for part in parts),
                          rows_walked=sum(part["rows_walked"] for part in parts), cpu=cpu)
    out["partition"] = {"workers": workers, "dcs": groups, "lookahead_s": lookahead,
                        "messages_exchanged": sum(part["exported"] for part in parts)}
    # Time figures (vary run to run, like wall_s): CPU each worker spent simulating, how
    # long it waited for a peer to catch up, and memory.
    out["partition_timing"] = {
        "advances": advances,
        "worker_cpu_s": [round(part["cpu_s"], 2) for part in parts],
        "worker_wait_s": [round(part["wait_s"], 2) for part in parts],
        "worker_peak_rss_mb": [round(part["peak_rss_mb"]) for part in parts]}
    return out


def _coordinate(sc: Scenario, system: str, workers: int, procs: list, to_coord, verdicts,
                progress: Progress | None) -> tuple[float | None, int, list[dict[str, Any]]]:
    """The coordinator: at every progress step collect each worker's convergence, tell
    them all whether to go on, then gather their results."""
    end = sc.duration_s + sc.settle_s
    converged_at = None
    advances = 0
    steps: dict[float, list[bool]] = {}
    parts: dict[int, dict[str, Any]] = {}
    stopped = False
    while len(parts) < workers:
        try:
            msg = to_coord.get(timeout=POLL_S)
        except queue.Empty:
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"simulation worker {dead[0].name} died (exit code {dead[0].exitcode})") from None
            continue
        kind = msg[0]
        if kind == "error":
            raise RuntimeError(f"simulation worker {msg[1]} failed:\n{msg[2]}")
        if kind == "step":
            _, _k, t, conv, w = msg
            got = steps.setdefault(t, [])
            got.append(conv)
            advances = max(advances, w)
            if len(got) < workers:
                continue
            del steps[t]
            if progress:
                progress(system, t, end)
            stop = t >= end
            if t >= sc.duration_s and all(got):
                converged_at, stop = t, True
            stopped = stop
            for v in verdicts:
                v.put(stop)
        elif kind == "done":
            if not stopped:
                raise RuntimeError("a simulation worker finished before the run ended")
            parts[msg[1]] = msg[2]
    return converged_at, advances, [parts[k] for k in range(workers)]


def _worker(k: int, sc: Scenario, system: str, queue_factory, owner: dict[str, int], lookahead: float,
            inboxes: list, to_coord, verdict) -> None:
    """One worker process: build and simulate the replicas of DCs ``owner`` gives ``k``."""
    for j, q in enumerate(inboxes):
        if j != k:
            # A peer that has finished reads no more: our last reports must not keep us alive.
            q.cancel_join_thread()
    code = 0
    try:
        # One thread per worker: the workers are the parallelism, and a forked child
        # must not enter an OpenMP pool its parent started (libgomp hangs there).
        torch.set_num_threads(1)
        mine = frozenset(n for n, dc in place_replicas(sc) if owner[dc] == k)
        run = build_ekko_family(sc, system, queue_factory, owned=mine)
        to_coord.put(("done", k, _simulate(k, run, sc, owner, lookahead, inboxes, to_coord, verdict)))
    except BaseException:  # report, so the coordinator stops the others instead of hanging
        to_coord.put(("error", k, traceback.format_exc()))
        code = 1
    # Hand the result over, then leave without the usual exit work: a forked child may
    # hold a copy of a lock (say stdout's) that a parent thread held at the fork.
    to_coord.close()
    to_coord.join_thread()
    os._exit(code)


def _simulate(k: int, run: EkkoRun, sc: Scenario, owner: dict[str, int], lookahead: float,
              inboxes: list, to_coord, verdict) -> dict[str, Any]:
    sim, net, cluster = run.sim, run.net, run.cluster
    ids = net.nodes                      # node index order of the network
    owner_of = [owner[net.dc_of(n)] for n in ids]
    mine = frozenset(cluster.nodes)
    peers = sorted(set(owner.values()) - {k})
    outbox: dict[int, list[tuple]] = {j: [] for j in peers}

    def export(arrive: float, s: int, d: int, p: int, payload: Any, nbytes: int, dinc: int) -> None:
        outbox[owner_of[d]].append((arrive, s, d, p, payload, nbytes, dinc))

    net.set_remote([n for n, w in zip(ids, owner_of) if w != k], export)
    deliver = cluster._deliver           # what SimCluster.flush passes to net.send
    end = sc.duration_s + sc.settle_s
    step = progress_step(sc)
    # What each peer has reported: it has run every event before this time and sent
    # us everything those events exported.
    peer_clock = {j: 0.0 for j in peers}
    stride = lookahead / REPORTS_PER_LOOKAHEAD
    stats = {"advances": 0, "exported": 0, "cpu_s": 0.0, "wait_s": 0.0}

    def take(block: bool) -> None:
        """Import the reports waiting in our inbox (at least one when ``block``)."""
        while True:
            try:
                sender, clock, msgs = inboxes[k].get() if block else inboxes[k].get_nowait()
            except queue.Empty:
                return
            block = False
            now = sim.now
            for arrive, s, d, p, payload, nbytes, dinc in msgs:
                if arrive < now:
                    raise RuntimeError(f"causality: a message from worker {sender} arrives at {arrive} < {now}, "
                                       f"in time already simulated here (lookahead {lookahead})")
                # priority 1 + sender: after local events at the same instant, then by
                # sender, then send order -- whenever the report happened to arrive
                net.import_arrival(arrive, s, d, p, payload, nbytes, dinc, deliver, priority=1 + sender)
            peer_clock[sender] = clock

    t = 0.0
    while t < end:
        b = min(end, t + step)           # the same steps as a one-process run
        while sim.now < b:
            # Nothing a peer does at or after its clock reaches us before clock + lookahead.
            target = min(b, min(peer_clock.values(), default=math.inf) + lookahead, sim.now + stride)
            if target <= sim.now:
                w0 = time.perf_counter()
                take(block=True)
                stats["wait_s"] += time.perf_counter() - w0
                continue
            c0 = time.process_time()
            sim.run(until=target)
            stats["cpu_s"] += time.process_time() - c0
            stats["advances"] += 1
            for j in peers:
                stats["exported"] += len(outbox[j])
                inboxes[j].put((k, sim.now, outbox[j]))
                outbox[j] = []
            take(block=False)
        t = b
        conv = t >= sc.duration_s and converged(sc, cluster, run.truth)
        to_coord.put(("step", k, t, conv, stats["advances"]))
        if verdict.get():
            break
    nodes = [cluster.nodes[n] for n in sorted(mine)]
    part = {"cols": run.rec.columns(sorted(mine)), "wan_pairs": net.wan_bytes_pairs(),
            "bytes_by_type": dict(cluster.bytes_by_type), "rejected": dict(cluster.rejected),
            "rows_scanned": sum(n.counters["rows_scanned"] for n in nodes),
            "rows_walked": sum(n.counters["rows_walked"] for n in nodes),
            "cpu": cluster.cpu.summary() if cluster.cpu is not None else None,
            "events": sim.events, "exported": stats["exported"], "cpu_s": stats["cpu_s"],
            "wait_s": stats["wait_s"],
            "peak_rss_mb": self_peak_rss_mb()}
    if k == 0:  # every worker drew the same samples and truth: one copy is enough
        part["rec"], part["truth"] = run.rec, run.truth
    return part
