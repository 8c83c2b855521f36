"""Knowledge completes on real daemons, whatever a publisher's chain state says.

Repro 1 of the rollback-correctness issue: a trainer whose persisted chains point at
frames this cluster never saw (it published to another cluster before, with the same
origin and state dir) takes a cut and rolls back to it.  The rows it published before
the cut must survive the rollback; before gap probes its knowledge never advanced here,
the cut was empty for it, and the rollback reverted every row.
"""

from __future__ import annotations

import numpy as np
import pytest

from ekko import Publisher, RolledBack
from ekko.sdk.client import Client
from ekko.core.spec import ModelSpec, TableSpec
from procs import DaemonGroup, get_json, read_rows, wait_for

pytestmark = pytest.mark.slow

SPEC = ModelSpec("m", [TableSpec("emb", rows=100_000, dim=8, shards=16)])
#: ids per rows read (the daemon's MAX_READ_IDS is 16,384).
READ_BATCH = 8192
#: seconds for replicas to converge on a loaded 2-core machine.
CONVERGE_S = 120.0


def _rows(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    ids = rng.choice(SPEC.table("emb").rows, n, replace=False).astype(np.int64)
    return ids, rng.standard_normal((n, 8)).astype(np.float32)


def _publish(pub: Publisher, ids: np.ndarray, vals: np.ndarray, state: np.ndarray, batch: int = 1000) -> None:
    for lo in range(0, len(ids), batch):
        pub.publish("m", "emb", ids[lo:lo + batch], vals[lo:lo + batch])
    state[ids] = vals


def _start(g: DaemonGroup, dcs: int, per_dc: int, tag: str):
    first = g.spawn(f"{tag}0-0", "dc0")
    procs = [first] + [g.spawn(f"{tag}{d}-{i}", f"dc{d}", seeds=[first.address])
                       for d in range(dcs) for i in range(per_dc) if (d, i) != (0, 0)]
    for p in procs:
        p.wait_healthy()
    wait_for(lambda: all(sum(m["state"] == "alive" for m in get_json(p.address, "/v1/status?cluster=1")["members"])
                         == len(procs) for p in procs), CONVERGE_S, 0.2, "every daemon to see every other")
    return procs


def _roll_back_across_clusters(tmp_path, dcs: int, per_dc: int, n: int) -> None:
    rng = np.random.default_rng(7)
    state_dir = tmp_path / "trainer-state"
    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    with DaemonGroup(tmp_path / "old") as g:
        (old,) = _start(g, 1, 1, "old")
        with Publisher([old.address], origin="o", state_dir=state_dir) as pub:
            pub.register(SPEC)
            _publish(pub, *_rows(rng, n), np.zeros((SPEC.table("emb").rows, 8), np.float32))
    # A new cluster; the trainer keeps its state dir (its chains point at the old cluster).
    with DaemonGroup(tmp_path / "new") as g:
        procs = _start(g, dcs, per_dc, "new")
        expected = np.zeros((SPEC.table("emb").rows, 8), np.float32)
        with Publisher([procs[0].address], origin="o", state_dir=state_dir) as pub:
            pub.register(SPEC)
            good_ids, good_vals = _rows(rng, n)
            _publish(pub, good_ids, good_vals, expected)
            cut = pub.cut("m", "validated")
            at_cut = expected.copy()
            bad_ids, bad_vals = _rows(rng, n)
            _publish(pub, bad_ids, bad_vals, expected)
            out = Client(procs[-1].address).rollback("m", cut)
            assert out["ok"]
            touched = np.union1d(good_ids, bad_ids)

            def at(p, want):
                vals = np.concatenate([read_rows(p.address, "m", "emb", touched[lo:lo + READ_BATCH])[0]
                                       for lo in range(0, len(touched), READ_BATCH)])
                return np.array_equal(vals, want[touched])
            wait_for(lambda: all(at(p, at_cut) for p in procs), CONVERGE_S, 0.5,
                     "every replica to hold exactly the cut's values")
            # Every row published before the cut survived; only later ones went back.
            assert (np.abs(at_cut[good_ids]).sum(axis=1) > 0).all()
            # The trainer is told of the rollback once, then publishes after it apply everywhere.
            with pytest.raises(RolledBack):
                pub.check_rollbacks("m", poll=True)
            new_ids, new_vals = _rows(rng, 500)
            _publish(pub, new_ids, new_vals, at_cut)
            wait_for(lambda: all(np.array_equal(read_rows(p.address, "m", "emb", new_ids)[0], new_vals)
                                 for p in procs), CONVERGE_S, 0.5, "post-rollback rows everywhere")


def test_cut_of_a_trainer_from_another_cluster_keeps_its_rows_one_daemon(tmp_path):
    _roll_back_across_clusters(tmp_path, 1, 1, 1000)


def test_cut_of_a_trainer_from_another_cluster_keeps_its_rows_six_daemons(tmp_path):
    _roll_back_across_clusters(tmp_path, 2, 3, 20_000)
