"""Throughput of the link queues: row updates per second through put + take.

Workload: batches of row updates over a 1M-row key space, drawn with a skew
(``id = floor(K * u**SKEW)``) so hot rows repeat and coalesce, with random
scores and ~5% high rows.  Each run first fills the queue to a steady depth
(untimed), then alternates ``put(batch)`` and ``take`` of frames of
``FRAME_BYTES`` until about a batch's worth of bytes has left, so the depth
stays roughly constant; the figure is row updates put / wall time of the whole
put + take loop.  Separate put-only (into an empty queue, no takes) and
take-only (draining) figures show where the time goes.  Each figure is the
median of ``--repeats`` runs; the plain :class:`p2p.outbound.FifoLinkQueue` is
measured on the same batches in the same run as the baseline (its take-only
figure is large because it hands out its queued batches whole, and its put
costs O(depth), so its put phase is usually cut short by the time cap).

Run: ``python bench/scheduler.py [--quick]``.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import time

# Run as a script, bench/ is sys.path[0]: put this checkout's root there instead, so the
# packages measured are this checkout's (no bench file may shadow one:
# tests/bench/test_bench_scripts.py).
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [os.path.dirname(_HERE)] + [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import numpy as np  # noqa: E402

from p2p.outbound import FifoLinkQueue, QueuedRows  # noqa: E402
from prioritizer import FifoBudgetQueue, Prioritizer, PriorityLinkQueue  # noqa: E402

#: rows in the key space.
KEY_SPACE = 1 << 20
#: skew of the id distribution (1 = uniform; 3 = a hot tail near id 0).
SKEW = 3.0
#: value bytes of one row (64 float32).
ROW_BYTES = 256
#: bytes per frame asked of take().
FRAME_BYTES = 1 << 20
#: the bar: row updates per second on this machine.
BAR_ROWS_PER_S = 1_000_000
#: a timed phase stops after this many seconds (the rate is over the rows it
#: got through), so a slow queue cannot make the bench run for minutes.
MAX_PHASE_S = 8.0


def make_batches(n_rows: int, batch: int, seed: int) -> list[QueuedRows]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(0, n_rows, batch):
        b = min(batch, n_rows - i)
        ids = np.floor(KEY_SPACE * rng.random(b) ** SKEW).astype(np.int64)
        vers = np.full(b, i + 1, np.int64)
        scores = rng.lognormal(0.0, 1.0, b).astype(np.float32)
        high = scores > np.float32(5.2)         # about the top 5% of a lognormal(0, 1)
        out.append(QueuedRows("m", "emb", ids, vers, ROW_BYTES, scores=scores, high=high))
    return out


def drain(q, now: float) -> int:
    n = 0
    while q.rows:
        n += sum(len(f) for f in q.take(now, FRAME_BYTES))
    return n


def run_steady(make_queue, warm: list[QueuedRows], batches: list[QueuedRows]) -> tuple[float, float, int]:
    """(row updates/s of the put + take loop at a steady depth by wall clock, the same
    by this process's CPU time, rows taken).

    After each put, full frames are taken until the depth is back at the
    warm-up depth, so every row put either coalesces or is taken.
    """
    q = make_queue()
    now = 0.0
    for b in warm:
        q.put(b, now)
        now += 0.001
    target = q.rows
    rows = taken = 0
    gc.collect()
    t0, c0 = time.perf_counter(), time.process_time()
    for b in batches:
        q.put(b, now)
        rows += len(b)
        while q.rows > target:
            taken += sum(len(f) for f in q.take(now, FRAME_BYTES))
        now += 0.001
        if time.perf_counter() - t0 > MAX_PHASE_S:
            break
    dt, dc = time.perf_counter() - t0, time.process_time() - c0
    return rows / dt, rows / dc, taken


def run_put_take(make_queue, batches: list[QueuedRows]) -> tuple[float, float, int, int]:
    """(put rows/s into an empty queue, take rows/s draining it, depth, rows put)."""
    q = make_queue()
    rows = 0
    gc.collect()
    t0 = time.perf_counter()
    for i, b in enumerate(batches):
        q.put(b, i * 0.001)
        rows += len(b)
        if time.perf_counter() - t0 > MAX_PHASE_S:
            break
    t1 = time.perf_counter()
    depth = q.rows
    taken = drain(q, len(batches) * 0.001)
    t2 = time.perf_counter()
    assert taken == depth
    return rows / (t1 - t0), taken / (t2 - t1), depth, rows


def run_prioritizer(batches: list[QueuedRows], access: bool = True) -> float:
    """Row updates/s through scoring (+ row popularity) + threshold + classification (the per-node part)."""
    p = Prioritizer(access=None if access else False)
    rng = np.random.default_rng(5)
    impacts = [rng.lognormal(0.0, 1.0, len(b)).astype(np.float32) for b in batches]
    olds = [np.where(rng.random(len(b)) < 0.02, 0, 1) for b in batches]
    rows = sum(len(b) for b in batches)
    t0 = time.perf_counter()
    for i, b in enumerate(batches):
        p.queued_rows(b.model, b.table, b.ids, b.versions, b.row_bytes, i * 0.001, impacts[i], olds[i])
    return rows / (time.perf_counter() - t0)


QUEUES = {
    "PriorityLinkQueue": lambda: PriorityLinkQueue(),
    "FifoBudgetQueue": lambda: FifoBudgetQueue(),
    "p2p FifoLinkQueue (baseline)": lambda: FifoLinkQueue(),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=2_000_000, help="row updates per timed run")
    ap.add_argument("--depth", type=int, default=200_000, help="row updates put before timing (steady depth)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1_000, 10_000])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="smaller runs, 3 repeats")
    a = ap.parse_args(argv)
    if a.quick:
        a.rows, a.depth, a.repeats = 500_000, 100_000, 3
    print(f"# bench/scheduler.py  python {platform.python_version()}  numpy {np.__version__}  "
          f"{platform.machine()}  cpus={os.cpu_count()}  {platform.processor() or ''}".rstrip())
    print(f"# load average before: {os.getloadavg()[0]:.2f} (other processes share the {os.cpu_count()} cores)")
    print(f"# key space {KEY_SPACE:,} rows, id = floor(K * u**{SKEW}) (hot rows repeat), row {ROW_BYTES} B, "
          f"frames of {FRAME_BYTES:,} B, unlimited budget; median of {a.repeats} runs; "
          f"{a.rows:,} row updates per run after a {a.depth:,}-update warm-up; "
          f"a phase stops after {MAX_PHASE_S:.0f} s and reports the rate so far")
    ok = True
    for bs in a.batches:
        warm = make_batches(a.depth, bs, seed=1)
        batches = make_batches(a.rows, bs, seed=2)
        uniq = len(np.unique(np.concatenate([b.ids for b in batches])))
        print(f"\n## batch {bs:,} rows  ({len(batches)} batches, {uniq / a.rows:.0%} distinct ids per run)")
        print(f"{'queue':30s} {'steady put+take':>15s} {'(cpu time)':>12s} {'put only':>12s} {'take only':>12s} "
              f"{'depth':>9s} {'steady taken':>13s}")
        base = None
        for name, make in QUEUES.items():
            runs = [run_steady(make, warm, batches) for _ in range(a.repeats)]
            steady = statistics.median(r[0] for r in runs)
            steady_cpu = statistics.median(r[1] for r in runs)
            steady_taken = runs[0][2]
            pt = [run_put_take(make, batches) for _ in range(a.repeats)]
            put = statistics.median(x[0] for x in pt)
            take = statistics.median(x[1] for x in pt)
            depth = pt[0][2]
            if "baseline" in name:
                base = steady
            print(f"{name:30s} {steady / 1e6:11.2f} M/s {steady_cpu / 1e6:8.2f} M/s {put / 1e6:8.2f} M/s "
                  f"{take / 1e6:8.2f} M/s {depth:9,d} {steady_taken:13,d}")
            if name == "PriorityLinkQueue":
                prio_steady = steady
                ok &= steady >= BAR_ROWS_PER_S
        print(f"PriorityLinkQueue / p2p FifoLinkQueue (steady, wall): {prio_steady / base:.1f}x;  "
              f"bar {BAR_ROWS_PER_S / 1e6:.1f} M/s: {'met' if prio_steady >= BAR_ROWS_PER_S else 'NOT met'}")
        sc = statistics.median(run_prioritizer(batches) for _ in range(a.repeats))
        sc0 = statistics.median(run_prioritizer(batches, access=False) for _ in range(a.repeats))
        print(f"Prioritizer (score + popularity + threshold + classify): {sc / 1e6:.2f} M/s;  "
              f"without popularity (paper's score): {sc0 / 1e6:.2f} M/s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
