"""Parameters, fault plans and the reference fence of the fault harness (:mod:`simulator.faults`).

:class:`FaultConfig` holds every parameter (the ``[faults]`` table of
``simulator/scenarios/faults.toml``), :class:`FaultPlan` draws one seed's faults from
it, :class:`RefRollback` is the harness's own account of what a rollback fences, and
:func:`parse_fault_scenario` reads a scenario file with a ``[faults]`` table.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from ekko.core.errors import UsageError
from ekko.core.spec import TableSpec
from ekko.core.version import counters_of, origins_of


@dataclass
class FaultConfig:
    """Parameters of the fault runs (``[faults]`` of ``simulator/scenarios/faults.toml``).

    Every field has a default; the scenario file says where each value comes from.

    Attributes:
        replicas: replicas, placed round-robin over the DCs.
        dcs: data centres.
        fault_phase_s: simulated seconds during which faults happen and the publisher publishes.
        publish_interval_s: seconds between two publishes.
        max_rows_per_publish: most rows of the sparse table in one publish.
        convergence_bound_s: simulated seconds after the faults stop within which
            every replica must hold the expected state.
        pull_response_bytes: pull answer budget (small, so answers get truncated).
        max_loss, max_duplicate, max_reorder: background probabilities, drawn in [0, these].
        max_reorder_delay_ms: bound of a reordering delay spike.
        loss_spike: loss probability during a loss spike.
        min_episodes, max_episodes: timed network/crash episodes per seed.
        min_episode_s, max_episode_s: their length bounds.
        max_down: most replicas down at once (never all).
        min_rtt_ms, max_rtt_ms: one-way delay range between DCs.
        rollback_prob: chance a seed has a rollback; ``second_rollback_prob`` a second one.
        publisher_restart_prob: chance a seed restarts its publisher (and again for a second).
        blind_restart_prob: chance a seed restarts its publisher without its state under
            the *same* origin (``PublisherChain.restore(None, origin, history_known=False)``:
            its first frame per shard carries ``RESTART_LINK``).
        foreign_restart_prob: chance a seed restarts its publisher with a *foreign* chain:
            its state dir was used against another cluster meanwhile, so its heads point
            at counters this cluster never saw.
        backup_restart_prob: chance a seed restarts its publisher from an older backup of
            its state (a *stale* chain: its heads lag what this cluster holds).
        foreign_start_prob: chance a seed's first publisher starts with foreign chain
            state (a trainer restored from backup into a new cluster).
        disk_loss_prob: chance a seed loses a replica with its disk: it comes back empty,
            with no protocol state, and frames only it held are genuinely lost.
        chain_gap_prob: chance a seed cuts the ingest off from its peers while it still
            acknowledges a few frames, then makes the publisher fail over to other
            replicas (a chain gap everywhere else until the heal).
        chain_gap_lost_prob: share of those chain gaps whose ingest then loses its disk
            before the heal (its frames are lost everywhere: only gap probes close them).
        publisher_cut_prob: share of cuts the publisher takes (``Publisher.cut``): the
            replica first waits until its knowledge covers the publisher's acknowledged
            heads, and the reference model's cut keeps them.

    Example:
        >>> FaultConfig(replicas=4).replicas
        4
        >>> FaultConfig.from_dict({"replicas": 1})
        Traceback (most recent call last):
        ...
        ekko.core.errors.UsageError: faults: replicas must be >= 2
    """

    replicas: int = 9
    dcs: int = 3
    fault_phase_s: float = 12.0
    publish_interval_s: float = 0.2
    max_rows_per_publish: int = 24
    convergence_bound_s: float = 60.0
    pull_response_bytes: int = 2048
    max_loss: float = 0.08
    max_duplicate: float = 0.08
    max_reorder: float = 0.15
    max_reorder_delay_ms: float = 1500.0
    loss_spike: float = 0.5
    min_episodes: int = 3
    max_episodes: int = 7
    min_episode_s: float = 0.5
    max_episode_s: float = 4.0
    max_down: int = 2
    min_rtt_ms: float = 30.0
    max_rtt_ms: float = 160.0
    rollback_prob: float = 0.8
    second_rollback_prob: float = 0.35
    publisher_restart_prob: float = 0.6
    blind_restart_prob: float = 0.3
    foreign_restart_prob: float = 0.25
    backup_restart_prob: float = 0.25
    foreign_start_prob: float = 0.15
    disk_loss_prob: float = 0.35
    chain_gap_prob: float = 0.35
    chain_gap_lost_prob: float = 0.5
    publisher_cut_prob: float = 0.5

    def __post_init__(self) -> None:
        if self.replicas < 2:
            raise UsageError("faults: replicas must be >= 2")
        if self.dcs < 1 or self.max_down < 0 or self.max_rows_per_publish < 1 or self.pull_response_bytes < 256:
            raise UsageError("faults: dcs and max_rows_per_publish must be >= 1, max_down >= 0, "
                             "pull_response_bytes >= 256")
        if not (0 < self.publish_interval_s and 3.0 <= self.fault_phase_s and 0 < self.convergence_bound_s
                and 0 < self.min_episode_s <= self.max_episode_s and 0 <= self.min_episodes <= self.max_episodes
                and 0 <= self.min_rtt_ms <= self.max_rtt_ms and self.max_reorder_delay_ms >= 50):
            raise UsageError("faults: times must be positive and every min <= its max (fault_phase_s >= 3, "
                             "max_reorder_delay_ms >= 50)")
        for name in ("max_loss", "max_duplicate", "max_reorder", "loss_spike", "rollback_prob",
                     "second_rollback_prob", "publisher_restart_prob", "blind_restart_prob",
                     "foreign_restart_prob", "backup_restart_prob", "foreign_start_prob", "disk_loss_prob",
                     "chain_gap_prob", "chain_gap_lost_prob", "publisher_cut_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise UsageError(f"faults: {name} must be a probability in [0, 1]")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FaultConfig:
        """From a TOML table; unknown keys are an error (a typo must not pass silently)."""
        known = {f.name: f.type for f in fields(cls)}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise UsageError(f"faults: unknown keys {unknown}; known: {sorted(known)}")
        out = {}
        for k, v in d.items():
            want = int if cls.__dataclass_fields__[k].type in ("int", int) else float
            if isinstance(v, bool) or not isinstance(v, (int, float)) or (want is int and not isinstance(v, int)):
                raise UsageError(f"faults: {k} must be {'an integer' if want is int else 'a number'}")
            out[k] = want(v)
        return cls(**out)


#: the defaults (what ``ekko sim faults`` runs).
DEFAULT_CONFIG = FaultConfig()
DEFAULT_REPLICAS = DEFAULT_CONFIG.replicas
NUM_DCS = DEFAULT_CONFIG.dcs
FAULT_PHASE_S = DEFAULT_CONFIG.fault_phase_s
CONVERGENCE_BOUND_S = DEFAULT_CONFIG.convergence_bound_s

EPISODE_KINDS = ("partition_halves", "isolate_dc", "one_way_cut", "crash", "loss_spike")
#: drawn from a second stream of the seed, so the episodes above keep their draws.
EXTRA_KINDS = ("rollback", "publisher_restart")
#: drawn from a third stream (issue 13), so the episodes of both streams above keep theirs:
#: a replica lost with its disk, and a chain gap (the ingest cut off while it acknowledges).
LOSS_KINDS = ("disk_loss", "chain_gap")
#: how a publisher comes back (``publisher_restart`` episodes): ``state`` keeps its persisted
#: chain and pending frame; ``new_origin`` lost them and takes a new origin; ``same_origin``
#: lost them and keeps its origin (RESTART_LINK); ``foreign`` has state whose heads name
#: counters published to another cluster; ``backup`` has an older copy of its state.
RESTART_MODES = ("state", "new_origin", "same_origin", "foreign", "backup")
INVARIANTS = ("convergence", "monotonicity", "idempotence", "fence", "publisher")


@dataclass
class Episode:
    """One timed fault: ``kind`` from :data:`EPISODE_KINDS`, :data:`EXTRA_KINDS` or
    :data:`LOSS_KINDS`, active on ``[start, start + length)``.  For a rollback, the cut
    is taken at ``start`` (at ``args[0]``) and the rollback runs at ``start + length``
    (at a random replica that knows the cut, or at ``args[1]`` when given); for a
    publisher restart the publisher is down for ``length`` (``args = (mode, ack_lost)``,
    the mode a bool for the first stream: True = ``state``, False = ``new_origin``); a
    disk loss keeps ``args[0]`` down for ``length`` and brings it back empty; a chain gap
    (``args = (frames, lose_disk)``) isolates the ingest for ``length``."""

    start: float
    length: float
    kind: str
    args: tuple[Any, ...] = ()


@dataclass
class FaultPlan:
    """The faults of one seed, all drawn from it.

    Example:
        >>> p = FaultPlan.draw(3, ["r0", "r1", "r2"], ["dc0", "dc1", "dc2"])
        >>> p == FaultPlan.draw(3, ["r0", "r1", "r2"], ["dc0", "dc1", "dc2"])
        True
        >>> all(0 <= e.start < FAULT_PHASE_S for e in p.episodes)
        True
    """

    loss: float
    duplicate: float
    reorder: float
    reorder_delay_ms: float
    rtt_ms: dict[tuple[str, str], float]
    episodes: list[Episode] = field(default_factory=list)
    #: the first publisher starts with foreign chain state (heads this cluster never saw).
    foreign_start: bool = False

    @classmethod
    def draw(cls, seed: int, nodes: list[str], dcs: list[str], cfg: FaultConfig = DEFAULT_CONFIG) -> FaultPlan:
        rng = random.Random(f"ekko-faults/{seed}")
        phase = cfg.fault_phase_s
        rtt = {(a, b): round(rng.uniform(cfg.min_rtt_ms, cfg.max_rtt_ms), 1)
               for i, a in enumerate(dcs) for b in dcs[i + 1:]}
        plan = cls(loss=rng.uniform(0, cfg.max_loss), duplicate=rng.uniform(0, cfg.max_duplicate),
                   reorder=rng.uniform(0, cfg.max_reorder), reorder_delay_ms=rng.uniform(50, cfg.max_reorder_delay_ms),
                   rtt_ms=rtt)
        for _ in range(rng.randint(cfg.min_episodes, cfg.max_episodes)):
            kind = rng.choice(EPISODE_KINDS)
            start = rng.uniform(0.5, phase - 0.5)
            length = min(rng.uniform(cfg.min_episode_s, cfg.max_episode_s), phase - start)
            if kind == "partition_halves":
                shuffled = nodes[:]
                rng.shuffle(shuffled)
                half = rng.randint(1, len(nodes) - 1) if len(nodes) > 1 else 1
                args: tuple[Any, ...] = (tuple(sorted(shuffled[:half])),)
            elif kind == "isolate_dc":
                args = (rng.choice(dcs),)
            elif kind == "one_way_cut":
                a, b = rng.sample(dcs, 2) if len(dcs) > 1 else (dcs[0], dcs[0])
                args = (a, b)
            elif kind == "crash":
                args = (rng.choice(nodes),)
            else:
                args = ()
            plan.episodes.append(Episode(start, length, kind, args))
        plan.episodes.extend(cls._draw_extra(seed, nodes, plan.episodes, cfg))
        losses, plan.foreign_start = cls._draw_losses(seed, nodes, cfg)
        plan.episodes.extend(losses)
        plan.episodes.sort(key=lambda e: (e.start, e.kind))
        return plan

    @staticmethod
    def _draw_extra(seed: int, nodes: list[str], episodes: list[Episode], cfg: FaultConfig) -> list[Episode]:
        """Rollbacks and publisher restarts, from their own stream of the seed."""
        rng = random.Random(f"ekko-faults/{seed}/rollbacks-publishers")
        phase = cfg.fault_phase_s
        out: list[Episode] = []
        n_rb = int(rng.random() < cfg.rollback_prob) + int(rng.random() < cfg.second_rollback_prob)
        harsh = [e for e in episodes if e.kind in ("partition_halves", "isolate_dc", "one_way_cut", "crash")]
        for _ in range(n_rb):
            delay = rng.uniform(0.3, 3.0)
            if harsh and rng.random() < 0.6:
                # Roll back while a partition or crash is on: someone learns of it late.
                e = rng.choice(harsh)
                at = rng.uniform(e.start, e.start + e.length)
                start = max(0.5, at - delay)
            else:
                start = rng.uniform(0.5, phase - 1.0)
            delay = max(0.05, min(delay, phase - 0.5 - start))
            out.append(Episode(start, delay, "rollback", (rng.choice(nodes),)))
        for _ in range(int(rng.random() < cfg.publisher_restart_prob) + int(rng.random() < 0.25)):
            start = rng.uniform(0.5, phase - 1.0)
            length = min(rng.uniform(0.1, 2.0), phase - 0.5 - start)
            out.append(Episode(start, length, "publisher_restart", (rng.random() < 0.5, rng.random() < 0.5)))
        return out


    @staticmethod
    def _draw_losses(seed: int, nodes: list[str], cfg: FaultConfig) -> tuple[list[Episode], bool]:
        """Issue 13's faults (restarts without or with stale/foreign state, lost disks,
        chain gaps), from a third stream: with their probabilities at 0, a seed draws
        exactly what it drew before they existed."""
        rng = random.Random(f"ekko-faults/{seed}/lost-disks-chains")
        phase = cfg.fault_phase_s
        out: list[Episode] = []
        for mode, p in (("same_origin", cfg.blind_restart_prob), ("foreign", cfg.foreign_restart_prob),
                        ("backup", cfg.backup_restart_prob)):
            start, length, ack_lost = rng.uniform(0.5, phase - 1.0), rng.uniform(0.1, 2.0), rng.random() < 0.5
            if rng.random() < p:
                out.append(Episode(start, min(length, phase - 0.5 - start), "publisher_restart", (mode, ack_lost)))
        foreign_start = rng.random() < cfg.foreign_start_prob
        start, length, who = rng.uniform(0.5, phase - 0.5), rng.uniform(cfg.min_episode_s, cfg.max_episode_s), \
            rng.choice(nodes)
        if rng.random() < cfg.disk_loss_prob:
            out.append(Episode(start, min(length, phase - start), "disk_loss", (who,)))
        start, length, frames = rng.uniform(0.5, phase - 2.0), rng.uniform(1.5, 4.0), rng.randint(1, 4)
        lose = rng.random() < cfg.chain_gap_lost_prob
        if rng.random() < cfg.chain_gap_prob:
            out.append(Episode(start, min(length, phase - start), "chain_gap", (frames, lose)))
        return out, foreign_start


@dataclass
class RefRollback:
    """The reference model's view of one rollback: what it fences, computed by the harness.

    ``lower`` is the cut's knowledge (its definition), ``until`` the rollback point the
    harness chose, ``origins`` every origin any publisher had used by then.
    """

    rid: str
    cut: str
    lower: dict[tuple[str, int], dict[int, int]]
    until: int
    origins: frozenset[int]
    at: float

    def fenced(self, table: TableSpec, ids: np.ndarray, versions: np.ndarray) -> np.ndarray:
        """Which (row, packed version) pairs this rollback fences (vectorized)."""
        versions = np.asarray(versions, np.int64)
        c = counters_of(versions)
        o = origins_of(versions)
        lo = np.zeros(len(versions), np.int64)
        shards = table.shards_of(np.asarray(ids, np.int64))
        for (t, s), k in self.lower.items():
            if t != table.name:
                continue
            sel = shards == s
            for origin, counter in k.items():
                lo[sel & (o == origin)] = counter
        inside = np.isin(o, np.fromiter(self.origins, np.int64, len(self.origins)))
        return (versions > 0) & inside & (c <= self.until) & (c > lo)


@dataclass
class FaultScenario:
    """A fault-injection scenario file (one with a ``[faults]`` table), e.g. the shipped ``faults``.

    ``ekko sim run faults`` runs :func:`run_faults` with these: ``seeds`` seeds from
    ``seed``, every :class:`FaultConfig` field from ``[faults]``.

    Example:
        >>> sc = parse_fault_scenario({"scenario": {"seeds": 2}, "faults": {"replicas": 4}}, "mine")
        >>> sc.name, sc.seeds, sc.faults.replicas
        ('mine', 2, 4)
    """

    name: str
    description: str
    seed: int
    seeds: int
    faults: FaultConfig
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def replicas(self) -> int:
        return self.faults.replicas


def parse_fault_scenario(d: dict[str, Any], name: str = "custom") -> FaultScenario:
    """Parse a scenario dict with a ``[faults]`` table (see ``simulator/scenarios/faults.toml``)."""
    sc = dict(d.get("scenario", {}))
    extra = sorted(set(d) - {"scenario", "faults"})
    if extra:
        raise UsageError(f"a fault scenario has only [scenario] and [faults], not {extra}")
    unknown = sorted(set(sc) - {"name", "description", "seed", "seeds"})
    if unknown:
        raise UsageError(f"fault scenario: unknown [scenario] keys {unknown}")
    seed, seeds = sc.get("seed", 0), sc.get("seeds", 10)
    if any(isinstance(x, bool) or not isinstance(x, int) for x in (seed, seeds)) or seeds < 1 or seed < 0:
        raise UsageError("fault scenario: seed must be an integer >= 0 and seeds >= 1")
    faults = d.get("faults")
    if not isinstance(faults, dict):
        raise UsageError("fault scenario: [faults] must be a table")
    return FaultScenario(str(sc.get("name", name)), str(sc.get("description", "")), seed, seeds,
                         FaultConfig.from_dict(faults), d)
