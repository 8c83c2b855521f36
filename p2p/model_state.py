"""The per-model replicated state of a replica: store, per-shard sync, shard digests.

:class:`ModelState` is what every protocol component (push, anti-entropy, gap probes,
rollback) reads and updates for one model.  It lives here, below the replica node, so
that the protocol in :mod:`p2p` can use it without importing :mod:`ekko.replica`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ekko.core.hash64 import mix64 as _mix
from ekko.core.spec import ModelSpec
from ekko.core.store import ModelStore
from p2p.sync import RecentIndex, ShardSync

#: mixed shard tops remembered by value (:func:`_mixed_top`); emptied when full.
TOP_MIX_MEMO_ENTRIES = 1 << 12
_TOP_MIX: dict[bytes, np.ndarray] = {}


def _mixed_top(top: np.ndarray) -> np.ndarray:
    """``_mix`` of a table's greatest held versions (read-only).  Replicas in sync hold
    equal tops, and every anti-entropy round asks: look them up before mixing."""
    key = top.tobytes()
    got = _TOP_MIX.get(key)
    if got is None:
        got = _mix(top.view(np.uint64))
        got.flags.writeable = False
        if len(_TOP_MIX) >= TOP_MIX_MEMO_ENTRIES:
            _TOP_MIX.clear()   # a pure function of the key: forgetting is safe
        _TOP_MIX[key] = got
    return got


class ModelState:
    """A model on this replica: its spec, store and per-shard protocol state.

    Example:
        >>> from ekko.core.spec import ModelSpec, TableSpec
        >>> m = ModelState(ModelSpec("m", [TableSpec("t", rows=8, dim=2)]), "cpu", with_values=False)
        >>> len(m.shard("t", 0).knowledge), m.shards["t"].keys() == {0}, int(m.shard_digests("t")[0])
        (0, True, 0)
    """

    __slots__ = ("spec", "store", "shards", "index", "digests", "dirty", "top", "head", "pushed_at", "pulled_at",
                 "filling")

    def __init__(self, spec: ModelSpec, device: Any, with_values: bool,
                 held: dict[str, np.ndarray] | None = None, store: ModelStore | None = None) -> None:
        self.spec = spec
        # held: per placed table, the shards whose values this replica keeps (issue #18);
        # store: tensors restored from a snapshot, kept as they are
        self.store = store if store is not None else ModelStore(spec, device, with_values, held)
        self.shards: dict[str, dict[int, ShardSync]] = {t.name: {} for t in spec.tables}
        self.index = {t.name: RecentIndex(t.rows) for t in spec.tables}
        self.digests = {t.name: np.zeros(t.num_shards, np.uint64) for t in spec.tables}
        self.dirty: dict[str, set[int]] = {t.name: set() for t in spec.tables}
        # Greatest version held per shard: part of the shard version, so replicas whose
        # knowledge is equal but whose rows are not (pushed rows above a knowledge gap
        # that no chain will close) still compare and exchange them.
        self.top = {t.name: np.zeros(t.num_shards, np.int64) for t in spec.tables}
        self.head = 0  # greatest counter applied here (freshness)
        # Per shard: when a publish or a push with its chain links last moved its knowledge
        # here, and when anti-entropy last asked a peer for it (:meth:`in_motion`).
        self.pushed_at = {t.name: np.full(t.num_shards, -np.inf) for t in spec.tables}
        self.pulled_at = {t.name: np.full(t.num_shards, -np.inf) for t in spec.tables}
        #: placed shards taken while others may hold rows this replica lacks: shard -> when
        #: taken.  Reads of them go to another holder (:mod:`ekko.server.placed_routes`)
        #: until an anti-entropy exchange finds them equal to a settled holder's
        #: (:meth:`p2p.antientropy.AntiEntropy.on_digests`), or ``knowledge_bound`` passed.
        self.filling: dict[str, dict[int, float]] = {t.name: {} for t in spec.tables}

    def held(self, table: str) -> np.ndarray | None:
        """Bool per shard of a placed table: the shards this replica keeps; None when it
        keeps every shard (what nearly every caller checks first)."""
        b = self.store.tables[table].blocks
        return None if b is None else b.held

    def forget_shard(self, table: str, s: int) -> None:
        """Drop a shard's protocol state (the store has dropped its rows): knowledge,
        waiting intervals, greatest version, motion times."""
        self.shards[table][s] = ShardSync()   # empty knowledge (its digest is recomputed)
        self.filling[table].pop(s, None)
        self.top[table][s] = 0
        self.dirty[table].add(s)
        self.pushed_at[table][s] = -np.inf
        self.pulled_at[table][s] = -np.inf

    def empty(self, table: str, s: int) -> bool:
        """Whether this replica knows nothing of shard ``s``: no knowledge, no row."""
        sync = self.shards[table].get(s)
        return (sync is None or not len(sync.knowledge)) and not self.top[table][s]

    def shard(self, table: str, s: int) -> ShardSync:
        got = self.shards[table].get(s)
        if got is None:
            got = self.shards[table][s] = ShardSync()
        return got

    def shard_digests(self, table: str, rows: bool = True) -> np.ndarray:
        """64-bit shard versions: the knowledge digest mixed with the greatest version held
        and, with ``rows``, the shard's row hash
        (:meth:`ekko.core.store.TableStore.shard_row_hashes`; without it, what replicas
        from before the row audits compare)."""
        d = self.digests[table]
        dirty = self.dirty[table]
        if dirty:
            for s in dirty:
                d[s] = self.shards[table][s].knowledge.digest
            dirty.clear()
        out = d ^ _mixed_top(self.top[table])
        if rows:
            out ^= self.store.table(table).shard_row_hashes()
        return out

    def in_motion(self, table: str, shards: np.ndarray, now: float, grace: float, max_defer: float) -> np.ndarray:
        """Which of ``shards`` anti-entropy leaves alone this round: a publish, or a push
        with its publish-chain links, moved their knowledge within ``grace`` seconds
        (pushes of rows without their links -- split, throttled, rumored -- do not
        count: the push path does not carry everything there), they wait on no chain (a
        lost push shows as one), and they were asked for within ``max_defer`` seconds.
        The others are marked as asked for now.

        Example:
            >>> from ekko.core.spec import ModelSpec, TableSpec
            >>> m = ModelState(ModelSpec("m", [TableSpec("t", rows=8, dim=2, shards=2)]), "cpu", False)
            >>> syncs = [m.shard("t", 0), m.shard("t", 1)]
            >>> m.pushed_at["t"][:] = 10.0
            >>> m.in_motion("t", np.array([0, 1]), 10.2, 0.5, 2.0).tolist()  # never asked for
            [False, False]
            >>> m.in_motion("t", np.array([0, 1]), 10.3, 0.5, 2.0).tolist()  # asked 0.1 s ago
            [True, True]
            >>> m.in_motion("t", np.array([0, 1]), 12.6, 0.5, 2.0).tolist()  # settled
            [False, False]
            >>> m.pushed_at["t"][:] = 12.6; _ = m.in_motion("t", np.array([0, 1]), 12.6, 0.5, 2.0)
            >>> syncs[0].chain(7, 100, 200)   # shard 0 waits on a chain: a frame of origin 7 is missing
            False
            >>> m.in_motion("t", np.array([0, 1]), 12.7, 0.5, 2.0).tolist()
            [False, True]
        """
        moving = self.moving(table, shards, now, grace, max_defer)
        self.pulled_at[table][shards[~moving]] = now
        return moving

    def moving(self, table: str, shards: np.ndarray, now: float, grace: float, max_defer: float) -> np.ndarray:
        """:meth:`in_motion` without marking anything as asked for."""
        moving = (self.pushed_at[table][shards] >= now - grace) & (self.pulled_at[table][shards] >= now - max_defer)
        if moving.any():
            syncs = self.shards[table]
            for i in np.flatnonzero(moving).tolist():
                sync = syncs.get(int(shards[i]))
                if sync is None or sync.pending or sync.dropped_top:
                    moving[i] = False
        return moving

    def recompute_top(self, table: str, rows: np.ndarray) -> None:
        """Refresh the greatest held version of the shards of ``rows`` (versions went down)."""
        spec = self.spec.table(table)
        v = self.store.table(table).versions
        for s in np.unique(spec.shards_of(rows)).tolist():
            lo, hi = spec.shard_range(s)
            self.top[table][s] = int(v[lo:hi].max(initial=0))
