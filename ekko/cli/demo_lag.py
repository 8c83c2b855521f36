"""Freshness lag of the replicas as ``ekko demo`` measures it: from the start of each of
the trainer's publishes to the poll that finds a replica still without it (see
:func:`staleness` for why not from the acknowledgement)."""

from __future__ import annotations

from collections import deque
from typing import Any

from ekko.core.version import HLC_EPOCH_MS, HLC_LOGICAL_BITS

#: seconds of polls over which the live view shows each replica's worst lag.
LAG_WINDOW_S = 5.0
#: the trainer's most recent publishes remembered to judge what a replica lacks.
PUBLISH_LOG = 4096


def counter_floor(wall_s: float) -> int:
    """The least HLC counter a publish built at wall time ``wall_s`` or later can carry
    (:class:`ekko.core.version.HybridClock`: milliseconds since the epoch, shifted).

    Example:
        >>> counter_floor(HLC_EPOCH_MS / 1000 + 2.0) == 2000 << HLC_LOGICAL_BITS
        True
    """
    return max(0, int(wall_s * 1000) - HLC_EPOCH_MS) << HLC_LOGICAL_BITS


def staleness(asked_at: float, head: int | None, sent: deque) -> float | None:
    """Seconds a replica had been missing an update when its status was asked for.

    The trainer is the only publisher, so its counters grow with its publishes: a replica
    whose head is ``head`` lacks every publish with a greater counter.  The lag is the
    time from the start of the oldest such publish to ``asked_at`` (0 when it lacks none
    started by then).  This counts from the *start* of a publish: its counter comes back
    with the acknowledgement, which waits for the ingest's log fsync, by which time the
    ingest has already pushed the rows, so on a LAN every replica holds the newest
    acknowledged update by the time anyone knows it (a lag against acknowledged counters
    reads 0 nearly always).  A publish still in flight counts with the least counter it can
    carry (:func:`counter_floor`).

    Args:
        asked_at: when the status request was sent (monotonic seconds).
        head: the replica's head from that status (:func:`head_of`); None = no answer.
        sent: ``[started, counter]`` of the trainer's publishes in start order.

    Example:
        >>> sent = deque([[10.0, 100], [10.1, 200], [10.2, 300]])
        >>> [round(staleness(t, head, sent), 3) for t, head in ((10.25, 300), (10.25, 150), (10.15, 100))]
        [0.0, 0.15, 0.05]
    """
    if head is None:
        return None
    oldest_missing = None
    for started, counter in reversed(sent):   # newest first: a fresh replica stops at once
        if started >= asked_at:
            continue
        if counter <= head:
            break
        oldest_missing = started
    return 0.0 if oldest_missing is None else asked_at - oldest_missing


def record_lag(state: Any, node_id: str, asked_at: float, lag: float | None) -> None:
    """Keep one poll's lag of a replica in ``state`` (:class:`ekko.cli.demo.DemoState`): its shown lag becomes the worst of the polls of
    the last :data:`LAG_WINDOW_S` (a poll catches a replica between two updates far more
    often than during one).  Call with ``state.lock`` held."""
    polls = state.lag_polls.setdefault(node_id, deque())
    polls.append((asked_at, lag))
    while polls and polls[0][0] < asked_at - LAG_WINDOW_S:
        polls.popleft()
    seen = [x for _, x in polls if x is not None]
    state.lag[node_id] = max(seen) if seen else None
    if lag is not None:
        state.worst_lag[node_id] = max(lag, state.worst_lag.get(node_id, 0.0))

