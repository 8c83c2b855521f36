"""Non-ekko baselines on the same WAN model and workload.

* ``direct-push`` -- the trainer sends every batch straight to every replica
  (one copy per replica crosses the WAN; no coalescing, no topology).
* ``adam-2pc`` -- Project Adam-style replication through a primary in the
  training DC with two-phase commit: a round sends PREPARE (the rows) to every
  replica, waits for every ACK, then sends COMMIT; replicas apply on COMMIT.
  Rounds are serialized; updates that arrive during a round wait for the next.
* ``broadcast`` -- checkpoint-and-broadcast: every ``checkpoint_interval_s`` the
  trainer snapshots the model, validates it for ``checkpoint_validate_s``, then
  ships the whole model: one copy per DC across the WAN to a relay replica,
  which copies it to its DC over the LAN.

Message sizes: rows cost ``row bytes + 16`` (id and version) plus a fixed header
(:data:`HEADER_BYTES`); acks and commits cost the header alone.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from ekko.core.hashed_slots import HashedSlots
from simulator.events import Simulation
from simulator.measure import LatencyRecorder
from simulator.network import WanNetwork
from simulator.progress import Progress
from simulator.scenario import Scenario
from simulator.truth import ROW_META_BYTES, Truth, place_replicas
from simulator.workload import UpdateBatch, Workload

#: bytes of a frame header and small control messages.
HEADER_BYTES = 64
TRAINER = "trainer"


def _setup(sc: Scenario):
    sim = Simulation(sc.seed)
    net = WanNetwork(sim, sc.wan)
    placement = place_replicas(sc)
    for nid, dc in placement:
        net.add_node(nid, dc)
    net.add_node(TRAINER, sc.training_dc)
    rec = LatencyRecorder([n for n, _ in placement], [dc for _, dc in placement], sc.training_dc)
    return sim, net, placement, rec


def run_baseline(sc: Scenario, system: str, progress: Progress | None = None) -> dict[str, Any]:
    sim, net, placement, rec = _setup(sc)
    truth = Truth(sc, with_values=False)
    sample_rng = sim.derive_np_rng("samples")
    counter = [0]
    pending: list[tuple[list[int], int]] = []     # (sample indices, bytes) not yet shipped
    state: dict[str, Any] = {"round_busy": False, "acks": 0, "round": [], "checkpoint_pending": []}
    replicas = [n for n, _ in placement]

    def batch_versions(batch: UpdateBatch) -> np.ndarray:
        n = len(batch.ids)
        v = (np.arange(counter[0] + 1, counter[0] + n + 1, dtype=np.int64) << 16) | 1
        counter[0] += n
        return v

    # A hashed table's feature keys take slots as in the ekko runs (the same assignment).
    slots = {t.name: HashedSlots(t) for t in sc.model.tables if t.hashed}

    def on_batch(batch: UpdateBatch) -> None:
        if not len(batch.ids):
            return
        t = sc.model.table(batch.table)
        if t.hashed:
            batch = batch._replace(ids=slots[t.name].assign(batch.ids))
        versions = batch_versions(batch)
        first = len(rec.emitted)
        rec.track(batch.table, batch.ids, versions, sim.now, sc.samples_per_batch, sample_rng)
        samples = list(range(first, len(rec.emitted)))
        truth.note(batch.table, batch.ids, versions, None, t.row_bytes)
        nbytes = HEADER_BYTES + len(batch.ids) * (t.row_bytes + ROW_META_BYTES)
        if system == "direct-push":
            for r in replicas:
                net.send(TRAINER, r, samples, nbytes, deliver_samples)
        elif system == "adam-2pc":
            pending.append((samples, nbytes))
            if not state["round_busy"]:
                sim.schedule(sc.baselines.get("adam_batch_s", 0.1), start_round)
                state["round_busy"] = True
        else:
            pending.append((samples, nbytes))

    def deliver_samples(src: Any, dst: Any, samples: list[int]) -> None:
        for idx in samples:
            rec.record(idx, dst, sim.now)

    # -- adam-2pc ---------------------------------------------------------------------------
    def start_round() -> None:
        if not pending:
            state["round_busy"] = False
            return
        batch = list(pending)
        pending.clear()
        state["round"] = [i for s, _ in batch for i in s]
        state["acks"] = 0
        size = sum(b for _, b in batch)
        for r in replicas:
            net.send(TRAINER, r, None, size, prepare)

    def prepare(src: Any, dst: Any, _: Any) -> None:
        net.send(dst, TRAINER, None, HEADER_BYTES, ack)

    def ack(src: Any, dst: Any, _: Any) -> None:
        state["acks"] += 1
        if state["acks"] == len(replicas):
            samples = state["round"]
            for r in replicas:
                net.send(TRAINER, r, samples, HEADER_BYTES, deliver_samples)
            # The next round starts once every commit is out; what arrived meanwhile goes in it.
            if pending:
                sim.schedule(0.0, start_round)
            else:
                state["round_busy"] = False

    # -- broadcast --------------------------------------------------------------------------
    model_bytes = sum(t.rows * t.row_bytes for t in sc.model.tables) + HEADER_BYTES
    interval = float(sc.baselines.get("checkpoint_interval_s", 600))
    validate = float(sc.baselines.get("checkpoint_validate_s", 60))
    relays = {}
    for nid, dc in placement:
        relays.setdefault(dc, nid)

    def checkpoint() -> None:
        samples = [i for s, _ in pending for i in s]
        pending.clear()
        if samples:
            sim.schedule(validate, ship, samples)
        if sim.now < sc.duration_s:
            sim.schedule(interval, checkpoint)

    def ship(samples: list[int]) -> None:
        for dc, relay in relays.items():
            net.send(TRAINER, relay, samples, model_bytes, relay_fanout)

    def relay_fanout(src: Any, dst: Any, samples: list[int]) -> None:
        deliver_samples(src, dst, samples)
        dc = net.dc_of(dst)
        for nid, ndc in placement:
            if ndc == dc and nid != dst:
                net.send(dst, nid, samples, model_bytes, deliver_samples)

    workload = Workload(sc.workload, sim.derive_np_rng("workload"))
    workload.drive(sim, on_batch, until=sc.duration_s)
    if system == "broadcast":
        sim.schedule(interval, checkpoint)
        end = (np.ceil(sc.duration_s / interval) * interval) + validate + max(sc.settle_s, 60)
    else:
        end = sc.duration_s + sc.settle_s
    wall0 = time.perf_counter()
    step = max(0.5, end / 100)
    t = 0.0
    while t < end:
        t = min(end, t + step)
        sim.run(until=t)
        if progress:
            progress(system, t, end)
        if t >= sc.duration_s and not pending and rec.missing == 0:
            break
    lat = rec.summary()
    return {
        "latency_s": {k: lat[k] for k in ("intra_dc", "cross_dc", "all")},
        "latency_per_dc_s": lat["per_dc"],
        "latency_by_class_s": {},
        "unapplied_samples": lat["missing"],
        "wan_bytes": int(net.wan_bytes_total),
        "wan_bytes_by_link": {f"{a}->{b}": int(v) for (a, b), v in sorted(net.wan_bytes.items())},
        "wan_bytes_min": int(truth.bytes_published * (len(sc.wan.dc_names) - 1)),
        "rows_published": truth.rows_published,
        "converged": lat["missing"] == 0,
        "converged_at_s": sim.now if lat["missing"] == 0 else None,
        "events": sim.events,
        "wall_s": time.perf_counter() - wall0,
        "_latency_matrix": rec.matrix(),
        "_replica_dcs": rec.dcs,
    }
