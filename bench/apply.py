"""Benchmark: TableStore.apply against a bare torch index_copy_ of the same rows.

What it measures: rows/s of ``TableStore.apply`` for deltas of ``--delta-rows``
random unique ids (dim ``--dim``, float32, versions above every version in the
table, so every row wins) into a ``--rows x --dim`` table, and, in the same run,
interleaved with it, a bare ``index_copy_`` of the same rows into a tensor of the
same size on the same device.  The baseline includes moving the delta's ids and
values from host numpy arrays to the device (free on the CPU), since apply has to
do that too; on CUDA it is also reported without the transfer.

Variants:
  * ``fresh``  -- every incoming row is newer (the main case, the issue's bar:
    apply >= 50% of the index_copy_ rate);
  * ``stale50`` -- half of the incoming rows carry a lower version than the table
    holds and must be dropped;
  * ``dup5`` -- 5% of the incoming rows repeat an id already in the delta with a
    different version (the greatest must win).

The rate is input rows per second (the delta's length over the time), for both.
Medians over ``--reps`` repetitions after ``--warmup`` untimed ones; apply and
the baseline alternate which goes first, on the CPU the caches are flushed before
each timed run (``--flush-mb``), and CUDA is synchronized around every timing.

Run:  python bench/apply.py [--rows 1000000 --delta-rows 100000 --dim 64 --reps 21]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np
import torch

from ekko.core.delta import Delta
from ekko.core.spec import TableSpec
from ekko.core.store import TableStore, default_device
from ekko.core.version import ORIGIN_BITS


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class CacheFlusher:
    """Writes a scratch buffer larger than the last-level cache between timed runs.

    Without it, whichever of apply and index_copy_ runs second finds the delta's
    values (25.6 MB in the main case) still in a 32 MB L3 and looks faster.
    """

    def __init__(self, mb: int) -> None:
        self.buf = np.ones(mb << 17, np.uint64) if mb > 0 else None

    def __call__(self) -> None:
        # read, not write: written lines would be dirty and their write-back would land
        # inside the next timed run
        if self.buf is not None:
            self.buf.max()


def timed(fn, device: torch.device, flush=None) -> float:
    if flush is not None:
        flush()
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def make_case(kind: str, rng: np.random.Generator, rows: int, n: int, dim: int, base_version: int,
              values: np.ndarray) -> Delta:
    """One delta of ``n`` rows; versions are above ``base_version`` except the stale half."""
    if kind == "dup5":
        k = n - n // 20
        uniq = rng.choice(rows, size=k, replace=False)
        ids = np.concatenate([uniq, rng.choice(uniq, size=n - k, replace=True)])
        rng.shuffle(ids)
    else:
        ids = rng.choice(rows, size=n, replace=False)
    ids = ids.astype(np.int64)
    # distinct counters per position so duplicates carry different versions
    versions = ((base_version + 1 + rng.permutation(n)) << ORIGIN_BITS | 1).astype(np.int64)
    if kind == "stale50":
        stale = rng.random(n) < 0.5
        versions[stale] = 1 << ORIGIN_BITS | 1   # below the table's floor, set in run_case
    return Delta("bench", "t", ids, versions, values)


def run_case(kind: str, args, device: torch.device, rng: np.random.Generator) -> dict:
    spec = TableSpec("t", rows=args.rows, dim=args.dim, dtype="float32")
    store = TableStore(spec, device=device)
    base = torch.zeros(args.rows, args.dim, dtype=torch.float32, device=device)
    # every row starts written at counter 2, so the stale half (counter 1) loses
    store.versions[:] = 2 << ORIGIN_BITS | 1
    values = rng.standard_normal((args.delta_rows, args.dim), dtype=np.float32)
    counter = 2 + args.delta_rows
    deltas = []
    for _ in range(args.distinct):
        deltas.append(make_case(kind, rng, args.rows, args.delta_rows, args.dim, 0, values))
    # device copies for the transfer-free baseline
    dev_inputs = [(torch.from_numpy(d.ids).to(device), torch.from_numpy(d.values).to(device)) for d in deltas]

    flush = CacheFlusher(args.flush_mb if device.type == "cpu" else 0)
    t_apply, t_copy, t_copy_resident = [], [], []
    for rep in range(args.warmup + args.reps):
        i = rep % args.distinct
        d = deltas[i]
        # bump the fresh versions above everything applied so far
        fresh = d.versions != (1 << ORIGIN_BITS | 1)
        versions = d.versions.copy()
        versions[fresh] += counter << ORIGIN_BITS
        counter += args.delta_rows + 1
        delta = Delta(d.model, d.table, d.ids, versions, d.values)

        def do_apply():
            store.apply(delta)

        def do_copy():
            idx = torch.from_numpy(delta.ids).to(device, non_blocking=True)
            src = torch.from_numpy(delta.values).to(device, non_blocking=True)
            base.index_copy_(0, idx, src)

        def do_copy_resident():
            base.index_copy_(0, dev_inputs[i][0], dev_inputs[i][1])

        order = [("a", do_apply), ("c", do_copy)]
        if device.type == "cuda":
            order.append(("r", do_copy_resident))
        if rep % 2:
            order.reverse()
        got = {name: timed(fn, device, flush) for name, fn in order}
        if rep >= args.warmup:
            t_apply.append(got["a"])
            t_copy.append(got["c"])
            if "r" in got:
                t_copy_resident.append(got["r"])
    # sanity: the apply really happened (last delta's winners hold its values)
    last = delta.latest_per_row()
    won = last.versions == store.versions[last.ids]
    assert won.any()
    assert torch.equal(store.read(last.ids[won]).cpu(), torch.from_numpy(last.values[won]))
    n = args.delta_rows
    out = {"kind": kind, "apply": n / statistics.median(t_apply), "copy": n / statistics.median(t_copy),
           "apply_ms": 1e3 * statistics.median(t_apply), "copy_ms": 1e3 * statistics.median(t_copy),
           "apply_iqr_ms": iqr_ms(t_apply), "copy_iqr_ms": iqr_ms(t_copy)}
    if t_copy_resident:
        out["resident"] = n / statistics.median(t_copy_resident)
    return out


def iqr_ms(ts: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(ts, n=4)
    return 1e3 * q[0], 1e3 * q[2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--delta-rows", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--reps", type=int, default=21)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--distinct", type=int, default=4, help="distinct id sets cycled through")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--cases", default="fresh,stale50,dup5")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--flush-mb", type=int, default=96,
                   help="CPU: MB of scratch written before each timed run to evict the caches (0: off)")
    args = p.parse_args()
    if args.reps < 15:
        p.error("use at least 15 repetitions")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device) if args.device else default_device()
    rng = np.random.default_rng(args.seed)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "-"
    print(f"ekko bench/apply.py  torch {torch.__version__}  numpy {np.__version__}  python {platform.python_version()}")
    print(f"device {device} ({gpu})  cpu {platform.processor() or platform.machine()}  "
          f"torch threads {torch.get_num_threads()}  cpus {os.cpu_count()}  "
          f"load avg {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"table {args.rows} x {args.dim} float32  delta {args.delta_rows} rows  "
          f"reps {args.reps} (median) after {args.warmup} warm-up  {args.distinct} id sets  seed {args.seed}  "
          f"cache flush {args.flush_mb if device.type == 'cpu' else 0} MB")
    print()
    print(f"{'case':8} {'apply rows/s':>14} {'index_copy_ rows/s':>19} {'ratio':>6}   "
          f"{'apply ms (q1-q3)':>20} {'copy ms (q1-q3)':>20}")
    for kind in args.cases.split(","):
        r = run_case(kind, args, device, rng)
        a1, a3 = r["apply_iqr_ms"]
        c1, c3 = r["copy_iqr_ms"]
        print(f"{kind:8} {r['apply']:14.3e} {r['copy']:19.3e} {r['apply'] / r['copy']:6.2f}   "
              f"{r['apply_ms']:7.2f} ({a1:5.2f}-{a3:5.2f}) {r['copy_ms']:7.2f} ({c1:5.2f}-{c3:5.2f})"
              + (f"   resident index_copy_ {r['resident']:.3e} rows/s" if "resident" in r else ""))
    print()
    print("ratio = apply rate / bare index_copy_ rate (host arrays -> device tensor), same run, interleaved; "
          "the bar for 'fresh' is >= 0.50")


if __name__ == "__main__":
    main()
