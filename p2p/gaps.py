"""Gap probes: how a replica's knowledge passes a gap that anti-entropy cannot fill.

Knowledge of a shard advances along a publisher's chain: a frame's link says "this
frame holds every update of origin ``o`` to shard ``s`` with a counter in
``(after, upto]``".  A replica whose knowledge stops at ``lo`` below a waiting
interval that starts at ``hi`` misses the counters ``(lo, hi]``.  Usually a peer
holds them and anti-entropy brings them.  Sometimes no live replica does:

* the publisher's chain state points at frames this cluster never saw (state from
  another cluster, a test cluster reused, a trainer restored from backup into a
  new cluster);
* the replica that acknowledged those frames lost its disk before passing them on;
* a publisher restarted without its state and could not say where its chain was
  (:class:`ekko.core.chain.PublisherChain` then links its first frame per shard from
  just below the frame's own counters, and everything before is a gap).

Nothing fills such a gap, so without a rule the origin's knowledge stops for good,
every cut taken from then on is empty for it, and a rollback to such a cut reverts
acknowledged rows.  The rule here (written down in ``docs/design.md``):

**A replica may declare the counters ``(lo, hi]`` of ``(shard, origin)`` known once
every member of its member list has sent it every row of that origin and shard it
holds with a counter in that range.**  After that it holds the union of what the
cluster holds there, so its knowledge claims nothing another member could still
supply.  Peers then learn the new knowledge by ordinary anti-entropy (they pull
the rows first, as for any knowledge).  Members count in every state (alive,
suspect, dead) until the failure detector forgets them, so a replica that is merely
down or partitioned holds the gap open until it answers or is forgotten
(``forget_after``).

A probe asks a member for those rows (``GOSSIP`` kind ``gq``); the answer (kind
``ga``) carries them, in counter order and capped, with how far they cover the range
and the member's own knowledge and waiting intervals for that origin, so a member
that *can* fill the gap fills it at the first answer.  Replicas that share a gap do
not all probe at once: each waits ``probe_after x (1 + tier)`` with a tier from a
hash of its id and the shard, and the first to close the gap spreads the knowledge
by anti-entropy before most others start.

This module keeps the probes' state; it is sans-IO (time and membership are
arguments).  :class:`p2p.gap_probe.GapProbe` sends, answers and applies.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

from ekko.core.config import GAP_PROBE_TIERS

#: most gap entries one probe message carries.
MAX_GAP_ENTRIES = 256
#: most rows one answer entry carries (the rest is asked for again, from where it stopped).
MAX_GAP_ROWS = 1 << 16

ShardKey = tuple[str, str, int]            # (model, table, shard)
GapKey = tuple[str, str, int, int]          # (model, table, shard, origin)


@dataclass(slots=True)
class Probe:
    """One gap being probed: counters ``(lo, hi]`` of an origin in one shard.

    ``covered[member] = c`` records that ``member`` has sent every row it holds in
    ``(lo, c]``; the gap may close when every member's ``c`` reaches ``hi``.
    """

    lo: int
    hi: int
    started: float
    covered: dict[str, int] = field(default_factory=dict)
    asked: dict[str, float] = field(default_factory=dict)

    def missing(self, members: list[str]) -> list[str]:
        """Members that have not yet covered the whole range."""
        return [p for p in members if self.covered.get(p, self.lo) < self.hi]


class GapProbes:
    """The gaps one replica is waiting on, and its probes of them.

    Example:
        >>> g = GapProbes("r1", probe_after=1.0, retry_after=0.5)
        >>> g.note_waiting(("m", "t", 0), now=0.0)
        >>> gaps = {("m", "t", 0, 7): (10, 20)}
        >>> g.round(0.5, gaps, ["r2"])          # too early: the gap may fill by itself
        ({}, [])
        >>> g.round(10.0, gaps, ["r2"])
        ({'r2': [['m', 't', 0, 7, 10, 20]]}, [])
        >>> g.answered("r2", ("m", "t", 0, 7), 10, 20)
        >>> g.round(10.1, gaps, ["r2"])         # every member covered (10, 20]
        ({}, [('m', 't', 0, 7, 10, 20)])
    """

    def __init__(self, node_id: str, probe_after: float, retry_after: float) -> None:
        self.node_id = node_id
        self.probe_after = probe_after
        self.retry_after = retry_after
        #: shards with waiting intervals -> when this replica first saw them wait.
        self.waiting: dict[ShardKey, float] = {}
        self.probes: dict[GapKey, Probe] = {}
        self.closed = 0

    def note_waiting(self, shard: ShardKey, now: float, urgent: bool = False) -> None:
        """A shard has waiting intervals (called after every chain that left one waiting).

        ``urgent``: the gap is known not to fill by itself (a publisher restarted
        without its state, or relinked as stale): probe it at the next round."""
        if urgent:
            self.waiting[shard] = now - self.probe_after * GAP_PROBE_TIERS
        elif shard not in self.waiting:
            self.waiting[shard] = now

    def delay(self, shard: ShardKey) -> float:
        """How long a gap of ``shard`` waits here before this replica probes it."""
        h = zlib.crc32(f"{self.node_id}|{shard[0]}|{shard[1]}|{shard[2]}".encode())
        return self.probe_after * (1 + h % GAP_PROBE_TIERS)

    def round(self, now: float, gaps: dict[GapKey, tuple[int, int]], members: list[str]
              ) -> tuple[dict[str, list[list]], list[tuple[str, str, int, int, int, int]]]:
        """One probe round.

        Args:
            now: current time.
            gaps: every gap of the waiting shards now, ``(model, table, shard, origin)
                -> (lo, hi)`` (the caller reads them from its :class:`p2p.sync.ShardSync`);
                a waiting shard absent from it has no gap any more.
            members: every other member's id (any state but forgotten).

        Returns ``(asks, closable)``: probe entries ``[model, table, shard, origin, lo,
        hi]`` per member to send now, and the gaps every member has covered.
        """
        live_shards = {k[:3] for k in gaps}
        for shard in [s for s in self.waiting if s not in live_shards]:
            del self.waiting[shard]
        for key in [k for k in self.probes if k not in gaps]:
            del self.probes[key]
        asks: dict[str, list[list]] = {}
        closable = []
        for key, (lo, hi) in gaps.items():
            since = self.waiting.setdefault(key[:3], now)
            if now - since < self.delay(key[:3]):
                continue
            probe = self.probes.get(key)
            if probe is None or lo < probe.lo or hi > probe.hi:
                # A new gap, or one that grew: answers about a narrower range do not count.
                probe = self.probes[key] = Probe(lo, hi, now)
            else:
                # The gap narrowed (knowledge moved, or a waiting interval went): what was
                # covered still covers.
                probe.lo, probe.hi = lo, hi
            missing = probe.missing(members)
            if not missing:
                closable.append((*key, probe.lo, probe.hi))
                del self.probes[key]
                continue
            for p in missing:
                if now - probe.asked.get(p, -float("inf")) >= self.retry_after:
                    probe.asked[p] = now
                    start = max(probe.lo, probe.covered.get(p, probe.lo))
                    bucket = asks.setdefault(p, [])
                    if len(bucket) < MAX_GAP_ENTRIES:
                        bucket.append([*key, start, probe.hi])
        self.closed += len(closable)
        return asks, closable

    def answered(self, member: str, key: GapKey, lo: int, covered_to: int) -> None:
        """``member`` sent every row it holds in ``(lo, covered_to]`` for ``key``."""
        probe = self.probes.get(key)
        if probe is None or lo > probe.covered.get(member, probe.lo):
            return  # no such probe, or the answer leaves a hole in what it covered before
        if covered_to > probe.covered.get(member, probe.lo):
            probe.covered[member] = covered_to
        # Answered: ask again (for the rest) at the next round, not after retry_after.
        probe.asked.pop(member, None)
