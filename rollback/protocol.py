"""Cuts and rollback of a replica: :class:`RollbackProtocol`, a component the replica node holds.

A cut is a named point: every shard's knowledge.  A rollback record (cut + an HLC
rollback point) is applied here, sent to every peer and gossiped; the versions it
fences never apply again.  Restored rows are compared with random peers for a few
rounds because state-based sync may have skipped the newest version the cut covers.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ekko.core.codec import MsgType, field
from ekko.core.delta import WIRE_DTYPES
from ekko.core.errors import ProtocolError, UsageError
from ekko.core.messages import Outgoing
from ekko.core.spec import check_name
from ekko.core.version import MAX_COUNTER, MAX_ORIGIN, Knowledge, origins_of
from rollback.cut_sync import CutSync
from rollback.cuts import Cut, CutPolicy, CutRegistry, Fence
from rollback.host import RollbackHost
from rollback.manager import Incident, check_sample, merge_rollback_records
from rollback.model_states import ModelStates
from rollback.repair import Repair
from rollback.undo import UndoHistory
from rollback.undo_image import UndoImage


#: most chain heads a cut request may ask to be covered.
MAX_COVER_HEADS = 1 << 16
#: rollback records kept for gossip (newest first); a replica that was away catches up from them.
MAX_ROLLBACK_RECORDS = 32


class RollbackProtocol:
    """Cut, rollback, fence and repair behaviour of a replica, and its model-state manager.

    Owns the undo history (what applies overwrote), the cuts, the fence of rolled-back
    versions, the rollback records seen (gossiped so a replica that was away catches
    up), the apply sequence number the undo history orders by and the pinned-baseline
    cut; and its parts, each with its own state: :attr:`states` (the model-state
    manager :attr:`quality`, peers' states, quality events), :attr:`cut_sync` (cut
    messages, cut anti-entropy) and :attr:`repair` (restored rows compared with peers).

    Args:
        host: the replica (:class:`RollbackHost`).
        with_values: False in metadata mode (no undo history is kept).

    Example (through the replica node, which holds one):
        >>> from ekko.replica.node import ReplicaNode
        >>> n = ReplicaNode("r1", "dc1", "127.0.0.1:1", device="cpu")
        >>> n.rollback_protocol.fence is n.fence, n.rollback_protocol.baseline_pin
        (True, '')
    """

    def __init__(self, host: RollbackHost, with_values: bool) -> None:
        self.host = host
        c = host.config
        self.undo: UndoHistory | None = UndoHistory(c.undo_bytes) if c.undo_bytes and with_values else None
        # The history is released by its byte budget only, never at a cut: a row held above
        # a cut's knowledge when it is taken (pulled or pushed past a gap) goes back through
        # history from before the cut (fault-harness seed 7 lost such a row everywhere).
        self.cuts = CutRegistry(CutPolicy(auto_interval_s=c.auto_cut_interval or 3600.0,
                                          retention=c.cut_retention, forget_on_retire=False), undo=self.undo)
        self.fence = Fence()
        self.rollbacks: dict[str, dict[str, Any]] = {}
        #: apply sequence number: the undo history's order (one per apply that changed rows).
        self.seq = 0
        #: the model-state manager, the states peers gossip, quality events (rollback.model_states).
        self.states = ModelStates(host)
        self.quality = self.states.quality
        #: cut messages and cut anti-entropy (rollback.cut_sync).
        self.cut_sync = CutSync(host, self.cuts, self.quality)
        #: comparing restored rows with peers (rollback.repair).
        self.repair = Repair(host, self.fence)
        self._baseline_pin = ""
        self.set_baseline_pin(c.baseline_pin_cut)

    # ------------------------------------------------------------------ applies
    def record_undo(self, model: str, table: str, res: Any) -> None:
        """Note in the undo history what an apply overwrote (the host calls it per apply)."""
        if self.undo is not None:
            self.seq += 1
            self.undo.record(model, table, self.seq, res)

    def auto_cuts(self, now: float) -> None:
        """Take the automatic cuts that are due (every anti-entropy round asks)."""
        if self.host.config.auto_cut_interval:
            for name in self.host.models:
                if self.host.models[name].spec.placed:
                    continue   # cuts of placed models are not built yet (_refuse_placed)
                cut = self.cuts.maybe_auto_cut(name, now, lambda n=name: (self.knowledge_of(n), self.seq))
                if cut is not None:
                    self.quality.note_cut(name, cut.name, now)  # a rollback target if taken while healthy

    def report_quality(self, model: str, variant: str, metric: str, value: float, count: float, now: float,
                       until_counter: int | None = None) -> dict[str, Any] | None:
        """Take one quality sample of ``model`` (in-process API of ``POST /v1/quality``).

        Args:
            model: a registered model.
            variant: ``"online"`` (the served parameters) or ``"baseline"`` (a replica
                group that lags: see :attr:`NodeConfig.baseline_pin_cut`).
            metric: a metric the detector knows (``ctr``, ``auc``, ``loss``, ``logloss``).
            value: the metric over ``count`` events.
            count: events behind ``value`` (impressions, examples), > 0.
            now: current time, seconds.
            until_counter: rollback point (an HLC counter, normally the caller's wall
                clock) should this sample trigger an automatic rollback; default: the
                greatest counter any replica is known to hold.

        Returns the rollback record when the sample made the model corrupted and a
        rollback was started (here and at every peer), else None.  A bad sample raises
        :class:`UsageError` and changes nothing.

        Example:
            >>> from ekko.replica.node import ReplicaNode
            >>> from ekko.core.spec import ModelSpec, TableSpec
            >>> n = ReplicaNode("r1", "dc1", "127.0.0.1:1", device="cpu")
            >>> _ = n.register_model(ModelSpec("m", [TableSpec("t", rows=8, dim=2)]), now=0.0)
            >>> n.report_quality("m", "online", "ctr", 0.04, 1000, now=1.0) is None
            True
            >>> n.quality.state("m").value
            'warmup'
        """
        check_sample(model, variant, metric, value, count)
        if model not in self.host.models:
            raise UsageError(f"unknown model {model!r}")
        if metric not in self.quality.config.detector.metrics:
            raise UsageError(f"unknown metric {metric!r}; known: {sorted(self.quality.config.detector.metrics)}")
        if until_counter is not None and not 0 < until_counter <= MAX_COUNTER:
            raise UsageError("until_counter must be a positive HLC counter")
        before = self.quality.counters["incidents"]
        decision = self.quality.observe(model, variant, metric, value, count, now,
                                        eligible=lambda name, _m=model: self._cut_eligible(_m, name))
        if self.quality.counters["incidents"] != before:
            self.states.quality_event("incident", **self.quality.incidents(model)[-1].view())
        if decision is None:
            return None
        if until_counter is None:
            until_counter = max([self.host.models[model].head] + [h.get(model, 0) for h in self.host.peer_heads.values()])
            until_counter = max(1, until_counter)
        return self.rollback(model, decision.cut, until_counter, now, rid=decision.rollback_id,
                             incident=decision.incident)

    def _cut_eligible(self, model: str, name: str) -> bool:
        try:
            cut = self.cuts.get(model, name)
        except UsageError:
            return False
        # A foreign cut (seq 0) restores from its knowledge alone; without history, peers fill in.
        return self.undo is None or cut.seq == 0 or self.cuts.restorable(cut)

    # ------------------------------------------------------------------ pinned baseline
    @property
    def baseline_pin(self) -> str:
        """The cut this replica is pinned to as a baseline ("" = an ordinary replica)."""
        return self._baseline_pin

    def set_baseline_pin(self, cut: str) -> None:
        """Pin this replica to ``cut`` (a baseline), move the pin, or ``""`` to unpin.

        A pinned baseline applies only row versions the pinned cut covers and never lets
        its knowledge pass the cut's, so anti-entropy keeps offering it what lies beyond:
        after a re-pin to a newer cut (or an unpin) the next rounds bring it forward, as
        for a replica that was away.  Until the pinned cut is known here it applies
        nothing.  State-based sync keeps only each row's newest version, so a row that
        peers overwrote after the cut before this baseline got the cut's version keeps
        the baseline's older value (re-pin to a newer cut regularly).
        """
        if cut:
            check_name("cut", cut)
        self._baseline_pin = cut
        if not self.host.static_membership:
            # Advertised so that peers never make a baseline a gateway, push relay or
            # anti-entropy partner: it refuses what lies beyond its cut, so rows sent
            # to it for its DC would stop there, and rows it cannot take are wasted bytes.
            self.host.members.set_role("baseline" if cut else "")

    def pinned_cut(self, model: str) -> Cut | None:
        try:
            return self.cuts.get(model, self.baseline_pin)
        except UsageError:
            return None

    def baseline_filter(self, d: Any) -> Any:
        """The rows of a delta a pinned baseline may apply (those its cut covers)."""
        cut = self.pinned_cut(d.model)
        keep = (cut.covers(self.host.models[d.model].spec.table(d.table), d.ids, d.versions) if cut is not None
                else np.zeros(len(d), bool))
        if not keep.all():
            self.host.counters["baseline_held_rows"] += int((~keep).sum())
            d = d.take(keep)
        return d

    def baseline_clamp(self, model: str, table: str, shard: int, k: Knowledge) -> Knowledge:
        """A peer's knowledge as far as a pinned baseline may adopt it: at most the cut's."""
        cut = self.pinned_cut(model)
        pin = cut.knowledge.get((table, shard)) if cut is not None else None
        if pin is None:
            return Knowledge()
        return Knowledge({o: min(c, pin[o]) for o, c in k.items() if pin[o] > 0})

    # ------------------------------------------------------------------ cuts and rollback
    def knowledge_of(self, model: str) -> dict[tuple[str, int], Knowledge]:
        m = self.host.model_state(model)
        return {(t, s): sync.knowledge for t, shards in m.shards.items() for s, sync in shards.items()}

    def parse_coverage(self, model: str, covers: Any) -> tuple[int, list[tuple[str, int, int]]]:
        """Validate a cut request's ``covers``: ``{"origin": o, "heads": [[table, shard,
        counter], ...]}`` (a publisher's acknowledged chain heads).  Raises ProtocolError."""
        m = self.host.model_state(model)
        if not isinstance(covers, dict):
            raise ProtocolError("covers must be a map", "bad_body")
        origin = covers.get("origin")
        heads = covers.get("heads")
        if not isinstance(origin, int) or not 0 < origin <= MAX_ORIGIN or not isinstance(heads, list) \
                or len(heads) > MAX_COVER_HEADS:
            raise ProtocolError("covers needs an origin and at most "
                                f"{MAX_COVER_HEADS} heads", "bad_body")
        out = []
        for h in heads:
            if not (isinstance(h, list) and len(h) == 3 and isinstance(h[0], str) and m.spec.has_table(h[0])
                    and isinstance(h[1], int) and 0 <= h[1] < m.spec.table(h[0]).num_shards
                    and isinstance(h[2], int) and 0 <= h[2] <= MAX_COUNTER):
                raise ProtocolError(f"bad covers head {h!r:.60}", "bad_body")
            out.append((h[0], h[1], h[2]))
        return origin, out

    def uncovered(self, model: str, origin: int, heads: list[tuple[str, int, int]]) -> list[tuple[str, int, int]]:
        """The heads ``(table, shard, counter)`` of ``origin`` this replica's knowledge
        does not reach yet (a cut taken now would not cover them)."""
        m = self.host.model_state(model)
        out = []
        for table, s, c in heads:
            sync = m.shards[table].get(s)
            if (sync.knowledge[origin] if sync is not None else 0) < c:
                out.append((table, s, c))
        return out

    def _refuse_placed(self, model: str, what: str) -> None:
        """Cuts and rollbacks of a placed model (issue #18) are not built: a cut taken at
        one replica covers only the shards it holds, and a rollback must restore each
        shard at its holders.  Refused with a clear error rather than half done."""
        m = self.host.models.get(model)
        if m is not None and m.spec.placed:
            raise UsageError(f"model {model!r} is placed across the DC (replicas_per_shard="
                             f"{m.spec.replicas_per_shard}): {what} of a placed model is not supported yet")

    def take_cut(self, model: str, name: str, now: float, broadcast: bool = True) -> Cut:
        """Record a named restore point of ``model``: its per-shard knowledge now.

        With ``broadcast`` the cut is sent to every live peer, so a rollback to it can
        be started at any replica.
        """
        check_name("cut", name)
        self._refuse_placed(model, "a cut")
        cut = self.cuts.take(model, name, now, self.knowledge_of(model), self.seq)
        self.quality.note_cut(model, name, now)
        if broadcast:
            for peer in self.host.live_peers():
                self.cut_sync.send_cut(peer, cut)
        return cut

    # ------------------------------------------------------------------ durable undo history
    def export_undo(self, model: str) -> UndoImage | None:
        """The undo history of ``model`` to keep with its snapshot (None without a history).

        Take it in the same instant as the store copy: the history then ends exactly at
        the copied state (rule K7 of docs/design.md).
        """
        self.host.model_state(model)
        return self.undo.export_model(model, self.seq) if self.undo is not None else None

    def import_undo(self, image: UndoImage) -> str | None:
        """Install the undo history of a model restored from a snapshot (before any apply of it).

        The apply seq continues above the image's, so records of replayed or new applies
        come after the restored ones and cuts restored with the snapshot keep their
        meaning.  A damaged or inconsistent image installs no history: the model's
        horizon moves to the image's seq (cuts older than the snapshot are no longer
        restorable here; rollbacks to them rely on peers) and
        ``counters["undo_history_unusable"]`` counts it.

        Returns None when the history was installed, else why it was not.
        """
        self.seq = max(self.seq, int(image.seq))
        if self.undo is None:
            return None
        problem = image.damaged
        if problem is None:
            try:
                self.undo.import_model(image)
            except UsageError as e:
                problem = str(e)
        if problem is not None:
            self.undo.forget_before(image.model, int(image.seq))
            self.host.counters["undo_history_unusable"] += 1
        return problem
    def rollback(self, model: str, cut: Cut | str, until_counter: int, now: float, rid: str | None = None,
                 incident: Incident | None = None) -> dict[str, Any]:
        """Roll ``model`` back to ``cut`` everywhere: restore here, then tell every peer.

        Every version of the model newer than the cut and at most ``until_counter``, of
        every origin, including publishers this replica has not heard of yet (an
        HLC counter: the caller's wall clock at the decision, so harmful updates still
        in flight are caught too) is fenced: never applied or served again.  Updates
        published afterwards carry greater counters and apply normally.

        ``rid`` names the record (default: this node, model, cut and point); an automatic
        rollback passes the incident's id so that replicas deciding it at once build
        records that merge (:func:`rollback.manager.merge_rollback_records`), and the
        ``incident`` travels with the record so that every replica records it.

        Returns the rollback record (also gossiped until it ages out).
        """
        m = self.host.model_state(model)
        self._refuse_placed(model, "a rollback")
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
        record = {"id": rid or f"{self.host.node_id}.{model}.{cut.name}.{until_counter}", "model": model,
                  "cut": self.cut_sync.cut_to_wire(cut), "upper": [[o, until_counter] for o in [0, *sorted(origins)]]}
        if incident is not None:
            record["incident"] = incident.to_wire()
        self.apply_rollback(record, now)
        record = self.rollbacks.get(record["id"], record)  # merged with a peer's record of the incident
        for peer in self.host.live_peers():
            mem = self.host.members.get(peer)
            self.host.send(Outgoing(peer, mem.address, MsgType.ROLLBACK, {"from": self.host.node_id, "rb": record}))
        return record

    def parse_rollback(self, record: dict[str, Any], now: float
                        ) -> tuple[str, str, Cut, list[list[int]], Incident | None]:
        """Validate a rollback record without changing anything: ``(id, model, cut, upper, incident)``.

        Raises:
            ProtocolError: malformed, or a rollback point beyond our clock + max_clock_skew.
        """
        rid = field(record, "id", str)
        model = field(record, "model", str)
        cut = Cut.from_wire(record.get("cut"))
        upper_raw = field(record, "upper", list)
        if len(upper_raw) > MAX_ORIGIN or not all(
                isinstance(e, list) and len(e) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in e)
                and 0 <= e[0] <= MAX_ORIGIN and 0 < e[1] <= MAX_COUNTER for e in upper_raw):
            raise ProtocolError("bad rollback point", "bad_body")
        incident = Incident.from_wire(record["incident"], now) if "incident" in record else None
        if incident is not None and incident.model != model:
            raise ProtocolError("rollback incident names another model", "bad_body")
        if upper_raw and max(c for _, c in upper_raw) > self.host.counter_horizon(now):
            # A fence reaching into the future would silently drop legitimate updates to come.
            self.host.counters["refused_future_frames"] += 1
            raise ProtocolError("rollback point lies beyond this replica's clock + max_clock_skew", "future_version")
        return rid, model, cut, upper_raw, incident

    def apply_rollback(self, record: dict[str, Any], now: float) -> bool:
        """Restore the rows a rollback record covers; idempotent per record id and content."""
        rid = field(record, "id", str)
        prev = self.rollbacks.get(rid)
        if prev is not None and prev == record:
            return False
        rid, model, cut, upper_raw, incident = self.parse_rollback(record, now)
        m = self.host.models.get(model)
        if m is None or cut.model != model:
            return False  # not ours (yet): the record comes again with gossip
        if m.spec.placed:
            return False  # no replica of this build takes cuts of a placed model (_refuse_placed)
        if prev is not None:
            # Two replicas decided the same incident at once: join the records (the older
            # cut, the greater point), identically everywhere whatever the arrival order.
            merged = merge_rollback_records(prev, record)
            if merged == prev:
                return False
            record = merged
            cut = Cut.from_wire(record["cut"])
            upper_raw = record["upper"]
            incident = Incident.from_wire(record["incident"], now) if "incident" in record else None
            del self.rollbacks[rid]
        self.rollbacks[rid] = record
        while len(self.rollbacks) > MAX_ROLLBACK_RECORDS:
            del self.rollbacks[next(iter(self.rollbacks))]
        if incident is not None and self.quality.adopt(incident):
            self.states.quality_event("incident_adopted", **incident.view())
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
                self.seq += 1
                # The cut covers what an earlier rollback fenced too: never restore that.
                in_cut = cut.covered_fn(t)

                def covered(ids: np.ndarray, v: np.ndarray, _in_cut=in_cut, _table=t.name) -> np.ndarray:
                    return _in_cut(ids, v) & ~self.fence.mask(model, _table, ids, v)
                out = self.undo.restore_at_cut(model, t.name, ts, rows, covered, seq=self.seq)
                missing = out.incomplete
            else:
                missing = rows
            if len(missing):
                # No history for these: hold nothing rather than a fenced value; peers fill in.
                n = len(missing)
                ts.restore_rows(missing, np.zeros(n, np.int64),
                                np.zeros((n, t.width), WIRE_DTYPES[t.dtype]) if ts.values is not None else None)
            restored += len(rows)
            m.index[t.name].note_applied(rows, ts.versions[rows], now, self.host.config.index_rows)
            m.recompute_top(t.name, rows)
            for hook in self.host.on_restore:
                hook(model, t.name, rows)
            # State-based sync skips superseded versions, so our history may miss the newest
            # version the cut covers: compare every restored row with peers for a few rounds.
            self.repair.schedule(model, t.name, rows)
        # A new rollback restarts the count of answering peers even where it restored
        # nothing here: answers given before it compared pre-rollback values.
        self.repair.restart()
        self.host.counters["rollbacks"] += 1
        self.host.counters["rolled_back_rows"] += restored
        inc = self.quality.rollback_applied(model, rid, cut.name, now)
        self.states.quality_event("restored", model=model, rollback_id=rid, cut=cut.name, rows=restored,
                            incident=inc.id if inc is not None else None,
                            restore_s=inc.restore_s if inc is not None else None)
        return True
