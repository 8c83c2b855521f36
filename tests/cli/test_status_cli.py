"""``ekko --version``, ``--peer``/``$EKKO_PEER``, ``ekko status`` at 80 columns with human
units, and ``ekko members`` (issue #19)."""

from __future__ import annotations

import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from rich.console import Console

from ekko import __version__
from ekko.cli.human import head_age, human_count, human_seconds
from ekko.cli.main import build_parser, main
from ekko.cli.options import PEER_ENV, peer_url
from ekko.cli.status import render_status
from ekko.core.errors import UsageError
from ekko.core.version import HLC_EPOCH_MS, HLC_LOGICAL_BITS

#: the terminal width ``ekko status`` must fit.
TERMINAL_COLUMNS = 80
NOW = 1_790_000_000.0


def head_at(unix_s: float) -> int:
    """The HLC head of an update made at ``unix_s``."""
    return int(unix_s * 1000 - HLC_EPOCH_MS) << HLC_LOGICAL_BITS


def realistic_status() -> dict:
    """A status answer as a daemon gives it, with realistic names and sizes."""
    inc = int((NOW - 600) * 1e9)
    table = {"rows": 100_000, "dim": 64, "dtype": "float32", "shards": 16, "dense": False,
             "written_rows": 1_234_567, "digest": "0123456789abcdef0123456789abcdef"}
    return {"node_id": "r1-dc1", "dc": "dc1", "address": "127.0.0.1:27070", "incarnation": inc, "serving": True,
            "models": {"ranking": {"head": head_at(NOW - 3.2), "lag_s": 0.25, "traffic_share": 1.0,
                                   "tables": {"user_emb": table, "item_emb": dict(table, rows=2_000_000)}}},
            "members": [{"node_id": f"r{i}-dc{i}", "dc": f"dc{i}", "address": f"127.0.0.1:2707{i}",
                         "state": "alive", "incarnation": inc, "lag_s": {"ranking": 1.5 * i}} for i in range(3)]}


def test_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"ekko {__version__}"


def test_human_units():
    assert [human_count(n) for n in (7, 1000, 100_000, 1_200_000)] == ["7", "1k", "100k", "1.2M"]
    assert [human_seconds(s) for s in (0.25, 3.21, 270, None)] == ["250 ms", "3.2 s", "4.5 min", "-"]
    assert head_age(head_at(NOW - 3.2), NOW)[1] == "3.2 s ago"
    assert head_age(0, NOW) == ("never", "-")


def test_status_fits_80_columns_with_human_units():
    buf = io.StringIO()
    render_status(realistic_status(), Console(file=buf, width=TERMINAL_COLUMNS), now=NOW)
    out = buf.getvalue()
    assert max(len(line) for line in out.splitlines()) <= TERMINAL_COLUMNS, out
    assert "…" not in out and "..." not in out, out              # no cell cut short
    for text in ("ranking", "user_emb", "float32", "100k", "2M", "1.23M", "3.2 s ago", "250 ms",
                 "0123456789ab", "r2-dc2", "3.0 s", "cluster (3 members)"):
        assert text in out, (text, out)
    # raw HLC heads and nanosecond incarnations are not shown (they stay in --json)
    st = realistic_status()
    assert str(st["models"]["ranking"]["head"]) not in out and str(st["incarnation"]) not in out


@pytest.mark.parametrize("given, url", [("127.0.0.1:27070", "http://127.0.0.1:27070"),
                                        ("http://127.0.0.1:27070/", "http://127.0.0.1:27070"),
                                        ("https://replica.example:443", "https://replica.example:443"),
                                        ("[::1]:7070", "http://[::1]:7070")])
def test_peer_forms(given, url):
    assert peer_url(given) == url


@pytest.mark.parametrize("bad", ["127.0.0.1", "host:port", "ftp://h:1", "http://h:1/v1/status", "h:99999", ":7070"])
def test_bad_peer_is_a_one_line_error(bad, capsys, monkeypatch):
    monkeypatch.delenv(PEER_ENV, raising=False)
    with pytest.raises(UsageError, match="bad peer"):
        peer_url(bad)
    assert main(["status", "--peer", bad]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad peer" in err and "Traceback" not in err


def test_missing_peer_names_the_flag_and_the_variable(capsys, monkeypatch):
    monkeypatch.delenv(PEER_ENV, raising=False)
    assert main(["members"]) == 2
    err = capsys.readouterr().err
    assert "--peer" in err and PEER_ENV in err


class _FakeReplica:
    """A stdlib HTTP server answering ``/v1/status`` with a fixed status (and no cuts)."""

    def __init__(self, status: dict) -> None:
        self.paths: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                outer.paths.append(self.path)
                st = dict(status)
                if "cluster=1" not in self.path:
                    st.pop("members", None)
                if self.path.endswith("/cuts"):
                    st = {"cuts": []}
                body = json.dumps(st).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def replica():
    st = realistic_status()
    st["models"]["ranking"]["head"] = head_at(time.time() - 1)
    r = _FakeReplica(st)
    yield r
    r.close()


def test_status_takes_a_url_and_the_environment(replica, capsys, monkeypatch):
    monkeypatch.delenv(PEER_ENV, raising=False)
    assert main(["status", "--peer", f"http://{replica.address}", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["node_id"] == "r1-dc1"
    monkeypatch.setenv(PEER_ENV, f"http://{replica.address}/")
    assert main(["status", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["models"]["ranking"]["tables"]["user_emb"]["rows"] == 100_000
    # the flag wins over the environment
    monkeypatch.setenv(PEER_ENV, "127.0.0.1:1")
    assert main(["status", "--peer", replica.address, "--json"]) == 0


def test_members_lists_every_member(replica, capsys, monkeypatch):
    monkeypatch.setenv(PEER_ENV, replica.address)
    monkeypatch.setenv("COLUMNS", str(TERMINAL_COLUMNS))
    assert main(["members"]) == 0
    out = capsys.readouterr().out
    assert replica.paths[-1] == "/v1/status?cluster=1"
    for i in range(3):
        assert f"r{i}-dc{i}" in out and f"127.0.0.1:2707{i}" in out
    assert "alive" in out and "lag ranking" in out and "3.0 s" in out
    assert max(len(line) for line in out.splitlines()) <= TERMINAL_COLUMNS
    assert main(["members", "--json"]) == 0
    members = json.loads(capsys.readouterr().out)
    assert [m["node_id"] for m in members] == ["r0-dc0", "r1-dc1", "r2-dc2"]


def test_every_peer_option_reads_the_environment(replica, capsys, monkeypatch):
    """cuts, cut, baseline and rollback take $EKKO_PEER too (the flag is not required)."""
    monkeypatch.setenv(PEER_ENV, f"http://{replica.address}")
    parse = build_parser().parse_args
    for argv in (["cuts", "--model", "m"], ["cut", "--model", "m"], ["rollback", "--model", "m", "--to", "c"],
                 ["baseline", "--model", "m", "--unpin"], ["status"], ["members"]):
        assert parse(argv).peer is None, argv      # resolved from the environment when run
    assert main(["cuts", "--model", "ranking"]) == 0
    assert "no cuts of ranking" in capsys.readouterr().out
    assert replica.paths[-1] == "/v1/models/ranking/cuts"
    monkeypatch.setenv(PEER_ENV, "not a peer")
    assert main(["cuts", "--model", "ranking"]) == 2
    assert "bad peer 'not a peer'" in capsys.readouterr().err
