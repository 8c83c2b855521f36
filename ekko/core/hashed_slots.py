"""A publisher's slots of its hashed tables: which slot each 64-bit key is written to.

A hashed table (``TableSpec(keys="int64")``) is ``capacity`` slots on every replica; the
*publisher* decides which slot a key takes, and the row it publishes carries the key
(:mod:`ekko.core.hashed`), so every replica holds a key in the same slot and versions,
knowledge and rollback work on slots as on any table's rows.  A new key takes a free
slot in the region of its shard (``TableSpec.key_shards``); when that region is full, the
table's eviction policy picks victims among the keys the publisher wrote there (least
recently or least frequently published), and the new key's row, written into a
victim's slot, is the eviction: it travels, converges and is rolled back like any
write.  ``eviction="none"`` refuses such a publish instead, changing nothing.

One publisher assigns a table's slots (the trainer that owns it); two assigning the
same table would overwrite each other's keys.  A publisher that starts again resumes
from the keys a replica holds (``GET .../keys``, :meth:`HashedSlots.resume`); keys
whose rows had not reached that replica may then be overwritten, as if evicted.  After
a rollback the slots hold the cut's keys again: the publisher reads them afresh when it
learns of the rollback (a poll, its watch, or an acknowledgement).  A publish prepared
before that is assigned from the old view; its rows still land where it says, so the
keys it evicts are gone, like any eviction.

Example:
    >>> import numpy as np
    >>> from ekko.core.spec import TableSpec
    >>> t = TableSpec("ads", dim=4, keys="int64", capacity=4, shards=1, eviction="lru")
    >>> s = HashedSlots(t)
    >>> s.assign(np.array([100, 200, 300, 400])).tolist()
    [0, 1, 2, 3]
    >>> s.assign(np.array([200])).tolist()          # 200 is used again: 100 is the oldest
    [1]
    >>> s.assign(np.array([500])).tolist(), s.evicted
    ([0], 1)
"""

from __future__ import annotations

import numpy as np

from ekko.core.errors import UsageError
from ekko.core.key_index import KeyIndex
from ekko.core.spec import TableSpec


class HashedSlots:
    """Key -> slot assignment of one hashed table, with eviction by the table's policy."""

    def __init__(self, spec: TableSpec) -> None:
        if not spec.hashed:
            raise UsageError(f"table {spec.name} is not hashed")
        self.spec = spec
        self.index = KeyIndex(spec.rows, regions=spec.num_shards)
        #: publishes assigned so far (the recency clock of ``lru``).
        self.tick = 0
        #: keys evicted so far (their slots given to other keys).
        self.evicted = 0

    def assign(self, keys: np.ndarray) -> np.ndarray:
        """The slot of each key (distinct int64 keys, checked by the caller), taking free
        slots -- and, in a full region, victims' slots -- for keys not held yet.

        Raises :class:`UsageError`, changing nothing, when a region is full and the
        policy is ``"none"``, or when one publish brings more new keys to a region than
        it has slots."""
        regions = self.spec.key_shards(keys)
        slots = self.index.lookup(keys)
        new = slots < 0
        if new.any():
            need = np.bincount(regions[new], minlength=self.spec.num_shards)
            free = self.index.free_in(np.arange(self.spec.num_shards))
            full = np.flatnonzero(need > free)
            if len(full):
                self._evict(full, need[full], free[full], slots[~new])
            slots = self.index.insert(keys, regions)
        self.tick += 1
        self.index.touch(slots, self.tick)
        return slots

    def _evict(self, regions: np.ndarray, need: np.ndarray, free: np.ndarray, kept: np.ndarray) -> None:
        """Free ``need - free`` slots in each of ``regions`` (too full for ``need`` new
        keys), never a slot of ``kept`` (keys of this publish already held); checks every
        region before freeing any slot."""
        kept_regions = self.index.region_of(kept)
        mine = [kept[kept_regions == r] for r in regions.tolist()]   # a loop over full regions, not rows
        for r, k, m in zip(regions.tolist(), need.tolist(), mine):
            if k + len(m) > self.index.region_slots:
                raise UsageError(f"{self.spec.name}: {k + len(m)} keys of one publish fall in shard {r}, "
                                 f"which has {self.index.region_slots} slots; publish fewer keys at once")
        policy = self.spec.eviction
        if policy == "none":
            r = int(regions[0])
            raise UsageError(f"{self.spec.name}: shard {r} of the hashed table is full "
                             f"({self.index.region_slots} slots) and its eviction is 'none': "
                             f"{int(need[0] - free[0])} more new key(s) do not fit")
        chosen = []
        for r, n, m in zip(regions.tolist(), (need - free).tolist(), mine):
            chosen.append(self.index.victims(n, policy, region=r, exclude=m))
        victims = np.concatenate(chosen)
        self.index.free(victims)
        self.evicted += len(victims)

    def resume(self, slots: np.ndarray, keys: np.ndarray) -> None:
        """Start from the keys a replica holds (``slots[i]`` holds ``keys[i]``): a
        publisher that starts again must not hand their slots to other keys."""
        if len(self.index):
            raise UsageError("resume only an empty assignment")
        slots = np.asarray(slots, np.int64)
        keys = np.asarray(keys, np.int64)
        if slots.shape != keys.shape or (len(slots) and (slots.min() < 0 or slots.max() >= self.spec.rows)):
            raise UsageError("resume needs one key per slot, slots within the table")
        if len(keys):
            self.index.claim(keys, slots)
