"""Benchmark: serving lookups from a replica's tensors while updates arrive (issue #17).

    python bench/serving.py [--lookups 2000] [--rate 10] [--rows 100000] [--dim 64] [--device cpu|cuda]

Setup: one ``ekko daemon`` (the sidecar) and, in this process, an embedded
``ekko.Replica`` joined to it; a publisher *process* publishes ``--rate`` batches a
second of 1,000 random rows to the daemon all through the run.  Each method looks up
512 random ids of the ``rows x dim`` float32 table ``--lookups`` times (after a
warm-up), timed one by one:

* ``local index_select``: a plain tensor of the same shape in this process (the
  baseline every ratio is against, measured in the same run);
* ``attach lookup``: :meth:`ekko.serving.Attached.lookup` on the daemon's tables mapped
  from shared memory (a copy that no write overlapped: the write counter is read
  before and after);
* ``attach index_select``: a bare ``index_select`` of the mapped tensor (may mix two
  updates; see :mod:`ekko.server.shared_tables`);
* ``Replica index_select``: the embedded replica's own tensor;
* ``HTTP read_rows``: :meth:`ekko.sdk.client.Client.read_rows` from the daemon (msgpack,
  one kept-alive connection);
* ``RowCache lookup``: :class:`ekko.serving.RowCache` over the daemon, warmed with every
  id the lookups use (so all hits), kept fresh by the daemon's change feed meanwhile.

With ``--device cuda`` the daemon and the embedded replica keep their tables on the GPU,
``attach`` maps the daemon's by CUDA IPC, the local baseline is a GPU tensor, and every
GPU lookup is timed up to a ``torch.cuda.synchronize()`` (the HTTP read and the row cache
stay on the CPU).

Then **freshness as the serving process sees it**: the publisher writes its publish
number into row 0 and notes when it sent it; the serving process polls row 0 of the
attached tensor, of the replica's tensor and of the row cache, and notes when each number appears
(both clocks are this machine's ``time.time()``); p50/p90 of seen - sent.

Printed: how it was run, the load average before and after, p50 and p99 of each
method in microseconds and the ratio of its p50 to the local one.  The machine is
shared and noisy: quote the medians, and rerun.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if sys.path and Path(sys.path[0]).resolve() == REPO / "bench":
    sys.path[0] = str(REPO)
sys.path.insert(1, str(REPO / "tests"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

#: ids per lookup.
LOOKUP_IDS = 512
#: rows per publish of the background publisher.
PUBLISH_ROWS = 1000
#: seconds of the freshness phase.
FRESHNESS_S = 5.0
#: seconds between two polls of row 0 in the freshness phase.
POLL_S = 0.0002

_PUBLISHER = r"""
import sys, time
import numpy as np
from ekko.core.spec import ModelSpec, TableSpec
from ekko.sdk.publisher import Publisher
addr, rows, dim, rate, state = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
rng = np.random.default_rng(7)
pub = Publisher([addr], origin="serving-bench", state_dir=state)
pub.register(ModelSpec("m", [TableSpec("emb", rows=rows, dim=dim)]))
print("ready", flush=True)
k, t0 = 0, time.monotonic()
while True:
    k += 1
    ids = np.unique(np.concatenate([[0], rng.integers(1, rows, %d)]))
    vals = rng.standard_normal((len(ids), dim)).astype(np.float32)
    vals[0, 0] = k                                   # row 0 carries the publish number
    sent = time.time()
    pub.publish_many("m", {"emb": (ids, vals)})
    print(k, sent, flush=True)
    time.sleep(max(0.0, t0 + k / rate - time.monotonic()))
""" % PUBLISH_ROWS


def timed(fn, n: int, warmup: int = 50) -> np.ndarray:
    for _ in range(warmup):
        fn()
    out = np.empty(n)
    for i in range(n):
        t = time.perf_counter()
        fn()
        out[i] = time.perf_counter() - t
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lookups", type=int, default=2000, help="timed lookups per method (default 2000)")
    ap.add_argument("--rate", type=float, default=10.0, help="publishes a second during the run (default 10)")
    ap.add_argument("--rows", type=int, default=100_000, help="table rows (default 100000)")
    ap.add_argument("--dim", type=int, default=64, help="table width (default 64)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="where the daemon's, the replica's and the local tables live (default cpu)")
    args = ap.parse_args(argv)
    if not (10 <= args.lookups <= 1_000_000 and 0 < args.rate <= 1000 and LOOKUP_IDS <= args.rows <= 10**8
            and 1 <= args.dim <= 4096):
        print("error: --lookups 10..1e6, --rate 0..1000, --rows 512..1e8, --dim 1..4096", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    import ekko
    from ekko.sdk.client import Client
    from procs import DaemonGroup, free_port, wait_for

    load0 = os.getloadavg()
    print(f"# {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"# table {args.rows} x {args.dim} float32; lookups of {LOOKUP_IDS} random ids, {args.lookups} timed per "
          f"method; a publisher process sends {args.rate:g} publishes/s of {PUBLISH_ROWS} rows throughout; "
          f"device {args.device} (CUDA: {torch.cuda.is_available()})")
    print(f"# load average before {load0[0]:.2f} {load0[1]:.2f} on {os.cpu_count()} CPUs", flush=True)
    root = Path(tempfile.mkdtemp(prefix="serving-"))
    with DaemonGroup(root) as g:
        a = g.start("sidecar", "dc1", extra=["--device", args.device])
        pub = subprocess.Popen([sys.executable, "-c", _PUBLISHER, a.address, str(args.rows), str(args.dim),
                                str(args.rate), str(root / "pub")], stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(REPO)})
        try:
            assert pub.stdout is not None and pub.stdout.readline().strip() == "ready"
            rep = ekko.Replica("embedded", "dc1", f"127.0.0.1:{free_port()}", root / "embedded",
                               seeds=[a.address], preset="local", device=args.device).start()
            try:
                rep.wait_for_model("m")
                att = ekko.attach(a.address, "m")
                client = Client(a.address)
                local = torch.randn(args.rows, args.dim, device=args.device)
                rng = np.random.default_rng(1)
                idx_np = [rng.choice(args.rows, LOOKUP_IDS, replace=False) for _ in range(64)]
                idx_cpu = [torch.from_numpy(i) for i in idx_np]
                idx = [i.to(args.device) for i in idx_cpu]
                # A GPU lookup is queued, not done, when the call returns: time it to the end.
                done = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
                counter = iter(range(10**9))

                def pick() -> int:
                    return next(counter) % len(idx)
                mapped, own = att.tensor("emb"), rep.tensor("m", "emb")
                cache = ekko.RowCache(a.address, "m", "emb", capacity=args.rows).start()
                for i in idx_np:
                    cache.lookup(i)                  # warm: every id the timed lookups use
                cache.lookup(np.array([0]))
                methods = {
                    "local index_select": lambda: (local.index_select(0, idx[pick()]), done()),
                    "attach lookup": lambda: att.lookup("emb", idx[pick()]),
                    "attach index_select": lambda: (mapped.index_select(0, idx[pick()]), done()),
                    "Replica index_select": lambda: (own.index_select(0, idx[pick()]), done()),
                    "HTTP read_rows": lambda: client.read_rows("m", "emb", idx_np[pick()]),
                    "RowCache lookup": lambda: cache.lookup(idx_cpu[pick()]),
                }
                got = {name: timed(fn, args.lookups if "HTTP" not in name else max(10, args.lookups // 4))
                       for name, fn in methods.items()}
                fresh = freshness(pub, att, rep, cache)
                cache.stop()
            finally:
                rep.stop()
        finally:
            pub.kill()
            pub.wait()
    base = float(np.median(got["local index_select"]))
    print(f"{'method':<22} {'p50 us':>9} {'p99 us':>9} {'p50 / local':>12}")
    for name, t in got.items():
        print(f"{name:<22} {np.median(t) * 1e6:>9.1f} {np.percentile(t, 99) * 1e6:>9.1f} "
              f"{np.median(t) / base:>12.2f}")
    for name, lat in fresh.items():
        if len(lat):
            print(f"# freshness ({name}): publish sent -> row 0 seen by this process, p50 "
                  f"{np.median(lat) * 1e3:.1f} ms, p90 {np.percentile(lat, 90) * 1e3:.1f} ms over {len(lat)} publishes")
        else:
            print(f"# freshness ({name}): no publish seen")
    load1 = os.getloadavg()
    print(f"# load average after {load1[0]:.2f} {load1[1]:.2f}")
    return 0


def freshness(pub: subprocess.Popen, att, rep, cache) -> dict[str, np.ndarray]:
    """Poll row 0 of the attached tensor, the replica's and the row cache's for
    ``FRESHNESS_S``; match the publish numbers seen with the publisher's sent times."""
    import selectors
    seen: dict[str, dict[int, float]] = {"attach": {}, "Replica": {}, "RowCache": {}}
    row0 = np.array([0])
    sent: dict[int, float] = {}
    mapped, own = att.tensor("emb"), rep.tensor("m", "emb")
    sel = selectors.DefaultSelector()
    sel.register(pub.stdout, selectors.EVENT_READ)
    start, end = time.time(), time.monotonic() + FRESHNESS_S
    while time.monotonic() < end:
        now = time.time()
        for name, t in (("attach", mapped), ("Replica", own), ("RowCache", None)):
            k = int(t[0, 0]) if t is not None else int(cache.lookup(row0)[0, 0])
            if k > 0 and k not in seen[name]:
                seen[name][k] = now
        if sel.select(0):
            line = pub.stdout.readline().split()
            if len(line) == 2:
                sent[int(line[0])] = float(line[1])
        time.sleep(POLL_S)
    # only publishes sent during this phase (row 0 held an older one when it began)
    return {name: np.array([t - sent[k] for k, t in s.items() if sent.get(k, 0.0) >= start])
            for name, s in seen.items()}


if __name__ == "__main__":
    sys.exit(main())
