"""Gap probes of a replica: :class:`GapProbe`, a component the replica node holds (its
bookkeeping is :class:`p2p.gaps.GapProbes`).

Asks every member for the rows of a knowledge gap no anti-entropy partner filled,
answers such asks, and closes a gap once every member has answered for all of it
(the rule and why it is safe: :mod:`p2p.gaps`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ekko.core.codec import MsgType, delta_from_wire, delta_to_wire, field
from ekko.core.errors import ProtocolError
from ekko.core.messages import Outgoing
from ekko.core.spec import check_name
from ekko.core.version import MAX_COUNTER, MAX_ORIGIN, counters_of, origins_of
from p2p.gaps import MAX_GAP_ENTRIES, MAX_GAP_ROWS, GapProbes
from p2p.sync import ROW_OVERHEAD_BYTES

if TYPE_CHECKING:
    from p2p.host import NodeServices
    from p2p.model_state import ModelState
    from rollback.protocol import RollbackProtocol


def _int(x: Any, lo: int, hi: int) -> int:
    if not isinstance(x, int) or isinstance(x, bool) or not lo <= x <= hi:
        raise ProtocolError("bad gap entry", "bad_body")
    return x


def _gap_message(body: dict[str, Any]) -> tuple[str, list]:
    """``(sender, entries)`` of a probe or answer, its entry count bounded."""
    sender = field(body, "from", str)
    entries = field(body, "gaps", list)
    if len(entries) > MAX_GAP_ENTRIES:
        raise ProtocolError("too many gap entries", "too_large")
    return sender, entries


def _gap_key(e: Any, length: int) -> tuple[str, str, int, int, int]:
    """``(model, table, shard, origin, lo)`` of a probe or answer entry of ``length`` fields."""
    if not isinstance(e, list) or len(e) != length:
        raise ProtocolError("bad gap entry", "bad_body")
    return (check_name("model", e[0], ProtocolError), check_name("table", e[1], ProtocolError),
            _int(e[2], 0, 1 << 31), _int(e[3], 1, MAX_ORIGIN), _int(e[4], 0, MAX_COUNTER))


class GapProbe:
    """Probe, answer and close knowledge gaps.

    Args:
        host: the replica (:class:`p2p.host.NodeServices`).
        rollback: its rollback component (fence, pinned baseline, quality events).
        now: current time (the closing rule waits until the member list can be the cluster's).
    """

    def __init__(self, host: NodeServices, rollback: RollbackProtocol, now: float) -> None:
        self.host = host
        self.rollback = rollback
        c = host.config
        self.gaps = GapProbes(host.node_id, c.gap_probe_after, max(c.ae_interval, c.gap_probe_after / 4))
        # The closing rule quantifies over the member list, so it must be the cluster's:
        # a replica that just started knows only itself and its seeds until gossip has run.
        self._gaps_from = now + c.dead_after

    def note_waiting(self, m: ModelState, table: str, s: int, now: float, urgent: bool = False) -> None:
        if not urgent:
            # A gap from counter 0 of an origin: this replica holds nothing of it in the
            # shard yet, and an SDK publisher's first frame to a shard is linked from just
            # below its own counters (it cannot tell a first start from a lost state dir:
            # RESTART_LINK), so the gap never fills by itself.  (The simulator's new
            # publishers chain from 0: their gap from 0 is a reordered push, and a probe
            # costs a round.)  Probe it at once, as the ingest does, instead of after
            # gap_probe_after x (1 + tier): anti-entropy does not spread the ingest's
            # closed gap while pushes keep the shard in motion, and three new publishers
            # left the far DCs' knowledge 4-12 s behind (3x3 daemons, bench/throughput.py).
            sync = m.shards[table].get(s)
            urgent = sync is not None and any(sync.knowledge[o] == 0 for o in sync.pending)
        self.gaps.note_waiting((m.spec.name, table, s), now, urgent)

    def round(self, now: float) -> None:
        """Probe the gaps that have waited long enough; close those every member covered."""
        if not self.gaps.waiting or self.rollback.baseline_pin:
            return  # a pinned baseline holds its knowledge at the cut: nothing to close
        members = [p for p in self.host.members.members if p != self.host.node_id]
        if now < self._gaps_from or (self.host.seeds and not members):
            # Not before the member list can be the cluster's: every gap would close
            # vacuously at a replica that has not heard of its peers yet.
            return
        gaps: dict[tuple[str, str, int, int], tuple[int, int]] = {}
        for model, table, s in self.gaps.waiting:
            m = self.host.models.get(model)
            sync = m.shards[table].get(s) if m is not None else None
            if sync is None:
                continue
            for o in sync.gap_origins():
                g = sync.gap(o)
                if g is not None:
                    gaps[(model, table, s, o)] = g
        asks, closable = self.gaps.round(now, gaps, members)
        for peer, entries in asks.items():
            mem = self.host.members.get(peer)
            if mem is not None:
                self.host.counters["gap_probes_sent"] += 1
                self.host.send(Outgoing(peer, mem.address, MsgType.GOSSIP,
                                          {"k": "gq", "from": self.host.node_id, "gaps": entries}))
        for model, table, s, o, lo, hi in closable:
            m = self.host.models[model]
            sync = m.shard(table, s)
            if sync.chain(o, lo, hi):
                m.dirty[table].add(s)
            self.host.counters["gaps_closed"] += 1
            self.rollback.states.quality_event("gap_closed", model=model, table=table, shard=s, origin=o, after=lo, upto=hi)

    def on_query(self, body: dict[str, Any], now: float) -> None:
        """A member probes gaps: send every row we hold in each range (capped), our knowledge
        of the origin and our waiting intervals for it."""
        sender, entries = _gap_message(body)
        parsed = []
        for e in entries:
            model, table, s, o, lo = _gap_key(e, 6)
            parsed.append((model, table, s, o, lo, _int(e[5], lo + 1, MAX_COUNTER)))
        mem = self.host.members.get(sender)
        if mem is None:
            return
        budget = self.host.config.pull_response_bytes
        out = []
        extra = 0
        # A probe asks about several publishers of a shard (a new publisher's first frames
        # leave a gap in every shard it writes): the shard's origins are read once, and each
        # entry then looks only at its publisher's rows.  (Scanning the whole shard per entry
        # was 11% of a peer daemon's busy samples with four new publishers of 10k-row
        # batches, bench/daemon_profile.py --publishers 4 --py-spy.)
        origins: dict[tuple[str, str, int], tuple[np.ndarray, np.ndarray]] = {}
        for model, table, s, o, lo, hi in parsed:
            m = self.host.models.get(model)
            spec = self.host.table_spec(model, table)
            if m is None or spec is None or s >= spec.num_shards:
                # We hold no such model or shard, hence no rows of it: covered.
                out.append([model, table, s, o, lo, hi, 0, [], None])
                continue
            ts = m.store.table(table)
            a, b = spec.shard_range(s)
            held = origins.get((model, table, s))
            if held is None:
                v = ts.versions[a:b]
                held = origins[(model, table, s)] = (v, origins_of(v))
            v, of = held
            sel = np.flatnonzero(of == o)
            c = counters_of(v[sel])
            keep = (c > lo) & (c <= hi)
            sel = sel[keep]
            ids, cs = sel + a, c[keep]
            order = np.argsort(cs, kind="stable")
            ids, cs = ids[order], cs[order]
            cap = min(MAX_GAP_ROWS, max(0, budget // (spec.row_bytes + ROW_OVERHEAD_BYTES)))
            covered = hi
            if len(ids) > cap:
                covered = int(cs[cap]) - 1
                ids = ids[:cap]
            budget -= len(ids) * (spec.row_bytes + ROW_OVERHEAD_BYTES)
            delta = None
            if len(ids):
                d = ts.take(model, ids)
                delta = delta_to_wire(d)
                if d.values is None:
                    extra += len(d) * spec.row_bytes
            sync = m.shards[table].get(s)
            known = sync.knowledge[o] if sync is not None else 0
            pend = [[x, y] for x, y in sync.pending.get(o, [])] if sync is not None else []
            out.append([model, table, s, o, lo, covered, known, pend, delta])
        self.host.counters["gap_answers_sent"] += 1
        self.host.send(Outgoing(sender, mem.address, MsgType.GOSSIP,
                                  {"k": "ga", "from": self.host.node_id, "gaps": out}, extra))

    def on_answer(self, body: dict[str, Any], now: float) -> None:
        """A member's rows for our gaps: apply them, adopt what its knowledge and waiting
        intervals vouch for within the range it covered, and note how far it covered."""
        sender, entries = _gap_message(body)
        parsed = []
        for e in entries:
            model, table, s, o, lo = _gap_key(e, 9)
            covered = _int(e[5], lo, MAX_COUNTER)
            known = _int(e[6], 0, MAX_COUNTER)
            if not isinstance(e[7], list) or len(e[7]) > 4 * MAX_GAP_ENTRIES:
                raise ProtocolError("bad gap answer", "bad_body")
            pend = []
            for p in e[7]:
                if not (isinstance(p, list) and len(p) == 2):
                    raise ProtocolError("bad gap answer", "bad_body")
                x = _int(p[0], 0, MAX_COUNTER)
                pend.append((x, _int(p[1], x + 1, MAX_COUNTER)))
            m = self.host.models.get(model)
            spec = self.host.table_spec(model, table)
            if m is None or spec is None or s >= spec.num_shards:
                continue
            d = None
            if e[8] is not None:
                d = delta_from_wire(e[8], self.host.table_spec, values_required=self.host.with_values)
                if d.model != model or d.table != table:
                    raise ProtocolError("gap answer rows of another table", "bad_body")
                if len(d):
                    c = counters_of(d.versions)
                    if ((spec.shards_of(d.ids) != s).any() or (origins_of(d.versions) != o).any()
                            or int(c.min()) <= lo or int(c.max()) > covered):
                        raise ProtocolError("gap answer rows outside the range asked", "bad_body")
            parsed.append((m, table, s, o, lo, covered, known, pend, d))
        self.host.refuse_future([p[8] for p in parsed if p[8] is not None], now, "gap answer",
                           known=max([max(p[5], p[6]) for p in parsed], default=0))
        for m, table, s, o, lo, covered, known, pend, d in parsed:
            if d is not None and len(d):
                if self.rollback.fence and self.rollback.fence.mask(m.spec.name, table, d.ids, d.versions).any():
                    # The member has not applied a rollback we have: its rows in the gap are
                    # not what the cut keeps.  Take what applies, vouch for nothing, ask again.
                    self.host.apply_delta(m, d, now, source="pull")
                    continue
                self.host.apply_delta(m, d, now, source="pull")
            sync = m.shard(table, s)
            moved = False
            # Our knowledge reached ``lo`` when we asked, and we now hold every row the
            # member has in (lo, covered]: what its knowledge and intervals vouch for
            # inside that range is here too.
            if known > lo:
                moved |= sync.chain(o, lo, min(known, covered))
            for x, y in pend:
                top = min(y, covered)
                if top > max(x, lo):
                    moved |= sync.chain(o, max(x, lo), top)
            if moved:
                m.dirty[table].add(s)
            self.gaps.answered(sender, (m.spec.name, table, s, o), lo, covered)
