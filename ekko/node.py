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
(:mod:`ekko.daemon`) drives it with real sockets and time; the simulator
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

import hashlib
import random
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from ekko.codec import (MAX_DELTAS_PER_MSG, Frame, MsgType, array_from_wire, array_to_wire, delta_from_wire,
                        delta_to_wire, field, int_field)
from ekko.config import MAX_HELD_ROWS_PER_SHARD, MAX_PUBLISH_ROWS, MAX_SHARDS_PER_PULL, NodeConfig
from ekko.delta import WIRE_DTYPES, Delta
from ekko.errors import ProtocolError, UsageError
from ekko.spec import ModelSpec, TableSpec, check_name
from ekko.store import ApplyResult, ModelStore
from ekko.version import HLC_LOGICAL_BITS, MAX_COUNTER, MAX_ORIGIN, Knowledge, counters_of, origins_of
from p2p.membership import Membership, MembershipConfig, MemberState, parse_entries
from p2p.outbound import FifoLinkQueue, LinkQueue, QueuedRows, QueueFactory
from p2p.sync import ROW_OVERHEAD_BYTES, RecentIndex, ShardSync
from p2p.topology import DcGraph, Topology, _mix
from rollback.cuts import Cut, CutPolicy, CutRegistry, Fence
from rollback.undo import UndoHistory

_SHARD_SALT = np.uint64(0x9E3779B97F4A7C15)
#: format of the protocol state kept in snapshots (:meth:`ReplicaNode.export_state`).
STATE_FORMAT = 1
#: wait before asking a link queue again when it reported ready but yielded nothing.
PUSH_RETRY_S = 0.001
#: rollback records kept for gossip (newest first); a replica that was away catches up from them.
MAX_ROLLBACK_RECORDS = 32
#: anti-entropy rounds a replica keeps asking random peers for better values of the rows a
#: rollback restored (each asks one peer, so the best value spreads like a rumour).
REPAIR_ROUNDS = 8
#: most rows one repair request names per table.
MAX_REPAIR_ROWS = 1 << 16
#: share of gossip rounds spent on a partner in our own DC.
LOCAL_GOSSIP_SHARE = 0.75


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


class _Model:
    """A model on this replica: its spec, store and per-shard protocol state."""

    __slots__ = ("spec", "store", "shards", "index", "digests", "dirty", "top", "head")

    def __init__(self, spec: ModelSpec, device: Any, with_values: bool) -> None:
        self.spec = spec
        self.store = ModelStore(spec, device, with_values)
        self.shards: dict[str, dict[int, ShardSync]] = {t.name: {} for t in spec.tables}
        self.index = {t.name: RecentIndex() for t in spec.tables}
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
        return d ^ _mix(self.top[table].view(np.uint64))

    def recompute_top(self, table: str, rows: np.ndarray) -> None:
        """Refresh the greatest held version of the shards of ``rows`` (versions went down)."""
        spec = self.spec.table(table)
        v = self.store.table(table).versions
        for s in np.unique(spec.shards_of(rows)).tolist():
            lo, hi = spec.shard_range(s)
            self.top[table][s] = int(v[lo:hi].max(initial=0))


def _priority_scheduler(c: NodeConfig, dc: str, rng: random.Random) -> tuple[Any, QueueFactory]:
    """The priority scheduler a config asks for: a scorer/threshold and budgeted link queues."""
    from prioritizer import LinkBudgets, Prioritizer, QueueConfig, ThresholdTracker, priority_queue_factory
    rate = c.wan_update_bytes_per_s or float("inf")
    budgets = LinkBudgets(default_bytes_per_s=rate, intra_dc_bytes_per_s=float("inf"))
    prio = Prioritizer(threshold=ThresholdTracker(c.k_percent, rng=rng.randrange(1 << 31)))
    return prio, priority_queue_factory(dc, budgets, QueueConfig(max_rows=c.queue_rows))


def _impact_of(d: Delta, res: ApplyResult) -> np.ndarray | None:
    """The publisher's impact metadata of the rows an apply changed (aligned with res.ids)."""
    if d.impact is None or not len(res):
        return None
    if len(res) == len(d) and res.ids is d.ids:
        return d.impact
    order = np.argsort(d.ids, kind="stable")
    pos = np.searchsorted(d.ids[order], res.ids)
    return d.impact[order][np.minimum(pos, len(order) - 1)]


def _scope_digest(digests: np.ndarray, mask: np.ndarray | None) -> int:
    idx = np.arange(len(digests), dtype=np.uint64)
    mixed = _mix(digests ^ (idx * _SHARD_SALT))
    if mask is not None:
        mixed = mixed[mask]
    return int(np.bitwise_xor.reduce(mixed)) if len(mixed) else 0


class ReplicaNode:
    """The sans-IO replica.

    Args:
        node_id: unique name of this replica.
        dc: its data centre.
        address: where peers reach it ("host:port").
        config: protocol configuration (:class:`ekko.config.NodeConfig`).
        rng: seeded random generator for peer choice (never the global one).
        now: current time (seconds) at construction.
        incarnation: membership incarnation; must grow across restarts.
        seeds: addresses to contact until the member list has peers.
        device: torch device of the tensors (default: CUDA when available).
        with_values: False = metadata mode (versions only; simulator scale runs).
        queue_factory: builds the outbound queue of each link (the scheduler's hook).

    Example:
        >>> import numpy as np
        >>> from ekko.spec import ModelSpec, TableSpec
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
        # Scores each pushed batch once (prioritizer.Prioritizer); None = plain FIFO refs.
        self.prioritizer = prioritizer
        self._next_push = float("inf")
        self.peer_heads: dict[str, dict[str, int]] = {}
        self.counters: Counter[str] = Counter()
        self._out: list[Outgoing] = []
        self._next_gossip = now
        self._next_ae = now + self.rng.uniform(0, c.ae_interval)
        self._wan_cursor = 0
        self._pairings: list[tuple[str, int]] = []
        self._pairings_key: tuple[int, int] | None = None
        # Rollback: the undo history (what applies overwrote), cuts, fences of rolled-back
        # versions, and rollbacks seen (gossiped so a replica that was away catches up).
        self.undo = UndoHistory(c.undo_bytes) if c.undo_bytes and with_values else None
        self.cuts = CutRegistry(CutPolicy(auto_interval_s=c.auto_cut_interval or 3600.0,
                                          retention=c.cut_retention), undo=self.undo)
        self.fence = Fence()
        self.rollbacks: dict[str, dict[str, Any]] = {}
        self._seq = 0
        self._repair: dict[tuple[str, str], np.ndarray] = {}
        self._repair_rounds = 0
        # Hooks for layers above the protocol (undo history, metrics); called with
        # (model, table, ApplyResult, source) after every apply that changed rows.
        self.on_apply: list[Callable[[str, str, ApplyResult, str], None]] = []

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
            if self.config.auto_cut_interval:
                for name in self.models:
                    self.cuts.maybe_auto_cut(name, now, lambda n=name: (self._knowledge_of(n), self._seq))
        self.flush(now)

    def receive(self, frame: Frame, now: float, src_address: str = "") -> None:
        """Handle a frame from a peer.  Bad data raises :class:`ProtocolError` and
        changes nothing (every message is validated before any state changes)."""
        body = frame.body
        t = frame.msg_type
        self.counters[f"rx_{t.name.lower()}"] += 1
        sender = body.get("from")
        if isinstance(sender, str) and not self.static_membership:
            self.members.heard_from(sender, now)
        if t == MsgType.GOSSIP:
            kind = field(body, "k", str)
            if kind == "g":
                self._on_gossip(body, now)
            elif kind == "sum":
                self._on_summary(body, now)
            elif kind == "dig":
                self._on_digests(body, now)
            elif kind == "rep":
                self._on_repair(body, now)
            else:
                raise ProtocolError(f"unknown gossip kind {kind!r}", "bad_body")
        elif t == MsgType.PULL_REQUEST:
            self._on_pull_request(body, now)
        elif t == MsgType.PULL_RESPONSE:
            self._on_pull_response(body, now)
        elif t == MsgType.PUSH:
            self._on_push(body, now)
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
        origin = int_field(body, "origin", 1, MAX_ORIGIN)
        raw = field(body, "deltas", list)
        if len(raw) > MAX_DELTAS_PER_MSG:
            raise ProtocolError("too many deltas in one publish", "too_large")
        deltas = [delta_from_wire(d, self.table_spec, values_required=self.with_values) for d in raw]
        if sum(len(d) for d in deltas) > MAX_PUBLISH_ROWS:
            raise ProtocolError(f"publish exceeds {MAX_PUBLISH_ROWS} rows", "too_large")
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
                        or not 0 <= e[0] < spec.num_shards or not -1 <= e[1] <= MAX_COUNTER):
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
        for d in deltas:
            res = self._apply(m, d, now, source="publish")
            applied += len(res)
            if len(d) == 0:
                continue
            spec = m.spec.table(d.table)
            shards = spec.shards_of(d.ids)
            ctr = counters_of(d.versions)
            top = max(top, int(ctr.max()))
            order = np.argsort(shards, kind="stable")
            s_sorted = shards[order]
            bounds = np.flatnonzero(np.diff(s_sorted)) + 1
            for part in np.split(order, bounds):
                s = int(shards[part[0]])
                sync = m.shard(d.table, s)
                if sync.chain(origin, chains[d.table].get(s, -1), int(ctr[part].max())):
                    m.dirty[d.table].add(s)
            if self.config.push:
                self._push_from_ingest(m, d.table, res, now, _impact_of(d, res))
        self.counters["published_rows"] += sum(len(d) for d in deltas)
        self.flush(now)
        return PublishAck(sum(len(d) for d in deltas), applied, top)

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
        return {"format": STATE_FORMAT, "node_id": self.node_id, "head": m.head, "knowledge": knowledge,
                "pending": {t: p for t, p in pending.items() if p}}

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
                m.dirty[t.name].add(s)
        m.head = max(m.head, top)

    # ------------------------------------------------------------------ cuts and rollback
    def _knowledge_of(self, model: str) -> dict[tuple[str, int], Knowledge]:
        m = self._model(model)
        return {(t, s): sync.knowledge for t, shards in m.shards.items() for s, sync in shards.items()}

    def take_cut(self, model: str, name: str, now: float, broadcast: bool = True) -> Cut:
        """Record a named restore point of ``model``: its per-shard knowledge now.

        With ``broadcast`` the cut is sent to every live peer, so a rollback to it can
        be started at any replica.
        """
        check_name("cut", name)
        cut = self.cuts.take(model, name, now, self._knowledge_of(model), self._seq)
        if broadcast:
            for peer in self._live_peers():
                mem = self.members.get(peer)
                self._out.append(Outgoing(peer, mem.address, MsgType.CUT, {"from": self.node_id, "cut": cut.to_wire()}))
        return cut

    def _on_cut(self, body: dict[str, Any], now: float) -> None:
        cut = Cut.from_wire(body.get("cut"))
        if cut.model not in self.models:
            return
        try:
            self.cuts.get(cut.model, cut.name)
        except UsageError:
            # Our own apply seq is unknown for a foreign cut: the restore walks by the
            # cut's knowledge, which is what defines it.
            self.cuts.add(Cut(cut.name, cut.model, cut.taken_at, cut.knowledge, 0))

    def rollback(self, model: str, cut: Cut | str, until_counter: int, now: float) -> dict[str, Any]:
        """Roll ``model`` back to ``cut`` everywhere: restore here, then tell every peer.

        Every version of the model newer than the cut and at most ``until_counter`` (an
        HLC counter: the caller's wall clock at the decision, so harmful updates still
        in flight are caught too) is fenced: never applied or served again.  Updates
        published afterwards carry greater counters and apply normally.

        Returns the rollback record (also gossiped until it ages out).
        """
        m = self._model(model)
        if isinstance(cut, str):
            cut = self.cuts.get(model, cut)
        if not 0 < until_counter <= MAX_COUNTER:
            raise UsageError("until_counter must be a positive HLC counter")
        origins: set[int] = set()
        for shards in m.shards.values():
            for sync in shards.values():
                origins.update(o for o, _ in sync.knowledge.items())
        for t in m.spec.tables:
            v = m.store.table(t.name).versions
            written = v[v > 0]
            if len(written):
                origins.update(np.unique(origins_of(written)).tolist())
        record = {"id": f"{self.node_id}.{model}.{cut.name}.{until_counter}", "model": model,
                  "cut": cut.to_wire(), "upper": [[o, until_counter] for o in sorted(origins)]}
        self._apply_rollback(record, now)
        for peer in self._live_peers():
            mem = self.members.get(peer)
            self._out.append(Outgoing(peer, mem.address, MsgType.ROLLBACK, {"from": self.node_id, "rb": record}))
        return record

    def _apply_rollback(self, record: dict[str, Any], now: float) -> bool:
        """Restore the rows a rollback record covers; idempotent per record id."""
        rid = field(record, "id", str)
        if rid in self.rollbacks:
            return False
        model = field(record, "model", str)
        cut = Cut.from_wire(record.get("cut"))
        upper_raw = field(record, "upper", list)
        if len(upper_raw) > MAX_ORIGIN or not all(
                isinstance(e, list) and len(e) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in e)
                and 0 < e[0] <= MAX_ORIGIN and 0 < e[1] <= MAX_COUNTER for e in upper_raw):
            raise ProtocolError("bad rollback point", "bad_body")
        m = self.models.get(model)
        if m is None or cut.model != model:
            return False  # not ours (yet): the record comes again with gossip
        self.rollbacks[rid] = record
        while len(self.rollbacks) > MAX_ROLLBACK_RECORDS:
            del self.rollbacks[next(iter(self.rollbacks))]
        self.fence.add(m.spec, cut, {o: c for o, c in upper_raw})
        restored = 0
        for t in m.spec.tables:
            ts = m.store.table(t.name)
            rows = cut.rows_to_restore(t, ts.versions)
            if len(rows):
                # Only rows holding a fenced version go back; newer, legitimate updates stay.
                rows = rows[self.fence.mask(model, t.name, rows, ts.versions[rows])]
            if not len(rows):
                continue
            if self.undo is not None:
                self._seq += 1
                out = self.undo.restore_at_cut(model, t.name, ts, rows, cut.covered_fn(t), seq=self._seq)
                missing = out.incomplete
            else:
                missing = rows
            if len(missing):
                # No history for these: hold nothing rather than a fenced value; peers fill in.
                n = len(missing)
                ts.restore_rows(missing, np.zeros(n, np.int64),
                                np.zeros((n, t.dim), WIRE_DTYPES[t.dtype]) if ts.values is not None else None)
            restored += len(rows)
            m.index[t.name].note_applied(rows, ts.versions[rows], now, self.config.index_rows)
            m.recompute_top(t.name, rows)
            # State-based sync skips superseded versions, so our history may miss the newest
            # version the cut covers: compare every restored row with peers for a few rounds.
            prev = self._repair.get((model, t.name))
            self._repair[(model, t.name)] = rows if prev is None else np.union1d(prev, rows)
        self._repair_rounds = REPAIR_ROUNDS
        self.counters["rollbacks"] += 1
        self.counters["rolled_back_rows"] += restored
        return True

    def _repair_round(self, now: float) -> None:
        if not self._repair or self._repair_rounds <= 0:
            return
        self._repair_rounds -= 1
        peers = self._live_peers()
        if not peers:
            return
        peer = self.members.get(self.rng.choice(peers))
        for (model, table), rows in self._repair.items():
            ts = self.models[model].store.table(table)
            for lo in range(0, len(rows), MAX_REPAIR_ROWS):
                ids = rows[lo:lo + MAX_REPAIR_ROWS]
                self._out.append(Outgoing(peer.node_id, peer.address, MsgType.GOSSIP, {
                    "k": "rep", "from": self.node_id, "m": model, "t": table, "ids": array_to_wire(ids),
                    "v": array_to_wire(ts.versions[ids])}))
        if self._repair_rounds == 0:
            self._repair.clear()

    def _on_repair(self, body: dict[str, Any], now: float) -> None:
        """A peer asks whether we hold better (greater, unfenced) versions of some rows."""
        sender = field(body, "from", str)
        spec = self.table_spec(field(body, "m", str), field(body, "t", str))
        if spec is None:
            return
        raw = field(body, "ids", bytes)
        if len(raw) % 8 or len(raw) // 8 > MAX_REPAIR_ROWS:
            raise ProtocolError("bad repair request", "bad_body")
        n = len(raw) // 8
        ids = array_from_wire(raw, np.int64, n, "ids")
        theirs = array_from_wire(body.get("v"), np.int64, n, "versions")
        if n and (ids.min() < 0 or ids.max() >= spec.rows):
            raise ProtocolError("repair row out of range", "bad_body")
        mem = self.members.get(sender)
        m = self.models[body["m"]]
        ts = m.store.table(spec.name)
        better = ids[ts.versions[ids] > theirs]
        if mem is None or not len(better):
            return
        d = ts.take(m.spec.name, better)
        shards = spec.shards_of(better)
        entries = []
        for s in np.unique(shards).tolist():
            sel = shards == s
            entries.append([s, [], None, delta_to_wire(d.take(sel))])
        self._out.append(Outgoing(sender, mem.address, MsgType.PULL_RESPONSE,
                                  {"from": self.node_id, "models": {m.spec.name: {spec.name: entries}}}))

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
                        "state": mem.state.name.lower(), "incarnation": mem.incarnation, "lag_s": lags})
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

    def _apply(self, m: _Model, d: Delta, now: float, source: str) -> ApplyResult:
        ts = m.store.table(d.table)
        if len(self.fence) and len(d):
            fenced = self.fence.mask(d.model, d.table, d.ids, d.versions)
            if fenced.any():
                # Rolled-back versions never come back, wherever they still travel.
                self.counters["fenced_rows"] += int(fenced.sum())
                d = d.take(~fenced)
        res = ts.apply(d, capture_old=self.undo is not None)
        if self.undo is not None and len(res):
            self._seq += 1
            self.undo.record(d.model, d.table, self._seq, res)
        if len(res):
            m.index[d.table].note_applied(res.ids, res.versions, now, self.config.index_rows)
            np.maximum.at(m.top[d.table], ts.spec.shards_of(res.ids), res.versions)
            m.head = max(m.head, int(counters_of(res.versions).max()))
            self.counters[f"applied_rows_{source}"] += len(res)
            for hook in self.on_apply:
                hook(d.model, d.table, res, source)
        return res

    # ------------------------------------------------------------------ internals: push
    def _incarnation(self) -> int:
        me = self.members.get(self.node_id)
        return me.incarnation if me is not None else 0

    def _live_peers(self, dc: str | None = None) -> list[str]:
        """Live members other than us (in ``dc`` when given); cached per membership version."""
        version = self.members.version
        hit = self._peers_cache.get(dc)
        if hit is not None and hit[0] == version:
            return hit[1]
        peers = [mem.node_id for mem in self.members.members.values()
                 if mem.node_id != self.node_id and mem.state != MemberState.DEAD and (dc is None or mem.dc == dc)]
        self._peers_cache[dc] = (version, peers)
        return peers

    def _refresh_topology(self) -> None:
        if self.topology.version == self.members.version:
            return  # cheap check first: building the live map walks every member
        live = {mem.node_id: mem.dc for mem in self.members.alive()}
        self.topology.update(live, self.members.version)

    def _enqueue(self, peer: str, rows: QueuedRows, now: float) -> None:
        q = self.queues.get(peer)
        if q is None:
            mem = self.members.get(peer)
            q = self.queues[peer] = self.queue_factory(peer, mem.dc if mem else "")
        q.put(rows, now)

    def _queued(self, m: _Model, table: str, res: ApplyResult, now: float, impact: np.ndarray | None = None
                ) -> QueuedRows:
        rb = m.spec.table(table).row_bytes
        if self.prioritizer is None:
            return QueuedRows(m.spec.name, table, res.ids, res.versions, rb)
        return self.prioritizer.queued_rows(m.spec.name, table, res.ids, res.versions, rb, now,
                                            impact=impact, old_versions=res.old_versions)

    def _push_random(self, m: _Model, table: str, res: ApplyResult, now: float, exclude: str = "") -> None:
        peers = [p for p in self._live_peers() if p != exclude]
        rows = self._queued(m, table, res, now)
        for peer in self.rng.sample(peers, min(self.config.random_fanout, len(peers))):
            self._enqueue(peer, rows, now)

    def _push_from_ingest(self, m: _Model, table: str, res: ApplyResult, now: float,
                          impact: np.ndarray | None = None) -> None:
        if not len(res):
            return
        if self.config.push_mode == "random":
            self._push_random(m, table, res, now)
            return
        spec = m.spec.table(table)
        rows = self._queued(m, table, res, now, impact)
        for peer in self._live_peers(self.dc):
            self._enqueue(peer, rows, now)
        self._refresh_topology()
        # One copy per remote DC, to the rank-0 gateway of the batch's first shard:
        # each member of that DC then gets the batch in one frame from it (per-shard
        # gateways would multiply LAN frames by the shards a batch touches), and WAN
        # load still spreads over the DC's members as batches hit different shards.
        lead = int(spec.shard_of(int(res.ids[0])))
        for dc in self.topology.dcs():
            if dc == self.dc:
                continue
            gw = self.topology.gateways(m.spec.name, table, spec.num_shards, dc)
            if gw.shape[1] == 0:
                continue
            self._enqueue(str(gw[lead, 0]), rows, now)

    def flush(self, now: float) -> None:
        """Turn ready queued rows into PUSH frames (as far as each link's budget allows)."""
        # The same batch is usually queued for many peers (a DC fan-out): build its
        # wire form once per flush.
        built: dict[tuple[int, ...], tuple[list[dict[str, Any]], int, list[QueuedRows]]] = {}
        next_push = float("inf")
        for peer, q in self.queues.items():
            ready = q.next_ready(now)
            while ready is not None and ready <= now:
                batches = q.take(now, self.config.push_frame_bytes)
                if not batches:
                    # The queue said "ready" but gave nothing (a budget rounding edge):
                    # look again a moment later rather than spinning at this instant.
                    ready = now + PUSH_RETRY_S
                    break
                key = tuple(id(b.ids) for b in batches)
                got = built.get(key)
                if got is None:
                    # Keep the batches alive with their wire form: ids are only unique
                    # among live objects.
                    got = built[key] = (*self._push_deltas(batches), batches)
                self._send_push(peer, got[0], got[1])
                ready = q.next_ready(now)
            if ready is not None and ready < next_push:
                next_push = ready
        self._next_push = next_push

    def _push_deltas(self, batches: list[QueuedRows]) -> tuple[list[dict[str, Any]], int]:
        deltas = []
        extra = 0
        for b in batches:
            m = self.models.get(b.model)
            if m is None:
                continue
            ts = m.store.table(b.table)
            d = ts.take(b.model, b.ids)
            deltas.append(delta_to_wire(d))
            if d.values is None:
                extra += len(d) * ts.spec.row_bytes
        return deltas, extra

    def _send_push(self, peer: str, deltas: list[dict[str, Any]], extra: int) -> None:
        mem = self.members.get(peer)
        if mem is None or mem.state == MemberState.DEAD:
            return
        if deltas:
            self.counters["push_frames_sent"] += 1
            self._out.append(Outgoing(peer, mem.address, MsgType.PUSH,
                                      {"from": self.node_id, "dc": self.dc, "deltas": deltas}, extra))

    def _on_push(self, body: dict[str, Any], now: float) -> None:
        sender = field(body, "from", str)
        sender_dc = field(body, "dc", str)
        raw = field(body, "deltas", list)
        if len(raw) > MAX_DELTAS_PER_MSG:
            raise ProtocolError("too many deltas in one push", "too_large")
        deltas = [delta_from_wire(d, self.table_spec, values_required=self.with_values) for d in raw]
        # A push from another DC reached us as that shard's gateway: forward it over
        # the LAN.  Pushes from our own DC stop here, so there are no loops.
        rumor = self.config.push and self.config.push_mode == "random"
        forward = sender_dc != self.dc and self.config.push and not rumor
        peers = [p for p in self._live_peers(self.dc) if p != sender] if forward else []
        for d in deltas:
            m = self.models[d.model]
            res = self._apply(m, d, now, source="push")
            if rumor and len(res):
                # Rumor mongering: pass on only what was new to us, so it dies out.
                self._push_random(m, d.table, res, now, exclude=sender)
                forward = True
            elif forward and len(res):
                rows = self._queued(m, d.table, res, now, _impact_of(d, res))
                for p in peers:
                    self._enqueue(p, rows, now)
        self.counters["push_frames_received"] += 1
        if forward:
            self.flush(now)

    # ------------------------------------------------------------------ internals: gossip
    def catalog_digest(self) -> int:
        if self._catalog_digest is None:
            h = hashlib.blake2b(digest_size=8)
            for name in sorted(self.models):
                h.update(repr(self.models[name].spec.to_dict()).encode())
            self._catalog_digest = int.from_bytes(h.digest(), "little")
        return self._catalog_digest

    def _gossip_body(self, req: bool, with_catalog: bool = False, to_dc: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"k": "g", "from": self.node_id,
                                "mem": self.members.gossip_entries(self.rng, prefer_dc=to_dc),
                                "cat": self.catalog_digest(), "req": req,
                                "heads": {n: m.head for n, m in self.models.items()}}
        if with_catalog:
            body["specs"] = [m.spec.to_dict() for m in self.models.values()]
        if self.rollbacks:
            body["rb"] = list(self.rollbacks.values())[-MAX_ROLLBACK_RECORDS:]
        return body

    def _gossip_round(self, now: float) -> None:
        if self.static_membership:
            return
        self.members.tick(now)
        died = self.members.check(now)
        if died:
            self.counters["members_died"] += len(died)
        local = self._live_peers(self.dc)
        peers = self._live_peers()
        # Mostly gossip inside the DC (cheap, and DC members watch each other for
        # gateway failover); now and then across, so DCs keep seeing each other.
        pool = local if local and self.rng.random() < LOCAL_GOSSIP_SHARE else peers
        if pool:
            peer = self.members.get(self.rng.choice(pool))
            self._out.append(Outgoing(peer.node_id, peer.address, MsgType.GOSSIP,
                                      self._gossip_body(True, to_dc=peer.dc)))
        if len(peers) < 2 or self.rng.random() < 0.05:
            # Keep contacting seeds while we know few peers (join), and now and then
            # afterwards so a partitioned-off node finds its way back.
            for s in self.seeds:
                self._out.append(Outgoing("", s, MsgType.GOSSIP, self._gossip_body(True)))

    def _on_gossip(self, body: dict[str, Any], now: float) -> None:
        sender = field(body, "from", str)
        entries = parse_entries(field(body, "mem", list))
        cat = int_field(body, "cat", 0, (1 << 64) - 1)
        req = field(body, "req", bool)
        heads = field(body, "heads", dict, optional=True, default={})
        specs = None
        if "specs" in body:
            specs = [ModelSpec.from_dict(s) for s in field(body, "specs", list)]
        self.members.merge(entries, now)
        if isinstance(heads, dict):
            self.peer_heads[sender] = {k: v for k, v in heads.items()
                                       if isinstance(k, str) and isinstance(v, int) and 0 <= v <= MAX_COUNTER}
        for spec in specs or ():
            try:
                self.register_model(spec, now)
            except UsageError:
                self.counters["catalog_conflicts"] += 1
        rbs = field(body, "rb", list, optional=True, default=[])
        if len(rbs) > MAX_ROLLBACK_RECORDS:
            raise ProtocolError("too many rollback records", "bad_body")
        for rb in rbs:
            if isinstance(rb, dict) and rb.get("id") not in self.rollbacks:
                self._apply_rollback(rb, now)
        if req:
            mem = self.members.get(sender)
            if mem is not None:
                self._out.append(Outgoing(sender, mem.address, MsgType.GOSSIP,
                                          self._gossip_body(False, with_catalog=cat != self.catalog_digest(),
                                                            to_dc=mem.dc)))
        elif cat != self.catalog_digest() and specs is None:
            # They have models we lack (or the reverse): ask with our catalog attached.
            mem = self.members.get(sender)
            if mem is not None:
                self._out.append(Outgoing(sender, mem.address, MsgType.GOSSIP,
                                          self._gossip_body(True, with_catalog=True)))

    # ------------------------------------------------------------------ internals: anti-entropy
    def _scope_masks(self, scope: list[Any], partner: str) -> dict[tuple[str, str], np.ndarray | None]:
        """Shards (per table) that this node exchanges with ``partner`` under ``scope``.
        None means every shard."""
        out: dict[tuple[str, str], np.ndarray | None] = {}
        kind = scope[0]
        if kind in ("dc", "any"):
            for name, m in self.models.items():
                for t in m.spec.tables:
                    out[(name, t.name)] = None
            return out
        # ("wan", rank): shards where we are both gateways of that rank in our DCs.
        rank = int(scope[1])
        pmem = self.members.get(partner)
        if pmem is None:
            return out
        self._refresh_topology()
        for name, m in self.models.items():
            for t in m.spec.tables:
                mine = self.topology.gateways(name, t.name, t.num_shards, self.dc)
                theirs = self.topology.gateways(name, t.name, t.num_shards, pmem.dc)
                if mine.shape[1] <= rank or theirs.shape[1] <= rank:
                    continue
                mask = (mine[:, rank] == self.node_id) & (theirs[:, rank] == partner)
                if mask.any():
                    out[(name, t.name)] = mask
        return out

    def _ae_round(self, now: float) -> None:
        if not self.models:
            return
        if not self.config.use_gateways:
            peers = self._live_peers()
            if peers:
                self._start_sync(self.rng.choice(peers), ["any"], now)
            return
        local = self._live_peers(self.dc)
        if local:
            self._start_sync(self.rng.choice(local), ["dc"], now)
        # Cross-DC: walk our (remote DC, rank, partner) pairings round-robin, a few
        # per round; each pairs shards we gateway at some rank with the remote
        # gateway of the same rank.
        pairings = self._wan_pairings()
        for _ in range(min(self.config.wan_partners_per_round, len(pairings))):
            self._wan_cursor = (self._wan_cursor + 1) % len(pairings)
            partner, rank = pairings[self._wan_cursor]
            self._start_sync(partner, ["wan", rank], now)

    def _wan_pairings(self) -> list[tuple[str, int]]:
        self._refresh_topology()
        key = (self.members.version, len(self.models))
        if self._pairings_key == key:
            return self._pairings
        found: set[tuple[str, int]] = set()
        for remote_dc in self.topology.dcs():
            if not self.topology.graph.linked(self.dc, remote_dc):
                continue
            for name, m in self.models.items():
                for t in m.spec.tables:
                    mine = self.topology.gateways(name, t.name, t.num_shards, self.dc)
                    theirs = self.topology.gateways(name, t.name, t.num_shards, remote_dc)
                    for r in range(min(mine.shape[1], theirs.shape[1])):
                        hit = mine[:, r] == self.node_id
                        if hit.any():
                            found.update((str(p), r) for p in np.unique(theirs[hit, r].astype(str)).tolist())
        self._pairings = sorted(found)
        self.rng.shuffle(self._pairings)
        self._pairings_key = key
        return self._pairings

    def _start_sync(self, partner: str, scope: list[Any], now: float) -> None:
        mem = self.members.get(partner)
        if mem is None:
            return
        masks = self._scope_masks(scope, partner)
        if not masks:
            return
        self.counters["ae_rounds"] += 1
        if not self.config.use_shard_versions:
            # Ablation: no shard versions -- ask for every shard in scope every round.
            req = {}
            for (name, table), mask in masks.items():
                shards = np.flatnonzero(mask) if mask is not None else np.arange(
                    self.models[name].spec.table(table).num_shards)
                req.setdefault(name, {})[table] = shards.tolist()
            self._send_pull_request(partner, req, back=True)
            return
        sums: dict[str, dict[str, int]] = {}
        for (name, table), mask in masks.items():
            sums.setdefault(name, {})[table] = _scope_digest(self.models[name].shard_digests(table), mask)
        self._out.append(Outgoing(partner, mem.address, MsgType.GOSSIP,
                                  {"k": "sum", "from": self.node_id, "scope": scope, "models": sums}))

    def _parse_scope(self, body: dict[str, Any]) -> list[Any]:
        scope = field(body, "scope", list)
        if not scope or scope[0] not in ("dc", "any", "wan") or (
                scope[0] == "wan" and (len(scope) != 2 or not isinstance(scope[1], int) or not 0 <= scope[1] < 16)):
            raise ProtocolError("bad scope", "bad_body")
        return scope

    def _on_summary(self, body: dict[str, Any], now: float) -> None:
        sender = field(body, "from", str)
        scope = self._parse_scope(body)
        sums = field(body, "models", dict)
        mem = self.members.get(sender)
        if mem is None:
            return
        masks = self._scope_masks(scope, sender)
        out: dict[str, dict[str, list[bytes]]] = {}
        for (name, table), mask in masks.items():
            theirs = sums.get(name, {}).get(table) if isinstance(sums.get(name), dict) else None
            digests = self.models[name].shard_digests(table)
            if theirs is not None and theirs == _scope_digest(digests, mask):
                continue
            shards = np.flatnonzero(mask) if mask is not None else np.arange(len(digests))
            sel = digests[shards]
            # Only shards with any knowledge on our side; the partner adds its own.
            out.setdefault(name, {})[table] = [array_to_wire(shards.astype(np.int64)), array_to_wire(sel)]
        if out:
            self._out.append(Outgoing(sender, mem.address, MsgType.GOSSIP,
                                      {"k": "dig", "from": self.node_id, "scope": scope, "models": out}))

    def _on_digests(self, body: dict[str, Any], now: float) -> None:
        sender = field(body, "from", str)
        self._parse_scope(body)
        models = field(body, "models", dict)
        req: dict[str, dict[str, list[int]]] = {}
        for name, tables in models.items():
            m = self.models.get(name)
            if m is None or not isinstance(tables, dict):
                continue
            for table, pair in tables.items():
                if not m.spec.has_table(table) or not isinstance(pair, list) or len(pair) != 2:
                    continue
                spec = m.spec.table(table)
                if not isinstance(pair[0], bytes) or len(pair[0]) % 8:
                    raise ProtocolError("bad digests", "bad_body")
                n = len(pair[0]) // 8
                if n > spec.num_shards:
                    raise ProtocolError("bad digests", "bad_body")
                shards = array_from_wire(pair[0], np.int64, n, "shards")
                theirs = array_from_wire(pair[1], np.uint64, n, "digests")
                if n and (shards.min() < 0 or shards.max() >= spec.num_shards):
                    raise ProtocolError("shard out of range", "bad_body")
                mine = m.shard_digests(table)[shards]
                diff = shards[mine != theirs]
                if len(diff):
                    req.setdefault(name, {})[table] = diff.tolist()
        if req:
            self._send_pull_request(sender, req, back=True)

    def _send_pull_request(self, partner: str, shards: dict[str, dict[str, list[int]]], back: bool) -> None:
        mem = self.members.get(partner)
        if mem is None:
            return
        body_models: dict[str, dict[str, list[Any]]] = {}
        count = 0
        for name, tables in shards.items():
            m = self.models[name]
            for table, ss in tables.items():
                ts = m.store.table(table)
                entries = []
                for s in ss:
                    if count >= MAX_SHARDS_PER_PULL:
                        break
                    sync = m.shards[table].get(s)
                    mine = sync.knowledge if sync is not None else Knowledge()
                    # Rows we hold above our knowledge (eagerly pushed): the peer skips them.
                    hid, hv = m.index[table].newer_than(ts, s, mine, mine)
                    if len(hid) > MAX_HELD_ROWS_PER_SHARD:
                        hid, hv = hid[:MAX_HELD_ROWS_PER_SHARD], hv[:MAX_HELD_ROWS_PER_SHARD]
                    entries.append([s, mine.to_wire(), array_to_wire(hid) if len(hid) else None,
                                    array_to_wire(hv) if len(hid) else None])
                    count += 1
                if entries:
                    body_models.setdefault(name, {})[table] = entries
        if body_models:
            self.counters["pull_requests_sent"] += 1
            self._out.append(Outgoing(partner, mem.address, MsgType.PULL_REQUEST,
                                      {"from": self.node_id, "back": back, "models": body_models}))

    def _on_pull_request(self, body: dict[str, Any], now: float) -> None:
        sender = field(body, "from", str)
        back = field(body, "back", bool)
        models = field(body, "models", dict)
        mem = self.members.get(sender)
        # Across the WAN, hold back rows applied moments ago: their eager push is
        # most likely in flight, and sending them again would cross the WAN twice.
        grace_from = now - self.config.push_grace if (
            mem is not None and mem.dc != self.dc and self.config.push) else None
        # Parse and validate everything first.
        parsed: list[tuple[_Model, str, int, Knowledge, np.ndarray, np.ndarray]] = []
        total = 0
        for name, tables in models.items():
            m = self.models.get(name)
            if m is None or not isinstance(tables, dict):
                continue
            for table, entries in tables.items():
                if not m.spec.has_table(table) or not isinstance(entries, list):
                    continue
                spec = m.spec.table(table)
                for e in entries:
                    total += 1
                    if total > MAX_SHARDS_PER_PULL or not isinstance(e, list) or len(e) != 4:
                        raise ProtocolError("bad pull request entry", "bad_body")
                    s = e[0]
                    if not isinstance(s, int) or not 0 <= s < spec.num_shards:
                        raise ProtocolError("shard out of range", "bad_body")
                    k = Knowledge.from_wire(e[1])
                    if e[2] is None:
                        hid = hv = np.zeros(0, np.int64)
                    else:
                        if not isinstance(e[2], bytes) or len(e[2]) % 8 or len(e[2]) // 8 > MAX_HELD_ROWS_PER_SHARD:
                            raise ProtocolError("bad held rows", "bad_body")
                        n = len(e[2]) // 8
                        hid = array_from_wire(e[2], np.int64, n, "held ids")
                        hv = array_from_wire(e[3], np.int64, n, "held versions")
                    parsed.append((m, table, s, k, hid, hv))
        if mem is None:
            return
        budget = self.config.pull_response_bytes
        out_models: dict[str, dict[str, list[Any]]] = {}
        reverse: dict[str, dict[str, list[int]]] = {}
        extra = 0
        for m, table, s, theirs, hid, hv in parsed:
            ts = m.store.table(table)
            sync = m.shards[table].get(s)
            mine = sync.knowledge if sync is not None else Knowledge()
            if back and not mine.dominates(theirs):
                reverse.setdefault(m.spec.name, {}).setdefault(table, []).append(s)
            ids, vers = m.index[table].newer_than(ts, s, theirs, mine)
            cut_below = None
            if grace_from is not None and sync is not None and len(ids):
                fresh = m.index[table].fresh_since(grace_from, *ts.spec.shard_range(s))
                if len(fresh):
                    held_back = np.isin(ids, fresh)
                    if held_back.any():
                        cut_below = int(counters_of(vers[held_back]).min())
                        ids, vers = ids[~held_back], vers[~held_back]
            if len(hid) and len(ids):
                # Skip rows the requester already holds at this version or newer.
                order = np.argsort(hid)
                hid_s, hv_s = hid[order], hv[order]
                pos = np.clip(np.searchsorted(hid_s, ids), 0, len(hid_s) - 1)
                have = (hid_s[pos] == ids) & (hv_s[pos] >= vers)
                ids, vers = ids[~have], vers[~have]
            per_row = ts.spec.row_bytes + ROW_OVERHEAD_BYTES
            fit = len(ids) if budget >= len(ids) * per_row else max(0, budget // per_row)
            if fit < len(ids):
                c = int(counters_of(vers[fit]))
                cut_below = c if cut_below is None else min(cut_below, c)
                ids = ids[:fit]
            budget -= fit * per_row
            delta = None
            if len(ids):
                d = ts.take(m.spec.name, ids)
                delta = delta_to_wire(d)
                if d.values is None:
                    extra += len(d) * ts.spec.row_bytes
            if delta is None and cut_below is None and mine == theirs:
                continue
            out_models.setdefault(m.spec.name, {}).setdefault(table, []).append(
                [s, mine.to_wire(), cut_below, delta])
        if out_models:
            self.counters["pull_responses_sent"] += 1
            self._out.append(Outgoing(sender, mem.address, MsgType.PULL_RESPONSE,
                                      {"from": self.node_id, "models": out_models}, extra))
        if reverse:
            self._send_pull_request(sender, reverse, back=False)

    def _on_pull_response(self, body: dict[str, Any], now: float) -> None:
        field(body, "from", str)
        models = field(body, "models", dict)
        parsed: list[tuple[_Model, str, int, Knowledge, int | None, Delta | None]] = []
        for name, tables in models.items():
            m = self.models.get(name)
            if m is None or not isinstance(tables, dict):
                continue
            for table, entries in tables.items():
                if not m.spec.has_table(table) or not isinstance(entries, list):
                    continue
                spec = m.spec.table(table)
                for e in entries:
                    if not isinstance(e, list) or len(e) != 4:
                        raise ProtocolError("bad pull response entry", "bad_body")
                    s, kw, cut, dw = e
                    if not isinstance(s, int) or not 0 <= s < spec.num_shards:
                        raise ProtocolError("shard out of range", "bad_body")
                    if cut is not None and (not isinstance(cut, int) or not 0 <= cut <= MAX_COUNTER):
                        raise ProtocolError("bad cut", "bad_body")
                    k = Knowledge.from_wire(kw)
                    d = None
                    if dw is not None:
                        d = delta_from_wire(dw, self.table_spec, values_required=self.with_values)
                        if d.model != name or d.table != table or (len(d) and (spec.shards_of(d.ids) != s).any()):
                            raise ProtocolError("pull response rows outside their shard", "bad_body")
                    parsed.append((m, table, s, k, cut, d))
        for m, table, s, k, cut, d in parsed:
            if d is not None:
                self._apply(m, d, now, source="pull")
            sync = m.shard(table, s)
            if sync.learn(k, cut):
                m.dirty[table].add(s)
        self.counters["pull_responses_received"] += 1
