"""ModelStateManager on synthetic quality streams: states, cut health, incidents, decisions."""

from __future__ import annotations

import random

import pytest

from ekko.core.errors import ProtocolError, UsageError
from rollback.detector import DetectorConfig, ModelState
from rollback.manager import (Incident, ManagerConfig, ModelStateManager, auto_rollback_id, cut_order_key,
                              merge_rollback_records)

BASE_CTR = 0.04
#: per-window noise of a CTR measured over N impressions: sqrt(p (1-p) / N).
ONLINE_N = 200_000
BASE_N = 20_000


def stream(mgr: ModelStateManager, rng: random.Random, t0: float, windows: int, degrade: float = 0.0,
           model: str = "m", eligible=None):
    """Binomial-noise CTR windows, one per second; online degraded by ``degrade`` (relative)."""
    out = []
    for i in range(windows):
        t = t0 + i
        base = rng.gauss(BASE_CTR, (BASE_CTR * (1 - BASE_CTR) / BASE_N) ** 0.5)
        p_on = BASE_CTR * (1 - degrade)
        online = rng.gauss(p_on, (p_on * (1 - p_on) / ONLINE_N) ** 0.5)
        mgr.observe(model, "baseline", "ctr", base, BASE_N, now=t)
        d = mgr.observe(model, "online", "ctr", online, ONLINE_N, now=t, eligible=eligible)
        if d is not None:
            out.append((t, d))
    return out


def make(seed=1, **kw):
    return ModelStateManager("r1", ManagerConfig(detector=DetectorConfig(warmup_windows=50), **kw)), \
        random.Random(seed)


def test_clean_stream_stays_healthy_and_cuts_are_healthy():
    mgr, rng = make()
    assert stream(mgr, rng, 0, 60) == []
    assert mgr.state("m") is ModelState.HEALTHY
    mgr.note_cut("m", "c1", now=60.0)
    assert stream(mgr, rng, 61, 300) == []
    assert mgr.state("m") is ModelState.HEALTHY
    assert mgr.cut_health("m") == [{"name": "c1", "known_at": 60.0, "state": "healthy", "tainted": False}]
    assert mgr.incidents("m") == []


def test_five_percent_degradation_rolls_back_to_newest_cut_before_the_onset():
    mgr, rng = make(seed=2)
    stream(mgr, rng, 0, 100)
    mgr.note_cut("m", "c-old", now=50.0)
    mgr.note_cut("m", "c-good", now=96.5)              # onset_margin_windows (2) before the onset
    onset = 100.0
    got = stream(mgr, rng, onset, 3, degrade=0.05)
    mgr.note_cut("m", "c-during", now=onset + 3.5)      # taken after the onset while still "healthy"
    got += stream(mgr, rng, onset + 4, 200, degrade=0.05)
    assert len(got) == 1, "one decision per incident"
    t, d = got[0]
    print(f"\n5% degradation detected {t - onset:.0f} windows after onset, onset estimated at "
          f"{d.incident.onset_at - onset:+.0f} windows")
    assert t - onset < 60
    assert d.cut == "c-good" and d.rollback_id == auto_rollback_id("m", 1)
    assert d.incident.metric == "ctr" and d.incident.effect > 0.02
    assert onset - 3 <= d.incident.onset_at <= t
    assert mgr.state("m") is ModelState.CORRUPTED
    health = {c["name"]: c for c in mgr.cut_health("m")}
    assert health["c-during"]["tainted"] and not health["c-good"]["tainted"]
    # The rollback restored the good parameters: back to healthy, the incident closed.
    inc = mgr.rollback_applied("m", d.rollback_id, "c-good", now=t + 2.0)
    assert inc is d.incident and inc.restored_at == t + 2.0 and inc.restore_s == pytest.approx(2.0)
    assert mgr.state("m") is ModelState.HEALTHY
    assert stream(mgr, rng, t + 3, 300) == []
    assert mgr.state("m") is ModelState.HEALTHY


def test_cut_taken_while_uncertain_or_corrupted_is_never_a_target():
    mgr, rng = make(seed=3)
    stream(mgr, rng, 0, 60)
    mgr.note_cut("m", "good", now=60.0)
    got = stream(mgr, rng, 61, 10)
    t = 71.0
    while mgr.state("m") is ModelState.HEALTHY and t < 400:
        got += stream(mgr, rng, t, 1, degrade=0.05)
        t += 1
    assert mgr.state("m") in (ModelState.UNCERTAIN, ModelState.CORRUPTED)
    mgr.note_cut("m", "while-bad", now=t)
    got += stream(mgr, rng, t + 1, 200, degrade=0.05)
    assert [d.cut for _, d in got] == ["good"]
    assert {c["name"]: c["state"] for c in mgr.cut_health("m")}["while-bad"] != "healthy"


def test_no_eligible_cut_records_an_incident_without_rollback():
    mgr, rng = make(seed=4)
    stream(mgr, rng, 0, 60)
    mgr.note_cut("m", "gone", now=60.0)
    got = stream(mgr, rng, 61, 10) + stream(mgr, rng, 71, 200, degrade=0.05, eligible=lambda name: False)
    assert got == []
    (inc,) = mgr.incidents("m")
    assert inc.cut is None and inc.rollback_id is None
    assert mgr.state("m") is ModelState.CORRUPTED
    assert mgr.counters["incidents_without_cut"] == 1
    # An operator rolls back by hand: the incident is closed with that rollback.
    mgr.rollback_applied("m", "r9.m.manual.1", "manual-cut", now=400.0)
    assert (inc.rollback_id, inc.cut, inc.restored_at) == ("r9.m.manual.1", "manual-cut", 400.0)
    assert mgr.state("m") is ModelState.HEALTHY


def test_auto_rollback_off_records_incident_only():
    mgr, rng = make(seed=5, auto_rollback=False)
    stream(mgr, rng, 0, 60)
    mgr.note_cut("m", "good", now=60.0)
    assert stream(mgr, rng, 61, 10) + stream(mgr, rng, 71, 200, degrade=0.05) == []
    assert mgr.incidents("m")[0].cut == "good"
    assert mgr.incidents("m")[0].rollback_id is None


def test_adopted_incident_prevents_a_second_one_and_taints_later_cuts():
    a, rng = make(seed=6)
    b = ModelStateManager("r2", ManagerConfig(detector=DetectorConfig(warmup_windows=50)))
    stream(a, rng, 0, 60)
    a.note_cut("m", "good", now=60.0)
    b.note_cut("m", "good", now=60.0)
    ((t, d),) = stream(a, rng, 61, 10) + stream(a, rng, 71, 200, degrade=0.05)
    wire = Incident.from_wire(d.incident.to_wire(), received_at=t + 0.5)
    assert b.adopt(wire) and not b.adopt(Incident.from_wire(d.incident.to_wire(), received_at=t + 1))
    assert b.epoch("m") == 1 and b.state("m") is ModelState.CORRUPTED
    b.rollback_applied("m", d.rollback_id, "good", now=t + 1.5)
    assert b.incidents("m")[0].restore_s == pytest.approx(1.0)
    assert b.state("m") is not ModelState.CORRUPTED


def test_bad_samples_are_refused_and_change_nothing():
    mgr, _ = make()
    for args in [("m", "shadow", "ctr", 0.1, 10), ("m", "online", "ctr", float("nan"), 10),
                 ("m", "online", "ctr", 0.1, 0), ("m", "online", "ctr", 0.1, -5), ("m", "online", "ctr", True, 5),
                 ("", "online", "ctr", 0.1, 5), ("m", "online", "nosuchmetric", 0.1, 5),
                 ("m", "online", "ctr", "0.1", 5), ("m" * 65, "online", "ctr", 0.1, 5)]:
        with pytest.raises(UsageError):
            mgr.observe(*args, now=0.0)
    assert mgr.counters["samples"] == 0 and mgr.snapshot() == {}


def test_incident_wire_is_validated():
    inc = Incident("m.1", "m", 1, "r1", 5.0, "ctr", 15.0, 0.05, 3.0, "c", "auto.m.1", 5.0)
    assert Incident.from_wire(inc.to_wire(), 5.0) == inc
    for bad in [None, {**inc.to_wire(), "epoch": 0}, {**inc.to_wire(), "id": "m.2"},
                {**inc.to_wire(), "at": float("inf")}, {k: v for k, v in inc.to_wire().items() if k != "metric"}]:
        with pytest.raises(ProtocolError):
            Incident.from_wire(bad, 0.0)


def test_merge_of_concurrent_records_is_order_independent():
    def rec(cut, top, upper, by):
        return {"id": "auto.m.1", "model": "m", "cut": {"name": cut, "knowledge": [["t", 0, [[1, top]]]]},
                "upper": upper, "incident": {"by": by, "cut": cut}}
    a, b, c = rec("c2", 20, [[1, 50]], "r1"), rec("c1", 10, [[1, 70], [2, 5]], "r2"), rec("c2", 20, [[1, 60]], "r3")
    ab_c = merge_rollback_records(merge_rollback_records(a, b), c)
    c_ba = merge_rollback_records(c, merge_rollback_records(b, a))
    assert ab_c == c_ba
    assert ab_c["cut"]["name"] == "c1" and ab_c["upper"] == [[1, 70], [2, 5]] and ab_c["incident"]["by"] == "r2"
    assert merge_rollback_records(a, a) == a
    assert cut_order_key(b["cut"]) < cut_order_key(a["cut"])


def test_merge_respects_the_wildcard_origin():
    # Origin 0 fences every origin a record does not name: an origin that only one record
    # names must not lose the other record's wildcard point (that would un-fence versions).
    cut = {"name": "c0", "model": "m", "knowledge": []}
    a = {"id": "x", "model": "m", "cut": cut, "upper": [[0, 10], [1, 10]]}
    b = {"id": "x", "model": "m", "cut": cut, "upper": [[0, 7], [2, 7]]}
    want = [[0, 10], [1, 10], [2, 10]]
    assert merge_rollback_records(a, b)["upper"] == want
    assert merge_rollback_records(b, a)["upper"] == want
