"""examples/torchrec_training.py end to end (two real ``ekko daemon`` processes).

Every step publishes some rows of each TorchRec table (sparse: far fewer than the
table holds), and the replica in the other DC ends equal to the trainer's tables.
Skips like test_torchrec without TorchRec, never under CI.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import test_torchrec  # noqa: F401  (skips this module without TorchRec)

REPO = Path(__file__).resolve().parents[2]
#: seconds the example may take here (about 20 s on an idle 2-core machine).
EXAMPLE_TIMEOUT_S = 300
STEPS = 4
#: rows of the example's TorchRec tables.
TABLE_ROWS = {"user": 50_000, "item": 40_000, "word": 10_000}


@pytest.mark.slow
def test_torchrec_example(tmp_path):
    summary = tmp_path / "summary.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "torchrec_training.py"), "--steps", str(STEPS),
                           "--workdir", str(tmp_path / "work"), "--summary", str(summary)],
                          env=env, capture_output=True, text=True, timeout=EXAMPLE_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    out = json.loads(summary.read_text())
    assert out["remote_equals_trainer"] and len(out["rows_per_step"]) == STEPS
    for sent in out["rows_per_step"]:
        assert all(0 < sent[t] < rows // 10 for t, rows in TABLE_ROWS.items()), sent
    assert "equals the trainer's tables bit for bit: yes" in proc.stdout
