"""Cluster membership: a gossiped member list with heartbeats and incarnations.

Each member is (node id, DC, address, incarnation, heartbeat).  A node bumps
its own heartbeat on every gossip tick; receivers keep, per member, the entry
with the greatest (incarnation, heartbeat) and note the local time at which
its heartbeat last moved.  A member whose heartbeat has not moved for
``suspect_after`` seconds is SUSPECT, after ``dead_after`` it is DEAD; a dead
entry is kept ``forget_after`` seconds so stale gossip cannot resurrect it.  A
restarted node joins with a greater incarnation (the driver derives it from the
wall clock at start, or a persisted counter), which overrides every older
entry at once -- including a DEAD verdict.

Gossip messages carry the sender's own entry, the entries that changed
recently and a few random others (bounded by ``MAX_GOSSIP_MEMBERS``), so a
message stays small with 10,000 members.  Sans-IO: time is an argument and
randomness comes from the ``random.Random`` the caller passes in.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass, field
from typing import Any, Iterable

from ekko.core.errors import ProtocolError
from ekko.core.spec import NAME_RE

#: most member entries one gossip message carries.
MAX_GOSSIP_MEMBERS = 32
#: random (not recently changed) entries added to each gossip message: enough to
#: refresh every heartbeat in O(log n) rounds, few enough to keep idle traffic small.
RANDOM_GOSSIP_MEMBERS = 6
#: longest address string accepted.
MAX_ADDRESS_LEN = 256
#: entries that changed within this many gossip rounds are always resent.
RECENT_ROUNDS = 8
#: roles a member may advertise ("" = none, the ordinary replica).
ROLES = ("", "baseline")


class MemberState(enum.IntEnum):
    ALIVE = 0
    SUSPECT = 1
    DEAD = 2


@dataclass(slots=True)
class Member:
    """One member as this node knows it."""

    node_id: str
    dc: str
    address: str
    incarnation: int
    heartbeat: int
    state: MemberState = MemberState.ALIVE
    last_change: float = 0.0      # local time the heartbeat/incarnation last moved
    changed_round: int = 0        # local gossip round of the last change (for "recent" resends)
    # The member's role ("" = an ordinary replica; "baseline" = pinned to a cut: never a
    # gateway, push relay or anti-entropy partner of others).  Travels beside the entry
    # (:func:`roles_of` / :func:`parse_entries`), not in it, so older peers still parse it.
    role: str = ""

    def to_wire(self) -> list[Any]:
        return [self.node_id, self.dc, self.address, self.incarnation, self.heartbeat, int(self.state)]

    @classmethod
    def from_wire(cls, w: Any) -> "Member":
        if not isinstance(w, list) or len(w) != 6:
            raise ProtocolError("member entry must be a 6-list", "bad_member")
        nid, dc, addr, inc, hb, st = w
        if not (isinstance(nid, str) and NAME_RE.fullmatch(nid) and isinstance(dc, str) and NAME_RE.fullmatch(dc)):
            raise ProtocolError("bad member id or dc", "bad_member")
        if not isinstance(addr, str) or len(addr) > MAX_ADDRESS_LEN:
            raise ProtocolError("bad member address", "bad_member")
        if not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 1 << 62 for x in (inc, hb)):
            raise ProtocolError("bad member incarnation/heartbeat", "bad_member")
        if st not in (0, 1, 2):
            raise ProtocolError("bad member state", "bad_member")
        return cls(nid, dc, addr, inc, hb, MemberState(st))


@dataclass(frozen=True, slots=True)
class MembershipConfig:
    """Failure-detection timing (seconds).

    Attributes:
        suspect_after: heartbeat silence before a member is suspected; several
            gossip intervals so one lost message does not suspect anybody.
        dead_after: silence before it is declared dead (its gateway roles move).
        forget_after: how long a dead entry is kept to stop resurrection by old gossip.
    """

    suspect_after: float = 3.0
    dead_after: float = 6.0
    forget_after: float = 60.0


@dataclass(slots=True)
class Membership:
    """The member list of one node.

    Example:
        >>> m = Membership("a", "dc1", "127.0.0.1:7000", incarnation=1, now=0.0)
        >>> _ = m.merge([Member("b", "dc2", "127.0.0.1:7001", 1, 1)], now=0.0)
        >>> sorted(x.node_id for x in m.alive())
        ['a', 'b']
        >>> _ = m.check(now=10.0); m.get("b").state.name
        'DEAD'
    """

    node_id: str
    dc: str
    address: str
    incarnation: int
    now: float
    config: MembershipConfig = field(default_factory=MembershipConfig)
    members: dict[str, Member] = field(default_factory=dict)
    round: int = 0
    version: int = 0          # bumps whenever the set of live members or their DCs change
    _live: dict[str | None, tuple[int, list[str]]] = field(default_factory=dict, init=False, repr=False,
                                                           compare=False)

    def __post_init__(self) -> None:
        self.members[self.node_id] = Member(self.node_id, self.dc, self.address, self.incarnation, 0,
                                            last_change=self.now)
        self.version = 1

    @property
    def me(self) -> Member:
        return self.members[self.node_id]

    def get(self, node_id: str) -> Member | None:
        return self.members.get(node_id)

    def alive(self) -> list[Member]:
        return [m for m in self.members.values() if m.state != MemberState.DEAD]

    def live_ids(self, dc: str | None = None) -> list[str]:
        """Ids of the members not known dead (only those in ``dc`` when given), in
        member-list order, this node included.  Cached until :attr:`version` changes;
        the list is shared (a view several nodes may hold), so do not modify it."""
        hit = self._live.get(dc)
        if hit is not None and hit[0] == self.version:
            return hit[1]
        ids = [m.node_id for m in self.members.values()
               if m.state != MemberState.DEAD and (dc is None or m.dc == dc)]
        self._live[dc] = (self.version, ids)
        return ids

    def dcs(self) -> list[str]:
        return sorted({m.dc for m in self.members.values() if m.state != MemberState.DEAD})

    def tick(self, now: float) -> None:
        """Start a gossip round: bump our heartbeat."""
        self.round += 1
        me = self.me
        me.heartbeat += 1
        me.last_change = now

    def merge(self, entries: Iterable[Member], now: float) -> bool:
        """Merge gossiped entries; True when the live set changed."""
        changed = False
        for e in entries:
            if e.node_id == self.node_id:
                # Someone thinks we are older or dead: outbid it with a fresh incarnation.
                if (e.incarnation, e.heartbeat) > (self.me.incarnation, self.me.heartbeat) or (
                        e.incarnation == self.me.incarnation and e.state != MemberState.ALIVE):
                    self.me.incarnation = max(self.me.incarnation, e.incarnation) + 1
                    self.me.changed_round = self.round
                continue
            cur = self.members.get(e.node_id)
            if cur is None:
                if e.state == MemberState.DEAD:
                    continue  # never learn a member from its obituary
                self.members[e.node_id] = Member(e.node_id, e.dc, e.address, e.incarnation, e.heartbeat,
                                                 MemberState.ALIVE, now, self.round, e.role)
                changed = True
            elif (e.incarnation, e.heartbeat) > (cur.incarnation, cur.heartbeat):
                was_dead = cur.state == MemberState.DEAD
                if was_dead and e.incarnation == cur.incarnation:
                    continue  # a stale heartbeat from before its death: keep it dead
                moved = cur.dc != e.dc or cur.address != e.address or cur.role != e.role
                if moved or e.incarnation != cur.incarnation or cur.state != MemberState.ALIVE:
                    # Only real changes are resent eagerly; a moved heartbeat alone
                    # spreads through the random entries of later messages.
                    cur.changed_round = self.round
                cur.dc, cur.address, cur.incarnation, cur.heartbeat = e.dc, e.address, e.incarnation, e.heartbeat
                cur.role = e.role
                cur.last_change = now
                if cur.state != MemberState.ALIVE:
                    cur.state = MemberState.ALIVE
                    changed = True
                changed |= moved
            elif (e.state == MemberState.DEAD and e.incarnation == cur.incarnation
                  and cur.state != MemberState.DEAD and now - cur.last_change > self.config.suspect_after):
                # Adopt another node's death verdict only if we have not heard from it lately either.
                cur.state, cur.changed_round = MemberState.DEAD, self.round
                changed = True
        if changed:
            self.version += 1
        return changed

    def check(self, now: float) -> list[Member]:
        """Apply the failure-detector timeouts; returns members that just died."""
        died = []
        changed = False
        for m in list(self.members.values()):
            if m.node_id == self.node_id:
                continue
            silent = now - m.last_change
            if m.state == MemberState.DEAD:
                if silent > self.config.forget_after:
                    del self.members[m.node_id]
                continue
            if silent > self.config.dead_after:
                m.state, m.changed_round = MemberState.DEAD, self.round
                died.append(m)
                changed = True
            elif silent > self.config.suspect_after and m.state == MemberState.ALIVE:
                m.state, m.changed_round = MemberState.SUSPECT, self.round
        if changed:
            self.version += 1
        return died

    def set_role(self, role: str) -> None:
        """Advertise this node's role (see :attr:`Member.role`); peers learn it by gossip."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}")
        me = self.me
        if me.role != role:
            me.role = role
            me.changed_round = self.round   # resent eagerly, like any real change
            self.version += 1               # gateway choices depend on roles

    def heard_from(self, node_id: str, now: float) -> None:
        """Direct evidence of life (any message from the member) counts as a heartbeat."""
        m = self.members.get(node_id)
        if m is not None and m.node_id != self.node_id and m.state != MemberState.DEAD:
            m.last_change = now
            if m.state == MemberState.SUSPECT:
                m.state, m.changed_round = MemberState.ALIVE, self.round

    def gossip_entries(self, rng: random.Random, prefer_dc: str | None = None) -> list[list[Any]]:
        """Entries for one gossip message: ours, recent changes, then random others
        (drawn from ``prefer_dc`` when given: the receiver's DC, whose members it
        watches most closely because they share its shards' gateway roles)."""
        out = [self.me]
        recent = [m for m in self.members.values()
                  if m.node_id != self.node_id and self.round - m.changed_round <= RECENT_ROUNDS]
        if len(recent) > MAX_GOSSIP_MEMBERS // 2:
            recent = rng.sample(recent, MAX_GOSSIP_MEMBERS // 2)
        out += recent
        room = min(RANDOM_GOSSIP_MEMBERS, MAX_GOSSIP_MEMBERS - len(out))
        if room > 0 and len(self.members) > len(out):
            chosen = {m.node_id for m in out}
            others = [m for m in self.members.values() if m.node_id not in chosen]
            if prefer_dc is not None:
                near = [m for m in others if m.dc == prefer_dc]
                far = [m for m in others if m.dc != prefer_dc]
                k_far = min(len(far), max(1, room // 3))
                k_near = min(len(near), room - k_far)
                out += rng.sample(near, k_near) + rng.sample(far, min(len(far), room - k_near))
            else:
                out += rng.sample(others, min(room, len(others)))
        return [m.to_wire() for m in out]


def roles_of(members: "Membership", entries: list[list[Any]]) -> dict[str, str]:
    """The non-empty roles of the members in ``entries`` (a gossip message's optional
    ``roles`` field, beside its 6-list entries that older peers parse as before)."""
    out = {}
    for w in entries:
        m = members.members.get(w[0])
        if m is not None and m.role:
            out[m.node_id] = m.role
    return out


def parse_entries(data: Any, roles: Any = None) -> list[Member]:
    """Decode gossiped member entries and attach their ``roles`` (``{node_id: role}``;
    a member not named has none).  Bad input raises :class:`ProtocolError`."""
    if not isinstance(data, list) or len(data) > MAX_GOSSIP_MEMBERS * 4:
        raise ProtocolError("members must be a bounded list", "bad_member")
    out = [Member.from_wire(w) for w in data]
    if roles is not None:
        if not isinstance(roles, dict) or len(roles) > len(out):
            raise ProtocolError("member roles must be a map no longer than the entries", "bad_member")
        for k, v in roles.items():
            if not isinstance(k, str) or v not in ROLES:
                raise ProtocolError("bad member role", "bad_member")
        for m in out:
            m.role = roles.get(m.node_id, "")
    return out
