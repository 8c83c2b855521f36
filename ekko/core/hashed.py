"""How a hashed table's row carries its key: ``dim`` values, then the key's 8 bytes.

A hashed table (``TableSpec(keys="int64")``) stores each row as ``width = dim +
key_cols`` elements of its dtype: the values, then ``key_cols`` elements whose bytes
are the key's (little-endian int64, xored with :data:`KEY_BIAS` so that all-zero
bytes mean *no key*).  The key then travels with its row down every path that moves
rows -- publish, push, pull, repair, the undo history and rollback, snapshots, the
write-ahead log -- and a row and its key can never be applied apart.  A tombstone
(zeros) holds no key: deleting or evicting a key is writing a tombstone, or another
key, into its slot.

Only code that *reads* a row as numbers must look at its first ``dim`` elements
(:func:`values_of`); everything else moves the bytes as they are.  The key bytes are
never read as floats: any float conversion could quiet a NaN pattern and change them.

Example:
    >>> import numpy as np
    >>> from ekko.core.spec import TableSpec
    >>> t = TableSpec("ads", dim=2, keys="int64", capacity=8)
    >>> rows = with_keys(np.ones((2, 2), np.float32), np.array([7, -1]), t)
    >>> rows.shape, keys_of(rows, t).tolist(), values_of(rows, t).tolist()
    ((2, 4), [7, -1], [[1.0, 1.0], [1.0, 1.0]])
    >>> keys_of(np.zeros((1, 4), np.float32), t).tolist() == [EMPTY_KEY]   # no key
    True
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ekko.core.delta import WIRE_DTYPES
from ekko.core.errors import UsageError
from ekko.core.key_index import DELETED_KEY, EMPTY_KEY
from ekko.core.spec import TableSpec

#: stored key bytes = key ^ KEY_BIAS: the reserved :data:`EMPTY_KEY` is all zeros.
KEY_BIAS = np.int64(EMPTY_KEY)


def check_keys(keys: Any, what: str = "keys") -> np.ndarray:
    """1-d ``keys`` (an array, a list, or a CPU or device tensor) as an int64 array;
    :class:`UsageError` for anything else or a reserved key."""
    if hasattr(keys, "detach"):   # a torch tensor (a float or bool one fails the dtype check below)
        keys = keys.detach().to("cpu").numpy()
    k = np.asarray(keys)
    if k.ndim != 1 or not (np.issubdtype(k.dtype, np.integer) or k.size == 0):
        raise UsageError(f"{what} must be a 1-d array of integers, got {k.dtype} of shape {k.shape}")
    if k.dtype == np.uint64 and k.size and int(k.max()) > np.iinfo(np.int64).max:
        raise UsageError(f"{what}: uint64 keys above 2**63-1 do not fit int64; view them as int64")
    k = k.astype(np.int64, copy=False)
    if k.size and int(k.min()) <= DELETED_KEY:
        raise UsageError(f"{what}: {EMPTY_KEY} and {DELETED_KEY} are reserved, not keys")
    return k


def key_columns(keys: np.ndarray, spec: TableSpec) -> np.ndarray:
    """The ``(n, key_cols)`` elements (the table's wire dtype) that carry ``keys``."""
    stored = (np.asarray(keys, np.int64) ^ KEY_BIAS).astype("<i8", copy=False)
    return stored.view(WIRE_DTYPES[spec.dtype]).reshape(len(stored), spec.key_cols)


def with_keys(values: np.ndarray, keys: np.ndarray, spec: TableSpec) -> np.ndarray:
    """Rows of a hashed table: ``values`` ``(n, dim)`` (wire dtype) followed by their keys."""
    if not spec.hashed:
        raise UsageError(f"table {spec.name} is not hashed")
    values = np.asarray(values)
    if values.shape != (len(keys), spec.dim):
        raise UsageError(f"{spec.name}: values must be ({len(keys)}, {spec.dim}), got {values.shape}")
    return np.concatenate([values, key_columns(keys, spec)], axis=1)


def keys_of(rows: Any, spec: TableSpec) -> np.ndarray:
    """The key each stored row holds (:data:`EMPTY_KEY`: none); numpy or torch rows."""
    return keys_in(rows[:, spec.dim:])


def keys_in(tail: Any) -> np.ndarray:
    """The keys of rows' key columns (``rows[:, dim:]``); numpy or torch."""
    if hasattr(tail, "detach"):   # a torch tensor (any device): its bytes, on the CPU
        import torch
        tail = tail.detach().to("cpu").contiguous()
        raw = tail.view(torch.int16).numpy() if tail.dtype == torch.bfloat16 else tail.numpy()
    else:
        raw = np.ascontiguousarray(tail)
    return raw.view("<i8").reshape(len(raw)).astype(np.int64, copy=False) ^ KEY_BIAS


def values_of(rows: Any, spec: TableSpec) -> Any:
    """The ``dim`` values of stored rows (a view; a dense table's rows as they are)."""
    return rows[:, :spec.dim] if spec.hashed else rows
