"""The SDK against real daemons (ekko.server.daemon.Daemon, in-process on loopback).

A tracked training loop publishes to a three-replica, two-DC cluster; every
replica must end bit-identical to the module (anti-entropy and push carry the
rows), also when the replica the trainer talks to shuts down mid-run (the
publisher fails over) and when the cluster requires an HMAC key.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from ekko.sdk.client import Client
from ekko.core.config import preset
from ekko.core.errors import RemoteError
from ekko.sdk.publisher import Publisher
from ekko.core.store import to_wire_values
from ekko.sdk.tracking import module_layout, dense_rows
from ekko.core.version import counters_of
from test_sdk_server import RealDaemons
from test_tracking import Rec, step

#: seconds the cluster gets to converge (local preset: anti-entropy every 0.25 s).
CONVERGE_TIMEOUT_S = 30.0
KEY = b"sdk-cluster-key!"


def module_tables(model: torch.nn.Module) -> dict[str, np.ndarray]:
    out = {}
    for lay, p, _ in module_layout(model):
        t = p.detach() if lay.kind == "embedding" else dense_rows(p, lay.rows, lay.dim)
        out[lay.name] = to_wire_values(t).copy()
    return out


def replica_equals(endpoint: str, name: str, want: dict[str, np.ndarray], key: bytes | None = None) -> bool:
    c = Client(endpoint, key=key)
    for table, w in want.items():
        try:
            got = c.read_rows(name, table, np.arange(len(w)))
        except RemoteError as e:
            if e.status == 404:
                return False          # the catalog (spread by gossip) has not reached it yet
            raise
        if not np.array_equal(to_wire_values(got).view(np.uint8), w.view(np.uint8)):
            return False
    return True


def wait_converged(endpoints: list[str], name: str, model: torch.nn.Module, key: bytes | None = None) -> float:
    """Until every replica holds the module's tables; ``key`` signs the reads of a keyed cluster."""
    want = module_tables(model)
    t0 = time.monotonic()
    pending = list(endpoints)
    while pending:
        pending = [e for e in pending if not replica_equals(e, name, want, key)]
        if pending and time.monotonic() - t0 > CONVERGE_TIMEOUT_S:
            raise AssertionError(f"replicas {pending} did not converge in {CONVERGE_TIMEOUT_S}s")
        time.sleep(0.1)
    return time.monotonic() - t0


def test_tracked_training_converges_on_every_replica_with_failover(tmp_path):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    with RealDaemons([("r1", "dc1"), ("r2", "dc1"), ("r3", "dc2")], tmp_path) as ds:
        model = Rec(sparse=True)
        opt = torch.optim.Adagrad(model.parameters(), lr=0.3)
        with Publisher(ds.endpoints[:2], origin="trainer", state_dir=tmp_path / "state", timeout=20) as pub:
            tracker = pub.track(model, model="rec")
            tracker.publish()
            for _ in range(5):
                step(model, opt, rng)
                res = tracker.publish()
                # r1 normally; r2 only if r1 was slower than the request timeout (a busy machine)
                assert {a.endpoint for a in res.acks} <= {"http://" + e for e in ds.endpoints[:2]}
            wait_converged(ds.endpoints, "rec", model)
            ds.stop(0)                          # the ingest replica goes away
            for _ in range(5):
                step(model, opt, rng)
                res = tracker.publish()
                assert {a.endpoint for a in res.acks} == {"http://" + ds.endpoints[1]}
            wait_converged(ds.endpoints[1:], "rec", model)
        # The chain held: each live replica's knowledge of the trainer reaches the last
        # counter it holds (a broken chain leaves knowledge behind the rows).
        def knowledge_gaps(i: int) -> list:
            m = ds.daemons[i].node.models["rec"]
            gaps = []
            for table, shards in m.shards.items():
                vers = m.store.table(table).versions
                for s in range(m.spec.table(table).num_shards):
                    lo, hi = m.spec.table(table).shard_range(s)
                    mine = vers[lo:hi][(vers[lo:hi] & 0xFFFF) == pub.origin]
                    k = shards[s].knowledge[pub.origin] if s in shards else 0
                    if len(mine) and k < int(counters_of(mine).max()):
                        gaps.append((table, s, k, int(counters_of(mine).max())))
            return gaps
        # A new publisher's first frames leave a gap that a probe of every member closes
        # (docs/design.md, K2); if the stopped ingest had not closed it and spread the
        # knowledge first, the live replicas can close it once the failure detector has
        # forgotten the ingest (forget_after).
        deadline = time.monotonic() + CONVERGE_TIMEOUT_S + preset("local").forget_after
        while (gaps := ds.call(lambda: knowledge_gaps(1) + knowledge_gaps(2))) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not gaps


def test_keyed_cluster(tmp_path):
    with RealDaemons([("k1", "dc1"), ("k2", "dc2")], tmp_path, key=KEY) as ds:
        model = Rec(sparse=False)
        with Publisher(ds.endpoints[:1], origin="unsigned", state_dir=tmp_path / "s1", timeout=5) as pub:
            with pytest.raises(RemoteError) as ei:
                pub.track(model, model="rec")
            assert ei.value.status == 401
        with Publisher(ds.endpoints[:1], origin="signed", key=KEY, state_dir=tmp_path / "s2", timeout=20) as pub:
            tracker = pub.track(model, model="rec")
            tracker.publish()
            opt = torch.optim.SGD(model.parameters(), lr=0.5)
            step(model, opt, np.random.default_rng(1))
            tracker.publish()
        wait_converged(ds.endpoints, "rec", model, key=KEY)
        with pytest.raises(RemoteError) as ei:                      # reads are signed too
            Client(ds.endpoints[1]).read_rows("rec", next(iter(module_tables(model))), [0])
        assert ei.value.status == 401
