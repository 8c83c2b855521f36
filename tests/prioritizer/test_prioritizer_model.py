"""Differential tests: the vectorized queues against a plain-Python reference model.

The reference keeps a dict per row and sorts on every take: obviously right,
hopelessly slow.  Random workloads (repeats, several tables, a budget, an
overloaded bound, tiny head sizes so the head cache refills and truncates all
the time) must produce exactly the same frames, depth and drop counts.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import prioritizer.queue_slots as pq
from p2p.outbound import QueuedRows
from prioritizer.budget import TokenBucket
from prioritizer.queue import FifoBudgetQueue, PriorityLinkQueue, QueueConfig
from prioritizer.rowindex import RowIndex

TABLES = [("m1", "a", 84), ("m1", "b", 20), ("m2", "a", 200)]


class RefQueue:
    """Reference semantics of PriorityLinkQueue / FifoBudgetQueue."""

    def __init__(self, bucket, cfg: QueueConfig, fifo: bool):
        self.bucket, self.cfg, self.fifo = bucket, cfg, fifo
        self.rows: dict[tuple, list] = {}        # key -> [ver, key, score, high, t0, nb]
        self.t_origin = None
        self.dropped = 0
        self.seq = 0.0
        self.reserve = 0.0 if (fifo or bucket is None) else cfg.high_reserve * bucket.burst
        self.boost = cfg.promote_after_s / cfg.aging_s
        self.inv = 1.0 / cfg.aging_s

    def put(self, rows: QueuedRows, now: float):
        if self.t_origin is None:
            self.t_origin = now
        nb = 16 + rows.row_bytes
        for i in range(len(rows)):
            s = 0.0 if rows.scores is None else float(np.float32(rows.scores[i]))
            h = False if rows.high is None else bool(rows.high[i])
            if self.fifo:
                k = -self.seq
                self.seq += 1
            else:
                sc = np.float64(np.float32(s))
                k = float(sc / (sc + self.cfg.score_scale) + (-(now - self.t_origin) * self.inv))
                if h:
                    k += self.boost
            rk = (rows.model, rows.table, int(rows.ids[i]))
            e = self.rows.get(rk)
            if e is None:
                self.rows[rk] = [int(rows.versions[i]), k, s, h, now, nb]
            else:
                e[0] = max(e[0], int(rows.versions[i]))
                e[1] = max(e[1], k)
                e[2] = max(e[2], s)
                e[3] = e[3] or h
        self._bound()

    def _bound(self):
        cfg = self.cfg
        nbytes = sum(e[5] for e in self.rows.values())
        over_r = len(self.rows) > cfg.max_rows
        over_b = cfg.max_backlog_bytes is not None and nbytes > cfg.max_backlog_bytes
        if not (over_r or over_b):
            return
        keep = 1 - cfg.drop_slack
        tr = int(cfg.max_rows * keep) if over_r else math.inf
        tb = int(cfg.max_backlog_bytes * keep) if over_b else math.inf
        # FIFO drops the oldest (greatest key); priority the lowest key
        order = sorted(self.rows, key=lambda r: self.rows[r][1], reverse=self.fifo)
        for r in order:
            if len(self.rows) <= tr and nbytes <= tb:
                break
            nbytes -= self.rows.pop(r)[5]
            self.dropped += 1

    def take(self, now: float, max_bytes: int):
        if not self.rows:
            return []
        tokens = self.bucket.available(now) if self.bucket else math.inf
        cut = -math.inf if self.fifo else self.boost - (now - self.t_origin) * self.inv - 1e-9
        order = sorted(self.rows, key=lambda r: self.rows[r][1], reverse=True)
        cap = max(max_bytes, self.rows[order[0]][5])
        l_all, l_low = min(cap, tokens), min(cap, tokens - self.reserve)
        cum, out = 0, []
        for r in order:
            e = self.rows[r]
            lim = l_all if e[1] >= cut else l_low
            if cum + e[5] > lim:
                break
            cum += e[5]
            out.append(r)
        if self.bucket and cum:
            assert self.bucket.consume(cum, now)
        return [(r, self.rows.pop(r)) for r in out]


def _frames_as_rows(frames):
    got = []
    for f in frames:
        for i in range(len(f)):
            got.append(((f.model, f.table, int(f.ids[i])), int(f.versions[i]), float(f.enqueued_at[i])))
    return got


@pytest.mark.parametrize("fifo", [False, True])
@pytest.mark.parametrize("seed", range(6))
def test_queue_matches_reference(monkeypatch, fifo, seed):
    # tiny head so refills, truncation and the dirty-head filter run constantly
    monkeypatch.setattr(pq, "HEAD_TARGET_ROWS", 16)
    monkeypatch.setattr(pq, "HEAD_MAX_FACTOR", 2)
    monkeypatch.setattr(pq, "HEAD_DEPTH_SHIFT", 3)         # deeper queues get bigger heads
    rng = np.random.default_rng(seed)
    with_bucket = seed % 3 != 0
    cfg = QueueConfig(max_rows=int(rng.integers(50, 400)),
                      max_backlog_bytes=int(rng.integers(5_000, 40_000)) if seed % 2 else None,
                      drop_slack=float(rng.choice([0.0, 0.1])), aging_s=float(rng.choice([0.5, 2.0])),
                      promote_after_s=float(rng.choice([0.0, 1.0, 5.0])), high_reserve=0.3,
                      score_scale=float(rng.choice([0.5, 1.0, 3.0])))

    def bucket():
        return TokenBucket(20_000, 4_000) if with_bucket else None

    if fifo:
        q = FifoBudgetQueue(bucket(), cfg.max_rows, cfg.max_backlog_bytes, cfg.drop_slack)
    else:
        q = PriorityLinkQueue(bucket(), cfg)
    ref = RefQueue(bucket(), cfg, fifo)
    now = 0.0
    for step in range(300):
        now += float(rng.choice([0.0, 0.01, 0.05]))
        if rng.random() < 0.6:
            m, t, rb = TABLES[int(rng.integers(len(TABLES)))]
            n = int(rng.integers(1, 60))
            ids = rng.integers(0, 300, n)              # small id space: many repeats
            vers = rng.integers(1, 1000, n)
            scores = rng.random(n).astype(np.float32) * 4   # continuous: no ties in the order
            high = (rng.random(n) < 0.2) if rng.random() < 0.8 else None
            rows = QueuedRows(m, t, ids, vers, rb, scores=scores, high=high)
            q.put(rows, now)
            ref.put(rows, now)
        else:
            mb = int(rng.choice([1, 500, 3_000, 100_000]))
            got = _frames_as_rows(q.take(now, mb))
            want = [(r, e[0], e[4]) for r, e in ref.take(now, mb)]
            assert sorted(got) == sorted(want), step
        assert q.rows == len(ref.rows), step
        assert q.dropped == ref.dropped, step
        assert q.queued_bytes == sum(e[5] for e in ref.rows.values())
        st = q.stats()
        assert st.rows_high == sum(1 for e in ref.rows.values() if e[3])
    # drain and compare what is left
    while ref.rows:
        now += 1.0
        got = _frames_as_rows(q.take(now, 100_000))
        want = [(r, e[0], e[4]) for r, e in ref.take(now, 100_000)]
        assert sorted(got) == sorted(want)
    assert q.rows == 0 and q.take(now + 1, 100_000) == []


def test_row_index_matches_dict():
    rng = np.random.default_rng(1)
    ix, ref = RowIndex(), {}
    nxt = 0
    for it in range(1500):
        ks = rng.integers(0, 20_000, int(rng.integers(0, 400)))
        v = ix.get(ks)
        assert v.tolist() == [ref.get(int(k), -1) for k in ks], it
        absent = np.unique(ks[v < 0])
        ix.insert(absent, np.arange(nxt, nxt + len(absent)))
        ref.update(zip(absent.tolist(), range(nxt, nxt + len(absent))))
        nxt += len(absent)
        dk = rng.integers(0, 20_000, int(rng.integers(0, 350)))     # repeats and absent keys
        ix.delete(dk)
        for k in dk.tolist():
            ref.pop(k, None)
        assert len(ix) == len(ref) == int((ix.keys != -1).sum()), it


def test_row_index_grows_and_survives_crowding():
    # many keys into a small table: growth, long eviction chains, the scalar tail
    rng = np.random.default_rng(2)
    ix = RowIndex()
    keys = rng.permutation(np.unique(rng.integers(0, 1 << 40, 210_000)))[:200_000]
    for i in range(0, keys.shape[0], 5_000):
        ix.insert(keys[i:i + 5_000], np.arange(i, i + 5_000))
    assert (ix.get(keys) == np.arange(keys.shape[0])).all()
    assert len(ix) <= 0.4 * ix.capacity
    # clustered ids (the common case: consecutive rows) hash apart
    ix2 = RowIndex()
    ix2.insert(np.arange(100_000, dtype=np.int64), np.arange(100_000))
    assert (ix2.get(np.arange(100_000, dtype=np.int64)) == np.arange(100_000)).all()


def test_row_index_group():
    rng = np.random.default_rng(3)
    ix = RowIndex()
    for n, space in [(0, 1), (1, 1), (50, 5), (2_000, 1_500), (5_000, 1 << 40)]:
        keys = rng.integers(0, space, n)
        rep = ix.group(keys)
        assert (keys[rep] == keys).all() and (rep[rep] == rep).all()
        assert np.unique(rep).shape[0] == np.unique(keys).shape[0]
