"""HTTP to the replica endpoints of a publisher: one keep-alive
:class:`aiohttp.ClientSession`, POSTs retried with backoff and failover until a
replica answers 200 or the deadline passes, and best-effort GETs.

Which answers are retried and which are final is part of the delivery rules in
:mod:`ekko.sdk.async_publisher`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from typing import Any, Callable

import aiohttp

from ekko.core import read_auth
from ekko.core.codec import Keyring, MsgType, encode_frame
from ekko.core.errors import RemoteError, UsageError
from ekko.core.spec import ModelSpec
from ekko.sdk.ack import KeyRejected, PublishError
from ekko.sdk.endpoints import error_text, retry_after

# One logger for the whole publisher (its log lines have always come from this name).
log = logging.getLogger("ekko.sdk.publisher")

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
#: seconds of nothing but refused connections (or unknown host names) at every endpoint
#: after which a call gives up, when no endpoint has answered since the publisher was
#: made: wrong endpoints fail in seconds, not at the call's deadline.  Once a replica has
#: answered, refusals are taken for a restart and retried until the deadline.
UNREACHABLE_GIVE_UP_S = 5.0
#: connections kept per replica (publishes of different models may run at once).
CONNECTIONS_PER_HOST = 4
#: statuses after which nothing was applied and the same frame may go elsewhere.
_RETRY_CLEAN = {429, 503}
#: statuses that leave us unsure whether the replica applied the frame.
_RETRY_AMBIGUOUS = {500, 502, 504}


class ReplicaTransport:
    """The HTTP side of one publisher: its endpoints, session and retry loop.

    Args:
        endpoints: normalized endpoints (:func:`ekko.sdk.endpoints.parse_endpoints`);
            the first is tried first, the others on failure.
        keyring: signs the ``REGISTER_MODEL`` frame sent when a replica does not know
            a model yet, and the GETs of :meth:`get_json` (None: unsigned).

    Attributes:
        current: index of the endpoint that last answered 200 (tried first next time).
    """

    def __init__(self, endpoints: list[str], keyring: Keyring | None) -> None:
        self.endpoints = endpoints
        self.keyring = keyring
        self.current = 0
        self._session: aiohttp.ClientSession | None = None
        self._rng = random.Random()
        self._closed = False
        #: whether any endpoint has answered an HTTP request (any status) since we were made.
        self.answered = False

    async def close(self) -> None:
        """Close the session; later requests raise :class:`UsageError`."""
        self._closed = True
        if self._session is not None:
            await self._session.close()

    def session(self) -> aiohttp.ClientSession:
        """The keep-alive session (opened on first use, on the running loop)."""
        if self._closed:
            raise UsageError("publisher is closed")
        if self._session is None:
            connector = aiohttp.TCPConnector(limit_per_host=CONNECTIONS_PER_HOST)
            self._session = aiohttp.ClientSession(
                connector=connector, headers={"Content-Type": "application/octet-stream"},
                timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S, connect=CONNECT_TIMEOUT_S))
        return self._session

    async def post(self, path: str, data: bytes, deadline: float, what: str, timeout: float,
                   model: str | None = None, spec: ModelSpec | None = None,
                   kept: Callable[[], bool] | None = None) -> tuple[dict[str, Any], str]:
        """POST with retries and failover until a 200 or the deadline.

        ``timeout`` is the call's budget (for the error message); ``spec`` is registered
        at a replica that answers 404 for its model; ``kept()`` says, at the deadline,
        whether the frame stays pending (for the error).  Returns the JSON answer and the
        endpoint.  Raises :class:`PublishError` at the deadline, :class:`RemoteError` for
        a definitive refusal (:class:`KeyRejected` for a 401).  Raises
        :class:`PublishError` early, after :data:`UNREACHABLE_GIVE_UP_S`, when no endpoint
        has ever answered and every one refuses connections.
        """
        loop = asyncio.get_running_loop()
        session = self.session()
        attempts = 0
        last_status: int | None = None
        last_error = "no attempt made"
        n = len(self.endpoints)
        i = self.current
        registered_at: set[str] = set()
        # Endpoints that refused connections since the last other outcome, and since when.
        refusing: set[str] = set()
        refused_since: float | None = None
        gave_up = False
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            ep = self.endpoints[i % n]
            attempts += 1
            wait = None
            try:
                tmo = aiohttp.ClientTimeout(total=min(REQUEST_TIMEOUT_S, remaining),
                                            connect=min(CONNECT_TIMEOUT_S, remaining))
                async with session.post(ep + path, data=data, timeout=tmo) as r:
                    raw = await r.read()
                    status = r.status
                    wait = retry_after(r.headers.get("Retry-After"))
                self.answered = True
                refusing.clear()
                refused_since = None
                if status == 200:
                    self.current = i % n
                    try:
                        answer = json.loads(raw) if raw else {}
                    except ValueError:
                        answer = {}
                    return (answer if isinstance(answer, dict) else {}), ep
                msg, reason = error_text(raw)
                last_status, last_error = status, f"HTTP {status} from {ep}: {msg}"
                if status == 404 and spec is not None and ep not in registered_at and reason != "unknown_table":
                    # The catalog has not reached this replica yet: hand it the spec.
                    registered_at.add(ep)
                    await self._register_at(session, ep, spec, deadline)
                    continue
                if status == 401:
                    raise KeyRejected(f"{what}: {ep} rejected the key the frame is signed with ({msg}); "
                                      "check the cluster key (or keyring) given to the publisher", ep)
                if status not in _RETRY_CLEAN and status not in _RETRY_AMBIGUOUS:
                    raise RemoteError(f"{what}: {ep} refused it: HTTP {status}: {msg}", status, wait)
            except aiohttp.ClientConnectorError as e:   # refused, unknown host, no route
                last_status, last_error = None, f"{type(e).__name__} talking to {ep}: {e}"
                refusing.add(ep)
                refused_since = loop.time() if refused_since is None else refused_since
                if (not self.answered and len(refusing) == len(set(self.endpoints))
                        and loop.time() - refused_since >= UNREACHABLE_GIVE_UP_S):
                    gave_up = True
                    break
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
                last_status, last_error = None, f"{type(e).__name__} talking to {ep}: {e}"
                refusing.clear()
                refused_since = None
            log.debug("%s: attempt %d failed: %s", what, attempts, last_error)
            i += 1  # fail over to the next endpoint
            delay = min(BACKOFF_MAX_S, BACKOFF_INITIAL_S * 2 ** (attempts - 1)) * self._rng.uniform(0.5, 1.0)
            if wait is not None:
                # Jitter on top of Retry-After: publishers told the same wait by an overloaded
                # replica must not all come back in the same instant.
                delay = max(delay, min(wait, MAX_RETRY_AFTER_S)
                            * self._rng.uniform(1.0, 1.0 + RETRY_AFTER_JITTER))
            delay = min(delay, deadline - loop.time())
            if delay > 0:
                await asyncio.sleep(delay)
        is_kept = model is not None and kept is not None and kept()
        if gave_up:
            raise PublishError(
                f"{what}: no replica reachable: every endpoint ({', '.join(self.endpoints)}) refused the "
                f"connection for {UNREACHABLE_GIVE_UP_S:g}s after {attempts} attempts and none has answered "
                f"yet; check the endpoints. Last error: {last_error}"
                + ("; the frame is kept and re-sent first by the next publish" if is_kept else ""),
                model or "", attempts, last_status, is_kept)
        raise PublishError(
            f"{what}: not acknowledged within {timeout:g}s after {attempts} attempts at "
            f"{', '.join(self.endpoints)}; last error: {last_error}"
            + ("; the frame is kept and re-sent first by the next publish" if is_kept else ""),
            model or "", attempts, last_status, is_kept)

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
                    raise RemoteError(f"register {spec.name} at {ep}: {error_text(raw)[0]}", 409)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            pass  # the publish retry loop handles an unreachable replica

    async def get_json(self, path: str, timeout: float, endpoint: str | None = None,
                       raw: bool = False) -> tuple[Any, str] | None:
        """GET ``path`` from ``endpoint`` (else the endpoints in turn, the current one first);
        (answer, endpoint) or None when none answers 200 within ``timeout`` seconds each.
        ``raw``: the answer's bytes, not decoded as JSON.
        Signed with the keyring (a keyed replica refuses unsigned reads; a publisher key
        may read its models' rollbacks: :mod:`ekko.core.read_auth`)."""
        session = self.session()
        eps = [endpoint] if endpoint else self.endpoints[self.current:] + self.endpoints[:self.current]
        for ep in eps:
            try:
                async with session.get(ep + path, headers=read_auth.read_headers(self.keyring, ep + path),
                                       timeout=aiohttp.ClientTimeout(total=timeout, connect=CONNECT_TIMEOUT_S)) as r:
                    if r.status == 200:
                        return (await r.read() if raw else await r.json(content_type=None)), ep
                    log.debug("GET %s%s: HTTP %d", ep, path, r.status)
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as e:
                log.debug("GET %s%s: %s", ep, path, e)
        return None
