"""Cuts (named restore points), the registry that takes them, and fences.

A :class:`Cut` is a restore point of one model on one replica: the knowledge
(version vector) of every (table, shard) at that moment, plus the local apply
``seq`` so the undo history (:mod:`rollback.undo`) knows which records it
needs.  A cut does not copy parameters; the row state *at* a cut is defined by
its knowledge: for each row, the newest version the cut covers.  That
definition is the same on every replica, so a rollback to one cut puts every
replica in the same state (rows the knowledge covers but a replica lacks are
pulled from peers as usual: they are not fenced).

:class:`CutRegistry` keeps the cuts of each model: named ones on request and an
automatic one every ``auto_interval_s`` seconds, the newest ``retention`` of
those.  When auto cuts retire, the undo history before the oldest live cut is
released (:meth:`UndoHistory.forget_before`).

:class:`Fence` keeps rolled-back updates out for good.  A rollback of model
``m`` to cut ``C`` at rollback point ``R`` fences, for every origin ``o``, the
counters in ``(C[table, shard][o], R[o]]``:

* the lower bound is **per (table, shard)** because that is the granularity
  of knowledge, and the cut state of a shard includes exactly the updates its
  knowledge covers.  A per-model lower bound would be wrong either way: the
  minimum over shards refuses updates that are part of the cut on other shards
  (and replicas repairing those rows could never converge); the maximum lets
  rolled-back updates of lagging shards back in.
* the upper bound is **per (model, origin)**: knowledge lags (an update in
  flight to some shard is not yet in that shard's knowledge), so a per-shard
  upper bound would let harmful updates still in flight through.  ``R[o]``
  must be at least every counter origin ``o`` issued before the rollback:
  the publisher's clock (:attr:`HybridClock.last`) when it can be asked, else
  the largest counter of ``o`` seen anywhere plus the HLC span of the maximum
  clock skew.  Updates the publisher makes after the rollback have counters
  above ``R[o]`` and apply normally.
* origin ``0`` in the rollback point stands for every origin it does not name:
  the replica starting a rollback cannot list a publisher it has not heard of yet
  (one that just took a new origin), and that publisher's updates up to the
  rollback point must be fenced too.

Every fence test is vectorized: :meth:`Fence.mask` takes a whole delta.

Wire forms are msgpack-ready dicts and lists; decoding validates everything
and raises :class:`~ekko.core.errors.ProtocolError` only.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from ekko.core.errors import ProtocolError, UsageError
from ekko.core.spec import MAX_SHARDS_PER_TABLE, MAX_TABLE_ROWS, ModelSpec, TableSpec, check_name
from ekko.core.version import MAX_COUNTER, MAX_ORIGIN, Knowledge, counters_of, origins_of

#: most (table, shard) entries a cut or fence range may carry on the wire.
MAX_CUT_ENTRIES = 1 << 20
#: most fence ranges a fence may carry on the wire (one per rollback; retire old ones).
MAX_FENCE_RANGES = 1024
#: default seconds between automatic cuts.
DEFAULT_AUTO_INTERVAL_S = 60.0
#: default number of automatic cuts kept per model (an hour at one a minute).
DEFAULT_RETENTION = 60
#: default number of named cuts kept per model (oldest dropped beyond).
DEFAULT_MAX_NAMED = 16
#: prefix of automatic cut names.
AUTO_PREFIX = "auto-"

ShardKnowledge = Mapping[tuple[str, int], Knowledge]


class _ShardOriginTable:
    """Per (shard, origin) counters of one table as a flat matrix, looked up vectorized.

    The matrix has one extra column for "origin not in the knowledge" and one extra
    row for "shard beyond the knowledge", both -1, so a lookup is one gather at a
    computed flat index, with no boolean masking.
    """

    __slots__ = ("origins", "flat", "n_shards", "width")

    def __init__(self, per_shard: Mapping[int, Knowledge]) -> None:
        origins = sorted({o for k in per_shard.values() for o, _ in k.items()})
        self.origins = np.array(origins, dtype=np.int64)
        col = {o: j for j, o in enumerate(origins)}
        self.n_shards = max(per_shard) + 1 if per_shard else 0
        self.width = len(origins) + 1
        # -1 marks "this shard's knowledge has no entry for this origin".
        matrix = np.full((self.n_shards + 1, self.width), -1, dtype=np.int64)
        for s, k in per_shard.items():
            for o, c in k.items():
                matrix[s, col[o]] = c
        self.flat = matrix.ravel()

    def lookup(self, shards: np.ndarray, origins: np.ndarray, default: int) -> np.ndarray:
        """Counter of each (shard, origin); ``default`` (-1 or 0) where the knowledge has no entry."""
        if len(self.origins) == 0:
            return np.full(len(shards), default, dtype=np.int64)
        if len(self.origins) == 1:     # one publisher: the common case, no search
            j = np.where(origins == self.origins[0], 0, 1)
        else:
            j = np.searchsorted(self.origins, origins)
            np.minimum(j, len(self.origins) - 1, out=j)
            j[self.origins[j] != origins] = self.width - 1
        idx = np.minimum(shards, self.n_shards)
        idx *= self.width
        idx += j
        out = self.flat[idx]
        if default == 0:
            np.maximum(out, 0, out=out)   # set entries are counters >= 1
        elif default != -1:
            raise ValueError("default must be -1 or 0")
        return out


def _by_table(knowledge: ShardKnowledge) -> dict[str, dict[int, Knowledge]]:
    out: dict[str, dict[int, Knowledge]] = {}
    for (table, shard), k in knowledge.items():
        out.setdefault(table, {})[shard] = k
    return out


def _knowledge_to_wire(knowledge: ShardKnowledge) -> list[list[Any]]:
    return [[t, s, k.to_wire()] for (t, s), k in sorted(knowledge.items())]


def _knowledge_from_wire(data: object) -> dict[tuple[str, int], Knowledge]:
    if not isinstance(data, list) or len(data) > MAX_CUT_ENTRIES:
        raise ProtocolError("cut knowledge must be a list of [table, shard, knowledge]", "bad_cut")
    out: dict[tuple[str, int], Knowledge] = {}
    for item in data:
        if not isinstance(item, (list, tuple)) or len(item) != 3:
            raise ProtocolError(f"bad cut knowledge entry {item!r:.80}", "bad_cut")
        table, shard, kw = item
        check_name("table", table, ProtocolError)
        if not isinstance(shard, int) or isinstance(shard, bool) or not 0 <= shard < MAX_SHARDS_PER_TABLE:
            raise ProtocolError(f"bad shard {shard!r:.40}", "bad_cut")
        if (table, shard) in out:
            raise ProtocolError(f"duplicate cut entry {table}/{shard}", "bad_cut")
        out[(table, shard)] = Knowledge.from_wire(kw)
    return out


def _check_wire_int(name: str, value: object, hi: int, reason: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= hi:
        raise ProtocolError(f"bad {name} {value!r:.40}", reason)
    return value


@dataclass(frozen=True, slots=True)
class Cut:
    """A restore point of one model: per-shard knowledge and the local apply seq.

    Args:
        name: cut name (1-64 of ``[A-Za-z0-9_.-]``), unique per model.
        model: the model.
        taken_at: when it was taken (seconds, the caller's clock).
        knowledge: ``(table, shard) -> Knowledge`` at that moment (copied).
        seq: the node's apply seq when the cut was taken; records with
            ``seq >= cut.seq`` happened after it.

    Example:
        >>> import numpy as np
        >>> from ekko.core.spec import TableSpec
        >>> from ekko.core.version import pack
        >>> spec = TableSpec("t", rows=8, dim=2, shards=2)
        >>> cut = Cut("before-bad", "m", 0.0, {("t", 0): Knowledge({1: 10}), ("t", 1): Knowledge({1: 5})}, seq=7)
        >>> cut.covers(spec, np.array([0, 4]), np.array([pack(7, 1), pack(7, 1)])).tolist()
        [True, False]
        >>> Cut.from_wire(cut.to_wire()) == cut
        True
    """

    name: str
    model: str
    taken_at: float
    knowledge: ShardKnowledge
    seq: int
    _tables: dict[str, _ShardOriginTable] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        check_name("cut", self.name)
        check_name("model", self.model)
        if not isinstance(self.taken_at, (int, float)) or not math.isfinite(self.taken_at):
            raise UsageError("taken_at must be a finite number")
        if not isinstance(self.seq, int) or self.seq < 0:
            raise UsageError("seq must be an int >= 0")
        object.__setattr__(self, "knowledge", {(t, int(s)): k.copy() for (t, s), k in self.knowledge.items()})

    def _table(self, table: str) -> _ShardOriginTable:
        tab = self._tables.get(table)
        if tab is None:
            tab = self._tables[table] = _ShardOriginTable(_by_table(self.knowledge).get(table, {}))
        return tab

    def covers(self, spec: TableSpec, ids: np.ndarray, versions: np.ndarray) -> np.ndarray:
        """Vectorized: which (row, packed version) pairs the cut includes."""
        ids = np.asarray(ids, dtype=np.int64)
        versions = np.asarray(versions, dtype=np.int64)
        bound = self._table(spec.name).lookup(spec.shards_of(ids), origins_of(versions), default=-1)
        return counters_of(versions) <= bound

    def rows_to_restore(self, spec: TableSpec, versions: np.ndarray) -> np.ndarray:
        """Rows of a table (its whole ``versions`` array) whose current version the cut does not cover.

        Every such row must go back, including rows that already held an uncovered
        version when the cut was taken (eagerly pushed, knowledge not yet advanced):
        the state at a cut is defined by its knowledge alone.
        """
        versions = np.asarray(versions, dtype=np.int64)
        rows = np.arange(len(versions), dtype=np.int64)
        return np.flatnonzero((versions > 0) & ~self.covers(spec, rows, versions))

    def covered_fn(self, spec: TableSpec) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
        """The ``covered(ids, versions)`` predicate :meth:`UndoHistory.values_at_cut` takes."""
        return lambda ids, versions: self.covers(spec, ids, versions)

    def to_wire(self) -> dict[str, Any]:
        return {"name": self.name, "model": self.model, "taken_at": float(self.taken_at), "seq": self.seq,
                "knowledge": _knowledge_to_wire(self.knowledge)}

    @classmethod
    def from_wire(cls, data: object) -> "Cut":
        """Decode :meth:`to_wire`'s form; bad input raises :class:`ProtocolError`."""
        if not isinstance(data, dict):
            raise ProtocolError("cut must be a map", "bad_cut")
        try:
            name, model, taken_at, seq, kw = (data["name"], data["model"], data["taken_at"], data["seq"],
                                              data["knowledge"])
        except KeyError as e:
            raise ProtocolError(f"cut without {e}", "bad_cut") from None
        check_name("cut", name, ProtocolError)
        check_name("model", model, ProtocolError)
        if (not isinstance(taken_at, (int, float)) or isinstance(taken_at, bool) or not math.isfinite(taken_at)
                or taken_at < 0):
            raise ProtocolError(f"bad taken_at {taken_at!r:.40}", "bad_cut")
        _check_wire_int("seq", seq, (1 << 63) - 1, "bad_cut")
        return cls(name, model, float(taken_at), _knowledge_from_wire(kw), seq)


def _age_key(c: Cut) -> tuple[float, str]:
    return (c.taken_at, c.name)


@dataclass(frozen=True, slots=True)
class CutPolicy:
    """How a :class:`CutRegistry` takes and keeps cuts.

    Attributes:
        auto_interval_s: seconds between automatic cuts.  A rollback goes back to
            the newest cut before the damage, so this bounds how much good
            freshness a rollback throws away; each cut costs one knowledge copy.
        retention: automatic cuts kept per model; ``retention * auto_interval_s``
            is how far back a rollback can reach (size the undo history for it).
        max_named: named cuts kept per model (oldest dropped beyond).
        forget_on_retire: release undo history older than the oldest live cut.
    """

    auto_interval_s: float = DEFAULT_AUTO_INTERVAL_S
    retention: int = DEFAULT_RETENTION
    max_named: int = DEFAULT_MAX_NAMED
    forget_on_retire: bool = True

    def __post_init__(self) -> None:
        if not self.auto_interval_s >= 0.001:
            raise UsageError("auto_interval_s must be at least a millisecond")
        if self.retention < 1 or self.max_named < 0:
            raise UsageError("retention must be >= 1 and max_named >= 0")


class CutRegistry:
    """The cuts of every model on one replica (sans-IO: time is an argument).

    Args:
        policy: a :class:`CutPolicy`.
        undo: the replica's undo history, for :meth:`restorable` and to release
            history when cuts retire; None to manage it elsewhere.

    Example:
        >>> reg = CutRegistry(CutPolicy(auto_interval_s=60, retention=2))
        >>> snap = lambda: ({("t", 0): Knowledge({1: 3})}, 10)
        >>> [c.name for c in filter(None, (reg.maybe_auto_cut("m", t, snap) for t in (0, 30, 60, 120)))]
        ['auto-0', 'auto-60000', 'auto-120000']
        >>> [c.name for c in reg.cuts("m")]
        ['auto-60000', 'auto-120000']
    """

    def __init__(self, policy: CutPolicy | None = None, undo: Any = None) -> None:
        self.policy = policy or CutPolicy()
        self.undo = undo
        self._cuts: dict[str, dict[str, Cut]] = {}
        self._last_auto: dict[str, float] = {}

    def take(self, model: str, name: str, now: float, knowledge: ShardKnowledge, seq: int) -> Cut:
        """Take a named cut (an operator's or the state manager's restore point)."""
        if name.startswith(AUTO_PREFIX):
            raise UsageError(f"cut names starting with {AUTO_PREFIX!r} are reserved for automatic cuts")
        cuts = self._cuts.setdefault(model, {})
        if name in cuts:
            raise UsageError(f"model {model} already has a cut named {name!r}")
        cut = Cut(name, model, now, knowledge, seq)
        cuts[name] = cut
        self._retire(model)
        return cut

    def maybe_auto_cut(self, model: str, now: float,
                       knowledge_fn: Callable[[], tuple[ShardKnowledge, int]]) -> Cut | None:
        """Take an automatic cut when ``auto_interval_s`` has passed since the last one.

        Args:
            knowledge_fn: returns ``(knowledge, seq)`` read at one instant (no apply
                in between), called only when a cut is due.
        """
        last = self._last_auto.get(model)
        if last is not None and now - last < self.policy.auto_interval_s:
            return None
        knowledge, seq = knowledge_fn()
        cut = Cut(f"{AUTO_PREFIX}{int(round(now * 1000))}", model, now, knowledge, seq)
        self._cuts.setdefault(model, {})[cut.name] = cut
        self._last_auto[model] = now
        self._retire(model)
        return cut

    def add(self, cut: Cut) -> None:
        """Register a cut received from elsewhere (e.g. the coordinator's, from the wire)."""
        self._cuts.setdefault(cut.model, {})[cut.name] = cut

    def learn(self, cut: Cut) -> bool:
        """Keep a named cut learnt from a peer or a snapshot, unless it is known already or
        older than every named cut retention keeps; True when kept.

        Refusing what retention would drop at once keeps replicas' named-cut sets (and so
        :meth:`names_digest`) converging: two replicas end with the same newest
        ``max_named`` cuts whatever order they learn them in.
        """
        cuts = self._cuts.setdefault(cut.model, {})
        if cut.name in cuts:
            return False
        if not cut.name.startswith(AUTO_PREFIX):
            named = [c for c in cuts.values() if not c.name.startswith(AUTO_PREFIX)]
            if len(named) >= self.policy.max_named and all(_age_key(cut) < _age_key(c) for c in named):
                return False
        cuts[cut.name] = cut
        self._retire(cut.model)
        return cut.name in cuts

    def named(self, model: str) -> list[Cut]:
        """Named (not automatic) cuts of a model, oldest first: the ones replicas share."""
        return sorted((c for c in self._cuts.get(model, {}).values() if not c.name.startswith(AUTO_PREFIX)),
                      key=_age_key)

    def names_digest(self, model: str) -> int:
        """64-bit digest of the names of a model's named cuts (0 when none): replicas
        gossip it and compare their cut lists only when it differs."""
        names = sorted(c.name for c in self._cuts.get(model, {}).values() if not c.name.startswith(AUTO_PREFIX))
        if not names:
            return 0
        return int.from_bytes(hashlib.blake2b("\n".join(names).encode(), digest_size=8).digest(), "little")

    def get(self, model: str, name: str) -> Cut:
        try:
            return self._cuts[model][name]
        except KeyError:
            raise UsageError(f"model {model} has no cut {name!r}") from None

    def cuts(self, model: str) -> list[Cut]:
        """Live cuts of a model, oldest first."""
        return sorted(self._cuts.get(model, {}).values(), key=lambda c: (c.seq, c.taken_at, c.name))

    def latest_before(self, model: str, t: float, restorable_only: bool = True) -> Cut | None:
        """The newest cut taken at or before ``t`` (e.g. before the anomaly began).

        The state manager passes the detection time minus the detector's worst
        detection delay, so the cut predates the harmful update.
        """
        best = None
        for c in self.cuts(model):
            if c.taken_at <= t and (not restorable_only or self.restorable(c)):
                if best is None or (c.taken_at, c.seq) > (best.taken_at, best.seq):
                    best = c
        return best

    def drop(self, model: str, name: str) -> None:
        self._cuts.get(model, {}).pop(name, None)
        self._forget(model)

    def restorable(self, cut: Cut) -> bool:
        """True when the undo history still holds everything after the cut."""
        if self.undo is None:
            raise UsageError("this registry has no undo history to check against")
        return cut.seq >= self.undo.horizon(cut.model)

    def oldest_seq(self, model: str) -> int | None:
        cuts = self._cuts.get(model)
        return min(c.seq for c in cuts.values()) if cuts else None

    def snapshot(self) -> dict[str, Any]:
        """JSON-ready status: per model its cuts (name, time, seq, restorable)."""
        out = {}
        for model in sorted(self._cuts):
            out[model] = [{"name": c.name, "taken_at": c.taken_at, "seq": c.seq,
                           "restorable": self.restorable(c) if self.undo is not None else None}
                          for c in self.cuts(model)]
        return out

    def _retire(self, model: str) -> None:
        cuts = self._cuts[model]
        autos = sorted((c for c in cuts.values() if c.name.startswith(AUTO_PREFIX)), key=_age_key)
        # Name breaks ties so that every replica retires the same cuts.
        named = sorted((c for c in cuts.values() if not c.name.startswith(AUTO_PREFIX)), key=_age_key)
        for c in autos[:max(0, len(autos) - self.policy.retention)]:
            del cuts[c.name]
        for c in named[:max(0, len(named) - self.policy.max_named)]:
            del cuts[c.name]
        self._forget(model)

    def _forget(self, model: str) -> None:
        if self.undo is not None and self.policy.forget_on_retire:
            oldest = self.oldest_seq(model)
            if oldest is not None:
                self.undo.forget_before(model, oldest)


@dataclass(frozen=True, slots=True)
class FenceRange:
    """One rollback's fenced updates: counters in ``(lower[table, shard][o], upper[o]]``.

    Attributes:
        model: the model rolled back.
        cut: name of the cut it went back to.
        lower: the cut's knowledge per (table, shard).
        upper: origin -> counter at the rollback point (per model; see the module docstring).
        shard_rows: rows per shard of each table (the shard function at fence time).
    """

    model: str
    cut: str
    lower: ShardKnowledge
    upper: Mapping[int, int]
    shard_rows: Mapping[str, int]
    _tables: dict[str, _ShardOriginTable] = field(default_factory=dict, compare=False, repr=False)
    _upper: tuple[np.ndarray, np.ndarray] = field(default=None, compare=False, repr=False)  # type: ignore

    def __post_init__(self) -> None:
        origins = np.array(sorted(self.upper), dtype=np.int64)
        object.__setattr__(self, "_upper", (origins, np.array([self.upper[o] for o in origins.tolist()],
                                                                np.int64)))

    def mask(self, table: str, ids: np.ndarray, versions: np.ndarray) -> np.ndarray:
        origins_u, counters_u = self._upper
        out = np.zeros(len(versions), dtype=bool)
        if len(origins_u) == 0 or len(versions) == 0:
            return out
        o = origins_of(versions)
        c = counters_of(versions)
        j = np.searchsorted(origins_u, o)
        np.minimum(j, len(origins_u) - 1, out=j)
        matched = origins_u[j] == o
        hit = matched & (c <= counters_u[j])
        if origins_u[0] == 0:  # origin 0: every origin not named (origins of versions are >= 1)
            hit |= ~matched & (c <= counters_u[0])
        if not hit.any():
            return out
        tab = self._tables.get(table)
        if tab is None:
            tab = self._tables[table] = _ShardOriginTable(_by_table(self.lower).get(table, {}))
        rows = self.shard_rows.get(table)
        shards = ids // rows if rows else np.zeros(len(ids), np.int64)
        lower = tab.lookup(shards, o, default=0)
        return hit & (c > lower)

    def to_wire(self) -> dict[str, Any]:
        return {"model": self.model, "cut": self.cut, "lower": _knowledge_to_wire(self.lower),
                "upper": [[o, c] for o, c in sorted(self.upper.items())],
                "shard_rows": [[t, n] for t, n in sorted(self.shard_rows.items())]}

    @classmethod
    def from_wire(cls, data: object) -> "FenceRange":
        if not isinstance(data, dict):
            raise ProtocolError("fence range must be a map", "bad_fence")
        try:
            model, cut, lower, upper, shard_rows = (data["model"], data["cut"], data["lower"], data["upper"],
                                                    data["shard_rows"])
        except KeyError as e:
            raise ProtocolError(f"fence range without {e}", "bad_fence") from None
        check_name("model", model, ProtocolError)
        check_name("cut", cut, ProtocolError)
        if not isinstance(upper, list) or len(upper) > MAX_ORIGIN:
            raise ProtocolError("fence upper must be a list of [origin, counter]", "bad_fence")
        up: dict[int, int] = {}
        for item in upper:
            if not isinstance(item, (list, tuple)) or len(item) != 2:
                raise ProtocolError(f"bad fence upper entry {item!r:.60}", "bad_fence")
            o = _check_wire_int("origin", item[0], MAX_ORIGIN, "bad_fence")
            if o in up:
                raise ProtocolError(f"bad or duplicate fence origin {o}", "bad_fence")
            up[o] = _check_wire_int("counter", item[1], MAX_COUNTER, "bad_fence")
        if not isinstance(shard_rows, list) or len(shard_rows) > MAX_CUT_ENTRIES:
            raise ProtocolError("fence shard_rows must be a list of [table, rows]", "bad_fence")
        sr: dict[str, int] = {}
        for item in shard_rows:
            if not isinstance(item, (list, tuple)) or len(item) != 2:
                raise ProtocolError(f"bad fence shard_rows entry {item!r:.60}", "bad_fence")
            t = check_name("table", item[0], ProtocolError)
            n = _check_wire_int("shard_rows", item[1], MAX_TABLE_ROWS, "bad_fence")
            if n == 0 or t in sr:
                raise ProtocolError(f"bad or duplicate shard_rows for {t}", "bad_fence")
            sr[t] = n
        try:
            lo = _knowledge_from_wire(lower)
        except ProtocolError as e:
            raise ProtocolError(str(e), "bad_fence") from None
        return cls(model, cut, lo, up, sr)


class Fence:
    """Rolled-back version ranges that must never be applied again, per model.

    The node masks every incoming delta (publish, push, pull answer) with
    :meth:`mask` and drops the fenced rows; fences travel to peers with
    :meth:`to_wire` / :meth:`merge` so every replica refuses the same updates.

    Example:
        >>> import numpy as np
        >>> from ekko.core.spec import ModelSpec, TableSpec
        >>> from ekko.core.version import pack
        >>> spec = ModelSpec("m", tables=[TableSpec("t", rows=8, dim=2, shards=2)])
        >>> cut = Cut("c", "m", 0.0, {("t", 0): Knowledge({1: 10}), ("t", 1): Knowledge({1: 20})}, seq=3)
        >>> fence = Fence()
        >>> _ = fence.add(spec, cut, rollback_point={1: 30})
        >>> # counter 15: after the cut on shard 0 (fenced), inside it on shard 1; 31: after the rollback
        >>> fence.mask("m", "t", np.array([0, 4, 0]), np.array([pack(15, 1), pack(15, 1), pack(31, 1)])).tolist()
        [True, False, False]
    """

    def __init__(self) -> None:
        self._ranges: dict[str, list[FenceRange]] = {}

    def add(self, spec: ModelSpec, cut: Cut, rollback_point: Mapping[int, int] | Knowledge) -> FenceRange:
        """Fence everything of ``spec``'s model after ``cut`` up to ``rollback_point`` (origin -> counter)."""
        if cut.model != spec.name:
            raise UsageError(f"cut {cut.name} is of model {cut.model}, not {spec.name}")
        upper = dict(rollback_point.items())
        for o, c in upper.items():
            if not (isinstance(o, int) and 0 <= o <= MAX_ORIGIN and isinstance(c, int) and 0 <= c <= MAX_COUNTER):
                raise UsageError(f"bad rollback point entry {o}: {c}")
        rng = FenceRange(spec.name, cut.name, cut.knowledge, upper, {t.name: t.shard_rows for t in spec.tables})
        self.add_range(rng)
        return rng

    def add_range(self, rng: FenceRange) -> bool:
        """Add a range (e.g. from a peer); False when it is already here."""
        ranges = self._ranges.setdefault(rng.model, [])
        if any(r == rng for r in ranges):
            return False
        ranges.append(rng)
        return True

    def merge(self, other: "Fence") -> int:
        """Union with another fence (gossiped); returns the number of new ranges."""
        return sum(self.add_range(r) for rs in other._ranges.values() for r in rs)

    def ranges(self, model: str) -> list[FenceRange]:
        return list(self._ranges.get(model, ()))

    def retire(self, model: str, cut: str) -> None:
        """Drop the range of one rollback (every replica's knowledge is past it and no row holds it)."""
        self._ranges[model] = [r for r in self._ranges.get(model, ()) if r.cut != cut]

    def mask(self, model: str, table: str, ids: np.ndarray, versions: np.ndarray) -> np.ndarray:
        """Vectorized: True where (row, packed version) is fenced and must not be applied."""
        versions = np.asarray(versions, dtype=np.int64)
        ranges = self._ranges.get(model)
        if not ranges:
            return np.zeros(len(versions), dtype=bool)
        ids = np.asarray(ids, dtype=np.int64)
        out = ranges[0].mask(table, ids, versions)
        for r in ranges[1:]:
            out |= r.mask(table, ids, versions)
        return out

    def to_wire(self) -> list[dict[str, Any]]:
        return [r.to_wire() for m in sorted(self._ranges) for r in self._ranges[m]]

    @classmethod
    def from_wire(cls, data: object) -> "Fence":
        """Decode :meth:`to_wire`'s form; bad input raises :class:`ProtocolError`."""
        if not isinstance(data, list) or len(data) > MAX_FENCE_RANGES:
            raise ProtocolError(f"fence must be a list of at most {MAX_FENCE_RANGES} ranges", "bad_fence")
        f = cls()
        for item in data:
            f.add_range(FenceRange.from_wire(item))
        return f

    def __len__(self) -> int:
        return sum(len(r) for r in self._ranges.values())

    def __bool__(self) -> bool:
        # Asked on every apply: cheaper than summing the lengths when there is no fence.
        return any(self._ranges.values())
