"""Benchmark: a model placed across each DC (issue #18) on real daemons.

    python bench/placement.py [--dcs 3 --per-dc 3] [--keys 200000] [--capacity 524288]
                              [--dim 64] [--shards 1024] [--batch 10000] [--read-window 30]

Setup: ``--dcs x --per-dc`` ``ekko daemon`` processes on loopback (``--preset local``, a
cluster key, the write-ahead log on) and one model with one hashed table (``keys="int64"``,
``--capacity`` slots of ``--dim`` float32, ``--shards`` shards) placed with
``replicas_per_shard = 1``: each shard lives on one daemon per DC.

1. **Publish**: ``--keys`` random int64 keys in ``--batch``-key publishes, all to the first
   daemon (which relays each part to its holder, :mod:`ekko.server.placed_routes`).
2. **Converge**: until every key reads back exactly (values, found) through
   ``Client.lookup`` from *every* daemon (each routes to the holders of its DC).
3. **Memory**: each daemon's table memory (``table_bytes`` of ``/v1/status``: values of
   the shards it keeps, versions and tombstones) against the whole table's, which a
   replicated daemon allocates; and each daemon's VmRSS.
4. **A holder dies**: ``dc2-r2`` is SIGKILLed while a reader looks up random samples of
   the keys through ``dc2-r1``, back to back, counting exact, wrong and failed reads
   until the dead daemon's shards are taken and filled by the other members of dc2 (and
   ``--read-window`` seconds at least).
5. **A replacement joins**: a new daemon ``dc2-r9`` starts in dc2; time until it holds
   its shards, filled, and every key reads back exactly through it.

Printed: how it was run, the load average before and after, each figure.  One run (the
figures are times on a noisy, shared 2-core machine: rerun before quoting a ratio).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if sys.path and Path(sys.path[0]).resolve() == REPO / "bench":
    sys.path[0] = str(REPO)

import numpy as np  # noqa: E402

#: keys per sampled read during the holder's death.
SAMPLE_KEYS = 2000
#: seconds a convergence may take.
CONVERGE_TIMEOUT_S = 300.0


def vm_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def wait(pred, timeout: float, what: str, poll: float = 0.25) -> float:
    """Seconds until ``pred()`` is true; RuntimeError after ``timeout``."""
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(poll)
    return time.monotonic() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dcs", type=int, default=3)
    ap.add_argument("--per-dc", type=int, default=3)
    ap.add_argument("--keys", type=int, default=200_000)
    ap.add_argument("--capacity", type=int, default=1 << 19)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--shards", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=10_000)
    ap.add_argument("--read-window", type=float, default=30.0, help="seconds of reads at least after the kill")
    args = ap.parse_args(argv)
    os.environ["PYTHONPATH"] = str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")
    from ekko import Client, ModelSpec, Publisher, TableSpec
    from ekko.cli.demo import LocalCluster, daemon_env, free_port
    from ekko.core.errors import EkkoError

    print(f"# python bench/placement.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    print(f"# {args.dcs}x{args.per_dc} ekko daemons (preset local, cluster key, WAL); hashed table capacity "
          f"{args.capacity} x dim {args.dim} float32, {args.shards} shards, replicas_per_shard=1; "
          f"{args.keys} keys in {args.batch}-key publishes to dc1-r1")
    print(f"# load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")
    table = TableSpec("ads", dim=args.dim, keys="int64", capacity=args.capacity, shards=args.shards, eviction="lru")
    spec = ModelSpec("big", [table], replicas_per_shard=1)
    full_bytes = table.rows * (table.row_bytes + 9)      # what a replicated daemon allocates
    root = Path(tempfile.mkdtemp(prefix="ekko-bench-placement-"))
    key = os.urandom(16).hex()
    (root / "cluster.key").write_text(key)
    (root / "cluster.key").chmod(0o600)
    ids = [f"dc{d + 1}-r{i + 1}" for d in range(args.dcs) for i in range(args.per_dc)]
    cluster = LocalCluster(args.dcs, args.per_dc, root / "cluster", preset="local", key_file=str(root / "cluster.key"),
                           device="cpu", node_config={nid: {"durability": "wal"} for nid in ids})
    by_id = {r.node_id: r for r in cluster.replicas}
    extra: subprocess.Popen | None = None
    rng = np.random.default_rng(18)
    cluster.start()
    try:
        cluster.wait_ready(120)
        cluster.wait_joined()

        def info(address: str) -> dict:
            with Client(address, key=key, timeout=10) as c:
                return c.status()["models"]["big"]["tables"]["ads"]

        def exact(address: str, keys: np.ndarray, want: np.ndarray) -> bool:
            with Client(address, key=key, timeout=30) as c:
                got = c.lookup("big", "ads", keys)
            return bool(got.found.all() and np.array_equal(got.values.numpy(), want))

        keys = np.unique(rng.integers(-2**63 + 2, 2**63 - 1, args.keys, dtype=np.int64))
        vals = rng.standard_normal((len(keys), args.dim), dtype=np.float32)
        with Publisher(cluster.endpoints[0], origin="bench", key=key, state_dir=root / "pub", timeout=120) as pub:
            pub.register(spec)
            wait(lambda: all("big" in Client(ep, key=key).status()["models"] for ep in cluster.endpoints), 60,
                 "the model everywhere")
            t0 = time.monotonic()
            for lo in range(0, len(keys), args.batch):
                pub.publish("big", "ads", keys[lo:lo + args.batch], vals[lo:lo + args.batch])
            pub_s = time.monotonic() - t0
        print(f"published {len(keys):,} keys in {pub_s:.1f} s ({len(keys) / pub_s:,.0f} keys/s acknowledged, "
              f"each publish relayed by dc1-r1 to the holders of its shards in dc1)")
        t0 = time.monotonic()
        for r in cluster.replicas:
            wait(lambda r=r: exact(r.address, keys, vals), CONVERGE_TIMEOUT_S, f"every key at {r.node_id}", 1.0)
        print(f"every key read back exactly through Client.lookup from each of the {len(ids)} daemons "
              f"{time.monotonic() - t0:.1f} s after the last acknowledgement")
        print(f"\n| daemon | shards kept | table bytes | x whole table | VmRSS MB |\n|---|---|---|---|---|")
        ratios = []
        for r in cluster.replicas:
            i = info(r.address)
            ratios.append(i["table_bytes"] / full_bytes)
            print(f"| {r.node_id} | {i['held_shards']} / {args.shards} | {i['table_bytes']:,} | {ratios[-1]:.3f} | "
                  f"{vm_rss_mb(r.proc.pid):.0f} |")
        print(f"whole table (a replicated daemon): {full_bytes:,} bytes; largest share {max(ratios):.3f}x, "
              f"median {sorted(ratios)[len(ratios) // 2]:.3f}x")

        # A holder dies; read through another member of its DC all along.
        victim, reader = by_id["dc2-r2"], by_id["dc2-r1"]
        lost = info(victim.address)["held_shards"]
        dc2 = [r for r in cluster.replicas if r.dc == "dc2" and r is not victim]
        counts = {"exact": 0, "wrong": 0, "failed": 0}
        stop = threading.Event()

        def read_loop() -> None:
            c = Client(reader.address, key=key, timeout=30)
            r = np.random.default_rng(3)
            while not stop.is_set():
                pick = r.choice(len(keys), SAMPLE_KEYS, replace=False)
                try:
                    got = c.lookup("big", "ads", keys[pick])
                except (EkkoError, OSError):
                    counts["failed"] += 1
                    continue
                ok = got.found.all() and np.array_equal(got.values.numpy(), vals[pick])
                counts["exact" if ok else "wrong"] += 1
            c.close()

        th = threading.Thread(target=read_loop, daemon=True)
        th.start()
        time.sleep(2.0)
        t_kill = time.monotonic()
        victim.proc.send_signal(signal.SIGKILL)
        victim.proc.wait()

        def refilled() -> bool:
            infos = [info(r.address) for r in dc2]
            return sum(i["held_shards"] for i in infos) == args.shards and all(i["filling_shards"] == 0 for i in infos)

        took = wait(refilled, CONVERGE_TIMEOUT_S, "dc2 to take and fill the dead daemon's shards", 0.5)
        time.sleep(max(0.0, args.read_window - (time.monotonic() - t_kill)))
        stop.set()
        th.join(60)
        print(f"\nSIGKILL of dc2-r2 ({lost} shards): dc2's other members held and filled them {took:.1f} s "
              f"after the kill; reads of {SAMPLE_KEYS} random keys through dc2-r1 over "
              f"{time.monotonic() - t_kill:.0f} s: {counts['exact']} exact, {counts['wrong']} wrong, "
              f"{counts['failed']} failed")
        for r in dc2:
            assert exact(r.address, keys, vals), r.node_id

        # A replacement joins dc2.
        port = free_port()
        data = root / "cluster" / "dc2-r9"
        data.mkdir(parents=True)
        (data.parent / "dc2-r9.toml").write_text("[node]\n" + "".join(
            f"{k} = {json.dumps(v)}\n" for k, v in {"durability": "wal"}.items()))
        cmd = [sys.executable, "-m", "ekko.cli.main", "daemon", "--node-id", "dc2-r9", "--dc", "dc2", "--listen",
               f"127.0.0.1:{port}", "--data-dir", str(data), "--preset", "local", "--device", "cpu",
               "--log-level", "warning", "--seed", cluster.endpoints[0], "--key-file", str(root / "cluster.key"),
               "--config", str(data.parent / "dc2-r9.toml")]
        log = open(data.parent / "dc2-r9.log", "ab")
        t_join = time.monotonic()
        extra = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 start_new_session=True, env=daemon_env())
        log.close()
        new = f"127.0.0.1:{port}"

        def joined() -> bool:
            try:
                i = info(new)
            except (EkkoError, OSError, KeyError):
                return False
            held = sum(info(r.address)["held_shards"] for r in dc2) + i["held_shards"]
            return i["held_shards"] > 0 and i["filling_shards"] == 0 and held == args.shards
        took = wait(joined, CONVERGE_TIMEOUT_S, "the replacement's shards", 0.5)
        mine = info(new)["held_shards"]
        ok = exact(new, keys, vals)
        print(f"replacement dc2-r9 started: it holds {mine} shards, filled, and the others dropped theirs "
              f"{took:.1f} s after its start (process start-up included); every key reads back exactly "
              f"through it: {ok}")
    finally:
        if extra is not None:
            extra.send_signal(signal.SIGTERM)
            try:
                extra.wait(60)
            except subprocess.TimeoutExpired:
                extra.kill()
        problems = cluster.stop()
        for p in problems:
            print(f"# cluster: {p}", file=sys.stderr)
    print(f"# load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
