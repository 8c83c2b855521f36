"""What a publisher keeps on disk between runs, per origin, in its state directory:
``<origin>.json`` (:meth:`ekko.core.chain.PublisherChain.state`: the clock floor and
acknowledged chain heads), ``<origin>.pending`` (frames not yet acknowledged, msgpack
bodies) and ``<origin>.lock`` (refuses a second live publisher of that origin).
Why and when each is written: see :mod:`ekko.sdk.async_publisher`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterable

import msgpack

from ekko.core.chain import PendingFrame
from ekko.core.errors import UsageError
from ekko.core.fsutil import atomic_write

#: environment variable naming the state directory.
STATE_DIR_ENV = "EKKO_STATE_DIR"
#: default state directory when neither the argument nor the environment gives one.
DEFAULT_STATE_DIR = Path("~/.cache/ekko/publishers")
_SAFE_NAME = re.compile(r"[^A-Za-z0-9_.\-]")


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
        durable: fsync every write (see :func:`ekko.core.fsutil.atomic_write`).

    Example:
        >>> import tempfile
        >>> st = PublisherState(tempfile.mkdtemp(), "trainer-0")
        >>> st.load()
        (None, {})
        >>> st.save_chain({"origin": 5, "clock": 9, "heads": []}); st.load()[0]["clock"]
        9
        >>> st.close()
    """

    def __init__(self, directory: str | Path, origin: str, durable: bool = True) -> None:
        self.durable = durable
        self.dir = Path(directory).expanduser()
        self.dir.mkdir(parents=True, exist_ok=True)
        base = _SAFE_NAME.sub("_", str(origin))
        self.chain_path = self.dir / f"{base}.json"
        self.pending_path = self.dir / f"{base}.pending"
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
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def load(self) -> tuple[dict[str, Any] | None, dict[str, PendingFrame]]:
        state = None
        if self.chain_path.exists():
            try:
                state = json.loads(self.chain_path.read_text())
            except (OSError, ValueError) as e:
                raise UsageError(f"cannot read publisher state {self.chain_path}: {e}") from None
        pending: dict[str, PendingFrame] = {}
        if self.pending_path.exists():
            try:
                raw = msgpack.unpackb(self.pending_path.read_bytes(), raw=False, strict_map_key=False)
                pending = {r["model"]: _frame_from_record(r) for r in raw["frames"]}
            except Exception as e:  # msgpack raises many types; a torn file cannot happen (atomic writes)
                raise UsageError(f"cannot read pending frames {self.pending_path}: {e}") from None
        return state, pending

    def save_chain(self, state: dict[str, Any]) -> None:
        atomic_write(self.chain_path, json.dumps(state, separators=(",", ":")).encode(), self.durable)

    def save_pending(self, frames: Iterable[PendingFrame]) -> None:
        recs = [_frame_record(f) for f in frames]
        if not recs:
            # No directory fsync: if a machine crash undoes the unlink, the restarted
            # publisher re-sends acknowledged frames, which changes nothing.
            try:
                os.unlink(self.pending_path)
            except FileNotFoundError:
                pass
            return
        atomic_write(self.pending_path, msgpack.packb({"frames": recs}, use_bin_type=True), self.durable)


def default_state_dir() -> Path:
    """``$EKKO_STATE_DIR``, else ``~/.cache/ekko/publishers``."""
    return Path(os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR).expanduser()
