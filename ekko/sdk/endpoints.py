"""Talking to replicas, the pure parts: endpoint addresses, the signing key, and the
error and ``Retry-After`` headers of an answer (see ``docs/http-api.md``).
The I/O that uses them is :class:`ekko.sdk.transport.ReplicaTransport`.
"""

from __future__ import annotations

import email.utils
import json
import os
import time
from typing import Sequence

from ekko.core.codec import Keyring
from ekko.core.errors import UsageError
from ekko.core.keyring import load_keyring


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


def parse_endpoints(endpoints: str | Sequence[str]) -> list[str]:
    """A list of endpoints, or one comma-separated string, normalized; at least one.

    Example:
        >>> parse_endpoints("127.0.0.1:7070, http://127.0.0.1:7071/")
        ['http://127.0.0.1:7070', 'http://127.0.0.1:7071']
    """
    if isinstance(endpoints, str):
        endpoints = [e for e in endpoints.split(",") if e.strip()]
    eps = [normalize_endpoint(e) for e in endpoints]
    if not eps:
        raise UsageError("give at least one endpoint")
    return eps


def load_key(key: bytes | str | Keyring | os.PathLike | None) -> Keyring | None:
    """The keyring to sign frames with: a cluster key, a keyring, or a keyring file (a path)."""
    if key is None or isinstance(key, Keyring):
        return key
    if isinstance(key, os.PathLike):
        # A keyring file (ekko keys): sign with its primary -- a publisher key under an ACL.
        return load_keyring(key)
    return Keyring.single(key)


def error_text(raw: bytes) -> tuple[str, str]:
    """(message, reason) of an error body in the contract's JSON shape, best effort."""
    try:
        d = json.loads(raw)
        if isinstance(d, dict):
            return str(d.get("error", "")), str(d.get("reason", ""))
    except ValueError:
        pass
    return raw[:200].decode("utf-8", "replace"), ""


def retry_after(value: str | None) -> float | None:
    """Seconds a ``Retry-After`` header asks us to wait (delta-seconds or an HTTP date), or None."""
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
