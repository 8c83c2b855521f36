"""One replica's logic, sans-IO.

:class:`ReplicaNode` holds a replica's models (tensors and versions), its
protocol state (membership, per-shard knowledge, indexes, outbound queues) and
implements the protocol.  It never opens a socket, sleeps or reads a clock:
drivers call

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
  requester knows more somewhere, a reverse ``PULL_REQUEST``.
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

from ekko.core.chain import RESTART_LINK
from ekko.core.codec import (
    MAX_DELTAS_PER_MSG,
    Frame,
    MsgType,
    delta_from_wire,
    field,
    int_field,
)
from ekko.core.config import MAX_PUBLISH_ROWS, NodeConfig
from ekko.core.delta import Delta
from ekko.core.errors import ProtocolError, UsageError
from p2p.antientropy import AntiEntropyMixin
from p2p.gap_probe import GapMixin
from p2p.push import PushGossipMixin, _impact_of
from rollback.protocol import RollbackMixin
from ekko.core.messages import DeltaFacts, Outgoing, PublishAck
from ekko.core.parse_cache import ParseCache
from ekko.core.spec import ModelSpec, TableSpec, check_name
from ekko.core.store import ApplyResult, ModelStore
from ekko.core.version import (
    HLC_EPOCH_MS,
    HLC_LOGICAL_BITS,
    MAX_COUNTER,
    MAX_ORIGIN,
    ORIGIN_BITS,
    Knowledge,
    counters_of,
    last_counter_at,
    origins_of,
)
from p2p.membership import Membership, MembershipConfig
from p2p.outbound import FifoLinkQueue, LinkQueue, QueueFactory
from p2p.sync import RecentIndex, ShardSync
from p2p.topology import DcGraph, Topology, _mix
from rollback.cuts import CutPolicy, CutRegistry, Fence
from rollback.undo import UndoHistory

#: format of the protocol state kept in snapshots (:meth:`ReplicaNode.export_state`).
STATE_FORMAT = 1
#: counter names of applied rows per apply source (built once: applies are the hot path).
_APPLIED_KEYS = {src: f"applied_rows_{src}" for src in ("push", "pull", "publish", "local")}
#: counter names of received frames per message type.
_RX_KEYS = {t: f"rx_{t.name.lower()}" for t in MsgType}
#: mixed shard tops remembered by value (:func:`_mixed_top`); emptied when full.
TOP_MIX_MEMO_ENTRIES = 1 << 12
_TOP_MIX: dict[bytes, np.ndarray] = {}


def _mixed_top(top: np.ndarray) -> np.ndarray:
    """``_mix`` of a table's greatest held versions (read-only).  Replicas in sync hold
    equal tops, and every anti-entropy round asks: look them up before mixing."""
    key = top.tobytes()
    got = _TOP_MIX.get(key)
    if got is None:
        got = _mix(top.view(np.uint64))
        got.flags.writeable = False
        if len(_TOP_MIX) >= TOP_MIX_MEMO_ENTRIES:
            _TOP_MIX.clear()   # a pure function of the key: forgetting is safe
        _TOP_MIX[key] = got
    return got


class _Model:
    """A model on this replica: its spec, store and per-shard protocol state."""

    __slots__ = ("spec", "store", "shards", "index", "digests", "dirty", "top", "head")

    def __init__(self, spec: ModelSpec, device: Any, with_values: bool) -> None:
        self.spec = spec
        self.store = ModelStore(spec, device, with_values)
        self.shards: dict[str, dict[int, ShardSync]] = {t.name: {} for t in spec.tables}
        self.index = {t.name: RecentIndex(t.rows) for t in spec.tables}
        self.digests = {t.name: np.zeros(t.num_shards, np.uint64) for t in spec.tables}
        self.dirty: dict[str, set[int]] = {t.name: set() for t in spec.tables}
        # Greatest version held per shard: part of the shard version, so replicas whose
        # knowledge is equal but whose rows are not (pushed rows above a knowledge gap
        # that no chain will close) still compare and exchange them.
        self.top = {t.name: np.zeros(t.num_shards, np.int64) for t in spec.tables}
        self.head = 0  # greatest counter applied here (freshness)

    def shard(self, table: str, s: int) -> ShardSync:
        got = self.shards[table].get(s)
        if got is None:
            got = self.shards[table][s] = ShardSync()
        return got

    def shard_digests(self, table: str) -> np.ndarray:
        """64-bit shard versions: the knowledge digest mixed with the greatest version held."""
        d = self.digests[table]
        dirty = self.dirty[table]
        if dirty:
            for s in dirty:
                d[s] = self.shards[table][s].knowledge.digest
            dirty.clear()
        return d ^ _mixed_top(self.top[table])

    def recompute_top(self, table: str, rows: np.ndarray) -> None:
        """Refresh the greatest held version of the shards of ``rows`` (versions went down)."""
        spec = self.spec.table(table)
        v = self.store.table(table).versions
        for s in np.unique(spec.shards_of(rows)).tolist():
            lo, hi = spec.shard_range(s)
            self.top[table][s] = int(v[lo:hi].max(initial=0))


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




class ReplicaNode(PushGossipMixin, AntiEntropyMixin, RollbackMixin, GapMixin):
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
        self._peers_cache: dict[str | None, tuple[int, list[str]]] = {}
        self.models: dict[str, _Model] = {}
        self._catalog_digest: int | None = None
        if c.scheduler == "priority" and prioritizer is None and queue_factory is None:
            prioritizer, queue_factory = _priority_scheduler(c, dc, self.rng)
        self.queue_factory: QueueFactory = queue_factory or (lambda peer, dc: FifoLinkQueue(c.queue_rows))
        self.queues: dict[str, LinkQueue] = {}
        # Shared parse results of push payloads (ekko.core.parse_cache); the simulator sets one.
        self.parse_cache: ParseCache | None = None
        # Scores each pushed batch once (prioritizer.Prioritizer); None = plain FIFO refs.
        self.prioritizer = prioritizer
        self._next_push = float("inf")
        self.peer_heads: dict[str, dict[str, int]] = {}
        self.counters: Counter[str] = Counter()
        # Rows compared by whole-shard scans, per (model, table) (node_antientropy._rows_newer).
        self.rows_walked_by_table: Counter[tuple[str, str]] = Counter()
        self._out: list[Outgoing] = []
        self._next_gossip = now
        self._next_ae = now + self.rng.uniform(0, c.ae_interval)
        self._wan_cursor = 0
        self._pairings: list[tuple[str, int]] = []
        self._pairings_key: tuple[int, int] | None = None
        # ("wan", rank) scope masks per partner, for one topology version (_scope_masks).
        self._wan_masks: dict[Any, Any] = {}
        # Rollback: the undo history (what applies overwrote), cuts, fences of rolled-back
        # versions, and rollbacks seen (gossiped so a replica that was away catches up).
        self.undo = UndoHistory(c.undo_bytes) if c.undo_bytes and with_values else None
        # The history is released by its byte budget only, never at a cut: a row held above
        # a cut's knowledge when it is taken (pulled or pushed past a gap) goes back through
        # history from before the cut (fault-harness seed 7 lost such a row everywhere).
        self.cuts = CutRegistry(CutPolicy(auto_interval_s=c.auto_cut_interval or 3600.0,
                                          retention=c.cut_retention, forget_on_retire=False), undo=self.undo)
        self.fence = Fence()
        self.rollbacks: dict[str, dict[str, Any]] = {}
        self._seq = 0
        self._repair: dict[tuple[str, str], np.ndarray] = {}
        self._repair_rounds = 0
        self._repair_answered: set[str] = set()  # peers that answered the current repair
        self._init_quality()  # the model-state manager (rollback.manager), quality reports
        self._init_gaps(now)  # knowledge gaps no anti-entropy partner fills (p2p.gaps)
        # Hooks for layers above the protocol (undo history, metrics); called with
        # (model, table, ApplyResult, source) after every apply that changed rows.
        self.on_apply: list[Callable[[str, str, ApplyResult, str], None]] = []
        # Wall time (Unix seconds) is ``now + wall_offset_s``: versions further ahead of it
        # than config.max_clock_skew are refused.  The default makes protocol time 0 the
        # HLC epoch, the simulator's convention (publishers there stamp HLC_EPOCH_MS +
        # sim time); the daemon sets it from its real clock before every frame.
        self.wall_offset_s = HLC_EPOCH_MS / 1000.0

    # ------------------------------------------------------------------ driver interface
    def drain(self) -> list[Outgoing]:
        """Messages to send now (the outbox is emptied)."""
        out, self._out = self._out, []
        return out

    def next_deadline(self) -> float:
        """Time of the next timer; call :meth:`tick` then."""
        return min(self._next_gossip, self._next_ae, self._next_push)

    def tick(self, now: float) -> None:
        """Run due timers (gossip, failure detection, anti-entropy) and flush push queues."""
        if now >= self._next_gossip:
            self._next_gossip = now + self.config.gossip_interval * self.rng.uniform(0.8, 1.2)
            self._gossip_round(now)
        if now >= self._next_ae:
            self._next_ae = now + self.config.ae_interval * self.rng.uniform(0.8, 1.2)
            self._ae_round(now)
            self._repair_round(now)
            self._gap_round(now)
            if self.config.auto_cut_interval:
                for name in self.models:
                    cut = self.cuts.maybe_auto_cut(name, now, lambda n=name: (self._knowledge_of(n), self._seq))
                    if cut is not None:
                        self.quality.note_cut(name, cut.name, now)  # a rollback target if taken while healthy
        self.flush(now)

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
            self._on_push(body, now)
        elif t == MsgType.GOSSIP:
            kind = field(body, "k", str)
            if kind == "g":
                self._on_gossip(body, now)
            elif kind == "sum":
                self._on_summary(body, now)
            elif kind == "dig":
                self._on_digests(body, now)
            elif kind == "rep":
                self._on_repair(body, now)
            elif kind == "gq":
                self._on_gap_query(body, now)
            elif kind == "ga":
                self._on_gap_answer(body, now)
            elif kind == "cl":
                self._on_cut_list(body, now)
            else:
                raise ProtocolError(f"unknown gossip kind {kind!r}", "bad_body")
        elif t == MsgType.PULL_REQUEST:
            self._on_pull_request(body, now)
        elif t == MsgType.PULL_RESPONSE:
            self._on_pull_response(body, now)
        elif t == MsgType.ROLLBACK:
            self._apply_rollback(field(body, "rb", dict), now)
        elif t == MsgType.CUT:
            self._on_cut(body, now)
        elif t == MsgType.PUBLISH:
            self.publish(body, now)
        elif t == MsgType.REGISTER_MODEL:
            self.register_model(ModelSpec.from_dict(body.get("spec")), now)
        else:
            raise ProtocolError(f"{t.name} is not handled by this node", "bad_type")

    # ------------------------------------------------------------------ local API
    def register_model(self, spec: ModelSpec, now: float) -> bool:
        """Add a model; True when new.  Re-registering the same spec is a no-op; a
        different spec under the same name is refused."""
        cur = self.models.get(spec.name)
        if cur is not None:
            if cur.spec != spec:
                raise UsageError(f"model {spec.name!r} is already registered with a different spec")
            return False
        self.models[spec.name] = _Model(spec, self.device, self.with_values)
        self._catalog_digest = None
        self.counters["models_registered"] += 1
        return True

    def spec(self, model: str) -> ModelSpec:
        return self._model(model).spec

    def table_spec(self, model: str, table: str) -> TableSpec | None:
        m = self.models.get(model)
        if m is None or not m.spec.has_table(table):
            return None
        return m.spec.table(table)

    def read_rows(self, model: str, table: str, ids: np.ndarray) -> torch.Tensor:
        m = self._model(model)
        ts = m.store.table(table)
        ids = np.asarray(ids, dtype=np.int64)
        if ids.ndim != 1 or (len(ids) and (ids.min() < 0 or ids.max() >= ts.spec.rows)):
            raise UsageError(f"row ids must be a 1-D list within 0..{ts.spec.rows - 1}")
        return ts.read(ids)

    def table_store(self, model: str, table: str):
        return self._model(model).store.table(table)

    def publish(self, body: dict[str, Any], now: float) -> PublishAck:
        """Ingest a publisher's frame body.

        Body: ``model``, ``origin`` (int), ``deltas`` (wire deltas whose versions all
        carry ``origin``), ``chains`` (``{table: [[shard, after], ...]}``: the counter of
        this origin's previous update to each touched shard that the publisher had
        acknowledged, or -1 when unknown).  Validated completely before anything applies.
        """
        model = field(body, "model", str)
        m = self.models.get(model)
        if m is None:
            raise ProtocolError(f"unknown model {model!r}: register it first", "unknown_model")
        if self.baseline_pin:
            raise ProtocolError("this replica is a pinned baseline: publish to an online replica", "baseline")
        origin = int_field(body, "origin", 1, MAX_ORIGIN)
        raw = field(body, "deltas", list)
        if len(raw) > MAX_DELTAS_PER_MSG:
            raise ProtocolError("too many deltas in one publish", "too_large")
        deltas = [delta_from_wire(d, self.table_spec, values_required=self.with_values) for d in raw]
        if sum(len(d) for d in deltas) > MAX_PUBLISH_ROWS:
            raise ProtocolError(f"publish exceeds {MAX_PUBLISH_ROWS} rows", "too_large")
        # A publisher's clock may run ahead of ours by much less than a peer's knowledge
        # may: its versions would shadow every later update of those rows from a correct
        # clock (max_publish_ahead, documented in NodeConfig).
        self.refuse_future(deltas, now, "publish",
                           skew=min(self.config.max_publish_ahead, self.config.max_clock_skew))
        chains_raw = field(body, "chains", dict, optional=True, default={})
        chains: dict[str, dict[int, int]] = {}
        for d in deltas:
            if d.model != model:
                raise ProtocolError("delta for another model in a publish", "bad_body")
            if len(d) and (origins_of(d.versions) != origin).any():
                raise ProtocolError("publish versions must carry the publisher's origin", "bad_version")
            spec = m.spec.table(d.table)
            entries = chains_raw.get(d.table, [])
            if not isinstance(entries, list) or len(entries) > spec.num_shards:
                raise ProtocolError("bad chains", "bad_body")
            ch: dict[int, int] = {}
            for e in entries:
                if (not isinstance(e, list) or len(e) != 2 or not all(isinstance(x, int) for x in e)
                        or not 0 <= e[0] < spec.num_shards or not RESTART_LINK <= e[1] <= MAX_COUNTER):
                    raise ProtocolError(f"bad chain entry {e!r}", "bad_body")
                ch[e[0]] = e[1]
            if len(d):
                shards = spec.shards_of(d.ids)
                ctr = counters_of(d.versions)
                for s in np.unique(shards).tolist():
                    after = ch.get(s, -1)
                    if after >= 0 and int(ctr[shards == s].min()) <= after:
                        raise ProtocolError("publish counters must exceed the chain's previous counter",
                                            "bad_version")
            chains[d.table] = ch
        applied = 0
        top = 0
        shadowed: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for d in deltas:
            res = self._apply(m, d, now, source="publish")
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
            shards = spec.shards_of(d.ids)
            ctr = counters_of(d.versions)
            top = max(top, int(ctr.max()))
            order = np.argsort(shards, kind="stable")
            s_sorted = shards[order]
            bounds = np.flatnonzero(np.diff(s_sorted)) + 1
            links: list[tuple[int, int, int, int]] = []
            for part in np.split(order, bounds):
                s = int(shards[part[0]])
                sync = m.shard(d.table, s)
                after, upto = chains[d.table].get(s, -1), int(ctr[part].max())
                urgent = False
                if after != -1:
                    after, urgent = self._checked_after(sync, origin, after, int(ctr[part].min()), upto)
                if sync.chain(origin, after, upto):
                    m.dirty[d.table].add(s)
                if sync.pending:
                    self._note_waiting(m, d.table, s, now, urgent)
                if after >= 0:
                    links.append((s, origin, after, upto))
            if self.config.push:
                # The links travel with the push only when it carries every row of the
                # frame (a row that lost here is not pushed, and a receiver holding the
                # link without the row would claim knowledge it lacks).
                self._push_from_ingest(m, d.table, res, now, _impact_of(d, res),
                                       links=np.array(links, np.int64) if links and len(res) == len(d) else None)
        self.counters["published_rows"] += sum(len(d) for d in deltas)
        self.flush(now)
        return PublishAck(sum(len(d) for d in deltas), applied, top, shadowed)

    def _checked_after(self, sync: ShardSync, origin: int, after: int, first: int, upto: int) -> tuple[int, bool]:
        """The link a publish frame may claim in one shard: ``(after, urgent)``.

        ``after`` as sent, unless this replica knows of updates of ``origin`` to the
        shard between it and the frame's first counter ``first``.  A publisher chains
        a frame on its previous acknowledged one, so such updates exist only when its
        chain state is stale (restored from a backup, or lost and started over under
        the same origin); linking from ``after`` would claim them as part of this
        frame, and replicas would stop asking for them.  Such a frame, and one sent
        with :data:`~ekko.core.chain.RESTART_LINK`, is linked from just below its own
        counters instead -- or not at all (-1) when known updates reach into them --
        and the gap before it is probed at once (``urgent``, :mod:`p2p.gaps`).
        """
        k = sync.knowledge[origin]
        seen = k if k < first else -1
        overlap = k >= first
        for a, u in sync.pending.get(origin, ()):
            if u < first:
                seen = max(seen, u)
            elif a < upto:
                overlap = True
        if after == RESTART_LINK or after < seen:
            if after != RESTART_LINK:
                self.counters["stale_chains"] += 1
            return (-1 if overlap else first - 1), True
        return after, False

    def apply_local(self, delta: Delta, now: float) -> PublishAck:
        """Apply an already-versioned delta here without chains (tests, tools)."""
        m = self._model(delta.model)
        spec = m.spec.table(delta.table)
        delta.check(spec)
        res = self._apply(m, delta, now, source="local")
        return PublishAck(len(delta), len(res), int(counters_of(delta.versions).max(initial=0)))

    # ------------------------------------------------------------------ persistence
    def export_state(self, model: str) -> dict[str, Any]:
        """The protocol state of ``model`` to keep beside its tensors (msgpack-ready).

        Per (table, shard): the knowledge vector.  The recent-row index and pending
        chains are not kept: the index is rebuilt as a shard scan (see
        :meth:`import_state`), and a lost pending chain only loses a shortcut
        that anti-entropy makes up for.
        """
        m = self._model(model)
        knowledge = {t: [[s, sync.knowledge.to_wire()] for s, sync in sorted(shards.items()) if len(sync.knowledge)]
                     for t, shards in m.shards.items()}
        # Waiting publish chains too: once lost, knowledge could never pass their gap.
        pending = {t: [[s, o, a, u] for s, sync in sorted(shards.items()) for o, chains in sync.pending.items()
                       for a, u in chains] for t, shards in m.shards.items()}
        # Rollbacks applied here: their fences must hold after a restart too (a lagging peer
        # may still send the rolled-back versions before gossip brings the records back).
        rollbacks = [r for r in self.rollbacks.values() if r.get("model") == model]
        # Cuts, so a restart keeps its restore points (times as wall time: protocol time
        # restarts with the process).  Optional in the format: older snapshots lack it.
        cuts = [[self.cut_to_wire(c), self.cut_wall_time(c)] for c in self.cuts.cuts(model)]
        return {"format": STATE_FORMAT, "node_id": self.node_id, "head": m.head, "knowledge": knowledge,
                "pending": {t: p for t, p in pending.items() if p}, "rollbacks": rollbacks, "cuts": cuts}

    def import_state(self, spec: ModelSpec, store: ModelStore, state: dict[str, Any], now: float) -> None:
        """Install a model restored from a snapshot into this node.

        The node must not have the model yet.  Knowledge vectors are restored per
        shard and their digests marked dirty.  The recent-row index starts with its
        watermark raised and marked *loose*, so that "rows newer than a peer's
        knowledge" is answered by a shard scan: the in-memory index did not survive
        the restart, and answering from an empty index would let a peer adopt our
        knowledge without the rows.

        Raises:
            ProtocolError: the state is malformed (reason ``"bad_snapshot"``).
        """
        if spec.name in self.models:
            raise UsageError(f"model {spec.name!r} is already registered")
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ProtocolError("snapshot meta has an unknown format", "bad_snapshot")
        parsed: dict[str, dict[int, Knowledge]] = {}
        raw = state.get("knowledge")
        if not isinstance(raw, dict):
            raise ProtocolError("snapshot meta lacks knowledge", "bad_snapshot")
        for table, entries in raw.items():
            if not spec.has_table(table) or not isinstance(entries, list):
                raise ProtocolError(f"snapshot knowledge names unknown table {table!r}", "bad_snapshot")
            n = spec.table(table).num_shards
            per: dict[int, Knowledge] = {}
            for e in entries:
                if not (isinstance(e, list) and len(e) == 2 and isinstance(e[0], int) and 0 <= e[0] < n):
                    raise ProtocolError("bad snapshot knowledge entry", "bad_snapshot")
                try:
                    per[e[0]] = Knowledge.from_wire(e[1])
                except ProtocolError as err:
                    raise ProtocolError(f"bad snapshot knowledge: {err}", "bad_snapshot") from None
            parsed[table] = per
        pending: dict[str, dict[int, list[tuple[int, int, int]]]] = {}
        raw_pending = state.get("pending", {})
        if not isinstance(raw_pending, dict):
            raise ProtocolError("bad snapshot pending chains", "bad_snapshot")
        for table, entries in raw_pending.items():
            if not spec.has_table(table) or not isinstance(entries, list):
                raise ProtocolError(f"snapshot chains name unknown table {table!r}", "bad_snapshot")
            n = spec.table(table).num_shards
            for e in entries:
                if not (isinstance(e, list) and len(e) == 4 and all(isinstance(x, int) for x in e)
                        and 0 <= e[0] < n and 0 < e[1] <= MAX_ORIGIN and -1 <= e[2] < e[3] <= MAX_COUNTER):
                    raise ProtocolError("bad snapshot chain entry", "bad_snapshot")
                pending.setdefault(table, {}).setdefault(e[0], []).append((e[1], e[2], e[3]))
        rollbacks = state.get("rollbacks", [])
        if not isinstance(rollbacks, list) or not all(isinstance(r, dict) for r in rollbacks):
            raise ProtocolError("bad snapshot rollback records", "bad_snapshot")
        raw_cuts = state.get("cuts", [])
        if not isinstance(raw_cuts, list) or not all(isinstance(c, list) and len(c) == 2 for c in raw_cuts):
            raise ProtocolError("bad snapshot cuts", "bad_snapshot")
        head = state.get("head", 0)
        self.register_model(spec, now)
        m = self.models[spec.name]
        # The node built an empty store; the restored one replaces it before anything uses it.
        m.store = store
        top = int(head) if isinstance(head, int) and head >= 0 else 0
        # The node's index of recently applied rows is not persisted.  Answering pulls from
        # an empty index would send no rows while the knowledge we send says we have them,
        # so the requester would adopt the knowledge without the rows; make every lookup
        # fall back to a shard scan instead.
        for t in spec.tables:
            ts = store.table(t.name)
            know = parsed.get(t.name, {})
            written = np.flatnonzero(ts.versions > 0)
            shards_with_rows = set(np.unique(t.shards_of(written)).tolist()) if len(written) else set()
            if len(written):
                top = max(top, int(counters_of(ts.versions[written]).max()))
                np.maximum.at(m.top[t.name], t.shards_of(written), ts.versions[written])
            m.index[t.name].reset()  # watermark up and loose: every lookup scans the shard
            waiting = pending.get(t.name, {})
            for s in set(know) | shards_with_rows | set(waiting):
                sync = m.shards[t.name][s] = ShardSync(knowledge=know.get(s, Knowledge()))
                for o, a, u in waiting.get(s, ()):
                    sync.chain(o, a, u)
                if sync.pending:
                    self._note_waiting(m, t.name, s, now)
                m.dirty[t.name].add(s)
        m.head = max(m.head, top)
        try:
            cuts = [self._foreign_cut(c, at) for c, at in raw_cuts]   # all valid before any is kept
            if any(c.model != spec.name for c in cuts):
                raise ProtocolError("a snapshot cut names another model", "bad_cut")
            for cut in cuts:
                # The undo history did not survive the restart: a restored cut restores by
                # its knowledge (rows without history are zeroed and repaired from peers).
                if self.cuts.learn(cut):
                    self.quality.note_cut(spec.name, cut.name, now)
            for record in rollbacks:  # fences back first; rows are already at the rolled-back state
                self._apply_rollback(record, now)
        except (ProtocolError, UsageError) as err:
            # Nothing of this model may stay: the node had no such model before the call.
            del self.models[spec.name]
            self._catalog_digest = None
            for rid in [k for k, r in self.rollbacks.items() if r.get("model") == spec.name]:
                del self.rollbacks[rid]
            self.fence._ranges.pop(spec.name, None)
            for cut in self.cuts.cuts(spec.name):
                self.cuts.drop(spec.name, cut.name)
            raise ProtocolError(f"bad snapshot cuts or rollback record: {err}", "bad_snapshot") from None

    # ------------------------------------------------------------------ status
    def model_head(self, model: str) -> int:
        return self._model(model).head

    def status(self, digests: bool = True) -> dict[str, Any]:
        """A JSON-ready status view of this replica."""
        models: dict[str, Any] = {}
        for name, m in self.models.items():
            tables = {}
            for t in m.spec.tables:
                ts = m.store.table(t.name)
                info: dict[str, Any] = {"rows": t.rows, "dim": t.dim, "dtype": t.dtype, "shards": t.num_shards,
                                        "dense": t.dense, "written_rows": int((ts.versions > 0).sum())}
                if digests and ts.values is not None:
                    info["digest"] = ts.digest()
                tables[t.name] = info
            models[name] = {"tables": tables, "head": m.head, "traffic_share": m.spec.traffic_share,
                            "lag_s": self.freshness_lag(name)}
        if self.models:
            states = self.model_states()
            for name in models:
                models[name]["quality"] = states[name]
                models[name]["quality"]["incidents"] = [i.view() for i in self.quality.incidents(name)]
        return {"node_id": self.node_id, "dc": self.dc, "address": self.address,
                "incarnation": self._incarnation(), "models": models}

    def cluster_view(self) -> list[dict[str, Any]]:
        """Every member with its DC, state and per-model freshness lag (seconds)."""
        out = []
        for mem in sorted(self.members.members.values(), key=lambda x: (x.dc, x.node_id)):
            heads = ({n: m.head for n, m in self.models.items()} if mem.node_id == self.node_id
                     else self.peer_heads.get(mem.node_id, {}))
            lags = {name: self._lag(heads.get(name, 0), name) for name in self.models}
            out.append({"node_id": mem.node_id, "dc": mem.dc, "address": mem.address,
                        "state": mem.state.name.lower(), "incarnation": mem.incarnation, "lag_s": lags,
                        "role": mem.role or "replica"})
        return out

    def freshness_lag(self, model: str) -> float | None:
        return self._lag(self._model(model).head, model)

    def _lag(self, head: int, model: str) -> float | None:
        """Seconds (HLC time) behind the most advanced replica we know of; None when this
        replica has nothing yet while others do (its lag is unbounded, not a number)."""
        best = max([self.models[model].head] + [h.get(model, 0) for h in self.peer_heads.values()])
        if not best:
            return 0.0
        if not head:
            return None
        return max(0, best - head) / float(1 << HLC_LOGICAL_BITS) / 1000.0

    # ------------------------------------------------------------------ internals: apply
    def _model(self, name: str) -> _Model:
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

    def _apply(self, m: _Model, d: Delta, now: float, source: str, facts: DeltaFacts | None = None) -> ApplyResult:
        """Apply ``d`` to the store and note it (index, shard tops, head, hooks).

        ``facts`` describe ``d`` when the caller knows them already (a parsed push);
        they are dropped as soon as a filter here replaces ``d``, and the whole-delta
        ones serve only when every row of ``d`` took (``res.ids is d.ids``)."""
        ts = m.store.table(d.table)
        if len(d):
            if self._baseline_pin:
                d2 = self._baseline_filter(d)  # a pinned baseline holds the cut's state (node_rollback)
                if d2 is not d:
                    d, facts = d2, None
            if self.fence:
                fenced = self.fence.mask(d.model, d.table, d.ids, d.versions)
                if fenced.any():
                    # Rolled-back versions never come back, wherever they still travel.
                    self.counters["fenced_rows"] += int(fenced.sum())
                    d, facts = d.take(~fenced), None
        if facts is None:
            res = ts.apply(d, capture_old=self.undo is not None)
        else:
            res = ts.apply(d, capture_old=self.undo is not None, distinct=facts.distinct, shards=facts.shards)
        n = len(res)
        if n:
            if self.undo is not None:
                self._seq += 1
                self.undo.record(d.model, d.table, self._seq, res)
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

