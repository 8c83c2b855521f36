"""HTTP client transport: sends a replica's outgoing messages to its peers.

The daemon (:mod:`ekko.server.daemon`) drains :class:`ekko.core.messages.Outgoing` messages
from the sans-IO node and hands each to :meth:`HttpTransport.send`, which
encodes it as a frame (signed when the cluster has a key) and POSTs it to
``http://{address}/v1/gossip`` in a background task.

Design rules, because the node loop must never wait on the network:

* ``send`` is synchronous and returns at once; the POST runs in a task.
* One shared :class:`aiohttp.ClientSession` whose connector keeps connections
  alive and caps connections per host, so a busy link reuses a few sockets
  instead of opening one per message.
* At most :data:`PER_PEER_CONCURRENCY` POSTs run at once per peer address and
  at most :data:`MAX_PEER_BACKLOG` wait behind them; at most
  :data:`MAX_IN_FLIGHT` tasks exist in total.  Over either bound the message is
  dropped and counted: every message type is repaired by a later round
  (gossip repeats, anti-entropy re-pulls, pushed rows are found by
  anti-entropy), so dropping is safe where queueing without bound is not.
* A push goes to several peers with the same body (the node shares one wire form of
  the rows among them): it is encoded -- msgpack, zstd, HMAC -- once, and the same
  bytes are POSTed to each (:meth:`HttpTransport._frame_of`).
* A peer in this replica's own DC gets a body compressed only where that pays
  (``min_saving_of``, see :data:`ekko.core.codec.COMPRESS_MIN_SAVING`): float32
  rows are sent as they are on the LAN, still compressed across DCs.
* Short timeouts; failures (refused, timeout, non-2xx) are counted per reason,
  never raised.  A dead peer is the failure detector's business, not ours.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from functools import partial
from typing import Any, Callable

import aiohttp

from ekko.core.codec import Keyring, MsgType, encode_frame
from ekko.core.errors import UsageError
from ekko.core.messages import Outgoing

log = logging.getLogger("ekko.transport")

#: POSTs running at once to one peer address (also the connector's per-host limit).
PER_PEER_CONCURRENCY = 4
#: messages allowed to wait for one peer beyond those running; more are dropped.
MAX_PEER_BACKLOG = 64
#: send tasks in existence at once, all peers together; more are dropped.
MAX_IN_FLIGHT = 1024
#: total connections the shared connector keeps (all peers).
CONNECTOR_LIMIT = 256
#: seconds to establish a TCP connection (a peer that does not answer SYN is down).
CONNECT_TIMEOUT_S = 2.0
#: seconds for a whole POST: a pull answer is at most a few MiB.
SEND_TIMEOUT_S = 10.0
#: bodies at least this large are encoded (msgpack + zstd + HMAC) on a worker thread
#: so that a multi-MiB pull answer does not stall the event loop.
ENCODE_OFFLOAD_BYTES = 256 << 10
#: seconds cancelled sends get to unwind at close.
CLOSE_TIMEOUT_S = 2.0
#: path every peer message is POSTed to.
GOSSIP_PATH = "/v1/gossip"
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


class HttpTransport:
    """Fire-and-forget sender of peer messages over HTTP.

    Args:
        keyring: cluster keys; frames are signed with its primary key when set.
        on_sent: ``callback(out, nbytes)`` after a peer accepted a frame (metrics).
        on_failed: ``callback(out, reason)`` when a send failed or was dropped.
        on_frame: ``callback(reused)`` per frame a send needed: True when an equal send's
            encoded frame served (see the module doc), False when it was encoded.
        min_saving_of: ``out -> fraction`` that compression must save for ``out``'s
            frame to go compressed (``encode_frame``'s ``min_saving``); None: 0.0.
        max_in_flight / per_peer / backlog: the bounds described in the module doc.
        timeout_s / connect_timeout_s: per-POST timeouts.

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
                 on_frame: Callable[[bool], None] | None = None,
                 max_in_flight: int = MAX_IN_FLIGHT, per_peer: int = PER_PEER_CONCURRENCY,
                 backlog: int = MAX_PEER_BACKLOG, timeout_s: float = SEND_TIMEOUT_S,
                 connect_timeout_s: float = CONNECT_TIMEOUT_S,
                 min_saving_of: Callable[[Outgoing], float] | None = None) -> None:
        self.keyring = keyring
        self.min_saving_of = min_saving_of
        self.on_sent = on_sent
        self.on_failed = on_failed
        self.on_frame = on_frame
        self.max_in_flight = max_in_flight
        self.per_peer = per_peer
        self.backlog = backlog
        self.timeout = aiohttp.ClientTimeout(total=timeout_s, connect=connect_timeout_s)
        self.session: aiohttp.ClientSession | None = None
        self.sent: Counter[str] = Counter()       # message type -> frames accepted by peers
        self.failures: Counter[str] = Counter()   # reason -> sends that failed or were dropped
        self.bytes_sent = 0
        self._tasks: set[asyncio.Task] = set()
        self._sems: dict[str, asyncio.Semaphore] = {}
        self._pending: Counter[str] = Counter()   # address -> tasks not yet finished
        # share_key -> [frame or None, sends not yet finished, the body (keeps the ids
        # in the key alive), keyring it was signed with]
        self._shared: dict[tuple[Any, ...], list[Any]] = {}
        self.frames_encoded = 0
        self.frames_reused = 0
        self._closed = False

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=CONNECTOR_LIMIT, limit_per_host=self.per_peer,
                                         enable_cleanup_closed=True)
        self.session = aiohttp.ClientSession(connector=connector, timeout=self.timeout,
                                             headers={"Content-Type": "application/octet-stream"})

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    def send(self, out: Outgoing) -> bool:
        """Queue one message for sending; False when it was dropped (counted)."""
        if self._closed or self.session is None:
            self._fail(out, "closed")
            return False
        if len(self._tasks) >= self.max_in_flight:
            self._fail(out, "dropped_in_flight")
            return False
        if self._pending[out.address] >= self.per_peer + self.backlog:
            self._fail(out, "dropped_backlog")
            return False
        self._pending[out.address] += 1
        min_saving = self.min_saving_of(out) if self.min_saving_of is not None else 0.0
        key = share_key(out)
        if key is not None:
            key = (min_saving, *key)
            entry = self._shared.get(key)
            if entry is None:
                self._shared[key] = [None, 1, out.body, self.keyring]
            else:
                entry[1] += 1
        task = asyncio.get_running_loop().create_task(self._post(out, key, min_saving))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    def _fail(self, out: Outgoing, reason: str) -> None:
        self.failures[reason] += 1
        if self.on_failed is not None:
            self.on_failed(out, reason)

    async def _frame_of(self, out: Outgoing, key: tuple[Any, ...] | None, min_saving: float = 0.0) -> bytes:
        """The encoded frame of ``out``: the one already made for an equal send, if any."""
        entry = self._shared.get(key) if key is not None else None
        if entry is not None and entry[0] is not None and entry[3] is self.keyring:
            self.frames_reused += 1
            if self.on_frame is not None:
                self.on_frame(True)
            return entry[0]
        keyring = self.keyring
        if estimated_size(out) >= ENCODE_OFFLOAD_BYTES:
            # The body holds only immutable bytes/ints/strs, so a worker thread may read it.
            frame = await asyncio.get_running_loop().run_in_executor(
                None, partial(encode_frame, out.msg_type, out.body, keyring, min_saving=min_saving))
        else:
            frame = encode_frame(out.msg_type, out.body, keyring, min_saving=min_saving)
        self.frames_encoded += 1
        if self.on_frame is not None:
            self.on_frame(False)
        if entry is not None:
            entry[0], entry[3] = frame, keyring  # signed with the keyring in use now
        return frame

    def _release(self, key: tuple[Any, ...] | None) -> None:
        entry = self._shared.get(key) if key is not None else None
        if entry is not None:
            entry[1] -= 1
            if entry[1] <= 0:
                del self._shared[key]

    async def _post(self, out: Outgoing, key: tuple[Any, ...] | None = None, min_saving: float = 0.0) -> None:
        addr = out.address
        try:
            sem = self._sems.get(addr)
            if sem is None:
                sem = self._sems[addr] = asyncio.Semaphore(self.per_peer)
            async with sem:
                try:
                    frame = await self._frame_of(out, key, min_saving)
                except UsageError as e:
                    log.warning("cannot encode %s for %s: %s", out.msg_type.name, addr, e)
                    self._fail(out, "encode")
                    return
                assert self.session is not None
                async with self.session.post(f"http://{addr}{GOSSIP_PATH}", data=frame) as resp:
                    await resp.read()
                    if resp.status >= 300:
                        self._fail(out, f"http_{resp.status}")
                        return
                self.sent[out.msg_type.name] += 1
                self.bytes_sent += len(frame)
                if self.on_sent is not None:
                    self.on_sent(out, len(frame))
        except asyncio.TimeoutError:
            self._fail(out, "timeout")
        except (aiohttp.ClientConnectorError, ConnectionError):
            self._fail(out, "connect")
        except aiohttp.ClientError:
            self._fail(out, "http_error")
        except asyncio.CancelledError:
            self._fail(out, "cancelled")
            raise
        except Exception:  # a bug in a callback must not kill the loop; log it loudly
            log.exception("unexpected error sending %s to %s", out.msg_type.name, addr)
            self._fail(out, "internal")
        finally:
            self._release(key)
            self._pending[addr] -= 1
            if self._pending[addr] <= 0:
                del self._pending[addr]

    async def flush(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the sends in flight; True when all finished."""
        if not self._tasks:
            return True
        _, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
        return not pending

    async def close(self, timeout: float = 0.0) -> None:
        """Stop accepting sends, give those in flight ``timeout`` seconds, cancel the rest."""
        self._closed = True
        if timeout > 0:
            await self.flush(timeout)
        left = set(self._tasks)
        for t in left:
            t.cancel()
        if left:
            # Bounded: never let a send that ignores its cancellation hold up shutdown.
            _, stuck = await asyncio.wait(left, timeout=CLOSE_TIMEOUT_S)
            if stuck:
                log.warning("%d sends did not stop within %.0fs of being cancelled", len(stuck), CLOSE_TIMEOUT_S)
        if self.session is not None:
            await self.session.close()
            self.session = None
