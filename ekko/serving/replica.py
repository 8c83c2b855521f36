"""A replica inside the serving process: ``ekko.Replica`` (issue #17).

The serving process runs a full replica (the daemon's code: it joins the cluster,
takes pushes, answers anti-entropy, keeps its write-ahead log and snapshots) on an
event loop of its own thread, and serves from the replica's tensors directly:
:meth:`Replica.bind` makes a module's embedding weights and dense parameters *be* the
replica's tables (``nn.Parameter`` over the same storage, no copy), so every update
the replica applies -- in place, ``index_copy_`` -- is what the module computes with
next; a rollback likewise.

What a forward pass may see (the rule): the replica writes rows on its own thread
while the serving thread reads them.  A forward pass that overlaps an apply may see
some of the update's rows new and others old, and, on the CPU, a row being written
may be read half old, half new (``index_copy_`` copies element by element).  Rows are
never moved or freed while bound (the tables are fixed-size; a snapshot restore only
happens at start, before :meth:`bind`).  Serve with :meth:`Replica.consistent` when a
forward pass must see whole updates: it runs the call between two applies.

Example::

    import ekko
    rep = ekko.Replica("serve-1", "dc2", listen="0.0.0.0:7071", data_dir="/var/lib/ekko/serve-1",
                       seeds=["10.0.0.1:7070"], preset="wan", key=open("cluster.key", "rb").read())
    rep.start()
    model = Ranker()                     # the trainer's architecture; its weights do not matter
    rep.bind(model, model="ranker")      # now model's tables are the replica's, updated in place
    scores = model(batch)                # always the newest parameters
    rep.stop()
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
from torch import nn

from ekko.core.config import NodeConfig, preset as preset_config
from ekko.core.errors import UsageError

#: seconds :meth:`Replica.start` waits for the replica to serve.
START_TIMEOUT_S = 60.0
#: seconds :meth:`Replica.stop` waits for the drain, the final snapshot and the thread.
STOP_TIMEOUT_S = 60.0
#: seconds :meth:`Replica.bind` waits for the model to reach the replica (catalog gossip).
BIND_TIMEOUT_S = 60.0

T = TypeVar("T")


class Replica:
    """A replica of the cluster in this process, on a thread of its own (see the module doc).

    Args:
        node_id, dc, listen, data_dir, seeds: as for ``ekko daemon`` (``listen`` is where
            peers reach it: the replica answers the daemon's whole HTTP API there).
        preset: the protocol timing preset (``local``, ``lan``, ``wan``); or ``config``.
        config: a full :class:`~ekko.core.config.NodeConfig` instead of ``preset``.
        key: the cluster key (bytes/str) or a :class:`~ekko.core.codec.Keyring`.
        device: where the tables live (default: CUDA when available).
        advertise: the address peers should use, when it differs from ``listen``.
        open_metrics: serve ``/metrics`` unsigned although the replica holds a key (as
            ``ekko daemon --open-metrics``; :mod:`ekko.core.read_auth`).
    """

    def __init__(self, node_id: str, dc: str, listen: str, data_dir: str | Path, seeds: Iterable[str] = (), *,
                 preset: str | None = None, config: NodeConfig | None = None, key: Any = None, device: Any = None,
                 advertise: str | None = None, open_metrics: bool = False) -> None:
        from ekko.server.daemon import Daemon   # heavy (aiohttp): on use
        if preset is not None and config is not None:
            raise UsageError("give a preset or a config, not both")
        cfg = config if config is not None else preset_config(preset or "lan")
        self.daemon = Daemon(node_id, dc, listen, list(seeds), data_dir, cfg, key=key, device=device,
                             advertise=advertise, open_metrics=open_metrics)
        # Its tensors are bound in this process: moving them to shared memory would leave the
        # bound modules with copies that no longer update.
        self.daemon.shared_tables.refused = ("this replica is embedded in a serving process (ekko.Replica): "
                                             "use its tensors there, or attach to a daemon")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    # ------------------------------------------------------------------ lifecycle
    @property
    def address(self) -> str:
        """The address peers (and clients) reach this replica at."""
        return self.daemon.address

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, timeout: float = START_TIMEOUT_S) -> "Replica":
        """Start serving (restoring the data dir's snapshots and log first); returns once
        it listens.  Raises what the start raised (a taken port, a locked data dir ...)."""
        if self._thread is not None:
            raise UsageError("this replica was started already")
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            try:
                self._loop.run_until_complete(self.daemon.serve(ready=ready.set, handle_signals=False))
            except BaseException as e:   # surfaced by start() or stop()
                self._error = e
            finally:
                ready.set()

        self._thread = threading.Thread(target=run, name=f"ekko-replica-{self.daemon.node.node_id}", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            raise TimeoutError(f"replica {self.daemon.node.node_id} did not start within {timeout:g} s")
        if self._error is not None:
            self._thread.join(timeout)
            raise self._error
        return self

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Drain, write the final snapshot and stop the thread (idempotent)."""
        if self._thread is None or self._loop is None:
            return
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self.daemon.stop)
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise TimeoutError(f"replica {self.daemon.node.node_id} did not stop within {timeout:g} s")
        self._loop.close()

    def __enter__(self) -> "Replica":
        return self if self.running else self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ------------------------------------------------------------------ access
    def call(self, fn: Callable[[], T], timeout: float = 30.0) -> T:
        """Run ``fn()`` on the replica's thread, between two of its steps: nothing applies
        while it runs.  Its result (or exception)."""
        if not self.running or self._loop is None:
            raise UsageError("the replica is not running")

        async def run() -> T:
            return fn()
        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout)

    def consistent(self, fn: Callable[[], T], timeout: float = 30.0) -> T:
        """``fn()`` (a forward pass) with no apply or rollback under way: whole updates only."""
        return self.call(fn, timeout)

    def has_model(self, model: str) -> bool:
        return model in self.daemon.node.models

    def wait_for_model(self, model: str, timeout: float = BIND_TIMEOUT_S) -> None:
        """Until ``model`` is registered here (the cluster's catalog reaches new replicas)."""
        end = time.monotonic() + timeout
        while not self.has_model(model):
            if not self.running:
                raise UsageError("the replica is not running")
            if time.monotonic() > end:
                raise TimeoutError(f"model {model!r} did not reach replica {self.daemon.node.node_id} "
                                   f"within {timeout:g} s")
            time.sleep(0.05)

    def tensor(self, model: str, table: str) -> torch.Tensor:
        """The replica's live ``(rows, dim)`` values of a table: read it, do not write it."""
        if not self.has_model(model):
            raise UsageError(f"model {model!r} is not on this replica (yet): wait_for_model() first")
        spec = self.daemon.node.table_spec(model, table)
        if spec is None:
            raise UsageError(f"model {model!r} has no table {table!r}")
        ts = self.daemon.node.table_store(model, table)
        if ts.values is None:
            raise UsageError("this replica keeps no values (metadata mode)")
        if ts.blocks is not None:
            raise UsageError(f"table {table!r} is placed across the DC (replicas_per_shard): this replica keeps "
                             "some of its shards, packed, not a (rows, dim) tensor")
        return ts.values

    def bind(self, module: nn.Module, model: str, timeout: float = BIND_TIMEOUT_S) -> list[str]:
        """Make ``module``'s tables the replica's own tensors; returns the bound table names.

        Each parameter's table is the one the model's layout names for it (or, for a
        model registered without one, the one ``track()`` names;
        :mod:`ekko.serving.layout`): an embedding weight is the table's ``(rows, dim)``
        tensor, a dense parameter a view of its table's rows (row-major, the padding
        left out).  Every one must fit (shape, dtype), else nothing is bound
        (:class:`UsageError`).  The parameters become the replica's tensors, on its
        device, with ``requires_grad=False``: serve, do not train, through them.
        """
        from ekko.serving import layout
        self.wait_for_model(model, timeout)
        placements = layout.plan(module, self.daemon.node.spec(model))
        node = self.daemon.node
        return layout.bind(module, placements, lambda table: self.tensor(model, table),
                           lambda table: node.table_store(model, table).lookup)
