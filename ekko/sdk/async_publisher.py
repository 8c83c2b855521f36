"""The asyncio publisher core, :class:`AsyncPublisher`: sends model updates from a
training job to ekko replicas.

One :class:`aiohttp.ClientSession` (keep-alive) to a list of replica endpoints
(:class:`ekko.sdk.transport.ReplicaTransport`).  It versions rows with the sans-IO
:class:`ekko.core.chain.PublisherChain`, encodes ``PUBLISH`` frames
(:func:`ekko.core.codec.encode_frame`, HMAC-signed when a key is given) and POSTs them
to ``/v1/publish`` (see ``docs/http-api.md``).  The synchronous facade for training
loops is :class:`ekko.sdk.publisher.Publisher`.

Delivery rules, because replicas advance per-shard knowledge along each
publisher's *chain* (:mod:`ekko.core.chain`):

* One publish call is one frame.  Its rows get their versions once; a frame is
  retried with the *same* bytes (idempotent: a replica that already applied it
  changes nothing) with exponential backoff, failing over across the endpoints on
  connection errors, timeouts, 5xx and 429 (honouring ``Retry-After``, plus up to
  :data:`~ekko.sdk.transport.RETRY_AFTER_JITTER` of it at random), until a
  replica answers 200 or the call's deadline passes.
* Only a 200 makes the chain move on (:meth:`PublisherChain.acked`).  A frame that
  missed its deadline is *kept* and re-sent first by the next publish of that
  model, so a shard's chain never skips a frame that some replica may hold.
* Publishes of one model are serialized (chains are ordered); different models
  proceed concurrently.
* Counters must keep increasing across restarts, and a frame that may have reached
  a replica must not be forgotten by a crash.  So the publisher persists, in
  ``state_dir`` (:class:`ekko.sdk.state.PublisherState`), records in
  ``<origin>.pending.0``/``.1``: the frames not yet acknowledged (msgpack bodies) and
  :meth:`PublisherChain.state` (the clock floor and acknowledged chain heads).  A record
  is written and fdatasync'ed *before* a frame is first sent, and rewritten without the
  frame, unsynced, once it is acknowledged: two slot files written in turn with a CRC
  per record, so a torn write leaves the previous record whole, and the durable record
  that a lost unsynced one leaves behind still holds a floor at or above every counter
  sent.  On start the newest record is restored; pending frames go out first.  A lock
  file refuses a second live publisher with the same origin and state directory.

A request that the replica refuses for good (400, 409, 413: the same bytes can
never succeed) raises :class:`~ekko.core.errors.RemoteError` and drops the frame; a 401
(wrong cluster key) raises :class:`~ekko.sdk.ack.KeyRejected` and keeps it, since
restarting with the right key re-signs it.  When no endpoint has ever answered and every
one refuses connections for :data:`~ekko.sdk.transport.UNREACHABLE_GIVE_UP_S`, a call
raises :class:`~ekko.sdk.ack.PublishError` then instead of at its deadline (wrong
endpoints); once a replica has answered, refused connections are retried until the
deadline (a replica restarting).
A 404 for an unknown model makes the publisher register the model at that
replica (the catalog may not have reached it yet) and retry.

A hashed table (``TableSpec(keys="int64")``) is published by key: the ids given are
64-bit keys, which :class:`ekko.core.hashed_slots.HashedSlots` turns into slots (evicting
by the table's policy) just before the frame is versioned, in send order, and each row
carries its key (:mod:`ekko.core.hashed`).  ``PublishAck.versions`` stay in the order of
the keys given.  The first publish to a hashed table resumes the assignment from the
keys a replica holds; a module that assigns its own slots
(:class:`ekko.sdk.hashed_embedding.HashedEmbedding`) passes them as
:class:`~ekko.sdk.prepare.SlotKeys` instead.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import msgpack
import numpy as np

from ekko.core.chain import PendingFrame, PublisherChain
from ekko.core.codec import COMPRESS_MIN_SAVING, Keyring, MsgType, array_from_wire, encode_frame
from ekko.core.errors import EkkoError, RemoteError, UsageError
from ekko.core.hashed import with_keys
from ekko.core.hashed_slots import HashedSlots
from ekko.core.spec import ModelSpec, TableSpec
from ekko.core.version import origin_id
from ekko.sdk.ack import KeyRejected, PublishAck, PublishError, shadowed_of
from ekko.sdk.endpoints import load_key, parse_endpoints
from ekko.sdk.prepare import PreparedPublish, prepare_publish
from ekko.sdk.rollback_watch import WATCH_REQUEST_TIMEOUT_S, RollbackEvent, RollbackWatch, state_file
from ekko.sdk.state import PublisherState, default_state_dir
from ekko.sdk.trainer_state import CutStateIndex
from ekko.sdk.transport import ReplicaTransport

# One logger for the whole publisher (its log lines have always come from this name).
log = logging.getLogger("ekko.sdk.publisher")

#: seconds one publish (or register) call may take, retries included, by default.
DEFAULT_TIMEOUT_S = 30.0


class AsyncPublisher:
    """The asyncio publisher core.

    Args:
        endpoints: replica addresses, ``"host:port"`` or ``"http://host:port"``
            (a list, or one comma-separated string); the first is tried first,
            the others on failure.
        origin: this publisher's name; its small id is
            :func:`ekko.core.version.origin_id` of it.  Give every concurrently running
            trainer its own origin.
        key: cluster key (bytes/str, or a :class:`~ekko.core.codec.Keyring`) to sign frames,
            or a keyring file as a :class:`pathlib.Path` (``ekko keys``; frames are
            signed with its primary key, e.g. this publisher's own publisher key).
        state_dir: where counters and unacknowledged frames persist; default
            ``$EKKO_STATE_DIR`` or ``~/.cache/ekko/publishers``.
        timeout: seconds a publish/register call may take, retries included.
        durable: fdatasync the state records.  With it, each publish waits for
            one synced write (the frame, before it is sent: 0.3-3 ms on this
            machine's virtual disk); the unsynced write after the acknowledgement
            runs in the background, ordered before the next one.  Without it a
            record survives a crash of the process but maybe not of the machine.

    Use it from one event loop; ``async with`` closes it.

    Example::

        async with AsyncPublisher(["127.0.0.1:7070", "127.0.0.1:7071"], origin="trainer-0") as pub:
            await pub.register(spec)
            ack = await pub.publish("ranker", "user_emb", ids, values)
            print(ack.versions["user_emb"], ack.endpoint)
    """

    def __init__(self, endpoints: str | Sequence[str], origin: str | int = "trainer-0",
                 key: bytes | str | Keyring | None = None, state_dir: str | Path | None = None,
                 timeout: float = DEFAULT_TIMEOUT_S, durable: bool = True) -> None:
        if not (isinstance(timeout, (int, float)) and timeout > 0):
            raise UsageError("timeout must be > 0 seconds")
        self.endpoints = parse_endpoints(endpoints)
        self.origin_name = str(origin)
        self.origin = origin_id(origin)
        self.keyring = load_key(key)
        self.timeout = float(timeout)
        self._state = PublisherState(state_dir if state_dir is not None else default_state_dir(),
                                     self.origin_name, durable)
        self._save_error: BaseException | None = None
        try:
            saved, pending = self._state.load()
            # The clock floor and pending frame are kept, the chain heads are not: a state
            # file cannot vouch for them (a backup, another cluster, or no file at all).
            # The first frame to each shard tells replicas that earlier updates of this
            # origin may exist, so they never take updates they lack as received; they
            # close that gap within a probe round (PublisherChain.restart).
            self.chain = PublisherChain.restart(saved, self.origin)
        except BaseException:
            self._state.close()
            raise
        # Counters reserved for a frame that may have reached a replica must never be
        # handed out again, even when the chain state was written before that frame.
        for f in pending.values():
            self.chain.clock.observe(f.last_counter)
        self._pending: dict[str, PendingFrame] = pending
        # Rollbacks this publisher knows of and trainer state saved with cuts (ekko.sdk.rollback_watch,
        # ekko.sdk.trainer_state).
        self.cut_states = CutStateIndex(self._state.dir, self.origin_name, durable)
        try:
            self.rollbacks = RollbackWatch(state_file(self._state.dir, self.origin_name), durable,
                                           lookup_state=self.cut_states.path_of)
        except BaseException:
            self._state.close()
            raise
        self._specs: dict[str, ModelSpec] = {}
        # Slot assignment of the hashed tables published by key, per (model, table): made
        # on the I/O loop, under the model's lock, in send order.
        self._slots: dict[tuple[str, str], HashedSlots] = {}
        # Who assigns each hashed table's slots through this publisher: "keys" (it does) or
        # "slots" (a module does, SlotKeys).  Both at once would overwrite each other's keys.
        self._assigner: dict[tuple[str, str], str] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._transport = ReplicaTransport(self.endpoints, self.keyring)
        self._io = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ekko-state")
        self._closed = False

    # -- lifecycle ----------------------------------------------------------------------
    async def __aenter__(self) -> "AsyncPublisher":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the HTTP session and release the state lock.  Unacknowledged frames stay
        on disk and go out first when a publisher with this origin starts again."""
        if self._closed:
            return
        self._closed = True
        await self._transport.close()
        self._io.shutdown(wait=True)
        self._state.close()

    def _lock(self, model: str) -> asyncio.Lock:
        lk = self._locks.get(model)
        if lk is None:
            lk = self._locks[model] = asyncio.Lock()
        return lk

    # -- introspection ------------------------------------------------------------------
    def spec(self, model: str) -> ModelSpec | None:
        """The spec registered through this publisher, or None."""
        return self._specs.get(model)

    @property
    def pending_models(self) -> list[str]:
        """Models with a frame awaiting acknowledgement (it goes out with their next publish)."""
        return sorted(self._pending)

    # -- API ----------------------------------------------------------------------------
    async def register(self, spec: ModelSpec) -> bool:
        """Register a model with the cluster (idempotent); True when it was new there.

        A different spec under an existing name raises :class:`RemoteError` (409).
        """
        if not isinstance(spec, ModelSpec):
            raise UsageError("register takes a ModelSpec")
        data = encode_frame(MsgType.REGISTER_MODEL, {"spec": spec.to_dict()}, self.keyring)
        deadline = asyncio.get_running_loop().time() + self.timeout
        answer, _ = await self._post("/v1/models", data, deadline, what=f"register {spec.name}")
        self._specs[spec.name] = spec
        if not self.rollbacks.primed(spec.name):
            # Rollbacks that happened before this publisher first met the model are old news.
            view = await self._get_json(f"/v1/models/{spec.name}/rollbacks")
            if view is not None:
                self.rollbacks.prime(spec.name, [e.key for e in RollbackWatch.events_of_view(view[0], view[1])])
        return bool(answer.get("created", False))

    async def cut(self, model: str, name: str | None = None) -> str:
        """Take a named cut (restore point) of ``model`` -- e.g. after an offline
        validation passed -- at the replica this publisher writes to; the cut reaches
        every replica.  The cut covers every update this publisher had acknowledged
        (pending publishes are flushed first, and the replica waits until its knowledge
        reaches them).  Returns the cut's name (for ``Client.rollback``/``ekko rollback``)."""
        body: dict[str, Any] = {"model": model} if name is None else {"model": model, "name": name}
        # Everything this publisher had acknowledged must be in the cut: the replica waits
        # (up to our timeout) until its knowledge reaches our chain heads of the model.
        deadline = asyncio.get_running_loop().time() + self.timeout
        async with self._lock(model):   # publishes of the model started before this go first
            await self._flush_model(model, deadline)
            heads = [[t, s, c] for (m, t, s), c in sorted(self.chain.heads.items()) if m == model]
        if heads:
            body["covers"] = {"origin": self.origin, "heads": heads}
            body["wait_s"] = 0.8 * self.timeout   # answered before our own deadline
        answer, _ = await self._post("/v1/cuts", encode_frame(MsgType.CUT, body, self.keyring), deadline,
                                     what=f"cut {model}")
        return str(answer["name"])

    async def publish(self, model: str, table: str, ids: Any, values: Any, impact: Any = None) -> PublishAck:
        """Publish rows of one table.

        Args:
            model: a model registered through this publisher.
            table: its table.
            ids: unique int row ids (tensor, array or list).
            values: ``(len(ids), dim)`` floats on any device; converted to the table dtype.
            impact: optional per-row magnitude of the change (>= 0), for the scheduler.

        Raises:
            UsageError: bad input (nothing was sent or versioned).
            PublishError: not acknowledged before the deadline (the frame is kept).
            RemoteError: the replica refused the frame for good.
        """
        return await self.publish_many(model, {table: (ids, values, impact)})

    async def publish_many(self, model: str, tables: Mapping[str, Any]) -> PublishAck:
        """Publish rows of several tables in one frame: ``{table: (ids, values[, impact])}``."""
        return await self.publish_prepared(self.prepare(model, tables))

    def prepare(self, model: str, tables: Mapping[str, Any]) -> PreparedPublish:
        """Validate and snapshot a publish (no I/O); see :func:`prepare_publish`."""
        spec = self._specs.get(model)
        if spec is None:
            raise UsageError(f"model {model!r} is not registered through this publisher: call register() first")
        p = prepare_publish(spec, tables)
        for name in p.tables:
            if spec.table(name).hashed:
                mode = "keys" if name in p.by_key else "slots"
                if self._assigner.setdefault((model, name), mode) != mode:
                    raise UsageError(f"{model}/{name}: its slots are assigned by "
                                     f"{'this publisher (by key)' if mode == 'slots' else 'a module (SlotKeys)'}; "
                                     "one assigner per hashed table, or they overwrite each other's keys")
        return p

    def slots(self, model: str, table: str) -> HashedSlots:
        """The slot assignment of a hashed table this publisher has published by key."""
        try:
            return self._slots[(model, table)]
        except KeyError:
            raise UsageError(f"{model}/{table}: no slots assigned by this publisher (not a hashed table "
                             "published by key through it)") from None

    async def _assign_slots(self, spec: ModelSpec, p: PreparedPublish, deadline: float) -> PreparedPublish:
        """The prepared publish with its hashed tables' keys turned into slots and each row
        carrying its key; a table's first assignment resumes from a replica's keys.  Runs
        under the model's lock after its pending frame is acknowledged (so the keys that
        frame wrote are in the listing)."""
        if not p.by_key:
            return p
        out = dict(p.tables)
        for name in sorted(p.by_key):
            t = spec.table(name)
            slots = self._slots.get((spec.name, name))
            if slots is None:
                slots = self._slots[(spec.name, name)] = await self._fetch_slots(spec, t, deadline)
            keys, vals, imp = out[name]
            out[name] = (slots.assign(keys), with_keys(vals, keys, t), imp)
        return PreparedPublish(p.model, out, p.rows)

    async def _resync_slots(self, model: str, endpoint: str | None) -> None:
        """After a rollback of ``model``: its hashed tables' slots hold the cut's keys again,
        so the assignment is read afresh (else this publisher would think the keys it
        published since the cut still hold their slots, and evict by a stale ranking)."""
        spec = self._specs.get(model)
        if spec is None:
            return
        deadline = asyncio.get_running_loop().time() + self.timeout
        for t in spec.tables:
            if (model, t.name) in self._slots:
                try:
                    fresh = await self._fetch_slots(spec, t, deadline, endpoint)
                except PublishError as e:   # the publish that told us stands; keep the old view
                    log.warning("after a rollback of %s: %s; the slots of %s stay as this publisher "
                                "assigned them", model, e, t.name)
                    continue
                self._slots[(model, t.name)] = fresh

    async def _fetch_slots(self, spec: ModelSpec, t: TableSpec, deadline: float,
                           endpoint: str | None = None) -> HashedSlots:
        slots = HashedSlots(t)
        got = await self._transport.get_json(f"/v1/models/{spec.name}/tables/{t.name}/keys",
                                             max(1.0, deadline - asyncio.get_running_loop().time()), endpoint,
                                             raw=True)
        if got is None:
            raise PublishError(f"no replica listed the keys of hashed table {spec.name}/{t.name}: a publisher "
                               "must resume their slots before it publishes", spec.name, 0, None, pending=False)
        try:
            body = msgpack.unpackb(got[0], raw=False)
            n = int(body["n"])
            held = array_from_wire(body["slots"], np.int64, n, "slots")
            keys = array_from_wire(body["keys"], np.int64, n, "keys")
        except (ValueError, KeyError, TypeError, EkkoError, msgpack.UnpackException) as e:
            raise PublishError(f"bad key listing of {spec.name}/{t.name} from {got[1]}: {e}", spec.name, 0, None,
                               pending=False) from None
        slots.resume(held, keys)
        if n:
            log.info("publisher %s resumed %d keys of hashed table %s/%s", self.origin_name, n, spec.name, t.name)
        return slots

    async def publish_prepared(self, p: PreparedPublish) -> PublishAck:
        """Send a :class:`PreparedPublish` (after any frame still pending for its model)."""
        spec = self._specs[p.model]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        async with self._lock(p.model):
            try:
                await self._flush_model(p.model, deadline)
            except PublishError as e:
                # The earlier frame stays pending; *these* rows were neither sent nor kept.
                raise PublishError(f"{e} -- this publish was not sent: an earlier frame of model "
                                   f"{p.model!r} must be acknowledged first", p.model, e.attempts, e.status,
                                   pending=False) from e
            p = await self._assign_slots(spec, p, deadline)
            values = {t: (ids, vals) for t, (ids, vals, _) in p.tables.items()}
            impact = {t: imp for t, (_, _, imp) in p.tables.items() if imp is not None}
            frame = self.chain.frame(spec, values, now_ms=time.time() * 1000.0, impact=impact or None)
            self._pending[p.model] = frame
            # Durable before it leaves: once any replica may hold it, a restart must re-send it.
            await self._save_pending()
            answer, endpoint = await self._send_frame(frame, deadline)
            versions = self.chain.versions_of(frame)
            shadowed = shadowed_of(answer)
            if shadowed:
                log.warning("publish of %s: %d row(s) already held at greater versions did not apply "
                            "(see PublishAck.shadowed)", p.model, sum(len(i) for i, _ in shadowed.values()))
            await self._note_rollbacks(p.model, answer, endpoint)
            return PublishAck(p.model, int(answer.get("rows", frame.rows)), int(answer.get("applied", 0)),
                              versions, int(answer.get("max_counter", frame.last_counter)), endpoint, shadowed)

    async def flush(self) -> None:
        """Re-send every pending frame now (each model's next publish would do it anyway)."""
        deadline = asyncio.get_running_loop().time() + self.timeout
        for model in list(self._pending):
            async with self._lock(model):
                await self._flush_model(model, deadline)

    async def poll_rollbacks(self, model: str) -> list[RollbackEvent]:
        """Ask a replica for ``model``'s rollbacks now; returns the new ones (also queued for
        the training loop: see :meth:`Publisher.check_rollbacks`).  [] when none answers."""
        view = await self._get_json(f"/v1/models/{model}/rollbacks")
        if view is None:
            return []
        events = RollbackWatch.events_of_view(view[0], view[1])
        if not self.rollbacks.primed(model):
            self.rollbacks.prime(model, [e.key for e in events])
            return []
        new = [e for e in events if self.rollbacks.add(e)]
        if new:
            await self._resync_slots(model, view[1])
        return new

    # -- internals ------------------------------------------------------------------------
    async def _note_rollbacks(self, model: str, answer: dict[str, Any], endpoint: str) -> None:
        """Compare the rollbacks an acknowledgement names with the ones we know (news is queued)."""
        keys = RollbackWatch.keys_of_ack(answer)
        if not keys and self.rollbacks.primed(model):
            return
        if keys is None:
            log.warning("ignoring a malformed rollbacks field from %s", endpoint)
            return
        as_keys = [f"{rid}@{cut}" for rid, cut in keys]
        if not self.rollbacks.primed(model):
            self.rollbacks.prime(model, as_keys)
            return
        new = set(self.rollbacks.unknown(model, as_keys))
        if not new:
            return
        # Details (the incident) from the replica that told us; the ack alone suffices.
        view = await self._get_json(f"/v1/models/{model}/rollbacks", endpoint)
        detailed = {e.key: e for e in RollbackWatch.events_of_view(view[0], view[1])} if view else {}
        for rid, cut in keys:
            key = f"{rid}@{cut}"
            if key in new:
                self.rollbacks.add(detailed.get(key) or RollbackEvent(model, cut, rid, None, 0, endpoint))
        await self._resync_slots(model, endpoint)

    async def _get_json(self, path: str, endpoint: str | None = None) -> tuple[Any, str] | None:
        """GET ``path`` from ``endpoint`` (else the endpoints in turn); (answer, endpoint) or None."""
        return await self._transport.get_json(path, WATCH_REQUEST_TIMEOUT_S, endpoint)

    async def _flush_model(self, model: str, deadline: float) -> None:
        if model in self._pending:
            await self._send_frame(self._pending[model], deadline)

    async def _save_pending(self) -> None:
        if self._save_error is not None:
            raise EkkoError(f"cannot persist publisher state in {self._state.dir}: {self._save_error}")
        frames, chain = list(self._pending.values()), self.chain.state()
        # The state executor has one thread: this write runs after every earlier one.
        await asyncio.get_running_loop().run_in_executor(self._io, self._state.save_pending, frames, chain)

    def _save_acked(self) -> None:
        """Record the acknowledgement (the frame leaves the record), in the background
        and unsynced: one ``pwrite``, no fsync on the path of the next publish.

        Not awaited: the publish returns at once.  Safe because (1) if this record is
        lost, the durable one before it still holds the frame -- a crash re-sends it,
        which changes nothing -- and a clock floor covering it, and (2) the one-thread
        executor runs writes in order, so the next frame's record (which its publish
        awaits before sending) lands after this one.
        """
        state, frames = self.chain.state(), list(self._pending.values())

        def write() -> None:
            try:
                self._state.save_pending(frames, state)
            except BaseException as e:  # surfaced by the next publish
                log.error("cannot persist publisher state: %s", e)
                self._save_error = e
        self._io.submit(write)

    async def _send_frame(self, frame: PendingFrame, deadline: float) -> tuple[dict[str, Any], str]:
        # Rows of float values gain ~1.1x from zstd: not worth a compress here and a
        # decompress at the replica (COMPRESS_MIN_SAVING).
        data = encode_frame(MsgType.PUBLISH, frame.body, self.keyring, min_saving=COMPRESS_MIN_SAVING)
        spec = self._specs.get(frame.model)
        try:
            answer, endpoint = await self._post("/v1/publish", data, deadline, what=f"publish to {frame.model}",
                                                model=frame.model, spec=spec)
        except RemoteError as e:
            if not isinstance(e, KeyRejected):
                # The same bytes can never succeed; keeping them would wedge the model.
                self._pending.pop(frame.model, None)
                await self._save_pending()
            raise
        if self._pending.get(frame.model) is frame:
            del self._pending[frame.model]
        self.chain.acked(frame)
        self._save_acked()
        return answer, endpoint

    async def _post(self, path: str, data: bytes, deadline: float, what: str, model: str | None = None,
                    spec: ModelSpec | None = None) -> tuple[dict[str, Any], str]:
        """POST with retries and failover until a 200 or the deadline (see
        :meth:`ekko.sdk.transport.ReplicaTransport.post`; a frame of ``model`` still pending
        is kept)."""
        return await self._transport.post(path, data, deadline, what, self.timeout, model, spec,
                                          kept=lambda: model in self._pending)
