"""Helpers to build simulated clusters of real ReplicaNodes on the in-memory network."""

from __future__ import annotations

import random
import zlib

import numpy as np

from ekko.core.chain import PublisherChain
from ekko.core.config import NodeConfig
from ekko.replica.node import ReplicaNode
from ekko.core.spec import ModelSpec, TableSpec
from ekko.core.version import HLC_EPOCH_MS
from p2p.memnet import Faults, MemNet

SPEC = ModelSpec("ranker", [TableSpec("emb", rows=4096, dim=8, shards=16), TableSpec("mlp", rows=64, dim=16, dense=True)])


def make_cluster(dcs: int = 3, per_dc: int = 5, seed: int = 0, faults: Faults | None = None,
                 config: NodeConfig | None = None, spec: ModelSpec = SPEC, node_kwargs=None) -> MemNet:
    net = MemNet(seed=seed, faults=faults or Faults())
    cfg = config or NodeConfig()
    seed_addr = "n0-0"
    for d in range(dcs):
        for i in range(per_dc):
            nid = f"n{d}-{i}"
            node = ReplicaNode(nid, f"dc{d}", nid, config=cfg, rng=random.Random(zlib.crc32(f"{seed}/{nid}".encode())),
                               seeds=[seed_addr], device="cpu", **(node_kwargs(f"dc{d}") if node_kwargs else {}))
            net.add(node)
    net.call("n0-0", "register_model", spec, net.now)
    return net


class Trainer:
    """A publisher at one ingest node, driving the real chain logic."""

    def __init__(self, net: MemNet, ingest: str, origin: int = 1, spec: ModelSpec = SPEC, seed: int = 0) -> None:
        self.net, self.ingest, self.spec = net, ingest, spec
        self.chain = PublisherChain(origin)
        self.rng = np.random.default_rng(seed)
        self.truth: dict[str, dict[int, np.ndarray]] = {t.name: {} for t in spec.tables}

    def publish(self, table: str, n: int, impact: np.ndarray | None = None, ids: np.ndarray | None = None):
        t = self.spec.table(table)
        if ids is None:
            ids = self.rng.choice(t.rows, size=min(n, t.rows), replace=False).astype(np.int64)
        vals = self.rng.standard_normal((len(ids), t.dim)).astype(np.float32)
        frame = self.chain.frame(self.spec, {table: (ids, vals)}, now_ms=HLC_EPOCH_MS + self.net.now * 1000,
                                 impact=None if impact is None else {table: impact})
        self.net.call(self.ingest, "publish", frame.body, self.net.now)
        self.chain.acked(frame)
        for i, v in zip(ids.tolist(), vals):
            self.truth[table][i] = v
        return self.chain.versions_of(frame)[table]


def converged(net: MemNet, trainer: Trainer, nodes: list[str] | None = None) -> bool:
    ids = nodes or [n for n in net.nodes if n not in net.dead]
    for table, rows in trainer.truth.items():
        if not rows:
            continue
        keys = np.array(sorted(rows), dtype=np.int64)
        want = np.stack([rows[k] for k in keys.tolist()])
        for nid in ids:
            node = net.nodes[nid]
            if "ranker" not in node.models:
                return False
            got = node.read_rows("ranker", table, keys).numpy()
            if not np.array_equal(got, want):
                return False
    return True


def digests(net: MemNet, nodes: list[str] | None = None) -> set[tuple]:
    out = set()
    for nid in nodes or [n for n in net.nodes if n not in net.dead]:
        st = net.nodes[nid].status()
        out.add(tuple(sorted((t, i["digest"]) for t, i in st["models"]["ranker"]["tables"].items())))
    return out
