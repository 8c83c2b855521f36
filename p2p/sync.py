"""State-based anti-entropy for one shard: knowledge, recent-row index, chains.

Per shard a replica keeps

* ``knowledge`` -- the version vector (:class:`ekko.version.Knowledge`); its
  64-bit digest is the *shard version* peers compare to skip equal shards;
* a **recent-row index** -- the ids of rows applied since the *watermark*
  (a counter below which the index forgets), so finding "rows newer than a
  peer's knowledge" costs O(hot rows); when the peer is behind the watermark
  the shard's version array is scanned instead (vectorized);
* **pending chains** -- publish frames whose predecessor (per shard and
  origin) has not arrived yet; knowledge jumps over them once it has.

The pull rules are Scuttlebutt's: the responder sends the rows the requester's
knowledge does not cover, in version order, capped in bytes; the requester
advances its knowledge to the responder's -- but when the answer was cut short,
only to just below the first row it did not get.  Rows the requester already
holds above its knowledge (eagerly pushed ones) are listed in the request and
skipped by the responder, so a pushed row crosses each link once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ekko.store import TableStore
from ekko.version import ORIGIN_BITS, Knowledge, counters_of

#: most pending publish chains kept per shard and origin (older ones are dropped;
#: anti-entropy still delivers their rows, only the knowledge shortcut is lost).
MAX_PENDING_CHAINS = 256
#: bytes a row reference costs on the wire besides its value (id + version).
ROW_OVERHEAD_BYTES = 16


@dataclass(slots=True)
class ShardSync:
    """Protocol state of one shard of one table on one replica.

    Example:
        >>> s = ShardSync()
        >>> s.chain(origin=3, after=0, upto=10)
        True
        >>> s.chain(origin=3, after=20, upto=30), s.knowledge[3]
        (False, 10)
        >>> s.chain(origin=3, after=10, upto=20), s.knowledge[3]
        (True, 30)
    """

    knowledge: Knowledge = field(default_factory=Knowledge)
    watermark: int = 0
    loose_below_watermark: bool = False
    _ids: list[np.ndarray] = field(default_factory=list)
    _ctrs: list[np.ndarray] = field(default_factory=list)
    _times: list[float] = field(default_factory=list)
    _n: int = 0
    pending: dict[int, list[tuple[int, int]]] = field(default_factory=dict)

    # -- recent-row index --------------------------------------------------------------------
    def note_applied(self, ids: np.ndarray, versions: np.ndarray, limit: int, now: float = 0.0) -> None:
        """Record rows that took a new version (from :class:`ekko.store.ApplyResult`)."""
        if len(ids) == 0:
            return
        self._ids.append(ids)
        self._ctrs.append(counters_of(versions))
        self._times.append(now)
        self._n += len(ids)
        if self._n > limit:
            self._compact(limit)

    def _compact(self, limit: int) -> None:
        ids = np.concatenate(self._ids)
        ctrs = np.concatenate(self._ctrs)
        # Keep each row's latest entry only (stable sort keeps order among equals).
        order = np.lexsort((ctrs, ids))
        ids, ctrs = ids[order], ctrs[order]
        last = np.ones(len(ids), bool)
        last[:-1] = ids[1:] != ids[:-1]
        ids, ctrs = ids[last], ctrs[last]
        if len(ids) > limit // 2:
            # Raise the watermark so the index keeps the newest half.
            w = int(np.partition(ctrs, len(ctrs) - limit // 2)[len(ctrs) - limit // 2]) - 1
            keep = ctrs > w
            self.watermark = max(self.watermark, w)
            ids, ctrs = ids[keep], ctrs[keep]
            # Rows below the watermark that our own knowledge does not cover are
            # only findable by a scan from now on.
            self.loose_below_watermark = True
        self._ids, self._ctrs, self._n = [ids], [ctrs], len(ids)
        self._times = [self._times[-1] if self._times else 0.0]

    def reset_index(self) -> None:
        """Forget the index (after a rollback); lookups fall back to scans."""
        self._ids, self._ctrs, self._times, self._n = [], [], [], 0
        self.loose_below_watermark = True

    def candidates(self) -> np.ndarray:
        if not self._ids:
            return np.zeros(0, np.int64)
        if len(self._ids) > 1:
            return np.concatenate(self._ids)
        return self._ids[0]

    def fresh_since(self, t: float) -> np.ndarray:
        """Ids of rows applied at or after time ``t`` (possibly with repeats)."""
        parts = [ids for ids, at in zip(self._ids, self._times) if at >= t]
        if not parts:
            return np.zeros(0, np.int64)
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def _needs_scan(self, theirs: Knowledge) -> bool:
        if self.watermark == 0:
            return False
        if self.loose_below_watermark:
            return True
        # Rows below the watermark are all covered by our own knowledge (else we
        # would be loose); the peer lacks some of them only if it is behind us there.
        return any(theirs[o] < min(c, self.watermark) for o, c in self.knowledge.items())

    def newer_than(self, table: TableStore, shard: int, theirs: Knowledge) -> tuple[np.ndarray, np.ndarray]:
        """Rows of this shard that ``theirs`` does not cover: (ids, versions), version order."""
        if self._needs_scan(theirs):
            return table.scan_newer(shard, theirs)
        cand = self.candidates()
        if len(cand) == 0:
            return cand, cand
        cand = np.unique(cand)
        v = table.versions[cand]
        mask = v > 0
        if len(theirs):
            mask &= ~theirs.covers(v)
        ids, vers = cand[mask], v[mask]
        order = np.argsort(vers, kind="stable")
        return ids[order], vers[order]

    def held_above_knowledge(self, table: TableStore, shard: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows we hold that our own knowledge does not cover (e.g. eagerly pushed)."""
        return self.newer_than(table, shard, self.knowledge)

    # -- publish chains ----------------------------------------------------------------------
    def chain(self, origin: int, after: int, upto: int) -> bool:
        """A publish frame of ``origin`` covering counters ``(after, upto]`` of this shard
        arrived.  Knowledge jumps to ``upto`` if it already reaches ``after``; otherwise
        the chain waits.  Returns True when knowledge moved."""
        if after < 0:
            return False  # unchained frame: its rows are applied but prove nothing
        if self.knowledge[origin] >= after:
            moved = self.knowledge.advance(origin, upto)
            return self._resolve(origin) or moved
        waiting = self.pending.setdefault(origin, [])
        waiting.append((after, upto))
        if len(waiting) > MAX_PENDING_CHAINS:
            waiting.sort()
            del waiting[0]
        return False

    def _resolve(self, origin: int) -> bool:
        waiting = self.pending.get(origin)
        if not waiting:
            return False
        moved = False
        progress = True
        while progress and waiting:
            progress = False
            k = self.knowledge[origin]
            for i, (after, upto) in enumerate(waiting):
                if upto <= k:
                    waiting.pop(i)
                    progress = True
                    break
                if after <= k:
                    self.knowledge.advance(origin, upto)
                    waiting.pop(i)
                    progress = moved = True
                    break
        if not waiting:
            del self.pending[origin]
        return moved

    def learn(self, theirs: Knowledge, cut_below: int | None) -> bool:
        """Advance knowledge after a pull answer from a peer whose knowledge is ``theirs``.

        ``cut_below`` is None when the answer was complete, else the counter of the
        first row that did not fit: knowledge then advances at most to just below it.
        """
        if cut_below is None:
            moved = self.knowledge.merge(theirs)
        else:
            moved = False
            for o, c in theirs.items():
                moved |= self.knowledge.advance(o, min(c, cut_below - 1))
        if moved and self.pending:
            for o in list(self.pending):
                self._resolve(o)
        return moved


def version_counter(v: int) -> int:
    return int(v) >> ORIGIN_BITS
