"""What a publisher keeps on disk between runs, per origin, in its state directory:
``<origin>.pending.0`` / ``.1`` (records of the frames not yet acknowledged, msgpack
bodies, each with :meth:`ekko.core.chain.PublisherChain.state`: the clock floor and the
acknowledged chain heads) and ``<origin>.lock`` (refuses a second live publisher of that
origin).  Why and when records are written: see :mod:`ekko.sdk.async_publisher`.

A record is written before every publish is sent, so that write is on every publish's
path: it is one ``pwrite`` and one ``fdatasync`` into the slot file that does *not* hold
the newest durable record, never a new file (a temp file, its fsync, a rename and a
directory fsync took 1.3 ms against 0.3-0.6 ms on this machine; issue #15).  Each record
carries a sequence number and a CRC of its body: a write torn by a crash fails its CRC
and the other slot, untouched, still holds the previous durable record.

The record written after an acknowledgement (nothing pending) is not synced.  Losing it
is safe: the durable record before it holds the frame that was acknowledged, which is
re-sent (changing nothing), and a clock floor at least that frame's last counter.  The
clock floor needs nothing else because every record with frames is durable before its
frames are sent, and carries a floor at or above every counter handed out before it.

Earlier versions also kept ``<origin>.json`` (the chain state, written with two fsyncs
after every acknowledgement, on the path of the next publish).  It is still read, and its
clock floor honoured; it is no longer written.
"""

from __future__ import annotations

import json
import os
import re
import struct
import zlib
from pathlib import Path
from typing import Any, Iterable

import msgpack

from ekko.core.chain import PendingFrame
from ekko.core.errors import UsageError
from ekko.core.fsutil import fsync_dir_if_possible, fsync_path

#: environment variable naming the state directory.
STATE_DIR_ENV = "EKKO_STATE_DIR"
#: default state directory when neither the argument nor the environment gives one.
DEFAULT_STATE_DIR = Path("~/.cache/ekko/publishers")
_SAFE_NAME = re.compile(r"[^A-Za-z0-9_.\-]")
#: a pending-frames record: magic, sequence number, body length, CRC-32 of the body.
_PENDING_HEADER = struct.Struct("<8sQQI")
_PENDING_MAGIC = b"EKKOPND1"


def _frame_record(f: PendingFrame) -> dict[str, Any]:
    return {"model": f.model, "body": f.body, "heads": [[t, s, c] for (t, s), c in sorted(f.heads.items())],
            "first": f.first_counter, "last": f.last_counter, "rows": f.rows}


def _frame_from_record(r: dict[str, Any]) -> PendingFrame:
    return PendingFrame(r["model"], r["body"], {(t, int(s)): int(c) for t, s, c in r["heads"]},
                        int(r["first"]), int(r["last"]), int(r["rows"]))


class PublisherState:
    """The on-disk state of one publisher origin (see the module doc).

    Args:
        directory: where the files live (created if missing).
        origin: the publisher's name; file names derive from it.
        durable: ``fdatasync`` every record that holds frames before it is relied on.

    Example:
        >>> import tempfile
        >>> st = PublisherState(tempfile.mkdtemp(), "trainer-0")
        >>> st.load()
        (None, {})
        >>> st.save_pending([], {"origin": 5, "clock": 9, "heads": []}); st.load()[0]["clock"]
        9
        >>> st.close()
    """

    def __init__(self, directory: str | Path, origin: str, durable: bool = True) -> None:
        self.durable = durable
        self.dir = Path(directory).expanduser()
        self.dir.mkdir(parents=True, exist_ok=True)
        base = _SAFE_NAME.sub("_", str(origin))
        #: the chain state of earlier versions (read, never written; see the module doc).
        self.legacy_chain_path = self.dir / f"{base}.json"
        #: the single-file form of earlier versions (read once, removed after the first write).
        self.legacy_pending_path = self.dir / f"{base}.pending"
        self.slot_paths = (self.dir / f"{base}.pending.0", self.dir / f"{base}.pending.1")
        self._slot_fds: list[int | None] = [None, None]
        self._seq = 0            # of the newest record written or found
        self._durable_slot = 1   # the slot of the newest durable record (the next write goes to the other)
        self._slots_read = False  # _seq/_durable_slot reflect the files (load, or the first save)
        self._lock_fd: int | None = None
        self._lock(self.dir / f"{base}.lock")

    def _lock(self, path: Path) -> None:
        # Two live publishers with one origin would hand out clashing versions and
        # break each other's chains: refuse the second one.
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise UsageError(f"another publisher with this origin is using {path.parent} "
                             f"(lock {path.name}); give each trainer its own origin") from None
        self._lock_fd = fd

    def close(self) -> None:
        for i, fd in enumerate(self._slot_fds):
            if fd is not None:
                os.close(fd)
                self._slot_fds[i] = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def load(self) -> tuple[dict[str, Any] | None, dict[str, PendingFrame]]:
        """``(chain state, pending frames by model)`` as a restart should trust them: the
        newest valid record's, with the clock floor raised to a legacy ``<origin>.json``'s
        (None: no state at all)."""
        legacy = None
        if self.legacy_chain_path.exists():
            try:
                legacy = json.loads(self.legacy_chain_path.read_text())
            except (OSError, ValueError) as e:
                raise UsageError(f"cannot read publisher state {self.legacy_chain_path}: {e}") from None
        if self.durable:
            # A record found now may never have been synced (the process died between its
            # write and its fdatasync): make it durable before it is trusted, and re-sent.
            for path in self.slot_paths:
                if path.exists():
                    fsync_path(path)
        pending, newest, state = _load_records(self.legacy_pending_path, self.slot_paths)
        self._note_newest(newest)
        if legacy is not None:
            if state is None:
                state = legacy
            elif legacy.get("origin") == state.get("origin"):
                state = {**state, "clock": max(int(state["clock"]), int(legacy["clock"]))}
            else:
                raise UsageError(f"publisher state {self.legacy_chain_path} belongs to another origin "
                                 f"than the records beside it")
        return state, pending

    def _note_newest(self, newest: tuple[int, int] | None) -> None:
        if newest is not None:
            self._seq, self._durable_slot = newest
        self._slots_read = True

    def save_pending(self, frames: Iterable[PendingFrame], chain: dict[str, Any] | None = None) -> None:
        """Record the frames not yet acknowledged and the chain state (its clock floor at
        least the last counter of every frame handed out so far; see the module doc):
        durable on return when there are frames and ``durable`` is set."""
        recs = [_frame_record(f) for f in frames]
        body = msgpack.packb({"frames": recs, "chain": chain}, use_bin_type=True)
        if not self._slots_read:
            # Saved without a load first: the records there must still be superseded, and
            # the newest of them never overwritten before this one is durable.
            self._note_newest(_load_records(self.legacy_pending_path, self.slot_paths)[1])
        slot = 1 - self._durable_slot
        fd = self._slot_fds[slot]
        if fd is None:
            fd = self._slot_fds[slot] = os.open(self.slot_paths[slot], os.O_RDWR | os.O_CREAT, 0o644)
            if self.durable:
                os.fsync(fd)
                fsync_dir_if_possible(self.dir)   # the file exists for good before a record relies on it
        self._seq += 1
        data = _PENDING_HEADER.pack(_PENDING_MAGIC, self._seq, len(body), zlib.crc32(body)) + body
        if os.pwrite(fd, data, 0) != len(data):
            raise OSError(f"short write to {self.slot_paths[slot]}")
        if recs and self.durable:
            (os.fdatasync if hasattr(os, "fdatasync") else os.fsync)(fd)
            self._durable_slot = slot
        if self.legacy_pending_path.exists():
            # Its frames are in this record now, or were acknowledged (the chain that
            # covers them is durable before a record without them is written).
            os.unlink(self.legacy_pending_path)


def pending_frames(directory: str | Path, origin: str) -> dict[str, PendingFrame]:
    """The frames not yet acknowledged that a publisher of ``origin`` would restore from
    ``directory`` now (no lock taken: for tools and tests)."""
    base = _SAFE_NAME.sub("_", str(origin))
    d = Path(directory).expanduser()
    return _load_records(d / f"{base}.pending", (d / f"{base}.pending.0", d / f"{base}.pending.1"))[0]


def _load_records(legacy: Path, slots: tuple[Path, Path]
                  ) -> tuple[dict[str, PendingFrame], tuple[int, int] | None, dict[str, Any] | None]:
    """The pending frames (the legacy file's, then the newest valid slot record's),
    ``(sequence, slot)`` of that record (None: no valid record) and its chain state
    (None: none, or a record of an earlier version)."""
    pending: dict[str, PendingFrame] = {}
    if legacy.exists():
        try:
            raw = msgpack.unpackb(legacy.read_bytes(), raw=False, strict_map_key=False)
            pending = {r["model"]: _frame_from_record(r) for r in raw["frames"]}
        except Exception as e:  # msgpack raises many types; a torn file cannot happen (atomic writes)
            raise UsageError(f"cannot read pending frames {legacy}: {e}") from None
    best: tuple[int, int, bytes] | None = None
    for slot, path in enumerate(slots):
        got = _read_slot(path)
        if got is not None and (best is None or got[0] > best[0]):
            best = (got[0], slot, got[1])
    if best is None:
        return pending, None, None
    try:
        raw = msgpack.unpackb(best[2], raw=False, strict_map_key=False)
        pending.update({r["model"]: _frame_from_record(r) for r in raw["frames"]})
        chain = raw.get("chain")
    except Exception as e:  # the CRC matched: a body we cannot read is a bug or another format
        raise UsageError(f"cannot read pending frames {slots[best[1]]}: {e}") from None
    return pending, (best[0], best[1]), chain


def _read_slot(path: Path) -> tuple[int, bytes] | None:
    """(sequence, body) of a slot file's record; None if missing, empty or torn."""
    try:
        with open(path, "rb") as f:
            head = f.read(_PENDING_HEADER.size)
            if len(head) < _PENDING_HEADER.size:
                return None
            magic, seq, n, crc = _PENDING_HEADER.unpack(head)
            body = f.read(n)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise UsageError(f"cannot read pending frames {path}: {e}") from None
    if magic != _PENDING_MAGIC or len(body) != n or zlib.crc32(body) != crc:
        return None
    return seq, body


def default_state_dir() -> Path:
    """``$EKKO_STATE_DIR``, else ``~/.cache/ekko/publishers``."""
    return Path(os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR).expanduser()
