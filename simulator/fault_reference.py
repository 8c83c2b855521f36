"""The fault harness's reference model: the trainer-side truth a chaos run is checked against.

Every frame a replica accepted (rows, versions, values), every rollback with its cut's
knowledge and rollback point, and which row versions a lost disk may have taken.  From
these it derives the expected state of every row (:meth:`ReferenceModel.expected`), the
rows whose outcome a disk loss leaves open (:meth:`ReferenceModel.maybe_lost`) and the
knowledge every replica must reach (:meth:`ReferenceModel.heads`).  Nothing of the model
is read from a replica but its holdings at the moment of a disk loss
(:meth:`ReferenceModel.mark_lost`).  :mod:`simulator.faults` documents the rules.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ekko.core.chain import PendingFrame
from ekko.core.codec import array_from_wire
from ekko.core.spec import ModelSpec, TableSpec
from ekko.core.version import counters_of
from ekko.replica.node import ReplicaNode
from simulator.fault_plan import RefRollback

#: the model every scenario publishes: small enough for full mode in CI.  ``ads`` is a
#: hashed table: its rows carry keys, and every replica's key map is checked against them.
MODEL_NAME = "chaos"
SPEC = ModelSpec(MODEL_NAME, [TableSpec("emb", rows=512, dim=4, shards=8),
                              TableSpec("dense", rows=16, dim=8, dense=True),
                              TableSpec("ads", dim=4, keys="int64", capacity=256, shards=4)])


@dataclass
class _Frame:
    """A frame some replica accepted: the reference model's record of it."""

    origin: int
    tables: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]  # table -> (ids, versions, values)
    acked: bool


class ReferenceModel:
    """What the cluster must end up holding, kept by the harness as the faults happen.

    ``frames``: every frame a replica accepted, in order (one record per frame);
    ``rollbacks``: every rollback issued; ``lost``: per table, per disk loss, the
    ``(lo, hi)`` per row whose versions in ``(lo, hi]`` may be lost;
    ``unknown_ranges``: counter ranges only a lost disk knew of.
    """

    def __init__(self) -> None:
        self.frames: list[_Frame] = []
        self.frames_by_key: dict[tuple[int, int], _Frame] = {}
        self.rollbacks: list[RefRollback] = []
        #: per table, per disk loss: (lo, hi) per row -- that row's versions in (lo, hi] may be
        #: lost (only the lost replica held them); the check accepts either outcome.
        self.lost: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {t.name: [] for t in SPEC.tables}
        # (table, shard, origin) -> counter ranges only a lost disk knew of (see mark_lost).
        self.unknown_ranges: dict[tuple[str, int, int], list[tuple[int, int]]] = {}

    def record_frame(self, frame: PendingFrame, tables: dict[str, tuple[np.ndarray, np.ndarray]],
                      acked: bool) -> None:
        """Reference model: a replica accepted ``frame`` (recorded once per frame)."""
        key = (frame.body["origin"], frame.first_counter)
        got = self.frames_by_key.get(key)
        if got is not None:
            got.acked |= acked
            return
        versions = versions_of(frame)
        f = _Frame(frame.body["origin"], {t: (ids, versions[t], vals.copy()) for t, (ids, vals) in tables.items()},
                   acked)
        self.frames.append(f)
        self.frames_by_key[key] = f

    def fenced_for(self, rbs: list[RefRollback], table: TableSpec, ids: np.ndarray,
                    versions: np.ndarray) -> np.ndarray:
        out = np.zeros(len(versions), bool)
        for r in rbs:
            out |= r.fenced(table, ids, versions)
        return out

    def lost_mask(self, table: str, ids: np.ndarray, versions: np.ndarray) -> np.ndarray:
        out = np.zeros(len(ids), bool)
        for lo, hi in self.lost[table]:
            out |= (versions > lo[ids]) & (versions <= hi[ids])
        return out

    def expected(self, without_lost: bool = False) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """The reference state: per row, the greatest accepted version no rollback fenced
        (``without_lost``: and that no disk loss may have taken, :meth:`mark_lost`)."""
        ver = {t.name: np.zeros(t.rows, np.int64) for t in SPEC.tables}
        val = {t.name: np.zeros((t.rows, t.width), np.float32) for t in SPEC.tables}
        for f in self.frames:
            for tname, (ids, versions, values) in f.tables.items():
                t = SPEC.table(tname)
                keep = ~self.fenced_for(self.rollbacks, t, ids, versions) & (versions > ver[tname][ids])
                if without_lost:
                    keep &= ~self.lost_mask(tname, ids, versions)
                ver[tname][ids[keep]] = versions[keep]
                val[tname][ids[keep]] = values[keep]
        return ver, val

    def maybe_lost(self, want: tuple[dict[str, np.ndarray], dict[str, np.ndarray]]
                    ) -> dict[str, dict[int, dict[int, np.ndarray]]]:
        """Rows whose expected version a disk loss may have taken: per table, row -> every
        version the row may end at (from the expected one without lost versions up to
        the expected one) -> its value."""
        if not any(self.lost.values()):
            return {}
        low_v, low_x = self.expected(without_lost=True)
        want_v = want[0]
        out: dict[str, dict[int, dict[int, np.ndarray]]] = {}
        for t in SPEC.tables:
            rows = np.flatnonzero(want_v[t.name] != low_v[t.name])
            if not len(rows):
                continue
            per = out[t.name] = {int(r): {int(low_v[t.name][r]): low_x[t.name][r]} for r in rows}
            for f in self.frames:
                if t.name not in f.tables:
                    continue
                ids, versions, values = f.tables[t.name]
                sel = np.flatnonzero(np.isin(ids, rows))
                if not len(sel):
                    continue
                ok = ~self.fenced_for(self.rollbacks, t, ids[sel], versions[sel])
                for i in sel[ok].tolist():
                    r, v = int(ids[i]), int(versions[i])
                    if int(low_v[t.name][r]) < v <= int(want_v[t.name][r]):
                        per[r][v] = values[i]
        return out

    def heads(self) -> dict[tuple[str, int, int], int]:
        """Per (table, shard, origin): the greatest counter of any accepted frame, leaving
        out rows a lost disk may have taken: a frame lost whole at the *tail* of an
        origin's chain in a shard (no later frame links on it) is known to nobody, so no
        replica can know to wait for it (harmless: its rows are gone).  Lost frames that a
        later frame links on still count, through that frame's greater counter."""
        heads: dict[tuple[str, int, int], int] = {}
        for f in self.frames:
            for tname, (ids, versions, _) in f.tables.items():
                # (fenced versions too: a replica that rolled them back holds older ones, so a
                # lost disk's marks do not name them; frames after the rollback link past them)
                keep = ~self.lost_mask(tname, ids, versions) & \
                    ~self.fenced_for(self.rollbacks, SPEC.table(tname), ids, versions)
                ids, versions = ids[keep], versions[keep]
                if not len(ids):
                    continue
                shards = SPEC.table(tname).shards_of(ids)
                c = counters_of(versions)
                for s in np.unique(shards).tolist():
                    key = (tname, s, f.origin)
                    heads[key] = max(heads.get(key, 0), int(c[shards == s].max()))
        # A head inside a range only a lost disk knew of, with no later frame past it, is
        # known to nobody (its rows were superseded there): the knowledge before it counts.
        for key, ranges in self.unknown_ranges.items():
            h = heads.get(key)
            for lo, hi in ranges:
                if h is not None and lo < h <= hi:
                    below = [int(c) for f in self.frames if f.origin == key[2] and key[0] in f.tables
                             for c in _shard_counters(f, key[0], key[1]) if c <= lo]
                    heads[key] = max(below, default=0)
                    h = heads[key]
        return heads

    def mark_lost(self, node: ReplicaNode, holders: list[ReplicaNode]) -> int:
        """Reference model: the row versions only ``node`` holds may be lost with its disk.

        Per row, ``node``'s version ``l`` against the greatest version ``h`` any other replica
        holds (live, or down with its durable state): the versions in ``(h, l]`` when
        ``l > h``; ``l`` alone when it is older but no other replica holds it exactly (a
        rollback may still need it).  A message in flight may yet deliver some of them, so
        the check accepts the row with or without them (but every replica must agree).
        ``holders``: the other replicas that keep their state.  Returns how many rows of
        ``node`` are at risk.
        """
        # Counters of an origin in a shard that only ``node`` knew of (its knowledge or waiting
        # intervals beyond every holder's): a frame there whose rows were all superseded at
        # ``node`` leaves no trace anywhere, so no replica can know to wait for it.
        theirs = [_known_tops(h) for h in holders]
        for key, top in _known_tops(node).items():
            elsewhere = max((t.get(key, 0) for t in theirs), default=0)
            if top > elsewhere:
                self.unknown_ranges.setdefault(key, []).append((elsewhere, top))
        at_risk = 0
        for t in SPEC.tables:
            mine = node.table_store(MODEL_NAME, t.name).versions.copy()
            if holders:
                others = np.stack([h.table_store(MODEL_NAME, t.name).versions for h in holders])
                h = others.max(axis=0)
                exact = (others == mine).any(axis=0)
            else:
                h = np.zeros_like(mine)
                exact = np.zeros(len(mine), bool)
            sel = (mine > 0) & ~exact
            if sel.any():
                lo = np.where(sel, np.where(mine > h, h, mine - 1), 0)
                hi = np.where(sel, mine, 0)
                self.lost[t.name].append((lo, hi))
                at_risk += int(sel.sum())
            # Versions ``node`` held and then overwrote (its undo history) that no other
            # replica holds: a rollback to a cut covering one of them restores the newest
            # surviving version below it instead.
            for ids, old in _history(node, t.name):
                keep = old > 0
                if holders:
                    keep &= ~(others[:, ids] == old).any(axis=0)
                ids, old = ids[keep], old[keep]
                while len(ids):   # a row overwritten several times: one layer per version
                    _, first = np.unique(ids, return_index=True)
                    lo = np.zeros(t.rows, np.int64)
                    hi = np.zeros(t.rows, np.int64)
                    hi[ids[first]] = old[first]
                    lo[ids[first]] = old[first] - 1
                    self.lost[t.name].append((lo, hi))
                    rest = np.ones(len(ids), bool)
                    rest[first] = False
                    ids, old = ids[rest], old[rest]
        return at_risk


def _history(node: ReplicaNode, table: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(ids, overwritten versions)`` of ``node``'s undo history of ``table``."""
    if node.undo is None or MODEL_NAME not in node.models:
        return []
    image = node.undo.export_model(MODEL_NAME, node._seq)
    return [(seg.ids, seg.old_versions) for seg in image.tables.get(table, [])]


def _known_tops(node: ReplicaNode) -> dict[tuple[str, int, int], int]:
    """Per (table, shard, origin): the greatest counter ``node``'s knowledge or waiting
    intervals name."""
    out: dict[tuple[str, int, int], int] = {}
    m = node.models.get(MODEL_NAME)
    if m is None:
        return out
    for t, shards in m.shards.items():
        for s, sync in shards.items():
            for o, c in sync.knowledge.items():
                out[(t, s, o)] = max(out.get((t, s, o), 0), c)
            for o, ivs in sync.pending.items():
                out[(t, s, o)] = max(out.get((t, s, o), 0), max(u for _, u in ivs))
    return out


def _shard_counters(f: _Frame, table: str, shard: int) -> np.ndarray:
    ids, versions, _ = f.tables[table]
    return counters_of(versions[SPEC.table(table).shards_of(ids) == shard])


def versions_of(frame: PendingFrame) -> dict[str, np.ndarray]:
    """The packed versions of a frame per table, decoded from its body."""
    return {d["t"]: array_from_wire(d["v"], np.int64, d["n"], "versions") for d in frame.body["deltas"]}
