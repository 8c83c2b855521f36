"""A vectorized hash map from non-negative int64 keys to int32 values (cuckoo hashing).

The link queues coalesce rows: a row put while already queued must find its
queued entry, and a queue deletes rows as fast as it inserts them.  With
batches of thousands of rows a Python ``dict`` lookup per row dominates the
cost, so this is a hash table held in numpy arrays and worked a whole batch at
a time.

It is *two-choice cuckoo hashing*: a key lives at one of two positions,
``h1(key)`` or ``h2(key)``.  So a batch lookup is exactly two gathers and
compares, with no probe loop; a delete just empties the position (no
tombstones, so no rebuilds to purge them, unlike open addressing); and an
insert puts each key in a free one of its two positions, or evicts the
occupant to *its* other position, in rounds that are vectorized over the whole
batch (several keys racing for one position: all write, the one that stuck
wins, the others go again).  At the load kept here (below :data:`MAX_LOAD`,
under the 0.5 threshold of two-choice cuckoo hashing) almost every key is
placed in the first round or two; the last few keys are placed one by one in
plain Python (:data:`SCALAR_TAIL`), and a key that cannot be placed within
:data:`MAX_KICKS` evictions makes the table grow and rehash.
"""

from __future__ import annotations

import numpy as np

#: marks an empty position.
EMPTY = np.int64(-1)
#: live entries never exceed this fraction of capacity (two-choice cuckoo
#: hashing fails with high probability above 0.5).
MAX_LOAD = 0.4
#: capacity after growing is at least live entries / GROW_LOAD.
GROW_LOAD = 0.2
#: smallest capacity (a power of two).
MIN_CAPACITY = 1 << 10
#: vectorized insert rounds before the remaining keys are placed one by one.
VECTOR_ROUNDS = 8
#: below this many keys left, an insert round is done in plain Python (a numpy
#: round costs about as much for 3 keys as for 300).
SCALAR_TAIL = 32
#: evictions one key may cause before the table grows and rehashes.
MAX_KICKS = 64
#: two odd 64-bit multipliers (Fibonacci hashing and a second, unrelated one):
#: the top bits of ``key * C`` spread clustered row ids (the common case).
_C1 = np.uint64(0x9E3779B97F4A7C15)
_C2 = np.uint64(0xC2B2AE3D27D4EB4F)


def _capacity_for(n: int) -> int:
    cap = MIN_CAPACITY
    while cap * GROW_LOAD < n:
        cap <<= 1
    return cap


class RowIndex:
    """Map of non-negative int64 keys to int32 values, worked in batches.

    Example:
        >>> import numpy as np
        >>> ix = RowIndex()
        >>> ix.insert(np.array([10, 20, 30]), np.array([0, 1, 2]))
        >>> ix.get(np.array([20, 99, 10])).tolist()
        [1, -1, 0]
        >>> ix.delete(np.array([20]))
        >>> ix.get(np.array([20])).tolist(), len(ix)
        ([-1], 2)
        >>> keys = np.array([7, 8, 7, 7])
        >>> rep = ix.group(keys)                # equal keys -> one representative item
        >>> bool((keys[rep] == keys).all()), sorted(set(rep.tolist())) in ([0, 1], [1, 2], [1, 3])
        (True, True)
    """

    def __init__(self, capacity: int = MIN_CAPACITY) -> None:
        self._live = 0
        self._alloc(_capacity_for(int(capacity * GROW_LOAD)))

    def _alloc(self, cap: int) -> None:
        # key and value side by side: a probe that finds the key has the value in the
        # same cache line (the table is far larger than the caches; misses dominate)
        self._tab = np.full((cap, 2), EMPTY, dtype=np.int64)
        self.keys = self._tab[:, 0]
        self.vals = self._tab[:, 1]
        self._shift = np.uint64(64 - (cap.bit_length() - 1))
        self._owner = np.empty(cap, dtype=np.int64)   # scratch for group()

    def __len__(self) -> int:
        return self._live

    @property
    def capacity(self) -> int:
        return int(self.keys.shape[0])

    def _h1(self, keys: np.ndarray) -> np.ndarray:
        # views, not casts: keys are non-negative and the result is < 2**63
        h = keys.view(np.uint64) * _C1
        h >>= self._shift
        return h.view(np.int64)

    def _h2(self, keys: np.ndarray) -> np.ndarray:
        h = keys.view(np.uint64) * _C2
        h >>= self._shift
        return h.view(np.int64)

    # -- lookups ------------------------------------------------------------------------------
    def find(self, keys: np.ndarray) -> np.ndarray:
        """Vectorized: table position of each key, or -1 where absent."""
        p = self._h1(keys)
        pos = np.where(self.keys[p] == keys, p, -1)
        miss = np.flatnonzero(pos < 0)
        if miss.shape[0]:
            km = keys[miss]
            p2 = self._h2(km)
            pos[miss] = np.where(self.keys[p2] == km, p2, -1)
        return pos

    def get(self, keys: np.ndarray) -> np.ndarray:
        """Vectorized: value of each key, or -1 where absent."""
        pos = self.find(keys)
        out = self.vals[pos].astype(np.int32)   # pos -1 reads the last entry; masked below
        out[pos < 0] = -1
        return out

    def group(self, keys: np.ndarray) -> np.ndarray:
        """For a batch that may repeat keys: for every item, the index of one
        representative item with the same key (``rep[i] == i`` on representatives).

        Equal keys share both hash positions; scattering item indices to a
        position and reading them back picks one writer per position, and an item
        whose key equals its writer's key is in that writer's group.  Items that
        met a different key (a collision) try the second position, then a sort.
        """
        n = keys.shape[0]
        rep = np.arange(n)
        if n < 2:
            return rep
        todo = np.arange(n)
        k = keys
        for h in (self._h1, self._h2):
            p = h(k)
            self._owner[p] = todo
            w = self._owner[p]
            same = keys[w] == k
            rep[todo[same]] = w[same]
            if same.all():
                return rep
            todo, k = todo[~same], k[~same]
        _, first, inv = np.unique(k, return_index=True, return_inverse=True)
        rep[todo] = todo[first][inv]
        return rep

    # -- updates ------------------------------------------------------------------------------
    def delete(self, keys: np.ndarray) -> None:
        """Remove keys (absent ones are ignored, repeated ones removed once)."""
        pos = self.find(keys)
        pos = pos[pos >= 0]
        if pos.shape[0] > 1:     # count a repeated key once
            idx = np.arange(pos.shape[0])
            self._owner[pos] = idx
            self._live -= int(np.count_nonzero(self._owner[pos] == idx))
        else:
            self._live -= int(pos.shape[0])
        self.keys[pos] = EMPTY
        self.vals[pos] = -1

    def insert(self, keys: np.ndarray, vals: np.ndarray) -> None:
        """Insert *distinct, absent* keys with their values (grows as needed)."""
        n = keys.shape[0]
        if n == 0:
            return
        if self._live + n > MAX_LOAD * self.capacity:
            self._grow(self._live + n)
        self._live += n
        k = np.ascontiguousarray(keys, dtype=np.int64)
        v = np.asarray(vals, dtype=np.int32)
        p1, p2 = self._h1(k), self._h2(k)
        # away[i]: when both positions are taken, evict at h2 (True) or h1.  A key
        # just evicted from one of its positions goes for the other, so keys do not
        # bounce back and forth.
        away = np.zeros(n, dtype=bool)
        table, tv = self.keys, self.vals
        for _ in range(VECTOR_ROUNDS):
            if k.shape[0] <= SCALAR_TAIL:
                break
            target = np.where(table[p1] == EMPTY, p1, np.where((table[p2] == EMPTY) | away, p2, p1))
            old_k = table[target]
            table[target] = k
            won = table[target] == k
            if won.all():
                tv_old = tv[target]
                tv[target] = v
                evicted = np.flatnonzero(old_k != EMPTY)
                if evicted.shape[0] == 0:
                    return
                lost = None
            else:
                tv_old = tv[target]
                wt = target[won]
                tv[wt] = v[won]
                evicted = np.flatnonzero(won & (old_k != EMPTY))
                lost = np.flatnonzero(~won)
            ek, ev, et = old_k[evicted], tv_old[evicted], target[evicted]
            e1, e2 = self._h1(ek), self._h2(ek)
            e_away = e1 == et                  # evicted from h1: try h2 next
            if lost is None:
                k, v, p1, p2, away = ek, ev, e1, e2, e_away
            else:
                k = np.concatenate([k[lost], ek])
                v = np.concatenate([v[lost], ev])
                p1 = np.concatenate([p1[lost], e1])
                p2 = np.concatenate([p2[lost], e2])
                away = np.concatenate([~away[lost], e_away])
        if k.shape[0]:
            self._insert_scalar(k, v)

    def _insert_scalar(self, keys: np.ndarray, vals: np.ndarray) -> None:
        table, tv = self.keys, self.vals
        shift, m64 = int(self._shift), (1 << 64) - 1
        c1, c2 = int(_C1), int(_C2)
        pending = list(zip(keys.tolist(), vals.tolist()))
        while pending:
            key, val = pending.pop()
            a, b = ((key * c1) & m64) >> shift, ((key * c2) & m64) >> shift
            p = a if table[a] == EMPTY else b
            for _ in range(MAX_KICKS):
                old_k, old_v = int(table[p]), int(tv[p])
                table[p], tv[p] = key, val
                if old_k == EMPTY:
                    break
                key, val = old_k, old_v
                o1 = ((key * c1) & m64) >> shift
                p = ((key * c2) & m64) >> shift if p == o1 else o1
            else:
                # a cycle (or a very unlucky path): rehash everything at twice the size
                pending.append((key, val))
                self._live -= len(pending)
                self._grow(2 * self.capacity * GROW_LOAD)
                self.insert(np.array([x[0] for x in pending], dtype=np.int64),
                            np.array([x[1] for x in pending], dtype=np.int32))
                return

    def _grow(self, need: int) -> None:
        live = self.keys != EMPTY
        keys, vals = self.keys[live], self.vals[live]
        cap = max(_capacity_for(int(need)), self.capacity)
        if cap == self.capacity:
            cap <<= 1
        self._alloc(cap)
        self._live = 0
        self.insert(keys, vals)
