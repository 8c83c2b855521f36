"""Numbers as people read them in ``ekko status`` and ``ekko members``: counts with
k/M/G, durations with units, HLC heads and incarnations as wall times and ages.

The raw values stay in ``--json`` output; these helpers only shape what a terminal shows.

Example:
    >>> human_count(100_000), human_count(1_200_000), human_seconds(3.21), human_seconds(0.25)
    ('100k', '1.2M', '3.2 s', '250 ms')
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

from ekko.core.version import HLC_EPOCH_MS, HLC_LOGICAL_BITS

#: count suffixes, each 1000 times the one before.
COUNT_SUFFIXES = ("", "k", "M", "G", "T")
#: incarnations at least this large are nanoseconds since the Unix epoch (a daemon takes
#: :func:`time.time_ns` at start; 1e18 ns is September 2001), smaller ones are plain counters.
INCARNATION_NS_FLOOR = 10**18
#: (limit in seconds, unit, seconds per unit) for :func:`human_seconds`, smallest first.
DURATION_UNITS = ((1.0, "ms", 0.001), (60.0, "s", 1.0), (3600.0, "min", 60.0), (86400.0, "h", 3600.0),
                  (float("inf"), "d", 86400.0))
#: ages shown with a date instead of only the time of day when older than this (seconds).
SAME_DAY_S = 12 * 3600.0


def human_count(n: Any) -> str:
    """A count with at most three significant digits and a k/M/G/T suffix ("-" for None).

    Example:
        >>> [human_count(x) for x in (7, 999, 1000, 12_345, 100_000, 1_200_000)]
        ['7', '999', '1k', '12.3k', '100k', '1.2M']
    """
    if n is None:
        return "-"
    value = float(n)
    for i, suffix in enumerate(COUNT_SUFFIXES):
        if abs(value) < 999.5 or i == len(COUNT_SUFFIXES) - 1:
            return f"{int(value)}" if not suffix else f"{value:.3g}{suffix}"
        value /= 1000.0
    raise AssertionError("unreachable")


def human_seconds(s: Any) -> str:
    """A duration with a unit: ``"250 ms"``, ``"3.2 s"``, ``"4.5 min"``, ``"2.0 h"`` ("-" for None).

    Example:
        >>> [human_seconds(x) for x in (0, 0.0004, 0.25, 1.5, 42, 270, 7200)]
        ['0 s', '0.4 ms', '250 ms', '1.5 s', '42 s', '4.5 min', '2.0 h']
    """
    if s is None:
        return "-"
    s = float(s)
    if s == 0:
        return "0 s"
    for limit, unit, per in DURATION_UNITS:
        if abs(s) < limit:
            v = s / per
            return f"{v:.1f} {unit}" if abs(v) < 10 and unit != "ms" or abs(v) < 1 else f"{v:.0f} {unit}"
    raise AssertionError("unreachable")


def hlc_wall_s(head: int) -> float:
    """Unix seconds of an HLC counter (a model's head)."""
    return (HLC_EPOCH_MS + (int(head) >> HLC_LOGICAL_BITS)) / 1000.0


def wall_time(unix_s: float, now: float | None = None) -> str:
    """Local time of day (``21:33:04``), with the date when it is not recent."""
    now = time.time() if now is None else now
    t = datetime.fromtimestamp(unix_s)
    return t.strftime("%H:%M:%S") if abs(now - unix_s) < SAME_DAY_S else t.strftime("%Y-%m-%d %H:%M")


def head_age(head: Any, now: float | None = None) -> tuple[str, str]:
    """(wall time, age) of a model head, e.g. ``("21:33:04", "3.2 s ago")``; ``("never", "-")`` for 0."""
    if not head:
        return "never", "-"
    now = time.time() if now is None else now
    at = hlc_wall_s(head)
    return wall_time(at, now), f"{human_seconds(max(0.0, now - at))} ago"


def started(incarnation: Any, now: float | None = None) -> str:
    """When a member started (its incarnation as a wall time), or the raw incarnation."""
    if isinstance(incarnation, int) and incarnation >= INCARNATION_NS_FLOOR:
        return wall_time(incarnation / 1e9, now)
    return str(incarnation)
