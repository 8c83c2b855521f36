"""``GET /v1/models/{model}/knowledge``: the read-only view the fault harness checks
(per-shard knowledge, waiting chains, rollback records with their cut and bounds)."""

from __future__ import annotations

import json

import numpy as np

from ekko.core.chain import PublisherChain
from ekko.core.codec import MsgType, encode_frame
from ekko.core.version import counters_of
from test_daemon import SPEC, make_client, post, publish_body, register


async def get_knowledge(client, model="ranker"):
    resp = await client.get(f"/v1/models/{model}/knowledge")
    return resp.status, json.loads(await resp.read())


async def test_knowledge_shows_chained_publishes_and_rollback_records(tmp_path):
    d, client = await make_client(tmp_path)
    rng = np.random.default_rng(3)
    pc = PublisherChain(origin=11)
    try:
        await register(client)
        for _ in range(2):
            ids = rng.choice(SPEC.table("emb").rows, 500, replace=False)
            f = publish_body(pc, "emb", ids, rng.standard_normal((500, 8)).astype(np.float32))
            assert (await post(client, "/v1/publish", encode_frame(MsgType.PUBLISH, f.body)))[0] == 200
            pc.acked(f)
        status, k = await get_knowledge(client)
        assert status == 200 and k["model"] == "ranker" and k["rollbacks"] == []
        emb = k["tables"]["emb"]
        assert len(emb) == SPEC.table("emb").num_shards
        # every shard knows origin 11 up to the greatest counter published there; no chain waits
        spec = SPEC.table("emb")
        for s, kv, pending in emb:
            in_shard = spec.shards_of(ids) == s
            want = int(counters_of(pc.versions_of(f)["emb"][in_shard]).max(initial=0))
            assert dict(map(tuple, kv)).get(11, 0) >= want and pending == 0, (s, kv, want)
        assert max(dict(map(tuple, kv)).get(11, 0) for _, kv, _ in emb) == f.last_counter

        status, _, _ = await post(client, "/v1/cuts", encode_frame(MsgType.CUT, {"model": "ranker", "name": "c1"}))
        assert status == 200
        status, _, _ = await post(client, "/v1/rollback", encode_frame(MsgType.ROLLBACK,
                                                                      {"model": "ranker", "cut": "c1"}))
        assert status == 200
        _, k = await get_knowledge(client)
        (rec,) = k["rollbacks"]
        assert rec["cut"]["name"] == "c1" and rec["upper"] and rec["cut"]["knowledge"]

        assert (await get_knowledge(client, "nope"))[0] == 404
    finally:
        await client.close()
