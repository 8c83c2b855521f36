"""Benchmark: what a pinned baseline replica costs its data centre, on real daemons.

What it measures: the same workload twice on real ``ekko daemon`` processes
(``--dcs`` x ``--per-dc`` on loopback, ``--preset local``, CPU tensors), once with
only ordinary replicas and once with one of them (the last replica of the last DC)
pinned as a baseline to a cut taken after a warm-up (``POST
/v1/models/{m}/baseline``, i.e. ``ekko baseline --pin``):

* freshness of the baseline's DC peers: for each of ``--publishes`` publishes of
  ``--rows`` rows (every ``--interval`` seconds, to a replica in the first DC), the
  time from the publish's ack to its rows' versions being readable at each peer
  (polling ``GET /v1/models/m/tables/t/rows`` for the publish's last row, every
  2 ms; resolution about one HTTP round trip per peer). p50 and p90 over every (publish, peer);
* bytes received (``ekko_bytes_received_total`` of ``/metrics``: every peer frame)
  by the baseline and by an ordinary replica of the same DC over the measured
  window, in both runs.

The bar (issue #13): the DC peers' freshness within 1.5x of the run without a
baseline, and the baseline receiving at most 1.2x an ordinary replica's bytes.
Both runs start fresh daemons in fresh data dirs; ``--repeat`` pairs of runs give
medians (the order within a pair alternates).  The machine's load average is printed before and after: other work on
a small machine inflates the latencies of both runs.

Run:  python bench/baseline.py [--publishes 40 --rows 2000 --dim 32 --repeat 1]
"""

from __future__ import annotations

import os
import sys

# Run as ``python bench/baseline.py``: the script's directory comes first on sys.path;
# the repo root goes first instead, so this checkout's packages are the ones imported.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if sys.path and os.path.abspath(sys.path[0]) == os.path.join(_ROOT, "bench"):
    sys.path.pop(0)
sys.path.insert(0, _ROOT)

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import urllib.error  # noqa: E402
import urllib.request  # noqa: E402
from pathlib import Path  # noqa: E402

import msgpack  # noqa: E402
import numpy as np  # noqa: E402

from ekko.core.chain import PublisherChain  # noqa: E402
from ekko.core.codec import MsgType, encode_frame  # noqa: E402
from ekko.core.spec import ModelSpec, TableSpec  # noqa: E402

#: seconds a daemon gets to serve after start (torch import; several start at once).
START_TIMEOUT_S = 180.0
#: seconds a publish may take to show up at a peer before it counts as lost.
VISIBLE_TIMEOUT_S = 10.0
#: seconds to wait for the cluster to form, the catalog and the cut to spread.
SETTLE_TIMEOUT_S = 90.0
#: HTTP timeout of one call.
HTTP_TIMEOUT_S = 30.0
#: seconds between two polls of a peer (the poller must not eat the daemons' CPU).
POLL_GAP_S = 0.002
#: the freshness bar and the bytes bar of issue #13.
FRESHNESS_BAR = 1.5
BYTES_BAR = 1.2


def _http(method: str, url: str, data: bytes | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=data, method=method)
    try:
        with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT_S) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _post(addr: str, path: str, t: MsgType, body: dict) -> dict:
    status, raw = _http("POST", f"http://{addr}{path}", encode_frame(t, body))
    if status != 200:
        raise RuntimeError(f"POST {path} at {addr}: {status} {raw[:300]!r}")
    return json.loads(raw)


def _get(addr: str, path: str) -> dict:
    status, raw = _http("GET", f"http://{addr}{path}")
    if status != 200:
        raise RuntimeError(f"GET {path} at {addr}: {status} {raw[:300]!r}")
    return json.loads(raw)


def _wait(pred, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if pred():
                return
        except (OSError, RuntimeError, ValueError, KeyError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"timed out waiting for {what}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _version_of(addr: str, model: str, table: str, row: int) -> int:
    status, raw = _http("GET", f"http://{addr}/v1/models/{model}/tables/{table}/rows?ids={row}&format=msgpack")
    if status != 200:
        return -1
    return int(np.frombuffer(msgpack.unpackb(raw, raw=False)["versions"], "<i8")[0])


def _bytes_received(addr: str) -> float:
    status, raw = _http("GET", f"http://{addr}/metrics")
    return sum(float(m.group(1)) for m in re.finditer(r"^ekko_bytes_received_total\{[^}]*\} (\S+)$",
                                                       raw.decode(), re.M))


class Cluster:
    """``dcs x per_dc`` daemons on loopback under ``root``; every one is stopped on close."""

    def __init__(self, root: Path, dcs: int, per_dc: int, preset: str, code: str = _ROOT,
                 extra: dict[str, list[str]] | None = None) -> None:
        self.root, self.procs, self.addrs = root, [], {}
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=code + os.pathsep + os.environ.get("PYTHONPATH", ""))
        seed = None
        for d in range(dcs):
            for i in range(per_dc):
                nid, port = f"r{d}-{i}", _free_port()
                args = [sys.executable, "-m", "ekko.cli.main", "daemon", "--node-id", nid, "--dc", f"dc{d}",
                        "--listen", f"127.0.0.1:{port}", "--data-dir", str(root / nid), "--preset", preset,
                        "--device", "cpu", "--log-level", "warning"]
                if seed:
                    args += ["--seed", seed]
                args += (extra or {}).get(nid, [])
                log = open(root / f"{nid}.log", "ab")
                self.procs.append(subprocess.Popen(args, cwd=code, stdout=log, stderr=subprocess.STDOUT, env=env))
                log.close()
                self.addrs[nid] = f"127.0.0.1:{port}"
                seed = seed or self.addrs[nid]
        for nid, a in self.addrs.items():
            _wait(lambda a=a: _http("GET", f"http://{a}/healthz")[0] == 200, START_TIMEOUT_S, f"{nid} to serve")
        n = len(self.addrs)
        _wait(lambda: all(sum(m["state"] == "alive" for m in _get(a, "/v1/status?cluster=1")["members"]) == n
                          for a in self.addrs.values()), SETTLE_TIMEOUT_S, "every daemon to see every other")

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def run_once(args: argparse.Namespace, pinned: bool, root: Path) -> dict:
    """One run: start the cluster, warm up, (pin,) publish and measure; returns figures."""
    spec = ModelSpec("ranker", [TableSpec("emb", rows=args.table_rows, dim=args.dim, shards=args.shards)])
    last = args.dcs - 1
    base_id, ordinary_id = f"r{last}-{args.per_dc - 1}", f"r{last}-0"
    extra = {}
    if pinned and args.pin_at_start:
        # The config route (what older trees support): pinned from the start to the cut
        # taken below; it holds nothing until the cut reaches it.
        cfg = root / "baseline.toml"
        root.mkdir(parents=True, exist_ok=True)
        cfg.write_text('[node]\nbaseline_pin_cut = "validated"\n')
        extra[base_id] = ["--config", str(cfg)]
    cl = Cluster(root, args.dcs, args.per_dc, args.preset, args.code, extra)
    try:
        ingest = cl.addrs["r0-0"]
        peers = [f"r{last}-{i}" for i in range(args.per_dc - 1)]      # the baseline's DC peers
        _post(ingest, "/v1/models", MsgType.REGISTER_MODEL, {"spec": spec.to_dict()})
        _wait(lambda: all("ranker" in _get(a, "/v1/status")["models"] for a in cl.addrs.values()),
              SETTLE_TIMEOUT_S, "the model to reach every replica")
        chain = PublisherChain(origin=7)
        rng = np.random.default_rng(args.seed)

        def publish() -> tuple[int, int, float]:
            ids = rng.choice(spec.tables[0].rows, args.rows, replace=False).astype(np.int64)
            vals = rng.standard_normal((args.rows, args.dim)).astype(np.float32)
            f = chain.frame(spec, {"emb": (ids, vals)}, now_ms=time.time() * 1000)
            _post(ingest, "/v1/publish", MsgType.PUBLISH, f.body)
            t_ack = time.monotonic()
            chain.acked(f)
            return int(ids[-1]), int(chain.versions_of(f)["emb"][-1]), t_ack

        for _ in range(args.warmup):                     # state the cut will hold
            publish()
            time.sleep(args.interval)
        _post(ingest, "/v1/cuts", MsgType.CUT, {"model": "ranker", "name": "validated"})
        base = cl.addrs[base_id]
        _wait(lambda: any(c["name"] == "validated" for c in _get(base, "/v1/models/ranker/cuts")["cuts"]),
              SETTLE_TIMEOUT_S, "the cut to reach the baseline")
        if pinned and not args.pin_at_start:
            _post(base, "/v1/models/ranker/baseline", MsgType.BASELINE, {"cut": "validated"})
        time.sleep(2.0)                                   # the role spreads; queues drain
        b0 = {nid: _bytes_received(cl.addrs[nid]) for nid in (base_id, ordinary_id)}
        lags: list[float] = []
        lost = 0
        for _ in range(args.publishes):
            t_start = time.monotonic()
            row, version, t_ack = publish()
            pending = set(peers)
            while pending and time.monotonic() - t_ack < VISIBLE_TIMEOUT_S:
                for nid in sorted(pending):
                    if _version_of(cl.addrs[nid], "ranker", "emb", row) >= version:
                        lags.append(time.monotonic() - t_ack)
                        pending.discard(nid)
                time.sleep(POLL_GAP_S)
            lost += len(pending)
            time.sleep(max(0.0, args.interval - (time.monotonic() - t_start)))
        time.sleep(1.0)                                   # anti-entropy's share of the window
        got = {nid: _bytes_received(cl.addrs[nid]) - b0[nid] for nid in b0}
        held = _get(base, "/v1/models/ranker/cuts").get("baseline_pin", "(config)" if pinned else "")
        return {"lags": sorted(lags), "lost": lost, "base_bytes": got[base_id], "ordinary_bytes": got[ordinary_id],
                "pin": held, "base": base_id, "ordinary": ordinary_id, "peers": peers}
    finally:
        cl.close()


def _pct(xs: list[float], q: float) -> float:
    return xs[min(len(xs) - 1, int(len(xs) * q))] if xs else float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dcs", type=int, default=2)
    ap.add_argument("--per-dc", type=int, default=3)
    ap.add_argument("--preset", default="local", choices=["local", "lan", "wan"])
    ap.add_argument("--table-rows", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--shards", type=int, default=16)
    ap.add_argument("--rows", type=int, default=2000, help="rows per publish")
    ap.add_argument("--publishes", type=int, default=40, help="measured publishes per run")
    ap.add_argument("--warmup", type=int, default=5, help="publishes before the cut")
    ap.add_argument("--interval", type=float, default=0.25, help="seconds between publishes")
    ap.add_argument("--repeat", type=int, default=1, help="pairs of runs (medians over them)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--pin-at-start", action="store_true",
                    help="pin with baseline_pin_cut in a config file at start instead of the HTTP API")
    ap.add_argument("--code", default=_ROOT, metavar="DIR",
                    help="checkout whose ekko the daemons run (e.g. an older tree, with --pin-at-start)")
    args = ap.parse_args(argv)
    if args.per_dc < 2 or args.dcs < 1:
        ap.error("need at least 2 replicas per DC (a baseline and an ordinary peer)")
    mb = args.rows * args.dim * 4 * args.publishes / 1e6
    print(f"bench/baseline.py: {args.dcs} DCs x {args.per_dc} daemons (--preset {args.preset}, cpu), "
          f"{args.publishes} publishes x {args.rows} rows x dim {args.dim} ({mb:.1f} MB of values) every "
          f"{args.interval}s to r0-0; {args.repeat} pair(s) of runs; daemons from {args.code}"
          f"{' (pinned by config at start)' if args.pin_at_start else ''}; load average before: "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}, {os.cpu_count()} CPUs")
    rows = []
    for rep in range(args.repeat):
        pair = {}
        # Alternate which run goes first: load from other work drifts over minutes.
        for pinned in ((False, True) if rep % 2 == 0 else (True, False)):
            root = Path(tempfile.mkdtemp(prefix="ekko-bench-baseline-"))
            try:
                t0 = time.monotonic()
                r = run_once(args, pinned, root)
                r["wall_s"] = time.monotonic() - t0
            finally:
                shutil.rmtree(root, ignore_errors=True)
            pair[pinned] = r
            label = f"with baseline {r['base']} (pin {r['pin']!r})" if pinned else "no baseline"
            print(f"  run {rep + 1} {label:38s}: DC peers {','.join(r['peers'])} freshness p50 "
                  f"{_pct(r['lags'], 0.5) * 1e3:7.1f} ms p90 {_pct(r['lags'], 0.9) * 1e3:7.1f} ms "
                  f"({len(r['lags'])} samples, {r['lost']} not seen in {VISIBLE_TIMEOUT_S:.0f}s); bytes received: "
                  f"{r['base']} {r['base_bytes'] / 1e6:8.2f} MB, {r['ordinary']} {r['ordinary_bytes'] / 1e6:8.2f} MB "
                  f"[{r['wall_s']:.0f}s]")
        rows.append(pair)
    med = statistics.median
    f50 = med(_pct(p[True]["lags"], 0.5) / _pct(p[False]["lags"], 0.5) for p in rows)
    f90 = med(_pct(p[True]["lags"], 0.9) / _pct(p[False]["lags"], 0.9) for p in rows)
    b_ord = med(p[True]["base_bytes"] / max(1.0, p[True]["ordinary_bytes"]) for p in rows)
    b_self = med(p[True]["base_bytes"] / max(1.0, p[False]["base_bytes"]) for p in rows)
    print(f"ratios (median of {args.repeat}): DC peers' freshness with/without baseline p50 {f50:.2f}x, "
          f"p90 {f90:.2f}x (bar {FRESHNESS_BAR}x); baseline bytes / ordinary replica's {b_ord:.2f}x, "
          f"/ the same replica unpinned {b_self:.2f}x (bar {BYTES_BAR}x)")
    ok = f50 <= FRESHNESS_BAR and f90 <= FRESHNESS_BAR and b_ord <= BYTES_BAR
    print(f"{'PASS' if ok else 'FAIL'}; load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
