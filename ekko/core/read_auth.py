"""Signed reads: who may ``GET`` from a daemon that holds keys.

A daemon whose keyring holds any key (a cluster key from ``--key-file``, or a
keyring file: peer keys, with or without publisher and reader keys) answers every
read -- every ``GET`` (and ``HEAD``) but ``/healthz`` -- only when it carries a valid
signature:

* by a peer key (the cluster key): any read;
* by a *reader* key (``role: reader`` in a keyring file, optionally limited to
  ``models``; :class:`ekko.core.codec.ReaderGrant`): reads of a model it allows,
  and reads of no one model (``/v1/status``, ``/metrics``);
* by a *publisher* key: only ``GET /v1/models/{model}/rollbacks`` of a model its
  grant allows (what a publisher's rollback watch asks for).

Else 401 (no signature, a malformed or bad one, an unknown key, a stale time:
reason ``unauthenticated``) or 403 (a key not allowed that read: ``forbidden``).
A daemon with no key serves every read unsigned, as before.  The one opt-out is
``open_metrics`` (``ekko daemon --open-metrics``, ``EKKO_OPEN_METRICS``, or
``open_metrics = true`` in ``[daemon]``): ``/metrics`` is then served unsigned, for
Prometheus scrapers, which cannot compute this HMAC; every other read still needs a
signature.  The peer stream (``GET /v1/gossip/stream``) is not a read: each of its
frames carries its own HMAC.

The signature is one header, ``X-Ekko-Auth: v1 <key id> <unix ms> <hex HMAC>``, the
HMAC-SHA256 under that key of ``b"ekko-read\\0" + method + b"\\0" + path-and-query +
b"\\0" + unix ms``.  It is good for :data:`MAX_SKEW_S` either way of the daemon's clock
(a captured header can be replayed for that long, for that one path: reads only).
:func:`read_headers` gives the header for a GET; :class:`ekko.sdk.client.Client`
signs with it whenever it holds a key.

Example:
    >>> from ekko.core.codec import Keyring
    >>> kr = Keyring({4: b"reader-secret-0123"})
    >>> h = sign(kr, "GET", "/v1/status", now=1000.0)
    >>> verify(kr, h, "GET", "/v1/status", now=1001.0)
    4
    >>> list(read_headers(b"cluster-key-0123", "http://127.0.0.1:7070/metrics"))
    ['X-Ekko-Auth']
    >>> read_headers(None, "/v1/status")
    {}
"""

from __future__ import annotations

import hashlib
import hmac
import time
from urllib.parse import urlsplit

from ekko.core.codec import Keyring
from ekko.core.errors import ProtocolError

#: the request header that carries the signature.
HEADER = "X-Ekko-Auth"
#: seconds a signature stays good either way of the daemon's clock.
MAX_SKEW_S = 300.0
#: longest header value looked at.
MAX_HEADER_CHARS = 200


def _mac(key: bytes, method: str, path: str, ts_ms: int) -> str:
    msg = b"ekko-read\0" + method.encode() + b"\0" + path.encode() + b"\0" + str(ts_ms).encode()
    return hmac.new(key, msg, hashlib.sha256).hexdigest()


def sign(keyring: Keyring, method: str, path: str, now: float) -> str:
    """The header value that signs ``method path`` (path with its query) at ``now`` (unix s)
    with the keyring's primary key."""
    kid = keyring.primary
    if kid is None:
        raise ProtocolError("no key to sign with", "unauthenticated")
    ts = int(now * 1000)
    return f"v1 {kid} {ts} {_mac(keyring.keys[kid], method, path, ts)}"


def verify(keyring: Keyring, header: str | None, method: str, path: str, now: float) -> int:
    """The id of the key that signed this request; :class:`ProtocolError`
    (``unauthenticated``) when there is no valid signature."""
    if not header:
        raise ProtocolError(f"reads need a signature ({HEADER} header): this replica holds keys",
                            "unauthenticated")
    parts = header[:MAX_HEADER_CHARS].split(" ")
    if len(parts) != 4 or parts[0] != "v1" or not parts[1].isdigit() or not parts[2].isdigit():
        raise ProtocolError(f"malformed {HEADER} header", "unauthenticated")
    kid, ts = int(parts[1]), int(parts[2])
    key = keyring.keys.get(kid)
    if key is None:
        raise ProtocolError(f"unknown key id {kid}", "unauthenticated")
    if abs(ts / 1000 - now) > MAX_SKEW_S:
        raise ProtocolError(f"signature time is more than {MAX_SKEW_S:g} s from this replica's clock",
                            "unauthenticated")
    if not hmac.compare_digest(_mac(key, method, path, ts), parts[3]):
        raise ProtocolError("bad read signature", "unauthenticated")
    return kid


def read_headers(key: Keyring | bytes | str | None, target: str, now: float | None = None) -> dict[str, str]:
    """The headers that sign ``GET target`` with ``key`` (a keyring: its primary key; bytes or
    str: a cluster key, id 1, as ``--key-file`` gives it); ``{}`` when ``key`` is None or
    empty, so callers pass them to any daemon, keyed or not.

    ``target`` is the path with its query, as sent (``/v1/status?cluster=1``), or a whole
    URL (``http://host:port/metrics``: its path and query are signed).  A GET signed at
    ``now`` (unix seconds; default the clock now) is good for :data:`MAX_SKEW_S`.
    """
    if not key:
        return {}
    keyring = key if isinstance(key, Keyring) else Keyring.single(key)
    assert keyring is not None
    if "://" in target:
        parts = urlsplit(target)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return {HEADER: sign(keyring, "GET", target, time.time() if now is None else now)}
