"""Quality of what replicas serve under the priority scheduler: access-weighted staleness
error (:class:`StalenessMeter`) and how well the scheduler's online top k% matches the
top k% in hindsight (:class:`ClassAgreement`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from simulator.replicas import SimCluster
from simulator.scenario import MODEL_NAME, Scenario
from simulator.truth import Truth
from simulator.workload import UpdateBatch, Workload


def high_impact_cut(sc: Scenario) -> float | None:
    """Impact above which an update counts as "high" for the per-class latencies: the
    (100 - k)th percentile of the workload's log-normal impact (the scheduler's own
    threshold estimates the same quantile online)."""
    if sc.scheduler is None or not sc.workload.sparse:
        return None
    from statistics import NormalDist
    k = float(sc.scheduler.get("k_percent", 5.0))
    sigma = sc.workload.sparse[0].impact_sigma
    return float(np.exp(sigma * NormalDist().inv_cdf(1 - k / 100)))


def access_weights(sc: Scenario, workload: Workload) -> dict[str, np.ndarray]:
    """Each row's share of inference lookups: its Zipf popularity, normalised per table."""
    weights: dict[str, np.ndarray] = {}
    for st in sc.workload.sparse:
        z = workload.zipf(st.model, st.table)
        rank = np.empty(st.rows, np.float64)
        rank[z.ids_of_ranks(np.arange(1, st.rows + 1))] = np.arange(1, st.rows + 1)
        w = rank ** -st.zipf_s
        weights[st.table] = w / w.sum()
    return weights


class ClassAgreement:
    """How well the scheduler's online top-k% matches the top k% in hindsight.

    Hindsight priority of an update = its impact (the change's L2 norm) times its
    row's true share of lookups, i.e. what the update adds to the access-weighted
    staleness error per unit time it is missing; the cut is the (100 - k)th
    percentile of that over every update of the run.  Reported as precision
    (share of updates the scheduler marked high that are in the hindsight top k%)
    and recall (share of the hindsight top k% that it marked high).
    """

    def __init__(self, sc: Scenario) -> None:
        self.k = float(sc.scheduler.get("k_percent", 5.0)) if sc.scheduler else 5.0
        self.parts: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]] = []
        self.weights: dict[str, np.ndarray] = {}

    def note(self, batch: UpdateBatch, rows: Any) -> None:
        order = np.argsort(batch.ids)
        pos = order[np.searchsorted(batch.ids[order], rows.ids)]
        self.parts.append((batch.table, rows.ids, batch.impact[pos].astype(np.float64), rows.high))

    def summary(self) -> dict[str, float]:
        if not self.parts:
            return {}
        prio = np.concatenate([imp * self.weights[t][ids] for t, ids, imp, _ in self.parts])
        high = np.concatenate([h for *_, h in self.parts])
        top = prio >= np.quantile(prio, 1 - self.k / 100)
        both = float(np.count_nonzero(top & high))
        return {"decided_high_fraction": float(high.mean()), "precision": both / max(1, int(high.sum())),
                "recall": both / max(1, int(top.sum()))}


class StalenessMeter:
    """Integrates the access-weighted squared error of every replica against the trainer.

    At each sample: sum over replicas and rows of ``w(row) * ||replica - trainer||^2``,
    with ``w`` the row's access frequency (its Zipf popularity, normalised), times
    the sampling step.  Needs full mode (values).
    """

    def __init__(self, sc: Scenario, workload: Workload, cluster: SimCluster, truth: Truth) -> None:
        self.sc, self.cluster, self.truth = sc, cluster, truth
        self.weights = access_weights(sc, workload)
        self.total = 0.0

    def sample(self, dt: float) -> None:
        for table, w in self.weights.items():
            want_v = self.truth.versions[table]
            want = self.truth.values[table]
            for nid in self.cluster.live():
                ts = self.cluster.nodes[nid].table_store(MODEL_NAME, table)
                # Only rows not at the trainer's version can differ: compare just those.
                lag = np.flatnonzero(ts.versions != want_v)
                if len(lag):
                    got = ts.values.numpy()[lag].astype(np.float64)
                    err = ((got - want[lag].astype(np.float64)) ** 2).sum(axis=1)
                    self.total += float((err * w[lag]).sum()) * dt
