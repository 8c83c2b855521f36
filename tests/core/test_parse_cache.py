"""The simulator's shared parse of fanned-out pushes: hits only for the very same payload
at a receiver that resolves the same specs, and nobody can write the shared arrays."""

import numpy as np
import pytest

from ekko.core.codec import Frame, MsgType, delta_to_wire
from ekko.core.delta import Delta
from ekko.replica.node import ReplicaNode
from ekko.core.parse_cache import ParseCache
from ekko.core.spec import ModelSpec, TableSpec
from ekko.core.version import pack

SPEC = ModelSpec("m", [TableSpec("t", rows=64, dim=4, shards=4)])


def node(nid, cache, spec=SPEC, with_values=True):
    n = ReplicaNode(nid, "dc0", nid, device="cpu", with_values=with_values)
    n.register_model(spec, 0.0)
    n.parse_cache = cache
    return n


def push_body(rows=8, counter=10):
    ids = np.arange(rows, dtype=np.int64)
    d = Delta("m", "t", ids, np.full(rows, pack(counter, 3)), np.ones((rows, 4), np.float32))
    return {"from": "x", "dc": "dc1", "deltas": [delta_to_wire(d)]}


def test_one_payload_is_parsed_once_for_every_receiver():
    cache = ParseCache()
    body = push_body()
    nodes = [node(f"r{i}", cache) for i in range(5)]
    for n in nodes:
        n.receive(Frame(MsgType.PUSH, dict(body)), 1.0, "x")   # a new body map, the same deltas list
    assert (cache.misses, cache.hits) == (1, 4)
    for n in nodes:
        assert (n.table_store("m", "t").versions[:8] == pack(10, 3)).all()


def test_another_list_another_spec_or_values_mode_parses_afresh():
    cache = ParseCache()
    body = push_body()
    node("a", cache).receive(Frame(MsgType.PUSH, body), 1.0, "x")
    node("b", cache).receive(Frame(MsgType.PUSH, push_body()), 1.0, "x")         # equal, not the same
    other = ModelSpec("m", [TableSpec("t", rows=64, dim=4, shards=4)])            # equal, not the same
    node("c", cache, spec=other).receive(Frame(MsgType.PUSH, body), 1.0, "x")
    node("d", cache, with_values=False).receive(Frame(MsgType.PUSH, body), 1.0, "x")
    assert (cache.misses, cache.hits) == (4, 0)


def test_shared_arrays_are_read_only_and_a_bad_payload_is_refused_at_every_receiver():
    cache = ParseCache()
    body = push_body()
    node("a", cache).receive(Frame(MsgType.PUSH, body), 1.0, "x")
    (deltas, *_rest) = next(iter(cache._d.values()))[3]
    with pytest.raises(ValueError):
        deltas[0].ids[0] = 5
    bad = push_body()
    bad["deltas"][0]["n"] = 9   # wrong length: refused, and a refusal is never cached
    for nid in ("b", "c"):
        n = node(nid, cache)
        with pytest.raises(Exception):
            n.receive(Frame(MsgType.PUSH, bad), 1.0, "x")
        assert (n.table_store("m", "t").versions == 0).all()
