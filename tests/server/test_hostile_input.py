"""Hostile input at the HTTP API: garbage, forgeries and fuzzed requests at every handler.

* The acceptance test of issue #7: 40 seeded garbage bodies -- random bytes, truncated,
  bit-flipped and wrongly signed valid frames, huge declared lengths, zstd bombs, signed
  nonsense -- posted to ``/v1/publish`` and ``/v1/gossip`` each get a 4xx, and the
  digests do not change.
* Every route of ``Daemon._make_app`` fuzzed with hypothesis (generated bodies, paths and
  queries) and with a mutation fuzzer over valid requests (frames of every message type,
  GET URLs): never a 5xx, never an internal error, a rejected request changes nothing,
  and the daemon keeps serving.
* The node below the handlers: random bodies of every message type raise
  :class:`ProtocolError` or nothing -- no other exception escapes the receive path.

Seeded and fast (a few seconds): these run in CI.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import struct
import urllib.parse

import msgpack
import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ekko.core import read_auth
from ekko.core.chain import PublisherChain
from ekko.core.codec import (
    FLAG_BLAKE3,
    FLAG_MAC,
    FLAG_ZSTD,
    FORMAT_VERSION,
    HEADER,
    MAC_BYTES,
    MAGIC,
    Frame,
    Keyring,
    MsgType,
    decode_frame,
    encode_frame,
)
from ekko.core.config import preset
from ekko.core.errors import ProtocolError, UsageError
from ekko.replica.node import ReplicaNode
from ekko.core.version import HLC_EPOCH_MS
from test_daemon import KEY, SPEC, _mutate, _traffic_corpus, make_client, metrics_text, publish_body, register

#: garbage bodies of the acceptance test (each posted to both endpoints).
GARBAGE_BODIES = 40
#: hypothesis examples per fuzz test.
FUZZ_EXAMPLES = 200
#: hypothesis examples per wire decoder.
DECODER_EXAMPLES = 60
#: mutated valid requests per mutation-fuzz run.
MUTATIONS = 400

KR = Keyring.single(KEY)


def _header(msg_type: int, flags: int, key_id: int, length: int, version: int = FORMAT_VERSION) -> bytes:
    return HEADER.pack(MAGIC, version, msg_type, flags, key_id, 0, length)


def garbage_bodies(valid: list[bytes], seed: int = 7, n: int = GARBAGE_BODIES, keyed: bool = True
                   ) -> list[tuple[str, bytes]]:
    """``n`` seeded hostile bodies, every kind at least once.

    ``valid``: correct frames (signed with :data:`KR` when ``keyed``).  Without a cluster
    key nothing protects a frame's integrity (a flipped bit in a value is a valid
    publish of another value), so the unkeyed set leaves out bit flips and key mix-ups.
    """
    rng = random.Random(seed)
    stranger = Keyring({1: b"not-the-cluster-key"})
    other_id = Keyring({7: KEY})

    def random_bytes():
        return bytes(rng.getrandbits(8) for _ in range(rng.choice([0, 1, 11, 12, 13, 100, 2000])))

    def truncated():
        v = rng.choice(valid)
        return v[:rng.randrange(len(v))]

    def bit_flipped():
        b = bytearray(rng.choice(valid))
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        return bytes(b)

    def wrong_key():
        f = decode_frame(rng.choice(valid), KR)
        return encode_frame(f.msg_type, f.body, stranger)

    def unknown_key_id():
        f = decode_frame(rng.choice(valid), KR)
        return encode_frame(f.msg_type, f.body, other_id)

    def mac_stripped():
        v = rng.choice(valid)
        msg_type, flags, length = v[3], v[4] & ~(FLAG_MAC | FLAG_BLAKE3), struct.unpack_from("<I", v, 8)[0]
        return _header(msg_type, flags, 0, length) + v[12:12 + length]

    def huge_declared_length():
        length = rng.choice([2**32 - 1, 64 << 20, (64 << 20) + 1, 10**9])
        return _header(rng.choice([1, 3, 6]), FLAG_MAC, 1, length) + bytes(rng.randrange(64))

    def zstd_bomb():
        # a zstd frame that declares a terabyte of content, correctly signed: refused before allocating
        payload = bytearray(zstandard.ZstdCompressor().compress(b"\0" * 1000))
        fake = zstandard.ZstdCompressor(write_content_size=True).compress(b"x")
        payload = bytearray(fake[:4]) + bytes([0xE0]) + (1 << 40).to_bytes(8, "little") + bytes(payload[13:])
        if not keyed:
            return _header(MsgType.PUBLISH, FLAG_ZSTD, 0, len(payload)) + bytes(payload)
        header = _header(MsgType.PUBLISH, FLAG_ZSTD | FLAG_MAC, 1, len(payload))
        import hashlib
        import hmac
        return header + bytes(payload) + hmac.new(KEY, header + bytes(payload), hashlib.sha256).digest()

    def signed_nonsense():
        body = {rng.choice(["model", "origin", "deltas", "from", "k", "models", "spec", "x"]):
                rng.choice([None, -1, 2**63, "", "ranker", b"\xff" * 9, [], {}, [[1, 2]], 1.5]) for _ in range(4)}
        return encode_frame(rng.choice([MsgType.PUBLISH, MsgType.PUSH, MsgType.GOSSIP, MsgType.PULL_RESPONSE]),
                            body, KR if keyed else None)

    def bad_version_or_type():
        v = bytearray(rng.choice(valid))
        if rng.random() < 0.5:
            v[2] = rng.choice([0, FORMAT_VERSION + 1, 255])
        else:
            v[3] = rng.choice([0, 200, 255])
        return bytes(v)

    def trailing_bytes():
        return rng.choice(valid) + bytes(rng.randint(1, MAC_BYTES))

    kinds = [random_bytes, truncated, bit_flipped, wrong_key, unknown_key_id, mac_stripped, huge_declared_length,
             zstd_bomb, signed_nonsense, bad_version_or_type, trailing_bytes]
    if not keyed:
        kinds = [k for k in kinds if k not in (bit_flipped, wrong_key, unknown_key_id, mac_stripped)]
    return [(kinds[i % len(kinds)].__name__, kinds[i % len(kinds)]()) for i in range(n)]


async def _state(d, client) -> dict:
    """Everything a rejected request must leave alone."""
    st_ = await (await client.get("/v1/status", headers=read_auth.read_headers(d.keyring, "/v1/status"))).json()
    return {"digests": {m: {t: i.get("digest") for t, i in v["tables"].items()} for m, v in st_["models"].items()},
            "heads": {m: v["head"] for m, v in st_["models"].items()},
            "protocol": {m: d.node.export_state(m) for m in d.node.models},
            "versions": {m: {t: d.node.table_store(m, t).versions.tobytes() for t in (x.name for x in
                                                                                     d.node.spec(m).tables)}
                         for m in d.node.models},
            "cuts": {m: [c.name for c in d.node.cuts.cuts(m)] for m in d.node.models},
            "rollbacks": sorted(d.node.rollbacks), "fences": len(d.node.fence),
            "catalog": d.node.catalog_digest()}


def _internal_errors(text: str) -> list[str]:
    return re.findall(r"^ekko_internal_errors_total\{.*$", text, re.M)


# --------------------------------------------------------------------------- the acceptance test
@pytest.mark.parametrize("keyed", [True, False], ids=["cluster-key", "no-key"])
async def test_40_garbage_bodies_get_4xx_and_digests_do_not_change(tmp_path, keyed):
    kr = KR if keyed else None
    d, client = await make_client(tmp_path, key=kr)
    try:
        assert (await register(client, keyring=kr))[0] == 200
        pc = PublisherChain(origin=3)
        rng = np.random.default_rng(0)
        f = publish_body(pc, "emb", rng.choice(5000, 300, replace=False),
                         rng.standard_normal((300, 8)).astype(np.float32))
        publish = encode_frame(MsgType.PUBLISH, f.body, kr)
        resp = await client.post("/v1/publish", data=publish)
        assert resp.status == 200, await resp.text()
        pc.acked(f)
        f2 = publish_body(pc, "emb", np.arange(40), np.ones((40, 8), np.float32))
        push = encode_frame(MsgType.PUSH, {"from": "r9", "dc": "dc1", "deltas": f2.body["deltas"]}, kr)
        gossip = encode_frame(MsgType.GOSSIP, {"k": "g", "from": "r9", "mem": [], "cat": 0, "req": False}, kr)
        before = await _state(d, client)
        assert before["digests"]["ranker"]["emb"]

        bodies = garbage_bodies([publish, push, gossip], keyed=keyed)
        assert len(bodies) == GARBAGE_BODIES
        assert len({kind for kind, _ in bodies}) == (11 if keyed else 7)
        seen: dict[str, set[int]] = {}
        for path in ("/v1/publish", "/v1/gossip"):
            for kind, body in bodies:
                resp = await client.post(path, data=body)
                raw = await resp.read()
                assert 400 <= resp.status < 500, (path, kind, resp.status, raw[:200])
                js = json.loads(raw)
                assert js["error"] and js["reason"], (path, kind, js)
                seen.setdefault(kind, set()).add(resp.status)
        assert await _state(d, client) == before, "a garbage body changed the replica"
        assert seen["zstd_bomb"] == {413} and seen["huge_declared_length"] <= {400, 413}, seen
        if keyed:
            assert seen["wrong_key"] == seen["unknown_key_id"] == seen["mac_stripped"] == {401}, seen
        text = await metrics_text(client, kr)
        assert not _internal_errors(text)
        counted = sum(float(v) for v in re.findall(r'^ekko_rejects_total\{endpoint="/v1/(?:publish|gossip)".*\} (\S+)$',
                                                    text, re.M))
        assert counted == 2 * GARBAGE_BODIES, "every refusal is counted"
        assert (await client.get("/healthz")).status == 200
        # still serving writes: the valid push applies
        resp = await client.post("/v1/gossip", data=push)
        assert resp.status == 204 and (await _state(d, client))["digests"] != before["digests"]
    finally:
        await client.close()


# --------------------------------------------------------------------------- every handler, fuzzed
FRAME_PATHS = ["/v1/models", "/v1/publish", "/v1/gossip", "/v1/cuts", "/v1/rollback",
               "/v1/models/ranker/baseline"]
NAMES = st.one_of(st.sampled_from(["ranker", "emb", "half", "nope", "", "a/b", "..", "%00", "r1"]), st.text(max_size=12))
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.floats(allow_nan=True),
                    st.binary(max_size=40), NAMES)


def _containers(inner):
    return st.one_of(st.lists(inner, max_size=5), st.dictionaries(NAMES, inner, max_size=5))


OBJECTS = st.recursive(SCALARS, _containers, max_leaves=20)
FIELDS = ["model", "origin", "deltas", "chains", "spec", "from", "k", "dc", "mem", "cat", "req", "heads", "models",
          "scope", "back", "rb", "cut", "name", "m", "t", "n", "ids", "v", "x", "del", "imp", "id", "upper"]
BODIES = st.dictionaries(st.sampled_from(FIELDS), OBJECTS, max_size=8)


def _frame_bytes(msg_type: int, body: dict, flags_extra: int = 0) -> bytes:
    try:
        payload = msgpack.packb(body, use_bin_type=True)
    except (OverflowError, ValueError, TypeError):
        payload = b"\xc1"  # msgpack's never-used byte
    return _header(msg_type, flags_extra, 0, len(payload)) + payload


@st.composite
def requests(draw):
    kind = draw(st.sampled_from(["frame", "raw", "rows", "status", "cuts", "other"]))
    if kind == "frame":
        t = draw(st.one_of(st.sampled_from([int(x) for x in MsgType]), st.integers(0, 255)))
        return "POST", draw(st.sampled_from(FRAME_PATHS)), _frame_bytes(t, draw(BODIES))
    if kind == "raw":
        return "POST", draw(st.sampled_from(FRAME_PATHS)), draw(st.binary(max_size=300))
    if kind == "rows":
        model, table = draw(NAMES), draw(NAMES)
        q = {}
        if draw(st.booleans()):
            q["ids"] = draw(st.one_of(st.lists(st.integers(-10, 10**20), max_size=6).map(lambda x: ",".join(map(str, x))),
                                      st.text(max_size=20)))
        if draw(st.booleans()):
            q["format"] = draw(st.one_of(st.sampled_from(["json", "msgpack"]), st.text(max_size=5)))
        path = (f"/v1/models/{urllib.parse.quote(model or 'x', safe='')}/tables/"
                f"{urllib.parse.quote(table or 'x', safe='')}/rows?{urllib.parse.urlencode(q)}")
        return "GET", path, None
    if kind == "status":
        return "GET", "/v1/status?" + urllib.parse.urlencode({"cluster": draw(st.text(max_size=4))}), None
    if kind == "cuts":
        return "GET", f"/v1/models/{urllib.parse.quote(draw(NAMES) or 'x', safe='')}/cuts", None
    method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE"]))
    path = draw(st.sampled_from(["/metrics", "/healthz", "/v1/status", "/v1/publish", "/v1/rows", "/", "/v1/models"]))
    return method, path, draw(st.one_of(st.none(), st.binary(max_size=50)))


class _Harness:
    """One daemon with a model and rows, serving on a loop owned by a sync (hypothesis) test."""

    def __init__(self, tmp_path) -> None:
        self.loop = asyncio.new_event_loop()
        self.d, self.client = self.loop.run_until_complete(make_client(tmp_path))
        self.run(self._seed())
        self.state = self.run(_state(self.d, self.client))
        self.statuses: dict[int, int] = {}

    async def _seed(self) -> None:
        assert (await register(self.client))[0] == 200
        f = publish_body(PublisherChain(origin=3), "emb", np.arange(100), np.ones((100, 8), np.float32))
        assert (await self.client.post("/v1/publish", data=encode_frame(MsgType.PUBLISH, f.body))).status == 200
        self.d.node.take_cut("ranker", "c0", self.d.clock())

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    async def check(self, method: str, path: str, body: bytes | None) -> None:
        resp = await self.client.request(method, path, data=body)
        raw = await resp.read()
        self.statuses[resp.status] = self.statuses.get(resp.status, 0) + 1
        assert resp.status < 500, (method, path, body[:100] if body else None, raw[:300])
        after = await _state(self.d, self.client)
        if resp.status >= 400:
            js = json.loads(raw)
            assert js["error"] and js["reason"], raw
            assert after == self.state, f"rejected {method} {path} ({js}) changed the replica"
        self.state = after  # an accepted request may change it (a valid cut, a valid push)

    def finish(self) -> None:
        try:
            text = self.run(metrics_text(self.client))
            assert not _internal_errors(text), _internal_errors(text)
            assert self.run(self.client.get("/healthz")).status == 200
        finally:
            self.run(self.client.close())
            self.loop.close()


def test_every_handler_survives_hypothesis_fuzzing(tmp_path):
    h = _Harness(tmp_path)
    try:
        @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(req=requests())
        def fuzz(req):
            h.run(h.check(*req))

        fuzz()
        assert sum(v for s, v in h.statuses.items() if 400 <= s < 500) > FUZZ_EXAMPLES // 2, h.statuses
    finally:
        h.finish()


def _valid_requests() -> list[tuple[str, str, bytes | None, MsgType | None, dict | None]]:
    """Valid requests for every route: recorded peer traffic plus operator and read requests."""
    out: list[tuple[str, str, bytes | None, MsgType | None, dict | None]] = []
    path_of = {MsgType.PUBLISH: "/v1/publish", MsgType.REGISTER_MODEL: "/v1/models"}
    for t, body in _traffic_corpus():
        out.append(("POST", path_of.get(t, "/v1/gossip"), None, t, body))
    out += [("POST", "/v1/cuts", None, MsgType.CUT, {"model": "ranker", "name": "c1"}),
            ("POST", "/v1/rollback", None, MsgType.ROLLBACK, {"model": "ranker", "cut": "c0"}),
            ("GET", "/v1/models/ranker/tables/emb/rows?ids=1,2,3&format=msgpack", None, None, None),
            ("GET", "/v1/models/ranker/tables/half/rows?ids=0,299", None, None, None),
            ("GET", "/v1/status?cluster=1", None, None, None),
            ("GET", "/v1/models/ranker/cuts", None, None, None),
            ("GET", "/v1/models/ranker/changes?since=1-0&limit=100", None, None, None),
            ("GET", "/metrics", None, None, None), ("GET", "/healthz", None, None, None)]
    return out


def _mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(4)
        i = rng.randrange(len(b) + 1)
        if op == 0 and b:
            b[min(i, len(b) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1:
            b[i:i] = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 8)))
        elif op == 2:
            del b[i:i + rng.randint(1, 16)]
        else:
            b[i:i + 4] = rng.choice([b"\xff\xff\xff\xff", b"\0\0\0\0", b"\x7f", b"%", b"-1", b"99999999999999999999"])
    return bytes(b)


def test_every_handler_survives_a_mutation_fuzzer(tmp_path):
    """Valid requests of every route, mutated structurally (bodies) and byte-wise (frames, URLs)."""
    h = _Harness(tmp_path)
    try:
        corpus = _valid_requests()
        assert {p.split("?")[0] for _, p, *_ in corpus} >= {"/v1/models", "/v1/publish", "/v1/gossip", "/v1/cuts",
                                                           "/v1/rollback", "/v1/status", "/metrics", "/healthz"}
        for method, path, _, t, body in corpus:  # the valid traffic first, so peers and the model exist
            if t is not None and t != MsgType.ROLLBACK:
                h.run(h.check(method, path, encode_frame(t, body)))
        rng = random.Random(11)
        for _ in range(MUTATIONS):
            method, path, _, t, body = rng.choice(corpus)
            if t is None:
                mutated = _mutate_bytes(rng, path.encode()).decode("latin-1")
                if not mutated.startswith("/"):
                    mutated = "/" + mutated
                h.run(h.check(method, urllib.parse.quote(mutated, safe="/?=&,%"), None))
            elif rng.random() < 0.6:
                try:
                    frame = encode_frame(t, _mutate(body, rng))
                except (OverflowError, ValueError, TypeError):
                    continue
                h.run(h.check(method, path, frame))
            else:
                h.run(h.check(method, path, _mutate_bytes(rng, encode_frame(t, body))))
        assert h.statuses.get(400, 0) > MUTATIONS // 4, h.statuses
    finally:
        h.finish()


# --------------------------------------------------------------------------- below the handlers
#: wrong values a systematic sweep puts at every path of a valid message (DELETE removes the key).
DELETE = object()
SWEEP_VALUES = [DELETE, None, -1, 2**64 - 1, "", "x", b"", b"\x00" * 7, [], {}, [[1, 2]], 1.5, True]
#: deepest path the sweep edits, and list items it visits per list.
SWEEP_DEPTH, SWEEP_ITEMS = 5, 3


def _paths(obj, prefix=()):
    if prefix:
        yield prefix
    if len(prefix) >= SWEEP_DEPTH:
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:SWEEP_ITEMS]):
            yield from _paths(v, prefix + (i,))


def _edited(body, path, value):
    import copy
    out = copy.deepcopy(body)
    parent = out
    for k in path[:-1]:
        parent = parent[k]
    if value is DELETE:
        if not isinstance(parent, dict):
            return None
        del parent[path[-1]]
    else:
        parent[path[-1]] = copy.deepcopy(value)
    return out


def _node_state(n: ReplicaNode) -> tuple:
    return (tuple((m, t.name, n.table_store(m, t.name).versions.tobytes(), n.table_store(m, t.name).digest())
                  for m in sorted(n.models) for t in n.spec(m).tables),
            tuple((m, repr(n.export_state(m))) for m in sorted(n.models)),
            tuple((m, tuple(c.name for c in n.cuts.cuts(m))) for m in sorted(n.models)),
            tuple(n.rollbacks), len(n.fence), n.catalog_digest(),
            # what gossip merges: members, peers' heads and peers' model states
            tuple(sorted((m.node_id, m.state.value, m.incarnation, m.heartbeat, m.last_change)
                         for m in n.members.members.values())),
            repr(sorted(n.peer_heads.items())), repr(sorted(n.peer_model_states.items())))


def _sweep_corpus() -> list[tuple[MsgType, dict]]:
    """One valid body of every message type and gossip kind, recorded from real nodes."""
    corpus = _traffic_corpus()
    picked: dict[tuple, tuple[MsgType, dict]] = {}
    for t, body in corpus:  # the richest body of each type and gossip kind
        key = (t, body.get("k"))
        if key not in picked or len(body) > len(picked[key][1]):
            picked[key] = (t, body)
    cut = {"name": "c9", "model": "ranker", "taken_at": 1.0, "seq": 0, "knowledge": [["emb", 0, [[3, 5]]]]}
    record = {"id": "a.ranker.c9.7", "model": "ranker", "cut": cut, "upper": [[3, 7]]}
    extra = [(MsgType.CUT, {"from": "a", "cut": cut}), (MsgType.ROLLBACK, {"from": "a", "rb": record}),
             (MsgType.GOSSIP, {**picked[(MsgType.GOSSIP, "g")][1], "specs": [SPEC.to_dict()], "rb": [record]})]
    return list(picked.values()) + extra


def test_node_sweep_every_field_of_every_message():
    """Every path of a valid message of every type, deleted or set to a wrong value: the
    receive path raises ProtocolError (or accepts), and a refused message changes nothing."""
    corpus = _traffic_corpus()
    n = ReplicaNode("b", "dc2", "b", config=preset("local"), device="cpu", seeds=["a"])
    n.wall_offset_s = HLC_EPOCH_MS / 1000 + 2000  # the corpus publisher runs 1000 s ahead (see _traffic_corpus)
    for t, body in corpus:  # learn the model, the sender and some rows first
        try:
            n.receive(Frame(t, body), 10.0)
        except ProtocolError:
            pass
    targets = _sweep_corpus()
    assert {t for t, _ in targets} >= {MsgType.GOSSIP, MsgType.PULL_REQUEST, MsgType.PULL_RESPONSE, MsgType.PUSH,
                                       MsgType.PUBLISH, MsgType.REGISTER_MODEL, MsgType.CUT, MsgType.ROLLBACK}
    tried = refused = 0
    for t, body in targets:
        for path in _paths(body):
            for value in SWEEP_VALUES:
                edited = _edited(body, path, value)
                if edited is None:
                    continue
                before = _node_state(n)
                tried += 1
                try:
                    n.receive(Frame(t, edited), 10.0)
                except ProtocolError:
                    refused += 1
                    assert _node_state(n) == before, (t.name, path, value)
                except UsageError as e:
                    assert t == MsgType.REGISTER_MODEL and "different spec" in str(e), (t.name, path, value, e)
                except Exception as e:  # noqa: BLE001 -- the point: nothing else may escape
                    raise AssertionError(f"{t.name} with {path}={value!r}: {type(e).__name__}: {e}") from e
    print(f"sweep: {tried} edited messages, {refused} refused")
    assert tried > 1000 and refused > tried // 3, (tried, refused)


@pytest.fixture(scope="module")
def loaded_node() -> ReplicaNode:
    n = ReplicaNode("a", "dc1", "a", config=preset("local"), device="cpu")
    n.register_model(SPEC, 0.0)
    f = PublisherChain(origin=3).frame(SPEC, {"emb": (np.arange(50), np.ones((50, 8), np.float32))}, now_ms=0)
    n.publish(f.body, 0.0)
    return n


@settings(max_examples=DECODER_EXAMPLES * 2, deadline=None, database=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(t=st.sampled_from(list(MsgType)), body=BODIES)
def test_node_receive_raises_only_protocol_errors(loaded_node, t, body):
    """Whatever a decoded frame's body holds, the node's receive path raises ProtocolError or
    nothing (UsageError only for a conflicting model registration, a 409 at the daemon)."""
    try:
        loaded_node.receive(Frame(t, body), 1.0)
    except ProtocolError:
        pass
    except UsageError as e:
        assert t == MsgType.REGISTER_MODEL and "different spec" in str(e), e


def _decoders():
    from ekko.core.codec import delta_from_wire
    from ekko.core.keyring import validate
    from ekko.core.spec import ModelSpec, TableSpec
    from ekko.core.version import Knowledge
    from p2p.membership import parse_entries
    from rollback.cuts import Cut, Fence

    lookup = {("ranker", t.name): t for t in SPEC.tables}.get
    return {"knowledge": (Knowledge.from_wire, ProtocolError), "model_spec": (ModelSpec.from_dict, ProtocolError),
            "table_spec": (TableSpec.from_dict, ProtocolError), "cut": (Cut.from_wire, ProtocolError),
            "fence": (Fence.from_wire, ProtocolError), "members": (parse_entries, ProtocolError),
            "delta": (lambda o: delta_from_wire(o, lambda m, t: lookup((m, t))), ProtocolError),
            "keyring": (validate, UsageError)}


DELTA_LIKE = st.fixed_dictionaries({"m": st.sampled_from(["ranker", "x"]), "t": st.sampled_from(["emb", "half"]),
                                    "n": st.integers(-1, 4)},
                                   optional={"ids": st.binary(max_size=40), "v": st.binary(max_size=40),
                                             "x": st.binary(max_size=160), "del": st.binary(max_size=2),
                                             "imp": st.binary(max_size=20)})


@pytest.mark.parametrize("name", ["knowledge", "model_spec", "table_spec", "cut", "fence", "members", "delta",
                                  "keyring"])
def test_decoders_raise_only_their_error(name):
    """Each wire decoder, fed any msgpack-shaped object, returns or raises its one error type."""
    decode, error = _decoders()[name]

    @settings(max_examples=DECODER_EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(obj=st.one_of(OBJECTS, DELTA_LIKE, st.lists(st.lists(OBJECTS, max_size=4), max_size=4)))
    def fuzz(obj):
        try:
            decode(obj)
        except error:
            pass

    fuzz()


def test_a_refused_gossip_changes_nothing():
    """Gossip is validated whole before it merges members, registers models or applies
    rollbacks: a bad rollback record at the end refuses it all."""
    from p2p.membership import Member

    n = ReplicaNode("a", "dc1", "a", config=preset("local"), device="cpu")
    newcomer = Member("z", "dc9", "z:1", 1, 1).to_wire()
    good = {"k": "g", "from": "z", "mem": [newcomer], "cat": 1, "req": False, "specs": [SPEC.to_dict()]}
    for bad_rb in ({"id": ["not", "a", "string"]}, {"id": "x", "model": "ranker"},
                   {"id": "x", "model": "ranker", "cut": {}, "upper": []}):
        with pytest.raises(ProtocolError):
            n.receive(Frame(MsgType.GOSSIP, {**good, "rb": [bad_rb]}), 1.0)
        assert "ranker" not in n.models and "z" not in n.members.members
    n.receive(Frame(MsgType.GOSSIP, good), 1.0)
    assert "ranker" in n.models and "z" in n.members.members
