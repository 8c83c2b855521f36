"""The nemesis harness (bench/nemesis.py): its checker catches planted violations, and a
short seeded batch against real daemons (CI) finds none."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from ekko.core.version import pack

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("nemesis", REPO / "bench" / "nemesis.py")
nemesis = importlib.util.module_from_spec(_spec)
sys.modules["nemesis"] = nemesis
_spec.loader.exec_module(nemesis)

T = nemesis.SPEC.table("b")          # 2000 rows, 4 shards of 500
O1, O2 = 7, 9


def w(ids, counters, origin, values) -> "nemesis.Write":
    ids = np.asarray(ids, np.int64)
    return nemesis.Write(T.name, ids, np.array([pack(c, origin) for c in counters], np.int64),
                         np.asarray(values, np.float32).reshape(len(ids), T.dim))


def vals(*xs):
    return np.array([[x] * T.dim for x in xs], np.float32)


def replica(writes) -> tuple[np.ndarray, np.ndarray]:
    """A replica that applied ``writes`` in order, keeping the greatest version per row."""
    v = np.zeros(T.rows, np.int64)
    x = np.zeros((T.rows, T.dim), np.float32)
    for wr in writes:
        newer = wr.versions > v[wr.ids]
        v[wr.ids[newer]], x[wr.ids[newer]] = wr.versions[newer], wr.values[newer]
    return v, x


ACKED = [w([1, 2, 600], [10, 10, 10], O1, vals(1, 2, 3)), w([1, 3], [20, 20], O2, vals(4, 5))]


def check(acked, reads, doubt=(), records=()):
    return nemesis.check_rows(T, list(acked), list(doubt), list(records), reads)


def test_checker_passes_the_expected_state():
    v, x = replica(ACKED)
    assert check(ACKED, {"r1": (v, x), "r2": (v.copy(), x.copy())}) == []


def test_checker_catches_a_wrong_value_a_wrong_version_and_divergence():
    v, x = replica(ACKED)
    bad_x = x.copy()
    bad_x[3, 0] += 1e-3                      # one bit pattern off
    found = check(ACKED, {"r1": (v, x), "r2": (v, bad_x)})
    assert {f.invariant for f in found} == {"row-state", "convergence"}
    assert "row 3" in found[0].detail and "r2=(20,9)" in found[0].detail

    lost = replica(ACKED[:1])                 # the second acknowledged publish never arrived
    found = check(ACKED, {"r1": (v, x), "r2": lost})
    assert found[0].invariant == "row-state" and found[0].rows == 2  # rows 1 and 3

    # a corrupted reference (the harness's own bookkeeping) is caught just the same
    corrupted = [ACKED[0], w([1, 3], [21, 20], O2, vals(4, 5))]
    assert check(corrupted, {"r1": (v, x)})[0].invariant == "row-state"


def test_checker_models_rollback_fences():
    # cut: origin 7 known to 10 on shard 0, origin 9 to 0; rollback point 30 for every origin
    record = {"id": "x", "cut": {"knowledge": [[T.name, 0, [[O1, 10]]], [T.name, 1, [[O1, 10]]]]},
              "upper": [[0, 30]]}
    after = w([1, 600], [25, 25], O1, vals(8, 9))        # fenced: after the cut, before the point
    later = w([2], [40], O1, vals(7))                    # after the rollback point: stays
    acked = [*ACKED, after, later]
    want = replica([ACKED[0], later])                    # origin 9's counter 20 > its cut 0: fenced too
    assert check(acked, {"r1": want}, records=[record]) == []
    assert check(acked, {"r1": replica(acked)}, records=[record])[0].invariant == "row-state"


def test_checker_accepts_in_doubt_publishes_only_when_unfenced_and_greater():
    doubt = [w([5], [50], O1, vals(6))]
    present, absent = replica([*ACKED, *doubt]), replica(ACKED)
    assert check(ACKED, {"r1": present, "r2": present}, doubt) == []
    assert check(ACKED, {"r1": absent, "r2": absent}, doubt) == []
    record = {"id": "x", "cut": {"knowledge": []}, "upper": [[0, 60]]}
    fenced_expect = replica([])
    assert check(ACKED, {"r1": present}, doubt, [record])[0].invariant == "row-state"
    assert check(ACKED, {"r1": fenced_expect}, doubt, [record]) == []


def test_knowledge_gaps_name_replica_shard_and_origin():
    targets = nemesis.knowledge_targets(ACKED)
    assert targets[(T.name, 0, O2)] == 20 and targets[(T.name, 1, O1)] == 10
    view = {"tables": {T.name: [[0, [[O1, 10], [O2, 20]], 0], [1, [[O1, 9]], 0]]}}
    assert nemesis.knowledge_gaps(targets, {"r1": view}) == [f"r1 {T.name}/1 origin {O1}: knowledge 9 < acked 10"]


def test_schedule_is_a_function_of_the_seed():
    nodes = ["r1", "r2"]
    a = nemesis.make_schedule(5, 30, nodes)
    assert a == nemesis.make_schedule(5, 30, nodes) and a != nemesis.make_schedule(6, 30, nodes)
    down = [e for e in a if e.kind in ("kill", "stop", "revive")]
    assert all(x.kind != "revive" and y.kind == "revive" for x, y in zip(down[::2], down[1::2]))


#: fault-phase seconds of the CI batch (one seed): start-up, heal and checks add about a minute.
CI_DURATION_S = 15.0


@pytest.mark.slow
def test_short_seeded_batch_has_no_violations(tmp_path, capsys):
    res = nemesis.run_seed(seed=11, duration=CI_DURATION_S, workdir=tmp_path, keep=False, verbose=False)
    nemesis.report(res)
    assert res.acked > 0 and sum(res.faults.values()) > 0
    assert res.violations == [], capsys.readouterr().out
