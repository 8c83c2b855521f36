"""Simulator throughput at scale: one ``paper`` system at N replicas for D simulated seconds.

Prints events per second (wall and CPU), wall and CPU seconds, simulated seconds
per wall second, peak RSS (``ru_maxrss``) and the load average before and after:
on a shared machine wall time also counts other processes, so CPU time is the
steadier figure and the load average says how shared the machine was.  The
workload is the shipped ``paper`` scenario (metadata mode above 200 replicas);
``--duration`` overrides its 60 s of workload, ``--settle`` its settle time.

Run: ``python bench/sim_scale.py --replicas 1000 --duration 10 [--system ekko] [--workers 2]``.
With ``--workers N`` the DCs are split over N processes (:mod:`simulator.parallel`):
CPU seconds then add the workers' (``RUSAGE_CHILDREN``), peak RSS is the largest
process's, and the partition's own figures (each worker's CPU and waits) are printed.
A/B against another checkout: run the same command with ``PYTHONPATH`` pointing
at it, right after, and compare CPU seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from simulator.experiment import run_ekko_family
from simulator.scenario import load_scenario


def _mem_available_mb() -> float:
    """The kernel's MemAvailable (Linux), MiB; 0 where there is no /proc/meminfo."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--replicas", type=int, default=1000)
    ap.add_argument("--duration", type=float, default=10.0, help="simulated seconds of workload")
    ap.add_argument("--settle", type=float, default=None, help="simulated seconds after it (default: scenario's)")
    ap.add_argument("--system", default="ekko")
    ap.add_argument("--workers", type=int, default=1, help="processes to split the DCs over (simulator.parallel)")
    ap.add_argument("--progress", action="store_true", help="print simulated vs wall time as it goes")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    sc = load_scenario("paper")
    sc.replicas, sc.duration_s = args.replicas, args.duration
    if args.settle is not None:
        sc.settle_s = args.settle
    load0 = os.getloadavg()
    w0, c0 = time.perf_counter(), time.process_time()

    def cpu_now() -> float:
        ch = resource.getrusage(resource.RUSAGE_CHILDREN)
        return time.process_time() + ch.ru_utime + ch.ru_stime

    avail0 = low = _mem_available_mb()

    def progress(system: str, t: float, end: float) -> None:
        nonlocal low
        low = min(low, _mem_available_mb())
        if args.progress:
            print(f"  sim {t:6.1f}/{end:.0f} s  wall {time.perf_counter() - w0:7.1f} s  "
                  f"cpu {cpu_now() - c0:7.1f} s  load {os.getloadavg()[0]:.1f}", flush=True)

    res = run_ekko_family(sc, args.system, progress, workers=args.workers)
    wall, cpu = time.perf_counter() - w0, cpu_now() - c0
    simulated = res["converged_at_s"] or sc.duration_s + sc.settle_s
    out = {"system": args.system, "replicas": sc.replicas, "workers": args.workers,
           "mode": "full" if sc.with_values else "metadata",
           "simulated_s": simulated, "events": res["events"], "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
           "events_per_s_wall": round(res["events"] / wall), "events_per_s_cpu": round(res["events"] / cpu),
           "sim_s_per_cpu_s": round(simulated / cpu, 4),
           "peak_rss_mb": round(max(resource.getrusage(who).ru_maxrss
                                    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)) / 1024),
           # workers share pages copy-on-write, so per-process RSS overstates their sum:
           # this is how much the machine's available memory fell (sampled every progress step)
           "machine_memory_used_mb": round(avail0 - low),
           "load_before": [round(x, 1) for x in load0], "load_after": [round(x, 1) for x in os.getloadavg()],
           "cross_dc_mean_s": res["latency_s"]["cross_dc"]["mean"], "converged": res["converged"]}
    if "partition" in res:
        out["partition"] = {**res["partition"], **res["partition_timing"]}
    print(json.dumps(out))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
