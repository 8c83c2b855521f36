"""The sans-IO core of a publisher: versions, chains and frame bodies.

A publisher (the SDK in a training job, or a simulated trainer) assigns each
row update a version ``(counter, origin)`` from its hybrid logical clock, and
tells the ingest replica, per touched shard, the counter of its previous update
to that shard that a replica acknowledged (the *chain*).  A replica whose
knowledge of that shard already reaches the previous counter can advance its
knowledge over the whole frame at once; otherwise the frame waits for the gap
to be filled by anti-entropy (see :class:`p2p.sync.ShardSync.chain`) or, when no
member holds it, closed by a gap probe (:mod:`p2p.gaps`).

Frames must be acknowledged in order per shard: the SDK retries a frame (same
versions: applying it twice changes nothing) until some replica acknowledges
it before it chains the next one on it.

:meth:`PublisherChain.state` / :meth:`PublisherChain.restore` persist the clock
floor and the chains so counters keep increasing and chains stay valid across
publisher restarts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ekko.core.codec import delta_to_wire
from ekko.core.delta import Delta
from ekko.core.errors import UsageError
from ekko.core.spec import ModelSpec
from ekko.core.version import ORIGIN_BITS, HybridClock


#: a chain link's ``after`` meaning "earlier updates of this origin to the shard may
#: exist, and this publisher does not know up to where" (a restart without state).  The
#: replica links the frame from just below its own first counter in the shard and
#: probes the gap before it at once (:mod:`p2p.gaps`).  ``-1`` means "unchained".
RESTART_LINK = -2


@dataclass(frozen=True, slots=True)
class PendingFrame:
    """A publish body awaiting acknowledgement and the chain heads it will set."""

    model: str
    body: dict[str, Any]
    heads: dict[tuple[str, int], int]
    first_counter: int
    last_counter: int
    rows: int


@dataclass
class PublisherChain:
    """Versions and chains of one publisher (origin).

    Example:
        >>> import numpy as np
        >>> from ekko.core.spec import ModelSpec, TableSpec
        >>> pc = PublisherChain(origin=7)
        >>> spec = ModelSpec("m", [TableSpec("t", rows=100, dim=2, shards=4)])
        >>> f = pc.frame(spec, {"t": (np.array([1, 60]), np.zeros((2, 2), np.float32))}, now_ms=0)
        >>> f.body["chains"]["t"]
        [[0, 0], [2, 0]]
        >>> pc.acked(f)
        >>> pc.frame(spec, {"t": (np.array([2]), np.zeros((1, 2), np.float32))}, now_ms=0).body["chains"]["t"]
        [[0, 1]]
    """

    origin: int
    clock: HybridClock = field(default_factory=HybridClock)
    heads: dict[tuple[str, str, int], int] = field(default_factory=dict)
    chained: bool = True
    #: False when earlier updates of this origin may exist that these heads do not
    #: name (a publisher restarted without its state): a shard without a head is then
    #: linked with :data:`RESTART_LINK` ("everything of mine before this frame is
    #: unknown to me") instead of 0 ("nothing of mine came before").
    history_known: bool = True

    def frame(self, spec: ModelSpec, tables: dict[str, tuple[np.ndarray, np.ndarray | None]], now_ms: float,
              impact: dict[str, np.ndarray] | None = None, tombstone: dict[str, np.ndarray] | None = None
              ) -> PendingFrame:
        """Version rows and build a publish body.

        Args:
            spec: the model.
            tables: ``{table: (ids int64, values array in the wire dtype or None)}``;
                ids must be unique per table.
            now_ms: wall time in Unix milliseconds (the HLC's physical part).
            impact: optional per-table float32 magnitudes.
            tombstone: optional per-table bool arrays.
        """
        n_total = sum(len(ids) for ids, _ in tables.values())
        if n_total == 0:
            raise UsageError("nothing to publish")
        first = self.clock.reserve(now_ms, n_total)
        c = first
        deltas, chains = [], {}
        heads: dict[tuple[str, int], int] = {}
        for table, (ids, values) in tables.items():
            t = spec.table(table)
            ids = np.asarray(ids, dtype=np.int64)
            n = len(ids)
            if n == 0:
                continue
            counters = np.arange(c, c + n, dtype=np.int64)
            c += n
            versions = (counters << ORIGIN_BITS) | self.origin
            d = Delta(spec.name, table, ids, versions, values,
                      None if tombstone is None else tombstone.get(table),
                      None if impact is None else impact.get(table))
            d.check(t)
            # One sort, by shard then id, serves the duplicate check (a repeated id is
            # adjacent) and the per-shard heads (each shard one run): not a pass over the
            # rows per shard.
            shards = t.shards_of(ids)
            order = np.lexsort((ids, shards))
            sid, shards = ids[order], shards[order]
            if n > 1 and (sid[1:] == sid[:-1]).any():
                raise UsageError(f"{table}: duplicate row ids in one publish")
            deltas.append(delta_to_wire(d))
            starts = np.flatnonzero(np.r_[True, shards[1:] != shards[:-1]])
            entries = []
            no_head = 0 if self.history_known else RESTART_LINK
            for s, head in zip(shards[starts].tolist(), np.maximum.reduceat(counters[order], starts).tolist()):
                after = self.heads.get((spec.name, table, s), no_head) if self.chained else -1
                entries.append([s, after])
                heads[(table, s)] = head
            chains[table] = entries
        body = {"model": spec.name, "origin": self.origin, "deltas": deltas, "chains": chains}
        return PendingFrame(spec.name, body, heads, first, c - 1, n_total)

    def acked(self, frame: PendingFrame) -> None:
        """Record that a replica acknowledged ``frame``: later frames chain on it."""
        for (table, s), head in frame.heads.items():
            key = (frame.model, table, s)
            self.heads[key] = max(self.heads.get(key, 0), head)

    def versions_of(self, frame: PendingFrame) -> dict[str, np.ndarray]:
        """The packed versions assigned in a frame, per table (in row order)."""
        from ekko.core.codec import array_from_wire
        out = {}
        for d in frame.body["deltas"]:
            out[d["t"]] = array_from_wire(d["v"], np.int64, d["n"], "versions")
        return out

    # -- persistence -------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        out = {"origin": self.origin, "clock": self.clock.last,
               "heads": [[m, t, s, c] for (m, t, s), c in sorted(self.heads.items())]}
        if not self.history_known:
            out["history_known"] = False
        return out

    @classmethod
    def restart(cls, state: dict[str, Any] | None, origin: int) -> "PublisherChain":
        """What a publisher process starts from: the persisted clock floor, but no chain
        heads, and ``history_known=False``.

        A state file cannot vouch for its heads: it may come from a backup (heads behind
        frames acknowledged since), from a run against another cluster, or be lost.  A
        head behind the truth would make the next frame claim the frames in between,
        and replicas would stop asking for them.  So the first frame to each shard after
        a start is linked with :data:`RESTART_LINK`; replicas probe the gap before it
        once (:mod:`p2p.gaps`) and knowledge completes within a probe round.

        Example:
            >>> pc = PublisherChain.restart({"origin": 3, "clock": 99, "heads": [["m", "t", 0, 50]]}, 3)
            >>> pc.heads, pc.history_known, pc.clock.last
            ({}, False, 99)
        """
        pc = cls.restore(state, origin, history_known=False)
        pc.heads = {}
        pc.history_known = False
        return pc

    @classmethod
    def restore(cls, state: dict[str, Any] | None, origin: int, history_known: bool = True) -> "PublisherChain":
        """From :meth:`state` output.

        Without state, ``history_known`` says whether this origin certainly never
        published (True: its chains start at counter 0, "no earlier update of this
        origin exists") or may have (False: the first frame to each shard is linked
        with :data:`RESTART_LINK`, and replicas close the gap before it by asking
        every member, :mod:`p2p.gaps`).  The SDK cannot tell a first start from a lost
        state dir, so it passes False; the simulator's new publishers pass True.
        """
        if not state:
            return cls(origin=origin, history_known=history_known)
        if state.get("origin") != origin:
            raise UsageError("publisher state belongs to another origin")
        pc = cls(origin=origin, clock=HybridClock(int(state["clock"])),
                 history_known=bool(state.get("history_known", True)))
        pc.heads = {(m, t, int(s)): int(c) for m, t, s, c in state.get("heads", [])}
        return pc
