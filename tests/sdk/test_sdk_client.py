"""ekko.sdk.client.Client against the real daemon (in-process) and the stand-in (for draining)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ekko.sdk.client import READ_BATCH_IDS, Client, Unreachable
from ekko.core.errors import RemoteError, UsageError
from ekko.sdk.publisher import Publisher
from ekko.core.spec import ModelSpec, TableSpec
from test_sdk import dead_endpoint
from test_sdk_server import FakeDaemon, RealDaemons

SPEC = ModelSpec("ranker", [
    TableSpec("f32", rows=10000, dim=4, shards=4),
    TableSpec("f16", rows=50, dim=3, dtype="float16"),
    TableSpec("bf16", rows=50, dim=3, dtype="bfloat16"),
    TableSpec("f64", rows=50, dim=2, dtype="float64"),
])


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    with RealDaemons([("r1", "dc1")], tmp_path_factory.mktemp("client")) as ds:
        yield ds


@pytest.fixture(scope="module")
def published(daemon, tmp_path_factory):
    """Every table written once through the SDK: {table: (ids, values tensor, versions)}."""
    out = {}
    gen = torch.Generator().manual_seed(0)
    with Publisher(daemon.endpoints, origin="client-test", state_dir=tmp_path_factory.mktemp("state")) as p:
        p.register(SPEC)
        for t in SPEC.tables:
            n = min(t.rows, 6000)
            ids = torch.randperm(t.rows, generator=gen)[:n]
            dt = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                  "float64": torch.float64}[t.dtype]
            vals = torch.randn(n, t.dim, generator=gen, dtype=torch.float64).to(dt)
            ack = p.publish(SPEC.name, t.name, ids, vals)
            out[t.name] = (ids.numpy(), vals, ack.versions[t.name])
    return out


@pytest.mark.parametrize("table", [t.name for t in SPEC.tables])
def test_read_rows_and_versions_every_dtype(daemon, published, table):
    c = Client(daemon.endpoints[0])
    ids, vals, vers = published[table]
    got = c.read_rows("ranker", table, ids)
    assert got.dtype == vals.dtype and got.shape == vals.shape
    assert torch.equal(got.view(torch.uint8), vals.view(torch.uint8))    # bit for bit
    assert np.array_equal(c.read_versions("ranker", table, torch.from_numpy(ids)), vers)


def test_large_read_is_batched(daemon, published):
    assert len(published["f32"][0]) > READ_BATCH_IDS
    ids = np.arange(10000)
    r = Client(daemon.endpoints[0]).read("ranker", "f32", ids)
    assert r.values.shape == (10000, 4) and len(r.versions) == 10000
    written = set(published["f32"][0].tolist())
    assert ((r.versions > 0) == np.array([i in written for i in range(10000)])).all()


def test_empty_read(daemon, published):
    r = Client(daemon.endpoints[0]).read("ranker", "f16", [])
    assert r.values.shape == (0, 3) and r.values.dtype == torch.float16 and len(r.versions) == 0


def test_status_and_health(daemon, published):
    c = Client(daemon.endpoints[0])
    st = c.status()
    assert st["node_id"] == "r1" and st["models"]["ranker"]["tables"]["f32"]["rows"] == 10000
    assert "members" not in st
    assert [m["node_id"] for m in c.status(cluster=True)["members"]] == ["r1"]
    assert c.healthz() is True


def test_remote_errors(daemon, published):
    c = Client(daemon.endpoints[0])
    with pytest.raises(RemoteError) as ei:
        c.read_rows("nope", "f32", [1])
    assert ei.value.status == 404 and "nope" in str(ei.value)
    with pytest.raises(RemoteError) as ei:
        c.read_rows("ranker", "f32", [10000])
    assert ei.value.status == 400
    with pytest.raises(RemoteError) as ei:
        c.register(ModelSpec("ranker", [TableSpec("f32", rows=1, dim=1)]))
    assert ei.value.status == 409
    assert c.register(SPEC) is False


def test_usage_errors_send_nothing(daemon):
    c = Client(daemon.endpoints[0])
    for bad in ([1.5], [[1]], [-1], torch.tensor([1.0])):
        with pytest.raises(UsageError):
            c.read_rows("ranker", "f32", bad)


def test_unreachable_and_draining():
    dead = Client(dead_endpoint(), timeout=2)
    assert dead.healthz() is False
    with pytest.raises(Unreachable):
        dead.status()
    with FakeDaemon() as srv:
        c = Client("http://" + srv.endpoint + "/")
        assert c.healthz() is True
        srv.draining = True
        assert c.healthz() is False
