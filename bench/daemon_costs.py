"""Benchmark: what a real ``ekko daemon`` spends per message, for the simulator's CPU model.

    python bench/daemon_costs.py [--publishes 30] [--sizes 10,250,1000,4000] [--out DIR]

:mod:`bench.sim_cpu_costs` times pieces of the production code in one process (a bare
``node.receive``, ``TableStore.apply``, ``encode_frame`` + ``sendall``); what a daemon
adds around them (aiohttp, the WebSocket stream, the write-ahead log, metrics, the
event loop) it cannot see.  This bench measures whole daemons: it starts them, one
publisher (the SDK, in this process) publishes batches of each size, spaced so that
nothing queues, and it reads

* **CPU per message** of each process from ``/proc/<pid>/task/*/schedstat`` over each size's
  window, less the process's idle rate (anti-entropy and membership ticks, measured
  first over ``--idle-s``), divided by the publishes: the publisher (this process,
  its SDK thread included), the ingest daemon ``a`` (receives the publish, applies,
  logs it, pushes to its DC peers) and a peer ``b`` (receives the push, applies);
* **latency** from the daemons' apply traces (``--apply-trace``): the SDK call ->
  applied at ``a``, and applied at ``a`` -> applied at ``b`` (medians);
* the push frame's **bytes** from ``b``'s ``ekko_bytes_received{msg_type="PUSH"}``.

The send is measured apart: this process sends real ``PUSH`` frames (of a publisher
node's pushes) through the daemon's own transport
(:class:`ekko.server.transport.HttpTransport`: encoded and signed once, one WebSocket
stream per peer) to 1 and to 16 sink streams in another process; the CPU per extra
destination is one more send.  (Measured as ``a``'s CPU with more peer daemons, it
also holds each peer's anti-entropy and membership traffic with ``a``, which the
simulator sends and charges as messages of their own.)  Each cost is fitted
``per_message + bytes * per_byte`` by least squares over the sizes; the fits give the
simulator's terms (:mod:`simulator.cpu`), printed as ``[cpu]`` TOML lines:

* ``recv_per_message_s`` / ``recv_s_per_byte``: ``b``'s CPU per push less what the
  model charges separately (``per_message_s`` and ``rows * apply_s_per_row`` of the
  ``--scenario``'s ``[cpu]``);
* ``send_per_message_s`` / ``send_s_per_byte``: one more destination;
* ``publish_recv_per_message_s`` / ``publish_recv_s_per_byte``: ``a``'s CPU per publish
  less the modelled node work and one send (so the frame's one encode is in it);
* ``wake_s``: what an idle hop ``a`` -> ``b`` takes beyond the CPU above (the median
  over the sizes of measured - (send + recv + node work)): event-loop wake-ups, the
  kernel's loopback, and ``a``'s work between its apply and the push leaving (the log
  append, the encode), which these measurements cannot tell apart;
* ``publisher_per_message_s`` / ``publisher_s_per_byte``: the publisher's work before
  a publish leaves it: the SDK call -> applied at ``a``, less ``wake_s`` and ``a``'s
  receive of the publish (its whole CPU per publish, the acknowledgement included,
  is printed beside it);
* ``proxy_per_message_s`` / ``proxy_s_per_byte`` (fidelity configs only): the CPU of
  ``bench/fidelity.py``'s WAN emulator per forwarded message, measured with it in a
  thread of this process between a client and a sink process.

No baseline ratio applies (absolute constants); spread: each latency's p10-p90, and
the fit's residuals.  One machine, shared cores: run it on a quiet machine (the load
average is printed before and after).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
import tomllib
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if sys.path and Path(sys.path[0]).resolve() == REPO / "bench":
    sys.path[0] = str(REPO)
sys.path.insert(1, str(REPO / "tests"))
sys.path.insert(1, str(REPO / "bench"))

import numpy as np  # noqa: E402

from ekko.core import read_auth  # noqa: E402
from fidelity import trace_visibility  # noqa: E402

MODEL, TABLE = "model", "emb"
#: rows and width of the one table (the fidelity configs' table).
ROWS, DIM = 100_000, 32
#: default batch sizes, rows.
DEFAULT_SIZES = (10, 250, 1000, 4000)
#: seconds between publishes: long enough that no work queues behind the last.
GAP_S = 0.12
#: the scenario whose [cpu] per_message_s / apply_s_per_row are subtracted.
DEFAULT_SCENARIO = REPO / "simulator" / "scenarios" / "paper.toml"
_PUSH_BYTES = re.compile(rb'ekko_bytes_received_total\{[^}]*msg_type="PUSH"[^}]*\} ([0-9.e+]+)')


def push_bytes(address: str, key: str | None = None) -> float:
    """Push bytes a daemon has received (its /metrics, signed with the cluster ``key``)."""
    url = f"http://{address}/metrics"
    with urllib.request.urlopen(urllib.request.Request(url, headers=read_auth.read_headers(key, url)),
                                timeout=10) as r:
        return sum(float(m) for m in _PUSH_BYTES.findall(r.read()))


def task_cpu_s(pid: int | str = "self") -> float:
    """CPU seconds the threads of process ``pid`` have run, to the nanosecond
    (``/proc/<pid>/task/*/schedstat``; ``/proc/<pid>/stat`` counts 10 ms ticks).
    Threads that already exited are not counted."""
    total = 0
    base = Path(f"/proc/{pid}/task")
    for t in base.iterdir():
        try:
            total += int((t / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total / 1e9


def fit(x: list[float], y: list[float]) -> tuple[float, float, float]:
    """Least squares ``y = a + b x``: ``(a, b, max |residual|)``; a negative term is kept (printed)."""
    A = np.stack([np.ones(len(x)), np.asarray(x, float)], axis=1)
    (a, b), *_ = np.linalg.lstsq(A, np.asarray(y, float), rcond=None)
    return float(a), float(b), float(np.abs(A @ [a, b] - np.asarray(y)).max())


class Cluster:
    """``a`` (ingest) and ``peers`` daemons in one DC, each with an apply trace."""

    def __init__(self, root: Path, peers: int) -> None:
        from procs import DaemonGroup
        self.root = root
        self.group = DaemonGroup(root)
        key = os.urandom(16).hex()
        (root / "key").write_text(key)
        (root / "key").chmod(0o600)
        self.key = key
        names = ["a"] + [chr(ord("b") + i) for i in range(peers)]
        self.procs = []
        for n in names:
            seeds = [self.procs[0].address] if self.procs else []
            self.procs.append(self.group.start(n, "dc1", seeds=seeds, extra=[
                "--key-file", str(root / "key"), "--apply-trace", str(root / "trace" / n)]))

    def cpu(self) -> dict[str, float]:
        out = {p.node_id: task_cpu_s(p.proc.pid) for p in self.procs}
        out["publisher"] = task_cpu_s()
        return out

    def traces(self) -> dict[str, np.ndarray]:
        from ekko.server.apply_trace import read_trace, trace_path
        self.group.terminate_all(self.procs)
        return {p.node_id: read_trace(trace_path(self.root / "trace" / p.node_id, MODEL, TABLE)) for p in self.procs}


#: the sink: an aiohttp server that takes peer streams on K ports and discards every frame.
_SINK = r"""
import asyncio, sys
from aiohttp import web, WSMsgType
async def stream(request):
    ws = web.WebSocketResponse(max_msg_size=0, compress=False)
    await ws.prepare(request)
    async for _ in ws:
        pass
    return ws
async def main(k):
    app = web.Application()
    app.router.add_get("/v1/gossip/stream", stream)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    ports = []
    for _ in range(k):
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        ports.append(site._server.sockets[0].getsockname()[1])
    print(" ".join(map(str, ports)), flush=True)
    await asyncio.Event().wait()
asyncio.run(main(int(sys.argv[1])))
"""
#: destinations of the fan-out measurement: one, and many (the slope is one more destination).
FANOUT = (1, 16)


def measure_fanout(reps: int) -> dict[int, dict[int, float]]:
    """CPU seconds of this process per push sent to ``k`` peers by the daemon's own
    transport (:class:`ekko.server.transport.HttpTransport`: the frame encoded and signed
    once, one WebSocket stream per peer), to sink streams in another process; per push
    size in bytes, per ``k`` in :data:`FANOUT`."""
    import asyncio
    import subprocess
    from types import SimpleNamespace

    from ekko.core.codec import Keyring, MsgType
    from ekko.core.messages import Outgoing
    from ekko.server.transport import HttpTransport
    from sim_cpu_costs import CLUSTER_KEY, push_frames

    _, bodies = push_frames(SimpleNamespace(warmup=0, reps=reps), np.random.default_rng(2))
    sink = subprocess.Popen([sys.executable, "-c", _SINK, str(max(FANOUT))], stdout=subprocess.PIPE, text=True)
    try:
        ports = [int(p) for p in sink.stdout.readline().split()]
        out: dict[int, dict[int, float]] = {}

        async def run() -> None:
            sent = [0]
            tr = HttpTransport(Keyring.single(CLUSTER_KEY), on_sent=lambda o, n: sent.__setitem__(0, sent[0] + 1))
            await tr.start()
            try:
                async def push(body: dict, k: int) -> None:
                    want = sent[0] + k
                    for i in range(k):
                        tr.send(Outgoing(f"s{i}", f"127.0.0.1:{ports[i]}", MsgType.PUSH, body))
                    while sent[0] < want:
                        await asyncio.sleep(0.0005)
                first = next(iter(bodies.values()))[0][0]
                await push(first, max(FANOUT))           # connect every stream first
                for rows, got in bodies.items():
                    from ekko.core.codec import encode_frame
                    size = len(encode_frame(MsgType.PUSH, got[0][0]))
                    per_k: dict[int, float] = {}
                    for k in FANOUT:
                        samples = []
                        for body, _ in got:
                            c0 = time.process_time()   # all threads of this process, to the ns
                            await push(body, k)
                            samples.append(time.process_time() - c0)
                        per_k[k] = float(np.median(samples))
                    out[size] = per_k
            finally:
                await tr.close()

        asyncio.run(run())
        return out
    finally:
        sink.kill()
        sink.wait()


#: a TCP sink (discards what it reads) and a client that writes N messages of a size.
_TCP_SINK = r"""
import socket, sys, threading
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen()
print(s.getsockname()[1], flush=True)
def drain(c):
    while c.recv(1 << 20):
        pass
while True:
    c, _ = s.accept()
    threading.Thread(target=drain, args=(c,), daemon=True).start()
"""
_TCP_CLIENT = r"""
import socket, sys, time
port, size, n, gap = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
c = socket.create_connection(("127.0.0.1", port)); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
msg = b"\x01" * size
for _ in range(n):
    c.sendall(msg); time.sleep(gap)
time.sleep(0.5); c.close()
"""
#: sizes of the proxy measurement (bytes per message; a push of ~1,000 rows is ~120 kB).
PROXY_SIZES = (200, 2_000, 30_000, 120_000, 480_000)


def measure_proxy(n: int, delay_s: float = 0.0001) -> dict[int, float]:
    """CPU seconds the WAN emulator (:class:`ekko.testing.faultproxy.FaultProxy`, in a
    thread of this process as ``bench/fidelity.py`` runs it) spends per forwarded message,
    per size: a client process writes ``n`` messages through it to a sink process; this
    process does nothing else meanwhile."""
    import subprocess

    from ekko.testing.faultproxy import FaultProxy, ProxyThread
    sink = subprocess.Popen([sys.executable, "-c", _TCP_SINK], stdout=subprocess.PIPE, text=True)
    px = ProxyThread(FaultProxy(lambda peer, port: "a", seed=1)).start()
    try:
        port = px.call(px.proxy.add_route, "r", "a", ("127.0.0.1", int(sink.stdout.readline())))
        px.call(px.proxy.set_rtt, "a", "a", 2 * delay_s)
        out = {}
        for size in PROXY_SIZES:
            c0 = time.process_time()
            subprocess.run([sys.executable, "-c", _TCP_CLIENT, str(port), str(size), str(n), "0.004"], check=True)
            out[size] = (time.process_time() - c0) / n
        return out
    finally:
        px.stop()
        sink.kill()
        sink.wait()


def run_phase(peers: int, sizes: list[int], n: int, idle_s: float, workdir: Path | None) -> dict[str, Any]:
    """One cluster (``a`` + ``peers``): idle CPU rates, then ``n`` publishes of each size."""
    from ekko.core.spec import ModelSpec, TableSpec
    from ekko.sdk.client import Client
    from ekko.sdk.publisher import Publisher
    from procs import wait_for

    root = Path(tempfile.mkdtemp(prefix="daemon-costs-", dir=workdir))
    cl = Cluster(root, peers)
    try:
        spec = ModelSpec(MODEL, (TableSpec(TABLE, rows=ROWS, dim=DIM),))
        a = cl.procs[0]
        Client(a.address, key=cl.key, timeout=30).register(spec)
        for p in cl.procs:
            wait_for(lambda p=p: _knows(p.address, cl.key), 60, 0.2, f"{p.node_id} to learn the model")
        pub = Publisher([a.address], origin="costs", key=cl.key.encode(), state_dir=root / "publisher")
        rng = np.random.default_rng(1)
        try:
            pub.register(spec)
            for _ in range(3):   # warm-up: connections, first applies
                ids = rng.choice(ROWS, max(sizes), replace=False)
                pub.publish_many(MODEL, {TABLE: (ids, rng.standard_normal((len(ids), DIM)).astype(np.float32))})
                time.sleep(GAP_S)
            time.sleep(1.0)
            c0, t0 = cl.cpu(), time.monotonic()
            time.sleep(idle_s)
            c1, t1 = cl.cpu(), time.monotonic()
            idle = {k: (c1[k] - c0[k]) / (t1 - t0) for k in c0}
            rows: list[dict[str, Any]] = []
            for size in sizes:
                b0, c0, t0 = push_bytes(cl.procs[1].address, cl.key), cl.cpu(), time.monotonic()
                sent, pubs = [], []
                for _ in range(n):
                    ids = np.sort(rng.choice(ROWS, size, replace=False))
                    vals = rng.standard_normal((size, DIM)).astype(np.float32)
                    sent.append(time.time())
                    ack = pub.publish_many(MODEL, {TABLE: (ids, vals)})
                    pubs.append((ids.astype(np.int64), np.asarray(ack.versions[TABLE], np.int64)))
                    time.sleep(GAP_S)
                time.sleep(0.5)   # the last push lands
                c1, t1 = cl.cpu(), time.monotonic()
                nbytes = (push_bytes(cl.procs[1].address, cl.key) - b0) / n
                cpu = {k: ((c1[k] - c0[k]) - idle[k] * (t1 - t0)) / n for k in c0}
                rows.append({"rows": size, "push_bytes": nbytes, "cpu_s": cpu, "sent": np.array(sent),
                             "publishes": pubs})
        finally:
            pub.close()
        traces = cl.traces()
    finally:
        cl.group.close()
    for r in rows:
        pubs = r.pop("publishes")
        vis = {k: trace_visibility(tr, pubs) for k, tr in traces.items()}
        s = r.pop("sent")
        r["lat_ingest"] = np.percentile(vis["a"] - s, (10, 50, 90)).tolist()
        r["lat_hop"] = np.percentile(vis["b"] - vis["a"], (10, 50, 90)).tolist()
    return {"peers": peers, "idle_cores": idle, "sizes": rows}


def _knows(address: str, key: str | None = None) -> bool:
    url = f"http://{address}/v1/models/{MODEL}/knowledge"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=read_auth.read_headers(key, url)),
                                    timeout=10) as r:
            return r.status == 200
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--publishes", type=int, default=30, help="publishes per size (default 30)")
    ap.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)), help="rows per publish, comma-separated")
    ap.add_argument("--idle-s", type=float, default=3.0, help="seconds of idle CPU measured first (default 3)")
    ap.add_argument("--fanout-reps", type=int, default=25, help="pushes per size of the send measurement (default 25)")
    ap.add_argument("--proxy-messages", type=int, default=200,
                    help="messages per size through the WAN emulator (default 200)")
    ap.add_argument("--scenario", type=Path, default=DEFAULT_SCENARIO,
                    help="scenario TOML whose [cpu] per_message_s and apply_s_per_row are subtracted")
    ap.add_argument("--out", type=Path, default=None, help="directory for daemon_costs.json")
    ap.add_argument("--workdir", type=Path, default=None, help="where the daemons' temp dirs go")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    if len(sizes) < 2 or min(sizes) < 1 or max(sizes) > ROWS or not 2 <= args.publishes <= 10_000:
        print("error: give at least two sizes in [1, 100000] and 2..10000 publishes", file=sys.stderr)
        return 2
    model_cpu = tomllib.loads(args.scenario.read_text())["cpu"]
    per_msg, per_row = float(model_cpu["per_message_s"]), float(model_cpu["apply_s_per_row"])
    load0 = os.getloadavg()
    print(f"# {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"# {args.publishes} publishes per size {sizes}, one every {GAP_S * 1000:.0f} ms; table {ROWS} x {DIM} "
          f"float32; cluster key, write-ahead log on, preset local; subtracting per_message_s {per_msg:.3g} and "
          f"apply_s_per_row {per_row:.3g} from {args.scenario.name}")
    print(f"# load average before {load0[0]:.2f} {load0[1]:.2f} on {os.cpu_count()} CPUs", flush=True)
    fan = measure_fanout(args.fanout_reps)
    print(f"# send, by the daemon's transport to k sink streams (CPU of this process per push, medians of "
          f"{args.fanout_reps}): bytes, k=1, k={max(FANOUT)}, one more destination")
    xs, extra = [], []
    for size, per_k in fan.items():
        one_more = (per_k[max(FANOUT)] - per_k[min(FANOUT)]) / (max(FANOUT) - min(FANOUT))
        xs.append(size)
        extra.append(one_more)
        print(f"#   {size:>8} B {per_k[min(FANOUT)] * 1e6:8.1f} us {per_k[max(FANOUT)] * 1e6:8.1f} us "
              f"{one_more * 1e6:7.1f} us")
    send = fit(xs, extra)
    phase = run_phase(1, sizes, args.publishes, args.idle_s, args.workdir)
    print(f"{'rows':>6} {'push B':>9} {'pub CPU':>8} {'a CPU':>8} {'b CPU':>8} {'sent->a p50':>11} "
          f"{'a->b p50 (p10-p90)':>22}")
    for r in phase["sizes"]:
        li, lh = r["lat_ingest"], r["lat_hop"]
        print(f"{r['rows']:>6} {r['push_bytes']:>9.0f} {r['cpu_s']['publisher'] * 1e3:>6.2f}ms "
              f"{r['cpu_s']['a'] * 1e3:>6.2f}ms {r['cpu_s']['b'] * 1e3:>6.2f}ms "
              f"{li[1] * 1e3:>9.2f}ms {lh[1] * 1e3:>7.2f}ms ({lh[0] * 1e3:.2f}-{lh[2] * 1e3:.2f})")
    x = [r["push_bytes"] for r in phase["sizes"]]
    node = [per_msg + r["rows"] * per_row for r in phase["sizes"]]
    recv = fit(x, [r["cpu_s"]["b"] - m for r, m in zip(phase["sizes"], node)])
    # a's CPU per publish, less the modelled node work and its one send: the receive of the
    # publish (the frame's encode, which the model does not charge per destination, included).
    pub_recv = fit(x, [r["cpu_s"]["a"] - m - (send[0] + send[1] * xb)
                       for r, m, xb in zip(phase["sizes"], node, x)])
    cpu_hop = [send[0] + send[1] * xb + recv[0] + recv[1] * xb + m for xb, m in zip(x, node)]
    # What an idle hop takes beyond that CPU: the median over the sizes (not a fit: it is
    # one constant per received message, the same for a publish).  It holds a's encode too.
    wake = float(np.median([r["lat_hop"][1] - c for r, c in zip(phase["sizes"], cpu_hop)]))
    # The publisher's work before the bytes leave: the SDK call -> applied at `a`, less the
    # wake and `a`'s receive of the publish.
    publisher = fit(x, [r["lat_ingest"][1] - wake - (pub_recv[0] + pub_recv[1] * xb)
                        for r, xb in zip(phase["sizes"], x)])
    publisher_cpu = fit(x, [r["cpu_s"]["publisher"] for r in phase["sizes"]])
    fits = {"recv": recv, "send": send, "publish_recv": pub_recv, "publisher": publisher}
    print("# fits (per message s, per byte s, max |residual| s):")
    for k, (a, b, res) in fits.items():
        print(f"#   {k:<13} {a:.3g} + {b:.3g}/B  (residual {res:.2g})")
    print(f"#   (the publisher's whole CPU per publish, its acknowledgement included: {publisher_cpu[0]:.3g} + "
          f"{publisher_cpu[1]:.3g}/B)")
    print("# idle hop a->b: CPU (send + recv + node work) vs measured p50; the median difference is wake_s:")
    for r, c in zip(phase["sizes"], cpu_hop):
        print(f"#   {r['rows']:>6} rows: {c * 1e3:.2f} ms CPU vs {r['lat_hop'][1] * 1e3:.2f} ms measured")
    print("# [cpu] lines (simulator/cpu.py):")
    for k in ("recv", "send", "publish_recv", "publisher"):
        a, b, _ = fits[k]
        print(f"{k}_per_message_s = {max(0.0, a):.3g}\n{k}_s_per_byte = {max(0.0, b):.3g}")
    print(f"wake_s = {max(0.0, wake):.3g}")
    proxy = measure_proxy(args.proxy_messages)
    pfit = fit(list(proxy), list(proxy.values()))
    print(f"# the WAN emulator (bench/fidelity.py's FaultProxy, a thread): CPU per forwarded message, "
          f"{args.proxy_messages} each: " + ", ".join(f"{b} B {v * 1e6:.0f} us" for b, v in proxy.items()))
    print("# [cpu] lines of the fidelity configs only (a loopback comparison's emulator, not a deployment's):")
    print(f"proxy_per_message_s = {max(0.0, pfit[0]):.3g}\nproxy_s_per_byte = {max(0.0, pfit[1]):.3g}")
    load1 = os.getloadavg()
    print(f"# load average after {load1[0]:.2f} {load1[1]:.2f}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "daemon_costs.json").write_text(json.dumps(
            {"phase": phase, "fanout": fan, "fits": fits, "wake_s": wake, "publisher_cpu": publisher_cpu,
             "proxy": proxy, "proxy_fit": pfit,
             "load": [load0, load1], "sizes": sizes}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
