"""Topology: which replicas carry each shard across the WAN.

For every shard, each DC has ``gateways_per_dc`` gateway replicas, chosen by
rendezvous (highest-random-weight) hashing of (shard key, node id) over the
DC's live members.  Every replica computes the same choice from its member
list; WAN load spreads over many replicas because each shard has its own
gateways; when a gateway dies the next-ranked member takes over at once and
only that shard's role moves.

Gateways of rank ``r`` in two DCs exchange that shard with each other across
the WAN (when the DC graph links those DCs); every other replica exchanges only
with members of its own DC.  Eager pushes from the ingest replica go to the
rank-0 gateway of each other DC, which forwards over the LAN.

The weights are computed vectorized (a 64-bit mix of two hashes, numpy) and
cached per membership version, so 10,000 shards x 100 members cost one matrix.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from ekko.core.hash64 import mix64 as _mix


def stable_hash64(s: str) -> int:
    return int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little")


@dataclass(frozen=True, slots=True)
class DcGraph:
    """Which DC pairs exchange directly across the WAN.

    ``links`` is a set of unordered pairs; empty means a full mesh.

    Example:
        >>> DcGraph(frozenset({("a", "b")})).linked("b", "a")
        True
    """

    links: frozenset[tuple[str, str]] = frozenset()

    def linked(self, a: str, b: str) -> bool:
        if a == b:
            return False
        return not self.links or (a, b) in self.links or (b, a) in self.links


@dataclass(slots=True)
class Topology:
    """Gateway choice for the shards of one table given the live members.

    Args:
        gateways_per_dc: gateways each DC keeps per shard.
        graph: the DC graph.

    Example:
        >>> t = Topology(gateways_per_dc=1)
        >>> t.update({"a": "dc1", "b": "dc1", "c": "dc2"}, version=1)
        >>> g = t.gateways("m", "t", 4, "dc1")   # rank-0 gateway of every shard in dc1
        >>> g.shape, set(g.ravel().tolist()) <= {"a", "b"}
        ((4, 1), True)
    """

    gateways_per_dc: int = 2
    graph: DcGraph = field(default_factory=DcGraph)
    _version: int = -1
    _by_dc: dict[str, tuple[list[str], np.ndarray]] = field(default_factory=dict)
    _cache: dict[tuple[str, str, int, str, int], np.ndarray] = field(default_factory=dict)

    def update(self, live: dict[str, str], version: int) -> None:
        """Set the live members (node id -> DC); cheap when ``version`` is unchanged."""
        if version == self._version:
            return
        self._version = version
        by: dict[str, list[str]] = {}
        for nid, dc in live.items():
            by.setdefault(dc, []).append(nid)
        self._by_dc = {dc: (sorted(ids), np.array([stable_hash64(i) for i in sorted(ids)], dtype=np.uint64))
                       for dc, ids in by.items()}
        self._cache.clear()

    @property
    def version(self) -> int:
        """Membership version the gateway choice was computed for (-1 before any)."""
        return self._version

    def dcs(self) -> list[str]:
        return sorted(self._by_dc)

    def members(self, dc: str) -> list[str]:
        return self._by_dc.get(dc, ([], None))[0]

    def gateways(self, model: str, table: str, num_shards: int, dc: str) -> np.ndarray:
        """``(num_shards, g)`` array of gateway node ids of ``dc``, rank 0 first."""
        return self.ranking(model, table, num_shards, dc, self.gateways_per_dc)

    def ranking(self, model: str, table: str, num_shards: int, dc: str, k: int) -> np.ndarray:
        """``(num_shards, min(k, members))`` array: for every shard the ``k`` members of
        ``dc`` of highest rendezvous weight, highest first.  The gateways are its first
        ``gateways_per_dc`` columns, a placed model's holders its first
        ``replicas_per_shard`` (:mod:`p2p.placement`): one ranking, so a shard's rank-0
        gateway is always one of its holders."""
        key = (model, table, num_shards, dc, k)
        got = self._cache.get(key)
        if got is not None:
            return got
        ids, hashes = self._by_dc.get(dc, ([], np.zeros(0, np.uint64)))
        g = min(k, len(ids))
        if g == 0:
            out = np.empty((num_shards, 0), dtype=object)
        else:
            base = np.uint64(stable_hash64(f"{model}/{table}"))
            shard_h = _mix(np.arange(num_shards, dtype=np.uint64) ^ base)
            w = _mix(shard_h[:, None] ^ hashes[None, :])          # (shards, members)
            order = np.argsort(w, axis=1)[:, ::-1][:, :g]   # highest weight first
            out = np.asarray(ids, dtype=object)[order]
        self._cache[key] = out
        return out
