"""The delta record: a batch of row updates to one table.

A :class:`Delta` is what publishers emit and what replicas exchange: row ids,
their new values, the packed version of each row (see :mod:`ekko.core.version`),
tombstone flags (a tombstone resets the row to zeros; deletes and evictions are
rows, not missing messages), and optional per-row impact metadata (the L2 norm
of the change, computed by the publisher, used by the scheduler).

Values are numpy arrays; ``values`` may be ``None`` in the simulator's
metadata mode, where replicas keep versions and sizes but no values.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ekko.core.errors import UsageError
from ekko.core.key_index import DELETED_KEY
from ekko.core.spec import TableSpec

#: numpy dtype used to carry each table dtype (bfloat16 travels as raw uint16 bits).
WIRE_DTYPES = {"float32": np.float32, "float16": np.float16, "float64": np.float64, "bfloat16": np.uint16}


@dataclass(frozen=True, slots=True)
class Delta:
    """Row updates to one table of one model.

    Args:
        model: model name.
        table: table name.
        ids: int64 row ids, shape ``(n,)``.
        versions: packed int64 versions, shape ``(n,)``.
        values: ``(n, width)`` array in the table's wire dtype (``width`` is ``dim``, and a
            hashed table's key columns: :mod:`ekko.core.hashed`), or None (metadata mode).
        tombstone: bool ``(n,)`` or None (no tombstones).
        impact: float32 ``(n,)`` magnitude of each change, or None (unknown).

    Example:
        >>> import numpy as np
        >>> d = Delta("m", "t", np.array([3, 1]), np.array([10, 11]), np.zeros((2, 4), np.float32))
        >>> len(d), d.nbytes
        (2, 64)
    """

    model: str
    table: str
    ids: np.ndarray
    versions: np.ndarray
    values: np.ndarray | None = None
    tombstone: np.ndarray | None = None
    impact: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @property
    def nbytes(self) -> int:
        """Payload bytes: ids + versions + values (+ flags)."""
        n = self.ids.nbytes + self.versions.nbytes
        if self.values is not None:
            n += self.values.nbytes
        if self.tombstone is not None:
            n += self.tombstone.nbytes
        if self.impact is not None:
            n += self.impact.nbytes
        return n

    def check(self, spec: TableSpec, error: type[Exception] = UsageError) -> None:
        """Validate shapes, dtypes and ranges against the table; raises ``error``."""
        n = len(self)
        if self.ids.dtype != np.int64 or self.ids.ndim != 1:
            raise error(f"{self.model}/{self.table}: ids must be a 1-D int64 array")
        if self.versions.dtype != np.int64 or self.versions.shape != (n,):
            raise error(f"{self.model}/{self.table}: versions must be int64 of shape ({n},)")
        if n and (int(self.ids.min()) < 0 or int(self.ids.max()) >= spec.rows):
            raise error(f"{self.model}/{self.table}: row id out of range 0..{spec.rows - 1}")
        if n and int(self.versions.min()) <= 0:
            raise error(f"{self.model}/{self.table}: versions must be positive")
        if self.values is not None:
            want = WIRE_DTYPES[spec.dtype]
            # A hashed table's rows carry their key after the values (ekko.core.hashed).
            if self.values.dtype != want or self.values.shape != (n, spec.width):
                raise error(f"{self.model}/{self.table}: values must be {np.dtype(want).name} "
                            f"of shape ({n}, {spec.width}), got {self.values.dtype} {self.values.shape}")
            if spec.hashed and n:
                # The key bytes (ekko.core.hashed: key ^ KEY_BIAS) must not hold the reserved
                # DELETED_KEY marker, stored as 1 (zeros, no key, are a delete or eviction).
                stored = np.ascontiguousarray(self.values[:, spec.dim:]).view("<i8").reshape(n)
                if (stored == 1).any():
                    raise error(f"{self.model}/{self.table}: a row's key is the reserved value {DELETED_KEY}")
        for name, arr, dt in (("tombstone", self.tombstone, np.bool_), ("impact", self.impact, np.float32)):
            if arr is not None and (arr.dtype != dt or arr.shape != (n,)):
                raise error(f"{self.model}/{self.table}: {name} must be {np.dtype(dt).name} of shape ({n},)")

    def take(self, idx: np.ndarray) -> "Delta":
        """The sub-delta at positions ``idx`` (a boolean mask or indices)."""
        pick = lambda a: None if a is None else a[idx]  # noqa: E731
        return Delta(self.model, self.table, self.ids[idx], self.versions[idx], pick(self.values),
                     pick(self.tombstone), pick(self.impact))

    def latest_per_row(self) -> "Delta":
        """Collapse duplicate ids to the greatest version of each (vectorized)."""
        if len(self) < 2:
            return self
        order = np.lexsort((-self.versions, self.ids))   # ids asc, versions desc
        ids = self.ids[order]
        first = np.ones(len(ids), dtype=bool)
        first[1:] = ids[1:] != ids[:-1]
        if first.all():
            return self
        return self.take(order[first])

    @staticmethod
    def concat(deltas: "list[Delta]") -> "Delta":
        """Concatenate deltas of the same table."""
        if not deltas:
            raise UsageError("concat of no deltas")
        if len(deltas) == 1:
            return deltas[0]
        d0 = deltas[0]

        def cat(attr: str) -> np.ndarray | None:
            parts = [getattr(d, attr) for d in deltas]
            if all(p is None for p in parts):
                return None
            if attr == "values":
                if any(p is None for p in parts):
                    raise UsageError("cannot concat deltas with and without values")
                return np.concatenate(parts)
            fill = {"tombstone": np.bool_, "impact": np.float32}[attr]
            return np.concatenate([p if p is not None else (np.zeros(len(d), fill) if attr == "tombstone"
                                                            else np.full(len(d), np.nan, np.float32))
                                   for p, d in zip(parts, deltas)])

        return Delta(d0.model, d0.table, np.concatenate([d.ids for d in deltas]),
                     np.concatenate([d.versions for d in deltas]), cat("values"), cat("tombstone"), cat("impact"))
