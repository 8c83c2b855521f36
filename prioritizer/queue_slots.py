"""Storage of a link queue (:mod:`prioritizer.queue`): the queued rows in numpy slots,
the coalescing index, the sorted head and the memory bound.

:class:`RowSlots` keeps rows by composite (table, row) key and their static sort key
(the queue decides the keys; see :mod:`prioritizer.queue` for the order, the head and
the bound).  A slot's fields live in parallel arrays (a free list recycles slots); a
vectorized cuckoo hash (:class:`prioritizer.rowindex.RowIndex`) maps a composite key
to its slot for coalescing; the *head* holds the slots whose key is above a cut
``theta``, sorted, so a take reads a contiguous prefix.
"""

from __future__ import annotations

import math

import numpy as np

from ekko.core.errors import UsageError
from prioritizer.rowindex import RowIndex

#: bits of the composite (table, row) key that hold the row id; row ids must be
#: below 2**47 (1.4e14 rows) and a queue may see at most 2**16 tables.
ROW_ID_BITS = 47
#: largest row id a queue accepts.
MAX_ROW_ID = (1 << ROW_ID_BITS) - 1
#: most distinct (model, table) pairs one queue may see.
MAX_TABLES = 1 << (63 - ROW_ID_BITS)
#: wire bytes of a row besides its value: id + version (as ``QueuedRows.nbytes``).
ROW_OVERHEAD_BYTES = 16
#: rows a head refill brings in: large enough that refills (one argpartition
#: over the queue) are rare, small enough that merging incoming rows is cheap
#: (8k..32k measured within noise of each other in bench/scheduler.py).
HEAD_TARGET_ROWS = 1 << 14
#: a refill of a deeper queue brings in 1 / 2**HEAD_DEPTH_SHIFT of it instead.
HEAD_DEPTH_SHIFT = 4
#: the head is cut back to its refill size when incoming rows grow it past this
#: many times that size.
HEAD_MAX_FACTOR = 4
# slot state bits: holds a queued row / is in the sorted head (or on its way in) /
# on its way in, so any older entry of the slot in the sorted head is stale
_ALIVE, _INHEAD, _MOVED = np.uint8(1), np.uint8(2), np.uint8(4)


class RowSlots:
    """Queued rows of one link: slots, coalescing index, sorted head, bound, depth counters.

    Rows are kept in descending key order for taking; over ``max_rows`` (or
    ``max_backlog_bytes``) the lowest keys are dropped (the highest when
    ``drop_highest_keys``), down to ``1 - drop_slack`` of the bound.
    """

    def __init__(self, max_rows: int, max_backlog_bytes: int | None, drop_slack: float) -> None:
        self.max_rows = int(max_rows)
        self.max_backlog_bytes = max_backlog_bytes
        self.drop_slack = drop_slack
        #: FIFO drops the oldest rows, which have the greatest keys
        self.drop_highest_keys = False
        self.index = RowIndex()
        self.tables: list[tuple[str, str, int]] = []
        self.tid: dict[tuple[str, str], int] = {}
        self.min_nb = 0
        self.cap = 0
        self.free = np.zeros(0, np.int32)
        self.nfree = 0
        self.grow(1024)
        # the head: slots sorted by key, best first, with their negated keys (ascending,
        # for searchsorted) and wire bytes alongside, so a take reads contiguous memory
        self.head = np.zeros(0, np.int32)
        self.hnk = np.zeros(0, np.float64)
        self.hnb = np.zeros(0, np.int64)
        self.incoming: list[np.ndarray] = []
        self.head_dirty = False
        self.theta = -math.inf          # every live slot with key > theta is in the head
        self.head_target = HEAD_TARGET_ROWS
        # depth and drop counters
        self.rows = self.rows_high = self.bytes = self.bytes_high = 0
        self.dropped_cls = [0, 0]
        self.coalesced = 0

    # -- slot storage ---------------------------------------------------------------------
    def grow(self, extra: int) -> None:
        old = self.cap
        new = max(2 * old, old + extra, 1024)

        def ext(a: np.ndarray | None, dtype: type, fill: object = 0) -> np.ndarray:
            out = np.full(new, fill, dtype=dtype)
            if a is not None:
                out[:old] = a
            return out

        g = getattr
        self.rk = ext(g(self, "rk", None), np.int64)
        self.ver = ext(g(self, "ver", None), np.int64)
        self.key = ext(g(self, "key", None), np.float64)
        self.score = ext(g(self, "score", None), np.float32)
        self.high = ext(g(self, "high", None), np.bool_, False)
        self.t0 = ext(g(self, "t0", None), np.float64)
        self.nb = ext(g(self, "nb", None), np.int64)
        # one flags byte per slot (_ALIVE, _INHEAD, _MOVED): one gather tests all three
        self.state = ext(g(self, "state", None), np.uint8, 0)
        self.scratch = np.empty(new, np.int64)
        # free list: a stack in free[:nfree]; pushing the new slots highest first
        # makes the lowest pop first, keeping live slots dense at the bottom
        free = np.empty(new, np.int32)
        free[:self.nfree] = self.free[:self.nfree]
        free[self.nfree:self.nfree + new - old] = np.arange(new - 1, old - 1, -1, dtype=np.int32)
        self.free = free
        self.nfree += new - old
        self.cap = new

    def alloc(self, k: int) -> np.ndarray:
        if self.nfree < k:
            self.grow(k - self.nfree)
        self.nfree -= k
        return self.free[self.nfree:self.nfree + k].copy()

    def release(self, slots: np.ndarray, rk: np.ndarray | None = None, hi: np.ndarray | None = None,
                 nb: np.ndarray | None = None) -> None:
        """Forget rows (taken or dropped): index, flags, depth counters, free list.
        ``rk``, ``hi``, ``nb``: the slots' fields when the caller already gathered them."""
        self.index.delete(self.rk[slots] if rk is None else rk)
        self.state[slots] = 0
        hi = self.high[slots] if hi is None else hi
        nb = self.nb[slots] if nb is None else nb
        nhi = int(np.count_nonzero(hi))
        self.rows -= slots.shape[0]
        self.rows_high -= nhi
        self.bytes -= int(nb.sum())
        if nhi:
            self.bytes_high -= int(nb[hi].sum())
        self.free[self.nfree:self.nfree + slots.shape[0]] = slots
        self.nfree += slots.shape[0]

    def table_id(self, model: str, table: str, row_bytes: int) -> int:
        t = self.tid.get((model, table))
        if t is None:
            if len(self.tables) >= MAX_TABLES:
                raise UsageError(f"a link queue holds at most {MAX_TABLES} tables")
            if row_bytes < 0:
                raise UsageError(f"row_bytes must be >= 0, got {row_bytes}")
            t = self.tid[(model, table)] = len(self.tables)
            self.tables.append((model, table, int(row_bytes)))
            nb = ROW_OVERHEAD_BYTES + int(row_bytes)
            self.min_nb = nb if self.min_nb == 0 else min(self.min_nb, nb)
        elif self.tables[t][2] != row_bytes:
            raise UsageError(f"{model}/{table}: row_bytes changed from {self.tables[t][2]} to {row_bytes}")
        return t

    def add(self, rk: np.ndarray, vers: np.ndarray, key: np.ndarray, score: np.ndarray, high: np.ndarray,
            nb: int, now: float) -> None:
        """Queue rows by composite key ``rk`` (each ``nb`` wire bytes); a row already queued
        keeps the greater version, key and score, high if either was high, and its first
        enqueue time.  Then holds the bound."""
        n = rk.shape[0]
        ix = self.index
        # a row repeated inside the batch: fold the repeats into one item first
        rep = ix.group(rk)
        dup = np.flatnonzero(rep != np.arange(n))
        if dup.shape[0]:
            r = rep[dup]
            vers, key, score, high = vers.copy(), key.copy(), score.copy(), high.copy()
            np.maximum.at(vers, r, vers[dup])
            np.maximum.at(key, r, key[dup])
            np.maximum.at(score, r, score[dup])
            np.logical_or.at(high, r, high[dup])
            keep = np.ones(n, dtype=bool)
            keep[dup] = False
            rk, vers, key, score, high = (a[keep] for a in (rk, vers, key, score, high))
            self.coalesced += dup.shape[0]
            n = rk.shape[0]
        slot_of = ix.get(rk)
        found = slot_of >= 0
        n_found = int(np.count_nonzero(found))

        theta = self.theta
        if n_found:
            ei = np.flatnonzero(found) if n_found < n else None
            s = slot_of if ei is None else slot_of[ei]
            self.coalesced += s.shape[0]
            v, k, sc, hg = (vers, key, score, high) if ei is None else (vers[ei], key[ei], score[ei], high[ei])
            self.ver[s] = np.maximum(self.ver[s], v)
            self.score[s] = np.maximum(self.score[s], sc)
            old_key = self.key[s]
            raised = k > old_key
            if raised.any():
                rs = s[raised]
                self.key[rs] = k[raised]
                inh = (self.state[rs] & _INHEAD) != 0
                if inh.any():                     # its place in the sorted head is stale
                    self.head_dirty = True
                enter = inh | (k[raised] > theta)
                es = rs[enter]
                self.state[es] = _ALIVE | _INHEAD | _MOVED
                self.incoming.append(es)
            up = hg & ~self.high[s]
            if up.any():
                us = s[up]
                self.high[us] = True
                self.rows_high += us.shape[0]
                self.bytes_high += int(self.nb[us].sum())
        n_new = n - n_found
        if n_new:
            ni = np.flatnonzero(~found) if n_found else None
            sel = (lambda a: a) if ni is None else (lambda a: a[ni])
            slots = self.alloc(n_new)
            k, h, new_rk = sel(key), sel(high), sel(rk)
            ix.insert(new_rk, slots)
            self.rk[slots] = new_rk
            self.ver[slots] = sel(vers)
            self.key[slots] = k
            self.score[slots] = sel(score)
            self.high[slots] = h
            self.t0[slots] = now
            self.nb[slots] = nb
            if theta == -math.inf:
                es = slots
            else:
                self.state[slots] = _ALIVE
                es = slots[k > theta]
            self.state[es] = _ALIVE | _INHEAD | _MOVED   # MOVED: a reused slot may have a stale head entry
            self.incoming.append(es)
            nhi = int(np.count_nonzero(h))
            self.rows += n_new
            self.rows_high += nhi
            self.bytes += n_new * nb
            self.bytes_high += nhi * nb
        self.enforce_bound()

    # -- the sorted head --------------------------------------------------------------------
    def merged_head(self) -> np.ndarray:
        """The sorted head, with incoming rows merged in (refilled when empty)."""
        if self.incoming or self.head_dirty:
            h, hnk, hnb = self.head, self.hnk, self.hnb
            if self.head_dirty:
                ok = self.state[h] == _ALIVE | _INHEAD        # and not _MOVED
                if not ok.all():
                    h, hnk, hnb = h[ok], hnk[ok], hnb[ok]
                self.head_dirty = False
            if self.incoming:
                inc = self.incoming[0] if len(self.incoming) == 1 else np.concatenate(self.incoming)
                self.incoming = []
                if inc.shape[0] > 1:     # a slot may have been re-added; keep one entry
                    idx = np.arange(inc.shape[0])
                    self.scratch[inc] = idx
                    inc = inc[self.scratch[inc] == idx]
                inc = inc[self.state[inc] == _ALIVE | _INHEAD | _MOVED]
                self.state[inc] = _ALIVE | _INHEAD
                ink = -self.key[inc]
                inb = self.nb[inc]
                target = self.head_target
                if h.shape[0] + inc.shape[0] > HEAD_MAX_FACTOR * target:
                    # too many to keep sorted: keep the best `target` of both and raise
                    # the cut (all left out have keys <= the new cut)
                    h, hnk, hnb = np.concatenate([h, inc]), np.concatenate([hnk, ink]), np.concatenate([hnb, inb])
                    part = np.argpartition(hnk, target)
                    self.state[h[part[target:]]] = _ALIVE
                    self.theta = float(-hnk[part[target]])
                    top = part[:target]
                    top = top[np.argsort(hnk[top])]
                    h, hnk, hnb = h[top], hnk[top], hnb[top]
                else:
                    order = np.argsort(ink)
                    inc, ink, inb = inc[order], ink[order], inb[order]
                    if h.shape[0]:
                        at = np.searchsorted(hnk, ink, side="right")
                        h, hnk, hnb = np.insert(h, at, inc), np.insert(hnk, at, ink), np.insert(hnb, at, inb)
                    else:
                        h, hnk, hnb = inc, ink, inb
            self.head, self.hnk, self.hnb = h, hnk, hnb
        if self.head.shape[0] == 0 and self.rows:
            self.refill()
        return self.head

    def refill(self) -> None:
        live = np.flatnonzero(self.state)
        nk = -self.key[live]
        target = self.head_target = max(HEAD_TARGET_ROWS, live.shape[0] >> HEAD_DEPTH_SHIFT)
        if live.shape[0] > target:
            part = np.argpartition(nk, target)
            self.theta = float(-nk[part[target]])
            live, nk = live[part[:target]], nk[part[:target]]
        else:
            self.theta = -math.inf
        order = np.argsort(nk)
        h = live[order].astype(np.int32)
        np.bitwise_and(self.state, _ALIVE, out=self.state)
        self.state[h] = _ALIVE | _INHEAD
        self.incoming = []
        self.head_dirty = False
        self.head, self.hnk, self.hnb = h, nk[order], self.nb[h]

    # -- the bound --------------------------------------------------------------------------
    def enforce_bound(self) -> None:
        over_rows = self.rows > self.max_rows
        over_bytes = self.max_backlog_bytes is not None and self.bytes > self.max_backlog_bytes
        if not (over_rows or over_bytes):
            return
        keep = 1.0 - self.drop_slack
        need_rows = self.rows - int(self.max_rows * keep) if over_rows else 0
        need_bytes = self.bytes - int(self.max_backlog_bytes * keep) if over_bytes else 0
        live = np.flatnonzero(self.state)
        vk = self.key[live]
        if self.drop_highest_keys:
            vk = -vk
        kk = need_rows
        if need_bytes > 0:
            kk = max(kk, -(-need_bytes // self.min_nb))
        kk = min(kk, live.shape[0])
        if kk < live.shape[0]:
            part = np.argpartition(vk, kk - 1)[:kk]
            live, vk = live[part], vk[part]
        cand = live[np.argsort(vk, kind="stable")]
        m = need_rows
        if need_bytes > 0:
            cs = np.cumsum(self.nb[cand])
            m = max(m, int(np.searchsorted(cs, need_bytes, side="left")) + 1)
        victims = cand[:m].astype(np.int32)
        nhi = int(np.count_nonzero(self.high[victims]))
        self.dropped_cls[1] += nhi
        self.dropped_cls[0] += victims.shape[0] - nhi
        if ((self.state[victims] & _INHEAD) != 0).any():
            self.head_dirty = True
        self.release(victims)
