"""Where real daemons spend a publish: CPU per row, protocol counters, optional py-spy (issue #15).

Starts ``--dcs x --per-dc`` ``ekko daemon`` processes on loopback (``LocalCluster``,
``--preset local``, a cluster key, the write-ahead log on), registers one ``--rows`` x
``--dim`` float32 table and has ``--publishers`` ``AsyncPublisher`` s in this process
publish batches of ``--batch`` random distinct ids to the first daemon (dc1-r1), each
waiting for its acknowledgement before the next, for ``--seconds``.  Then it prints:

* rows/s acknowledged and the acknowledgement p50/p90 (from the publish call);
* CPU seconds each daemon used during the window (``/proc/PID/stat``) and CPU
  microseconds per published row, all daemons together and per daemon;
* per daemon, the protocol counters that say which path carried the rows
  (``ekko_node_events_total``: rows applied by push / pull / publish, pushes that
  carried publish-chain links, pull requests and answers, anti-entropy shards left
  alone while in motion, gap probes, rows compared by anti-entropy), the push frames
  encoded and reused (``ekko_peer_frames_total``) and failed sends;
* with ``--py-spy`` (``pip install py-spy``): ``py-spy record --nonblocking -r 50`` on
  every daemon for the window, aggregated over all daemons into the functions with the
  most samples, self and inclusive (shares of samples that were not waiting in
  ``select``).  Samples are wall-clock while the process is runnable: on an
  overloaded host a function that waits for a core looks more expensive.

With ``--rate R`` each publisher publishes R times a second instead of back to back (an
open loop: the host is not saturated, so CPU per publish is not inflated by queueing),
and with ``--idle-s S`` the daemons' idle CPU (membership and anti-entropy ticks) is
measured first for S seconds and subtracted: the CPU each daemon spends per publish,
the ingest, its DC peers and the other DCs' gateways told apart.

The load average before and after is printed; the host is shared, so compare runs made
back to back.  Every daemon is stopped by PID at the end (also on errors).

Run:  python bench/daemon_profile.py [--publishers 1] [--batch 1000] [--seconds 15] [--py-spy]
      python bench/daemon_profile.py --rate 40 --idle-s 10   (CPU per publish per daemon)
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
#: node counters printed per daemon (ekko_node_events_total{event=...}).
EVENTS = ("applied_rows_publish", "applied_rows_push", "applied_rows_pull", "push_links", "push_frames_received",
          "push_frames_sent", "pull_requests_sent", "pull_responses_sent", "ae_deferred_shards", "gap_probes_sent",
          "rows_scanned")
#: py-spy sampling rate (Hz) and the functions listed.
PYSPY_RATE = 50
TOP_FUNCTIONS = 25


def cpu_seconds(pid: int, kernel: bool = False) -> float:
    """CPU seconds ``pid`` used so far: user + system, or the system (kernel) part alone."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = int(fields[12]) if kernel else int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def get(url: str, key: str | None) -> bytes:
    """GET ``url`` signed with the cluster ``key`` (the daemons hold one: reads are signed)."""
    from ekko.core import read_auth
    req = urllib.request.Request(url, headers=read_auth.read_headers(key, url))
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.read()


def scrape(ep: str, key: str | None = None) -> dict[str, dict[str, float]]:
    txt = get(f"http://{ep}/metrics", key).decode()
    out: dict[str, dict[str, float]] = {"events": {}, "frames": {}, "failures": {}, "sent_bytes": {}}
    for kind, metric, label in (("events", "ekko_node_events_total", "event"),
                                ("frames", "ekko_peer_frames_total", "outcome"),
                                ("failures", "ekko_send_failures_total", "reason"),
                                ("sent_bytes", "ekko_bytes_sent_total", "msg_type")):
        for m in re.finditer(rf'^{metric}\{{(?:[^}}]*,)?{label}="([A-Za-z0-9_]+)"[^}}]*\}} ([0-9.e+]+)$', txt, re.M):
            out[kind][m.group(1)] = out[kind].get(m.group(1), 0.0) + float(m.group(2))
    return out


def aggregate(files: list[Path]) -> dict[str, Any]:
    """Self and inclusive sample shares per function over py-spy raw (collapsed) files."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = idle = 0
    for f in files:
        for line in f.read_text().splitlines():
            if not line.strip():
                continue
            stack, n_s = line.rsplit(" ", 1)
            n = int(n_s)
            names = [fr.split(" (")[0] + " (" + fr.split(" (")[1].split(":")[0].rsplit("/", 1)[-1] + ")"
                     if " (" in fr else fr for fr in stack.split(";")]
            total += n
            # Waiting for work: the loop in select, an executor thread in its queue's get
            # (py-spy samples a thread blocked on a lock as running).
            if names[-1].startswith(("EpollSelector.select", "select (", "_worker (thread.py")):
                idle += n
                continue
            own[names[-1]] += n
            for name in set(names):
                incl[name] += n
    busy = max(1, total - idle)
    return {"samples": total, "waiting_in_select": idle,
            "self": [(k, round(100 * v / busy, 1)) for k, v in own.most_common(TOP_FUNCTIONS)],
            "inclusive": [(k, round(100 * v / busy, 1)) for k, v in incl.most_common(TOP_FUNCTIONS + 15)]}


async def publisher(k: int, ep: list[str], key: str, state: Path, spec: Any, args: argparse.Namespace,
                    t_end: float, lat: list[float]) -> int:
    from ekko.sdk.async_publisher import AsyncPublisher
    pub = AsyncPublisher(ep, origin=f"profile-{k}", key=key, state_dir=str(state / f"pub{k}"))
    await pub.register(spec)
    rng = np.random.default_rng(k + 1)
    # Publisher k writes only rows = k (mod publishers): no two publishers write a row.
    pool = np.arange(k, args.rows, args.publishers, dtype=np.int64)
    n = 0
    start = time.monotonic()
    vals = rng.standard_normal((args.batch, args.dim), dtype=np.float32) if args.rate else None
    try:
        while time.monotonic() < t_end:
            if args.rate:
                # Open loop: the next slot of the schedule (a late publish does not bunch up).
                await asyncio.sleep(max(0.0, start + (n // args.batch) / args.rate - time.monotonic()))
                if time.monotonic() >= t_end:
                    break
            ids = rng.choice(pool, args.batch, replace=False)
            if not args.rate:
                vals = rng.standard_normal((args.batch, args.dim), dtype=np.float32)
            t0 = time.monotonic()
            await pub.publish("m", "t", ids, vals)
            lat.append(time.monotonic() - t0)
            n += args.batch
    finally:
        await pub.close()
    return n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 epilog="Details: the module docstring (python -m pydoc bench/daemon_profile.py).")
    ap.add_argument("--dcs", type=int, default=3)
    ap.add_argument("--per-dc", type=int, default=3)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1000, help="rows per publish")
    ap.add_argument("--publishers", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=15.0, help="seconds the publishers publish")
    ap.add_argument("--node", action="append", default=[], metavar="KEY=VALUE",
                    help="a [node] setting for every daemon (NodeConfig field; VALUE in JSON, e.g. "
                         "ae_defer_in_motion=false), for A/B runs; repeatable")
    ap.add_argument("--rate", type=float, default=0.0,
                    help="publishes per second per publisher (0: back to back, one in flight)")
    ap.add_argument("--idle-s", type=float, default=0.0,
                    help="first measure the daemons' idle CPU for this long and subtract it")
    ap.add_argument("--py-spy", action="store_true", help="sample every daemon with py-spy during the window")
    ap.add_argument("--py-spy-dir", type=Path, default=None,
                    help="keep py-spy's raw (collapsed) file of each daemon here, as NODE.txt")
    ap.add_argument("--py-spy-nodes", default=None, metavar="NODE,...",
                    help="sample only these daemons (e.g. dc1-r1,dc2-r2): nine samplers on two cores "
                         "slow the cluster they measure (about 3x the CPU per row here)")
    ap.add_argument("--out", help="write the figures as JSON here")
    args = ap.parse_args()
    overrides: dict[str, Any] = {}
    for item in args.node:
        k, sep, v = item.partition("=")
        try:
            overrides[k] = json.loads(v)
        except json.JSONDecodeError:
            sep = ""
        if not sep or not k:
            ap.error(f"--node wants KEY=JSON_VALUE, got {item!r}")
    if args.py_spy and shutil.which("py-spy") is None:
        print("daemon_profile: --py-spy needs py-spy (pip install py-spy)", file=sys.stderr)
        return 2
    sys.path.insert(0, str(REPO))
    os.environ["PYTHONPATH"] = str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")
    from ekko import Client, ModelSpec, TableSpec
    from ekko.cli.demo import LocalCluster
    from throughput import vm_hwm_mb    # bench/, beside this script

    root = Path(tempfile.mkdtemp(prefix="ekko-profile-"))
    key = os.urandom(16).hex()
    key_file = root / "cluster.key"
    key_file.write_text(key)
    key_file.chmod(0o600)
    ids = [f"dc{d + 1}-r{i + 1}" for d in range(args.dcs) for i in range(args.per_dc)]
    cluster = LocalCluster(args.dcs, args.per_dc, root / "cluster", preset="local", key_file=str(key_file),
                           device="cpu", node_config={n: {"durability": "wal", **overrides} for n in ids})
    atexit.register(shutil.rmtree, root, True)
    atexit.register(cluster.stop)     # runs first: daemons are stopped by PID before the dir goes
    load0 = os.getloadavg()
    print(f"# python bench/daemon_profile.py {' '.join(sys.argv[1:])}")
    print(f"# {args.dcs} DCs x {args.per_dc} daemons (--preset local, key, WAL), {args.publishers} publisher(s) "
          f"of {args.batch}-row batches{f' at {args.rate:g}/s each' if args.rate else ', back to back'} "
          f"into a {args.rows} x {args.dim} float32 table for {args.seconds} s"
          f"{'; node ' + json.dumps(overrides) if overrides else ''}; "
          f"load average {load0[0]:.1f} on {os.cpu_count()} CPUs")
    cluster.start()
    cluster.wait_ready(120)
    cluster.wait_joined()
    eps = cluster.endpoints
    spec = ModelSpec("m", [TableSpec("t", rows=args.rows, dim=args.dim)])
    Client(eps[0], key=key, timeout=30).register(spec)
    for ep in eps:   # the catalog spreads by gossip
        end = time.monotonic() + 60
        while "m" not in json.loads(get(f"http://{ep}/v1/status", key))["models"]:
            if time.monotonic() > end:
                raise SystemExit(f"{ep} did not learn the model")
            time.sleep(0.1)
    pids = [r.proc.pid for r in cluster.replicas]
    idle_rate = [0.0] * len(pids)
    if args.idle_s > 0:
        time.sleep(2.0)   # the registration's gossip settles
        c0, i0 = [cpu_seconds(p) for p in pids], time.monotonic()
        time.sleep(args.idle_s)
        idle_rate = [(cpu_seconds(p) - c) / (time.monotonic() - i0) for p, c in zip(pids, c0)]
    before = {ep: scrape(ep, key) for ep in eps}
    spies = []
    spy_dir = args.py_spy_dir or root
    spy_dir.mkdir(parents=True, exist_ok=True)
    spied = set(args.py_spy_nodes.split(",")) if args.py_spy_nodes else set(ids)
    if spied - set(ids):
        raise SystemExit(f"--py-spy-nodes: no daemon named {sorted(spied - set(ids))}; they are {ids}")
    if args.py_spy:
        for pid, nid in zip(pids, ids):
            if nid not in spied:
                continue
            spies.append(subprocess.Popen(
                ["py-spy", "record", "-p", str(pid), "-d", str(max(1, int(args.seconds))), "-r", str(PYSPY_RATE),
                 "-f", "raw", "-o", str(spy_dir / f"{nid}.txt"), "--nonblocking"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    cpu0 = [cpu_seconds(p) for p in pids]
    sys0 = [cpu_seconds(p, kernel=True) for p in pids]
    own0 = cpu_seconds(os.getpid())
    lat: list[float] = []
    t0 = time.monotonic()

    async def run_all() -> list[int]:
        return await asyncio.gather(*[publisher(k, [eps[0]] + eps[1:], key, root, spec, args,
                                                t0 + args.seconds, lat) for k in range(args.publishers)])

    rows = sum(asyncio.run(run_all()))
    elapsed = time.monotonic() - t0
    cpu = [cpu_seconds(p) - c for p, c in zip(pids, cpu0)]
    kernel = [cpu_seconds(p, kernel=True) - c for p, c in zip(pids, sys0)]
    own = cpu_seconds(os.getpid()) - own0
    for s in spies:
        s.wait()
    after = {ep: scrape(ep, key) for ep in eps}
    peak_mb = [None if (mb := vm_hwm_mb(p)) is None else round(mb) for p in pids]
    load1 = os.getloadavg()

    lat_ms = np.array(lat) * 1000
    res: dict[str, Any] = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "load_before": load0, "load_after": load1, "rows": rows, "seconds": round(elapsed, 2),
        "rows_per_s_acked": round(rows / elapsed), "ack_p50_ms": round(float(np.median(lat_ms)), 1),
        "ack_p90_ms": round(float(np.percentile(lat_ms, 90)), 1),
        "cpu_s": dict(zip(ids, [round(c, 2) for c in cpu])),
        "cpu_us_per_row": round(1e6 * sum(cpu) / max(1, rows), 1),
        "kernel_share": round(sum(kernel) / max(1e-9, sum(cpu)), 3),
        "publisher_cpu_us_per_row": round(1e6 * own / max(1, rows), 1),
        "peak_rss_mb": dict(zip(ids, peak_mb)), "daemons": {}}
    print(f"\n{rows:,} rows in {elapsed:.1f} s: {res['rows_per_s_acked']:,} rows/s acknowledged, "
          f"ack p50 {res['ack_p50_ms']} ms, p90 {res['ack_p90_ms']} ms")
    print(f"CPU during the window: {sum(cpu):.1f} s over all daemons = {res['cpu_us_per_row']} us per row "
          f"(ingest {1e6 * cpu[0] / max(1, rows):.1f} us, the others' median "
          f"{1e6 * float(np.median(cpu[1:] or [0])) / max(1, rows):.1f} us); "
          f"{100 * res['kernel_share']:.0f}% of it in the kernel; the publishers' process "
          f"{res['publisher_cpu_us_per_row']} us per row")
    if args.idle_s > 0:
        pubs = max(1, rows // args.batch)
        per = [1e3 * (c - r * elapsed) / pubs for c, r in zip(cpu, idle_rate)]
        res["idle_cores"] = dict(zip(ids, [round(r, 4) for r in idle_rate]))
        res["cpu_ms_per_publish_above_idle"] = dict(zip(ids, [round(x, 2) for x in per]))
        print(f"idle CPU per daemon {np.mean(idle_rate):.3f} cores (mean); CPU per publish above idle, ms: "
              + " ".join(f"{n} {x:.2f}" for n, x in zip(ids, per)) + f" | all daemons {sum(per):.1f}")
    print(f"peak RSS (VmHWM) since start: ingest {peak_mb[0]} MB, the others' median "
          f"{float(np.median([m or 0 for m in peak_mb[1:]] or [0])):.0f} MB, max {max(m or 0 for m in peak_mb)} MB")
    head = ["daemon", "cpu s"] + [e.replace("applied_rows_", "rows_") for e in EVENTS] + ["frames enc/reused", "fails"]
    print("\n" + " | ".join(head))
    for nid, ep, c in zip(ids, eps, cpu):
        d = {k: {n: after[ep][k].get(n, 0.0) - before[ep][k].get(n, 0.0) for n in after[ep][k]}
             for k in after[ep]}
        res["daemons"][nid] = d
        ev = d["events"]
        print(" | ".join([nid, f"{c:.2f}"] + [f"{int(ev.get(e, 0)):,}" for e in EVENTS]
                         + [f"{int(d['frames'].get('encoded', 0)):,}/{int(d['frames'].get('reused', 0)):,}",
                            f"{int(sum(d['failures'].values())):,}"]))
    sent: collections.Counter[str] = collections.Counter()
    for d in res["daemons"].values():
        sent.update({t: int(b) for t, b in d["sent_bytes"].items()})
    total_sent = max(1, sum(sent.values()))
    print("bytes sent to peers by message type, all daemons: "
          + ", ".join(f"{t} {b / 1e6:,.1f} MB ({100 * b / total_sent:.0f}%)" for t, b in sent.most_common()))
    if args.py_spy:
        prof = aggregate(sorted(spy_dir / f"{nid}.txt" for nid in spied))
        res["py_spy"] = prof
        print(f"\npy-spy, {'all daemons' if len(spied) == len(ids) else ', '.join(sorted(spied))}: {prof['samples']:,} samples, {prof['waiting_in_select']:,} waiting in select; "
              "shares of the rest")
        for kind in ("self", "inclusive"):
            print(f"-- {kind}")
            for name, share in prof[kind]:
                print(f"{share:6.1f}%  {name}")
    print(f"\nload average before {load0[0]:.1f}, after {load1[0]:.1f}")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
