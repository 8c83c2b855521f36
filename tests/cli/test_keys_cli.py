"""``ekko keys`` and the keyring file format (ekko/core/keyring.py, ekko/cli/keys.py)."""

from __future__ import annotations

import base64
import json
import os
import stat

import pytest

from ekko.cli.main import main
from ekko.core.codec import MsgType, decode_frame, encode_frame
from ekko.core.errors import ProtocolError, UsageError
from ekko.core.keyring import (
    MIN_SECRET_BYTES,
    fingerprint,
    load_keyring,
    new_doc,
    read_doc,
    save_keyring,
    validate,
)
from ekko.core.version import origin_id


def keys(*argv: str) -> int:
    return main(["keys", *map(str, argv)])


def secrets_of(path) -> list[str]:
    return [e["secret"] for e in json.loads(open(path).read())["keys"]]


def test_new_add_promote_remove_list(tmp_path, capsys):
    ring = tmp_path / "ring.json"
    assert keys("new", ring) == 0
    assert stat.S_IMODE(os.stat(ring).st_mode) == 0o600
    kr1 = load_keyring(ring)
    assert kr1.primary == 1 and len(kr1.keys[1]) == 32
    assert keys("new", ring) == 2, "an existing keyring is not overwritten by accident"
    assert "exists" in capsys.readouterr().err

    assert keys("add", ring, "--id", 2) == 0
    kr = load_keyring(ring)
    assert sorted(kr.keys) == [1, 2] and kr.primary == 1, "an added key verifies but does not sign"
    assert kr.keys[1] == kr1.keys[1] and kr.keys[2] != kr.keys[1]
    assert keys("add", ring, "--id", 2) == 2  # ids are unique

    assert keys("remove", ring, "--id", 1) == 2
    assert "promote another key first" in capsys.readouterr().err
    assert keys("promote", ring, "--id", 2) == 0
    assert load_keyring(ring).primary == 2
    assert keys("remove", ring, "--id", 1) == 0
    kr = load_keyring(ring)
    assert sorted(kr.keys) == [2] and kr.primary == 2
    assert keys("promote", ring, "--id", 9) == 2

    capsys.readouterr()
    assert keys("list", ring) == 0
    out = capsys.readouterr().out
    assert fingerprint(kr.keys[2]) in out
    for s in secrets_of(ring):
        assert s not in out, "list never prints a secret"
    assert keys("list", ring, "--json") == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows == [{"id": 2, "role": "peer", "primary": True, "models": None, "origins": None,
                     "fingerprint": fingerprint(kr.keys[2])}]


def test_world_readable_keyring_is_refused_with_a_fix(tmp_path, capsys):
    ring = tmp_path / "ring.json"
    assert keys("new", ring) == 0
    os.chmod(ring, 0o644)
    with pytest.raises(UsageError, match=r"accessible by other users \(mode 0644\); run: chmod 600"):
        load_keyring(ring)
    assert keys("list", ring) == 2 and "chmod 600" in capsys.readouterr().err
    os.chmod(ring, 0o640)  # a service group may read it
    assert load_keyring(ring).primary == 1


def test_publisher_keys_carry_a_grant_and_copy_between_files(tmp_path, capsys):
    cluster = tmp_path / "cluster.json"
    trainer = tmp_path / "trainer.json"
    assert keys("new", cluster) == 0
    assert keys("add", cluster, "--id", 9, "--model", "ranker") == 2  # a grant needs --publisher
    assert keys("add", cluster, "--id", 9, "--publisher", "--model", "ranker", "--origin", "trainer-0",
                "--origin", 17) == 0
    kr = load_keyring(cluster)
    g = kr.grant(9)
    assert g is not None and g.models == {"ranker"} and g.origins == {origin_id("trainer-0"), 17}
    assert kr.is_peer(1) and not kr.is_peer(9) and kr.acl
    # The trainer's own file: only its key, primary -- it never sees the cluster key.
    assert keys("add", trainer, "--id", 9, "--from", cluster) == 0
    tk = load_keyring(trainer)
    assert sorted(tk.keys) == [9] and tk.primary == 9 and tk.keys[9] == kr.keys[9]
    assert tk.grant(9) == g
    frame = encode_frame(MsgType.PUBLISH, {"model": "ranker"}, tk)
    assert decode_frame(frame, kr).key_id == 9
    capsys.readouterr()
    assert keys("list", cluster) == 0
    assert "models=ranker" in capsys.readouterr().out


def _doc(**edit):
    doc = new_doc(1, b"k" * MIN_SECRET_BYTES)
    doc.update(edit)
    return doc


@pytest.mark.parametrize("doc, match", [
    ([], "JSON object"),
    (_doc(format=2), "format"),
    (_doc(keys=[]), "no keys"),
    (_doc(primary=5), "primary key id 5"),
    (_doc(extra=1), "unknown keyring fields"),
    (_doc(mac="sha1"), "keyring mac 'sha1'"),
    (_doc(keys=[{"id": 0, "secret": base64.b64encode(b"k" * 16).decode()}]), "1..255"),
    (_doc(keys=[{"id": 1, "secret": "not base64!"}]), "base64"),
    (_doc(keys=[{"id": 1, "secret": base64.b64encode(b"short").decode()}]), "MIN_SECRET_BYTES"),
    (_doc(keys=[{"id": 1, "secret": base64.b64encode(b"k" * 16).decode()}] * 2), "twice"),
    (_doc(keys=[{"id": 1, "role": "admin", "secret": base64.b64encode(b"k" * 16).decode()}]), "role"),
    (_doc(keys=[{"id": 1, "secret": base64.b64encode(b"k" * 16).decode(), "models": ["m"]}]), "publisher keys only"),
    (_doc(keys=[{"id": 1, "role": "publisher", "secret": base64.b64encode(b"k" * 16).decode(), "origins": [0]}]),
     "origin id"),
])
def test_malformed_keyrings_are_refused(doc, match):
    with pytest.raises(UsageError, match=match):
        validate(doc)


def test_a_keyring_file_names_how_it_signs_frames():
    assert validate(_doc()).mac == "blake3"
    assert validate(_doc(mac="hmac-sha256")).mac == "hmac-sha256"


def test_bad_files_are_refused_and_never_half_written(tmp_path):
    ring = tmp_path / "ring.json"
    with pytest.raises(UsageError, match="cannot read"):
        load_keyring(ring)
    fd = os.open(ring, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"{not json")
    os.close(fd)
    with pytest.raises(UsageError, match="not valid JSON"):
        load_keyring(ring)
    save_keyring(ring, new_doc(4))
    with pytest.raises(UsageError):
        save_keyring(ring, _doc(primary=99))
    assert read_doc(ring)["primary"] == 4, "a refused save leaves the old file"
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_removed_key_no_longer_verifies(tmp_path):
    ring = tmp_path / "ring.json"
    save_keyring(ring, new_doc(1))
    assert keys("add", ring, "--id", 2) == 0
    old = load_keyring(ring)
    frame = encode_frame(MsgType.GOSSIP, {"x": 1}, old)  # signed with key 1
    assert keys("promote", ring, "--id", 2) == 0 and keys("remove", ring, "--id", 1) == 0
    with pytest.raises(ProtocolError, match="unknown key id 1"):
        decode_frame(frame, load_keyring(ring))


def test_daemon_takes_a_keyring_flag_or_config_key_and_refuses_a_readable_one(tmp_path, capsys):
    from ekko.cli.main import build_parser, daemon_settings

    ring = tmp_path / "ring.json"
    save_keyring(ring, new_doc(1))
    base = ["daemon", "--node-id", "r1", "--dc", "dc1", "--listen", "127.0.0.1:1", "--data-dir", str(tmp_path / "d")]
    settings, _ = daemon_settings(build_parser().parse_args([*base, "--keyring", str(ring)]))
    assert settings["keyring_file"] == str(ring)
    cfg = tmp_path / "r1.toml"
    cfg.write_text(f'[daemon]\nkeyring_file = "{ring}"\n')
    settings, _ = daemon_settings(build_parser().parse_args([*base, "--config", str(cfg)]))
    assert settings["keyring_file"] == str(ring)
    os.chmod(ring, 0o604)
    assert main([*base, "--keyring", str(ring)]) == 2
    assert "chmod 600" in capsys.readouterr().err
    os.chmod(ring, 0o600)
    key = tmp_path / "cluster.key"
    key.write_bytes(b"k" * 16)
    assert main([*base, "--keyring", str(ring), "--key-file", str(key)]) == 2
    assert "not both" in capsys.readouterr().err
