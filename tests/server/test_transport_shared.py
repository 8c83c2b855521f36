"""HttpTransport encodes a push once for all its destinations (issue #15)."""

import asyncio
from types import SimpleNamespace

import pytest

from ekko.core.codec import COMPRESS_MIN_SAVING, Keyring, MsgType, decode_frame
from ekko.core.config import preset
from ekko.core.errors import UsageError
from ekko.core.messages import Outgoing
from ekko.server.driver import NodeDriver
from ekko.server.transport import HttpTransport, share_key


def test_push_to_several_peers_is_encoded_once():
    kr = Keyring({1: b"cluster-secret"})
    deltas = [{"m": "m", "t": "t", "n": 0, "ids": b"", "v": b""}]
    frames = []

    async def go():
        t = HttpTransport(kr, timeout_s=2, connect_timeout_s=1)
        t.on_failed = lambda out, reason: None
        await t.start()
        for port in (9, 11, 13):   # nothing listens: the sends fail after encoding
            body = {"from": "a", "dc": "dc1", "deltas": deltas}   # one body per peer, shared rows
            assert t.send(Outgoing(f"p{port}", f"127.0.0.1:{port}", MsgType.PUSH, body))
        other = {"from": "a", "dc": "dc1", "deltas": list(deltas)}   # other rows: its own frame
        assert t.send(Outgoing("q", "127.0.0.1:15", MsgType.PUSH, other))
        t.send(Outgoing("g", "127.0.0.1:17", MsgType.GOSSIP, {"k": "g"}))  # never shared
        await t.close(timeout=5)
        assert not t._shared   # released once every send finished
        out = Outgoing("x", "x", MsgType.PUSH, {"from": "a", "dc": "dc1", "deltas": deltas})
        frames.append(t._frame_of(out, share_key(out)))
        return t

    t = asyncio.run(go())
    assert t.frames_encoded - 1 == 3 and t.frames_reused == 2   # push, other push, gossip
    assert decode_frame(frames[0], kr).body["deltas"][0]["m"] == "m"


def test_cross_dc_frames_compress_by_the_configured_rule():
    """Inside a DC compression must save COMPRESS_MIN_SAVING; across DCs the config says:
    any gain for ``lan``/``wan`` (WAN bytes are scarce), the LAN rule for ``local`` (every
    DC on one machine: a float32 push gains ~12% for a full compress and decompress)."""
    def rule(config, dst_dc):
        fake = SimpleNamespace(node=SimpleNamespace(dc="dc1", config=config),
                               dc_of=lambda node_id, address="": dst_dc)
        return NodeDriver._min_saving(fake, Outgoing("p", "127.0.0.1:1", MsgType.PUSH, {}))

    for name in ("local", "lan", "wan"):
        assert rule(preset(name), "dc1") == COMPRESS_MIN_SAVING
    assert rule(preset("local"), "dc2") == COMPRESS_MIN_SAVING
    assert rule(preset("lan"), "dc2") == 0.0 and rule(preset("wan"), "dc2") == 0.0
    assert rule(preset("wan", cross_dc_min_saving=0.3), "dc2") == 0.3
    with pytest.raises(UsageError, match="cross_dc_min_saving"):
        preset("local", cross_dc_min_saving=1.5)
