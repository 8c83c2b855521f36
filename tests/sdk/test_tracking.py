"""Tracker: publishes exactly the rows that changed, checked against a brute-force diff.

A tiny recommendation model (nn.Embedding with sparse and dense gradients, an
nn.EmbeddingBag with per-sample weights, an MLP) trains a few steps with SGD and
Adagrad.  After every publish: the rows the tracker sent equal the rows whose
bits differ from a full copy taken at the previous publish (the copy is the
test's, the tracker never makes one), impact equals the change's L2 norm, and
the in-process replica's tables equal the module's weights bit for bit.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ekko.core.errors import RemoteError
from ekko.sdk.ack import PublishError
from ekko.core.store import to_wire_values
from ekko.sdk.tracking import dense_rows, module_layout, spec_from_module, unflatten_dense
from test_sdk_server import FakeDaemon, Fault

USERS, ITEMS, DIM = 200, 300, 8


class Rec(nn.Module):
    """user/item embeddings + a bag of recently seen items -> MLP -> click logit."""

    def __init__(self, sparse: bool) -> None:
        super().__init__()
        self.user = nn.Embedding(USERS, DIM, sparse=sparse)
        self.item = nn.Embedding(ITEMS, DIM, padding_idx=0)                  # dense gradients
        self.hist = nn.EmbeddingBag(ITEMS, DIM, mode="sum", sparse=sparse)
        self.mlp = nn.Sequential(nn.Linear(3 * DIM, 16), nn.ReLU(), nn.Linear(16, 1))

    def forward(self, u, i, h, off, w):
        x = torch.cat([self.user(u), self.item(i), self.hist(h, off, per_sample_weights=w)], dim=1)
        return self.mlp(x).squeeze(1)


def batch(rng: np.random.Generator, n: int = 16):
    u = torch.from_numpy(np.minimum(rng.zipf(1.3, n), USERS) - 1)
    i = torch.from_numpy(np.minimum(rng.zipf(1.3, n), ITEMS) - 1)
    lens = rng.integers(0, 4, n)
    h = torch.from_numpy(np.minimum(rng.zipf(1.3, int(lens.sum())), ITEMS) - 1)
    off = torch.from_numpy(np.concatenate([[0], np.cumsum(lens)[:-1]]))
    w = torch.from_numpy(rng.choice([0.0, 1.0], int(lens.sum())).astype(np.float32))   # some zero weights
    y = torch.from_numpy(rng.integers(0, 2, n).astype(np.float32))
    return (u, i, h, off, w), y


def step(model, opt, rng):
    x, y = batch(rng)
    loss = F.binary_cross_entropy_with_logits(model(*x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {lay.name: (p.detach().clone() if lay.kind == "embedding" else dense_rows(p, lay.rows, lay.dim))
            for lay, p, _ in module_layout(model)}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({4: torch.int32, 2: torch.int16, 8: torch.int64}[t.element_size()])


def brute_force_changed(before: dict[str, torch.Tensor], model: nn.Module) -> dict[str, np.ndarray]:
    now = snapshot(model)
    out = {}
    for name, b in before.items():
        rows = bits(now[name]).ne(bits(b)).any(dim=1).nonzero().squeeze(1).numpy()
        if len(rows):
            out[name] = rows
    return out


def assert_replica_equals_module(srv: FakeDaemon, model_name: str, model: nn.Module) -> None:
    for name, want in snapshot(model).items():
        got, _ = srv.rows(model_name, name)
        w = to_wire_values(want)
        assert got.dtype == w.dtype and np.array_equal(got.view(np.uint8), w.view(np.uint8)), name


OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.5),
    "adagrad": lambda params: torch.optim.Adagrad(params, lr=0.3),
}


@pytest.mark.parametrize("sparse", [True, False], ids=["sparse_grads", "dense_grads"])
@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
def test_publishes_exactly_the_changed_rows(srv, pub, sparse, opt_name):
    torch.manual_seed(0)
    rng = np.random.default_rng(1)
    model = Rec(sparse)
    opt = OPTIMIZERS[opt_name](model.parameters())
    zeros = {k: torch.zeros_like(v) for k, v in snapshot(model).items()}
    tracker = pub.track(model, model="rec", optimizer=opt)

    # First publish: everything that is not zero (replicas start from zeros).
    first = tracker.publish()
    want = brute_force_changed(zeros, model)
    assert {k: sorted(v) for k, v in first.ids.items()} == {k: sorted(v.tolist()) for k, v in want.items()}
    assert 0 not in first.ids["item"]          # the padding row is zeros: nothing to send
    assert_replica_equals_module(srv, "rec", model)

    sent_any_skipped = False
    for round_ in range(4):
        before = snapshot(model)
        for _ in range(1 + round_):            # publish after 1, 2, 3, 4 steps
            step(model, opt, rng)
        recorded = tracker.pending_rows()
        res = tracker.publish()
        want = brute_force_changed(before, model)
        assert set(res.ids) == set(want)
        for name, rows in want.items():
            assert sorted(res.ids[name].tolist()) == sorted(rows.tolist()), (round_, name)
            order = np.argsort(res.ids[name])
            cur, old = snapshot(model)[name], before[name]
            ids = torch.from_numpy(res.ids[name][order])
            norm = (cur[ids].double() - old[ids].double()).norm(dim=1).float().numpy()
            np.testing.assert_allclose(res.impact[name][order], norm, rtol=1e-5, atol=1e-7)
            assert (res.impact[name] > 0).all()
        for name in ("user", "item", "hist"):
            sent_any_skipped |= recorded[name] > len(res.ids.get(name, ()))
        assert_replica_equals_module(srv, "rec", model)
        assert all(v == 0 for v in tracker.pending_rows().values())   # O(touched) state is released
    # Some looked-up rows did not change (padding row, zero per-sample weights): not sent.
    assert sent_any_skipped
    tracker.close()


def test_zero_weight_and_padding_rows_are_recorded_but_not_sent(srv, pub):
    torch.manual_seed(0)
    model = Rec(sparse=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = pub.track(model, model="rec2")
    tracker.publish()
    x = (torch.tensor([1]), torch.tensor([0]), torch.tensor([3, 5]), torch.tensor([0]), torch.tensor([1.0, 0.0]))
    loss = model(*x).sum()
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert tracker.pending_rows() == {"user": 1, "item": 1, "hist": 2}
    res = tracker.publish()
    assert res.ids["user"].tolist() == [1] and res.ids["hist"].tolist() == [3]
    assert "item" not in res.ids                # padding_idx 0 never moves
    assert_replica_equals_module(srv, "rec2", model)


def test_nothing_changed_sends_nothing(srv, pub):
    model = Rec(sparse=True)
    tracker = pub.track(model, model="idle")
    tracker.publish()
    n = srv.count("/v1/publish")
    with torch.no_grad():
        model(*batch(np.random.default_rng(0))[0])          # lookups, no update
    res = tracker.publish()
    assert res.rows == 0 and res.acks == () and srv.count("/v1/publish") == n


def test_failed_publish_rows_are_sent_next_time(srv, pub):
    torch.manual_seed(0)
    rng = np.random.default_rng(2)
    model = Rec(sparse=True)
    opt = torch.optim.Adagrad(model.parameters(), lr=0.3)
    tracker = pub.track(model, model="rec")
    tracker.publish()
    # Definitive refusal: the frame is dropped, the tracker puts its rows back.
    step(model, opt, rng)
    srv.faults.append(Fault("status", status=400))
    with pytest.raises(RemoteError):
        tracker.publish()
    step(model, opt, rng)
    tracker.publish()
    assert_replica_equals_module(srv, "rec", model)
    # Replica down past the deadline: the frame is kept by the publisher, training goes on.
    srv.stop()
    step(model, opt, rng)
    pub._core.timeout = 0.5
    with pytest.raises(PublishError) as ei:
        tracker.publish()
    assert ei.value.pending
    step(model, opt, rng)
    with pytest.raises(PublishError) as ei:
        tracker.publish()                      # not sent: an earlier frame is pending
    assert not ei.value.pending
    srv.restart()
    pub._core.timeout = 5
    step(model, opt, rng)
    tracker.publish()
    assert_replica_equals_module(srv, "rec", model)


def test_publish_async_overlaps_training(srv, pub):
    torch.manual_seed(0)
    rng = np.random.default_rng(3)
    model = Rec(sparse=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    tracker = pub.track(model, model="rec")
    futs = [tracker.publish_async()]
    for _ in range(10):
        step(model, opt, rng)                  # runs while earlier publishes are in flight
        futs.append(tracker.publish_async())
    results = [f.result(10) for f in futs]
    assert all(r.rows > 0 for r in results)
    assert_replica_equals_module(srv, "rec", model)


def test_large_update_goes_in_several_frames(srv, pub):
    torch.manual_seed(0)
    model = Rec(sparse=False)
    tracker = pub.track(model, model="rec", max_frame_bytes=2048)
    res = tracker.publish()
    assert len(res.acks) > 10
    assert sum(a.rows for a in res.acks) == res.rows
    assert_replica_equals_module(srv, "rec", model)


def test_publish_initial_false_sends_only_changes(srv, pub):
    torch.manual_seed(0)
    model = Rec(sparse=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    tracker = pub.track(model, model="rec", publish_initial=False)
    before = snapshot(model)
    step(model, opt, np.random.default_rng(4))
    res = tracker.publish()
    want = brute_force_changed(before, model)
    assert {k: sorted(v) for k, v in res.ids.items()} == {k: sorted(v.tolist()) for k, v in want.items()}
    assert res.rows < sum(t.rows for t in tracker.spec.tables)


def test_bfloat16_model_bit_for_bit(srv, pub):
    torch.manual_seed(0)
    model = Rec(sparse=True).to(torch.bfloat16)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    tracker = pub.track(model, model="rec-bf16")
    assert {t.dtype for t in tracker.spec.tables} == {"bfloat16"}
    tracker.publish()
    rng = np.random.default_rng(5)
    for _ in range(3):
        x, y = batch(rng)
        x = x[:4] + (x[4].to(torch.bfloat16),)
        loss = F.binary_cross_entropy_with_logits(model(*x).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        tracker.publish()
    assert_replica_equals_module(srv, "rec-bf16", model)


def test_tied_weight_used_outside_forward_is_caught_by_the_grad_hook(srv, pub):
    torch.manual_seed(0)

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(50, 4)
            self.out = nn.Linear(4, 4)

        def forward(self, idx):
            h = self.out(self.emb(idx[:1]))
            # scores against rows 10..19 through the raw weight, not emb's forward
            return h @ F.embedding(idx[1:], self.emb.weight).t()

    model = Tied()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    tracker = pub.track(model, model="tied")
    tracker.publish()
    before = snapshot(model)
    model(torch.tensor([1, 10, 11, 12])).sum().backward()
    opt.step()
    res = tracker.publish()
    assert sorted(res.ids["emb"].tolist()) == sorted(brute_force_changed(before, model)["emb"].tolist()) == [
        1, 10, 11, 12]
    assert_replica_equals_module(srv, "tied", model)


def test_optimizer_warning_and_close_removes_hooks(srv, pub):
    model = Rec(sparse=False)
    with pytest.warns(UserWarning, match="momentum"):
        pub.track(model, model="warn", optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)).close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = pub.track(model, model="warn", optimizer=torch.optim.Adagrad(model.parameters()))
    t.publish()
    t.close()
    with torch.no_grad():
        model(*batch(np.random.default_rng(0))[0])
    assert all(v == 0 for v in t.pending_rows().values())


def test_layout_names_and_dense_round_trip():
    m = nn.Sequential(nn.Embedding(5, 2), nn.Linear(2, 3))
    names = [t.name for t in spec_from_module(m, "s").tables]
    assert names == ["0", "1_weight", "1_bias"]
    p = torch.randn(3, 700)
    from ekko.sdk.tracking import DENSE_CHUNK
    rows = dense_rows(p, 3 * 700 // DENSE_CHUNK + 1, DENSE_CHUNK)
    assert rows.shape == (3, DENSE_CHUNK) and torch.equal(unflatten_dense(rows, p.shape), p)
    assert rows.reshape(-1)[2100:].abs().sum() == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_module(srv, pub):
    torch.manual_seed(0)
    model = Rec(sparse=True).cuda()
    opt = torch.optim.Adagrad(model.parameters(), lr=0.3)
    tracker = pub.track(model, model="rec-cuda")
    tracker.publish()
    rng = np.random.default_rng(6)
    for _ in range(3):
        before = {k: v.cpu() for k, v in snapshot(model).items()}
        x, y = batch(rng)
        loss = F.binary_cross_entropy_with_logits(model(*[t.cuda() for t in x]), y.cuda())
        opt.zero_grad()
        loss.backward()
        opt.step()
        res = tracker.publish()
        now = {k: v.cpu() for k, v in snapshot(model).items()}
        for name, b in before.items():
            want = bits(now[name]).ne(bits(b)).any(dim=1).nonzero().squeeze(1).tolist()
            assert sorted(res.ids.get(name, np.zeros(0)).tolist()) == want
    for name, want in snapshot(model).items():
        got, _ = srv.rows("rec-cuda", name)
        assert np.array_equal(got.view(np.uint8), to_wire_values(want).view(np.uint8))


def test_sign_of_zero_counts_and_mark(srv, pub):
    model = nn.Embedding(10, 3)
    with torch.no_grad():
        model.weight[4] = -0.0                 # all -0.0: not zero bits, must go out initially
        model.weight[5] = 0.0
    tracker = pub.track(model, model="zeros")
    first = tracker.publish()
    assert 4 in first.ids["weight"] and 5 not in first.ids["weight"]
    tracker.mark("weight", [3, 5])              # about to change outside any forward
    with torch.no_grad():
        model.weight[3] = 0.0
        model.weight[5] = -0.0                  # equal as floats, different bits
    assert sorted(tracker.publish().ids["weight"].tolist()) == [3, 5]
    assert_replica_equals_module(srv, "zeros", model)
