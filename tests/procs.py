"""Helpers to run ``ekko daemon`` subprocesses on loopback in tests.

Every process started through a :class:`DaemonGroup` is stopped when the group
closes (SIGKILL for whatever is still running), so a failing test leaves no
daemons behind.  Ports come from binding port 0; logs go to files under the
test's tmp dir and are printed when a wait fails.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import msgpack
import numpy as np

from ekko.core import read_auth
from ekko.core.codec import Keyring, MsgType, encode_frame

REPO = Path(__file__).resolve().parents[1]
#: seconds a daemon gets to answer /healthz after it was started: importing torch takes a few
#: CPU seconds, and nine daemons starting at once on a small shared machine queue for the CPU.
START_TIMEOUT_S = 120.0
#: seconds a daemon gets to exit after SIGTERM (drain <= 10 s, sends <= 2 s, a snapshot with
#: fsyncs that may queue behind other daemons' on a shared disk).
STOP_TIMEOUT_S = 60.0
#: seconds one HTTP call may take.
HTTP_TIMEOUT_S = 30.0


def free_port() -> int:
    """A loopback port that was free a moment ago (bind port 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pred: Callable[[], Any], timeout: float, interval: float = 0.1, what: str = "condition") -> Any:
    """Poll ``pred`` until it returns something truthy; AssertionError after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            got = pred()
            if got:
                return got
        except (OSError, urllib.error.URLError, ValueError) as e:  # not up yet, connection reset...
            last_exc = e
        if time.monotonic() >= end:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}"
                                 + (f" (last error: {last_exc!r})" if last_exc else ""))
        time.sleep(interval)


# --------------------------------------------------------------------------- HTTP helpers
def http(method: str, url: str, data: bytes | None = None, timeout: float = HTTP_TIMEOUT_S,
         key: Keyring | bytes | str | None = None) -> tuple[int, bytes, dict[str, str]]:
    """One request with urllib; returns (status, body, headers) for 2xx and 4xx/5xx alike.
    ``key`` signs a GET (a daemon with a key refuses unsigned reads: ekko.core.read_auth)."""
    headers = {"Content-Type": "application/octet-stream"} if data is not None else {}
    if method == "GET":
        headers.update(read_auth.read_headers(key, url))
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


def post_frame(address: str, path: str, msg_type: MsgType, body: dict[str, Any],
               keyring: Keyring | None = None) -> tuple[int, Any]:
    status, raw, _ = http("POST", f"http://{address}{path}", encode_frame(msg_type, body, keyring))
    return status, (json.loads(raw) if raw else None)


def get_json(address: str, path: str, key: Keyring | bytes | str | None = None) -> Any:
    """GET ``path`` as JSON (signed with ``key`` when given); AssertionError unless 200."""
    status, raw, _ = http("GET", f"http://{address}{path}", key=key)
    if status != 200:
        raise AssertionError(f"GET {path} on {address}: {status} {raw[:300]!r}")
    return json.loads(raw)


def read_rows(address: str, model: str, table: str, ids: np.ndarray,
              key: Keyring | bytes | str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Values (float32 tables) and versions of rows, via the msgpack read format."""
    q = ",".join(str(int(i)) for i in ids)
    status, raw, _ = http("GET", f"http://{address}/v1/models/{model}/tables/{table}/rows?ids={q}&format=msgpack",
                          key=key)
    assert status == 200, raw[:300]
    m = msgpack.unpackb(raw, raw=False)
    vals = np.frombuffer(m["values"], "<f4").reshape(m["n"], m["dim"])
    return vals, np.frombuffer(m["versions"], "<i8")


def table_digests(address: str, model: str, key: Keyring | bytes | str | None = None) -> dict[str, str] | None:
    st = get_json(address, "/v1/status", key)
    m = st["models"].get(model)
    if m is None:
        return None
    return {t: info.get("digest") for t, info in m["tables"].items()}


# --------------------------------------------------------------------------- processes
@dataclass
class DaemonProc:
    """One ``ekko daemon`` subprocess."""

    node_id: str
    dc: str
    port: int
    data_dir: Path
    log_path: Path
    args: list[str]
    proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "DaemonProc":
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "ekko.cli.main", "daemon", *self.args], cwd=REPO,
                                     stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        return self

    def healthy(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise AssertionError(f"{self.node_id} exited with {self.proc and self.proc.returncode}:\n{self.log()}")
        try:
            return http("GET", f"http://{self.address}/healthz", timeout=2)[0] == 200
        except (OSError, urllib.error.URLError):
            return False

    def wait_healthy(self, timeout: float = START_TIMEOUT_S) -> None:
        wait_for(self.healthy, timeout, 0.1, f"{self.node_id} to serve")

    def terminate(self, timeout: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM and wait; returns the exit code."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.wait_exit(timeout)

    def wait_exit(self, timeout: float = STOP_TIMEOUT_S) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"{self.node_id} did not exit within {timeout}s of SIGTERM:\n{self.log()}") from None

    def kill(self) -> None:
        """SIGKILL (a crash)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""


@dataclass
class DaemonGroup:
    """Starts daemons under ``root`` and stops every one of them on :meth:`close`.

    Example::

        with DaemonGroup(tmp_path) as g:
            a = g.start("a", "dc1")
            b = g.start("b", "dc1", seeds=[a.address])
    """

    root: Path
    preset: str = "local"
    procs: list[DaemonProc] = field(default_factory=list)

    def spawn(self, node_id: str, dc: str, seeds: list[str] = (), port: int | None = None,
              data_dir: Path | None = None, extra: list[str] = ()) -> DaemonProc:
        """Start a daemon without waiting for it to serve."""
        port = port or free_port()
        data_dir = data_dir or self.root / node_id
        args = ["--node-id", node_id, "--dc", dc, "--listen", f"127.0.0.1:{port}", "--data-dir", str(data_dir),
                "--preset", self.preset, "--device", "cpu", "--log-level", "info"]
        for s in seeds:
            args += ["--seed", s]
        p = DaemonProc(node_id, dc, port, data_dir, self.root / f"{node_id}.log", [*args, *extra])
        self.procs.append(p)
        return p.start()

    def start(self, *a: Any, **kw: Any) -> DaemonProc:
        p = self.spawn(*a, **kw)
        p.wait_healthy()
        return p

    def terminate_all(self, procs: list[DaemonProc], timeout: float = STOP_TIMEOUT_S) -> dict[str, int]:
        """SIGTERM several daemons at once (they drain and snapshot in parallel); exit codes by node id."""
        for p in procs:
            assert p.proc is not None
            p.proc.send_signal(signal.SIGTERM)
        # Only one SIGTERM each: once a daemon has removed its handlers, a second one kills it.
        return {p.node_id: p.wait_exit(timeout) for p in procs}

    def close(self) -> None:
        for p in self.procs:
            p.kill()

    def __enter__(self) -> "DaemonGroup":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
