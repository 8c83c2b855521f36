"""Vectorized maps from 64-bit feature keys to the row slots of a hashed table.

Issue #18's hashed tables (``TableSpec(keys="int64")``) name rows by arbitrary int64
keys (feature ids) held in ``capacity`` slots.  Two maps, both open-addressing hash
tables (linear probing, at most half full) in numpy arrays whose lookups, inserts and
removals work on whole arrays of keys -- a loop over probe steps, never over rows:

* :class:`KeyIndex`, the publisher's: it *hands out* slots, from a free stack per region
  (a hashed table's shard: a key takes a slot of its shard's region), and ranks slots
  for eviction (:meth:`KeyIndex.touch`, :meth:`KeyIndex.victims`).  The slot a key gets
  travels with its row, so every replica holds a key in the same slot.
* :class:`KeyMap`, a replica's: it *follows* the slots the rows name
  (:meth:`KeyMap.rebind`, which :class:`ekko.core.store.TableStore` calls at a lookup for
  the rows written since the last one), so a read by key finds its slot.
"""

from __future__ import annotations

import numpy as np

from ekko.core.errors import UsageError
from ekko.core.hash64 import mix64

#: the two int64 values the table uses as markers; they cannot be keys.
EMPTY_KEY = np.iinfo(np.int64).min
DELETED_KEY = EMPTY_KEY + 1
#: most slots of one index (the hash table is twice as large, rounded up to a power of 2).
MAX_CAPACITY = 1 << 31
#: the hash table is rebuilt when removed-key markers exceed this share of its positions.
MAX_TOMBSTONE_SHARE = 0.25
#: eviction policies :meth:`KeyIndex.victims` ranks by.
EVICTION_POLICIES = ("lru", "lfu")


def _table_size(capacity: int) -> int:
    return max(8, 1 << (2 * capacity - 1).bit_length())


class KeyMap:
    """int64 keys -> slots ``[0, capacity)`` as a replica holds them: each slot holds at
    most one key, each key is in at most one slot; whole arrays at a time.

    Example:
        >>> import numpy as np
        >>> m = KeyMap(8)
        >>> versions = np.array([0, 5, 0, 7, 0, 0, 0, 0])
        >>> m.rebind(np.array([1, 3]), np.array([42, -9]), versions)
        >>> m.lookup(np.array([-9, 42, 5])).tolist()
        [3, 1, -1]
        >>> versions[1] = 9                       # slot 1 rewritten: key 42 evicted for 77
        >>> m.rebind(np.array([1]), np.array([77]), versions)
        >>> m.lookup(np.array([42, 77])).tolist(), m.keys_of(np.array([1, 3])).tolist()
        ([-1, 1], [77, -9])
    """

    def __init__(self, capacity: int) -> None:
        if not isinstance(capacity, (int, np.integer)) or not 1 <= capacity <= MAX_CAPACITY:
            raise UsageError(f"capacity must be 1..{MAX_CAPACITY}, not {capacity!r}")
        self.capacity = int(capacity)
        self._reset_table(_table_size(self.capacity))
        self._key_of = np.full(self.capacity, EMPTY_KEY, np.int64)   # slot -> key (EMPTY: none)
        self._pos_of = np.full(self.capacity, -1, np.int64)           # slot -> table position

    def _reset_table(self, size: int) -> None:
        self._keys = np.full(size, EMPTY_KEY, np.int64)   # position -> key
        self._slot = np.full(size, -1, np.int64)          # position -> slot
        self._mask = np.int64(size - 1)
        self.tombstones = 0

    def __len__(self) -> int:
        return int(np.count_nonzero(self._pos_of >= 0))

    def keys_of(self, slots: np.ndarray) -> np.ndarray:
        """The key held in each slot (:data:`EMPTY_KEY` for none)."""
        return self._key_of[np.asarray(slots, np.int64)]

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """The slot of each key, -1 where absent (int64, in the order of ``keys``)."""
        return self._slots_of(self._checked(keys))

    def _slots_of(self, keys: np.ndarray) -> np.ndarray:
        pos = self._find(keys)
        out = np.full(len(keys), -1, np.int64)
        hit = pos >= 0
        out[hit] = self._slot[pos[hit]]
        return out

    def rebind(self, slots: np.ndarray, keys: np.ndarray, versions: np.ndarray) -> None:
        """Slots ``slots`` (distinct) now hold ``keys`` (:data:`EMPTY_KEY`: none) at
        ``versions[slot]`` (the table's version array, already written).

        The key a slot held before leaves the map.  A key that another slot holds too (a
        stale copy, while an eviction and a re-insert travel) stays with the slot of the
        greater version, so the map names, for every key, its latest binding -- or none,
        when the latest event of that key was its eviction.
        """
        slots = np.asarray(slots, np.int64)
        keys = np.asarray(keys, np.int64)
        self._unbind(slots[self._pos_of[slots] >= 0])
        new = keys != EMPTY_KEY
        slots, keys = slots[new], keys[new]
        if not len(keys):
            return
        if int(keys.min()) <= DELETED_KEY:
            raise UsageError(f"keys {EMPTY_KEY} and {DELETED_KEY} are reserved")
        vers = versions[slots]
        # A key named twice in one call: the greatest version's slot (then the first).
        order = np.lexsort((-vers, keys))
        first = np.ones(len(keys), bool)
        first[1:] = keys[order][1:] != keys[order][:-1]
        pick = order[first]
        slots, keys, vers = slots[pick], keys[pick], vers[pick]
        other = self._slots_of(keys)
        held = other >= 0
        beaten = held & (versions[np.maximum(other, 0)] >= vers)
        self._unbind(other[held & ~beaten])
        keep = ~beaten
        self._place(keys[keep], slots[keep])
        self._key_of[slots[keep]] = keys[keep]

    def _unbind(self, slots: np.ndarray) -> None:
        """Drop the keys of ``slots`` (each in the map) from the table."""
        if not len(slots):
            return
        pos = self._pos_of[slots]
        self._keys[pos] = DELETED_KEY
        self._slot[pos] = -1
        self._key_of[slots] = EMPTY_KEY
        self._pos_of[slots] = -1
        self.tombstones += len(pos)
        if self.tombstones > MAX_TOMBSTONE_SHARE * len(self._keys):
            self._rebuild()

    # -- internals ------------------------------------------------------------------------
    @staticmethod
    def _checked(keys: np.ndarray) -> np.ndarray:
        keys = np.asarray(keys)
        if keys.ndim != 1 or not (np.issubdtype(keys.dtype, np.integer) or len(keys) == 0):
            raise UsageError("keys must be a 1-d array of integers")
        keys = keys.astype(np.int64, copy=False)
        if len(keys) and int(keys.min()) <= DELETED_KEY:
            raise UsageError(f"keys {EMPTY_KEY} and {DELETED_KEY} are reserved")
        return keys

    def _home(self, keys: np.ndarray) -> np.ndarray:
        return (mix64(keys.view(np.uint64)) & np.uint64(self._mask)).astype(np.int64)

    def _find(self, keys: np.ndarray) -> np.ndarray:
        """Table position of each key, -1 where absent: one probe step for all keys at a
        time, dropping those that hit their key or an empty position."""
        out = np.full(len(keys), -1, np.int64)
        pos = self._home(keys)
        live = np.arange(len(keys))
        while len(live):
            p = pos[live]
            at = self._keys[p]
            hit = at == keys[live]
            out[live[hit]] = p[hit]
            live = live[~hit & (at != EMPTY_KEY)]
            pos[live] = (pos[live] + 1) & self._mask
        return out

    def _place(self, keys: np.ndarray, slots: np.ndarray) -> None:
        """Put distinct keys known to be absent into the table: per probe step, the
        keys at a free position take it, one per position; the others move on."""
        pos = self._home(keys)
        live = np.arange(len(keys))
        while len(live):
            p = pos[live]
            at = self._keys[p]
            free = (at == EMPTY_KEY) | (at == DELETED_KEY)
            cand, cp = live[free], p[free]
            where, first = np.unique(cp, return_index=True)
            won = cand[first]
            self.tombstones -= int((self._keys[where] == DELETED_KEY).sum())
            self._keys[where] = keys[won]
            self._slot[where] = slots[won]
            self._pos_of[slots[won]] = where
            placed = np.zeros(len(keys), bool)
            placed[won] = True
            live = live[~placed[live]]
            pos[live] = (pos[live] + 1) & self._mask

    def _rebuild(self) -> None:
        """A fresh hash table of the held keys, same slots (drops the removed markers)."""
        held = np.flatnonzero(self._key_of != EMPTY_KEY)
        self._reset_table(len(self._keys))
        self._place(self._key_of[held], held)


class KeyIndex(KeyMap):
    """The publisher's key -> slot index: hands out slots, from a free stack per region.

    ``regions`` splits the slots into that many contiguous regions (a hashed table's
    shards: region ``r`` is :meth:`ekko.core.spec.TableSpec.shard_range` of shard ``r``);
    a new key takes a slot of the region :meth:`insert` is told.

    Example:
        >>> import numpy as np
        >>> ix = KeyIndex(4)
        >>> ix.insert(np.array([10**15, -7, 10**15])).tolist()   # a repeated key: one slot
        [0, 1, 0]
        >>> ix.lookup(np.array([-7, 3])).tolist()                # absent: -1
        [1, -1]
        >>> ix.remove(np.array([10**15])).tolist(), len(ix), ix.free_slots
        ([0], 1, 3)
        >>> ix.insert(np.array([5, 6, 7, 8]))
        Traceback (most recent call last):
        ...
        ekko.core.errors.UsageError: 4 new keys but 3 free slots (capacity 4): evict first
        >>> two = KeyIndex(4, regions=2)                           # slots 0-1 and 2-3
        >>> two.insert(np.array([5, 6, 7]), regions=np.array([1, 0, 1])).tolist()
        [2, 0, 3]
    """

    def __init__(self, capacity: int, regions: int = 1) -> None:
        super().__init__(capacity)
        if not isinstance(regions, (int, np.integer)) or not 1 <= regions <= self.capacity:
            raise UsageError(f"regions must be 1..capacity ({self.capacity}), not {regions!r}")
        self.regions = int(regions)
        self.region_slots = -(-self.capacity // self.regions)
        lo = np.minimum(np.arange(self.regions, dtype=np.int64) * self.region_slots, self.capacity)
        self._lo = lo
        self._size = np.minimum(lo + self.region_slots, self.capacity) - lo
        # Region r's free stack is _free[lo_r : lo_r + _nfree_r], its lowest slot on top.
        self._free = np.empty(self.capacity, np.int64)
        for r in range(self.regions):   # once, at construction: a loop over regions
            self._free[lo[r]:lo[r] + self._size[r]] = np.arange(lo[r] + self._size[r] - 1, lo[r] - 1, -1)
        self._nfree_r = self._size.copy()
        # Per region, LRU victims ranked ahead: [slots, their ticks then, next position].
        self._pools: dict[int, list] = {}
        #: per slot: the tick of its last :meth:`touch`, and how many touches it had.
        self.last_used = np.zeros(self.capacity, np.int64)
        self.uses = np.zeros(self.capacity, np.int64)

    def __len__(self) -> int:
        return self.capacity - self.free_slots

    @property
    def free_slots(self) -> int:
        return int(self._nfree_r.sum())

    def free_in(self, regions: np.ndarray) -> np.ndarray:
        """Free slots of each region named."""
        return self._nfree_r[np.asarray(regions, np.int64)]

    def region_of(self, slots: np.ndarray) -> np.ndarray:
        return np.asarray(slots, np.int64) // self.region_slots

    # -- writes ---------------------------------------------------------------------------
    def insert(self, keys: np.ndarray, regions: np.ndarray | None = None) -> np.ndarray:
        """The slot of each key, taking free slots for keys not held yet (a key repeated
        in ``keys`` gets one) from the region ``regions`` names for it (default: all in
        region 0).  Raises :class:`UsageError`, changing nothing, when a region's new
        keys outnumber its free slots."""
        keys = self._checked(keys)
        reg = np.zeros(len(keys), np.int64) if regions is None else np.asarray(regions, np.int64)
        if reg.shape != keys.shape or (len(reg) and (reg.min() < 0 or reg.max() >= self.regions)):
            raise UsageError(f"regions must name one of {self.regions} regions per key")
        slots = self._slots_of(keys)
        missing = slots < 0
        if missing.any():
            new, first, inverse = np.unique(keys[missing], return_index=True, return_inverse=True)
            new_reg = reg[missing][first]
            need = np.bincount(new_reg, minlength=self.regions)
            short = np.flatnonzero(need > self._nfree_r)
            if len(short):
                r = int(short[0])
                where = "" if self.regions == 1 else f" in region {r}"
                raise UsageError(f"{int(need[r])} new keys but {int(self._nfree_r[r])} free slots{where} "
                                 f"(capacity {self.capacity}): evict first")
            # Per region, slots off the top of its free stack, in the order the keys first appear.
            order = np.lexsort((first, new_reg))
            r_sorted = new_reg[order]
            starts = np.searchsorted(r_sorted, r_sorted, side="left")
            rank = np.arange(len(order)) - starts
            top = self._lo[r_sorted] + self._nfree_r[r_sorted] - 1
            taken = np.empty(len(new), np.int64)
            taken[order] = self._free[top - rank]
            self._nfree_r -= need
            self._place(new, taken)
            self._key_of[taken] = new
            self.last_used[taken] = 0
            self.uses[taken] = 0
            slots[missing] = taken[inverse]
        return slots

    def remove(self, keys: np.ndarray) -> np.ndarray:
        """Drop the keys held (others are ignored); returns the slots they freed."""
        keys = self._checked(keys)
        pos = self._find(np.unique(keys))
        slots = self._slot[pos[pos >= 0]]
        self.free(slots)
        return slots

    def free(self, slots: np.ndarray) -> None:
        """Drop the keys of ``slots`` (distinct, each holding a key) and free the slots."""
        slots = np.asarray(slots, np.int64)
        if not len(slots):
            return
        if (self._pos_of[slots] < 0).any():
            raise UsageError("free of a slot that holds no key")
        self._unbind(slots)
        reg = slots // self.region_slots
        order = np.argsort(reg, kind="stable")
        r_sorted = reg[order]
        rank = np.arange(len(order)) - np.searchsorted(r_sorted, r_sorted, side="left")
        self._free[self._lo[r_sorted] + self._nfree_r[r_sorted] + rank] = slots[order]
        self._nfree_r += np.bincount(reg, minlength=self.regions)

    def claim(self, keys: np.ndarray, slots: np.ndarray) -> None:
        """Put distinct keys, none held, into given free slots (a publisher resuming the
        assignment replicas hold); :class:`UsageError`, changing nothing, otherwise."""
        keys = self._checked(keys)
        slots = np.asarray(slots, np.int64)
        if slots.shape != keys.shape or (len(slots) and (slots.min() < 0 or slots.max() >= self.capacity)):
            raise UsageError("claim needs one slot within the index per key")
        if len(np.unique(keys)) != len(keys) or len(np.unique(slots)) != len(slots):
            raise UsageError("claim of a key or a slot twice")
        if (self._key_of[slots] != EMPTY_KEY).any() or (self._slots_of(keys) >= 0).any():
            raise UsageError("claim of a slot or a key already held")
        self._place(keys, slots)
        self._key_of[slots] = keys
        # The free stacks afresh: each region's free slots, its lowest on top.
        free = np.flatnonzero(self._key_of == EMPTY_KEY)
        reg = free // self.region_slots
        order = np.lexsort((-free, reg))
        r_sorted = reg[order]
        rank = np.arange(len(order)) - np.searchsorted(r_sorted, r_sorted, side="left")
        self._free[self._lo[r_sorted] + rank] = free[order]
        self._nfree_r = np.bincount(reg, minlength=self.regions)

    # -- eviction bookkeeping -------------------------------------------------------------
    def touch(self, slots: np.ndarray, tick: int) -> None:
        """Note a use of ``slots`` at logical time ``tick`` (a slot named twice counts twice)."""
        slots = np.asarray(slots, np.int64)
        if len(slots) and (slots.min() < 0 or slots.max() >= self.capacity):
            raise UsageError("touch of a slot outside the index")
        self.last_used[slots] = tick
        np.add.at(self.uses, slots, 1)

    def victims(self, n: int, policy: str, region: int | None = None,
                exclude: np.ndarray | None = None) -> np.ndarray:
        """Up to ``n`` held slots (of ``region``, or of all; never one of ``exclude``) to
        evict first: least recently used (``lru``), or least used, then least recently
        (``lfu``); ties by slot."""
        if policy not in EVICTION_POLICIES:
            raise UsageError(f"eviction policy must be one of {EVICTION_POLICIES}, not {policy!r}")
        skip = np.zeros(0, np.int64) if exclude is None else np.asarray(exclude, np.int64)
        if policy == "lru" and region is not None and n > 0:
            return self._lru_victims(n, int(region), skip)
        got = self._ranked(n + len(skip), policy, region)
        return got[~np.isin(got, skip)][:n] if len(skip) else got

    def _lru_victims(self, n: int, r: int, skip: np.ndarray) -> np.ndarray:
        """LRU victims of region ``r`` from its pool: the slots that were oldest when the
        pool was ranked, each still valid while untouched since (a touch, or a new key in
        the slot, changes its tick).  Slots touched since are younger than every valid
        entry, so the valid entries, in pool order, are the region's oldest: the same
        victims as a ranking afresh, at a cost per victim instead of per region slot."""
        out: list[np.ndarray] = []
        need = n
        for _ in range(2):   # the pool, then one ranked afresh if it ran dry
            pool = self._pools.get(r)
            if pool is None:
                k = max(4 * n, int(self._size[r]) // 8, 64)
                slots = self._ranked(k, "lru", r)
                pool = self._pools[r] = [slots, self.last_used[slots].copy(), 0]
            slots, ticks, pos = pool
            at = pos
            while need and at < len(slots):
                win = slice(at, at + 2 * need)
                take = slots[win]
                valid = (self.last_used[take] == ticks[win]) & (self._key_of[take] != EMPTY_KEY)
                pick = valid & ~np.isin(take, skip) if len(skip) else valid
                where = np.flatnonzero(pick)[:need]
                out.append(take[where])
                ticks[at + where] = -1          # taken: invalid from now on
                need -= len(where)
                at += len(take)
            # The pool's head moves past entries no longer valid (taken, touched, freed); a
            # valid one that was excluded stays for a later call.
            head = slots[pos:at]
            dead = (ticks[pos:at] < 0) | (self.last_used[head] != ticks[pos:at]) | (self._key_of[head] == EMPTY_KEY)
            alive = np.flatnonzero(~dead)
            pool[2] = pos + (int(alive[0]) if len(alive) else len(head))
            if not need:
                break
            del self._pools[r]
            # Those taken are still held (the caller frees them): not twice.
            skip = np.concatenate([skip, *out])
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    def _ranked(self, n: int, policy: str, region: int | None) -> np.ndarray:
        """The ``n`` first held slots of ``region`` (or all) by the policy, ranked afresh."""
        lo, hi = (0, self.capacity) if region is None else (int(self._lo[region]),
                                                             int(self._lo[region] + self._size[region]))
        held = lo + np.flatnonzero(self._key_of[lo:hi] != EMPTY_KEY)
        if n <= 0 or not len(held):
            return np.zeros(0, np.int64)
        keys = (held, self.last_used[held]) if policy == "lru" else (held, self.last_used[held], self.uses[held])
        if n < len(held) // 4:   # a few victims of a full region: partition before the sort
            rank = self.last_used[held] if policy == "lru" else self.uses[held]
            cut = np.partition(rank, n - 1)[n - 1]
            near = rank <= cut
            held = held[near]
            keys = tuple(k[near] for k in keys)
        order = np.lexsort(keys)   # the last key sorts first
        return held[order[:n]]
