"""TorchRec collections through track(): table mapping and exactly the changed rows.

A small TorchRec ranker (an EmbeddingBagCollection with two tables, one of them serving
two features, an EmbeddingCollection with a float32 and a float16 table, an MLP) trains
with SGD and Adagrad; only the rows a batch looks up move.  After every publish the rows
sent equal the rows whose bits differ from the test's own snapshot of the previous
publish, and the in-process replica equals the module bit for bit.

TorchRec is optional: without it these tests skip, except in CI (``CI`` set), which
installs it (``.ci/run``) and must run them.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ekko.core.errors import UsageError
from ekko.sdk.torchrec_tables import torchrec_tables
from ekko.sdk.tracking import module_layout, spec_from_module
from test_tracking import assert_replica_equals_module, brute_force_changed, snapshot

INSTALL = "pip install -e '.[torchrec]' && pip install --no-deps torchrec==1.8.0 fbgemm-gpu-cpu==1.8.0"
if os.environ.get("CI"):
    import torchrec                       # CI installs it: a missing TorchRec fails there
else:
    torchrec = pytest.importorskip("torchrec", reason=f"TorchRec is not installed (optional; {INSTALL})")

from torchrec import (EmbeddingBagCollection, EmbeddingBagConfig, EmbeddingCollection,  # noqa: E402
                      EmbeddingConfig, KeyedJaggedTensor)
from torchrec.modules.embedding_configs import DataType  # noqa: E402

USERS, ITEMS, WORDS, TAGS = 200, 300, 150, 40
#: (table, rows, dim) the spec must show, in module order; the MLP's parameters follow.
TABLES = [("user", USERS, 8), ("item", ITEMS, 4), ("word", WORDS, 6), ("tag", TAGS, 6)]
BAG_FEATURES = ["uid", "iid", "hist"]           # hist: recently seen items, pooled in "item"
SEQ_FEATURES = ["query", "tags"]


class TorchRecRanker(nn.Module):
    """Pooled user/item features + summed query words and tags -> MLP -> click logit."""

    def __init__(self, tag_type: DataType = DataType.FP16) -> None:
        super().__init__()
        self.ebc = EmbeddingBagCollection(tables=[
            EmbeddingBagConfig(name="user", embedding_dim=8, num_embeddings=USERS, feature_names=["uid"]),
            EmbeddingBagConfig(name="item", embedding_dim=4, num_embeddings=ITEMS, feature_names=["iid", "hist"]),
        ], device=torch.device("cpu"))
        self.ec = EmbeddingCollection(tables=[
            EmbeddingConfig(name="word", embedding_dim=6, num_embeddings=WORDS, feature_names=["query"]),
            EmbeddingConfig(name="tag", embedding_dim=6, num_embeddings=TAGS, feature_names=["tags"],
                            data_type=tag_type),
        ], device=torch.device("cpu"))
        self.mlp = nn.Sequential(nn.Linear(8 + 4 + 4 + 6 + 6, 16), nn.ReLU(), nn.Linear(16, 1))

    def forward(self, bags: KeyedJaggedTensor, seqs: KeyedJaggedTensor) -> torch.Tensor:
        pooled = self.ebc(bags).values()
        n = pooled.shape[0]
        summed = []
        for name, jt in self.ec(seqs).items():
            sample = torch.repeat_interleave(torch.arange(n), jt.lengths())
            summed.append(torch.zeros(n, jt.values().shape[1]).index_add(0, sample, jt.values()))
        return self.mlp(torch.cat([pooled, *summed], dim=1)).squeeze(1)


def _jagged(rng: np.random.Generator, keys: list[str], rows: list[int], n: int, max_len: int) -> KeyedJaggedTensor:
    """Zipf ids (a few hot rows, many cold ones) in bags of 0..max_len per sample."""
    lengths = [rng.integers(0, max_len + 1, n) for _ in keys]
    values = [np.minimum(rng.zipf(1.3, int(ln.sum())), r) - 1 for ln, r in zip(lengths, rows)]
    return KeyedJaggedTensor.from_lengths_sync(keys=keys, values=torch.from_numpy(np.concatenate(values)),
                                               lengths=torch.from_numpy(np.concatenate(lengths)))


def tr_batch(rng: np.random.Generator, n: int = 16):
    bags = _jagged(rng, BAG_FEATURES, [USERS, ITEMS, ITEMS], n, 3)
    seqs = _jagged(rng, SEQ_FEATURES, [WORDS, TAGS], n, 4)
    return (bags, seqs), torch.from_numpy(rng.integers(0, 2, n).astype(np.float32))


def tr_step(model: nn.Module, opt: torch.optim.Optimizer, rng: np.random.Generator) -> None:
    x, y = tr_batch(rng)
    loss = F.binary_cross_entropy_with_logits(model(*x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_each_config_is_a_table_named_after_it():
    model = TorchRecRanker()
    spec = spec_from_module(model, "ranker")
    got = [(t.name, t.rows, t.dim) for t in spec.tables if not t.dense]
    assert got == TABLES
    assert [t.dtype for t in spec.tables if not t.dense] == ["float32", "float32", "float32", "float16"]
    assert [t.name for t in spec.tables if t.dense] == ["mlp_0_weight", "mlp_0_bias", "mlp_2_weight", "mlp_2_bias"]
    found = torchrec_tables(model)
    assert [(t.collection, t.param_name) for t in found] == [
        ("ebc", "ebc.embedding_bags.user.weight"), ("ebc", "ebc.embedding_bags.item.weight"),
        ("ec", "ec.embeddings.word.weight"), ("ec", "ec.embeddings.tag.weight")]
    params = dict(model.named_parameters())
    assert all(t.weight is params[t.param_name] and t.lookup.weight is t.weight for t in found)


def test_collection_at_the_root_and_bad_collections_are_refused():
    ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=10)])
    assert [(t.name, t.param_name) for t in torchrec_tables(ebc)] == [("t", "embedding_bags.t.weight")]
    # Two collections with a table of the same name: two tables cannot share it.
    twice = nn.ModuleDict({"a": ebc, "b": EmbeddingBagCollection(
        tables=[EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=10)])})
    with pytest.raises(UsageError, match="two tables map to the name 't'"):
        spec_from_module(twice, "m")
    # A module swapped for one that does not match its config.
    ebc.embedding_bags["t"] = nn.EmbeddingBag(11, 4)
    with pytest.raises(UsageError, match=r"'t' is configured 10 x 4 but its weight is \(11, 4\)"):
        spec_from_module(ebc, "m")
    del ebc.embedding_bags["t"]
    with pytest.raises(UsageError, match="table 't' of its configs has no module"):
        spec_from_module(ebc, "m")


#: name -> (optimizer, data type of the "tag" table).  Adagrad's float16 state turns the
#: rows without a gradient into NaN (its eps underflows to 0: 0 / 0), so it trains float32.
OPTIMIZERS = {
    "sgd": (lambda params: torch.optim.SGD(params, lr=0.5), DataType.FP16),
    "adagrad": (lambda params: torch.optim.Adagrad(params, lr=0.3), DataType.FP32),
}


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
def test_publishes_exactly_the_changed_rows(srv, pub, opt_name):
    torch.manual_seed(0)
    rng = np.random.default_rng(3)
    make_opt, tag_type = OPTIMIZERS[opt_name]
    model = TorchRecRanker(tag_type)
    opt = make_opt(model.parameters())
    tracker = pub.track(model, model="trec", optimizer=opt)
    first = tracker.publish()
    assert {name: len(first.ids[name]) for name, _, _ in TABLES} == {name: rows for name, rows, _ in TABLES}
    assert_replica_equals_module(srv, "trec", model)

    for round_ in range(4):
        before = snapshot(model)
        for _ in range(1 + round_):              # publish after 1, 2, 3, 4 steps
            tr_step(model, opt, rng)
        recorded = tracker.pending_rows()
        res = tracker.publish()
        want = brute_force_changed(before, model)
        for name, rows, _ in TABLES:
            # Sparse updates: some rows moved, most did not, and the lookups recorded them all.
            assert 0 < len(want[name]) < rows and recorded[name] >= len(want[name]), (round_, name)
        assert {k: sorted(v.tolist()) for k, v in res.ids.items()} == \
            {k: sorted(v.tolist()) for k, v in want.items()}, round_
        assert all((v > 0).all() for v in res.impact.values())
        assert_replica_equals_module(srv, "trec", model)
        assert all(v == 0 for v in tracker.pending_rows().values())
    tracker.close()


def test_lookups_without_an_update_send_nothing(srv, pub):
    model = TorchRecRanker()
    tracker = pub.track(model, model="idle")
    tracker.publish()
    with torch.no_grad():
        model(*tr_batch(np.random.default_rng(0))[0])
    assert tracker.pending_rows()["user"] > 0      # the hooks saw the lookups ...
    res = tracker.publish()
    assert res.rows == 0 and res.acks == ()         # ... but nothing moved
    tracker.close()


def test_sharded_collections_are_refused():
    """DistributedModelParallel keeps the tables in fused kernels, not in modules: without
    the refusal its weights would pass for one dense parameter."""
    import torch.distributed as dist
    from torchrec.distributed.model_parallel import DistributedModelParallel

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=10)],
                                     device=torch.device("meta"))
        dmp = DistributedModelParallel(nn.ModuleDict({"ebc": ebc}), device=torch.device("cpu"))
        with pytest.raises(UsageError, match="ebc is a sharded TorchRec module .ShardedEmbeddingBagCollection."):
            spec_from_module(dmp, "m")
    finally:
        dist.destroy_process_group()


def test_a_weight_shared_with_other_lookups_is_one_table_seen_by_all():
    ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=10)])
    ec = EmbeddingCollection(tables=[EmbeddingConfig(name="u", embedding_dim=4, num_embeddings=10)])
    plain = nn.Embedding(10, 4)
    shared = ebc.embedding_bags["t"].weight
    ec.embeddings["u"].weight = plain.weight = shared
    model = nn.ModuleDict({"ebc": ebc, "ec": ec, "plain": plain})
    layout = module_layout(model)
    assert [(lay.name, lay.param_name) for lay, _, _ in layout] == [("t", "ebc.embedding_bags.t.weight")]
    assert [type(m).__name__ for m in layout[0][2]] == ["EmbeddingBag", "Embedding", "Embedding"]
