"""Cuts between replicas: cuts sent when taken, cut wall times, and cut anti-entropy.

:class:`CutSync` sends a taken cut to peers (``CUT``), learns cuts peers send,
and gossips a digest of each model's cut names so that a replica that was down or
joined late asks for the cuts it lacks (``GOSSIP{k="cl"}``).
"""

from __future__ import annotations

from typing import Any

from ekko.core.codec import MsgType, field
from ekko.core.errors import ProtocolError
from ekko.core.messages import Outgoing
from ekko.core.spec import check_name
from rollback.cuts import Cut, CutRegistry
from rollback.manager import ModelStateManager
from rollback.model_states import MAX_GOSSIP_MODEL_STATES
from rollback.host import RollbackHost

#: most cut names one cut-list request ("cl") may carry.
MAX_CUT_NAMES = 1024
#: most cuts sent in answer to one cut-list request (each in its own CUT message).
MAX_CUTS_PER_SYNC = 16
#: cut wall times remembered (:meth:`CutSync.cut_wall_time`) before pruning to live cuts.
MAX_CUT_WALL_MEMO = 4096


class CutSync:
    """Cut messages and cut anti-entropy of a replica.

    Args:
        host: the replica (:class:`rollback.host.RollbackHost`: node id, models,
            member list, counters, wall offset, send).
        cuts: the replica's cut registry.
        quality: its model-state manager (a learnt cut is a rollback target).

    Example (through the replica node, which holds one):
        >>> from ekko.replica.node import ReplicaNode
        >>> n = ReplicaNode("r1", "dc1", "127.0.0.1:1", device="cpu")
        >>> n.rollback_protocol.cut_sync.cut_digests_wire()
        {}
    """

    def __init__(self, host: RollbackHost, cuts: CutRegistry, quality: ModelStateManager) -> None:
        self.host = host
        self.cuts = cuts
        self.quality = quality
        # Cut wall times by (model, name, taken_at): see cut_wall_time.
        self._cut_walls: dict[tuple[str, str, float], float] = {}

    def send_cut(self, peer: str, cut: Cut) -> None:
        mem = self.host.members.get(peer)
        if mem is not None:
            # "at": when it was taken as wall time (Unix seconds): protocol time is each
            # replica's own (a daemon's monotonic clock), meaningless elsewhere.
            self.host.send(Outgoing(peer, mem.address, MsgType.CUT, {
                "from": self.host.node_id, "cut": self.cut_to_wire(cut), "at": self.cut_wall_time(cut)}))

    def cut_wall_time(self, cut: Cut) -> float:
        """When ``cut`` was taken, as wall time (Unix seconds; the simulator's HLC epoch
        based time in simulation).  Fixed the first time it is asked (or as received):
        the driver re-reads the wall clock's offset before every frame, and a cut's time
        must not wobble with it."""
        walls = self._cut_walls
        key = (cut.model, cut.name, cut.taken_at)
        got = walls.get(key)
        if got is None:
            if len(walls) >= MAX_CUT_WALL_MEMO:   # keep only the cuts still held
                live = {(c.model, c.name, c.taken_at) for m in self.host.models for c in self.cuts.cuts(m)}
                for k in [k for k in walls if k not in live]:
                    del walls[k]
            got = walls[key] = max(0.0, cut.taken_at + self.host.wall_offset_s)
        return got

    def cut_to_wire(self, cut: Cut) -> dict[str, Any]:
        """:meth:`Cut.to_wire` with ``taken_at`` as wall time (a learnt cut may predate
        this process, i.e. lie before protocol time 0, which the wire form refuses)."""
        wire = cut.to_wire()
        wire["taken_at"] = self.cut_wall_time(cut)
        return wire

    def foreign_cut(self, data: Any, at: Any) -> Cut:
        """A cut from the wire or a snapshot, validated against the model's spec, with
        ``taken_at`` moved to this replica's protocol time when ``at`` (wall seconds)
        is given.  Its seq is 0: our undo records are not ordered against it, so a
        restore walks by its knowledge, which is what defines it.  Raises
        :class:`ProtocolError` and changes nothing."""
        cut = Cut.from_wire(data)
        m = self.host.models.get(cut.model)
        if m is not None:
            for table, shard in cut.knowledge:
                if not m.spec.has_table(table) or shard >= m.spec.table(table).num_shards:
                    raise ProtocolError(f"cut {cut.name} names shard {table}/{shard} the model lacks", "bad_cut")
        taken_at = cut.taken_at
        if at is not None:
            if not isinstance(at, (int, float)) or isinstance(at, bool) or not 0 <= at < float(1 << 40):
                raise ProtocolError("bad cut time", "bad_cut")
            taken_at = float(at) - self.host.wall_offset_s
        out = Cut(cut.name, cut.model, taken_at, cut.knowledge, 0)
        if at is not None:
            self._cut_walls[(out.model, out.name, out.taken_at)] = float(at)
        return out

    def on_cut(self, body: dict[str, Any], now: float) -> None:
        cut = self.foreign_cut(body.get("cut"), body.get("at"))
        if cut.model not in self.host.models:
            return
        if self.cuts.learn(cut):
            self.host.counters["cuts_learnt"] += 1
            self.quality.note_cut(cut.model, cut.name, now)

    # ------------------------------------------------------------------ cut anti-entropy
    def cut_digests_wire(self) -> dict[str, int]:
        """Per model with named cuts, the digest of their names (gossiped: a replica that
        was down or joined late finds out it lacks cuts taken before)."""
        out = {}
        for name in list(self.host.models)[:MAX_GOSSIP_MODEL_STATES]:
            d = self.cuts.names_digest(name)
            if d:
                out[name] = d
        return out

    def parse_cut_digests(self, raw: Any) -> list[str]:
        """Models whose cut digest in a peer's gossip differs from ours (validated first)."""
        if not isinstance(raw, dict) or len(raw) > MAX_GOSSIP_MODEL_STATES or not all(
                isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 64
                for k, v in raw.items()):
            raise ProtocolError("bad cut digests", "bad_body")
        # A model where only we hold cuts: the peer sees our digest and asks us.
        return [k for k, v in raw.items() if k in self.host.models and v != self.cuts.names_digest(k)]

    def ask_cuts(self, peer: str, models: list[str]) -> None:
        """Ask ``peer`` for the named cuts of ``models`` that we lack (we list ours)."""
        mem = self.host.members.get(peer)
        if mem is None:
            return
        for model in models:
            names = [c.name for c in self.cuts.named(model)][-MAX_CUT_NAMES:]
            self.host.counters["cut_lists_asked"] += 1
            self.host.send(Outgoing(peer, mem.address, MsgType.GOSSIP,
                                      {"k": "cl", "from": self.host.node_id, "m": model, "names": names}))

    def on_cut_list(self, body: dict[str, Any], now: float) -> None:
        """A peer lists the named cuts it has of a model: send it those it lacks (newest first)."""
        sender = field(body, "from", str)
        model = field(body, "m", str)
        names = field(body, "names", list)
        if len(names) > MAX_CUT_NAMES:
            raise ProtocolError("too many cut names", "too_large")
        for n in names:
            check_name("cut", n, ProtocolError)
        if model not in self.host.models or self.host.members.get(sender) is None:
            return
        have = set(names)
        missing = [c for c in self.cuts.named(model) if c.name not in have]
        for cut in missing[-MAX_CUTS_PER_SYNC:]:
            self.send_cut(sender, cut)

