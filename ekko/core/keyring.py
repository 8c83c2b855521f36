"""Keyring files: the keys a daemon or publisher holds, on disk, for rotation.

A keyring file is JSON, readable by its owner only (``chmod 600``)::

    {
      "format": 1,
      "primary": 2,
      "keys": [
        {"id": 1, "role": "peer", "secret": "<base64>"},
        {"id": 2, "role": "peer", "secret": "<base64>"},
        {"id": 9, "role": "publisher", "secret": "<base64>",
         "models": ["ranker"], "origins": ["trainer-0", 17]}
      ]
    }

* ``id`` 1..255 travels in every frame header, so a receiver knows which key to
  verify with; ``secret`` is base64 (at least :data:`MIN_SECRET_BYTES` bytes).
* ``primary`` is the key this holder signs with; every other key only verifies
  (that is what makes a rotation possible without downtime).
* ``mac`` (optional): how frames are signed, ``"blake3"`` (keyed BLAKE3, the default)
  or ``"hmac-sha256"`` (what daemons before keyed BLAKE3 verify: set it while a cluster
  upgrades, then drop it).  Both are always verified.
* ``role``: ``peer`` keys (the cluster key) authenticate replica traffic, operator
  commands and reads.  ``reader`` keys authenticate reads only (``GET`` requests,
  :mod:`ekko.core.read_auth`), limited to ``models`` when given.  A daemon whose
  keyring holds any key answers unsigned reads with 401 (``open_metrics`` opens
  ``/metrics`` alone).  ``publisher`` keys authenticate publishes only, limited to
  ``models`` (names) and ``origins`` (publisher names or integer ids); either list
  left out means "any".  A daemon whose keyring holds a publisher key accepts a
  publish only when it is signed by a publisher key that allows its model and
  origin (403 otherwise); see :class:`ekko.core.codec.Keyring`.

:func:`load_keyring` refuses a file that other users can read or write, with an
error that says how to fix it.  ``ekko keys`` (:mod:`ekko.cli.keys`) edits these
files; :func:`save_keyring` writes them atomically with mode 0600.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import secrets
import stat
from pathlib import Path
from typing import Any

from ekko.core.codec import DEFAULT_MAC, Keyring, PublisherGrant, ReaderGrant, check_mac
from ekko.core.errors import UsageError
from ekko.core.version import origin_id

#: format of keyring files this build reads and writes.
KEYRING_FORMAT = 1
#: shortest secret a keyring file may hold (bytes).
MIN_SECRET_BYTES = 16
#: bytes of a secret ``ekko keys`` generates (as long as the HMAC-SHA256 block's hash).
NEW_SECRET_BYTES = 32
#: largest keyring file read (255 keys with long grants fit many times over).
MAX_KEYRING_FILE_BYTES = 1 << 20
#: permission bits that must be clear: nobody but the owner (and its group) may touch keys.
FORBIDDEN_MODE_BITS = stat.S_IRWXO
ROLES = ("peer", "publisher", "reader")


def fingerprint(secret: bytes) -> str:
    """A short, non-secret name of a key: compare files across machines without showing keys."""
    return hashlib.sha256(b"ekko-key-fingerprint\0" + secret).hexdigest()[:16]


def new_secret() -> bytes:
    return secrets.token_bytes(NEW_SECRET_BYTES)


def check_permissions(path: str | Path) -> None:
    """Refuse a key file that other users can read or write (a leaked key is a forged frame)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise UsageError(f"cannot read keyring {path}: {e}") from None
    if mode & FORBIDDEN_MODE_BITS:
        raise UsageError(f"keyring {path} is accessible by other users (mode {stat.S_IMODE(mode):04o}); "
                         f"run: chmod 600 {path}")


def _decode_secret(raw: Any, kid: Any) -> bytes:
    if not isinstance(raw, str):
        raise UsageError(f"key {kid}: secret must be a base64 string")
    try:
        secret = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise UsageError(f"key {kid}: secret is not valid base64") from None
    if len(secret) < MIN_SECRET_BYTES:
        raise UsageError(f"key {kid}: secret has {len(secret)} bytes, fewer than MIN_SECRET_BYTES={MIN_SECRET_BYTES}")
    return secret


def _grant_of(entry: dict[str, Any], kid: int) -> PublisherGrant:
    models = entry.get("models")
    origins = entry.get("origins")
    if models is not None and (not isinstance(models, list) or not all(isinstance(m, str) and m for m in models)):
        raise UsageError(f"key {kid}: models must be a list of model names")
    if origins is not None:
        if not isinstance(origins, list) or not all(isinstance(o, (str, int)) and not isinstance(o, bool)
                                                    for o in origins):
            raise UsageError(f"key {kid}: origins must be a list of publisher names or ids")
        origins = [origin_id(o) for o in origins]
    return PublisherGrant(None if models is None else frozenset(models),
                          None if origins is None else frozenset(origins))


def validate(doc: Any) -> Keyring:
    """Check a keyring document (the parsed JSON) and build its :class:`Keyring`."""
    if not isinstance(doc, dict):
        raise UsageError("keyring must be a JSON object")
    if doc.get("format") != KEYRING_FORMAT:
        raise UsageError(f"keyring format {doc.get('format')!r} is not {KEYRING_FORMAT}")
    unknown = set(doc) - {"format", "primary", "keys", "mac"}
    if unknown:
        raise UsageError(f"unknown keyring fields {sorted(unknown)}")
    entries = doc.get("keys")
    if not isinstance(entries, list) or not entries:
        raise UsageError("keyring holds no keys")
    keys: dict[int, bytes] = {}
    grants: dict[int, PublisherGrant] = {}
    readers: dict[int, ReaderGrant] = {}
    for e in entries:
        if not isinstance(e, dict):
            raise UsageError("each key must be a JSON object")
        kid = e.get("id")
        if not isinstance(kid, int) or isinstance(kid, bool) or not 1 <= kid <= 255:
            raise UsageError(f"key id {kid!r} must be an integer in 1..255")
        if kid in keys:
            raise UsageError(f"key id {kid} appears twice")
        bad = set(e) - {"id", "role", "secret", "models", "origins", "created"}
        if bad:
            raise UsageError(f"key {kid}: unknown fields {sorted(bad)}")
        role = e.get("role", "peer")
        if role not in ROLES:
            raise UsageError(f"key {kid}: role must be one of {ROLES}")
        if role == "peer" and ("models" in e or "origins" in e):
            raise UsageError(f"key {kid}: models/origins apply to publisher keys only (models to reader keys too)")
        if role == "reader" and "origins" in e:
            raise UsageError(f"key {kid}: origins apply to publisher keys only")
        keys[kid] = _decode_secret(e.get("secret"), kid)
        if role == "publisher":
            grants[kid] = _grant_of(e, kid)
        elif role == "reader":
            readers[kid] = ReaderGrant(_grant_of(e, kid).models)
    primary = doc.get("primary")
    if not isinstance(primary, int) or isinstance(primary, bool) or primary not in keys:
        raise UsageError(f"primary key id {primary!r} is not in the keyring")
    return Keyring(keys, primary, grants, readers, check_mac(doc.get("mac", DEFAULT_MAC), "keyring mac"))


def read_doc(path: str | Path, check_mode: bool = True) -> dict[str, Any]:
    """Read and validate a keyring file; returns the document."""
    if check_mode:
        check_permissions(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_KEYRING_FILE_BYTES + 1)
    except OSError as e:
        raise UsageError(f"cannot read keyring {path}: {e}") from None
    if len(raw) > MAX_KEYRING_FILE_BYTES:
        raise UsageError(f"keyring {path} exceeds MAX_KEYRING_FILE_BYTES={MAX_KEYRING_FILE_BYTES}")
    try:
        doc = json.loads(raw)
    except ValueError as e:
        raise UsageError(f"keyring {path} is not valid JSON: {e}") from None
    try:
        validate(doc)
    except UsageError as e:
        raise UsageError(f"keyring {path}: {e}") from None
    return doc


def load_keyring(path: str | Path) -> Keyring:
    """Load a keyring file (permissions checked).

    Example:
        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "ring.json")
        >>> save_keyring(p, new_doc(key_id=3))
        >>> load_keyring(p).primary
        3

    Raises:
        UsageError: unreadable, readable by others, malformed, or inconsistent.
    """
    return validate(read_doc(path))


def save_keyring(path: str | Path, doc: dict[str, Any]) -> None:
    """Validate ``doc`` and write it atomically, mode 0600 from the first byte."""
    validate(doc)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.unlink()
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(json.dumps(doc, indent=1).encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def key_entry(key_id: int, secret: bytes, role: str = "peer", models: list[str] | None = None,
              origins: list[str | int] | None = None) -> dict[str, Any]:
    e: dict[str, Any] = {"id": int(key_id), "role": role, "secret": base64.b64encode(secret).decode()}
    if models is not None:
        e["models"] = list(models)
    if origins is not None:
        e["origins"] = list(origins)
    return e


def new_doc(key_id: int = 1, secret: bytes | None = None) -> dict[str, Any]:
    """A keyring with one peer key, which is primary."""
    return {"format": KEYRING_FORMAT, "primary": int(key_id),
            "keys": [key_entry(key_id, secret if secret is not None else new_secret())]}


def describe(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """One line per key for display: id, role, primary, grants and fingerprint -- never the secret."""
    out = []
    for e in sorted(doc["keys"], key=lambda e: e["id"]):
        secret = base64.b64decode(e["secret"])
        out.append({"id": e["id"], "role": e.get("role", "peer"), "primary": e["id"] == doc["primary"],
                    "models": e.get("models"), "origins": e.get("origins"), "fingerprint": fingerprint(secret)})
    return out
