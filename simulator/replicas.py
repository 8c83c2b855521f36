"""Drive real replica nodes (:class:`ekko.replica.node.ReplicaNode`) on the simulated WAN.

This is the simulator's "production code" path: the node objects are exactly
those the daemon runs; only their driver differs.  Every message a node emits
is sized by the real codec (``encode_frame``; in metadata mode plus the value
bytes the node reports as ``extra_bytes``) and carried by
:class:`simulator.network.WanNetwork`, which models NIC and WAN queueing and
propagation.  Bodies are handed to the receiver as decoded maps (the encode is
only for the size), which keeps big runs fast without changing what a node sees.

Two membership modes: ``gossip`` (each node runs the real membership protocol;
small runs) and ``shared`` (one member view maintained by the simulator from
crashes and restarts; needed at 10,000 replicas, where 10,000 full views would
hold 10^8 entries).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ekko.core.codec import Frame, MsgType, encode_frame
from ekko.core.config import NodeConfig
from ekko.core.errors import ProtocolError
from ekko.replica.node import ReplicaNode
from ekko.core.parse_cache import ParseCache
from ekko.core.spec import ModelSpec
from p2p.membership import Member, Membership, MemberState
from p2p.outbound import QueueFactory
from p2p.topology import DcGraph, Topology
from simulator.cpu import PROXY_ID, PUBLISHER_ID, CpuModel
from simulator.events import Simulation
from simulator.network import WanNetwork

#: the first incarnation of a replica with daemon identities: a daemon takes ``time.time_ns()``
#: (this one is 2026-11-01 00:00 UTC: the same width on the wire).
DAEMON_INCARNATION = 1_793_491_200_000_000_000
#: the port of a replica's address with daemon identities.
DAEMON_PORT = 27070


@dataclass
class SimCluster:
    """Real replica nodes on a simulated WAN.

    Args:
        sim: the event loop.
        net: the WAN model the messages travel on.
        config: node configuration shared by every replica.
        with_values: False = metadata mode (versions and sizes only).
        shared_membership: one simulator-maintained member view instead of gossip.
        queue_factory: outbound queue per link (the scheduler under test).
        cpu: endpoint CPU model (:mod:`simulator.cpu`); None charges no CPU time.
        owned: the replicas this process simulates (None: all).  A partitioned run
            (:mod:`simulator.parallel`) gives each worker the replicas of its DCs; the
            others are only members and WAN endpoints here, with no node object.

    Example:
        >>> from simulator.network import WanConfig
        >>> sim = Simulation(seed=1)
        >>> net = WanNetwork(sim, WanConfig.uniform(2, rtt_ms=20))
        >>> c = SimCluster(sim, net, NodeConfig())
        >>> _ = c.add_replica("r0", "dc0"); _ = c.add_replica("r1", "dc1")
        >>> len(c.nodes)
        2
    """

    sim: Simulation
    net: WanNetwork
    config: NodeConfig
    with_values: bool = True
    shared_membership: bool = False
    queue_factory: QueueFactory | None = None
    node_kwargs: Callable[[str], dict[str, Any]] | None = None
    cpu: CpuModel | None = None
    owned: frozenset[str] | None = None
    #: replicas carry real daemons' wire identities: a ``host:port`` address apart from the
    #: id, and a ``time_ns``-sized incarnation (gossip bytes as the daemons'); see :meth:`address_of`.
    daemon_identities: bool = False
    nodes: dict[str, ReplicaNode] = field(default_factory=dict)
    rejected: dict[str, int] = field(default_factory=dict)
    bytes_by_type: dict[str, int] = field(default_factory=dict)
    #: frame bytes each replica sent and received (LAN and WAN alike).
    bytes_out: dict[str, int] = field(default_factory=dict)
    bytes_in: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._timer_at: dict[str, float] = {}
        # One decoded push payload reaches many replicas: parse it once for all of them.
        self.parse_cache = ParseCache()
        self._view: Membership | None = None
        self._topology: Topology | None = None
        self._seed_address: str | None = None
        self.on_apply: list[Callable[[str, str, str, Any, str, float], None]] = []
        self._remote: dict[str, str] = {}   # replicas another worker simulates -> their DC
        self._order: list[str] = []         # every replica, in the order added
        self._address: dict[str, str] = {}  # node id -> address (daemon identities)
        self._node_at: dict[str, str] = {}  # address -> node id
        self._incarnation = DAEMON_INCARNATION if self.daemon_identities else 1

    def address_of(self, node_id: str) -> str:
        """The address a replica is known by: its id, or with daemon identities a
        ``host:port`` of the length a daemon's has (``10.0.<i/256>.<i%256>:27070``, ``i``
        its place in the order added)."""
        return self._address.get(node_id, node_id)

    def _name(self, node_id: str) -> str:
        """Give a new replica its address (daemon identities); returns it."""
        if not self.daemon_identities:
            return node_id
        i = len(self._order) - 1
        addr = self._address[node_id] = f"10.0.{i // 256}.{i % 256}:{DAEMON_PORT}"
        self._node_at[addr] = node_id
        return addr

    # -- building ---------------------------------------------------------------------------
    def add_replica(self, node_id: str, dc: str) -> ReplicaNode | None:
        """Add a replica (None, and no node object, for one another worker simulates)."""
        sim = self.sim
        membership = topology = None
        self._order.append(node_id)
        address = self._name(node_id)
        if self.owned is not None and node_id not in self.owned:
            self._remote[node_id] = dc
            if self.shared_membership:
                self._add_to_view(node_id, dc)
            self.net.add_node(node_id, dc)
            if self._seed_address is None:
                self._seed_address = address
            return None
        if self.shared_membership:
            self._add_to_view(node_id, dc)
            membership, topology = self._view, self._topology
        seeds = [self._seed_address] if self._seed_address else []
        extra = self.node_kwargs(dc) if self.node_kwargs else {}
        extra.setdefault("queue_factory", self.queue_factory)
        node = ReplicaNode(node_id, dc, address, config=self.config, rng=sim.derive_rng(f"node/{node_id}"),
                           now=sim.now, seeds=seeds, device="cpu", with_values=self.with_values,
                           membership=membership, topology=topology, incarnation=self._incarnation, **extra)
        node.parse_cache = self.parse_cache
        if self._seed_address is None:
            self._seed_address = address
        node.on_apply.append(lambda m, t, res, src, _n=node_id: self._applied(_n, m, t, res, src))
        self.nodes[node_id] = node
        self.net.add_node(node_id, dc)
        self._arm(node)
        return node

    def _add_to_view(self, node_id: str, dc: str) -> None:
        address, inc = self.address_of(node_id), self._incarnation
        if self._view is None:
            self._view = Membership(node_id, dc, address, inc, self.sim.now)
            self._topology = Topology(self.config.gateways_per_dc, DcGraph(frozenset(self.config.dc_links)))
        else:
            self._view.members[node_id] = Member(node_id, dc, address, inc, 0, last_change=self.sim.now)
            self._view.version += 1

    def bootstrap_membership(self) -> None:
        """Give every gossiping node the full member list at once, as if the cluster had
        been running: experiments measure updates, not the join phase."""
        if self.shared_membership:
            return
        # (a replica another worker simulates enters as it starts: first incarnation, heartbeat 0)
        entries = [self.nodes[n].members.get(n) if n in self.nodes
                   else Member(n, self._remote[n], self.address_of(n), self._incarnation, 0) for n in self._order]
        for node in self.nodes.values():
            node.members.merge([Member(e.node_id, e.dc, e.address, e.incarnation, e.heartbeat) for e in entries],
                               self.sim.now)

    def register_everywhere(self, spec: ModelSpec) -> None:
        """Register a model at every replica now (the catalog gossip is tested elsewhere;
        at scale it would only add start-up noise)."""
        for node in self.nodes.values():
            node.register_model(spec, self.sim.now)

    # -- faults ----------------------------------------------------------------------------
    def crash(self, node_id: str) -> None:
        self.net.crash(node_id)
        if self._view is not None:
            m = self._view.members[node_id]
            m.state = MemberState.DEAD
            self._view.version += 1

    def restart(self, node_id: str, node: ReplicaNode | None = None) -> None:
        """Bring a crashed replica back (optionally a new object restored from its state)."""
        self.net.restart(node_id)
        if node is not None:
            node.parse_cache = self.parse_cache
            node.on_apply.append(lambda m, t, res, src, _n=node_id: self._applied(_n, m, t, res, src))
            self.nodes[node_id] = node
        if self._view is not None:
            m = self._view.members[node_id]
            m.state, m.incarnation = MemberState.ALIVE, m.incarnation + 1
            self._view.version += 1
        self._arm(self.nodes[node_id])

    # -- loop ------------------------------------------------------------------------------
    def _applied(self, node_id: str, model: str, table: str, res: Any, source: str) -> None:
        if self.cpu is not None:
            self.cpu.note_applied(node_id, len(res))
        for hook in self.on_apply:
            hook(node_id, model, table, res, source, self.sim.now)

    def _arm(self, node: ReplicaNode) -> None:
        t = max(self.sim.now, node.next_deadline())
        nid = node.node_id
        cur = self._timer_at.get(nid)
        if cur is None or t < cur:
            self._timer_at[nid] = t
            self.sim.schedule_at(t, self._tick, nid, t)

    def _tick(self, node_id: str, t: float) -> None:
        if self._timer_at.get(node_id) != t:
            return  # superseded by an earlier timer
        del self._timer_at[node_id]
        if not self.net.is_up(node_id):
            return
        if self.cpu is not None:
            free = self.cpu.busy_until(node_id)
            if free > t:
                # Timers run on the node's one core: the tick waits until it is free.
                self._timer_at[node_id] = free
                self.sim.schedule_at(free, self._tick, node_id, free)
                return
        node = self.nodes[node_id]
        node.tick(self.sim.now)
        self.flush(node)

    def flush(self, node: ReplicaNode, received_bytes: int | None = None) -> None:
        """Send what a node produced and re-arm its timer.

        ``received_bytes``: the size of the message the node just handled (None for a
        tick or a local call), for the CPU model's transport terms.
        """
        net = self.net
        cpu = self.cpu
        sizes: dict[int, tuple[int, Any]] = {}
        sends: list[tuple[str, Any, int]] = []
        for out in node.drain():
            dst = out.dst or self._node_at.get(out.address, out.address)
            if dst not in self.nodes and dst not in self._remote:
                continue
            shared = out.body.get("deltas") if out.msg_type == MsgType.PUSH else None
            if shared is not None:
                # A fan-out sends one deltas list to many peers: encode it once (the
                # list is kept alive beside its size, so its id cannot be reused).
                got = sizes.get(id(shared))
                if got is None:
                    got = sizes[id(shared)] = (len(encode_frame(out.msg_type, out.body)) + out.extra_bytes, shared)
                size = got[0]
            else:
                size = len(encode_frame(out.msg_type, out.body)) + out.extra_bytes
            key = out.msg_type.name
            self.bytes_by_type[key] = self.bytes_by_type.get(key, 0) + size
            self.bytes_out[node.node_id] = self.bytes_out.get(node.node_id, 0) + size
            self.bytes_in[dst] = self.bytes_in.get(dst, 0) + size
            sends.append((dst, out, size))
        # Sends leave when the node's core has done this message's work (simulator.cpu),
        # the transport work of receiving it and of sending what it produced included.
        at = None
        if cpu is not None:
            extra = (cpu.transport_cost(received_bytes, len(sends), sum(s[2] for s in sends))
                     if cpu.costs.charges_transport else 0.0)
            at = cpu.charge(node, self.sim.now, extra)
        proxy = cpu is not None and cpu.costs.has_proxy
        for dst, out, size in sends:
            leave = at
            if proxy:
                # Through the WAN emulator's one thread (a loopback comparison's proxy): the
                # message goes on when it has forwarded it, in the order it was sent.
                leave = cpu.reserve(PROXY_ID, self.sim.now if at is None else at, cpu.costs.proxy_s(size))
            net.send(node.node_id, dst, (out.msg_type, out.body, size), size, self._deliver, leave)
        self._arm(node)

    def _deliver(self, src: str, dst: str, payload: tuple[Any, ...]) -> None:
        """Hand a message ``(type, body, wire size)`` to its receiver and flush what it sends
        (a ``(type, body)`` injected by a test or a replay counts as 0 bytes received).

        With a CPU model that charges the receive (:attr:`CpuCosts.defers_receive
        <simulator.cpu.CpuCosts.defers_receive>`), the message takes effect only after
        ``wake_s`` and once the receiver's core has received it (in arrival order)."""
        cpu = self.cpu
        size = payload[2] if len(payload) > 2 else 0
        if cpu is not None and cpu.costs.defers_receive:
            c = cpu.costs
            at = cpu.reserve(dst, self.sim.now + c.wake_s, c.receive_s(size))
            self.sim.schedule_at(at, self._take, src, dst, payload)
            return
        self._take(src, dst, payload, size)

    def _take(self, src: str, dst: str, payload: tuple[Any, ...], received_bytes: int | None = None) -> None:
        """The receiver handles the message now (``received_bytes``: the receive is still to
        be charged; None: :meth:`_deliver` charged it already)."""
        if received_bytes is None and not self.net.is_up(dst):
            return   # crashed while the message waited for its core: lost with the process
        node = self.nodes[dst]
        msg_type, body = payload[0], payload[1]
        try:
            node.receive(Frame(msg_type, body), self.sim.now, src)
        except ProtocolError as e:
            self.rejected[e.reason] = self.rejected.get(e.reason, 0) + 1
        self.flush(node, received_bytes)

    def publish(self, node_id: str, nbytes: int, then: Callable[[], Any]) -> None:
        """A publisher in ``node_id``'s DC sends it a publish of ``nbytes`` now; ``then()``
        (the node's ``publish`` and what follows it) runs when the node takes it.

        Immediately without a CPU model that charges receives; else after the
        publisher's work (on its own core, or the shared pool), half the intra-DC round
        trip, ``wake_s`` and the node's receive of a publish."""
        cpu = self.cpu
        if cpu is None or not cpu.costs.defers_receive or node_id in self._remote:
            then()
            return
        c = cpu.costs
        left = cpu.reserve(PUBLISHER_ID, self.sim.now, c.publisher_s(nbytes))
        arrive = left + self.net.rtt_s(node_id, node_id) / 2 + c.wake_s
        at = cpu.reserve(node_id, arrive, c.receive_s(nbytes, publish=True))
        self.sim.schedule_at(at, then)

    def call(self, node_id: str, fn: str, *args: Any, **kw: Any) -> Any:
        """Call a node's local API now and send what it produced (None, without calling,
        for a replica another worker of a partitioned run simulates)."""
        if node_id in self._remote:
            return None
        node = self.nodes[node_id]
        out = getattr(node, fn)(*args, **kw)
        self.flush(node)
        return out

    # -- checks ----------------------------------------------------------------------------
    def versions(self, node_id: str, model: str, table: str) -> np.ndarray:
        return self.nodes[node_id].table_store(model, table).versions

    def live(self) -> list[str]:
        """Replicas up now (of those this process simulates)."""
        return [n for n in self.nodes if self.net.is_up(n)]
