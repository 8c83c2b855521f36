"""Hand the heap's free pages back to the OS now and then (glibc ``malloc_trim``).

A daemon's large transient buffers -- publish bodies of a few MB, decoded values, push
frames of up to a MB -- come and go many times a second. glibc serves them from its
heap once its dynamic mmap threshold has risen past their size (after the first such
buffer is freed), and it keeps the freed pages resident: after a few minutes of 10k-row
publishes the ingest daemon peaked at 932 MB against a median of 711 MB over all nine
(``bench/throughput.py``; 793 / 640 MB with trims every second). ``malloc_trim(0)`` returns
the free pages inside the heap (``MADV_DONTNEED``) without changing how memory is
allocated, so the hot path keeps its reuse of warm buffers. A trim takes 0.3-3 ms here,
now and then 10-30 ms at a busy ingest (``ekko_heap_trim_seconds``).

:class:`HeapTrimmer` looks every ``config.heap_trim_interval`` seconds (0: never) and
trims when the resident size grew by :data:`HEAP_TRIM_SLACK_BYTES` since the last trim,
on a worker thread (ctypes releases the GIL for the call). Where there is no glibc it
does nothing.

Example:
    >>> t = HeapTrimmer()
    >>> t.trim() >= 0.0          # seconds it took (0.0 where there is no malloc_trim)
    True
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
import os
import time
from collections.abc import Callable

#: resident bytes the process may grow by since the last trim before the next: a trim
#: hands back every free page, and the pages a busy daemon reuses are then faulted in
#: and zeroed again (the kernel's share of the daemons' CPU went from 12-13% to 17% with
#: a trim every second), so it trims only when there is something to gain.
HEAP_TRIM_SLACK_BYTES = 32 << 20


_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def process_rss_bytes() -> int:
    """Resident memory of this process in bytes (Linux ``/proc/self/statm``; 0 elsewhere)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE_BYTES
    except (OSError, ValueError, IndexError):
        return 0


@functools.cache
def malloc_trim_fn() -> Callable[[int], int] | None:
    """The C library's ``malloc_trim`` (glibc), or None; looked up once (``find_library``
    runs ``ldconfig``)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


class HeapTrimmer:
    """Calls ``malloc_trim(0)`` on demand or on a timer (:meth:`run`)."""

    def __init__(self, observe: Callable[[float], None] = lambda seconds: None,
                 slack: int = HEAP_TRIM_SLACK_BYTES, rss: Callable[[], int] = process_rss_bytes) -> None:
        self._trim = malloc_trim_fn()
        self._observe = observe
        self._slack = slack
        self._rss = rss
        self._floor = rss()     # resident bytes right after the last trim (or the lowest since)

    def due(self) -> bool:
        """Whether the process grew by more than the slack since the last trim."""
        now = self._rss()
        self._floor = min(self._floor, now)
        return now - self._floor > self._slack

    @property
    def available(self) -> bool:
        """Whether this C library has ``malloc_trim`` (glibc)."""
        return self._trim is not None

    def trim(self) -> float:
        """Return free heap pages to the OS; the seconds it took (0.0 when unavailable)."""
        if self._trim is None:
            return 0.0
        t0 = time.perf_counter()
        self._trim(0)
        took = time.perf_counter() - t0
        self._floor = self._rss()
        self._observe(took)
        return took

    async def run(self, interval: float, stopped: Callable[[], bool]) -> None:
        """Every ``interval`` seconds until ``stopped()``, trim when :meth:`due`; nothing
        when ``interval`` is 0."""
        if interval <= 0 or self._trim is None:
            return
        loop = asyncio.get_running_loop()
        while not stopped():
            await asyncio.sleep(interval)
            if not self.due():
                continue
            # On a worker thread: a trim of a large heap can take milliseconds (madvise of
            # every free page), and the loop need not wait for it unless it allocates from
            # the same arena meanwhile.
            await loop.run_in_executor(None, self.trim)
