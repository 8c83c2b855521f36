"""Wire codec: versioned, optionally compressed and authenticated frames.

Frame layout (little-endian)::

    offset size field
    0      2    magic  b"EK"
    2      1    format version (FORMAT_VERSION)
    3      1    message type (MsgType, append-only)
    4      1    flags: bit0 = body is zstd-compressed, bit1 = MAC trailer present,
                bit2 = the MAC is keyed BLAKE3 (else HMAC-SHA256)
    5      1    key id (which keyring entry made the MAC; 0 when unauthenticated)
    6      2    reserved, must be 0
    8      4    body length in bytes (as sent, i.e. compressed if flagged)
    12     n    body: a msgpack map (zstd-compressed when flag bit0: exactly one
                zstd frame that declares its content size, nothing after it)
    12+n   32   the MAC of header || body when flag bit1: keyed BLAKE3 under a key
                derived from the keyring's key when bit2 (the default, ``Keyring.mac``),
                else HMAC-SHA256(key, header || body)

Every size is capped by a named constant below.  :func:`decode_frame` raises
:class:`~ekko.core.errors.ProtocolError` -- and nothing else -- for any bad input.
Arrays travel as msgpack ``bin`` of their little-endian bytes; their dtype is
fixed by the field, never taken from the sender.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import struct
import threading
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import blake3
import msgpack
import numpy as np
import zstandard

from ekko.core.delta import WIRE_DTYPES, Delta
from ekko.core.errors import ProtocolError, UsageError
from ekko.core.spec import TableSpec

MAGIC = b"EK"
#: current frame format; a receiver refuses other versions.
FORMAT_VERSION = 1
HEADER = struct.Struct("<2sBBBBHI")
HEADER_BYTES = HEADER.size
MAC_BYTES = 32
FLAG_ZSTD = 0x01
FLAG_MAC = 0x02
FLAG_BLAKE3 = 0x04
_KNOWN_FLAGS = FLAG_ZSTD | FLAG_MAC | FLAG_BLAKE3
#: how a keyring signs frames: keyed BLAKE3 (3x faster than HMAC-SHA256 on a 2.7 MB push
#: here, 0.73 vs 2.15 ms, even with SHA-NI) or HMAC-SHA256 (what daemons before it speak:
#: a keyring keeps signing with it while a cluster upgrades).  Both always verify.
MACS = ("blake3", "hmac-sha256")
DEFAULT_MAC = "blake3"
#: context string of the BLAKE3 key derivation (a frame MAC key per keyring key).
BLAKE3_MAC_CONTEXT = "ekko 2026-12-07 frame MAC"


def check_mac(mac: str, what: str = "frame MAC") -> str:
    """``mac`` when it names a frame MAC (:data:`MACS`); :class:`UsageError` naming
    ``what`` otherwise."""
    if mac not in MACS:
        raise UsageError(f"{what} {mac!r} is not one of {', '.join(MACS)}")
    return mac

#: largest frame accepted on the wire (header + body + MAC).
MAX_FRAME_BYTES = 64 << 20
#: largest body after decompression -- bounds memory a frame can make us allocate.
MAX_BODY_BYTES = 128 << 20
#: bodies at least this large are zstd-compressed (when it pays: COMPRESS_MIN_SAVING).
COMPRESS_THRESHOLD = 4096
#: ``encode_frame(..., min_saving=COMPRESS_MIN_SAVING)``: a body goes compressed only
#: when zstd makes it at least this fraction smaller.  Rows of float32 values gain about
#: 1.1x (measured: 1.08x on the values, 1.13x on a whole 10k-row push), which on a LAN
#: hop is not worth a compress at the sender and a decompress at the receiver; gossip
#: and knowledge maps gain far more and stay compressed.  The default (0.0) keeps any
#: gain: WAN links, and the simulator, which sizes messages with this codec.
COMPRESS_MIN_SAVING = 0.125
#: bodies at least this large are judged on a sample first (COMPRESS_SAMPLES slices of
#: COMPRESS_SAMPLE_BYTES, evenly spread): an incompressible multi-MiB push then costs a
#: 16 KiB trial compression, not a whole one.
COMPRESS_SAMPLE_FROM = 64 << 10
COMPRESS_SAMPLES = 8
COMPRESS_SAMPLE_BYTES = 2 << 10
#: zstd level: 1 is the fast end; update values compress poorly anyway.
ZSTD_LEVEL = 1
#: most rows in one delta on the wire.
MAX_DELTA_ROWS = 1 << 20
#: most deltas in one message.
MAX_DELTAS_PER_MSG = 4096
#: msgpack container limits (elements), applied while decoding.
MAX_ARRAY_LEN = 1 << 20
MAX_MAP_LEN = 1 << 16
MAX_STR_LEN = 1 << 16


class MsgType(enum.IntEnum):
    """Message types.  Append-only: never renumber or reuse a value."""

    PUBLISH = 1          #: publisher -> replica: deltas with versions
    REGISTER_MODEL = 2   #: publisher/CLI -> replica: a model spec
    GOSSIP = 3           #: replica -> replica: membership, catalog, summaries (p2p)
    PULL_REQUEST = 4     #: replica -> replica: knowledge for differing shards (p2p)
    PULL_RESPONSE = 5    #: replica -> replica: rows newer than the requester's knowledge (p2p)
    PUSH = 6             #: replica -> replica: eagerly pushed rows (p2p)
    ROLLBACK = 7         #: control: roll a model back to a cut (rollback)
    QUALITY = 8          #: inference -> replica: quality samples (rollback)
    CUT = 9              #: control: take a named cut (rollback)
    BASELINE = 10        #: control: pin a replica as a baseline to a cut, or unpin it (rollback)


@dataclass(frozen=True, slots=True)
class Frame:
    """A decoded frame: its type, its msgpack body and the key id that signed it.

    ``key_id`` is the id of the key whose HMAC was verified, 0 when none was (no
    trailer, or a trailer accepted unchecked because no keyring was given).
    """

    msg_type: MsgType
    body: dict[str, Any]
    key_id: int = 0
    wire_bytes: int = 0


@dataclass(frozen=True, slots=True)
class PublisherGrant:
    """What the holder of a publisher key may write: which models, for which origins.

    ``None`` means "any" (a grant must name at least one of the two; see
    :mod:`ekko.core.keyring`).

    Example:
        >>> g = PublisherGrant(frozenset({"ranker"}), frozenset({7}))
        >>> g.allows("ranker", 7), g.allows("ranker", 8), g.allows("ads", 7)
        (True, False, False)
    """

    models: frozenset[str] | None = None
    origins: frozenset[int] | None = None

    def allows(self, model: str, origin: int | None = None) -> bool:
        """May this key write ``model`` (as ``origin``, when given)?"""
        if self.models is not None and model not in self.models:
            return False
        return origin is None or self.origins is None or origin in self.origins


@dataclass(frozen=True, slots=True)
class ReaderGrant:
    """What the holder of a reader key may read: which models (``None``: any).

    Example:
        >>> ReaderGrant(frozenset({"ranker"})).allows("ranker"), ReaderGrant().allows("ads")
        (True, True)
    """

    models: frozenset[str] | None = None

    def allows(self, model: str | None) -> bool:
        """May this key read ``model`` (None: a read of no one model, such as the status)?"""
        return self.models is None or model is None or model in self.models


class Keyring:
    """Keys by id for HMAC-SHA256; the primary one signs, every one verifies.

    Several keys allow rotation with no downtime: add the new key everywhere
    (verify-only), make it primary everywhere, then drop the old one (see the
    README's Security section and ``ekko keys``).

    Keys come in two roles.  *Peer* keys (the cluster key) authenticate replica
    traffic and operator commands.  *Publisher* keys (those with a
    :class:`PublisherGrant` in ``grants``) authenticate trainers' publishes only,
    each limited to its models and origins; once a keyring holds any publisher key,
    publishes must be signed with one that allows them (publisher authorization),
    and a publisher key is refused everywhere else.

    Example:
        >>> kr = Keyring({1: b"secret-key"})
        >>> decode_frame(encode_frame(MsgType.GOSSIP, {"x": 1}, kr), kr).body
        {'x': 1}
        >>> acl = Keyring({1: b"peer-secret", 9: b"trainer-secret"}, primary=1,
        ...               grants={9: PublisherGrant(frozenset({"ranker"}), frozenset({7}))})
        >>> acl.is_peer(1), acl.is_peer(9), acl.acl
        (True, False, True)
    """

    def __init__(self, keys: Mapping[int, bytes] | None = None, primary: int | None = None,
                 grants: Mapping[int, PublisherGrant] | None = None,
                 readers: Mapping[int, ReaderGrant] | None = None, mac: str = DEFAULT_MAC) -> None:
        #: how frames are signed (every kind in MACS verifies): see DEFAULT_MAC.
        self.mac = check_mac(mac)
        self.keys: dict[int, bytes] = {}
        for kid, key in (keys or {}).items():
            if not 1 <= int(kid) <= 255:
                raise UsageError("key ids are 1..255")
            if not isinstance(key, (bytes, bytearray)) or len(key) < 8:
                raise UsageError("cluster keys must be at least 8 bytes")
            self.keys[int(kid)] = bytes(key)
        self.primary = primary if primary is not None else (min(self.keys) if self.keys else None)
        if self.primary is not None and self.primary not in self.keys:
            raise UsageError(f"primary key id {self.primary} not in keyring")
        self.grants: dict[int, PublisherGrant] = {}
        for kid, grant in (grants or {}).items():
            if int(kid) not in self.keys:
                raise UsageError(f"publisher grant for key id {kid}, which is not in the keyring")
            if not isinstance(grant, PublisherGrant):
                raise UsageError("grants must be PublisherGrant objects")
            self.grants[int(kid)] = grant
        self.readers: dict[int, ReaderGrant] = {}
        for kid, rg in (readers or {}).items():
            if int(kid) not in self.keys or int(kid) in self.grants:
                raise UsageError(f"reader grant for key id {kid}, which is not a key of its own in the keyring")
            if not isinstance(rg, ReaderGrant):
                raise UsageError("readers must be ReaderGrant objects")
            self.readers[int(kid)] = rg

    def with_mac(self, mac: str | None) -> "Keyring":
        """This keyring signing with ``mac`` (None: unchanged); the same keys and grants.

        Example:
            >>> Keyring({1: b"secret-key"}).with_mac("hmac-sha256").mac
            'hmac-sha256'
        """
        if mac is None or mac == self.mac:
            return self
        return Keyring(self.keys, self.primary, self.grants, self.readers, mac)

    @classmethod
    def single(cls, key: bytes | str | None) -> "Keyring | None":
        if key is None:
            return None
        return cls({1: key.encode() if isinstance(key, str) else key})

    @property
    def acl(self) -> bool:
        """True when publisher authorization is on (the keyring holds publisher keys)."""
        return bool(self.grants)

    @property
    def read_acl(self) -> bool:
        """True when the keyring holds reader keys.  (A daemon with any key at all refuses
        unsigned reads: :mod:`ekko.core.read_auth`.)"""
        return bool(self.readers)

    def is_peer(self, key_id: int) -> bool:
        """True for a peer (cluster) key of this keyring."""
        return key_id in self.keys and key_id not in self.grants and key_id not in self.readers

    def reader(self, key_id: int) -> ReaderGrant | None:
        """The grant of a reader key; None for other keys and unknown ids."""
        return self.readers.get(key_id)

    def grant(self, key_id: int) -> PublisherGrant | None:
        """The grant of a publisher key; None for peer keys and unknown ids."""
        return self.grants.get(key_id)

    def __bool__(self) -> bool:
        return bool(self.keys)


_BLAKE3_KEYS: dict[bytes, bytes] = {}


def _mac(key: bytes, header: bytes, body: bytes | memoryview, keyed_blake3: bool) -> bytes:
    if keyed_blake3:
        derived = _BLAKE3_KEYS.get(key)
        if derived is None:
            # Keyed BLAKE3 takes exactly 32 bytes; derive them (keys are >= 8 bytes, any length).
            derived = _BLAKE3_KEYS[key] = blake3.blake3(key, derive_key_context=BLAKE3_MAC_CONTEXT).digest()
        h = blake3.blake3(header, key=derived)
    else:
        h = hmac.new(key, header, hashlib.sha256)
    h.update(body)
    return h.digest()


# zstd contexts are not safe to share between threads (the C backend releases the GIL
# while it works), and a daemon may decode on an executor: one pair per thread.
_zstd = threading.local()


def _compressor() -> zstandard.ZstdCompressor:
    c = getattr(_zstd, "c", None)
    if c is None:
        c = _zstd.c = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    return c


def _decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_zstd, "d", None)
    if d is None:
        d = _zstd.d = zstandard.ZstdDecompressor()
    return d


def _decompress_body(payload: bytes) -> bytes:
    """Decompress one zstd frame of at most MAX_BODY_BYTES; ProtocolError otherwise."""
    try:
        declared = zstandard.get_frame_parameters(payload).content_size
    except zstandard.ZstdError as e:
        raise ProtocolError(f"bad zstd frame header: {e}", "bad_compression") from None
    # The encoder always declares the size (ZstdCompressor.compress does), so demand it:
    # then the bound is checked before anything is allocated.  (max_output_size alone
    # does not do it: a declared size is allocated up front, and a forged header
    # claiming a terabyte was a MemoryError, a few hundred MB a memory spike.)
    if declared == zstandard.CONTENTSIZE_UNKNOWN:
        raise ProtocolError("zstd frame does not declare its content size", "bad_compression")
    if declared > MAX_BODY_BYTES:
        raise ProtocolError(f"zstd frame declares {declared} bytes, over MAX_BODY_BYTES={MAX_BODY_BYTES}",
                            "too_large")
    try:
        # allow_extra_data=False: the body is exactly one frame, no trailing bytes.
        out = _decompressor().decompress(payload, max_output_size=MAX_BODY_BYTES, allow_extra_data=False)
    except zstandard.ZstdError as e:
        raise ProtocolError(f"bad zstd body: {e}", "bad_compression") from None
    if len(out) > MAX_BODY_BYTES:
        raise ProtocolError("decompressed body too large", "too_large")
    return out


def _compressed(payload: bytes, min_saving: float) -> bytes | None:
    """The payload zstd-compressed, or None when that saves less than ``min_saving``
    (a fraction; 0: any gain)."""
    c = _compressor()
    n = len(payload)
    if min_saving > 0 and n >= COMPRESS_SAMPLE_FROM:
        k, step = COMPRESS_SAMPLE_BYTES, n // COMPRESS_SAMPLES
        # payload[a:a + k], not payload[a:][:k]: that copied the payload's tail per slice.
        sample = b"".join(payload[a:a + k] for a in (i * step + (step - k) // 2 for i in range(COMPRESS_SAMPLES)))
        if len(c.compress(sample)) > len(sample) * (1.0 - min_saving):
            return None
        min_saving = 0.0   # the sample said it pays: any gain will do now
    packed = c.compress(payload)
    return packed if len(packed) < n and len(packed) <= n * (1.0 - min_saving) else None


def encode_frame(msg_type: MsgType | int, body: Mapping[str, Any], keyring: Keyring | None = None,
                 compress_threshold: int = COMPRESS_THRESHOLD, min_saving: float = 0.0) -> bytes:
    """Encode one frame; raises :class:`UsageError` for a body over the limits.

    Bodies of ``compress_threshold`` bytes or more are zstd-compressed when that makes
    them smaller by at least ``min_saving`` (a fraction; see COMPRESS_MIN_SAVING).
    """
    payload = msgpack.packb(body, use_bin_type=True)
    if len(payload) > MAX_BODY_BYTES:
        raise UsageError(f"frame body of {len(payload)} bytes exceeds MAX_BODY_BYTES={MAX_BODY_BYTES}")
    flags = 0
    if len(payload) >= compress_threshold:
        packed = _compressed(payload, min_saving)
        if packed is not None:
            payload, flags = packed, flags | FLAG_ZSTD
    key_id = 0
    if keyring:
        flags |= FLAG_MAC | (FLAG_BLAKE3 if keyring.mac == "blake3" else 0)
        key_id = keyring.primary  # type: ignore[assignment]
    header = HEADER.pack(MAGIC, FORMAT_VERSION, int(msg_type), flags, key_id, 0, len(payload))
    if HEADER_BYTES + len(payload) + (MAC_BYTES if keyring else 0) > MAX_FRAME_BYTES:
        raise UsageError(f"frame exceeds MAX_FRAME_BYTES={MAX_FRAME_BYTES}; send smaller batches")
    if keyring:
        # One join: header + payload + mac copied a multi-MB payload twice.
        return b"".join((header, payload, _mac(keyring.keys[key_id], header, payload, bool(flags & FLAG_BLAKE3))))
    return header + payload


def decode_frame(data: bytes, keyring: Keyring | None = None, require_mac: bool | None = None) -> Frame:
    """Decode and check one frame.

    Args:
        data: the frame bytes.
        keyring: keys to verify the HMAC with.
        require_mac: refuse frames without a valid MAC; defaults to "a keyring is set".

    Raises:
        ProtocolError: for every kind of bad input (and only that).
    """
    if require_mac is None:
        require_mac = bool(keyring)
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError("frame must be bytes", "malformed")
    data = bytes(data)
    if len(data) > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame of {len(data)} bytes exceeds {MAX_FRAME_BYTES}", "too_large")
    if len(data) < HEADER_BYTES:
        raise ProtocolError("frame shorter than its header", "truncated")
    magic, version, mtype, flags, key_id, reserved, length = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ProtocolError("bad magic: not an ekko frame", "bad_magic")
    if version != FORMAT_VERSION:
        raise ProtocolError(f"unsupported frame format {version} (this build speaks {FORMAT_VERSION})",
                            "bad_version")
    try:
        msg_type = MsgType(mtype)
    except ValueError:
        raise ProtocolError(f"unknown message type {mtype}", "bad_type") from None
    if flags & ~_KNOWN_FLAGS or reserved or (flags & FLAG_BLAKE3 and not flags & FLAG_MAC):
        raise ProtocolError("unknown flags or non-zero reserved field", "malformed")
    has_mac = bool(flags & FLAG_MAC)
    want = HEADER_BYTES + length + (MAC_BYTES if has_mac else 0)
    if len(data) != want:
        raise ProtocolError(f"frame length {len(data)} does not match header ({want})",
                            "truncated" if len(data) < want else "malformed")
    # A view, not a slice: slicing copied every multi-MB push once more.
    header, payload = data[:HEADER_BYTES], memoryview(data)[HEADER_BYTES:HEADER_BYTES + length]
    verified = False
    if has_mac:
        key = keyring.keys.get(key_id) if keyring else None
        if key is None:
            if require_mac or keyring:
                raise ProtocolError(f"frame signed with unknown key id {key_id}", "bad_mac")
        elif not hmac.compare_digest(_mac(key, header, payload, bool(flags & FLAG_BLAKE3)),
                                     data[HEADER_BYTES + length:]):
            raise ProtocolError("MAC check failed: wrong cluster key or tampered frame", "bad_mac")
        else:
            verified = True
    elif require_mac:
        raise ProtocolError("unauthenticated frame: this cluster requires an HMAC", "unauthenticated")
    if flags & FLAG_ZSTD:
        payload = _decompress_body(payload)
    try:
        body = msgpack.unpackb(payload, raw=False, strict_map_key=True, max_bin_len=MAX_BODY_BYTES,
                               max_str_len=MAX_STR_LEN, max_array_len=MAX_ARRAY_LEN,
                               max_map_len=MAX_MAP_LEN, max_ext_len=0)
    except Exception as e:  # msgpack raises a zoo of types (ValueError, ExtraData, FormatError, ...)
        raise ProtocolError(f"bad msgpack body: {type(e).__name__}", "bad_body") from None
    if not isinstance(body, dict):
        raise ProtocolError("frame body must be a map", "bad_body")
    # key_id says who signed only when we checked it; an unchecked trailer proves nothing.
    return Frame(msg_type, body, key_id if verified else 0, len(data))


# --- typed field access for decoded bodies -----------------------------------------------

def field(body: Mapping[str, Any], name: str, kind: type | tuple[type, ...], optional: bool = False,
          default: Any = None) -> Any:
    """Fetch ``body[name]`` checking its type; raises :class:`ProtocolError`."""
    if name not in body:
        if optional:
            return default
        raise ProtocolError(f"missing field {name!r}", "bad_body")
    v = body[name]
    if optional and v is None:
        return default
    if isinstance(v, bool) and kind in (int, (int, float)) or not isinstance(v, kind):
        raise ProtocolError(f"field {name!r} has the wrong type", "bad_body")
    return v


def int_field(body: Mapping[str, Any], name: str, lo: int, hi: int, optional: bool = False,
              default: int | None = None) -> int:
    v = field(body, name, int, optional, default)
    if v is None:
        return v  # type: ignore[return-value]
    if not lo <= v <= hi:
        raise ProtocolError(f"field {name!r}={v} out of range {lo}..{hi}", "bad_body")
    return v


def array_to_wire(a: np.ndarray | None) -> bytes | None:
    if a is None:
        return None
    return np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<"), copy=False).tobytes()


def array_from_wire(buf: Any, dtype: Any, count: int, name: str, width: int = 1) -> np.ndarray:
    """Decode ``count * width`` little-endian elements of ``dtype``; checks the length."""
    if not isinstance(buf, bytes):
        raise ProtocolError(f"{name} must be bytes", "bad_body")
    dt = np.dtype(dtype).newbyteorder("<")
    if len(buf) != count * width * dt.itemsize:
        raise ProtocolError(f"{name}: expected {count * width} elements of {dt.name}, got {len(buf)} bytes",
                            "bad_body")
    arr = np.frombuffer(buf, dtype=dt).astype(np.dtype(dtype), copy=True)
    return arr.reshape(count, width) if width > 1 or name == "values" else arr


def delta_to_wire(d: Delta) -> dict[str, Any]:
    """A delta as a msgpack-ready map."""
    out: dict[str, Any] = {"m": d.model, "t": d.table, "n": len(d), "ids": array_to_wire(d.ids),
                           "v": array_to_wire(d.versions)}
    if d.values is not None:
        out["x"] = array_to_wire(d.values)
    if d.tombstone is not None and d.tombstone.any():
        out["del"] = np.packbits(d.tombstone).tobytes()
    if d.impact is not None:
        out["imp"] = array_to_wire(d.impact)
    return out


def delta_from_wire(body: Any, lookup: Callable[[str, str], TableSpec | None],
                    values_required: bool = True) -> Delta:
    """Decode a delta map, validating it against the table's spec.

    Args:
        body: the decoded map.
        lookup: ``(model, table) -> TableSpec`` or None when unknown.
        values_required: refuse deltas without values (replicas that hold values).

    Raises:
        ProtocolError: malformed, unknown table, out-of-range ids or versions.
    """
    if not isinstance(body, dict):
        raise ProtocolError("delta must be a map", "bad_body")
    model = field(body, "m", str)
    table = field(body, "t", str)
    spec = lookup(model, table)
    if spec is None:
        raise ProtocolError(f"unknown table {model}/{table}", "unknown_table")
    n = int_field(body, "n", 0, MAX_DELTA_ROWS)
    ids = array_from_wire(body.get("ids"), np.int64, n, "ids")
    versions = array_from_wire(body.get("v"), np.int64, n, "versions")
    values = None
    if "x" in body and body["x"] is not None:
        values = array_from_wire(body["x"], WIRE_DTYPES[spec.dtype], n, "values", spec.width).reshape(n, spec.width)
    elif values_required:
        raise ProtocolError(f"delta {model}/{table} carries no values", "bad_body")
    tomb = None
    if body.get("del") is not None:
        raw = field(body, "del", bytes)
        if len(raw) != (n + 7) // 8:
            raise ProtocolError("tombstone bitmap has the wrong length", "bad_body")
        tomb = np.unpackbits(np.frombuffer(raw, np.uint8), count=n).astype(bool)
    impact = None
    if body.get("imp") is not None:
        impact = array_from_wire(body["imp"], np.float32, n, "impact")
    d = Delta(model, table, ids, versions, values, tomb, impact)
    d.check(spec, error=ProtocolError)
    return d
