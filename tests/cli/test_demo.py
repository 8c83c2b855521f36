"""``ekko demo`` end to end: real daemon subprocesses, a training loop, a summary.

Runs the command as a user would (a subprocess of ``python -m ekko.cli.main``), small:
one replica, then two DCs of one replica each (gossip, push and anti-entropy
across DCs).  Checks the exit status, that the summary reports converged
digests and replicas equal to the trained model, and that no daemon is left
listening.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys

import pytest

#: seconds one demo run may take: daemons import torch on a possibly busy machine.
DEMO_TIMEOUT_S = 280


def run_demo(*args: str, data_dir=None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "ekko.cli.main", "demo", *args]
    if data_dir is not None:
        cmd += ["--data-dir", str(data_dir)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=DEMO_TIMEOUT_S)


def closed(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((host, int(port))) != 0


def check_summary(p: subprocess.CompletedProcess, replicas: int) -> None:
    out = p.stdout
    assert p.returncode == 0, out[-3000:] + p.stderr[-3000:]
    assert "final digests equal across replicas: yes" in out, out[-3000:]
    assert "replicas equal the trained model: yes" in out
    m = re.search(r"training steps: (\d+); publishes: (\d+); rows published: (\d+)", out)
    assert m and int(m.group(1)) >= 1 and int(m.group(2)) >= 1 and int(m.group(3)) > 0, out[-2000:]
    assert f"replicas: {replicas} in" in out
    addresses = re.findall(r"@(127\.0\.0\.1:\d+)", out)
    assert len(addresses) == replicas
    assert all(closed(a) for a in addresses)     # every daemon was stopped
    # the inference loop served from the last DC's replica, through ekko.attach, and once the
    # replicas equal the trained model its held-out loss is the trainer's to the last digit
    flat = " ".join(out.split())
    served = re.search(r"serving on (dc\d)-r1 \(\1\) through ekko\.attach .*?: (\d+) requests served.*?"
                       r"held-out log loss served ([0-9.]+) vs trainer ([0-9.]+)", flat)
    assert served, out[-2000:]
    dcs = set(re.findall(r"(dc\d)-r\d@", out))
    assert served.group(1) == f"dc{len(dcs)}"                      # the last DC
    assert int(served.group(2)) > 0 and served.group(3) == served.group(4)


@pytest.mark.slow
def test_demo_one_daemon(tmp_path):
    p = run_demo("--dcs", "1", "--per-dc", "1", "--duration", "8", data_dir=tmp_path)
    check_summary(p, 1)
    assert (tmp_path / "dc1-r1.log").exists() and list((tmp_path / "publisher").glob("demo-trainer.pending.*"))


@pytest.mark.slow
def test_demo_two_dcs():
    p = run_demo("--dcs", "2", "--per-dc", "1", "--duration", "8")
    check_summary(p, 2)
    # start-up shows each daemon as it comes up, not ~14 s of silence
    up = re.findall(r"(dc\d-r\d) serving on 127\.0\.0\.1:\d+ \((\d)/2, [0-9.]+ s\)", p.stdout)
    assert sorted(n for n, _ in up) == ["dc1-r1", "dc2-r1"] and [k for _, k in up] == ["1", "2"], p.stdout[:2000]
    assert p.stdout.index("serving on") < p.stdout.index("replicas: ")
    worst = {dc: float(x) for dc, x in re.findall(r"(dc\d): last seen lag max [0-9.]+ s, worst of the run ([0-9.]+) s",
                                                    p.stdout)}
    assert worst.keys() == {"dc1", "dc2"}, p.stdout[-2000:]
    # Real freshness, never absurd.  Whether a poll lands while a publish is in flight is
    # timing: with peer streams two loopback replicas hold a publish within a millisecond
    # or two, and an 8 s run read 0.000 s for both (one full-suite run of 3); that a lag
    # counts from a publish's start is asserted by the replayed timeline below.
    assert all(0 <= w < 60 for w in worst.values()), worst


def test_lag_counts_from_a_publish_start_not_its_acknowledgement():
    """The timeline that read 0.000 s in every frame: the replicas applied a publish before
    its acknowledgement came back (the ingest pushes, then waits for its fsync), so the lag
    against acknowledged counters was always 0.  Counted from the publish's start, a replica
    polled while it lacks the update shows how long it has lacked it."""
    from collections import deque

    from ekko.cli.demo import DemoState, LocalCluster, counter_floor, per_dc_rows, record_lag, staleness

    wall0 = 1_780_000_000.0                    # the trainer's wall clock at the first publish
    c1 = counter_floor(wall0) + 5              # counters of the acknowledged publishes
    state = DemoState()
    state.sent = deque([[100.0, c1]])
    # a second publish starts at 100.1 and is in flight: its counter is not known yet
    state.sent.append([100.1, counter_floor(wall0 + 0.1)])
    # polled at 100.13: dc1-r1 (the ingest) has it already, dc2-r1 still has only the first
    c2 = counter_floor(wall0 + 0.1) + 3
    assert staleness(100.13, c2, state.sent) == 0.0
    assert staleness(100.13, c1, state.sent) == pytest.approx(0.03)
    # a replica with nothing yet lags since the first publish; no answer is no number
    assert staleness(100.13, 0, state.sent) == pytest.approx(0.13) and staleness(100.13, None, state.sent) is None
    # a publish that started after the request is not held against the replica
    assert staleness(100.05, c1, state.sent) == 0.0
    state.sent[-1][1] = c2                     # acknowledged now: its exact counter

    cluster = LocalCluster(2, 1, "/nonexistent", base_port=7000)
    status = {"dc1-r1": {"models": {"demo-ranker": {"head": c2, "lag_s": 0.0}}},
              "dc2-r1": {"models": {"demo-ranker": {"head": c1, "lag_s": 0.0}}}}
    state.status.update(status)
    for nid, st in status.items():
        record_lag(state, nid, 100.13, staleness(100.13, st["models"]["demo-ranker"]["head"], state.sent))
    # a later poll finds dc2-r1 caught up: the view keeps the worst of the recent polls
    record_lag(state, "dc2-r1", 100.6, staleness(100.6, c2, state.sent))
    rows = {dc: (lags, own) for dc, _, _, lags, own in per_dc_rows(cluster, state)}
    assert rows["dc1"][0] == [0.0] and rows["dc2"][0] == [pytest.approx(0.03)]
    assert state.worst_lag["dc2-r1"] == pytest.approx(0.03)
    record_lag(state, "dc2-r1", 106.0, 0.0)   # LAG_WINDOW_S later the old poll has left the window
    assert state.lag["dc2-r1"] == 0.0 and state.worst_lag["dc2-r1"] == pytest.approx(0.03)


def test_demo_bad_arguments():
    p = run_demo("--dcs", "0")
    assert p.returncode == 2 and "need 1..64 replicas" in p.stderr
    p = run_demo("--duration", "-1")
    assert p.returncode == 2


@pytest.mark.slow
def test_demo_ctrl_c_stops_cleanly():
    import signal
    import time
    cmd = [sys.executable, "-m", "ekko.cli.main", "demo", "--dcs", "1", "--per-dc", "1"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        end = time.monotonic() + DEMO_TIMEOUT_S
        for line in p.stdout:                    # progress lines appear once training runs
            lines.append(line)
            if line.startswith("step ") or time.monotonic() > end:
                break
        p.send_signal(signal.SIGINT)             # what Ctrl-C in the terminal sends
        out, _ = p.communicate(timeout=DEMO_TIMEOUT_S)
    finally:
        if p.poll() is None:
            p.kill()
    out = "".join(lines) + out
    assert p.returncode == 0, out[-3000:]
    assert "training stopped (Ctrl-C)" in out and "final digests equal across replicas: yes" in out
    assert all(closed(a) for a in re.findall(r"@(127\.0\.0\.1:\d+)", out))


def test_daemons_run_the_starters_code(tmp_path):
    """LocalCluster's daemons import ekko from the tree that started them, whatever the
    working directory and whatever PYTHONPATH says (a bench run from elsewhere once ran
    another tree's daemons)."""
    import ekko
    from ekko.cli.demo import daemon_env

    wrong = tmp_path / "other-tree"
    (wrong / "ekko").mkdir(parents=True)
    (wrong / "ekko" / "__init__.py").write_text("raise ImportError('the wrong tree')\n")
    env = daemon_env({"PYTHONPATH": str(wrong), "PATH": os.environ.get("PATH", "")})
    out = subprocess.run([sys.executable, "-c", "import ekko; print(ekko.__file__)"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=60, check=True).stdout.strip()
    assert out == ekko.__file__
