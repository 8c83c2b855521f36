"""UndoHistory: restore targets against a brute-force replay, bounded bytes, spill, horizon."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ekko.core.delta import Delta
from ekko.core.errors import UsageError
from ekko.core.spec import TableSpec
from ekko.core.store import ApplyResult, TableStore
from ekko.core.version import Knowledge, pack
import rollback.undo as undo_mod
from rollback.cuts import Cut
from rollback.undo import UndoHistory, capture_before_restore

ROWS = 12
DIM = 3
ORIGINS = (1, 2, 3)


class Replay:
    """A store plus an UndoHistory, and a brute-force log of every row's states."""

    def __init__(self, history: UndoHistory, spec: TableSpec) -> None:
        self.spec = spec
        self.store = TableStore(spec, device="cpu")
        self.history = history
        self.seq = 0
        # per row: list of (version, value bytes, seq at which this state was overwritten or None)
        self.states: list[list[list]] = [[[0, np.zeros(DIM, np.float32), None]] for _ in range(spec.rows)]

    def _note(self, result: ApplyResult) -> None:
        for i, v in zip(result.ids.tolist(), result.versions.tolist()):
            self.states[i][-1][2] = self.seq
            self.states[i].append([v, self.store.values[i].numpy().copy(), None])

    def apply(self, ids: np.ndarray, versions: np.ndarray, values: np.ndarray) -> None:
        self.seq += 1
        r = self.store.apply(Delta("m", self.spec.name, ids, versions, values), capture_old=True)
        self.history.record("m", self.spec.name, self.seq, r)
        self._note(r)

    def restore_to_earlier_state(self, rows: list[int], picks: list[int]) -> None:
        """A restore (as a rollback writes it): rows go back to an earlier state, versions may drop."""
        self.seq += 1
        ids = np.array(rows, np.int64)
        targets = [self.states[r][p % len(self.states[r])] for r, p in zip(rows, picks)]
        versions = np.array([t[0] for t in targets], np.int64)
        values = np.stack([t[1] for t in targets]).astype(np.float32)
        r = capture_before_restore(self.store, ids, versions)
        self.store.restore_rows(ids, versions, values)
        self.history.record("m", self.spec.name, self.seq, r)
        self._note(r)

    def brute_force(self, row: int, covered) -> tuple[int, np.ndarray, int]:
        """Newest earlier state the cut covers: (version, value, seq of the record that holds it)."""
        for v, val, seq in reversed(self.states[row][:-1]):
            if v == 0 or covered(np.array([row]), np.array([v]))[0]:
                return v, (np.zeros(DIM, np.float32) if v == 0 else val), seq
        raise AssertionError("state 0 is always covered")


op = st.one_of(
    st.tuples(st.just("apply"), st.lists(st.integers(0, ROWS - 1), min_size=1, max_size=ROWS, unique=True),
              st.sampled_from(ORIGINS)),
    st.tuples(st.just("restore"), st.lists(st.integers(0, ROWS - 1), min_size=1, max_size=4, unique=True),
              st.lists(st.integers(0, 50), min_size=4, max_size=4)),
)
cut_knowledge = st.lists(st.fixed_dictionaries({o: st.integers(0, 60) for o in ORIGINS}), min_size=2, max_size=2)


def run_ops(replay: Replay, ops, rng: np.random.Generator) -> None:
    counter = 1
    for kind, rows, arg in ops:
        if kind == "apply":
            ids = np.array(rows, np.int64)
            versions = np.array([pack(counter + i, arg) for i in range(len(ids))], np.int64)
            counter += len(ids)
            replay.apply(ids, versions, rng.standard_normal((len(ids), DIM)).astype(np.float32))
        else:
            replay.restore_to_earlier_state(rows, arg)


def make_cut(knowledge) -> Cut:
    return Cut("c", "m", 0.0, {("t", s): Knowledge({o: c for o, c in k.items() if c}) for s, k in
                               enumerate(knowledge)}, seq=0)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(op, min_size=1, max_size=25), knowledge=cut_knowledge,
       mode=st.sampled_from(["memory", "tiny-blocks", "spill"]), seed=st.integers(0, 2**32 - 1),
       chunk_bytes=st.sampled_from([4 * DIM, 3 * 4 * DIM, 64 << 20]), direct_bytes=st.sampled_from([1, 16 << 20]))
def test_values_at_cut_matches_brute_force(ops, knowledge, mode, seed, chunk_bytes, direct_bytes, tmp_path_factory):
    spec = TableSpec("t", rows=ROWS, dim=DIM, shards=2)
    if mode == "memory":
        history = UndoHistory(max_bytes=1 << 30)
    elif mode == "tiny-blocks":   # many small records pooled per segment: a row repeats inside one
        history = UndoHistory(max_bytes=1 << 30, block_bytes=300)
    else:                          # almost everything spilled to disk, nothing discarded
        history = UndoHistory(max_bytes=200, spill_dir=tmp_path_factory.mktemp("spill"), block_bytes=150)
    replay = Replay(history, spec)
    run_ops(replay, ops, np.random.default_rng(seed))
    cut = make_cut(knowledge)
    covered = cut.covered_fn(spec)
    rows = np.flatnonzero(~covered(np.arange(ROWS), replay.store.versions) & (replay.store.versions > 0))
    rows = np.random.default_rng(seed).permutation(rows)
    ids, versions, values, complete = history.values_at_cut("m", "t", rows, covered)
    assert sorted(ids.tolist()) == sorted(rows.tolist())
    assert complete.all(), "nothing was discarded"
    assert history.horizon("m") == 0
    for i, row in enumerate(ids.tolist()):
        v, val, _ = replay.brute_force(row, covered)
        assert versions[i] == v
        np.testing.assert_array_equal(values[i], val)
    # the fused path writes the same state (into a copy of the store)
    twin = TableStore(spec, device="cpu")
    twin.versions[:] = replay.store.versions
    twin.values.copy_(replay.store.values)
    # tiny chunk / direct-write sizes so pooling, chunk boundaries and direct writes all occur
    saved = undo_mod.RESTORE_CHUNK_BYTES, undo_mod.RESTORE_DIRECT_BYTES
    undo_mod.RESTORE_CHUNK_BYTES, undo_mod.RESTORE_DIRECT_BYTES = chunk_bytes, direct_bytes
    try:
        outcome = history.restore_at_cut("m", "t", twin, rows, covered)
    finally:
        undo_mod.RESTORE_CHUNK_BYTES, undo_mod.RESTORE_DIRECT_BYTES = saved
    assert outcome.restored == len(rows) and len(outcome.incomplete) == 0
    # after restoring the targets every row holds a version the cut covers (or was never written)
    replay.store.restore_rows(ids, versions, values)
    np.testing.assert_array_equal(twin.versions, replay.store.versions)
    assert twin.digest() == replay.store.digest()
    v = replay.store.versions[rows]
    assert ((v == 0) | covered(rows, v)).all()
    history.close()


@settings(max_examples=100, deadline=None)
@given(ops=st.lists(op, min_size=1, max_size=30), knowledge=cut_knowledge, seed=st.integers(0, 2**32 - 1),
       budget=st.integers(0, 2000))
def test_discarded_history_is_reported_incomplete(ops, knowledge, seed, budget):
    spec = TableSpec("t", rows=ROWS, dim=DIM, shards=2)
    history = UndoHistory(max_bytes=budget, block_bytes=120)
    replay = Replay(history, spec)
    run_ops(replay, ops, np.random.default_rng(seed))
    assert history.stats()["memory_bytes"] <= budget
    covered = make_cut(knowledge).covered_fn(spec)
    rows = np.flatnonzero(~covered(np.arange(ROWS), replay.store.versions) & (replay.store.versions > 0))
    ids, versions, values, complete = history.values_at_cut("m", "t", rows, covered)
    horizon = history.horizon("m")
    outcome = history.restore_at_cut("m", "t", replay.store, rows, covered)
    assert sorted(outcome.incomplete.tolist()) == sorted(ids[~complete].tolist())
    assert outcome.restored == int(complete.sum())
    for i, row in enumerate(ids.tolist()):
        v, val, seq = replay.brute_force(row, covered)
        if complete[i]:
            assert versions[i] == v
            np.testing.assert_array_equal(values[i], val)
        else:
            # only history older than the horizon may be missing
            assert seq < horizon, (row, seq, horizon)
            assert versions[i] == 0 and not values[i].any()


def _result(ids, new, old, dim=DIM, fill=0.0):
    ids = np.asarray(ids, np.int64)
    return ApplyResult(ids, np.asarray(new, np.int64), np.asarray(old, np.int64),
                       np.full((len(ids), dim), fill, np.float32))


def test_bounded_bytes_spill_and_reload(tmp_path):
    row_bytes = 8 + 8 + 4 * 64
    h = UndoHistory(max_bytes=100 * row_bytes, spill_dir=tmp_path / "spill", block_bytes=20 * row_bytes)
    for seq in range(1, 51):
        ids = np.arange(10) + 10 * (seq % 7)
        h.record("m", "t", seq, ApplyResult(ids, np.full(10, pack(seq + 1, 1)), np.full(10, pack(seq, 1)),
                                            np.full((10, 64), seq, np.float32)))
        assert h.stats()["memory_bytes"] <= 100 * row_bytes
    s = h.stats()
    print(f"\n[undo] after 50 records of 10 rows: {s}")
    assert s["spilled_segments"] > 0 and s["spilled_bytes"] > 0 and h.horizon("m") == 0
    assert any(os.scandir(tmp_path / "spill"))
    # rows 0..9 were overwritten at seq 7, 14, ..., 49, each record's old version has counter seq;
    # a cut covering counters <= 8 finds the seq-7 record's old state, which is on disk by now
    ids, versions, values, complete = h.values_at_cut("m", "t", np.arange(10), lambda i, v: (v >> 16) <= 8)
    assert complete.all() and (versions == pack(7, 1)).all() and (values == 7).all()
    # far back: covered counter <= 1 needs seq 0's state, which was never recorded (seq starts at 1)
    ids, versions, values, complete = h.values_at_cut("m", "t", np.arange(10), lambda i, v: (v >> 16) <= 1)
    assert not complete.any()
    h.close()
    assert not any(os.scandir(tmp_path / "spill"))


def test_discard_moves_horizon_and_forget_before():
    record_bytes = 8 + 8 + 4 * DIM + 16
    h = UndoHistory(max_bytes=5 * record_bytes, block_bytes=1)
    for seq in range(1, 21):
        h.record("m", "t", seq, _result([seq], [pack(seq, 1)], [0]))
    assert h.horizon("m") == 16 and h.stats()["memory_bytes"] <= 5 * record_bytes
    ids, versions, _, complete = h.values_at_cut("m", "t", np.array([1, 20]), lambda i, v: np.zeros(len(v), bool))
    assert dict(zip(ids.tolist(), complete.tolist())) == {1: False, 20: True}
    h.forget_before("m", 19)
    assert h.horizon("m") == 19 and h.stats()["segments"] == 2
    assert h.stats()["memory_bytes"] == 2 * record_bytes
    h.forget_before("m", 5)     # never moves back
    assert h.horizon("m") == 19
    h.record("other", "t", 21, _result([1], [pack(21, 1)], [0]))
    assert h.horizon("other") == 0


def test_newest_covered_wins_inside_one_segment_and_across_tables():
    h = UndoHistory(max_bytes=1 << 20)      # everything pools into one segment
    h.record("m", "t", 1, _result([4, 5], [pack(10, 1), pack(10, 1)], [0, 0], fill=0))
    h.record("m", "u", 1, _result([4], [pack(10, 1)], [0], fill=0))
    h.record("m", "t", 2, _result([4], [pack(20, 1)], [pack(10, 1)], fill=1))
    h.record("m", "t", 3, _result([4], [pack(30, 1)], [pack(20, 1)], fill=2))
    cov = lambda i, v: (v >> 16) <= 25      # noqa: E731
    ids, versions, values, complete = h.values_at_cut("m", "t", np.array([4]), cov)
    assert versions.tolist() == [pack(20, 1)] and values[0].tolist() == [2.0] * DIM and complete.all()
    ids, versions, values, complete = h.values_at_cut("m", "u", np.array([4]), cov)
    assert versions.tolist() == [0] and not values.any() and complete.all()


def test_sorted_locator_for_huge_sparse_tables():
    h = UndoHistory(max_bytes=1 << 20)
    big = 1_500_000_000
    h.record("m", "t", 1, _result([3, big], [pack(5, 1)] * 2, [pack(1, 1), pack(2, 1)], fill=7))
    ids, versions, values, complete = h.values_at_cut("m", "t", np.array([big, 3]), lambda i, v: v > 0)
    assert dict(zip(ids.tolist(), versions.tolist())) == {big: pack(2, 1), 3: pack(1, 1)} and complete.all()
    with pytest.raises(UsageError):
        h.values_at_cut("m", "t", np.array([big, big]), lambda i, v: v > 0)
    with pytest.raises(UsageError):
        h.values_at_cut("m", "t", np.array([3, 3]), lambda i, v: v > 0)


def test_metadata_mode_and_misuse():
    h = UndoHistory(max_bytes=1 << 20)
    h.record("m", "t", 1, ApplyResult(np.array([2]), np.array([pack(3, 1)]), np.array([pack(1, 1)])))
    ids, versions, values, complete = h.values_at_cut("m", "t", np.array([2]), lambda i, v: v > 0)
    assert values is None and versions.tolist() == [pack(1, 1)] and complete.all()
    with pytest.raises(UsageError):   # values on one apply and not on another
        h.record("m", "t", 2, _result([2], [pack(4, 1)], [pack(3, 1)]))
    with pytest.raises(UsageError):
        h.record("m", "t", 1, ApplyResult(np.array([2]), np.array([pack(5, 1)]), np.array([pack(4, 1)])))
    # an unknown table: nothing restorable, caller repairs from peers
    ids, versions, values, complete = h.values_at_cut("m", "nope", np.array([1, 2]), lambda i, v: v > 0)
    assert not complete.any() and values is None
