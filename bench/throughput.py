"""Throughput and latency to every replica: ekko against a Redis stream and a direct push (issue #15).

Three systems carry the same updates -- random distinct row ids of one ``--rows`` x
``--dim`` float32 table, values drawn once per batch size and reused -- to ``N = --dcs x
--per-dc`` (default 9) processes that each hold the whole table, one system after the
other in the same run (the order rotates between repeats):

* **ekko**: N ``ekko daemon`` processes on loopback (``ekko.cli.demo.LocalCluster``:
  ``--preset local``, device cpu, a cluster key in a key file, ``durability = "wal"``
  written into each daemon's config: the write-ahead log on, fsynced before the
  acknowledgement); one model with one table (``TableSpec`` default shards).  Publishers
  are ``ekko.AsyncPublisher`` (default ``durable=True``: the SDK fsyncs its state), all
  writing to the first replica (dc1-r1) unless ``--ingest spread`` (publisher i to the
  first replica of DC i mod dcs).
* **redis**: ``redis-server`` (Debian's, started here on a free loopback port with its own
  temp dir, ``appendonly yes``, ``appendfsync always``, no RDB snapshots; stopped by PID)
  and one stream.  A publish is an ``XADD`` (acknowledged once Redis fsynced its AOF); N
  subscriber processes ``XREAD BLOCK`` the stream and apply every entry into a torch
  tensor with ``index_copy_``.  Missing ``redis-server`` or the ``redis`` client: this
  system is skipped and the bench says how to install them.
* **direct**: N aiohttp receiver processes; a publish POSTs the same payload to all N at
  once and is acknowledged when all N answered; a receiver applies (``index_copy_``)
  before it answers.

The payload of redis and direct is msgpack ``{tag, ids: int64 bytes, vals: float32
bytes}``; ekko's is its own frame (ids, values, versions, chains; HMAC-signed).  Every
applier process (daemon, subscriber, receiver) uses one torch thread (the daemon's
default).  Publishers run in their own processes (spawned before timing); publisher i of
P draws its ids from the rows ``= i mod P`` so that no two publishers write the same row.

What is measured, per system:

* **latency** (``--trials`` after ``--warmup``, one at a time, one publisher in this
  process): a ``--latency-rows`` (1k) update, from just before the publish call until it
  is applied at all N; and until the acknowledgement.  "Applied at all N":
  - redis, direct: each applier stamps ``time.monotonic()`` (a system-wide clock) and the
    entry's tag into shared memory right after its ``index_copy_``; the latency is the
    latest stamp minus the start: exact, no polling.
  - ekko: the latency trials run on a cluster of their own whose daemons keep an apply
    trace (``ekko daemon --apply-trace``: each applied row with its wall time,
    ``time.time()``, flushed when the daemon stops); the latency is the latest apply
    of the update's rows over the N daemons minus the wall time before the publish:
    exact, and nothing polls the daemons while they are timed (the previous watchers
    polled every daemon's rows endpoint every 2 ms, which loaded the daemons they
    timed).  Since a trial's end is known only afterwards, ekko's trials pause
    ``EKKO_TRIAL_GAP_S`` after each acknowledgement (the others wait for all N, then
    ``TRIAL_GAP_S``); trials that still overlapped the next one are counted.  That
    cluster is then stopped and a fresh one (no traces) runs the throughput configs.
* **throughput** (each of ``--publishers`` x ``--batches``, for ``--duration`` s):
  every publisher sends batches back to back, one in flight (closed loop).  *rows/s
  acked* = rows acknowledged / (last acknowledgement - start).  *rows/s at all N* = the
  same rows / (time at which the last of the N had all of them - start): the drain after
  the window counts.  "Had all of them":
  - redis, direct: every applier's shared row counter reached the rows sent; the time is
    the latest apply stamp (exact).  A direct receiver applies before it answers, so its
    last apply can precede the last acknowledgement by the answer's trip: a "drain" of a
    few negative milliseconds, rows/s at all N a hair above rows/s acked.
  - ekko: every daemon's knowledge (``GET /v1/models/m/knowledge``: per shard, per
    origin, the counter up to which every update is reflected there) reaches, for each
    publisher and shard, the greatest counter of a row it had acknowledged there
    (computed from ``PublishAck.versions`` and ``TableSpec.shards_of``); polled every
    ``--drain-poll-ms`` after the window, so an upper bound by about that much.  Then
    the rows of each publisher's last acknowledged batch are read back from every
    daemon and their versions checked (``verified`` in the JSON).
  The acknowledgement latency p50/p90 of these batches is reported too.
* **peak RSS** of every daemon / subscriber / receiver (``VmHWM`` of
  ``/proc/<pid>/status`` before it is stopped), and of redis-server itself.
* the load average before and after each system and the whole run.

Printed: how it was run, a table of medians over ``--repeats`` (each repeat starts every
system afresh), the ratios ekko/redis and ekko/direct (medians over repeats of the
per-repeat ratios), and the issue's bars (met or not).  ``--out`` writes all of it as JSON.

Run: ``python bench/throughput.py`` (9 processes per system, 1M x 64 table; about
15-20 minutes on 2 cores); ``python bench/throughput.py --quick`` (3 of each, small table,
a few seconds per figure: a smoke test under a minute); shrink with ``--rows``,
``--duration``, ``--trials``, ``--repeats``, ``--batches``, ``--publishers``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Run as a script, bench/ is sys.path[0]: this checkout's packages go first instead.
if sys.path and Path(sys.path[0] or os.curdir).resolve() == REPO / "bench":
    sys.path[0] = str(REPO)
elif str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import multiprocessing as mp  # noqa: E402
import platform  # noqa: E402
import queue  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import urllib.error  # noqa: E402
import urllib.request  # noqa: E402
from typing import Any  # noqa: E402

import msgpack  # noqa: E402
import numpy as np  # noqa: E402

MODEL, TABLE, STREAM = "tput", "emb", "ekko-bench"
#: seconds one latency trial may take.
TRIAL_TIMEOUT_S = 30.0
#: pause between latency trials.
TRIAL_GAP_S = 0.1
#: pause after an ekko latency trial's acknowledgement (its "at all N" is known only
#: from the apply traces, after the trials): long enough that trials do not overlap.
EKKO_TRIAL_GAP_S = 0.3
#: seconds processes get to start (torch imports queue for 2 cores).
START_TIMEOUT_S = 180.0
#: rows of each publisher's last batch read back from every daemon after a drain.
CHECK_ROWS = 64
#: ``--quick``: the smallest shape (a smoke run under a minute).
QUICK = {"dcs": 1, "per_dc": 3, "rows": 50_000, "batches": "1000", "publishers": "1", "duration": 2.0, "trials": 5,
         "warmup": 1, "repeats": 1, "drain_timeout": 30.0}
#: the bars of issue #15 ("done when").
BAR_ALL_RPS_VS_REDIS = 0.5
BAR_P50_VS_REDIS = 3.0
BAR_ACK_P50_MS = 15.0
BAR_RSS_VS_SUBSCRIBER = 1.3

SPAWN = mp.get_context("spawn")


# ----------------------------------------------------------------------------- helpers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vm_hwm_mb(pid: int) -> float | None:
    """Peak resident set (VmHWM) of a process in MB, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(np.ceil(q * len(xs))) - 1))]


def med(xs: list[Any]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def wait_until(pred: Any, timeout: float, what: str, interval: float = 0.1) -> None:
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def http_get(url: str, timeout: float = 30.0, key: str | None = None) -> bytes:
    """GET ``url``; ``key`` (the cluster key) signs it: a keyed daemon refuses unsigned reads."""
    from ekko.core import read_auth
    with urllib.request.urlopen(urllib.request.Request(url, headers=read_auth.read_headers(key, url)),
                                timeout=timeout) as r:
        return r.read()


def encode_payload(tag: int, ids: np.ndarray, vals: np.ndarray) -> bytes:
    return msgpack.packb({"tag": tag, "ids": ids.astype("<i8").tobytes(), "vals": vals.astype("<f4").tobytes()})


def pick_ids(rng: np.random.Generator, rows: int, n: int, part: int, parts: int) -> np.ndarray:
    """``n`` distinct random row ids among those ``= part mod parts``."""
    return rng.choice(rows // parts, n, replace=False).astype(np.int64) * parts + part


class Board:
    """Shared memory the appliers write after every apply: rows applied, last tag, its time."""

    def __init__(self, n: int) -> None:
        self.rows = SPAWN.Array("q", n, lock=False)
        self.tag = SPAWN.Array("q", n, lock=False)
        self.t = SPAWN.Array("d", n, lock=False)
        for i in range(n):
            self.tag[i] = -1

    def snapshot(self) -> list[int]:
        return list(self.rows)


# ----------------------------------------------------------------------------- appliers
class _Table:
    """The applier's copy of the table: a torch tensor written with ``index_copy_``."""

    def __init__(self, rows: int, dim: int, slot: int, board: Board) -> None:
        import warnings

        import torch
        # The payload's arrays are read-only views of the received bytes; index_copy_ only
        # reads its source, so no copy is made and torch's warning about it is silenced.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        torch.set_num_threads(1)
        self.torch = torch
        self.t = torch.zeros((rows, dim), dtype=torch.float32)
        self.dim, self.slot, self.board = dim, slot, board

    def apply(self, tag: int, ids_b: bytes, vals_b: bytes) -> None:
        ids = np.frombuffer(ids_b, "<i8")
        vals = np.frombuffer(vals_b, "<f4").reshape(len(ids), self.dim)
        self.t.index_copy_(0, self.torch.from_numpy(ids), self.torch.from_numpy(vals))
        b, s = self.board, self.slot
        b.rows[s] += len(ids)
        b.tag[s] = tag
        b.t[s] = time.monotonic()


def redis_subscriber(slot: int, port: int, rows: int, dim: int, board: Board, ready: Any) -> None:
    """XREAD BLOCK the stream from its start; apply every entry."""
    import redis
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    table = _Table(rows, dim, slot, board)
    r = redis.Redis(host="127.0.0.1", port=port)
    last = b"0-0"
    ready.set()
    while True:
        got = r.xread({STREAM: last}, count=16, block=1000)
        for _, entries in got or ():
            for eid, fields in entries:
                m = msgpack.unpackb(fields[b"p"], raw=False)
                table.apply(m["tag"], m["ids"], m["vals"])
                last = eid


def direct_receiver(slot: int, port: int, rows: int, dim: int, board: Board, ready: Any) -> None:
    """An aiohttp server: POST /apply applies the payload, then answers."""
    from aiohttp import web
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    table = _Table(rows, dim, slot, board)

    async def apply(request: web.Request) -> web.Response:
        m = msgpack.unpackb(await request.read(), raw=False)
        table.apply(m["tag"], m["ids"], m["vals"])
        return web.Response(text="ok")

    async def main() -> None:
        app = web.Application(client_max_size=1 << 30)
        app.router.add_post("/apply", apply)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        ready.set()
        await asyncio.Event().wait()

    asyncio.run(main())


# ----------------------------------------------------------------------------- publishers
def publisher_worker(kind: str, idx: int, cmds: Any, results: Any) -> None:
    """One publisher process: import (while the system starts), take its configuration, set
    up, then run the throughput configs it is sent."""
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    try:
        if kind == "ekko":
            import ekko.sdk.publisher  # noqa: F401 -- torch, aiohttp: seconds of CPU
        elif kind == "redis":
            import redis.asyncio  # noqa: F401
        import aiohttp  # noqa: F401
        conf = cmds.get()
        if conf is None:
            return
        asyncio.run(_publisher_main(kind, idx, conf, cmds, results))
    except BaseException as e:  # noqa: BLE001 -- reported to the parent, which stops the run
        results.put({"idx": idx, "error": f"{type(e).__name__}: {e}"})
        raise


async def _publisher_main(kind: str, idx: int, conf: dict[str, Any], cmds: Any, results: Any) -> None:
    import aiohttp
    loop = asyncio.get_running_loop()
    rows, dim = conf["rows"], conf["dim"]
    closers = []
    extra: dict[str, Any] = {}
    if kind == "ekko":
        from ekko import AsyncPublisher, ModelSpec, TableSpec
        spec = ModelSpec(MODEL, [TableSpec(TABLE, rows=rows, dim=dim)])
        tspec = spec.tables[0]
        pub = AsyncPublisher(conf["endpoints"][idx], origin=f"tput-{idx}", key=conf["key"],
                             state_dir=Path(conf["state_dir"]) / f"pub{idx}", timeout=conf["publish_timeout"],
                             durable=conf["durable"])
        closers.append(pub.close)
        await pub.register(spec)
        origin_bits = version_shift()

        async def send(ids: np.ndarray, vals: np.ndarray) -> None:
            ack = await pub.publish(MODEL, TABLE, ids, vals)
            v = ack.versions[TABLE]
            np.maximum.at(extra["targets"], tspec.shards_of(ids), v >> origin_bits)
            extra["last"] = (ids, v)
    elif kind == "redis":
        import redis.asyncio as aredis
        r = aredis.Redis(host="127.0.0.1", port=conf["port"])
        closers.append(r.aclose)

        async def send(ids: np.ndarray, vals: np.ndarray) -> None:
            await r.xadd(STREAM, {"p": encode_payload(-1, ids, vals)})
    else:
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                        timeout=aiohttp.ClientTimeout(total=conf["publish_timeout"]))
        closers.append(session.close)
        urls = conf["urls"]

        async def post(url: str, data: bytes) -> None:
            async with session.post(url, data=data) as resp:
                await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"{url}: HTTP {resp.status}")

        async def send(ids: np.ndarray, vals: np.ndarray) -> None:
            data = encode_payload(-1, ids, vals)
            await asyncio.gather(*(post(u, data) for u in urls))
    try:
        results.put({"idx": idx, "ready": True})
        while True:
            cmd = await loop.run_in_executor(None, cmds.get)
            if cmd is None:
                return
            batch, parts = cmd["batch"], cmd["parts"]
            rng = np.random.default_rng(cmd["seed"])
            pool = [rng.standard_normal((batch, dim), dtype=np.float32) for _ in range(4)]
            if kind == "ekko":
                extra["targets"] = np.zeros(tspec.num_shards, np.int64)
                extra["last"] = None
            acks: list[tuple[float, float, int]] = []
            errors: list[str] = []
            await asyncio.sleep(max(0.0, cmd["t_start"] - time.monotonic()))
            while time.monotonic() < cmd["t_end"]:
                ids = pick_ids(rng, rows, batch, idx, parts)
                t0 = time.monotonic()
                try:
                    await send(ids, pool[len(acks) % len(pool)])
                except Exception as e:  # noqa: BLE001 -- counted and reported, the run goes on
                    errors.append(f"{type(e).__name__}: {e}"[:300])
                    if len(errors) > 20:
                        break
                    continue
                acks.append((t0, time.monotonic(), batch))
            out: dict[str, Any] = {"idx": idx, "acks": acks, "errors": errors}
            if kind == "ekko":
                t = extra["targets"]
                out["targets"] = {int(s): int(c) for s, c in enumerate(t.tolist()) if c > 0}
                out["origin"] = pub.origin
                if extra["last"] is not None:
                    ids, v = extra["last"]
                    k = min(CHECK_ROWS, len(ids))
                    out["check"] = (ids[:k].tolist(), v[:k].tolist())
            results.put(out)
    finally:
        for c in closers:
            await c()


def version_shift() -> int:  # noqa: N802 -- named for what it reads
    """Bits of a packed version below its counter, from the public :class:`ekko.Version`."""
    from ekko import Version
    return Version(1, 0).packed.bit_length() - 1


class Publishers:
    """``n`` publisher processes of one kind, started at once (they import while the system
    starts) and configured by :meth:`configure`; stopped by PID on close."""

    def __init__(self, kind: str, n: int) -> None:
        self.kind, self.results = kind, SPAWN.Queue()
        self.cmds = [SPAWN.Queue() for _ in range(n)]
        self.procs = [SPAWN.Process(target=publisher_worker, args=(kind, i, self.cmds[i], self.results),
                                    daemon=True) for i in range(n)]
        for p in self.procs:
            p.start()

    def configure(self, conf: dict[str, Any]) -> None:
        """Hand every publisher the system's addresses; wait until each is ready."""
        n = len(self.procs)
        for q in self.cmds:
            q.put(conf)
        for _ in range(n):
            r = self._get(START_TIMEOUT_S)
            if not r.get("ready"):
                raise RuntimeError(f"{self.kind} publisher {r.get('idx')} failed: {r.get('error')}")

    def _get(self, timeout: float) -> dict[str, Any]:
        try:
            r = self.results.get(timeout=timeout)
        except queue.Empty:
            dead = [p.pid for p in self.procs if not p.is_alive()]
            raise RuntimeError(f"{self.kind} publishers silent for {timeout:.0f}s (exited: {dead})") from None
        if "error" in r:
            raise RuntimeError(f"{self.kind} publisher {r['idx']} failed: {r['error']}")
        return r

    def run(self, n: int, batch: int, duration: float, seed: int) -> tuple[float, list[dict[str, Any]]]:
        t_start = time.monotonic() + 0.3
        for i in range(n):
            self.cmds[i].put({"batch": batch, "parts": n, "seed": seed * 1000 + i, "t_start": t_start,
                              "t_end": t_start + duration})
        got = [self._get(duration + 300) for _ in range(n)]
        return t_start, sorted(got, key=lambda r: r["idx"])

    def close(self) -> None:
        for q in self.cmds:
            try:
                q.put(None)
            except (OSError, ValueError):
                pass
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
                p.join(5)


# ----------------------------------------------------------------------------- systems
class System:
    """A system under test: started fresh, measured, stopped (by PID, also on errors)."""

    name = "?"
    role = "process"

    def __init__(self, args: argparse.Namespace, root: Path) -> None:
        self.args, self.root, self.n = args, root, args.dcs * args.per_dc
        self.pubs: Publishers | None = None
        self.versions: dict[str, str] = {}

    def applier_pids(self) -> list[int]:
        raise NotImplementedError

    def publisher_conf(self) -> dict[str, Any]:
        return {"rows": self.args.rows, "dim": self.args.dim, "publish_timeout": self.args.publish_timeout}

    def start_publishers(self) -> None:
        if self.pubs is None:
            self.pubs = Publishers(self.name, max(self.args.publisher_counts))
        self.pubs.configure(self.publisher_conf())

    def stop(self) -> list[str]:
        if self.pubs is not None:
            self.pubs.close()
        return []


class _BoardSystem(System):
    """Appliers (subscribers or receivers) that report through a :class:`Board`."""

    target: Any = None

    def start_appliers(self) -> None:
        a = self.args
        self.board = Board(self.n)
        self.ports = [free_port() for _ in range(self.n)]
        readies = [SPAWN.Event() for _ in range(self.n)]
        self.procs = []
        for i in range(self.n):
            p = SPAWN.Process(target=type(self).target, args=(i, self.applier_port(i), a.rows, a.dim, self.board,
                                                              readies[i]), daemon=True)
            p.start()
            self.procs.append(p)
        end = time.monotonic() + START_TIMEOUT_S
        for i, ev in enumerate(readies):
            while not ev.wait(0.5):
                if not self.procs[i].is_alive() or time.monotonic() > end:
                    raise RuntimeError(f"{self.name} applier {i} did not start (exit {self.procs[i].exitcode})")

    def applier_port(self, i: int) -> int:
        return self.ports[i]

    def applier_pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def wait_all(self, base: list[int], rows: int, timeout: float, _results: Any = None) -> tuple[float | None, Any]:
        """Time the last applier had ``rows`` more rows than ``base`` (its last apply stamp)."""
        end = time.monotonic() + timeout
        while True:
            done = [self.board.rows[i] - base[i] >= rows for i in range(self.n)]
            if all(done):
                return max(self.board.t[i] for i in range(self.n)), True
            if time.monotonic() > end:
                return None, f"{sum(done)}/{self.n} appliers had every row"
            time.sleep(0.001)

    async def wait_tag(self, tag: int, timeout: float) -> float | None:
        end = time.monotonic() + timeout
        while not all(self.board.tag[i] == tag for i in range(self.n)):
            if time.monotonic() > end:
                return None
            await asyncio.sleep(0.001)   # the figure is the apply stamp, not this poll
        return max(self.board.t[i] for i in range(self.n))

    def stop(self) -> list[str]:
        problems = super().stop()
        for p in getattr(self, "procs", []):
            if p.is_alive():
                os.kill(p.pid, signal.SIGTERM)
        for p in getattr(self, "procs", []):
            p.join(10)
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
                p.join(5)
                problems.append(f"{self.name} applier pid {p.pid} killed")
        return problems


class RedisSystem(_BoardSystem):
    name, role = "redis", "subscriber"
    target = staticmethod(redis_subscriber)

    @staticmethod
    def missing() -> str | None:
        """Why this system cannot run here, with how to fix it; None when it can."""
        if shutil.which("redis-server") is None:
            return ("redis-server not found: install it with `apt-get install -y redis-server` "
                    "(Debian/Ubuntu; Redis 7); the Redis baseline is skipped")
        try:
            import redis  # noqa: F401
        except ImportError:
            return "the redis Python client is missing: `pip install 'redis>=5'` (dev extra); Redis skipped"
        return None

    def start(self) -> None:
        import redis
        self.port = free_port()
        d = self.root / "redis"
        d.mkdir(parents=True)
        out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True, check=False).stdout.strip()
        self.versions = {"redis-server": out, "redis-py": redis.__version__}
        with open(d / "redis.log", "ab") as log:
            self.server = subprocess.Popen(
                ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(d),
                 "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--protected-mode", "no",
                 "--daemonize", "no"], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.client = redis.Redis(host="127.0.0.1", port=self.port)

        def up() -> bool:
            if self.server.poll() is not None:
                raise RuntimeError(f"redis-server exited {self.server.returncode}: "
                                   f"{(d / 'redis.log').read_text(errors='replace')[-1000:]}")
            try:
                return bool(self.client.ping())
            except redis.exceptions.ConnectionError:
                return False
        wait_until(up, 30, "redis-server")
        cfg = self.client.config_get("append*")
        self.versions["config"] = f"appendonly {cfg.get('appendonly')}, appendfsync {cfg.get('appendfsync')}"
        self.start_appliers()
        self.start_publishers()

    def applier_port(self, i: int) -> int:
        return self.port

    def publisher_conf(self) -> dict[str, Any]:
        return {**super().publisher_conf(), "port": self.port}

    def extra_pids(self) -> dict[str, int]:
        return {"redis-server": self.server.pid}

    async def publish_one(self, tag: int, ids: np.ndarray, vals: np.ndarray) -> None:
        await asyncio.to_thread(self.client.xadd, STREAM, {"p": encode_payload(tag, ids, vals)})

    def after_config(self, name: str = "") -> None:
        self.client.xtrim(STREAM, maxlen=0, approximate=False)      # every subscriber has read all of it

    def stop(self) -> list[str]:
        problems = super().stop()
        srv = getattr(self, "server", None)
        if srv is not None and srv.poll() is None:
            srv.send_signal(signal.SIGTERM)
            try:
                srv.wait(30)
            except subprocess.TimeoutExpired:
                srv.kill()
                srv.wait()
                problems.append("redis-server killed")
        return problems


class DirectSystem(_BoardSystem):
    name, role = "direct", "receiver"
    target = staticmethod(direct_receiver)

    def start(self) -> None:
        import aiohttp
        self.versions = {"aiohttp": aiohttp.__version__}
        self.start_appliers()
        self.urls = [f"http://127.0.0.1:{p}/apply" for p in self.ports]
        self.start_publishers()

    def publisher_conf(self) -> dict[str, Any]:
        return {**super().publisher_conf(), "urls": self.urls}

    def extra_pids(self) -> dict[str, int]:
        return {}

    async def publish_one(self, tag: int, ids: np.ndarray, vals: np.ndarray) -> None:
        import aiohttp
        if getattr(self, "session", None) is None:
            self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        data = encode_payload(tag, ids, vals)

        async def post(u: str) -> None:
            async with self.session.post(u, data=data) as r:
                await r.read()
                if r.status != 200:
                    raise RuntimeError(f"{u}: HTTP {r.status}")
        await asyncio.gather(*(post(u) for u in self.urls))

    async def close_session(self) -> None:
        if getattr(self, "session", None) is not None:
            await self.session.close()
            self.session = None

    def after_config(self, name: str = "") -> None:
        pass


class EkkoSystem(System):
    name, role = "ekko", "daemon"
    #: latency trials whose update reached all N only after the next trial began.
    overlaps = 0

    def start(self) -> None:
        """The cluster of the latency trials: every daemon keeps an apply trace."""
        # The daemons run this checkout's ekko.
        if not os.environ.get("PYTHONPATH", "").startswith(str(REPO) + os.pathsep):
            os.environ["PYTHONPATH"] = str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")
        self.key = os.urandom(16).hex()
        key_file = self.root / "cluster.key"
        key_file.parent.mkdir(parents=True, exist_ok=True)
        key_file.write_text(self.key)
        key_file.chmod(0o600)
        self.trace_dir = self.root / "trace"
        self._start_cluster(self.trace_dir)
        import ekko
        self.versions = {"ekko": f"{ekko.__version__} ({_git_rev()})", "shards": str(self.spec.tables[0].num_shards)}

    def _start_cluster(self, trace_dir: Path | None) -> None:
        from ekko import Client, ModelSpec, TableSpec
        from ekko.cli.demo import LocalCluster
        a = self.args
        ids = [f"dc{d + 1}-r{i + 1}" for d in range(a.dcs) for i in range(a.per_dc)]
        run = "latency" if trace_dir is not None else "throughput"
        self.cluster = LocalCluster(a.dcs, a.per_dc, self.root / f"cluster-{run}", preset="local",
                                    key_file=str(self.root / "cluster.key"), device="cpu",
                                    node_config={nid: {"durability": "wal"} for nid in ids},
                                    apply_trace_dir=trace_dir)
        self.cluster.start()
        self.cluster.wait_ready(START_TIMEOUT_S)
        if not self.cluster.wait_joined():
            print("  warning: not every daemon saw every other before the first measurement", file=sys.stderr)
        self.eps = self.cluster.endpoints
        self.spec = ModelSpec(MODEL, [TableSpec(TABLE, rows=a.rows, dim=a.dim)])
        Client(self.eps[0], key=self.key, timeout=30).register(self.spec)
        for ep in self.eps:     # the catalog spreads by gossip
            wait_until(lambda ep=ep: self._knowledge(ep) is not None, 60, f"{ep} to learn the model")

    def visibility(self, trials: list[tuple[float, np.ndarray, np.ndarray]]) -> list[float | None]:
        """Stop the latency cluster (each daemon flushes its apply trace), and for each trial
        ``(t0, ids, versions)`` (``t0`` wall time) the seconds until its last row applied at
        the last daemon (None: some daemon never applied it).  Then start a fresh cluster
        (no traces) for the throughput runs and hand the publishers its addresses."""
        from ekko.server.apply_trace import read_trace, trace_path, trace_visibility
        problems = self.cluster.stop()
        for p in problems:
            print(f"  [ekko] latency cluster: {p}", file=sys.stderr)
        pubs = [(ids, vers) for _, ids, vers in trials]
        vis = np.stack([trace_visibility(read_trace(trace_path(self.trace_dir / r.node_id, MODEL, TABLE)), pubs)
                        for r in self.cluster.replicas])
        last = vis.max(axis=0)     # NaN where any daemon never applied the trial
        self._start_cluster(None)
        self.start_publishers()
        return [None if np.isnan(t) else float(t - t0) for t, (t0, _, _) in zip(last.tolist(), trials)]

    def _knowledge(self, ep: str) -> dict[tuple[int, int], int] | None:
        """``(shard, origin) -> counter`` of the table at ``ep``; None when it lacks the model."""
        try:
            body = json.loads(http_get(f"http://{ep}/v1/models/{MODEL}/knowledge", key=self.key))
        except urllib.error.HTTPError:
            return None
        return {(int(s), int(o)): int(c) for s, k, _ in body["tables"].get(TABLE, []) for o, c in k}

    def ingest(self, i: int) -> list[str]:
        """Endpoints of publisher ``i``: its ingest replica first, the others for fail-over."""
        if self.args.ingest == "one":
            first = 0
        else:
            first = (i % self.args.dcs) * self.args.per_dc
        return [self.eps[first]] + [e for j, e in enumerate(self.eps) if j != first]

    def publisher_conf(self) -> dict[str, Any]:
        n_pub = max(self.args.publisher_counts)
        return {**super().publisher_conf(), "endpoints": [self.ingest(i) for i in range(n_pub)],
                "key": self.key, "state_dir": str(self.root / "publishers"), "durable": not self.args.no_fsync}

    def applier_pids(self) -> list[int]:
        return [r.proc.pid for r in self.cluster.replicas if r.proc is not None]

    def extra_pids(self) -> dict[str, int]:
        return {}

    def wait_all(self, _base: Any, _rows: int, timeout: float, results: list[dict[str, Any]]
                 ) -> tuple[float | None, Any]:
        want = {(s, r["origin"]): c for r in results for s, c in r["targets"].items()}
        pending = list(self.eps)
        end = time.monotonic() + timeout
        t_done = None
        while pending:
            for ep in list(pending):
                k = self._knowledge(ep) or {}
                t = time.monotonic()
                if all(k.get(key, 0) >= c for key, c in want.items()):
                    pending.remove(ep)
                    t_done = t
            if pending:
                if time.monotonic() > end:
                    return None, f"{self.n - len(pending)}/{self.n} daemons had every row"
                time.sleep(self.args.drain_poll_ms / 1000)
        # Cross-check with the rows themselves: each publisher's last acknowledged batch.
        ok = True
        for r in results:
            if "check" not in r:
                continue
            ids, vers = np.asarray(r["check"][0]), np.asarray(r["check"][1])
            for ep in self.eps:
                raw = http_get(f"http://{ep}/v1/models/{MODEL}/tables/{TABLE}/rows?format=msgpack&ids="
                               + ",".join(map(str, ids.tolist())), key=self.key)
                got = np.frombuffer(msgpack.unpackb(raw, raw=False)["versions"], "<i8")
                ok = ok and bool((got >= vers).all())
        return t_done, ok

    def after_config(self, name: str = "") -> None:
        """With ``--metrics-dir``: every daemon's /metrics after this configuration's drain
        (cumulative over the run: diff two configurations for one)."""
        if self.args.metrics_dir is None:
            return
        out = Path(self.args.metrics_dir) / name
        out.mkdir(parents=True, exist_ok=True)
        for r, ep in zip(self.cluster.replicas, self.eps):
            try:
                (out / f"{r.node_id}.txt").write_bytes(http_get(f"http://{ep}/metrics", key=self.key))
            except OSError as e:
                print(f"  [ekko] metrics of {r.node_id}: {e}", file=sys.stderr)

    def stop(self) -> list[str]:
        problems = super().stop()
        if getattr(self, "cluster", None) is not None:
            problems += self.cluster.stop()
        return problems


def _git_rev() -> str:
    try:
        return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=False).stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


# ----------------------------------------------------------------------------- latency
async def latency_ekko(sysm: EkkoSystem, args: argparse.Namespace) -> tuple[list[float], list[float], int]:
    """One update at a time; "at all N" from the daemons' apply traces (read after the
    trials: nothing polls the daemons while they are timed)."""
    from ekko import AsyncPublisher
    rng = np.random.default_rng(args.seed)
    acks: list[float] = []
    trials: list[tuple[float, np.ndarray, np.ndarray]] = []
    async with AsyncPublisher(sysm.ingest(0), origin="tput-latency", key=sysm.key, state_dir=sysm.root / "latency-pub",
                              timeout=args.publish_timeout, durable=not args.no_fsync) as pub:
        await pub.register(sysm.spec)
        for trial in range(args.warmup + args.trials):
            ids = rng.choice(args.rows, args.latency_rows, replace=False).astype(np.int64)
            vals = rng.standard_normal((args.latency_rows, args.dim), dtype=np.float32)
            t0, w0 = time.monotonic(), time.time()
            ack = await pub.publish(MODEL, TABLE, ids, vals)
            if trial >= args.warmup:
                acks.append(time.monotonic() - t0)
                trials.append((w0, ids, np.asarray(ack.versions[TABLE], np.int64)))
            # The others wait for all N before this pause; ekko's trials cannot know
            # without polling, so they pause longer (an overlap is reported, see below).
            await asyncio.sleep(EKKO_TRIAL_GAP_S)
    seen = sysm.visibility(trials)
    alls = [t for t in seen if t is not None]
    starts = [w0 for w0, _, _ in trials]
    sysm.overlaps = sum(1 for i, t in enumerate(seen[:-1]) if t is not None and starts[i] + t > starts[i + 1])
    return [a for a, t in zip(acks, seen) if t is not None], alls, len(seen) - len(alls)


async def latency_board(sysm: _BoardSystem, args: argparse.Namespace) -> tuple[list[float], list[float], int]:
    rng = np.random.default_rng(args.seed)
    acks, alls, timeouts = [], [], 0
    try:
        for trial in range(args.warmup + args.trials):
            ids = rng.choice(args.rows, args.latency_rows, replace=False).astype(np.int64)
            vals = rng.standard_normal((args.latency_rows, args.dim), dtype=np.float32)
            tag = 1_000_000 + trial
            t0 = time.monotonic()
            await sysm.publish_one(tag, ids, vals)
            t_ack = time.monotonic() - t0
            t_all = await sysm.wait_tag(tag, TRIAL_TIMEOUT_S)
            if trial >= args.warmup:
                if t_all is None:
                    timeouts += 1
                else:
                    acks.append(t_ack)
                    alls.append(t_all - t0)
            await asyncio.sleep(TRIAL_GAP_S)
    finally:
        if isinstance(sysm, DirectSystem):
            await sysm.close_session()
    return acks, alls, timeouts


# ----------------------------------------------------------------------------- one system
def run_system(cls: type[System], args: argparse.Namespace, rep: int) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix=f"ekko-tput-{cls.name}-"))
    sysm = cls(args, root)
    out: dict[str, Any] = {"load_before": load()}
    t_begin = time.monotonic()
    try:
        sysm.pubs = Publishers(cls.name, max(args.publisher_counts))     # they import meanwhile
        sysm.start()
        out["versions"] = sysm.versions
        print(f"  [{sysm.name}] {len(sysm.applier_pids())} {sysm.role}s up in {time.monotonic() - t_begin:.1f} s: "
              + "; ".join(f"{k} {v}" for k, v in sysm.versions.items()), flush=True)
        out["start_s"] = round(time.monotonic() - t_begin, 1)
        # latency: one update at a time
        lat = latency_ekko if isinstance(sysm, EkkoSystem) else latency_board
        acks, alls, timeouts = asyncio.run(lat(sysm, args))
        out["latency"] = {"ack_p50_ms": _ms(pct(acks, 0.5)), "ack_p90_ms": _ms(pct(acks, 0.9)),
                          "all_p50_ms": _ms(pct(alls, 0.5)), "all_p90_ms": _ms(pct(alls, 0.9)),
                          "all_max_ms": _ms(max(alls) if alls else None), "n": len(alls), "timeouts": timeouts,
                          "overlapped": getattr(sysm, "overlaps", 0)}   # ekko only
        print(f"  [{sysm.name}] latency of a {args.latency_rows}-row update: ack p50 "
              f"{_fmt(out['latency']['ack_p50_ms'])}"
              f" ms, at all {sysm.n} p50 {_fmt(out['latency']['all_p50_ms'])} p90 "
              f"{_fmt(out['latency']['all_p90_ms'])} ms (n={len(alls)}, {timeouts} timed out"
              f"{', %d overlapped the next trial' % out['latency']['overlapped'] if out['latency']['overlapped'] else ''})",
              flush=True)
        # throughput
        out["throughput"] = {}
        for n_pub in args.publisher_counts:
            for batch in args.batch_sizes:
                base = sysm.board.snapshot() if isinstance(sysm, _BoardSystem) else None
                t_start, results = sysm.pubs.run(n_pub, batch, args.duration, args.seed + rep)
                rows = sum(b for r in results for _, _, b in r["acks"])
                lats = [t1 - t0 for r in results for t0, t1, _ in r["acks"]]
                errors = [e for r in results for e in r["errors"]]
                t_last = max((t1 for r in results for _, t1, _ in r["acks"]), default=None)
                t_all, check = sysm.wait_all(base, rows, args.drain_timeout, results) if rows else (None, "no rows")
                sysm.after_config(f"{n_pub}x{batch}-r{rep + 1}")
                fig = {"rows": rows, "batches": len(lats), "errors": len(errors), "error_sample": errors[:3],
                       "acked_rps": round(rows / (t_last - t_start)) if t_last else None,
                       "all_rps": round(rows / (t_all - t_start)) if t_all else None,
                       "drain_s": round(t_all - t_last, 3) if t_all and t_last else None,
                       "ack_p50_ms": _ms(pct(lats, 0.5)), "ack_p90_ms": _ms(pct(lats, 0.9)),
                       "verified": check}
                out["throughput"][f"{n_pub}x{batch}"] = fig
                print(f"  [{sysm.name}] {n_pub} publisher(s) x {batch}-row batches: {rows} rows acked, "
                      f"{_fmt(fig['acked_rps'], 0)} rows/s acked, {_fmt(fig['all_rps'], 0)} rows/s at all {sysm.n} "
                      f"(drain {_fmt(fig['drain_s'], 2)} s), ack p50 {_fmt(fig['ack_p50_ms'])} ms"
                      + (f", {len(errors)} errors: {errors[:1]}" if errors else "")
                      + ("" if check is True else f", check: {check}"), flush=True)
        rss = [vm_hwm_mb(p) for p in sysm.applier_pids()]
        out["rss_mb"] = {"per_process": [round(x, 1) if x else None for x in rss],
                         "median": _r(med(rss)), "max": _r(max((x for x in rss if x), default=None)),
                         **{k: _r(vm_hwm_mb(p)) for k, p in sysm.extra_pids().items()}}
        print(f"  [{sysm.name}] peak RSS per {sysm.role}: median {_fmt(out['rss_mb']['median'], 0)} MB, "
              f"max {_fmt(out['rss_mb']['max'], 0)} MB", flush=True)
    finally:
        problems = sysm.stop()
        for p in problems:
            print(f"  [{sysm.name}] {p}", file=sys.stderr)
        out["stop_problems"] = problems
        shutil.rmtree(root, ignore_errors=True)
    out["load_after"] = load()
    out["wall_s"] = round(time.monotonic() - t_begin, 1)
    return out


def _ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1000, 2)


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 1)


def _fmt(x: float | None, nd: int = 1) -> str:
    if x is None:
        return "-"
    return f"{x:,.{nd}f}"


# ----------------------------------------------------------------------------- summary
def summarize(reps: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    systems = [s for s in ("ekko", "redis", "direct") if any(s in r for r in reps)]
    configs = [f"{p}x{b}" for p in args.publisher_counts for b in args.batch_sizes]

    def metrics(r: dict[str, Any]) -> dict[str, float | None]:
        m = {f"latency.{k}": v for k, v in r["latency"].items() if k.endswith("_ms")}
        for c in configs:
            for k in ("acked_rps", "all_rps", "ack_p50_ms", "ack_p90_ms"):
                m[f"{c}.{k}"] = r["throughput"].get(c, {}).get(k)
        m["rss.median_mb"] = r["rss_mb"]["median"]
        m["rss.max_mb"] = r["rss_mb"]["max"]
        return m

    medians = {s: {} for s in systems}
    for s in systems:
        per = [metrics(r[s]) for r in reps if s in r]
        for k in per[0]:
            medians[s][k] = _r(med([p[k] for p in per]))
    ratios: dict[str, dict[str, float | None]] = {}
    for base in ("redis", "direct"):
        if "ekko" not in systems or base not in systems:
            continue
        rs: dict[str, float | None] = {}
        pairs = [(metrics(r["ekko"]), metrics(r[base])) for r in reps if "ekko" in r and base in r]
        for k in pairs[0][0]:
            vals = [e[k] / b[k] for e, b in pairs if e[k] is not None and b[k]]
            rs[k] = round(med(vals), 3) if vals else None
        ratios[f"ekko/{base}"] = rs
    bars: dict[str, Any] = {}
    e = medians.get("ekko")
    if e:
        r = ratios.get("ekko/redis", {})
        for b in args.batch_sizes:
            k = f"1x{b}.all_rps"
            if k in r:
                bars[f"rows/s at all N, {b}-row batches >= {BAR_ALL_RPS_VS_REDIS}x redis"] = _bar(r.get(k),
                                                                                                    BAR_ALL_RPS_VS_REDIS)
        if "latency.all_p50_ms" in r:
            v = r["latency.all_p50_ms"]
            bars[f"p50 to all N <= {BAR_P50_VS_REDIS}x redis"] = {"value": v,
                                                                   "met": v is not None and v <= BAR_P50_VS_REDIS}
        v = e.get("latency.ack_p50_ms")
        bars[f"ack p50 <= {BAR_ACK_P50_MS} ms"] = {"value": v, "met": v is not None and v <= BAR_ACK_P50_MS}
        if 1 in args.publisher_counts and 4 in args.publisher_counts:
            for b in args.batch_sizes:
                one, four = e.get(f"1x{b}.all_rps"), e.get(f"4x{b}.all_rps")
                v = round(four / one, 3) if one and four else None
                bars[f"4 publishers >= 1 publisher, rows/s at all N, {b}-row batches"] = _bar(v, 1.0)
        if "redis" in medians:
            d, s = e.get("rss.max_mb"), medians["redis"].get("rss.median_mb")
            v = round(d / s, 3) if d and s else None
            bars[f"peak RSS per daemon (max) <= {BAR_RSS_VS_SUBSCRIBER}x a subscriber's (median)"] = {
                "value": v, "met": v is not None and v <= BAR_RSS_VS_SUBSCRIBER}
    return {"systems": systems, "configs": configs, "medians": medians, "ratios": ratios, "bars": bars}


def methods(args: argparse.Namespace, n: int) -> dict[str, str]:
    """How each system's "applied at all N" is detected (printed and in the JSON)."""
    return {
        "ekko latency": "each daemon's apply trace (ekko daemon --apply-trace: wall time of every applied row, read "
                        "after the trials): the last apply of the update's rows at the last daemon, exact; nothing "
                        f"polls the daemons; {EKKO_TRIAL_GAP_S:g} s between an acknowledgement and the next trial",
        "ekko throughput": f"after the window, every daemon's /v1/models/m/knowledge is polled every "
                           f"{args.drain_poll_ms:g} ms until, for each publisher and shard, it reaches the greatest "
                           "acknowledged counter there (from PublishAck.versions); then each publisher's last batch "
                           "is read back from every daemon ('verified')",
        "redis, direct": f"each of the {n} appliers stamps time.monotonic(), its row count and the entry's tag in "
                         "shared memory right after index_copy_: exact",
    }


def _bar(v: float | None, at_least: float) -> dict[str, Any]:
    return {"value": v, "met": v is not None and v >= at_least}


def print_summary(summary: dict[str, Any], args: argparse.Namespace, n: int) -> None:
    med_ = summary["medians"]
    nrep = args.repeats
    print()
    print(f"medians over {nrep} repeat(s).  How 'applied at all {n}' is detected:")
    for k, v in methods(args, n).items():
        print(f"  {k}: {v}")
    hdr = f"{'':8}| {args.latency_rows}-row update: ack p50 | p50 at all {n} | p90 at all {n} "
    print(hdr)
    for s in summary["systems"]:
        m = med_[s]
        print(f"{s:8}| {_fmt(m['latency.ack_p50_ms']):>21} ms | {_fmt(m['latency.all_p50_ms']):>10} ms "
              f"| {_fmt(m['latency.all_p90_ms']):>10} ms")
    print()
    print(f"{'':8}| {'pubs x batch':>12} | {'rows/s acked':>13} | {f'rows/s at all {n}':>15} | {'ack p50':>10} "
          f"| {'ack p90':>10}")
    for c in summary["configs"]:
        for s in summary["systems"]:
            m = med_[s]
            print(f"{s:8}| {c:>12} | {_fmt(m[f'{c}.acked_rps'], 0):>13} | {_fmt(m[f'{c}.all_rps'], 0):>15} "
                  f"| {_fmt(m[f'{c}.ack_p50_ms']):>7} ms | {_fmt(m[f'{c}.ack_p90_ms']):>7} ms")
    print()
    roles = {"ekko": "daemon", "redis": "subscriber", "direct": "receiver"}
    for s in summary["systems"]:
        m = med_[s]
        print(f"peak RSS per {roles[s]:10} ({s:6}): median {_fmt(m['rss.median_mb'], 0):>6} MB, "
              f"max {_fmt(m['rss.max_mb'], 0):>6} MB")
    for name, rs in summary["ratios"].items():
        print()
        print(f"{name} (median of per-repeat ratios; rows/s: higher is better for ekko, ms and MB: lower):")
        keys = ["latency.ack_p50_ms", "latency.all_p50_ms", "latency.all_p90_ms"]
        keys += [f"{c}.{k}" for c in summary["configs"] for k in ("acked_rps", "all_rps")]
        keys += ["rss.median_mb", "rss.max_mb"]
        print("  " + ", ".join(f"{k} {_fmt(rs.get(k), 3)}x" for k in keys))
    if summary["bars"]:
        print()
        print("issue #15 bars (benchmark figures, medians):")
        for k, v in summary["bars"].items():
            print(f"  {k}: {_fmt(v['value'], 3) if isinstance(v['value'], float) else v['value']} -> "
                  f"{'met' if v['met'] else 'NOT met'}")


# ----------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="Details: the module docstring (python -m pydoc bench/throughput.py).")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: " + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in QUICK.items()))
    ap.add_argument("--dcs", type=int, default=3)
    ap.add_argument("--per-dc", type=int, default=3)
    ap.add_argument("--rows", type=int, default=1_000_000, help="rows of the table (default 1M)")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--batches", default="1000,10000", help="rows per publish in the throughput runs")
    ap.add_argument("--publishers", default="1,4", help="publisher counts of the throughput runs")
    ap.add_argument("--duration", type=float, default=8.0, help="seconds each throughput run publishes")
    ap.add_argument("--latency-rows", type=int, default=1000, help="rows of the latency update")
    ap.add_argument("--trials", type=int, default=20, help="latency trials per system and repeat")
    ap.add_argument("--warmup", type=int, default=3, help="uncounted latency trials first")
    ap.add_argument("--repeats", type=int, default=3, help="each system started afresh this many times")
    ap.add_argument("--systems", default="ekko,redis,direct")
    ap.add_argument("--ingest", choices=["one", "spread"], default="one",
                    help="ekko publishers write to dc1-r1 (one) or to the first replica of DC i mod dcs (spread)")
    ap.add_argument("--no-fsync", action="store_true", help="ekko publishers with durable=False (no SDK fsyncs)")
    ap.add_argument("--drain-poll-ms", type=float, default=10.0, help="pause between knowledge polls of a drain")
    ap.add_argument("--drain-timeout", type=float, default=180.0, help="seconds a drain may take")
    ap.add_argument("--publish-timeout", type=float, default=120.0, help="seconds one publish may take")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--metrics-dir", default=None,
                    help="write every ekko daemon's /metrics here after each throughput configuration "
                         "(DIR/<publishers>x<batch>-r<repeat>/<node>.txt; cumulative: diff two)")
    ap.add_argument("--out", type=Path, help="write the figures as JSON here (e.g. throughput.json)")
    raw = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(raw)
    if args.quick:      # --quick sets what the command line did not
        given = {a.split("=")[0] for a in raw if a.startswith("--")}
        for k, v in QUICK.items():
            if f"--{k.replace('_', '-')}" not in given:
                setattr(args, k, v)
    args.batch_sizes = [int(x) for x in str(args.batches).split(",") if x]
    args.publisher_counts = [int(x) for x in str(args.publishers).split(",") if x]
    args.system_names = [s for s in args.systems.split(",") if s]
    bad = set(args.system_names) - {"ekko", "redis", "direct"}
    if bad:
        ap.error(f"unknown systems {sorted(bad)}")
    biggest = max(args.batch_sizes + [args.latency_rows])
    if min(args.publisher_counts) < 1 or biggest * max(args.publisher_counts) > args.rows:
        ap.error("need publishers >= 1 and batch x publishers <= rows")
    return args


def describe(args: argparse.Namespace, n: int) -> dict[str, Any]:
    import aiohttp
    import torch
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    try:
        import redis
        redis_py = redis.__version__
    except ImportError:
        redis_py = None
    return {"machine": f"{platform.machine()} {cpu}", "cpus": os.cpu_count(), "mem_gb": round(mem_gb, 1),
            "kernel": platform.release(), "python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "aiohttp": aiohttp.__version__, "redis_py": redis_py,
            "ekko_commit": _git_rev(), "processes_per_system": n,
            "argv": sys.argv[1:], "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}


def _stop_on_sigterm(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)      # unwinds through every finally: the processes are stopped


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if threading_main():
        signal.signal(signal.SIGTERM, _stop_on_sigterm)
    n = args.dcs * args.per_dc
    run = describe(args, n)
    classes: list[type[System]] = []
    skipped: dict[str, str] = {}
    for s in args.system_names:
        if s == "redis" and (why := RedisSystem.missing()):
            skipped["redis"] = why
            print(f"note: {why}", file=sys.stderr)
            continue
        classes.append({"ekko": EkkoSystem, "redis": RedisSystem, "direct": DirectSystem}[s])
    print(f"bench/throughput.py: {', '.join(c.name for c in classes)} "
          f"({'skipped: ' + ', '.join(skipped) if skipped else 'none skipped'}); {n} appliers each "
          f"({args.dcs} DCs x {args.per_dc} for ekko: `ekko daemon --preset local`, cpu, cluster key, WAL on)")
    print(f"machine: {run['machine']}, {run['cpus']} CPUs, {run['mem_gb']} GiB; python {run['python']}, "
          f"torch {run['torch']}, numpy {run['numpy']}, aiohttp {run['aiohttp']}, redis-py {run['redis_py']}; "
          f"ekko commit {run['ekko_commit']}")
    print(f"table {args.rows} x {args.dim} float32; latency: {args.trials} trials of {args.latency_rows} rows after "
          f"{args.warmup} warm-up; throughput: publishers {args.publisher_counts} x batches {args.batch_sizes}, "
          f"{args.duration:g} s each, closed loop; ekko ingest {args.ingest}, SDK state "
          f"{'not fsynced' if args.no_fsync else 'fsynced (default)'}; {args.repeats} repeat(s)")
    print(f"argv: {' '.join(sys.argv[1:] if argv is None else argv) or '(defaults)'}")
    load_start = load()
    print(f"load average before: {load_start} ({run['cpus']} CPUs)", flush=True)
    reps: list[dict[str, Any]] = []
    for rep in range(args.repeats):
        order = classes[rep % len(classes):] + classes[:rep % len(classes)] if classes else []
        print(f"repeat {rep + 1}/{args.repeats}: {' -> '.join(c.name for c in order)}", flush=True)
        reps.append({c.name: run_system(c, args, rep) for c in order})
        for c in order:
            r = reps[-1][c.name]
            print(f"  [{c.name}] started in {r['start_s']} s, whole system {r['wall_s']} s, load "
                  f"{r['load_before']} -> {r['load_after']}", flush=True)
        if args.out and rep + 1 < args.repeats:     # what is done so far survives an interrupted run
            write_json(args, run, skipped, load_start, load(), reps, classes, complete=False)
    load_end = load()
    summary = write_json(args, run, skipped, load_start, load_end, reps, classes, complete=True)
    if classes:
        print_summary(summary, args, n)
    print(f"\nload average before: {load_start}, after: {load_end} ({run['cpus']} CPUs)")
    if args.out:
        print(f"wrote {args.out}")
    return 0


def threading_main() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


def write_json(args: argparse.Namespace, run: dict[str, Any], skipped: dict[str, str], load_start: list[float],
               load_end: list[float], reps: list[dict[str, Any]], classes: list[type[System]], complete: bool
               ) -> dict[str, Any]:
    """The summary of ``reps``; written to ``--out`` (when given) with everything measured."""
    summary = summarize(reps, args) if reps and classes else {"systems": [], "configs": [], "medians": {},
                                                               "ratios": {}, "bars": {}}
    if args.out:
        doc = {"complete": complete, "run": run, "methods": methods(args, args.dcs * args.per_dc), "skipped": skipped,
               "load_before": load_start,
               "load_after": load_end, "repeats": reps, **summary}
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(json.dumps(doc, indent=1, default=str))
        tmp.replace(args.out)
    return summary


if __name__ == "__main__":
    sys.exit(main())
