"""Back-pressure on the publish path of a replica daemon.

Before the daemon reads a publish body it asks :meth:`PublishGate.check` whether
one more publish of that size may come in.  Past a bound the publish is refused
-- 429 when a queue is full, 503 when the process is over its memory bound --
without being read, so a refusal costs nothing and changes nothing.  The bounds
are fields of :class:`ekko.core.config.NodeConfig`:

============================  ===========================================  ======
bound                         what is measured                             status
============================  ===========================================  ======
max_publish_bytes_in_flight   publish bodies admitted and not yet answered  429
max_outbound_bytes            estimated bytes of peer sends queued          429
max_push_backlog_rows         rows waiting in the outbound push queues      429
max_wal_bytes                 write-ahead log not covered by a snapshot     429
max_rss_bytes (0 = off)       resident memory of the process               503
============================  ===========================================  ======

One publish is always admitted when none is in flight, whatever its size (else
a frame larger than the bound could never go through).  When RSS is over its
bound the gate first collects garbage and asks glibc to return free pages
(``malloc_trim``), at most every :data:`MEMORY_RELIEF_INTERVAL_S`: after a burst
the freed buffers otherwise stay resident and every publish would be refused.

Example:
    >>> from ekko.core.config import NodeConfig
    >>> gate = PublishGate(NodeConfig(max_publish_bytes_in_flight=100))
    >>> gate.check(1000) is None          # nothing in flight: admitted
    True
    >>> gate.publish_bytes += 1000
    >>> gate.check(10).bound
    'publish_bytes'
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ekko.core.config import NodeConfig
from ekko.server.heap_trim import malloc_trim_fn, process_rss_bytes

#: seconds a sample of the process RSS is reused.
RSS_SAMPLE_S = 0.1
#: least seconds between two attempts to hand freed memory back to the OS when RSS is over
#: its bound.
MEMORY_RELIEF_INTERVAL_S = 5.0
#: share of ``max_wal_bytes`` at which the gate asks for an early snapshot (publishes are
#: still admitted), so that the log is usually truncated before it is full.
WAL_SNAPSHOT_FRACTION = 0.5

def trim_memory() -> None:
    """Collect garbage and ask glibc to return free heap pages to the OS."""
    gc.collect()
    trim = malloc_trim_fn()
    if trim is not None:
        trim(0)


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a publish is refused: the bound passed, a message, and the rejection reason
    (``"queue_full"`` -> 429, ``"memory"`` -> 503)."""

    bound: str
    message: str
    reason: str = "queue_full"


class PublishGate:
    """Admission control for publishes (see the module doc).

    Args:
        config: the node configuration holding the bounds.
        push_backlog_rows: returns the rows waiting in the push queues (all links).
        wal_retained_bytes: returns the un-snapshotted log bytes, or None without a log.
        want_snapshot: called when the log passes :data:`WAL_SNAPSHOT_FRACTION` of its bound.

    The daemon adds and subtracts :attr:`publish_bytes` around each publish and keeps
    :attr:`outbound_bytes` with :meth:`queued` / :meth:`done`.  Runs on the event loop
    thread only.
    """

    def __init__(self, config: NodeConfig, push_backlog_rows: Callable[[], int] = lambda: 0,
                 wal_retained_bytes: Callable[[], int | None] = lambda: None,
                 want_snapshot: Callable[[], None] = lambda: None) -> None:
        self.config = config
        self.push_backlog_rows = push_backlog_rows
        self.wal_retained_bytes = wal_retained_bytes
        self.want_snapshot = want_snapshot
        self.publish_bytes = 0
        self.outbound_bytes = 0
        self._rss = (0, float("-inf"))
        self._last_relief = float("-inf")

    def rss_bytes(self, fresh: bool = False) -> int:
        now = time.monotonic()
        if fresh or now - self._rss[1] > RSS_SAMPLE_S:
            self._rss = (process_rss_bytes(), now)
        return self._rss[0]

    def queued(self, nbytes: int) -> None:
        """A peer message of about ``nbytes`` went into the transport."""
        self.outbound_bytes += nbytes

    def done(self, nbytes: int) -> None:
        """A peer message of about ``nbytes`` left the transport (sent or dropped)."""
        self.outbound_bytes = max(0, self.outbound_bytes - nbytes)

    def check(self, nbytes: int) -> Refusal | None:
        """None when a publish of ``nbytes`` may come in, else why not."""
        c = self.config
        if c.max_rss_bytes:
            rss = self.rss_bytes()
            if rss > c.max_rss_bytes and time.monotonic() - self._last_relief >= MEMORY_RELIEF_INTERVAL_S:
                self._last_relief = time.monotonic()
                trim_memory()
                rss = self.rss_bytes(fresh=True)
            if rss > c.max_rss_bytes:
                return Refusal("rss", f"replica memory {rss >> 20} MiB is over max_rss_bytes="
                               f"{c.max_rss_bytes >> 20} MiB", "memory")
        if self.publish_bytes and self.publish_bytes + nbytes > c.max_publish_bytes_in_flight:
            return Refusal("publish_bytes", f"{self.publish_bytes} bytes of publishes in flight; "
                           f"max_publish_bytes_in_flight={c.max_publish_bytes_in_flight}")
        if self.outbound_bytes > c.max_outbound_bytes:
            return Refusal("outbound_bytes", f"{self.outbound_bytes} bytes of peer sends queued; "
                           f"max_outbound_bytes={c.max_outbound_bytes}")
        backlog = self.push_backlog_rows()
        if backlog > c.max_push_backlog_rows:
            return Refusal("push_backlog", f"{backlog} rows waiting in push queues; "
                           f"max_push_backlog_rows={c.max_push_backlog_rows}")
        retained = self.wal_retained_bytes()
        if retained is not None:
            if retained > c.max_wal_bytes * WAL_SNAPSHOT_FRACTION:
                self.want_snapshot()  # a snapshot lets the log be truncated
            if retained > c.max_wal_bytes:
                return Refusal("wal_bytes", f"{retained} bytes of write-ahead log await a snapshot; "
                               f"max_wal_bytes={c.max_wal_bytes}")
        return None

    def gauges(self) -> dict[str, Any]:
        """The measured quantities, for ``/metrics``."""
        return {"publish_bytes": self.publish_bytes, "outbound_bytes": self.outbound_bytes,
                "push_rows": self.push_backlog_rows(), "wal_bytes": self.wal_retained_bytes() or 0,
                "rss": self.rss_bytes(fresh=True)}
