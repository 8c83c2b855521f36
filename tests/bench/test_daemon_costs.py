"""bench/daemon_costs.py's measuring parts that need no daemon: the fit, the CPU clock,
the send through the daemon's transport and the WAN emulator's cost."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import daemon_costs as dc  # noqa: E402


def test_fit_recovers_a_line_and_reports_the_residual():
    a, b, res = dc.fit([100, 1000, 10_000], [1e-3 + 100 * 2e-8, 1e-3 + 1000 * 2e-8, 1e-3 + 10_000 * 2e-8])
    assert a == pytest.approx(1e-3) and b == pytest.approx(2e-8) and res < 1e-12


def test_task_cpu_counts_this_process_threads():
    before = dc.task_cpu_s()
    x = 0
    for i in range(2_000_000):
        x += i
    assert dc.task_cpu_s() > before


def test_the_send_and_the_emulator_cost_something_and_grow_with_work():
    fan = dc.measure_fanout(3)
    assert len(fan) >= 3
    for per_k in fan.values():
        assert per_k[max(dc.FANOUT)] > per_k[min(dc.FANOUT)] > 0      # 16 destinations cost more than 1
    proxy = dc.measure_proxy(20)
    assert set(proxy) == set(dc.PROXY_SIZES) and all(v > 0 for v in proxy.values())
