"""Tests for ekko.core.codec: frame and delta round trips, every named limit, and a mutation fuzz.

The decoder's contract: for any input, :func:`decode_frame` followed by
:func:`delta_from_wire` either returns a valid frame/delta or raises
:class:`ProtocolError` -- never another exception.
"""

from __future__ import annotations

import random
import struct

import msgpack
import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ekko.core.codec import (COMPRESS_MIN_SAVING, COMPRESS_SAMPLE_FROM, COMPRESS_THRESHOLD, FLAG_BLAKE3, FLAG_MAC, FLAG_ZSTD, FORMAT_VERSION, HEADER, HEADER_BYTES, MAC_BYTES,
                        MAGIC, MAX_ARRAY_LEN, MAX_BODY_BYTES, MAX_DELTA_ROWS, MAX_FRAME_BYTES, MAX_MAP_LEN,
                        MAX_STR_LEN, Frame, Keyring, MsgType, array_from_wire, decode_frame, delta_from_wire,
                        delta_to_wire, encode_frame, field, int_field)
from ekko.core.delta import WIRE_DTYPES, Delta
from ekko.core.errors import ProtocolError, UsageError
from ekko.core.spec import TableSpec
from ekko.core.version import MAX_COUNTER, MAX_ORIGIN, pack

KR = Keyring({1: b"cluster-key-one!"})
KR2 = Keyring({1: b"cluster-key-one!", 2: b"cluster-key-two!"}, primary=2)
WRONG = Keyring({1: b"not-the-right-key"})

TABLES = {
    ("m", "f32"): TableSpec("f32", rows=1000, dim=8),
    ("m", "f16"): TableSpec("f16", rows=500, dim=5, dtype="float16"),
    ("m", "bf16"): TableSpec("bf16", rows=300, dim=3, dtype="bfloat16"),
    ("m", "f64"): TableSpec("f64", rows=200, dim=2, dtype="float64"),
    ("m", "wide"): TableSpec("wide", rows=50, dim=700),
}


def lookup(model, table):
    return TABLES.get((model, table))


def header(msg_type=1, flags=0, key_id=0, reserved=0, length=0, magic=MAGIC, version=FORMAT_VERSION):
    return HEADER.pack(magic, version, msg_type, flags, key_id, reserved, length)


def raw_frame(payload: bytes, flags: int = 0, **kw) -> bytes:
    return header(flags=flags, length=len(payload), **kw) + payload


def reason(data, *args, **kwargs) -> str:
    with pytest.raises(ProtocolError) as ei:
        decode_frame(data, *args, **kwargs)
    return ei.value.reason


def random_delta(r: random.Random, table: str | None = None, n: int | None = None, with_values=True,
                 tombstones=None, impact=None) -> Delta:
    """A valid delta drawn from ``r``: values are random bit patterns (NaNs, -0.0 included)."""
    table = table or r.choice([t for _, t in TABLES])
    spec = TABLES[("m", table)]
    n = r.randint(0, 60) if n is None else n
    npr = np.random.default_rng(r.getrandbits(32))
    ids = npr.integers(0, spec.rows, n).astype(np.int64)
    versions = np.array([pack(r.randint(1, MAX_COUNTER), r.randint(0, MAX_ORIGIN)) for _ in range(n)], np.int64)
    dt = np.dtype(WIRE_DTYPES[spec.dtype])
    values = (npr.integers(0, 256, n * spec.dim * dt.itemsize, dtype=np.uint8).view(dt).reshape(n, spec.dim)
              if with_values else None)
    tomb = None
    if tombstones if tombstones is not None else r.random() < 0.5:
        tomb = npr.random(n) < r.choice([0.0, 0.1, 0.5, 1.0])
    imp = npr.standard_normal(n).astype(np.float32) if (impact if impact is not None else r.random() < 0.5) else None
    d = Delta("m", table, ids, versions, values, tomb, imp)
    d.check(spec)
    return d


def assert_same_delta(a: Delta, b: Delta) -> None:
    assert (a.model, a.table) == (b.model, b.table)
    assert a.ids.dtype == b.ids.dtype == np.int64 and np.array_equal(a.ids, b.ids)
    assert b.versions.dtype == np.int64 and np.array_equal(a.versions, b.versions)
    if a.values is None:
        assert b.values is None
    else:  # bitwise: NaN payloads and signed zeros survive
        assert b.values.dtype == a.values.dtype and b.values.shape == a.values.shape
        assert a.values.tobytes() == b.values.tobytes()
    ta = a.tombstone if a.tombstone is not None else np.zeros(len(a), bool)
    tb = b.tombstone if b.tombstone is not None else np.zeros(len(b), bool)
    assert np.array_equal(ta, tb)
    if a.impact is None:
        assert b.impact is None
    else:
        assert a.impact.tobytes() == b.impact.tobytes()


# -- frame round trips -------------------------------------------------------------------------
scalars = (st.none() | st.booleans() | st.integers(-2 ** 63, 2 ** 64 - 1) | st.floats(allow_nan=True)
           | st.text(max_size=40) | st.binary(max_size=64))
# compressible filler so that bodies land on both sides of COMPRESS_THRESHOLD and do compress
filler = st.builds(lambda b, k: b * k, st.binary(min_size=1, max_size=8), st.integers(COMPRESS_THRESHOLD // 16, COMPRESS_THRESHOLD))
values = st.recursive(scalars | filler, lambda kids: st.lists(kids, max_size=6)
                      | st.dictionaries(st.text(max_size=10), kids, max_size=6), max_leaves=30)
bodies = st.dictionaries(st.text(max_size=12), values, max_size=8)
keyrings = st.sampled_from([None, KR, KR2])


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=bodies, msg_type=st.sampled_from(list(MsgType)), kr=keyrings,
       threshold=st.sampled_from([0, 64, COMPRESS_THRESHOLD]))
def test_frame_roundtrip(body, msg_type, kr, threshold):
    packed_body = msgpack.packb(body, use_bin_type=True)
    data = encode_frame(msg_type, body, kr, compress_threshold=threshold)
    magic, version, mtype, flags, key_id, reserved, length = HEADER.unpack_from(data)
    assert (magic, version, mtype, reserved) == (MAGIC, FORMAT_VERSION, int(msg_type), 0)
    assert len(data) == HEADER_BYTES + length + (MAC_BYTES if kr else 0)
    if len(packed_body) < threshold:
        assert not flags & FLAG_ZSTD and length == len(packed_body)
    if flags & FLAG_ZSTD:
        assert length < len(packed_body)
    assert bool(flags & FLAG_MAC) == bool(kr) and key_id == (kr.primary if kr else 0)
    f = decode_frame(data, kr)
    assert isinstance(f, Frame) and f.msg_type is msg_type and f.wire_bytes == len(data)
    assert f.key_id == (kr.primary if kr else 0)
    # compare re-packed bytes: NaN != NaN, but its bits survive
    assert msgpack.packb(f.body, use_bin_type=True) == packed_body


def test_compression_used_above_threshold():
    body = {"x": b"\0" * (2 * COMPRESS_THRESHOLD)}
    small = {"x": b"\0" * 100}
    for kr in (None, KR):
        big = encode_frame(MsgType.PUSH, body, kr)
        assert HEADER.unpack_from(big)[3] & FLAG_ZSTD and len(big) < COMPRESS_THRESHOLD
        assert decode_frame(big, kr).body == body
        sm = encode_frame(MsgType.PUSH, small, kr)
        assert not HEADER.unpack_from(sm)[3] & FLAG_ZSTD
        assert decode_frame(sm, kr).body == small
    # incompressible bodies go uncompressed even above the threshold
    noise = {"x": random.Random(0).randbytes(3 * COMPRESS_THRESHOLD)}
    assert not HEADER.unpack_from(encode_frame(MsgType.PUSH, noise))[3] & FLAG_ZSTD


def test_compression_only_where_it_pays():
    """float32 rows gain ~1.1x: sent raw; large compressible bodies still compress (judged
    on a sample), and receivers take both forms."""
    rng = np.random.default_rng(0)
    rows = {"ids": np.arange(20000, dtype=np.int64).tobytes(),
            "x": rng.standard_normal((20000, 64), dtype=np.float32).tobytes()}
    assert len(rows["x"]) >= COMPRESS_SAMPLE_FROM
    raw = encode_frame(MsgType.PUSH, rows, KR, min_saving=COMPRESS_MIN_SAVING)
    assert not HEADER.unpack_from(raw)[3] & FLAG_ZSTD
    assert decode_frame(raw, KR).body == rows
    # the default keeps any gain (WAN links; the simulator sizes messages with it)
    assert HEADER.unpack_from(encode_frame(MsgType.PUSH, rows, KR))[3] & FLAG_ZSTD
    big = {"x": b"ab" * COMPRESS_SAMPLE_FROM}
    packed = encode_frame(MsgType.PUSH, big, KR, min_saving=COMPRESS_MIN_SAVING)
    assert HEADER.unpack_from(packed)[3] & FLAG_ZSTD and len(packed) < COMPRESS_SAMPLE_FROM
    assert decode_frame(packed, KR).body == big
    # a body that gains a little, under COMPRESS_MIN_SAVING, goes raw
    some = {"x": rng.integers(0, 256, 3 * COMPRESS_THRESHOLD, dtype=np.uint8).tobytes() + b"\0" * 512}
    assert not HEADER.unpack_from(encode_frame(MsgType.GOSSIP, some, min_saving=COMPRESS_MIN_SAVING))[3] & FLAG_ZSTD
    assert HEADER.unpack_from(encode_frame(MsgType.GOSSIP, some))[3] & FLAG_ZSTD


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2 ** 32 - 1), table=st.sampled_from([t for _, t in TABLES]),
       n=st.sampled_from([0, 1, 2, 17, 200, 1500]), with_values=st.booleans(), kr=keyrings,
       threshold=st.sampled_from([0, COMPRESS_THRESHOLD, 1 << 30]))
def test_delta_roundtrip(seed, table, n, with_values, kr, threshold):
    d = random_delta(random.Random(seed), table, n, with_values)
    body = delta_to_wire(d)
    data = encode_frame(MsgType.PUSH, body, kr, compress_threshold=threshold)
    f = decode_frame(data, kr)
    got = delta_from_wire(f.body, lookup, values_required=with_values)
    assert_same_delta(d, got)
    # decoded arrays are native, writable copies (never views of the frame buffer)
    for a in (got.ids, got.versions, got.values, got.tombstone, got.impact):
        if a is not None:
            assert a.flags.writeable and a.dtype.isnative


def test_delta_without_values_refused_when_required():
    d = random_delta(random.Random(1), "f32", 4, with_values=False)
    body = decode_frame(encode_frame(MsgType.PUSH, delta_to_wire(d))).body
    with pytest.raises(ProtocolError) as ei:
        delta_from_wire(body, lookup)
    assert ei.value.reason == "bad_body"
    assert delta_from_wire(body, lookup, values_required=False).values is None


def test_tombstones_travel_as_bitmap():
    d = random_delta(random.Random(2), "f32", 13, tombstones=True)
    d = Delta(d.model, d.table, d.ids, d.versions, d.values, np.arange(13) % 3 == 0, None)
    body = delta_to_wire(d)
    assert len(body["del"]) == 2
    assert delta_from_wire(body, lookup).tombstone.tolist() == d.tombstone.tolist()
    no_tomb = Delta(d.model, d.table, d.ids, d.versions, d.values, np.zeros(13, bool))
    assert "del" not in delta_to_wire(no_tomb)


def test_msg_types_append_only():
    # renumbering breaks every deployed peer: this table only ever grows
    assert {m.name: int(m) for m in MsgType} == {
        "PUBLISH": 1, "REGISTER_MODEL": 2, "GOSSIP": 3, "PULL_REQUEST": 4, "PULL_RESPONSE": 5, "PUSH": 6,
        "ROLLBACK": 7, "QUALITY": 8, "CUT": 9, "BASELINE": 10}
    assert HEADER_BYTES == 12 and MAC_BYTES == 32


def test_accepts_bytearray_and_memoryview():
    data = encode_frame(MsgType.GOSSIP, {"a": 1}, KR)
    assert decode_frame(bytearray(data), KR).body == {"a": 1}
    assert decode_frame(memoryview(data), KR).body == {"a": 1}


# -- authentication ----------------------------------------------------------------------------
def test_bad_mac():
    data = bytearray(encode_frame(MsgType.GOSSIP, {"a": 1}, KR))
    data[-1] ^= 1
    assert reason(bytes(data), KR) == "bad_mac"
    body_flip = bytearray(encode_frame(MsgType.GOSSIP, {"a": 1}, KR))
    body_flip[HEADER_BYTES] ^= 0x10
    assert reason(bytes(body_flip), KR) == "bad_mac"


def test_wrong_key():
    data = encode_frame(MsgType.GOSSIP, {"a": 1}, KR)
    assert reason(data, WRONG) == "bad_mac"


def test_unknown_key_id():
    data = encode_frame(MsgType.GOSSIP, {"a": 1}, KR2)  # signed with key 2
    assert reason(data, KR) == "bad_mac"                 # KR knows only key 1
    assert reason(data, None, require_mac=True) == "bad_mac"


def test_key_rotation():
    old = encode_frame(MsgType.GOSSIP, {"a": 1}, KR)     # key 1
    new = encode_frame(MsgType.GOSSIP, {"a": 2}, KR2)    # key 2
    assert decode_frame(old, KR2).key_id == 1 and decode_frame(new, KR2).key_id == 2


def test_both_macs_sign_and_verify_and_a_keyring_verifies_either():
    """Keyed BLAKE3 (the default) and HMAC-SHA256 (what older daemons speak): a keyring
    signs with its ``mac`` and verifies both, so a cluster can switch one node at a time."""
    body = {"a": 1, "rows": b"x" * 10_000}
    hmac_kr = Keyring({1: b"k" * 16}, mac="hmac-sha256")
    b3_kr = Keyring({1: b"k" * 16})
    assert b3_kr.mac == "blake3"
    b3, hm = encode_frame(MsgType.PUSH, body, b3_kr), encode_frame(MsgType.PUSH, body, hmac_kr)
    assert b3[4] & FLAG_BLAKE3 and not hm[4] & FLAG_BLAKE3 and b3[:-MAC_BYTES] != hm[:-MAC_BYTES]
    for frame in (b3, hm):
        for kr in (b3_kr, hmac_kr):
            assert decode_frame(frame, kr).body == body and decode_frame(frame, kr).key_id == 1
        assert reason(frame, Keyring({1: b"j" * 16})) == "bad_mac"
        for at in (HEADER_BYTES + 5, len(frame) - 1):   # a flipped body byte, a flipped MAC byte
            bad = bytearray(frame)
            bad[at] ^= 0x01
            assert reason(bytes(bad), b3_kr) == "bad_mac"
    # The flag says which MAC: the other one under the same key does not verify.
    swapped = bytearray(b3)
    swapped[4] &= ~FLAG_BLAKE3
    assert reason(bytes(swapped), b3_kr) == "bad_mac"
    # BLAKE3 without a MAC trailer is no frame this build writes.
    naked = bytearray(encode_frame(MsgType.GOSSIP, {"a": 1}))
    naked[4] |= FLAG_BLAKE3
    assert reason(bytes(naked), None) == "malformed"
    with pytest.raises(UsageError):
        Keyring({1: b"k" * 16}, mac="md5")


def test_missing_mac_when_required():
    plain = encode_frame(MsgType.GOSSIP, {"a": 1})
    assert reason(plain, KR) == "unauthenticated"
    assert reason(plain, None, require_mac=True) == "unauthenticated"
    # explicitly relaxed (a rolling upgrade) it is accepted, and reported as unsigned
    assert decode_frame(plain, KR, require_mac=False).key_id == 0


def test_unchecked_mac_is_not_reported_as_signed():
    signed = encode_frame(MsgType.GOSSIP, {"a": 1}, KR)
    f = decode_frame(signed)  # no keyring: the trailer cannot be checked
    assert f.body == {"a": 1} and f.key_id == 0


def test_keyring_validation():
    with pytest.raises(UsageError):
        Keyring({0: b"12345678"})
    with pytest.raises(UsageError):
        Keyring({1: b"short"})
    with pytest.raises(UsageError):
        Keyring({1: b"12345678"}, primary=2)
    assert Keyring.single(None) is None
    assert Keyring.single("a-long-enough-key").keys == {1: b"a-long-enough-key"}
    assert not Keyring()


# -- named limits and header checks ------------------------------------------------------------
def test_oversized_frame():
    data = raw_frame(b"\0" * (MAX_FRAME_BYTES - HEADER_BYTES + 1))
    assert len(data) == MAX_FRAME_BYTES + 1
    assert reason(data) == "too_large"


def test_encode_refuses_oversize():
    with pytest.raises(UsageError):
        encode_frame(MsgType.PUSH, {"x": b"\0" * (MAX_BODY_BYTES + 1)})
    # under the body cap but over the frame cap once it cannot be compressed
    noise = np.random.default_rng(0).integers(0, 256, MAX_FRAME_BYTES, dtype=np.uint8).tobytes()
    with pytest.raises(UsageError):
        encode_frame(MsgType.PUSH, {"x": noise})


def _zstd_frame(payload: bytes, **kw) -> bytes:
    return zstandard.ZstdCompressor(level=1, **kw).compress(payload)


def test_zstd_bomb_declared_size():
    # 128 MiB + a bit of zeros compresses to a few KB; the declared size gives it away
    bomb = _zstd_frame(msgpack.packb({"x": b"\0" * MAX_BODY_BYTES}))
    assert len(bomb) < 1 << 20
    assert reason(raw_frame(bomb, FLAG_ZSTD)) == "too_large"


def test_zstd_forged_content_size_is_not_allocated():
    # A small frame whose header claims a terabyte: before the fix this was a MemoryError.
    small = _zstd_frame(msgpack.packb({"a": 1}))
    fhd = small[4]
    single_segment = (fhd >> 5) & 1
    fcs_len = {0: single_segment, 1: 2, 2: 4, 3: 8}[fhd >> 6]
    rest = small[5 + (0 if single_segment else 1) + fcs_len:]
    for size in (MAX_BODY_BYTES + 1, 1 << 40, (1 << 64) - 3):
        forged = small[:4] + bytes([(3 << 6) | (1 << 5) | (fhd & 0x07)]) + struct.pack("<Q", size) + rest
        assert zstandard.get_frame_parameters(forged).content_size == size
        assert reason(raw_frame(forged, FLAG_ZSTD)) == "too_large"


def test_zstd_without_declared_size_refused():
    # streaming compressors may omit the size; then nothing bounds the output up front
    bomb = _zstd_frame(msgpack.packb({"x": b"\0" * (MAX_BODY_BYTES + 1)}), write_content_size=False)
    assert reason(raw_frame(bomb, FLAG_ZSTD)) == "bad_compression"


def test_zstd_trailing_data_and_garbage():
    ok = _zstd_frame(msgpack.packb({"a": 1}))
    assert decode_frame(raw_frame(ok, FLAG_ZSTD)).body == {"a": 1}
    assert reason(raw_frame(ok + b"junk", FLAG_ZSTD)) == "bad_compression"
    assert reason(raw_frame(ok + ok, FLAG_ZSTD)) == "bad_compression"
    assert reason(raw_frame(b"", FLAG_ZSTD)) == "bad_compression"
    assert reason(raw_frame(b"not zstd at all", FLAG_ZSTD)) == "bad_compression"
    assert reason(raw_frame(ok[:-3], FLAG_ZSTD)) == "bad_compression"


def test_decompressed_body_at_the_limit_is_fine():
    body = msgpack.packb({"x": b"\0" * (MAX_BODY_BYTES - 64)})
    assert len(body) <= MAX_BODY_BYTES
    f = decode_frame(raw_frame(_zstd_frame(body), FLAG_ZSTD))
    assert len(f.body["x"]) == MAX_BODY_BYTES - 64


@pytest.mark.parametrize("version", [0, FORMAT_VERSION + 1, 255])
def test_wrong_format_version(version):
    assert reason(raw_frame(msgpack.packb({}), version=version)) == "bad_version"


@pytest.mark.parametrize("mtype", [0, max(MsgType) + 1, 200, 255])
def test_unknown_message_type(mtype):
    assert reason(raw_frame(msgpack.packb({}), msg_type=mtype)) == "bad_type"


def test_header_checks():
    body = msgpack.packb({"a": 1})
    assert reason(raw_frame(body, magic=b"EJ")) == "bad_magic"
    assert reason(raw_frame(body, flags=0x04)) == "malformed"
    assert reason(raw_frame(body, reserved=1)) == "malformed"
    assert reason(b"EK\x01") == "truncated"
    assert reason(b"") == "truncated"
    assert reason(header(length=len(body) + 1) + body) == "truncated"
    assert reason(header(length=len(body)) + body + b"x") == "malformed"
    assert reason(header(length=0xFFFFFFFF) + body) == "truncated"
    assert reason("a string") == "malformed"
    assert reason(None) == "malformed"


@pytest.mark.parametrize("payload", [
    msgpack.packb([1, 2]), msgpack.packb(5), msgpack.packb(None), b"", b"\xc1", msgpack.packb({"a": 1}) + b"\x00",
    msgpack.packb({1: 2}), msgpack.packb({"a": msgpack.ExtType(1, b"x")}),
    msgpack.packb({"s": "x" * (MAX_STR_LEN + 1)}), msgpack.packb({"a": [0] * (MAX_ARRAY_LEN + 1)}),
    msgpack.packb({str(i): 0 for i in range(MAX_MAP_LEN + 1)}),
    b"\x91" * 5000,  # deep nesting
    b"\xdd\xff\xff\xff\xff",  # array header claiming 4G elements, no data
    b"\xc6\x7f\xff\xff\xff",  # bin header claiming 2 GiB, no data
])
def test_bad_bodies(payload):
    assert reason(raw_frame(payload)) == "bad_body"


# -- delta decoding limits ---------------------------------------------------------------------
def _good_body(n=3, table="f32"):
    return delta_to_wire(random_delta(random.Random(3), table, n, tombstones=True, impact=True))


def _delta_reason(body, **kw):
    with pytest.raises(ProtocolError) as ei:
        delta_from_wire(body, lookup, **kw)
    return ei.value.reason


@pytest.mark.parametrize("edit", [
    lambda b: b.update(n=MAX_DELTA_ROWS + 1), lambda b: b.update(n=-1), lambda b: b.update(n=True),
    lambda b: b.update(n="3"), lambda b: b.update(n=4), lambda b: b.pop("n"), lambda b: b.pop("ids"),
    lambda b: b.pop("v"), lambda b: b.update(ids=b["ids"][:-1]), lambda b: b.update(v=b["v"] + b"\0"),
    lambda b: b.update(x=b["x"][:-4]), lambda b: b.update(x="str"), lambda b: b.update(ids=[1, 2, 3]),
    lambda b: b.update(ids=np.array([0, 1, 1000], np.int64).tobytes()),          # id out of range
    lambda b: b.update(ids=np.array([0, 1, -1], np.int64).tobytes()),            # negative id
    lambda b: b.update(v=np.array([1, 0, 2], np.int64).tobytes()),               # version 0
    lambda b: b.update(v=np.array([1, -5, 2], np.int64).tobytes()),              # negative version
    lambda b: b.update({"del": b"\0\0"}), lambda b: b.update({"del": 5}), lambda b: b.update(imp=b"\0"),
    lambda b: b.update(m=5), lambda b: b.pop("t"),
])
def test_delta_body_rejected(edit):
    body = _good_body()
    delta_from_wire(dict(body), lookup)  # the unedited body is fine
    edit(body)
    _delta_reason(body)


def test_unknown_table():
    body = _good_body()
    body["t"] = "nope"
    assert _delta_reason(body) == "unknown_table"
    body["m"], body["t"] = "other", "f32"
    assert _delta_reason(body) == "unknown_table"


def test_delta_not_a_map():
    for b in (None, [], "x", 5):
        assert _delta_reason(b) == "bad_body"


def test_field_helpers():
    body = {"a": 1, "b": True, "c": None, "s": "x"}
    assert field(body, "a", int) == 1
    assert field(body, "zz", int, optional=True, default=7) == 7
    assert field(body, "c", int, optional=True, default=3) == 3
    assert int_field(body, "a", 0, 5) == 1
    for call in (lambda: field(body, "b", int), lambda: field(body, "s", int), lambda: field(body, "zz", int),
                 lambda: int_field(body, "a", 2, 5), lambda: array_from_wire("x", np.int64, 1, "ids"),
                 lambda: array_from_wire(b"\0" * 7, np.int64, 1, "ids")):
        with pytest.raises(ProtocolError):
            call()


# -- mutation fuzz -----------------------------------------------------------------------------
def _mutate(r: random.Random, frame: bytes) -> bytes:
    b = bytearray(frame)
    op = r.randrange(7)
    if op == 0:                                   # 1-8 bit flips anywhere
        for _ in range(r.randint(1, 8)):
            i = r.randrange(len(b))
            b[i] ^= 1 << r.randrange(8)
    elif op == 1:                                 # truncation
        b = b[:r.randrange(len(b))]
    elif op == 2:                                 # extension
        b += r.randbytes(r.randint(1, 64))
    elif op == 3:                                 # random bytes of a random length
        b = bytearray(r.randbytes(r.randint(0, 2 * len(frame))))
    elif op == 4:                                 # a header field set to a random value
        fields = [(0, 2), (2, 1), (3, 1), (4, 1), (5, 1), (6, 2), (8, 4)]
        off, size = r.choice(fields)
        b[off:off + size] = r.randbytes(size)
    elif op == 5:                                 # overwrite a slice of the body
        if len(b) > HEADER_BYTES:
            i = r.randrange(HEADER_BYTES, len(b))
            b[i:i + r.randint(1, 16)] = r.randbytes(r.randint(1, 16))
    else:                                         # cut out a slice and patch the length to match
        if len(b) > HEADER_BYTES + 2:
            i = r.randrange(HEADER_BYTES, len(b) - 1)
            del b[i:i + r.randint(1, 32)]
            struct.pack_into("<I", b, 8, max(0, len(b) - HEADER_BYTES))
    out = bytes(b)
    return out if out != frame else out + b"\0"


def _decode_all(data: bytes, kr, **kw):
    f = decode_frame(data, kr, **kw)
    return delta_from_wire(f.body, lookup, values_required=False)


FUZZ_FRAMES = 6000


def test_fuzz_authenticated_frames_all_rejected():
    """With a cluster key every corruption must be refused, and only with ProtocolError."""
    r = random.Random(20240601)
    seeds = []
    for i in range(24):
        d = random_delta(r, n=r.choice([0, 1, 5, 40, 400]))
        seeds.append(encode_frame(MsgType.PUSH, delta_to_wire(d), KR, compress_threshold=r.choice([0, 1 << 30])))
    reasons: dict[str, int] = {}
    for i in range(FUZZ_FRAMES):
        frame = r.choice(seeds)
        mutated = _mutate(r, frame)
        ring = WRONG if i % 10 == 0 else KR
        with pytest.raises(ProtocolError) as ei:
            _decode_all(mutated, ring)
        reasons[ei.value.reason] = reasons.get(ei.value.reason, 0) + 1
    # the fuzz reaches many distinct checks, not just one
    assert {"bad_mac", "truncated", "bad_magic", "malformed"} <= set(reasons), reasons
    # and the untouched seeds decode
    for s in seeds:
        _decode_all(s, KR)


def test_fuzz_unauthenticated_frames_raise_only_protocol_error():
    """Without a key a corruption may still be a valid frame; anything else must be ProtocolError."""
    r = random.Random(99)
    seeds = [encode_frame(MsgType.PUSH, delta_to_wire(random_delta(r, n=r.choice([0, 3, 50, 300]))),
                          compress_threshold=r.choice([0, 1 << 30])) for _ in range(24)]
    outcomes = {"ok": 0, "error": 0}
    reasons = set()
    for _ in range(FUZZ_FRAMES):
        mutated = _mutate(r, r.choice(seeds))
        try:
            d = _decode_all(mutated, None)
        except ProtocolError as e:
            outcomes["error"] += 1
            reasons.add(e.reason)
            continue
        outcomes["ok"] += 1
        d.check(TABLES[(d.model, d.table)])     # whatever gets through is a valid delta
    assert outcomes["error"] > FUZZ_FRAMES // 2, outcomes
    assert {"bad_body", "bad_compression", "truncated"} <= reasons, reasons


def _rand_obj(r: random.Random, depth=0):
    choices = [lambda: None, lambda: r.random() < .5, lambda: r.randint(-2 ** 63, 2 ** 64 - 1), lambda: r.random(),
               lambda: r.randbytes(r.randrange(24)), lambda: r.choice(["m", "f32", "bf16", "", "x" * 70]),
               lambda: r.randint(-3, 2000), lambda: float("nan"), lambda: 2 ** 63]
    if depth < 3:
        choices += [lambda: [_rand_obj(r, depth + 1) for _ in range(r.randrange(4))],
                    lambda: {r.choice(["m", "t", "n", "x"]): _rand_obj(r, depth + 1) for _ in range(r.randrange(3))}]
    return r.choice(choices)()


def test_fuzz_structured_delta_bodies():
    """Well-framed bodies with corrupted delta fields (types, lengths, ranges): ProtocolError or valid."""
    r = random.Random(7)
    keys = ["m", "t", "n", "ids", "v", "x", "del", "imp", "zz"]
    counts = {"ok": 0, "error": 0}
    for _ in range(4000):
        body = delta_to_wire(random_delta(r, n=r.randint(0, 12)))
        for _ in range(r.randint(1, 3)):
            key, op = r.choice(keys), r.randrange(5)
            if op == 0:
                body[key] = _rand_obj(r)
            elif op == 1:
                body.pop(key, None)
            elif op == 2 and isinstance(body.get(key), bytes) and body[key]:
                b = bytearray(body[key])
                b[r.randrange(len(b))] = r.randrange(256)
                body[key] = bytes(b)
            elif op == 3 and isinstance(body.get(key), bytes):
                body[key] = body[key][:r.randrange(len(body[key]) + 1)] + r.randbytes(r.randrange(3) * 8)
            else:
                body["n"] = r.choice([0, 1, 5, 12, MAX_DELTA_ROWS, MAX_DELTA_ROWS + 1, -1, 2 ** 64 - 1])
        try:
            frame = encode_frame(MsgType.PUSH, body, KR)
        except (TypeError, ValueError, OverflowError):
            continue  # not packable (e.g. an int too large for msgpack): nothing to send
        try:
            d = _decode_all(frame, KR)
        except ProtocolError:
            counts["error"] += 1
            continue
        counts["ok"] += 1
        d.check(TABLES[(d.model, d.table)])
    assert counts["error"] > 1000 and counts["ok"] > 100, counts
