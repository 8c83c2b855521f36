"""bench/serving.py end to end, small: every method prints a figure and the attached
lookups see the publisher's updates (freshness measured)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_serving_bench_runs_and_prints_every_method():
    out = subprocess.run([sys.executable, str(REPO / "bench" / "serving.py"), "--lookups", "40", "--rows", "5000",
                          "--dim", "16", "--rate", "20"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    for method in ("local index_select", "attach lookup", "attach index_select", "Replica index_select",
                   "HTTP read_rows"):
        assert method in text, text
    assert "freshness (attach)" in text and "no publish seen" not in text, text
    assert "load average before" in text and "load average after" in text


def test_serving_bench_refuses_bad_arguments():
    out = subprocess.run([sys.executable, str(REPO / "bench" / "serving.py"), "--rows", "10"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and "--rows" in out.stderr
