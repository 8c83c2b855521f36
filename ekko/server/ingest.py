"""The write path of a daemon: model registration, publishes and peer traffic.

:class:`IngestHandlers` answers ``POST /v1/models``, ``POST /v1/publish``, the peer
streams of ``GET /v1/gossip/stream`` and ``POST /v1/gossip`` (``docs/http-api.md``).  A
publish is checked against the publish gate before its body is read (back-pressure,
:mod:`ekko.server.backpressure`), applied, appended to the write-ahead log in the same
loop step, and answered once the log record is durable.  A peer stream carries one
frame per WebSocket binary message, handled in order exactly as a POST to
``/v1/gossip`` is; a refused frame gets a text message ``{"status", "reason", "error"}``
back and the stream goes on.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, Callable

from aiohttp import WSCloseCode, WSMsgType, web

from ekko.core.codec import MAX_FRAME_BYTES, Frame, MsgType, encode_frame
from ekko.core.errors import ProtocolError, UsageError
from ekko.core.spec import ModelSpec
from ekko.replica.node import ReplicaNode
from ekko.replica.wal import WalError
from ekko.server.backpressure import PublishGate
from ekko.server.driver import NodeDriver
from ekko.server.frames import RETRY_AFTER_S, FrameReader, RequestRejected, status_of
from ekko.server.metrics import UNKNOWN_DC, DaemonMetrics
from ekko.server.persistence import Persistence
from ekko.server.placed_routes import PlacedRoutes, merge_acks, split_publish
from ekko.server.rollback_view import rollback_keys

# The daemon's logger: operators filter and tests capture "ekko.server.daemon" for all of it.
log = logging.getLogger("ekko.server.daemon")

#: most shadowed rows a publish acknowledgement lists per table (all are counted).
MAX_SHADOWED_LISTED = 1024
#: message types /v1/gossip accepts (peer traffic only).
PEER_TYPES = frozenset({MsgType.GOSSIP, MsgType.PULL_REQUEST, MsgType.PULL_RESPONSE, MsgType.PUSH,
                        MsgType.ROLLBACK, MsgType.CUT})
#: peer streams open at once; beyond it an upgrade gets 429 (each is a connection and a task).
MAX_PEER_STREAMS = 256
#: seconds between pings on an idle peer stream; a peer that answers none within this is
#: dropped (a crashed host sends no FIN, and its stream would otherwise stay forever).
STREAM_HEARTBEAT_S = 30.0
#: seconds a peer stream's close waits for the peer's answer (at shutdown a stopped peer
#: must not hold it up; streams close together).
STREAM_CLOSE_TIMEOUT_S = 2.0
#: the endpoint label of peer frames in metrics, whichever way they came.
GOSSIP_ENDPOINT = "/v1/gossip"


class IngestHandlers:
    """Request handlers that write into the node: registrations, publishes, gossip.

    Args:
        node: the replica node.
        frames: reads and authorizes request frames.
        driver: sends what the node produced (and knows each member's DC).
        persistence: holds the write-ahead log publishes are appended to.
        gate: the publish gate (back-pressure) consulted before a publish is read.
        metrics: the daemon's metrics.
        clock: protocol time source (seconds, monotonic).

    Example:
        :class:`ekko.server.http_api.HttpApi` routes to them::

            app.router.add_post("/v1/publish", ingest.publish)
    """

    def __init__(self, node: ReplicaNode, frames: FrameReader, driver: NodeDriver, persistence: Persistence,
                 gate: PublishGate, metrics: DaemonMetrics, clock: Callable[[], float]) -> None:
        self.node = node
        self.frames = frames
        self.driver = driver
        self.persistence = persistence
        self.gate = gate
        self.metrics = metrics
        self.clock = clock
        #: relays the parts of placed models' publishes to their holders.
        self.routes = PlacedRoutes(node, driver.transport)
        #: peer streams open now (closed by :meth:`close_streams` at shutdown).
        self.streams: set[web.WebSocketResponse] = set()
        self._streams_closed = False

    async def register_model(self, request: web.Request) -> web.Response:
        """``POST /v1/models``: frame ``REGISTER_MODEL`` ``{"spec"}``."""
        frame = await self.frames.read_frame(request)
        self.frames.expect(frame, MsgType.REGISTER_MODEL)
        spec = ModelSpec.from_dict(frame.body.get("spec"))
        self.frames.authorize_publisher(frame, spec.name, None)
        try:
            created = self.node.register_model(spec, self.clock())
        except UsageError as e:
            raise RequestRejected(str(e), "spec_conflict") from None
        self.driver.send_out()
        if created:
            log.info("registered model %s", spec.name)
        return web.json_response({"ok": True, "created": created})

    async def publish(self, request: web.Request) -> web.Response:
        """``POST /v1/publish``: frame ``PUBLISH``; answered once the update is durable."""
        held = request.content_length or 0
        refusal = self.gate.check(held)  # before reading: a refused publish costs no memory
        if refusal is not None:
            self.metrics.backpressure.labels(refusal.bound).inc()
            raise RequestRejected(f"{refusal.message}; retry after {RETRY_AFTER_S}s", refusal.reason)
        self.gate.publish_bytes += held
        try:
            data = await self.frames.read_body(request)
            if not held:  # chunked upload: counted once its size is known
                held = len(data)
                self.gate.publish_bytes += held
            frame = await self.frames.decode(data)
            self.frames.expect(frame, MsgType.PUBLISH)
            if self.frames.keyring():
                model, origin = frame.body.get("model"), frame.body.get("origin")
                if not isinstance(model, str) or not isinstance(origin, int) or isinstance(origin, bool):
                    raise ProtocolError("publish needs a string model and an integer origin", "bad_body")
                self.frames.authorize_publisher(frame, model, origin)
            parts = None if "relay" in frame.body else split_publish(self.node, frame.body, self.clock())
            if parts is None or set(parts) == {self.node.node_id}:
                answer = await self._apply_logged(frame.body, data)
            else:
                answer = await self._route_publish(parts)
            resp = web.json_response(answer)
            try:  # the answer goes first (written now, not when the handler returns)
                await resp.prepare(request)
                await resp.write_eof()
            finally:
                self.driver.send_out()  # durable and applied here: its pushes go, answered or not
            return resp
        finally:
            self.gate.publish_bytes -= held

    async def _apply_logged(self, body: dict[str, Any], data: bytes) -> dict[str, Any]:
        """Apply a publish body here, log its frame ``data`` and wait until it is durable;
        the acknowledgement to send."""
        with self.metrics.applying(MsgType.PUBLISH):
            ack = self.node.publish(body, self.clock())
        # Logged in the same loop step as the apply, so a snapshot copy sees both or neither.
        wal = self.persistence.wal
        ticket = self.persistence.wal_append(body["model"], data) if wal is not None else None
        # Its pushes leave once it is durable here, just after the answer is written:
        # encoding them and waking the peers while the log's fsync ran, or before the
        # answer, put the peers' CPU ahead of this acknowledgement.
        if ticket is not None:
            assert wal is not None
            try:
                await wal.durable(ticket)
            except WalError as e:
                self.driver.send_out()   # applied here all the same
                raise RequestRejected(f"{e}: the update is applied here but not durable; retry",
                                      "wal_error") from None
        self.metrics.published_rows.labels(body["model"]).inc(ack.rows)
        answer: dict[str, Any] = {"ok": True, "rows": ack.rows, "applied": ack.applied,
                                  "max_counter": ack.max_counter}
        if ack.shadowed:
            answer["shadowed"] = {t: {"count": len(ids), "ids": ids[:MAX_SHADOWED_LISTED].tolist(),
                                      "by": by[:MAX_SHADOWED_LISTED].tolist()}
                                  for t, (ids, by) in ack.shadowed.items()}
            n = sum(len(ids) for ids, _ in ack.shadowed.values())
            self.metrics.shadowed_rows.labels(body["model"]).inc(n)
            log.warning("publish of %s by origin %s: %d row(s) already held at greater versions "
                        "(their values did not apply; a clock ahead, or another publisher)",
                        body["model"], body.get("origin"), n)
        rollbacks = rollback_keys(self.node, body["model"])
        if rollbacks:  # the publisher learns of rollbacks from its acknowledgements
            answer["rollbacks"] = rollbacks
        return answer

    async def _route_publish(self, parts: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """A placed model's publish: this replica's part applied and logged here, the others
        relayed to their holders at once; acknowledged when every part is
        (:mod:`ekko.server.placed_routes`)."""
        local = parts.pop(self.node.node_id, None)
        self.metrics.routed_parts.inc(len(parts))
        remote = [asyncio.ensure_future(self.routes.publish(n, p)) for n, p in sorted(parts.items())]
        try:
            answers = []
            if local is not None:
                local_data = encode_frame(MsgType.PUBLISH, local, self.routes.keyring)
                answers.append(await self._apply_logged(local, local_data))
            answers += await asyncio.gather(*remote)
        finally:
            for f in remote:
                if not f.done():
                    f.cancel()
        return merge_acks(answers)

    async def gossip(self, request: web.Request) -> web.Response:
        """``POST /v1/gossip``: one peer message (:data:`PEER_TYPES`)."""
        self._take_peer_frame(await self.frames.read_frame(request), request.remote or "")
        return web.Response(status=204)

    async def gossip_stream(self, request: web.Request) -> web.WebSocketResponse:
        """``GET /v1/gossip/stream``: a peer's stream of messages, one frame per binary message."""
        if self._streams_closed:
            raise RequestRejected("replica is shutting down; retry on another replica", "draining")
        if len(self.streams) >= MAX_PEER_STREAMS:
            raise RequestRejected(f"{MAX_PEER_STREAMS} peer streams are open", "overloaded")
        ws = web.WebSocketResponse(max_msg_size=MAX_FRAME_BYTES + 1, compress=False, heartbeat=STREAM_HEARTBEAT_S,
                                   timeout=STREAM_CLOSE_TIMEOUT_S)
        peer = request.remote or ""
        try:
            await ws.prepare(request)
        except ConnectionError:
            # The peer (or a proxy) reset the connection during the upgrade.  Not the
            # unprepared ``ws``: aiohttp would finish it with write_eof(), which raises
            # RuntimeError("Call .prepare() first") -- a traceback in the log (seen once
            # in bench/nemesis.py, seed 2).  A plain answer goes nowhere, quietly.
            raise RequestRejected("the connection was reset during the upgrade", "reset") from None
        self.streams.add(ws)
        try:
            async for msg in ws:
                if msg.type != WSMsgType.BINARY:
                    continue   # peers send frames only; anything else is ignored
                try:
                    # The node refuses versions too far ahead of its wall clock; tell it what that is.
                    self.node.wall_offset_s = time.time() - self.clock()
                    self._take_peer_frame(await self.frames.decode(msg.data), peer)
                except (ProtocolError, RequestRejected) as e:
                    await self._refuse(ws, str(e), e.reason)
                except UsageError as e:
                    await self._refuse(ws, str(e), "bad_request")
                except Exception:
                    log.exception("bug while handling a frame of the peer stream from %s", peer)
                    self.metrics.internal_errors.labels(GOSSIP_ENDPOINT).inc()
                    await self._refuse(ws, "internal error (logged)", "internal", 500)
        except ConnectionError:
            pass   # reset while answering a refusal: the stream is over, as when the peer closes it
        finally:
            self.streams.discard(ws)
        return ws

    async def _refuse(self, ws: web.WebSocketResponse, message: str, reason: str, status: int | None = None) -> None:
        """Tell a peer its frame was refused (it counts ``http_<status>``), as a POST's answer would."""
        self.metrics.reject(GOSSIP_ENDPOINT, reason)
        if not ws.closed:
            await ws.send_str(json.dumps({"status": status or status_of(reason), "reason": reason, "error": message}))

    async def close_streams(self) -> None:
        """Close every peer stream and refuse new ones (shutdown: peers find another way)."""
        self._streams_closed = True
        await asyncio.gather(*(ws.close(code=WSCloseCode.GOING_AWAY, message=b"replica is shutting down")
                               for ws in list(self.streams)), return_exceptions=True)

    def _take_peer_frame(self, frame: Frame, peer: str) -> None:
        """Hand one peer frame to the node and send what it produced."""
        if frame.msg_type not in PEER_TYPES:
            raise RequestRejected(f"{frame.msg_type.name} is not a peer message; use its own endpoint",
                                  "bad_type")
        with self.metrics.applying(frame.msg_type):
            self.node.receive(frame, self.clock(), peer)
        self.driver.send_out()
        sender = frame.body.get("from")
        # The sender's DC as our member list has it (not a "dc" field of the body: a label
        # value taken from the wire would let any sender grow the metric without bound).
        dc = self.driver.dc_of(sender) if isinstance(sender, str) else UNKNOWN_DC
        self.metrics.bytes_received.labels(dc, frame.msg_type.name).inc(frame.wire_bytes)
