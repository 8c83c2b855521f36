"""Membership gossip of a replica: :class:`Gossip`, a component the replica node holds.

``GOSSIP{k="g"}`` carries member entries, the catalog digest, the sender's per-model
head, rollback records, model states and cut digests; the receiver answers with its
own entries (and the full catalog when the digests differ).
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

from ekko.core.codec import MsgType, field, int_field
from ekko.core.errors import ProtocolError, UsageError
from ekko.core.messages import Outgoing
from ekko.core.spec import ModelSpec
from p2p.membership import parse_entries, roles_of
from rollback.protocol import MAX_ROLLBACK_RECORDS

if TYPE_CHECKING:
    from p2p.host import NodeServices
    from rollback.cut_sync import CutSync
    from rollback.model_states import ModelStates
    from rollback.protocol import RollbackProtocol

#: share of gossip rounds spent on a partner in our own DC.
LOCAL_GOSSIP_SHARE = 0.75


class Gossip:
    """Gossip of members, catalog, heads, rollback records, model states and cut digests.

    Args:
        host: the replica (:class:`p2p.host.NodeServices`).
        rollback: its rollback component (rollback records travel with gossip).
        states: its model states (gossiped, and peers' states noted).
        cut_sync: its cut exchange (cut digests gossiped; missing cuts asked for).

    Example (through the replica node, which holds one):
        >>> from ekko.replica.node import ReplicaNode
        >>> n = ReplicaNode("r1", "dc1", "127.0.0.1:1", device="cpu")
        >>> n.gossiper.gossip_body(True)["k"], n.gossiper.peer_heads is n.peer_heads
        ('g', True)
    """

    def __init__(self, host: NodeServices, rollback: RollbackProtocol, states: ModelStates, cut_sync: CutSync) -> None:
        self.host = host
        self.rollback = rollback
        self.states = states
        self.cut_sync = cut_sync
        #: per peer, per model, the greatest counter it holds (its freshness head).
        self.peer_heads: dict[str, dict[str, int]] = {}
        self._catalog_digest: int | None = None

    def catalog_changed(self) -> None:
        """The models held here changed: the catalog digest is computed again when asked."""
        self._catalog_digest = None

    def catalog_digest(self) -> int:
        """A 64-bit digest of the specs of every model held here (peers compare it)."""
        if self._catalog_digest is None:
            h = hashlib.blake2b(digest_size=8)
            for name in sorted(self.host.models):
                h.update(repr(self.host.models[name].spec.to_dict()).encode())
            self._catalog_digest = int.from_bytes(h.digest(), "little")
        return self._catalog_digest

    def gossip_body(self, req: bool, with_catalog: bool = False, to_dc: str | None = None) -> dict[str, Any]:
        mem = self.host.members.gossip_entries(self.host.rng, prefer_dc=to_dc)
        body: dict[str, Any] = {"k": "g", "from": self.host.node_id, "mem": mem,
                                "cat": self.catalog_digest(), "req": req,
                                "heads": {n: m.head for n, m in self.host.models.items()}}
        roles = roles_of(self.host.members, mem)
        if roles:
            body["roles"] = roles   # optional: older peers ignore it
        if with_catalog:
            body["specs"] = [m.spec.to_dict() for m in self.host.models.values()]
        if self.rollback.rollbacks:
            body["rb"] = list(self.rollback.rollbacks.values())[-MAX_ROLLBACK_RECORDS:]
        if self.host.models:
            body["ms"] = self.states.model_states_wire()
            cd = self.cut_sync.cut_digests_wire()
            if cd:
                body["cd"] = cd   # optional: per model, the digest of its named cuts
        return body

    def round(self, now: float) -> None:
        if self.host.static_membership:
            return
        self.host.members.tick(now)
        died = self.host.members.check(now)
        if died:
            self.host.counters["members_died"] += len(died)
        local = self.host.peers.live(self.host.dc)
        peers = self.host.peers.live()
        # Mostly gossip inside the DC (cheap, and DC members watch each other for
        # gateway failover); now and then across, so DCs keep seeing each other.
        pool = local if local and self.host.rng.random() < LOCAL_GOSSIP_SHARE else peers
        if pool:
            peer = self.host.members.get(self.host.rng.choice(pool))
            self.host.send(Outgoing(peer.node_id, peer.address, MsgType.GOSSIP,
                                      self.gossip_body(True, to_dc=peer.dc)))
        if len(peers) < 2 or self.host.rng.random() < 0.05:
            # Keep contacting seeds while we know few peers (join), and now and then
            # afterwards so a partitioned-off node finds its way back.
            for s in self.host.seeds:
                self.host.send(Outgoing("", s, MsgType.GOSSIP, self.gossip_body(True)))

    def on_gossip(self, body: dict[str, Any], now: float) -> None:
        sender = field(body, "from", str)
        entries = parse_entries(field(body, "mem", list), body.get("roles"))
        cat = int_field(body, "cat", 0, (1 << 64) - 1)
        req = field(body, "req", bool)
        heads = field(body, "heads", dict, optional=True, default={})
        specs = None
        if "specs" in body:
            specs = [ModelSpec.from_dict(s) for s in field(body, "specs", list)]
        rbs = field(body, "rb", list, optional=True, default=[])
        if len(rbs) > MAX_ROLLBACK_RECORDS:
            raise ProtocolError("too many rollback records", "bad_body")
        # A record's id must be a string to be looked up (a list id crashed this as a TypeError).
        # A known id with other content is a concurrent record of the same incident: merge it.
        new_rbs = [rb for rb in rbs if isinstance(rb, dict)
                   and (not isinstance(rb.get("id"), str) or self.rollback.rollbacks.get(rb["id"]) != rb)]
        for rb in new_rbs:  # validated before anything changes: a refused gossip changes nothing
            self.rollback.parse_rollback(rb, now)
        states = self.states.parse_model_states(body["ms"]) if "ms" in body else None
        cuts_differ = self.cut_sync.parse_cut_digests(body["cd"]) if "cd" in body else []
        self.host.members.merge(entries, now)
        if isinstance(heads, dict):
            # Heads beyond our clock + skew bound are dropped: they would fake everyone's lag.
            horizon = self.host.counter_horizon(now)
            self.peer_heads[sender] = {k: v for k, v in heads.items()
                                       if isinstance(k, str) and isinstance(v, int) and 0 <= v <= horizon}
        for spec in specs or ():
            try:
                self.host.register_model(spec, now)
            except UsageError:
                self.host.counters["catalog_conflicts"] += 1
        for rb in new_rbs:
            self.rollback.apply_rollback(rb, now)
        if states is not None:
            self.states.peer_model_states[sender] = states
        if cuts_differ:
            self.cut_sync.ask_cuts(sender, cuts_differ)
        if req:
            mem = self.host.members.get(sender)
            if mem is not None:
                self.host.send(Outgoing(sender, mem.address, MsgType.GOSSIP,
                                          self.gossip_body(False, with_catalog=cat != self.catalog_digest(),
                                                            to_dc=mem.dc)))
        elif cat != self.catalog_digest() and specs is None:
            # They have models we lack (or the reverse): ask with our catalog attached.
            mem = self.host.members.get(sender)
            if mem is not None:
                self.host.send(Outgoing(sender, mem.address, MsgType.GOSSIP,
                                          self.gossip_body(True, with_catalog=True)))
