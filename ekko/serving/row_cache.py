"""A serving process's cache of hot rows, kept fresh by a replica's change feed.

:class:`RowCache` holds up to ``capacity`` rows of one table (a dense table's by row id, a
hashed table's by 64-bit key) in a tensor of this process.  A lookup serves the rows it
holds and reads the others from the replica (``Client.read`` / ``Client.lookup``),
keeping them; beyond ``capacity`` the least recently looked-up rows leave.  A thread
follows the replica's change feed (``Client.changes``) and writes every change of a
cached row into the cache as the replica holds it -- a publish, a push, a rollback's
restore (whose version may be lower) -- so a cached row is as fresh as the feed, with no
read.  A hashed key whose slot the feed shows holding another key was evicted there: it
leaves the cache.  A feed ``reset`` (the replica restarted, or the cursor is too old)
empties the cache.

A placed table (``replicas_per_shard``, issue #18) has no one feed of the whole table:
each replica's lists the shards it keeps.  The cache then follows the feed of every live
member of its endpoint's DC (whose holders keep every shard between them), and looks at
that member list every :data:`MEMBERS_CHECK_S`; when it changed, shards moved, and
changes a new holder took before the cache followed it are in no feed: the cache
empties and follows the members from then on.  Between a change of members and that
look (the endpoint learns of it by gossip, a round or two, then up to 1 s), a row whose
shard moved may be served as it was.

Freshness rule, so a read racing the feed never leaves a stale row: each read notes the
feed position when it starts; a row it brings is kept only if no change of that row
came through the feed since (then the feed's value is the newer one, or the row is
read again at its next lookup).

Example::

    cache = RowCache("127.0.0.1:7070", "ranker", "user_emb", capacity=100_000).start()
    rows = cache.lookup(torch.tensor([3, 17, 3]))     # (3, dim): two read, one served
    cache.stop()
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import numpy as np
import torch

from ekko.core.errors import EkkoError, UsageError
from ekko.core.hashed import check_keys
from ekko.core.key_index import EMPTY_KEY, KeyIndex
from ekko.core.store import TORCH_DTYPES
from ekko.sdk.client import Changes, Client

log = logging.getLogger("ekko.serving")

#: most rows a cache holds.
MAX_CACHE_ROWS = 1 << 26
#: seconds a change-feed request waits for a change.
FEED_WAIT_S = 5.0
#: seconds between retries when the replica does not answer the feed.
FEED_RETRY_S = 1.0
#: change batches remembered for reads in flight (each read checks the ones since it began).
RECENT_BATCHES = 256
#: seconds between looks at the member list of a placed table's DC (a change resets the cache).
MEMBERS_CHECK_S = 1.0


class RowCache:
    """Up to ``capacity`` rows of a table, served from this process, fresh by the change feed.

    Args:
        endpoint: a replica (``host:port``).
        model, table: what to cache.
        capacity: rows held (least recently looked up leave first).
        key: the cluster or a reader key (a keyed replica refuses unsigned reads).
    """

    def __init__(self, endpoint: str, model: str, table: str, capacity: int = 100_000, key: Any = None) -> None:
        if not isinstance(capacity, int) or not 1 <= capacity <= MAX_CACHE_ROWS:
            raise UsageError(f"capacity must be 1..{MAX_CACHE_ROWS}")
        self.endpoint, self.model, self.table, self._key = endpoint, model, table, key
        self._client = Client(endpoint, key=key)
        mspec = self._client.spec(model)
        #: a placed table (issue #18): each replica's feed lists the shards it keeps, so the
        #: cache follows the feed of every member of the endpoint's DC.
        self.placed = mspec.placed_table(table)
        self.spec = mspec.table(table)
        self.hashed = self.spec.hashed
        self.capacity = capacity
        self._index = KeyIndex(capacity)                       # id or key -> cache position
        # A dense table's ids index this array directly (a gather, not a hash probe).
        self._direct = None if self.hashed else np.full(self.spec.rows, -1, np.int64)
        self._values = torch.zeros(capacity, self.spec.dim, dtype=TORCH_DTYPES[self.spec.dtype])
        self._versions = np.zeros(capacity, np.int64)
        self._slot = np.full(capacity, -1, np.int64)           # a hashed row's slot at the replica
        # ... and back: a replica slot's cache position (a feed answer names slots).
        self._at_slot = np.full(self.spec.rows, -1, np.int64) if self.hashed else None
        self._lock = threading.Lock()
        self._tick = 0
        self._seq = 0                                          # change batches applied so far
        self._emptied_at = 0                                   # _seq when the cache was last emptied
        self._recent: list[tuple[int, np.ndarray]] = []        # (seq, ids or keys changed)
        self._cursor: str | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._feeds: dict[str, threading.Event] = {}      # placed: member address -> its follower's stop
        #: lookups' rows served from the cache, read from the replica, and rows the feed refreshed.
        self.hits = self.misses = self.refreshed = 0
        #: times the cache was emptied because a placed table's DC members changed.
        self.member_resets = 0

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> "RowCache":
        """Follow the change feed (from now) on a thread of its own."""
        if self._thread is None:
            if self.placed:
                members = self._dc_members(self._client)
                for address in members:
                    self._start_feed(address)
                self._thread = threading.Thread(target=self._watch_members, args=(members,),
                                                name="ekko-row-cache-members", daemon=True)
            else:
                self._cursor = self._client.changes(self.model).cursor
                self._thread = threading.Thread(target=self._follow, name="ekko-row-cache", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = FEED_WAIT_S + 5.0) -> None:
        self._stop.set()
        self.stop_feeds()
        if self._thread is not None:
            self._thread.join(timeout)
        self._client.close()

    def __enter__(self) -> "RowCache":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def rows(self) -> int:
        """Rows held now."""
        return len(self._index)

    # -- lookups ---------------------------------------------------------------------------
    def lookup(self, ids: Any) -> torch.Tensor:
        """Rows of ``ids`` (row ids, or a hashed table's keys; any shape), ``(*shape, dim)``;
        a hashed key the replica does not hold reads as zeros (and is not cached)."""
        if self._thread is None:
            raise UsageError("start() the cache first: its rows are kept fresh by the change feed")
        shape = tuple(np.shape(ids))
        if self.hashed:
            flat = check_keys(ids.reshape(-1) if hasattr(ids, "reshape") else np.asarray(ids).reshape(-1))
        else:
            flat = np.asarray(ids.detach().cpu() if isinstance(ids, torch.Tensor) else ids).reshape(-1)
            if flat.size and flat.dtype.kind not in "iu":
                raise UsageError(f"row ids must be integers, got {flat.dtype}")
            flat = flat.astype(np.int64, copy=False)
        with self._lock:
            pos = self._where(flat)
            self._tick += 1
            if (pos >= 0).all():   # all cached: one gather (the serving path)
                self._index.last_used[pos] = self._tick
                self.hits += len(pos)
                return self._values.index_select(0, torch.from_numpy(pos)).reshape(*shape, self.spec.dim)
        uniq, inverse = np.unique(flat, return_inverse=True)
        out = torch.empty(len(uniq), self.spec.dim, dtype=self._values.dtype)
        with self._lock:
            pos = self._where(uniq)
            hit = pos >= 0
            out[torch.from_numpy(hit)] = self._values[torch.from_numpy(pos[hit])]
            self._index.last_used[pos[hit]] = self._tick
            started = self._seq
            self.hits += int(hit.sum())
        missing = uniq[~hit]
        if len(missing):
            self.misses += len(missing)
            read = self._client.lookup(self.model, self.table, missing) if self.hashed else \
                self._client.read(self.model, self.table, missing)
            out[torch.from_numpy(~hit)] = read.values
            found = read.found if read.found is not None else np.ones(len(missing), bool)
            self._keep(missing[found], read.values[torch.from_numpy(found)], read.versions[found],
                       read.ids[found], started)
        return out[torch.from_numpy(inverse)].reshape(*shape, self.spec.dim)

    def _where(self, ids: np.ndarray) -> np.ndarray:
        """Cache position of each id or key, -1 where not cached (under the lock)."""
        if self._direct is None:
            return self._index.lookup(ids)
        if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= self.spec.rows):
            raise UsageError(f"row ids must be within 0..{self.spec.rows - 1}")
        return self._direct[ids]

    def _forget(self, pos: np.ndarray) -> None:
        """Drop cached rows at positions ``pos`` (under the lock)."""
        if self._direct is not None:
            self._direct[self._index.keys_of(pos)] = -1
        if self._at_slot is not None:
            self._unslot(pos)
        self._index.free(pos)

    def _unslot(self, pos: np.ndarray) -> None:
        """Forget the replica slots of cache positions ``pos`` (where they still name them)."""
        old = self._slot[pos]
        mine = (old >= 0) & (self._at_slot[np.maximum(old, 0)] == pos)
        self._at_slot[old[mine]] = -1

    def _keep(self, ids: np.ndarray, values: torch.Tensor, versions: np.ndarray, slots: np.ndarray,
              started: int) -> None:
        """Cache rows read (fresh as of feed position ``started``), but not those the feed
        changed since: the feed's value is newer."""
        with self._lock:
            if started < self._emptied_at:
                return   # the cache was emptied since the read began: its rows may be stale
            changed = [c for s, c in self._recent if s >= started]
            if changed:
                fresh = ~np.isin(ids, np.concatenate(changed))
                ids, values, versions, slots = ids[fresh], values[torch.from_numpy(fresh)], versions[fresh], slots[fresh]
            ids, first = np.unique(ids, return_index=True)
            values, versions, slots = values[torch.from_numpy(first)], versions[first], slots[first]
            new = self._where(ids) < 0
            room = self._index.free_slots
            if new.sum() > room:
                # One region: its LRU pool, not a ranking of the whole cache per miss.
                self._forget(self._index.victims(int(new.sum()) - room, "lru", region=0))
            pos = self._index.insert(ids)
            if self._direct is not None:
                self._direct[ids] = pos
            if self._at_slot is not None:
                self._at_slot[slots] = pos
            self._values[torch.from_numpy(pos)] = values
            self._versions[pos] = versions
            self._slot[pos] = slots
            self._index.last_used[pos] = self._tick

    # -- the change feed -------------------------------------------------------------------
    def _follow(self) -> None:
        client = Client(self.endpoint, key=self._key, timeout=FEED_WAIT_S + 10.0)
        try:
            while not self._stop.is_set():
                try:
                    ch = client.changes(self.model, self._cursor, wait=FEED_WAIT_S)
                except (EkkoError, OSError) as e:
                    log.warning("row cache: change feed of %s at %s: %s", self.model, self.endpoint, e)
                    self._stop.wait(FEED_RETRY_S)
                    continue
                self._cursor = ch.cursor
                self.apply(ch)
        finally:
            client.close()

    # -- a placed table: every member's feed ------------------------------------------------
    def _dc_members(self, client: Client) -> list[str]:
        """Addresses of the live replicas of the endpoint's DC (each keeps some shards)."""
        st = client.status(cluster=True)
        return sorted(m["address"] for m in st.get("members", [])
                      if m.get("dc") == st.get("dc") and m.get("state") == "alive"
                      and m.get("role", "replica") == "replica")

    def _start_feed(self, address: str) -> None:
        """Follow one member's feed from now (its cursor taken before this returns)."""
        with Client(address, key=self._key) as c:
            cursor = c.changes(self.model).cursor
        stop = self._feeds[address] = threading.Event()
        threading.Thread(target=self._follow_member, args=(address, cursor, stop),
                         name=f"ekko-row-cache-{address}", daemon=True).start()

    def _follow_member(self, address: str, cursor: str, stop: threading.Event) -> None:
        client = Client(address, key=self._key, timeout=FEED_WAIT_S + 10.0)
        try:
            while not self._stop.is_set() and not stop.is_set():
                try:
                    ch = client.changes(self.model, cursor, wait=FEED_WAIT_S)
                except (EkkoError, OSError) as e:
                    log.warning("row cache: change feed of %s at %s: %s", self.model, address, e)
                    self._stop.wait(FEED_RETRY_S)
                    continue
                if stop.is_set():
                    return
                cursor = ch.cursor
                self.apply(ch)
        finally:
            client.close()

    def _watch_members(self, members: list[str]) -> None:
        """When the DC's members change, shards move between them: the feeds followed no
        longer cover every shard (a new holder's changes before we follow it are in no
        feed), so the cache empties and follows the new members from now."""
        client = Client(self.endpoint, key=self._key)   # the lookups' client is not shared across threads
        try:
            self._watch_loop(client, members)
        finally:
            client.close()

    def _watch_loop(self, client: Client, members: list[str]) -> None:
        while not self._stop.wait(MEMBERS_CHECK_S):
            try:
                now = self._dc_members(client)
            except (EkkoError, OSError, KeyError) as e:
                log.warning("row cache: members of %s's DC: %s", self.endpoint, e)
                continue
            if now == members:
                continue
            for gone in set(members) - set(now):
                stop = self._feeds.pop(gone, None)
                if stop is not None:
                    stop.set()
            try:
                for new in sorted(set(now) - set(members)):
                    self._start_feed(new)
            except (EkkoError, OSError) as e:
                log.warning("row cache: a new member's feed: %s", e)
                now = sorted(self._feeds)      # the next look tries the others again
            self._empty()
            self.member_resets += 1
            members = now

    def _empty(self) -> None:
        with self._lock:
            self._seq += 1
            self._clear()

    def _clear(self) -> None:
        """Forget every row (under the lock); reads in flight keep none of theirs."""
        self._emptied_at = self._seq
        self._index = KeyIndex(self.capacity)
        for a in (self._direct, self._at_slot):
            if a is not None:
                a.fill(-1)
        self._recent.clear()

    def stop_feeds(self) -> None:
        for stop in list(self._feeds.values()):
            stop.set()

    def apply(self, ch: Changes) -> None:
        """Write one change-feed answer into the cache (the feed thread does; public so a
        caller following the feed itself can)."""
        with self._lock:
            self._seq += 1
            if ch.reset:
                self._clear()
                return
            rows = ch.tables.get(self.table)
            if rows is None or not len(rows.ids):
                return
            names = rows.keys if self.hashed else rows.ids
            if self.hashed:
                # A cached key whose slot now holds another key was evicted there.
                at = self._at_slot[rows.ids]
                gone = (at >= 0) & (self._index.keys_of(np.maximum(at, 0)) != rows.keys)
                if gone.any():
                    self._forget(at[gone])
                keep = names != EMPTY_KEY
            else:
                keep = np.ones(len(names), bool)
            self._recent.append((self._seq, names[keep]))
            del self._recent[:-RECENT_BATCHES]
            pos = self._where(names[keep])
            hit = pos >= 0
            if hit.any():
                sel = np.flatnonzero(keep)[hit]
                p = pos[hit]
                self._values[torch.from_numpy(p)] = rows.values[torch.from_numpy(sel)]
                self._versions[p] = rows.versions[sel]
                if self._at_slot is not None:   # a key may come back in another slot
                    self._unslot(p)
                    self._at_slot[rows.ids[sel]] = p
                self._slot[p] = rows.ids[sel]
                self.refreshed += len(p)

