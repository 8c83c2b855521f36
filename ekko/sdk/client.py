"""A small synchronous client for a replica daemon's read API.

For inference processes and tools that talk to a sidecar ``ekko daemon`` over
HTTP (``docs/http-api.md``): read rows (values and versions) in the compact
msgpack format, follow the change feed, the replica's status, and its health.  It
uses only the standard library (no event loop, no extra dependency) and is safe to
share between threads: reads go over one kept-alive connection per thread, other
requests over a connection of their own.

Errors: an error answer from the daemon raises
:class:`~ekko.core.errors.RemoteError` with its status and message
(:class:`~ekko.sdk.ack.KeyRejected` when it rejects the key of a signed request); a daemon that
cannot be reached raises :class:`Unreachable`; bad arguments raise
:class:`~ekko.core.errors.UsageError` before anything is sent.
"""

from __future__ import annotations

import http.client
import json
import threading
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any, Iterator

import msgpack
import numpy as np
import torch

from ekko.core import read_auth
from ekko.core.codec import Keyring, MsgType, array_from_wire, encode_frame
from ekko.core.delta import WIRE_DTYPES
from ekko.core.errors import EkkoError, ProtocolError, RemoteError, UsageError
from ekko.core.hashed import check_keys
from ekko.core.spec import SUPPORTED_DTYPES, ModelSpec
from ekko.core.store import from_wire_values
from ekko.sdk.ack import KeyRejected
from rollback.manager import check_sample

#: seconds one request may take.
DEFAULT_TIMEOUT_S = 10.0
#: ids per GET: a longer read is split into several requests (keeps the request line
#: well under what the daemon accepts, ekko.server.operator_api.MAX_READ_IDS).
READ_BATCH_IDS = 4096
#: longest long poll of the change feed (the daemon's ekko.server.change_feed.MAX_WAIT_S).
MAX_WATCH_WAIT_S = 60.0
#: largest answer we read (bytes): a batch of READ_BATCH_IDS rows of the widest dtype
#: and dim fits, a runaway answer does not exhaust memory.
MAX_ANSWER_BYTES = 1 << 31


class Unreachable(EkkoError, ConnectionError):
    """The daemon could not be reached (refused, timed out, DNS).

    Example::

        try:
            Client("127.0.0.1:7070").status()
        except Unreachable:
            ...                      # not up (yet): retry later
    """


@dataclass(frozen=True)
class RowsRead:
    """Rows read from a replica.

    Attributes:
        ids: the row ids asked for (int64), in order; of a hashed table, the slots (-1:
            the key is not held).
        versions: their packed versions (0 = never written), int64.
        values: ``(n, dim)`` tensor of the table dtype, on the CPU.
        keys: a hashed table's key of each row (int64), else None.
        found: a hashed table's rows: whether each key is held (bool), else None.

    Example::

        r = Client("127.0.0.1:7070").read("ranker", "user_emb", [3, 17])
        r.values.shape, r.versions      # torch.Size([2, dim]), packed int64 versions
    """

    ids: np.ndarray
    versions: np.ndarray
    values: torch.Tensor
    keys: np.ndarray | None = None
    found: np.ndarray | None = None


@dataclass(frozen=True)
class Changes:
    """One answer of a replica's change feed (:meth:`Client.changes`).

    Attributes:
        tables: per table, the changed rows (:class:`RowsRead`: ids sorted, each with the
            value and version the replica held when it answered).
        cursor: ask with this next.
        reset: the cursor asked with was from another daemon process or too old: the rows
            cached from this replica may be stale (reload them), ``tables`` is empty.
        more: the answer stopped at its row limit: more changes are waiting.
    """

    tables: dict[str, RowsRead]
    cursor: str
    reset: bool
    more: bool


def _decode_changes(raw: bytes) -> Changes:
    try:
        body = msgpack.unpackb(raw, raw=False)
    except Exception as e:  # msgpack raises several types
        raise ProtocolError(f"bad changes answer: {type(e).__name__}", "bad_body") from None
    if not isinstance(body, dict) or not isinstance(body.get("cursor"), str) or not isinstance(body.get("tables"), dict):
        raise ProtocolError("changes answer must be a map with a cursor and tables", "bad_body")
    tables = {}
    for name, t in body["tables"].items():
        if not isinstance(t, dict):
            raise ProtocolError("changes answer: a table must be a map", "bad_body")
        dtype, dim, n = t.get("dtype"), t.get("dim"), t.get("n")
        if dtype not in SUPPORTED_DTYPES or not isinstance(dim, int) or dim <= 0 or not isinstance(n, int) or n < 0:
            raise ProtocolError("changes answer has a bad dtype, dim or count", "bad_body")
        ids = array_from_wire(t.get("ids"), np.int64, n, "ids")
        versions = array_from_wire(t.get("versions"), np.int64, n, "versions")
        values = array_from_wire(t.get("values"), WIRE_DTYPES[dtype], n, "values", dim).reshape(n, dim)
        keys = array_from_wire(t["keys"], np.int64, n, "keys") if t.get("keys") is not None else None
        tables[name] = RowsRead(ids, versions, from_wire_values(values, dtype, torch.device("cpu")), keys)
    return Changes(tables, body["cursor"], bool(body.get("reset")), bool(body.get("more")))


def _endpoint(ep: str) -> str:
    if not isinstance(ep, str) or not ep.strip():
        raise UsageError(f"bad endpoint {ep!r}")
    ep = ep.strip().rstrip("/")
    return ep if "://" in ep else "http://" + ep


def _ids(ids: Any, keys: bool = False) -> np.ndarray:
    """Row ids (>= 0), or with ``keys`` a hashed table's 64-bit keys, as int64."""
    if isinstance(ids, torch.Tensor):
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise UsageError(f"ids must be integers, got {ids.dtype}")
        arr = ids.detach().to("cpu").numpy()
    else:
        arr = np.asarray(ids)
        if arr.size and arr.dtype.kind not in "iu":
            raise UsageError(f"ids must be integers, got {arr.dtype}")
    if arr.ndim != 1:
        raise UsageError(f"ids must be 1-D, got shape {tuple(arr.shape)}")
    if keys:
        return check_keys(arr)
    if arr.size and int(arr.min()) < 0:
        raise UsageError("row ids must be >= 0")
    return arr.astype(np.int64)


class Client:
    """Read rows, status and health from one replica daemon.

    Args:
        endpoint: ``"host:port"`` or ``"http://host:port"``.
        key: the cluster key, a reader key or a keyring: it signs frames (:meth:`register`,
            cuts, rollbacks) and every GET (a replica that holds any key refuses unsigned
            reads: :mod:`ekko.core.read_auth`).
        timeout: seconds per request.

    Example::

        c = Client("127.0.0.1:7070")
        emb = c.read_rows("ranker", "user_emb", [3, 17, 42])     # torch.Tensor (3, dim)
        vers = c.read_versions("ranker", "user_emb", [3, 17, 42])
        c.status()["models"]["ranker"]["lag_s"]
    """

    def __init__(self, endpoint: str, key: bytes | str | Keyring | None = None,
                 timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self.endpoint = _endpoint(endpoint)
        self.keyring = key if key is None or isinstance(key, Keyring) else Keyring.single(key)
        self.timeout = float(timeout)
        self._base_path = urllib.parse.urlsplit(self.endpoint).path.rstrip("/")
        # One kept-alive connection per thread for reads (http.client is not thread-safe).
        self._local = threading.local()

    # -- transport --------------------------------------------------------------------
    def _request(self, method: str, path: str, data: bytes | None = None,
                 timeout: float | None = None) -> tuple[int, bytes, Any]:
        timeout = self.timeout if timeout is None else timeout
        if method == "GET" and data is None:
            return self._get(path, timeout)
        req = urllib.request.Request(self.endpoint + path, data=data, method=method,
                                     headers={"Content-Type": "application/octet-stream"} if data else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read(MAX_ANSWER_BYTES), r.headers
        except urllib.error.HTTPError as e:
            raw = e.read(MAX_ANSWER_BYTES)
            return e.code, raw, e.headers
        except (urllib.error.URLError, OSError) as e:
            raise Unreachable(f"cannot reach {self.endpoint}: {getattr(e, 'reason', e)}") from None

    def _get(self, path: str, timeout: float) -> tuple[int, bytes, Any]:
        """A GET on this thread's kept-alive connection (reads are the hot path: a new
        connection per read cost more than the read).  A kept connection the daemon
        closed while idle is replaced once: a GET changes nothing, so sending it again
        is safe."""
        for attempt in (0, 1):
            conn = getattr(self._local, "conn", None)
            reused = conn is not None
            if conn is None:
                conn = self._local.conn = self._connection()
            try:
                conn.timeout = timeout
                if conn.sock is not None:
                    conn.sock.settimeout(timeout)
                conn.request("GET", self._base_path + path, headers=self._read_headers(self._base_path + path))
                r = conn.getresponse()
                raw = r.read(MAX_ANSWER_BYTES)
                if r.will_close:
                    self._drop_connection()
                return r.status, raw, r.headers
            except (http.client.HTTPException, OSError) as e:
                self._drop_connection()
                if reused and attempt == 0 and not isinstance(e, TimeoutError):
                    continue   # the daemon closed the idle connection: once more on a new one
                raise Unreachable(f"cannot reach {self.endpoint}: {e}") from None
        raise AssertionError("unreachable")

    def _read_headers(self, path: str) -> dict[str, str]:
        """A read's signature (ekko.core.read_auth) when this client holds a key: a replica
        that holds keys refuses unsigned reads; one without ignores the header."""
        return read_auth.read_headers(self.keyring, path)

    def _connection(self) -> http.client.HTTPConnection:
        u = urllib.parse.urlsplit(self.endpoint)
        cls = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
        return cls(u.hostname or "", u.port, timeout=self.timeout)

    def _drop_connection(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            conn.close()

    def close(self) -> None:
        """Close this thread's kept-alive connection (others close when their threads end)."""
        self._drop_connection()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _ok(self, method: str, path: str, data: bytes | None = None, timeout: float | None = None) -> bytes:
        status, raw, headers = self._request(method, path, data, timeout)
        if status // 100 == 2:
            return raw
        try:
            message = str(json.loads(raw).get("error", ""))
        except (ValueError, AttributeError):
            message = raw[:200].decode("utf-8", "replace").strip()
        retry = headers.get("Retry-After") if headers is not None else None
        try:
            retry_after = float(retry) if retry is not None else None
        except ValueError:
            retry_after = None
        where = f"{self.endpoint}{path.split('?')[0]}"
        if status == 401:
            raise KeyRejected(f"{where}: HTTP 401: {message}; the key was rejected: check the cluster key "
                              "(or keyring) given to the client", self.endpoint)
        raise RemoteError(f"{where}: HTTP {status}: {message}", status, retry_after)

    # -- reads ------------------------------------------------------------------------
    def read(self, model: str, table: str, ids: Any) -> RowsRead:
        """Values and versions of rows, in one pass (several requests for many ids)."""
        return self._read(model, table, _ids(ids), "ids")

    def lookup(self, model: str, table: str, keys: Any) -> RowsRead:
        """Rows of a hashed table by their 64-bit keys (``RowsRead.found`` says which are
        held; a key not held reads as zeros at version 0).

        Example::

            r = Client("127.0.0.1:7070").lookup("ranker", "ads", [10**15, 42])
            r.values[r.found]                # the rows of the keys the replica holds
        """
        return self._read(model, table, _ids(keys, keys=True), "keys")

    def _read(self, model: str, table: str, arr: np.ndarray, by: str) -> RowsRead:
        base = (f"/v1/models/{urllib.parse.quote(model, safe='')}/tables/"
                f"{urllib.parse.quote(table, safe='')}/rows?format=msgpack&{by}=")
        parts: list[dict[str, Any]] = []
        for lo in range(0, max(1, len(arr)), READ_BATCH_IDS):
            part = arr[lo:lo + READ_BATCH_IDS]
            raw = self._ok("GET", base + ",".join(map(str, part.tolist())))
            parts.append(self._decode_rows(raw, part, by))
        cat = lambda k: None if parts[0][k] is None else np.concatenate([p[k] for p in parts])  # noqa: E731
        return RowsRead(cat("ids"), cat("versions"), from_wire_values(cat("values"), parts[0]["dtype"],
                                                                         torch.device("cpu")),
                        cat("keys"), cat("found"))

    def read_rows(self, model: str, table: str, ids: Any) -> torch.Tensor:
        """Row values as a CPU tensor of the table dtype (bfloat16 included), ``(n, dim)``."""
        return self.read(model, table, ids).values

    def read_versions(self, model: str, table: str, ids: Any) -> np.ndarray:
        """Packed int64 versions of rows (0 = never written); see :mod:`ekko.core.version`."""
        return self.read(model, table, ids).versions

    @staticmethod
    def _decode_rows(raw: bytes, asked: np.ndarray, by: str = "ids") -> dict[str, Any]:
        try:
            body = msgpack.unpackb(raw, raw=False)
        except Exception as e:  # msgpack raises several types
            raise ProtocolError(f"bad rows answer: {type(e).__name__}", "bad_body") from None
        if not isinstance(body, dict):
            raise ProtocolError("rows answer must be a map", "bad_body")
        dtype, dim, n = body.get("dtype"), body.get("dim"), body.get("n")
        if dtype not in SUPPORTED_DTYPES or not isinstance(dim, int) or dim <= 0 or n != len(asked):
            raise ProtocolError("rows answer has a bad dtype, dim or count", "bad_body")
        out: dict[str, Any] = {"dtype": dtype, "keys": None, "found": None,
                               "ids": array_from_wire(body.get("ids"), np.int64, n, "ids"),
                               "versions": array_from_wire(body.get("versions"), np.int64, n, "versions"),
                               "values": array_from_wire(body.get("values"), WIRE_DTYPES[dtype], n, "values",
                                                         dim).reshape(n, dim)}
        if body.get("keys") is not None:
            out["keys"] = array_from_wire(body["keys"], np.int64, n, "keys")
            found = body.get("found")
            if not isinstance(found, bytes) or len(found) != (n + 7) // 8:
                raise ProtocolError("rows answer of a hashed table needs a found bitmap", "bad_body")
            out["found"] = np.unpackbits(np.frombuffer(found, np.uint8), count=n).astype(bool)
        if not np.array_equal(out["keys" if by == "keys" else "ids"], asked):
            raise ProtocolError(f"rows answer is for other {by}", "bad_body")
        return out

    def spec(self, model: str) -> ModelSpec:
        """The model's spec as the replica holds it (its tables and their layout)."""
        raw = self._ok("GET", f"/v1/models/{urllib.parse.quote(model, safe='')}")
        try:
            return ModelSpec.from_dict(json.loads(raw)["spec"])
        except (ValueError, KeyError, TypeError):
            raise ProtocolError("bad spec answer", "bad_body") from None

    # -- the change feed ----------------------------------------------------------------
    def changes(self, model: str, since: str | None = None, wait: float = 0.0,
                limit: int | None = None) -> Changes:
        """One answer of the replica's change feed (``GET /v1/models/{model}/changes``):
        the rows changed after cursor ``since`` (None: none; the answer's cursor is
        "now"), waiting up to ``wait`` seconds for a change when there is none yet."""
        if not 0.0 <= wait <= MAX_WATCH_WAIT_S:
            raise UsageError(f"wait must be within 0..{MAX_WATCH_WAIT_S:g} seconds")
        q = {"wait": f"{wait:g}"}
        if since is not None:
            q["since"] = since
        if limit is not None:
            q["limit"] = str(int(limit))
        path = f"/v1/models/{urllib.parse.quote(model, safe='')}/changes?" + urllib.parse.urlencode(q)
        return _decode_changes(self._ok("GET", path, timeout=self.timeout + wait))

    def watch(self, model: str, since: str | None = None, wait: float = 10.0) -> Iterator[Changes]:
        """Follow the change feed: yields every answer that has rows or a reset, forever
        (stop iterating to stop).  Resume later with the ``cursor`` of the last answer
        handled.  On ``reset`` the rows cached from this replica may be stale: reload them.

        Example::

            cache = {}
            for ch in Client("127.0.0.1:7070").watch("ranker"):
                if ch.reset:
                    cache.clear()                       # reload what you need
                for table, rows in ch.tables.items():
                    for i, row in zip(rows.ids.tolist(), rows.values):
                        cache[(table, i)] = row
        """
        cursor = since if since is not None else self.changes(model).cursor
        while True:
            ch = self.changes(model, cursor, wait=wait)
            cursor = ch.cursor
            if ch.tables or ch.reset:
                yield ch

    def status(self, cluster: bool = False) -> dict[str, Any]:
        """The replica's ``/v1/status``; ``cluster=True`` adds every member and its lag."""
        return json.loads(self._ok("GET", "/v1/status" + ("?cluster=1" if cluster else "")))

    def healthz(self) -> bool:
        """True while the daemon serves; False while it drains (503) or cannot be reached."""
        try:
            status, _, _ = self._request("GET", "/healthz")
        except Unreachable:
            return False
        return status == 200

    def cut(self, model: str, name: str | None = None) -> str:
        """Take a named cut (restore point) of ``model`` at this replica; it is sent to
        every peer.  Returns the cut's name."""
        body = {"model": model} if name is None else {"model": model, "name": name}
        raw = self._ok("POST", "/v1/cuts", encode_frame(MsgType.CUT, body, self.keyring))
        return str(json.loads(raw)["name"])

    def cuts(self, model: str) -> list[dict[str, Any]]:
        """The cuts this replica knows for ``model``, oldest first: ``name``, ``taken_at``
        (Unix seconds), ``restorable`` (its undo history covers every change since),
        ``learnt`` (from a peer or a snapshot), ``pinned`` (this replica's baseline pin)."""
        return list(json.loads(self._ok("GET", f"/v1/models/{model}/cuts"))["cuts"])

    def set_baseline(self, model: str, cut: str) -> dict[str, Any]:
        """Pin this replica as a baseline to ``cut`` of ``model`` (a cut known there: see
        :meth:`cuts`), or ``""`` to unpin; the pin holds every model of that replica and
        survives its restarts.  Returns ``{"ok", "model", "cut", "previous"}``."""
        raw = self._ok("POST", f"/v1/models/{model}/baseline",
                       encode_frame(MsgType.BASELINE, {"cut": cut}, self.keyring))
        return json.loads(raw)

    def rollback(self, model: str, cut: str) -> dict[str, Any]:
        """Roll ``model`` back to ``cut`` on every replica (started here)."""
        raw = self._ok("POST", "/v1/rollback", encode_frame(MsgType.ROLLBACK, {"model": model, "cut": cut},
                                                             self.keyring))
        return json.loads(raw)

    def report_quality(self, model: str, variant: str, metric: str, value: float, count: float) -> dict[str, Any]:
        """Report one quality sample of ``model`` (``variant`` ``"online"`` or ``"baseline"``;
        ``metric`` e.g. ``"ctr"``, the value over ``count`` events).  Returns the answer:
        the model's state here and the ids of rollbacks the sample started.

        Example::

            Client("127.0.0.1:7070").report_quality("ranker", "online", "ctr", 0.0391, 120_000)
        """
        check_sample(model, variant, metric, value, count)
        body = {"model": model, "variant": variant, "metric": metric, "value": float(value), "count": float(count)}
        raw = self._ok("POST", "/v1/quality", encode_frame(MsgType.QUALITY, body, self.keyring))
        return json.loads(raw)

    def register(self, spec: ModelSpec) -> bool:
        """Register a model (signed with ``key`` when given); True when it was new."""
        if not isinstance(spec, ModelSpec):
            raise UsageError("register takes a ModelSpec")
        raw = self._ok("POST", "/v1/models", encode_frame(MsgType.REGISTER_MODEL, {"spec": spec.to_dict()},
                                                           self.keyring))
        return bool(json.loads(raw).get("created", False))
