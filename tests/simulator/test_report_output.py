"""What ``ekko sim run`` shows and writes (issue 19): legends that cover no data, a
summary whose columns say their unit, progress bars that end at 100 %."""

from __future__ import annotations

import re
import subprocess
import sys

import matplotlib
import numpy as np
import pytest

from simulator.report import latency_cdf_figure, latency_per_dc_figure, summary, wan_bytes_figure

matplotlib.use("Agg")

DCS = ["us-east-1", "us-west-2", "eu-west-1", "ap-northeast-1"]
SYSTEMS = ["ekko", "ekko-no-gateways", "random-gossip", "direct-push", "adam-2pc", "broadcast"]


def fake_results(seed: int = 0) -> dict:
    """Results shaped like :func:`simulator.experiment.run_scenario`'s, with data that fills
    the axes (curves reach both top corners, bars every link) so that a legend anywhere
    inside them would cover some."""
    rng = np.random.default_rng(seed)
    dcs = [DCS[i % len(DCS)] for i in range(12)]
    links = [f"{a}->{b}" for a in DCS for b in DCS if a != b]
    systems = {}
    for k, name in enumerate(SYSTEMS):
        lat = {"mean": 0.1 * (k + 1), "p99": 0.3 * (k + 1), "p50": 0.05 * (k + 1)}
        systems[name] = {
            "_latency_matrix": rng.exponential(0.05 * (k + 1), (200, len(dcs))) + 0.001,
            "_replica_dcs": dcs,
            "wan_bytes_by_link": {link: float(rng.uniform(1e3, 1e7)) for link in links},
            "latency_s": {"intra_dc": lat, "cross_dc": lat, "all": lat},
            "wan_bytes": 2e6 * (k + 1), "wan_bytes_min": 2e6, "converged": True}
    return {"scenario": "paper", "replicas": len(dcs), "training_dc": DCS[0], "seed": seed, "dcs": DCS,
            "mode": "full", "events": 1000, "wall_s": 1.0, "events_per_s": 1000.0, "systems": systems}


@pytest.mark.parametrize("make", [latency_cdf_figure, latency_per_dc_figure, wan_bytes_figure],
                         ids=lambda f: f.__name__)
def test_the_legend_covers_no_data_and_stays_in_the_figure(make):
    import matplotlib.pyplot as plt

    fig = make(fake_results())
    try:
        fig.canvas.draw()
        r = fig.canvas.get_renderer()
        (ax,) = fig.axes
        leg = ax.get_legend()
        assert leg is not None and len(leg.get_texts()) >= 4
        lb, ab = leg.get_window_extent(r), ax.get_window_extent(r)
        assert not lb.overlaps(ab), f"legend {lb} over the axes {ab}"
        fb = fig.bbox
        assert fb.x0 <= lb.x0 and lb.x1 <= fb.x1 and fb.y0 <= lb.y0 and lb.y1 <= fb.y1, "legend cut off"
    finally:
        plt.close(fig)


def test_summary_latency_columns_carry_their_unit_and_the_wan_ratio_reads_as_one():
    text = summary(fake_results())
    header = next(line for line in text.splitlines() if line.startswith("| system"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    latency_cols = [c for c in cols if any(w in c for w in ("mean", "p99", "p50"))]
    assert len(latency_cols) == 4 and all(c.endswith("(s)") for c in latency_cols), cols
    assert "WAN / min" not in text and "WAN bytes / minimum" in cols
    row = next(line for line in text.splitlines() if line.startswith("| ekko-no-gateways"))
    assert row.split("|")[cols.index("WAN bytes / minimum") + 1].strip() == "2.00"


@pytest.mark.slow
def test_progress_bars_end_at_100_percent(tmp_path):
    # Small enough for seconds; ekko converges long before the scenario's simulated end.
    p = subprocess.run([sys.executable, "-m", "ekko.cli.main", "sim", "run", "paper", "--replicas", "6",
                        "--duration", "3", "--systems", "ekko,adam-2pc", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    bars = {m.group(1): m.group(0) for m in re.finditer(r"^(ekko|adam-2pc)\s+.*$", p.stderr, re.M)}
    assert bars.keys() == {"ekko", "adam-2pc"}, p.stderr
    for system, line in bars.items():
        assert "╸" not in line and "done at" in line, line      # a full bar, no partial cell
        t, end = map(float, re.search(r"done at ([\d.]+) of ([\d.]+) s", line).groups())
        assert 0 < t <= end
    assert (tmp_path / "summary.md").read_text().count("(s)") >= 4
