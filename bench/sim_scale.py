"""Simulator throughput at scale: one ``paper`` system at N replicas for D simulated seconds.

Prints events per second (wall and CPU), wall and CPU seconds, simulated seconds
per wall second, peak RSS (``ru_maxrss``) and the load average before and after:
on a shared machine wall time also counts other processes, so CPU time is the
steadier figure and the load average says how shared the machine was.  The
workload is the shipped ``paper`` scenario (metadata mode above 200 replicas);
``--duration`` overrides its 60 s of workload, ``--settle`` its settle time.

Run: ``python bench/sim_scale.py --replicas 1000 --duration 10 [--system ekko]``.
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--replicas", type=int, default=1000)
    ap.add_argument("--duration", type=float, default=10.0, help="simulated seconds of workload")
    ap.add_argument("--settle", type=float, default=None, help="simulated seconds after it (default: scenario's)")
    ap.add_argument("--system", default="ekko")
    ap.add_argument("--progress", action="store_true", help="print simulated vs wall time as it goes")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    sc = load_scenario("paper")
    sc.replicas, sc.duration_s = args.replicas, args.duration
    if args.settle is not None:
        sc.settle_s = args.settle
    load0 = os.getloadavg()
    w0, c0 = time.perf_counter(), time.process_time()

    def progress(system: str, t: float, end: float) -> None:
        if args.progress:
            print(f"  sim {t:6.1f}/{end:.0f} s  wall {time.perf_counter() - w0:7.1f} s  "
                  f"cpu {time.process_time() - c0:7.1f} s  load {os.getloadavg()[0]:.1f}", flush=True)

    res = run_ekko_family(sc, args.system, progress)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    simulated = res["converged_at_s"] or sc.duration_s + sc.settle_s
    out = {"system": args.system, "replicas": sc.replicas, "mode": "full" if sc.with_values else "metadata",
           "simulated_s": simulated, "events": res["events"], "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
           "events_per_s_wall": round(res["events"] / wall), "events_per_s_cpu": round(res["events"] / cpu),
           "sim_s_per_cpu_s": round(simulated / cpu, 4),
           "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
           "load_before": [round(x, 1) for x in load0], "load_after": [round(x, 1) for x in os.getloadavg()],
           "cross_dc_mean_s": res["latency_s"]["cross_dc"]["mean"], "converged": res["converged"]}
    print(json.dumps(out))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
