"""An in-process stand-in for the daemon's HTTP API (docs/http-api.md), for SDK tests.

:class:`FakeDaemon` wraps a real :class:`ekko.replica.node.ReplicaNode` (one replica, no
gossip) in an aiohttp app with the contract's routes and error shapes, plus
fault injection (error statuses with Retry-After, dropped connections before or
after applying, delays).  It runs on its own thread and event loop so that the
synchronous Publisher (which blocks its caller) can talk to it.

The tests at the bottom check the stand-in against the contract, so the SDK tests
do not pass against a server that is wrong in the SDK's favour.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import msgpack
import numpy as np
import pytest
from aiohttp import web

from ekko.core.codec import Keyring, MsgType, array_to_wire, decode_frame, encode_frame
from ekko.core.errors import ProtocolError, UsageError
from ekko.replica.node import ReplicaNode
from ekko.core.spec import ModelSpec, TableSpec
from ekko.core.store import to_wire_values

#: ids per rows read, as the daemon's MAX_READ_IDS bounds it.
FAKE_MAX_READ_IDS = 4096


@dataclass
class Fault:
    """One injected failure, consumed by the next request to ``path``.

    kind: ``"status"`` (answer ``status`` with optional ``retry_after``), ``"reset"``
    (drop the connection without applying), ``"apply_then_reset"`` (apply, then
    drop: the acknowledgement is lost), ``"delay"`` (sleep ``seconds`` first).
    """

    kind: str
    path: str = "/v1/publish"
    status: int = 503
    retry_after: float | None = None
    seconds: float = 0.0


def _err(status: int, message: str, reason: str, retry_after: float | None = None) -> web.Response:
    headers = {"Retry-After": f"{retry_after:g}"} if retry_after is not None else None
    return web.json_response({"error": message, "reason": reason}, status=status, headers=headers)


#: seconds between two runs of the fake daemon's node timers.
TICK_S = 0.02


class FakeDaemon:
    """A single replica behind the v1 HTTP API, on a background thread.

    Example::

        with FakeDaemon() as srv:
            pub = Publisher([srv.endpoint], state_dir=tmp)
    """

    def __init__(self, key: bytes | None = None, node_id: str = "r1", dc: str = "dc1") -> None:
        self.keyring = Keyring.single(key)
        self.node = ReplicaNode(node_id, dc, "127.0.0.1:0", device="cpu")
        self.faults: deque[Fault] = deque()
        self.log: list[tuple[str, int]] = []           # (path, status) of every request
        self.bodies: list[bytes] = []                  # raw publish bodies, in arrival order
        self.draining = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self._ticker: asyncio.Future | None = None
        self.port = 0

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> "FakeDaemon":
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    async def _start(self) -> None:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_post("/v1/models", self._models)
        app.router.add_post("/v1/publish", self._publish)
        app.router.add_get("/v1/models/{model}/tables/{table}/rows", self._rows)
        app.router.add_get("/v1/status", self._status)
        app.router.add_get("/healthz", self._healthz)
        # Long request lines, as the daemon allows (aiohttp's default caps a read at ~1k ids).
        self._runner = web.AppRunner(app, max_line_size=1 << 20)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]
        if self._ticker is None:
            self._ticker = asyncio.ensure_future(self._tick())

    async def _tick(self) -> None:
        """Run the node's timers as the daemon does (a single replica sends nothing)."""
        while True:
            self.node.tick(time.time())
            self.node.drain()
            await asyncio.sleep(TICK_S)

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
            self._runner = None

    def restart(self) -> None:
        """Listen again on the same port (after :meth:`stop`)."""
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)

    def close(self) -> None:
        self.stop()
        if self._ticker is not None:
            ticker, self._ticker = self._ticker, None

            async def cancel() -> None:
                ticker.cancel()
                await asyncio.gather(ticker, return_exceptions=True)
            asyncio.run_coroutine_threadsafe(cancel(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def __enter__(self) -> "FakeDaemon":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the server's loop (the node is only touched there)."""
        async def run() -> Any:
            return fn()
        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)

    def rows(self, model: str, table: str) -> tuple[np.ndarray, np.ndarray]:
        """(wire values, versions) of a whole table, copied on the server loop."""
        def get():
            ts = self.node.table_store(model, table)
            return to_wire_values(ts.values).copy(), ts.versions.copy()
        return self.call(get)

    def knowledge(self, model: str, table: str, shard: int, origin: int) -> int:
        def get():
            sync = self.node.models[model].shards[table].get(shard)
            return 0 if sync is None else sync.knowledge[origin]
        return self.call(get)

    def count(self, path: str) -> int:
        return sum(1 for p, _ in self.log if p == path)

    # -- handlers -------------------------------------------------------------------------
    async def _fault(self, request: web.Request) -> tuple[web.StreamResponse | None, str | None]:
        if self.faults and self.faults[0].path == request.path:
            f = self.faults.popleft()
            if f.kind == "status":
                return _err(f.status, "injected", "injected", f.retry_after), None
            if f.kind == "reset":
                request.transport.close()
                return web.Response(status=599), None
            if f.kind == "delay":
                await asyncio.sleep(f.seconds)
            return None, f.kind
        return None, None

    def _frame(self, raw: bytes):
        return decode_frame(raw, self.keyring)

    def _proto_error(self, e: ProtocolError) -> web.Response:
        status = {"bad_mac": 401, "unauthenticated": 401, "too_large": 413, "unknown_model": 404,
                  "unknown_table": 404}.get(e.reason, 400)
        return _err(status, str(e), e.reason)

    async def _models(self, request: web.Request) -> web.StreamResponse:
        resp, _ = await self._fault(request)
        if resp is None:
            raw = await request.read()
            try:
                frame = self._frame(raw)
                if frame.msg_type != MsgType.REGISTER_MODEL:
                    raise ProtocolError("expected REGISTER_MODEL", "bad_type")
                spec = ModelSpec.from_dict(frame.body.get("spec"))
                created = self.node.register_model(spec, time.time())
                resp = web.json_response({"ok": True, "created": created})
            except ProtocolError as e:
                resp = self._proto_error(e)
            except UsageError as e:
                resp = _err(409, str(e), "conflict")
        self.log.append((request.path, resp.status))
        return resp

    async def _publish(self, request: web.Request) -> web.StreamResponse:
        resp, after = await self._fault(request)
        if resp is None:
            raw = await request.read()
            self.bodies.append(raw)
            try:
                frame = self._frame(raw)
                if frame.msg_type != MsgType.PUBLISH:
                    raise ProtocolError("expected PUBLISH", "bad_type")
                ack = self.node.publish(frame.body, time.time())
                resp = web.json_response({"ok": True, "rows": ack.rows, "applied": ack.applied,
                                          "max_counter": ack.max_counter})
            except ProtocolError as e:
                resp = self._proto_error(e)
            except UsageError as e:
                resp = _err(400, str(e), "invalid")
            except Exception as e:  # a bug in the node: say what, so a test failure shows it
                import traceback
                resp = _err(500, f"{type(e).__name__}: {e}: {traceback.format_exc()[-800:]}", "internal")
            if after == "apply_then_reset":
                request.transport.close()
        self.log.append((request.path, resp.status))
        return resp

    async def _rows(self, request: web.Request) -> web.StreamResponse:
        model, table = request.match_info["model"], request.match_info["table"]
        spec = self.node.table_spec(model, table)
        if spec is None:
            return _err(404, f"unknown table {model}/{table}", "unknown_table")
        try:
            ids = np.array([int(x) for x in request.query.get("ids", "").split(",") if x], dtype=np.int64)
        except ValueError:
            return _err(400, "ids must be integers", "bad_ids")
        if len(ids) > FAKE_MAX_READ_IDS:
            return _err(413, "too many ids", "too_large")
        if len(ids) and (ids.min() < 0 or ids.max() >= spec.rows):
            return _err(400, "row id out of range", "bad_ids")
        ts = self.node.table_store(model, table)
        vals = to_wire_values(ts.read(ids))
        vers = ts.versions[ids]
        if request.query.get("format") == "msgpack":
            body = {"ids": array_to_wire(ids), "versions": array_to_wire(vers), "values": array_to_wire(vals),
                    "dim": spec.dim, "dtype": spec.dtype, "n": len(ids)}
            return web.Response(body=msgpack.packb(body, use_bin_type=True), content_type="application/msgpack")
        values = ts.read(ids).float().tolist()
        return web.json_response({"model": model, "table": table, "ids": ids.tolist(), "dim": spec.dim,
                                  "dtype": spec.dtype, "versions": vers.tolist(), "values": values})

    async def _status(self, request: web.Request) -> web.StreamResponse:
        st = self.node.status()
        if request.query.get("cluster") in ("1", "true"):
            st["members"] = self.node.cluster_view()
        return web.json_response(st)

    async def _healthz(self, request: web.Request) -> web.StreamResponse:
        if self.draining:
            return web.Response(status=503, text="draining")
        return web.Response(text="ok")


class RealDaemons:
    """Real :class:`ekko.server.daemon.Daemon` replicas served in-process on one background loop.

    Args:
        layout: ``[(node_id, dc), ...]``; all join through the first one.
        key: cluster key.
        tmp: directory for their data dirs.

    Example::

        with RealDaemons([("r1", "dc1"), ("r2", "dc2")], tmp_path) as ds:
            Publisher(ds.endpoints, ...)
    """

    def __init__(self, layout: list[tuple[str, str]], tmp: Any, key: bytes | None = None) -> None:
        from ekko.core.config import preset
        from ekko.server.daemon import Daemon
        self.layout = layout
        self.ports = [_free_port() for _ in layout]
        cfg = preset("local", snapshot_interval=0)
        seed = f"127.0.0.1:{self.ports[0]}"
        self.daemons = [Daemon(nid, dc, f"127.0.0.1:{port}", [] if i == 0 else [seed], f"{tmp}/{nid}", cfg,
                               key=key, device="cpu")
                        for i, ((nid, dc), port) in enumerate(zip(layout, self.ports))]
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runners: list[web.AppRunner | None] = []

    @property
    def endpoints(self) -> list[str]:
        return [f"127.0.0.1:{p}" for p in self.ports]

    def __enter__(self) -> "RealDaemons":
        from ekko.server.http_api import HANDLER_ARGS
        self._thread.start()

        async def start() -> None:
            for d, port in zip(self.daemons, self.ports):
                r = web.AppRunner(d.app, access_log=None, **HANDLER_ARGS)
                await r.setup()
                await web.TCPSite(r, "127.0.0.1", port).start()
                self._runners.append(r)
        asyncio.run_coroutine_threadsafe(start(), self._loop).result(30)
        return self

    def stop(self, i: int) -> None:
        """Shut replica ``i`` down (drain, then close its port)."""
        async def stop() -> None:
            r = self._runners[i]
            if r is not None:
                self._runners[i] = None
                await r.cleanup()
        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(60)

    def call(self, fn: Callable[[], Any]) -> Any:
        async def run() -> Any:
            return fn()
        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)

    def __exit__(self, *exc: Any) -> None:
        for i in range(len(self._runners)):
            self.stop(i)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def fake():
    with FakeDaemon() as srv:
        yield srv


# ---------------------------------------------------------------------------- contract checks

SPEC = ModelSpec("m", [TableSpec("t", rows=10, dim=2)])


def _post(url: str, data: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=data, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_fake_register_publish_and_errors(fake):
    base = f"http://{fake.endpoint}"
    assert _post(base + "/v1/models", encode_frame(MsgType.REGISTER_MODEL, {"spec": SPEC.to_dict()})) == (
        200, {"ok": True, "created": True})
    assert _post(base + "/v1/models", encode_frame(MsgType.REGISTER_MODEL, {"spec": SPEC.to_dict()}))[1][
        "created"] is False
    other = ModelSpec("m", [TableSpec("t", rows=11, dim=2)])
    status, body = _post(base + "/v1/models", encode_frame(MsgType.REGISTER_MODEL, {"spec": other.to_dict()}))
    assert status == 409 and set(body) == {"error", "reason"}
    status, body = _post(base + "/v1/publish", b"garbage-garbage-garbage")
    assert status == 400 and body["reason"] == "bad_magic"
    unknown = {"model": "nope", "origin": 1, "deltas": [], "chains": {}}
    assert _post(base + "/v1/publish", encode_frame(MsgType.PUBLISH, unknown))[0] == 404


def test_fake_requires_mac_when_keyed():
    with FakeDaemon(key=b"cluster-key-1") as srv:
        base = f"http://{srv.endpoint}"
        frame = encode_frame(MsgType.REGISTER_MODEL, {"spec": SPEC.to_dict()})
        assert _post(base + "/v1/models", frame)[0] == 401
        signed = encode_frame(MsgType.REGISTER_MODEL, {"spec": SPEC.to_dict()}, Keyring.single(b"cluster-key-1"))
        assert _post(base + "/v1/models", signed)[0] == 200


def test_fake_faults(fake):
    base = f"http://{fake.endpoint}"
    fake.faults.append(Fault("status", path="/v1/models", status=503, retry_after=2))
    req = urllib.request.Request(base + "/v1/models", method="POST",
                                 data=encode_frame(MsgType.REGISTER_MODEL, {"spec": SPEC.to_dict()}))
    with pytest.raises(urllib.error.HTTPError) as ei:
        urllib.request.urlopen(req, timeout=5)
    assert ei.value.code == 503 and ei.value.headers["Retry-After"] == "2"
    fake.faults.append(Fault("reset", path="/v1/models"))
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(req, timeout=5)
    assert fake.count("/v1/models") == 2
