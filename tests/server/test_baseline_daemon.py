"""Baseline pins and cuts through the HTTP API: pin, re-pin, unpin without a restart;
pins and cuts survive a restart."""

from __future__ import annotations

import json
import time

import numpy as np

from ekko.core.chain import PublisherChain
from ekko.core.codec import Keyring, MsgType, encode_frame
from ekko.core.config import NodeConfig
from ekko.server.persistence import BASELINE_FILE
from test_daemon import KEY, make_client, post, publish_body, register


async def _pin(client, cut: str, model: str = "ranker", keyring=None, t: MsgType = MsgType.BASELINE):
    status, body, _ = await post(client, f"/v1/models/{model}/baseline", encode_frame(t, {"cut": cut}, keyring))
    return status, json.loads(body)


async def _publish(d, client, pc, n: int, value: float) -> None:
    f = publish_body(pc, "emb", np.arange(n), np.full((n, 8), value, np.float32))
    status, body, _ = await post(client, "/v1/publish", encode_frame(MsgType.PUBLISH, f.body))
    assert status == 200, body
    pc.acked(f)


async def test_pin_repin_unpin_through_the_api_and_keep_the_pin_across_a_restart(tmp_path):
    d, client = await make_client(tmp_path)
    try:
        assert (await register(client))[0] == 200
        await _publish(d, client, PublisherChain(origin=3), 10, 1.0)
        d.node.take_cut("ranker", "c1", d.clock())
        before = time.time()
        assert (await _pin(client, "nope"))[0] == 404                   # unknown cut: refused, nothing pinned
        assert (await _pin(client, "c1", model="other"))[0] == 404
        assert (await _pin(client, "../x"))[0] == 400
        assert (await _pin(client, "c1", t=MsgType.CUT))[0] == 400       # wrong frame type
        assert d.node.baseline_pin == ""
        status, out = await _pin(client, "c1")
        assert status == 200 and out["cut"] == "c1" and out["previous"] == ""
        assert d.node.baseline_pin == "c1" and d.node.members.me.role == "baseline"
        st = await (await client.get("/v1/status")).json()
        assert st["baseline_pin"] == "c1"
        cuts = await (await client.get("/v1/models/ranker/cuts")).json()
        (c,) = cuts["cuts"]
        assert c["name"] == "c1" and c["pinned"] and not c["learnt"] and abs(c["taken_at"] - before) < 60
        assert json.loads((tmp_path / "r1" / BASELINE_FILE).read_text())["cut"] == "c1"
    finally:
        await client.close()
    # A restart keeps the pin (set through the API) and the cut (in the snapshot).
    d, client = await make_client(tmp_path)
    try:
        assert d.node.baseline_pin == "c1"
        cuts = (await (await client.get("/v1/models/ranker/cuts")).json())["cuts"]
        assert [c["name"] for c in cuts] == ["c1"] and cuts[0]["learnt"] and abs(cuts[0]["taken_at"] - c["taken_at"]) < 1e-3
        status, out = await _pin(client, "")
        assert status == 200 and out["previous"] == "c1" and d.node.baseline_pin == ""
        assert d.node.members.me.role == ""
    finally:
        await client.close()
    d, client = await make_client(tmp_path)
    try:
        assert d.node.baseline_pin == ""                                 # the unpin was kept too
    finally:
        await client.close()


async def test_a_changed_config_pin_wins_over_an_older_api_pin(tmp_path):
    d, client = await make_client(tmp_path)
    try:
        assert (await register(client))[0] == 200
        d.node.take_cut("ranker", "c1", d.clock())
        assert (await _pin(client, "c1"))[0] == 200
    finally:
        await client.close()
    cfg = NodeConfig(snapshot_interval=0, baseline_pin_cut="c9")
    d, client = await make_client(tmp_path, config=cfg)
    try:
        assert d.node.baseline_pin == "c9"
    finally:
        await client.close()


async def test_pinning_needs_a_peer_key_when_the_cluster_has_one(tmp_path):
    kr = Keyring.single(KEY)
    d, client = await make_client(tmp_path, key=kr)
    try:
        assert (await register(client, keyring=kr))[0] == 200
        d.node.take_cut("ranker", "c1", d.clock())
        assert (await _pin(client, "c1"))[0] == 401                      # unsigned
        assert (await _pin(client, "c1", keyring=Keyring.single(b"wrong-key-0123456")))[0] == 401
        assert d.node.baseline_pin == ""
        assert (await _pin(client, "c1", keyring=kr))[0] == 200
    finally:
        await client.close()


def test_cli_lists_cuts_and_pins(tmp_path, capsys):
    """``ekko cuts`` and ``ekko baseline`` against a stub that records the calls."""
    from ekko.cli import rollback as rollback_cli
    from ekko.cli.main import build_parser

    calls = []

    class Stub:
        def cuts(self, model):
            return [{"name": "c1", "taken_at": 1.7e9, "restorable": False, "learnt": True, "pinned": True,
                     "shards": 8}]

        def set_baseline(self, model, cut):
            calls.append((model, cut))
            return {"ok": True, "model": model, "cut": cut, "previous": "c0"}

    orig = rollback_cli._client
    rollback_cli._client = lambda args: Stub()
    try:
        p = build_parser()
        for argv in (["cuts", "--peer", "h:1", "--model", "m"], ["baseline", "--peer", "h:1", "--model", "m", "--pin", "c1"],
                     ["baseline", "--peer", "h:1", "--model", "m", "--unpin"]):
            args = p.parse_args(argv)
            assert args.func(args) == 0
    finally:
        rollback_cli._client = orig
    out = capsys.readouterr().out
    assert "c1" in out and "from peers" in out and "[baseline pin]" in out and "(learnt)" in out
    assert calls == [("m", "c1"), ("m", "")]
