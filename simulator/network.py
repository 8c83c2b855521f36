"""WAN model: nodes in data centres, NIC and inter-DC link queues, propagation, faults.

Sans-IO style: nothing here opens a socket or reads a clock.  A driver calls
:meth:`WanNetwork.send` with an opaque payload and its size in bytes (take the
size from the real codec, ``len(encode_frame(...))``) and the network calls
``on_deliver(src, dst, payload)`` at the simulated delivery time.

What is modelled (a message is the unit: store-and-forward at every stage)::

    sender NIC egress      FIFO per node, nbytes*8 / nic_bps seconds
    WAN link (cross-DC)    FIFO per ordered DC pair, nbytes*8 / (capacity*(1-background_load))
    propagation            rtt/2 (+ U[0, jitter) + reorder delay with prob. `reorder`)
    receiver NIC ingress   FIFO per node, nbytes*8 / nic_bps seconds
    delivery               on_deliver(src, dst, payload)

Each queue is a work-conserving FIFO server whose finish time is computed when a
message reaches it (``start = max(arrival, server_free)``), so a stage costs one
event, not one per byte or packet: 2 events per intra-DC message, 3 cross-DC.
Queues are unbounded (no tail drop); :meth:`WanNetwork.wan_backlog_s` and
:meth:`WanNetwork.egress_backlog_s` expose their depth in seconds so a driver can
model back-pressure.  ``background_load`` is the share of a WAN link taken by
inference traffic (the paper's links are shared); it is a constant capacity
reduction, changeable at run time with :meth:`WanNetwork.set_background_load`.

What is not modelled: TCP congestion control, slow start, retransmission and
fair sharing between flows (a link serves messages strictly in arrival order, so
one large message delays every message behind it -- head-of-line blocking like a
single TCP connection, pessimistic next to many parallel flows); packetization
and cut-through (a 10 MB message is serialized whole at each stage, so large
messages pay the NIC time twice); routing through intermediate DCs; connection
set-up costs; switch fabric limits inside a DC (intra-DC traffic meets only the two
NICs).  CPU time of the endpoints is not modelled here: a driver may charge it by
passing ``at`` to :meth:`WanNetwork.send` (:mod:`simulator.cpu` does so for the
replica nodes).

Faults: loss (global or per DC pair; lost messages still used the bandwidth),
duplication (a copy is delivered again, up to ``reorder_delay_ms`` later),
reordering (extra random delay), :meth:`~WanNetwork.partition` /
:meth:`~WanNetwork.heal`, one-directional :meth:`~WanNetwork.cut` of a DC pair,
:meth:`~WanNetwork.crash` / :meth:`~WanNetwork.restart` of a node.  A message
blocked by a partition, cut or dead endpoint at send time never enters the
network (a TCP connect would fail); one already in flight is dropped where it
meets the fault: at the receiver for partitions, cuts and receiver crashes, when
it would have left the sender's NIC for a sender crash (for intra-DC messages
that check happens at the receiver -- propagation inside a DC is sub-millisecond).
Every drop is counted by cause in :attr:`WanNetwork.dropped`.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable, Hashable, Iterable, Sequence

from ekko.core.errors import UsageError
from simulator.events import Simulation
from simulator.wan_config import (
    _MS,
    Pair,
    WanConfig,
)
from simulator.wan_config import check_load as _check_load
from simulator.wan_config import check_prob as _check_prob


#: on_deliver(src_node_id, dst_node_id, payload)
DeliverFn = Callable[[Hashable, Hashable, Any], Any]

# drop causes (keys of WanNetwork.dropped)
DROP_LOSS = "loss"                  #: random loss (global or per DC pair)
DROP_PARTITION = "partition"        #: endpoints in different partition groups
DROP_CUT = "cut"                    #: the ordered DC pair is cut
DROP_SRC_DOWN = "src_down"          #: sent by a crashed node
DROP_DST_DOWN = "dst_down"          #: sent to a crashed node
DROP_SRC_CRASHED = "src_crashed"    #: sender crashed before the message left its NIC
DROP_DST_CRASHED = "dst_crashed"    #: receiver crashed (or restarted) while it was in flight
DROP_CAUSES = (DROP_LOSS, DROP_PARTITION, DROP_CUT, DROP_SRC_DOWN, DROP_DST_DOWN,
               DROP_SRC_CRASHED, DROP_DST_CRASHED)


class WanNetwork:
    """Nodes placed in data centres exchanging sized messages over a simulated WAN.

    Args:
        sim: the simulation whose clock and queue carry the messages.
        config: topology, capacities and faults.
        rng: random stream for loss, jitter, reordering and duplication;
            defaults to ``sim.derive_rng("wan")`` so workload draws do not shift
            network draws (and vice versa) when one of them changes.

    Attributes:
        dropped: ``Counter`` of dropped messages by cause (``DROP_*``).
        sent, delivered: messages accepted by :meth:`send` / handed to ``on_deliver``.
        duplicated: extra copies delivered by the duplication fault.
        on_drop: optional ``fn(src, dst, payload, cause)`` called for every drop
            (e.g. to tell a protocol driver its connection failed).

    Example:
        >>> sim = Simulation(seed=1)
        >>> net = WanNetwork(sim, WanConfig(["a", "b"], rtt_ms=100, nic_bps=8e6, wan_capacity_bps=8e6))
        >>> net.add_node("n1", "a"); net.add_node("n2", "b")
        0
        1
        >>> got = []
        >>> net.send("n1", "n2", "hello", 1000, lambda s, d, p: got.append((round(sim.now, 9), s, d, p)))
        True
        >>> _ = sim.run()
        >>> got  # 1 ms sender NIC + 1 ms WAN + 50 ms propagation + 1 ms receiver NIC
        [(0.053, 'n1', 'n2', 'hello')]
        >>> net.wan_bytes
        {('a', 'b'): 1000}
    """

    __slots__ = ("sim", "config", "rng", "dropped", "sent", "delivered", "duplicated", "on_drop",
                 "_dc_pos", "_dc_names", "_ndc", "_index", "_ids", "_dc", "_nic_spb", "_egress_free",
                 "_ingress_free", "_up", "_inc", "_sent_bytes", "_recv_bytes", "_sent_msgs", "_recv_msgs",
                 "_link_free", "_link_spb", "_link_bps", "_link_load", "_prop", "_loss", "_wan_bytes",
                 "_cut", "_groups", "_group_of", "_blocking", "_random", "_jitter", "_reorder",
                 "_reorder_delay", "_dup", "_overhead", "_down", "_remote", "_export")

    def __init__(self, sim: Simulation, config: WanConfig, rng: Any = None) -> None:
        self.sim, self.config = sim, config
        self.rng = rng if rng is not None else sim.derive_rng("wan")
        self.dropped: Counter[str] = Counter()
        self.sent = self.delivered = self.duplicated = 0
        self.on_drop: Callable[[Hashable, Hashable, Any, str], Any] | None = None
        names = config.dc_names
        self._dc_names = names
        self._dc_pos = {n: i for i, n in enumerate(names)}
        n = self._ndc = len(names)
        # per node (dense index) -- plain lists: scalar indexing is faster than numpy
        self._index: dict[Hashable, int] = {}
        self._ids: list[Hashable] = []
        self._dc: list[int] = []
        self._nic_spb: list[float] = []       # seconds per byte at the node's NIC
        self._egress_free: list[float] = []   # when the egress queue drains
        self._ingress_free: list[float] = []
        self._up: list[bool] = []
        self._inc: list[int] = []             # bumped on crash: stale in-flight messages are detected
        self._sent_bytes: list[int] = []
        self._recv_bytes: list[int] = []
        self._sent_msgs: list[int] = []
        self._recv_msgs: list[int] = []
        # per ordered DC pair p = a * n + b
        rtt = config._rtt_matrix()
        self._prop = [rtt[a][b] * _MS / 2 for a in range(n) for b in range(n)]
        self._link_free = [0.0] * (n * n)
        self._link_bps = [config.wan_capacity_overrides.get((names[a], names[b]), config.wan_capacity_bps)
                          for a in range(n) for b in range(n)]
        self._link_load = [config.background_load_overrides.get((names[a], names[b]), config.background_load)
                           for a in range(n) for b in range(n)]
        self._link_spb = [0.0] * (n * n)
        for p in range(n * n):
            self._update_link(p)
        self._loss = [config.loss_overrides.get((names[a], names[b]), config.loss)
                      for a in range(n) for b in range(n)]
        self._wan_bytes = [0] * (n * n)
        self._cut = [False] * (n * n)
        self._groups: list[set[Hashable]] | None = None
        self._group_of: list[int] = []
        self._jitter = config.jitter_ms * _MS
        self._reorder = config.reorder
        self._reorder_delay = config.reorder_delay_ms * _MS
        self._dup = config.duplicate
        self._overhead = config.per_message_overhead_bytes
        self._down = 0           # nodes currently crashed
        # A partitioned run (simulator.parallel): nodes another worker simulates, and
        # where a message to one of them goes once it has crossed the WAN link.
        self._remote: list[bool] | None = None
        self._export: Callable[..., Any] | None = None
        self._blocking = False   # any crash, partition or cut in force: check endpoints
        self._refresh_flags()

    # -- topology ------------------------------------------------------------------------

    def add_node(self, node_id: Hashable, dc: str, nic_bps: float | None = None) -> int:
        """Place a node in DC ``dc``; returns its dense index (0, 1, ...)."""
        if node_id in self._index:
            raise UsageError(f"node {node_id!r} already added")
        if dc not in self._dc_pos:
            raise UsageError(f"unknown DC {dc!r}; known: {self._dc_names}")
        bps = self.config.nic_bps if nic_bps is None else nic_bps
        if not bps > 0:
            raise UsageError("nic_bps must be > 0")
        i = len(self._ids)
        self._index[node_id] = i
        self._ids.append(node_id)
        self._dc.append(self._dc_pos[dc])
        self._nic_spb.append(8.0 / bps)
        self._egress_free.append(0.0)
        self._ingress_free.append(0.0)
        self._up.append(True)
        self._inc.append(0)
        for lst in (self._sent_bytes, self._recv_bytes, self._sent_msgs, self._recv_msgs):
            lst.append(0)
        self._group_of.append(self._group_for(node_id, dc))
        return i

    @property
    def nodes(self) -> list[Hashable]:
        return list(self._ids)

    def dc_of(self, node_id: Hashable) -> str:
        return self._dc_names[self._dc[self._index[node_id]]]

    def nodes_in(self, dc: str) -> list[Hashable]:
        pos = self._dc_pos[dc]
        return [nid for nid, d in zip(self._ids, self._dc) if d == pos]

    def is_up(self, node_id: Hashable) -> bool:
        return self._up[self._index[node_id]]

    @property
    def dcs(self) -> list[str]:
        return list(self._dc_names)

    def rtt_s(self, a: Hashable, b: Hashable) -> float:
        """Base round-trip propagation between two nodes in seconds (no queueing, no jitter)."""
        i, j = self._index[a], self._index[b]
        n = self._ndc
        return self._prop[self._dc[i] * n + self._dc[j]] + self._prop[self._dc[j] * n + self._dc[i]]

    # -- sending -------------------------------------------------------------------------

    def send(self, src: Hashable, dst: Hashable, payload: Any, nbytes: int, on_deliver: DeliverFn,
             at: float | None = None) -> bool:
        """Send ``payload`` of ``nbytes`` bytes; ``on_deliver(src, dst, payload)`` runs on arrival.

        Returns False when the message is dropped at once (dead endpoint,
        partition, cut); loss and in-flight faults are decided later and only
        show in :attr:`dropped`.  Sending to oneself delivers after zero delay
        without touching the NIC.

        ``at`` (optional) is a later time at which the message reaches the sender's NIC
        (the sender's CPU was busy producing it, :mod:`simulator.cpu`); the NIC still
        serves its messages in the order ``send`` was called, so a caller whose ``at``
        never decreases keeps per-node FIFO order.  Blocking faults are checked now.
        """
        index = self._index
        s = index[src]
        d = index[dst]
        if self._blocking:
            cause = self._blocked(s, d, at_send=True)
            if cause is not None:
                self._drop(cause, s, d, payload)
                return False
        sim = self.sim
        nbytes += self._overhead
        self.sent += 1
        self._sent_bytes[s] += nbytes
        self._sent_msgs[s] += 1
        now = sim.now
        if at is not None and at > now:
            now = at
        if s == d:
            sim.schedule_at(now, self._deliver, s, d, payload, nbytes, on_deliver, self._inc[d])
            return True
        start = self._egress_free[s]
        if start < now:
            start = now
        done = start + nbytes * self._nic_spb[s]
        self._egress_free[s] = done
        sdc, ddc = self._dc[s], self._dc[d]
        p = sdc * self._ndc + ddc
        if sdc == ddc:
            arrive = done + self._prop[p]
            if self._random:
                arrive += self._extra_delay()
            sim.schedule_at(arrive, self._arrive, s, d, p, payload, nbytes, on_deliver, self._inc[s], self._inc[d])
        else:
            sim.schedule_at(done, self._enter_wan, s, d, p, payload, nbytes, on_deliver, self._inc[s], self._inc[d])
        return True

    def set_remote(self, remote: Iterable[Hashable], export: Callable[..., Any]) -> None:
        """Partitioned runs: messages to ``remote`` nodes leave this process after their WAN
        link as ``export(arrive, s, d, p, payload, nbytes, dinc)`` (arrival at the receiver,
        node indices, DC pair); the receiver's worker hands them to :meth:`import_arrival`.
        Intra-DC messages never leave (a worker owns whole DCs)."""
        remote = set(remote)
        flags = [nid in remote for nid in self._ids]
        local_dcs = {dc for dc, r in zip(self._dc, flags) if not r}
        mixed = [nid for nid, dc, r in zip(self._ids, self._dc, flags) if r and dc in local_dcs]
        if mixed:
            raise UsageError(f"node {mixed[0]!r} is remote but shares a DC with a local node")
        self._remote = flags
        self._export = export

    def import_arrival(self, arrive: float, s: int, d: int, p: int, payload: Any, nbytes: int, dinc: int,
                       on_deliver: DeliverFn, priority: int = 0) -> None:
        """A message another worker exported (:meth:`set_remote`) reaches node ``d`` here
        (``priority`` orders it among events at the same instant)."""
        self.sim.schedule_at(arrive, self._arrive, s, d, p, payload, nbytes, on_deliver, -1, dinc,
                             priority=priority)

    def wan_bytes_pairs(self) -> list[int]:
        """Bytes that entered each link, by pair index ``a * n + b`` (for merging workers)."""
        return list(self._wan_bytes)

    def send_frame(self, src: Hashable, dst: Hashable, frame: bytes, on_deliver: DeliverFn) -> bool:
        """:meth:`send` an encoded frame; its size is ``len(frame)``."""
        return self.send(src, dst, frame, len(frame), on_deliver)

    def _extra_delay(self) -> float:
        rng = self.rng
        extra = rng.random() * self._jitter if self._jitter else 0.0
        if self._reorder and rng.random() < self._reorder:
            extra += rng.random() * self._reorder_delay
        return extra

    def _enter_wan(self, s: int, d: int, p: int, payload: Any, nbytes: int, on_deliver: DeliverFn,
                   sinc: int, dinc: int) -> None:
        # The message has left the sender's NIC and joins the DC pair's link queue.
        if self._inc[s] != sinc:
            self._drop(DROP_SRC_CRASHED, s, d, payload)
            return
        now = self.sim.now
        start = self._link_free[p]
        if start < now:
            start = now
        done = start + nbytes * self._link_spb[p]
        self._link_free[p] = done
        self._wan_bytes[p] += nbytes
        arrive = done + self._prop[p]
        if self._random:
            arrive += self._extra_delay()
        if self._remote is not None and self._remote[d]:
            # Another worker owns the receiver: it runs the arrival (simulator.parallel).
            self._export(arrive, s, d, p, payload, nbytes, dinc)
            return
        # -1: the sender check is done; a later crash of the sender does not recall the bytes
        self.sim.schedule_at(arrive, self._arrive, s, d, p, payload, nbytes, on_deliver, -1, dinc)

    def _arrive(self, s: int, d: int, p: int, payload: Any, nbytes: int, on_deliver: DeliverFn,
                sinc: int, dinc: int) -> None:
        # Last bit reached the receiver: faults in force now apply, then the ingress queue.
        if sinc >= 0 and self._inc[s] != sinc:
            self._drop(DROP_SRC_CRASHED, s, d, payload)
            return
        if self._inc[d] != dinc:
            self._drop(DROP_DST_CRASHED, s, d, payload)
            return
        if self._blocking:
            cause = self._blocked(s, d, at_send=False)
            if cause is not None:
                self._drop(cause, s, d, payload)
                return
        if self._random:
            rng = self.rng
            loss = self._loss[p]
            if loss and rng.random() < loss:
                self._drop(DROP_LOSS, s, d, payload)
                return
            if self._dup and rng.random() < self._dup:
                self.duplicated += 1
                lag = rng.random() * self._reorder_delay
                # the copy is a fresh arrival; sinc=-1 as the sender check already passed
                self.sim.schedule(lag, self._ingress, s, d, payload, nbytes, on_deliver, dinc)
        self._ingress(s, d, payload, nbytes, on_deliver, dinc)

    def _ingress(self, s: int, d: int, payload: Any, nbytes: int, on_deliver: DeliverFn, dinc: int) -> None:
        now = self.sim.now
        start = self._ingress_free[d]
        if start < now:
            start = now
        done = start + nbytes * self._nic_spb[d]
        self._ingress_free[d] = done
        self.sim.schedule_at(done, self._deliver, s, d, payload, nbytes, on_deliver, dinc)

    def _deliver(self, s: int, d: int, payload: Any, nbytes: int, on_deliver: DeliverFn, dinc: int) -> None:
        if self._inc[d] != dinc:
            self._drop(DROP_DST_CRASHED, s, d, payload)
            return
        self.delivered += 1
        self._recv_bytes[d] += nbytes
        self._recv_msgs[d] += 1
        ids = self._ids
        on_deliver(ids[s], ids[d], payload)

    def _drop(self, cause: str, s: int, d: int, payload: Any) -> None:
        self.dropped[cause] += 1
        if self.on_drop is not None:
            self.on_drop(self._ids[s], self._ids[d], payload, cause)

    def _blocked(self, s: int, d: int, at_send: bool) -> str | None:
        if at_send:
            if not self._up[s]:
                return DROP_SRC_DOWN
            if not self._up[d]:
                return DROP_DST_DOWN
        if self._group_of[s] != self._group_of[d]:
            return DROP_PARTITION
        if self._cut[self._dc[s] * self._ndc + self._dc[d]]:
            return DROP_CUT
        return None

    # -- faults --------------------------------------------------------------------------

    def partition(self, groups: Sequence[Iterable[Hashable]]) -> None:
        """Split the network: nodes in different groups cannot exchange messages.

        Each group lists node ids and/or DC names (a DC stands for all its nodes;
        a node id wins over its DC).  Nodes in no group form one extra group
        together.  Replaces any earlier partition; messages in flight across the
        new boundary are dropped when they arrive.
        """
        sets = [set(g) for g in groups]
        seen: set[Hashable] = set()
        for g in sets:
            if g & seen:
                raise UsageError(f"partition groups overlap: {sorted(map(str, g & seen))}")
            seen |= g
        self._groups = sets
        self._group_of = [self._group_for(nid, self._dc_names[dc]) for nid, dc in zip(self._ids, self._dc)]
        self._refresh_flags()

    def _group_for(self, node_id: Hashable, dc: str) -> int:
        if not self._groups:
            return 0
        for i, g in enumerate(self._groups):
            if node_id in g:
                return i
        for i, g in enumerate(self._groups):
            if dc in g:
                return i
        return len(self._groups)

    def cut(self, a_dc: str, b_dc: str) -> None:
        """Drop every message from DC ``a_dc`` to DC ``b_dc`` (one direction only)."""
        self._cut[self._pair(a_dc, b_dc)] = True
        self._refresh_flags()

    def uncut(self, a_dc: str, b_dc: str) -> None:
        self._cut[self._pair(a_dc, b_dc)] = False
        self._refresh_flags()

    def heal(self) -> None:
        """Remove the partition and every cut (crashed nodes stay down)."""
        self._groups = None
        self._group_of = [0] * len(self._ids)
        self._cut = [False] * (self._ndc * self._ndc)
        self._refresh_flags()

    def crash(self, node_id: Hashable) -> None:
        """Take a node down: its queued and in-flight messages, both ways, are dropped."""
        i = self._index[node_id]
        if self._up[i]:
            self._down += 1
        self._up[i] = False
        self._inc[i] += 1
        now = self.sim.now
        # its queues are gone: after a restart it does not wait behind dead messages
        self._egress_free[i] = min(self._egress_free[i], now)
        self._ingress_free[i] = min(self._ingress_free[i], now)
        self._refresh_flags()

    def restart(self, node_id: Hashable) -> None:
        """Bring a crashed node back; messages sent before the crash stay lost."""
        i = self._index[node_id]
        if not self._up[i]:
            self._down -= 1
        self._up[i] = True
        self._refresh_flags()

    def set_loss(self, p: float, a_dc: str | None = None, b_dc: str | None = None) -> None:
        """Set the loss probability of one direction, or of every pair when no DC is given."""
        _check_prob(p)
        if a_dc is None:
            self._loss = [p] * (self._ndc * self._ndc)
        else:
            self._loss[self._pair(a_dc, b_dc if b_dc is not None else a_dc)] = p
        self._refresh_flags()

    def set_background_load(self, a_dc: str, b_dc: str, fraction: float) -> None:
        """Change the inference traffic share of link a->b (applies to messages entering it from now)."""
        _check_load(fraction)
        p = self._pair(a_dc, b_dc)
        self._link_load[p] = fraction
        self._update_link(p)

    def set_wan_capacity(self, a_dc: str, b_dc: str, bps: float) -> None:
        """Change link a->b's capacity in bits/s (applies to messages entering it from now)."""
        if not bps > 0:
            raise UsageError("capacity must be > 0")
        p = self._pair(a_dc, b_dc)
        self._link_bps[p] = bps
        self._update_link(p)

    def _update_link(self, p: int) -> None:
        self._link_spb[p] = 8.0 / (self._link_bps[p] * (1.0 - self._link_load[p]))

    def _pair(self, a: str, b: str) -> int:
        try:
            return self._dc_pos[a] * self._ndc + self._dc_pos[b]
        except KeyError as e:
            raise UsageError(f"unknown DC {e.args[0]!r}") from None

    def _refresh_flags(self) -> None:
        self._blocking = bool(self._down or self._groups is not None or any(self._cut))
        self._random = bool(self._jitter or self._reorder or self._dup or any(self._loss))

    # -- accounting ----------------------------------------------------------------------

    @property
    def wan_bytes(self) -> dict[Pair, int]:
        """Bytes that entered each WAN link, by ordered DC pair (pairs with traffic only)."""
        return self.wan_bytes_of(self._wan_bytes)

    def wan_bytes_of(self, pairs: Sequence[int]) -> dict[Pair, int]:
        """:attr:`wan_bytes` of per-pair byte counts (:meth:`wan_bytes_pairs`, e.g. summed
        over the workers of a partitioned run)."""
        n, names = self._ndc, self._dc_names
        return {(names[p // n], names[p % n]): int(b) for p, b in enumerate(pairs) if b and p // n != p % n}

    def dc_propagation_s(self, a_dc: str, b_dc: str) -> float:
        """One-way base propagation from DC ``a_dc`` to ``b_dc`` (no queueing, no jitter)."""
        return self._prop[self._pair(a_dc, b_dc)]

    @property
    def wan_bytes_total(self) -> int:
        """All bytes that crossed between DCs."""
        n = self._ndc
        return sum(b for p, b in enumerate(self._wan_bytes) if p // n != p % n)

    def node_bytes(self, node_id: Hashable) -> tuple[int, int]:
        """``(bytes sent, bytes received)`` by a node (sent counts what its NIC accepted)."""
        i = self._index[node_id]
        return self._sent_bytes[i], self._recv_bytes[i]

    def node_messages(self, node_id: Hashable) -> tuple[int, int]:
        """``(messages sent, messages received)`` by a node."""
        i = self._index[node_id]
        return self._sent_msgs[i], self._recv_msgs[i]

    def wan_backlog_s(self, a_dc: str, b_dc: str) -> float:
        """Seconds of queued work on link a->b (0 when idle): how long a new message waits."""
        return max(0.0, self._link_free[self._pair(a_dc, b_dc)] - self.sim.now)

    def egress_backlog_s(self, node_id: Hashable) -> float:
        """Seconds of queued work on a node's NIC egress."""
        return max(0.0, self._egress_free[self._index[node_id]] - self.sim.now)

    def link_rate_bps(self, a_dc: str, b_dc: str) -> float:
        """Capacity left to the model on link a->b: capacity * (1 - background_load)."""
        return 8.0 / self._link_spb[self._pair(a_dc, b_dc)]
