"""The daemon's heap trimmer: it trims only when the process grew by its slack since the
last trim, and a trim hands freed heap pages back (glibc only)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from ekko.server.heap_trim import HeapTrimmer, process_rss_bytes


def test_a_trim_is_due_only_after_growth_beyond_the_slack():
    rss = [100]
    seen = []
    t = HeapTrimmer(seen.append, slack=10, rss=lambda: rss[0])
    assert not t.due()
    rss[0] = 110
    assert not t.due()
    rss[0] = 90            # shrank: the floor follows it down
    assert not t.due()
    rss[0] = 101
    assert t.due()
    if t.available:
        t.trim()           # the floor is what is resident after the trim
        assert len(seen) == 1 and seen[0] >= 0 and not t.due()


def test_the_loop_trims_when_due_and_stops():
    rss = [0]
    seen = []
    t = HeapTrimmer(seen.append, slack=10, rss=lambda: rss[0])
    if not t.available:
        pytest.skip("no malloc_trim in this C library")

    async def main():
        stop = []
        task = asyncio.create_task(t.run(0.01, lambda: bool(stop)))
        await asyncio.sleep(0.05)
        assert seen == []              # nothing grew
        rss[0] = 11
        for _ in range(100):
            await asyncio.sleep(0.01)
            if seen:
                break
        stop.append(True)
        await asyncio.wait_for(task, 1)
    asyncio.run(main())
    assert len(seen) == 1


def test_a_trim_returns_freed_heap_buffers_to_the_os():
    t = HeapTrimmer()
    if not t.available:
        pytest.skip("no malloc_trim in this C library")
    # Buffers of 1 MB, freed all but the last: glibc keeps them in its heap (its mmap
    # threshold rose past 1 MB with the first free), so they stay resident until a trim.
    keep = [np.ones(1 << 18, np.float32) for _ in range(2)]
    del keep[0]
    bufs = [np.ones(1 << 18, np.float32) for _ in range(150)]
    last = bufs[-1]
    del bufs
    before = process_rss_bytes()
    t.trim()
    after = process_rss_bytes()
    assert before - after > 64 << 20, (before >> 20, after >> 20)
    assert last.sum() == 1 << 18
