"""A vectorized map from 64-bit feature keys to the row slots of one replica's table.

Issue #18's hashed tables name rows by arbitrary int64 keys (feature ids); each replica
keeps their values in a table of ``capacity`` slots and needs, for every delta, the
slots of its keys.  :class:`KeyIndex` is that map: an open-addressing hash table
(linear probing, at most half full) held in numpy arrays, whose lookups, inserts and
removals work on whole arrays of keys -- a loop over probe steps, never over rows.
Slots are handed out from a free stack, so a replica's slots differ from another's:
they never travel.  It also keeps what an eviction policy ranks by (:meth:`touch`,
:meth:`victims`: least recently or least frequently used).

Not wired into :class:`ekko.core.store.TableStore` yet (issue #18 is open): this is
its index, tested on its own.
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


class KeyIndex:
    """int64 keys -> slots ``[0, capacity)``; whole arrays at a time.

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
    """

    def __init__(self, capacity: int) -> None:
        if not isinstance(capacity, (int, np.integer)) or not 1 <= capacity <= MAX_CAPACITY:
            raise UsageError(f"capacity must be 1..{MAX_CAPACITY}, not {capacity!r}")
        self.capacity = int(capacity)
        self._reset_table(_table_size(self.capacity))
        self._key_of = np.full(self.capacity, EMPTY_KEY, np.int64)   # slot -> key (EMPTY: free)
        self._pos_of = np.full(self.capacity, -1, np.int64)           # slot -> table position
        self._free = np.arange(self.capacity - 1, -1, -1, dtype=np.int64)  # a stack: slot 0 on top
        self._nfree = self.capacity
        #: per slot: the tick of its last :meth:`touch`, and how many touches it had.
        self.last_used = np.zeros(self.capacity, np.int64)
        self.uses = np.zeros(self.capacity, np.int64)

    def _reset_table(self, size: int) -> None:
        self._keys = np.full(size, EMPTY_KEY, np.int64)   # position -> key
        self._slot = np.full(size, -1, np.int64)          # position -> slot
        self._mask = np.int64(size - 1)
        self.tombstones = 0

    # -- reads ----------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.capacity - self._nfree

    @property
    def free_slots(self) -> int:
        return self._nfree

    def keys_of(self, slots: np.ndarray) -> np.ndarray:
        """The key held in each slot (:data:`EMPTY_KEY` for a free one)."""
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

    # -- writes ---------------------------------------------------------------------------
    def insert(self, keys: np.ndarray) -> np.ndarray:
        """The slot of each key, taking free slots for keys not held yet (a key repeated
        in ``keys`` gets one).  Raises :class:`UsageError`, changing nothing, when the new
        keys outnumber the free slots."""
        keys = self._checked(keys)
        slots = self._slots_of(keys)
        missing = slots < 0
        if missing.any():
            new, first, inverse = np.unique(keys[missing], return_index=True, return_inverse=True)
            if len(new) > self._nfree:
                raise UsageError(f"{len(new)} new keys but {self._nfree} free slots "
                                 f"(capacity {self.capacity}): evict first")
            # Slots off the top of the free stack, in the order the keys first appear.
            taken = np.empty(len(new), np.int64)
            taken[np.argsort(first)] = self._free[self._nfree - len(new):self._nfree][::-1]
            self._nfree -= len(new)
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
        pos = pos[pos >= 0]
        if not len(pos):
            return np.zeros(0, np.int64)
        slots = self._slot[pos]
        self._keys[pos] = DELETED_KEY
        self._slot[pos] = -1
        self._key_of[slots] = EMPTY_KEY
        self._pos_of[slots] = -1
        self._free[self._nfree:self._nfree + len(slots)] = slots
        self._nfree += len(slots)
        self.tombstones += len(pos)
        if self.tombstones > MAX_TOMBSTONE_SHARE * len(self._keys):
            self._rebuild()
        return slots

    # -- eviction bookkeeping -------------------------------------------------------------
    def touch(self, slots: np.ndarray, tick: int) -> None:
        """Note a use of ``slots`` at logical time ``tick`` (a slot named twice counts twice)."""
        slots = np.asarray(slots, np.int64)
        if len(slots) and (slots.min() < 0 or slots.max() >= self.capacity):
            raise UsageError("touch of a slot outside the index")
        self.last_used[slots] = tick
        np.add.at(self.uses, slots, 1)

    def victims(self, n: int, policy: str) -> np.ndarray:
        """Up to ``n`` held slots to evict first: least recently used (``lru``), or least
        used, then least recently (``lfu``); ties by slot."""
        if policy not in EVICTION_POLICIES:
            raise UsageError(f"eviction policy must be one of {EVICTION_POLICIES}, not {policy!r}")
        held = np.flatnonzero(self._key_of != EMPTY_KEY)
        if n <= 0 or not len(held):
            return np.zeros(0, np.int64)
        keys = (held, self.last_used[held]) if policy == "lru" else (held, self.last_used[held], self.uses[held])
        order = np.lexsort(keys)   # the last key sorts first
        return held[order[:n]]

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
