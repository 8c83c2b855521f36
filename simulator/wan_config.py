"""Topology and fault settings of the simulated WAN (:class:`WanConfig`, :class:`DcSpec`),
validated when made; :class:`simulator.network.WanNetwork` runs them.  Units are in the
names (``_ms``, ``_bps``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from ekko.core.errors import UsageError

#: background_load must stay below this: at 1.0 a link has no capacity left and
#: every message would wait forever.
MAX_BACKGROUND_LOAD = 0.999
#: sanity bound on a configured round-trip time (a typo guard: 10 s is not a WAN).
MAX_RTT_MS = 10_000.0
#: default NIC rate: 25 Gbit/s, a common inference-server NIC.
DEFAULT_NIC_BPS = 25e9
#: default WAN capacity per DC pair and direction: 1 Gbit/s, the top of the paper's 0.1-1 Gbit/s.
DEFAULT_WAN_BPS = 1e9
#: default round trip inside a DC.
DEFAULT_INTRA_DC_RTT_MS = 0.5

_MS = 1e-3


@dataclass(frozen=True, slots=True)
class DcSpec:
    """A data centre.

    Args:
        name: unique name, used in ``rtt_ms`` keys, overrides and partitions.

    Example:
        >>> DcSpec("us-east").name
        'us-east'
    """

    name: str


Pair = tuple[str, str]


@dataclass(slots=True)
class WanConfig:
    """Topology and fault settings of a :class:`WanNetwork`.  Units are in the names.

    Args:
        dcs: the data centres (``DcSpec`` or plain names).
        rtt_ms: round-trip time between DCs in milliseconds: a dict keyed by
            ``(a, b)`` names (one direction given means both are equal), an N x N
            matrix in ``dcs`` order, or one number for every pair.  One-way
            propagation is rtt/2.
        intra_dc_rtt_ms: round-trip time between two nodes of one DC.
        nic_bps: NIC rate of every node, bits/s, each direction (full duplex);
            :meth:`WanNetwork.add_node` can override it per node.
        wan_capacity_bps: capacity of each ordered DC pair's link, bits/s.
        wan_capacity_overrides: ``{(a, b): bits/s}`` for particular directions.
        background_load: fraction [0, 1) of every WAN link used by inference
            traffic; the model gets ``capacity * (1 - background_load)``.
        background_load_overrides: ``{(a, b): fraction}`` per direction.
        loss: probability that a message is lost (every pair, intra-DC included).
        loss_overrides: ``{(a, b): probability}`` per direction (``(a, a)`` for
            inside DC a); replaces ``loss`` for that pair.
        duplicate: probability that a delivered message is delivered twice.
        reorder: probability that a message gets an extra ``U[0, reorder_delay_ms)``
            delay, which lets later messages overtake it.
        reorder_delay_ms: bound of that extra delay (also of a duplicate's lag).
        jitter_ms: every message's propagation gets ``U[0, jitter_ms)`` extra.
        per_message_overhead_bytes: bytes added to every message (e.g. ~100 for
            HTTP + TCP/IP headers); 0 makes sizes exactly what the caller passes.

    Example:
        >>> cfg = WanConfig(["a", "b"], rtt_ms={("a", "b"): 40.0}, wan_capacity_bps=1e8)
        >>> cfg.rtt_s("b", "a")
        0.04
        >>> WanConfig.uniform(3, rtt_ms=50).dc_names
        ['dc0', 'dc1', 'dc2']
    """

    dcs: Sequence[DcSpec | str]
    rtt_ms: Mapping[Pair, float] | Sequence[Sequence[float]] | float = 50.0
    intra_dc_rtt_ms: float = DEFAULT_INTRA_DC_RTT_MS
    nic_bps: float = DEFAULT_NIC_BPS
    wan_capacity_bps: float = DEFAULT_WAN_BPS
    wan_capacity_overrides: Mapping[Pair, float] = field(default_factory=dict)
    background_load: float = 0.0
    background_load_overrides: Mapping[Pair, float] = field(default_factory=dict)
    loss: float = 0.0
    loss_overrides: Mapping[Pair, float] = field(default_factory=dict)
    duplicate: float = 0.0
    reorder: float = 0.0
    reorder_delay_ms: float = 0.0
    jitter_ms: float = 0.0
    per_message_overhead_bytes: int = 0

    def __post_init__(self) -> None:
        self.dcs = [d if isinstance(d, DcSpec) else DcSpec(str(d)) for d in self.dcs]
        names = self.dc_names
        if not names or len(set(names)) != len(names):
            raise UsageError(f"dcs must be non-empty and unique, got {names}")
        known = set(names)
        for what, table in (("wan_capacity_overrides", self.wan_capacity_overrides),
                            ("background_load_overrides", self.background_load_overrides),
                            ("loss_overrides", self.loss_overrides)):
            for a, b in table:
                if a not in known or b not in known:
                    raise UsageError(f"{what}: unknown DC in pair {(a, b)}")
        if not self.nic_bps > 0 or not self.wan_capacity_bps > 0:
            raise UsageError("nic_bps and wan_capacity_bps must be > 0")
        if any(not v > 0 for v in self.wan_capacity_overrides.values()):
            raise UsageError("wan_capacity_overrides must be > 0")
        for v in [self.background_load, *self.background_load_overrides.values()]:
            check_load(v)
        for v in [self.loss, self.duplicate, self.reorder, *self.loss_overrides.values()]:
            check_prob(v)
        for v in (self.intra_dc_rtt_ms, self.reorder_delay_ms, self.jitter_ms):
            if not 0 <= v <= MAX_RTT_MS:
                raise UsageError(f"delays must be in [0, {MAX_RTT_MS}] ms, got {v}")
        if self.per_message_overhead_bytes < 0:
            raise UsageError("per_message_overhead_bytes must be >= 0")
        self._rtt_matrix()  # validates rtt_ms now rather than when the network is built

    @property
    def dc_names(self) -> list[str]:
        return [d.name for d in self.dcs]  # type: ignore[union-attr]

    @classmethod
    def uniform(cls, dcs: int | Iterable[str], rtt_ms: float = 50.0, **kw: Any) -> "WanConfig":
        """Every DC pair at the same RTT; ``dcs`` is a count (named dc0..) or names."""
        names = [f"dc{i}" for i in range(dcs)] if isinstance(dcs, int) else list(dcs)
        return cls(names, rtt_ms=rtt_ms, **kw)

    def rtt_s(self, a: str, b: str) -> float:
        """Round-trip time between DCs ``a`` and ``b`` in seconds."""
        names = self.dc_names
        if a == b:
            return self.intra_dc_rtt_ms * _MS
        return self._rtt_matrix()[names.index(a)][names.index(b)] * _MS

    def _rtt_matrix(self) -> list[list[float]]:
        names = self.dc_names
        n = len(names)
        rtt = self.rtt_ms
        if isinstance(rtt, (int, float)):
            m = [[float(rtt)] * n for _ in range(n)]
        elif isinstance(rtt, Mapping):
            pos = {name: i for i, name in enumerate(names)}
            m = [[float("nan")] * n for _ in range(n)]
            for (a, b), v in rtt.items():
                if a not in pos or b not in pos:
                    raise UsageError(f"rtt_ms: unknown DC in pair {(a, b)}")
                m[pos[a]][pos[b]] = float(v)
                if (b, a) not in rtt:
                    m[pos[b]][pos[a]] = float(v)
            missing = [(names[i], names[j]) for i in range(n) for j in range(n) if i != j and m[i][j] != m[i][j]]
            if missing:
                raise UsageError(f"rtt_ms has no value for DC pairs {missing[:5]}")
        else:
            m = [[float(v) for v in row] for row in rtt]
            if len(m) != n or any(len(row) != n for row in m):
                raise UsageError(f"rtt_ms matrix must be {n}x{n} (dcs order)")
        for i in range(n):
            m[i][i] = self.intra_dc_rtt_ms
            for j in range(n):
                if not 0 <= m[i][j] <= MAX_RTT_MS:
                    raise UsageError(f"rtt_ms[{names[i]}][{names[j]}]={m[i][j]} outside [0, {MAX_RTT_MS}]")
        return m


def check_prob(p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise UsageError(f"probabilities must be in [0, 1], got {p}")


def check_load(v: float) -> None:
    if not 0.0 <= v <= MAX_BACKGROUND_LOAD:
        raise UsageError(f"background_load must be in [0, {MAX_BACKGROUND_LOAD}], got {v}")
