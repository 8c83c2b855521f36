"""The replica daemon: one :class:`~ekko.replica.node.ReplicaNode` behind the HTTP API.

:class:`Daemon` drives the sans-IO node with real sockets and the real clock.  It
owns the node and wires the parts, each in its own module:

* :mod:`ekko.server.driver` -- the *timer loop*: sleeps until
  ``node.next_deadline()`` (or until a handler wakes it), calls
  ``node.tick(now)`` and sends what ``node.drain()`` returns through
  :class:`~ekko.server.transport.HttpTransport`.  Protocol time is
  :func:`time.monotonic`; the membership incarnation comes from
  :func:`time.time_ns`, so a restarted daemon always has a higher one.
* :mod:`ekko.server.http_api` -- routes and the request middleware;
  :mod:`ekko.server.ingest` (registrations, publishes, gossip) and
  :mod:`ekko.server.operator_api` (reads, cuts, rollbacks, quality, status) hold
  the handlers, :mod:`ekko.server.frames` reads their frames.  Handlers call node
  methods synchronously on the event loop thread (the node is not thread-safe,
  and nothing else touches it) and then send the node's output.  Only pure work
  -- decoding a large frame, writing a snapshot -- goes to worker threads.
* :mod:`ekko.server.persistence` -- snapshots, the write-ahead log, recovery.
* :mod:`ekko.server.backpressure` -- the publish gate.

The daemon itself runs the lifecycle: startup, graceful shutdown, the data dir's
lock, signals and keyring reloads.

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
import errno
import fcntl
import logging
import os
import random
import signal
import socket
import time
from pathlib import Path
from typing import Any, Callable

from aiohttp import web
from prometheus_client import Counter as PromCounter

from ekko.core.codec import Keyring, check_mac
from ekko.core.config import NodeConfig
from ekko.core.errors import UsageError
from ekko.replica.node import ReplicaNode
from ekko.replica.wal import GroupCommitLog
from ekko.server.apply_trace import ApplyTrace
from ekko.server.backpressure import PublishGate
from ekko.server.change_feed import ChangeFeed
from ekko.server.shared_tables import SharedTables
from ekko.server.driver import NodeDriver
from ekko.server.frames import FrameReader
from ekko.server.heap_trim import HeapTrimmer
from ekko.server.http_api import HANDLER_ARGS, HttpApi
from ekko.server.ingest import IngestHandlers
from ekko.server.join_check import live_namesake
from ekko.server.metrics import DaemonMetrics
from ekko.server.operator_api import OperatorHandlers
from ekko.server.persistence import Persistence

log = logging.getLogger("ekko.server.daemon")

#: seconds in-flight requests get to finish at shutdown.
DRAIN_TIMEOUT_S = 10.0
#: seconds queued peer sends get to finish at shutdown.
SEND_DRAIN_TIMEOUT_S = 2.0
#: seconds background tasks get to end at shutdown before they are cancelled.
TASK_STOP_TIMEOUT_S = 5.0
#: file a running daemon holds an exclusive lock on, so no second daemon uses the data dir.
LOCK_FILE = ".lock"


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (address reuse on, not listening yet); raises
    :class:`OSError` when the address is taken or not ours."""
    family, kind, proto, _, addr = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                      flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except BaseException:
        sock.close()
        raise
    return sock


def parse_hostport(s: str) -> tuple[str, int]:
    """``"host:port"`` -> (host, port); raises :class:`UsageError`."""
    host, sep, port = str(s).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UsageError(f"address {s!r} must be HOST:PORT")
    return host.strip("[]"), int(port)


class Daemon:
    """An aiohttp web app driving one :class:`ReplicaNode` with the real clock.

    The daemon owns the node and wires the parts that serve it: a
    :class:`~ekko.server.driver.NodeDriver` (timer loop and transport), a
    :class:`~ekko.server.persistence.Persistence` (snapshots, the write-ahead log,
    recovery), the :class:`~ekko.server.backpressure.PublishGate`, and an
    :class:`~ekko.server.http_api.HttpApi` over the request handlers.  It runs
    their lifecycle: startup, graceful shutdown, the data dir's lock, signals and
    keyring reloads.

    Start-up rules (:meth:`serve`):

    * The listen address is bound first; a port that is taken fails there
      (:class:`OSError`) and nothing is created in the data dir.
    * One node id, one live replica: before it touches the data dir, the daemon asks
      its seeds for their members (:mod:`ekko.server.join_check`).  When one lists this
      node id as alive or suspect at another address *and that address answers as this
      node id*, the start is refused with a :class:`UsageError` naming that address --
      joining would replace the live replica's membership entry (the newer incarnation
      wins) and the two would fight over one name.  A restart of the same node (its own
      data dir, the old process dead) starts as before, at the same address or at
      another one, since the old address no longer answers.
    * A data dir that cannot be created or written is a :class:`UsageError` naming it.

    Args:
        node_id: unique replica name.
        dc: its data centre.
        listen: ``"host:port"`` to serve on; also the address peers are told,
            unless ``advertise`` is given.
        seeds: ``"host:port"`` addresses of replicas to join through.
        data_dir: where snapshots and the model catalog live (created if missing).
        config: protocol configuration.
        key: cluster key (bytes/str) or a :class:`~ekko.core.codec.Keyring`; when set,
            every frame must carry a valid HMAC (else 401) and ours are signed, and every
            GET but ``/healthz`` must carry a read signature (:mod:`ekko.core.read_auth`).
        keyring_file: a keyring file (:mod:`ekko.core.keyring`) instead of ``key``;
            re-read on SIGHUP (:meth:`reload_keyring`), so keys rotate with no restart.
            With publisher keys in it, publishes must be signed by a publisher key
            that allows their model and origin (else 403).
        device: torch device of the tensors (default: CUDA when available).
        advertise: ``"host:port"`` peers should use, when it differs from ``listen``.
        clock: protocol time source (seconds, monotonic).
        apply_trace: a directory: record every applied row there with its wall time
            (:mod:`ekko.server.apply_trace`; for benches).
        open_metrics: serve ``/metrics`` unsigned although the daemon holds keys (for
            Prometheus scrapers); every other read still needs a signature
            (:mod:`ekko.core.read_auth`).
        frame_mac: how to sign frames whatever the keyring says (``Keyring.mac``; None:
            the keyring's): ``"hmac-sha256"`` while a cluster upgrades from daemons that
            verify only that.  Frames signed either way always verify.

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
                 keyring_file: str | Path | None = None, apply_trace: str | Path | None = None,
                 open_metrics: bool = False, frame_mac: str | None = None) -> None:
        self.host, self.port = parse_hostport(listen)
        self.address = advertise or listen
        parse_hostport(self.address)
        for s in seeds:
            parse_hostport(s)
        self.seeds = list(seeds)
        if key is not None and keyring_file is not None:
            raise UsageError("give a cluster key or a keyring file, not both")
        self.keyring_file = Path(keyring_file) if keyring_file is not None else None
        self.frame_mac = check_mac(frame_mac) if frame_mac is not None else None
        self.keyring = (self._load_keyring() if self.keyring_file is not None
                        else key if isinstance(key, Keyring) or key is None else Keyring.single(key))
        if self.keyring is not None:
            self.keyring = self.keyring.with_mac(frame_mac)
        self.data_dir = Path(data_dir)
        self.config = config or NodeConfig()
        self.clock = clock
        self.node = ReplicaNode(node_id, dc, self.address, config=self.config,
                                rng=random.Random(int.from_bytes(os.urandom(8), "little")), now=clock(),
                                incarnation=time.time_ns(), seeds=list(seeds), device=device)
        self.node.wall_offset_s = time.time() - self.clock()
        self.apply_trace = ApplyTrace(apply_trace) if apply_trace is not None else None
        if self.apply_trace is not None:
            self.node.on_apply.append(self.apply_trace.on_apply)
        self.metrics = DaemonMetrics(self.node)
        self.keyring_reloads = PromCounter("ekko_keyring_reloads", "Keyring file reloads (SIGHUP), by outcome",
                                           ["outcome"], registry=self.metrics.registry)
        # Durability and back-pressure (see the module doc).
        self.persistence = Persistence(self.node, self.config, self.data_dir, self.metrics, clock)
        self.metrics.watch_wal(lambda: self.persistence.wal)
        self.metrics.watch_push_queues(self.node)
        self.gate = PublishGate(self.config, lambda: sum(q.rows for q in self.node.queues.values()),
                                self.persistence.retained_bytes, self.persistence.request_snapshot)
        self._stopped = False
        self.driver = NodeDriver(self.node, self.metrics, self.gate, self.keyring, clock, lambda: self._stopped)
        self.transport = self.driver.transport
        self.draining = False
        frames = FrameReader(self.node, clock, lambda: self.keyring)
        ingest = IngestHandlers(self.node, frames, self.driver, self.persistence, self.gate, self.metrics, clock)
        operator = OperatorHandlers(self.node, self.config, frames, self.driver, self.persistence, self.gate,
                                    self.metrics, clock, lambda: self.draining)
        self.feed = ChangeFeed(self.node)
        self.shared_tables = SharedTables(self.node)
        self.api = HttpApi(ingest, operator, self.metrics, lambda: self.draining, self.feed, self.shared_tables,
                           lambda: self.keyring, open_metrics=open_metrics)
        self._tasks: list[asyncio.Task] = []
        self._lock_file: Any = None
        self._started = False
        self._stop_requested: asyncio.Event | None = None
        self.app = self._make_app()

    # ------------------------------------------------------------------ the parts' state, as before the split
    @property
    def wal(self) -> GroupCommitLog | None:
        """The open write-ahead log, or None (durability "none", or not started)."""
        return self.persistence.wal

    @property
    def recovery(self) -> dict[str, Any]:
        """What replaying the write-ahead log did at start (empty before)."""
        return self.persistence.recovery

    @property
    def restored(self) -> list[str]:
        """Names of the models restored from snapshots at start."""
        return self.persistence.restored

    async def snapshot(self) -> int:
        """Write a snapshot of every model; returns how many were written (see :meth:`Persistence.snapshot`)."""
        return await self.persistence.snapshot()

    async def restore(self) -> list[str]:
        """Load every model snapshot under ``data_dir`` into the node, then replay the log (at startup)."""
        return await self.persistence.restore()

    # ------------------------------------------------------------------ app wiring
    def _make_app(self) -> web.Application:
        app = self.api.make_app()
        app.on_startup.append(self._on_startup)
        app.on_cleanup.append(self._on_cleanup)
        return app

    async def _on_startup(self, app: web.Application) -> None:
        # Before anything touches the data dir: a refused start leaves a fresh one as it was.
        live = await live_namesake(self.node.node_id, self.address, self.seeds, keyring=self.keyring)
        if live is not None:
            raise UsageError(f"node id {self.node.node_id!r} is alive in the cluster at {live}: "
                             f"stop that replica first, or give this one another --node-id")
        self.driver.start()
        self.persistence.start()
        self._lock_data_dir()
        try:
            self.persistence.load_baseline_pin()
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
        self._tasks.append(loop.create_task(self.driver.run(), name="ekko-timer"))
        trimmer = HeapTrimmer(self.metrics.heap_trim_seconds.observe)
        self._tasks.append(loop.create_task(trimmer.run(self.config.heap_trim_interval, lambda: self._stopped),
                                            name="ekko-heap-trim"))
        snapshots = self.persistence.start_snapshot_loop()
        if snapshots is not None:
            self._tasks.append(snapshots)
        self._started = True
        log.info("%s (%s) serving at %s, incarnation %d, models %s", self.node.node_id, self.node.dc,
                 self.address, self.node.members.me.incarnation, sorted(self.node.models))

    async def _on_cleanup(self, app: web.Application) -> None:
        await self.shutdown()

    # ------------------------------------------------------------------ lifecycle
    async def serve(self, ready: Callable[[], None] | None = None, handle_signals: bool = True) -> None:
        """Serve until SIGTERM/SIGINT (or :meth:`stop`), then shut down gracefully.

        ``handle_signals=False`` leaves the process's signals alone (a replica embedded in
        another program, on a thread of its own: :class:`ekko.serving.Replica`)."""
        self._stop_requested = asyncio.Event()
        loop = asyncio.get_running_loop()
        # Bound first (not yet listening): a port that is taken fails here, before app
        # startup creates anything in the data dir.
        sock = bind_socket(self.host, self.port)
        runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=DRAIN_TIMEOUT_S, **HANDLER_ARGS)
        try:
            await runner.setup()
        except BaseException:
            sock.close()
            raise
        try:
            site = web.SockSite(runner, sock)
            await site.start()
            if handle_signals:
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
            if handle_signals:
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                    loop.remove_signal_handler(sig)
            log.info("listener and connections closed in %.2fs", time.monotonic() - t0)

    def _load_keyring(self) -> Keyring:
        from ekko.core.keyring import load_keyring

        assert self.keyring_file is not None
        kr = load_keyring(self.keyring_file).with_mac(self.frame_mac)
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
        await self.api.ingest.close_streams()   # peers' streams: they are not requests to wait for
        if self.api.in_flight and not await self.api.wait_idle(DRAIN_TIMEOUT_S):
            log.warning("%d requests still running after %.0fs; shutting down anyway", self.api.in_flight,
                        DRAIN_TIMEOUT_S)
        log.info("requests drained in %.2fs", time.monotonic() - t0)
        # Not cancelled: a periodic snapshot being written finishes first (a cancelled
        # await would leave its writer thread racing the final snapshot's files).
        self.persistence.stop_snapshot_loop()
        # The timer loop checks self._stopped each round; waking it ends it.  (Cancelling
        # alone is not enough on Python 3.11: asyncio.wait_for can swallow a cancellation
        # that races with the wake-up it waits for, and the loop would run on.)
        self.driver.wake()
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
        if self.apply_trace is not None:
            self.apply_trace.close()
        self.shared_tables.close()
        self._unlock_data_dir()
        log.info("%s: stopped after %.2fs", self.node.node_id, time.monotonic() - t0)

    def _lock_data_dir(self) -> None:
        """Take an exclusive lock on the data dir: two daemons writing one dir would
        interleave snapshots (and restore each other's state under their own name)."""
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            if not os.access(self.data_dir, os.W_OK | os.X_OK):
                raise PermissionError(errno.EACCES, "not writable")
            f = open(self.data_dir / LOCK_FILE, "a+b")
        except OSError as e:
            raise UsageError(f"data dir {self.data_dir} cannot be used: {e.strerror or e}") from None
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
