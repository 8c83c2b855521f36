"""``ekko demo``: a local cluster, a real training loop, live freshness.

What it does, all on loopback:

1. starts ``--dcs x --per-dc`` ``ekko daemon`` subprocesses (``--preset local``),
   every one joining through the first as its seed, each in its own session so a
   terminal Ctrl-C reaches only this process;
2. trains a small recommendation model -- user and item ``nn.Embedding`` tables
   (sparse gradients, Adagrad) and an MLP -- on synthetic clicks: users and items
   drawn from Zipf distributions (a few hot rows, a long tail, as in real
   traffic), click probability from hidden "true" user/item vectors;
3. after every step publishes the rows that step changed through
   :meth:`ekko.sdk.publisher.Publisher.track` to one replica (the others are fail-over
   endpoints);
4. shows a live view (about twice a second): per DC the max and median freshness
   lag -- at each poll of a replica's ``/v1/status``, how long it had been missing
   the oldest update the trainer had started publishing that its head does not
   hold yet (:func:`staleness`), the worst over the last :data:`LAG_WINDOW_S` --
   and the lag the replicas report themselves (from gossiped heads); rows
   published and publish latency;
5. on Ctrl-C or after ``--duration``: stops training, waits (bounded) for the
   replicas to converge, SIGTERMs every daemon and waits for it, and prints a
   summary: rows published, publish latency, whether the final table digests
   are equal across replicas, and whether they equal the trained model.

Exit status: 0 when the replicas converged, 1 when they did not (or a daemon did
not stop), 2 for bad arguments.  :class:`LocalCluster` is reused by
``bench/latency.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ekko.cli.demo_lag import LAG_WINDOW_S, PUBLISH_LOG, counter_floor, record_lag, staleness

#: seconds a daemon gets to answer /healthz after start (importing torch takes CPU
#: seconds, and several daemons starting at once on a small machine queue for it).
START_TIMEOUT_S = 120.0
#: seconds the members get to see each other before training starts anyway.
JOIN_TIMEOUT_S = 60.0
#: seconds a daemon gets to exit after SIGTERM before it is killed.
STOP_TIMEOUT_S = 30.0
#: seconds the replicas get to converge after training stops.
CONVERGE_TIMEOUT_S = 60.0
#: live view refreshes per second.
REFRESH_PER_S = 2.0
#: seconds between status polls of every replica.
POLL_INTERVAL_S = 0.5
#: model name on the cluster.
MODEL = "demo-ranker"
#: the demo model and data.
USERS, ITEMS, DIM, HIDDEN, TRUE_DIM = 20_000, 10_000, 16, 64, 8
BATCH = 256
ZIPF_S = 1.2
#: publish latencies kept for the percentiles shown.
LATENCY_WINDOW = 200


# ---------------------------------------------------------------------------- the cluster

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def daemon_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a daemon this process starts: the tree this ``ekko`` was
    imported from comes first on ``PYTHONPATH``, so the daemons run the same code as
    their starter wherever it runs from (a checkout, a worktree, an installed copy).

    Example:
        >>> env = daemon_env({"PYTHONPATH": "/elsewhere"})
        >>> env["PYTHONPATH"].split(os.pathsep)[1]
        '/elsewhere'
    """
    env = dict(os.environ if base is None else base)
    root = str(Path(__file__).resolve().parents[2])
    rest = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]
    env["PYTHONPATH"] = os.pathsep.join([root, *rest])
    return env

@dataclass
class Replica:
    """One daemon of a :class:`LocalCluster`: identity, address, files and process.

    Example:
        >>> r = Replica("dc1-r1", "dc1", "127.0.0.1:7070", Path("/tmp/d/dc1-r1"), Path("/tmp/d/dc1-r1.log"))
        >>> r.endpoint
        '127.0.0.1:7070'
    """

    node_id: str
    dc: str
    address: str
    data_dir: Path
    log_path: Path
    proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return self.address


class LocalCluster:
    """``ekko daemon`` subprocesses on loopback: ``dcs`` data centres of ``per_dc`` replicas.

    Args:
        dcs / per_dc: the shape.
        data_dir: each replica keeps snapshots and a log file under it.
        base_port: first port (consecutive ports follow); 0 picks free ports.
        preset: protocol timing preset of every daemon.
        key_file: cluster key file passed to every daemon; :meth:`client` signs with it
            (a keyed daemon refuses unsigned reads, :mod:`ekko.core.read_auth`).
        node_config: per replica id, ``[node]`` fields (ekko.core.config.NodeConfig) written to a
            TOML file the replica is started with (e.g. ``{"dc2-r2": {"baseline_pin_cut": "c"}}``).
        apply_trace_dir: benches: every replica records each row it applies, with its wall
            time, under ``apply_trace_dir/<replica id>`` (``ekko daemon --apply-trace``;
            flushed when it stops).

    Example::

        with LocalCluster(3, 3, Path("/tmp/c")) as c:
            c.wait_ready(); print(c.endpoints)
    """

    def __init__(self, dcs: int, per_dc: int, data_dir: Path, base_port: int = 0, preset: str = "local",
                 key_file: str | None = None, device: str = "cpu",
                 node_config: dict[str, dict[str, Any]] | None = None,
                 apply_trace_dir: Path | None = None) -> None:
        if dcs < 1 or per_dc < 1:
            raise ValueError("need at least one DC and one replica per DC")
        self.data_dir = Path(data_dir)
        self.node_config = dict(node_config or {})
        self.preset, self.key_file, self.device = preset, key_file, device
        #: the cluster key read from ``key_file`` (None without one): what :meth:`client` signs with.
        self.key: bytes | None = Path(key_file).read_bytes().strip() if key_file else None
        self.apply_trace_dir = None if apply_trace_dir is None else Path(apply_trace_dir)
        self.replicas: list[Replica] = []
        n = dcs * per_dc
        ports = [base_port + i for i in range(n)] if base_port else [free_port() for _ in range(n)]
        for d in range(dcs):
            for i in range(per_dc):
                nid = f"dc{d + 1}-r{i + 1}"
                self.replicas.append(Replica(nid, f"dc{d + 1}", f"127.0.0.1:{ports[d * per_dc + i]}",
                                             self.data_dir / nid, self.data_dir / f"{nid}.log"))

    @property
    def endpoints(self) -> list[str]:
        return [r.address for r in self.replicas]

    def client(self, address: str, timeout: float = 5.0) -> Any:
        """An :class:`ekko.sdk.client.Client` of one replica, signing with the cluster key (if any)."""
        from ekko.sdk.client import Client
        return Client(address, key=self.key, timeout=timeout)

    def start(self) -> None:
        seed = self.replicas[0].address
        for i, r in enumerate(self.replicas):
            r.data_dir.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, "-m", "ekko.cli.main", "daemon", "--node-id", r.node_id, "--dc", r.dc,
                   "--listen", r.address, "--data-dir", str(r.data_dir), "--preset", self.preset,
                   "--device", self.device, "--log-level", "warning"]
            if i:
                cmd += ["--seed", seed]
            if self.key_file:
                cmd += ["--key-file", self.key_file]
            if self.apply_trace_dir is not None:
                cmd += ["--apply-trace", str(self.apply_trace_dir / r.node_id)]
            if r.node_id in self.node_config:
                toml = r.data_dir.parent / f"{r.node_id}.toml"
                toml.write_text("[node]\n" + "".join(f"{k} = {json.dumps(v)}\n"
                                                     for k, v in self.node_config[r.node_id].items()))
                cmd += ["--config", str(toml)]
            log = open(r.log_path, "ab")
            # Own session: a Ctrl-C in the terminal goes to us only; we stop the daemons in order.
            r.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      start_new_session=True, env=daemon_env())
            log.close()

    def wait_ready(self, timeout: float = START_TIMEOUT_S,
                   on_ready: Callable[[Replica, int, float], None] | None = None) -> None:
        """Until every replica answers /healthz; RuntimeError (with its log tail) if one dies or is slow.

        ``on_ready(replica, ready, seconds)`` is called as each one starts serving: how many
        serve by then, and the seconds since this call began."""
        t0 = time.monotonic()
        end = t0 + timeout
        pending = list(self.replicas)
        while pending:
            for r in list(pending):
                if r.proc is not None and r.proc.poll() is not None:
                    raise RuntimeError(f"{r.node_id} exited with {r.proc.returncode}:\n{self.log_tail(r)}")
                if self.client(r.address, timeout=2).healthz():
                    pending.remove(r)
                    if on_ready is not None:
                        on_ready(r, len(self.replicas) - len(pending), time.monotonic() - t0)
            if pending and time.monotonic() > end:
                raise RuntimeError(f"{[r.node_id for r in pending]} not serving after {timeout:.0f}s")
            time.sleep(0.2)

    def wait_joined(self, timeout: float = JOIN_TIMEOUT_S) -> bool:
        """Until the seed sees every replica alive; False after ``timeout``."""
        end = time.monotonic() + timeout
        c = self.client(self.replicas[0].address, timeout=5)
        while time.monotonic() < end:
            try:
                members = c.status(cluster=True).get("members", [])
                if sum(1 for m in members if m.get("state") == "alive") >= len(self.replicas):
                    return True
            except Exception:
                pass
            time.sleep(0.2)
        return False

    def log_tail(self, r: Replica, lines: int = 20) -> str:
        try:
            return "\n".join(r.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> list[str]:
        """SIGTERM every daemon, wait for all; kill stragglers.  Returns problems found."""
        problems = []
        for r in self.replicas:
            if r.proc is not None and r.proc.poll() is None:
                r.proc.send_signal(signal.SIGTERM)
        end = time.monotonic() + timeout
        try:
            for r in self.replicas:
                if r.proc is None:
                    continue
                try:
                    rc = r.proc.wait(max(0.1, end - time.monotonic()))
                    if rc != 0:
                        problems.append(f"{r.node_id} exited with status {rc}")
                except subprocess.TimeoutExpired:
                    r.proc.kill()
                    r.proc.wait()
                    problems.append(f"{r.node_id} did not stop within {timeout:.0f}s and was killed")
        except KeyboardInterrupt:
            # Impatient second Ctrl-C: the daemons run in their own sessions and would
            # outlive us, so kill what is left rather than leave it running.
            for r in self.replicas:
                if r.proc is not None and r.proc.poll() is None:
                    r.proc.kill()
                    r.proc.wait()
                    problems.append(f"{r.node_id} killed (interrupted while stopping)")
        return problems

    def __enter__(self) -> "LocalCluster":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


# ---------------------------------------------------------------------------- model and data

def build_model(seed: int):
    """The demo recommender: user/item embeddings (sparse grads) + an MLP on their concatenation."""
    import torch
    from torch import nn

    class Ranker(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.user_emb = nn.Embedding(USERS, DIM, sparse=True)
            self.item_emb = nn.Embedding(ITEMS, DIM, sparse=True)
            self.mlp = nn.Sequential(nn.Linear(3 * DIM, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 1))

        def forward(self, users, items):
            u, i = self.user_emb(users), self.item_emb(items)
            return self.mlp(torch.cat([u, i, u * i], dim=1)).squeeze(1)

    torch.manual_seed(seed)
    with torch.no_grad():
        model = Ranker()
        model.user_emb.weight.mul_(0.1)
        model.item_emb.weight.mul_(0.1)
    return model


class ClickStream:
    """Synthetic clicks: Zipf-popular users and items, labels from hidden true vectors.

    Example:
        >>> users, items, clicks = ClickStream(seed=0).batch(4)
        >>> users.shape, items.dtype, set(clicks.tolist()) <= {0.0, 1.0}
        (torch.Size([4]), torch.int64, True)
    """

    def __init__(self, seed: int) -> None:
        import numpy as np
        self.rng = np.random.default_rng(seed)
        self.true_u = self.rng.standard_normal((USERS, TRUE_DIM)).astype("float32") / math.sqrt(TRUE_DIM)
        self.true_i = self.rng.standard_normal((ITEMS, TRUE_DIM)).astype("float32") / math.sqrt(TRUE_DIM)
        # Random popularity ranks, so hot rows are spread over the table and its shards.
        self.user_of_rank = self.rng.permutation(USERS)
        self.item_of_rank = self.rng.permutation(ITEMS)

    def batch(self, n: int = BATCH):
        import numpy as np
        import torch
        u = self.user_of_rank[np.minimum(self.rng.zipf(ZIPF_S, n), USERS) - 1]
        i = self.item_of_rank[np.minimum(self.rng.zipf(ZIPF_S, n), ITEMS) - 1]
        logit = 3.0 * (self.true_u[u] * self.true_i[i]).sum(1)
        y = (self.rng.random(n) < 1 / (1 + np.exp(-logit))).astype("float32")
        return torch.from_numpy(u), torch.from_numpy(i), torch.from_numpy(y)


# ---------------------------------------------------------------------------- live state

@dataclass
class DemoState:
    """What the live view shows; written by the trainer and the poller threads.

    Example:
        >>> s = DemoState()
        >>> s.latencies.append(0.02); s.rows += 100
        >>> s.rows, list(s.latencies)
        (100, [0.02])
    """

    steps: int = 0
    publishes: int = 0
    rows: int = 0
    loss: float = float("nan")
    latencies: deque = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))
    #: the trainer's publishes in start order, ``[started (monotonic), counter]``: the
    #: greatest counter acknowledged, or while in flight the least it can carry.
    sent: deque = field(default_factory=lambda: deque(maxlen=PUBLISH_LOG))
    status: dict[str, dict[str, Any] | None] = field(default_factory=dict)   # node_id -> /v1/status
    lag: dict[str, float | None] = field(default_factory=dict)   # node_id -> worst lag of its recent polls
    worst_lag: dict[str, float] = field(default_factory=dict)    # node_id -> worst lag of the run
    lag_polls: dict[str, deque] = field(default_factory=dict)    # node_id -> (asked at, lag) of recent polls
    errors: int = 0
    last_error: str = ""
    #: the inference loop on a far replica (ekko.cli.demo_serving.ServingLoop) and the
    #: trained model it is compared with; None when not serving.
    serving: Any = None
    model: Any = None
    started: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))]


def head_of(st: dict[str, Any] | None) -> int | None:
    """The demo model's head (greatest counter applied) in a replica's status; None
    without an answer, 0 before the model is there."""
    if st is None:
        return None
    return int(st.get("models", {}).get(MODEL, {}).get("head") or 0)


def per_dc_rows(cluster: LocalCluster, state: DemoState) -> list[tuple[str, int, int, list[float], list[float]]]:
    """(dc, replicas answering, replicas, lags vs trainer, self-reported lags) per DC."""
    out = []
    with state.lock:
        status = dict(state.status)
        lag_of = dict(state.lag)
    for dc in sorted({r.dc for r in cluster.replicas}):
        reps = [r for r in cluster.replicas if r.dc == dc]
        lags, own = [], []
        up = 0
        for r in reps:
            st = status.get(r.node_id)
            if st is None:
                continue
            up += 1
            lag = lag_of.get(r.node_id)
            if lag is not None:
                lags.append(lag)
            reported = st.get("models", {}).get(MODEL, {}).get("lag_s")
            if reported is not None:          # None: the replica cannot tell yet
                own.append(float(reported))
        out.append((dc, up, len(reps), lags, own))
    return out


def render(cluster: LocalCluster, state: DemoState, duration: float | None):
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    t = Table(title="freshness per data centre (lag = how long a replica had been missing the trainer's oldest "
              f"update it lacked; worst of the last {LAG_WINDOW_S:g} s of polls)")
    for col in ("DC", "replicas up", "lag max", "lag median", "reported lag max (gossip)"):
        t.add_column(col, justify="left" if col == "DC" else "right")
    for dc, up, n, lags, own in per_dc_rows(cluster, state):
        t.add_row(dc, f"{up}/{n}", f"{max(lags):.3f} s" if lags else "-",
                  f"{statistics.median(lags):.3f} s" if lags else "-", f"{max(own):.3f} s" if own else "-")
    with state.lock:
        lat = [x * 1000 for x in state.latencies]
        elapsed = time.monotonic() - state.started
        head = Text(f"trainer: step {state.steps}, loss {state.loss:.4f}, {state.publishes} publishes, "
                    f"{state.rows} rows published; publish latency p50 {_pct(lat, 0.5):.1f} ms, "
                    f"p90 {_pct(lat, 0.9):.1f} ms; {elapsed:.0f}"
                    + (f"/{duration:.0f}" if duration else "") + " s"
                    + (f"; {state.errors} publish errors (last: {state.last_error})" if state.errors else ""))
    parts = [head, t]
    if state.serving is not None and state.model is not None:
        parts.append(Text(serving_line(state)))
    return Group(*parts, Text("Ctrl-C stops training, then the cluster.", style="dim"))


def serving_line(state: DemoState) -> str:
    """The inference loop's line of the live view and the summary."""
    v, srv = state.serving.view(state.model), state.serving
    lag = state.lag.get(srv.node_id)
    return (f"serving on {srv.node_id} ({srv.dc}) through ekko.attach (its tables, in place): "
            f"{v['requests']} requests served, running log loss {v['running_loss']:.4f}; held-out log loss "
            f"served {v['served_eval_loss']:.4f} vs trainer {v['trainer_eval_loss']:.4f}"
            + (f"; replica lag {lag:.3f} s" if lag is not None else ""))


# ---------------------------------------------------------------------------- the run

class _Poller(threading.Thread):
    def __init__(self, cluster: LocalCluster, state: DemoState) -> None:
        super().__init__(name="ekko-demo-poller", daemon=True)
        self.cluster, self.state = cluster, state
        self.stopped = threading.Event()

    def run(self) -> None:
        clients = {r.node_id: self.cluster.client(r.address, timeout=2) for r in self.cluster.replicas}
        while not self.stopped.is_set():
            for nid, c in clients.items():
                asked = time.monotonic()
                try:
                    st = c.status()
                except Exception:
                    st = None
                with self.state.lock:
                    self.state.status[nid] = st
                    record_lag(self.state, nid, asked, staleness(asked, head_of(st), self.state.sent))
            self.stopped.wait(POLL_INTERVAL_S)


def _digests(cluster: LocalCluster) -> dict[str, dict[str, str] | None]:
    out: dict[str, dict[str, str] | None] = {}
    for r in cluster.replicas:
        try:
            tables = cluster.client(r.address, timeout=5).status()["models"][MODEL]["tables"]
            out[r.node_id] = {t: info.get("digest", "") for t, info in tables.items()}
        except Exception:
            out[r.node_id] = None
    return out


def _matches_model(cluster: LocalCluster, endpoint: str, model: Any) -> bool:
    """Every table of one replica equals the module's weights, bit for bit."""
    import numpy as np
    from ekko.core.store import to_wire_values
    from ekko.sdk.tracking import dense_rows, module_layout
    c = cluster.client(endpoint, timeout=30)
    for lay, p, _ in module_layout(model):
        want = to_wire_values(p.detach() if lay.kind == "embedding" else dense_rows(p, lay.rows, lay.dim))
        got = to_wire_values(c.read_rows(MODEL, lay.name, np.arange(lay.rows)))
        if not np.array_equal(got.view(np.uint8), want.view(np.uint8)):
            return False
    return True


def _wait_converged(cluster: LocalCluster, timeout: float) -> tuple[bool, dict[str, Any]]:
    end = time.monotonic() + timeout
    while True:
        d = _digests(cluster)
        vals = list(d.values())
        ok = all(v is not None for v in vals) and all(v == vals[0] for v in vals)
        if ok or time.monotonic() > end:
            return ok, d
        time.sleep(0.25)


def start_serving(cluster: LocalCluster, seed: int, console: Any) -> Any:
    """The inference loop on the first replica of the last DC (None if it cannot start)."""
    from ekko.cli.demo_serving import MODEL_WAIT_S, ServingLoop, wait_for_model
    far = next(r for r in cluster.replicas if r.dc == cluster.replicas[-1].dc)
    if not wait_for_model(far.address, MODEL, MODEL_WAIT_S, key=cluster.key):
        console.print(f"[yellow]{far.node_id} does not hold the model yet: not serving[/]")
        return None
    loop = ServingLoop(far.address, MODEL, lambda: build_model(seed), seed + 100, ClickStream, key=cluster.key)
    loop.node_id, loop.dc = far.node_id, far.dc
    loop.start()
    console.print(f"serving from {far.node_id} ({far.dc}) through ekko.attach", highlight=False)
    return loop


def run(args: argparse.Namespace) -> int:
    import torch
    import torch.nn.functional as F

    from ekko.sdk.publisher import Publisher
    from rich.console import Console
    from rich.live import Live

    # torch's note about unchecked sparse gradients (Adagrad) is not for demo users.
    warnings.filterwarnings("ignore", message="Sparse invariant checks")
    console = Console()
    keep = args.data_dir is not None
    data_dir = Path(args.data_dir) if keep else Path(tempfile.mkdtemp(prefix="ekko-demo-"))
    data_dir.mkdir(parents=True, exist_ok=True)
    cluster = LocalCluster(args.dcs, args.per_dc, data_dir, args.base_port)
    state = DemoState()
    poller = _Poller(cluster, state)
    pub = None
    model = None
    interrupted = False
    failed = ""
    t_stop = None
    try:
        n = len(cluster.replicas)
        console.print(f"starting {n} daemons in {args.dcs} DC(s) under {data_dir} "
                      "(each imports torch first: seconds on a small machine) ...")
        cluster.start()
        cluster.wait_ready(on_ready=lambda r, k, dt: console.print(
            f"  {r.node_id} serving on {r.address} ({k}/{n}, {dt:.1f} s)", highlight=False))
        if n > 1:
            console.print("waiting for the replicas to see each other ...")
            t_join = time.monotonic()
            if cluster.wait_joined():
                console.print(f"  all {n} members alive ({time.monotonic() - t_join:.1f} s)")
            else:
                console.print("[yellow]not every replica sees every other yet; training anyway[/]")
        console.print("replicas: " + ", ".join(f"{r.node_id}@{r.address}" for r in cluster.replicas))
        console.print(f"watch with: ekko status --peer {cluster.replicas[0].address} --cluster")
        model = build_model(args.seed)
        opt = torch.optim.Adagrad(model.parameters(), lr=0.05)
        data = ClickStream(args.seed)
        # The trainer talks to the first replica; the others of its DC are fail-over endpoints.
        eps = [r.address for r in cluster.replicas if r.dc == cluster.replicas[0].dc]
        pub = Publisher(eps, origin="demo-trainer", state_dir=data_dir / "publisher", timeout=10)
        tracker = pub.track(model, model=MODEL, optimizer=opt)
        state.serving, state.model = start_serving(cluster, args.seed, console), model
        poller.start()
        state.started = time.monotonic()
        # The first Ctrl-C asks to stop between steps (a step's optimizer update and its
        # publish stay together, so the replicas end equal to the model); a second one
        # interrupts at once.
        stop = threading.Event()

        def on_sigint(signum: int, frame: Any) -> None:
            if stop.is_set():
                raise KeyboardInterrupt
            stop.set()
        previous = signal.signal(signal.SIGINT, on_sigint)
        live = Live(get_renderable=lambda: render(cluster, state, args.duration), console=console,
                    refresh_per_second=REFRESH_PER_S, transient=False) if console.is_terminal else None
        next_print = time.monotonic()
        if live is not None:
            live.start()
        try:
            while not stop.is_set() and (args.duration is None
                                         or time.monotonic() - state.started < args.duration):
                t_step = time.monotonic()
                users, items, y = data.batch()
                loss = F.binary_cross_entropy_with_logits(model(users, items), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                t0 = time.monotonic()
                entry = [t0, counter_floor(time.time())]
                with state.lock:
                    state.sent.append(entry)
                try:
                    res = tracker.publish()
                except Exception as e:   # keep training; the tracker re-sends what was not delivered
                    with state.lock:
                        state.errors += 1
                        state.last_error = f"{type(e).__name__}: {str(e)[:120]}"
                        if entry in state.sent:
                            state.sent.remove(entry)    # its rows go again with a later publish
                    res = None
                dt = time.monotonic() - t0
                with state.lock:
                    state.steps += 1
                    x = loss.item()
                    state.loss = x if math.isnan(state.loss) else 0.98 * state.loss + 0.02 * x
                    if res is not None and res.acks:
                        state.publishes += len(res.acks)
                        state.rows += res.rows
                        state.latencies.append(dt)
                        entry[1] = max(a.max_counter for a in res.acks)
                    elif res is not None and entry in state.sent:
                        state.sent.remove(entry)        # nothing to publish this step
                if live is None and time.monotonic() >= next_print:
                    next_print = time.monotonic() + 2.0
                    print(_progress_line(cluster, state), flush=True)
                rest = args.step_interval - (time.monotonic() - t_step)
                if rest > 0:
                    stop.wait(rest)
            # Whatever is not on the replicas yet (an earlier failed publish) goes now.
            res = tracker.publish()
            with state.lock:
                state.publishes += len(res.acks)
                state.rows += res.rows
        except KeyboardInterrupt:
            interrupted = True
        finally:
            signal.signal(signal.SIGINT, previous)
            interrupted = interrupted or stop.is_set()
            if live is not None:
                live.stop()
        t_stop = time.monotonic()
        console.print("training stopped" + (" (Ctrl-C)" if interrupted else "") + "; waiting for the replicas ...")
        tracker.close()
    except KeyboardInterrupt:
        interrupted = True
    except Exception as e:
        failed = f"{type(e).__name__}: {e}"
    converged, digests, matches = False, {}, None
    try:
        if not failed and model is not None:
            converged, digests = _wait_converged(cluster, CONVERGE_TIMEOUT_S)
            if converged:
                matches = _matches_model(cluster, cluster.replicas[0].address, model)
    except KeyboardInterrupt:
        interrupted = True
    except Exception as e:
        failed = failed or f"{type(e).__name__}: {e}"
    finally:
        poller.stopped.set()
        if state.serving is not None:
            state.serving.stopped.set()
        if pub is not None:
            pub.close()
        console.print(f"stopping {len(cluster.replicas)} daemons (SIGTERM) ...")
        problems = cluster.stop()
    t_conv = (time.monotonic() - t_stop) if t_stop is not None else None
    lat = sorted(x * 1000 for x in state.latencies)
    console.print("[bold]ekko demo summary[/]")
    console.print(f"  replicas: {len(cluster.replicas)} in {args.dcs} DC(s); data under {data_dir}")
    console.print(f"  training steps: {state.steps}; publishes: {state.publishes}; rows published: {state.rows}")
    if lat:
        console.print(f"  publish latency (last {len(lat)}): p50 {_pct(lat, 0.5):.1f} ms, "
                      f"p90 {_pct(lat, 0.9):.1f} ms, max {lat[-1]:.1f} ms")
    if state.errors:
        console.print(f"  publish errors: {state.errors} (last: {state.last_error})")
    with state.lock:
        worst = dict(state.worst_lag)
    for dc, up, n, lags, own in per_dc_rows(cluster, state):
        run_worst = max((w for r in cluster.replicas if r.dc == dc for w in [worst.get(r.node_id)] if w is not None),
                        default=None)
        console.print(f"  {dc}: last seen lag max {max(lags):.3f} s, worst of the run {run_worst:.3f} s"
                      if lags and run_worst is not None else f"  {dc}: no status")
    console.print(f"  final digests equal across replicas: {'yes' if converged else 'no'}"
                  + (f" (after {t_conv:.1f} s)" if converged and t_conv is not None else ""))
    if not converged and digests:
        for nid, d in digests.items():
            console.print(f"    {nid}: {'unreachable' if d is None else ' '.join(f'{t}={h[:8]}' for t, h in sorted(d.items()))}")
    if matches is not None:
        console.print(f"  replicas equal the trained model: {'yes' if matches else 'no'}")
    if state.serving is not None:
        state.serving.join(5)
        console.print(f"  {serving_line(state)}", highlight=False)
    for p in problems:
        console.print(f"  [red]{p}[/]")
    if failed:
        console.print(f"  [red]failed: {failed}[/]")
        for r in cluster.replicas:
            if r.proc is not None and r.proc.returncode not in (0, None):
                console.print(f"  {r.node_id} log:\n{cluster.log_tail(r)}")
    if not keep:
        shutil.rmtree(data_dir, ignore_errors=True)
    return 0 if converged and matches is not False and not problems and not failed else 1


def _progress_line(cluster: LocalCluster, state: DemoState) -> str:
    parts = []
    for dc, up, n, lags, _ in per_dc_rows(cluster, state):
        parts.append(f"{dc} {up}/{n} up lag max {max(lags):.3f}s" if lags else f"{dc} {up}/{n} up")
    with state.lock:
        lat = [x * 1000 for x in state.latencies]
        return (f"step {state.steps} rows {state.rows} publish p50 {_pct(lat, 0.5):.1f} ms | " + "; ".join(parts))


# ---------------------------------------------------------------------------- CLI

def register_cli(subparsers: Any) -> None:
    """Add ``ekko demo`` to the ``ekko`` command line (the hook of :mod:`ekko.cli.main`)."""
    p = subparsers.add_parser("demo", help="run a local cluster with a training loop and a live freshness view",
                              description="Start a local cluster of ekko daemons (loopback), train a small "
                              "recommender that publishes every step, and watch per-DC freshness.")
    p.add_argument("--dcs", type=int, default=3, help="data centres (default 3)")
    p.add_argument("--per-dc", type=int, default=3, help="replicas per data centre (default 3)")
    p.add_argument("--duration", type=float, default=None, metavar="SECONDS",
                   help="train this long, then stop (default: until Ctrl-C)")
    p.add_argument("--base-port", type=int, default=0, metavar="P",
                   help="first loopback port (default: free ports)")
    p.add_argument("--data-dir", default=None, metavar="DIR", help="keep snapshots and logs here (default: a temp "
                   "dir, removed at exit)")
    p.add_argument("--step-interval", type=float, default=0.1, metavar="SECONDS",
                   help="minimum seconds per training step, i.e. between publishes (default 0.1)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the model and the data")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    if args.dcs < 1 or args.per_dc < 1 or args.dcs * args.per_dc > 64:
        print("ekko demo: need 1..64 replicas (--dcs x --per-dc)", file=sys.stderr)
        return 2
    if args.duration is not None and args.duration <= 0:
        print("ekko demo: --duration must be > 0", file=sys.stderr)
        return 2
    if not 0 <= args.base_port <= 65535 - args.dcs * args.per_dc:
        print("ekko demo: --base-port out of range", file=sys.stderr)
        return 2
    return run(args)
