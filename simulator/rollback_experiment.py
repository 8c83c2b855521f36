"""The ``rollback`` scenario: a harmful burst, its detection and the rollback of every replica.

The real nodes (:class:`ekko.replica.node.ReplicaNode`) and the real model-state manager
(:mod:`rollback.manager`) run on the simulated WAN (:class:`simulator.replicas.SimCluster`);
the simulator supplies the trainer and the inference traffic's quality reports.

Timeline (every time is a scenario parameter, ``[rollback]`` in the TOML):

1. good updates from ``t = 0``; quality windows every ``window_s`` from the start
   (the detector learns the noise over its warm-up windows);
2. cuts taken at the ingest replica at ``cut_times_s`` (sent to every replica);
3. the harmful burst: every update published in ``[burst_t0_s, burst_t1_s)`` is harmful;
   good updates resume afterwards and go on until ``duration_s``;
4. one *monitor* replica per DC receives its DC's quality reports (inference fleets
   aggregate metrics per DC before alerting); the monitors' managers detect the
   degradation and start the automatic rollback (the real code path:
   :meth:`ReplicaNode.report_quality`).

Quality model (documented assumption, not a measurement): a DC's online CTR is
``base_ctr * (1 - max_degradation * share)`` where ``share`` is the mean, over a
seeded sample of at most ``share_sample`` replicas of the DC, of the fraction of
the burst's rows that the replica currently holds at a harmful version.  So the
metric degrades as harmful rows spread and recovers as the rollback removes
them.  The baseline variant (a lagging replica group, < 1 % of the traffic) is
unaffected: ``base_ctr``.  Each window's value carries binomial noise
``sqrt(p (1 - p) / n)`` with ``n`` the window's impressions for that variant.

Measured (``results.json``):

* ``time_to_detect_s``: per replica, when it learnt of the incident (its own
  detection, or the rollback record's arrival) minus the burst's start;
  p50/p99/max over replicas; plus ``first_detection_s`` (the first monitor).
* ``time_to_restore_s``: per replica, when it applied the rollback (restored the
  rows from its undo history) minus the first detection; ``time_to_clean_s``: the
  first check (every ``check_interval_s``) at which it held no rolled-back version
  any more (includes repairs from peers; quantised by the check interval).
* ``exact``: at the end, every live replica's versions equal the state at the
  chosen cut overlaid with the updates published after the rollback point
  (computed independently from what the trainer published).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ekko.core.chain import PublisherChain
from ekko.core.errors import UsageError
from ekko.core.version import HLC_EPOCH_MS, counters_of, last_counter_at
from rollback.undo import UndoHistory
from simulator.events import Simulation
from simulator.network import WanNetwork
from simulator.replicas import SimCluster
from simulator.scenario import Scenario
from simulator.truth import TRAINER_ORIGIN, place_replicas
from simulator.workload import UpdateBatch, Workload

Progress = Callable[[str, float, float], None]


@dataclass(frozen=True)
class RollbackParams:
    """``[rollback]`` of a scenario; see ``simulator/scenarios/rollback.toml`` for the sources."""

    window_s: float = 0.5
    base_ctr: float = 0.04
    online_impressions: float = 2_000_000
    baseline_impressions: float = 20_000
    max_degradation: float = 0.05
    cut_times_s: tuple[float, ...] = (10.0, 20.0, 27.0, 33.0)
    burst_t0_s: float = 30.0
    burst_t1_s: float = 35.0
    warmup_windows: int = 50
    share_sample: int = 50
    check_interval_s: float = 0.25
    undo_bytes: int = 8 << 20

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RollbackParams":
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise UsageError(f"unknown [rollback] keys {sorted(unknown)}; known: {sorted(known)}")
        kw = dict(d)
        if "cut_times_s" in kw:
            kw["cut_times_s"] = tuple(float(x) for x in kw["cut_times_s"])
        p = cls(**kw)
        if not 0 < p.burst_t0_s < p.burst_t1_s:
            raise UsageError("[rollback] needs 0 < burst_t0_s < burst_t1_s")
        if not any(t < p.burst_t0_s for t in p.cut_times_s):
            raise UsageError("[rollback] needs a cut before the burst")
        if p.warmup_windows * p.window_s >= p.burst_t0_s:
            raise UsageError("[rollback] the detector's warm-up must end before the burst")
        return p


def hlc(t: float) -> int:
    """The HLC counter of simulated time ``t`` (the trainer's clock), top logical tick."""
    return last_counter_at(HLC_EPOCH_MS + t * 1000)


def _pct(xs: list[float]) -> dict[str, float | int | None]:
    if not xs:
        return {"n": 0, "p50": None, "p99": None, "max": None}
    a = np.asarray(xs, dtype=np.float64)
    return {"n": len(xs), "p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99)),
            "max": float(a.max())}


def run_rollback(sc: Scenario, progress: Progress | None = None) -> dict[str, Any]:
    """Run the scenario; returns the ``results.json`` structure."""
    if any(t.hashed for t in sc.model.tables):
        raise UsageError("rollback scenarios model dense-id tables only (their truth is kept per row id)")
    p = RollbackParams.from_dict(dict(sc.raw.get("rollback", {})))
    sim = Simulation(sc.seed)
    net = WanNetwork(sim, sc.wan)
    cfg = sc.node.replace(quality_warmup_windows=p.warmup_windows, auto_rollback=True)
    cluster = SimCluster(sim, net, cfg, with_values=sc.with_values, shared_membership=not sc.with_values)
    placement = place_replicas(sc)
    for nid, dc in placement:
        node = cluster.add_replica(nid, dc)
        if node.undo is None:
            # Metadata mode keeps versions only; the history of versions is what a rollback needs.
            node.undo = UndoHistory(p.undo_bytes)
            node.cuts.undo = node.undo
    cluster.bootstrap_membership()
    cluster.register_everywhere(sc.model)
    dcs = sc.wan.dc_names
    by_dc = {dc: [n for n, d in placement if d == dc] for dc in dcs}
    ingest = by_dc[sc.training_dc][0]
    monitors = {dc: ids[-1] for dc, ids in by_dc.items() if ids}
    pick = sim.derive_np_rng("share-sample")
    sample = {dc: (ids if len(ids) <= p.share_sample else list(pick.choice(ids, p.share_sample, replace=False)))
              for dc, ids in by_dc.items()}
    tables = [t.name for t in sc.model.tables]

    # What the trainer published, per table: (counters, ids, versions) batches, and the truth at each cut.
    chain = PublisherChain(TRAINER_ORIGIN)
    truth = {t.name: np.zeros(t.rows, np.int64) for t in sc.model.tables}
    published: list[tuple[str, np.ndarray, np.ndarray]] = []
    burst_rows = {t: np.zeros(sc.model.table(t).rows, bool) for t in tables}
    lo, hi = hlc(p.burst_t0_s) - 0xFF, hlc(p.burst_t1_s)
    truth_at_cut: dict[str, dict[str, np.ndarray]] = {}
    values_rng = sim.derive_np_rng("values")

    def on_batch(batch: UpdateBatch) -> None:
        if not len(batch.ids):
            return
        spec = sc.model.table(batch.table)
        vals = values_rng.standard_normal((len(batch.ids), spec.dim)).astype(np.float32) if sc.with_values else None
        frame = chain.frame(sc.model, {batch.table: (batch.ids, vals)}, now_ms=HLC_EPOCH_MS + sim.now * 1000,
                            impact={batch.table: batch.impact})
        versions = chain.versions_of(frame)[batch.table]
        np.maximum.at(truth[batch.table], batch.ids, versions)
        published.append((batch.table, batch.ids.copy(), versions.copy()))
        if p.burst_t0_s <= sim.now < p.burst_t1_s:
            burst_rows[batch.table][batch.ids] = True
        cluster.call(ingest, "publish", frame.body, sim.now)
        chain.acked(frame)

    workload = Workload(sc.workload, sim.derive_np_rng("workload"))
    workload.drive(sim, on_batch, until=sc.duration_s)

    def take_cut(name: str) -> None:
        truth_at_cut[name] = {t: v.copy() for t, v in truth.items()}
        cluster.call(ingest, "take_cut", sc.model.name, name, sim.now)

    for i, t in enumerate(p.cut_times_s):
        sim.schedule_at(t, take_cut, f"cut-{i}-{int(t)}s")

    def harmful_share(nid: str) -> float:
        node = cluster.nodes[nid]
        held = total = 0
        for t in tables:
            rows = burst_rows[t]
            n = int(rows.sum())
            if not n:
                continue
            c = counters_of(node.table_store(sc.model.name, t).versions[rows])
            held += int(((c >= lo) & (c <= hi)).sum())
            total += n
        return held / total if total else 0.0

    noise = sim.derive_rng("quality")
    detections: list[tuple[float, str]] = []
    shares: list[tuple[float, float]] = []

    def quality_window() -> None:
        now = sim.now
        mean_share = []
        for dc, mon in monitors.items():
            if not net.is_up(mon):
                continue
            share = float(np.mean([harmful_share(n) for n in sample[dc]])) if now >= p.burst_t0_s else 0.0
            mean_share.append(share)
            on = p.base_ctr * (1 - p.max_degradation * share)
            b = p.base_ctr
            rec = None
            for variant, mu, n in (("baseline", b, p.baseline_impressions), ("online", on, p.online_impressions)):
                value = noise.gauss(mu, (mu * (1 - mu) / n) ** 0.5)
                rec = cluster.call(mon, "report_quality", sc.model.name, variant, "ctr", value, n, now,
                                   until_counter=hlc(now))
            if rec is not None:
                detections.append((now, mon))
        shares.append((now, float(np.mean(mean_share)) if mean_share else 0.0))

    sim.every(p.window_s, quality_window, start=p.window_s / 2)

    # Restore tracking: per replica, when it learnt of the incident and when it held no fenced version.
    learnt: dict[str, float] = {}
    clean_at: dict[str, float] = {}
    fence_box: dict[str, Any] = {}

    def check() -> None:
        if not detections:
            return
        node0 = cluster.nodes[detections[0][1]]
        rec = next(iter(node0.rollbacks.values()), None)
        if rec is None:
            return
        for nid, node in cluster.nodes.items():
            if nid not in learnt and node.rollbacks:
                incs = node.quality.incidents(sc.model.name)
                learnt[nid] = incs[0].received_at if incs else sim.now
        fence_box["rec"] = rec
        cut_name = rec["cut"]["name"]
        cut_truth = truth_at_cut.get(cut_name)
        if cut_truth is None:
            return
        upper = max(c for _, c in rec["upper"])
        for nid, node in cluster.nodes.items():
            if nid in clean_at or not net.is_up(nid) or not node.rollbacks:
                continue
            dirty = False
            for t in tables:
                v = node.table_store(sc.model.name, t).versions
                c = counters_of(v)
                # A rolled-back version: newer than the row's version at the cut, not newer than the point.
                if ((c <= upper) & (v > cut_truth[t])).any():
                    dirty = True
                    break
            if not dirty:
                clean_at[nid] = sim.now

    sim.every(p.check_interval_s, check, start=p.check_interval_s)

    end = sc.duration_s + sc.settle_s
    wall0 = time.perf_counter()
    t = 0.0
    step = max(0.5, end / 100)
    while t < end:
        t = min(end, t + step)
        sim.run(until=t)
        if progress:
            progress("rollback", t, end)
    wall = time.perf_counter() - wall0

    # Exactness: the chosen cut's state overlaid with every update published after the rollback point.
    rec = fence_box.get("rec")
    out: dict[str, Any] = {"scenario": sc.name, "seed": sc.seed, "replicas": sc.replicas, "dcs": dcs,
                           "mode": "full" if sc.with_values else "metadata", "params": p.__dict__ | {
                               "cut_times_s": list(p.cut_times_s)},
                           "monitors": monitors, "duration_s": sc.duration_s, "settle_s": sc.settle_s,
                           "events": sim.events, "wall_s": wall}
    if rec is None:
        out.update(detected=False, exact=False)
        return out
    cut_name = rec["cut"]["name"]
    upper = {o: c for o, c in rec["upper"]}
    expected = {tn: truth_at_cut[cut_name][tn].copy() for tn in tables}
    for tn, ids, versions in published:
        after = counters_of(versions) > upper.get(TRAINER_ORIGIN, 0)
        if after.any():
            np.maximum.at(expected[tn], ids[after], versions[after])
    wrong: dict[str, int] = {}
    for nid, node in cluster.nodes.items():
        if not net.is_up(nid):
            continue
        bad = sum(int((node.table_store(sc.model.name, tn).versions != expected[tn]).sum()) for tn in tables)
        if bad:
            wrong[nid] = bad
    first = detections[0][0]
    restored = {}
    for nid, node in cluster.nodes.items():
        incs = [i for i in node.quality.incidents(sc.model.name) if i.restored_at is not None]
        if incs:
            restored[nid] = incs[0].restored_at
    incidents = {i.id: i.view() for n in cluster.nodes.values() for i in n.quality.incidents(sc.model.name)}
    post_rows = sum(int((counters_of(v) > upper.get(TRAINER_ORIGIN, 0)).sum()) for _, _, v in published)
    cut_idx = [f"cut-{i}-{int(x)}s" for i, x in enumerate(p.cut_times_s)].index(cut_name)
    out.update({
        "detected": True,
        "burst_start_s": p.burst_t0_s,
        "first_detection_s": first - p.burst_t0_s,
        "detections": [{"t": t_, "monitor": m} for t_, m in detections],
        "incidents": len(incidents),
        "incident": next(iter(incidents.values())),
        "rollback_records": sorted({rid for n in cluster.nodes.values() for rid in n.rollbacks}),
        "chosen_cut": cut_name, "chosen_cut_taken_s": p.cut_times_s[cut_idx],
        "newest_cut_before_burst": max((x, f"cut-{i}-{int(x)}s") for i, x in enumerate(p.cut_times_s)
                                       if x < p.burst_t0_s)[1],
        "time_to_detect_s": _pct([v - p.burst_t0_s for v in learnt.values()]),
        # The restore itself (the rollback record applied: rows put back from the undo history),
        # event-exact; and the first periodic check that found no rolled-back version (an upper
        # bound that includes repairs from peers, quantised by check_interval_s).
        "time_to_restore_s": _pct([restored[n] - first for n in restored]),
        "time_to_clean_s": _pct([v - first for v in clean_at.values()]),
        "replicas_learnt": len(learnt), "replicas_clean": len(clean_at),
        "rows_published_after_rollback": post_rows,
        "exact": not wrong, "replicas_not_exact": len(wrong), "rows_not_exact": sum(wrong.values()),
        "fenced_rows_refused": int(sum(n.counters["fenced_rows"] for n in cluster.nodes.values())),
        "harmful_share_peak": max(s for _, s in shares) if shares else 0.0,
        "harmful_share_end": shares[-1][1] if shares else 0.0,
        "final_states": {st: sum(1 for n in cluster.nodes.values()
                                 if n.quality.state(sc.model.name).value == st)
                         for st in ("warmup", "healthy", "uncertain", "corrupted")},
    })
    return out


def write_rollback_results(res: dict[str, Any], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "results.json"
    path.write_text(json.dumps(res, indent=1, sort_keys=True, default=float))
    return path


def summary(res: dict[str, Any]) -> str:
    if not res.get("detected"):
        return f"rollback: NOT detected in {res['duration_s']:g} s ({res['replicas']} replicas)"
    d, r = res["time_to_detect_s"], res["time_to_restore_s"]
    return (f"rollback: {res['replicas']} replicas ({res['mode']}), burst at {res['burst_start_s']:g} s, first "
            f"detection after {res['first_detection_s']:.1f} s; replicas learnt p50 {d['p50']:.2f} / p99 "
            f"{d['p99']:.2f} / max {d['max']:.2f} s after the burst; restored p50 {r['p50']:.3f} / p99 "
            f"{r['p99']:.3f} / max {r['max']:.3f} s after detection ({r['n']} replicas); cut {res['chosen_cut']}; "
            f"exact: {res['exact']} ({res['replicas_not_exact']} replicas off); incidents {res['incidents']}")
