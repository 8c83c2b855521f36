"""Publishes and reads of placed models, routed to the shards' holders (issue #18).

A replica keeps only the shards of a placed model the placement gives it
(:mod:`p2p.placement`), yet a publisher or a reader may talk to any replica: the
replica it talks to routes.

* **Publish.** The frame is split by shard: rows of shards kept here are applied and
  logged here as any publish is; the rest go, as ``PUBLISH`` frames of the same versions
  and chain links (the publisher's origin, signed with this replica's peer key and
  marked ``relay``), to the first holder of their shards in this DC.  The publisher's
  acknowledgement waits for every part's: a replica acknowledges only rows that the
  replicas keeping them have made durable.  A part that fails (a holder unreachable, or
  placements that disagree while the member list changes) fails the publish with a 503:
  the publisher retries the same bytes, and parts already applied apply again as no-ops.
* **Read.** ``GET .../rows`` splits the ids (or a hashed table's keys, by
  :meth:`~ekko.core.spec.TableSpec.key_shards`) the same way, reads its own part, asks
  each holder for its part (``local=1``: answer from your store, do not route again) and
  merges in the order asked.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import msgpack
import numpy as np

from ekko.core import read_auth
from ekko.core.codec import Keyring, MsgType, delta_from_wire, delta_to_wire, encode_frame
from ekko.core.errors import ProtocolError
from ekko.replica.node import ReplicaNode
from ekko.server.frames import RequestRejected

#: seconds a routed part (a relayed publish, a read from a holder) may take.
ROUTE_TIMEOUT_S = 10.0


def split_publish(node: ReplicaNode, body: dict[str, Any], now: float) -> dict[str, dict[str, Any]] | None:
    """A placed model's publish body split by where its rows are kept: ``{node id: body}``
    (this node's part under its own id); None when the model is not placed (or not known
    here: the publish then fails as it always did).  Shards newly given to this node are
    taken first (:meth:`p2p.handoff.HandOff.take`), so that the split and the apply agree."""
    m = node.models.get(body.get("model")) if isinstance(body.get("model"), str) else None
    if m is None or not m.spec.placed:
        return None
    node.handoff.take(m, now)
    raw, chains = body.get("deltas"), body.get("chains")
    if not isinstance(raw, list) or not isinstance(chains, dict):
        return None   # malformed: node.publish says how
    parts: dict[str, dict[str, Any]] = {}
    me = node.node_id

    def part(dest: str) -> dict[str, Any]:
        got = parts.get(dest)
        if got is None:
            got = parts[dest] = {"model": body["model"], "origin": body.get("origin"), "deltas": [], "chains": {}}
            if dest != me:
                got["relay"] = me
        return got

    for wire in raw:
        d = delta_from_wire(wire, node.table_spec, values_required=node.with_values)
        spec = m.spec.table(d.table)
        entries = chains.get(d.table, [])
        if not isinstance(entries, list):
            return None
        held = m.held(d.table)
        if held is None:     # a table held everywhere (dense): this node's part
            part(me)["deltas"].append(wire)
            part(me)["chains"][d.table] = entries
            continue
        shards = spec.shards_of(d.ids)
        dest = node.placement.owners(m.spec, d.table, kept=held)[shards]
        for node_id in sorted(set(dest.tolist())):
            sel = dest == node_id
            p = part(node_id)
            p["deltas"].append(delta_to_wire(d.take(sel)))
            mine = set(np.unique(shards[sel]).tolist())
            p["chains"][d.table] = [e for e in entries if isinstance(e, list) and e and e[0] in mine]
    return parts


def merge_acks(answers: list[dict[str, Any]]) -> dict[str, Any]:
    """One acknowledgement of the parts' (rows and applied summed, the greatest counter,
    shadowed rows joined)."""
    out: dict[str, Any] = {"ok": True, "rows": 0, "applied": 0, "max_counter": 0}
    shadowed: dict[str, dict[str, Any]] = {}
    rollbacks: list[Any] = []
    for a in answers:
        out["rows"] += int(a.get("rows", 0))
        out["applied"] += int(a.get("applied", 0))
        out["max_counter"] = max(out["max_counter"], int(a.get("max_counter", 0)))
        for t, s in (a.get("shadowed") or {}).items():
            cur = shadowed.setdefault(t, {"count": 0, "ids": [], "by": []})
            cur["count"] += int(s.get("count", 0))
            cur["ids"] += list(s.get("ids", []))
            cur["by"] += list(s.get("by", []))
        for r in a.get("rollbacks") or []:
            if r not in rollbacks:
                rollbacks.append(r)
    if shadowed:
        out["shadowed"] = shadowed
    if rollbacks:
        out["rollbacks"] = rollbacks
    return out


class PlacedRoutes:
    """Sends the parts of routed publishes and reads to their holders.

    Args:
        node: the replica node (member addresses, placement).
        transport: the daemon's peer transport (its HTTP session and keyring).

    Example:
        :class:`ekko.server.ingest.IngestHandlers` relays a placed publish's parts::

            answers = await asyncio.gather(*(routes.publish(n, part) for n, part in remote.items()))
    """

    def __init__(self, node: ReplicaNode, transport: Any) -> None:
        self.node = node
        self.transport = transport

    def _address(self, node_id: str) -> str:
        mem = self.node.members.get(node_id)
        if mem is None:
            raise RequestRejected(f"holder {node_id} is not in the member list; retry", "incomplete")
        return mem.address

    def _session(self) -> aiohttp.ClientSession:
        s = self.transport.session
        if s is None:
            raise RequestRejected("the replica is starting; retry", "incomplete")
        return s

    @property
    def keyring(self) -> Keyring | None:
        return self.transport.keyring

    async def publish(self, node_id: str, body: dict[str, Any]) -> dict[str, Any]:
        """Send one part of a publish to its holder; its acknowledgement (JSON)."""
        url = f"http://{self._address(node_id)}/v1/publish"
        data = encode_frame(MsgType.PUBLISH, body, self.keyring)
        try:
            async with self._session().post(url, data=data, timeout=aiohttp.ClientTimeout(total=ROUTE_TIMEOUT_S)) as r:
                raw = await r.read()
                if r.status != 200:
                    raise RequestRejected(f"holder {node_id} answered {r.status} to its part of the publish "
                                          f"({raw[:200].decode(errors='replace')}); retry", "incomplete")
                return json.loads(raw)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            raise RequestRejected(f"holder {node_id} unreachable for its part of the publish "
                                  f"({type(e).__name__}); retry", "incomplete") from None

    async def read(self, node_id: str, path: str, by: str, ids: np.ndarray, filling_ok: bool = False
                   ) -> dict[str, Any]:
        """Rows of ``ids`` (or keys) from their holder, as its msgpack answer; it refuses
        rows of shards it is still filling unless ``filling_ok``."""
        extra = "&filling_ok=1" if filling_ok else ""
        return await self.get(node_id, f"{path}?format=msgpack{extra}&{by}={','.join(map(str, ids.tolist()))}")

    async def get(self, node_id: str, path_qs: str) -> dict[str, Any]:
        """A signed ``GET`` of ``path_qs`` (``local=1`` added) answered in msgpack by a holder."""
        url = f"http://{self._address(node_id)}{path_qs}{'&' if '?' in path_qs else '?'}local=1"
        try:
            async with self._session().get(url, headers=read_auth.read_headers(self.keyring, url),
                                           timeout=aiohttp.ClientTimeout(total=ROUTE_TIMEOUT_S)) as r:
                raw = await r.read()
                if r.status != 200:
                    raise RequestRejected(f"holder {node_id} answered {r.status} to a routed read "
                                          f"({raw[:200].decode(errors='replace')}); retry", "incomplete")
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            raise RequestRejected(f"holder {node_id} unreachable for a routed read ({type(e).__name__}); retry",
                                  "incomplete") from None
        try:
            return msgpack.unpackb(raw, raw=False)
        except (ValueError, msgpack.UnpackException) as e:
            raise ProtocolError(f"bad rows answer from {node_id}: {e}", "bad_body") from None
