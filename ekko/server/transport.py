"""Peer transport: sends a replica's outgoing messages to its peers, one stream per peer.

The daemon (:mod:`ekko.server.daemon`) drains :class:`ekko.core.messages.Outgoing` messages
from the sans-IO node and hands each to :meth:`HttpTransport.send`, which encodes it as a
frame (signed when the cluster has a key) and queues it on the *link* to the peer's
address.  A link is one WebSocket (``GET /v1/gossip/stream``, see ``docs/http-api.md``)
carrying one frame per binary message, in order.

Why a stream and not a POST per message (issue #15): on loopback a POST cost 220-320 us of
CPU per small message and ~600 us per 256 KiB one, both ends together; a WebSocket message
9 us and ~290 us (a raw socket ~10 / ~210 us).  A stream also keeps a peer's messages in
the order the node produced them, so later pushes never overtake earlier ones and wait on
their publish-chain links, which four POSTs in flight per peer did.

Design rules, because the node loop must never wait on the network:

* ``send`` is synchronous and returns at once; each link has one writer task.
* Flow control is TCP's: the writer awaits each write (``send_bytes`` drains the socket
  buffer), so a slow peer makes its link's queue grow, not the daemon's memory.  At most
  :data:`MAX_PEER_BACKLOG` messages wait per peer and :data:`MAX_IN_FLIGHT` in total;
  over either bound a message is dropped and counted: every message type is repaired by
  a later round (gossip repeats, anti-entropy re-pulls, pushed rows are found by
  anti-entropy), so dropping is safe where queueing without bound is not.
* A write that does not finish within ``timeout_s`` (a stopped peer) closes the stream; a
  peer that refuses or times out its connection gets none for a back-off
  (:data:`RECONNECT_MIN_S` doubling to :data:`RECONNECT_MAX_S`) during which its messages
  fail at once, unencoded.
* A push goes to several peers with the same body (the node shares one wire form of the
  rows among them): it is encoded -- msgpack, zstd, HMAC -- once, and the same bytes go to
  each (:meth:`HttpTransport._frame_of`).  Bodies of :data:`ENCODE_OFFLOAD_BYTES` or more
  are encoded on a worker thread.
* A peer in this replica's own DC gets a body compressed only where that pays
  (``min_saving_of``, see :data:`ekko.core.codec.COMPRESS_MIN_SAVING`): float32 rows are
  sent as they are on the LAN, and across DCs by ``NodeConfig.cross_dc_min_saving`` (any
  gain in the ``lan`` and ``wan`` presets; the LAN rule in ``local``).
* A peer refuses a frame (bad MAC, a publisher key, ...) with a text message
  ``{"status", "reason", "error"}`` on the stream; it is counted as ``http_<status>``,
  as the POST's answer was.  A peer without the stream endpoint (404 at the upgrade: a
  daemon from before it) gets a POST per message to ``/v1/gossip``, one at a time.
* Failures (refused, timeout, reset, refusals) are counted per reason, never raised.  A
  dead peer is the failure detector's business, not ours.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter, deque
from functools import partial
from typing import Any, Callable

import aiohttp

from ekko.core.codec import MAX_FRAME_BYTES, Keyring, MsgType, encode_frame
from ekko.core.errors import UsageError
from ekko.core.messages import Outgoing

log = logging.getLogger("ekko.transport")

#: messages allowed to wait on one peer's link (the one being written included); more are dropped.
MAX_PEER_BACKLOG = 64
#: messages a peer's link may hold queued before the node keeps further pushes to that
#: peer in its own link queue (:meth:`HttpTransport.push_room`), where they wait and
#: coalesce instead of being dropped at MAX_PEER_BACKLOG; the rest of the backlog stays
#: free for anti-entropy and membership messages.
PUSH_LINK_DEPTH = 8
#: messages queued on all links together; more are dropped.
MAX_IN_FLIGHT = 1024
#: total connections the shared connector keeps (all peers; one stream each, plus a legacy POST).
CONNECTOR_LIMIT = 256
#: seconds to establish a TCP connection (a peer that does not answer SYN is down).
CONNECT_TIMEOUT_S = 2.0
#: seconds for the stream's upgrade request, and for one message's write once connected.
SEND_TIMEOUT_S = 10.0
#: seconds a peer that refused a connection gets none; doubled per failure up to RECONNECT_MAX_S.
RECONNECT_MIN_S = 0.1
RECONNECT_MAX_S = 2.0
#: bodies at least this large are encoded (msgpack + zstd + HMAC) on a worker thread
#: so that a multi-MiB pull answer does not stall the event loop; push frames (at most
#: 1 MiB of rows) are encoded inline, which is cheaper than the hand-off (issue #15).
ENCODE_OFFLOAD_BYTES = 2 << 20
#: seconds cancelled sends get to unwind at close, and a stream's close waits for the
#: peer's answer (a stopped peer never gives one).
CLOSE_TIMEOUT_S = 2.0
#: path every peer message is POSTed to (one message per request; peers from before the stream).
GOSSIP_PATH = "/v1/gossip"
#: path of the peer stream (a WebSocket upgrade; one frame per binary message).
STREAM_PATH = "/v1/gossip/stream"
#: message types whose frames are shared by the sends of one body to several peers.
SHARED_TYPES = frozenset({MsgType.PUSH})


def share_key(out: Outgoing) -> tuple[Any, ...] | None:
    """What makes two sends' frames equal: the type and each body field (scalars by
    value, containers by identity: the node builds a push's deltas once for all its
    peers and never changes them).  None for messages encoded per send."""
    if out.msg_type not in SHARED_TYPES:
        return None
    return (out.msg_type, *((k, v if isinstance(v, (str, int, float, bool, type(None))) else id(v))
                            for k, v in out.body.items()))


def estimated_size(out: Outgoing) -> int:
    """Cheap upper-bound-ish size of a body: sum of its bytes payloads, one level deep."""
    n = 0
    for v in out.body.values():
        if isinstance(v, (bytes, bytearray)):
            n += len(v)
        elif isinstance(v, list):
            n += sum(len(d.get("x") or b"") + len(d.get("ids") or b"") for d in v if isinstance(d, dict))
    return n


def unmask(ws: aiohttp.ClientWebSocketResponse) -> None:
    """Send this peer stream's frames unmasked (where aiohttp's writer lets us).

    RFC 6455 has clients xor every frame with a random mask, against proxies that a
    browser's script could poison; aiohttp's client copies a frame twice to do it and
    its server copies it once more to undo it -- three copies and two passes over
    every multi-MB push, at each hop.  Peer streams run between daemons, every frame
    carries its own MAC, and aiohttp's server reads unmasked frames, so the stream's
    writer stops masking.  (``tests/server/test_peer_stream.py`` checks that this
    still takes with the aiohttp installed.)
    """
    writer = getattr(ws, "_writer", None)
    if isinstance(getattr(writer, "use_mask", None), bool):
        writer.use_mask = False


class _SendFailed(Exception):
    """A message could not go; ``reason`` is the failure it is counted under, and
    ``whole_queue`` says the link cannot be opened (every message queued on it fails)."""

    def __init__(self, reason: str, whole_queue: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.whole_queue = whole_queue


class _Link:
    """The stream to one peer address: its queue, its connection, its back-off."""

    __slots__ = ("address", "queue", "ws", "writer", "reader", "retry_at", "backoff", "legacy")

    def __init__(self, address: str) -> None:
        self.address = address
        # (message, share key, frame bytes or the future of its encoding)
        self.queue: deque[tuple[Outgoing, tuple[Any, ...] | None, Any]] = deque()
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.writer: asyncio.Task | None = None
        self.reader: asyncio.Task | None = None
        self.retry_at = 0.0     # monotonic time before which no connection is tried
        self.backoff = 0.0
        self.legacy = False     # the peer has no stream endpoint: POST each message

    def connected(self) -> bool:
        return self.legacy or (self.ws is not None and not self.ws.closed)


class HttpTransport:
    """Fire-and-forget sender of peer messages, one ordered stream per peer address.

    Args:
        keyring: cluster keys; frames are signed with its primary key when set.
        on_sent: ``callback(out, nbytes)`` once a frame was written to its peer's stream.
        on_failed: ``callback(out, reason)`` when a send failed or was dropped.
        on_rejected: ``callback(address, reason)`` when a peer refused a frame it received
            (``http_<status>``; the frame's own send already counted as sent).
        on_frame: ``callback(reused)`` per frame a send needed: True when an equal send's
            encoded frame served (see the module doc), False when it was encoded.
        min_saving_of: ``out -> fraction`` that compression must save for ``out``'s
            frame to go compressed (``encode_frame``'s ``min_saving``); None: 0.0.
        max_in_flight / backlog: the bounds described in the module doc.
        timeout_s / connect_timeout_s: the upgrade's and each write's timeouts.

    All methods run on the event loop thread.

    Example:
        >>> import asyncio
        >>> from ekko.core.codec import MsgType
        >>> async def demo():
        ...     t = HttpTransport()
        ...     await t.start()
        ...     ok = t.send(Outgoing("peer", "127.0.0.1:9", MsgType.GOSSIP, {"k": "g"}))
        ...     await t.close(timeout=5)
        ...     return ok, t.failures["connect"] + t.failures["timeout"] >= 1
        >>> asyncio.run(demo())
        (True, True)
    """

    def __init__(self, keyring: Keyring | None = None, *,
                 on_sent: Callable[[Outgoing, int], None] | None = None,
                 on_failed: Callable[[Outgoing, str], None] | None = None,
                 on_rejected: Callable[[str, str], None] | None = None,
                 on_frame: Callable[[bool], None] | None = None,
                 max_in_flight: int = MAX_IN_FLIGHT, backlog: int = MAX_PEER_BACKLOG,
                 timeout_s: float = SEND_TIMEOUT_S, connect_timeout_s: float = CONNECT_TIMEOUT_S,
                 min_saving_of: Callable[[Outgoing], float] | None = None) -> None:
        if backlog < 1 or max_in_flight < 1:
            raise UsageError("backlog and max_in_flight must be at least 1")
        self.keyring = keyring
        self.min_saving_of = min_saving_of
        self.on_sent = on_sent
        self.on_failed = on_failed
        self.on_rejected = on_rejected
        self.on_frame = on_frame
        self.max_in_flight = max_in_flight
        self.backlog = backlog
        self.timeout_s = timeout_s
        self.timeout = aiohttp.ClientTimeout(total=timeout_s, connect=connect_timeout_s)
        self.session: aiohttp.ClientSession | None = None
        self.sent: Counter[str] = Counter()       # message type -> frames written to peers
        self.failures: Counter[str] = Counter()   # reason -> sends that failed or were dropped
        self.bytes_sent = 0
        self.streams_opened = 0
        self._links: dict[str, _Link] = {}
        self._queued = 0
        self._idle = asyncio.Event()
        self._idle.set()
        # share_key -> [frame bytes or future, sends not yet finished, the body (keeps the
        # ids in the key alive), keyring it was signed with]
        self._shared: dict[tuple[Any, ...], list[Any]] = {}
        self.frames_encoded = 0
        self.frames_reused = 0
        self._closed = False

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=CONNECTOR_LIMIT, enable_cleanup_closed=True)
        self.session = aiohttp.ClientSession(connector=connector, timeout=self.timeout,
                                             headers={"Content-Type": "application/octet-stream"})

    @property
    def in_flight(self) -> int:
        """Messages queued on the links, the ones being written included."""
        return self._queued

    def send(self, out: Outgoing) -> bool:
        """Queue one message for sending; False when it was dropped (counted)."""
        if self._closed or self.session is None:
            self._fail(out, "closed")
            return False
        if self._queued >= self.max_in_flight:
            self._fail(out, "dropped_in_flight")
            return False
        link = self._links.get(out.address)
        if link is None:
            link = self._links[out.address] = _Link(out.address)
        if len(link.queue) >= self.backlog:
            self._fail(out, "dropped_backlog")
            return False
        if not link.connected() and time.monotonic() < link.retry_at:
            self._fail(out, "connect")   # backing off: not worth encoding
            return False
        min_saving = self.min_saving_of(out) if self.min_saving_of is not None else 0.0
        key = share_key(out)
        if key is not None:
            key = (min_saving, *key)
        try:
            frame = self._frame_of(out, key, min_saving)
        except UsageError as e:
            log.warning("cannot encode %s for %s: %s", out.msg_type.name, out.address, e)
            self._fail(out, "encode")
            return False
        link.queue.append((out, key, frame))
        self._queued += 1
        self._idle.clear()
        if link.writer is None:
            link.writer = asyncio.get_running_loop().create_task(self._write(link), name=f"ekko-link-{link.address}")
        return True

    def push_room(self, address: str) -> int:
        """How many more PUSH messages the link to ``address`` takes now (PUSH_LINK_DEPTH
        less what it holds queued); the node keeps the rest of its pushes until
        ``on_sent`` / ``on_failed`` report the link drained."""
        link = self._links.get(address)
        return PUSH_LINK_DEPTH - (len(link.queue) if link is not None else 0)

    def _fail(self, out: Outgoing, reason: str) -> None:
        self.failures[reason] += 1
        if self.on_failed is not None:
            self.on_failed(out, reason)

    def _frame_of(self, out: Outgoing, key: tuple[Any, ...] | None, min_saving: float = 0.0) -> Any:
        """The encoded frame of ``out`` (bytes, or a future of them when encoded on a worker
        thread): the one already made for an equal send, if any."""
        entry = self._shared.get(key) if key is not None else None
        if entry is not None and entry[3] is self.keyring:
            entry[1] += 1
            self.frames_reused += 1
            if self.on_frame is not None:
                self.on_frame(True)
            return entry[0]
        keyring = self.keyring
        if estimated_size(out) >= ENCODE_OFFLOAD_BYTES:
            # The body holds only immutable bytes/ints/strs, so a worker thread may read it.
            frame: Any = asyncio.get_running_loop().run_in_executor(
                None, partial(encode_frame, out.msg_type, out.body, keyring, min_saving=min_saving))
        else:
            frame = encode_frame(out.msg_type, out.body, keyring, min_saving=min_saving)
        self.frames_encoded += 1
        if self.on_frame is not None:
            self.on_frame(False)
        if key is not None:   # signed with the keyring in use now; a reload starts a new entry
            self._shared[key] = [frame, 1, out.body, keyring]
        return frame

    def _release(self, key: tuple[Any, ...] | None, frame: Any) -> None:
        entry = self._shared.get(key) if key is not None else None
        if entry is not None and entry[0] is frame:
            entry[1] -= 1
            if entry[1] <= 0:
                del self._shared[key]

    def _finish(self, link: _Link, reason: str | None, nbytes: int = 0) -> None:
        """Take the link's first message off its queue: sent (``reason`` None) or failed."""
        out, key, frame = link.queue.popleft()
        self._release(key, frame)
        self._queued -= 1
        if not self._queued:
            self._idle.set()
        if reason is not None:
            self._fail(out, reason)
            return
        self.sent[out.msg_type.name] += 1
        self.bytes_sent += nbytes
        if self.on_sent is not None:
            self.on_sent(out, nbytes)

    async def _write(self, link: _Link) -> None:
        """The link's writer: sends its queue in order until it is empty."""
        try:
            while link.queue:
                _, _, frame = link.queue[0]
                try:
                    if not isinstance(frame, bytes):
                        frame = await frame
                    if not link.connected():
                        await self._connect(link)
                    if link.legacy:
                        await self._post(link, frame)
                    else:
                        assert link.ws is not None
                        async with asyncio.timeout(self.timeout_s):
                            await link.ws.send_bytes(frame)
                except UsageError as e:
                    log.warning("cannot encode a message for %s: %s", link.address, e)
                    self._finish(link, "encode")
                except _SendFailed as e:
                    self._finish(link, e.reason)
                    while e.whole_queue and link.queue:   # in back-off: the link's whole queue fails now
                        self._finish(link, e.reason)
                except (TimeoutError, asyncio.TimeoutError):
                    self._drop_stream(link)
                    self._finish(link, "timeout")
                except (aiohttp.ClientError, ConnectionError):
                    # reset mid-stream, or written to a stream the peer had closed
                    self._drop_stream(link)
                    self._finish(link, "reset")
                else:
                    self._finish(link, None, len(frame))
        except asyncio.CancelledError:
            while link.queue:
                self._finish(link, "cancelled")
            raise
        except Exception:  # a bug in a callback must not kill the loop; log it loudly
            log.exception("unexpected error sending to %s", link.address)
            while link.queue:
                self._finish(link, "internal")
        finally:
            link.writer = None

    async def _connect(self, link: _Link) -> None:
        """Open the link's stream (or find that the peer only takes POSTs); raises _SendFailed."""
        assert self.session is not None
        now = time.monotonic()
        if now < link.retry_at:
            raise _SendFailed("connect", whole_queue=True)
        try:
            ws = await self.session.ws_connect(f"http://{link.address}{STREAM_PATH}", max_msg_size=MAX_FRAME_BYTES + 1,
                                               compress=0, autoping=True,
                                               timeout=aiohttp.ClientWSTimeout(ws_close=CLOSE_TIMEOUT_S))
        except aiohttp.WSServerHandshakeError as e:
            if e.status in (404, 405):
                log.info("peer %s has no %s: sending it a POST per message", link.address, STREAM_PATH)
                link.legacy = True
                return
            raise self._back_off(link, f"http_{e.status}") from None
        except (TimeoutError, asyncio.TimeoutError):
            raise self._back_off(link, "timeout") from None
        except (aiohttp.ClientError, ConnectionError, OSError):
            raise self._back_off(link, "connect") from None
        unmask(ws)
        link.ws, link.backoff = ws, 0.0
        self.streams_opened += 1
        link.reader = asyncio.get_running_loop().create_task(self._read(link, ws), name=f"ekko-link-read-{link.address}")

    def _back_off(self, link: _Link, reason: str) -> _SendFailed:
        link.backoff = min(RECONNECT_MAX_S, max(RECONNECT_MIN_S, 2 * link.backoff))
        link.retry_at = time.monotonic() + link.backoff
        return _SendFailed(reason, whole_queue=True)

    def _drop_stream(self, link: _Link) -> None:
        ws, link.ws = link.ws, None
        if ws is not None and not ws.closed:
            asyncio.get_running_loop().create_task(ws.close())

    async def _read(self, link: _Link, ws: aiohttp.ClientWebSocketResponse) -> None:
        """Reads the peer's answers on a stream: refusals of frames (and pings, answered by aiohttp)."""
        try:
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                try:
                    answer = json.loads(msg.data)
                    reason = f"http_{int(answer['status'])}"
                except (ValueError, KeyError, TypeError):
                    reason = "http_error"
                    answer = {"error": msg.data[:200]}
                self.failures[reason] += 1
                log.debug("peer %s refused a frame: %s", link.address, answer.get("error"))
                if self.on_rejected is not None:
                    self.on_rejected(link.address, reason)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.debug("stream to %s ended", link.address, exc_info=True)
        finally:
            if link.ws is ws:
                link.ws = None
            if link.reader is asyncio.current_task():
                link.reader = None

    async def _post(self, link: _Link, frame: bytes) -> None:
        """One message to a peer without the stream endpoint; raises _SendFailed on a non-2xx."""
        assert self.session is not None
        async with self.session.post(f"http://{link.address}{GOSSIP_PATH}", data=frame) as resp:
            await resp.read()
            if resp.status >= 300:
                raise _SendFailed(f"http_{resp.status}")

    async def flush(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the queued sends; True when all finished."""
        if not self._queued:
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    async def close(self, timeout: float = 0.0) -> None:
        """Stop accepting sends, give those queued ``timeout`` seconds, cancel the rest."""
        self._closed = True
        if timeout > 0:
            await self.flush(timeout)
        tasks = [t for link in self._links.values() for t in (link.writer, link.reader) if t is not None]
        for t in tasks:
            t.cancel()
        if tasks:
            # Bounded: never let a send that ignores its cancellation hold up shutdown.
            _, stuck = await asyncio.wait(tasks, timeout=CLOSE_TIMEOUT_S)
            if stuck:
                log.warning("%d sends did not stop within %.0fs of being cancelled", len(stuck), CLOSE_TIMEOUT_S)
        for link in self._links.values():
            if link.ws is not None and not link.ws.closed:
                try:
                    await asyncio.wait_for(link.ws.close(), CLOSE_TIMEOUT_S)
                except (asyncio.TimeoutError, aiohttp.ClientError, ConnectionError):
                    pass
            link.ws = None
        if self.session is not None:
            await self.session.close()
            self.session = None
