"""The fault harness's publisher: a trainer's :class:`PublisherChain` publishing to the
cluster while it crashes and restarts in the ways :mod:`simulator.faults` describes
(with its state, a new origin, the same origin without state, a foreign state, an
older backup), routing around a down ingest and, during a chain gap, around an
isolated one.  Every frame a replica accepted goes into the :class:`ReferenceModel`;
the publisher invariant (counters never handed out twice, a restored pending frame
keeps its versions) is reported to the :class:`InvariantChecker`.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from typing import Any

import msgpack
import numpy as np

from ekko.core.chain import PendingFrame, PublisherChain
from ekko.core.codec import MsgType
from ekko.core.errors import ProtocolError, UsageError
from ekko.core.hashed import with_keys
from ekko.core.version import HLC_EPOCH_MS, HLC_LOGICAL_BITS, MAX_ORIGIN, HybridClock
from simulator.events import Simulation
from simulator.fault_checks import InvariantChecker
from simulator.fault_plan import RESTART_MODES, Episode, FaultConfig
from simulator.fault_reference import MODEL_NAME, SPEC, ReferenceModel, versions_of
from simulator.replicas import SimCluster

#: origin id of the first publisher (a publisher restarting without state takes the next).
PUBLISHER_ORIGIN = 1
#: the publisher backs its state up this often (what a ``backup`` restart restores).
BACKUP_INTERVAL_S = 1.0


class FaultPublisher:
    """The publisher of one chaos run and what it keeps across its restarts.

    ``chain`` is ``None`` while it is down; ``pending`` is the frame not yet
    acknowledged (``pending_target``: the replica that applied it when the ack was
    lost); ``avoid`` / ``gap_frames_left``: during a chain gap, the isolated ingest and
    how many more frames still reach it.  ``rng`` is the harness's stream (shared with
    the driver: the order of draws is the run's), ``chain_rng`` the stream for foreign
    and backup states.
    """

    def __init__(self, sim: Simulation, cluster: SimCluster, cfg: FaultConfig, ingest: str, rng: random.Random,
                 chain_rng: random.Random, faults: Counter[str], checks: InvariantChecker, ref: ReferenceModel,
                 disk_losses: Counter[str], foreign_start: bool) -> None:
        self.sim, self.cluster, self.cfg, self.ingest = sim, cluster, cfg, ingest
        self.rng, self.chain_rng = rng, chain_rng
        self.np_rng = sim.derive_np_rng("values")
        self.faults, self.checks, self.ref = faults, checks, ref
        self.disk_losses = disk_losses             # node id -> disk losses so far (the driver's)
        self.chain: PublisherChain | None = PublisherChain(PUBLISHER_ORIGIN)
        self.origins_used: set[int] = set()
        self.issued_top: dict[int, int] = {}       # origin -> greatest counter it handed out
        self.backups: list[tuple[float, int, str]] = []   # (time, origin, PublisherChain.state() JSON)
        self._last_backup = -float("inf")
        self.down_at = 0.0
        if foreign_start:
            # A trainer restored from backup into this (new) cluster: its heads name counters
            # below its first frame here that this cluster never saw.
            first = int(cfg.publish_interval_s / 2 * 1000) << HLC_LOGICAL_BITS
            self.chain = PublisherChain.restart(
                self.foreign_state({"origin": PUBLISHER_ORIGIN, "clock": 0, "heads": []}, 0, first - 1),
                PUBLISHER_ORIGIN)
            self.faults["publisher_start_foreign_chain"] += 1
        self.pending: PendingFrame | None = None
        self._pending_tables: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.pending_target: str | None = None     # replica that applied the pending frame (ack lost)
        self.saved: tuple[bytes, bytes | None] | None = None
        self.avoid: str | None = None              # the isolated ingest of a chain gap
        self.gap_frames_left = 0

    def new_frame(self) -> None:
        assert self.chain is not None
        n = self.rng.randint(1, self.cfg.max_rows_per_publish)
        tables: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for t in SPEC.tables:
            if t.dense and self.rng.random() > 0.3:
                continue
            k = t.rows if t.dense else min(n, t.rows)
            ids = np.sort(self.np_rng.choice(t.rows, size=k, replace=False)).astype(np.int64)
            vals = self.np_rng.standard_normal((k, t.dim)).astype(np.float32)
            if t.hashed:
                # Random slots, each written with a new random key (an eviction of whatever it
                # held): what the faults do to a row's key is checked, not a publisher's policy.
                vals = with_keys(vals, self.np_rng.integers(1, 2**62, k, dtype=np.int64), t)
            tables[t.name] = (ids, vals)
        origin = self.chain.origin
        top = self.issued_top.get(origin, 0)
        self.pending = self.chain.frame(SPEC, tables, now_ms=HLC_EPOCH_MS + self.sim.now * 1000)
        if self.pending.first_counter <= top:
            self.checks.violate("publisher", f"origin {origin}", detail=f"counter {self.pending.first_counter} handed "
                          f"out again (origin already used up to {top}) at t={self.sim.now:.3f}")
        self.issued_top[origin] = max(top, self.pending.last_counter)
        self.origins_used.add(origin)
        self._pending_tables = tables
        self.pending_target = None

    def publish(self) -> None:
        if self.chain is None:
            return  # the publisher is down
        if self.pending is None:
            self.new_frame()
        assert self.pending is not None
        live = self.cluster.live()
        if self.avoid is not None and self.gap_frames_left <= 0 and len(live) > 1:
            # A chain gap: the isolated ingest is out of the publisher's reach too now.
            target = self.rng.choice([n for n in live if n != self.avoid])
        else:
            target = self.ingest if self.ingest in live else self.rng.choice(live)
        if target != self.ingest:
            self.faults["publishes_rerouted"] += 1
        try:
            ack = self.cluster.call(target, "publish", self.pending.body, self.sim.now)
        except (ProtocolError, UsageError) as e:
            self.faults["publishes_refused"] += 1
            self.faults[f"publish_refused:{getattr(e, 'reason', 'usage')}"] += 1
            return  # retried next interval, same frame
        if self.pending_target == target:
            # A retry of a frame this replica already applied (its ack was lost): a no-op.
            self.faults["publish_retries_after_lost_ack"] += 1
            if ack.applied:
                self.checks.violate("idempotence", target, detail=f"a retried publish applied {ack.applied} rows again "
                              f"at t={self.sim.now:.3f}")
        self.cluster.keep(("publisher", target, (MsgType.PUBLISH, self.pending.body)))
        self.ref.record_frame(self.pending, self._pending_tables, acked=True)
        self.chain.acked(self.pending)
        self.faults["publishes"] += 1
        if self.avoid is not None and target == self.avoid:
            self.gap_frames_left -= 1
            self.faults["chain_gap_frames_at_isolated_ingest"] += 1
        self.pending = None
        self.pending_target = None
        if self.sim.now - self._last_backup >= BACKUP_INTERVAL_S:
            self._last_backup = self.sim.now
            self.backups.append((self.sim.now, self.chain.origin, json.dumps(self.chain.state())))

    def crash(self, e: Episode) -> None:
        if self.chain is None:
            return
        mode, ack_lost = restart_mode(e.args[0]), e.args[1]
        if ack_lost:
            # The frame reached a replica, which applied it; the acknowledgement never
            # came back because the publisher died first.
            if self.pending is None:
                self.new_frame()
            assert self.pending is not None
            live = self.cluster.live()
            target = self.ingest if self.ingest in live else self.rng.choice(live)
            try:
                self.cluster.call(target, "publish", self.pending.body, self.sim.now)
                self.cluster.keep(("publisher", target, (MsgType.PUBLISH, self.pending.body)))
                self.ref.record_frame(self.pending, self._pending_tables, acked=False)
                self.pending_target = target
                self.faults["publisher_acks_lost"] += 1
            except (ProtocolError, UsageError):
                pass
        # What the SDK has on disk: the chain state and the pending frame, serialized.
        pend = None
        if self.pending is not None:
            p = self.pending
            pend = msgpack.packb({"model": p.model, "body": p.body, "heads": [[t, s, c] for (t, s), c in p.heads.items()],
                                  "first": p.first_counter, "last": p.last_counter, "rows": p.rows,
                                  "tables": {t: [ids.tolist(), vals.tobytes()] for t, (ids, vals)
                                             in self._pending_tables.items()}, "target": self.pending_target,
                                  "target_losses": self.disk_losses[self.pending_target or ""]},
                                 use_bin_type=True)
        self.saved = (json.dumps(self.chain.state()).encode(), pend)
        self.chain = None
        self.down_at = self.sim.now
        self.faults["publisher_crash"] += 1
        self.sim.schedule(e.length, self.restart, mode)

    def restart(self, mode: str) -> None:
        if self.chain is not None or self.saved is None:
            return
        state_raw, pend_raw = self.saved
        self.saved = None
        state = json.loads(state_raw)
        if mode != "state":
            # Whatever the pending frame was, this publisher does not have it: it is not re-sent
            # (a replica that applied it keeps it; the reference model has it as accepted).
            self.pending = None
            self.pending_target = None
            self._pending_tables = {}
        self._reach_ingest_again()
        if mode in ("same_origin", "foreign", "backup"):
            self._restart_same_origin(mode, state)
        elif mode == "state":
            chain = PublisherChain.restart(state, state["origin"])   # as the SDK starts
            pending = None
            if pend_raw is not None:
                r = msgpack.unpackb(pend_raw, raw=False, strict_map_key=False)
                pending = PendingFrame(r["model"], r["body"], {(t, int(s)): int(c) for t, s, c in r["heads"]},
                                       int(r["first"]), int(r["last"]), int(r["rows"]))
                # As the SDK does: counters of a frame that may have reached a replica are never reused.
                chain.clock.observe(pending.last_counter)
                sent = versions_of(self.pending) if self.pending is not None else {}
                got = versions_of(pending)
                if sent.keys() != got.keys() or any(not np.array_equal(sent[t], got[t]) for t in sent):
                    self.checks.violate("publisher", f"origin {chain.origin}", detail="the restored pending frame does "
                                  "not carry the versions it had before the restart")
                self._pending_tables = {t: (np.asarray(ids, np.int64),
                                            np.frombuffer(vals, np.float32).reshape(len(ids), -1).copy())
                                        for t, (ids, vals) in r["tables"].items()}
                self.pending_target = r["target"]
                if r["target"] is not None and self.disk_losses[r["target"]] != r.get("target_losses", 0):
                    self.pending_target = None  # that replica lost its disk since: the frame is new there
            self.pending = pending
            self.chain = chain
            self.faults["publisher_restart_with_state"] += 1
        else:
            # State lost: by the rule of PublisherChain.restore, a new origin.
            origin = max(self.origins_used | {state["origin"]}) + 1
            if origin > MAX_ORIGIN:
                raise UsageError("out of publisher origins")
            self.chain = PublisherChain.restore(None, origin)
            self.faults["publisher_restart_new_origin"] += 1

    def _reach_ingest_again(self) -> None:
        """A restarted publisher tries its first endpoint first: during a chain gap it reaches
        the isolated ingest for one more frame (after a backup restart, a stale chain there)."""
        if self.avoid is not None:
            self.gap_frames_left = max(self.gap_frames_left, 1)

    def _restart_same_origin(self, mode: str, state: dict[str, Any]) -> None:
        """Issue 13's restarts: the same origin without its state, with a foreign state, or
        with an older backup of its state."""
        origin = int(state["origin"])
        now_counter = int(self.sim.now * 1000) << HLC_LOGICAL_BITS   # the HLC's physical part now
        top = self.issued_top.get(origin, 0)
        if mode == "same_origin":
            # As the SDK without its state dir: RESTART_LINK links, a fresh clock.  The clock
            # starts at the wall time, above every counter this origin handed out unless its
            # HLC ran ahead of the wall clock (> 256 rows/ms) -- which an SDK without state
            # could not know; the harness floors it then (counted), so the "publisher"
            # invariant keeps testing the protocol and not this impossibility.
            chain = PublisherChain.restore(None, origin, history_known=False)
            if top >= now_counter:
                chain.clock = HybridClock(top)
                self.faults["publisher_clock_floored"] += 1
            self.faults["publisher_restart_same_origin"] += 1
        elif mode == "foreign":
            # Its state dir was used against another cluster while it was away: heads of some
            # shards advanced to counters (handed out there) that this cluster never saw.
            chain = PublisherChain.restart(self.foreign_state(state, max(top, int(state["clock"])), now_counter - 1),
                                           origin)
            self.faults["publisher_restart_foreign_chain"] += 1
        else:
            # Restored from an older backup of its state dir: a stale chain (heads behind what
            # this cluster holds); the clock's physical part keeps counters new.
            olds = [b for t, o, b in self.backups if o == origin and t <= self.down_at - 0.5]
            if olds:
                backup = json.loads(self.chain_rng.choice(olds))
            else:
                backup = {"origin": origin, "clock": 0, "heads": []}   # the state dir of its first start
                self.faults["publisher_restart_from_empty_backup"] += 1
            chain = PublisherChain.restart(backup, origin)
            self.faults["publisher_restart_from_backup"] += 1
        self.chain = chain

    def foreign_state(self, state: dict[str, Any], lo: int, hi: int) -> dict[str, Any]:
        """``state`` with the heads of a random set of shards moved to counters in ``(lo, hi]``
        (published to another cluster), its clock past them."""
        rng = self.chain_rng
        shards = [(MODEL_NAME, t.name, s) for t in SPEC.tables for s in range(t.num_shards)]
        heads = {(m, t, int(s)): int(c) for m, t, s, c in state.get("heads", [])}
        top = int(state.get("clock", 0))
        for key in rng.sample(shards, rng.randint(1, len(shards))):
            base = max(lo, heads.get(key, 0))
            if hi > base + 1:
                heads[key] = rng.randint(base + 1, hi)
                top = max(top, heads[key])
                self.faults["foreign_chain_heads"] += 1
        origin = int(state["origin"])
        self.issued_top[origin] = max(self.issued_top.get(origin, 0), top)   # handed out, elsewhere
        return {**state, "clock": top, "heads": [[m, t, s, c] for (m, t, s), c in sorted(heads.items())]}


def restart_mode(arg: bool | str) -> str:
    """A publisher restart episode's mode (the first stream draws a bool: keep state or not)."""
    if isinstance(arg, bool):
        return "state" if arg else "new_origin"
    if arg not in RESTART_MODES:
        raise UsageError(f"unknown publisher restart mode {arg!r}")
    return arg
