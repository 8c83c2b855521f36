"""POST /v1/quality on an in-process daemon: validation, and the end-to-end automatic rollback.

A real daemon (aiohttp on loopback, real clock) receives quality reports showing a
5 % CTR degradation after a harmful publish, turns the model corrupted, rolls it
back by itself to the newest cut taken while healthy, and shows the incident in
/v1/status, /metrics and ``ekko status``.
"""

from __future__ import annotations

import io
import json
import random
import re
import time

import numpy as np
from rich.console import Console

from ekko.core.chain import PublisherChain
from ekko.cli.main import render_status
from ekko.core.codec import MsgType, encode_frame
from ekko.core.config import NodeConfig
from test_daemon import SPEC, _mutate, digests, make_client, metrics_text, post, publish_body, register, rejects

CFG = NodeConfig(snapshot_interval=0, quality_warmup_windows=20)
CTR = 0.04
N_ON, N_BASE = 200_000, 20_000


def sample(variant, value, count, model="ranker", metric="ctr"):
    return {"model": model, "variant": variant, "metric": metric, "value": value, "count": count}


async def report(client, rng, degrade):
    p = CTR * (1 - degrade)
    body = {"samples": [sample("baseline", rng.gauss(CTR, (CTR * (1 - CTR) / N_BASE) ** 0.5), N_BASE),
                        sample("online", rng.gauss(p, (p * (1 - p) / N_ON) ** 0.5), N_ON)]}
    status, raw, _ = await post(client, "/v1/quality", encode_frame(MsgType.QUALITY, body))
    assert status == 200, raw
    return json.loads(raw)


async def publish(client, pc, rng, n=2000):
    ids = rng.choice(5000, size=n, replace=False)
    frame = publish_body(pc, "emb", ids, rng.standard_normal((n, 8)).astype(np.float32))
    status, raw, _ = await post(client, "/v1/publish", encode_frame(MsgType.PUBLISH, frame.body))
    assert status == 200, raw
    pc.acked(frame)


async def publish_and_cut(client, pc, rng, cut: str) -> dict:
    """Register the model, publish one batch and take a cut; returns the digests at the cut."""
    await register(client)
    await publish(client, pc, rng)
    good = await digests(client)
    status, raw, _ = await post(client, "/v1/cuts", encode_frame(MsgType.CUT, {"model": "ranker", "name": cut}))
    assert status == 200, raw
    return good


async def test_bad_quality_reports_are_refused_and_change_nothing(tmp_path):
    d, client = await make_client(tmp_path, config=CFG)
    try:
        await register(client)
        good = sample("online", 0.04, 1000)
        cases = [
            ({**good, "variant": "shadow"}, 400), ({**good, "value": float("nan")}, 400),
            ({**good, "count": 0}, 400), ({**good, "count": -1}, 400), ({**good, "value": "0.04"}, 400),
            ({**good, "metric": "nosuch"}, 400), ({**good, "model": "nosuch"}, 404),
            ({k: v for k, v in good.items() if k != "count"}, 400),
            ({"samples": []}, 400), ({"samples": [good] * 1025}, 400),
            ({"samples": [good, {**good, "count": True}]}, 400),      # one bad sample: the batch is refused
        ]
        for body, want in cases:
            status, raw, _ = await post(client, "/v1/quality", encode_frame(MsgType.QUALITY, body))
            assert status == want, (body, raw)
            assert "error" in json.loads(raw)
        status, _, _ = await post(client, "/v1/quality", encode_frame(MsgType.CUT, good))
        assert status == 400
        assert d.node.quality.counters["samples"] == 0
        assert d.node.quality.detector.snapshot() == {}
        assert sum(v for (ep, _), v in rejects(await metrics_text(client)).items() if ep == "/v1/quality") == 12
        # Structurally mutated bodies: never a 500.
        rng = random.Random(9)
        for _ in range(200):
            try:
                frame = encode_frame(MsgType.QUALITY, _mutate({"samples": [good, dict(good)]}, rng))
            except (OverflowError, ValueError, TypeError):
                continue
            status, raw, _ = await post(client, "/v1/quality", frame)
            assert status < 500, raw
    finally:
        await client.close()


async def test_quality_degradation_rolls_back_to_the_healthy_cut(tmp_path, caplog):
    caplog.set_level("WARNING", logger="ekko.server.daemon")
    d, client = await make_client(tmp_path, config=CFG)
    rng = random.Random(5)
    nrng = np.random.default_rng(5)
    pc = PublisherChain(1)
    try:
        good = await publish_and_cut(client, pc, nrng, "validated")
        for _ in range(30):                      # warm-up and healthy windows
            ans = await report(client, rng, 0.0)
        assert ans["states"] == {"ranker": "healthy"} and ans["rollbacks"] == []
        await publish(client, pc, nrng)          # the harmful batch
        assert await digests(client) != good
        windows, started = 0, []
        while not started and windows < 200:
            ans = await report(client, rng, 0.05)
            started = ans["rollbacks"]
            windows += 1
        print(f"\ndaemon: 5% CTR degradation -> automatic rollback after {windows} windows")
        assert started == ["auto.ranker.1"]
        assert await digests(client) == good, "back at the cut"
        st = await (await client.get("/v1/status")).json()
        q = st["models"]["ranker"]["quality"]
        (inc,) = q["incidents"]
        assert inc["cut"] == "validated" and inc["metric"] == "ctr" and inc["effect"] > 0.02
        assert inc["restored_at"] is not None and inc["restore_s"] >= 0 and q["epoch"] == 1
        assert q["state"] == "healthy"           # restored: the statistic starts again
        logged = caplog.text
        assert "ranker CORRUPTED: incident ranker.1" in logged and "rolled back to cut validated" in logged
        text = await metrics_text(client)
        assert re.search(r'^ekko_model_incidents_total\{model="ranker"\} 1\.0$', text, re.M)
        assert re.search(r'^ekko_model_state\{model="ranker",state="healthy"\} 1\.0$', text, re.M)
        out = io.StringIO()
        render_status(st, Console(file=out, width=200))
        assert "incidents" in out.getvalue() and "validated" in out.getvalue()
        # Updates published after the rollback apply.
        await publish(client, pc, nrng, n=100)
        assert await digests(client) != good
    finally:
        await client.close()


async def test_a_rollback_now_fences_a_publish_whose_clock_runs_ahead(tmp_path):
    """A publisher's HLC runs ahead of wall time (256 rows per millisecond, or a clock a
    little fast): a rollback "now" must still fence its last publish.  With the wall clock
    alone as the rollback point, the rows stamped ahead of it stayed."""
    d, client = await make_client(tmp_path, config=CFG)
    nrng = np.random.default_rng(7)
    pc = PublisherChain(1)
    try:
        good = await publish_and_cut(client, pc, nrng, "c")
        ids = nrng.choice(5000, size=500, replace=False)
        ahead = pc.frame(SPEC, {"emb": (ids.astype(np.int64), nrng.standard_normal((500, 8)).astype(np.float32))},
                         now_ms=time.time() * 1000 + 2000)      # 2 s ahead: well inside the skew bound
        status, raw, _ = await post(client, "/v1/publish", encode_frame(MsgType.PUBLISH, ahead.body))
        assert status == 200, raw
        assert await digests(client) != good
        status, raw, _ = await post(client, "/v1/rollback", encode_frame(MsgType.ROLLBACK, {"model": "ranker",
                                                                                          "cut": "c"}))
        assert status == 200, raw
        assert await digests(client) == good
    finally:
        await client.close()
