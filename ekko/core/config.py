"""Node configuration: one object, every field documented, three presets.

Presets differ in a few timing fields (memberlist style):

* ``local`` -- every replica on one machine (tests, ``ekko demo``): fast rounds.
* ``lan``   -- one data centre, sub-millisecond RTTs.
* ``wan``   -- several data centres, tens to hundreds of milliseconds RTT.

Load from TOML with :func:`load_config` (a ``[node]`` table; any field may be
given, ``preset = "wan"`` picks the base).
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ekko.core.codec import COMPRESS_MIN_SAVING
from ekko.core.errors import UsageError

#: rollback records one publish acknowledgement names, oldest dropped first (the node keeps
#: at most rollback.protocol.MAX_ROLLBACK_RECORDS of all models); the SDK refuses longer lists.
MAX_ACK_ROLLBACKS = 32
#: probe delay tiers: a replica waits ``gap_probe_after * (1 + tier)`` before probing a gap
#: (:mod:`p2p.gaps`).
GAP_PROBE_TIERS = 3

#: largest pull answer (bytes of rows) one PULL_RESPONSE carries; the rest waits for the next round.
MAX_PULL_RESPONSE_BYTES = 4 << 20
#: largest push frame (bytes of rows).
MAX_PUSH_FRAME_BYTES = 1 << 20
#: push frame across DCs of the ``lan`` and ``wan`` presets: the WAN scheduler's preemption grain.
WAN_PUSH_FRAME_BYTES = 256 << 10
#: most shards one PULL_REQUEST names.
MAX_SHARDS_PER_PULL = 4096
#: most "held above knowledge" rows a requester lists per shard (extra rows may be resent).
MAX_HELD_ROWS_PER_SHARD = 1 << 16
#: most rows per publish frame.
MAX_PUBLISH_ROWS = 1 << 20
#: default ``max_clock_skew`` (seconds): how far a version's HLC time may lie ahead of a
#: replica's wall clock.  It must cover clock skew between hosts plus how far a busy
#: publisher's HLC runs ahead of its wall clock (each row takes one counter, 256 per ms:
#: a publisher above 256,000 rows/s drifts ahead), so it is generous.
MAX_CLOCK_SKEW_S = 300.0
#: default ``max_publish_ahead`` (seconds): how far a publish's HLC time may lie ahead of
#: the ingest replica's wall clock.  NTP keeps hosts within milliseconds; a publisher's HLC
#: runs ahead of its wall clock by its rows / 256 per millisecond (a 1M-row frame: 4 s).
MAX_PUBLISH_AHEAD_S = 10.0
#: default seconds between two returns of the heap's free pages to the OS (glibc
#: ``malloc_trim``, :mod:`ekko.server.heap_trim`).
HEAP_TRIM_INTERVAL_S = 1.0
#: anti-entropy rounds :meth:`NodeConfig.knowledge_bound` allows for pulls and for
#: knowledge to spread: an intra-DC round, a gateway's walk over its WAN pairings, the
#: far DC's round, with room for rounds whose partner held nothing new.
KNOWLEDGE_BOUND_ROUNDS = 20
#: anti-entropy rounds a shard in motion (rows pushed to it within ``push_grace``, no
#: waiting chain) may go without being pulled (``ae_defer_in_motion``).  Its pushes are
#: in flight: pulling them too sends every row twice.  A lost push shows as a waiting
#: chain at the next frame, or stops the motion; either ends the deferral at once, and
#: this bound caps it for what neither catches (a quiet origin's last frame lost while
#: another keeps the shard moving).
AE_DEFER_ROUNDS = 8
#: values of NodeConfig.durability: write-ahead log with fsync before the ack, or none.
DURABILITY_MODES = ("wal", "none")


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """Everything a replica node needs to know besides its identity.

    Attributes:
        preset: name of the preset this came from (informational).
        gossip_interval: seconds between membership gossip rounds.
        ae_interval: seconds between anti-entropy rounds (each round: one
            intra-DC partner and, for gateways, one cross-DC partner).
        suspect_after / dead_after / forget_after: failure detector, seconds of
            heartbeat silence (see :class:`p2p.membership.MembershipConfig`).
        gateways_per_dc: gateway replicas per shard per DC (WAN fan-in and
            fault tolerance; the paper's local leaders, spread per shard).
        dc_links: DC pairs that exchange directly; empty = full mesh.
        wan_partners_per_round: cross-DC anti-entropy partners per round; a gateway
            walks its (remote DC, rank, partner) pairings round-robin, so a full
            cycle takes ``pairings / wan_partners_per_round`` rounds.
        push: eagerly push updates (False = anti-entropy only, for ablations).
        push_mode: ``"topology"`` (ingest -> its DC and one gateway per shard per
            DC -> their DCs) or ``"random"`` (rumor mongering: push new rows to
            ``random_fanout`` random peers, who do the same; the ``random-gossip``
            baseline, no topology).
        random_fanout: peers each replica forwards new rows to in random mode.
        scheduler: outbound push queues: ``"fifo"`` (arrival order, no budget) or
            ``"priority"`` (:mod:`prioritizer`: Ekko's ``(p_g + p_u) * p_m`` score,
            top ``k_percent`` high priority, token-bucket budget per WAN link, aging).
        k_percent: share of updates (by score) treated as high priority.
        wan_update_bytes_per_s: push budget of each cross-DC link for model updates,
            bytes/s, leaving the rest of the link to inference traffic; 0 = unlimited.
            Only with ``scheduler = "priority"``.
        use_gateways: False lets every replica exchange across the WAN (ablation).
        use_shard_versions: False asks for every shard every round (no 64-bit
            shard-version skip) and answers by comparing the version of every row
            of the requested shards instead of using the recent-row index; the
            requester lists no held rows (ablation ``ekko-full-scan``).
        push_grace: seconds after a row's arrival during which cross-DC pull answers
            hold it back (its eager push is likely in flight); a few WAN RTTs.
        ae_defer_in_motion: anti-entropy leaves alone shards that pushes reached within
            ``push_grace`` and that wait on no chain, for at most
            :data:`AE_DEFER_ROUNDS` rounds: under steady publishing every shard
            differs between replicas only by pushes in flight, and pulling them
            again doubled the bytes and most of the CPU (issue #15).
        push_frame_bytes: bytes of rows per push frame across DCs: a frame is what the
            WAN scheduler sends whole, so it bounds how long a more urgent update waits
            behind one (the ``lan`` and ``wan`` presets: 256 KiB, 20 ms at 100 Mbit/s).
            ``local`` (one machine: no WAN link to share) takes the largest frame, as
            inside a DC: 1k rows of dim 64 (272 KB) then cross in one frame instead of
            two, and 9 daemons on 2 cores spent 10-15% less CPU per row (issue #15).
        lan_push_frame_bytes: bytes of rows per push frame to a member of the same DC,
            where bandwidth is plentiful and each frame's fixed CPU (the daemons' stream,
            decode, per-shard bookkeeping) is the cost: 1k rows of dim 64 (272 KB) went
            in two frames at 256 KiB; one frame cut the CPU per row of 9 daemons on 2
            cores by 15-25% (issue #15).
        cross_dc_min_saving: the fraction zstd must save for a frame to another DC to
            go compressed (inside a DC it is always
            :data:`~ekko.core.codec.COMPRESS_MIN_SAVING`).  The ``lan`` and ``wan``
            presets take any gain (0.0): WAN bandwidth is the scarce thing.  ``local``
            (every DC on one machine) keeps the LAN rule: a 1k-row dim-64 push gains
            12% for a 330 us compress at the ingest and a decompress at each gateway.
        pull_response_bytes: cap on rows per pull answer (Scuttlebutt's rule).
        queue_rows: bound on rows per outbound link queue.
        index_rows: rows the per-shard recent-update index holds before its
            watermark moves up (older rows are then found by a shard scan).
        snapshot_interval: seconds between automatic snapshots (0 = only at shutdown).
        undo_bytes: memory for the undo history (previous values and versions of
            overwritten rows) that rollback restores from; 0 turns rollback history
            off (a rollback then repairs every affected row from peers).
        auto_cut_interval: seconds between automatic cuts of every model on this
            replica (0 = only on demand).
        cut_retention: automatic cuts kept per model.
        auto_rollback: when quality reports make a model corrupted, roll it back to the
            newest cut taken while healthy (:mod:`rollback.manager`); False records the
            incident only.
        quality_warmup_windows: quality windows (paired online/baseline samples) the
            detector learns the metric's noise from before it may alarm (>= 3; 50 or
            more keeps the false-alarm rate near its design, see :mod:`rollback.detector`).
        baseline_pin_cut: non-empty makes this replica a *pinned baseline*: it holds
            every model at the named cut (updates the cut does not cover are not
            applied or adopted) so inference on it measures the baseline variant.
            Re-pin with no restart through ``POST /v1/models/{m}/baseline`` (``ekko
            baseline``); a pin set that way is kept in the data dir and wins over this
            field until the field changes.  "" = an ordinary replica.
        gap_probe_after: seconds a shard's knowledge may wait on a gap in a publisher's
            chain before this replica asks every member for the rows of that gap (a
            replica waits 1-3x this, by a hash of its id, so that few probe at once);
            once every member has answered, the gap is closed (:mod:`p2p.gaps`).  With
            it, knowledge reaches the newest acknowledged counters within
            :meth:`knowledge_bound` after faults end.
        max_publish_ahead: seconds a *publish's* versions may lie ahead of the ingest
            replica's wall clock (default :data:`MAX_PUBLISH_AHEAD_S`); a publish beyond
            it is refused (400, ``future_version``); the smaller of it and
            ``max_clock_skew`` applies.  Smaller than ``max_clock_skew`` by default:
            a publisher's clock that runs ahead makes its rows shadow every later
            update from a correct clock for as long as it is ahead, while a peer's
            frames only carry versions some publisher was already allowed.
        max_clock_skew: seconds a row version's HLC physical time (or a peer's
            knowledge or head) may lie ahead of this replica's wall clock; frames
            carrying a version beyond it are refused whole as impossible (reason
            ``future_version``), since one such row would shadow every later update
            of it.  ``inf`` turns the check off.

    Durability and back-pressure (daemon only; the simulator ignores them):
        durability: ``"wal"`` -- a publish is acknowledged after its frame is in the
            write-ahead log on disk (fsynced, group commit; :mod:`ekko.replica.wal`), so a
            crash right after the acknowledgement loses nothing; ``"none"`` --
            acknowledged once applied in memory (tests, ablations).
        max_publish_bytes_in_flight: bytes of publish bodies being received, applied
            or waiting for their fsync at once; beyond it publishes get 429 (one
            publish is always admitted when none is in flight, whatever its size).
        max_outbound_bytes: estimated bytes of peer messages queued in the HTTP
            transport; beyond it publishes get 429.
        max_push_backlog_rows: rows waiting in the outbound push queues, all links
            together; beyond it publishes get 429.
        max_wal_bytes: bytes of write-ahead log not yet covered by a snapshot; beyond
            it a snapshot is started and publishes get 429 until it is written.
        max_rss_bytes: resident memory of the daemon process (bytes, from
            ``/proc/self/statm``); beyond it publishes get 503.  0 = no bound (the
            model's tensors live in the same process: set it well above their size).
        heap_trim_interval: seconds between two returns of the heap's free pages to the
            OS (:mod:`ekko.server.heap_trim`); 0 = never.
    """

    preset: str = "local"
    gossip_interval: float = 0.2
    ae_interval: float = 0.25
    suspect_after: float = 2.0
    dead_after: float = 4.0
    forget_after: float = 60.0
    gateways_per_dc: int = 2
    dc_links: tuple[tuple[str, str], ...] = ()
    wan_partners_per_round: int = 4
    push: bool = True
    push_mode: str = "topology"
    random_fanout: int = 3
    scheduler: str = "fifo"
    k_percent: float = 5.0
    wan_update_bytes_per_s: float = 0.0
    use_gateways: bool = True
    use_shard_versions: bool = True
    push_grace: float = 0.5
    ae_defer_in_motion: bool = True
    push_frame_bytes: int = MAX_PUSH_FRAME_BYTES
    lan_push_frame_bytes: int = MAX_PUSH_FRAME_BYTES
    cross_dc_min_saving: float = COMPRESS_MIN_SAVING
    pull_response_bytes: int = 2 << 20
    queue_rows: int = 1 << 20
    index_rows: int = 1 << 16
    snapshot_interval: float = 60.0
    undo_bytes: int = 64 << 20
    auto_cut_interval: float = 0.0
    cut_retention: int = 60
    # model-state manager and baseline (issue #6)
    auto_rollback: bool = True
    quality_warmup_windows: int = 50
    baseline_pin_cut: str = ""
    gap_probe_after: float = 2.0
    max_publish_ahead: float = MAX_PUBLISH_AHEAD_S
    max_clock_skew: float = MAX_CLOCK_SKEW_S
    # -- durability and back-pressure (issue #7) --
    durability: str = "wal"
    max_publish_bytes_in_flight: int = 256 << 20
    max_outbound_bytes: int = 256 << 20
    max_push_backlog_rows: int = 4 << 20
    max_wal_bytes: int = 1 << 30
    max_rss_bytes: int = 0
    heap_trim_interval: float = HEAP_TRIM_INTERVAL_S

    def __post_init__(self) -> None:
        for name in ("gossip_interval", "ae_interval", "suspect_after", "dead_after", "forget_after"):
            if not getattr(self, name) > 0:
                raise UsageError(f"config {name} must be > 0")
        if not self.suspect_after < self.dead_after:
            raise UsageError("config suspect_after must be < dead_after")
        if self.push_mode not in ("topology", "random"):
            raise UsageError("config push_mode must be 'topology' or 'random'")
        if self.undo_bytes < 0 or self.auto_cut_interval < 0 or self.cut_retention < 1:
            raise UsageError("config undo_bytes and auto_cut_interval must be >= 0, cut_retention >= 1")
        if not isinstance(self.quality_warmup_windows, int) or self.quality_warmup_windows < 3:
            raise UsageError("config quality_warmup_windows must be an int >= 3")
        if self.scheduler not in ("fifo", "priority"):
            raise UsageError("config scheduler must be 'fifo' or 'priority'")
        if not 0 < self.k_percent < 100:
            raise UsageError("config k_percent must be in (0, 100)")
        if not self.wan_update_bytes_per_s >= 0:
            raise UsageError("config wan_update_bytes_per_s must be >= 0 (0 = unlimited)")
        if not 1 <= self.gateways_per_dc <= 16:
            raise UsageError("config gateways_per_dc must be in 1..16")
        if not 0 < self.pull_response_bytes <= MAX_PULL_RESPONSE_BYTES:
            raise UsageError(f"config pull_response_bytes must be in 1..{MAX_PULL_RESPONSE_BYTES}")
        if not self.heap_trim_interval >= 0:
            raise UsageError("config heap_trim_interval must be >= 0 seconds (0: never)")
        if not self.gap_probe_after > 0:
            raise UsageError("config gap_probe_after must be > 0 seconds")
        if not self.max_publish_ahead > 0:
            raise UsageError("config max_publish_ahead must be > 0 seconds (inf: no check)")
        if not self.max_clock_skew > 0:
            raise UsageError("config max_clock_skew must be > 0 seconds (inf: no check)")
        if not (isinstance(self.cross_dc_min_saving, (int, float)) and 0 <= self.cross_dc_min_saving < 1):
            raise UsageError("config cross_dc_min_saving must be a fraction in [0, 1)")
        for name in ("push_frame_bytes", "lan_push_frame_bytes"):
            if not 0 < getattr(self, name) <= MAX_PUSH_FRAME_BYTES:
                raise UsageError(f"config {name} must be in 1..{MAX_PUSH_FRAME_BYTES}")
        if self.durability not in DURABILITY_MODES:
            raise UsageError(f"config durability must be one of {list(DURABILITY_MODES)}")
        for name in ("max_publish_bytes_in_flight", "max_outbound_bytes", "max_push_backlog_rows",
                     "max_wal_bytes"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) > 0):
                raise UsageError(f"config {name} must be a positive integer")
        if not (isinstance(self.max_rss_bytes, int) and self.max_rss_bytes >= 0):
            raise UsageError("config max_rss_bytes must be an integer >= 0 (0 = no bound)")

    def knowledge_bound(self) -> float:
        """Seconds after faults end (every member reachable, no process stopped) within
        which every replica's knowledge reaches the newest acknowledged counters: a
        restarted replica's wait for its member list (``dead_after``: no gap closes
        before it), a gap's wait before the last probe tier plus its retries
        (``gap_probe_after * (GAP_PROBE_TIERS + 1)``), plus
        :data:`KNOWLEDGE_BOUND_ROUNDS` anti-entropy rounds for pulls and for the
        knowledge to spread across the gateways, plus :data:`AE_DEFER_ROUNDS` for a
        shard in motion.  ``bench/nemesis.py`` checks it.
        """
        rounds = KNOWLEDGE_BOUND_ROUNDS + (AE_DEFER_ROUNDS if self.ae_defer_in_motion else 0)
        return self.dead_after + self.gap_probe_after * (GAP_PROBE_TIERS + 1) + rounds * self.ae_interval

    def replace(self, **kw: Any) -> "NodeConfig":
        return dataclasses.replace(self, **kw)


PRESETS: dict[str, NodeConfig] = {
    "local": NodeConfig(),
    "lan": NodeConfig(preset="lan", gossip_interval=0.5, ae_interval=0.5, suspect_after=3.0, dead_after=6.0,
                      push_frame_bytes=WAN_PUSH_FRAME_BYTES, cross_dc_min_saving=0.0),
    "wan": NodeConfig(preset="wan", gossip_interval=1.0, ae_interval=1.0, suspect_after=5.0, dead_after=10.0,
                      forget_after=120.0, push_grace=1.0, gap_probe_after=5.0, push_frame_bytes=WAN_PUSH_FRAME_BYTES,
                      cross_dc_min_saving=0.0),
}


def preset(name: str, **overrides: Any) -> NodeConfig:
    try:
        base = PRESETS[name]
    except KeyError:
        raise UsageError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}") from None
    return base.replace(preset=name, **overrides) if overrides else base


#: what a TOML value must be for a NodeConfig field of each annotated type:
#: (accepted Python types, how an error message names them).
FIELD_VALUE_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "float": ((int, float), "a number"), "int": ((int,), "an integer"),
    "bool": ((bool,), "true or false"), "str": ((str,), "a string"),
    "tuple[tuple[str, str], ...]": ((list, tuple), "a list of [DC, DC] pairs"),
}


def check_field_types(d: dict[str, Any], source: str | None = None) -> None:
    """Raise :class:`UsageError` naming the field, the type it needs and ``source`` (the
    file) for the first value of ``d`` whose type does not fit its NodeConfig field
    (``ae_interval = "fast"``).  Unknown fields are left to :func:`config_from_dict`.

    Example:
        >>> check_field_types({"ae_interval": "fast"}, "replica.toml")
        Traceback (most recent call last):
        ...
        ekko.core.errors.UsageError: replica.toml: [node] ae_interval must be a number (float), got 'fast' (str)
    """
    where = f"{source}: " if source else ""
    for f in dataclasses.fields(NodeConfig):
        if f.name not in d:
            continue
        v = d[f.name]
        accepted, what = FIELD_VALUE_TYPES[str(f.type)]
        ok = isinstance(v, accepted) and (bool in accepted or not isinstance(v, bool))
        if ok and f.name == "dc_links":
            ok = all(isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(x, str) for x in p) for p in v)
        if not ok:
            raise UsageError(f"{where}[node] {f.name} must be {what} ({f.type}), got {v!r} ({type(v).__name__})")


def config_from_dict(d: dict[str, Any], source: str | None = None) -> NodeConfig:
    """A NodeConfig from a ``[node]`` table: ``preset`` picks the base, the other keys
    override its fields.  Unknown keys and values of the wrong type raise
    :class:`UsageError` (naming ``source``, the file, when given)."""
    d = dict(d)
    where = f"{source}: " if source else ""
    base = d.pop("preset", "local")
    if not isinstance(base, str):
        raise UsageError(f"{where}[node] preset must be a string, one of {sorted(PRESETS)}; got {base!r}")
    known = {f.name for f in dataclasses.fields(NodeConfig)}
    unknown = set(d) - known
    if unknown:
        raise UsageError(f"{where}unknown config fields: {sorted(unknown)}")
    check_field_types(d, source)
    if "dc_links" in d:
        d["dc_links"] = tuple(tuple(p) for p in d["dc_links"])
    return preset(base, **d)


def load_config(path: str | Path) -> dict[str, Any]:
    """Read a TOML file; returns the raw dict (``[node]`` and ``[daemon]`` tables)."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise UsageError(f"cannot read config {path}: {e}") from None
