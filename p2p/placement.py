"""Placement: which members of a DC hold each shard of a placed model (issue #18).

A model with ``replicas_per_shard = r > 0`` (:class:`ekko.core.spec.ModelSpec`) is
partitioned across the members of every DC: shard ``s`` of an embedding table lives
on the ``r`` members of the DC with the highest rendezvous weight for it -- the first
``r`` columns of :meth:`p2p.topology.Topology.ranking`, the same ranking that picks a
shard's gateways.  So

* every node computes the same holders from the same member list, without talking;
* a shard's rank-0 gateway is one of its holders (WAN traffic of a shard lands on a
  member that stores it);
* when a member joins, only shards for which it ranks in the top ``r`` move (each to
  it, from the member it displaces); when one leaves, only the shards it held move,
  each to the next-ranked member.  Nothing else changes hands (rendezvous hashing's
  minimal disruption, tested in ``tests/p2p/test_placement.py``).

Dense-parameter tables and models with ``replicas_per_shard = 0`` are held by every
member.  Shards are spread by hashing, not balanced: with ``S`` shards and ``n``
members, a member's share is ``r/n`` on average with a binomial spread, so a table
wants many shards per member (the spread of the largest share shrinks as ``1/sqrt(S)``).

What this module does not do yet (see ``docs/design.md``, *Placement across a DC*):
stores that allocate only held shards, sync scoped to them, the SDK's routing of rows
to holders and the hand-off when holders change.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ekko.core.errors import UsageError
from ekko.core.spec import ModelSpec
from p2p.topology import Topology

#: ``override(spec, table, dc, ranked) -> holders``: an explicit assignment in place of
#: rendezvous.  ``ranked`` is the rendezvous choice (shards x holders, object array of
#: node ids); the result must have one row per shard.  Every node of a cluster must use
#: the same override, or they disagree on who holds what.
Override = Callable[[ModelSpec, str, str, np.ndarray], np.ndarray]


class Placement:
    """The holders of every shard of placed models, from one node's member view.

    Args:
        topology: the node's :class:`~p2p.topology.Topology` (live members by DC, kept in
            step with the member list by :class:`p2p.peers.PeerView`).
        node_id, dc: the node asking (for :meth:`held`).
        override: an explicit assignment instead of rendezvous (tests, the simulator).

    Example:
        >>> from ekko.core.spec import ModelSpec, TableSpec
        >>> topo = Topology(gateways_per_dc=1)
        >>> topo.update({"a": "dc1", "b": "dc1", "c": "dc1", "x": "dc2"}, version=1)
        >>> spec = ModelSpec("m", [TableSpec("emb", rows=1 << 12, dim=4, shards=16)], replicas_per_shard=1)
        >>> p = Placement(topo, "a", "dc1")
        >>> p.holders(spec, "emb", "dc1").shape, set(p.holders(spec, "emb", "dc2").ravel())
        ((16, 1), {'x'})
        >>> held = [int(p.held(spec, "emb", node=n).sum()) for n in "abc"]
        >>> sum(held)      # each shard on exactly one member of dc1
        16
    """

    def __init__(self, topology: Topology, node_id: str, dc: str, override: Override | None = None) -> None:
        self.topology = topology
        self.node_id, self.dc = node_id, dc
        self.override = override
        self._cache: dict[tuple[str, str, str, int], np.ndarray] = {}
        self._version = -2

    def _fresh(self) -> None:
        if self._version != self.topology.version:
            self._version = self.topology.version
            self._cache.clear()

    def holders(self, spec: ModelSpec, table: str, dc: str) -> np.ndarray:
        """``(shards, k)`` object array of the node ids in ``dc`` holding each shard of
        ``table``, highest-ranked first: ``k = min(replicas_per_shard, members of dc)``,
        every member of the DC for a table that is not placed."""
        self._fresh()
        t = spec.table(table)
        k = spec.replicas_per_shard if spec.placed_table(table) else len(self.topology.members(dc))
        key = (spec.name, table, dc, k)
        got = self._cache.get(key)
        if got is not None:
            return got
        ranked = self.topology.ranking(spec.name, table, t.num_shards, dc, k)
        if self.override is not None and spec.placed_table(table):
            ranked = np.asarray(self.override(spec, table, dc, ranked), dtype=object)
            if ranked.ndim != 2 or ranked.shape[0] != t.num_shards:
                raise UsageError(f"placement override for {spec.name}/{table} in {dc}: want one row per shard "
                                 f"({t.num_shards}), got shape {ranked.shape}")
        self._cache[key] = ranked
        return ranked

    def gateways(self, spec: ModelSpec, table: str, dc: str) -> np.ndarray:
        """``(shards, g)`` gateways of ``dc`` for ``table``: the topology's, and for a placed
        table only those among the holders (``g = min(gateways_per_dc, r)``), since a
        replica exchanges across the WAN only the shards it stores."""
        t = spec.table(table)
        g = self.topology.gateways_per_dc
        if spec.placed_table(table):
            g = min(g, spec.replicas_per_shard)
        return self.topology.ranking(spec.name, table, t.num_shards, dc, g)

    def held(self, spec: ModelSpec, table: str, node: str | None = None, dc: str | None = None) -> np.ndarray:
        """Bool per shard of ``table``: whether ``node`` (default this one; ``dc`` default
        this node's) holds it.  All True for a table that is not placed."""
        t = spec.table(table)
        if not spec.placed_table(table):
            return np.ones(t.num_shards, dtype=bool)
        h = self.holders(spec, table, dc or self.dc)
        return (h == (node or self.node_id)).any(axis=1) if h.shape[1] else np.zeros(t.num_shards, dtype=bool)

    def owners(self, spec: ModelSpec, table: str, dc: str | None = None, kept: np.ndarray | None = None
               ) -> np.ndarray:
        """Per shard, the member of ``dc`` (default this node's) to send its rows or
        questions to: the shard's first holder -- or this node, in its own DC, for the
        shards in ``kept`` (the bool per shard it keeps).  Object array of node ids."""
        dc = dc or self.dc
        out = self.holders(spec, table, dc)[:, 0].copy()
        if kept is not None and dc == self.dc:
            out[kept] = self.node_id
        return out
