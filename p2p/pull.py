"""Pulls of a replica: :class:`Pulls`, a component the replica node holds.

The last steps of anti-entropy (:mod:`p2p.antientropy`): ``PULL_REQUEST`` carries the
requester's knowledge and held rows of the differing shards; ``PULL_RESPONSE`` the
rows that knowledge does not cover (version order, capped, Scuttlebutt's rule), with
held rows excluded and, across the WAN, rows that arrived moments ago held back; and,
when the requester knows more somewhere, a reverse ``PULL_REQUEST``.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

import numpy as np

from ekko.core.codec import MsgType, array_from_wire, array_to_wire, delta_from_wire, delta_to_wire, field
from ekko.core.config import AE_DEFER_ROUNDS, MAX_HELD_ROWS_PER_SHARD, MAX_SHARDS_PER_PULL
from ekko.core.delta import Delta
from ekko.core.errors import ProtocolError
from ekko.core.messages import Outgoing
from ekko.core.version import MAX_COUNTER, Knowledge, counters_of, origins_of
from p2p.sync import ROW_OVERHEAD_BYTES, parse_pending

if TYPE_CHECKING:
    from p2p.gap_probe import GapProbe
    from p2p.host import NodeServices
    from p2p.model_state import ModelState
    from p2p.push import EagerPush
    from rollback.protocol import RollbackProtocol

_NO_ROWS = np.zeros(0, np.int64)


def _under_ceiling(vers: np.ndarray, ceiling: Knowledge) -> np.ndarray:
    """Which packed versions a ceiling (a pinned baseline's cut knowledge) covers."""
    if not len(vers):
        return np.zeros(0, bool)
    ctr, org = counters_of(vers), origins_of(vers)
    bound = np.zeros(len(vers), np.int64)
    for o, c in ceiling.items():    # a few publishers: one pass each
        bound[org == o] = c
    return ctr <= bound


def _parse_ceilings(raw: Any, models: dict[str, Any]) -> dict[tuple[str, str], list[Knowledge]]:
    """A pull request's optional ``ceil`` (``{model: {table: [knowledge per entry]}}``),
    validated whole; each list must match that table's entries one for one."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ProtocolError("bad pull ceilings", "bad_body")
    out: dict[tuple[str, str], list[Knowledge]] = {}
    for name, tables in raw.items():
        if not isinstance(tables, dict) or not isinstance(models.get(name), dict):
            raise ProtocolError("pull ceilings name a model the request lacks", "bad_body")
        for table, ks in tables.items():
            entries = models[name].get(table)
            if not isinstance(ks, list) or not isinstance(entries, list) or len(ks) != len(entries):
                raise ProtocolError("pull ceilings do not match the request's entries", "bad_body")
            out[(name, table)] = [Knowledge.from_wire(k) for k in ks]
    return out


class Pulls:
    """Pull requests and answers; counts the rows compared by whole-shard scans.

    Args:
        host: the replica (:class:`p2p.host.NodeServices`).
        push: the eager push component (rows a rollback's repair brought are pushed on).
        gaps: the gap probe component (a shard whose chain waits is noted there).
        rollback: the rollback component (fence, pinned baseline, repair answers).

    Example (through the replica node, which holds one):
        >>> from ekko.replica.node import ReplicaNode
        >>> n = ReplicaNode("r1", "dc1", "127.0.0.1:1", device="cpu")
        >>> n.pulls.rows_walked_by_table is n.rows_walked_by_table
        True
    """

    def __init__(self, host: NodeServices, push: EagerPush, gaps: GapProbe, rollback: RollbackProtocol) -> None:
        self.host = host
        self.push = push
        self.gaps = gaps
        self.rollback = rollback
        # Rows compared by whole-shard scans, per (model, table) (rows_newer).
        self.rows_walked_by_table: Counter[tuple[str, str]] = Counter()

    def rows_newer(self, m: ModelState, table: str, shards: list[int], theirs: list[Knowledge],
                    mine: list[Knowledge]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Rows of each shard that ``theirs`` does not cover, (ids, versions) in version order.

        With shard versions (the design) the recent-row index answers in O(hot rows).
        Without them (``use_shard_versions=False``, the paper's first ablation step) the
        node keeps no such shortcut and compares the version of every row of each
        requested shard.  Either way the rows compared are counted: ``rows_scanned``
        (all), ``rows_walked`` (those compared by whole-shard scans) and, per table,
        :attr:`rows_walked_by_table` -- a simulator charges CPU time from these.
        """
        ts = m.store.table(table)
        key = (m.spec.name, table)
        if not self.host.config.use_shard_versions:
            out = [ts.scan_newer(s, k) for s, k in zip(shards, theirs)]
            walked = sum(hi - lo for lo, hi in map(ts.spec.shard_range, shards))
            examined = 0
        else:
            ix = m.index[table]
            w0, e0 = ix.rows_walked, ix.rows_examined
            out = ix.newer_than_many(ts, shards, theirs, mine)
            walked, examined = ix.rows_walked - w0, ix.rows_examined - e0
        if walked or examined:
            self.host.counters["rows_scanned"] += walked + examined
        if walked:
            self.host.counters["rows_walked"] += walked
            self.rows_walked_by_table[key] += walked
        return out

    def defers(self) -> bool:
        """Whether anti-entropy leaves shards in motion alone (:meth:`unsettled`).

        Only the topology's push reaches every replica of a shard: without it (no push,
        rumors) nothing is in flight that a pull would send again, and the full-scan
        ablation asks for every shard every round.
        """
        cfg = self.host.config
        return (cfg.ae_defer_in_motion and cfg.push and cfg.push_mode == "topology" and cfg.use_shard_versions
                and not self.rollback.baseline_pin)

    def all_moving(self, m: ModelState, table: str, shards: np.ndarray, now: float) -> bool:
        """Whether :meth:`unsettled` would leave every one of ``shards`` alone now."""
        cfg = self.host.config
        return bool(len(shards)) and bool(m.moving(table, shards, now, cfg.push_grace,
                                                   AE_DEFER_ROUNDS * cfg.ae_interval).all())

    def unsettled(self, m: ModelState, table: str, shards: np.ndarray, now: float) -> np.ndarray:
        """The differing ``shards`` anti-entropy asks a peer for now: those not in motion
        (:meth:`p2p.model_state.ModelState.in_motion`); the others are counted."""
        cfg = self.host.config
        if not self.defers():
            return shards
        moving = m.in_motion(table, shards, now, cfg.push_grace, AE_DEFER_ROUNDS * cfg.ae_interval)
        if not moving.any():
            return shards
        self.host.counters["ae_deferred_shards"] += int(moving.sum())
        return shards[~moving]

    def send_pull_request(self, partner: str, shards: dict[str, dict[str, list[int]]], back: bool) -> None:
        mem = self.host.members.get(partner)
        if mem is None:
            return
        body_models: dict[str, dict[str, list[Any]]] = {}
        ceilings: dict[str, dict[str, list[Any]]] = {}
        count = 0
        for name, tables in shards.items():
            m = self.host.models[name]
            for table, ss in tables.items():
                entries = []
                ss = list(ss)[:max(0, MAX_SHARDS_PER_PULL - count)]
                mines = []
                for s in ss:
                    sync = m.shards[table].get(s)
                    mines.append(sync.knowledge if sync is not None else Knowledge())
                # Rows we hold above our knowledge (eagerly pushed): the peer skips them.
                # Without shard versions (the full-scan ablation) there is no recent-row
                # index to list them cheaply, and listing them by a scan of every shard
                # would double the scan cost for an optimization of eager push (off in
                # that ablation): send none; the peer may resend rows we have (idempotent).
                held = (self.rows_newer(m, table, ss, mines, mines) if self.host.config.use_shard_versions
                        else [(_NO_ROWS, _NO_ROWS)] * len(ss))
                for s, mine, (hid, hv) in zip(ss, mines, held):
                    if len(hid) > MAX_HELD_ROWS_PER_SHARD:
                        hid, hv = hid[:MAX_HELD_ROWS_PER_SHARD], hv[:MAX_HELD_ROWS_PER_SHARD]
                    entries.append([s, mine.to_wire(), array_to_wire(hid) if len(hid) else None,
                                    array_to_wire(hv) if len(hid) else None])
                    count += 1
                if entries:
                    body_models.setdefault(name, {})[table] = entries
                    if self.rollback.baseline_pin:
                        # A pinned baseline asks only for what its cut covers: rows beyond
                        # it would be refused on arrival, at the cost of the whole answer.
                        cut = self.rollback.pinned_cut(name)
                        ceilings.setdefault(name, {})[table] = [
                            (cut.knowledge.get((table, e[0])) or Knowledge() if cut is not None
                             else Knowledge()).to_wire() for e in entries]
        if body_models:
            self.host.counters["pull_requests_sent"] += 1
            body = {"from": self.host.node_id, "back": back, "models": body_models}
            if ceilings:
                body["ceil"] = ceilings   # optional: an older responder sends everything
            self.host.send(Outgoing(partner, mem.address, MsgType.PULL_REQUEST, body))

    def _known_tables(self, models: dict[str, Any]):
        """``(model state, table, spec, entries)`` for the tables of a pull message we hold;
        models and tables we do not know are skipped (the catalog may lag)."""
        for name, tables in models.items():
            m = self.host.models.get(name)
            if m is None or not isinstance(tables, dict):
                continue
            for table, entries in tables.items():
                if m.spec.has_table(table) and isinstance(entries, list):
                    yield m, table, m.spec.table(table), entries

    def on_pull_request(self, body: dict[str, Any], now: float) -> None:
        sender = field(body, "from", str)
        back = field(body, "back", bool)
        models = field(body, "models", dict)
        mem = self.host.members.get(sender)
        # Across the WAN, hold back rows applied moments ago: their eager push is
        # most likely in flight, and sending them again would cross the WAN twice.
        grace_from = now - self.host.config.push_grace if (
            mem is not None and mem.dc != self.host.dc and self.host.config.push) else None
        # Parse and validate everything first.
        ceilings = _parse_ceilings(body.get("ceil"), models)
        parsed: list[tuple[ModelState, str, int, Knowledge, np.ndarray, np.ndarray]] = []
        ceiling_of: list[Knowledge | None] = []
        total = 0
        for m, table, spec, entries in self._known_tables(models):
            ceil = ceilings.get((m.spec.name, table))
            for j, e in enumerate(entries):
                ceiling_of.append(ceil[j] if ceil is not None else None)
                total += 1
                if total > MAX_SHARDS_PER_PULL or not isinstance(e, list) or len(e) != 4:
                    raise ProtocolError("bad pull request entry", "bad_body")
                s = e[0]
                if not isinstance(s, int) or not 0 <= s < spec.num_shards:
                    raise ProtocolError("shard out of range", "bad_body")
                k = Knowledge.from_wire(e[1])
                if e[2] is None:
                    hid = hv = np.zeros(0, np.int64)
                else:
                    if not isinstance(e[2], bytes) or len(e[2]) % 8 or len(e[2]) // 8 > MAX_HELD_ROWS_PER_SHARD:
                        raise ProtocolError("bad held rows", "bad_body")
                    n = len(e[2]) // 8
                    hid = array_from_wire(e[2], np.int64, n, "held ids")
                    hv = array_from_wire(e[3], np.int64, n, "held versions")
                held = m.held(table)
                if held is not None and not held[s]:
                    continue   # a placed shard not kept here: nothing to answer with
                parsed.append((m, table, s, k, hid, hv))
        if mem is None:
            return
        # Rows each entry's knowledge lacks, one batched index lookup per table (nothing
        # below changes the store or the index, so looking up first answers the same).
        mines: list[Knowledge] = []
        by_table: dict[tuple[str, str], list[int]] = {}
        for i, (m, table, s, theirs, _, _) in enumerate(parsed):
            sync = m.shards[table].get(s)
            mines.append(sync.knowledge if sync is not None else Knowledge())
            by_table.setdefault((m.spec.name, table), []).append(i)
        newer: list[tuple[np.ndarray, np.ndarray]] = [None] * len(parsed)  # type: ignore[list-item]
        for (name, table), idx in by_table.items():
            got = self.rows_newer(self.host.models[name], table, [parsed[i][2] for i in idx],
                                   [parsed[i][3] for i in idx], [mines[i] for i in idx])
            for i, g in zip(idx, got):
                newer[i] = g
        budget = self.host.config.pull_response_bytes
        out_models: dict[str, dict[str, list[Any]]] = {}
        reverse: dict[str, dict[str, list[int]]] = {}
        extra = 0
        for (m, table, s, theirs, hid, hv), mine, (ids, vers), ceil in zip(parsed, mines, newer, ceiling_of):
            ts = m.store.table(table)
            sync = m.shards[table].get(s)
            if back and not mine.dominates(theirs):
                reverse.setdefault(m.spec.name, {}).setdefault(table, []).append(s)
            if ceil is not None:
                # A pinned baseline's request: only rows its cut covers, and our knowledge
                # only up to the cut -- the knowledge these rows make whole.  (Clamped
                # here, by the ceiling asked with: the baseline may be re-pinned while
                # this answer travels, and must not adopt more than the rows prove.)
                mine = Knowledge({o: min(c, ceil[o]) for o, c in mine.items() if ceil[o] > 0})
                if len(ids):
                    keep = _under_ceiling(vers, ceil)
                    if not keep.all():
                        self.host.counters["ceiling_held_rows"] += int((~keep).sum())
                        ids, vers = ids[keep], vers[keep]
            cut_below = None
            if grace_from is not None and sync is not None and len(ids):
                fresh = m.index[table].fresh_since(grace_from, *ts.spec.shard_range(s))
                if len(fresh):
                    # fresh is sorted and distinct: a binary search, not np.isin (which
                    # sorts both sides, 11% of a pull answer's samples here).
                    held_back = fresh[np.minimum(np.searchsorted(fresh, ids), len(fresh) - 1)] == ids
                    if held_back.any():
                        cut_below = int(counters_of(vers[held_back]).min())
                        ids, vers = ids[~held_back], vers[~held_back]
            if len(hid) and len(ids):
                # Skip rows the requester already holds at this version or newer.
                order = np.argsort(hid)
                hid_s, hv_s = hid[order], hv[order]
                pos = np.clip(np.searchsorted(hid_s, ids), 0, len(hid_s) - 1)
                have = (hid_s[pos] == ids) & (hv_s[pos] >= vers)
                ids, vers = ids[~have], vers[~have]
            per_row = ts.spec.row_bytes + ROW_OVERHEAD_BYTES
            fit = len(ids) if budget >= len(ids) * per_row else max(0, budget // per_row)
            if fit < len(ids):
                c = int(counters_of(vers[fit]))
                cut_below = c if cut_below is None else min(cut_below, c)
                ids = ids[:fit]
            budget -= fit * per_row
            delta = None
            if len(ids):
                d = ts.take(m.spec.name, ids)
                delta = delta_to_wire(d)
                if d.values is None:
                    extra += len(d) * ts.spec.row_bytes
            # Our waiting chain intervals travel too: a link the requester missed (a lost
            # push, a restart) is then learnt here, and its knowledge can pass the gap.
            pend = sync.pending_to_wire() if sync is not None and sync.pending else None
            if delta is None and cut_below is None and mine == theirs and pend is None:
                continue
            entry = [s, mine.to_wire(), cut_below, delta]
            if pend is not None:
                entry.append(pend)
            out_models.setdefault(m.spec.name, {}).setdefault(table, []).append(entry)
        if out_models:
            self.host.counters["pull_responses_sent"] += 1
            self.host.send(Outgoing(sender, mem.address, MsgType.PULL_RESPONSE,
                                      {"from": self.host.node_id, "models": out_models}, extra))
        for name, tables in list(reverse.items()):
            for table, ss in list(tables.items()):
                left = self.unsettled(self.host.models[name], table, np.asarray(ss, np.int64), now)
                if len(left):
                    tables[table] = left.tolist()
                else:
                    del tables[table]
            if not tables:
                del reverse[name]
        if reverse:
            self.send_pull_request(sender, reverse, back=False)

    def on_pull_response(self, body: dict[str, Any], now: float) -> None:
        sender = field(body, "from", str)
        models = field(body, "models", dict)
        parsed: list[tuple[ModelState, str, int, Knowledge, int | None, Delta | None, list[list[int]]]] = []
        for m, table, spec, entries in self._known_tables(models):
            for e in entries:
                if not isinstance(e, list) or len(e) not in (4, 5):
                    raise ProtocolError("bad pull response entry", "bad_body")
                s, kw, cut, dw = e[:4]
                pend = parse_pending(e[4]) if len(e) == 5 else []
                if not isinstance(s, int) or not 0 <= s < spec.num_shards:
                    raise ProtocolError("shard out of range", "bad_body")
                if cut is not None and (not isinstance(cut, int) or not 0 <= cut <= MAX_COUNTER):
                    raise ProtocolError("bad cut", "bad_body")
                k = Knowledge.from_wire(kw)
                d = None
                if dw is not None:
                    d = delta_from_wire(dw, self.host.table_spec, values_required=self.host.with_values)
                    if d.model != m.spec.name or d.table != table or (len(d) and (spec.shards_of(d.ids) != s).any()):
                        raise ProtocolError("pull response rows outside their shard", "bad_body")
                held = m.held(table)
                if held is not None and not held[s]:
                    continue   # dropped (handed over) while the answer travelled
                parsed.append((m, table, s, k, cut, d, pend))
        # Knowledge claims count too: adopting a future counter would skip every update below it.
        self.host.refuse_future([p[5] for p in parsed if p[5] is not None], now, "pull response",
                           known=max([c for p in parsed for _, c in p[3].items()]
                                     + [u for p in parsed for _, _, u in p[6]], default=0))
        repair = body.get("rep") is True
        for m, table, s, k, cut, d, pend in parsed:
            if d is not None:
                if self.rollback.fence and len(d):
                    # Rows the peer still holds at versions a rollback fenced here: we drop
                    # them, so its knowledge must not become ours past them -- the value the
                    # cut keeps for those rows is still to come (once the peer has rolled
                    # back too).  Otherwise the rows stay empty here under full knowledge.
                    fenced = self.rollback.fence.mask(m.spec.name, table, d.ids, d.versions)
                    if fenced.any():
                        first = int(counters_of(d.versions[fenced]).min())
                        cut = first if cut is None else min(cut, first)
                        pend = []
                        self.host.counters["pull_fenced_rows"] += int(fenced.sum())
                res = self.host.apply_delta(m, d, now, source="pull")
                if repair and len(res) and self.host.config.push:
                    # A value a rollback's repair brought: peers may hold our knowledge
                    # without it (they adopted it while we held the row empty), and will
                    # not pull it -- pass it on as an eager push does.
                    self.host.counters["repaired_rows_pushed"] += len(res)
                    self.push.push_from_ingest(m, table, res, now)
            sync = m.shard(table, s)
            if self.rollback.baseline_pin:
                k = self.rollback.baseline_clamp(m.spec.name, table, s, k)
                pend = []   # a pinned baseline adopts nothing beyond its cut
            if sync.learn(k, cut, pend):
                m.dirty[table].add(s)
            if sync.pending:
                self.gaps.note_waiting(m, table, s, now)
        if body.get("rep") is True:
            self.rollback.repair.on_answer(sender)
        self.host.counters["pull_responses_received"] += 1
