"""examples/online_rollback.py end to end (real daemons): detected, rolled back, resumed.

A short run: the poisoned feed starts right after the detector's warm-up.  The
example must roll the model back everywhere, the trainer must learn of it and
restore, train on, and the replica in the other DC must end equal to the module.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
#: seconds the example may take here (it takes well under a minute on an idle 2-core machine).
EXAMPLE_TIMEOUT_S = 300


@pytest.mark.slow
def test_online_rollback_example(tmp_path):
    summary = tmp_path / "summary.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "online_rollback.py"), "--windows", "14",
                           "--harm-at", "7", "--workdir", str(tmp_path / "work"), "--summary", str(summary)],
                          env=env, capture_output=True, text=True, timeout=EXAMPLE_TIMEOUT_S)
    print(proc.stdout[-4000:], proc.stderr[-2000:])
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(summary.read_text())
    rb = out["rollback"]
    assert rb is not None and rb["id"].startswith("auto.") and rb["metric"] == "auc"
    cut_window = int(rb["cut"][1:]) if rb["cut"].startswith("w") else 0
    assert cut_window < 7, "rolled back to a cut from before the poisoned data"
    assert out["resumed_windows"] >= 1 and out["remote_equals_trainer"]
    windows = out["windows"]
    poisoned = [w["auc_served"] for w in windows if w["poisoned"] and w["window"] < rb["window"]]
    after = [w["auc_served"] for w in windows if w["window"] >= rb["window"]]
    assert poisoned and after and min(after) > max(poisoned) + 0.1, "served quality recovered after the resume"
    assert "RolledBack to" in proc.stdout and "equals the trainer's module bit for bit: yes" in proc.stdout
