"""Bandwidth budgets for the push path: a token bucket per link, and per-link rates.

WAN links between data centres carry inference traffic first; model updates
may use only a share of them (the Ekko paper reports 0.1-1 Gbps per inter-DC
link, shared).  Each outbound link queue owns a :class:`TokenBucket` whose rate
is that share, and :class:`LinkBudgets` says what the share is for each
(source DC, destination DC) pair.

Everything is sans-IO: time is passed in as ``now`` (seconds, any epoch, never
decreasing for one bucket); nothing reads a clock.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

from ekko.core.errors import UsageError

#: Rounding slack (bytes) when comparing a request with the tokens held:
#: ``time_until`` computes a wait in floating point and the refill at
#: ``now + wait`` can land a fraction of an ulp short of the request.  Without
#: the slack a driver that sleeps exactly until ``next_ready`` could find the
#: budget still "not quite" there and spin.  It can let through at most this
#: much extra per consume, far below a byte over any realistic run.
ROUNDING_SLACK_BYTES = 1e-6

#: bits per byte, for converting link capacities quoted in bits per second.
BITS_PER_BYTE = 8
#: share of an inter-DC link that model updates may use by default: the rest is
#: left for inference traffic, which always comes first.
DEFAULT_UPDATE_SHARE = 0.25
#: capacity assumed for an inter-DC link not listed: 100 Mbit/s, the low end of
#: the 0.1-1 Gbps the Ekko paper reports, so an unknown link is never overrun.
DEFAULT_WAN_CAPACITY_BITS = 100e6
#: capacity assumed between two replicas in the same data centre: 10 Gbit/s.
DEFAULT_LAN_CAPACITY_BITS = 10e9
#: the bucket holds this many seconds of rate: small bursts go out at once, and
#: a link never dumps more than this much above its average onto the WAN.
DEFAULT_BURST_S = 0.05
#: burst never below this (bytes), so any single row of a wide table and a full
#: minimum-size frame fit in the bucket even on a slow link.
MIN_BURST_BYTES = 256 * 1024


class TokenBucket:
    """A token bucket of bytes: ``rate_bytes_per_s`` refill, at most ``burst_bytes`` held.

    It starts full at the first call's ``now``.  Over any interval of length
    ``t`` the bytes consumed never exceed ``rate * t + burst`` (plus
    :data:`ROUNDING_SLACK_BYTES` per consume).  ``rate = math.inf`` is an
    unlimited bucket.

    Args:
        rate_bytes_per_s: long-run rate, bytes per second (>= 0; inf = unlimited).
        burst_bytes: capacity, bytes (> 0); a request larger than this never fits.

    Example:
        >>> b = TokenBucket(rate_bytes_per_s=1000, burst_bytes=500)
        >>> b.consume(400, now=0.0), b.consume(400, now=0.0)
        (True, False)
        >>> b.available(now=0.0), b.time_until(400, now=0.0)
        (100.0, 0.3)
        >>> b.consume(400, now=0.3)
        True
    """

    __slots__ = ("rate", "burst", "_tokens", "_t")

    def __init__(self, rate_bytes_per_s: float, burst_bytes: float) -> None:
        if not rate_bytes_per_s >= 0:
            raise UsageError(f"rate must be >= 0 bytes/s, got {rate_bytes_per_s}")
        if not burst_bytes > 0:
            raise UsageError(f"burst must be > 0 bytes, got {burst_bytes}")
        self.rate = float(rate_bytes_per_s)
        self.burst = float(burst_bytes)
        self._tokens = self.burst
        self._t: float | None = None

    @property
    def unlimited(self) -> bool:
        return math.isinf(self.rate)

    def _refill(self, now: float) -> None:
        if self._t is None:
            self._t = now
            return
        dt = now - self._t
        if dt > 0:   # time going backwards refills nothing (and is not remembered)
            self._tokens = min(self.burst, self._tokens + self.rate * dt) if not self.unlimited else self.burst
            self._t = now

    def available(self, now: float) -> float:
        """Bytes that may be sent at ``now`` (inf when unlimited)."""
        if self.unlimited:
            return math.inf
        self._refill(now)
        return self._tokens

    def consume(self, n: float, now: float) -> bool:
        """Take ``n`` bytes if they are available at ``now``; False (and take nothing) if not."""
        if n < 0:
            raise UsageError(f"cannot consume {n} bytes")
        if self.unlimited:
            return True
        self._refill(now)
        if n > self._tokens + ROUNDING_SLACK_BYTES:
            return False
        self._tokens = max(0.0, self._tokens - n)
        return True

    def time_until(self, n: float, now: float) -> float:
        """Seconds from ``now`` until ``n`` bytes are available (0 now; inf if never)."""
        if self.unlimited:
            return 0.0
        self._refill(now)
        if n <= self._tokens + ROUNDING_SLACK_BYTES:
            return 0.0
        if n > self.burst + ROUNDING_SLACK_BYTES or self.rate == 0:
            return math.inf
        return (n - self._tokens) / self.rate

    def __repr__(self) -> str:
        return f"TokenBucket(rate_bytes_per_s={self.rate}, burst_bytes={self.burst})"


@dataclass(frozen=True)
class LinkBudgets:
    """Bytes per second that model updates may use on each directed DC-to-DC link.

    The rates are what is left for updates after inference traffic: a share of
    each link's capacity (:meth:`from_capacity` does that arithmetic), never the
    whole link.  A link not listed gets ``default_bytes_per_s`` between data
    centres and ``intra_dc_bytes_per_s`` inside one.

    Attributes:
        default_bytes_per_s: rate for an unlisted inter-DC link, bytes/s.  Default:
            :data:`DEFAULT_UPDATE_SHARE` of :data:`DEFAULT_WAN_CAPACITY_BITS`
            (25% of 100 Mbit/s = 3.125 MB/s).
        intra_dc_bytes_per_s: rate between replicas of one data centre, bytes/s
            (``math.inf`` = unlimited).  Default: 25% of 10 Gbit/s.
        links: explicit rates, ``(src_dc, dst_dc) -> bytes/s``; directed, so an
            asymmetric link lists both directions.
        burst_s: the bucket holds this many seconds of its rate.
        min_burst_bytes: floor on any bucket's burst, bytes; it must exceed the
            widest row's wire size or that row can never be sent.

    Example:
        >>> lb = LinkBudgets.from_capacity({("us", "eu"): 1e9}, update_share=0.2)
        >>> lb.rate("us", "eu"), lb.rate("eu", "us") == lb.default_bytes_per_s
        (25000000.0, True)
        >>> lb.bucket("us", "eu").burst
        1250000.0
    """

    default_bytes_per_s: float = DEFAULT_UPDATE_SHARE * DEFAULT_WAN_CAPACITY_BITS / BITS_PER_BYTE
    intra_dc_bytes_per_s: float = DEFAULT_UPDATE_SHARE * DEFAULT_LAN_CAPACITY_BITS / BITS_PER_BYTE
    links: Mapping[tuple[str, str], float] = field(default_factory=dict)
    burst_s: float = DEFAULT_BURST_S
    min_burst_bytes: float = MIN_BURST_BYTES

    def __post_init__(self) -> None:
        rates = [self.default_bytes_per_s, self.intra_dc_bytes_per_s, *self.links.values()]
        if any(not r > 0 for r in rates):
            raise UsageError("every link rate must be > 0 bytes/s")
        if not self.burst_s > 0 or not self.min_burst_bytes > 0:
            raise UsageError("burst_s and min_burst_bytes must be > 0")

    @classmethod
    def from_capacity(cls, capacity_bits_per_s: Mapping[tuple[str, str], float],
                      update_share: float = DEFAULT_UPDATE_SHARE,
                      default_capacity_bits_per_s: float = DEFAULT_WAN_CAPACITY_BITS,
                      lan_capacity_bits_per_s: float = DEFAULT_LAN_CAPACITY_BITS,
                      **kw: float) -> "LinkBudgets":
        """Budgets as ``update_share`` of each link's capacity (bits/s), leaving the rest
        for inference traffic."""
        if not 0 < update_share <= 1:
            raise UsageError(f"update_share must be in (0, 1], got {update_share}")
        f = update_share / BITS_PER_BYTE
        return cls(default_bytes_per_s=default_capacity_bits_per_s * f,
                   intra_dc_bytes_per_s=lan_capacity_bits_per_s * f,
                   links={k: v * f for k, v in capacity_bits_per_s.items()}, **kw)

    @classmethod
    def unlimited(cls) -> "LinkBudgets":
        """No budget on any link (tests, the ``local`` preset on loopback)."""
        return cls(default_bytes_per_s=math.inf, intra_dc_bytes_per_s=math.inf)

    def rate(self, src_dc: str, dst_dc: str) -> float:
        """Bytes/s updates may use from ``src_dc`` to ``dst_dc``."""
        r = self.links.get((src_dc, dst_dc))
        if r is not None:
            return r
        return self.intra_dc_bytes_per_s if src_dc == dst_dc else self.default_bytes_per_s

    def burst(self, src_dc: str, dst_dc: str) -> float:
        """Bucket capacity (bytes) for the link."""
        r = self.rate(src_dc, dst_dc)
        return math.inf if math.isinf(r) else max(self.min_burst_bytes, r * self.burst_s)

    def bucket(self, src_dc: str, dst_dc: str) -> TokenBucket:
        """A fresh, full token bucket for one outbound link."""
        return TokenBucket(self.rate(src_dc, dst_dc), self.burst(src_dc, dst_dc))
