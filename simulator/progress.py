"""Progress reports of a running system: the callback type and the step between reports
(also the step between convergence checks, so every driver stops at the same times)."""

from __future__ import annotations

from typing import Callable

from simulator.scenario import Scenario

#: ``progress(system, simulated_now, simulated_end)``.
Progress = Callable[[str, float, float], None]


def progress_step(sc: Scenario) -> float:
    """Simulated seconds between progress reports and convergence checks."""
    return max(0.5, (sc.duration_s + sc.settle_s) / 100)
