"""Benchmark: rolling one table back to a cut on one replica, against a bare index_copy_.

What it measures: the time to compute the restore targets of ``--changed`` rows
from the undo history and write them with :meth:`ekko.core.store.TableStore.restore_rows`,
in a ``--rows x --dim`` float32 table, two ways:

* ``restore_at_cut`` -- :meth:`rollback.undo.UndoHistory.restore_at_cut`, the path
  a node uses: targets written segment by segment, no restore-sized output array;
* ``values_at_cut + restore_rows`` -- the two-step API (targets as arrays, then one
  write), which allocates and fills an output array the size of the restore;

and, in the same run, interleaved with them, a bare ``index_copy_`` of the same
rows (same ids, same order, same bytes) from host arrays into a tensor of the
same size on the same device.  The rate is restored rows per second; the bar is
restore >= 50 % of the index_copy_ rate.

The history is realistic rather than best case: ``--pre-deltas`` deltas of
``--changed`` random rows each before the cut (covered by it), then the bad
updates after it: ``--changed`` rows split over ``--bad-deltas`` deltas, plus
``--rehits`` deltas that update a fifth of those rows again (so the walk has to
step over a newer uncovered record to find the covered one).  History is pooled
into segments as the node would record it (default 4 MiB blocks; the large bad
deltas are segments of their own).  Finding which rows need restoring (a scan of
the table's versions against the cut) is timed separately: the node does it
once per rollback for every table, and it does not depend on the history.

On a machine shared with other work, torch's multi-threaded index_copy_ waits at
its barrier for descheduled threads, which inflates every line unevenly; the
ratios are then also printed per repetition pair, and ``--threads 1`` gives a
steadier comparison.

Runs: ``--warmup`` untimed, then ``--reps`` timed (medians, with quartiles);
before every timed run the table is put back into its post-bad-update state
(untimed), the CPU caches are flushed (``--flush-mb`` of reads), and the order
of restore and baseline alternates.  CUDA is synchronized around each timing;
there the undo history lives in host memory (it is what the store hands out), so
the baseline includes the host->device copy, and a device-resident index_copy_
is reported too.

Run:  python bench/rollback_restore.py [--rows 1000000 --changed 100000 --dim 64 --reps 21]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

# Run as a script, this file's folder is sys.path[0], and this file's name would shadow
# the rollback package it benchmarks.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ekko.core.delta import Delta
from ekko.core.spec import TableSpec
from ekko.core.store import TableStore, default_device, to_wire_values
from ekko.core.version import Knowledge, pack
from rollback.cuts import Cut
from rollback.undo import UndoHistory

MODEL = "bench"
TABLE = "t"
GOOD_ORIGIN = 1
BAD_ORIGIN = 2


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class CacheFlusher:
    """Reads a buffer larger than the last-level cache, so neither contender finds its inputs cached."""

    def __init__(self, mb: int) -> None:
        self.buf = np.ones(mb << 17, np.uint64) if mb > 0 else None

    def __call__(self) -> None:
        if self.buf is not None:
            self.buf.max()   # a read: written lines would be written back inside the next timing


def timed(fn, device: torch.device, flush) -> float:
    flush()
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def q13_ms(ts: list[float]) -> str:
    q = statistics.quantiles(ts, n=4)
    return f"{1e3 * statistics.median(ts):7.2f} ({1e3 * q[0]:6.2f}-{1e3 * q[2]:6.2f})"


def build(args, device: torch.device, rng: np.random.Generator):
    """A store and its undo history: good updates, a cut, then the bad updates."""
    spec = TableSpec(TABLE, rows=args.rows, dim=args.dim)
    store = TableStore(spec, device=device)
    undo = UndoHistory(max_bytes=args.history_mb << 20)
    seq = 0
    counter = 1

    def apply(ids: np.ndarray, origin: int) -> None:
        nonlocal seq, counter
        ids = ids.astype(np.int64)
        versions = pack(counter, origin) + (np.arange(len(ids), dtype=np.int64) << 16)
        counter += len(ids)
        values = rng.standard_normal((len(ids), args.dim), dtype=np.float32)
        seq += 1
        undo.record(MODEL, TABLE, seq, store.apply(Delta(MODEL, TABLE, ids, versions, values), capture_old=True))

    for _ in range(args.pre_deltas):
        apply(rng.choice(args.rows, args.changed, replace=False), GOOD_ORIGIN)
    cut = Cut("before-bad", MODEL, 0.0,
              {(TABLE, s): Knowledge({GOOD_ORIGIN: counter - 1}) for s in range(spec.num_shards)}, seq + 1)
    pool = rng.choice(args.rows, args.changed, replace=False).astype(np.int64)
    expect_versions = store.versions[pool].copy()
    expect_values = to_wire_values(store.read(pool))
    for part in np.array_split(pool, args.bad_deltas):
        apply(part, BAD_ORIGIN)
    for _ in range(args.rehits):
        apply(rng.choice(pool, len(pool) // 5, replace=False), BAD_ORIGIN)
    return spec, store, undo, cut, pool, expect_versions, expect_values


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--changed", type=int, default=100_000, help="rows the rollback restores")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--pre-deltas", type=int, default=3, help="deltas of --changed rows before the cut")
    p.add_argument("--bad-deltas", type=int, default=5, help="deltas the bad rows are split over")
    p.add_argument("--rehits", type=int, default=3, help="extra bad deltas re-updating a fifth of the rows")
    p.add_argument("--history-mb", type=int, default=1024, help="undo history memory budget")
    p.add_argument("--reps", type=int, default=21)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--flush-mb", type=int, default=96, help="CPU: MB read before each timed run (0: off)")
    args = p.parse_args()
    if args.reps < 15:
        p.error("use at least 15 repetitions")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device) if args.device else default_device()
    rng = np.random.default_rng(args.seed)
    load_before = os.getloadavg()

    spec, store, undo, cut, pool, expect_versions, expect_values = build(args, device, rng)
    covered = cut.covered_fn(spec)

    def scan() -> np.ndarray:
        return cut.rows_to_restore(spec, store.versions)

    rows = scan()
    assert len(rows) == len(pool)
    bad_versions = store.versions[rows].copy()
    bad_values = to_wire_values(store.read(rows))
    targets = undo.values_at_cut(MODEL, TABLE, rows, covered)
    order_ids = targets[0]
    host_values = np.ascontiguousarray(targets[2])
    base = torch.zeros(args.rows, args.dim, dtype=torch.float32, device=device)
    dev_idx = torch.from_numpy(order_ids).to(device)
    dev_src = torch.from_numpy(host_values).to(device)

    def reset() -> None:
        store.restore_rows(rows, bad_versions, bad_values)
        sync(device)

    def do_fused() -> None:
        outcome = undo.restore_at_cut(MODEL, TABLE, store, rows, covered)
        assert len(outcome.incomplete) == 0

    def do_restore() -> None:
        ids, versions, values, complete = undo.values_at_cut(MODEL, TABLE, rows, covered)
        if not complete.all():     # never here; a node repairs these rows from a peer
            ids, versions, values = ids[complete], versions[complete], values[complete]
        store.restore_rows(ids, versions, values)

    def do_targets() -> None:
        undo.values_at_cut(MODEL, TABLE, rows, covered)

    def do_write() -> None:
        store.restore_rows(targets[0], targets[1], targets[2])

    def do_copy() -> None:
        idx = torch.from_numpy(order_ids).to(device, non_blocking=True)
        src = torch.from_numpy(host_values).to(device, non_blocking=True)
        base.index_copy_(0, idx, src)

    def do_resident() -> None:
        base.index_copy_(0, dev_idx, dev_src)

    flush = CacheFlusher(args.flush_mb if device.type == "cpu" else 0)
    contenders = [("fused", do_fused), ("copy", do_copy), ("restore", do_restore), ("targets", do_targets),
                  ("write", do_write)]
    if device.type == "cuda":
        contenders.append(("resident", do_resident))
    times: dict[str, list[float]] = {name: [] for name, _ in contenders}
    t_scan = []
    for rep in range(args.warmup + args.reps):
        order = contenders if rep % 2 == 0 else contenders[::-1]
        got = {}
        for name, fn in order:
            reset()
            got[name] = timed(fn, device, flush)
        got_scan = timed(scan, device, flush)
        if rep >= args.warmup:
            for name, t in got.items():
                times[name].append(t)
            t_scan.append(got_scan)

    # both paths really put the cut state back
    for fn in (do_fused, do_restore):
        reset()
        fn()
        sync(device)
        assert np.array_equal(store.versions[pool], expect_versions)
        assert np.array_equal(to_wire_values(store.read(pool)), expect_values)
    hist = undo.stats()

    n = len(rows)
    med = {k: statistics.median(v) for k, v in times.items()}
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "-"
    print(f"ekko bench/rollback_restore.py  torch {torch.__version__}  numpy {np.__version__}  "
          f"python {platform.python_version()}")
    print(f"device {device} ({gpu})  cpu {platform.processor() or platform.machine()}  "
          f"torch threads {torch.get_num_threads()}")
    print(f"table {args.rows} x {args.dim} float32; restore {n} rows ({n * spec.row_bytes / 1e6:.1f} MB of values); "
          f"history {hist['segments']} segments, {hist['memory_bytes'] / 1e6:.0f} MB "
          f"({args.pre_deltas} pre-cut deltas of {args.changed} rows, {args.bad_deltas} bad deltas + "
          f"{args.rehits} re-hits of {args.changed // 5} rows)")
    print(f"reps {args.reps} (median, q1-q3) after {args.warmup} warm-up, interleaved, alternating order; "
          f"cache flush {args.flush_mb if device.type == 'cpu' else 0} MB; seed {args.seed}")
    print(f"load average before/after: {load_before[0]:.2f} / {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs "
          "(other work on the machine inflates every line alike; compare ratios)")
    print()
    print(f"{'':34} {'ms (q1-q3)':>24} {'rows/s':>10}")
    rows_fmt = [("restore_at_cut", "fused"), ("values_at_cut + restore_rows", "restore"),
                ("  values_at_cut alone", "targets"), ("  restore_rows alone", "write"),
                ("bare index_copy_ (host arrays)", "copy")]
    if "resident" in times:
        rows_fmt.append(("bare index_copy_ (device-resident)", "resident"))
    for label, key in rows_fmt:
        print(f"{label:34} {q13_ms(times[key]):>24} {n / med[key]:10.3e}")
    print(f"{'scan for rows to restore (separate)':34} {q13_ms(t_scan):>24}")
    print()
    paired = {k: statistics.median(c / t for c, t in zip(times["copy"], times[k])) for k in ("fused", "restore")}
    print(f"ratio restore_at_cut / bare index_copy_ rate: {med['copy'] / med['fused']:.2f} of medians, "
          f"{paired['fused']:.2f} median of per-rep pairs  (bar >= 0.50)")
    print(f"ratio values_at_cut + restore_rows / bare index_copy_ rate: {med['copy'] / med['restore']:.2f} of medians, "
          f"{paired['restore']:.2f} median of per-rep pairs")
    if "resident" in med:
        print(f"ratio restore_at_cut vs device-resident index_copy_: {med['resident'] / med['fused']:.3f}")


if __name__ == "__main__":
    main()
