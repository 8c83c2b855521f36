"""A replica's view of its peers: live members, ordinary (non-baseline) members, gateways.

:class:`PeerView` caches the peer lists per membership version and keeps the
gateway topology in step with the member list; every protocol component asks it
whom to talk to.
"""

from __future__ import annotations

from typing import Any

from p2p.membership import Membership
from p2p.topology import Topology


class PeerView:
    """Peer lists of one replica, cached per membership version.

    Args:
        node_id: this replica (never its own peer).
        dc: its data centre.
        members: the member list (possibly shared, in the simulator's scale mode).
        topology: the gateway topology, refreshed from the member list on demand.

    Example:
        >>> from p2p.membership import Membership, MembershipConfig
        >>> from p2p.topology import DcGraph, Topology
        >>> ms = Membership("a", "dc1", "a:1", 1, 0.0, MembershipConfig(5, 10, 60))
        >>> PeerView("a", "dc1", ms, Topology(1, DcGraph(frozenset()))).live()
        []
    """

    def __init__(self, node_id: str, dc: str, members: Membership, topology: Topology) -> None:
        self.node_id, self.dc = node_id, dc
        self.members = members
        self.topology = topology
        self._cache: dict[Any, tuple[Any, ...]] = {}

    def incarnation(self) -> int:
        me = self.members.get(self.node_id)
        return me.incarnation if me is not None else 0

    def live(self, dc: str | None = None) -> list[str]:
        """Live members other than us (in ``dc`` when given); cached per membership version."""
        version = self.members.version
        hit = self._cache.get(dc)
        if hit is not None and hit[0] == version:
            return hit[1]
        # From the member list's own cache (one list per DC, shared by every node that
        # shares the list, as in the simulator's shared mode): dropping ourselves is a
        # C-level copy, not a walk over every member in Python.
        live = self.members.live_ids(dc)
        try:
            i = live.index(self.node_id) if dc is None or dc == self.dc else -1
        except ValueError:
            i = -1
        peers = live[:i] + live[i + 1:] if i >= 0 else live
        self._cache[dc] = (version, peers)
        return peers

    def ordinary(self, dc: str | None = None) -> list[str]:
        """:meth:`live` less pinned baselines (they take no pushes and start their own
        anti-entropy rounds, capped at their cut: see
        :meth:`rollback.protocol.RollbackProtocol.set_baseline_pin`)."""
        peers = self.live(dc)
        version = self.members.version
        hit = self._cache.get(("ordinary", dc))
        if hit is not None and hit[0] == version and hit[2] is peers:
            return hit[1]
        get = self.members.members.get
        out = [p for p in peers if not getattr(get(p), "role", "")]
        if len(out) == len(peers):
            out = peers
        self._cache[("ordinary", dc)] = (version, out, peers)
        return out

    def refresh_topology(self) -> None:
        if self.topology.version == self.members.version:
            return  # cheap check first: building the live map walks every member
        alive = self.members.alive()
        # Pinned baselines are never gateways: a cross-DC push or pull reaching one would
        # stop at its cut instead of reaching its DC.  A DC of baselines only keeps them
        # (it must still hear from the others).
        ordinary_dcs = {mem.dc for mem in alive if not mem.role}
        live = {mem.node_id: mem.dc for mem in alive if not mem.role or mem.dc not in ordinary_dcs}
        self.topology.update(live, self.members.version)
