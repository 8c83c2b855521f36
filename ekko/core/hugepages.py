"""Large tables on transparent huge pages (Linux): fewer TLB misses for random rows.

An update touches rows spread over the whole table (random feature ids), so each of a
delta's rows is a TLB miss on 4 KiB pages: a 1M x 64 float32 table spans 65,536 of
them.  Where the kernel's transparent huge pages are in ``madvise`` mode (the default
of most distributions), memory asked for with ``madvise(MADV_HUGEPAGE)`` before its
first touch is backed by 2 MiB pages instead.  On this project's machine that made a
10k-row ``index_copy_`` into a 1M x 64 float32 table 2.0-2.1x faster and a 1k-row one
1.1-1.3x (timeit, warm caches); a whole ``TableStore.apply`` of 10k rows with its undo
capture and cold caches went from 3.35 to 3.13 ms (README, *Measured*, tenth round).

numpy already advises its own large arrays (the versions, the tombstones); torch does
not, so the table's values go through :func:`zeros_tensor`.  Only private CPU memory is
advised; shared memory, CUDA tensors and small tensors are left alone, and where
``madvise`` is missing or refuses, nothing changes but the page size.
``EKKO_HUGE_PAGES=0`` turns it off.

Example:
    >>> import torch
    >>> t = zeros_tensor((4, 2), torch.float32, "cpu")
    >>> t.sum().item(), tuple(t.shape)
    (0.0, (4, 2))
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from typing import Any

import torch

#: the huge page size madvise works in (x86-64 and arm64 with 4 KiB base pages).
HUGE_PAGE_BYTES = 2 << 20
#: arrays smaller than this are not worth a madvise (a few huge pages at most).
MIN_HUGE_BYTES = 8 << 20
#: ``madvise`` advice: back this range with transparent huge pages.
MADV_HUGEPAGE = 14

_libc: Any = None


def _madvise() -> Any:
    """libc's ``madvise``, or None where there is none to call (not Linux, no libc, off)."""
    global _libc
    if _libc is None:
        fn: Any = False
        if sys.platform == "linux" and os.environ.get("EKKO_HUGE_PAGES", "1") != "0":
            try:
                lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
                fn = lib.madvise
                fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
                fn.restype = ctypes.c_int
            except (OSError, AttributeError):
                fn = False
        _libc = fn
    return _libc or None


def advise_huge(address: int, nbytes: int) -> bool:
    """Ask for huge pages over the whole 2 MiB pages inside ``[address, address + nbytes)``.

    True when the kernel took the advice.  Call it before the memory is first touched:
    pages already faulted in stay small until the kernel's background collapse.
    """
    fn = _madvise()
    if fn is None or nbytes < MIN_HUGE_BYTES:
        return False
    start = (address + HUGE_PAGE_BYTES - 1) & ~(HUGE_PAGE_BYTES - 1)
    end = (address + nbytes) & ~(HUGE_PAGE_BYTES - 1)
    if end <= start:
        return False
    return fn(start, end - start, MADV_HUGEPAGE) == 0


def zeros_tensor(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """``torch.zeros`` whose CPU memory is advised onto huge pages before it is zeroed."""
    t = torch.empty(shape, dtype=dtype, device=device)
    if t.device.type == "cpu":
        advise_huge(t.data_ptr(), t.numel() * t.element_size())
    return t.zero_()

