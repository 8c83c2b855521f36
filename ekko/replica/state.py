"""A replica's protocol state of one model kept beside its tensors in a snapshot.

:func:`export_state` and :func:`import_state` are the persistence half of
:class:`ekko.replica.node.ReplicaNode` (its :meth:`~ekko.replica.node.ReplicaNode.export_state`
and :meth:`~ekko.replica.node.ReplicaNode.import_state` call them with themselves as ``node``): per shard the
knowledge vector and the waiting publish chains, the rollback records and the cuts.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ekko.core.errors import ProtocolError, UsageError
from ekko.core.spec import ModelSpec
from ekko.core.store import ModelStore
from ekko.core.version import MAX_COUNTER, MAX_ORIGIN, Knowledge, counters_of
from p2p.sync import ShardSync

#: format of the protocol state kept in snapshots (:func:`export_state`).
STATE_FORMAT = 1


def export_state(node: Any, model: str) -> dict[str, Any]:
    """The protocol state of ``model`` to keep beside its tensors (msgpack-ready).

    Per (table, shard): the knowledge vector.  The recent-row index and pending
    chains are not kept: the index is rebuilt as a shard scan (see
    :func:`import_state`), and a lost pending chain only loses a shortcut
    that anti-entropy makes up for.
    """
    m = node.model_state(model)
    knowledge = {t: [[s, sync.knowledge.to_wire()] for s, sync in sorted(shards.items()) if len(sync.knowledge)]
                 for t, shards in m.shards.items()}
    # Waiting publish chains too: once lost, knowledge could never pass their gap.
    pending = {t: [[s, o, a, u] for s, sync in sorted(shards.items()) for o, chains in sync.pending.items()
                   for a, u in chains] for t, shards in m.shards.items()}
    # Rollbacks applied here: their fences must hold after a restart too (a lagging peer
    # may still send the rolled-back versions before gossip brings the records back).
    rollbacks = [r for r in node.rollback_protocol.rollbacks.values() if r.get("model") == model]
    # Cuts, so a restart keeps its restore points (times as wall time: protocol time
    # restarts with the process).  Optional in the format: older snapshots lack it.
    cuts = [[node.rollback_protocol.cut_sync.cut_to_wire(c), node.rollback_protocol.cut_sync.cut_wall_time(c)] for c in node.rollback_protocol.cuts.cuts(model)]
    return {"format": STATE_FORMAT, "node_id": node.node_id, "head": m.head, "knowledge": knowledge,
            "pending": {t: p for t, p in pending.items() if p}, "rollbacks": rollbacks, "cuts": cuts}


def import_state(node: Any, spec: ModelSpec, store: ModelStore, state: dict[str, Any], now: float) -> None:
    """Install a model restored from a snapshot into this node.

    The node must not have the model yet.  Knowledge vectors are restored per
    shard and their digests marked dirty.  The recent-row index starts with its
    watermark raised and marked *loose*, so that "rows newer than a peer's
    knowledge" is answered by a shard scan: the in-memory index did not survive
    the restart, and answering from an empty index would let a peer adopt our
    knowledge without the rows.

    Raises:
        ProtocolError: the state is malformed (reason ``"bad_snapshot"``).
    """
    if spec.name in node.models:
        raise UsageError(f"model {spec.name!r} is already registered")
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ProtocolError("snapshot meta has an unknown format", "bad_snapshot")
    parsed: dict[str, dict[int, Knowledge]] = {}
    raw = state.get("knowledge")
    if not isinstance(raw, dict):
        raise ProtocolError("snapshot meta lacks knowledge", "bad_snapshot")
    for table, entries in raw.items():
        if not spec.has_table(table) or not isinstance(entries, list):
            raise ProtocolError(f"snapshot knowledge names unknown table {table!r}", "bad_snapshot")
        n = spec.table(table).num_shards
        per: dict[int, Knowledge] = {}
        for e in entries:
            if not (isinstance(e, list) and len(e) == 2 and isinstance(e[0], int) and 0 <= e[0] < n):
                raise ProtocolError("bad snapshot knowledge entry", "bad_snapshot")
            try:
                per[e[0]] = Knowledge.from_wire(e[1])
            except ProtocolError as err:
                raise ProtocolError(f"bad snapshot knowledge: {err}", "bad_snapshot") from None
        parsed[table] = per
    pending: dict[str, dict[int, list[tuple[int, int, int]]]] = {}
    raw_pending = state.get("pending", {})
    if not isinstance(raw_pending, dict):
        raise ProtocolError("bad snapshot pending chains", "bad_snapshot")
    for table, entries in raw_pending.items():
        if not spec.has_table(table) or not isinstance(entries, list):
            raise ProtocolError(f"snapshot chains name unknown table {table!r}", "bad_snapshot")
        n = spec.table(table).num_shards
        for e in entries:
            if not (isinstance(e, list) and len(e) == 4 and all(isinstance(x, int) for x in e)
                    and 0 <= e[0] < n and 0 < e[1] <= MAX_ORIGIN and -1 <= e[2] < e[3] <= MAX_COUNTER):
                raise ProtocolError("bad snapshot chain entry", "bad_snapshot")
            pending.setdefault(table, {}).setdefault(e[0], []).append((e[1], e[2], e[3]))
    rollbacks = state.get("rollbacks", [])
    if not isinstance(rollbacks, list) or not all(isinstance(r, dict) for r in rollbacks):
        raise ProtocolError("bad snapshot rollback records", "bad_snapshot")
    raw_cuts = state.get("cuts", [])
    if not isinstance(raw_cuts, list) or not all(isinstance(c, list) and len(c) == 2 for c in raw_cuts):
        raise ProtocolError("bad snapshot cuts", "bad_snapshot")
    head = state.get("head", 0)
    # The restored store is the model's from the start (no empty one is allocated first:
    # a placed model's would be the whole table while this replica knows no other member).
    node.register_model(spec, now, store=store)
    m = node.models[spec.name]
    top = int(head) if isinstance(head, int) and head >= 0 else 0
    # The node's index of recently applied rows is not persisted.  Answering pulls from
    # an empty index would send no rows while the knowledge we send says we have them,
    # so the requester would adopt the knowledge without the rows; make every lookup
    # fall back to a shard scan instead.
    for t in spec.tables:
        ts = store.table(t.name)
        know = parsed.get(t.name, {})
        written = np.flatnonzero(ts.versions > 0)
        shards_with_rows = set(np.unique(t.shards_of(written)).tolist()) if len(written) else set()
        if len(written):
            top = max(top, int(counters_of(ts.versions[written]).max()))
            np.maximum.at(m.top[t.name], t.shards_of(written), ts.versions[written])
        m.index[t.name].reset()  # watermark up and loose: every lookup scans the shard
        waiting = pending.get(t.name, {})
        for s in set(know) | shards_with_rows | set(waiting):
            sync = m.shards[t.name][s] = ShardSync(knowledge=know.get(s, Knowledge()))
            for o, a, u in waiting.get(s, ()):
                sync.chain(o, a, u)
            if sync.pending:
                node.gap_probe.note_waiting(m, t.name, s, now)
            m.dirty[t.name].add(s)
    m.head = max(m.head, top)
    try:
        cuts = [node.rollback_protocol.cut_sync.foreign_cut(c, at) for c, at in raw_cuts]   # all valid before any is kept
        if any(c.model != spec.name for c in cuts):
            raise ProtocolError("a snapshot cut names another model", "bad_cut")
        for cut in cuts:
            # The undo history did not survive the restart: a restored cut restores by
            # its knowledge (rows without history are zeroed and repaired from peers).
            if node.rollback_protocol.cuts.learn(cut):
                node.rollback_protocol.quality.note_cut(spec.name, cut.name, now)
        for record in rollbacks:  # fences back first; rows are already at the rolled-back state
            node.rollback_protocol.apply_rollback(record, now)
    except (ProtocolError, UsageError) as err:
        # Nothing of this model may stay: the node had no such model before the call.
        del node.models[spec.name]
        node.gossiper.catalog_changed()
        for rid in [k for k, r in node.rollback_protocol.rollbacks.items() if r.get("model") == spec.name]:
            del node.rollback_protocol.rollbacks[rid]
        node.rollback_protocol.fence._ranges.pop(spec.name, None)
        for cut in node.rollback_protocol.cuts.cuts(spec.name):
            node.rollback_protocol.cuts.drop(spec.name, cut.name)
        raise ProtocolError(f"bad snapshot cuts or rollback record: {err}", "bad_snapshot") from None
