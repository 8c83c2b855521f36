"""Model states of a replica: its own (the model-state manager) and those peers gossip.

:class:`ModelStates` holds the :class:`rollback.manager.ModelStateManager` of the
replica, the states other replicas gossiped and the quality events (incidents,
restores) waiting for the driver to log.
"""

from __future__ import annotations

from typing import Any

from ekko.core.errors import ProtocolError
from rollback.detector import DetectorConfig
from rollback.manager import ManagerConfig, ModelStateManager
from rollback.host import RollbackHost

#: quality events (incidents, restores) kept for the driver to log (oldest dropped).
MAX_QUALITY_EVENTS = 256
#: models whose state one gossip message carries.
MAX_GOSSIP_MODEL_STATES = 1024
#: model states by severity (the cluster's state of a model is the worst any live replica reports).
_STATE_ORDER = {"warmup": 0, "healthy": 1, "uncertain": 2, "corrupted": 3}


class ModelStates:
    """This replica's model-state manager (:attr:`quality`), peers' gossiped states, quality events.

    Args:
        host: the replica (:class:`rollback.host.RollbackHost`: node id, config,
            models, member list, live peers).

    Example (through the replica node, which holds one):
        >>> from ekko.replica.node import ReplicaNode
        >>> n = ReplicaNode("r1", "dc1", "127.0.0.1:1", device="cpu")
        >>> n.rollback_protocol.states.quality is n.quality, n.take_quality_events()
        (True, [])
    """

    def __init__(self, host: RollbackHost) -> None:
        self.host = host
        c = host.config
        det = DetectorConfig(warmup_windows=c.quality_warmup_windows)
        self.quality = ModelStateManager(host.node_id, ManagerConfig(detector=det, auto_rollback=c.auto_rollback))
        # Model states other replicas gossiped: node id -> model -> state name.
        self.peer_model_states: dict[str, dict[str, str]] = {}
        self._quality_events: list[dict[str, Any]] = []

    def quality_event(self, kind: str, **kw: Any) -> None:
        self._quality_events.append({"event": kind, **kw})
        if len(self._quality_events) > MAX_QUALITY_EVENTS:
            del self._quality_events[0]

    def take_quality_events(self) -> list[dict[str, Any]]:
        """Incidents opened or adopted and rollbacks restored since the last call (for the log)."""
        out, self._quality_events = self._quality_events, []
        return out

    def model_states(self) -> dict[str, Any]:
        """Per model: this replica's state, the cluster's (worst state gossiped by live
        replicas, this one included) and the count of replicas per state."""
        live = set(self.host.live_peers()) if not self.host.static_membership else None
        for gone in [p for p in self.peer_model_states if self.host.members.get(p) is None]:
            del self.peer_model_states[gone]   # forgotten members: bound the map
        out: dict[str, Any] = {}
        for name in self.host.models:
            own = self.quality.state(name).value
            counts = {own: 1}
            for peer, states in self.peer_model_states.items():
                if live is not None and peer not in live:
                    continue
                st = states.get(name)
                if st is not None:
                    counts[st] = counts.get(st, 0) + 1
            worst = max(counts, key=lambda s: _STATE_ORDER.get(s, 0))
            out[name] = {"state": own, "cluster_state": worst, "replicas_by_state": counts,
                         "epoch": self.quality.epoch(name)}
        return out

    def model_states_wire(self) -> dict[str, str]:
        return {name: self.quality.state(name).value for name in list(self.host.models)[:MAX_GOSSIP_MODEL_STATES]}

    def parse_model_states(self, raw: Any) -> dict[str, str]:
        """A peer's gossiped model states (validated, nothing changed); unknown entries dropped."""
        if not isinstance(raw, dict) or len(raw) > MAX_GOSSIP_MODEL_STATES:
            raise ProtocolError("bad model states", "bad_body")
        return {k: v for k, v in raw.items()
                if isinstance(k, str) and k in self.host.models and isinstance(v, str) and v in _STATE_ORDER}

