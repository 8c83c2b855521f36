"""Update latency across a local cluster: publish at one replica, time until all have it.

Starts ``--dcs x --per-dc`` real ``ekko daemon`` subprocesses on loopback
(``--preset local``, all joined through the first; :class:`ekko.cli.demo.LocalCluster`),
registers a table (``--table-rows`` x ``--dim`` float32), and repeats ``--trials``
times (after ``--warmup`` uncounted ones):

1. pick ``--rows`` distinct random rows and random values;
2. start one watcher per replica, then publish the rows at the ingest replica
   (dc1-r1) through :class:`ekko.sdk.async_publisher.AsyncPublisher`;
3. each watcher polls its replica's rows endpoint (msgpack) every ``--poll-ms``:
   first a sample of ``SAMPLE_IDS`` of the rows (cheap), and once those all carry
   a version above the one they had before the trial, all ``--rows`` ids; the
   replica's time is the first poll at which every row had the new version;
4. the trial's latency is the slowest replica's time, measured from just before
   the publish call.

Printed: how it was run (machine, load, shape, poll interval), then min/p50/p90/max
of the publish acknowledgement (the baseline: one replica applied it, same run),
of the time until each DC has it, and of the time until all replicas have it, with
the median's ratio to the baseline and the design's bar (0.5 s median).

A watcher sees an update up to one poll interval plus one request after it
landed, so the figures are upper bounds by that much (stated in the output).

Run: ``python bench/latency.py`` (about a minute plus daemon start-up).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import msgpack
import numpy as np

from ekko.cli.demo import LocalCluster
from ekko.sdk.async_publisher import AsyncPublisher
from ekko.core.spec import ModelSpec, TableSpec

#: rows of an update the watchers check first, spread over the update's row order.
SAMPLE_IDS = 32
#: seconds a trial may take before it counts as a timeout.
TRIAL_TIMEOUT_S = 20.0
#: pause between trials, so that one trial's traffic does not overlap the next.
TRIAL_GAP_S = 0.3
#: the design's bar for the median time until every replica has an update.
BAR_MEDIAN_S = 0.5
MODEL, TABLE = "latency", "emb"


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(np.ceil(q * len(xs))) - 1))]


def dist(xs: list[float]) -> str:
    if not xs:
        return "no samples"
    ms = [x * 1000 for x in xs]
    return (f"min {min(ms):7.1f}  p50 {pct(ms, 0.5):7.1f}  p90 {pct(ms, 0.9):7.1f}  max {max(ms):7.1f} ms"
            f"  (n={len(xs)})")


async def versions(session: aiohttp.ClientSession, url: str) -> np.ndarray:
    async with session.get(url) as r:
        raw = await r.read()
        if r.status != 200:
            raise RuntimeError(f"{url.split('?')[0]}: HTTP {r.status}: {raw[:200]!r}")
    body = msgpack.unpackb(raw, raw=False)
    return np.frombuffer(body["versions"], dtype="<i8")


async def watch(session: aiohttp.ClientSession, ep: str, ids: np.ndarray, prev: np.ndarray, t0: float,
                poll_s: float) -> float:
    """Seconds from t0 until every row of ``ids`` has a version above ``prev`` at ``ep``."""
    base = f"http://{ep}/v1/models/{MODEL}/tables/{TABLE}/rows?format=msgpack&ids="
    pick = np.unique(np.linspace(0, len(ids) - 1, min(SAMPLE_IDS, len(ids))).astype(int))
    url_sample = base + ",".join(map(str, ids[pick].tolist()))
    url_all = base + ",".join(map(str, ids.tolist()))
    while True:
        if (await versions(session, url_sample) > prev[pick]).all():
            if (await versions(session, url_all) > prev).all():
                return time.perf_counter() - t0
        await asyncio.sleep(poll_s)


async def run(args: argparse.Namespace, cluster: LocalCluster, state_dir: Path) -> int:
    spec = ModelSpec(MODEL, [TableSpec(TABLE, rows=args.table_rows, dim=args.dim)])
    eps = cluster.endpoints
    rng = np.random.default_rng(args.seed)
    last = np.zeros(args.table_rows, dtype=np.int64)       # our latest version of every row
    acks, alls, per_dc = [], [], {r.dc: [] for r in cluster.replicas}
    timeouts = 0
    poll_s = args.poll_ms / 1000
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session, \
            AsyncPublisher([eps[0]], origin="latency-bench", state_dir=state_dir, timeout=10,
                           durable=not args.no_fsync) as pub:
        await pub.register(spec)
        # Every replica must know the model (the catalog spreads by gossip) before we time anything.
        end = time.monotonic() + 60
        for ep in eps:
            while True:
                try:
                    await versions(session, f"http://{ep}/v1/models/{MODEL}/tables/{TABLE}/rows?format=msgpack&ids=0")
                    break
                except (RuntimeError, aiohttp.ClientError):
                    if time.monotonic() > end:
                        print(f"{ep} never learned the model", file=sys.stderr)
                        return 1
                    await asyncio.sleep(0.1)
        for trial in range(args.warmup + args.trials):
            ids = rng.choice(args.table_rows, args.rows, replace=False).astype(np.int64)
            vals = rng.standard_normal((args.rows, args.dim)).astype(np.float32)
            prev = last[ids]
            t0 = time.perf_counter()
            watchers = [asyncio.ensure_future(watch(session, ep, ids, prev, t0, poll_s)) for ep in eps]
            ack = await pub.publish(MODEL, TABLE, ids, vals)
            t_ack = time.perf_counter() - t0
            last[ids] = ack.versions[TABLE]
            done, pending = await asyncio.wait(watchers, timeout=TRIAL_TIMEOUT_S)
            for w in pending:
                w.cancel()
            counted = trial >= args.warmup
            if pending or any(w.exception() for w in done):
                timeouts += counted
                errs = [repr(w.exception()) for w in done if w.exception()]
                print(f"trial {trial}: {len(pending)} replicas did not get it in {TRIAL_TIMEOUT_S:.0f}s {errs[:2]}",
                      file=sys.stderr)
            elif counted:
                times = [w.result() for w in watchers]
                acks.append(t_ack)
                alls.append(max(times))
                for r, t in zip(cluster.replicas, times):
                    per_dc[r.dc].append(t)
                if args.verbose:
                    print(f"trial {trial - args.warmup}: ack {t_ack * 1000:.1f} ms, all {max(times) * 1000:.1f} ms")
            await asyncio.sleep(TRIAL_GAP_S)
    n = len(cluster.replicas)
    print()
    print(f"publish acknowledged (baseline: applied at the ingest replica) : {dist(acks)}")
    for dc, xs in per_dc.items():
        # per trial: the slowest replica of the DC
        k = len([r for r in cluster.replicas if r.dc == dc])
        worst = [max(xs[i:i + k]) for i in range(0, len(xs), k)]
        print(f"applied at every replica of {dc:<4}                            : {dist(worst)}")
    print(f"applied at all {n} replicas                                  : {dist(alls)}")
    if alls:
        med = pct(alls, 0.5)
        print(f"median all-{n} / median ack: {med / pct(acks, 0.5):.1f}x;  "
              f"bar: median <= {BAR_MEDIAN_S} s -> {'met' if med <= BAR_MEDIAN_S else 'NOT met'} "
              f"({med * 1000:.1f} ms)")
    if timeouts:
        print(f"{timeouts} of {args.trials} trials timed out (not in the figures)")
    return 0 if alls and not timeouts else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dcs", type=int, default=3)
    ap.add_argument("--per-dc", type=int, default=3)
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rows", type=int, default=1000, help="rows per update")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--table-rows", type=int, default=100_000)
    ap.add_argument("--poll-ms", type=float, default=2.0, help="pause between polls of one replica")
    ap.add_argument("--base-port", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-fsync", action="store_true",
                    help="publisher state without fsync (durable=False): shows what the fsyncs cost")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args()
    if args.trials < 1 or args.rows < 1 or args.rows > args.table_rows:
        ap.error("need trials >= 1 and 1 <= rows <= table-rows")
    data = Path(tempfile.mkdtemp(prefix="ekko-latency-"))
    cluster = LocalCluster(args.dcs, args.per_dc, data, args.base_port)
    import torch
    print(f"ekko latency bench: {args.dcs} DCs x {args.per_dc} replicas = {args.dcs * args.per_dc} "
          f"`ekko daemon` processes on loopback, --preset local, device cpu")
    print(f"machine: {platform.machine()} {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start; "
          f"python {platform.python_version()}, torch {torch.__version__}")
    print(f"update: {args.rows} rows x dim {args.dim} float32 of a {args.table_rows}-row table, published at "
          f"{cluster.replicas[0].node_id}; {args.trials} trials after {args.warmup} warm-up; watchers poll every "
          f"{args.poll_ms:g} ms (figures are upper bounds by about that plus one request); publisher state "
          f"{'without fsync' if args.no_fsync else 'fsynced (default)'}")
    cluster.start()
    try:
        cluster.wait_ready()
        if not cluster.wait_joined():
            print("warning: not every replica saw every other before the first trial", file=sys.stderr)
        rc = asyncio.run(run(args, cluster, data / "publisher"))
    finally:
        problems = cluster.stop()
        for p in problems:
            print(p, file=sys.stderr)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    return rc


if __name__ == "__main__":
    sys.exit(main())
