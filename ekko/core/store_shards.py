"""Taking shards over and handing them back: the placed side of a table store (issue #18).

:class:`HeldShards` is mixed into :class:`ekko.core.store.TableStore`: a store built with
``held`` keeps the values of those shards only, packed one block per shard
(:class:`~ekko.core.shard_blocks.ShardBlocks`), and these methods change which shards
those are as the placement moves them (:mod:`p2p.handoff`).  Rows are written and read
through the store's own paths (``restore_rows``), so row hashes, the written count, the
key map and the digest follow.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ekko.core.errors import UsageError
from ekko.core.shard_blocks import BLOCK_GROWTH, ShardBlocks


class HeldShards:
    """Which shards a table store keeps, and the hand-over of shards (a mixin of
    :class:`~ekko.core.store.TableStore`; its attributes are the store's)."""

    spec: Any
    values: torch.Tensor | None
    blocks: ShardBlocks | None
    versions: np.ndarray
    device: torch.device
    tombstone: np.ndarray
    _dirty: np.ndarray
    _frozen: list[Any]

    def restore_rows(self, ids: np.ndarray, versions: np.ndarray, values: np.ndarray | None,
                     tombstone: np.ndarray | None = None) -> None: ...

    def _pos(self, ids: np.ndarray) -> np.ndarray:
        """Rows ``ids`` as positions in ``values`` (themselves unless packed)."""
        return ids if self.blocks is None else self.blocks.positions(ids)

    @property
    def nbytes(self) -> int:
        """Bytes of table memory: values (held shards only, when packed), versions, tombstones."""
        v = self.values.numel() * self.values.element_size() if self.values is not None else 0
        return v + self.versions.nbytes + self.tombstone.nbytes

    def held(self) -> np.ndarray:
        """Bool per shard: whether this store keeps the shard's values."""
        return np.ones(self.spec.num_shards, bool) if self.blocks is None else self.blocks.held

    def hold(self, shards: Any) -> None:
        """Start keeping the values of ``shards`` (a packed store taking them over): each
        gets a zeroed block; its rows hold no version yet, so a pull fills them.

        Example:
            >>> import numpy as np
            >>> from ekko.core.spec import TableSpec
            >>> from ekko.core.store import TableStore
            >>> ts = TableStore(TableSpec("t", rows=8, dim=1, shards=4), device="cpu", held=np.array([1, 0, 0, 0], bool))
            >>> ts.hold([2]); ts.held().tolist(), tuple(ts.values.shape)
            ([True, False, True, False], (4, 1))
        """
        b = self._blocks_to_change("hold")
        for s in np.asarray(shards, np.int64).ravel().tolist():
            block, grow = b.add(s)
            if self.values is None:
                continue
            if grow:
                more = b.rows - int(self.values.shape[0])
                self.values = torch.cat([self.values, self.values.new_zeros(more, self.values.shape[1])])
            lo, hi = b.shard_span(s)
            self.values[lo:hi] = 0
        self._dirty[np.asarray(shards, np.int64).ravel()] = True   # the digest now covers them

    def drop(self, shards: Any) -> None:
        """Stop keeping ``shards``: their rows forget value, version and tombstone (what a
        replica that never held them has), and their blocks are freed for later shards.

        Example:
            >>> import numpy as np
            >>> from ekko.core.delta import Delta
            >>> from ekko.core.spec import TableSpec
            >>> from ekko.core.store import TableStore
            >>> ts = TableStore(TableSpec("t", rows=8, dim=1, shards=4), device="cpu", held=np.ones(4, bool))
            >>> _ = ts.apply(Delta("m", "t", np.array([1, 5]), np.array([3, 3]), np.ones((2, 1), np.float32)))
            >>> ts.drop([2]); ts.held().tolist(), ts.versions.tolist(), ts.written_rows()
            ([True, True, False, True], [0, 3, 0, 0, 0, 0, 0, 0], 1)
        """
        b = self._blocks_to_change("drop")
        for s in np.asarray(shards, np.int64).ravel().tolist():
            if not b.held[s]:
                continue
            lo, hi = self.spec.shard_range(s)
            ids = np.flatnonzero(self.versions[lo:hi]).astype(np.int64) + lo
            if len(ids):
                self.restore_rows(ids, np.zeros(len(ids), np.int64), None if self.values is None else
                                  np.zeros((len(ids), self.spec.width), self._wire_dtype()))
            b.remove(s)
            self._dirty[s] = True   # the digest no longer covers it
        if b.free > max(1, int(b.blocks * BLOCK_GROWTH)):
            self._compact(b)

    def _compact(self, b: ShardBlocks) -> None:
        """Give freed blocks' memory back: the held blocks move to the front of fresh
        values (one gather), which replace the old tensor."""
        old = b.compact()
        if self.values is None:
            return
        sr = b.shard_rows
        rows = (old[:, None] * sr + np.arange(sr)[None, :]).ravel()
        self.values = self.values.index_select(0, torch.from_numpy(rows).to(self.device))

    def _blocks_to_change(self, what: str) -> ShardBlocks:
        if self.blocks is None:
            raise UsageError(f"table {self.spec.name} keeps every shard (not placed): nothing to {what}")
        if self._frozen:
            # A snapshot reads the packed values block by block: moving blocks under it
            # would mix shards.  The caller tries again once the snapshot is written.
            raise UsageError(f"table {self.spec.name}: cannot {what} shards while a snapshot reads the table")
        return self.blocks

    def _wire_dtype(self) -> np.dtype:
        return np.dtype(np.uint16) if self.spec.dtype == "bfloat16" else np.dtype(self.spec.dtype)

