"""A TorchRec model trained in a loop, published to real daemons, served bit-exact.

The ranker of test_torchrec (an EmbeddingBagCollection with two tables, an
EmbeddingCollection with a float32 and a float16 table, an MLP) trains with SGD against
three real replicas in two DCs (:class:`ekko.server.daemon.Daemon`, in-process on
loopback).  Every publish sends exactly the rows a snapshot diff finds changed, and
afterwards every replica, the two that only hear of the rows from their peers included,
holds the trainer's tables bit for bit.  Skips like test_torchrec without TorchRec,
never under CI.
"""

from __future__ import annotations

import numpy as np
import torch

from ekko.sdk.publisher import Publisher
from test_sdk_daemon import wait_converged
from test_sdk_server import RealDaemons
from test_torchrec import TABLES, TorchRecRanker, tr_step   # skips this module without TorchRec
from test_tracking import brute_force_changed, snapshot

#: training steps, each followed by a publish.
STEPS = 6


def test_trained_torchrec_model_reaches_every_replica_bit_exact(tmp_path):
    torch.manual_seed(0)
    rng = np.random.default_rng(5)
    with RealDaemons([("r1", "dc1"), ("r2", "dc1"), ("r3", "dc2")], tmp_path) as ds:
        model = TorchRecRanker()
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        with Publisher(ds.endpoints[:1], origin="trainer", state_dir=tmp_path / "state", timeout=20) as pub:
            tracker = pub.track(model, model="trec", optimizer=opt)
            assert [t.name for t in tracker.spec.tables][:len(TABLES)] == [name for name, _, _ in TABLES]
            tracker.publish()
            for _ in range(STEPS):
                before = snapshot(model)
                tr_step(model, opt, rng)
                res = tracker.publish()
                want = brute_force_changed(before, model)
                assert all(0 < len(want[name]) < rows for name, rows, _ in TABLES)   # sparse updates
                assert {k: sorted(v.tolist()) for k, v in res.ids.items()} == \
                    {k: sorted(v.tolist()) for k, v in want.items()}
            tracker.close()
        wait_converged(ds.endpoints, "trec", model)
