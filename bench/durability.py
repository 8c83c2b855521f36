"""Publish latency and throughput with the write-ahead log vs without, in one run.

Starts two single-replica ``ekko daemon`` processes on loopback, one with
``durability = "wal"`` (the default: the ack waits for the frame's fsync, group
commit) and one with ``durability = "none"`` (ack once applied in memory), and
registers the same float32 table on both.  Then, alternating between the two
daemons round by round so that both see the same machine load:

* latency: one publisher sends ``--frames`` frames back to back (each waits for
  its ack), for frames of ``--small-rows`` and of ``--large-rows`` rows;
* throughput: ``--clients`` concurrent publishers (one origin each) publish
  ``--large-rows``-row frames for ``--seconds``; the WAL daemon's
  ``ekko_wal_fsyncs_total`` / ``ekko_wal_records_total`` show how many publishes
  shared each fsync.

Publishes are raw HTTP frames (:class:`ekko.core.chain.PublisherChain` + aiohttp),
not the SDK, whose own fsync'd state file would add the same cost to both sides.

Printed: p50/p90/p99 ack latency per mode and frame size, the WAL's median
latency as a ratio of the no-WAL median, frames/s and rows/s under concurrency
with the same ratio, and publishes per fsync.

Run: ``python bench/durability.py`` (about a minute plus daemon start-up).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from procs import DaemonGroup, http

from ekko.core.chain import PublisherChain
from ekko.core.codec import MsgType, encode_frame
from ekko.core.spec import ModelSpec, TableSpec

SPEC = ModelSpec("bench", [TableSpec("emb", rows=500_000, dim=64, shards=16)])
MODES = ("wal", "none")


def _metric(address: str, name: str) -> float:
    _, raw, _ = http("GET", f"http://{address}/metrics")
    m = re.search(rf"^{name} (\S+)$", raw.decode(), re.MULTILINE)
    return float(m.group(1)) if m else 0.0


class Origins:
    """Hands out a fresh publisher chain per (mode, client) so versions never clash."""

    def __init__(self) -> None:
        self.next = 100

    def take(self) -> PublisherChain:
        self.next += 1
        return PublisherChain(origin=self.next)


async def _publish(session: aiohttp.ClientSession, url: str, chain: PublisherChain, rng: np.random.Generator,
                   rows: int) -> float:
    ids = rng.choice(SPEC.tables[0].rows, rows, replace=False).astype(np.int64)
    vals = rng.standard_normal((rows, 64), dtype=np.float32)
    f = chain.frame(SPEC, {"emb": (ids, vals)}, now_ms=time.time() * 1000)
    data = encode_frame(MsgType.PUBLISH, f.body, compress_threshold=1 << 62)
    t0 = time.perf_counter()
    async with session.post(url, data=data) as r:
        await r.read()
        if r.status != 200:
            raise RuntimeError(f"publish answered {r.status}")
    dt = time.perf_counter() - t0
    chain.acked(f)
    return dt


async def _latency(address: str, chain: PublisherChain, rows: int, frames: int, seed: int) -> list[float]:
    rng = np.random.default_rng(seed)
    async with aiohttp.ClientSession() as s:
        return [await _publish(s, f"http://{address}/v1/publish", chain, rng, rows) for _ in range(frames)]


async def _throughput(address: str, chains: list[PublisherChain], rows: int, seconds: float) -> tuple[int, float]:
    loop = asyncio.get_running_loop()
    done = 0

    async def client(i: int, s: aiohttp.ClientSession) -> None:
        nonlocal done
        rng = np.random.default_rng(i)
        while loop.time() < end:
            await _publish(s, f"http://{address}/v1/publish", chains[i], rng, rows)
            done += 1

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        t0 = loop.time()
        end = t0 + seconds
        await asyncio.gather(*(client(i, s) for i in range(len(chains))))
        return done, loop.time() - t0


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.array(xs) * 1000.0, q))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--frames", type=int, default=40, help="frames per latency round")
    ap.add_argument("--small-rows", type=int, default=16)
    ap.add_argument("--large-rows", type=int, default=1024)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=3.0, help="seconds per throughput round")
    a = ap.parse_args()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load {load:.1f}; "
          f"{a.rounds} rounds alternating WAL / no WAL; frames {a.small_rows} and {a.large_rows} rows x 64 float32")
    origins = Origins()
    with tempfile.TemporaryDirectory(prefix="ekko-durability-") as d, DaemonGroup(Path(d)) as g:
        procs = {}
        for mode in MODES:
            cfg = Path(d) / f"{mode}.toml"
            cfg.write_text(f'[node]\ndurability = "{mode}"\nsnapshot_interval = 0\n')
            procs[mode] = g.spawn(f"bench-{mode}", "dc1", extra=["--config", str(cfg)])
        for p in procs.values():
            p.wait_healthy()
            status, raw, _ = http("POST", f"http://{p.address}/v1/models",
                                  encode_frame(MsgType.REGISTER_MODEL, {"spec": SPEC.to_dict()}))
            assert status == 200, raw
        chains = {m: origins.take() for m in MODES}
        lat: dict[tuple[str, int], list[float]] = {(m, r): [] for m in MODES for r in (a.small_rows, a.large_rows)}
        thr: dict[str, list[tuple[int, float]]] = {m: [] for m in MODES}
        wal_addr = procs["wal"].address
        f0, r0 = _metric(wal_addr, "ekko_wal_fsyncs_total"), _metric(wal_addr, "ekko_wal_records_total")
        fs_conc = rec_conc = 0.0
        for rnd in range(a.rounds):
            order = MODES if rnd % 2 == 0 else MODES[::-1]
            for mode in order:
                addr = procs[mode].address
                for rows in (a.small_rows, a.large_rows):
                    lat[(mode, rows)] += asyncio.run(_latency(addr, chains[mode], rows, a.frames, rnd))
                cs = [origins.take() for _ in range(a.clients)]
                if mode == "wal":
                    f1, r1 = _metric(addr, "ekko_wal_fsyncs_total"), _metric(addr, "ekko_wal_records_total")
                thr[mode].append(asyncio.run(_throughput(addr, cs, a.large_rows, a.seconds)))
                if mode == "wal":
                    fs_conc += _metric(addr, "ekko_wal_fsyncs_total") - f1
                    rec_conc += _metric(addr, "ekko_wal_records_total") - r1
        fsyncs = _metric(wal_addr, "ekko_wal_fsyncs_total") - f0
        records = _metric(wal_addr, "ekko_wal_records_total") - r0
        fsync_s = _metric(wal_addr, "ekko_wal_fsync_seconds_total")
        g.terminate_all(list(procs.values()))

    print("\nack latency (ms, sequential publishes):")
    print(f"  {'rows':>6} {'mode':>5} {'p50':>8} {'p90':>8} {'p99':>8}   p50 ratio vs no WAL")
    for rows in (a.small_rows, a.large_rows):
        base = pct(lat[("none", rows)], 50)
        for mode in MODES:
            xs = lat[(mode, rows)]
            print(f"  {rows:>6} {mode:>5} {pct(xs, 50):8.2f} {pct(xs, 90):8.2f} {pct(xs, 99):8.2f}   "
                  f"{pct(xs, 50) / base:.2f}x")
    print(f"\nthroughput ({a.clients} concurrent publishers, {a.large_rows}-row frames, median of rounds):")
    base_fps = float(np.median([n / t for n, t in thr["none"]]))
    for mode in MODES:
        fps = float(np.median([n / t for n, t in thr[mode]]))
        print(f"  {mode:>5}: {fps:8.1f} frames/s  {fps * a.large_rows:10,.0f} rows/s   {fps / base_fps:.2f}x of no WAL")
    print(f"\ngroup commit: {records:.0f} WAL records in {fsyncs:.0f} fsyncs overall; under concurrency "
          f"{rec_conc / max(fs_conc, 1):.1f} records per fsync; mean fsync {1000 * fsync_s / max(fsyncs, 1):.2f} ms")


if __name__ == "__main__":
    main()
