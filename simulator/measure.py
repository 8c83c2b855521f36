"""Measurements shared by every simulated system: latency samples and byte floors.

Latency of an update at a replica is the time from the publisher's emission
until the replica holds that row at the update's version *or a newer one* (a
replica that receives a later value first is at least as fresh).  Tracking
every (update, replica) pair at 10,000 replicas would dominate the run, so a
few rows per batch are sampled (``samples_per_batch``) and tracked at every
replica.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass, field
from math import isnan
from typing import Any

import numpy as np

#: applied-ids arrays whose tracked rows are remembered (several fan-outs interleave).
APPLIED_MEMO_ENTRIES = 16


def peak_rss_mb() -> float:
    """Peak resident set of this process or its largest worker, MiB (the kernel's
    high-water mark, ``ru_maxrss`` in KiB on Linux).  Not tracemalloc: tracing every
    allocation made whole simulator runs about 4x slower."""
    return max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
               resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024


def self_peak_rss_mb() -> float:
    """Peak resident set of this process alone, MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def stats(values: np.ndarray) -> dict[str, float]:
    # NaN: not applied yet; +inf: a replica that does not hold the row (a placed model)
    v = values[np.isfinite(values)]
    if not len(v):
        return {"mean": float("nan"), "p50": float("nan"), "p99": float("nan"), "n": 0}
    return {"mean": float(v.mean()), "p50": float(np.percentile(v, 50)), "p99": float(np.percentile(v, 99)),
            "n": len(v)}


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

    def __post_init__(self) -> None:
        self._pos = {r: i for i, r in enumerate(self.replicas)}
        self._dc_arr = np.array(self.dcs)
        nrep = len(self.replicas)
        # Latency of sample i at replica j (NaN until applied); rows grow by doubling.
        self._lat = np.full((16, nrep), np.nan, np.float32)
        # Per tracked row ("slot"): its samples in version order, and per replica how
        # many of them it has settled.  _slot_of[table][row] is the slot or -1; its last
        # entry is always -1 so that take(mode="clip") maps any larger id to "untracked".
        self._slot_of: dict[str, np.ndarray] = {}
        self._slot_key: dict[tuple[str, int], int] = {}
        self._slot_samples: list[list[int]] = []
        self._slot_versions: list[list[int]] = []
        self._nsamp = np.zeros(16, np.int32)
        # Replica-major (one contiguous row of slots per replica): an apply reads the
        # row of one replica, a 1-D take instead of a strided 2-D gather.
        self._done = np.zeros((nrep, 16), np.int32)
        self._unset = 0
        self._memo: dict[int, tuple[Any, ...]] = {}
        # A placed model (issue #18): per table, which replicas hold each shard, and its
        # shard_rows; a sample is followed at those only (+inf at the others).
        self._expected: dict[str, tuple[np.ndarray, int]] = {}

    def expect(self, table: str, holders: np.ndarray, shard_rows: int) -> None:
        """Follow samples of ``table`` only at the replicas that hold their shard:
        ``holders`` is ``(shards, replicas)`` bool, replicas in this recorder's order."""
        self._expected[table] = (np.asarray(holders, bool), int(shard_rows))

    def track(self, table: str, ids: np.ndarray, versions: np.ndarray, emitted: float, k: int,
              rng: np.random.Generator, cls: str = "") -> None:
        """Sample ``k`` of a batch's rows to follow (their versions are what counts)."""
        if len(ids) == 0 or k <= 0:
            return
        pick = rng.choice(len(ids), size=min(k, len(ids)), replace=False)
        self._memo.clear()  # the tracked rows change
        for i in pick.tolist():
            key = (table, int(ids[i]))
            idx = len(self.emitted)
            self.emitted.append(emitted)
            self.versions.append(int(versions[i]))
            self.rows.append(key)
            self.classes.append(cls)
            if idx >= self._lat.shape[0]:
                grown = np.full((2 * self._lat.shape[0], self._lat.shape[1]), np.nan, np.float32)
                grown[:idx] = self._lat[:idx]
                self._lat = grown
            exp = self._expected.get(table)
            if exp is None:
                self._unset += self._lat.shape[1]
            else:
                at = exp[0][key[1] // exp[1]]
                self._lat[idx, ~at] = np.inf
                self._unset += int(at.sum())
            slot = self._slot_key.get(key)
            if slot is None:
                slot = self._slot_key[key] = len(self._slot_samples)
                self._slot_samples.append([])
                self._slot_versions.append([])
                if slot >= len(self._nsamp):
                    self._nsamp = np.concatenate([self._nsamp, np.zeros_like(self._nsamp)])
                    self._done = np.concatenate([self._done, np.zeros_like(self._done)], axis=1)
                of = self._slot_of.get(table)
                if of is None or of.shape[0] <= key[1] + 1:
                    size = max(key[1] + 2, 2 * (0 if of is None else of.shape[0]))
                    grown_of = np.full(size, -1, np.int32)
                    if of is not None:
                        grown_of[:of.shape[0]] = of
                    of = self._slot_of[table] = grown_of
                of[key[1]] = slot
            self._slot_samples[slot].append(idx)
            self._slot_versions[slot].append(int(versions[i]))
            self._nsamp[slot] += 1

    def applied(self, replica: str, table: str, ids: np.ndarray, versions: np.ndarray, now: float) -> None:
        """A replica applied rows: settle every pending sample they satisfy."""
        of = self._slot_of.get(table)
        if of is None or not len(ids):
            return
        # Vectorized filter: tracked rows among the applied ones whose replica still has
        # samples pending (most applies: none, or rows it has settled already).  A push
        # fanned out to many replicas applies the very same ids and versions arrays at
        # each: look its tracked rows up once (the entry keeps the arrays alive, so the
        # ids are their own; track() empties the memo).
        memo = self._memo.get(id(ids))
        if memo is None or memo[0] is not ids or memo[1] is not of or memo[2] is not versions:
            memo = self._memo_entry(ids, versions, of)
        slots = memo[3]
        if not len(slots):
            return
        r = self._pos[replica]
        mine = self._done[r]
        done = mine.take(slots)
        pend = (done < memo[4]).nonzero()[0]
        if not len(pend):
            return
        lat, emitted = self._lat, self.emitted
        slot_l, vers_l = memo[5], memo[6]
        all_samples, all_svers = self._slot_samples, self._slot_versions
        settled = 0
        for j in pend.tolist():
            slot = slot_l[j]
            v = vers_l[j]
            # A row's samples are in version order (emitted in time order) and a replica
            # settles them in that order: resume where it stopped.
            samples, svers = all_samples[slot], all_svers[slot]
            k = start = int(done[j])
            n = len(samples)
            while k < n and svers[k] <= v:
                i = samples[k]
                if isnan(lat[i, r]):  # not recorded yet
                    lat[i, r] = now - emitted[i]
                    settled += 1
                k += 1
            if k != start:
                mine[slot] = k
        self._unset -= settled

    def _memo_entry(self, ids: np.ndarray, versions: np.ndarray, of: np.ndarray) -> tuple[Any, ...]:
        """What :meth:`applied` needs of an applied batch, replica-independent: its
        tracked slots, their sample counts, and the same as Python lists."""
        slots = of.take(ids, mode="clip")
        hit = np.flatnonzero(slots >= 0)
        slots = slots[hit]
        entry = (ids, of, versions, slots, self._nsamp[slots], slots.tolist(),
                 np.asarray(versions)[hit].tolist())
        if len(self._memo) >= APPLIED_MEMO_ENTRIES:
            del self._memo[next(iter(self._memo))]   # the oldest: fan-outs overlap a few at a time
        self._memo[id(ids)] = entry
        return entry

    def record(self, idx: int, replica: str, now: float) -> None:
        r = self._pos[replica]
        if self._lat[idx, r] != self._lat[idx, r]:
            self._lat[idx, r] = now - self.emitted[idx]
            self._unset -= 1

    def __getstate__(self) -> dict[str, Any]:
        # The memo holds arrays of live pushes: not worth pickling (partitioned runs).
        state = dict(self.__dict__)
        state["_memo"] = {}
        return state

    def columns(self, replicas: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(positions, latencies)`` of some replicas: what a partitioned run's worker
        hands over for the replicas it simulated (see :meth:`adopt_columns`)."""
        cols = np.array([self._pos[r] for r in replicas], np.int64)
        return cols, self.matrix()[:, cols].copy()

    def adopt_columns(self, cols: np.ndarray, lat: np.ndarray) -> None:
        """Take replica columns from another recorder that tracked the very same samples
        (same workload and seed: a partitioned run's workers all draw every batch)."""
        if lat.shape != (len(self.emitted), len(cols)):
            raise ValueError(f"columns of shape {lat.shape} do not fit {len(self.emitted)} samples")
        self._lat[:len(self.emitted), cols] = lat
        self._unset = int(np.isnan(self.matrix()).sum())
        self._memo.clear()

    @property
    def missing(self) -> int:
        """(sample, replica) pairs not applied yet (of those that hold the sample's row)."""
        return self._unset

    def matrix(self) -> np.ndarray:
        """Latency of every sample (rows) at every replica (columns); NaN = not applied."""
        return self._lat[:len(self.emitted)]

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
        out["missing"] = self._unset if only is None else int(np.isnan(m).sum())
        return out

    def by_class(self) -> dict[str, Any]:
        m = self.matrix()
        cls = np.array(self.classes)
        return {c: stats(m[cls == c].ravel()) for c in sorted(set(self.classes)) if c}
