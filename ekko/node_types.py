"""Messages a replica node hands to its driver, and what a publish returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ekko.codec import MsgType


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
    """What a publish did on the ingest replica."""

    rows: int
    applied: int
    max_counter: int
