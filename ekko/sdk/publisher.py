"""Publisher SDK: send model updates from a training job to ekko replicas.

Two layers:

* :class:`AsyncPublisher` -- the asyncio core.  One :class:`aiohttp.ClientSession`
  (keep-alive) to a list of replica endpoints.  It versions rows with the sans-IO
  :class:`ekko.core.chain.PublisherChain`, encodes ``PUBLISH`` frames
  (:func:`ekko.core.codec.encode_frame`, HMAC-signed when a key is given) and POSTs them
  to ``/v1/publish`` (see ``docs/http-api.md``).
* :class:`Publisher` -- the synchronous facade for training loops: it runs the core
  on a background I/O thread with its own event loop, and adds module helpers
  (:meth:`Publisher.register_module`, :meth:`Publisher.track`).

Delivery rules, because replicas advance per-shard knowledge along each
publisher's *chain* (:mod:`ekko.core.chain`):

* One publish call is one frame.  Its rows get their versions once; a frame is
  retried with the *same* bytes (idempotent: a replica that already applied it
  changes nothing) with exponential backoff, failing over across the endpoints on
  connection errors, timeouts, 5xx and 429 (honouring ``Retry-After``, plus up to
  :data:`RETRY_AFTER_JITTER` of it at random), until a
  replica answers 200 or the call's deadline passes.
* Only a 200 makes the chain move on (:meth:`PublisherChain.acked`).  A frame that
  missed its deadline is *kept* and re-sent first by the next publish of that
  model, so a shard's chain never skips a frame that some replica may hold.
* Publishes of one model are serialized (chains are ordered); different models
  proceed concurrently.
* Counters must keep increasing across restarts, and a frame that may have reached
  a replica must not be forgotten by a crash.  So the publisher persists, in
  ``state_dir``: ``<origin>.json`` -- :meth:`PublisherChain.state` (clock floor and
  acknowledged chain heads), written after every acknowledgement; and
  ``<origin>.pending`` -- the frames not yet acknowledged (msgpack bodies),
  written *before* a frame is first sent and removed once it is acknowledged.
  Both are written atomically (temp file, fsync, ``os.replace``, directory fsync).
  On start both are restored; pending frames go out first.  A lock file refuses a
  second live publisher with the same origin and state directory.

A request that the replica refuses for good (400, 409, 413: the same bytes can
never succeed) raises :class:`~ekko.core.errors.RemoteError` and drops the frame; a 401
(wrong cluster key) keeps it, since restarting with the right key re-signs it.
A 404 for an unknown model makes the publisher register the model at that
replica (the catalog may not have reached it yet) and retry.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import email.utils
import json
import logging
import os
import random
import re
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Iterable, Mapping, Sequence

import aiohttp
import msgpack
import numpy as np
import torch

from ekko.core.chain import PendingFrame, PublisherChain
from ekko.core.codec import MAX_FRAME_BYTES, Keyring, MsgType, encode_frame
from ekko.core.config import MAX_PUBLISH_ROWS
from ekko.core.delta import WIRE_DTYPES
from ekko.core.errors import EkkoError, RemoteError, UsageError
from ekko.sdk.rollback_watch import (DEFAULT_WATCH_INTERVAL_S, WATCH_REQUEST_TIMEOUT_S, RollbackEvent, RollbackWatch,
                                 RolledBack, state_file)
from ekko.core.spec import ModelSpec, TableSpec
from ekko.core.store import TORCH_DTYPES, to_wire_values
from ekko.core.version import origin_id

if TYPE_CHECKING:  # pragma: no cover
    from ekko.sdk.tracking import Tracker

log = logging.getLogger("ekko.sdk.publisher")

#: elements per row of a dense-parameter table: a flattened parameter is cut into
#: chunks of this many elements, each one versioned row (small enough that a
#: partly-changed parameter resends little, large enough that per-row overhead --
#: 8-byte id, 8-byte version -- stays under 1% of float32 payload).
DENSE_CHUNK = 1024
#: seconds one publish (or register) call may take, retries included, by default.
DEFAULT_TIMEOUT_S = 30.0
#: seconds one HTTP attempt may take before we try the next endpoint.
REQUEST_TIMEOUT_S = 10.0
#: seconds to open a TCP connection; a replica that does not answer SYN is down.
CONNECT_TIMEOUT_S = 2.0
#: first retry delay; doubles per failed attempt up to BACKOFF_MAX_S (with jitter).
BACKOFF_INITIAL_S = 0.05
BACKOFF_MAX_S = 2.0
#: longest Retry-After we honour (a confused server must not park a trainer for hours).
MAX_RETRY_AFTER_S = 30.0
#: a Retry-After wait is stretched by a random factor in [1, 1 + this] (spreads retries).
RETRY_AFTER_JITTER = 0.25
#: bytes of frame a publish may produce: the wire limit less room for msgpack framing.
MAX_PUBLISH_FRAME_BYTES = MAX_FRAME_BYTES - (1 << 20)
#: per-row bytes besides the values: id (8), version (8), impact (4).
ROW_OVERHEAD_BYTES = 20
#: environment variable naming the state directory.
STATE_DIR_ENV = "EKKO_STATE_DIR"
#: default state directory when neither the argument nor the environment gives one.
DEFAULT_STATE_DIR = Path("~/.cache/ekko/publishers")
#: connections kept per replica (publishes of different models may run at once).
CONNECTIONS_PER_HOST = 4
#: statuses after which nothing was applied and the same frame may go elsewhere.
_RETRY_CLEAN = {429, 503}
#: statuses that leave us unsure whether the replica applied the frame.
_RETRY_AMBIGUOUS = {500, 502, 504}
_SAFE_NAME = re.compile(r"[^A-Za-z0-9_.\-]")


@dataclass(frozen=True, slots=True)
class PublishAck:
    """A replica's acknowledgement of one publish.

    Attributes:
        model: the model.
        rows: rows in the frame.
        applied: rows that took the new version on the acknowledging replica (a
            re-sent frame that replica already had applies 0).
        versions: per table, the packed versions assigned to the rows, in the order
            the rows were given (see :mod:`ekko.core.version`).
        max_counter: the greatest counter the replica reported for the frame.
        endpoint: the replica that acknowledged (``http://host:port``).
        shadowed: per table, ``(ids, versions)`` of rows the replica already held at a
            *greater* version, so this publish's values for them did not apply and will
            not (another publisher's newer update, or a clock that ran ahead); at most
            ``ekko.server.daemon.MAX_SHADOWED_LISTED`` rows per table are listed.  Empty when
            every row applied or was a re-send.

    Example:
        >>> import numpy as np
        >>> a = PublishAck("m", 2, 2, {"t": np.array([65537, 131073])}, 2, "http://127.0.0.1:7070")
        >>> a.rows, a.versions["t"].tolist()
        (2, [65537, 131073])
    """

    model: str
    rows: int
    applied: int
    versions: dict[str, np.ndarray]
    max_counter: int
    endpoint: str
    shadowed: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)


def _shadowed_of(answer: dict[str, Any]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The ``shadowed`` part of a publish answer as arrays (absent or malformed: none)."""
    raw = answer.get("shadowed")
    if not isinstance(raw, dict):
        return {}
    out = {}
    for table, e in raw.items():
        if isinstance(e, dict) and isinstance(e.get("ids"), list) and isinstance(e.get("by"), list):
            out[str(table)] = (np.asarray(e["ids"], np.int64), np.asarray(e["by"], np.int64))
    return out


class PublishError(EkkoError):
    """A publish was not acknowledged before its deadline.

    Attributes:
        model: the model.
        attempts: HTTP attempts made.
        status: the last HTTP status seen, or None (connection errors, timeouts).
        pending: True when the frame is kept (and persisted) to be re-sent first by
            the next publish of this model -- its rows are not lost.

    Example::

        try:
            pub.publish("ranker", "user_emb", ids, values)
        except PublishError as e:
            if not e.pending:
                raise          # these rows were not sent: publish them again later
    """

    def __init__(self, message: str, model: str, attempts: int, status: int | None, pending: bool) -> None:
        super().__init__(message)
        self.model = model
        self.attempts = attempts
        self.status = status
        self.pending = pending


@dataclass(frozen=True, slots=True)
class PreparedPublish:
    """Validated rows of one publish, converted to wire arrays (owned copies).

    Made on the caller's thread so that the training loop may keep changing its
    tensors while the I/O runs (see :meth:`Publisher.publish_async`).

    Example:
        >>> import torch
        >>> spec = ModelSpec("m", [TableSpec("t", rows=10, dim=2, dtype="float16")])
        >>> p = prepare_publish(spec, {"t": ([3, 1], torch.ones(2, 2, dtype=torch.float64))})
        >>> p.rows, p.tables["t"][1].dtype.name
        (2, 'float16')
    """

    model: str
    tables: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]]
    rows: int


# ---------------------------------------------------------------------------- validation

def _table_items(tables: Mapping[str, Any]) -> Iterable[tuple[str, Any, Any, Any]]:
    if not isinstance(tables, Mapping) or not tables:
        raise UsageError("tables must be a non-empty mapping {table: (ids, values[, impact])}")
    for name, item in tables.items():
        if not isinstance(item, (tuple, list)) or len(item) not in (2, 3):
            raise UsageError(f"{name}: expected (ids, values) or (ids, values, impact)")
        yield name, item[0], item[1], item[2] if len(item) == 3 else None


def _as_ids(ids: Any, t: TableSpec) -> np.ndarray:
    if isinstance(ids, torch.Tensor):
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise UsageError(f"{t.name}: ids must be integers, got a {ids.dtype} tensor")
        arr = ids.detach().to("cpu").numpy()
    else:
        arr = np.asarray(ids)
        if arr.size == 0:
            arr = arr.astype(np.int64)
        elif arr.dtype.kind not in "iu":
            raise UsageError(f"{t.name}: ids must be integers, got {arr.dtype}")
    if arr.ndim != 1:
        raise UsageError(f"{t.name}: ids must be 1-D, got shape {tuple(arr.shape)}")
    if arr.size:
        # Check the range before the cast: a uint64 above 2**63 would wrap to negative.
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= t.rows:
            raise UsageError(f"{t.name}: row id out of range 0..{t.rows - 1} (got {lo}..{hi})")
    out = np.array(arr, dtype=np.int64, copy=True)
    if out.size > 1 and np.unique(out).size != out.size:
        raise UsageError(f"{t.name}: duplicate row ids in one publish")
    return out


def _as_values(values: Any, t: TableSpec, n: int) -> np.ndarray:
    """Values of any float dtype on any device -> an owned wire array of the table dtype."""
    if isinstance(values, torch.Tensor):
        v = values.detach()
        if not v.is_floating_point():
            raise UsageError(f"{t.name}: values must be floating point, got {v.dtype}")
    else:
        arr = np.asarray(values)
        if arr.dtype.kind != "f" and not (arr.size == 0 and arr.dtype.kind in "iuf"):
            raise UsageError(f"{t.name}: values must be floating point, got {arr.dtype}")
        v = torch.from_numpy(np.ascontiguousarray(arr))
    if tuple(v.shape) != (n, t.dim):
        raise UsageError(f"{t.name}: values must have shape ({n}, {t.dim}), got {tuple(v.shape)}")
    src_ptr = v.data_ptr() if v.device.type == "cpu" else None
    v = v.to(device="cpu", dtype=TORCH_DTYPES[t.dtype]).contiguous()
    if src_ptr is not None and v.numel() and v.data_ptr() == src_ptr:
        v = v.clone()  # own the bytes: the caller may update its tensor while we send
    if v.numel() and not bool(torch.isfinite(v).all()):
        raise UsageError(f"{t.name}: values contain NaN or infinity (after conversion to {t.dtype})")
    out = to_wire_values(v)
    assert out.dtype == WIRE_DTYPES[t.dtype]
    return out


def _as_impact(impact: Any, t: TableSpec, n: int) -> np.ndarray | None:
    if impact is None:
        return None
    if isinstance(impact, torch.Tensor):
        impact = impact.detach().to("cpu", torch.float32).numpy()
    arr = np.array(impact, dtype=np.float32, copy=True)
    if arr.shape != (n,):
        raise UsageError(f"{t.name}: impact must have shape ({n},), got {arr.shape}")
    if n and (not np.isfinite(arr).all() or float(arr.min()) < 0):
        raise UsageError(f"{t.name}: impact must be finite and >= 0")
    return arr


def prepare_publish(spec: ModelSpec, tables: Mapping[str, Any]) -> PreparedPublish:
    """Validate and convert ``{table: (ids, values[, impact])}``; raises :class:`UsageError`.

    Tables with no rows are left out; a publish with no rows at all is an error.
    Nothing is versioned or sent here, so bad input changes nothing.
    """
    out: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]] = {}
    total = 0
    nbytes = 0
    for name, ids, values, impact in _table_items(tables):
        if not spec.has_table(name):
            raise UsageError(f"model {spec.name} has no table {name!r}")
        t = spec.table(name)
        ids_a = _as_ids(ids, t)
        vals = _as_values(values, t, len(ids_a))
        imp = _as_impact(impact, t, len(ids_a))
        if len(ids_a) == 0:
            continue
        out[name] = (ids_a, vals, imp)
        total += len(ids_a)
        nbytes += len(ids_a) * (t.row_bytes + ROW_OVERHEAD_BYTES)
    if total == 0:
        raise UsageError("nothing to publish: no rows given")
    if total > MAX_PUBLISH_ROWS:
        raise UsageError(f"{total} rows in one publish exceed MAX_PUBLISH_ROWS={MAX_PUBLISH_ROWS}; "
                         "publish in smaller batches")
    if nbytes > MAX_PUBLISH_FRAME_BYTES:
        raise UsageError(f"publish of about {nbytes} bytes exceeds MAX_PUBLISH_FRAME_BYTES="
                         f"{MAX_PUBLISH_FRAME_BYTES}; publish in smaller batches")
    return PreparedPublish(spec.name, out, total)


def normalize_endpoint(ep: str) -> str:
    """``host:port`` or ``http://host:port[/]`` -> ``http://host:port``."""
    if not isinstance(ep, str) or not ep.strip():
        raise UsageError(f"bad endpoint {ep!r}")
    ep = ep.strip().rstrip("/")
    if "://" not in ep:
        ep = "http://" + ep
    if not ep.startswith(("http://", "https://")):
        raise UsageError(f"endpoint {ep!r}: only http:// and https:// are supported")
    return ep


def _endpoints(endpoints: str | Sequence[str]) -> list[str]:
    if isinstance(endpoints, str):
        endpoints = [e for e in endpoints.split(",") if e.strip()]
    eps = [normalize_endpoint(e) for e in endpoints]
    if not eps:
        raise UsageError("give at least one endpoint")
    return eps


def _keyring(key: bytes | str | Keyring | os.PathLike | None) -> Keyring | None:
    if key is None or isinstance(key, Keyring):
        return key
    if isinstance(key, os.PathLike):
        # A keyring file (ekko keys): sign with its primary -- a publisher key under an ACL.
        from ekko.core.keyring import load_keyring
        return load_keyring(key)
    return Keyring.single(key)


def _error_text(raw: bytes) -> tuple[str, str]:
    """(message, reason) of an error body in the contract's JSON shape, best effort."""
    try:
        d = json.loads(raw)
        if isinstance(d, dict):
            return str(d.get("error", "")), str(d.get("reason", ""))
    except ValueError:
        pass
    return raw[:200].decode("utf-8", "replace"), ""


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time())
    except (TypeError, ValueError):
        return None


# ---------------------------------------------------------------------------- persistence

def _atomic_write(path: Path, data: bytes, durable: bool = True) -> None:
    """Write ``data`` to ``path`` so that a crash leaves the old or the new file, whole.

    ``durable`` adds fsyncs (file, then directory) so that a machine crash keeps it
    too; without them the rename still survives a crash of the process.
    """
    _atomic_write_with(path, lambda f: f.write(data), durable)


def _atomic_write_with(path: Path, write: Callable[[BinaryIO], Any], durable: bool) -> None:
    """:func:`_atomic_write` of whatever ``write(file)`` writes (e.g. ``torch.save``)."""
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if durable:
        _fsync_dir(path.parent)


def _fsync_dir(d: Path) -> None:
    # The rename is durable only once the directory entry is; not every platform can.
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _frame_record(f: PendingFrame) -> dict[str, Any]:
    return {"model": f.model, "body": f.body, "heads": [[t, s, c] for (t, s), c in sorted(f.heads.items())],
            "first": f.first_counter, "last": f.last_counter, "rows": f.rows}


def _frame_from_record(r: dict[str, Any]) -> PendingFrame:
    return PendingFrame(r["model"], r["body"], {(t, int(s)): int(c) for t, s, c in r["heads"]},
                        int(r["first"]), int(r["last"]), int(r["rows"]))


class PublisherState:
    """The on-disk state of one publisher origin (see the module doc).

    Args:
        directory: where the files live (created if missing).
        origin: the publisher's name; file names derive from it.
        durable: fsync every write (see :func:`_atomic_write`).

    Example:
        >>> import tempfile
        >>> st = PublisherState(tempfile.mkdtemp(), "trainer-0")
        >>> st.load()
        (None, {})
        >>> st.save_chain({"origin": 5, "clock": 9, "heads": []}); st.load()[0]["clock"]
        9
        >>> st.close()
    """

    def __init__(self, directory: str | Path, origin: str, durable: bool = True) -> None:
        self.durable = durable
        self.dir = Path(directory).expanduser()
        self.dir.mkdir(parents=True, exist_ok=True)
        base = _SAFE_NAME.sub("_", str(origin))
        self.chain_path = self.dir / f"{base}.json"
        self.pending_path = self.dir / f"{base}.pending"
        self._lock_fd: int | None = None
        self._lock(self.dir / f"{base}.lock")

    def _lock(self, path: Path) -> None:
        # Two live publishers with one origin would hand out clashing versions and
        # break each other's chains: refuse the second one.
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise UsageError(f"another publisher with this origin is using {path.parent} "
                             f"(lock {path.name}); give each trainer its own origin") from None
        self._lock_fd = fd

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def load(self) -> tuple[dict[str, Any] | None, dict[str, PendingFrame]]:
        state = None
        if self.chain_path.exists():
            try:
                state = json.loads(self.chain_path.read_text())
            except (OSError, ValueError) as e:
                raise UsageError(f"cannot read publisher state {self.chain_path}: {e}") from None
        pending: dict[str, PendingFrame] = {}
        if self.pending_path.exists():
            try:
                raw = msgpack.unpackb(self.pending_path.read_bytes(), raw=False, strict_map_key=False)
                pending = {r["model"]: _frame_from_record(r) for r in raw["frames"]}
            except Exception as e:  # msgpack raises many types; a torn file cannot happen (atomic writes)
                raise UsageError(f"cannot read pending frames {self.pending_path}: {e}") from None
        return state, pending

    def save_chain(self, state: dict[str, Any]) -> None:
        _atomic_write(self.chain_path, json.dumps(state, separators=(",", ":")).encode(), self.durable)

    def save_pending(self, frames: Iterable[PendingFrame]) -> None:
        recs = [_frame_record(f) for f in frames]
        if not recs:
            # No directory fsync: if a machine crash undoes the unlink, the restarted
            # publisher re-sends acknowledged frames, which changes nothing.
            try:
                os.unlink(self.pending_path)
            except FileNotFoundError:
                pass
            return
        _atomic_write(self.pending_path, msgpack.packb({"frames": recs}, use_bin_type=True), self.durable)


def default_state_dir() -> Path:
    return Path(os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR).expanduser()


# ---------------------------------------------------------------------------- async core

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
        durable: fsync the state files.  With it, each publish waits for one
            fsync'd write (the frame, before it is sent: about 10 ms on a
            virtual disk); the write after the acknowledgement runs in the
            background, ordered before the next one.  Without it the files are
            still replaced atomically, which survives a crash of the process but
            maybe not of the machine.

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
        self.endpoints = _endpoints(endpoints)
        self.origin_name = str(origin)
        self.origin = origin_id(origin)
        self.keyring = _keyring(key)
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
        from ekko.sdk.trainer_state import CutStateIndex
        self.cut_states = CutStateIndex(self._state.dir, self.origin_name, durable)
        try:
            self.rollbacks = RollbackWatch(state_file(self._state.dir, self.origin_name), durable,
                                           lookup_state=self.cut_states.path_of)
        except BaseException:
            self._state.close()
            raise
        self._specs: dict[str, ModelSpec] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._current = 0
        self._session: aiohttp.ClientSession | None = None
        self._io = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ekko-state")
        self._rng = random.Random()
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
        if self._session is not None:
            await self._session.close()
        self._io.shutdown(wait=True)
        self._state.close()

    def _http(self) -> aiohttp.ClientSession:
        if self._closed:
            raise UsageError("publisher is closed")
        if self._session is None:
            connector = aiohttp.TCPConnector(limit_per_host=CONNECTIONS_PER_HOST)
            self._session = aiohttp.ClientSession(
                connector=connector, headers={"Content-Type": "application/octet-stream"},
                timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S, connect=CONNECT_TIMEOUT_S))
        return self._session

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
        return prepare_publish(spec, tables)

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
            values = {t: (ids, vals) for t, (ids, vals, _) in p.tables.items()}
            impact = {t: imp for t, (_, _, imp) in p.tables.items() if imp is not None}
            frame = self.chain.frame(spec, values, now_ms=time.time() * 1000.0, impact=impact or None)
            self._pending[p.model] = frame
            # Durable before it leaves: once any replica may hold it, a restart must re-send it.
            await self._save_pending()
            answer, endpoint = await self._send_frame(frame, deadline)
            versions = self.chain.versions_of(frame)
            shadowed = _shadowed_of(answer)
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
        return [e for e in events if self.rollbacks.add(e)]

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

    async def _get_json(self, path: str, endpoint: str | None = None) -> tuple[Any, str] | None:
        """GET ``path`` from ``endpoint`` (else the endpoints in turn); (answer, endpoint) or None."""
        session = self._http()
        eps = [endpoint] if endpoint else self.endpoints[self._current:] + self.endpoints[:self._current]
        for ep in eps:
            try:
                async with session.get(ep + path, timeout=aiohttp.ClientTimeout(total=WATCH_REQUEST_TIMEOUT_S,
                                                                                 connect=CONNECT_TIMEOUT_S)) as r:
                    if r.status == 200:
                        return await r.json(content_type=None), ep
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as e:
                log.debug("GET %s%s: %s", ep, path, e)
        return None

    async def _flush_model(self, model: str, deadline: float) -> None:
        if model in self._pending:
            await self._send_frame(self._pending[model], deadline)

    async def _save_pending(self) -> None:
        if self._save_error is not None:
            raise EkkoError(f"cannot persist publisher state in {self._state.dir}: {self._save_error}")
        frames = list(self._pending.values())
        # The state executor has one thread: this write runs after every earlier one.
        await asyncio.get_running_loop().run_in_executor(self._io, self._state.save_pending, frames)

    def _save_acked(self) -> None:
        """Persist the chain after an acknowledgement, in the background.

        Not awaited: the publish returns at once.  Safe because (1) the frame stays in
        the pending file until this write has stored the chain that covers it -- a
        crash before that re-sends it, which changes nothing -- and (2) the one-thread
        executor runs writes in order, so the next frame's pending write (which its
        publish awaits before sending) lands after this one.
        """
        state, frames = self.chain.state(), list(self._pending.values())

        def write() -> None:
            try:
                self._state.save_chain(state)
                self._state.save_pending(frames)
            except BaseException as e:  # surfaced by the next publish
                log.error("cannot persist publisher state: %s", e)
                self._save_error = e
        self._io.submit(write)

    async def _send_frame(self, frame: PendingFrame, deadline: float) -> tuple[dict[str, Any], str]:
        data = encode_frame(MsgType.PUBLISH, frame.body, self.keyring)
        spec = self._specs.get(frame.model)
        try:
            answer, endpoint = await self._post("/v1/publish", data, deadline, what=f"publish to {frame.model}",
                                                model=frame.model, spec=spec)
        except RemoteError as e:
            if e.status != 401 and not isinstance(e, _Kept):
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
        """POST with retries and failover until a 200 or the deadline.

        Returns the JSON answer and the endpoint.  Raises :class:`PublishError` at the
        deadline, :class:`RemoteError` for a definitive refusal.
        """
        loop = asyncio.get_running_loop()
        session = self._http()
        attempts = 0
        last_status: int | None = None
        last_error = "no attempt made"
        n = len(self.endpoints)
        i = self._current
        registered_at: set[str] = set()
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            ep = self.endpoints[i % n]
            attempts += 1
            retry_after = None
            try:
                tmo = aiohttp.ClientTimeout(total=min(REQUEST_TIMEOUT_S, remaining),
                                            connect=min(CONNECT_TIMEOUT_S, remaining))
                async with session.post(ep + path, data=data, timeout=tmo) as r:
                    raw = await r.read()
                    status = r.status
                    retry_after = _retry_after(r.headers.get("Retry-After"))
                if status == 200:
                    self._current = i % n
                    try:
                        answer = json.loads(raw) if raw else {}
                    except ValueError:
                        answer = {}
                    return (answer if isinstance(answer, dict) else {}), ep
                msg, reason = _error_text(raw)
                last_status, last_error = status, f"HTTP {status} from {ep}: {msg}"
                if status == 404 and spec is not None and ep not in registered_at and reason != "unknown_table":
                    # The catalog has not reached this replica yet: hand it the spec.
                    registered_at.add(ep)
                    await self._register_at(session, ep, spec, deadline)
                    continue
                if status == 401:
                    raise _Kept(f"{what}: {ep} refused the frame's authentication ({msg}); "
                                "check the cluster key", status)
                if status not in _RETRY_CLEAN and status not in _RETRY_AMBIGUOUS:
                    raise RemoteError(f"{what}: {ep} refused it: HTTP {status}: {msg}", status, retry_after)
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
                last_status, last_error = None, f"{type(e).__name__} talking to {ep}: {e}"
            log.debug("%s: attempt %d failed: %s", what, attempts, last_error)
            i += 1  # fail over to the next endpoint
            delay = min(BACKOFF_MAX_S, BACKOFF_INITIAL_S * 2 ** (attempts - 1)) * self._rng.uniform(0.5, 1.0)
            if retry_after is not None:
                # Jitter on top of Retry-After: publishers told the same wait by an overloaded
                # replica must not all come back in the same instant.
                delay = max(delay, min(retry_after, MAX_RETRY_AFTER_S)
                            * self._rng.uniform(1.0, 1.0 + RETRY_AFTER_JITTER))
            delay = min(delay, deadline - loop.time())
            if delay > 0:
                await asyncio.sleep(delay)
        kept = model is not None and model in self._pending
        raise PublishError(
            f"{what}: not acknowledged within {self.timeout:g}s after {attempts} attempts at "
            f"{', '.join(self.endpoints)}; last error: {last_error}"
            + ("; the frame is kept and re-sent first by the next publish" if kept else ""),
            model or "", attempts, last_status, kept)

    async def _register_at(self, session: aiohttp.ClientSession, ep: str, spec: ModelSpec, deadline: float) -> None:
        data = encode_frame(MsgType.REGISTER_MODEL, {"spec": spec.to_dict()}, self.keyring)
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            return
        try:
            async with session.post(ep + "/v1/models", data=data,
                                    timeout=aiohttp.ClientTimeout(total=min(REQUEST_TIMEOUT_S, remaining))) as r:
                raw = await r.read()
                if r.status == 409:
                    raise RemoteError(f"register {spec.name} at {ep}: {_error_text(raw)[0]}", 409)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            pass  # the publish retry loop handles an unreachable replica


class _Kept(RemoteError):
    """A refusal after which the frame is kept (401: a key fix makes it succeed)."""


# ---------------------------------------------------------------------------- sync facade

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
        from ekko.sdk.trainer_state import cut_with_state
        return cut_with_state(self, model, state, name, path, extra).name

    def restore(self, model: str, cut: "str | RolledBack", state: Any) -> Any:
        """Load the trainer state saved with ``cut`` into ``state`` (a Tracker, a module or
        ``(module, optimizer)``); returns the :class:`~ekko.sdk.trainer_state.TrainerCut`.
        A Tracker also resets what it will publish next (see :meth:`Tracker.restore`)."""
        from ekko.sdk.trainer_state import restore_state
        return restore_state(self, model, cut, state)

    # -- rollbacks (ekko.sdk.rollback_watch) ------------------------------------------------
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
        other parameter a dense table of :data:`DENSE_CHUNK`-element rows.
        """
        from ekko.sdk.tracking import spec_from_module
        spec = spec_from_module(module, model, traffic_share)
        self.register(spec)
        return spec

    def track(self, module: torch.nn.Module, model: str, **kwargs: Any) -> "Tracker":
        """Register ``module`` as ``model`` and return a :class:`ekko.sdk.tracking.Tracker`
        whose ``publish()`` sends the rows changed since the last one."""
        from ekko.sdk.tracking import Tracker
        return Tracker(module, model, self, **kwargs)

