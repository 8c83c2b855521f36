"""Measurements shared by every simulated system: latency samples and byte floors.

Latency of an update at a replica is the time from the publisher's emission
until the replica holds that row at the update's version *or a newer one* (a
replica that receives a later value first is at least as fresh).  Tracking
every (update, replica) pair at 10,000 replicas would dominate the run, so a
few rows per batch are sampled (``samples_per_batch``) and tracked at every
replica.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


def stats(values: np.ndarray) -> dict[str, float]:
    v = values[~np.isnan(values)]
    if not len(v):
        return {"mean": float("nan"), "p50": float("nan"), "p99": float("nan"), "n": 0}
    return {"mean": float(v.mean()), "p50": float(np.percentile(v, 50)), "p99": float(np.percentile(v, 99)),
            "n": int(len(v))}


@dataclass
class LatencyRecorder:
    """Tracks sampled updates until every replica has applied them.

    Args:
        replicas: replica ids, in a fixed order.
        dcs: each replica's DC (same order).
        origin_dc: the publisher's DC (``intra_dc`` = replicas there).

    Example:
        >>> r = LatencyRecorder(["a", "b"], ["x", "y"], "x")
        >>> r.track("t", np.array([5]), np.array([10]), emitted=1.0, k=1, rng=np.random.default_rng(0))
        >>> r.applied("a", "t", np.array([5]), np.array([12]), now=1.5)
        >>> r.summary()["intra_dc"]["mean"]
        0.5
    """

    replicas: list[str]
    dcs: list[str]
    origin_dc: str
    emitted: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    rows: list[tuple[str, int]] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)
    _lat: list[np.ndarray] = field(default_factory=list)
    _by_row: dict[tuple[str, int], list[int]] = field(default_factory=dict)
    _tracked: dict[str, np.ndarray] = field(default_factory=dict)
    _mask: dict[str, np.ndarray] = field(default_factory=dict)
    _settled: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._pos = {r: i for i, r in enumerate(self.replicas)}
        self._dc_arr = np.array(self.dcs)

    def track(self, table: str, ids: np.ndarray, versions: np.ndarray, emitted: float, k: int,
              rng: np.random.Generator, cls: str = "") -> None:
        """Sample ``k`` of a batch's rows to follow (their versions are what counts)."""
        if len(ids) == 0 or k <= 0:
            return
        pick = rng.choice(len(ids), size=min(k, len(ids)), replace=False)
        for i in pick.tolist():
            key = (table, int(ids[i]))
            idx = len(self.emitted)
            self.emitted.append(emitted)
            self.versions.append(int(versions[i]))
            self.rows.append(key)
            self.classes.append(cls)
            self._lat.append(np.full(len(self.replicas), np.nan, np.float32))
            self._by_row.setdefault(key, []).append(idx)
            if key not in self._settled:
                self._settled[key] = np.zeros(len(self.replicas), np.int32)
            self._tracked[table] = np.union1d(self._tracked.get(table, np.zeros(0, np.int64)), [key[1]])
            mask = self._mask.get(table)
            if mask is None or mask.shape[0] <= key[1]:
                grown = np.zeros(max(key[1] + 1, 2 * (0 if mask is None else mask.shape[0])), bool)
                if mask is not None:
                    grown[:mask.shape[0]] = mask
                mask = self._mask[table] = grown
            mask[key[1]] = True

    def applied(self, replica: str, table: str, ids: np.ndarray, versions: np.ndarray, now: float) -> None:
        """A replica applied rows: settle every pending sample they satisfy."""
        mask = self._mask.get(table)
        if mask is None or not len(ids):
            return
        # One gather answers "which of these rows are tracked?" (most applies: none).
        n = mask.shape[0]
        hit = np.flatnonzero(mask[np.minimum(ids, n - 1)] & (ids < n))
        if not len(hit):
            return
        r = self._pos[replica]
        for h in hit.tolist():
            v = int(versions[h])
            key = (table, int(ids[h]))
            # A row's samples are in version order (they were emitted in time order), and
            # a replica settles them in that order: resume where it stopped last time, so
            # a hot row with many samples costs O(newly settled), not O(samples).
            samples = self._by_row[key]
            done = self._settled[key]
            k = int(done[r])
            while k < len(samples) and self.versions[samples[k]] <= v:
                lat = self._lat[samples[k]]
                if np.isnan(lat[r]):
                    lat[r] = now - self.emitted[samples[k]]
                k += 1
            done[r] = k

    def record(self, idx: int, replica: str, now: float) -> None:
        lat = self._lat[idx]
        r = self._pos[replica]
        if np.isnan(lat[r]):
            lat[r] = now - self.emitted[idx]

    def matrix(self) -> np.ndarray:
        return np.stack(self._lat) if self._lat else np.zeros((0, len(self.replicas)), np.float32)

    def summary(self, only: list[str] | None = None) -> dict[str, Any]:
        """Latency stats: ``intra_dc`` (the publisher's DC), ``cross_dc`` and ``all``."""
        m = self.matrix()
        if only is not None:
            keep = np.isin(np.array(self.replicas), only)
            m, dcs = m[:, keep], self._dc_arr[keep]
        else:
            dcs = self._dc_arr
        intra = dcs == self.origin_dc
        out = {"intra_dc": stats(m[:, intra].ravel()), "cross_dc": stats(m[:, ~intra].ravel()),
               "all": stats(m.ravel()), "per_dc": {}}
        for dc in sorted(set(dcs.tolist())):
            out["per_dc"][dc] = stats(m[:, dcs == dc].ravel())
        out["missing"] = int(np.isnan(m).sum())
        return out

    def by_class(self) -> dict[str, Any]:
        m = self.matrix()
        cls = np.array(self.classes)
        return {c: stats(m[cls == c].ravel()) for c in sorted(set(self.classes)) if c}
