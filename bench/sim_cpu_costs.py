"""Benchmark: the cost constants of the simulator's endpoint CPU model (:mod:`simulator.cpu`).

What it measures, each on the production code path, as the median over ``--reps``
timed repetitions after ``--warmup`` untimed ones (one core, this process):

* ``per_message_s`` -- a bare ``ReplicaNode.receive`` of a small frame: an
  anti-entropy summary (``GOSSIP``/``sum``) whose table digests equal the node's
  own, so the node compares and sends nothing.  The node holds the ``paper``
  scenario's model.  (``decode_frame`` of the same frame is printed beside it for
  reference; the CPU model does not charge it.)
* ``apply_s_per_row`` -- ``TableStore.apply`` of a ``--batch``-row delta (random
  distinct ids, every row newer, float32 values of the paper's ``emb`` width) into
  a ``--apply-rows``-row table with values, divided by the batch.
* ``scan_s_per_row`` -- the full-scan comparison, ``TableStore.scan_newer`` of one
  ``--scan-rows``-row shard against a one-origin knowledge that covers all but
  ``--newer`` rows, divided by the rows walked.
* ``index_s_per_row`` -- ``RecentIndex.newer_than_many`` over every shard of the
  paper's ``emb`` table (the lookup a pull answer makes), with the index holding
  ``--index-rows`` recently applied rows of which ``--newer`` are above the
  requester's knowledge, divided by the candidate rows it compared (its own
  ``rows_examined`` counter).

* the transport terms (``recv_per_message_s``, ``recv_s_per_byte``,
  ``send_per_message_s``, ``send_s_per_byte``) -- on real ``PUSH`` frames of several
  sizes (a publisher node ingests a batch of the paper's ``emb`` rows and pushes it; the
  frame is signed with a cluster key): ``encode_frame`` (msgpack, compression where it
  pays on a LAN, HMAC) and a ``sendall`` on a loopback TCP pair make the send side;
  the ``recv`` calls that read it and ``decode_frame`` (HMAC check, msgpack) the
  receive side.  Each is fitted ``per_message + bytes * per_byte`` by least squares
  over the sizes (to each size's median; the fits to the 25th and 75th percentiles
  are the spread).  The real ``node.receive`` of each push is printed beside what the
  model charges it (``per_message_s + rows * apply_s_per_row``), and the WAN variant
  (frames compressed) beside the LAN one.  Not measured: the WebSocket framing and
  aiohttp's event-loop work per message (the daemon's stream), so these are a floor.

There is no baseline to print a ratio against (these are absolute constants for the
model); the spread (min and max) of the timed repetitions is printed beside each
median so noise on a shared machine shows.  The TOML lines at the end go into a
scenario's ``[cpu]`` table.

Run:  python bench/sim_cpu_costs.py [--reps 41]
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import sys
import time
from datetime import UTC, datetime

# Run as a script, bench/ would come first on sys.path; import this checkout's
# packages instead.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [os.path.dirname(_HERE)] + [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import numpy as np

from ekko.core.codec import (COMPRESS_MIN_SAVING, Frame, Keyring, MsgType, decode_frame, delta_to_wire,
                             encode_frame)
from ekko.core.delta import Delta
from ekko.replica.node import ReplicaNode
from p2p.antientropy import _scope_digest
from ekko.core.spec import TableSpec
from ekko.core.store import TableStore
from ekko.core.version import ORIGIN_BITS, Knowledge
from p2p.membership import Member
from p2p.sync import RecentIndex
from simulator.scenario import load_scenario

ORIGIN = 1


def pack(counters: np.ndarray) -> np.ndarray:
    return (counters.astype(np.int64) << ORIGIN_BITS) | ORIGIN


def median_of(fn, reps: int, warmup: int, per: float = 1.0) -> tuple[float, float, float]:
    """(median, min, max) seconds of ``fn()`` divided by ``per``."""
    got = []
    for i in range(warmup + reps):
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        if i >= warmup:
            got.append(dt / per)
    return statistics.median(got), min(got), max(got)


def bench_message(args) -> dict[str, tuple[float, float, float]]:
    sc = load_scenario("paper")
    node = ReplicaNode("r0", "dc0", "r0", config=sc.node, with_values=True, device="cpu")
    node.register_model(sc.model, 0.0)
    node.members.merge([Member("r1", "dc1", "r1", 1, 1)], 0.0)
    m = node.models[sc.model.name]
    sums = {sc.model.name: {t.name: _scope_digest(m.shard_digests(t.name), None) for t in sc.model.tables}}
    body = {"k": "sum", "from": "r1", "scope": ["any"], "models": sums}
    frame = Frame(MsgType.GOSSIP, body)
    wire = encode_frame(MsgType.GOSSIP, body)
    n = args.messages

    def receive():
        for i in range(n):
            node.receive(frame, 1.0 + i * 1e-6, "r1")

    def decode():
        for _ in range(n):
            decode_frame(wire)

    out = {"per_message_s": median_of(receive, args.reps, args.warmup, n),
           "decode_small_frame_s (not charged)": median_of(decode, args.reps, args.warmup, n)}
    assert not node.drain(), "the summary should need no answer"
    return out


def bench_apply(args, rng: np.random.Generator) -> tuple[float, float, float]:
    dim = load_scenario("paper").model.table("emb").dim
    ts = TableStore(TableSpec("emb", rows=args.apply_rows, dim=dim), device="cpu", with_values=True)
    values = rng.standard_normal((args.batch, dim), dtype=np.float32)
    deltas = [rng.choice(args.apply_rows, size=args.batch, replace=False).astype(np.int64)
              for _ in range(16)]
    counter = [1]

    def apply():
        ids = deltas[counter[0] % len(deltas)]
        vers = pack(np.arange(counter[0], counter[0] + args.batch))
        counter[0] += args.batch
        ts.apply(Delta("m", "emb", ids, vers, values))

    return median_of(apply, args.reps, args.warmup, args.batch)


def bench_scan(args, rng: np.random.Generator) -> tuple[float, float, float]:
    ts = TableStore(TableSpec("emb", rows=args.scan_rows, dim=1, shards=1), device="cpu", with_values=False)
    known = 1_000_000
    ts.versions[:] = pack(rng.integers(1, known, args.scan_rows))
    ts.versions[rng.choice(args.scan_rows, size=args.newer, replace=False)] = pack(
        known + 1 + np.arange(args.newer))
    k = Knowledge({ORIGIN: known})
    found = ts.scan_newer(0, k)[0]
    assert len(found) == args.newer
    return median_of(lambda: ts.scan_newer(0, k), args.reps, args.warmup, args.scan_rows)


def bench_index(args, rng: np.random.Generator) -> tuple[float, float, float, int]:
    spec = load_scenario("paper").model.table("emb")
    ts = TableStore(spec, device="cpu", with_values=False)
    ix = RecentIndex()
    ids = rng.choice(spec.rows, size=args.index_rows, replace=False).astype(np.int64)
    vers = pack(np.arange(1, args.index_rows + 1))
    ts.versions[ids] = vers
    for part in range(0, args.index_rows, args.batch):
        ix.note_applied(ids[part:part + args.batch], vers[part:part + args.batch], 0.0, 10 * args.index_rows)
    shards = list(range(spec.num_shards))
    theirs = [Knowledge({ORIGIN: args.index_rows - args.newer})] * len(shards)
    mine = [Knowledge({ORIGIN: args.index_rows})] * len(shards)
    got = ix.newer_than_many(ts, shards, theirs, mine)
    assert sum(len(g[0]) for g in got) == args.newer
    e0 = ix.rows_examined
    ix.newer_than_many(ts, shards, theirs, mine)
    per_call = ix.rows_examined - e0
    assert ix.rows_walked == 0, "the index path must not fall back to scans here"
    return (*median_of(lambda: ix.newer_than_many(ts, shards, theirs, mine), args.reps, args.warmup, per_call),
            per_call)


# -- transport costs (receive, send) --------------------------------------------------------
#: a cluster key for the signed frames (what a daemon with --key-file uses): HMAC on both ends.
CLUSTER_KEY = b"sim-cpu-costs-cluster-key"
#: rows per pushed update, one size point each (frames from ~0.3 kB to ~130 kB).
PUSH_ROWS = (1, 8, 32, 128, 512)
#: socket buffers for the loopback pair: the largest frame fits, so a write never waits.
SOCKET_BUFFER_BYTES = 1 << 20
ORIGIN_PUSH = 5
#: ticks (TICK_STEP_S apart) the publisher node gets to push an update.
MAX_TICKS_TO_PUSH = 50
TICK_STEP_S = 0.05


def fit_line(points: dict[int, list[float]]) -> dict[str, tuple[float, float]]:
    """Least-squares ``seconds = per_message + bytes * per_byte`` over the size points,
    fitted to each size's median and (for the spread) to its 25th and 75th percentiles."""
    sizes = np.array(sorted(points), dtype=float)
    out = {}
    for name, q in (("median", 50), ("q25", 25), ("q75", 75)):
        t = np.array([np.percentile(points[s], q) for s in sorted(points)])
        per_byte, per_msg = np.polyfit(sizes, t, 1)
        out[name] = (float(per_msg), float(per_byte))
    return out


def push_frames(args, rng: np.random.Generator) -> tuple[ReplicaNode, dict[int, list[tuple[dict, int]]]]:
    """Real PUSH bodies of each size: a publisher node ingests a batch (a real publish of
    the paper's ``emb`` rows, every one newer) and pushes it to its peer; returns the
    receiving node and, per row count, ``[(push body, rows)]`` in publish order (an update
    may go as several pushes: each is a sample of its own size)."""
    sc = load_scenario("paper")
    spec = sc.model.table("emb")
    pub = ReplicaNode("p", "dc0", "p", config=sc.node, with_values=True, device="cpu")
    rcv = ReplicaNode("r", "dc0", "r", config=sc.node, with_values=True, device="cpu")
    for node, peer in ((pub, "r"), (rcv, "p")):
        node.register_model(sc.model, 0.0)
        node.members.merge([Member(peer, "dc0", peer, 1, 1)], 0.0)
    counter, now = 1, 1.0
    bodies: dict[int, list[tuple[dict, int]]] = {}
    for rows in PUSH_ROWS:
        got = bodies[rows] = []
        for _ in range(args.warmup + args.reps):
            ids = rng.choice(spec.rows, size=rows, replace=False).astype(np.int64)
            vers = (np.arange(counter, counter + rows, dtype=np.int64) << ORIGIN_BITS) | ORIGIN_PUSH
            counter += rows
            vals = rng.standard_normal((rows, spec.dim), dtype=np.float32)
            pub.publish({"model": sc.model.name, "origin": ORIGIN_PUSH,
                         "deltas": [delta_to_wire(Delta(sc.model.name, "emb", ids, vers, vals))]}, now)
            pushes: list = []
            for _ in range(MAX_TICKS_TO_PUSH):   # its push timer may be a tick or two away
                now += TICK_STEP_S
                pub.members.heard_from("r", now)  # the peer stays alive (it sends nothing here)
                pub.tick(now)
                pushes += [o for o in pub.drain() if o.msg_type == MsgType.PUSH]
                if pushes:
                    break
            assert pushes, f"a {rows}-row update was not pushed"
            got += [(o.body, rows) for o in pushes]
    return rcv, bodies


def bench_receive_send(args, rng: np.random.Generator) -> dict[str, dict[int, list[float]]]:
    """Per frame size: encode (LAN: compressed only where it pays; WAN: compressed), decode
    (with HMAC), and ``node.receive`` of the decoded push; samples in seconds per frame."""
    kr = Keyring({1: CLUSTER_KEY})
    rcv, bodies = push_frames(args, rng)
    samples: dict[str, dict[int, list[float]]] = {k: {} for k in (
        "encode_lan", "encode_wan", "decode_lan", "decode_wan", "receive", "bytes_lan", "bytes_wan")}
    now = 1e6
    for rows, items in bodies.items():
        s = {k: [] for k in samples}
        for i, (body, _) in enumerate(items):
            t0 = time.perf_counter()
            lan = encode_frame(MsgType.PUSH, body, kr, min_saving=COMPRESS_MIN_SAVING)
            t1 = time.perf_counter()
            wan = encode_frame(MsgType.PUSH, body, kr)
            t2 = time.perf_counter()
            decode_frame(wan, kr)
            t3 = time.perf_counter()
            frame = decode_frame(lan, kr)
            t4 = time.perf_counter()
            rcv.receive(frame, now, "p")
            t5 = time.perf_counter()
            now += 1.0
            rcv.drain()
            if i >= args.warmup:
                for k, v in (("encode_lan", t1 - t0), ("encode_wan", t2 - t1), ("decode_wan", t3 - t2),
                             ("decode_lan", t4 - t3), ("receive", t5 - t4), ("bytes_lan", len(lan)),
                             ("bytes_wan", len(wan))):
                    s[k].append(v)
        size = int(statistics.median(s["bytes_lan"]))
        for k in samples:
            samples[k][size] = s[k]
    return samples


def bench_socket(args, sizes: list[int]) -> dict[str, dict[int, list[float]]]:
    """``sendall`` of one frame on a loopback TCP pair, then the ``recv`` calls that read it."""
    srv = socket.create_server(("127.0.0.1", 0))
    tx = socket.create_connection(srv.getsockname())
    rx, _ = srv.accept()
    srv.close()
    for sock in (tx, rx):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER_BYTES)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER_BYTES)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(10.0)   # a write that does not fit the buffers fails loudly, not hangs
    buf = bytearray(max(sizes))
    out: dict[str, dict[int, list[float]]] = {"write": {}, "read": {}}
    try:
        for size in sizes:
            data = os.urandom(size)
            w: list[float] = []
            r: list[float] = []
            out["write"][size], out["read"][size] = w, r
            for i in range(args.warmup + args.reps):
                t0 = time.perf_counter()
                tx.sendall(data)
                t1 = time.perf_counter()
                got = 0
                view = memoryview(buf)
                while got < size:
                    got += rx.recv_into(view[got:size])
                t2 = time.perf_counter()
                if i >= args.warmup:
                    w.append(t1 - t0)
                    r.append(t2 - t1)
    finally:
        tx.close()
        rx.close()
    return out


def transport_constants(args, rng: np.random.Generator, per_message_s: float,
                        apply_s_per_row: float) -> dict[str, tuple[float, float, float]]:
    """Fit and print the transport constants; returns ``name -> (median, q25 fit, q75 fit)``."""
    s = bench_receive_send(args, rng)
    sizes = sorted(s["receive"])
    sock = bench_socket(args, sizes)
    print(f"\n# transport: real PUSH frames of {PUSH_ROWS} rows (emb, dim 64 float32), HMAC-SHA256 "
          f"with a cluster key; LAN = compressed only where it saves {COMPRESS_MIN_SAVING:.0%} "
          f"(float32 rows: never), WAN = compressed")
    print(f"{'rows':>6s} {'bytes LAN':>10s} {'bytes WAN':>10s} {'encode LAN':>11s} {'encode WAN':>11s} "
          f"{'decode LAN':>11s} {'decode WAN':>11s} {'receive':>10s} {'model':>10s} {'write':>10s} "
          f"{'read':>10s}   (medians, s)")
    med = statistics.median
    for rows, size in zip(PUSH_ROWS, sizes):
        print(f"{rows:6d} {size:10d} {int(med(s['bytes_wan'][size])):10d} {med(s['encode_lan'][size]):11.3e} "
              f"{med(s['encode_wan'][size]):11.3e} {med(s['decode_lan'][size]):11.3e} "
              f"{med(s['decode_wan'][size]):11.3e} {med(s['receive'][size]):10.3e} "
              f"{per_message_s + rows * apply_s_per_row:10.3e} {med(sock['write'][size]):10.3e} "
              f"{med(sock['read'][size]):10.3e}")
    print("# 'model' = what the CPU model charges node.receive of that push (per_message_s + rows * "
          "apply_s_per_row); 'receive' is its real time")
    fits = {k: fit_line(v) for k, v in (("encode_lan", s["encode_lan"]), ("decode_lan", s["decode_lan"]),
                                        ("write", sock["write"]), ("read", sock["read"]))}
    wan_fits = {k: fit_line({int(med(s["bytes_wan"][z])): s[k][z] for z in sizes})
                for k in ("encode_wan", "decode_wan")}
    print(f"\n{'least-squares fit over sizes':32s} {'per message (s)':>16s} {'per byte (s)':>14s}   "
          f"spread (fits to q25 .. q75)")
    for name, f in {**fits, **wan_fits}.items():
        (a, b), (a0, b0), (a1, b1) = f["median"], f["q25"], f["q75"]
        print(f"{name:32s} {a:16.3e} {b:14.3e}   {a0:.3e} .. {a1:.3e} /msg, {b0:.3e} .. {b1:.3e} /byte")

    def total(*names: str, src=fits) -> tuple[tuple[float, float], ...]:
        return tuple(tuple(sum(src[n][q][j] for n in names) for j in (0, 1)) for q in ("median", "q25", "q75"))

    recv, send = total("decode_lan", "read"), total("encode_lan", "write")
    # A fit's intercept can come out slightly negative (noise at the small sizes): clamp to 0.
    consts = {"recv_per_message_s": tuple(max(0.0, v[0]) for v in recv),
            "recv_s_per_byte": tuple(max(0.0, v[1]) for v in recv),
            "send_per_message_s": tuple(max(0.0, v[0]) for v in send),
            "send_s_per_byte": tuple(max(0.0, v[1]) for v in send)}
    wan_recv = (wan_fits["decode_wan"]["median"][0] + fits["read"]["median"][0],
                wan_fits["decode_wan"]["median"][1] + fits["read"]["median"][1])
    wan_send = (wan_fits["encode_wan"]["median"][0] + fits["write"]["median"][0],
                wan_fits["encode_wan"]["median"][1] + fits["write"]["median"][1])
    print(f"# recv = decode LAN + read, send = encode LAN + write; with WAN (compressed) frames instead: "
          f"recv {wan_recv[0]:.3g} s + {wan_recv[1]:.3g} s/byte, send {wan_send[0]:.3g} s + {wan_send[1]:.3g} s/byte")
    return consts


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                        platform.processor())
    except OSError:
        return platform.processor()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=41)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--messages", type=int, default=200, help="receives per timed repetition")
    ap.add_argument("--batch", type=int, default=500,
                    help="rows per apply (paper: 5000 rows/s in 100 ms batches)")
    ap.add_argument("--apply-rows", type=int, default=1_000_000)
    ap.add_argument("--scan-rows", type=int, default=8_000_000)
    ap.add_argument("--index-rows", type=int, default=10_000)
    ap.add_argument("--newer", type=int, default=500)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    if args.reps < 1 or args.warmup < 0:
        ap.error("--reps must be at least 1 and --warmup at least 0")
    rng = np.random.default_rng(args.seed)
    print(f"# bench/sim_cpu_costs.py {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {cpu_name()}, "
          f"{os.cpu_count()} cores, Python {platform.python_version()}, numpy {np.__version__}")
    print(f"# run as: python bench/sim_cpu_costs.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"# load average (1, 5, 15 min) at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"# args: {vars(args)}")
    rows: dict[str, tuple[float, float, float]] = {}
    rows.update(bench_message(args))
    rows["apply_s_per_row"] = bench_apply(args, rng)
    rows["scan_s_per_row"] = bench_scan(args, rng)
    *idx, per_call = bench_index(args, rng)
    rows["index_s_per_row"] = tuple(idx)  # type: ignore[assignment]
    print(f"# index lookup compared {per_call} candidate rows per call")
    print(f"{'constant':40s} {'median':>12s} {'min':>12s} {'max':>12s}")
    for name, (med, lo, hi) in rows.items():
        print(f"{name:40s} {med:12.3e} {lo:12.3e} {hi:12.3e}")
    transport = transport_constants(args, rng, rows["per_message_s"][0], rows["apply_s_per_row"][0])
    print(f"# load average (1, 5, 15 min) at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("\n# [cpu] table for a scenario:")
    for name in ("per_message_s", "apply_s_per_row", "scan_s_per_row", "index_s_per_row"):
        print(f"{name} = {rows[name][0]:.3g}")
    for name, (med, lo, hi) in transport.items():
        print(f"{name} = {med:.3g}    # fits to q25 .. q75: {lo:.3g} .. {hi:.3g}")


if __name__ == "__main__":
    main()
