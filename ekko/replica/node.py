"""One replica's logic, sans-IO.

:class:`ReplicaNode` holds a replica's models (:class:`p2p.model_state.ModelState`:
tensors, versions, per-shard knowledge) and its member view, and composes the
protocol from one object per concern, each owning its state and seeing the node
only through a small interface (:class:`p2p.host.NodeServices`,
:class:`rollback.host.RollbackHost`):

* :class:`p2p.push.EagerPush` (link queues, push frames), :class:`p2p.gossip.Gossip`
  (members, catalog, heads), :class:`p2p.antientropy.AntiEntropy` (rounds, digests),
  :class:`p2p.pull.Pulls` (pull requests and answers), :class:`p2p.gap_probe.GapProbe`
  (knowledge gaps), :class:`rollback.protocol.RollbackProtocol` (cuts, fence,
  rollback, repair, model states) and :class:`p2p.peers.PeerView` (whom to talk to).

The node applies rows (:meth:`ReplicaNode.apply_delta`), routes frames to the
components, runs their timers and keeps the outbox.  It never opens a socket,
sleeps or reads a clock: drivers call

* :meth:`receive` with a decoded frame and the current time,
* the local API (:meth:`register_model`, :meth:`publish`, :meth:`read_rows`,
  :meth:`status`) from HTTP handlers or in-process callers,
* :meth:`tick` at or after :meth:`next_deadline`,

and after each call send what :meth:`drain` returns.  The aiohttp daemon
(:mod:`ekko.server.daemon`) drives it with real sockets and time; the simulator
drives the same object with a simulated WAN and clock.

Message flows (all one-way; replies are separate messages):

* gossip: ``GOSSIP{k="g"}`` carries member entries, the catalog digest and the
  sender's per-model head; the receiver answers with its own entries (and the
  full catalog when the digests differ).
* anti-entropy, every ``ae_interval`` with one partner per scope:
  ``GOSSIP{k="sum"}`` (one 64-bit digest per table over the scope's shards)
  -> ``GOSSIP{k="dig"}`` (per-shard versions, only for differing tables)
  -> ``PULL_REQUEST`` (knowledge + held rows of differing shards)
  -> ``PULL_RESPONSE`` (missing rows, version order, capped) and, when the
  requester knows more somewhere, a reverse ``PULL_REQUEST``.  Shards whose
  versions differ only in their row hash are audited instead (:mod:`p2p.audit`):
  ``GOSSIP{k="aud"}`` -> ``GOSSIP{k="rep"}`` -> rows either side holds better.
* eager push: ``PUSH`` from the ingest replica to its DC and to the rank-0
  gateway of each shard in every other DC; a replica that gets a push from
  another DC forwards it to its own DC.  Pushed rows are applied but do not
  advance knowledge.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any, Callable

import numpy as np
import torch

from ekko.core.codec import Frame, MsgType, field
from ekko.core.config import NodeConfig
from ekko.core.delta import Delta
from ekko.core.errors import ProtocolError, UsageError
from ekko.core.messages import DeltaFacts, Outgoing, PublishAck
from ekko.core.spec import ModelSpec, TableSpec, check_name
from ekko.core.store import ApplyResult, ModelStore
from ekko.core.version import HLC_EPOCH_MS, HLC_LOGICAL_BITS, MAX_COUNTER, ORIGIN_BITS, counters_of, last_counter_at
from ekko.replica.publish import checked_after, parse_publish, shard_spans
from ekko.replica.status import cluster_view, lag
from ekko.replica.status import status as status_view
from ekko.replica.state import export_state, import_state
from p2p.antientropy import AntiEntropy
from p2p.audit import RowAudit
from p2p.gap_probe import GapProbe
from p2p.gossip import Gossip
from p2p.handoff import HandOff
from p2p.membership import Membership, MembershipConfig
from p2p.model_state import ModelState
from p2p.outbound import FifoLinkQueue, QueueFactory
from p2p.peers import PeerView
from p2p.placement import Placement
from p2p.pull import Pulls
from p2p.push import EagerPush, impact_of
from p2p.sync import ShardSync
from p2p.topology import DcGraph, Topology
from rollback.protocol import RollbackProtocol



#: counter names of applied rows per apply source (built once: applies are the hot path).
_APPLIED_KEYS = {src: f"applied_rows_{src}" for src in ("push", "pull", "publish", "local")}
#: counter names of received frames per message type.
_RX_KEYS = {t: f"rx_{t.name.lower()}" for t in MsgType}


class _Forward:
    """A node attribute that is a component's: ``node.cuts`` is ``node.rollback_protocol.cuts``.

    Read-only unless ``settable`` (then assigning sets the component's attribute)."""

    def __init__(self, component: str, name: str = "", settable: bool = False) -> None:
        self.component, self.name, self.settable = component, name, settable
        self._path = component.split(".")

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = self.name or name

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        if obj is None:
            return self
        for part in self._path:
            obj = getattr(obj, part)
        return getattr(obj, self.name)

    def __set__(self, obj: Any, value: Any) -> None:
        if not self.settable:
            raise AttributeError(f"{self.name} is {self.component}.{self.name}: read-only on the node")
        for part in self._path:
            obj = getattr(obj, part)
        setattr(obj, self.name, value)


def _priority_scheduler(c: NodeConfig, dc: str, rng: random.Random) -> tuple[Any, QueueFactory]:
    """The priority scheduler a config asks for: a scorer/threshold and budgeted link queues."""
    from prioritizer import (
        LinkBudgets,
        Prioritizer,
        QueueConfig,
        ThresholdTracker,
        priority_queue_factory,
    )
    rate = c.wan_update_bytes_per_s or float("inf")
    budgets = LinkBudgets(default_bytes_per_s=rate, intra_dc_bytes_per_s=float("inf"))
    prio = Prioritizer(threshold=ThresholdTracker(c.k_percent, rng=rng.randrange(1 << 31)))
    return prio, priority_queue_factory(dc, budgets, QueueConfig(max_rows=c.queue_rows))


class ReplicaNode:
    """The sans-IO replica.

    Args:
        node_id: unique name of this replica.
        dc: its data centre.
        address: where peers reach it ("host:port").
        config: protocol configuration (:class:`ekko.core.config.NodeConfig`).
        rng: seeded random generator for peer choice (never the global one).
        now: current time (seconds) at construction.
        incarnation: membership incarnation; must grow across restarts.
        seeds: addresses to contact until the member list has peers.
        device: torch device of the tensors (default: CUDA when available).
        with_values: False = metadata mode (versions only; simulator scale runs).
        queue_factory: builds the outbound queue of each link (the scheduler's hook).

    Example:
        >>> import numpy as np
        >>> from ekko.core.spec import ModelSpec, TableSpec
        >>> n = ReplicaNode("r1", "dc1", "127.0.0.1:1", device="cpu")
        >>> n.register_model(ModelSpec("m", [TableSpec("t", rows=8, dim=2)]), now=0.0)
        True
        >>> d = Delta("m", "t", np.array([1]), np.array([(5 << 16) | 7]), np.ones((1, 2), np.float32))
        >>> n.apply_local(d, now=0.0).applied
        1
        >>> n.read_rows("m", "t", np.array([1])).tolist()
        [[1.0, 1.0]]
    """

    def __init__(self, node_id: str, dc: str, address: str, *, config: NodeConfig | None = None,
                 rng: random.Random | None = None, now: float = 0.0, incarnation: int = 1,
                 seeds: tuple[str, ...] | list[str] = (), device: Any = None, with_values: bool = True,
                 queue_factory: QueueFactory | None = None, membership: Membership | None = None,
                 topology: Topology | None = None, prioritizer: Any = None) -> None:
        check_name("node id", node_id)
        check_name("dc", dc)
        self.node_id, self.dc, self.address = node_id, dc, address
        self.config = config or NodeConfig()
        self.rng = rng or random.Random(0)
        self.device = device
        self.with_values = with_values
        self.seeds = [s for s in seeds if s != address]
        c = self.config
        # A shared, externally maintained member view (the simulator's scale mode:
        # 10,000 full views would need 10^8 entries) turns membership gossip off.
        self.static_membership = membership is not None
        self.members = membership or Membership(node_id, dc, address, incarnation, now,
                                                MembershipConfig(c.suspect_after, c.dead_after, c.forget_after))
        self.topology = topology or Topology(c.gateways_per_dc, DcGraph(frozenset(c.dc_links)))
        self.peers = PeerView(node_id, dc, self.members, self.topology)
        self.placement = Placement(self.topology, node_id, dc)
        self.models: dict[str, ModelState] = {}
        if c.scheduler == "priority" and prioritizer is None and queue_factory is None:
            prioritizer, queue_factory = _priority_scheduler(c, dc, self.rng)
        self.counters: Counter[str] = Counter()
        #: the driver's per-peer room for PUSH messages (p2p.host.NodeServices.push_room);
        #: None (the simulator) sends every ready push at once.
        self.push_room: Callable[[str], int] | None = None
        self._out: list[Outgoing] = []
        self._next_gossip = now
        self._next_ae = now + self.rng.uniform(0, c.ae_interval)
        # The protocol, one component per concern; each gets this node's services
        # (p2p.host.NodeServices, rollback.host.RollbackHost) and the components it
        # works with -- never the node's private state.
        rb = self.rollback_protocol = RollbackProtocol(self, with_values)
        self.gap_probe = GapProbe(self, rb, now)
        self.eager_push = EagerPush(self, queue_factory or (lambda peer, dc: FifoLinkQueue(c.queue_rows)),
                                    prioritizer, self.gap_probe, rb)
        self.pulls = Pulls(self, self.eager_push, self.gap_probe, rb)
        self.audit = RowAudit(self, rb.repair)
        self.anti_entropy = AntiEntropy(self, self.pulls, rb, self.audit)
        self.gossiper = Gossip(self, rb, rb.states, rb.cut_sync)
        self.handoff = HandOff(self)
        # Hooks for layers above the protocol (undo history, metrics); called with
        # (model, table, ApplyResult, source) after every apply that changed rows.
        self.on_apply: list[Callable[[str, str, ApplyResult, str], None]] = []
        # Called with (model, table, row ids) after a rollback wrote rows back to their
        # state at the cut (restores are not applies: the change feed needs both).
        self.on_restore: list[Callable[[str, str, np.ndarray], None]] = []
        # Wall time (Unix seconds) is ``now + wall_offset_s``: versions further ahead of it
        # than config.max_clock_skew are refused.  The default makes protocol time 0 the
        # HLC epoch, the simulator's convention (publishers there stamp HLC_EPOCH_MS +
        # sim time); the daemon sets it from its real clock before every frame.
        self.wall_offset_s = HLC_EPOCH_MS / 1000.0

    # ------------------------------------------------------------------ component state, as node attributes
    # Read by the daemon, the simulator, benches and tests (``node.cuts``, ``node.queues``...).
    quality = _Forward("rollback_protocol")
    cuts = _Forward("rollback_protocol")
    fence = _Forward("rollback_protocol")
    rollbacks = _Forward("rollback_protocol")
    undo = _Forward("rollback_protocol", settable=True)        # the simulator installs one
    _seq = _Forward("rollback_protocol", "seq", settable=True)
    peer_model_states = _Forward("rollback_protocol.states")
    baseline_pin = _Forward("rollback_protocol")
    set_baseline_pin = _Forward("rollback_protocol")
    take_cut = _Forward("rollback_protocol")
    rollback = _Forward("rollback_protocol")
    report_quality = _Forward("rollback_protocol")
    model_states = _Forward("rollback_protocol.states")
    take_quality_events = _Forward("rollback_protocol.states")
    parse_coverage = _Forward("rollback_protocol")
    uncovered = _Forward("rollback_protocol")
    export_undo = _Forward("rollback_protocol")
    import_undo = _Forward("rollback_protocol")
    cut_wall_time = _Forward("rollback_protocol.cut_sync")
    cut_to_wire = _Forward("rollback_protocol.cut_sync")
    queues = _Forward("eager_push")
    queue_factory = _Forward("eager_push")
    prioritizer = _Forward("eager_push")
    parse_cache = _Forward("eager_push", settable=True)        # the simulator shares one
    flush = _Forward("eager_push")
    peer_heads = _Forward("gossiper")
    catalog_digest = _Forward("gossiper")
    gaps = _Forward("gap_probe")
    rows_walked_by_table = _Forward("pulls")

    # ------------------------------------------------------------------ services to the components
    def send(self, out: Outgoing) -> None:
        """Queue a message for the driver (see :meth:`drain`)."""
        self._out.append(out)

    def live_peers(self, dc: str | None = None) -> list[str]:
        """Live members other than this replica (in ``dc`` when given)."""
        return self.peers.live(dc)

    # ------------------------------------------------------------------ driver interface
    def drain(self) -> list[Outgoing]:
        """Messages to send now (the outbox is emptied)."""
        out, self._out = self._out, []
        return out

    def next_deadline(self) -> float:
        """Time of the next timer; call :meth:`tick` then."""
        return min(self._next_gossip, self._next_ae, self.eager_push.next_push)

    def tick(self, now: float) -> None:
        """Run due timers (gossip, failure detection, anti-entropy) and flush push queues."""
        if now >= self._next_gossip:
            self._next_gossip = now + self.config.gossip_interval * self.rng.uniform(0.8, 1.2)
            self.gossiper.round(now)
        if now >= self._next_ae:
            self._next_ae = now + self.config.ae_interval * self.rng.uniform(0.8, 1.2)
            self.handoff.round(now)      # placed shards: take new ones, hand old ones over
            self.anti_entropy.round(now)
            self.rollback_protocol.repair.round(now)
            self.gap_probe.round(now)
            self.rollback_protocol.auto_cuts(now)
        self.eager_push.flush(now)

    def receive(self, frame: Frame, now: float, src_address: str = "") -> None:
        """Handle a frame from a peer.  Bad data raises :class:`ProtocolError` and
        changes nothing (every message is validated before any state changes)."""
        body = frame.body
        t = frame.msg_type
        self.counters[_RX_KEYS[t]] += 1
        self._dispatch(t, body, now)
        # Only a frame that passed validation is evidence of life: a refused one (anyone
        # can send garbage naming a member) must not keep a dead peer looking alive.
        sender = body.get("from")
        if isinstance(sender, str) and not self.static_membership:
            self.members.heard_from(sender, now)

    def _dispatch(self, t: MsgType, body: dict[str, Any], now: float) -> None:
        if t == MsgType.PUSH:  # the most frequent by far
            self.eager_push.on_push(body, now)
        elif t == MsgType.GOSSIP:
            kind = field(body, "k", str)
            if kind == "g":
                self.gossiper.on_gossip(body, now)
            elif kind == "sum":
                self.anti_entropy.on_summary(body, now)
            elif kind == "dig":
                self.anti_entropy.on_digests(body, now)
            elif kind == "rep":
                self.rollback_protocol.repair.on_request(body, now)
            elif kind == "aud":
                self.audit.on_request(body, now)
            elif kind == "gq":
                self.gap_probe.on_query(body, now)
            elif kind == "ga":
                self.gap_probe.on_answer(body, now)
            elif kind == "cl":
                self.rollback_protocol.cut_sync.on_cut_list(body, now)
            elif kind == "ho":
                self.handoff.on_query(body, now)
            elif kind == "hoa":
                self.handoff.on_answer(body, now)
            else:
                raise ProtocolError(f"unknown gossip kind {kind!r}", "bad_body")
        elif t == MsgType.PULL_REQUEST:
            self.pulls.on_pull_request(body, now)
        elif t == MsgType.PULL_RESPONSE:
            self.pulls.on_pull_response(body, now)
        elif t == MsgType.ROLLBACK:
            self.rollback_protocol.apply_rollback(field(body, "rb", dict), now)
        elif t == MsgType.CUT:
            self.rollback_protocol.cut_sync.on_cut(body, now)
        elif t == MsgType.PUBLISH:
            self.publish(body, now)
        elif t == MsgType.REGISTER_MODEL:
            self.register_model(ModelSpec.from_dict(body.get("spec")), now)
        else:
            raise ProtocolError(f"{t.name} is not handled by this node", "bad_type")

    # ------------------------------------------------------------------ local API
    def register_model(self, spec: ModelSpec, now: float, store: ModelStore | None = None) -> bool:
        """Add a model; True when new.  Re-registering the same spec is a no-op; a
        different spec under the same name is refused.  ``store``: the model's tensors
        (restored from a snapshot) instead of new empty ones."""
        cur = self.models.get(spec.name)
        if cur is not None:
            if cur.spec != spec and not cur.spec.same_tables(spec):
                raise UsageError(f"model {spec.name!r} is already registered with a different spec")
            return False   # the same (a layout recorded on one side only changes nothing)
        held = None
        if spec.placed and store is None:
            # The shards the member list says are ours now; HandOff.round follows it as
            # members come and go.
            held = {t.name: self.assigned(spec, t.name) for t in spec.tables if spec.placed_table(t.name)}
        m = self.models[spec.name] = ModelState(spec, self.device, self.with_values, held, store)
        if held is not None and any(h.get(spec.name, 0) > 0 for h in self.gossiper.peer_heads.values()):
            # Others hold rows of the model already (this replica joined late, or heard of
            # the model after its first publishes): our shards fill before they serve reads.
            # (A new model has nothing anywhere: its shards serve at once.)
            for table, h in held.items():
                m.filling[table] = dict.fromkeys(np.flatnonzero(h).tolist(), now)
        self.gossiper.catalog_changed()
        self.counters["models_registered"] += 1
        return True

    def spec(self, model: str) -> ModelSpec:
        return self.model_state(model).spec

    def assigned(self, spec: ModelSpec, table: str, node: str | None = None) -> np.ndarray:
        """Bool per shard: whether ``node`` (default this replica) should hold it by the
        placement, as this replica's member list says (all True unless placed)."""
        if not spec.placed_table(table):
            return np.ones(spec.table(table).num_shards, dtype=bool)
        self.peers.refresh_topology()
        mem = self.members.get(node) if node is not None else None
        return self.placement.held(spec, table, node=node, dc=mem.dc if mem is not None else None)

    def table_spec(self, model: str, table: str) -> TableSpec | None:
        m = self.models.get(model)
        if m is None or not m.spec.has_table(table):
            return None
        return m.spec.table(table)

    def read_rows(self, model: str, table: str, ids: np.ndarray) -> torch.Tensor:
        m = self.model_state(model)
        ts = m.store.table(table)
        ids = np.asarray(ids, dtype=np.int64)
        if ids.ndim != 1 or (len(ids) and (ids.min() < 0 or ids.max() >= ts.spec.rows)):
            raise UsageError(f"row ids must be a 1-D list within 0..{ts.spec.rows - 1}")
        return ts.read(ids)

    def table_store(self, model: str, table: str):
        return self.model_state(model).store.table(table)

    def publish(self, body: dict[str, Any], now: float) -> PublishAck:
        """Ingest a publisher's frame body.

        Body: ``model``, ``origin`` (int), ``deltas`` (wire deltas whose versions all
        carry ``origin``), ``chains`` (``{table: [[shard, after], ...]}``: the counter of
        this origin's previous update to each touched shard that the publisher had
        acknowledged, or -1 when unknown).  Validated completely before anything applies.
        """
        m, origin, deltas, chains = parse_publish(self, body, now)
        applied = 0
        top = 0
        shadowed: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for d in deltas:
            res = self.apply_delta(m, d, now, source="publish")
            applied += len(res)
            if len(d) == 0:
                continue
            if len(res) < len(d):
                # Rows already held at a greater version: this frame's values lose
                # everywhere.  The publisher is told which rows and by what version.
                cur = m.store.table(d.table).versions[d.ids]
                lost = cur > d.versions
                if lost.any():
                    shadowed[d.table] = (d.ids[lost], cur[lost])
                    self.counters["shadowed_rows"] += int(lost.sum())
            spec = m.spec.table(d.table)
            top = max(top, int(d.versions.max()) >> ORIGIN_BITS)   # counters carry one origin
            links: list[tuple[int, int, int, int]] = []
            chain_of, dirty, pushed_at = chains[d.table], m.dirty[d.table], m.pushed_at[d.table]
            for s, first, upto in zip(*shard_spans(spec.shards_of(d.ids), counters_of(d.versions))):
                sync = m.shard(d.table, s)
                after = chain_of.get(s, -1)
                urgent = False
                if after != -1:
                    after, urgent = self._checked_after(sync, origin, after, first, upto)
                if sync.chain(origin, after, upto):
                    dirty.add(s)
                    pushed_at[s] = now     # its pushes are about to leave
                if sync.pending:
                    self.gap_probe.note_waiting(m, d.table, s, now, urgent)
                if after >= 0:
                    links.append((s, origin, after, upto))
            if self.config.push:
                # The links travel with the push only when it carries every row of the
                # frame (a row that lost here is not pushed, and a receiver holding the
                # link without the row would claim knowledge it lacks).
                self.eager_push.push_from_ingest(m, d.table, res, now, impact_of(d, res),
                                       links=np.array(links, np.int64) if links and len(res) == len(d) else None,
                                       origin=origin)
        self.counters["published_rows"] += sum(len(d) for d in deltas)
        self.eager_push.flush(now)
        return PublishAck(sum(len(d) for d in deltas), applied, top, shadowed)


    def _checked_after(self, sync: ShardSync, origin: int, after: int, first: int, upto: int) -> tuple[int, bool]:
        """The link a publish frame may claim in one shard: :func:`ekko.replica.publish.checked_after`."""
        return checked_after(sync, origin, after, first, upto, self.counters)

    def apply_local(self, delta: Delta, now: float) -> PublishAck:
        """Apply an already-versioned delta here without chains (tests, tools)."""
        m = self.model_state(delta.model)
        spec = m.spec.table(delta.table)
        delta.check(spec)
        res = self.apply_delta(m, delta, now, source="local")
        return PublishAck(len(delta), len(res), int(counters_of(delta.versions).max(initial=0)))

    # ------------------------------------------------------------------ persistence
    def export_state(self, model: str) -> dict[str, Any]:
        """The protocol state of ``model`` to keep beside its tensors (msgpack-ready):
        see :func:`ekko.replica.state.export_state`."""
        return export_state(self, model)

    def import_state(self, spec: ModelSpec, store: ModelStore, state: dict[str, Any], now: float) -> None:
        """Install a model restored from a snapshot into this node (it must not have the
        model yet): see :func:`ekko.replica.state.import_state`.

        Raises:
            ProtocolError: the state is malformed (reason ``"bad_snapshot"``).
        """
        import_state(self, spec, store, state, now)

    # ------------------------------------------------------------------ status
    def model_head(self, model: str) -> int:
        return self.model_state(model).head

    def status(self, digests: bool = True) -> dict[str, Any]:
        """A JSON-ready status view of this replica (:func:`ekko.replica.status.status`)."""
        return status_view(self, digests)

    def cluster_view(self) -> list[dict[str, Any]]:
        """Every member with its DC, state and per-model freshness lag (seconds)."""
        return cluster_view(self)

    def freshness_lag(self, model: str) -> float | None:
        """Seconds (HLC time) behind the most advanced replica known; None when this
        replica has nothing of ``model`` yet while others do."""
        return lag(self, self.model_state(model).head, model)

    # ------------------------------------------------------------------ internals: apply
    def model_state(self, name: str) -> ModelState:
        """The state of a registered model (raises :class:`UsageError` for an unknown one)."""
        m = self.models.get(name)
        if m is None:
            raise UsageError(f"unknown model {name!r}")
        return m

    def counter_horizon(self, now: float, skew: float | None = None) -> int:
        """The greatest HLC counter believable at ``now``: wall clock plus ``skew``
        (default ``max_clock_skew``)."""
        if skew is None:
            skew = self.config.max_clock_skew
        if skew == float("inf"):
            return MAX_COUNTER
        return min(MAX_COUNTER, last_counter_at((now + self.wall_offset_s + skew) * 1000.0))

    def refuse_future(self, deltas: list[Delta], now: float, what: str, known: int = 0,
                      skew: float | None = None) -> None:
        """Refuse a whole frame whose rows (or knowledge counter ``known``) lie beyond
        :meth:`counter_horizon` (``skew`` seconds ahead, default ``max_clock_skew``):
        such a version would shadow every later update of its row and drag freshness
        heads forward.  Raises :class:`ProtocolError`."""
        top = known
        for d in deltas:
            if len(d):
                top = max(top, int(d.versions.max()) >> ORIGIN_BITS)
        bound = self.config.max_clock_skew if skew is None else skew
        horizon = self.counter_horizon(now, bound)
        if top > horizon:
            self.counters["refused_future_frames"] += 1
            ahead = ((top >> HLC_LOGICAL_BITS) - (horizon >> HLC_LOGICAL_BITS)) / 1000.0 + bound
            raise ProtocolError(f"{what} carries version counter {top}, {ahead:.3f}s ahead of this replica's "
                                f"clock (at most {bound}s is accepted): refused as impossible "
                                f"(check the sender's clock; a publisher over 256,000 rows/s runs its HLC ahead "
                                f"of wall time and needs a larger max_clock_skew)", "future_version")

    def apply_delta(self, m: ModelState, d: Delta, now: float, source: str,
                    facts: DeltaFacts | None = None) -> ApplyResult:
        """Apply ``d`` to the store and note it (undo history, index, shard tops, head, hooks).

        ``facts`` describe ``d`` when the caller knows them already (a parsed push);
        they are dropped as soon as a filter here replaces ``d``, and the whole-delta
        ones serve only when every row of ``d`` took (``res.ids is d.ids``)."""
        ts = m.store.table(d.table)
        rb = self.rollback_protocol
        if len(d):
            held = m.held(d.table)
            if held is not None:
                # A placed table keeps only its shards: rows of others (a pull or push
                # reaching a replica whose placement moved) are not ours to keep.
                keep = held[facts.shards if facts is not None else ts.spec.shards_of(d.ids)]
                if not keep.all():
                    self.counters["unheld_rows_dropped"] += int((~keep).sum())
                    d, facts = d.take(keep), None
            if rb.baseline_pin:
                d2 = rb.baseline_filter(d)  # a pinned baseline holds the cut's state
                if d2 is not d:
                    d, facts = d2, None
            fence = rb.fence
            if fence:
                fenced = fence.mask(d.model, d.table, d.ids, d.versions)
                if fenced.any():
                    # Rolled-back versions never come back, wherever they still travel.
                    self.counters["fenced_rows"] += int(fenced.sum())
                    d, facts = d.take(~fenced), None
        capture = rb.undo is not None
        if facts is None:
            res = ts.apply(d, capture_old=capture)
        else:
            res = ts.apply(d, capture_old=capture, distinct=facts.distinct, shards=facts.shards)
        n = len(res)
        if n:
            rb.record_undo(d.model, d.table, res)
            m.index[d.table].note_applied(res.ids, res.versions, now, self.config.index_rows)
            top = m.top[d.table]
            if facts is not None and res.ids is d.ids:   # every row took: res.versions is d.versions
                np.maximum(top, facts.shard_max, out=top)
                vmax = facts.max_version
            else:
                np.maximum.at(top, ts.spec.shards_of(res.ids), res.versions)
                vmax = int(res.versions.max())
            # The greatest packed version holds the greatest counter (counter bits on top).
            m.head = max(m.head, vmax >> ORIGIN_BITS)
            self.counters[_APPLIED_KEYS.get(source) or f"applied_rows_{source}"] += n
            for hook in self.on_apply:
                hook(d.model, d.table, res, source)
        return res

