"""RowCache (issue #18's hot-row cache): rows served from the serving process, read from a
real daemon on a miss, and kept fresh by its change feed -- updates, a rollback's lower
versions and a hashed key's eviction reach the cache with no read."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ekko import Client, ModelSpec, Publisher, RowCache, TableSpec
from ekko.core.errors import UsageError
from tests.procs import DaemonGroup, wait_for

SPEC = ModelSpec("m", [TableSpec("emb", rows=5000, dim=4),
                       TableSpec("ads", dim=4, keys="int64", capacity=64, shards=1, eviction="lru")])


def test_cached_rows_follow_updates_rollbacks_and_evictions_without_reads(tmp_path):
    rng = np.random.default_rng(3)
    with DaemonGroup(tmp_path) as g:
        d = g.start("a", "dc0")
        with Publisher([d.address], origin="t", state_dir=tmp_path / "pub") as pub:
            pub.register(SPEC)
            pub.on_rollback(lambda event: None)         # this trainer goes on after the rollback
            ids = np.arange(100, dtype=np.int64)
            first = rng.standard_normal((100, 4)).astype(np.float32)
            pub.publish("m", "emb", ids, first)
            keys = np.arange(10**12, 10**12 + 64, dtype=np.int64)
            kv = rng.standard_normal((64, 4)).astype(np.float32)
            pub.publish("m", "ads", keys, kv)
            with RowCache(d.address, "m", "emb", capacity=1000) as cache, \
                    RowCache(d.address, "m", "ads", capacity=100) as hot:
                assert torch.equal(cache.lookup(torch.from_numpy(ids[:50])), torch.from_numpy(first[:50]))
                assert (cache.hits, cache.misses) == (0, 50)
                assert torch.equal(cache.lookup(ids[:50].reshape(5, 10)), torch.from_numpy(first[:50]).reshape(5, 10, 4))
                assert (cache.hits, cache.misses) == (50, 50)
                cut = pub.cut("m", "first")
                second = rng.standard_normal((100, 4)).astype(np.float32)
                pub.publish("m", "emb", ids, second)            # cached rows change at the replica
                wait_for(lambda: torch.equal(cache.lookup(ids[:50]), torch.from_numpy(second[:50])), 30, 0.05,
                         "the feed to refresh the cached rows")
                assert cache.misses == 50 and cache.refreshed >= 50, "refreshed by the feed, not read again"
                Client(d.address).rollback("m", cut)              # versions go back down
                wait_for(lambda: torch.equal(cache.lookup(ids[:50]), torch.from_numpy(first[:50])), 30, 0.05,
                         "the rollback to reach the cache")
                assert cache.misses == 50
                # A hashed table by key; a cached key evicted at the replica leaves the cache.
                assert torch.equal(hot.lookup(keys[:10]), torch.from_numpy(kv[:10]))
                assert torch.equal(hot.lookup([7]), torch.zeros(1, 4)), "a key not held reads as zeros"
                pub.publish("m", "ads", keys[10:], kv[10:])      # keys[:10] are now the least recent
                newcomers = np.arange(5, 15, dtype=np.int64)
                pub.publish("m", "ads", newcomers, rng.standard_normal((10, 4)).astype(np.float32))
                wait_for(lambda: hot.rows == 0, 30, 0.05, "the evicted keys to leave the cache")
                assert torch.equal(hot.lookup(keys[:10]), torch.zeros(10, 4))


def test_a_cache_must_be_started_and_sized(tmp_path):
    with DaemonGroup(tmp_path) as g:
        d = g.start("a", "dc0")
        with Publisher([d.address], origin="t", state_dir=tmp_path / "pub") as pub:
            pub.register(SPEC)
        c = RowCache(d.address, "m", "emb", capacity=10)
        with pytest.raises(UsageError, match="start"):
            c.lookup([1])
        c.start()
        for bad in ([1.5], [5000], [-1]):                    # not an integer, out of range
            with pytest.raises(UsageError):
                c.lookup(bad)
        assert c.rows == 0 and c.misses == 0
        c.stop()
        with pytest.raises(UsageError):
            RowCache(d.address, "m", "emb", capacity=0)
