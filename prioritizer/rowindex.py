"""A vectorized hash map from non-negative int64 keys to int32 slots.

The link queues coalesce rows: a row put while already queued must find its
queued entry.  With batches of thousands of rows, a Python ``dict`` lookup per
row dominates the cost, so this is an open-addressing table held in numpy
arrays and probed a whole batch at a time: every round gathers the probe
position of every still-unresolved key, resolves the hits and empty slots, and
moves the rest one position on (linear probing).  With the load factor kept
below :data:`MAX_LOAD` the expected probe length is about 1.5 (Knuth), so a
batch resolves in a handful of rounds whose cost shrinks geometrically.

Deletion leaves a tombstone (lookups must probe past it); the table is
rebuilt when live entries plus tombstones reach :data:`MAX_LOAD`.
"""

from __future__ import annotations

import numpy as np

#: marks a never-used position.
EMPTY = np.int64(-1)
#: marks a deleted position (lookups probe past it, inserts may reuse it).
TOMBSTONE = np.int64(-2)
#: live + tombstone positions never exceed this fraction of capacity.
MAX_LOAD = 0.5
#: capacity after a rebuild is at least live entries / REBUILD_LOAD, so a
#: rebuilt table has room to grow before the next rebuild.
REBUILD_LOAD = 0.25
#: smallest capacity (a power of two).
MIN_CAPACITY = 1 << 10
#: Fibonacci hashing multiplier (2**64 / golden ratio, odd): spreads clustered
#: row ids (consecutive ids are the common case) over the table.
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _capacity_for(n: int) -> int:
    cap = MIN_CAPACITY
    while cap * REBUILD_LOAD < n:
        cap <<= 1
    return cap


class RowIndex:
    """Map of unique non-negative int64 keys to int32 values, probed in batches.

    Positions (where a key sits in the table) are stable until the next
    rebuild; :meth:`insert` reports when it rebuilt so callers caching
    positions can refresh them with :meth:`positions`.

    Example:
        >>> import numpy as np
        >>> ix = RowIndex()
        >>> _ = ix.insert(np.array([10, 20, 30]), np.array([0, 1, 2]))
        >>> ix.get(np.array([20, 99, 10])).tolist()
        [1, -1, 0]
        >>> ix.delete(np.array([20]))
        >>> ix.get(np.array([20])).tolist(), len(ix)
        ([-1], 2)
    """

    def __init__(self, capacity: int = MIN_CAPACITY) -> None:
        self._alloc(_capacity_for(int(capacity * REBUILD_LOAD)))
        self._live = 0

    def _alloc(self, cap: int) -> None:
        self.keys = np.full(cap, EMPTY, dtype=np.int64)
        self.vals = np.full(cap, -1, dtype=np.int32)
        self._mask = cap - 1
        self._shift = np.uint64(64 - (cap.bit_length() - 1))
        self._owner = np.empty(cap, dtype=np.int64)   # scratch for claim()
        self._tomb = 0

    def __len__(self) -> int:
        return self._live

    @property
    def capacity(self) -> int:
        return int(self.keys.shape[0])

    def _home(self, keys: np.ndarray) -> np.ndarray:
        # The top bits of key * golden are the best-mixed ones.
        return ((keys.astype(np.uint64) * _GOLDEN) >> self._shift).astype(np.int64)

    def find(self, keys: np.ndarray) -> np.ndarray:
        """Vectorized: table position of each key, or -1 where absent."""
        n = keys.shape[0]
        out = np.full(n, -1, dtype=np.int64)
        if n == 0 or self._live == 0:
            return out
        todo = np.arange(n)
        pos = self._home(keys)
        k = keys
        while todo.shape[0]:
            at = self.keys[pos]
            hit = at == k
            if hit.any():
                out[todo[hit]] = pos[hit]
            go_on = (~hit) & (at != EMPTY)      # another key or a tombstone: probe on
            todo, pos, k = todo[go_on], (pos[go_on] + 1) & self._mask, k[go_on]
        return out

    def get(self, keys: np.ndarray) -> np.ndarray:
        """Vectorized: value of each key, or -1 where absent."""
        pos = self.find(keys)
        out = np.full(keys.shape[0], -1, dtype=np.int32)
        found = pos >= 0
        out[found] = self.vals[pos[found]]
        return out

    def claim(self, keys: np.ndarray) -> tuple[np.ndarray, bool]:
        """Give each *absent* key a position (equal keys share one); values are left unset.

        Keys must not already be in the table.  Returns the positions and whether
        the table was rebuilt first (earlier positions are then stale).
        """
        n = keys.shape[0]
        rebuilt = False
        if (self._live + self._tomb + n) > MAX_LOAD * self.capacity:
            self._rebuild(self._live + n)
            rebuilt = True
        out = np.empty(n, dtype=np.int64)
        todo = np.arange(n)
        pos = self._home(keys)
        k = keys
        owner = self._owner
        while todo.shape[0]:
            at = self.keys[pos]
            free = at < 0                           # empty or tombstone
            # Several keys may race for one free position: write them all, read back;
            # the key that stuck owns it (equal keys all match and share it), the
            # others probe on.
            self.keys[pos[free]] = k[free]
            won = np.flatnonzero(free & (self.keys[pos] == k))
            if won.shape[0]:
                wp = pos[won]
                out[todo[won]] = wp
                # count each newly filled position once, even when equal keys share it
                owner[wp] = won
                first = owner[wp] == won
                self._live += int(np.count_nonzero(first))
                self._tomb -= int(np.count_nonzero(at[won[first]] == TOMBSTONE))
            lose = np.ones(todo.shape[0], dtype=bool)
            lose[won] = False
            todo, pos, k = todo[lose], (pos[lose] + 1) & self._mask, k[lose]
        return out, rebuilt

    def insert(self, keys: np.ndarray, vals: np.ndarray) -> bool:
        """Insert unique absent keys with values; True when the table was rebuilt."""
        pos, rebuilt = self.claim(keys)
        self.vals[pos] = vals
        return rebuilt

    def delete(self, keys: np.ndarray) -> None:
        """Remove keys (absent ones are ignored)."""
        pos = self.find(keys)
        self.delete_at(pos[pos >= 0])

    def delete_at(self, pos: np.ndarray) -> None:
        """Remove the entries at known, distinct, live positions."""
        if pos.shape[0] == 0:
            return
        self.keys[pos] = TOMBSTONE
        self.vals[pos] = -1
        self._live -= int(pos.shape[0])
        self._tomb += int(pos.shape[0])
        if self._live == 0 and self._tomb > MAX_LOAD * REBUILD_LOAD * self.capacity:
            # nothing left to probe past: forget the tombstones (an O(capacity) fill,
            # so only once they are a good share of the table)
            self.keys.fill(EMPTY)
            self._tomb = 0

    def group(self, pos: np.ndarray) -> np.ndarray:
        """For positions that may repeat: the index of one representative item per
        distinct position, for every item (``rep[i] == i`` on representatives)."""
        idx = np.arange(pos.shape[0])
        self._owner[pos] = idx
        return self._owner[pos]

    def positions(self, keys: np.ndarray) -> np.ndarray:
        """Alias of :meth:`find` for callers refreshing cached positions after a rebuild."""
        return self.find(keys)

    def _rebuild(self, need: int) -> None:
        live = self.keys >= 0
        keys, vals = self.keys[live], self.vals[live]
        self._alloc(_capacity_for(max(need, 1)))
        self._live = 0
        if keys.shape[0]:
            pos, _ = self.claim(keys)
            self.vals[pos] = vals
