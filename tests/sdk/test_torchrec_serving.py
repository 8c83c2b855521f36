"""A TorchRec model served from an embedded ``ekko.Replica`` and from ``ekko.attach``:
its EmbeddingBagCollection / EmbeddingCollection tables and MLP bound to the replica's
tensors, outputs equal to the trainer's bit for bit after each publish (issue #17).
Skips like test_torchrec without TorchRec, never under CI."""

from __future__ import annotations


import numpy as np
import torch

import ekko
from ekko.sdk.publisher import Publisher
from test_torchrec import TorchRecRanker, tr_batch, tr_step   # skips this module without TorchRec
from tests.procs import DaemonGroup, free_port, wait_for


def same_params(a, b) -> bool:
    return all(torch.equal(x.detach(), y.detach()) for x, y in zip(a.parameters(), b.parameters()))



def test_bound_torchrec_modules_serve_the_trainers_outputs(tmp_path):
    torch.manual_seed(0)
    rng = np.random.default_rng(3)
    trainer = TorchRecRanker()
    opt = torch.optim.SGD(trainer.parameters(), lr=0.5)
    with DaemonGroup(tmp_path) as g:
        sidecar = g.start("sidecar", "dc1")
        with Publisher([sidecar.address], origin="trainer", state_dir=tmp_path / "pub") as pub, \
                ekko.Replica("embedded", "dc1", f"127.0.0.1:{free_port()}", tmp_path / "embedded",
                             seeds=[sidecar.address], preset="local", device="cpu") as rep:
            tracker = pub.track(trainer, model="trec", optimizer=opt)
            tracker.publish()
            in_process, attached = TorchRecRanker(), TorchRecRanker()
            rep.bind(in_process, model="trec")
            ekko.attach(sidecar.address, "trec").bind(attached)
            for _ in range(3):
                tr_step(trainer, opt, rng)
                tracker.publish()
                for served in (in_process, attached):
                    wait_for(lambda s=served: same_params(trainer, s), 60, 0.05, "the update to reach the served copy")
                x, _ = tr_batch(rng)
                with torch.no_grad():
                    want = trainer(*x)
                    assert torch.equal(rep.consistent(lambda: in_process(*x)), want)
                    assert torch.equal(attached(*x), want)
            tracker.close()
