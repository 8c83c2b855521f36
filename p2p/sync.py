"""State-based anti-entropy: per-shard knowledge and chains, per-table recent rows.

Per shard a replica keeps

* ``knowledge`` -- the version vector (:class:`ekko.core.version.Knowledge`); its
  64-bit digest is the *shard version* peers compare to skip equal shards;
* **pending chains** -- publish frames whose predecessor (per shard and
  origin) has not arrived yet; knowledge jumps over them once it has;

and per table a **recent-row index** (:class:`RecentIndex`) -- the ids of rows
applied since the *watermark* (a counter below which the index forgets), so
finding "rows newer than a peer's knowledge" costs O(hot rows); when the peer
is behind the watermark the shard's version array is scanned instead
(vectorized).  The index is per table so that an apply appends one chunk
instead of splitting by shard.

Knowledge advances when a replica has every update it claims: at the ingest from the
publisher's chains, elsewhere from pull answers, and from pushes that carry a chain's
*links* -- ``(shard, origin, after, upto)`` of a publish whose rows for that shard the
push carries in full (:attr:`p2p.outbound.QueuedRows.links`).  A push with only part
of a publish's rows (the scheduler's high-priority share, a split or coalesced
batch) carries no links and advances nothing, as docs/design.md requires of eagerly
pushed rows.  With links, replicas that received every push hold the ingest's
knowledge, so their shard versions match and anti-entropy rounds end at the
digest.

The pull rules are Scuttlebutt's: the responder sends the rows the requester's
knowledge does not cover, in version order, capped in bytes; the requester
advances its knowledge to the responder's -- but when the answer was cut short,
only to just below the first row it did not get.  Rows the requester already
holds above its knowledge (eagerly pushed ones) are listed in the request and
skipped by the responder, so a pushed row crosses each link once.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import numpy as np

from ekko.core.errors import ProtocolError
from ekko.core.store import TableStore
from ekko.core.version import MAX_COUNTER, MAX_ORIGIN, ORIGIN_BITS, Knowledge, counters_of, origins_of

#: most waiting chain intervals kept per shard and origin.  Adjacent intervals merge,
#: so a replica holds one per gap in what it received, not one per frame; past the cap
#: the highest goes (a gap probe or a peer's answer brings that knowledge back).
MAX_PENDING_CHAINS = 1024
#: most waiting intervals one shard's entry of a pull answer may carry (all origins).
MAX_PENDING_WIRE = 4 * MAX_PENDING_CHAINS
#: bytes a row reference costs on the wire besides its value (id + version).
ROW_OVERHEAD_BYTES = 16
#: a lookup scans the shards' rows instead of the index once the rows applied since
#: the last compaction reach 1/this of the table (measured on a 20,000-row table with
#: 16 shards and ~20,000 indexed rows: 16-shard lookup 203 us via the index, plus
#: 674 us to merge 10 applies into it, against ~100 us for the scan).
SCAN_INSTEAD_RATIO = 4
#: tables of at most this many rows get a dense recent-row index (a flag and a time per
#: row, 9 bytes a row): the sparse one (24 bytes an entry) would name every row of them
#: before its watermark rose (``NodeConfig.index_rows`` is 65,536 by default).
DENSE_INDEX_MAX_ROWS = 1 << 16
_NO_IDS = np.zeros(0, np.int64)
_NO_TIMES = np.zeros(0, np.float64)
_NO_IDS.flags.writeable = False
_NO_TIMES.flags.writeable = False


class RecentIndex:
    """Rows of one table applied recently, with a watermark below which it forgets.

    Appending is O(1) per apply (one chunk); a lookup merges pending chunks into
    one id-sorted array once and then answers per-shard range queries with a
    binary search, so anti-entropy costs O(hot rows of the shard).  The array holds
    each row once (its highest counter and latest apply time): a merge updates the
    rows already there in place and inserts only new ones, so it costs O(chunk) plus
    a copy when new rows arrive, not a re-sort of the index.  ``len()`` still counts
    every applied row since the last compaction (that count paces the watermark).

    Once compacted (or reset), every lookup of a shard scans it (:meth:`needs_scan`), so
    the sorted entries serve only :meth:`fresh_since`, which looks back ``push_grace``
    seconds.  From then on the sparse index is a *log*: applies append chunks, and past
    ``limit`` rows the oldest chunks are dropped, never merged (the merge and compaction
    were 10% of a receiving daemon's busy time under a steady stream, issue #15);
    :meth:`fresh_since` sorts the chunks newer than its time once per time asked.

    A table of at most :data:`DENSE_INDEX_MAX_ROWS` rows (``RecentIndex(rows)``) is
    indexed *densely* instead: per row a flag (applied with a counter above 0) and an
    apply time, written in place by each apply, never merged or compacted.  The sparse form would grow to name every row
    of such a table anyway, and merging tens of thousands of entries every few seconds
    at every replica dominated 10,000-replica simulations.

    Example:
        >>> for ix in (RecentIndex(), RecentIndex(rows=16)):
        ...     ix.note_applied(np.array([5, 1, 9]), np.array([3 << 16, 4 << 16, 5 << 16]), now=1.0, limit=100)
        ...     print(ix.candidates(0, 6).tolist(), ix.fresh_since(0.5, 0, 10).tolist())
        [1, 5] [1, 5, 9]
        [1, 5] [1, 5, 9]
    """

    __slots__ = ("_chunks", "_ctrs", "_dense_rows", "_hit", "_ids", "_n", "_recent", "_times",
                 "loose_below_watermark", "rows_examined", "rows_walked", "watermark")

    def __init__(self, rows: int | None = None) -> None:
        self.watermark = 0
        self.loose_below_watermark = False
        self._chunks: list[tuple[np.ndarray, np.ndarray, float]] = []
        self._n = 0
        # The log form's answer cache: (time asked, sorted distinct ids applied since).
        self._recent: tuple[float, np.ndarray] | None = None
        # Dense: _hit/_times are per row (False / -inf = not applied since the last reset;
        # _hit: applied with a counter above 0 -- the only use the dense form has for the
        # counter, and a flag is 1 byte a row instead of 8, all of them written per apply);
        # sparse: _ids/_ctrs/_times are one id-sorted entry per indexed row.
        self._dense_rows = rows if rows is not None and rows <= DENSE_INDEX_MAX_ROWS else 0
        self._hit = np.zeros(self._dense_rows, bool)
        if self._dense_rows:
            self._ids = np.zeros(0, np.int64)
            self._ctrs = np.zeros(0, np.int64)
            self._times = np.full(self._dense_rows, -np.inf)
        else:
            self._ids = np.zeros(0, np.int64)
            self._ctrs = np.zeros(0, np.int64)
            self._times = np.zeros(0, np.float64)
        # Work done by lookups, for the caller's cost accounting (cumulative): candidate
        # rows taken from the index and compared, and rows compared by whole-shard scans
        # (the fallback below the watermark).  A reset does not clear them.
        self.rows_examined = getattr(self, "rows_examined", 0)
        self.rows_walked = getattr(self, "rows_walked", 0)

    def __len__(self) -> int:
        return self._n

    def note_applied(self, ids: np.ndarray, versions: np.ndarray, now: float, limit: int) -> None:
        """Record rows that took a new version (from :class:`ekko.core.store.ApplyResult`)."""
        if len(ids) == 0:
            return
        self._n += len(ids)
        if self._dense_rows:
            versions = np.asarray(versions)
            if int(versions.min()) >> ORIGIN_BITS > 0:   # every counter above 0 (the rule)
                self._hit[ids] = True
            else:
                self._hit[ids[counters_of(versions) > 0]] = True
            self._times[ids] = now
            return
        self._chunks.append((ids, versions, now))
        self._recent = None
        if self._n > limit:
            if self.loose_below_watermark:
                self._trim_log(limit)
            else:
                self._merge()
                self._compact(limit)

    def _trim_log(self, limit: int) -> None:
        """The log form past ``limit`` rows: keep the newest chunks (about half), drop the
        rest, and drop the sorted entries (older than every chunk).  Only
        :meth:`fresh_since` reads what is dropped, and it is an optimization: rows it no
        longer names are sent again across the WAN, never withheld."""
        keep: list[tuple[np.ndarray, np.ndarray, float]] = []
        total = 0
        for c in reversed(self._chunks):
            if keep and total + len(c[0]) > limit // 2:
                break
            keep.append(c)
            total += len(c[0])
        keep.reverse()
        self._chunks, self._n = keep, total
        self._ids, self._ctrs, self._times = _NO_IDS, _NO_IDS, _NO_TIMES

    def _merge(self) -> None:
        if not self._chunks:
            return
        chunks, self._chunks = self._chunks, []
        if len(chunks) == 1:
            ids, ctrs, times = chunks[0][0], counters_of(chunks[0][1]), np.full(len(chunks[0][0]), chunks[0][2])
        else:
            ids = np.concatenate([c[0] for c in chunks])
            ctrs = np.concatenate([counters_of(c[1]) for c in chunks])
            times = np.concatenate([np.full(len(c[0]), c[2]) for c in chunks])
        # One entry per row: its highest counter and its latest apply time.
        order = np.argsort(ids, kind="stable")
        ids, ctrs, times = ids[order], ctrs[order], times[order]
        if len(ids) > 1:
            first = np.ones(len(ids), bool)
            first[1:] = ids[1:] != ids[:-1]
            if not first.all():
                starts = np.flatnonzero(first)
                ids = ids[starts]
                ctrs = np.maximum.reduceat(ctrs, starts)
                times = np.maximum.reduceat(times, starts)
        n = len(self._ids)
        if n == 0:
            self._ids, self._ctrs, self._times = ids, ctrs, times
            return
        pos = np.searchsorted(self._ids, ids)
        there = self._ids[np.minimum(pos, n - 1)] == ids
        if there.any():
            at = pos[there]
            self._ctrs[at] = np.maximum(self._ctrs[at], ctrs[there])
            self._times[at] = np.maximum(self._times[at], times[there])
        if there.all():
            return
        new = ~there
        ids, ctrs, times = ids[new], ctrs[new], times[new]
        # Insert the new rows in one linear pass (positions shift by those inserted before).
        k = len(ids)
        at = pos[new] + np.arange(k)
        keep = np.ones(n + k, bool)
        keep[at] = False
        out = []
        for base, add in ((self._ids, ids), (self._ctrs, ctrs), (self._times, times)):
            merged = np.empty(n + k, base.dtype)
            merged[at] = add
            merged[keep] = base
            out.append(merged)
        self._ids, self._ctrs, self._times = out

    def _compact(self, limit: int) -> None:
        ids, ctrs, times = self._ids, self._ctrs, self._times  # one entry per row (see _merge)
        keep_n = limit // 2
        if len(ids) > keep_n:
            # Raise the watermark so the index keeps the newest half; rows below it
            # are found by a shard scan from now on.
            w = int(np.partition(ctrs, len(ctrs) - keep_n)[len(ctrs) - keep_n]) - 1
            keep = ctrs > w
            self.watermark = max(self.watermark, w)
            self.loose_below_watermark = True
            ids, ctrs, times = ids[keep], ctrs[keep], times[keep]
        self._ids, self._ctrs, self._times, self._n = ids, ctrs, times, len(ids)

    def reset(self) -> None:
        """Forget everything (after a rollback); lookups fall back to scans."""
        self.__init__(self._dense_rows or None)  # type: ignore[misc]
        self.watermark = 1
        self.loose_below_watermark = True

    def _range(self, lo: int, hi: int) -> slice:
        self._merge()
        a, b = np.searchsorted(self._ids, [lo, hi])
        return slice(int(a), int(b))

    def candidates(self, lo: int, hi: int) -> np.ndarray:
        """Distinct row ids in ``[lo, hi)`` applied since the watermark, sorted."""
        if self._dense_rows:
            return np.flatnonzero(self._hit[lo:hi]) + lo
        r = self._range(lo, hi)  # merges pending chunks: read self._ids only after it
        return self._ids[r]

    def fresh_since(self, t: float, lo: int, hi: int) -> np.ndarray:
        """Ids in ``[lo, hi)`` applied at or after time ``t``, sorted and distinct."""
        if self._dense_rows:
            return np.flatnonzero(self._times[lo:hi] >= t) + lo
        if self.loose_below_watermark:
            # The log form: sort what was applied since t once for every shard asked.
            if self._recent is None or self._recent[0] != t:
                parts = [c[0] for c in self._chunks if c[2] >= t]
                if len(self._ids):
                    parts.append(self._ids[self._times >= t])
                recent = np.sort(np.concatenate(parts)) if parts else _NO_IDS
                if len(recent) > 1:   # distinct, like the other forms (np.unique took 15x a sort here)
                    recent = recent[np.r_[True, recent[1:] != recent[:-1]]]
                self._recent = (t, recent)
            recent = self._recent[1]
            a, b = np.searchsorted(recent, [lo, hi])
            return recent[a:b]
        r = self._range(lo, hi)
        return self._ids[r][self._times[r] >= t]

    def needs_scan(self, theirs: Knowledge, mine: Knowledge) -> bool:
        if self.watermark == 0:
            return False
        if self.loose_below_watermark:
            return True
        return any(theirs[o] < min(c, self.watermark) for o, c in mine.items())

    def newer_than(self, table: TableStore, shard: int, theirs: Knowledge, mine: Knowledge
                   ) -> tuple[np.ndarray, np.ndarray]:
        """Rows of ``shard`` that ``theirs`` does not cover: (ids, versions), version order."""
        lo, hi = table.spec.shard_range(shard)
        if self.needs_scan(theirs, mine):
            self.rows_walked += hi - lo
            return table.scan_newer(shard, theirs)
        cand = self.candidates(lo, hi)
        self.rows_examined += len(cand)
        if len(cand) == 0:
            return cand, cand
        v = table.versions[cand]
        mask = v > 0
        if len(theirs):
            mask &= ~theirs.covers(v)
        ids, vers = cand[mask], v[mask]
        order = np.argsort(vers, kind="stable")
        return ids[order], vers[order]

    def newer_than_many(self, table: TableStore, shards: list[int], theirs: list[Knowledge],
                        mine: list[Knowledge]) -> list[tuple[np.ndarray, np.ndarray]]:
        """:meth:`newer_than` for several shards of one table at once: the same answers
        (per shard, version order), from one pass over the index instead of a dozen
        small array operations per shard -- a pull touches every shard in scope."""
        out: list[tuple[np.ndarray, np.ndarray]] = [None] * len(shards)  # type: ignore[list-item]
        fast: list[int] = []
        for i, s in enumerate(shards):
            if self.needs_scan(theirs[i], mine[i]):
                lo, hi = table.spec.shard_range(s)
                self.rows_walked += hi - lo
                out[i] = table.scan_newer(s, theirs[i])
            else:
                fast.append(i)
        if len(fast) < 2:
            for i in fast:
                out[i] = self.newer_than(table, shards[i], theirs[i], mine[i])
            return out
        spec = table.spec
        bounds = np.array([spec.shard_range(shards[i]) for i in fast], np.int64)
        v = None
        if self._dense_rows or self._n * SCAN_INSTEAD_RATIO >= spec.rows:
            # The index names much of the table (a small or uniformly hot table): one
            # vectorized pass over the shards' rows is cheaper than merging and slicing
            # the index, and gives the same answer (rows below the watermark are covered
            # by ``theirs``, or needs_scan would have sent that shard to a scan).
            counts = bounds[:, 1] - bounds[:, 0]
            if (bounds[1:, 0] == bounds[:-1, 1]).all():  # adjacent shards (a whole-table scope)
                lo, hi = int(bounds[0, 0]), int(bounds[-1, 1])
                ids, v = np.arange(lo, hi, dtype=np.int64), table.versions[lo:hi]
            else:
                ids = np.concatenate([np.arange(lo, hi, dtype=np.int64) for lo, hi in bounds.tolist()])
            # Counted as the index candidates it stands for (the rows applied since the
            # reset, or at most the rows noted since the last compaction), not as a walk:
            # a replica whose table has a large cold part keeps the index path, and the
            # simulator's CPU model scales walks only.
            self.rows_examined += (int(np.count_nonzero(self._hit[ids])) if self._dense_rows
                                   else min(int(counts.sum()), self._n))
        else:
            self._merge()
            # Shards are contiguous row ranges and the index is sorted by id: one binary
            # search finds every shard's slice.
            cuts = np.searchsorted(self._ids, bounds.ravel()).reshape(-1, 2)
            counts = cuts[:, 1] - cuts[:, 0]
            ids = np.concatenate([self._ids[a:b] for a, b in cuts.tolist()])
            self.rows_examined += int(counts.sum())
        if not counts.any():
            empty = self._ids[:0]
            for i in fast:
                out[i] = (empty, empty)
            return out
        slot = np.repeat(np.arange(len(fast)), counts)
        if v is None:
            v = table.versions[ids]
        keep = v > 0
        origins = sorted({o for i in fast for o, _ in theirs[i].items()})
        if origins:
            # Each row against its own shard's knowledge: a (shard, origin) counter table,
            # -1 where that knowledge has no entry for the origin (covers nothing).
            known_o = np.array(origins, np.int64)
            table_k = np.full((len(fast), len(origins)), -1, np.int64)
            col_of = {o: c for c, o in enumerate(origins)}
            for j, i in enumerate(fast):
                for o, c in theirs[i].items():
                    table_k[j, col_of[o]] = c
            o = origins_of(v)
            if len(origins) == 1:  # one publisher (the common case): no column lookup
                keep &= ~((o == origins[0]) & (counters_of(v) <= table_k[slot, 0]))
            else:
                col = np.minimum(np.searchsorted(known_o, o), len(origins) - 1)
                keep &= ~((known_o[col] == o) & (counters_of(v) <= table_k[slot, col]))
        ids, v, slot = ids[keep], v[keep], slot[keep]
        order = np.lexsort((v, slot))  # by shard, then version; ties keep id order
        ids, v, slot = ids[order], v[order], slot[order]
        at = np.searchsorted(slot, np.arange(len(fast) + 1)).tolist()
        for j, i in enumerate(fast):
            out[i] = (ids[at[j]:at[j + 1]], v[at[j]:at[j + 1]])
        return out


@dataclass(slots=True)
class ShardSync:
    """Knowledge and waiting publish chains of one shard on one replica.

    ``pending`` keeps, per origin, the publish frames that arrived before their
    predecessor did, as sorted, disjoint intervals ``[after, upto]``: each says
    "every update of that origin to this shard with a counter in ``(after, upto]``
    is here".  Two such intervals that touch or overlap say the same of their
    union, so they are kept merged: a replica that missed one frame holds one
    interval per *gap*, not one per frame that arrived after it.  Intervals are
    what peers exchange in pull answers (:meth:`learn`), so a link one replica
    missed (a lost push, a restart) is learnt from any peer that holds it.

    Example:
        >>> s = ShardSync()
        >>> s.chain(origin=3, after=0, upto=10)
        True
        >>> s.chain(origin=3, after=20, upto=30), s.chain(origin=3, after=30, upto=40), s.knowledge[3]
        (False, False, 10)
        >>> s.pending[3]
        [[20, 40]]
        >>> s.chain(origin=3, after=10, upto=20), s.knowledge[3], s.pending
        (True, 40, {})
    """

    knowledge: Knowledge = field(default_factory=Knowledge)
    pending: dict[int, list[list[int]]] = field(default_factory=dict)
    #: intervals dropped at the :data:`MAX_PENDING_CHAINS` cap (counted, never silent).
    dropped: int = 0
    #: per origin, the greatest ``upto`` of a dropped interval: knowledge below it is a
    #: gap to probe even when nothing waits any more (None until something is dropped).
    dropped_top: dict[int, int] | None = None

    # -- publish chains ----------------------------------------------------------------------
    def chain(self, origin: int, after: int, upto: int) -> bool:
        """A publish frame of ``origin`` covering counters ``(after, upto]`` of this shard
        arrived.  Knowledge jumps to ``upto`` if it already reaches ``after``; otherwise
        the interval waits.  Returns True when knowledge moved."""
        if after < 0 or upto <= after:
            return False  # unchained frame: its rows are applied but prove nothing
        k = self.knowledge[origin]
        if upto <= k:
            return False
        if k >= after:
            self.knowledge.advance(origin, upto)
            self._resolve(origin)
            return True
        self._wait(origin, after, upto)
        return False

    def _wait(self, origin: int, after: int, upto: int) -> None:
        """Insert ``(after, upto]`` into the origin's sorted, disjoint intervals, merging
        every interval it touches."""
        waiting = self.pending.get(origin)
        if waiting is None:
            self.pending[origin] = [[after, upto]]
            return
        i = bisect.bisect_left(waiting, [after, upto])
        # Merge with the interval before when it reaches ``after``.
        if i > 0 and waiting[i - 1][1] >= after:
            i -= 1
            after = waiting[i][0]
            upto = max(upto, waiting[i][1])
        j = i
        while j < len(waiting) and waiting[j][0] <= upto:
            upto = max(upto, waiting[j][1])
            j += 1
        waiting[i:j] = [[after, upto]]
        if len(waiting) > MAX_PENDING_CHAINS:
            # The highest interval goes: it is the last to become useful.  Its end stays
            # as a gap to probe (p2p.gaps), so knowledge still reaches it.
            top = waiting.pop()[1]
            self.dropped += 1
            if self.dropped_top is None:
                self.dropped_top = {}
            self.dropped_top[origin] = max(self.dropped_top.get(origin, 0), top)

    def _resolve(self, origin: int) -> bool:
        waiting = self.pending.get(origin)
        if not waiting:
            return False
        k = self.knowledge[origin]
        n = 0
        while n < len(waiting) and waiting[n][0] <= k:
            k = max(k, waiting[n][1])
            n += 1
        if n:
            del waiting[:n]
        if not waiting:
            del self.pending[origin]
        return self.knowledge.advance(origin, k)

    def gap(self, origin: int) -> tuple[int, int] | None:
        """``(lo, hi)``: the counters ``(lo, hi]`` of ``origin`` this shard is missing
        before its first waiting interval (or up to a dropped one's end when nothing
        waits), or None when there is no gap."""
        k = self.knowledge[origin]
        waiting = self.pending.get(origin)
        if waiting:
            return k, waiting[0][0]
        if self.dropped_top is not None:
            top = self.dropped_top.get(origin, 0)
            if top > k:
                return k, top
            self.dropped_top.pop(origin, None)
        return None

    def gap_origins(self) -> list[int]:
        """Origins that may have a gap here (waiting intervals, or dropped ones)."""
        if self.dropped_top:
            return sorted(set(self.pending) | set(self.dropped_top))
        return list(self.pending)

    def pending_to_wire(self) -> list[list[int]]:
        """``[[origin, after, upto], ...]`` (for pull answers and snapshots)."""
        return [[o, a, u] for o in sorted(self.pending) for a, u in self.pending[o]][:MAX_PENDING_WIRE]

    def learn(self, theirs: Knowledge, cut_below: int | None, pending: list[list[int]] = ()) -> bool:
        """Advance knowledge after a pull answer from a peer whose knowledge is ``theirs``
        and whose waiting intervals are ``pending`` (``[[origin, after, upto], ...]``).

        ``cut_below`` is None when the answer was complete, else the counter of the
        first row that did not fit: knowledge then advances at most to just below it,
        and only intervals that end below it are taken.  (The answer held every row
        the peer has that our knowledge does not cover, so whatever the peer's
        knowledge or intervals vouch for is now here too.)
        """
        if cut_below is None:
            moved = self.knowledge.merge(theirs)
        else:
            moved = False
            for o, c in theirs.items():
                moved |= self.knowledge.advance(o, min(c, cut_below - 1))
        for o, a, u in pending:
            if cut_below is not None and u >= cut_below:
                continue
            if u > self.knowledge[o]:
                self._wait(o, a, u)
        if self.pending:
            for o in list(self.pending):
                moved |= self._resolve(o)
        return moved


def parse_pending(raw: object) -> list[list[int]]:
    """Validate waiting intervals from the wire (``[[origin, after, upto], ...]``).

    Raises:
        ProtocolError: not a list of in-range int triples, or too many of them.

    Example:
        >>> parse_pending([[1, 5, 9]])
        [[1, 5, 9]]
    """
    if not isinstance(raw, list) or len(raw) > MAX_PENDING_WIRE:
        raise ProtocolError("bad pending chains", "bad_body")
    for e in raw:
        if not (isinstance(e, list) and len(e) == 3
                and all(isinstance(x, int) and not isinstance(x, bool) for x in e)
                and 0 < e[0] <= MAX_ORIGIN and 0 <= e[1] < e[2] <= MAX_COUNTER):
            raise ProtocolError(f"bad pending chain {e!r:.60}", "bad_body")
    return raw


def apply_links(shards: dict[int, ShardSync], links: list[list[int]], waiting: list[int] | None = None
                ) -> list[int]:
    """Chain publish links ``[shard, origin, after, upto]`` into a table's shard states
    (created on first use); returns the shards whose knowledge moved, and appends to
    ``waiting`` the shards left with waiting intervals.

    The common case -- the link right after what the shard knows, nothing pending --
    advances in place; anything else goes through :meth:`ShardSync.chain`.

    Example:
        >>> shards = {}
        >>> apply_links(shards, [[0, 1, 0, 10], [2, 1, 5, 9]]), shards[0].knowledge[1], shards[2].knowledge[1]
        ([0], 10, 0)
    """
    moved = []
    for s, origin, after, upto in links:
        sync = shards.get(s)
        if sync is None:
            sync = shards[s] = ShardSync()
        elif not sync.pending:
            # Knowledge.step inlined: a push carries one link per shard and reaches
            # every replica, so this loop runs (shards x replicas) times per publish.
            k = sync.knowledge
            v = k._v
            if v.get(origin, 0) == after:
                v[origin] = upto
                k._digest = None
                moved.append(s)
                continue
        if sync.chain(origin, after, upto):
            moved.append(s)
        if sync.pending and waiting is not None:
            waiting.append(s)
    return moved

