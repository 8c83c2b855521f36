"""``GET /v1/models/{model}/changes``: the change feed of a daemon (see
:mod:`ekko.replica.change_log` for what a reader may rely on).

Query: ``since=EPOCH-SEQ`` (absent: start now: an answer with no rows and the current
cursor), ``wait=SECONDS`` (a long poll: with nothing new, answer as soon as something
changes or after that long; at most :data:`MAX_WAIT_S`; default 0), ``limit=ROWS``
(at most :data:`~ekko.replica.change_log.MAX_ANSWER_ROWS`).  The answer is msgpack::

    {"model", "cursor": "EPOCH-SEQ", "reset": bool, "more": bool,
     "tables": {table: {"n", "dim", "dtype", "ids", "versions", "values"}}}

``ids`` and ``versions`` little-endian int64 bytes, ``values`` the table's wire dtype;
each row with the value and version this replica holds when it answers.  ``more``:
the answer stopped at ``limit``; ask again at once.  A reader follows the feed by asking
with the cursor of each answer (:meth:`ekko.sdk.client.Client.watch`).

Example::

    GET /v1/models/ranker/changes                      -> cursor "1733.., rows none
    GET /v1/models/ranker/changes?since=1733..-0&wait=10  -> the rows of the next publish
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

import msgpack
import numpy as np
from aiohttp import web

from ekko.core.errors import UsageError
from ekko.core.hashed import keys_of, values_of
from ekko.core.store import to_wire_values
from ekko.replica.change_log import MAX_ANSWER_ROWS, ChangeLog
from ekko.replica.node import ReplicaNode
from ekko.server.frames import RequestRejected

#: longest long poll, seconds.
MAX_WAIT_S = 60.0


class ChangeFeed:
    """The change log of a node and its HTTP endpoint.

    Args:
        node: the replica; its apply and restore hooks feed the log.
        max_rows: rows the log keeps (readers further behind reset).

    Example::

        feed = ChangeFeed(node)
        app.router.add_get("/v1/models/{model}/changes", feed.changes)
    """

    def __init__(self, node: ReplicaNode, max_rows: int | None = None) -> None:
        self.node = node
        kw = {} if max_rows is None else {"max_rows": max_rows}
        self.log = ChangeLog(node.members.me.incarnation, **kw)
        self._changed: asyncio.Event | None = None
        node.on_apply.append(lambda m, t, res, source: self._note(m, t, res.ids))
        node.on_restore.append(self._note)

    def _note(self, model: str, table: str, ids: np.ndarray) -> None:
        self.log.note(model, table, ids)
        if self._changed is not None:
            self._changed.set()

    async def _wait(self, timeout: float) -> None:
        """Until something changes (any model) or ``timeout`` seconds pass."""
        if self._changed is None or self._changed.is_set():
            self._changed = asyncio.Event()
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    async def changes(self, request: web.Request) -> web.Response:
        """``GET /v1/models/{model}/changes?since=&wait=&limit=`` (see the module doc)."""
        model = request.match_info["model"]
        if model not in self.node.models:
            raise RequestRejected(f"unknown model {model!r}", "unknown_model")
        q = request.query
        wait = _number(q.get("wait", "0"), "wait", 0.0, MAX_WAIT_S)
        limit = int(_number(q.get("limit", str(MAX_ANSWER_ROWS)), "limit", 1, MAX_ANSWER_ROWS))
        since = q.get("since")
        if since is None:
            return _answer(model, {}, self.log.cursor(model), False, False, self.node)
        try:
            got = self.log.since(model, since, limit)
        except UsageError as e:
            raise RequestRejected(str(e), "bad_cursor") from None
        deadline = time.monotonic() + wait
        while not got.tables and not got.reset and time.monotonic() < deadline:
            await self._wait(deadline - time.monotonic())
            got = self.log.since(model, since, limit)
        return _answer(model, got.tables, got.cursor, got.reset, got.more, self.node)


def _number(raw: str, name: str, lo: float, hi: float) -> float:
    try:
        v = float(raw)
    except ValueError:
        raise RequestRejected(f"{name} must be a number, got {raw[:32]!r}", "bad_query") from None
    if not math.isfinite(v) or not lo <= v <= hi:
        raise RequestRejected(f"{name} must be within {lo:g}..{hi:g}", "bad_query")
    return v


def _answer(model: str, tables: dict[str, np.ndarray], cursor: str, reset: bool, more: bool,
            node: ReplicaNode) -> web.Response:
    out: dict[str, Any] = {}
    for table, ids in tables.items():
        spec = node.table_spec(model, table)
        if spec is None:
            continue
        rows = to_wire_values(node.read_rows(model, table, ids))
        wire = values_of(rows, spec)
        versions = node.table_store(model, table).versions[ids]
        out[table] = {"n": len(ids), "dim": spec.dim, "dtype": spec.dtype,
                      "ids": ids.astype("<i8").tobytes(), "versions": versions.astype("<i8").tobytes(),
                      "values": np.ascontiguousarray(wire).astype(wire.dtype.newbyteorder("<"), copy=False).tobytes()}
        if spec.hashed:   # each changed slot's key (EMPTY_KEY: the slot holds none now)
            out[table]["keys"] = keys_of(rows, spec).astype("<i8").tobytes()
    body = msgpack.packb({"model": model, "cursor": cursor, "reset": reset, "more": more, "tables": out},
                         use_bin_type=True)
    return web.Response(body=body, content_type="application/msgpack")
