"""A hashed table's key -> slot map: the keyed side of a table store (issue #17).

:class:`KeyedRows` is mixed into :class:`ekko.core.store.TableStore`.  A hashed table's
rows carry their key after the values (:mod:`ekko.core.hashed`); the map from keys to
the slots that hold them is built from those rows on first use, and afterwards the
store's writes only note the slots they write (``_note_written``) and the next lookup
rebinds those -- the apply path, which every push takes, pays nothing for it.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import torch

from ekko.core.errors import UsageError
from ekko.core.hashed import check_keys, keys_in
from ekko.core.key_index import EMPTY_KEY, KeyMap

#: slots written since a hashed table's key map was last used, past which the map is
#: dropped and built afresh at its next use (or a quarter of the table, if more).
KEY_MAP_MAX_PENDING = 1 << 18


class KeyedRows:
    """The key map of a hashed table store (a mixin of :class:`~ekko.core.store.TableStore`;
    its attributes are the store's)."""

    spec: Any
    values: torch.Tensor | None
    versions: np.ndarray
    tombstone: np.ndarray
    device: torch.device
    _key_map: KeyMap | None
    _key_map_of: torch.Tensor | None
    _key_pending: list[np.ndarray]
    _key_pending_rows: int
    _key_lock: threading.Lock
    # ``self._pos`` (rows as positions in ``values``) is HeldShards's: not declared here,
    # where a stub would come first in the store's method order.

    def _note_written(self, ids: np.ndarray) -> None:
        """Rows ``ids`` were written: the key map rebinds them at its next use."""
        with self._key_lock:
            if self._key_map is None:
                return
            self._key_pending.append(ids)
            self._key_pending_rows += len(ids)
            if self._key_pending_rows > max(KEY_MAP_MAX_PENDING, self.spec.rows // 4):
                self._key_map = None    # cheaper to build afresh than to rebind that many
                self._key_pending, self._key_pending_rows = [], 0

    def key_map(self) -> KeyMap:
        """A hashed table's key -> slot map, as the rows held now say (built on first use)."""
        self._check_keyed()
        with self._key_lock:
            return self._current_key_map()

    def _check_keyed(self) -> None:
        if not self.spec.hashed or self.values is None:
            raise UsageError(f"table {self.spec.name} has no keys (not hashed, or no values kept)")

    def _current_key_map(self) -> KeyMap:
        """:meth:`key_map`'s work, with ``_key_lock`` held."""
        if self._key_map is None or self._key_map_of is not self.values:
            self._key_pending, self._key_pending_rows = [], 0
            m = KeyMap(self.spec.rows)
            self._rebind(m, np.flatnonzero(self.versions > 0))
            self._key_map, self._key_map_of = m, self.values
        elif self._key_pending:
            slots = np.unique(np.concatenate(self._key_pending))
            self._key_pending, self._key_pending_rows = [], 0
            self._rebind(self._key_map, slots)
        return self._key_map

    def _rebind(self, m: KeyMap, slots: np.ndarray) -> None:
        """Bind ``slots`` in ``m`` to the keys their rows hold now (a tombstone, or a slot
        never written, holds none)."""
        if not len(slots):
            return
        # Only rows with a live version hold a key: the others are not read (a packed
        # store may no longer keep their shard).
        live = (self.versions[slots] > 0) & ~self.tombstone[slots]
        keys = np.full(len(slots), EMPTY_KEY, dtype=np.int64)
        if live.any():
            idx = torch.from_numpy(self._pos(slots[live])).to(self.device)   # a fresh array: writeable
            keys[live] = keys_in(self.values[:, self.spec.dim:].index_select(0, idx))
        m.rebind(slots, keys, self.versions)

    def held_keys(self) -> tuple[np.ndarray, np.ndarray]:
        """A hashed table's slots that hold a key, and their keys (slot order)."""
        m = self.key_map()
        slots = np.flatnonzero(m.keys_of(np.arange(self.spec.rows)) != EMPTY_KEY)
        return slots, m.keys_of(slots)

    def lookup(self, keys: Any) -> np.ndarray:
        """The slot holding each key of a hashed table, -1 where none does.

        Example:
            >>> from ekko.core.delta import Delta
            >>> from ekko.core.hashed import with_keys
            >>> from ekko.core.spec import TableSpec
            >>> from ekko.core.store import TableStore
            >>> ts = TableStore(TableSpec("h", dim=1, keys="int64", capacity=4), device="cpu")
            >>> rows = with_keys(np.ones((1, 1), np.float32), np.array([10**12]), ts.spec)
            >>> _ = ts.apply(Delta("m", "h", np.array([2]), np.array([5]), rows))
            >>> ts.lookup([10**12, 7]).tolist()
            [2, -1]
        """
        self._check_keyed()
        k = check_keys(keys)
        with self._key_lock:    # the map brought up to date and read at one instant
            return self._current_key_map().lookup(k)
