"""Cuts, the cut registry and fences; an end-to-end rollback of two replicas to one cut."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ekko.core.delta import Delta
from ekko.core.errors import ProtocolError, UsageError
from ekko.core.spec import ModelSpec, TableSpec
from ekko.core.store import TableStore
from ekko.core.version import Knowledge, counters_of, origins_of, pack
from rollback.cuts import Cut, CutPolicy, CutRegistry, Fence, FenceRange
from rollback.undo import UndoHistory, capture_before_restore

SPEC = ModelSpec("m", tables=[TableSpec("t", rows=64, dim=4, shards=4), TableSpec("u", rows=10, dim=2)])


def wire(obj):
    """Through msgpack, as the p2p layer would carry it."""
    return msgpack.unpackb(msgpack.packb(obj), strict_map_key=False)


def sample_cut(seq: int = 5) -> Cut:
    return Cut("before-bad", "m", 12.5, {("t", 0): Knowledge({1: 10, 2: 4}), ("t", 3): Knowledge({1: 7}),
                                          ("u", 0): Knowledge({2: 9})}, seq)


# -- cuts ---------------------------------------------------------------------------------
def test_cut_wire_round_trip_and_copy():
    k = Knowledge({1: 3})
    cut = Cut("c1", "m", 1.0, {("t", 0): k}, 0)
    k.advance(1, 99)                      # the cut holds a copy, not the live vector
    assert cut.knowledge[("t", 0)][1] == 3
    c = sample_cut()
    assert Cut.from_wire(wire(c.to_wire())) == c


def _bad_cuts():
    good = sample_cut().to_wire()
    def variant(**kw):
        d = dict(good)
        d.update(kw)
        return d
    missing = dict(good)
    del missing["seq"]
    return [
        "not a map", [], missing, variant(name="bad name!"), variant(name=""), variant(model=7),
        variant(taken_at=float("nan")), variant(taken_at=float("inf")), variant(taken_at=-1.0),
        variant(taken_at=True), variant(taken_at="now"), variant(seq=-1), variant(seq=1.5), variant(seq=True),
        variant(knowledge="x"), variant(knowledge=[["t", 0]]), variant(knowledge=[["t", -1, []]]),
        variant(knowledge=[["t", True, []]]), variant(knowledge=[["t", 1 << 20, []]]),
        variant(knowledge=[["b d", 0, []]]), variant(knowledge=[["t", 0, []], ["t", 0, []]]),
        variant(knowledge=[["t", 0, [[0, 5]]]]), variant(knowledge=[["t", 0, [[1, -5]]]]),
        variant(knowledge=[["t", 0, "k"]]),
    ]


@pytest.mark.parametrize("data", _bad_cuts())
def test_cut_from_wire_rejects_bad_input(data):
    with pytest.raises(ProtocolError):
        Cut.from_wire(data)


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.integers(0, 3), st.dictionaries(st.integers(1, 4), st.integers(1, 50), max_size=3),
                       max_size=4),
       st.lists(st.tuples(st.integers(0, 63), st.integers(0, 60), st.integers(1, 5)), max_size=40))
def test_cut_covers_matches_per_shard_knowledge(per_shard, rows):
    spec = SPEC.table("t")
    cut = Cut("c", "m", 0.0, {("t", s): Knowledge(k) for s, k in per_shard.items()}, 0)
    ids = np.array([r[0] for r in rows], np.int64)
    versions = np.array([pack(r[1], r[2]) for r in rows], np.int64)
    got = cut.covers(spec, ids, versions)
    want = [cut.knowledge.get(("t", spec.shard_of(i)), Knowledge()).covers(np.array([v]))[0]
            for i, v in zip(ids.tolist(), versions.tolist())]
    assert got.tolist() == want


# -- registry -----------------------------------------------------------------------------
def test_registry_auto_cuts_retention_and_undo_horizon():
    undo = UndoHistory(max_bytes=1 << 20)
    reg = CutRegistry(CutPolicy(auto_interval_s=60.0, retention=3), undo=undo)
    state = {"seq": 0}
    def snapshot():
        return {("t", 0): Knowledge({1: state["seq"] + 1})}, state["seq"]
    taken = []
    for t in range(0, 600, 10):           # ticks every 10 s, applies in between
        state["seq"] += 1
        undo.record("m", "t", state["seq"], _result([t % 64], state["seq"]))
        cut = reg.maybe_auto_cut("m", float(t), snapshot)
        if cut:
            taken.append(cut)
    assert [c.taken_at for c in taken] == [float(t) for t in range(0, 600, 60)]
    live = reg.cuts("m")
    assert [c.name for c in live] == [c.name for c in taken[-3:]]
    # history before the oldest live cut was released, and every live cut is restorable
    assert undo.horizon("m") == live[0].seq and all(reg.restorable(c) for c in live)
    assert not reg.restorable(taken[0])
    assert reg.latest_before("m", 500.0).taken_at == 480.0
    assert reg.latest_before("m", 10.0) is None
    snap = reg.snapshot()["m"]
    assert len(snap) == 3 and all(s["restorable"] for s in snap)


def test_registry_named_cuts():
    reg = CutRegistry(CutPolicy(max_named=2))
    reg.take("m", "a", 1.0, {}, 1)
    with pytest.raises(UsageError):
        reg.take("m", "a", 2.0, {}, 2)
    with pytest.raises(UsageError):
        reg.take("m", "auto-5", 2.0, {}, 2)
    reg.take("m", "b", 2.0, {}, 2)
    reg.take("m", "c", 3.0, {}, 3)
    assert [c.name for c in reg.cuts("m")] == ["b", "c"] and reg.get("m", "c").seq == 3
    reg.drop("m", "b")
    assert reg.oldest_seq("m") == 3
    with pytest.raises(UsageError):
        reg.get("m", "b")
    with pytest.raises(UsageError):
        reg.restorable(reg.get("m", "c"))      # no undo history attached


def _result(ids, counter, origin=1):
    from ekko.core.store import ApplyResult
    ids = np.asarray(ids, np.int64)
    return ApplyResult(ids, np.full(len(ids), pack(counter + 1, origin)), np.full(len(ids), pack(counter, origin)),
                       np.zeros((len(ids), 4), np.float32))


# -- fences -------------------------------------------------------------------------------
def brute_fenced(ranges, table, row, version) -> bool:
    o, c = int(origins_of(version)), int(counters_of(version))
    for lower, upper, shard_rows in ranges:
        shard = row // shard_rows[table] if table in shard_rows else 0
        lo = lower.get((table, shard), Knowledge())[o]
        if o in upper and lo < c <= upper[o]:
            return True
    return False


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.dictionaries(st.integers(0, 3), st.dictionaries(st.integers(1, 4), st.integers(1, 40),
                                                                              max_size=3), max_size=4),
                          st.dictionaries(st.integers(1, 4), st.integers(0, 60), max_size=4)),
                min_size=1, max_size=3),
       st.lists(st.tuples(st.sampled_from(["t", "u"]), st.integers(0, 63), st.integers(0, 70), st.integers(1, 5)),
                max_size=50))
def test_fence_mask_matches_brute_force(ranges, updates):
    fence = Fence()
    ref = []
    for i, (per_shard, upper) in enumerate(ranges):
        knowledge = {("t", s): Knowledge(k) for s, k in per_shard.items()}
        fence.add(SPEC, Cut(f"c{i}", "m", 0.0, knowledge, 0), upper)
        ref.append((knowledge, upper, {"t": 16, "u": 10}))
    for table in ("t", "u"):
        sel = [u for u in updates if u[0] == table]
        ids = np.array([u[1] % SPEC.table(table).rows for u in sel], np.int64)
        versions = np.array([pack(u[2], u[3]) for u in sel], np.int64)
        got = fence.mask("m", table, ids, versions)
        assert got.tolist() == [brute_fenced(ref, table, i, v) for i, v in zip(ids.tolist(), versions.tolist())]
    assert not fence.mask("other", "t", np.array([1]), np.array([pack(5, 1)])).any()
    again = Fence.from_wire(wire(fence.to_wire()))
    assert again.to_wire() == fence.to_wire() and len(again) == len(fence)
    assert fence.merge(again) == 0           # idempotent union


def _bad_fences():
    good = Fence()
    good.add(SPEC, sample_cut(), {1: 20})
    r = good.to_wire()[0]
    def variant(**kw):
        d = dict(r)
        d.update(kw)
        return [d]
    return [
        "x", [1] * 1025, [r, "x"], variant(model="no way"), variant(cut=""), variant(upper="x"),
        variant(upper=[[-1, 3]]), variant(upper=[[1, 3], [1, 4]]), variant(upper=[[1, -3]]), variant(upper=[[1]]),
        variant(shard_rows=[["t", 0]]), variant(shard_rows=[["t", 16], ["t", 16]]), variant(shard_rows="x"),
        variant(shard_rows=[["t"]]), variant(lower=[["t", 0, [[1, "a"]]]]), [{k: v for k, v in r.items() if k != "upper"}],
    ]


@pytest.mark.parametrize("data", _bad_fences())
def test_fence_from_wire_rejects_bad_input(data):
    with pytest.raises(ProtocolError):
        Fence.from_wire(data)


def test_fence_add_checks_and_retire():
    fence = Fence()
    with pytest.raises(UsageError):
        fence.add(ModelSpec("other", tables=[TableSpec("t", rows=4, dim=1)]), sample_cut(), {1: 5})
    with pytest.raises(UsageError):
        fence.add(SPEC, sample_cut(), {-1: 5})
    rng = fence.add(SPEC, sample_cut(), Knowledge({1: 20}))
    assert isinstance(rng, FenceRange) and fence.ranges("m") == [rng]
    assert fence.mask("m", "t", np.array([0]), np.array([pack(15, 1)])).tolist() == [True]
    fence.retire("m", "before-bad")
    assert fence.mask("m", "t", np.array([0]), np.array([pack(15, 1)])).tolist() == [False]


# -- end to end ---------------------------------------------------------------------------
class Replica:
    """A store, its undo history, apply seq and per-shard knowledge: the parts a node wires together."""

    def __init__(self) -> None:
        self.spec = SPEC.table("t")
        self.store = TableStore(self.spec, device="cpu")
        self.undo = UndoHistory(max_bytes=1 << 20)
        self.seq = 0
        self.knowledge = {("t", s): Knowledge() for s in range(self.spec.num_shards)}
        self.fence = Fence()

    def receive(self, d: Delta) -> int:
        keep = ~self.fence.mask("m", "t", d.ids, d.versions)
        d = Delta(d.model, d.table, d.ids[keep], d.versions[keep], d.values[keep])
        self.seq += 1
        r = self.store.apply(d, capture_old=True)
        self.undo.record("m", "t", self.seq, r)
        for i, v in zip(d.ids.tolist(), d.versions.tolist()):
            self.knowledge[("t", self.spec.shard_of(i))].advance(int(origins_of(v)), int(counters_of(v)))
        return len(r)

    def cut(self, name: str) -> Cut:
        return Cut(name, "m", 0.0, self.knowledge, self.seq + 1)

    def rollback(self, cut: Cut, rollback_point: dict[int, int], fused: bool = False) -> np.ndarray:
        covered = cut.covered_fn(self.spec)
        rows = cut.rows_to_restore(self.spec, self.store.versions)
        self.seq += 1
        if fused:
            outcome = self.undo.restore_at_cut("m", "t", self.store, rows, covered, seq=self.seq)
            assert outcome.restored == len(rows) and len(outcome.incomplete) == 0
        else:
            ids, versions, values, complete = self.undo.values_at_cut("m", "t", rows, covered)
            assert complete.all()
            self.undo.record("m", "t", self.seq, capture_before_restore(self.store, ids, versions))
            self.store.restore_rows(ids, versions, values)
        self.fence.add(SPEC, cut, rollback_point)
        self.knowledge = {k: kn.copy() for k, kn in cut.knowledge.items()}
        return rows


def deltas(rng, origin, first_counter, n_deltas, rows=8):
    out, c = [], first_counter
    for _ in range(n_deltas):
        ids = rng.choice(64, rows, replace=False).astype(np.int64)
        out.append(Delta("m", "t", ids, np.array([pack(c + i, origin) for i in range(rows)], np.int64),
                         rng.standard_normal((rows, 4)).astype(np.float32)))
        c += rows
    return out


def test_two_replicas_roll_back_to_one_cut_exactly_and_fenced_updates_never_return():
    rng = np.random.default_rng(42)
    good = deltas(rng, 1, 1, 6) + deltas(rng, 2, 1, 4)
    bad = deltas(rng, 1, 100, 5) + deltas(rng, 2, 100, 3)      # rows overlap good ones and each other
    later = deltas(rng, 1, 500, 3)
    a, b, ref = Replica(), Replica(), Replica()
    for d in good:
        a.receive(d), b.receive(d), ref.receive(d)
    cut = a.cut("before-bad")
    for d in bad:
        a.receive(d)
    for d in reversed(bad):            # b sees the bad updates in another order
        b.receive(d)
    point = {1: 100 + 5 * 8, 2: 100 + 3 * 8}     # the publishers' clocks at the rollback
    restored = {"a": len(a.rollback(cut, point)), "b (fused)": len(b.rollback(cut, point, fused=True))}
    for r in (a, b):
        np.testing.assert_array_equal(r.store.versions, ref.store.versions)
        assert r.store.digest() == ref.store.digest()
    # replays of the rolled-back updates (a late peer, a retrying publisher) are all refused
    for d in bad:
        assert a.receive(d) == 0 and b.receive(d) == 0
    assert a.store.digest() == ref.store.digest()
    # later updates apply normally
    for d in later:
        a.receive(d), b.receive(d), ref.receive(d)
    assert a.store.digest() == b.store.digest() == ref.store.digest()
    # a fence travels: a fresh replica given a's fence refuses the bad updates too
    c = Replica()
    c.fence = Fence.from_wire(wire(a.fence.to_wire()))
    assert all(c.receive(d) == 0 for d in bad)
    print(f"\n[cuts] rolled back rows: {restored}; bit-identical to a replica that never saw the bad updates")
    # a second rollback, to an earlier cut, walks back through the first restore
    first = Cut("start", "m", 0.0, {}, 0)
    a.rollback(first, {1: 600, 2: 600})
    b.rollback(first, {1: 600, 2: 600}, fused=True)
    for r in (a, b):
        assert not r.store.versions.any() and not r.store.values.any()
