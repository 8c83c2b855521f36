"""TokenBucket accounting and LinkBudgets lookup."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ekko.core.errors import UsageError
from prioritizer import LinkBudgets, TokenBucket
from prioritizer.budget import DEFAULT_UPDATE_SHARE, MIN_BURST_BYTES, ROUNDING_SLACK_BYTES


@settings(max_examples=200, deadline=None)
@given(rate=st.floats(1.0, 1e7), burst=st.floats(1.0, 1e6),
       steps=st.lists(st.tuples(st.floats(0.0, 0.5), st.floats(0.0, 2e6)), min_size=1, max_size=80))
def test_consumed_bytes_never_exceed_rate_times_time_plus_burst(rate, burst, steps):
    b = TokenBucket(rate, burst)
    now, log = 0.0, []
    for dt, n in steps:
        now += dt
        if b.consume(n, now):
            log.append((now, n))
        assert 0.0 <= b.available(now) <= burst
    for i, (ti, _) in enumerate(log):
        total = 0.0
        for tj, n in log[i:]:
            total += n
            assert total <= rate * (tj - ti) + burst + ROUNDING_SLACK_BYTES * len(log)


@settings(max_examples=200, deadline=None)
@given(rate=st.floats(1.0, 1e7), burst=st.floats(1.0, 1e6), used=st.floats(0.0, 1.0), n=st.floats(0.0, 1.0))
def test_time_until_is_exactly_when_consume_succeeds(rate, burst, used, n):
    b = TokenBucket(rate, burst)
    assert b.consume(used * burst, 0.0)
    want = n * burst
    wait = b.time_until(want, 0.0)
    assert b.consume(want, wait)          # a driver sleeping until then is never refused
    if rate * wait * 0.01 > 2 * ROUNDING_SLACK_BYTES:      # early by more than the rounding slack
        b2 = TokenBucket(rate, burst)
        b2.consume(used * burst, 0.0)
        assert not b2.consume(want, wait * 0.99 - 1e-9)


def test_bucket_edges():
    b = TokenBucket(100.0, 50.0)
    assert b.time_until(51, 0.0) == math.inf            # larger than the burst: never
    assert b.consume(50, 0.0) and not b.consume(1, 0.0)
    assert b.available(-5.0) == 0.0                      # time going back refills nothing
    assert b.available(0.25) == 25.0
    assert b.available(10.0) == 50.0                     # capped at the burst
    z = TokenBucket(0.0, 10.0)
    assert z.consume(10, 0.0) and z.time_until(1, 0.0) == math.inf
    u = TokenBucket(math.inf, math.inf)
    assert u.unlimited and u.consume(1e18, 0.0) and u.time_until(1e18, 0.0) == 0.0
    with pytest.raises(UsageError):
        TokenBucket(-1.0, 10.0)
    with pytest.raises(UsageError):
        TokenBucket(1.0, 0.0)
    with pytest.raises(UsageError):
        b.consume(-1, 0.0)


def test_link_budgets_lookup_and_defaults():
    lb = LinkBudgets(links={("us", "eu"): 1e6})
    assert lb.rate("us", "eu") == 1e6
    assert lb.rate("eu", "us") == lb.default_bytes_per_s == DEFAULT_UPDATE_SHARE * 100e6 / 8
    assert lb.rate("us", "us") == lb.intra_dc_bytes_per_s
    assert lb.burst("us", "eu") == MIN_BURST_BYTES                      # 1 MB/s * 50 ms < floor
    assert lb.burst("us", "us") == lb.intra_dc_bytes_per_s * lb.burst_s
    bk = lb.bucket("us", "eu")
    assert (bk.rate, bk.burst) == (1e6, MIN_BURST_BYTES)
    assert lb.bucket("us", "eu") is not bk                              # one bucket per link


def test_from_capacity_leaves_room_for_inference():
    lb = LinkBudgets.from_capacity({("a", "b"): 1e9, ("b", "a"): 2e8}, update_share=0.1,
                                   default_capacity_bits_per_s=5e8)
    assert lb.rate("a", "b") == 1e9 * 0.1 / 8 and lb.rate("b", "a") == 2e8 * 0.1 / 8
    assert lb.rate("a", "c") == 5e8 * 0.1 / 8
    with pytest.raises(UsageError):
        LinkBudgets.from_capacity({}, update_share=0.0)
    with pytest.raises(UsageError):
        LinkBudgets(links={("a", "b"): 0.0})
    un = LinkBudgets.unlimited()
    assert un.bucket("x", "y").unlimited and un.burst("x", "y") == math.inf
