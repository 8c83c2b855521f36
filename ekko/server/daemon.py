"""The replica daemon: one :class:`~ekko.replica.node.ReplicaNode` behind the HTTP API.

:class:`Daemon` drives the sans-IO node with real sockets and the real clock:

* protocol time is :func:`time.monotonic`; the membership incarnation comes from
  :func:`time.time_ns`, so a restarted daemon always has a higher one;
* one asyncio task, the *timer loop*, sleeps until ``node.next_deadline()``
  (or until a handler wakes it), calls ``node.tick(now)`` and sends what
  ``node.drain()`` returns through :class:`~ekko.server.transport.HttpTransport`;
* HTTP handlers call node methods synchronously on the event loop thread (the
  node is not thread-safe, and nothing else touches it) and then send the
  node's output.  Only pure work -- decoding a large frame, writing a
  snapshot -- goes to worker threads.

The API is the one in ``docs/http-api.md``.  Bad input of any kind is answered
with a 4xx JSON error ``{"error", "reason"}``, counted in ``ekko_rejects_total``
by reason, and changes nothing; a 500 means a bug (it is logged).

Persistence: on start every model found under ``data_dir`` is restored (values,
versions, tombstones via :mod:`ekko.replica.snapshot`, and the per-shard knowledge
vectors kept in the snapshot's meta, so knowledge never goes backwards across
a clean restart).  Snapshots are taken every ``config.snapshot_interval``
seconds and at shutdown: the copy is made on the loop thread, in one step, so
tensors and knowledge agree; the file I/O runs on a worker thread.

Durability (``config.durability = "wal"``, the default): a publish is applied,
its frame appended to the write-ahead log (:mod:`ekko.replica.wal`), and the answer
waits until the record is fsynced (group commit: concurrent publishes share one
fsync).  On start the snapshots are loaded and the log replayed on top (the same
``node.publish`` path: versions make a replayed row a no-op, and chains are
rebuilt); each snapshot rotates the log at the instant of its copy and deletes
the segments it covers once written, so the log stays bounded.

Back-pressure (:mod:`ekko.server.backpressure`): before a publish is read, its size is
checked against the bounds in :class:`~ekko.core.config.NodeConfig` (publish bytes
in flight, queued peer sends, push backlog, un-snapshotted log: 429; process
RSS: 503).  A refused publish changes nothing and carries ``Retry-After``;
refusals are counted in ``ekko_backpressure_rejects_total`` by bound.

Shutdown (SIGTERM/SIGINT, or :meth:`Daemon.stop`): ``/healthz`` answers 503 and
writes are refused with 503, in-flight requests get :data:`DRAIN_TIMEOUT_S` to
finish, the timer loop stops, queued sends get :data:`SEND_DRAIN_TIMEOUT_S`,
a final snapshot is written, and the process exits 0.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import random
import shutil
import signal
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import msgpack
import numpy as np
import torch
from aiohttp import web
from prometheus_client import Counter as PromCounter

from ekko.server.backpressure import PublishGate
from ekko.core.codec import MAX_FRAME_BYTES, Frame, Keyring, MsgType, decode_frame, field
from ekko.core.config import NodeConfig
from ekko.core.errors import ProtocolError, UsageError
from ekko.server.transport import HttpTransport, estimated_size
from ekko.server.metrics import UNKNOWN_DC, DaemonMetrics
from ekko.replica.node import Outgoing, ReplicaNode
from ekko.sdk.rollback_watch import rollback_keys, rollback_view
from ekko.core.spec import ModelSpec, check_name
from ekko.core.store import ModelStore, to_wire_values
from ekko.core.version import last_counter_at
from ekko.replica.wal import (
    KIND_PUBLISH,
    KIND_SPEC,
    READ_CHUNK_BYTES,
    WAL_DIR,
    GroupCommitLog,
    WalError,
)
from rollback.manager import check_sample

log = logging.getLogger("ekko.server.daemon")

#: most row ids one GET .../rows request may name.
MAX_READ_IDS = 16384
#: longest HTTP request line accepted: room for MAX_READ_IDS ids of up to 20 characters
#: plus the path (aiohttp's default of 8190 bytes would cap a read at ~1k ids).
MAX_REQUEST_LINE = MAX_READ_IDS * 21 + 4096
#: requests handled at once; beyond it writes and reads get 429 with Retry-After.
MAX_CONCURRENT_REQUESTS = 256
#: most shadowed rows a publish acknowledgement lists per table (all are counted).
MAX_SHADOWED_LISTED = 1024
#: longest a cut request may wait for knowledge to cover a publisher's heads (seconds).
MAX_CUT_WAIT_S = 60.0
#: how often such a wait looks again (seconds).
CUT_WAIT_POLL_S = 0.02
#: seconds clients are asked to wait after a 429/503.
RETRY_AFTER_S = 1
#: seconds in-flight requests get to finish at shutdown.
DRAIN_TIMEOUT_S = 10.0
#: seconds queued peer sends get to finish at shutdown.
SEND_DRAIN_TIMEOUT_S = 2.0
#: seconds background tasks get to end at shutdown before they are cancelled.
TASK_STOP_TIMEOUT_S = 5.0
#: frames at least this large are decoded (HMAC, zstd, msgpack) on a worker thread.
DECODE_OFFLOAD_BYTES = 256 << 10
#: the timer loop re-reads the node's deadline at least this often (seconds).
MAX_TIMER_SLEEP_S = 1.0
#: where the daemon keeps its model catalog (specs), next to the snapshots.
CATALOG_FILE = "catalog.json"
#: where the daemon keeps a baseline pin set through the API, so a restart keeps it.
BASELINE_FILE = "baseline.json"
#: file a running daemon holds an exclusive lock on, so no second daemon uses the data dir.
LOCK_FILE = ".lock"
#: keyword arguments of aiohttp's request handler (AppRunner / TestServer ``**kwargs``).
HANDLER_ARGS: dict[str, Any] = {"max_line_size": MAX_REQUEST_LINE, "max_field_size": 16 << 10}

#: least seconds between two snapshots started because the log is full.
MIN_WAL_SNAPSHOT_GAP_S = 1.0

#: message types /v1/gossip accepts (peer traffic only).
#: quality samples one POST /v1/quality may carry.
MAX_QUALITY_SAMPLES = 1024
PEER_TYPES = frozenset({MsgType.GOSSIP, MsgType.PULL_REQUEST, MsgType.PULL_RESPONSE, MsgType.PUSH,
                        MsgType.ROLLBACK, MsgType.CUT})

#: HTTP status for each rejection reason; anything else is 400.
_STATUS_OF_REASON = {
    "bad_mac": 401, "unauthenticated": 401,
    "too_large": 413, "too_many_ids": 413,
    "unknown_model": 404, "unknown_table": 404, "not_found": 404,
    "method_not_allowed": 405,
    "spec_conflict": 409,
    "forbidden": 403,
    "overloaded": 429, "queue_full": 429,
    "draining": 503, "memory": 503, "wal_error": 503, "incomplete": 503, "persist_error": 503,
}
_REASON_OF_STATUS = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}


def _log_quality_event(ev: dict[str, Any]) -> None:
    """Log an incident (opened here or learnt from a peer), a finished restore, or a closed gap."""
    kind = ev.get("event")
    if kind in ("incident", "incident_adopted"):
        log.warning("model %s CORRUPTED: incident %s (%s by %s), metric %s effect %.2f%% (cusum %.1f), "
                    "rollback to cut %s%s", ev.get("model"), ev.get("id"),
                    "detected" if kind == "incident" else "learnt", ev.get("detected_by"), ev.get("metric"),
                    100.0 * float(ev.get("effect") or 0.0), float(ev.get("statistic") or 0.0), ev.get("cut"),
                    "" if ev.get("cut") else " (none eligible: manual action needed)")
    elif kind == "restored":
        log.warning("model %s rolled back to cut %s (record %s, incident %s): %s rows restored, %s",
                    ev.get("model"), ev.get("cut"), ev.get("rollback_id"), ev.get("incident"), ev.get("rows"),
                    "-" if ev.get("restore_s") is None else f"{ev['restore_s']:.3f} s after the incident reached us")
    elif kind == "gap_closed":
        log.info("model %s table %s shard %s: every member answered for counters (%s, %s] of origin %s; "
                 "knowledge passes them (what no member holds there was never received or is lost)",
                 ev.get("model"), ev.get("table"), ev.get("shard"), ev.get("after"), ev.get("upto"), ev.get("origin"))


class RequestRejected(Exception):
    """Bad input found by a handler itself (not by the codec or the node)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def parse_hostport(s: str) -> tuple[str, int]:
    """``"host:port"`` -> (host, port); raises :class:`UsageError`."""
    host, sep, port = str(s).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UsageError(f"address {s!r} must be HOST:PORT")
    return host.strip("[]"), int(port)


# --------------------------------------------------------------------------- persistence helpers
def _hlc_now() -> int:
    """This host's wall clock as an HLC counter (the top logical tick of this millisecond)."""
    return max(1, last_counter_at(time.time() * 1000))


def export_model_state(node: ReplicaNode, model: str) -> dict[str, Any]:
    """The protocol state of ``model`` to keep beside its tensors (see :meth:`ReplicaNode.export_state`)."""
    return node.export_state(model)


def import_model_state(node: ReplicaNode, spec: ModelSpec, store: ModelStore, state: dict[str, Any],
                       now: float) -> None:
    """Install a model restored from a snapshot (see :meth:`ReplicaNode.import_state`)."""
    node.import_state(spec, store, state, now)


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(json.dumps(obj, indent=1, sort_keys=True).encode())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- the daemon
class Daemon:
    """An aiohttp web app driving one :class:`ReplicaNode` with the real clock.

    Args:
        node_id: unique replica name.
        dc: its data centre.
        listen: ``"host:port"`` to serve on; also the address peers are told,
            unless ``advertise`` is given.
        seeds: ``"host:port"`` addresses of replicas to join through.
        data_dir: where snapshots and the model catalog live (created if missing).
        config: protocol configuration.
        key: cluster key (bytes/str) or a :class:`~ekko.core.codec.Keyring`; when set,
            every frame must carry a valid HMAC (else 401) and ours are signed.
        keyring_file: a keyring file (:mod:`ekko.core.keyring`) instead of ``key``;
            re-read on SIGHUP (:meth:`reload_keyring`), so keys rotate with no restart.
            With publisher keys in it, publishes must be signed by a publisher key
            that allows their model and origin (else 403).
        device: torch device of the tensors (default: CUDA when available).
        advertise: ``"host:port"`` peers should use, when it differs from ``listen``.
        clock: protocol time source (seconds, monotonic).

    Example:
        Run one replica until SIGTERM (what ``ekko daemon`` does)::

            d = Daemon("r1", "dc1", "127.0.0.1:7070", [], "/var/lib/ekko/r1", NodeConfig())
            asyncio.run(d.serve())

        Or serve ``d.app`` with any aiohttp runner, passing :data:`HANDLER_ARGS` (e.g.
        ``await TestServer(d.app).start_server(**HANDLER_ARGS)``); app startup restores
        the snapshots, app cleanup drains and writes the final one.
    """

    def __init__(self, node_id: str, dc: str, listen: str, seeds: list[str] | tuple[str, ...], data_dir: str | Path,
                 config: NodeConfig | None = None, key: bytes | str | Keyring | None = None, device: Any = None,
                 *, advertise: str | None = None, clock: Callable[[], float] = time.monotonic,
                 keyring_file: str | Path | None = None) -> None:
        self.host, self.port = parse_hostport(listen)
        self.address = advertise or listen
        parse_hostport(self.address)
        for s in seeds:
            parse_hostport(s)
        if key is not None and keyring_file is not None:
            raise UsageError("give a cluster key or a keyring file, not both")
        self.keyring_file = Path(keyring_file) if keyring_file is not None else None
        self.keyring = (self._load_keyring() if self.keyring_file is not None
                        else key if isinstance(key, Keyring) or key is None else Keyring.single(key))
        self.data_dir = Path(data_dir)
        self.config = config or NodeConfig()
        self.clock = clock
        self.node = ReplicaNode(node_id, dc, self.address, config=self.config,
                                rng=random.Random(int.from_bytes(os.urandom(8), "little")), now=clock(),
                                incarnation=time.time_ns(), seeds=list(seeds), device=device)
        self.node.wall_offset_s = time.time() - self.clock()
        self.metrics = DaemonMetrics(self.node)
        self.keyring_reloads = PromCounter("ekko_keyring_reloads", "Keyring file reloads (SIGHUP), by outcome",
                                           ["outcome"], registry=self.metrics.registry)
        self.transport = HttpTransport(self.keyring, on_sent=self._on_sent, on_failed=self._on_failed)
        self.draining = False
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._wake: asyncio.Event | None = None
        self._tasks: list[asyncio.Task] = []
        self._stop_snapshots: asyncio.Event | None = None
        self._lock_file: Any = None
        self._started = False
        self._snapshot_lock: asyncio.Lock | None = None
        self._stopped = False
        self._stop_requested: asyncio.Event | None = None
        self.restored: list[str] = []
        # Durability and back-pressure (see the module doc).
        self.wal: GroupCommitLog | None = None
        self.metrics.watch_wal(lambda: self.wal)
        self._wal_specs: set[str] = set()      # models whose spec is logged in the current segment
        self._snapshot_now: asyncio.Event | None = None
        self.gate = PublishGate(self.config, lambda: sum(q.rows for q in self.node.queues.values()),
                                lambda: self.wal.retained_bytes if self.wal is not None else None,
                                lambda: self._snapshot_now.set() if self._snapshot_now is not None else None)
        self.recovery: dict[str, Any] = {}
        self.app = self._make_app()

    # ------------------------------------------------------------------ app wiring
    def _make_app(self) -> web.Application:
        # +1: aiohttp refuses a body whose size *reaches* client_max_size; a frame of exactly
        # MAX_FRAME_BYTES is legal.
        app = web.Application(client_max_size=MAX_FRAME_BYTES + 1, middlewares=[self._middleware])
        app.router.add_post("/v1/models", self._h_models)
        app.router.add_post("/v1/publish", self._h_publish)
        app.router.add_post("/v1/gossip", self._h_gossip)
        app.router.add_get("/v1/models/{model}/tables/{table}/rows", self._h_rows)
        app.router.add_get("/v1/status", self._h_status)
        app.router.add_post("/v1/cuts", self._h_take_cut)
        app.router.add_get("/v1/models/{model}/cuts", self._h_cuts)
        app.router.add_get("/v1/models/{model}/knowledge", self._h_knowledge)
        app.router.add_post("/v1/rollback", self._h_rollback)
        app.router.add_get("/v1/models/{model}/rollbacks", self._h_rollbacks)
        app.router.add_post("/v1/models/{model}/baseline", self._h_baseline)
        app.router.add_post("/v1/quality", self._h_quality)
        app.router.add_get("/metrics", self._h_metrics)
        app.router.add_get("/healthz", self._h_healthz)
        app.on_startup.append(self._on_startup)
        app.on_cleanup.append(self._on_cleanup)
        return app

    async def _on_startup(self, app: web.Application) -> None:
        self._wake = asyncio.Event()
        self._snapshot_lock = asyncio.Lock()
        self._snapshot_now = asyncio.Event()
        self._lock_data_dir()
        try:
            self._load_baseline_pin()
            await self.restore()
            await self.transport.start()
        except BaseException:
            # Not started: nothing may be written to the data dir (a failed restore must not
            # be overwritten by a snapshot of an empty node).
            await self.transport.close()
            if self.wal is not None:
                await self.wal.close()
            self._unlock_data_dir()
            raise
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._timer_loop(), name="ekko-timer"))
        self._stop_snapshots = asyncio.Event()
        if self.config.snapshot_interval > 0 or self.wal is not None:
            self._tasks.append(loop.create_task(self._snapshot_loop(), name="ekko-snapshot"))
        self._started = True
        log.info("%s (%s) serving at %s, incarnation %d, models %s", self.node.node_id, self.node.dc,
                 self.address, self.node.members.me.incarnation, sorted(self.node.models))

    async def _on_cleanup(self, app: web.Application) -> None:
        await self.shutdown()

    # ------------------------------------------------------------------ lifecycle
    async def serve(self, ready: Callable[[], None] | None = None) -> None:
        """Serve until SIGTERM/SIGINT (or :meth:`stop`), then shut down gracefully."""
        self._stop_requested = asyncio.Event()
        loop = asyncio.get_running_loop()
        runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=DRAIN_TIMEOUT_S, **HANDLER_ARGS)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self.port, reuse_address=True)
            await site.start()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.stop)
            loop.add_signal_handler(signal.SIGHUP, self.reload_keyring)
            if ready is not None:
                ready()
            await self._stop_requested.wait()
            log.info("%s: stop requested, draining", self.node.node_id)
            await self.shutdown()
        finally:
            t0 = time.monotonic()
            await runner.cleanup()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            log.info("listener and connections closed in %.2fs", time.monotonic() - t0)

    def _load_keyring(self) -> Keyring:
        from ekko.core.keyring import load_keyring

        assert self.keyring_file is not None
        kr = load_keyring(self.keyring_file)
        if not kr.is_peer(kr.primary):  # type: ignore[arg-type]
            raise UsageError(f"keyring {self.keyring_file}: the primary key of a replica must be a peer key "
                             f"(it signs replica traffic), not publisher key {kr.primary}")
        return kr

    def reload_keyring(self) -> bool:
        """Re-read the keyring file (SIGHUP does this); False, keeping the old keys, when it is bad.

        Frames are signed with the new primary from the next send on; frames signed
        with any key of the new keyring verify.  This is the step an operator repeats
        on every replica at each stage of a rotation (README, Security).
        """
        if self.keyring_file is None:
            log.warning("SIGHUP: no keyring file configured (--keyring); nothing to reload")
            self.keyring_reloads.labels("no_file").inc()
            return False
        try:
            kr = self._load_keyring()
        except UsageError as e:
            log.error("keyring reload failed, keeping the current keys: %s", e)
            self.keyring_reloads.labels("error").inc()
            return False
        self.keyring = self.transport.keyring = kr
        self.keyring_reloads.labels("ok").inc()
        log.info("keyring reloaded from %s: keys %s, primary %s, %d publisher keys", self.keyring_file,
                 sorted(kr.keys), kr.primary, len(kr.grants))
        return True

    def stop(self) -> None:
        """Ask :meth:`serve` to shut down (safe to call from a signal handler)."""
        self.draining = True
        if self._stop_requested is not None:
            self._stop_requested.set()

    async def shutdown(self) -> None:
        """Drain requests, stop the timer loop, flush sends, write the final snapshot.

        Idempotent; runs on the loop thread.
        """
        if self._stopped:
            return
        self._stopped = True
        self.draining = True
        if not self._started:
            return
        t0 = time.monotonic()
        if self._in_flight:
            self._idle.clear()
            try:
                await asyncio.wait_for(self._idle.wait(), DRAIN_TIMEOUT_S)
            except asyncio.TimeoutError:
                log.warning("%d requests still running after %.0fs; shutting down anyway", self._in_flight,
                            DRAIN_TIMEOUT_S)
        log.info("requests drained in %.2fs", time.monotonic() - t0)
        if self._stop_snapshots is not None:
            # Not cancelled: a periodic snapshot being written finishes first (a cancelled
            # await would leave its writer thread racing the final snapshot's files).
            self._stop_snapshots.set()
        # The timer loop checks self._stopped each round; waking it ends it.  (Cancelling
        # alone is not enough on Python 3.11: asyncio.wait_for can swallow a cancellation
        # that races with the wake-up it waits for, and the loop would run on.)
        self._wake_timer()
        t1 = time.monotonic()
        _, stuck = await asyncio.wait(self._tasks, timeout=TASK_STOP_TIMEOUT_S) if self._tasks else ((), ())
        for t in stuck:
            t.cancel()
        if stuck:
            await asyncio.wait(stuck, timeout=TASK_STOP_TIMEOUT_S)
        self._tasks.clear()
        log.info("background tasks stopped in %.2fs (%d cancelled)", time.monotonic() - t1, len(stuck))
        t2 = time.monotonic()
        await self.transport.close(SEND_DRAIN_TIMEOUT_S)
        log.info("sends flushed in %.2fs", time.monotonic() - t2)
        t3 = time.monotonic()
        try:
            n = await self.snapshot()
            log.info("final snapshot of %d models in %.2fs", n, time.monotonic() - t3)
        except Exception:
            log.exception("final snapshot failed")
        if self.wal is not None:
            # After the final snapshot: it released the segments it covers (a failed one
            # leaves them, and the next start replays them).
            await self.wal.close()
        self._unlock_data_dir()
        log.info("%s: stopped after %.2fs", self.node.node_id, time.monotonic() - t0)

    def _lock_data_dir(self) -> None:
        """Take an exclusive lock on the data dir: two daemons writing one dir would
        interleave snapshots (and restore each other's state under their own name)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        f = open(self.data_dir / LOCK_FILE, "a+b")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise UsageError(f"data dir {self.data_dir} is in use by another daemon") from None
        self._lock_file = f

    def _unlock_data_dir(self) -> None:
        if self._lock_file is not None:
            fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    # ------------------------------------------------------------------ timer loop
    def _wake_timer(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def _timer_loop(self) -> None:
        assert self._wake is not None
        while not self._stopped:
            now = self.clock()
            due = self.node.next_deadline()
            if due > now:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), min(due - now, MAX_TIMER_SLEEP_S))
                except asyncio.TimeoutError:
                    pass
                continue
            try:
                self.node.tick(now)
            except Exception:
                log.exception("node.tick failed")
                self.metrics.internal_errors.labels("tick").inc()
                await asyncio.sleep(0.05)  # a persistent bug must not spin the loop hot
            self._send_out(wake=False)

    def _send_out(self, wake: bool = True) -> None:
        """Send the node's outbox; wake the timer loop so it re-reads the deadline."""
        for ev in self.node.take_quality_events():
            _log_quality_event(ev)
        for out in self.node.drain():
            # Counted before send(): a message dropped at once is uncounted by _on_failed.
            self.gate.queued(estimated_size(out))
            self.transport.send(out)
        self.metrics.sends_in_flight.set(self.transport.in_flight)
        if wake:
            self._wake_timer()

    def _dc_of(self, node_id: str, address: str = "") -> str:
        mem = self.node.members.get(node_id) if node_id else None
        if mem is None and address:
            for m in self.node.members.members.values():
                if m.address == address:
                    mem = m
                    break
        return mem.dc if mem is not None else UNKNOWN_DC

    def _on_sent(self, out: Outgoing, nbytes: int) -> None:
        self.gate.done(estimated_size(out))
        self.metrics.bytes_sent.labels(self._dc_of(out.dst, out.address), out.msg_type.name).inc(nbytes)

    def _on_failed(self, out: Outgoing, reason: str) -> None:
        self.gate.done(estimated_size(out))
        self.metrics.send_failures.labels(self._dc_of(out.dst, out.address), reason).inc()

    # ------------------------------------------------------------------ snapshots
    async def _snapshot_loop(self) -> None:
        assert self._stop_snapshots is not None and self._snapshot_now is not None
        interval = self.config.snapshot_interval or None  # 0: only when the WAL asks (and at shutdown)
        while True:
            waits = [asyncio.ensure_future(self._stop_snapshots.wait()),
                     asyncio.ensure_future(self._snapshot_now.wait())]
            try:
                await asyncio.wait(waits, timeout=interval, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()
            if self._stop_snapshots.is_set():
                return  # shutting down: the final snapshot follows
            asked = self._snapshot_now.is_set()
            self._snapshot_now.clear()
            try:
                await self.snapshot()
            except Exception:
                log.exception("periodic snapshot failed")
            if asked:
                # A full log asks again with every refused publish; a failing snapshot must not
                # turn that into back-to-back copies of the whole model.
                try:
                    await asyncio.wait_for(self._stop_snapshots.wait(), MIN_WAL_SNAPSHOT_GAP_S)
                    return
                except TimeoutError:
                    pass

    async def snapshot(self) -> int:
        """Write a snapshot of every model; returns how many were written.

        The copy (tensors, versions, knowledge) is taken here on the loop thread in
        one step, so it is consistent; the disk writes run on a worker thread.
        """
        from ekko.replica.snapshot import save_snapshot

        lock = self._snapshot_lock or asyncio.Lock()
        async with lock:
            # The undo history in the same instant as the store (it ends at the copied state).
            copies = [(m.store.copy(), export_model_state(self.node, name), self.node.export_undo(name))
                      for name, m in self.node.models.items()]
            catalog = {"node_id": self.node.node_id, "dc": self.node.dc,
                       "models": {name: m.spec.to_dict() for name, m in self.node.models.items()}}
            if not copies:
                return 0
            # Same instant as the copy: every record appended before it is in the older segments.
            covered = self._rotate_wal()
            data_dir = self.data_dir

            def write() -> None:
                data_dir.mkdir(parents=True, exist_ok=True)
                # The catalog first: a model directory without its spec could not be loaded.
                _write_json_atomic(data_dir / CATALOG_FILE, catalog)
                for store, meta, undo in copies:
                    save_snapshot(data_dir, store, meta, undo=undo)

            t0 = time.perf_counter()
            try:
                await asyncio.get_running_loop().run_in_executor(None, write)
            except Exception:
                self.metrics.snapshots.labels("error").inc()
                raise
            self.metrics.snapshots.labels("ok").inc()
            self.metrics.snapshot_seconds.set(time.perf_counter() - t0)
            if covered is not None and self.wal is not None:
                self.wal.release_before(covered)
            return len(copies)

    def _rotate_wal(self) -> int | None:
        if self.wal is None:
            return None
        self._wal_specs.clear()  # a new segment: specs are logged again before first use
        return self.wal.rotate()

    async def restore(self) -> list[str]:
        """Load every model snapshot under ``data_dir`` into the node (at startup)."""
        from ekko.replica.snapshot import list_snapshot_models, load_snapshot, load_undo

        path = self.data_dir / CATALOG_FILE
        loop = asyncio.get_running_loop()

        def read_all() -> list[tuple[ModelSpec, tuple[ModelStore, dict[str, Any]] | None, Any]]:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            if not path.exists():
                return []
            try:
                catalog = json.loads(path.read_text())
                specs = {name: ModelSpec.from_dict(d) for name, d in catalog["models"].items()}
                if catalog.get("node_id") != self.node.node_id:
                    log.warning("data dir %s belonged to node %r, now used by %r", self.data_dir,
                                catalog.get("node_id"), self.node.node_id)
            except (OSError, ValueError, KeyError, TypeError, AttributeError, ProtocolError) as e:
                log.error("cannot read %s (%s); starting empty, peers will fill us in", path, e)
                return []
            out = []
            on_disk = set(list_snapshot_models(self.data_dir))
            orphans = sorted(on_disk - set(specs))
            if orphans:
                log.warning("snapshots of %s have no spec in %s; ignored (peers will resend them)", orphans, path)
            for name, spec in sorted(specs.items()):
                got = None
                if name in on_disk:
                    try:
                        got = load_snapshot(self.data_dir, spec, self.node.device)
                    except ProtocolError as e:
                        log.error("snapshot of %s is unusable (%s); it will be synced from peers", name, e)
                out.append((spec, got, load_undo(self.data_dir, spec) if got is not None else None))
            return out

        loaded = await loop.run_in_executor(None, read_all)
        now = self.clock()
        for spec, got, undo in loaded:
            if spec.name in self.node.models:
                continue
            if got is None:
                self.node.register_model(spec, now)
                continue
            store, meta = got
            try:
                import_model_state(self.node, spec, store, meta, now)
            except ProtocolError as e:
                log.error("snapshot state of %s is unusable (%s); it will be synced from peers", spec.name, e)
                self.node.models.pop(spec.name, None)
                self.node.register_model(spec, now)
                continue
            if undo is not None:   # before the log is replayed: its records come after these
                problem = self.node.import_undo(undo)
                if problem is not None:
                    log.error("undo history of %s is unusable (%s); rollbacks to cuts older than its snapshot "
                              "will rely on peers", spec.name, problem)
            self.restored.append(spec.name)
        if loaded:
            log.info("restored %s from %s", [s.name for s, _, _ in loaded], self.data_dir)
        if self.config.durability == "wal" or (self.data_dir / WAL_DIR).is_dir():
            # Also with durability "none": a log left by an earlier run in "wal" mode may hold
            # acknowledged publishes that no snapshot has.
            await self._recover_wal()
        return self.restored

    async def _recover_wal(self) -> None:
        """Replay the write-ahead log over the restored snapshots, then open a new segment.

        Each publish record goes through ``node.publish`` again: rows whose versions the
        snapshot already holds change nothing, and the chains of each frame are re-run, so
        knowledge and pending chains come back as they were before the crash.  A record
        the node refuses (e.g. its model's spec was lost) is logged and skipped; a torn
        or corrupt tail was already cut off by its checksum.
        """
        wal = GroupCommitLog(self.data_dir / WAL_DIR)
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        records = wal.replay()

        def next_batch() -> list:
            out, n = [], 0
            for rec in records:
                out.append(rec)
                n += len(rec.payload)
                if n >= READ_CHUNK_BYTES:
                    break
            return out

        frames = rows = refused = 0
        while True:
            batch = await loop.run_in_executor(None, next_batch)
            if not batch:
                break
            now = self.clock()
            self.node.wall_offset_s = time.time() - now  # the skew bound applies to replayed frames too
            for rec in batch:
                try:
                    if rec.kind == KIND_SPEC:
                        self.node.register_model(ModelSpec.from_dict(json.loads(rec.payload)), now)
                    elif rec.kind == KIND_PUBLISH:
                        ack = self.node.publish(decode_frame(rec.payload, None, require_mac=False).body, now)
                        frames += 1
                        rows += ack.applied
                except (ProtocolError, UsageError, ValueError, KeyError, TypeError) as e:
                    refused += 1
                    log.warning("WAL record at segment %d offset %d not replayed: %s", rec.segment, rec.offset, e)
        st = wal.replay_stats
        if self.config.durability == "wal":
            await loop.run_in_executor(None, wal.start)
            self.wal = wal
        else:
            # No log from now on: make what was replayed part of a snapshot, then drop the log.
            if st.records:
                await self.snapshot()
            await loop.run_in_executor(None, shutil.rmtree, self.data_dir / WAL_DIR)
        self.recovery = {"wal_segments": st.segments, "wal_records": st.records, "wal_frames": frames,
                         "wal_rows_applied": rows, "wal_refused": refused, "wal_dropped_bytes": st.dropped_bytes,
                         "seconds": round(time.perf_counter() - t0, 4)}
        if st.records or st.dropped_bytes:
            log.info("replayed the write-ahead log: %s", self.recovery)

    # ------------------------------------------------------------------ request plumbing
    @web.middleware
    async def _middleware(self, request: web.Request,
                          handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        endpoint = request.match_info.route.resource.canonical if request.match_info.route.resource else "other"
        light = endpoint in ("/healthz", "/metrics", "/v1/status")
        self._in_flight += 1
        try:
            if self.draining and not light:
                raise RequestRejected("replica is shutting down; retry on another replica", "draining")
            if self._in_flight > MAX_CONCURRENT_REQUESTS and not light:
                raise RequestRejected("too many concurrent requests", "overloaded")
            resp = await handler(request)
        except (ProtocolError, RequestRejected) as e:
            resp = self._error(endpoint, str(e), e.reason)
        except UsageError as e:
            resp = self._error(endpoint, str(e), "bad_request")
        except web.HTTPException as e:
            if e.status < 400:
                raise
            reason = _REASON_OF_STATUS.get(e.status, f"http_{e.status}")
            msg = e.text if e.status != 413 else f"request body exceeds MAX_FRAME_BYTES={MAX_FRAME_BYTES}"
            resp = self._error(endpoint, msg or e.reason, reason, e.status)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("bug while handling %s %s", request.method, request.path)
            self.metrics.internal_errors.labels(endpoint).inc()
            resp = web.json_response({"error": "internal error (logged)", "reason": "internal"}, status=500)
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()
        self.metrics.requests.labels(endpoint, str(resp.status)).inc()
        return resp

    def _error(self, endpoint: str, message: str, reason: str, status: int | None = None) -> web.Response:
        status = status or _STATUS_OF_REASON.get(reason, 400)
        self.metrics.reject(endpoint, reason)
        headers = {"Retry-After": str(RETRY_AFTER_S)} if status in (429, 503) else None
        return web.json_response({"error": message, "reason": reason}, status=status, headers=headers)

    async def _read_frame(self, request: web.Request) -> Frame:
        return await self._decode(await self._read_body(request))

    async def _read_body(self, request: web.Request) -> bytes:
        if request.content_length is not None and request.content_length > MAX_FRAME_BYTES:
            # Refuse before reading: a declared oversize body is not worth receiving.
            raise RequestRejected(f"request body of {request.content_length} bytes exceeds "
                                  f"MAX_FRAME_BYTES={MAX_FRAME_BYTES}", "too_large")
        data = await request.read()
        # The node refuses versions too far ahead of its wall clock; tell it what that is.
        self.node.wall_offset_s = time.time() - self.clock()
        return data

    async def _decode(self, data: bytes) -> Frame:
        keyring = self.keyring  # one keyring per request, even if SIGHUP swaps it meanwhile
        if len(data) >= DECODE_OFFLOAD_BYTES:
            frame = await asyncio.get_running_loop().run_in_executor(None, decode_frame, data, keyring)
        else:
            frame = decode_frame(data, keyring)
        if keyring and not keyring.is_peer(frame.key_id) and frame.msg_type not in (MsgType.PUBLISH,
                                                                                    MsgType.REGISTER_MODEL):
            raise RequestRejected(f"key {frame.key_id} is a publisher key: it may only publish and register "
                                  f"models, not send {frame.msg_type.name}", "forbidden")
        return frame

    def _authorize_publisher(self, frame: Frame, model: str, origin: int | None) -> None:
        """Publisher authorization: with publisher keys configured, a publish (or a model
        registration) must be signed by a publisher key granted that model and origin."""
        keyring = self.keyring
        if not keyring:
            return
        grant = keyring.grant(frame.key_id)
        if grant is None:
            if keyring.acl and frame.msg_type == MsgType.PUBLISH:
                raise RequestRejected(f"publishes must be signed with a publisher key (this frame is signed "
                                      f"with peer key {frame.key_id})", "forbidden")
            return
        if not grant.allows(model, origin):
            who = f"model {model!r}" + (f" as origin {origin}" if origin is not None else "")
            raise RequestRejected(f"publisher key {frame.key_id} may not write {who}", "forbidden")

    @staticmethod
    def _expect(frame: Frame, *types: MsgType) -> None:
        if frame.msg_type not in types:
            raise RequestRejected(f"{frame.msg_type.name} frame sent to an endpoint for "
                                  f"{'/'.join(t.name for t in types)}", "bad_type")

    # ------------------------------------------------------------------ handlers
    async def _h_models(self, request: web.Request) -> web.Response:
        frame = await self._read_frame(request)
        self._expect(frame, MsgType.REGISTER_MODEL)
        spec = ModelSpec.from_dict(frame.body.get("spec"))
        self._authorize_publisher(frame, spec.name, None)
        try:
            created = self.node.register_model(spec, self.clock())
        except UsageError as e:
            raise RequestRejected(str(e), "spec_conflict") from None
        self._send_out()
        if created:
            log.info("registered model %s", spec.name)
        return web.json_response({"ok": True, "created": created})

    async def _h_publish(self, request: web.Request) -> web.Response:
        held = request.content_length or 0
        refusal = self.gate.check(held)  # before reading: a refused publish costs no memory
        if refusal is not None:
            self.metrics.backpressure.labels(refusal.bound).inc()
            raise RequestRejected(f"{refusal.message}; retry after {RETRY_AFTER_S}s", refusal.reason)
        self.gate.publish_bytes += held
        try:
            data = await self._read_body(request)
            if not held:  # chunked upload: counted once its size is known
                held = len(data)
                self.gate.publish_bytes += held
            frame = await self._decode(data)
            self._expect(frame, MsgType.PUBLISH)
            if self.keyring:
                model, origin = frame.body.get("model"), frame.body.get("origin")
                if not isinstance(model, str) or not isinstance(origin, int) or isinstance(origin, bool):
                    raise ProtocolError("publish needs a string model and an integer origin", "bad_body")
                self._authorize_publisher(frame, model, origin)
            ack = self.node.publish(frame.body, self.clock())
            # Logged in the same loop step as the apply, so a snapshot copy sees both or neither.
            ticket = self._wal_append(frame.body["model"], data) if self.wal is not None else None
            self._send_out()
            if ticket is not None:
                assert self.wal is not None
                try:
                    await self.wal.durable(ticket)
                except WalError as e:
                    raise RequestRejected(f"{e}: the update is applied here but not durable; retry",
                                          "wal_error") from None
            self.metrics.published_rows.labels(frame.body["model"]).inc(ack.rows)
            answer: dict[str, Any] = {"ok": True, "rows": ack.rows, "applied": ack.applied,
                                      "max_counter": ack.max_counter}
            if ack.shadowed:
                answer["shadowed"] = {t: {"count": len(ids), "ids": ids[:MAX_SHADOWED_LISTED].tolist(),
                                          "by": by[:MAX_SHADOWED_LISTED].tolist()}
                                      for t, (ids, by) in ack.shadowed.items()}
                n = sum(len(ids) for ids, _ in ack.shadowed.values())
                self.metrics.shadowed_rows.labels(frame.body["model"]).inc(n)
                log.warning("publish of %s by origin %s: %d row(s) already held at greater versions "
                            "(their values did not apply; a clock ahead, or another publisher)",
                            frame.body["model"], frame.body.get("origin"), n)
            rollbacks = rollback_keys(self.node, frame.body["model"])
            if rollbacks:  # the publisher learns of rollbacks from its acknowledgements
                answer["rollbacks"] = rollbacks
            return web.json_response(answer)
        finally:
            self.gate.publish_bytes -= held

    def _wal_append(self, model: str, data: bytes) -> int:
        """Append a publish frame (after its model's spec, once per segment); returns its ticket."""
        assert self.wal is not None
        if model not in self._wal_specs:
            self.wal.append(KIND_SPEC, json.dumps(self.node.spec(model).to_dict()).encode())
            self._wal_specs.add(model)
        # The frame as received: replay needs no key (the checksum guards it) and it is compact.
        return self.wal.append(KIND_PUBLISH, bytes(data))

    async def _h_gossip(self, request: web.Request) -> web.Response:
        frame = await self._read_frame(request)
        if frame.msg_type not in PEER_TYPES:
            raise RequestRejected(f"{frame.msg_type.name} is not a peer message; use its own endpoint",
                                  "bad_type")
        peer = request.remote or ""
        self.node.receive(frame, self.clock(), peer)
        self._send_out()
        sender = frame.body.get("from")
        # The sender's DC as our member list has it (not a "dc" field of the body: a label
        # value taken from the wire would let any sender grow the metric without bound).
        dc = self._dc_of(sender) if isinstance(sender, str) else UNKNOWN_DC
        self.metrics.bytes_received.labels(dc, frame.msg_type.name).inc(frame.wire_bytes)
        return web.Response(status=204)

    async def _h_take_cut(self, request: web.Request) -> web.Response:
        """Frame ``CUT`` ``{"model", "name"?}``: take a named cut here and tell every peer."""
        frame = await self._read_frame(request)
        self._expect(frame, MsgType.CUT)
        model = field(frame.body, "model", str)
        if model not in self.node.models:
            raise RequestRejected(f"unknown model {model!r}", "unknown_model")
        name = field(frame.body, "name", str, optional=True) or f"cut-{int(time.time() * 1000)}"
        covers = frame.body.get("covers")
        if covers is not None:
            # A publisher's cut covers everything it had acknowledged: wait until this
            # replica's knowledge reaches its chain heads (a gap may need a probe first).
            origin, heads = self.node.parse_coverage(model, covers)
            wait_s = min(float(field(frame.body, "wait_s", (int, float), optional=True, default=0.0)),
                         MAX_CUT_WAIT_S)
            deadline = time.monotonic() + max(0.0, wait_s)
            while (missing := self.node.uncovered(model, origin, heads)) and time.monotonic() < deadline:
                await asyncio.sleep(CUT_WAIT_POLL_S)
            if missing:
                raise RequestRejected(f"{len(missing)} shard(s) of {model!r} are not yet known up to the "
                                      f"publisher's acknowledged updates (first: {missing[0]}); retry", "incomplete")
        cut = self.node.take_cut(model, name, self.clock())
        self._send_out()
        log.info("took cut %s of %s", cut.name, model)
        return web.json_response({"ok": True, "model": model, "name": cut.name, "taken_at": time.time()})

    async def _h_cuts(self, request: web.Request) -> web.Response:
        model = request.match_info["model"]
        if model not in self.node.models:
            raise RequestRejected(f"unknown model {model!r}", "unknown_model")
        undo = self.node.undo
        horizon = undo.horizon(model) if undo is not None else None
        pin = self.node.baseline_pin
        # restorable: the undo history here holds every change since the cut (else the
        # rows it lacks are zeroed and repaired from peers); learnt: from a peer or a
        # snapshot rather than taken here.
        cuts = [{"name": c.name, "taken_at": self.node.cut_wall_time(c), "taken_at_monotonic": c.taken_at,
                 "restorable": self.node.cuts.restorable(c) if undo is not None else False,
                 "learnt": c.seq == 0, "pinned": c.name == pin, "shards": len(c.knowledge)}
                for c in self.node.cuts.cuts(model)]
        return web.json_response({"model": model, "cuts": cuts, "undo_horizon_seq": horizon,
                                  "baseline_pin": pin})

    def _load_baseline_pin(self) -> None:
        """Re-apply a pin set through the API before a restart.  The config's
        ``baseline_pin_cut`` wins when it changed since (the operator edited it)."""
        path = self.data_dir / BASELINE_FILE
        try:
            saved = json.loads(path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            log.error("cannot read %s (%s); keeping the configured baseline pin", path, e)
            return
        if not isinstance(saved, dict) or not isinstance(saved.get("cut"), str):
            log.error("%s is malformed; keeping the configured baseline pin", path)
            return
        if saved.get("config") != self.config.baseline_pin_cut:
            log.info("baseline_pin_cut changed in the config since the pin of %s: using the config", path)
            return
        try:
            self.node.set_baseline_pin(saved["cut"])
        except UsageError as e:
            log.error("%s: %s; keeping the configured baseline pin", path, e)
            return
        if saved["cut"] != self.config.baseline_pin_cut:
            log.info("baseline pin %r (set through the API) restored from %s", saved["cut"], path)

    async def _h_baseline(self, request: web.Request) -> web.Response:
        """Frame ``BASELINE`` ``{"cut": name}`` pins this replica as a baseline to a cut of
        the model (it must be known here: see ``GET /v1/models/{model}/cuts``); ``""``
        unpins.  The pin holds every model of the replica; it is kept in the data dir."""
        model = request.match_info["model"]
        frame = await self._read_frame(request)
        self._expect(frame, MsgType.BASELINE)
        cut = field(frame.body, "cut", str)
        if model not in self.node.models:
            raise RequestRejected(f"unknown model {model!r}", "unknown_model")
        if cut:
            check_name("cut", cut, ProtocolError)
            if all(c.name != cut for c in self.node.cuts.cuts(model)):
                raise RequestRejected(f"model {model!r} has no cut {cut!r} here (see ekko cuts)", "not_found")
        before = self.node.baseline_pin
        record = {"cut": cut, "config": self.config.baseline_pin_cut}
        try:
            await asyncio.get_running_loop().run_in_executor(None, self._write_baseline_file, record)
        except OSError as e:   # not pinned: a pin a restart would silently drop is worse
            raise RequestRejected(f"cannot keep the pin in {self.data_dir}: {e}", "persist_error") from None
        self.node.set_baseline_pin(cut)
        self._send_out()
        log.warning("baseline pin %r -> %r (through the API)", before, cut)
        return web.json_response({"ok": True, "model": model, "cut": cut, "previous": before})

    def _write_baseline_file(self, record: dict[str, Any]) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(self.data_dir / BASELINE_FILE, record)

    async def _h_knowledge(self, request: web.Request) -> web.Response:
        """Read-only view for fault harnesses: per table, per shard ``[shard, knowledge,
        pending chains]`` (knowledge as ``[[origin, counter], ...]``), and the rollback
        records held here (each with its cut's knowledge and its ``upper`` bounds)."""
        model = request.match_info["model"]
        if model not in self.node.models:
            raise RequestRejected(f"unknown model {model!r}", "unknown_model")
        shards = self.node.models[model].shards
        tables = {t: [[s, sync.knowledge.to_wire(), sum(len(c) for c in sync.pending.values())]
                      for s, sync in sorted(by_shard.items())] for t, by_shard in shards.items()}
        rollbacks = [r for r in self.node.rollbacks.values() if r.get("model") == model]
        return web.json_response({"model": model, "tables": tables, "rollbacks": rollbacks})

    def _rollback_point(self, model: str) -> int:
        """The counter up to which a rollback "now" fences: this host's wall clock, or the
        greatest counter of ``model`` held here or reported by a peer if that is ahead.
        A publisher runs its HLC ahead of wall time by its rows / 256 per millisecond (a
        2,000-row publish: 7.8 ms), so the wall clock alone could leave the tail of a
        publish made just before unfenced.  Peers' heads are bounded by the skew horizon."""
        heads = [h.get(model, 0) for h in self.node.peer_heads.values()]
        return max([_hlc_now(), self.node.models[model].head] + heads)

    async def _h_rollback(self, request: web.Request) -> web.Response:
        """Frame ``ROLLBACK`` ``{"model", "cut"}``: roll the model back to a cut everywhere.

        The rollback point is now (:meth:`_rollback_point`): every update of the model
        after the cut and up to now is fenced.
        """
        frame = await self._read_frame(request)
        self._expect(frame, MsgType.ROLLBACK)
        model = field(frame.body, "model", str)
        cut = field(frame.body, "cut", str)
        if model not in self.node.models:
            raise RequestRejected(f"unknown model {model!r}", "unknown_model")
        record = self.node.rollback(model, cut, self._rollback_point(model), self.clock())
        self._send_out()
        log.warning("rolled back %s to cut %s (record %s)", model, cut, record["id"])
        return web.json_response({"ok": True, "model": model, "cut": cut, "id": record["id"],
                                  "rolled_back_rows": int(self.node.counters["rolled_back_rows"])})

    async def _h_rollbacks(self, request: web.Request) -> web.Response:
        """The model's rollback records here (for a trainer's watch): see :mod:`ekko.sdk.rollback_watch`."""
        model = request.match_info["model"]
        if model not in self.node.models:
            raise RequestRejected(f"unknown model {model!r}", "unknown_model")
        return web.json_response(rollback_view(self.node, model))

    async def _h_quality(self, request: web.Request) -> web.Response:
        """Frame ``QUALITY``: one sample ``{"model", "variant", "metric", "value", "count"}``
        or a batch ``{"samples": [sample, ...]}`` (at most MAX_QUALITY_SAMPLES); every
        sample is validated before any is taken, so a bad batch changes nothing."""
        frame = await self._read_frame(request)
        self._expect(frame, MsgType.QUALITY)
        raw = frame.body.get("samples", [frame.body]) if isinstance(frame.body, dict) else None
        if not isinstance(raw, list) or not 0 < len(raw) <= MAX_QUALITY_SAMPLES:
            raise RequestRejected(f"samples must be a list of 1..{MAX_QUALITY_SAMPLES} maps", "bad_body")
        samples = []
        for smp in raw:
            if not isinstance(smp, dict):
                raise RequestRejected("a quality sample must be a map", "bad_body")
            args = tuple(smp.get(k) for k in ("model", "variant", "metric", "value", "count"))
            check_sample(*args)
            if args[0] not in self.node.models:
                raise RequestRejected(f"unknown model {args[0]!r}", "unknown_model")
            if args[2] not in self.node.quality.config.detector.metrics:
                raise RequestRejected(f"unknown metric {args[2]!r}; known: "
                                      f"{sorted(self.node.quality.config.detector.metrics)}", "bad_metric")
            samples.append(args)
        started = []
        for args in samples:
            record = self.node.report_quality(*args, self.clock(), until_counter=self._rollback_point(args[0]))
            if record is not None:
                started.append(record["id"])
        self._send_out()
        states = {a[0]: self.node.quality.state(a[0]).value for a in samples}
        return web.json_response({"ok": True, "samples": len(samples), "states": states, "rollbacks": started})

    async def _h_rows(self, request: web.Request) -> web.Response:
        model, table = request.match_info["model"], request.match_info["table"]
        if model not in self.node.models:
            raise RequestRejected(f"unknown model {model!r}", "unknown_model")
        spec = self.node.table_spec(model, table)
        if spec is None:
            raise RequestRejected(f"model {model!r} has no table {table!r}", "unknown_table")
        fmt = request.query.get("format", "json")
        if fmt not in ("json", "msgpack"):
            raise RequestRejected("format must be json or msgpack", "bad_format")
        raw = request.query.get("ids")
        if raw is None:
            raise RequestRejected("missing ids=ID,ID,...", "bad_ids")
        parts = raw.split(",") if raw.strip() else []
        if len(parts) > MAX_READ_IDS:
            raise RequestRejected(f"{len(parts)} ids exceed MAX_READ_IDS={MAX_READ_IDS}", "too_many_ids")
        try:
            ids = np.array([int(p) for p in parts], dtype=np.int64)
        except (ValueError, OverflowError):
            raise RequestRejected("ids must be comma-separated integers", "bad_ids") from None
        if len(ids) and (ids.min() < 0 or ids.max() >= spec.rows):
            raise RequestRejected(f"row ids must be within 0..{spec.rows - 1}", "bad_ids")
        values = self.node.read_rows(model, table, ids)
        versions = self.node.table_store(model, table).versions[ids]
        if fmt == "msgpack":
            wire = to_wire_values(values)
            body = msgpack.packb({"model": model, "table": table, "n": len(ids), "dim": spec.dim,
                                  "dtype": spec.dtype, "ids": ids.astype("<i8").tobytes(),
                                  "versions": versions.astype("<i8").tobytes(),
                                  "values": np.ascontiguousarray(wire).astype(
                                      wire.dtype.newbyteorder("<"), copy=False).tobytes()},
                                 use_bin_type=True)
            return web.Response(body=body, content_type="application/msgpack")
        vals = values.detach().to("cpu")
        if vals.dtype != torch.float64:
            vals = vals.float()  # float16/bfloat16 widen exactly; JSON numbers are doubles anyway
        return web.json_response({"model": model, "table": table, "ids": ids.tolist(), "dim": spec.dim,
                                  "dtype": spec.dtype, "versions": versions.tolist(), "values": vals.tolist()})

    async def _h_status(self, request: web.Request) -> web.Response:
        cluster = request.query.get("cluster", "0")
        if cluster not in ("0", "1", "true", "false"):
            raise RequestRejected("cluster must be 0 or 1", "bad_query")
        st = self.node.status()
        st["serving"] = not self.draining
        st["baseline_pin"] = self.node.baseline_pin
        st["durability"] = {"mode": self.config.durability, "recovery": self.recovery,
                            "wal_retained_bytes": self.wal.retained_bytes if self.wal is not None else 0}
        if cluster in ("1", "true"):
            st["members"] = self.node.cluster_view()
        return web.json_response(st)

    async def _h_metrics(self, request: web.Request) -> web.Response:
        self.metrics.sends_in_flight.set(self.transport.in_flight)
        self.metrics.set_pressure(**self.gate.gauges())
        from prometheus_client import CONTENT_TYPE_LATEST
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _h_healthz(self, request: web.Request) -> web.Response:
        if self.draining:
            return web.Response(status=503, text="draining\n", headers={"Retry-After": str(RETRY_AFTER_S)})
        return web.Response(text="ok\n")
