"""What the simulated trainer published, and where the replicas sit: the reference every
run's latency, bytes and convergence are measured against (shared by the ekko-family
runs, the baselines and the partitioned driver)."""

from __future__ import annotations

import numpy as np

from ekko.core.delta import WIRE_DTYPES
from simulator.replicas import SimCluster
from simulator.scenario import Scenario

#: bytes of id + version each row costs on the wire besides its value.
ROW_META_BYTES = 16
#: origin id of the simulated trainer.
TRAINER_ORIGIN = 1


def place_replicas(sc: Scenario) -> list[tuple[str, str]]:
    """Replicas spread evenly over the DCs, round-robin: (node id, dc).

    Ids are ``r00000`` ..., or with ``daemon_identities`` ``<dc>-r<k>`` (``k`` from 1 in
    each DC: what ``bench/fidelity.py`` names its daemons)."""
    dcs = sc.wan.dc_names
    if getattr(sc, "daemon_identities", False):
        return [(f"{dcs[i % len(dcs)]}-r{i // len(dcs) + 1}", dcs[i % len(dcs)]) for i in range(sc.replicas)]
    return [(f"r{i:05d}", dcs[i % len(dcs)]) for i in range(sc.replicas)]


class Truth:
    """What the trainer published: the latest version (and value) of every row."""

    def __init__(self, sc: Scenario, with_values: bool) -> None:
        self.versions = {t.name: np.zeros(t.rows, np.int64) for t in sc.model.tables}
        # Stored rows: a hashed table's carry their key after the values (ekko.core.hashed).
        self.values = ({t.name: np.zeros((t.rows, t.width), WIRE_DTYPES[t.dtype]) for t in sc.model.tables}
                       if with_values else None)
        self.rows_published = 0
        self.bytes_published = 0
        #: keys a hashed table's publisher evicted (their slots given to other keys).
        self.keys_evicted = 0

    def note(self, table: str, ids: np.ndarray, versions: np.ndarray, values: np.ndarray | None, row_bytes: int):
        self.versions[table][ids] = versions
        if self.values is not None and values is not None:
            self.values[table][ids] = values
        self.rows_published += len(ids)
        self.bytes_published += len(ids) * (row_bytes + ROW_META_BYTES)



def converged(sc: Scenario, cluster: SimCluster, truth: Truth) -> bool:
    """Every live replica holds the trainer's rows -- of a placed model, the rows of the
    shards it keeps, and it keeps exactly the shards the placement gives it."""
    for nid in cluster.live():
        node = cluster.nodes[nid]
        for t in sc.model.tables:
            ts = node.table_store(sc.model.name, t.name)
            want_v = truth.versions[t.name]
            rows = None
            if ts.blocks is not None:
                held = ts.blocks.held
                if not np.array_equal(held, node.assigned(node.spec(sc.model.name), t.name)):
                    return False
                rows = np.flatnonzero(np.repeat(held, t.shard_rows)[:t.rows])
                want_v = np.where(np.repeat(held, t.shard_rows)[:t.rows], want_v, 0)
            if not np.array_equal(ts.versions, want_v):
                return False
            if truth.values is not None and ts.values is not None:
                want = truth.values[t.name]
                if rows is not None:
                    got, want = ts.read(rows).numpy(), want[rows]
                    bits = np.dtype(f"u{want.dtype.itemsize}")
                    if not np.array_equal(got.view(want.dtype).view(bits), want.view(bits)):
                        return False
                    continue
                # Bit for bit (a hashed table's key bytes may read as NaN floats).
                bits = np.dtype(f"u{want.dtype.itemsize}")
                if not np.array_equal(ts.values.numpy().view(want.dtype).view(bits), want.view(bits)):
                    return False
    return True
