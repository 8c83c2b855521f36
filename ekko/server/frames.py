"""Reading a request's frame: size limit, decoding, key and publisher checks.

Shared by the daemon's request handlers (:mod:`ekko.server.ingest`,
:mod:`ekko.server.operator_api`).  Bad input raises :class:`RequestRejected` (or the
codec's :class:`~ekko.core.errors.ProtocolError`); :class:`ekko.server.http_api.HttpApi`
turns either into a 4xx JSON answer.
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable

from aiohttp import web

from ekko.core.codec import MAX_FRAME_BYTES, Frame, Keyring, MsgType, decode_frame
from ekko.replica.node import ReplicaNode

#: seconds clients are asked to wait after a 429/503.
RETRY_AFTER_S = 1
#: frames at least this large are decoded (HMAC, zstd, msgpack) on a worker thread.  Above
#: the largest push frame (1 MiB of rows): a push decoded inline costs about 1 ms, and on
#: a busy host the hand-off (submit, the worker's wake-up, the GIL going back and forth)
#: cost more than that (issue #15).
DECODE_OFFLOAD_BYTES = 2 << 20

#: HTTP status for each rejection reason; anything else is 400.
_STATUS_OF_REASON = {
    "bad_mac": 401, "unauthenticated": 401,
    "too_large": 413, "too_many_ids": 413,
    "unknown_model": 404, "unknown_table": 404, "not_found": 404,
    "method_not_allowed": 405,
    "spec_conflict": 409,
    "not_holder": 421,   # Misdirected Request: a placed shard's rows go to its holder
    "forbidden": 403,
    "overloaded": 429, "queue_full": 429,
    "draining": 503, "memory": 503, "wal_error": 503, "incomplete": 503, "persist_error": 503,
}


def status_of(reason: str) -> int:
    """The HTTP status of a rejection reason (400 for any other); a peer stream's refusals carry it too."""
    return _STATUS_OF_REASON.get(reason, 400)


class RequestRejected(Exception):
    """Bad input found by a handler itself (not by the codec or the node)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class FrameReader:
    """Reads, decodes and authorizes the frames of requests to one node.

    Args:
        node: the replica node (told the wall clock's offset before each frame is
            applied: it refuses versions too far ahead of it).
        clock: protocol time source (seconds, monotonic).
        keyring: returns the current keyring (None: no keys); read once per request,
            so a reload (SIGHUP) in the middle of one does not mix two keyrings.

    Example:
        In a handler::

            frame = await frames.read_frame(request)
            frames.expect(frame, MsgType.CUT)
    """

    def __init__(self, node: ReplicaNode, clock: Callable[[], float],
                 keyring: Callable[[], Keyring | None]) -> None:
        self.node = node
        self.clock = clock
        self.keyring = keyring

    async def read_frame(self, request: web.Request) -> Frame:
        """Read and decode the request's body."""
        return await self.decode(await self.read_body(request))

    async def read_body(self, request: web.Request) -> bytes:
        """Read the request's body (at most MAX_FRAME_BYTES)."""
        if request.content_length is not None and request.content_length > MAX_FRAME_BYTES:
            # Refuse before reading: a declared oversize body is not worth receiving.
            raise RequestRejected(f"request body of {request.content_length} bytes exceeds "
                                  f"MAX_FRAME_BYTES={MAX_FRAME_BYTES}", "too_large")
        data = await request.read()
        # The node refuses versions too far ahead of its wall clock; tell it what that is.
        self.node.wall_offset_s = time.time() - self.clock()
        return data

    async def decode(self, data: bytes) -> Frame:
        """Decode a frame and check its MAC; a publisher key may only publish and register models."""
        keyring = self.keyring()  # one keyring per request, even if SIGHUP swaps it meanwhile
        if len(data) >= DECODE_OFFLOAD_BYTES:
            frame = await asyncio.get_running_loop().run_in_executor(None, decode_frame, data, keyring)
        else:
            frame = decode_frame(data, keyring)
        if keyring and keyring.reader(frame.key_id) is not None:
            raise RequestRejected(f"key {frame.key_id} is a reader key: it may only sign reads, not "
                                  f"{frame.msg_type.name} frames", "forbidden")
        if keyring and not keyring.is_peer(frame.key_id) and frame.msg_type not in (MsgType.PUBLISH,
                                                                                    MsgType.REGISTER_MODEL):
            raise RequestRejected(f"key {frame.key_id} is a publisher key: it may only publish and register "
                                  f"models, not send {frame.msg_type.name}", "forbidden")
        return frame

    def authorize_publisher(self, frame: Frame, model: str, origin: int | None) -> None:
        """Publisher authorization: with publisher keys configured, a publish (or a model
        registration) must be signed by a publisher key granted that model and origin."""
        keyring = self.keyring()
        if not keyring:
            return
        grant = keyring.grant(frame.key_id)
        if grant is None:
            # A peer relays parts of a placed model's publish (ekko.server.placed_routes)
            # after authorizing the publisher's frame itself; peers are trusted with rows
            # (they push them) already.
            if keyring.acl and frame.msg_type == MsgType.PUBLISH and "relay" not in frame.body:
                raise RequestRejected(f"publishes must be signed with a publisher key (this frame is signed "
                                      f"with peer key {frame.key_id})", "forbidden")
            return
        if not grant.allows(model, origin):
            who = f"model {model!r}" + (f" as origin {origin}" if origin is not None else "")
            raise RequestRejected(f"publisher key {frame.key_id} may not write {who}", "forbidden")

    @staticmethod
    def expect(frame: Frame, *types: MsgType) -> None:
        """Refuse a frame of another type than ``types``."""
        if frame.msg_type not in types:
            raise RequestRejected(f"{frame.msg_type.name} frame sent to an endpoint for "
                                  f"{'/'.join(t.name for t in types)}", "bad_type")
