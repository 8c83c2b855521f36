"""The publisher's pending-frames record (ekko.sdk.state): what a restart restores after
a crash at any point of a write, and the files of earlier versions."""

from __future__ import annotations

import msgpack
import numpy as np

from ekko.core.chain import PendingFrame
from ekko.sdk.state import PublisherState, pending_frames


def frame(model: str, first: int) -> PendingFrame:
    body = {"model": model, "origin": 7, "deltas": [{"ids": np.arange(4, dtype=np.int64).tobytes()}], "chains": {}}
    return PendingFrame(model, body, {("t", 0): first + 3}, first, first + 3, 4)


def test_a_torn_write_leaves_the_previous_record_whole(tmp_path):
    st = PublisherState(tmp_path, "o")
    st.load()
    st.save_pending([frame("a", 10)])              # durable: slot 0
    st.save_pending([frame("a", 10), frame("b", 20)])   # durable: slot 1
    st.close()
    # A crash while writing the next record (it goes to slot 0, never the newest durable one):
    # its bytes stop half way.
    torn = tmp_path / "o.pending.0"
    torn.write_bytes(torn.read_bytes()[: len(torn.read_bytes()) // 2])
    got = pending_frames(tmp_path, "o")
    assert sorted(got) == ["a", "b"] and got["b"].first_counter == 20
    # A flipped bit fails the CRC the same way.
    good = tmp_path / "o.pending.1"
    data = bytearray(good.read_bytes())
    data[-5] ^= 0x40
    good.write_bytes(bytes(data))
    assert pending_frames(tmp_path, "o") == {}   # both slots unusable: nothing is invented


def test_the_newest_record_wins_and_an_acknowledged_frame_is_gone(tmp_path):
    st = PublisherState(tmp_path, "o")
    st.load()
    st.save_pending([frame("a", 10)])
    st.save_pending([])                  # acknowledged (not synced: losing it only re-sends "a")
    st.close()
    assert pending_frames(tmp_path, "o") == {}
    st = PublisherState(tmp_path, "o")
    assert st.load()[1] == {}
    st.save_pending([frame("c", 30)])     # after a restart the sequence goes on
    st.close()
    assert list(pending_frames(tmp_path, "o")) == ["c"]


def test_every_write_goes_to_the_slot_without_the_newest_durable_record(tmp_path):
    st = PublisherState(tmp_path, "o")
    st.load()
    st.save_pending([frame("a", 10)])    # durable in slot 0
    before = (tmp_path / "o.pending.0").read_bytes()
    st.save_pending([])                  # unsynced: slot 1
    st.save_pending([frame("b", 20)])    # durable: slot 1 again (slot 0 still holds "a")
    assert (tmp_path / "o.pending.0").read_bytes() == before
    st.save_pending([frame("c", 30)])    # now slot 0
    st.close()
    assert list(pending_frames(tmp_path, "o")) == ["c"]


def test_the_single_file_of_earlier_versions_is_restored_and_then_removed(tmp_path):
    rec = {"model": "old", "body": frame("old", 5).body, "heads": [["t", 0, 8]], "first": 5, "last": 8, "rows": 4}
    legacy = tmp_path / "o.pending"
    legacy.write_bytes(msgpack.packb({"frames": [rec]}, use_bin_type=True))
    st = PublisherState(tmp_path, "o")
    _, pending = st.load()
    assert list(pending) == ["old"] and pending["old"].last_counter == 8
    st.save_pending(pending.values())    # the publisher's first write holds it
    assert not legacy.exists()
    st.close()
    assert list(pending_frames(tmp_path, "o")) == ["old"]


def test_a_save_without_a_load_still_supersedes_the_records_there(tmp_path):
    st = PublisherState(tmp_path, "o")
    for first in (10, 20, 30):               # seq 1..3, the newest ("c") in slot 0
        st.save_pending([frame("abc"[first // 10 - 1], first)])
    st.close()
    st = PublisherState(tmp_path, "o")       # no load(): a tool that only writes
    st.save_pending([frame("d", 40)])
    st.close()
    assert list(pending_frames(tmp_path, "o")) == ["d"]
