"""The daemon's start-up check for a namesake: is a replica with this node id alive in
the cluster at another address?

Joining under a live replica's node id would not fail: the newcomer's higher
incarnation wins in the membership protocol, the live replica's entry is replaced
and the two fight over one name.  So before it touches its data dir, a daemon asks
its seeds for their member lists (``GET /v1/status?cluster=1``) and, for every
address at which one of them lists its node id as alive or suspect, asks that
address itself (``GET /v1/status``).  Only an answer from a replica of that node id
counts: a restarted replica whose old process is dead (and not yet declared dead by
the others) is found unreachable there, and starts as it always did.

Example::

    live = await live_namesake("r1", "127.0.0.1:7071", ["127.0.0.1:7070"])
    if live is not None:
        raise UsageError(f"node id r1 is alive at {live}")
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Sequence

import aiohttp

from ekko.core import read_auth
from ekko.core.codec import Keyring

log = logging.getLogger("ekko.server.daemon")

#: seconds one request of the check may take (a seed that does not answer in time is
#: skipped, as it would be by the join itself).
JOIN_CHECK_TIMEOUT_S = 2.0
#: member states in which a namesake is taken for alive (dead members are left alone).
LIVE_STATES = ("alive", "suspect")


async def _status(session: aiohttp.ClientSession, address: str, cluster: bool,
                  keyring: Keyring | None = None) -> dict[str, Any] | None:
    url = f"http://{address}/v1/status" + ("?cluster=1" if cluster else "")
    try:
        async with session.get(url, headers=read_auth.read_headers(keyring, url)) as r:
            if r.status != 200:
                return None
            answer = await r.json(content_type=None)
            return answer if isinstance(answer, dict) else None
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as e:
        log.debug("join check: %s: %s", url, e)
        return None


def _namesake_addresses(view: dict[str, Any], node_id: str, address: str) -> set[str]:
    """Addresses other than ``address`` at which one seed's view has ``node_id`` alive."""
    found = set()
    if view.get("node_id") == node_id and view.get("address") != address:
        found.add(str(view.get("address")))
    for m in view.get("members") or []:
        if (isinstance(m, dict) and m.get("node_id") == node_id and m.get("state") in LIVE_STATES
                and m.get("address") != address):
            found.add(str(m.get("address")))
    return found


async def live_namesake(node_id: str, address: str, seeds: Sequence[str],
                        timeout: float = JOIN_CHECK_TIMEOUT_S, keyring: Keyring | None = None) -> str | None:
    """The address of a live replica named ``node_id`` at an address other than
    ``address`` (ours), as found through ``seeds``; None when there is none (or no seed
    answers).  ``keyring`` (the daemon's: its cluster key) signs the reads: a keyed
    replica answers unsigned ones with 401 (:mod:`ekko.core.read_auth`)."""
    others = [s for s in seeds if s != address]
    if not others:
        return None
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        views = await asyncio.gather(*(_status(session, s, True, keyring) for s in others))
        candidates = set().union(*(_namesake_addresses(v, node_id, address) for v in views if v is not None))
        for cand in sorted(candidates):
            st = await _status(session, cand, False, keyring)
            if st is not None and st.get("node_id") == node_id:
                return cand
    return None
