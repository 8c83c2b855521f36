"""Where the held shards of a placed table sit in its packed values (issue #18).

A replica of a placed model (``ModelSpec.replicas_per_shard > 0``) keeps the values of
only the shards it holds.  Its :class:`~ekko.core.store.TableStore` allocates one
*block* of ``shard_rows`` rows per held shard, and this map says which: row ``i`` of
shard ``s = i // shard_rows`` lives at position ``block_of[s] * shard_rows + i -
s * shard_rows`` of the values tensor (one gather, no Python per row).  Versions and
tombstones stay full-length arrays (9 bytes a row, against ``row_bytes`` of values),
because the protocol compares versions by row id everywhere.

Blocks are handed out in shard order at the start and reused first-free afterwards: a
shard taken over later (a hand-off) gets a freed block, or the values grow by whole
blocks (:data:`BLOCK_GROWTH`).
"""

from __future__ import annotations

import numpy as np

from ekko.core.errors import UsageError
from ekko.core.spec import TableSpec

#: least fraction by which packed values grow when a shard needs a block and none is free
#: (amortises the copy of a hand-off of many shards, one at a time, to O(shards)).
BLOCK_GROWTH = 0.25


class ShardBlocks:
    """The held shards of one table and the block each occupies.

    Args:
        spec: the table.
        held: bool per shard, True where this replica keeps the shard's values.

    Example:
        >>> from ekko.core.spec import TableSpec
        >>> b = ShardBlocks(TableSpec("t", rows=40, dim=2, shards=4), np.array([False, True, False, True]))
        >>> b.blocks, b.positions(np.array([10, 39, 31])).tolist()    # 10 rows a shard
        (2, [0, 19, 11])
        >>> b.positions(np.array([5]))
        Traceback (most recent call last):
        ...
        ekko.core.errors.UsageError: table t: rows of shards not held here: [0]
    """

    def __init__(self, spec: TableSpec, held: np.ndarray) -> None:
        held = np.asarray(held, dtype=bool)
        if held.shape != (spec.num_shards,):
            raise UsageError(f"table {spec.name}: held mask needs {spec.num_shards} entries, got {held.shape}")
        self.spec = spec
        self.shard_rows = spec.shard_rows
        self.block_of = np.full(spec.num_shards, -1, dtype=np.int64)
        self.block_of[held] = np.arange(int(held.sum()), dtype=np.int64)
        #: blocks allocated (held shards plus free blocks).
        self.blocks = int(held.sum())
        self._free: list[int] = []

    @property
    def held(self) -> np.ndarray:
        """Bool per shard: whether its values are kept here."""
        return self.block_of >= 0

    @property
    def rows(self) -> int:
        """Rows of the packed values (``blocks x shard_rows``)."""
        return self.blocks * self.shard_rows

    def positions(self, ids: np.ndarray) -> np.ndarray:
        """Positions in the packed values of rows ``ids``; :class:`UsageError` when one of
        them is in a shard not held here (nothing is read or written then)."""
        ids = np.asarray(ids, dtype=np.int64)
        sr = self.shard_rows
        shards = ids // sr
        b = self.block_of[shards]
        if len(b) and b.min() < 0:
            missing = np.unique(shards[b < 0])
            raise UsageError(f"table {self.spec.name}: rows of shards not held here: {missing[:8].tolist()}")
        return ids + (b - shards) * sr

    def shard_span(self, shard: int) -> tuple[int, int]:
        """``[lo, hi)`` positions of a held shard's rows in the packed values."""
        b = int(self.block_of[shard])
        if b < 0:
            raise UsageError(f"table {self.spec.name}: shard {shard} is not held here")
        lo, hi = self.spec.shard_range(shard)
        return b * self.shard_rows, b * self.shard_rows + (hi - lo)

    def add(self, shard: int) -> tuple[int, bool]:
        """Give ``shard`` a block: ``(block, grow)`` where ``grow`` says that the caller must
        first extend the values to :attr:`rows` (no free block was left)."""
        if self.block_of[shard] >= 0:
            return int(self.block_of[shard]), False
        grow = not self._free
        if grow:
            new = max(1, int(np.ceil(self.blocks * BLOCK_GROWTH)))
            self._free = list(range(self.blocks, self.blocks + new))
            self.blocks += new
        b = self._free.pop(0)
        self.block_of[shard] = b
        return b, grow

    def remove(self, shard: int) -> int:
        """Free the block of ``shard``; returns it (-1 when the shard was not held)."""
        b = int(self.block_of[shard])
        if b >= 0:
            self.block_of[shard] = -1
            self._free.append(b)
            self._free.sort()
        return b

    @property
    def free(self) -> int:
        """Blocks allocated but holding no shard."""
        return len(self._free)

    def compact(self) -> np.ndarray:
        """Renumber the held shards' blocks ``0..k-1`` (in their current order) and forget
        the free ones; returns the old block of each new one, for the caller to gather.

        Example:
            >>> from ekko.core.spec import TableSpec
            >>> b = ShardBlocks(TableSpec("t", rows=40, dim=2, shards=4), np.ones(4, bool))
            >>> _ = b.remove(1); b.compact().tolist(), b.block_of.tolist(), b.blocks
            ([0, 2, 3], [0, -1, 1, 2], 3)
        """
        held = np.flatnonzero(self.block_of >= 0)
        old = np.sort(self.block_of[held])
        new_of_old = np.full(self.blocks, -1, np.int64)
        new_of_old[old] = np.arange(len(old))
        self.block_of[held] = new_of_old[self.block_of[held]]
        self.blocks, self._free = len(old), []
        return old

    def to_list(self) -> list[int]:
        """``[blocks, block_of[0], block_of[1], ...]``: what a snapshot records."""
        return [self.blocks, *self.block_of.tolist()]

    @classmethod
    def from_list(cls, spec: TableSpec, raw: object) -> "ShardBlocks":
        """Inverse of :meth:`to_list`; :class:`UsageError` when ``raw`` is not a valid map
        for ``spec`` (wrong length, a block out of range or used twice)."""
        if not isinstance(raw, list) or len(raw) != spec.num_shards + 1 or not all(
                type(x) is int for x in raw):
            raise UsageError(f"table {spec.name}: a block map needs {spec.num_shards + 1} ints")
        blocks, block_of = raw[0], np.asarray(raw[1:], dtype=np.int64)
        used = block_of[block_of >= 0]
        if (not 0 <= blocks <= spec.num_shards or (block_of < -1).any() or (used >= blocks).any()
                or len(np.unique(used)) != len(used)):
            raise UsageError(f"table {spec.name}: bad block map")
        out = cls(spec, np.zeros(spec.num_shards, bool))
        out.block_of, out.blocks = block_of, blocks
        out._free = sorted(set(range(blocks)) - set(used.tolist()))
        return out

    def copy(self) -> "ShardBlocks":
        out = ShardBlocks.__new__(ShardBlocks)
        out.spec, out.shard_rows, out.blocks = self.spec, self.shard_rows, self.blocks
        out.block_of, out._free = self.block_of.copy(), list(self._free)
        return out
