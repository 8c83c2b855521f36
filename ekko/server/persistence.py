"""A daemon's data dir: snapshots, the write-ahead log, recovery at start, the baseline pin file.

:class:`Persistence` is the part of :class:`ekko.server.daemon.Daemon` that keeps
the node's state on disk and brings it back:

* **Snapshots.**  Every model's tensors, versions, knowledge (the node's exported
  state) and undo history at one instant on the loop thread, so they agree -- the
  tensors as copy-on-write views (:mod:`ekko.core.frozen`), not copies -- written on
  a worker thread (:mod:`ekko.replica.snapshot`), with the model catalog
  (:data:`CATALOG_FILE`) beside them.  Taken every ``config.snapshot_interval``
  seconds, when the log asks for one (it is full), and at shutdown.
* **The write-ahead log** (``config.durability = "wal"``): publish frames, each
  after its model's spec once per segment (:meth:`Persistence.wal_append`).  Each
  snapshot rotates the log at the instant of its copy and releases the segments
  it covers once written, so the log stays bounded.
* **Recovery** (:meth:`Persistence.restore`): the snapshots are loaded (with their
  undo history), then the log is replayed on top through ``node.publish``.
* **The baseline pin** set through the API (:data:`BASELINE_FILE`), so a restart
  keeps it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from ekko.core.codec import decode_frame
from ekko.core.config import NodeConfig
from ekko.core.errors import ProtocolError, UsageError
from ekko.core.frozen import FrozenValues, call_on_loop
from ekko.core.spec import ModelSpec
from ekko.core.store import ModelStore
from ekko.replica.node import ReplicaNode
from ekko.replica.wal import (
    KIND_PUBLISH,
    KIND_SPEC,
    READ_CHUNK_BYTES,
    WAL_DIR,
    GroupCommitLog,
)
from ekko.server.metrics import DaemonMetrics

# The daemon's logger: operators filter and tests capture "ekko.server.daemon" for all of it.
log = logging.getLogger("ekko.server.daemon")

#: where the daemon keeps its model catalog (specs), next to the snapshots.
CATALOG_FILE = "catalog.json"
#: where the daemon keeps a baseline pin set through the API, so a restart keeps it.
BASELINE_FILE = "baseline.json"
#: least seconds between two snapshots started because the log is full.
MIN_WAL_SNAPSHOT_GAP_S = 1.0


def export_model_state(node: ReplicaNode, model: str) -> dict[str, Any]:
    """The protocol state of ``model`` to keep beside its tensors (see :meth:`ReplicaNode.export_state`)."""
    return node.export_state(model)


def import_model_state(node: ReplicaNode, spec: ModelSpec, store: ModelStore, state: dict[str, Any],
                       now: float) -> None:
    """Install a model restored from a snapshot (see :meth:`ReplicaNode.import_state`)."""
    node.import_state(spec, store, state, now)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` so that a crash leaves the old file or the new one."""
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


class Persistence:
    """Snapshots, the write-ahead log and recovery of one daemon's node.

    Args:
        node: the replica node whose state is kept.
        config: its configuration (``snapshot_interval``, ``durability``, ``baseline_pin_cut``).
        data_dir: where snapshots, the catalog, the log and the pin file live.
        metrics: the daemon's metrics (snapshot counts and time).
        clock: protocol time source (seconds, monotonic).

    Attributes:
        wal: the open write-ahead log, or None (durability "none", or not started).
        restored: names of the models restored from snapshots at start.
        recovery: what replaying the log did at start (segments, records, rows, seconds).

    Example:
        At app startup the daemon calls, in this order::

            p = Persistence(node, config, data_dir, metrics, time.monotonic)
            p.start()
            p.load_baseline_pin()
            await p.restore()                     # snapshots, then the log
            task = p.start_snapshot_loop()        # None: snapshots only at shutdown

        and at shutdown ``p.stop_snapshot_loop()``, ``await p.snapshot()``, then
        ``await p.wal.close()``.
    """

    def __init__(self, node: ReplicaNode, config: NodeConfig, data_dir: Path, metrics: DaemonMetrics,
                 clock: Callable[[], float]) -> None:
        self.node = node
        self.config = config
        self.data_dir = data_dir
        self.metrics = metrics
        self.clock = clock
        self.wal: GroupCommitLog | None = None
        self.restored: list[str] = []
        self.recovery: dict[str, Any] = {}
        self._wal_specs: set[str] = set()      # models whose spec is logged in the current segment
        self._snapshot_lock: asyncio.Lock | None = None
        self._snapshot_now: asyncio.Event | None = None
        self._stop_snapshots: asyncio.Event | None = None

    def start(self) -> None:
        """Make the snapshot lock and the log's snapshot request (on the serving loop, at app startup)."""
        self._snapshot_lock = asyncio.Lock()
        self._snapshot_now = asyncio.Event()

    def request_snapshot(self) -> None:
        """Ask the snapshot loop for a snapshot now (the publish gate does, when the log is full)."""
        if self._snapshot_now is not None:
            self._snapshot_now.set()

    def retained_bytes(self) -> int | None:
        """Bytes of log not yet covered by a snapshot; None without a log."""
        return self.wal.retained_bytes if self.wal is not None else None

    # ------------------------------------------------------------------ snapshots
    def start_snapshot_loop(self) -> asyncio.Task | None:
        """Start :meth:`snapshot_loop` as a task when snapshots are taken while serving
        (periodically, or when the log asks); None when only shutdown takes one."""
        self._stop_snapshots = asyncio.Event()
        if self.config.snapshot_interval > 0 or self.wal is not None:
            return asyncio.get_running_loop().create_task(self.snapshot_loop(), name="ekko-snapshot")
        return None

    def stop_snapshot_loop(self) -> None:
        """End the snapshot loop; a snapshot being written finishes first."""
        if self._stop_snapshots is not None:
            self._stop_snapshots.set()

    async def snapshot_loop(self) -> None:
        """Snapshot every ``config.snapshot_interval`` seconds and whenever the log asks."""
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

        The state (versions, knowledge, undo history, and views of the tensors) is taken
        here on the loop thread in one step, so it is consistent; the disk writes run on
        a worker thread, which has the loop copy each block of values as it goes.
        """
        from ekko.replica.snapshot import save_snapshot

        lock = self._snapshot_lock or asyncio.Lock()
        async with lock:
            loop = asyncio.get_running_loop()
            # Versions, tombstones, knowledge and the undo history (it ends at this state)
            # are copied in this instant; the values are read from copy-on-write views
            # (ekko.core.frozen) block by block on this loop while the worker writes, so
            # a snapshot costs the rows written meanwhile, not a copy of every table.
            run = call_on_loop(loop)
            opened: list[FrozenValues] = []   # closed below, whatever happens
            try:
                copies = []
                for name, m in self.node.models.items():
                    store, views = m.store.freeze(run)
                    opened.extend(views.values())
                    copies.append((store, views, export_model_state(self.node, name),
                                   self.node.export_undo(name)))
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
                    write_json_atomic(data_dir / CATALOG_FILE, catalog)
                    for store, views, meta, undo in copies:
                        save_snapshot(data_dir, store, meta, undo=undo, frozen=views)

                t0 = time.perf_counter()
                try:
                    await loop.run_in_executor(None, write)
                except Exception:
                    self.metrics.snapshots.labels("error").inc()
                    raise
            finally:
                # A view left open would keep saving rows on every write from now on.
                self.metrics.snapshot_saved_rows.set(sum(v.saved_rows for v in opened))
                for v in opened:
                    v.close()
            self.metrics.snapshots.labels("ok").inc()
            self.metrics.snapshot_seconds.set(time.perf_counter() - t0)
            if covered is not None and self.wal is not None:
                self.wal.release_before(covered)
            return len(copies)

    # ------------------------------------------------------------------ write-ahead log
    def _rotate_wal(self) -> int | None:
        if self.wal is None:
            return None
        self._wal_specs.clear()  # a new segment: specs are logged again before first use
        return self.wal.rotate()

    def wal_append(self, model: str, data: bytes) -> int:
        """Append a publish frame (after its model's spec, once per segment); returns its ticket."""
        assert self.wal is not None
        if model not in self._wal_specs:
            self.wal.append(KIND_SPEC, json.dumps(self.node.spec(model).to_dict()).encode())
            self._wal_specs.add(model)
        # The frame as received: replay needs no key (the checksum guards it) and it is compact.
        return self.wal.append(KIND_PUBLISH, bytes(data))

    # ------------------------------------------------------------------ recovery
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

    # ------------------------------------------------------------------ baseline pin
    def load_baseline_pin(self) -> None:
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

    def write_baseline_file(self, record: dict[str, Any]) -> None:
        """Keep a pin set through the API (blocking: run it on a worker thread)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.data_dir / BASELINE_FILE, record)
