"""What the rollback components need from the replica that holds them.

:class:`RollbackHost` lists the few attributes and methods that
:class:`rollback.protocol.RollbackProtocol` and its parts (model states, cut
exchange, repair) call on their node.  The replica's own types live above this
package, so they are typed loosely here.
"""

from __future__ import annotations

from collections import Counter
from random import Random
from typing import Any, Callable, Protocol

from ekko.core.config import NodeConfig
from ekko.core.messages import Outgoing


class RollbackHost(Protocol):
    """What :class:`RollbackProtocol` needs from the replica that holds it.

    Typed loosely where the replica's types live above this package: ``models`` maps
    names to per-model states (:class:`p2p.model_state.ModelState`: ``spec``,
    ``store``, ``shards``, ``index``, ``head``, ``recompute_top``), ``members`` is the
    member list (:class:`p2p.membership.Membership`).
    """

    node_id: str
    config: NodeConfig
    rng: Random
    models: dict[str, Any]
    counters: Counter[str]
    members: Any
    static_membership: bool
    #: wall time is protocol time + this (the driver sets it).
    wall_offset_s: float
    #: per peer, per model, the greatest counter it holds (gossiped).
    peer_heads: dict[str, dict[str, int]]
    #: called with (model, table, row ids) after a rollback restored rows.
    on_restore: list[Callable[[str, str, Any], None]]

    def send(self, out: Outgoing) -> None: ...

    def live_peers(self, dc: str | None = None) -> list[str]: ...

    def model_state(self, name: str) -> Any:
        """The state of a registered model; raises UsageError for an unknown one."""

    def table_spec(self, model: str, table: str) -> Any: ...

    def counter_horizon(self, now: float, skew: float | None = None) -> int: ...
