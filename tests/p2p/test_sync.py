"""Unit tests of the per-shard sync state and the per-table recent-row index."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from ekko.core.delta import Delta
from ekko.core.spec import TableSpec
from ekko.core.store import TableStore
from ekko.core.version import ORIGIN_BITS, Knowledge
from p2p import sync
from p2p.sync import SCAN_INSTEAD_RATIO as SCAN_RATIO
from p2p.sync import RecentIndex, ShardSync


def v(counter, origin=1):
    return (np.asarray(counter, np.int64) << ORIGIN_BITS) | origin


def test_chain_waits_for_its_predecessor_then_jumps():
    s = ShardSync()
    assert s.chain(1, after=0, upto=10)
    assert not s.chain(1, after=20, upto=30)       # gap (10, 20] missing
    assert s.knowledge[1] == 10 and s.pending
    assert s.chain(1, after=10, upto=20)           # fills the gap; the waiting chain resolves
    assert s.knowledge[1] == 30 and not s.pending
    assert not s.chain(1, after=-1, upto=99)       # unchained frames prove nothing
    assert s.knowledge[1] == 30


def test_learn_respects_a_cut_answer():
    s = ShardSync()
    assert s.learn(Knowledge({1: 100, 2: 50}), cut_below=40)
    assert s.knowledge[1] == 39 and s.knowledge[2] == 39
    assert s.learn(Knowledge({1: 100, 2: 50}), cut_below=None)
    assert s.knowledge[1] == 100 and s.knowledge[2] == 50
    assert not s.learn(Knowledge({1: 10}), cut_below=None)   # never backwards


def test_learn_resolves_pending_chains():
    s = ShardSync()
    s.chain(1, after=50, upto=60)
    s.learn(Knowledge({1: 50}), cut_below=None)
    assert s.knowledge[1] == 60


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(0, 255), min_size=1, max_size=30, unique=True), min_size=1, max_size=12),
       st.lists(st.tuples(st.integers(0, 255), st.integers(1, 256)), max_size=6))
def test_recent_index_candidates_match_brute_force(batches, queries):
    """Interleaved appends and range queries (a merge happens on every query), for the
    sparse index and the dense one of small tables."""
    for ix in (RecentIndex(), RecentIndex(rows=256)):
        seen: set[int] = set()
        c = 1
        qi = iter(queries)
        for b in batches:
            ids = np.array(b, np.int64)
            ix.note_applied(ids, v(np.arange(c, c + len(ids))), now=float(c), limit=1 << 20)
            c += len(ids)
            seen.update(b)
            q = next(qi, None)
            if q is not None:
                lo, hi = min(q), max(q)
                want = sorted(x for x in seen if lo <= x < hi)
                assert ix.candidates(lo, hi).tolist() == want
        assert ix.candidates(0, 256).tolist() == sorted(seen)
        ix.reset()
        assert ix.candidates(0, 256).tolist() == [] and ix.needs_scan(Knowledge(), Knowledge({1: 1}))


def test_recent_index_watermark_falls_back_to_scans():
    spec = TableSpec("t", rows=1000, dim=1, shards=1)
    ts = TableStore(spec, device="cpu", with_values=False)
    ix = RecentIndex()
    for c in range(1, 201):
        d = Delta("m", "t", np.array([c * 3 % 1000]), v([c]))
        res = ts.apply(d)
        ix.note_applied(res.ids, res.versions, now=c, limit=64)
    assert ix.watermark > 0 and len(ix) <= 64
    theirs = Knowledge({1: 10})
    ids, vers = ix.newer_than(ts, 0, theirs, Knowledge({1: 200}))
    want_ids, want_vers = ts.scan_newer(0, theirs)
    assert ids.tolist() == want_ids.tolist() and (np.diff(vers) >= 0).all()
    assert len(ids) == 190


@pytest.mark.parametrize("rows", [None, 10])
def test_recent_index_fresh_since(rows):
    ix = RecentIndex(rows)
    ix.note_applied(np.array([1, 2]), v([1, 2]), now=1.0, limit=100)
    ix.note_applied(np.array([3]), v([3]), now=5.0, limit=100)
    assert sorted(ix.fresh_since(4.0, 0, 10).tolist()) == [3]
    assert sorted(ix.fresh_since(0.0, 2, 10).tolist()) == [2, 3]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(0, 999), min_size=1, max_size=40, unique=True), min_size=1, max_size=60),
       st.integers(16, 200), st.lists(st.tuples(st.integers(0, 59), st.integers(0, 999), st.integers(1, 300)),
                                      min_size=1, max_size=10))
def test_a_compacted_sparse_index_becomes_a_log_that_never_merges(batches, limit, asks):
    """After its first compaction every lookup scans, so the sparse index only answers
    fresh_since: it keeps the newest chunks as they came (no merge) and, over the rows it
    still holds, answers exactly what the applies since that time were."""
    ix = RecentIndex()
    applied: list[tuple[float, list[int]]] = []
    c = 1
    for i, b in enumerate(batches):
        ix.note_applied(np.array(b, np.int64), v(np.arange(c, c + len(b))), now=float(i), limit=limit)
        applied.append((float(i), b))
        c += len(b)
    if not ix.loose_below_watermark:
        return
    ids_before = ix._ids
    now = float(len(batches))
    for r in range(limit + 1):                         # past the limit at least once more
        ix.note_applied(np.array([r * 7 % 1000], np.int64), v([c]), now=now, limit=limit)
        applied.append((now, [r * 7 % 1000]))
        assert ix._ids is ids_before or len(ix._ids) == 0   # never merged into, at most dropped
        c += 1
        now += 1.0
    assert len(ix) <= limit
    # The log holds (at least) the newest chunks: within them, fresh_since is exact.
    oldest_held = min(t for _, _, t in ix._chunks) if ix._chunks else float(len(batches))
    for since, lo, width in asks:
        t = max(float(since), oldest_held)
        want = sorted({r for at, b in applied if at >= t for r in b if lo <= r < lo + width})
        assert ix.fresh_since(t, lo, lo + width).tolist() == want


def test_small_tables_get_a_dense_index_that_never_merges():
    assert RecentIndex(sync.DENSE_INDEX_MAX_ROWS)._dense_rows
    assert not RecentIndex(sync.DENSE_INDEX_MAX_ROWS + 1)._dense_rows
    ix = RecentIndex(100)
    for c in range(1, 500):
        ix.note_applied(np.array([c % 100, (c * 7) % 100]), v([c, c]), now=float(c), limit=64)
    assert not ix._chunks and ix.watermark == 0          # nothing pending, nothing forgotten
    assert ix.candidates(0, 100).tolist() == list(range(100))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.tuples(st.integers(0, 99), st.integers(1, 3)), min_size=1, max_size=20),
                min_size=1, max_size=10),
       st.lists(st.tuples(st.integers(0, 7), st.dictionaries(st.integers(1, 4), st.integers(0, 60), max_size=3)),
                min_size=1, max_size=8),
       st.integers(16, 400))
def test_newer_than_many_matches_newer_than_per_shard(batches, asks, limit):
    """Several origins, per-shard knowledge, repeated shards, watermark scans: the batched
    lookup answers exactly what one newer_than per shard answers (ids and order)."""
    spec = TableSpec("t", rows=100, dim=1, shards=8)
    ts = TableStore(spec, device="cpu", with_values=False)
    ix, dense = RecentIndex(), RecentIndex(rows=100)
    c = 1
    for b in batches:
        ids = np.array([r for r, _ in b], np.int64)
        origins = np.array([o for _, o in b], np.int64)
        d = Delta("m", "t", ids, (np.arange(c, c + len(ids), dtype=np.int64) << ORIGIN_BITS) | origins)
        res = ts.apply(d)
        ix.note_applied(res.ids, res.versions, now=float(c), limit=limit)
        dense.note_applied(res.ids, res.versions, now=float(c), limit=limit)
        c += len(ids)
    shards = [s for s, _ in asks]
    theirs = [Knowledge(k) for _, k in asks]
    mine = [Knowledge({o: c for o in range(1, 5)})] * len(asks)
    want = [ix.newer_than(ts, s, t, m) for s, t, m in zip(shards, theirs, mine)]
    # Both ways of answering: through the index, and by scanning the shards' rows.
    for ratio in (0, 10**9):
        sync.SCAN_INSTEAD_RATIO = ratio
        try:
            got = ix.newer_than_many(ts, shards, theirs, mine)
        finally:
            sync.SCAN_INSTEAD_RATIO = SCAN_RATIO
        for (gi, gv), (wi, wv) in zip(got, want):
            assert gi.tolist() == wi.tolist() and gv.tolist() == wv.tolist()
    got = dense.newer_than_many(ts, shards, theirs, mine)   # the dense index of a small table
    for (gi, gv), (wi, wv) in zip(got, want):
        assert gi.tolist() == wi.tolist() and gv.tolist() == wv.tolist()
