"""The trainer's side of a rollback: cuts with trainer state, learning of rollbacks, restoring.

Against real in-process daemons (ekko.server.daemon.Daemon on loopback): a tracked
training loop takes a cut with its state, trains on, is rolled back; the next
publish raises RolledBack exactly once (or calls the callback), the tracker
restores module and optimizer bit for bit, and after training on the replicas
equal the module again.  Bad input (unknown cut, missing or foreign state file)
raises UsageError and changes nothing.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ekko.sdk.client import Client
from ekko.core.codec import MsgType
from ekko.core.errors import UsageError
from ekko.sdk.rollback_watch import RollbackEvent, RolledBack
from ekko.sdk.publisher import Publisher
from procs import get_json, post_frame, wait_for
from test_sdk_daemon import wait_converged
from test_sdk_server import RealDaemons
from test_tracking import Rec, step

MODEL = "rec"


def state_copy(model: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    mod = {k: v.detach().clone() for k, v in model.state_dict().items()}
    o = opt.state_dict()
    ost = {i: {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in s.items()}
           for i, s in o["state"].items()}
    return mod, ost


def same_state(model, opt, saved) -> bool:
    mod, ost = saved
    now = model.state_dict()
    if set(now) != set(mod) or not all(torch.equal(now[k].view(torch.uint8), mod[k].view(torch.uint8))
                                       for k in mod):
        return False
    o = opt.state_dict()["state"]
    if set(o) != set(ost):
        return False
    for i, s in ost.items():
        for k, v in s.items():
            w = o[i][k]
            if isinstance(v, torch.Tensor):
                if not torch.equal(w.to_dense() if w.is_sparse else w, v.to_dense() if v.is_sparse else v):
                    return False
            elif w != v:
                return False
    return True


def wait_joined(ds: RealDaemons) -> None:
    """Until every replica sees the others alive: a cut goes only to the peers live when it is taken."""
    def joined() -> bool:
        return all(sum(m.get("state") == "alive" for m in Client(ep).status(cluster=True).get("members", []))
                   >= len(ds.endpoints) for ep in ds.endpoints)
    wait_for(joined, 60, what="the replicas to see each other")


def raised_by(fn) -> RolledBack | None:
    try:
        fn()
    except RolledBack as rb:
        return rb
    return None


def train(model, opt, rng, tracker, steps=3):
    for _ in range(steps):
        step(model, opt, rng)
        tracker.publish()


def test_cut_restore_and_rollback_signal(tmp_path):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    with RealDaemons([("r1", "dc1"), ("r2", "dc2")], tmp_path) as ds:
        wait_joined(ds)
        model = Rec(sparse=True)
        opt = torch.optim.Adagrad(model.parameters(), lr=0.3)
        with Publisher(ds.endpoints[:1], origin="trainer", state_dir=tmp_path / "state", timeout=20) as pub:
            tracker = pub.track(model, model=MODEL, optimizer=opt)
            train(model, opt, rng, tracker)
            tc = tracker.cut("good", extra={"step": 3})
            assert tc.name == "good" and tc.path.endswith("trainer.cuts/rec/good.pt")
            at_cut = state_copy(model, opt)
            assert torch.load(tc.path, weights_only=True)["extra"] == {"step": 3}
            assert "good" in [c["name"] for c in Client(ds.endpoints[0]).cuts(MODEL)]

            train(model, opt, rng, tracker)          # the "harmful" steps
            assert not same_state(model, opt, at_cut)
            # Started at the replica that took the cut: a cut reaches peers by one best-effort
            # send, while rollback records are also gossiped, so r2 gets this one for sure.
            answer = Client(ds.endpoints[0]).rollback(MODEL, "good")
            wait_for(lambda: answer["id"] in [r["id"] for r in get_json(ds.endpoints[0], f"/v1/models/{MODEL}/rollbacks")
                                              ["rollbacks"]], 30, what="the record to reach r1")
            # The next publish learns of it from its acknowledgement: raised once, after the ack.
            step(model, opt, rng)
            with pytest.raises(RolledBack) as ei:
                tracker.publish()
            rb = ei.value
            assert (rb.model, rb.cut, rb.rollback_id) == (MODEL, "good", answer["id"])
            assert rb.state_path == tc.path and rb.incident is None and rb.point > 0
            got = tracker.restore(rb)
            assert got.name == "good" and same_state(model, opt, at_cut), "module and optimizer back bit for bit"
            train(model, opt, rng, tracker)          # no second RolledBack for the same rollback
            pub.check_rollbacks(MODEL, poll=True)
            # Resumed training with new versions: every replica equals the module again.
            wait_converged(ds.endpoints, MODEL, model)
            seen = json.loads((tmp_path / "state" / "trainer.rollbacks.json").read_text())["seen"]
            assert seen == {MODEL: [f"{answer['id']}@good"]}
        # A restarted trainer (same origin and state) is not told again.
        model2 = Rec(sparse=True)
        model2.load_state_dict(model.state_dict())
        with Publisher(ds.endpoints[:1], origin="trainer", state_dir=tmp_path / "state", timeout=20) as pub:
            tracker = pub.track(model2, model=MODEL, publish_initial=False)
            step(model2, torch.optim.Adagrad(model2.parameters(), lr=0.3), rng)
            tracker.publish()
            assert pub.check_rollbacks(MODEL, poll=True) == []


def test_callback_watch_and_first_connect(tmp_path):
    torch.manual_seed(1)
    rng = np.random.default_rng(1)
    with RealDaemons([("r1", "dc1")], tmp_path) as ds:
        model = Rec(sparse=True)
        opt = torch.optim.Adagrad(model.parameters(), lr=0.3)
        with Publisher(ds.endpoints, origin="t1", state_dir=tmp_path / "s1", timeout=20) as pub:
            tracker = pub.track(model, model=MODEL, optimizer=opt)
            train(model, opt, rng, tracker, 2)
            tracker.cut("c1")
            train(model, opt, rng, tracker, 2)
            calls: list[RollbackEvent] = []
            pub.on_rollback(calls.append)
            Client(ds.endpoints[0]).rollback(MODEL, "c1")
            # Not publishing: a poll (or the background watch) learns of it; the callback runs
            # on this thread instead of an exception.
            events = pub.check_rollbacks(MODEL, poll=True)
            assert [e.cut for e in events] == ["c1"] and calls == events
            assert pub.check_rollbacks(MODEL, poll=True) == [] and len(calls) == 1
            tracker.restore(calls[0])
            train(model, opt, rng, tracker, 1)
            wait_converged(ds.endpoints, MODEL, model)

        # A new trainer (its own origin and state) is not told of rollbacks from before it started.
        model3 = Rec(sparse=True)
        opt3 = torch.optim.Adagrad(model3.parameters(), lr=0.3)
        with Publisher(ds.endpoints, origin="t2", state_dir=tmp_path / "s2", timeout=20) as pub:
            tracker = pub.track(model3, model=MODEL, optimizer=opt3)
            train(model3, opt3, rng, tracker, 2)
            assert pub.check_rollbacks(MODEL, poll=True) == []
            # ... but of one that happens now, through the watch, exactly once.
            tracker.cut("c2")
            pub.watch_rollbacks(MODEL, interval=0.1)
            Client(ds.endpoints[0]).rollback(MODEL, "c2")
            import time
            deadline = time.monotonic() + 20
            while not pub._core.rollbacks.pending(MODEL):
                assert time.monotonic() < deadline, "the watch did not see the rollback"
                time.sleep(0.05)
            with pytest.raises(RolledBack) as ei:
                tracker.publish()          # raised before anything is collected
            assert ei.value.cut == "c2"
            tracker.restore(ei.value)
            tracker.publish()


def test_bad_input_changes_nothing(tmp_path):
    torch.manual_seed(2)
    rng = np.random.default_rng(2)
    with RealDaemons([("r1", "dc1")], tmp_path) as ds:
        model = Rec(sparse=True)
        opt = torch.optim.Adagrad(model.parameters(), lr=0.3)
        with Publisher(ds.endpoints, origin="t", state_dir=tmp_path / "s", timeout=20) as pub:
            tracker = pub.track(model, model=MODEL, optimizer=opt)
            train(model, opt, rng, tracker, 2)
            tc = tracker.cut("c1")
            pub.cut(MODEL, "plain")                       # a cut without trainer state
            train(model, opt, rng, tracker, 2)
            before = state_copy(model, opt)
            pending = tracker.pending_rows()

            with pytest.raises(UsageError, match="no trainer state was saved with cut 'nope'"):
                tracker.restore("nope")
            with pytest.raises(UsageError, match="no trainer state was saved with cut 'plain'"):
                tracker.restore("plain")
            with pytest.raises(UsageError, match="path= and extra= need state="):
                pub.cut(MODEL, "x", path=tmp_path / "x.pt")
            with pytest.raises(UsageError, match="invalid cut name"):
                tracker.cut("bad name")
            # State of another module shape: refused before anything is copied.
            other = torch.nn.Linear(2, 2)
            pub.cut(MODEL, "other", state=(other, None))
            with pytest.raises(UsageError, match="does not fit the module"):
                tracker.restore("other")
            # A state file that went missing.
            import os
            os.unlink(tc.path)
            with pytest.raises(UsageError, match="is missing"):
                tracker.restore("c1")
            assert same_state(model, opt, before) and tracker.pending_rows() == pending
            # Module-level state through the publisher (no tracker): round trip.
            m2 = Rec(sparse=True)
            o2 = torch.optim.Adagrad(m2.parameters(), lr=0.1)
            saved = state_copy(m2, o2)
            name = pub.cut(MODEL, "m2", state=(m2, o2))
            torch.nn.init.normal_(m2.user.weight)
            pub.restore(MODEL, name, (m2, o2))
            assert same_state(m2, o2, saved)


def test_a_cut_waits_for_a_replica_that_holds_the_acknowledged_updates(tmp_path):
    with RealDaemons([("r1", "dc1")], tmp_path) as ds:
        model = Rec(sparse=True)
        with Publisher(ds.endpoints, origin="t", state_dir=tmp_path / "s", timeout=20) as pub:
            tracker = pub.track(model, model=MODEL)
            tracker.publish()
            heads = [[t, s, c] for (m, t, s), c in pub._core.chain.heads.items() if m == MODEL]
            addr = ds.endpoints[0]
            ok = {"origin": pub.origin, "heads": heads}
            # A new publisher's first frames leave a gap the replica closes by a probe: wait for it.
            status, ans = post_frame(addr, "/v1/cuts", MsgType.CUT,
                                     {"model": MODEL, "name": "a", "covers": ok, "wait_s": 30})
            assert status == 200, ans
            ahead = {"origin": pub.origin, "heads": [[t, s, c + 1000] for t, s, c in heads]}
            status, ans = post_frame(addr, "/v1/cuts", MsgType.CUT,
                                     {"model": MODEL, "name": "b", "covers": ahead, "wait_s": 0.3})
            assert status == 503 and ans["reason"] == "incomplete", ans
            for bad in ({"origin": "x", "heads": []}, {"origin": 1, "heads": [["nosuch", 0, 1]]}, [1]):
                status, ans = post_frame(addr, "/v1/cuts", MsgType.CUT, {"model": MODEL, "name": "c", "covers": bad})
                assert status == 400, ans
            assert [c["name"] for c in Client(addr).cuts(MODEL)] == ["a"]


def test_a_restarted_trainer_learns_of_a_rollback_while_it_was_away(tmp_path):
    torch.manual_seed(3)
    rng = np.random.default_rng(3)
    with RealDaemons([("r1", "dc1"), ("r2", "dc2")], tmp_path) as ds:
        wait_joined(ds)
        model = Rec(sparse=True)
        opt = torch.optim.Adagrad(model.parameters(), lr=0.3)
        with Publisher(ds.endpoints[:1], origin="t", state_dir=tmp_path / "s", timeout=20) as pub:
            tracker = pub.track(model, model=MODEL, optimizer=opt)
            train(model, opt, rng, tracker, 2)
            tracker.cut("c")
            at_cut = state_copy(model, opt)
            train(model, opt, rng, tracker, 3)
        Client(ds.endpoints[0]).rollback(MODEL, "c")       # while no trainer runs
        # A new process: same origin and state directory, the weights it had when it stopped.
        model2 = Rec(sparse=True)
        model2.load_state_dict(model.state_dict())
        opt2 = torch.optim.Adagrad(model2.parameters(), lr=0.3)
        opt2.load_state_dict(opt.state_dict())
        with Publisher(ds.endpoints[:1], origin="t", state_dir=tmp_path / "s", timeout=20) as pub:
            tracker = pub.track(model2, model=MODEL, optimizer=opt2, publish_initial=False)
            rb = wait_for(lambda: raised_by(lambda: pub.check_rollbacks(MODEL, poll=True)), 30,
                          what="the rollback record to reach r1")   # started at r2: it travels
            assert rb.cut == "c" and rb.state_path is not None
            tracker.restore(rb)             # another session's cut: every row is sent again
            assert same_state(model2, opt2, at_cut)
            train(model2, opt2, rng, tracker, 1)
            wait_converged(ds.endpoints, MODEL, model2)
            assert pub.check_rollbacks(MODEL, poll=True) == []
