"""The fault harness's invariant checks: what a chaos run's replicas may and may not do.

:class:`InvariantChecker` holds the violations found so far and each replica's last
sample; the driver (:class:`simulator.faults.FaultRun`) calls it on every apply (fence),
every sampling interval and restart (monotonicity, fence), after the faults stop
(convergence against the :class:`ReferenceModel`) and around the replay (idempotence).
:mod:`simulator.faults` documents the invariants.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ekko.core.hashed import keys_of
from ekko.core.key_index import EMPTY_KEY
from ekko.core.version import Knowledge
from ekko.replica.node import ReplicaNode
from simulator.events import Simulation
from simulator.fault_plan import RefRollback
from simulator.fault_reference import MODEL_NAME, SPEC, ReferenceModel
from simulator.replicas import SimCluster


@dataclass
class Violation:
    """An invariant broken in one seed: its first divergence (``count`` = how many seen)."""

    seed: int
    invariant: str
    replica: str
    table: str | None = None
    row: int | None = None
    shard: int | None = None
    detail: str = ""
    count: int = 1

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def _knowledge(node: ReplicaNode) -> dict[tuple[str, int], dict[int, int]]:
    """Per (table, shard): ``{origin: counter}``, through the node's public export."""
    raw = node.export_state(MODEL_NAME)["knowledge"]
    return {(t, s): dict(Knowledge.from_wire(w).items()) for t, entries in raw.items() for s, w in entries}


class InvariantChecker:
    """Checks one seed's replicas against the reference model and their own past.

    ``violations``: per invariant, its first divergence (with a count);
    ``samples``: each replica's last (versions, knowledge), kept across restarts by node
    id; ``seen_rollbacks``: the reference rollbacks each replica has applied (sticky
    across its restarts; cleared when it loses its disk).
    """

    def __init__(self, seed: int, sim: Simulation, cluster: SimCluster, ref: ReferenceModel,
                 node_ids: list[str]) -> None:
        self.seed, self.sim, self.cluster, self.ref, self.node_ids = seed, sim, cluster, ref, node_ids
        self.violations: dict[str, Violation] = {}
        self.samples: dict[str, tuple[dict[str, np.ndarray], dict[tuple[str, int], dict[int, int]]]] = {}
        self.seen_rollbacks: dict[str, set[str]] = {n: set() for n in node_ids}

    def violate(self, invariant: str, replica: str, **kw: Any) -> None:
        cur = self.violations.get(invariant)
        if cur is None:
            self.violations[invariant] = Violation(self.seed, invariant, replica, **kw)
        else:
            cur.count += 1

    def applied_rollbacks(self, nid: str) -> list[RefRollback]:
        """Reference rollbacks this replica has applied (sticky across its restarts)."""
        seen = self.seen_rollbacks[nid]
        seen.update(r.rid for r in self.ref.rollbacks if r.rid in self.cluster.nodes[nid].rollbacks)
        return [r for r in self.ref.rollbacks if r.rid in seen]

    def on_apply(self, nid: str, model: str, table: str, res: Any, source: str, now: float) -> None:
        """Invariant 5 on every apply: no version a rollback this replica applied fences."""
        if not self.ref.rollbacks or model != MODEL_NAME:
            return
        rbs = self.applied_rollbacks(nid)
        if not rbs:
            return
        t = SPEC.table(table)
        bad = np.flatnonzero(self.ref.fenced_for(rbs, t, res.ids, res.versions))
        if len(bad):
            r = int(res.ids[bad[0]])
            self.violate("fence", nid, table=table, row=r,
                          detail=f"applied fenced version {int(res.versions[bad[0]])} from {source} at t={now:.3f}")

    def sample(self, nid: str) -> None:
        """Invariants 3 and 5: compare a live replica with its previous sample, keep this one."""
        node = self.cluster.nodes[nid]
        vers = {t.name: node.table_store(MODEL_NAME, t.name).versions.copy() for t in SPEC.tables}
        know = _knowledge(node)
        rbs = self.applied_rollbacks(nid) if self.ref.rollbacks else []
        prev = self.samples.get(nid)
        for t in SPEC.tables:
            if rbs:
                held = np.flatnonzero(vers[t.name] > 0)
                bad = held[self.ref.fenced_for(rbs, t, held, vers[t.name][held])]
                if len(bad):
                    r = int(bad[0])
                    self.violate("fence", nid, table=t.name, row=r,
                                  detail=f"holds fenced version {int(vers[t.name][r])} at t={self.sim.now:.3f} "
                                         f"({len(bad)} rows)")
            if prev is None:
                continue
            old = prev[0][t.name]
            back = np.flatnonzero(vers[t.name] < old)
            if len(back) and rbs:
                # A rollback this replica applied may take a fenced version back.
                back = back[~self.ref.fenced_for(rbs, t, back, old[back])]
            if len(back):
                r = int(back[0])
                self.violate("monotonicity", nid, table=t.name, row=r,
                              detail=f"row version {int(old[r])} -> {int(vers[t.name][r])} at t={self.sim.now:.3f}")
        if prev is not None:
            for (t, s), entries in prev[1].items():
                cur = know.get((t, s), {})
                for o, c in entries.items():
                    if cur.get(o, 0) < c:
                        self.violate("monotonicity", nid, table=t, shard=s,
                                      detail=f"knowledge of origin {o}: {c} -> {cur.get(o, 0)} at "
                                             f"t={self.sim.now:.3f}")
        self.samples[nid] = (vers, know)
        if MODEL_NAME in node.models:
            for t in SPEC.tables:
                if t.hashed:
                    # Use the key map now, so that it is kept across what comes (rebinding
                    # the rows written since) rather than built afresh at the final check.
                    node.table_store(MODEL_NAME, t.name).key_map()

    def sample_all(self) -> None:
        for nid in self.cluster.live():
            self.sample(nid)

    def divergence(self, want: tuple[dict[str, np.ndarray], dict[str, np.ndarray]],
                    heads: dict[tuple[str, int, int], int], flex: dict[str, dict[int, dict[int, np.ndarray]]]
                    ) -> tuple[str, dict[str, Any]] | None:
        """The first replica (and table, row or shard) not at the expected state ``want``
        with knowledge up to ``heads`` (``flex``: rows a disk loss may have taken,
        :meth:`ReferenceModel.maybe_lost`)."""
        want_v, want_x = want
        first = self.cluster.nodes[self.node_ids[0]]
        for nid in self.node_ids:
            node = self.cluster.nodes[nid]
            for t in SPEC.tables:
                ts = node.table_store(MODEL_NAME, t.name)
                maybe = flex.get(t.name)
                if maybe:
                    # Rows a disk loss may have taken: any version they may end at, the same everywhere.
                    vals = ts.values.numpy()
                    ref = first.table_store(MODEL_NAME, t.name).versions
                    for r, choices in maybe.items():
                        v = int(ts.versions[r])
                        if v not in choices or v != int(ref[r]) or \
                                (vals[r].view(np.uint32) != choices[v].view(np.uint32)).any():
                            return nid, {"table": t.name, "row": r, "detail": f"version {v} (replica "
                                         f"{self.node_ids[0]}: {int(ref[r])}), expected one of {sorted(choices)} "
                                         "the same everywhere (a lost disk held the newest), with its value"}
                bad = np.flatnonzero(ts.versions != want_v[t.name])
                if maybe:
                    bad = bad[~np.isin(bad, np.fromiter(maybe, np.int64, len(maybe)))]
                if len(bad):
                    r = int(bad[0])
                    return nid, {"table": t.name, "row": r, "detail": f"version {int(ts.versions[r])}, expected "
                                 f"{int(want_v[t.name][r])} ({len(bad)} rows differ)"}
                vals = ts.values.numpy()
                bad = np.flatnonzero((vals.view(np.uint32) != want_x[t.name].view(np.uint32)).any(axis=1))
                if maybe:
                    bad = bad[~np.isin(bad, np.fromiter(maybe, np.int64, len(maybe)))]
                if len(bad):
                    return nid, {"table": t.name, "row": int(bad[0]),
                                 "detail": f"values differ at equal versions ({len(bad)} rows)"}
                if t.hashed:
                    # The key map (rebound through restores, restarts and repairs) finds each
                    # key the expected rows hold in its slot.
                    keys = keys_of(want_x[t.name], t)
                    held = np.flatnonzero(keys != EMPTY_KEY)
                    if maybe:
                        held = held[~np.isin(held, np.fromiter(maybe, np.int64, len(maybe)))]
                    got = ts.lookup(keys[held])
                    if not np.array_equal(got, held):
                        r = int(held[np.flatnonzero(got != held)[0]])
                        return nid, {"table": t.name, "row": r,
                                     "detail": f"key map finds the row's key in slot {int(got[held == r][0])}"}
            know = _knowledge(node)
            for (t, s, o), head in heads.items():
                have = know.get((t, s), {}).get(o, 0)
                if have < head:
                    return nid, {"table": t, "shard": s,
                                 "detail": f"knowledge of origin {o} is {have}, below its last counter {head}"}
        return None

    def state(self) -> dict[str, Any]:
        out = {}
        for nid, node in self.cluster.nodes.items():
            out[nid] = ({t.name: (node.table_store(MODEL_NAME, t.name).versions.copy(),
                                  node.table_store(MODEL_NAME, t.name).values.numpy().copy()) for t in SPEC.tables},
                        _knowledge(node))
        return out

    def compare(self, before: dict[str, Any], after: dict[str, Any]) -> None:
        for nid, (tables, know) in before.items():
            tables2, know2 = after[nid]
            for t, (v, x) in tables.items():
                v2, x2 = tables2[t]
                bad = np.flatnonzero((v != v2) | (x.view(np.uint32) != x2.view(np.uint32)).any(axis=1))
                if len(bad):
                    r = int(bad[0])
                    self.violate("idempotence", nid, table=t, row=r,
                                  detail=f"replay changed the row: version {int(v[r])} -> {int(v2[r])}")
            if know != know2:
                (t, s) = next(k for k in sorted(set(know) | set(know2)) if know.get(k) != know2.get(k))
                self.violate("idempotence", nid, table=t, shard=s,
                              detail=f"replay changed knowledge {know.get((t, s))} -> {know2.get((t, s))}")
