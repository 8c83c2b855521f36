"""Status views of a replica node (:meth:`ekko.replica.node.ReplicaNode.status` and
:meth:`~ekko.replica.node.ReplicaNode.cluster_view`): models, freshness lags, members."""

from __future__ import annotations

from typing import Any

from ekko.core.version import HLC_LOGICAL_BITS


def status(node: Any, digests: bool = True) -> dict[str, Any]:
    """A JSON-ready status view of the replica ``node``."""
    models: dict[str, Any] = {}
    for name, m in node.models.items():
        tables = {}
        for t in m.spec.tables:
            ts = m.store.table(t.name)
            info: dict[str, Any] = {"rows": t.rows, "dim": t.dim, "dtype": t.dtype, "shards": t.num_shards,
                                    "dense": t.dense, "written_rows": ts.written_rows()}
            if t.hashed:   # rows are slots holding 64-bit keys (written_rows: slots written)
                info.update(keys=t.keys, capacity=t.capacity, eviction=t.eviction)
            info["table_bytes"] = ts.nbytes
            held = m.held(t.name)
            if held is not None:   # a placed table: the shards kept here (issue #18)
                info["held_shards"] = int(held.sum())
                info["filling_shards"] = len(m.filling[t.name])
            if digests and ts.values is not None:
                info["digest"] = ts.digest()
            tables[t.name] = info
        models[name] = {"tables": tables, "head": m.head, "traffic_share": m.spec.traffic_share,
                        "lag_s": lag(node, m.head, name)}
        if m.spec.placed:
            models[name]["replicas_per_shard"] = m.spec.replicas_per_shard
    if node.models:
        states = node.rollback_protocol.states.model_states()
        for name in models:
            models[name]["quality"] = states[name]
            models[name]["quality"]["incidents"] = [i.view() for i in node.rollback_protocol.quality.incidents(name)]
    return {"node_id": node.node_id, "dc": node.dc, "address": node.address,
            "incarnation": node.peers.incarnation(), "models": models}


def cluster_view(node: Any) -> list[dict[str, Any]]:
    """Every member with its DC, state and per-model freshness lag (seconds)."""
    out = []
    for mem in sorted(node.members.members.values(), key=lambda x: (x.dc, x.node_id)):
        heads = ({n: m.head for n, m in node.models.items()} if mem.node_id == node.node_id
                 else node.gossiper.peer_heads.get(mem.node_id, {}))
        lags = {name: lag(node, heads.get(name, 0), name) for name in node.models}
        out.append({"node_id": mem.node_id, "dc": mem.dc, "address": mem.address,
                    "state": mem.state.name.lower(), "incarnation": mem.incarnation, "lag_s": lags,
                    "role": mem.role or "replica"})
    return out


def lag(node: Any, head: int, model: str) -> float | None:
    """Seconds (HLC time) behind the most advanced replica we know of; None when this
    replica has nothing yet while others do (its lag is unbounded, not a number)."""
    best = max([node.models[model].head] + [h.get(model, 0) for h in node.gossiper.peer_heads.values()])
    if not best:
        return 0.0
    if not head:
        return None
    return max(0, best - head) / float(1 << HLC_LOGICAL_BITS) / 1000.0
