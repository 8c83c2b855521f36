"""The node's clock and mail: the timer loop and the transport of one daemon.

:class:`NodeDriver` is the part of :class:`ekko.server.daemon.Daemon` that turns
the sans-IO :class:`~ekko.replica.node.ReplicaNode` into a running replica:

* its *timer loop* sleeps until ``node.next_deadline()`` (or until a handler
  wakes it), calls ``node.tick(now)`` and sends what the node produced;
* :meth:`NodeDriver.send_out` hands the node's outbox to the
  :class:`~ekko.server.transport.HttpTransport` (which it owns), counting queued
  bytes in the publish gate, and logs the node's quality events;
* the transport's callbacks count bytes sent and send failures by the peer's DC.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

from ekko.core.codec import COMPRESS_MIN_SAVING, Keyring
from ekko.core.messages import Outgoing
from ekko.replica.node import ReplicaNode
from ekko.server.backpressure import PublishGate
from ekko.server.metrics import UNKNOWN_DC, DaemonMetrics
from ekko.server.transport import PUSH_LINK_DEPTH, HttpTransport, estimated_size

# The daemon's logger: operators filter and tests capture "ekko.server.daemon" for all of it.
log = logging.getLogger("ekko.server.daemon")

#: the timer loop re-reads the node's deadline at least this often (seconds).
MAX_TIMER_SLEEP_S = 1.0


def log_quality_event(ev: dict[str, Any]) -> None:
    """Log an incident (opened here or learnt from a peer), a finished restore, or a closed gap."""
    kind = ev.get("event")
    if kind in ("incident", "incident_adopted"):
        log.warning("model %s CORRUPTED: incident %s (%s by %s), metric %s effect %.2f%% (cusum %.1f), "
                    "rollback to cut %s%s", ev.get("model"), ev.get("id"),
                    "detected" if kind == "incident" else "learnt", ev.get("detected_by"), ev.get("metric"),
                    100.0 * float(ev.get("effect") or 0.0), float(ev.get("statistic") or 0.0), ev.get("cut"),
                    "" if ev.get("cut") else " (none eligible: manual action needed)")
    elif kind == "restored":
        log.warning("model %s rolled back to cut %s (record %s, incident %s): %s rows restored, %s",
                    ev.get("model"), ev.get("cut"), ev.get("rollback_id"), ev.get("incident"), ev.get("rows"),
                    "-" if ev.get("restore_s") is None else f"{ev['restore_s']:.3f} s after the incident reached us")
    elif kind == "gap_closed":
        log.info("model %s table %s shard %s: every member answered for counters (%s, %s] of origin %s; "
                 "knowledge passes them (what no member holds there was never received or is lost)",
                 ev.get("model"), ev.get("table"), ev.get("shard"), ev.get("after"), ev.get("upto"), ev.get("origin"))


class NodeDriver:
    """Ticks a :class:`ReplicaNode` on the real clock and sends its output.

    Every call into the node happens on the event loop thread (the node is not
    thread-safe); handlers call :meth:`send_out` after each node call that may
    have produced messages, which also wakes the timer loop so it re-reads the
    node's deadline.

    Args:
        node: the replica node.
        metrics: the daemon's metrics (bytes sent, send failures, internal errors).
        gate: the publish gate, told of every queued and finished send.
        keyring: the keyring the transport signs with (the daemon swaps
            ``transport.keyring`` on reload).
        clock: protocol time source (seconds, monotonic).
        is_stopped: whether the daemon is shutting down; the timer loop ends at its first
            round after it turns true (:meth:`wake` makes that now).  A callable, not a
            flag of the driver's own: the daemon's one "stopped" state ends the loop even
            when a cancellation of it is lost (asyncio.wait_for on Python 3.11 can swallow
            one that races with a wake-up).

    Example:
        The daemon runs :meth:`run` as a task from app startup to shutdown::

            driver = NodeDriver(node, metrics, gate, None, time.monotonic, lambda: daemon._stopped)
            driver.start()
            task = asyncio.get_running_loop().create_task(driver.run())
            ...
            daemon._stopped = True
            driver.wake()
            await task
    """

    def __init__(self, node: ReplicaNode, metrics: DaemonMetrics, gate: PublishGate, keyring: Keyring | None,
                 clock: Callable[[], float], is_stopped: Callable[[], bool]) -> None:
        self.node = node
        self.metrics = metrics
        self.gate = gate
        self.clock = clock
        self.transport = HttpTransport(keyring, on_sent=self._on_sent, on_failed=self._on_failed,
                                       on_rejected=self._on_rejected, min_saving_of=self._min_saving,
                                       on_frame=lambda reused: metrics.frames.labels(
                                           "reused" if reused else "encoded").inc())
        self.is_stopped = is_stopped
        self._wake: asyncio.Event | None = None
        # Flow control of pushes: the node sends a peer only as many PUSH messages as its
        # link has room for, and is flushed again as the link drains (_flush_held).
        node.push_room = self._push_room
        self._flush_pending = False

    def start(self) -> None:
        """Make the wake-up event (on the serving loop, at app startup)."""
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """Make the timer loop re-read the node's deadline now."""
        if self._wake is not None:
            self._wake.set()

    async def run(self) -> None:
        """The timer loop: tick the node when its deadline passes, then send its output."""
        assert self._wake is not None
        while not self.is_stopped():
            now = self.clock()
            due = self.node.next_deadline()
            if due > now:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), min(due - now, MAX_TIMER_SLEEP_S))
                except asyncio.TimeoutError:
                    pass
                continue
            try:
                self.node.tick(now)
                self.metrics.sample_freshness(now)
            except Exception:
                log.exception("node.tick failed")
                self.metrics.internal_errors.labels("tick").inc()
                await asyncio.sleep(0.05)  # a persistent bug must not spin the loop hot
            self.send_out(wake=False)

    def send_out(self, wake: bool = True) -> None:
        """Send the node's outbox; wake the timer loop so it re-reads the deadline."""
        for ev in self.node.take_quality_events():
            log_quality_event(ev)
        for out in self.node.drain():
            # Counted before send(): a message dropped at once is uncounted by _on_failed.
            self.gate.queued(estimated_size(out))
            self.transport.send(out)
        self.metrics.sends_in_flight.set(self.transport.in_flight)
        if wake:
            self.wake()

    def dc_of(self, node_id: str, address: str = "") -> str:
        """The DC of a member, by id or else by address; :data:`UNKNOWN_DC` when not a member."""
        mem = self.node.members.get(node_id) if node_id else None
        if mem is None and address:
            for m in self.node.members.members.values():
                if m.address == address:
                    mem = m
                    break
        return mem.dc if mem is not None else UNKNOWN_DC

    def _min_saving(self, out: Outgoing) -> float:
        """Compression must pay on the LAN (see COMPRESS_MIN_SAVING); across DCs, what the
        configuration says (``cross_dc_min_saving``: any gain in the ``lan`` and ``wan``
        presets)."""
        if self.dc_of(out.dst, out.address) == self.node.dc:
            return COMPRESS_MIN_SAVING
        return self.node.config.cross_dc_min_saving

    def _push_room(self, peer: str) -> int:
        mem = self.node.members.get(peer)
        return self.transport.push_room(mem.address) if mem is not None else PUSH_LINK_DEPTH

    def _link_drained(self) -> None:
        """A link took a message off its queue: if the node held pushes back for want of
        room, flush them at the loop's next step (not from inside the transport's call,
        which may come from within send_out itself)."""
        if self.node.eager_push.held_back and not self._flush_pending:
            self._flush_pending = True
            asyncio.get_running_loop().call_soon(self._flush_held)

    def _flush_held(self) -> None:
        self._flush_pending = False
        if self.node.eager_push.held_back and not self.is_stopped():
            self.node.eager_push.flush(self.clock())
            self.send_out()

    def _on_sent(self, out: Outgoing, nbytes: int) -> None:
        self.gate.done(estimated_size(out))
        self.metrics.bytes_sent.labels(self.dc_of(out.dst, out.address), out.msg_type.name).inc(nbytes)
        self._link_drained()

    def _on_rejected(self, address: str, reason: str) -> None:
        self.metrics.send_failures.labels(self.dc_of("", address), reason).inc()

    def _on_failed(self, out: Outgoing, reason: str) -> None:
        self.gate.done(estimated_size(out))
        self.metrics.send_failures.labels(self.dc_of(out.dst, out.address), reason).inc()
        self._link_drained()
