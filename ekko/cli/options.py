"""Options shared by several ``ekko`` subcommands: the replica to talk to (``--peer``,
or ``$EKKO_PEER``) and its validation.

Every command that talks to a replica takes ``--peer`` through :func:`add_peer_option`
and turns it into a base URL with :func:`resolve_peer`, so they all accept the same
forms as the SDK (``HOST:PORT``, ``http://HOST:PORT``) and all read ``$EKKO_PEER``
when the flag is left out.

Example::

    p = sub.add_parser("cuts")
    add_peer_option(p)
    ...
    base = resolve_peer(args)          # "http://127.0.0.1:7070"
"""

from __future__ import annotations

import argparse
import os
import urllib.parse
from typing import Mapping

from ekko.core.errors import UsageError

#: environment variable read when ``--peer`` is not given.
PEER_ENV = "EKKO_PEER"
#: URL schemes a peer may be given with (the SDK accepts the same).
PEER_SCHEMES = ("http", "https")


def add_peer_option(parser: argparse.ArgumentParser, help: str = "replica to talk to") -> None:
    """Add ``--peer`` to ``parser``: optional on the command line, since ``$EKKO_PEER``
    may give it; :func:`resolve_peer` checks that one of the two did."""
    parser.add_argument("--peer", metavar="HOST:PORT",
                        help=f"{help}: HOST:PORT or http://HOST:PORT (default: ${PEER_ENV})")


def peer_url(peer: str) -> str:
    """``HOST:PORT`` or ``http(s)://HOST:PORT[/]`` -> ``http(s)://HOST:PORT``; raises
    :class:`UsageError` naming the string for anything else.

    Example:
        >>> peer_url("127.0.0.1:27070"), peer_url("http://127.0.0.1:27070/")
        ('http://127.0.0.1:27070', 'http://127.0.0.1:27070')
    """
    text = peer.strip()
    url = text if "://" in text else "http://" + text
    try:
        parts = urllib.parse.urlsplit(url.rstrip("/"))
        port = parts.port
    except ValueError:  # a port that is not a number, or out of range
        port = None
        parts = None
    if (parts is None or parts.scheme not in PEER_SCHEMES or not parts.hostname or port is None
            or parts.path or parts.query or parts.fragment or parts.username or parts.password):
        raise UsageError(f"bad peer {peer!r}: expected HOST:PORT or http://HOST:PORT")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{host}:{port}"


def resolve_peer(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> str:
    """The base URL of the replica a command talks to: ``--peer``, else ``$EKKO_PEER``.

    Raises :class:`UsageError` when neither is given or the address is malformed.
    """
    env = os.environ if environ is None else environ
    peer = args.peer if args.peer is not None else env.get(PEER_ENV)
    if not peer:
        raise UsageError(f"no replica given: pass --peer HOST:PORT or set {PEER_ENV}")
    return peer_url(peer)
