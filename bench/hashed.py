"""Benchmark: hashed tables (64-bit keys, issue #18) against dense-id tables on real daemons.

    python bench/hashed.py [--dcs 3 --per-dc 3] [--rows 200000] [--dim 64] [--batch 1000]
                           [--seconds 6] [--repeats 3] [--lookups 200]

Setup: ``--dcs x --per-dc`` ``ekko daemon`` processes on loopback (``--preset local``,
a cluster key, the write-ahead log on), one model with two tables of the same size: a
dense one (``rows x dim``, ids ``0..rows-1``) and a hashed one (``keys="int64"``,
``capacity = rows``, ``eviction="lru"``).  The hashed table is first filled to
capacity, so every later new key evicts one.

* **Publishing** (one publisher in this process, closed loop, one publish in flight):
  ``--seconds`` of ``--batch``-row publishes into the dense table (random distinct ids),
  then the same into the hashed table (random new int64 keys: each evicts a key),
  alternating, ``--repeats`` times.  Per run: rows/s acknowledged, the acknowledgement
  p50, and the seconds until every daemon holds the run's last publish at the versions
  acknowledged (its rows read back from every daemon by id -- a hashed table's by the
  slots the publisher gave its keys, so that no key map is built on the way -- polled
  every 50 ms: a proxy for "all of it", since each link sends in order).
* **Reads** (``Client``, one kept-alive connection, on the first daemon): ``--lookups``
  reads of 512 rows of the dense table by id (``Client.read``) and of the hashed table by
  key (``Client.lookup``, keys the table holds), alternating; p50 and p99.

Printed: how it was run, the load average before and after, medians over the repeats and
the ratio hashed / dense of each figure, measured in the same run.  A noisy, shared
2-core machine: quote the medians, rerun.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if sys.path and Path(sys.path[0]).resolve() == REPO / "bench":
    sys.path[0] = str(REPO)

import numpy as np  # noqa: E402

#: rows per read (the serving batch of bench/serving.py).
READ_ROWS = 512
#: seconds between two digest polls while waiting for every daemon.
POLL_S = 0.05
#: seconds a drain may take.
DRAIN_TIMEOUT_S = 120.0


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def _publish_run(pub, table: str, ids_of, batch: int, dim: int, seconds: float, rng):
    """Closed loop for ``seconds``; (rows acknowledged, ack latencies, (last ids, versions))."""
    vals = [rng.standard_normal((batch, dim), dtype=np.float32) for _ in range(4)]
    acks: list[float] = []
    last = None
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        ids = ids_of(batch)
        t0 = time.monotonic()
        ack = pub.publish("m", table, ids, vals[len(acks) % 4])
        acks.append(time.monotonic() - t0)
        last = (ids, np.asarray(ack.versions[table]))
    return len(acks) * batch, acks, last


def _drain_s(cluster, key: str, table: str, last, t_end: float) -> float:
    """Seconds after ``t_end`` until every daemon holds ``last`` (row ids, versions)."""
    from ekko import Client
    clients = [Client(ep, key=key, timeout=10) for ep in cluster.endpoints]
    ids, versions = last
    try:
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        pending = list(clients)
        while pending and time.monotonic() < deadline:
            pending = [c for c in pending if not np.array_equal(c.read("m", table, ids).versions, versions)]
            if pending:
                time.sleep(POLL_S)
        return time.monotonic() - t_end if not pending else float("nan")
    finally:
        for c in clients:
            c.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dcs", type=int, default=3)
    ap.add_argument("--per-dc", type=int, default=3)
    ap.add_argument("--rows", type=int, default=200_000, help="rows of the dense table = capacity of the hashed one")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--lookups", type=int, default=200)
    args = ap.parse_args(argv)
    os.environ["PYTHONPATH"] = str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")
    from ekko import Client, ModelSpec, Publisher, TableSpec
    from ekko.cli.demo import LocalCluster
    from ekko.core.key_index import EMPTY_KEY

    print(f"# python bench/hashed.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    print(f"# {args.dcs}x{args.per_dc} ekko daemons (preset local, cluster key, WAL), one publisher, closed loop; "
          f"{args.batch}-row publishes, {args.seconds:g} s per run, {args.repeats} repeats; "
          f"tables {args.rows} x {args.dim} float32: dense ids vs hashed (capacity {args.rows}, lru)")
    print(f"# load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")
    rng = np.random.default_rng(1)
    spec = ModelSpec("m", [TableSpec("dense", rows=args.rows, dim=args.dim),
                           TableSpec("hashed", dim=args.dim, keys="int64", capacity=args.rows, eviction="lru")])
    root = Path(tempfile.mkdtemp(prefix="ekko-bench-hashed-"))
    key = os.urandom(16).hex()
    (root / "cluster.key").write_text(key)
    (root / "cluster.key").chmod(0o600)
    ids = [f"dc{d + 1}-r{i + 1}" for d in range(args.dcs) for i in range(args.per_dc)]
    cluster = LocalCluster(args.dcs, args.per_dc, root / "cluster", preset="local", key_file=str(root / "cluster.key"),
                           device="cpu", node_config={nid: {"durability": "wal"} for nid in ids})
    cluster.start()
    out: dict[str, list[float]] = {k: [] for k in ("dense_rps", "hashed_rps", "dense_ack", "hashed_ack",
                                                   "dense_drain", "hashed_drain")}
    try:
        cluster.wait_ready(60)
        cluster.wait_joined()
        with Publisher(cluster.endpoints[0], origin="bench", key=key, state_dir=root / "pub", timeout=60) as pub:
            pub.register(spec)
            time.sleep(2.0)   # the catalog reaches every daemon
            # Fill the hashed table: from here each new key evicts one.
            fill = np.random.default_rng(7).integers(-2**63 + 2, 2**63 - 1, args.rows, dtype=np.int64)
            for lo in range(0, args.rows, 10_000):
                part = fill[lo:lo + 10_000]
                ack = pub.publish("m", "hashed", part, rng.standard_normal((len(part), args.dim), dtype=np.float32))
            slots = pub.slots("m", "hashed")
            _drain_s(cluster, key, "hashed", (slots.index.lookup(part), np.asarray(ack.versions["hashed"])),
                     time.monotonic())
            dense_ids = lambda n: rng.choice(args.rows, n, replace=False).astype(np.int64)  # noqa: E731
            new_keys = lambda n: rng.integers(-2**63 + 2, 2**63 - 1, n, dtype=np.int64)  # noqa: E731
            for rep in range(args.repeats):
                for name, ids_of in (("dense", dense_ids), ("hashed", new_keys)):
                    t0 = time.monotonic()
                    rows, acks, last = _publish_run(pub, name, ids_of, args.batch, args.dim, args.seconds, rng)
                    t_end = time.monotonic()
                    out[f"{name}_rps"].append(rows / (t_end - t0))
                    out[f"{name}_ack"].append(_pct(acks, 50) * 1e3)
                    if name == "hashed":   # read back by slot: the publisher's slots of the keys
                        last = (slots.index.lookup(last[0]), last[1])
                    out[f"{name}_drain"].append(_drain_s(cluster, key, name, last, t_end))
                    print(f"  repeat {rep + 1} {name:6s}: {out[f'{name}_rps'][-1]:9,.0f} rows/s acked, ack p50 "
                          f"{out[f'{name}_ack'][-1]:.1f} ms, every daemon {out[f'{name}_drain'][-1]:.2f} s later")
            evicted = slots.evicted
            held_keys = slots.index.keys_of(np.arange(args.rows))
            held_keys = held_keys[held_keys != EMPTY_KEY]      # what every daemon holds after the drains
        reads: dict[str, list[float]] = {"dense": [], "hashed": []}
        with Client(cluster.endpoints[0], key=key, timeout=10) as c:
            for i in range(args.lookups + 10):
                a = time.perf_counter()
                c.read("m", "dense", rng.choice(args.rows, READ_ROWS, replace=False))
                b = time.perf_counter()
                got = c.lookup("m", "hashed", rng.choice(held_keys, READ_ROWS, replace=False))
                e = time.perf_counter()
                assert got.found.all()
                if i >= 10:
                    reads["dense"].append((b - a) * 1e6)
                    reads["hashed"].append((e - b) * 1e6)
    finally:
        problems = cluster.stop()
        for p in problems:
            print(f"# cluster: {p}", file=sys.stderr)
    med = {k: statistics.median(v) for k, v in out.items()}
    print(f"\n| figure (median of {args.repeats}) | dense ids | hashed keys | hashed / dense |")
    print("|---|---|---|---|")
    print(f"| rows/s acknowledged | {med['dense_rps']:,.0f} | {med['hashed_rps']:,.0f} | "
          f"{med['hashed_rps'] / med['dense_rps']:.2f}x |")
    print(f"| acknowledgement p50 (ms) | {med['dense_ack']:.1f} | {med['hashed_ack']:.1f} | "
          f"{med['hashed_ack'] / med['dense_ack']:.2f}x |")
    print(f"| every daemon holds the last publish, s after the run | {med['dense_drain']:.3f} | "
          f"{med['hashed_drain']:.3f} | "
          f"{med['hashed_drain'] / max(med['dense_drain'], 1e-9):.2f}x |")
    for q in (50, 99):
        d, h = _pct(reads["dense"], q), _pct(reads["hashed"], q)
        print(f"| read of {READ_ROWS} rows p{q} (us): by id / by key | {d:,.0f} | {h:,.0f} | {h / d:.2f}x |")
    print(f"\n# keys evicted by the hashed runs: {evicted:,}")
    print(f"# load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
