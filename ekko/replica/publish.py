"""Validation of a publisher's frame for :meth:`ekko.replica.node.ReplicaNode.publish`.

A publish is validated whole before anything applies: :func:`parse_publish` checks
the body (model, origin, deltas, chains, clock bound) and :func:`checked_after`
decides which chain link a frame may claim in each shard.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from ekko.core.chain import RESTART_LINK
from ekko.core.codec import MAX_DELTAS_PER_MSG, delta_from_wire, field, int_field
from ekko.core.config import MAX_PUBLISH_ROWS
from ekko.core.delta import Delta
from ekko.core.errors import ProtocolError
from ekko.core.version import MAX_COUNTER, MAX_ORIGIN, counters_of, origins_of
from p2p.model_state import ModelState
from p2p.sync import ShardSync


def parse_publish(node: Any, body: dict[str, Any], now: float
                  ) -> tuple[ModelState, int, list[Delta], dict[str, dict[int, int]]]:
    """``(model state, origin, deltas, chains per table)`` of a publish body sent to
    ``node`` (a :class:`~ekko.replica.node.ReplicaNode`).  Raises :class:`ProtocolError`
    and changes nothing."""
    model = field(body, "model", str)
    m = node.models.get(model)
    if m is None:
        raise ProtocolError(f"unknown model {model!r}: register it first", "unknown_model")
    if node.baseline_pin:
        raise ProtocolError("this replica is a pinned baseline: publish to an online replica", "baseline")
    origin = int_field(body, "origin", 1, MAX_ORIGIN)
    raw = field(body, "deltas", list)
    if len(raw) > MAX_DELTAS_PER_MSG:
        raise ProtocolError("too many deltas in one publish", "too_large")
    deltas = [delta_from_wire(d, node.table_spec, values_required=node.with_values) for d in raw]
    if sum(len(d) for d in deltas) > MAX_PUBLISH_ROWS:
        raise ProtocolError(f"publish exceeds {MAX_PUBLISH_ROWS} rows", "too_large")
    # A publisher's clock may run ahead of ours by much less than a peer's knowledge
    # may: its versions would shadow every later update of those rows from a correct
    # clock (max_publish_ahead, documented in NodeConfig).
    node.refuse_future(deltas, now, "publish",
                       skew=min(node.config.max_publish_ahead, node.config.max_clock_skew))
    chains_raw = field(body, "chains", dict, optional=True, default={})
    chains: dict[str, dict[int, int]] = {}
    for d in deltas:
        if d.model != model:
            raise ProtocolError("delta for another model in a publish", "bad_body")
        if len(d) and (origins_of(d.versions) != origin).any():
            raise ProtocolError("publish versions must carry the publisher's origin", "bad_version")
        spec = m.spec.table(d.table)
        entries = chains_raw.get(d.table, [])
        if not isinstance(entries, list) or len(entries) > spec.num_shards:
            raise ProtocolError("bad chains", "bad_body")
        ch: dict[int, int] = {}
        for e in entries:
            if (not isinstance(e, list) or len(e) != 2 or not all(isinstance(x, int) for x in e)
                    or not 0 <= e[0] < spec.num_shards or not RESTART_LINK <= e[1] <= MAX_COUNTER):
                raise ProtocolError(f"bad chain entry {e!r}", "bad_body")
            ch[e[0]] = e[1]
        if len(d) and ch:
            # Every counter of a shard must exceed that shard's link: compared per row
            # against its shard's link (one vector op; shards without one claim -1).
            links = np.full(spec.num_shards, -1, np.int64)
            links[list(ch)] = list(ch.values())
            if (counters_of(d.versions) <= links[spec.shards_of(d.ids)]).any():
                raise ProtocolError("publish counters must exceed the chain's previous counter",
                                    "bad_version")
        chains[d.table] = ch
        held = m.held(d.table)
        if held is not None and len(d):
            # A placed table: an ingest acknowledges only rows it keeps (the daemon a
            # publisher talks to relays the other shards' rows to their holders:
            # ekko.server.placed_routes).
            shards = spec.shards_of(d.ids)
            missing = np.unique(shards[~held[shards]])
            if len(missing):
                first = node.placement.holders(m.spec, d.table, node.dc)[missing[:8], 0].tolist()
                raise ProtocolError(f"{d.table}: shards {missing[:8].tolist()} are not held by this replica "
                                    f"(their holders here: {first}): publish their rows to a holder",
                                    "not_holder")
    return m, origin, deltas, chains


def shard_spans(shards: np.ndarray, counters: np.ndarray) -> tuple[list[int], list[int], list[int]]:
    """Per shard that ``shards`` (the shard of each row) touches, in shard order: the
    shard, the least and the greatest counter of its rows -- one sort, not a pass over
    the rows per shard.

    Example:
        >>> shard_spans(np.array([3, 1, 3, 1, 0]), np.array([10, 11, 12, 13, 14]))
        ([0, 1, 3], [14, 11, 10], [14, 13, 12])
    """
    order = np.argsort(shards, kind="stable")
    s_sorted, c_sorted = shards[order], counters[order]
    starts = np.flatnonzero(np.r_[True, s_sorted[1:] != s_sorted[:-1]])
    return (s_sorted[starts].tolist(), np.minimum.reduceat(c_sorted, starts).tolist(),
            np.maximum.reduceat(c_sorted, starts).tolist())


def checked_after(sync: ShardSync, origin: int, after: int, first: int, upto: int, counters: Counter[str]) -> tuple[int, bool]:
    """The link a publish frame may claim in one shard: ``(after, urgent)``.

    ``after`` as sent, unless this replica knows of updates of ``origin`` to the
    shard between it and the frame's first counter ``first``.  A publisher chains
    a frame on its previous acknowledged one, so such updates exist only when its
    chain state is stale (restored from a backup, or lost and started over under
    the same origin); linking from ``after`` would claim them as part of this
    frame, and replicas would stop asking for them.  Such a frame, and one sent
    with :data:`~ekko.core.chain.RESTART_LINK`, is linked from just below its own
    counters instead -- or not at all (-1) when known updates reach into them --
    and the gap before it is probed at once (``urgent``, :mod:`p2p.gaps`).
    """
    k = sync.knowledge[origin]
    seen = k if k < first else -1
    overlap = k >= first
    for a, u in sync.pending.get(origin, ()):
        if u < first:
            seen = max(seen, u)
        elif a < upto:
            overlap = True
    if after == RESTART_LINK or after < seen:
        if after != RESTART_LINK:
            counters["stale_chains"] += 1
        return (-1 if overlap else first - 1), True
    return after, False
