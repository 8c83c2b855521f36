"""``ekko.Replica``: a replica inside the serving process, with a module bound to its
tables (issue #17).  One real daemon (a process) takes the trainer's publishes; the
embedded replica joins it over the network like any other."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from torch import nn

import ekko
from ekko.core.errors import UsageError
from ekko.sdk.publisher import Publisher
from tests.procs import DaemonGroup, free_port, wait_for


class Ranker(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.user = nn.Embedding(1000, 8)
        self.item = nn.EmbeddingBag(500, 8, mode="sum")
        self.mlp = nn.Linear(16, 3)

    def forward(self, users: torch.Tensor, items: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return self.mlp(torch.cat([self.user(users), self.item(items, offsets)], dim=1))



def same_params(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x.detach().cpu(), y.detach().cpu()) for x, y in zip(a.parameters(), b.parameters()))


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_a_bound_module_serves_the_trainers_outputs_bit_for_bit(tmp_path, device):
    """On a GPU the trainer, the replica's tables and the served module all live there
    (the same kernels on the same bits: equal outputs)."""
    torch.manual_seed(0)
    trainer = Ranker().to(device)
    opt = torch.optim.SGD(trainer.parameters(), lr=0.1)
    users, items, offsets = (torch.tensor(x, device=device) for x in ([3, 7, 999], [1, 2, 3, 4, 499], [0, 2, 3]))
    with DaemonGroup(tmp_path) as g:
        ingest = g.start("ingest", "dc1")
        rep = ekko.Replica("serving", "dc1", f"127.0.0.1:{free_port()}", tmp_path / "serving",
                           seeds=[ingest.address], preset="local", device=device)
        with Publisher([ingest.address], origin="trainer", state_dir=tmp_path / "pub") as pub:
            tracker = pub.track(trainer, model="ranker")
            tracker.publish()                                  # the initial weights
            with rep:
                served = Ranker().to(device)                   # its own (random) weights do not matter
                bound = rep.bind(served, model="ranker")
                assert served.user.weight.device.type == device
                assert set(bound) == {"user", "item", "mlp_weight", "mlp_bias"}     # as track() names them
                # no copies: the module's parameters are the replica's tables
                assert served.user.weight.data_ptr() == rep.tensor("ranker", "user").data_ptr()
                assert served.mlp.bias.data_ptr() >= rep.tensor("ranker", "mlp_bias").data_ptr()
                wait_for(lambda: same_params(trainer, served), 60, 0.05, "the replica to hold the initial weights")
                for _ in range(3):                                 # train, publish, serve
                    opt.zero_grad()
                    trainer(users, items, offsets).sum().backward()
                    opt.step()
                    tracker.publish()
                    wait_for(lambda: same_params(trainer, served), 60, 0.05, "the update to reach the replica")
                    with torch.no_grad():
                        want = trainer(users, items, offsets)
                        got = rep.consistent(lambda: served(users, items, offsets))
                    assert torch.equal(got, want)                 # bit for bit, no re-bind
                assert not served.user.weight.requires_grad


def test_bind_refuses_a_module_that_does_not_fit_and_binds_nothing(tmp_path):
    with DaemonGroup(tmp_path) as g:
        ingest = g.start("ingest", "dc1")
        with Publisher([ingest.address], origin="trainer", state_dir=tmp_path / "pub") as pub:
            pub.track(Ranker(), model="ranker")
        with ekko.Replica("serving", "dc1", f"127.0.0.1:{free_port()}", tmp_path / "serving",
                          seeds=[ingest.address], preset="local", device="cpu") as rep:
            other = Ranker()
            other.mlp = nn.Linear(16, 4)                          # a different dense shape
            before = other.user.weight
            with pytest.raises(UsageError, match="mlp"):
                rep.bind(other, model="ranker")
            assert other.user.weight is before                    # nothing bound
            with pytest.raises(TimeoutError, match="nope"):
                rep.bind(Ranker(), model="nope", timeout=0.3)
            with pytest.raises(UsageError, match="started"):
                rep.start()
            from ekko.core.errors import RemoteError
            with pytest.raises(RemoteError, match="embedded"):     # its bound tensors stay where they are
                ekko.attach(rep.address, "ranker")
        assert not rep.running
        rep.stop()                                                # idempotent


def test_a_taken_port_fails_start_with_the_error(tmp_path):
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    try:
        rep = ekko.Replica("r", "dc1", f"127.0.0.1:{s.getsockname()[1]}", tmp_path / "r", preset="local",
                           device="cpu")
        with pytest.raises(OSError):
            rep.start()
        assert not rep.running and not (tmp_path / "r").exists()
    finally:
        s.close()


def test_load_fills_a_fresh_module_from_a_replica_by_its_layout(tmp_path):
    torch.manual_seed(1)
    trainer = Ranker()
    with DaemonGroup(tmp_path) as g:
        d = g.start("d", "dc1")
        with Publisher([d.address], origin="trainer", state_dir=tmp_path / "pub") as pub:
            pub.track(trainer, model="ranker").publish()
        fresh = Ranker()
        assert not same_params(trainer, fresh)
        tables = ekko.load(d.address, "ranker", fresh)
        assert sorted(tables) == ["item", "mlp_bias", "mlp_weight", "user"]
        assert same_params(trainer, fresh) and fresh.user.weight.requires_grad     # a copy, still trainable
        spec = ekko.Client(d.address).spec("ranker")
        assert {t.param for t in spec.tables} == {"user.weight", "item.weight", "mlp.weight", "mlp.bias"}
        wrong = Ranker()
        wrong.mlp = nn.Linear(16, 5)
        before = wrong.user.weight.detach().clone()
        with pytest.raises(UsageError, match="mlp.weight"):
            ekko.load(d.address, "ranker", wrong)
        assert torch.equal(wrong.user.weight, before)                             # nothing written
