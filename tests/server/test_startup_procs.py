"""Daemon start-up with real processes (issue #19): a live node id is not taken over,
restarts of the same node still work, a taken port or an unusable data dir fails
cleanly and leaves nothing behind."""

from __future__ import annotations

import socket
import subprocess
import sys

from ekko.cli.main import main
from tests.procs import REPO, DaemonGroup, free_port, get_json, wait_for

#: seconds a refused daemon gets to exit (importing torch included).
EXIT_TIMEOUT_S = 120.0


def member(address: str, node_id: str) -> dict:
    """``node_id``'s entry in the member list of the daemon at ``address``; ValueError (which
    wait_for retries) while it is not there yet: on a loaded host b may join after a while."""
    found = [m for m in get_json(address, "/v1/status?cluster=1")["members"] if m["node_id"] == node_id]
    if not found:
        raise ValueError(f"{node_id!r} is not in the member list of {address} yet")
    return found[0]


def test_live_node_id_is_refused_and_restarts_still_work(tmp_path, capsys):
    with DaemonGroup(tmp_path) as g:
        a = g.start("a", "dc1")
        b = g.start("b", "dc1", seeds=[a.address])
        wait_for(lambda: member(a.address, "b")["state"] == "alive", 60, what="a to see b")
        before = member(a.address, "b")

        # A second "b" at another address, with its own (fresh) data dir: refused.
        dup = g.spawn("b", "dc1", seeds=[a.address], data_dir=tmp_path / "b-dup")
        rc = dup.wait_exit(EXIT_TIMEOUT_S)
        assert rc != 0, dup.log()
        assert f"'b' is alive in the cluster at {b.address}" in dup.log(), dup.log()
        assert "Traceback" not in dup.log()
        assert not (tmp_path / "b-dup").exists()            # nothing written
        assert get_json(b.address, "/v1/status")["incarnation"] == before["incarnation"]
        assert member(a.address, "b") | {"lag_s": None} == before | {"lag_s": None}   # not taken over

        # ekko members against the real cluster, with the URL form of --peer
        assert main(["members", "--peer", f"http://{a.address}"]) == 0
        out = capsys.readouterr().out
        assert a.address in out and b.address in out and "alive" in out

        # The same node restarted at once after a crash (a still holds it alive): same port ...
        b.kill()
        assert member(a.address, "b")["state"] == "alive"
        b2 = g.start("b", "dc1", seeds=[a.address], port=b.port, data_dir=b.data_dir)
        wait_for(lambda: member(a.address, "b")["incarnation"] > before["incarnation"], 60,
                 what="a to see b's new incarnation")
        # ... and at another port: its old address does not answer, so it is not a namesake.
        b2.kill()
        b3 = g.start("b", "dc1", seeds=[a.address], data_dir=b.data_dir)
        wait_for(lambda: member(a.address, "b")["address"] == b3.address, 60, what="a to see b's new address")
        assert b3.terminate() == 0 and a.terminate() == 0


def test_taken_port_and_unusable_data_dir_fail_cleanly(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        fresh = tmp_path / "fresh"
        p = _daemon(["--listen", f"127.0.0.1:{port}", "--data-dir", str(fresh)])
        assert p.returncode == 1 and f"cannot serve on 127.0.0.1:{port}" in p.stderr, p.stderr
        assert not fresh.exists()                            # no empty wal/ (or anything) left behind

    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    p = _daemon(["--listen", f"127.0.0.1:{free_port()}", "--data-dir", str(not_a_dir)])
    assert p.returncode == 2, p.stderr
    assert f"data dir {not_a_dir} cannot be used" in p.stderr and "cannot serve on" not in p.stderr
    assert "Traceback" not in p.stderr


def _daemon(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ekko.cli.main", "daemon", "--node-id", "x", "--dc", "d",
                           "--device", "cpu", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=EXIT_TIMEOUT_S)
