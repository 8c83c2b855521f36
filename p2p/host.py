"""What the protocol components of :mod:`p2p` need from the replica that holds them.

:class:`NodeServices` lists the few attributes and methods that eager push, gossip,
anti-entropy, pulls and gap probes call on their node (the replica node implements it).  A
component never reaches into the node's private state: it is handed this interface,
and references to the other components it works with, when it is built.
"""

from __future__ import annotations

from collections import Counter
from random import Random
from typing import TYPE_CHECKING, Callable, Protocol

import numpy as np

if TYPE_CHECKING:
    from ekko.core.config import NodeConfig
    from ekko.core.delta import Delta
    from ekko.core.messages import DeltaFacts, Outgoing
    from ekko.core.spec import ModelSpec, TableSpec
    from ekko.core.store import ApplyResult
    from p2p.membership import Membership
    from p2p.model_state import ModelState
    from p2p.peers import PeerView
    from p2p.placement import Placement
    from p2p.topology import Topology


class NodeServices(Protocol):
    """The node as the p2p components see it."""

    node_id: str
    dc: str
    config: NodeConfig
    #: the node's seeded generator: components draw from it in the node's order.
    rng: Random
    seeds: list[str]
    #: False = metadata mode (versions only).
    with_values: bool
    #: True when the member view is shared and maintained outside (no membership gossip).
    static_membership: bool
    members: Membership
    topology: Topology
    peers: PeerView
    #: which shards of placed models each member holds (:mod:`p2p.placement`).
    placement: Placement
    models: dict[str, ModelState]
    counters: Counter[str]
    #: how many more PUSH messages the driver's link to a peer (by id) takes now; the
    #: push queues keep the rest until the driver flushes again.  None: no limit (the
    #: simulator, tests).
    push_room: Callable[[str], int] | None

    def send(self, out: Outgoing) -> None:
        """Queue a message for the driver (:meth:`ekko.replica.node.ReplicaNode.drain`)."""

    def table_spec(self, model: str, table: str) -> TableSpec | None: ...

    def assigned(self, spec: ModelSpec, table: str, node: str | None = None) -> np.ndarray:
        """Bool per shard: whether ``node`` (default this replica) should hold it by the
        placement, as this replica's member list says (all True unless placed)."""

    def register_model(self, spec: ModelSpec, now: float) -> bool: ...

    def apply_delta(self, m: ModelState, d: Delta, now: float, source: str,
                    facts: DeltaFacts | None = None) -> ApplyResult:
        """Apply rows to the store (fence and baseline filters, index, hooks)."""

    def refuse_future(self, deltas: list[Delta], now: float, what: str, known: int = 0,
                      skew: float | None = None) -> None: ...

    def counter_horizon(self, now: float, skew: float | None = None) -> int: ...

