"""bench/throughput.py (issue #15): its bookkeeping, and a smoke run of the real thing.

The smoke run starts the bench in its smallest shape (``--quick``: 3 daemons, 3
subscribers and 3 receivers, a 50k-row table, a second or two per figure; the Redis
part only where ``redis-server`` and the ``redis`` client are installed) and checks that
the JSON it writes has every figure, with sane values.  The figures themselves are
benchmark output, not asserted bars.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))
import throughput  # noqa: E402


def _redis_available() -> bool:
    try:
        import redis  # noqa: F401
    except ImportError:
        return False
    return shutil.which("redis-server") is not None


def test_publishers_draw_distinct_disjoint_ids() -> None:
    rng = np.random.default_rng(0)
    parts = [throughput.pick_ids(rng, 10_000, 2_000, p, 4) for p in range(4)]
    for p, ids in enumerate(parts):
        assert len(np.unique(ids)) == len(ids) == 2_000
        assert (ids % 4 == p).all() and ids.min() >= 0 and ids.max() < 10_000
    assert len(np.unique(np.concatenate(parts))) == 8_000


def test_summary_takes_medians_and_per_repeat_ratios() -> None:
    args = throughput.parse_args(["--publishers", "1,4", "--batches", "1000", "--repeats", "3"])

    def system(scale: float, rss: float) -> dict:
        return {"latency": {"ack_p50_ms": 10 * scale, "ack_p90_ms": 12 * scale, "all_p50_ms": 20 * scale,
                            "all_p90_ms": 30 * scale, "all_max_ms": 40 * scale},
                "throughput": {c: {"acked_rps": 1000 / scale, "all_rps": 500 / scale, "ack_p50_ms": scale,
                                   "ack_p90_ms": 2 * scale} for c in ("1x1000", "4x1000")},
                "rss_mb": {"median": rss, "max": rss * 1.1}}

    reps = [{"ekko": system(s, 500), "redis": system(1.0, 400)} for s in (2.0, 4.0, 3.0)]
    out = throughput.summarize(reps, args)
    assert out["systems"] == ["ekko", "redis"]
    assert out["medians"]["ekko"]["latency.all_p50_ms"] == 60.0
    assert out["ratios"]["ekko/redis"]["1x1000.all_rps"] == pytest.approx(1 / 3, abs=1e-3)
    bars = out["bars"]
    assert bars["ack p50 <= 15.0 ms"] == {"value": 30.0, "met": False}
    assert bars["4 publishers >= 1 publisher, rows/s at all N, 1000-row batches"]["met"] is True
    assert bars["peak RSS per daemon (max) <= 1.3x a subscriber's (median)"]["value"] == pytest.approx(1.375)


def test_quick_sets_only_what_is_not_given() -> None:
    args = throughput.parse_args(["--quick", "--trials", "2"])
    assert args.trials == 2 and args.rows == throughput.QUICK["rows"] and args.dcs * args.per_dc == 3


@pytest.mark.slow
def test_smoke_run_writes_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "throughput.json"
    redis_ok = _redis_available()
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, str(REPO / "bench" / "throughput.py"), "--quick", "--trials", "3",
                             "--warmup", "1", "--duration", "1.5", "--out", str(out)],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        proc.terminate()            # SIGTERM: the bench stops its daemons and appliers on the way out
        stdout, stderr = proc.communicate(timeout=90)
        pytest.fail(f"bench did not finish in 240 s:\n{stdout[-3000:]}{stderr[-3000:]}")
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert "load average before" in stdout and "ekko/direct" in stdout
    doc = json.loads(out.read_text())
    assert doc["complete"] is True
    assert doc["run"]["cpus"] >= 1 and doc["run"]["python"] and doc["run"]["torch"]
    assert len(doc["load_before"]) == 3 and len(doc["load_after"]) == 3
    systems = ["ekko", "redis", "direct"] if redis_ok else ["ekko", "direct"]
    assert doc["systems"] == systems
    if not redis_ok:
        assert "apt-get install -y redis-server" in doc["skipped"]["redis"] or "pip install" in doc["skipped"]["redis"]
    rep = doc["repeats"][0]
    for s in systems:
        r = rep[s]
        lat = r["latency"]
        assert lat["n"] == 3 and lat["timeouts"] == 0, (s, lat)
        assert 0 < lat["all_p50_ms"] <= lat["all_p90_ms"] < 30_000, (s, lat)
        assert 0 < lat["ack_p50_ms"] < 30_000, (s, lat)
        fig = r["throughput"]["1x1000"]
        assert fig["rows"] >= 1000 and fig["rows"] % 1000 == 0 and fig["errors"] == 0, (s, fig)
        assert fig["acked_rps"] > 0 and fig["all_rps"] > 0, (s, fig)
        assert fig["verified"] is True, (s, fig)
        assert 0 < fig["ack_p50_ms"] <= fig["ack_p90_ms"], (s, fig)
        rss = r["rss_mb"]
        assert len(rss["per_process"]) == 3 and 20 < rss["median"] <= rss["max"] < 8000, (s, rss)
        assert r["load_before"] and r["load_after"] and not r["stop_problems"], (s, r["stop_problems"])
        assert doc["medians"][s]["1x1000.all_rps"] == fig["all_rps"]
    assert set(doc["ratios"]) == {f"ekko/{b}" for b in systems[1:]}
    assert doc["ratios"]["ekko/direct"]["1x1000.all_rps"] > 0
    if redis_ok:
        assert rep["redis"]["rss_mb"]["redis-server"] > 0
        assert "appendfsync always" in rep["redis"]["versions"]["config"]
