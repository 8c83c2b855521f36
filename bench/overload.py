"""Sustained publish overload against real daemons: back-pressure keeps memory bounded.

Starts ``--replicas`` real ``ekko daemon`` processes on loopback (one DC, joined
through the first) with a small ``max_publish_bytes_in_flight`` and
``max_wal_bytes``, registers a float32 table, and then, for ``--seconds``,
``--clients`` concurrent publishers (one origin each, spread over the replicas)
each keep one frame of ``--rows-per-frame`` rows in flight.  They are abusive on
purpose: on a 429/503 they wait only ``--retry-ms`` (not the ``Retry-After``
they are given) and send a *new* frame, so the offered load stays far above what
the replicas absorb for the whole run.

While it runs, a thread samples every daemon's ``VmRSS`` from
``/proc/PID/status`` every 50 ms; ``VmHWM`` (the kernel's own peak) is read at
the end.  After the load stops, it waits until every replica's table digest
equals the digest of exactly the acknowledged publishes (applied to a local
:class:`ekko.core.store.ModelStore`): a refused publish changed nothing, an accepted
one is everywhere.

Printed: statuses (200/429/503), acknowledged rows/s, per daemon idle RSS, peak
sampled RSS and VmHWM, the back-pressure refusals by bound from ``/metrics``,
and the time to converge after the load stopped.

Run: ``python bench/overload.py`` (defaults: 3 replicas, 30 s, 16 clients);
``tests/server/test_overload.py`` runs a short version of it.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from procs import DaemonGroup, get_json, http, table_digests, wait_for

from ekko.core.chain import PublisherChain
from ekko.core.codec import MsgType, encode_frame
from ekko.core.delta import Delta
from ekko.core.spec import ModelSpec, TableSpec
from ekko.core.store import ModelStore

#: how far a daemon's peak RSS may rise above its idle RSS (model registered, no load) in the
#: test's run (2 daemons, 5 s, 256 KiB frames, undo_bytes 16 MiB).  What grows, all bounded:
#: the undo history fills as publishes overwrite rows (up to NodeConfig.undo_bytes: measured
#: +50 MiB more with the default 64 MiB than with 0 over 10 s), the admitted publishes and
#: their decoded copies (max_publish_bytes_in_flight plus one frame), push frames, and during
#: the catch-up after the load, pull answers (pull_response_bytes each) on worker threads and
#: allocator slack (measured +80 MiB with undo_bytes 0).  Measured in the test: +65-108 MiB
#: (more on an idle machine, where more publishes get through in the same 5 s).
RSS_GROWTH_BOUND = 192 << 20
#: compress_threshold that turns frame compression off.
NO_COMPRESSION = 1 << 62
#: seconds between RSS samples.
SAMPLE_S = 0.05
#: the report shows the peak RSS of each window of this many seconds of load (flat = bounded).
WINDOW_S = 5.0
#: seconds the replicas get to agree after the load stops.
CONVERGE_TIMEOUT_S = 90.0


def proc_memory(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in bytes, from /proc/PID/status."""
    rss = hwm = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) << 10
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) << 10
    return rss, hwm


class RssSampler(threading.Thread):
    """Samples the VmRSS of some processes until :meth:`stop`; keeps each one's maximum."""

    def __init__(self, pids: dict[str, int]) -> None:
        super().__init__(daemon=True)
        self.pids = pids
        self.peak = {name: 0 for name in pids}
        self.series: dict[str, list[tuple[float, int]]] = {name: [] for name in pids}
        self._stop_evt = threading.Event()

    def run(self) -> None:
        while not self._stop_evt.is_set():
            for name, pid in self.pids.items():
                try:
                    rss = proc_memory(pid)[0]
                except OSError:
                    continue
                self.peak[name] = max(self.peak[name], rss)
                self.series[name].append((time.monotonic(), rss))
            self._stop_evt.wait(SAMPLE_S)

    def stop(self) -> None:
        self._stop_evt.set()
        self.join()


@dataclass
class Result:
    seconds: float
    statuses: Counter = field(default_factory=Counter)
    errors: int = 0
    acked_rows: int = 0
    rss: dict[str, tuple[int, int]] = field(default_factory=dict)   # name -> (idle, peak incl. VmHWM)
    sampled_peak: dict[str, int] = field(default_factory=dict)
    hwm: dict[str, int] = field(default_factory=dict)
    bounds: dict[str, dict[str, float]] = field(default_factory=dict)
    converged: bool = False
    converge_s: float = float("nan")
    behind: dict[str, tuple[int, int]] = field(default_factory=dict)  # not converged: (older, newer) rows
    windows: dict[str, list[int]] = field(default_factory=dict)  # peak RSS per WINDOW_S of the load

    @property
    def acked(self) -> int:
        return self.statuses[200]

    @property
    def refused(self) -> int:
        return self.statuses[429] + self.statuses[503]

    def report(self) -> str:
        lines = [(f"overload: {self.seconds:.1f}s, statuses {dict(sorted(self.statuses.items()))}, "
                  f"client errors {self.errors}, acknowledged {self.acked_rows / self.seconds:,.0f} rows/s")]
        for name, (idle, peak) in self.rss.items():
            lines.append(f"  {name}: idle RSS {idle / 2**20:.0f} MiB, peak sampled RSS "
                         f"{self.sampled_peak[name] / 2**20:.0f} MiB, VmHWM {self.hwm[name] / 2**20:.0f} MiB "
                         f"-> peak {peak / 2**20:.0f} MiB (+{(peak - idle) / 2**20:.0f} MiB; bound "
                         f"+{RSS_GROWTH_BOUND >> 20} MiB); refusals by bound {self.bounds.get(name, {})}")
        for name, peaks in self.windows.items():
            lines.append(f"  {name}: peak RSS per {WINDOW_S:g}s of load (MiB): "
                         + " ".join(f"{p / 2**20:.0f}" for p in peaks))
        lines.append(f"  converged on the acknowledged publishes: {self.converged} "
                     f"({self.converge_s:.2f}s after the load stopped)")
        if self.behind:
            lines.append(f"  rows (older than acknowledged, newer than acknowledged) per replica: {self.behind}")
        return "\n".join(lines)


def _rows_behind(address: str, truth: ModelStore) -> tuple[int, int]:
    """Rows whose version is older / newer than the acknowledged truth."""
    from procs import read_rows
    want = truth.table("emb").versions
    older = newer = 0
    for lo in range(0, len(want), 16384):
        ids = np.arange(lo, min(lo + 16384, len(want)))
        _, got = read_rows(address, "load", "emb", ids)
        older += int((got < want[ids]).sum())
        newer += int((got > want[ids]).sum())
    return older, newer


def _bounds(address: str) -> dict[str, float]:
    _, raw, _ = http("GET", f"http://{address}/metrics")
    return {m.group(1): float(m.group(2)) for m in
            re.finditer(r'^ekko_backpressure_rejects_total\{bound="([^"]+)"\} (\S+)$', raw.decode(), re.MULTILINE)}


async def _drive(addresses: list[str], spec: ModelSpec, seconds: float, clients: int, rows: int, retry_s: float,
                 truth: ModelStore, res: Result) -> None:
    loop = asyncio.get_running_loop()
    t = spec.tables[0]
    end = loop.time() + seconds
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        async def client(i: int) -> None:
            rng = np.random.default_rng(1000 + i)
            chain = PublisherChain(origin=1000 + i)
            url = f"http://{addresses[i % len(addresses)]}/v1/publish"
            while loop.time() < end:
                ids = rng.choice(t.rows, rows, replace=False).astype(np.int64)
                vals = rng.standard_normal((rows, t.dim), dtype=np.float32)
                f = chain.frame(spec, {t.name: (ids, vals)}, now_ms=time.time() * 1000)
                # Uncompressed: random values do not compress, and zstd would only slow the driver.
                data = encode_frame(MsgType.PUBLISH, f.body, compress_threshold=NO_COMPRESSION)
                try:
                    async with session.post(url, data=data) as r:
                        await r.read()
                        status = r.status
                except (aiohttp.ClientError, TimeoutError):
                    res.errors += 1  # ambiguous: the test then cannot know the truth, and fails
                    continue
                res.statuses[status] += 1
                if status == 200:
                    chain.acked(f)
                    truth.table(t.name).apply(Delta(spec.name, t.name, ids, chain.versions_of(f)[t.name], vals))
                    res.acked_rows += rows
                elif status in (429, 503):
                    await asyncio.sleep(retry_s * rng.uniform(0.5, 1.5))
                else:
                    res.errors += 1

        await asyncio.gather(*(client(i) for i in range(clients)))


def run(root: Path, replicas: int = 2, seconds: float = 6.0, clients: int = 12, rows_per_frame: int = 4096,
        dim: int = 64, table_rows: int = 200_000, max_publish_bytes_in_flight: int = 4 << 20,
        max_wal_bytes: int = 64 << 20, retry_ms: float = 20.0, node_extra: str = "",
        converge_timeout: float = CONVERGE_TIMEOUT_S) -> Result:
    """Run the overload against ``replicas`` fresh daemons under ``root``; see the module doc."""
    spec = ModelSpec("load", [TableSpec("emb", rows=table_rows, dim=dim, shards=16)])
    cfg = root / "overload.toml"
    cfg.write_text(f"[node]\nmax_publish_bytes_in_flight = {max_publish_bytes_in_flight}\n"
                   f"max_wal_bytes = {max_wal_bytes}\nsnapshot_interval = 0\n{node_extra}")
    flags = ["--config", str(cfg)]
    res = Result(seconds)
    with DaemonGroup(root) as g:
        first = g.start("r0", "dc1", extra=flags)
        procs = [first] + [g.spawn(f"r{i}", "dc1", seeds=[first.address], extra=flags) for i in range(1, replicas)]
        for p in procs:
            p.wait_healthy()
        wait_for(lambda: all(sum(m["state"] == "alive" for m in get_json(p.address, "/v1/status?cluster=1")
                                 ["members"]) == replicas for p in procs), 60, 0.2, "all replicas to join")
        status, raw, _ = http("POST", f"http://{first.address}/v1/models",
                              encode_frame(MsgType.REGISTER_MODEL, {"spec": spec.to_dict()}))
        assert status == 200, raw
        wait_for(lambda: all(table_digests(p.address, "load") is not None for p in procs), 60, 0.1,
                 "the model to reach every replica")
        time.sleep(0.5)
        pids = {p.node_id: p.proc.pid for p in procs}
        idle = {name: proc_memory(pid)[0] for name, pid in pids.items()}
        sampler = RssSampler(pids)
        sampler.start()
        truth = ModelStore(spec, device="cpu")
        t0 = time.monotonic()
        try:
            asyncio.run(_drive([p.address for p in procs], spec, seconds, clients, rows_per_frame,
                               retry_ms / 1000.0, truth, res))
            res.seconds = time.monotonic() - t0
            t1 = time.monotonic()
            for name, series in sampler.series.items():
                n = max(1, int(res.seconds // WINDOW_S))
                res.windows[name] = [max((r for t, r in series if t0 + i * WINDOW_S <= t < t0 + (i + 1) * WINDOW_S),
                                         default=0) for i in range(n)]
            want = {"emb": truth.table("emb").digest()}
            try:
                wait_for(lambda: all(table_digests(p.address, "load") == want for p in procs), converge_timeout,
                         0.25, "replicas to converge on the acknowledged publishes")
                res.converged = True
                res.converge_s = time.monotonic() - t1
            except AssertionError:
                res.converged = False
                res.behind = {p.node_id: _rows_behind(p.address, truth) for p in procs}
        finally:
            sampler.stop()
        for p in procs:
            res.hwm[p.node_id] = proc_memory(p.proc.pid)[1]
            res.sampled_peak[p.node_id] = sampler.peak[p.node_id]
            res.rss[p.node_id] = (idle[p.node_id], max(sampler.peak[p.node_id], res.hwm[p.node_id]))
            res.bounds[p.node_id] = _bounds(p.address)
        codes = g.terminate_all(procs)
        assert set(codes.values()) == {0}, codes
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--replicas", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--rows-per-frame", type=int, default=4096)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--max-publish-mib", type=float, default=4.0, help="max_publish_bytes_in_flight (MiB)")
    ap.add_argument("--max-wal-mib", type=float, default=64.0, help="max_wal_bytes (MiB)")
    ap.add_argument("--retry-ms", type=float, default=20.0)
    ap.add_argument("--converge-timeout", type=float, default=CONVERGE_TIMEOUT_S)
    ap.add_argument("--undo-mib", type=float, default=None, help="undo_bytes (MiB; default: the config's)")
    ap.add_argument("--rss-growth-mib", type=float, default=RSS_GROWTH_BOUND / 2**20,
                    help="exit 1 when a daemon's peak RSS rises more than this above its idle RSS")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="ekko-overload-") as d:
        res = run(Path(d), a.replicas, a.seconds, a.clients, a.rows_per_frame, a.dim,
                  max_publish_bytes_in_flight=int(a.max_publish_mib * 2**20),
                  max_wal_bytes=int(a.max_wal_mib * 2**20), retry_ms=a.retry_ms,
                  converge_timeout=a.converge_timeout,
                  node_extra="" if a.undo_mib is None else f"undo_bytes = {int(a.undo_mib * 2**20)}\n")
    print(res.report())
    ok = res.refused > 0 and res.errors == 0 and res.converged and all(
        peak - idle < a.rss_growth_mib * 2**20 for idle, peak in res.rss.values())
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
