"""The synchronous publisher for training loops, :class:`Publisher`: the asyncio core
(:class:`ekko.sdk.async_publisher.AsyncPublisher`, whose module doc states the
delivery rules) on a background I/O thread with its own event loop, plus the
training-loop conveniences: module tracking (:meth:`Publisher.register_module`,
:meth:`Publisher.track`), cuts with trainer state and restores
(:meth:`Publisher.cut`, :meth:`Publisher.restore`), and rollback delivery to the
training thread (:meth:`Publisher.check_rollbacks`).

This is the top of the SDK: it imports the modules it builds on; none of them
imports it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ekko.core.codec import Keyring
from ekko.core.errors import UsageError
from ekko.core.hashed_slots import HashedSlots
from ekko.core.spec import ModelSpec
from ekko.sdk.ack import PublishAck
from ekko.sdk.async_publisher import DEFAULT_TIMEOUT_S, AsyncPublisher
from ekko.sdk.rollback_watch import DEFAULT_WATCH_INTERVAL_S, RollbackEvent, RolledBack
from ekko.sdk.tracking import Tracker, spec_from_module
from ekko.sdk.trainer_state import cut_with_state, restore_state


# One logger for the whole publisher (its log lines have always come from this name).
log = logging.getLogger("ekko.sdk.publisher")


class Publisher:
    """Synchronous publisher for training loops.

    Runs an :class:`AsyncPublisher` on a background I/O thread with its own event
    loop; every method blocks until done except :meth:`publish_async`, which
    validates and copies the rows on the calling thread and returns a
    :class:`concurrent.futures.Future` so that sending overlaps the next step.

    Args: as :class:`AsyncPublisher`.

    Example::

        with Publisher(["127.0.0.1:7070"], origin="trainer-0") as pub:
            tracker = pub.track(model, model="ranker")   # registers the module's tables
            for batch in data:
                loss = model(batch).sum(); loss.backward(); opt.step(); opt.zero_grad()
                tracker.publish()                         # the rows this step changed
    """

    def __init__(self, endpoints: str | Sequence[str], origin: str | int = "trainer-0",
                 key: bytes | str | Keyring | None = None, state_dir: str | Path | None = None,
                 timeout: float = DEFAULT_TIMEOUT_S, durable: bool = True) -> None:
        self._core = AsyncPublisher(endpoints, origin, key, state_dir, timeout, durable)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=f"ekko-publisher-{self._core.origin_name}",
                                        daemon=True)
        self._thread.start()
        self._closed = False

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    def _submit(self, coro: Any) -> concurrent.futures.Future:
        if self._closed:
            coro.close()
            raise UsageError("publisher is closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def _call(self, coro: Any) -> Any:
        return self._submit(coro).result()

    # -- lifecycle ----------------------------------------------------------------------
    def __enter__(self) -> "Publisher":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self, timeout: float = 10.0) -> None:
        """Stop the I/O thread.  Publishes still running are cancelled; their frames stay
        persisted and go out first when a publisher with this origin starts again."""
        if self._closed:
            return
        self._closed = True

        async def shutdown() -> None:
            me = asyncio.current_task()
            others = [t for t in asyncio.all_tasks() if t is not me]
            for t in others:
                t.cancel()
            await asyncio.gather(*others, return_exceptions=True)
            await self._core.close()
        try:
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(timeout)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)
            if not self._thread.is_alive():
                self._loop.close()

    # -- API ----------------------------------------------------------------------------
    @property
    def origin(self) -> int:
        return self._core.origin

    @property
    def endpoints(self) -> list[str]:
        return list(self._core.endpoints)

    @property
    def pending_models(self) -> list[str]:
        return self._core.pending_models

    def spec(self, model: str) -> ModelSpec | None:
        return self._core.spec(model)

    def register(self, spec: ModelSpec) -> bool:
        """See :meth:`AsyncPublisher.register`."""
        return self._call(self._core.register(spec))

    def slots(self, model: str, table: str) -> HashedSlots:
        """A hashed table's slot assignment (see :meth:`AsyncPublisher.slots`)."""
        return self._core.slots(model, table)

    def cut(self, model: str, name: str | None = None, state: Any = None, path: str | Path | None = None,
            extra: Any = None) -> str:
        """Take a cut of ``model`` (see :meth:`AsyncPublisher.cut`); returns its name.

        With ``state`` -- a :class:`~ekko.sdk.tracking.Tracker`, a module, or ``(module,
        optimizer)`` -- the trainer's state is saved with the cut (at ``path``, default
        ``<state_dir>/<origin>.cuts/<model>/<cut>.pt``, with ``extra`` beside it) after
        every publish so far is acknowledged, so that :meth:`restore` can bring the
        trainer back to it (see :mod:`ekko.sdk.trainer_state`).
        """
        if state is None:
            if path is not None or extra is not None:
                raise UsageError("path= and extra= need state= (what to save with the cut)")
            return self._call(self._core.cut(model, name))
        if isinstance(state, Tracker):
            if state.model != model:
                raise UsageError(f"the tracker publishes {state.model!r}, not {model!r}")
            return state.cut(name, path=path, extra=extra).name
        return cut_with_state(self, model, state, name, path, extra).name

    def restore(self, model: str, cut: str | RolledBack, state: Any) -> Any:
        """Load the trainer state saved with ``cut`` into ``state`` (a Tracker, a module or
        ``(module, optimizer)``); returns the :class:`~ekko.sdk.trainer_state.TrainerCut`.
        A Tracker also resets what it will publish next (see :meth:`Tracker.restore`)."""
        if isinstance(state, Tracker):
            if state.model != model:
                raise UsageError(f"the tracker publishes {state.model!r}, not {model!r}")
            return state.restore(cut)
        return restore_state(self, model, cut, state)

    # -- rollbacks (ekko.sdk.rollback_watch) --------------------------------------------
    def on_rollback(self, fn: Any) -> None:
        """Call ``fn(event: RollbackEvent)`` on the training thread for each rollback,
        where :class:`RolledBack` would otherwise be raised (the next publish, cut or
        :meth:`check_rollbacks`)."""
        if not callable(fn):
            raise UsageError("on_rollback takes a callable")
        self._core.rollbacks.callbacks.append(fn)

    def check_rollbacks(self, model: str | None = None, poll: bool = False) -> list[RollbackEvent]:
        """Hand rollbacks learnt so far (of ``model``, or any) to the training loop: raise
        :class:`RolledBack` for the oldest, or, with callbacks registered, call them for
        each and return the events.  ``poll`` asks a replica first (needs ``model``)."""
        if poll:
            if model is None:
                raise UsageError("check_rollbacks(poll=True) needs a model")
            self._call(self._core.poll_rollbacks(model))
        return self._deliver_rollbacks(model)

    def watch_rollbacks(self, model: str, interval: float = DEFAULT_WATCH_INTERVAL_S) -> None:
        """Poll a replica for ``model``'s rollbacks every ``interval`` seconds in the
        background, for a loop that is not publishing (events wait for
        :meth:`check_rollbacks` or the next publish).  Runs until the publisher closes."""
        if not (isinstance(interval, (int, float)) and interval > 0):
            raise UsageError("interval must be > 0 seconds")

        async def watch() -> None:
            while True:
                try:
                    await self._core.poll_rollbacks(model)
                except Exception as e:  # keep watching through a replica's hiccup
                    log.debug("rollback watch of %s: %s", model, e)
                await asyncio.sleep(interval)
        self._submit(watch())

    def _deliver_rollbacks(self, model: str | None) -> list[RollbackEvent]:
        watch = self._core.rollbacks
        if not watch.pending(model):
            return []
        if not watch.callbacks:
            event = watch.take(model)
            if event is not None:
                raise RolledBack(event)
            return []
        out = []
        while (event := watch.take(model)) is not None:
            for fn in list(watch.callbacks):
                fn(event)
            out.append(event)
        return out

    def publish(self, model: str, table: str, ids: Any, values: Any, impact: Any = None) -> PublishAck:
        """See :meth:`AsyncPublisher.publish`."""
        return self.publish_many(model, {table: (ids, values, impact)})

    def publish_many(self, model: str, tables: Mapping[str, Any]) -> PublishAck:
        """See :meth:`AsyncPublisher.publish_many`.  Raises :class:`RolledBack` (before
        sending, or after the acknowledgement) when ``model`` was rolled back."""
        ack = self.publish_async_many(model, tables).result()
        try:
            self._deliver_rollbacks(model)
        except RolledBack as e:
            e.ack = ack   # the rows are in: the caller can still account for them
            raise
        return ack

    def publish_async(self, model: str, table: str, ids: Any, values: Any,
                      impact: Any = None) -> "concurrent.futures.Future[PublishAck]":
        """Validate and copy now (bad input raises here), send in the background.

        Publishes of one model are sent in call order.
        """
        return self.publish_async_many(model, {table: (ids, values, impact)})

    def publish_async_many(self, model: str, tables: Mapping[str, Any]) -> "concurrent.futures.Future[PublishAck]":
        self._deliver_rollbacks(model)
        prepared = self._core.prepare(model, tables)
        return self._submit(self._core.publish_prepared(prepared))

    def flush(self) -> None:
        """See :meth:`AsyncPublisher.flush`."""
        self._call(self._core.flush())

    def register_module(self, module: torch.nn.Module, model: str, traffic_share: float = 1.0) -> ModelSpec:
        """Register a model built from a module's tables (see :func:`ekko.sdk.tracking.spec_from_module`).

        Every ``nn.Embedding``/``nn.EmbeddingBag`` becomes an embedding table; every
        other parameter a dense table of :data:`~ekko.sdk.tracking.DENSE_CHUNK`-element rows.
        """
        spec = spec_from_module(module, model, traffic_share)
        self.register(spec)
        return spec

    def track(self, module: torch.nn.Module, model: str, **kwargs: Any) -> Tracker:
        """Register ``module`` as ``model`` and return a :class:`ekko.sdk.tracking.Tracker`
        whose ``publish()`` sends the rows changed since the last one."""
        return Tracker(module, model, self, **kwargs)
