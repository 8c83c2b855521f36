"""Benchmark: the cost constants of the simulator's endpoint CPU model (:mod:`simulator.cpu`).

What it measures, each on the production code path, as the median over ``--reps``
timed repetitions after ``--warmup`` untimed ones (one core, this process):

* ``per_message_s`` -- a bare ``ReplicaNode.receive`` of a small frame: an
  anti-entropy summary (``GOSSIP``/``sum``) whose table digests equal the node's
  own, so the node compares and sends nothing.  The node holds the ``paper``
  scenario's model.  (``decode_frame`` of the same frame is printed beside it for
  reference; the CPU model does not charge it.)
* ``apply_s_per_row`` -- ``TableStore.apply`` of a ``--batch``-row delta (random
  distinct ids, every row newer, float32 values of the paper's ``emb`` width) into
  a ``--apply-rows``-row table with values, divided by the batch.
* ``scan_s_per_row`` -- the full-scan comparison, ``TableStore.scan_newer`` of one
  ``--scan-rows``-row shard against a one-origin knowledge that covers all but
  ``--newer`` rows, divided by the rows walked.
* ``index_s_per_row`` -- ``RecentIndex.newer_than_many`` over every shard of the
  paper's ``emb`` table (the lookup a pull answer makes), with the index holding
  ``--index-rows`` recently applied rows of which ``--newer`` are above the
  requester's knowledge, divided by the candidate rows it compared (its own
  ``rows_examined`` counter).

There is no baseline to print a ratio against (these are absolute constants for the
model); the spread (min and max) of the timed repetitions is printed beside each
median so noise on a shared machine shows.  The TOML lines at the end go into a
scenario's ``[cpu]`` table.

Run:  python bench/sim_cpu_costs.py [--reps 41]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from datetime import UTC, datetime

# Run as a script, bench/ would come first on sys.path; import this checkout's
# packages instead.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [os.path.dirname(_HERE)] + [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import numpy as np

from ekko.core.codec import Frame, MsgType, decode_frame, encode_frame
from ekko.core.delta import Delta
from ekko.replica.node import ReplicaNode
from p2p.antientropy import _scope_digest
from ekko.core.spec import TableSpec
from ekko.core.store import TableStore
from ekko.core.version import ORIGIN_BITS, Knowledge
from p2p.membership import Member
from p2p.sync import RecentIndex
from simulator.scenario import load_scenario

ORIGIN = 1


def pack(counters: np.ndarray) -> np.ndarray:
    return (counters.astype(np.int64) << ORIGIN_BITS) | ORIGIN


def median_of(fn, reps: int, warmup: int, per: float = 1.0) -> tuple[float, float, float]:
    """(median, min, max) seconds of ``fn()`` divided by ``per``."""
    got = []
    for i in range(warmup + reps):
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        if i >= warmup:
            got.append(dt / per)
    return statistics.median(got), min(got), max(got)


def bench_message(args) -> dict[str, tuple[float, float, float]]:
    sc = load_scenario("paper")
    node = ReplicaNode("r0", "dc0", "r0", config=sc.node, with_values=True, device="cpu")
    node.register_model(sc.model, 0.0)
    node.members.merge([Member("r1", "dc1", "r1", 1, 1)], 0.0)
    m = node.models[sc.model.name]
    sums = {sc.model.name: {t.name: _scope_digest(m.shard_digests(t.name), None) for t in sc.model.tables}}
    body = {"k": "sum", "from": "r1", "scope": ["any"], "models": sums}
    frame = Frame(MsgType.GOSSIP, body)
    wire = encode_frame(MsgType.GOSSIP, body)
    n = args.messages

    def receive():
        for i in range(n):
            node.receive(frame, 1.0 + i * 1e-6, "r1")

    def decode():
        for _ in range(n):
            decode_frame(wire)

    out = {"per_message_s": median_of(receive, args.reps, args.warmup, n),
           "decode_small_frame_s (not charged)": median_of(decode, args.reps, args.warmup, n)}
    assert not node.drain(), "the summary should need no answer"
    return out


def bench_apply(args, rng: np.random.Generator) -> tuple[float, float, float]:
    dim = load_scenario("paper").model.table("emb").dim
    ts = TableStore(TableSpec("emb", rows=args.apply_rows, dim=dim), device="cpu", with_values=True)
    values = rng.standard_normal((args.batch, dim), dtype=np.float32)
    deltas = [rng.choice(args.apply_rows, size=args.batch, replace=False).astype(np.int64)
              for _ in range(16)]
    counter = [1]

    def apply():
        ids = deltas[counter[0] % len(deltas)]
        vers = pack(np.arange(counter[0], counter[0] + args.batch))
        counter[0] += args.batch
        ts.apply(Delta("m", "emb", ids, vers, values))

    return median_of(apply, args.reps, args.warmup, args.batch)


def bench_scan(args, rng: np.random.Generator) -> tuple[float, float, float]:
    ts = TableStore(TableSpec("emb", rows=args.scan_rows, dim=1, shards=1), device="cpu", with_values=False)
    known = 1_000_000
    ts.versions[:] = pack(rng.integers(1, known, args.scan_rows))
    ts.versions[rng.choice(args.scan_rows, size=args.newer, replace=False)] = pack(
        known + 1 + np.arange(args.newer))
    k = Knowledge({ORIGIN: known})
    found = ts.scan_newer(0, k)[0]
    assert len(found) == args.newer
    return median_of(lambda: ts.scan_newer(0, k), args.reps, args.warmup, args.scan_rows)


def bench_index(args, rng: np.random.Generator) -> tuple[float, float, float, int]:
    spec = load_scenario("paper").model.table("emb")
    ts = TableStore(spec, device="cpu", with_values=False)
    ix = RecentIndex()
    ids = rng.choice(spec.rows, size=args.index_rows, replace=False).astype(np.int64)
    vers = pack(np.arange(1, args.index_rows + 1))
    ts.versions[ids] = vers
    for part in range(0, args.index_rows, args.batch):
        ix.note_applied(ids[part:part + args.batch], vers[part:part + args.batch], 0.0, 10 * args.index_rows)
    shards = list(range(spec.num_shards))
    theirs = [Knowledge({ORIGIN: args.index_rows - args.newer})] * len(shards)
    mine = [Knowledge({ORIGIN: args.index_rows})] * len(shards)
    got = ix.newer_than_many(ts, shards, theirs, mine)
    assert sum(len(g[0]) for g in got) == args.newer
    e0 = ix.rows_examined
    ix.newer_than_many(ts, shards, theirs, mine)
    per_call = ix.rows_examined - e0
    assert ix.rows_walked == 0, "the index path must not fall back to scans here"
    return (*median_of(lambda: ix.newer_than_many(ts, shards, theirs, mine), args.reps, args.warmup, per_call),
            per_call)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                        platform.processor())
    except OSError:
        return platform.processor()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=41)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--messages", type=int, default=200, help="receives per timed repetition")
    ap.add_argument("--batch", type=int, default=500,
                    help="rows per apply (paper: 5000 rows/s in 100 ms batches)")
    ap.add_argument("--apply-rows", type=int, default=1_000_000)
    ap.add_argument("--scan-rows", type=int, default=8_000_000)
    ap.add_argument("--index-rows", type=int, default=10_000)
    ap.add_argument("--newer", type=int, default=500)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    print(f"# bench/sim_cpu_costs.py {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {cpu_name()}, "
          f"{os.cpu_count()} cores, Python {platform.python_version()}, numpy {np.__version__}")
    print(f"# args: {vars(args)}")
    rows: dict[str, tuple[float, float, float]] = {}
    rows.update(bench_message(args))
    rows["apply_s_per_row"] = bench_apply(args, rng)
    rows["scan_s_per_row"] = bench_scan(args, rng)
    *idx, per_call = bench_index(args, rng)
    rows["index_s_per_row"] = tuple(idx)  # type: ignore[assignment]
    print(f"# index lookup compared {per_call} candidate rows per call")
    print(f"{'constant':40s} {'median':>12s} {'min':>12s} {'max':>12s}")
    for name, (med, lo, hi) in rows.items():
        print(f"{name:40s} {med:12.3e} {lo:12.3e} {hi:12.3e}")
    print("\n# [cpu] table for a scenario:")
    for name in ("per_message_s", "apply_s_per_row", "scan_s_per_row", "index_s_per_row"):
        print(f"{name} = {rows[name][0]:.3g}")


if __name__ == "__main__":
    main()
