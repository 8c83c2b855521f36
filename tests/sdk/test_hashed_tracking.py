"""A HashedEmbedding (64-bit feature ids) trained and tracked: its slots are the replica's
slots, so after every publish the replica holds the module's rows and keys bit for bit,
through evictions; and its key assignment survives a state_dict round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ekko.core.errors import UsageError
from ekko.core.hashed import keys_of, values_of
from ekko.core.key_index import EMPTY_KEY
from ekko.sdk.hashed_embedding import HashedEmbedding
from ekko.sdk.tracking import spec_from_module

CAPACITY, DIM = 256, 8


class Ads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ads = HashedEmbedding(CAPACITY, DIM, shards=4, eviction="lru")
        self.head = nn.Linear(DIM, 1)

    def forward(self, keys: torch.Tensor) -> torch.Tensor:
        return self.head(self.ads(keys).sum(dim=1)).squeeze(1)


def _batch(rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    # Feature ids spread over the int64 range: 2000 distinct ones, far more than the slots.
    space = np.random.default_rng(0).integers(-2**63 + 2, 2**63 - 1, 2000, dtype=np.int64)
    keys = space[rng.integers(0, 2000, (32, 3))]
    return torch.from_numpy(keys), torch.from_numpy(rng.integers(0, 2, 32).astype(np.float32))


def _replica_matches(srv, model: Ads) -> None:
    mod = model.ads
    rows, _ = srv.rows("ads", "ads")
    spec = srv.node.table_spec("ads", "ads")
    held = (mod.keys != EMPTY_KEY).nonzero().squeeze(1).numpy()
    assert np.array_equal(keys_of(rows, spec)[held], mod.keys.numpy()[held])
    got = values_of(rows, spec)[held]
    assert np.array_equal(got.view(np.int32), mod.weight.detach().numpy()[held].view(np.int32))
    # Read by key, the replica answers the module's slots.
    store = srv.node.table_store("ads", "ads")
    assert np.array_equal(srv.call(lambda: store.lookup(mod.keys.numpy()[held])), held)


def test_a_tracked_hashed_embedding_is_mirrored_bit_for_bit_through_evictions(srv, pub):
    torch.manual_seed(0)
    rng = np.random.default_rng(1)
    model = Ads()
    spec = spec_from_module(model, "ads")
    t = spec.table("ads")
    assert (t.hashed, t.rows, t.dim, t.num_shards, t.eviction, t.param) == (True, CAPACITY, DIM, 4, "lru", "ads.weight")
    opt = torch.optim.Adagrad(model.parameters(), lr=0.3)
    tracker = pub.track(model, model="ads", optimizer=opt)
    sent = 0
    for _ in range(15):
        x, y = _batch(rng)
        loss = F.binary_cross_entropy_with_logits(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        out = tracker.publish()
        sent += out.rows
        _replica_matches(srv, model)
    assert model.ads.evicted > 100, "more distinct ids than slots: keys were evicted"
    assert sent < 15 * CAPACITY, "only changed rows went out"
    # Looked up without a training step: the new keys' slots changed (re-initialised) all
    # the same, and go out with their keys.
    before = model.ads.evicted
    with torch.no_grad():
        model.ads(torch.arange(10**12, 10**12 + 40))
    assert model.ads.evicted > before
    assert tracker.publish().rows >= 40
    _replica_matches(srv, model)


def test_the_key_assignment_survives_a_state_dict_round_trip():
    torch.manual_seed(0)
    a = HashedEmbedding(64, 4, shards=2, eviction="lfu")
    keys = torch.arange(1000, 1040)
    a(keys)
    b = HashedEmbedding(64, 4, shards=2, eviction="lfu")
    b.load_state_dict(a.state_dict())
    assert torch.equal(b.slots_of(keys), a.slots_of(keys))
    assert torch.equal(b(keys), a(keys))
    new = torch.arange(5000, 5010)
    b(new)                                   # new keys take free slots, none of the held ones
    assert torch.equal(b.slots_of(keys), a.slots_of(keys)) and b.evicted == 0


def test_bad_use_is_refused():
    with pytest.raises(UsageError):
        HashedEmbedding(8, 2, init_std=0.0)
    full = HashedEmbedding(4, 2, shards=1, eviction="none")
    full(torch.arange(4))
    with pytest.raises(UsageError, match="eviction is 'none'"):
        full(torch.tensor([99]))
    assert full.slots_of(torch.arange(4)).tolist() == [0, 1, 2, 3]
    with pytest.raises(UsageError):
        full(torch.tensor([1.5]))


def test_a_replica_serves_a_bound_hashed_embedding_and_load_copies_its_keys(tmp_path):
    """A trainer's HashedEmbedding tracked to a real daemon; an embedded replica binds a
    fresh module to its table: the served outputs equal the trainer's bit for bit, keys the
    replica does not hold read as zeros, and the bound module never assigns a slot."""
    import ekko
    from ekko.sdk.publisher import Publisher
    from tests.procs import DaemonGroup, free_port, wait_for
    torch.manual_seed(0)
    rng = np.random.default_rng(2)
    trainer = Ads()
    opt = torch.optim.Adagrad(trainer.parameters(), lr=0.3)
    with DaemonGroup(tmp_path) as g:
        ingest = g.start("ingest", "dc1")
        with Publisher([ingest.address], origin="trainer", state_dir=tmp_path / "pub") as pub:
            tracker = pub.track(trainer, model="ads", optimizer=opt)
            for _ in range(6):
                x, y = _batch(rng)
                F.binary_cross_entropy_with_logits(trainer(x), y).backward()
                opt.step()
                opt.zero_grad()
                tracker.publish()
            assert trainer.ads.evicted > 0
            held = trainer.ads.keys[trainer.ads.keys != EMPTY_KEY][:50].reshape(10, 5)
            with torch.no_grad():
                want = trainer(held)
            with ekko.Replica("serving", "dc1", f"127.0.0.1:{free_port()}", tmp_path / "serving",
                              seeds=[ingest.address], preset="local", device="cpu") as rep:
                served = Ads()
                assert set(rep.bind(served, model="ads")) == {"ads", "head_weight", "head_bias"}
                assert served.ads.weight.data_ptr() == rep.tensor("ads", "ads").data_ptr()

                def same() -> bool:
                    with torch.no_grad():
                        return torch.equal(rep.consistent(lambda: served(held)), want)
                wait_for(same, 60, 0.05, "the served outputs to equal the trainer's")
                unknown = torch.tensor([[1, 2, 3]])
                with torch.no_grad():
                    assert torch.equal(served.ads(unknown), torch.zeros(1, 3, DIM))
                assert served.ads.evicted == 0 and (served.ads.keys == EMPTY_KEY).all()
            loaded = Ads()
            ekko.load(ingest.address, "ads", loaded)
            with torch.no_grad():
                assert torch.equal(loaded(held), want)
            assert torch.equal(loaded.ads.keys, trainer.ads.keys)
            with pytest.raises(UsageError, match="Replica.bind"):
                ekko.attach(ingest.address, "ads").bind(Ads())


def test_a_publisher_refuses_two_assigners_of_one_hashed_tables_slots(srv, pub):
    from ekko.core.spec import ModelSpec, TableSpec
    from ekko.sdk.prepare import SlotKeys
    spec = ModelSpec("h", [TableSpec("t", dim=2, keys="int64", capacity=16, shards=1)])
    pub.register(spec)
    pub.publish_many("h", {"t": (SlotKeys([3], [42]), np.ones((1, 2), np.float32))})   # a module assigns
    with pytest.raises(UsageError, match="one assigner"):
        pub.publish("h", "t", np.array([10**15]), np.ones((1, 2), np.float32))       # by key: refused
    rows, _ = srv.rows("h", "t")
    assert rows[3, 2:].view(np.int64)[0] == 42 ^ np.iinfo(np.int64).min and not rows[:3].any()
