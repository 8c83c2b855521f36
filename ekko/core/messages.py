"""Messages a replica node hands to its driver, what a publish returns, and what a
node learns once about a parsed push delta."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ekko.core.codec import MsgType


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A message the driver must send.

    Attributes:
        dst: destination node id ("" when only the address is known, e.g. a seed).
        address: destination address ("host:port" for the daemon).
        msg_type: frame type.
        body: msgpack-ready body.
        extra_bytes: value bytes not present in ``body`` (metadata mode), which a
            simulator adds to the encoded size.
    """

    dst: str
    address: str
    msg_type: MsgType
    body: dict[str, Any]
    extra_bytes: int = 0


@dataclass(frozen=True, slots=True)
class PublishAck:
    """What a publish did on the ingest replica.

    ``shadowed``: per table, ``(ids, versions)`` of the frame's rows that this replica
    already holds at a *greater* version (another publisher's, or this publisher's own
    from a clock that ran ahead), so the frame's values did not apply there and will
    not apply anywhere.  Re-sent rows (same version) and fenced rows are not listed.
    """

    rows: int
    applied: int
    max_counter: int
    shadowed: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class DeltaFacts:
    """What every receiver of a parsed push delta would otherwise derive from it again:
    the simulator shares one parsed delta among the receivers of a fan-out
    (:mod:`ekko.core.parse_cache`), so they are derived once, at the parse.

    Attributes:
        distinct: the delta's ids have no repeats.
        shards: the shard of each of its ids (aligned with ``ids``), read-only.
        shard_max: per shard of the table, the greatest version among its rows there
            (0 where it has none), read-only.
        max_version: its greatest packed version (0 when empty).
        links: its publish-chain links as ``[shard, origin, after, upto]`` lists, or None.

    Example:
        >>> f = DeltaFacts(True, np.array([0, 1]), np.array([7, 9]), 9, None)
        >>> f.max_version
        9
    """

    distinct: bool
    shards: np.ndarray
    shard_max: np.ndarray
    max_version: int
    links: list[list[int]] | None
