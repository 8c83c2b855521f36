"""Discrete-event core: a clock, a seeded random source and a queue of callbacks.

Conventions follow SimPy: time is a float (seconds here), events are ordered by
``(time, priority, seq)`` -- lower priority values first among events at the same
time, then first-scheduled-first -- and callbacks run one at a time, each seeing
``sim.now`` equal to its scheduled time.  There is no wall clock and no global
random state: every draw comes from ``sim.rng`` / ``sim.np_rng`` (or a stream
derived from the seed with :meth:`Simulation.derive_rng`), so a seed fixes the trace.

Data structure (why it is not one heap of tuples): a heap of
``(time, priority, seq, event)`` tuples costs a tuple comparison per sift step,
which dominates a Python event loop.  Here the heap holds bare float times
(float comparisons are several times cheaper) and a dict maps each pending time
to its event.  Distinct times are the common case with continuous random
delays; events that share a time are kept in a small per-time bucket ordered by
``(priority, seq)``, which gives exactly the same order as the tuple heap.

A scheduled event is a :data:`Handle`: a plain list ``[callback, args, priority,
time]`` (a list, not an object, because it is created on the hot path).  Treat it
as opaque and use :meth:`Simulation.cancel` / :meth:`Simulation.is_pending`.
Cancellation is lazy: the entry stays queued with its callback cleared, and the
queue is compacted once cancelled entries outnumber live ones.

Example:
    >>> sim = Simulation(seed=1)
    >>> log = []
    >>> _ = sim.schedule(2.0, log.append, "b")
    >>> _ = sim.schedule(1.0, log.append, "a")
    >>> sim.run()
    2
    >>> log, sim.now
    (['a', 'b'], 2.0)
"""

from __future__ import annotations

import gc
import hashlib
import math
import random
from heapq import heapify, heappop, heappush
from typing import Any, Callable

import numpy as np

from ekko.core.errors import UsageError

__all__ = ["Handle", "Simulation", "Timer", "STOP_PRIORITY"]

#: a scheduled event: ``[callback, args, priority, time]``; opaque to callers.
Handle = list

#: priority of the internal stop marker: before every user event at the same time,
#: so ``run(until=t)`` processes events strictly before ``t`` (SimPy's convention).
STOP_PRIORITY = -math.inf

#: compaction runs only when at least this many cancelled entries are queued
#: (and they outnumber live ones): rebuilding is O(n), so not for a handful.
COMPACT_MIN_DEAD = 4096

#: during run(), CPython's generation-0 GC threshold is raised to at least this
#: (then restored).  Every pending event is two container objects (its entry and
#: args tuple); at the default threshold (700) young collections keep traversing
#: entries that are still queued, which cost ~25-35% of the run time with a few
#: hundred thousand events pending.  50k young objects is a few MB.
GC_GEN0_THRESHOLD = 50_000

# index of each field in a Handle list
_CB, _ARGS, _PRIO, _TIME = 0, 1, 2, 3


class _Bucket(list):
    """Events sharing one time: a heap of ``(priority, seq, entry)``."""

    __slots__ = ("seq", "entry")


class _StopRun(Exception):
    """Raised by the stop marker to leave the event loop."""


class Timer:
    """A periodic timer made by :meth:`Simulation.every`.

    Attributes:
        interval: seconds between nominal firings; may be changed while running
            (takes effect from the next firing).
        jitter: each firing happens ``U[0, jitter)`` seconds after its nominal time.
        fired: how many times the callback has run.
    """

    __slots__ = ("sim", "callback", "interval", "jitter", "priority", "fired", "_next", "_handle")

    def __init__(self, sim: "Simulation", callback: Callable[[], Any], interval: float, jitter: float,
                 start: float, priority: int) -> None:
        self.sim, self.callback, self.priority = sim, callback, priority
        self.interval, self.jitter, self.fired = interval, jitter, 0
        self._next = start  # nominal time of the next firing (jitter is not cumulative)
        self._handle: Handle | None = None
        self._arm()

    def _arm(self) -> None:
        t = self._next
        if self.jitter:
            t += self.sim.rng.random() * self.jitter
        if t < self.sim.now:  # the interval was shortened below the last firing's jitter
            t = self.sim.now
        self._handle = self.sim.schedule_at(t, self._fire, priority=self.priority)

    def _fire(self) -> None:
        self.fired += 1
        self._handle = _FIRING
        try:
            self.callback()
        finally:
            if self._handle is _FIRING:  # not cancelled by the callback
                self._next += self.interval  # read now: the callback may have changed it
                self._arm()

    @property
    def active(self) -> bool:
        return self._handle is not None

    def cancel(self) -> None:
        """Stop the timer; idempotent, safe from inside its own callback."""
        if self._handle is not None and self._handle is not _FIRING:
            self.sim.cancel(self._handle)
        self._handle = None


#: Timer._handle while its callback runs
_FIRING: Handle = [None, (), 0, 0.0]


class Simulation:
    """The event loop: simulated clock, event queue and seeded random sources.

    Args:
        seed: fixes ``rng``, ``np_rng`` and every stream from :meth:`derive_rng`.
        tune_gc: raise the garbage collector's generation-0 threshold to
            ``GC_GEN0_THRESHOLD`` while :meth:`run` runs (restored afterwards);
            False leaves the interpreter's GC settings alone.

    Attributes:
        now: current simulated time in seconds (read it; never assign).
        rng: ``random.Random(seed)`` for scalar draws on the hot path.
        np_rng: ``numpy.random.default_rng(seed)`` for vectorized draws.
        seed: the seed given.

    Callbacks may schedule and cancel events, including at the current time
    (``delay=0``: it runs after the events already queued for this time with the
    same priority).  An exception from a callback propagates out of :meth:`run`
    with the simulation left consistent (the failed event counts as processed),
    so a test can inspect it or call ``run`` again.

    Example:
        >>> sim = Simulation(seed=7)
        >>> ticks = []
        >>> timer = sim.every(1.0, lambda: ticks.append(sim.now))
        >>> sim.run(until=3.5)
        3
        >>> ticks
        [1.0, 2.0, 3.0]
        >>> h = sim.schedule(1.0, ticks.append, "never")
        >>> sim.cancel(h), sim.is_pending(h)
        (True, False)
    """

    __slots__ = ("now", "seed", "rng", "np_rng", "_times", "_slots", "_events", "_dead", "_phantom",
                 "_running", "tune_gc")

    def __init__(self, seed: int = 0, tune_gc: bool = True) -> None:
        self.seed = seed
        self.tune_gc = tune_gc
        self.now = 0.0
        self.rng = random.Random(seed)
        self.np_rng = np.random.default_rng(seed)
        self._times: list[float] = []             # heap of distinct pending times
        self._slots: dict[float, Handle] = {}     # time -> entry, or a bucket marker entry
        self._events = 0      # events processed by finished run() calls
        self._dead = 0        # cancelled entries still queued
        self._phantom = 0     # loop iterations that ran no user callback (bucket of cancelled)
        self._running = False

    def __repr__(self) -> str:
        return f"Simulation(seed={self.seed!r}, now={self.now!r}, events={self.events}, pending={self.pending})"

    # -- random streams ------------------------------------------------------------------

    def derive_seed(self, label: str) -> int:
        """A 64-bit seed derived from ``(seed, label)``, stable across runs and platforms."""
        digest = hashlib.blake2b(f"{self.seed}/{label}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little")

    def derive_rng(self, label: str) -> random.Random:
        """An independent ``random.Random`` for one component (e.g. ``"wan"``).

        Giving each component its own stream keeps draws from one (say the
        network's loss decisions) unchanged when another (the workload) changes,
        which makes A/B comparisons between configurations fair.
        """
        return random.Random(self.derive_seed(label))

    def derive_np_rng(self, label: str) -> np.random.Generator:
        """An independent numpy Generator for one component."""
        return np.random.default_rng(self.derive_seed(label))

    # -- scheduling ----------------------------------------------------------------------

    def schedule(self, delay: float, callback: Callable[..., Any], *args: Any, priority: int = 0) -> Handle:
        """Run ``callback(*args)`` after ``delay`` seconds (>= 0); returns its handle."""
        if not delay >= 0.0:  # also refuses NaN
            raise UsageError(f"delay must be >= 0 seconds, got {delay!r}")
        t = self.now + delay
        entry = [callback, args, priority, t]
        other = self._slots.setdefault(t, entry)
        if other is entry:
            heappush(self._times, t)
        else:
            self._add_to_bucket(t, other, entry)
        return entry

    def schedule_at(self, time: float, callback: Callable[..., Any], *args: Any, priority: int = 0) -> Handle:
        """Run ``callback(*args)`` at absolute time ``time`` (>= now); returns its handle."""
        if not time >= self.now:
            raise UsageError(f"cannot schedule at {time!r}: it is before now={self.now!r}")
        entry = [callback, args, priority, time]
        other = self._slots.setdefault(time, entry)
        if other is entry:
            heappush(self._times, time)
        else:
            self._add_to_bucket(time, other, entry)
        return entry

    def _add_to_bucket(self, t: float, other: Handle, entry: Handle) -> None:
        # Rare path: a second event at an already pending time.
        if other[_PRIO] is _Bucket:
            bucket = other[_ARGS][0]
        else:
            bucket = _Bucket()
            bucket.seq = 1
            bucket.append((other[_PRIO], 0, other))
            marker = [self._drain, (bucket, t), _Bucket, t]
            bucket.entry = marker
            self._slots[t] = marker
        heappush(bucket, (entry[_PRIO], bucket.seq, entry))
        bucket.seq += 1

    def _drain(self, bucket: _Bucket, t: float) -> None:
        """Run the first live event of a same-time bucket (the loop treats the bucket as one event)."""
        while bucket:
            entry = heappop(bucket)[2]
            cb = entry[_CB]
            if cb is not None:
                break
            self._dead -= 1
        else:
            self._phantom += 1
            return
        if bucket:  # requeue before the callback so same-time events it schedules join the bucket
            self._slots[t] = bucket.entry
            heappush(self._times, t)
        cb(*entry[_ARGS])

    def cancel(self, handle: Handle) -> bool:
        """Cancel a pending event; returns False if it already ran or was cancelled."""
        if not self.is_pending(handle):
            return False
        handle[_CB] = None
        handle[_ARGS] = ()  # let go of the payload now, not when the entry is popped
        self._dead += 1
        if self._dead >= COMPACT_MIN_DEAD and 2 * self._dead > len(self._times):
            self._compact()
        return True

    def is_pending(self, handle: Handle) -> bool:
        """Whether ``handle`` is queued and not cancelled (False while it is running)."""
        if handle[_CB] is None:
            return False
        queued = self._slots.get(handle[_TIME])
        if queued is handle:
            return True
        if queued is not None and queued[_PRIO] is _Bucket:
            return any(e is handle for _, _, e in queued[_ARGS][0])
        return False

    def _compact(self) -> None:
        # In place: run() holds references to these containers.
        live: dict[float, Handle] = {}
        for t, entry in self._slots.items():
            if entry[_PRIO] is _Bucket:
                bucket = entry[_ARGS][0]
                bucket[:] = [item for item in bucket if item[2][_CB] is not None]
                if not bucket:
                    continue
                heapify(bucket)
            elif entry[_CB] is None:
                continue
            live[t] = entry
        self._slots.clear()
        self._slots.update(live)
        self._times[:] = live.keys()
        heapify(self._times)
        self._dead = 0

    def every(self, interval: float, callback: Callable[[], Any], jitter: float = 0.0,
              start: float | None = None, *, priority: int = 0) -> Timer:
        """Call ``callback()`` periodically until the returned :class:`Timer` is cancelled.

        Args:
            interval: seconds between nominal firings (> 0).
            callback: called with no arguments (use a lambda or functools.partial).
            jitter: seconds, 0 <= jitter < interval; each firing is delayed by
                ``U[0, jitter)`` from its nominal time, drawn from ``sim.rng``.
                Nominal times do not drift, so the mean rate is exactly 1/interval.
            start: absolute time of the first nominal firing; default ``now + interval``.
            priority: as for :meth:`schedule`.
        """
        if not interval > 0:
            raise UsageError(f"interval must be > 0 seconds, got {interval!r}")
        if not 0.0 <= jitter < interval:
            raise UsageError(f"jitter must be in [0, interval), got {jitter!r}")
        start = self.now + interval if start is None else start
        if not start >= self.now:
            raise UsageError(f"start={start!r} is before now={self.now!r}")
        return Timer(self, callback, interval, jitter, start, priority)

    # -- running -------------------------------------------------------------------------

    @property
    def events(self) -> int:
        """Events processed so far (updated when :meth:`run` returns or raises)."""
        return self._events - self._phantom

    @property
    def pending(self) -> int:
        """Queued distinct event times, cancelled entries included (a cheap upper bound)."""
        return len(self._times)

    def peek(self) -> float:
        """Time of the next queued entry (possibly a cancelled one), or ``inf`` when empty."""
        return self._times[0] if self._times else math.inf

    def stop(self) -> None:
        """Make :meth:`run` return after the current callback (events left stay queued).

        Called outside a run, it makes the next run return before any event.
        """
        self.schedule(0.0, _raise_stop, priority=STOP_PRIORITY)

    def run(self, until: float | None = None, max_events: int | None = None) -> int:
        """Process events in order; returns how many ran in this call.

        Args:
            until: stop before the first event at time >= ``until`` and set
                ``now = until`` (half-open interval, as SimPy); None runs until
                the queue is empty (a periodic timer keeps it non-empty forever).
            max_events: stop after this many events.
        """
        if self._running:
            raise UsageError("run() called from inside a callback")
        stop_entry = None
        if until is not None:
            if until < self.now:
                raise UsageError(f"until={until!r} is before now={self.now!r}")
            stop_entry = self.schedule_at(until, _raise_stop, priority=STOP_PRIORITY)
        before = self.events
        self._running = True
        gc_old = gc.get_threshold()
        gc_raised = self.tune_gc and 0 < gc_old[0] < GC_GEN0_THRESHOLD
        if gc_raised:
            gc.set_threshold(GC_GEN0_THRESHOLD, *gc_old[1:])
        try:
            if max_events is None:
                self._loop()
            else:
                self._loop_counted(max_events)
        finally:
            self._running = False
            if gc_raised and gc.get_threshold()[0] == GC_GEN0_THRESHOLD:  # unless a callback changed it
                gc.set_threshold(*gc_old)
            if stop_entry is not None:
                self.cancel(stop_entry)  # not reached: drop the marker (lazily)
        if until is not None and self.now < until and (not self._times or self._times[0] >= until):
            self.now = until  # nothing left before `until`: the clock advances to it
        return self.events - before

    def _loop(self) -> None:
        # The hot path: a heap pop, a dict pop, a None test and a call.  An entry
        # leaves _slots when popped, which is what makes is_pending() False.
        times, slots, pop = self._times, self._slots, heappop
        n = 0
        try:
            while times:
                t = pop(times)
                entry = slots.pop(t)
                cb = entry[0]
                if cb is None:
                    self._dead -= 1
                    continue
                self.now = t
                n += 1
                cb(*entry[1])
        except _StopRun:
            n -= 1  # the stop marker is not an event
        finally:
            self._events += n

    def _loop_counted(self, max_events: int) -> None:
        times, slots, pop = self._times, self._slots, heappop
        n, phantom0 = 0, self._phantom
        try:
            while times and n - (self._phantom - phantom0) < max_events:
                t = pop(times)
                entry = slots.pop(t)
                cb = entry[0]
                if cb is None:
                    self._dead -= 1
                    continue
                self.now = t
                n += 1
                cb(*entry[1])
        except _StopRun:
            n -= 1
        finally:
            self._events += n


def _raise_stop() -> None:
    raise _StopRun()
