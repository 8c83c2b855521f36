"""Hashed tables (issue #18) on a simulated 3x3 cluster of real nodes: 64-bit keys
published through the publisher's slot assignment converge, evictions converge, every
replica's key map answers like the publisher's, and a rollback across an eviction puts
the evicted keys back everywhere."""

from __future__ import annotations

import numpy as np
import pytest

from cluster import make_cluster
from ekko.core.chain import PublisherChain
from ekko.core.hashed import keys_of, values_of
from ekko.core.key_index import EMPTY_KEY
from ekko.core.spec import ModelSpec, TableSpec
from ekko.core.version import HLC_EPOCH_MS, HLC_LOGICAL_BITS
from ekko.core.hashed_slots import HashedSlots

CAPACITY = 512
SPEC = ModelSpec("ranker", [TableSpec("ads", dim=4, keys="int64", capacity=CAPACITY, shards=4, eviction="lru")])


class KeyTrainer:
    """A publisher of 64-bit keys: the SDK's slot assignment and the real chain."""

    def __init__(self, net, ingest: str, seed: int = 0) -> None:
        self.net, self.ingest = net, ingest
        self.t = SPEC.table("ads")
        self.chain = PublisherChain(1)
        self.slots = HashedSlots(self.t)
        self.rng = np.random.default_rng(seed)
        self.truth: dict[int, np.ndarray] = {}     # key -> values, of the keys held

    def publish(self, keys: np.ndarray) -> None:
        from ekko.core.hashed import with_keys
        vals = self.rng.standard_normal((len(keys), self.t.dim)).astype(np.float32)
        before = set(self.slots.index.keys_of(np.arange(CAPACITY)).tolist())
        slots = self.slots.assign(keys)
        after = set(self.slots.index.keys_of(np.arange(CAPACITY)).tolist())
        for gone in before - after:
            self.truth.pop(gone, None)
        frame = self.chain.frame(SPEC, {"ads": (slots, with_keys(vals, keys, self.t))},
                                 now_ms=HLC_EPOCH_MS + self.net.now * 1000)
        self.net.call(self.ingest, "publish", frame.body, self.net.now)
        self.chain.acked(frame)
        for k, v in zip(keys.tolist(), vals):
            self.truth[k] = v

    def new_keys(self, n: int) -> np.ndarray:
        return self.rng.integers(-2**63 + 2, 2**63 - 1, n, dtype=np.int64)


def _agrees(net, trainer: KeyTrainer, evicted: np.ndarray | None = None) -> bool:
    """Every node's key map finds the trainer's keys in the trainer's slots with its values,
    and finds none of ``evicted``."""
    keys = np.fromiter(trainer.truth, np.int64, len(trainer.truth))
    want_slots = trainer.slots.index.lookup(keys)
    want = np.stack([trainer.truth[k] for k in keys.tolist()])
    for node in net.nodes.values():
        if "ranker" not in node.models:
            return False
        ts = node.models["ranker"].store.table("ads")
        got = ts.lookup(keys)
        if not np.array_equal(got, want_slots):
            return False
        if not np.array_equal(values_of(ts.read(got), ts.spec).numpy(), want):
            return False
        if evicted is not None and (ts.lookup(evicted) >= 0).any():
            return False
    return True


def _settled(seed: int):
    net = make_cluster(dcs=3, per_dc=3, seed=seed, spec=SPEC)
    net.run(3.0)
    return net, KeyTrainer(net, "n0-0", seed=seed)


@pytest.mark.parametrize("seed", [1, 2])
def test_keys_beyond_capacity_evict_by_recency_and_converge_everywhere(seed):
    net, tr = _settled(seed)
    hot = tr.new_keys(64)
    first = tr.new_keys(CAPACITY // 2)
    tr.publish(first)
    for _ in range(6):   # three times the capacity of new keys, the hot keys in every publish
        tr.publish(np.concatenate([hot, tr.new_keys(256)]))
        net.run(net.now + 0.1)
    assert tr.slots.evicted > CAPACITY, "the table went round more than once"
    evicted = first[tr.slots.index.lookup(first) < 0]
    assert len(evicted) == len(first), "the oldest keys were evicted first"
    assert (tr.slots.index.lookup(hot) >= 0).all(), "keys published every time are never the least recent"
    assert net.run_until(lambda: _agrees(net, tr, evicted), timeout=30)
    # Every slot holds the same key on every node: the key map is the rows' own.
    ref = keys_of(net.nodes["n0-0"].models["ranker"].store.table("ads").values.numpy(), SPEC.table("ads"))
    for node in net.nodes.values():
        ts = node.models["ranker"].store.table("ads")
        assert np.array_equal(keys_of(ts.values.numpy(), ts.spec), ref)


def test_a_rollback_across_an_eviction_restores_the_evicted_keys_everywhere():
    net, tr = _settled(3)
    kept = tr.new_keys(CAPACITY)            # about full (keys hash unevenly over the 4 regions)
    tr.publish(kept[:256])
    tr.publish(kept[256:])
    assert net.run_until(lambda: _agrees(net, tr), timeout=30)
    at_cut = dict(tr.truth)
    cut = net.call("n0-0", "take_cut", "ranker", "before-evictions", net.now)
    net.run(net.now + 0.5)
    before = tr.slots.evicted
    tr.publish(tr.new_keys(200))            # evicts about 200 of the cut's keys
    assert net.run_until(lambda: _agrees(net, tr), timeout=30)
    gone = [k for k in at_cut if k not in tr.truth]
    assert len(gone) == tr.slots.evicted - before > 150
    until = (int(HLC_EPOCH_MS + net.now * 1000) - HLC_EPOCH_MS) << HLC_LOGICAL_BITS | 0xFF
    net.call("n2-1", "rollback", "ranker", cut, until, net.now)

    def back_at_cut() -> bool:
        keys = np.fromiter(at_cut, np.int64, len(at_cut))
        want = np.stack([at_cut[k] for k in keys.tolist()])
        for node in net.nodes.values():
            ts = node.models["ranker"].store.table("ads")
            slots = ts.lookup(keys)
            if (slots < 0).any() or not np.array_equal(values_of(ts.read(slots), ts.spec).numpy(), want):
                return False
            held = keys_of(ts.values.numpy(), ts.spec)
            if len(set(held[held != EMPTY_KEY].tolist()) - set(at_cut)):
                return False   # a key published after the cut is still held
        return True
    assert net.run_until(back_at_cut, timeout=30), "every replica holds exactly the cut's keys"


def test_a_key_evicted_and_published_again_is_found_in_its_new_slot():
    net, tr = _settled(4)
    t = SPEC.table("ads")
    one = tr.new_keys(1)
    tr.publish(one)
    for _ in range(4):                       # the table goes round: `one` is evicted
        tr.publish(tr.new_keys(CAPACITY // 4))
    assert tr.slots.index.lookup(one)[0] < 0
    tr.publish(one)                          # and comes back, in another slot maybe
    assert net.run_until(lambda: _agrees(net, tr), timeout=30)
    for node in net.nodes.values():
        ts = node.models["ranker"].store.table("ads")
        held = keys_of(ts.values.numpy(), t)
        assert (held == one[0]).sum() == 1, "one slot holds the key"
