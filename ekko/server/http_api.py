"""The daemon's HTTP surface: routes, and the middleware every request passes through.

:class:`HttpApi` builds the aiohttp application of ``docs/http-api.md`` over the
handlers of :mod:`ekko.server.ingest` (the write path) and
:mod:`ekko.server.operator_api` (reads and operator actions).  Its middleware
sheds load and refuses writes while the daemon drains, counts requests in flight
(shutdown waits for them), and turns bad input of any kind into a 4xx JSON error
``{"error", "reason"}`` counted in ``ekko_rejects_total``; a 500 means a bug (it
is logged).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable

from aiohttp import web

from ekko.core import read_auth
from ekko.core.codec import MAX_FRAME_BYTES, Keyring
from ekko.core.errors import ProtocolError, UsageError
from ekko.server.change_feed import ChangeFeed
from ekko.server.frames import RETRY_AFTER_S, RequestRejected, status_of
from ekko.server.ingest import IngestHandlers
from ekko.server.metrics import DaemonMetrics
from ekko.server.operator_api import MAX_READ_IDS, OperatorHandlers
from ekko.server.shared_tables import SharedTables

# The daemon's logger: operators filter and tests capture "ekko.server.daemon" for all of it.
log = logging.getLogger("ekko.server.daemon")

#: longest HTTP request line accepted: room for MAX_READ_IDS ids of up to 20 characters
#: plus the path (aiohttp's default of 8190 bytes would cap a read at ~1k ids).
MAX_REQUEST_LINE = MAX_READ_IDS * 21 + 4096
#: requests handled at once; beyond it writes and reads get 429 with Retry-After.
MAX_CONCURRENT_REQUESTS = 256
#: keyword arguments of aiohttp's request handler (AppRunner / TestServer ``**kwargs``).
HANDLER_ARGS: dict[str, Any] = {"max_line_size": MAX_REQUEST_LINE, "max_field_size": 16 << 10}

#: the peer stream's route (its requests are not counted in flight, see _open_stream).
STREAM_ENDPOINT = "/v1/gossip/stream"
#: methods that read (aiohttp answers HEAD on every GET route, running its handler).
READ_METHODS = ("GET", "HEAD")
#: the one read a publisher key may sign (a publisher's rollback watch, for its models).
ROLLBACKS_ENDPOINT = "/v1/models/{model}/rollbacks"
#: a hashed table's held keys and their slots (a publisher resumes its slot assignment).
KEYS_ENDPOINT = "/v1/models/{model}/tables/{table}/keys"
#: what a publisher key may read of the models its grant allows.
PUBLISHER_READS = (ROLLBACKS_ENDPOINT, KEYS_ENDPOINT)
_REASON_OF_STATUS = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}


class HttpApi:
    """The routes and request middleware of one daemon.

    Args:
        ingest: handlers of the write path (registrations, publishes, gossip).
        operator: handlers of reads and operator actions.
        metrics: the daemon's metrics (requests, rejects, internal errors).
        is_draining: whether the daemon is shutting down (writes and reads get 503;
            ``/healthz``, ``/metrics`` and ``/v1/status`` still answer).
        feed: the change feed (``GET /v1/models/{model}/changes``), if any.
        shared: the tables in shared memory (``GET /v1/models/{model}/shared``), if any.
        keyring: the daemon's keyring now; with any key in it, every GET and HEAD but
            ``/healthz`` must be signed (:mod:`ekko.core.read_auth`).
        open_metrics: serve ``/metrics`` unsigned even with keys (for Prometheus scrapers).

    Example:
        The daemon serves :meth:`make_app` and, at shutdown, waits for requests::

            api = HttpApi(ingest, operator, metrics, lambda: daemon.draining)
            app = api.make_app()
            ...
            if api.in_flight and not await api.wait_idle(DRAIN_TIMEOUT_S):
                ...
    """

    def __init__(self, ingest: IngestHandlers, operator: OperatorHandlers, metrics: DaemonMetrics,
                 is_draining: Callable[[], bool], feed: ChangeFeed | None = None,
                 shared: SharedTables | None = None, keyring: Callable[[], Keyring | None] | None = None,
                 open_metrics: bool = False) -> None:
        self.keyring = keyring or (lambda: None)
        self.open_metrics = bool(open_metrics)
        self.ingest = ingest
        self.operator = operator
        self.feed = feed
        self.shared = shared
        self.metrics = metrics
        self.is_draining = is_draining
        #: requests being handled now.
        self.in_flight = 0
        self._idle = asyncio.Event()

    def make_app(self) -> web.Application:
        """A new aiohttp application with every route of the API."""
        # +1: aiohttp refuses a body whose size *reaches* client_max_size; a frame of exactly
        # MAX_FRAME_BYTES is legal.
        app = web.Application(client_max_size=MAX_FRAME_BYTES + 1, middlewares=[self._middleware])
        ingest, op = self.ingest, self.operator
        app.router.add_post("/v1/models", ingest.register_model)
        app.router.add_post("/v1/publish", ingest.publish)
        app.router.add_post("/v1/gossip", ingest.gossip)
        app.router.add_get("/v1/gossip/stream", ingest.gossip_stream)
        app.router.add_get("/v1/models/{model}/tables/{table}/rows", op.rows)
        app.router.add_get(KEYS_ENDPOINT, op.keys)
        app.router.add_get("/v1/status", op.status)
        app.router.add_post("/v1/cuts", op.take_cut)
        app.router.add_get("/v1/models/{model}/cuts", op.cuts)
        app.router.add_get("/v1/models/{model}", op.model_spec)
        app.router.add_get("/v1/models/{model}/knowledge", op.knowledge)
        if self.feed is not None:
            app.router.add_get("/v1/models/{model}/changes", self.feed.changes)
        if self.shared is not None:
            app.router.add_get("/v1/models/{model}/shared", self.shared.shared)
        app.router.add_post("/v1/rollback", op.rollback)
        app.router.add_get("/v1/models/{model}/rollbacks", op.rollbacks)
        app.router.add_post("/v1/models/{model}/baseline", op.baseline)
        app.router.add_post("/v1/quality", op.quality)
        app.router.add_get("/metrics", op.metrics_page)
        app.router.add_get("/healthz", op.healthz)
        # Before the server waits for its handlers: an open peer stream would hold it up.
        app.on_shutdown.append(lambda _app: ingest.close_streams())
        return app

    def _authorize_read(self, request: web.Request, endpoint: str) -> None:
        """With any key in the keyring: a read signed by a peer key, by a reader key allowed
        the model it reads, or (rollbacks only) by a publisher key allowed that model; else
        401/403 (see :mod:`ekko.core.read_auth`).  Open without keys, and for ``/metrics``
        with ``open_metrics``."""
        keyring = self.keyring()
        if not keyring or (self.open_metrics and endpoint == "/metrics"):
            return
        kid = read_auth.verify(keyring, request.headers.get(read_auth.HEADER), request.method, request.path_qs,
                               time.time())
        if keyring.is_peer(kid):
            return
        model = request.match_info.get("model")
        grant = keyring.reader(kid)
        if grant is not None:
            if not grant.allows(model):
                raise RequestRejected(f"reader key {kid} may not read model {model!r}", "forbidden")
            return
        pub = keyring.grant(kid)
        if pub is not None and endpoint in PUBLISHER_READS and model is not None:
            if not pub.allows(model):
                raise RequestRejected(f"publisher key {kid} may not read {endpoint} of model {model!r}",
                                      "forbidden")
            return
        raise RequestRejected(f"key {kid} is not a reader or peer key: it may not read {endpoint}", "forbidden")

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in flight; False if some still are after ``timeout`` seconds."""
        if not self.in_flight:
            return True
        self._idle.clear()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    @web.middleware
    async def _middleware(self, request: web.Request,
                          handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        endpoint = request.match_info.route.resource.canonical if request.match_info.route.resource else "other"
        light = endpoint in ("/healthz", "/metrics", "/v1/status")
        if endpoint == STREAM_ENDPOINT:
            return await self._open_stream(request, handler)
        arrived = time.perf_counter()
        self.in_flight += 1
        try:
            if self.is_draining() and not light:
                raise RequestRejected("replica is shutting down; retry on another replica", "draining")
            if self.in_flight > MAX_CONCURRENT_REQUESTS and not light:
                raise RequestRejected("too many concurrent requests", "overloaded")
            if request.method in READ_METHODS and endpoint != "/healthz":
                self._authorize_read(request, endpoint)
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
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()
        self.metrics.request_done(endpoint, resp.status, time.perf_counter() - arrived)
        return resp

    async def _open_stream(self, request: web.Request,
                           handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        """A peer stream lives as long as its peer: it is not a request in flight (shutdown
        closes streams instead of waiting for them).  Refusals before the upgrade are 4xx/503
        answers like any request's."""
        try:
            if self.is_draining():
                raise RequestRejected("replica is shutting down; retry on another replica", "draining")
            resp = await handler(request)
        except RequestRejected as e:
            resp = self._error(STREAM_ENDPOINT, str(e), e.reason)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            resp = self._error(STREAM_ENDPOINT, e.text or e.reason, _REASON_OF_STATUS.get(e.status, f"http_{e.status}"),
                               e.status)
        self.metrics.requests.labels(STREAM_ENDPOINT, str(resp.status)).inc()
        return resp

    def _error(self, endpoint: str, message: str, reason: str, status: int | None = None) -> web.Response:
        status = status or status_of(reason)
        self.metrics.reject(endpoint, reason)
        headers = {"Retry-After": str(RETRY_AFTER_S)} if status in (429, 503) else None
        return web.json_response({"error": message, "reason": reason}, status=status, headers=headers)
