"""Nemesis: a real-process fault harness for ekko (issue #13).

    python bench/nemesis.py --seeds 20 --duration 60          # six daemons, 3 DCs x 2
    python bench/nemesis.py --seed 7 --seeds 1 --duration 60  # replay seed 7

Per seed it starts six ``ekko daemon`` processes (``--preset local``, a cluster key,
the write-ahead log on), each behind its own port of an in-process
:class:`ekko.testing.faultproxy.FaultProxy` that it ``--advertise``s, so all peer traffic
crosses the proxy: 30-150 ms RTT per DC pair, connection resets, stalls and
partitions.  Two publishers (``ekko.Publisher``, distinct origins, their own
state dirs) overwrite random rows of a small model while a schedule drawn from
``random.Random(seed)`` SIGKILLs and restarts daemons (same data dir), SIGSTOPs and
SIGCONTs them (one daemon down at a time), partitions DC pairs, resets and stalls
links, changes delays, restarts publishers with and without their state dir, and
takes cuts and rollbacks at random replicas.  Then it heals everything, lets the
publishers flush, and checks, per row, against a reference model of every
acknowledged publish:

* ``row-state``: each replica holds, for every row, the greatest acknowledged
  version that no rollback fenced, with its exact value (a rollback's fence covers
  counters in (cut knowledge of that shard and origin, rollback upper bound]; the
  records are read back from the daemons).  Publishes that were never
  acknowledged (in doubt) may be present if unfenced and greater.
* ``convergence``: every replica holds the same versions and values.
* ``knowledge``: every replica's per-shard knowledge reaches the greatest
  acknowledged counter of each origin there, within ``KNOWLEDGE_BOUND_S`` of the
  heal (the measured time is printed).
* ``no-5xx``: no HTTP 5xx answer crossed the proxy (peer and harness traffic
  alike) and no daemon logged a traceback.

Replay: the fault schedule (times, targets, durations) and the published data
are a function of the seed; real timing (process start-up, scheduling on a
loaded machine, which publishes a fault catches) is not, so a replay exercises
the same faults but may not reproduce a violation every time.

Exit status 1 if any seed had a violation.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# `python bench/nemesis.py` puts bench/ first on sys.path: put the checkout there instead,
# so this checkout's packages are imported (and the process helpers).
if sys.path and Path(sys.path[0]).resolve() == REPO / "bench":
    sys.path[0] = str(REPO)
elif str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
sys.path.insert(1, str(REPO / "tests"))

import numpy as np  # noqa: E402

from ekko.sdk.client import Client  # noqa: E402
from ekko.core.config import preset  # noqa: E402
from ekko.core.errors import EkkoError  # noqa: E402
from ekko.testing.faultproxy import FaultProxy, ProcessSources, ProxyThread  # noqa: E402
from ekko.sdk.rollback_watch import RolledBack  # noqa: E402
from ekko.sdk.ack import PublishError  # noqa: E402
from ekko.sdk.publisher import Publisher  # noqa: E402
from ekko.core.spec import ModelSpec, TableSpec  # noqa: E402
from ekko.core.version import counters_of, origins_of  # noqa: E402
from procs import DaemonGroup, DaemonProc, free_port, get_json  # noqa: E402

MODEL = "nemesis"
#: the daemons' protocol preset.
PRESET = "local"
SPEC = ModelSpec(MODEL, [TableSpec("a", rows=4000, dim=8, shards=8), TableSpec("b", rows=2000, dim=8, shards=4)])
DCS = ("dc1", "dc2", "dc3")
PER_DC = 2
PUBLISHERS = 2
#: inter-DC round trip drawn per DC pair (seconds).
RTT_RANGE_S = (0.030, 0.150)
#: rows per publish, and the share of them drawn from the hot rows (so rows are overwritten often).
ROWS_PER_PUBLISH = (1, 200)
HOT_SHARE, HOT_ROWS = 0.5, 100
#: pause between a publisher's publishes (the machine has two cores).
PUBLISH_PAUSE_S = 0.05
#: a publish call's deadline (retries and failover included).
PUBLISH_TIMEOUT_S = 8.0
#: mean seconds between scheduled faults.
FAULT_MEAN_GAP_S = 2.0
#: a daemon stays killed / stopped this long (seconds).
DOWN_RANGE_S = (1.0, 6.0)
#: partitions, reset bursts and stalls last this long (seconds).
LINK_FAULT_RANGE_S = (1.0, 8.0)
#: per-chunk reset probability during a reset burst.
RESET_PROB_RANGE = (0.01, 0.1)
#: knowledge must be complete on every replica this long after the heal: the bound the
#: daemons' configuration states (NodeConfig.knowledge_bound of the preset they run).
KNOWLEDGE_BOUND_S = preset(PRESET).knowledge_bound()
#: how long the harness keeps waiting after the bound, to report the time it took.
KNOWLEDGE_WAIT_S = 90.0
#: how long rows get to match the reference after knowledge is complete.
ROWS_WAIT_S = 30.0
#: seconds between polls while waiting.
POLL_S = 0.5
#: seconds for the harness's HTTP calls (cut, rollback, reads).
CLIENT_TIMEOUT_S = 10.0
#: divergences printed per invariant.
MAX_PRINTED = 3
#: daemon log lines that mean a handler or task crashed.
CRASH_MARKERS = ("Traceback (most recent call last)", "Error handling request")


# --------------------------------------------------------------------------- reference model
@dataclass
class Write:
    """One table of one publish: ids, their packed versions (None: unknown) and values."""

    table: str
    ids: np.ndarray
    versions: np.ndarray | None
    values: np.ndarray


class Reference:
    """Every publish the harness made: acknowledged, or in doubt (may or may not be anywhere).

    A publish that failed with its frame kept by the SDK is in doubt until a later
    publish of the same publisher is acknowledged (the SDK re-sends the kept frame
    first), then acknowledged; restarting the publisher without its state leaves it
    in doubt for good.

    Example:
        >>> r = Reference()
        >>> r.acked(0, [Write("a", np.array([1]), np.array([65537]), np.zeros((1, 8), np.float32))])
        >>> len(r.writes("acked"))
        1
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._acked: list[Write] = []
        self._doubt: list[Write] = []
        self._kept: dict[int, list[Write]] = {}   # publisher -> writes of its kept frame

    def acked(self, pub: int, writes: list[Write]) -> None:
        with self._lock:
            self._acked += self._kept.pop(pub, [])  # a kept frame goes out before the next one
            self._acked += writes

    def kept(self, pub: int, writes: list[Write]) -> None:
        with self._lock:
            self._kept.setdefault(pub, []).extend(writes)

    def doubt(self, writes: list[Write]) -> None:
        with self._lock:
            self._doubt += writes

    def lose_kept(self, pub: int) -> None:
        """The publisher's state is gone: its kept frame stays in doubt forever."""
        with self._lock:
            self._doubt += self._kept.pop(pub, [])

    def writes(self, which: str) -> list[Write]:
        with self._lock:
            if which == "acked":
                return list(self._acked)
            return self._doubt + [w for ws in self._kept.values() for w in ws]


# --------------------------------------------------------------------------- expected state
def fence_mask(records: list[dict[str, Any]], spec: TableSpec, ids: np.ndarray, versions: np.ndarray) -> np.ndarray:
    """Versions some rollback record fences: counter in (cut knowledge[shard][origin], upper[origin]]."""
    out = np.zeros(len(versions), dtype=bool)
    shards, o, c = spec.shards_of(ids), origins_of(versions), counters_of(versions)
    for rec in records:
        upper = dict(map(tuple, rec["upper"]))
        hi = np.array([upper.get(int(x), upper.get(0, -1)) for x in o], dtype=np.int64)
        lower = {s: dict(map(tuple, k)) for t, s, k in rec["cut"]["knowledge"] if t == spec.name}
        lo = np.array([lower.get(int(s), {}).get(int(x), 0) for s, x in zip(shards, o)], dtype=np.int64)
        out |= (c > lo) & (c <= hi)
    return out


def expected_table(spec: TableSpec, acked: list[Write], records: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """Per row the greatest acknowledged, unfenced version and its value (0 / zeros if none)."""
    vers = np.zeros(spec.rows, np.int64)
    vals = np.zeros((spec.rows, spec.dim), np.float32)
    ws = [w for w in acked if w.table == spec.name and w.versions is not None]
    if not ws:
        return vers, vals
    ids = np.concatenate([w.ids for w in ws])
    v = np.concatenate([w.versions for w in ws])
    x = np.concatenate([w.values for w in ws])
    keep = ~fence_mask(records, spec, ids, v)
    ids, v, x = ids[keep], v[keep], x[keep]
    if not len(ids):
        return vers, vals
    order = np.lexsort((v, ids))          # by row, then version: the last of each row wins
    ids, v, x = ids[order], v[order], x[order]
    last = np.r_[ids[1:] != ids[:-1], True]
    vers[ids[last]], vals[ids[last]] = v[last], x[last]
    return vers, vals


@dataclass
class Violation:
    invariant: str
    detail: str
    rows: int = 1


def check_rows(spec: TableSpec, acked: list[Write], doubt: list[Write], records: list[dict[str, Any]],
               reads: dict[str, tuple[np.ndarray, np.ndarray]]) -> list[Violation]:
    """Compare every replica's versions and values of one table with the reference."""
    exp_v, exp_x = expected_table(spec, acked, records)
    # In-doubt publishes: (row, version) -> value, where unfenced; unknown versions: rows only checked to agree.
    alt: dict[tuple[int, int], np.ndarray] = {}
    loose = np.zeros(spec.rows, bool)
    for w in (w for w in doubt if w.table == spec.name):
        if w.versions is None:
            loose[w.ids] = True
            continue
        ok = ~fence_mask(records, spec, w.ids, w.versions)
        for i, v, x in zip(w.ids[ok].tolist(), w.versions[ok].tolist(), w.values[ok]):
            alt[(i, v)] = x
    out: list[Violation] = []
    bad_rows: dict[int, dict[str, int]] = {}
    for name, (v, x) in reads.items():
        wrong = (v != exp_v) | np.any(x.view(np.uint32) != exp_x.view(np.uint32), axis=1)
        for row in np.flatnonzero(wrong & ~loose).tolist():
            a = alt.get((row, int(v[row])))
            if a is not None and v[row] > exp_v[row] and np.array_equal(a.view(np.uint32), x[row].view(np.uint32)):
                continue
            bad_rows.setdefault(row, {})[name] = int(v[row])
    if bad_rows:
        row = min(bad_rows)
        out.append(Violation("row-state", f"table {spec.name} row {row}: expected version {_v(exp_v[row])}, "
                             f"found {', '.join(f'{n}={_v(f)}' for n, f in sorted(bad_rows[row].items()))}; "
                             f"{row_history(spec, row, acked, doubt, records)}", len(bad_rows)))
    names = sorted(reads)
    for name in names[1:]:
        differ = (reads[name][0] != reads[names[0]][0]) | np.any(
            reads[name][1].view(np.uint32) != reads[names[0]][1].view(np.uint32), axis=1)
        if differ.any():
            row = int(np.flatnonzero(differ)[0])
            out.append(Violation("convergence", f"table {spec.name} row {row}: {names[0]}="
                                 f"{_v(reads[names[0]][0][row])} vs {name}={_v(reads[name][0][row])}",
                                 int(differ.sum())))
    return out


def row_history(spec: TableSpec, row: int, acked: list[Write], doubt: list[Write],
                records: list[dict[str, Any]]) -> str:
    """Every publish of ``row`` (acked / in doubt, fenced or not) and each rollback's bounds
    for its shard: what a reader of a violation needs first."""
    items = []
    for kind, ws in (("acked", acked), ("doubt", doubt)):
        for w in ws:
            if w.table != spec.name or w.versions is None:
                continue
            hit = np.flatnonzero(w.ids == row)
            for i in hit.tolist():
                fenced = bool(fence_mask(records, spec, w.ids[i:i + 1], w.versions[i:i + 1])[0])
                items.append(f"{kind} {_v(w.versions[i])}{' fenced' if fenced else ''}")
    shard = int(spec.shards_of(np.array([row]))[0])
    fences = []
    for rec in records:
        lower = {s: k for t, s, k in rec["cut"]["knowledge"] if t == spec.name}.get(shard, [])
        fences.append(f"rollback {rec.get('id')} cut {rec['cut'].get('name')} shard {shard} lower {lower} "
                      f"upper {rec['upper']}")
    return f"publishes of the row: [{', '.join(items)}]; {'; '.join(fences) or 'no rollbacks'}"


def _v(packed: int) -> str:
    """A packed version as (counter, origin)."""
    packed = int(packed)
    return f"({packed >> 16},{packed & 0xFFFF})" if packed else "0"


def knowledge_targets(acked: list[Write]) -> dict[tuple[str, int, int], int]:
    """(table, shard, origin) -> the greatest acknowledged counter there."""
    out: dict[tuple[str, int, int], int] = {}
    for w in acked:
        if w.versions is None or not len(w.ids):
            continue
        shards = SPEC.table(w.table).shards_of(w.ids)
        for s, o, c in zip(shards.tolist(), origins_of(w.versions).tolist(), counters_of(w.versions).tolist()):
            key = (w.table, s, o)
            if c > out.get(key, 0):
                out[key] = c
    return out


def knowledge_gaps(targets: dict[tuple[str, int, int], int], views: dict[str, dict[str, Any]]) -> list[str]:
    """Where a replica's knowledge is short of a target: ``replica table/shard origin have < want``."""
    gaps = []
    for name, view in sorted(views.items()):
        have = {(t, s): dict(map(tuple, k)) for t, entries in view["tables"].items() for s, k, _ in entries}
        for (t, s, o), want in sorted(targets.items()):
            got = have.get((t, s), {}).get(o, 0)
            if got < want:
                gaps.append(f"{name} {t}/{s} origin {o}: knowledge {got} < acked {want}")
    return gaps


# --------------------------------------------------------------------------- schedule
@dataclass(order=True)
class Event:
    at: float
    kind: str = field(compare=False)
    args: tuple = field(compare=False, default=())


def make_schedule(seed: int, duration: float, nodes: list[str]) -> list[Event]:
    """The seed's faults: deterministic times, targets and durations (one daemon down at a time)."""
    rng = random.Random(seed)
    events: list[Event] = []
    down_until = 0.0
    t = rng.uniform(0.5, FAULT_MEAN_GAP_S)
    kinds = ["kill", "stop", "partition", "resets", "stall", "delay", "pub_restart", "cut", "cut", "rollback", "rollback"]
    while t < duration:
        kind = rng.choice(kinds)
        a, b = rng.sample(DCS, 2) if rng.random() < 0.8 else (rng.choice(DCS),) * 2
        length = rng.uniform(*LINK_FAULT_RANGE_S)
        if kind in ("kill", "stop"):
            if t < down_until:
                kind = "stall"
            else:
                node, down = rng.choice(nodes), rng.uniform(*DOWN_RANGE_S)
                down_until = t + down + 3.0  # + start-up: a restarted daemon needs seconds to serve
                events += [Event(t, kind, (node,)), Event(min(t + down, duration), "revive", (node,))]
        if kind == "partition":
            events += [Event(t, "partition", (a, b)), Event(min(t + length, duration), "heal", (a, b))]
        elif kind == "resets":
            events += [Event(t, "resets", (a, b, rng.uniform(*RESET_PROB_RANGE))),
                       Event(min(t + length, duration), "heal", (a, b))]
        elif kind == "stall":
            events.append(Event(t, "stall", (a, b, length / 2)))
        elif kind == "delay":
            events.append(Event(t, "delay", (a, b, rng.uniform(RTT_RANGE_S[0], 3 * RTT_RANGE_S[1]))))
        elif kind == "pub_restart":
            events.append(Event(t, "pub_restart", (rng.randrange(PUBLISHERS), rng.random() < 0.5)))
        elif kind == "cut":
            events.append(Event(t, "cut", (rng.randrange(1 << 30), f"s{seed}-c{len(events)}")))
        elif kind == "rollback":
            events.append(Event(t, "rollback", (rng.randrange(1 << 30), rng.randrange(1 << 30))))
        t += rng.expovariate(1.0 / FAULT_MEAN_GAP_S)
    return sorted(events)


# --------------------------------------------------------------------------- publishers
class PublisherDriver(threading.Thread):
    """One trainer: publishes random rows in a loop and records every outcome.

    Restarts (with or without the state dir) are asked with :meth:`request_restart`
    and done between publishes, on this thread.

    Example::

        d = PublisherDriver(0, endpoints, key, tmp / "pub0", reference, seed=1)
        d.start(); ...; d.finish()
    """

    def __init__(self, idx: int, endpoints: list[str], key: bytes, state_dir: Path, ref: Reference, seed: int):
        super().__init__(name=f"nemesis-pub{idx}", daemon=True)
        self.idx, self.endpoints, self.key, self.state_dir, self.ref = idx, endpoints, key, state_dir, ref
        self.rng = np.random.default_rng(seed * 1000 + idx)
        self.stop_event = threading.Event()
        self.restarts: list[bool] = []
        self.counts: Counter = Counter()
        self.pub = self._open()

    def _open(self) -> Publisher:
        pub = Publisher(self.endpoints, origin=f"nemesis-{self.idx}", key=self.key, state_dir=self.state_dir,
                        timeout=PUBLISH_TIMEOUT_S)
        pub.register(SPEC)
        return pub

    def request_restart(self, keep_state: bool) -> None:
        self.restarts.append(keep_state)

    def run(self) -> None:
        while not self.stop_event.is_set():
            if self.restarts:
                self._restart(self.restarts.pop(0))
            self.publish_once()
            time.sleep(PUBLISH_PAUSE_S)

    def _restart(self, keep_state: bool) -> None:
        self.pub.close()
        if not keep_state:
            shutil.rmtree(self.state_dir, ignore_errors=True)
            self.ref.lose_kept(self.idx)
        self.counts["restart_" + ("kept" if keep_state else "lost")] += 1
        while not self.stop_event.is_set():
            try:
                self.pub = self._open()
                return
            except EkkoError:  # no replica reachable to register at: try again
                time.sleep(1.0)

    def _draw(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        t = SPEC.tables[int(self.rng.integers(len(SPEC.tables)))]
        n = int(self.rng.integers(*ROWS_PER_PUBLISH))
        hot = self.rng.integers(0, HOT_ROWS, int(n * HOT_SHARE))
        ids = np.unique(np.concatenate([hot, self.rng.integers(0, t.rows, n - len(hot))])).astype(np.int64)
        return {t.name: (ids, self.rng.standard_normal((len(ids), t.dim)).astype(np.float32))}

    def publish_once(self) -> None:
        tables = self._draw()
        try:
            ack = self.pub.publish_many(MODEL, tables)
        except RolledBack as e:   # the trainer is told of a rollback, once
            self.counts["told_of_rollback"] += 1
            if e.ack is None:
                return            # raised before anything was sent
            ack = e.ack
        except PublishError as e:
            self.counts["failed"] += 1
            if e.pending:  # this frame is kept by the SDK: read its versions to model it exactly
                self.ref.acked(self.idx, [])  # it was sent, so an earlier kept frame went out first
                frame = self.pub._core._pending.get(MODEL)
                if frame is not None:
                    vers = self.pub._core.chain.versions_of(frame)
                    self.ref.kept(self.idx, [Write(t, ids, vers[t], x) for t, (ids, x) in tables.items()])
            return
        except EkkoError:  # a definitive refusal: the frame may have reached a replica before it
            self.counts["refused"] += 1
            self.ref.lose_kept(self.idx)
            self.ref.doubt([Write(t, ids, None, x) for t, (ids, x) in tables.items()])
            return
        self.counts["acked"] += 1
        self.ref.acked(self.idx, [Write(t, ids, ack.versions[t], x) for t, (ids, x) in tables.items()])

    def finish(self) -> None:
        """Stop publishing; re-send a kept frame (the cluster is healed by now); close."""
        self.stop_event.set()
        self.join()
        try:
            self.pub.flush()
            self.ref.acked(self.idx, [])
        except EkkoError:
            self.counts["flush_failed"] += 1
        self.pub.close()


# --------------------------------------------------------------------------- cluster
class Cluster:
    """Six daemons behind the fault proxy, and the faults applied to them."""

    def __init__(self, root: Path, seed: int, key_file: Path) -> None:
        self.root, self.seed, self.key_file = root, seed, key_file
        self.sources = ProcessSources()
        self.proxy = ProxyThread(FaultProxy(self.sources, seed=seed)).start()
        self.group = DaemonGroup(root, preset=PRESET)
        self.nodes: dict[str, DaemonProc] = {}
        self.advertised: dict[str, str] = {}
        self.stopped: set[str] = set()
        self.killed: set[str] = set()
        self.base_rtt: dict[tuple[str, str], float] = {}

    def start(self, rng: random.Random) -> None:
        for i, dc in enumerate(d for d in DCS for _ in range(PER_DC)):
            name = f"r{i + 1}"
            port = free_port()
            pport = self.proxy.call(self.proxy.proxy.add_route, name, dc, ("127.0.0.1", port))
            self.advertised[name] = f"127.0.0.1:{pport}"
            seeds = [self.advertised["r1"]] if i else []
            p = self.group.spawn(name, dc, seeds=seeds, port=port, extra=[
                "--advertise", self.advertised[name], "--key-file", str(self.key_file)])
            self.nodes[name] = p
            self.sources.register(p.proc.pid, dc)
        for p in self.nodes.values():
            p.wait_healthy()
        for i, a in enumerate(DCS):
            for b in DCS[i + 1:]:
                self.base_rtt[(a, b)] = rng.uniform(*RTT_RANGE_S)
                self.proxy.call(self.proxy.proxy.set_rtt, a, b, self.base_rtt[(a, b)])

    def up(self) -> list[str]:
        return [n for n in self.nodes if n not in self.stopped and n not in self.killed]

    def kill(self, name: str) -> None:
        p = self.nodes[name]
        self.sources.unregister(p.proc.pid)
        p.kill()
        self.killed.add(name)

    def stop(self, name: str) -> None:
        os.kill(self.nodes[name].proc.pid, signal.SIGSTOP)
        self.stopped.add(name)

    def revive(self, name: str) -> None:
        p = self.nodes[name]
        if name in self.stopped:
            os.kill(p.proc.pid, signal.SIGCONT)
            self.stopped.discard(name)
        if name in self.killed:
            p.start()  # same port, data dir and arguments: a crash and restart
            self.sources.register(p.proc.pid, p.dc)
            self.killed.discard(name)

    def heal(self) -> None:
        for name in list(self.stopped | self.killed):
            self.revive(name)
        self.proxy.call(self.proxy.proxy.heal_all)
        for (a, b), rtt in self.base_rtt.items():
            self.proxy.call(self.proxy.proxy.set_rtt, a, b, rtt)
        for p in self.nodes.values():
            p.wait_healthy()

    def client(self, name: str, key: bytes) -> Client:
        # Through the proxy (unclassified: no faults) so that every answer's status is counted.
        return Client(self.advertised[name], key=key, timeout=CLIENT_TIMEOUT_S)

    def crash_lines(self) -> list[str]:
        out = []
        for p in self.nodes.values():
            text = p.log_path.read_text(errors="replace") if p.log_path.exists() else ""
            n = sum(text.count(m) for m in CRASH_MARKERS)
            if n:
                out.append(f"{p.node_id}: {n} crash lines in {p.log_path}")
        return out

    def close(self) -> None:
        for p in self.nodes.values():  # a SIGSTOPped process dies of SIGKILL too
            p.kill()
        self.proxy.stop()


# --------------------------------------------------------------------------- one seed
@dataclass
class SeedResult:
    seed: int
    faults: Counter
    acked: int = 0
    in_doubt: int = 0
    rollbacks: int = 0
    violations: list[Violation] = field(default_factory=list)
    knowledge_s: float | None = None
    proxy: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


class SeedRun:
    """Runs one seed: start, faults, heal, check."""

    def __init__(self, seed: int, duration: float, root: Path, verbose: bool) -> None:
        self.seed, self.duration, self.root, self.verbose = seed, duration, root, verbose
        self.key = os.urandom(16).hex().encode()
        key_file = root / "cluster.key"
        key_file.write_bytes(self.key)
        self.cluster = Cluster(root, seed, key_file)
        self.ref = Reference()
        self.faults: Counter = Counter()
        self.cuts: list[str] = []
        self.pubs: list[PublisherDriver] = []
        self.notes: list[str] = []   # refused cuts/rollbacks: expected under faults, shown for reading

    def run(self) -> SeedResult:
        rng = random.Random(self.seed)
        try:
            self.cluster.start(rng)
            eps = list(self.cluster.advertised.values())
            for i in range(PUBLISHERS):
                order = eps[2 * i:] + eps[:2 * i]  # each publisher prefers another DC
                self.pubs.append(PublisherDriver(i, order, self.key, self.root / f"pub{i}", self.ref, self.seed))
            for p in self.pubs:
                p.start()
            self._fault_phase()
            self.cluster.heal()
            for p in self.pubs:
                p.finish()
                self.faults.update({k: v for k, v in p.counts.items() if k.startswith("restart")})
            return self._check()
        finally:
            for p in self.pubs:
                p.stop_event.set()
            self.cluster.close()

    def _fault_phase(self) -> None:
        t0 = time.monotonic()
        for ev in make_schedule(self.seed, self.duration, list(self.cluster.nodes)):
            wait = t0 + ev.at - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            if self.verbose:
                print(f"  t={ev.at:6.2f}s {ev.kind} {ev.args}", flush=True)
            self._apply(ev)
        time.sleep(max(0.0, t0 + self.duration - time.monotonic()))

    def _apply(self, ev: Event) -> None:
        c, px = self.cluster, self.cluster.proxy
        if ev.kind == "kill" or ev.kind == "stop":
            (c.kill if ev.kind == "kill" else c.stop)(ev.args[0])
        elif ev.kind == "revive":
            c.revive(ev.args[0])
            return
        elif ev.kind == "partition":
            px.call(px.proxy.partition, *ev.args)
        elif ev.kind == "resets":
            px.call(px.proxy.reset, *ev.args[:2])
            px.call(px.proxy.set_reset_prob, *ev.args)
        elif ev.kind == "heal":
            px.call(px.proxy.heal, *ev.args)
            return
        elif ev.kind == "stall":
            px.call(px.proxy.stall, *ev.args)
        elif ev.kind == "delay":
            px.call(px.proxy.set_rtt, *ev.args)
        elif ev.kind == "pub_restart":
            self.pubs[ev.args[0]].request_restart(ev.args[1])
            self.faults["pub_restart_" + ("kept" if ev.args[1] else "lost")] += 1
            return
        elif ev.kind == "cut":
            self._cut(*ev.args)
            return
        elif ev.kind == "rollback":
            self._rollback(*ev.args)
            return
        self.faults[ev.kind] += 1

    def _pick(self, draw: int) -> str | None:
        up = self.cluster.up()
        return up[draw % len(up)] if up else None

    def _cut(self, draw: int, name: str) -> None:
        node = self._pick(draw)
        try:
            self.cuts.append(self.cluster.client(node, self.key).cut(MODEL, name))
            self.faults["cut"] += 1
        except EkkoError as e:
            self.faults["cut_refused"] += 1
            self.notes.append(f"cut at {node} refused: {e}")

    def _rollback(self, draw_node: int, draw_cut: int) -> None:
        if not self.cuts:
            return
        node, cut = self._pick(draw_node), self.cuts[draw_cut % len(self.cuts)]
        try:
            self.cluster.client(node, self.key).rollback(MODEL, cut)
            self.faults["rollback"] += 1
        except EkkoError as e:
            self.faults["rollback_refused"] += 1
            self.notes.append(f"rollback to {cut} at {node} refused: {e}")

    # -- checks -------------------------------------------------------------------------
    def _views(self) -> dict[str, dict[str, Any]]:
        return {n: get_json(a, f"/v1/models/{MODEL}/knowledge", key=self.key)
                for n, a in self.cluster.advertised.items()}

    def _check(self) -> SeedResult:
        acked, doubt = self.ref.writes("acked"), self.ref.writes("doubt")
        res = SeedResult(self.seed, self.faults, acked=len(acked), in_doubt=len(doubt), notes=self.notes)
        targets = knowledge_targets(acked)
        t0, gaps = time.monotonic(), ["not read yet"]
        while gaps and time.monotonic() - t0 < KNOWLEDGE_WAIT_S:
            gaps = knowledge_gaps(targets, self._views())
            if gaps:
                time.sleep(POLL_S)
        took = time.monotonic() - t0
        if gaps:
            res.violations.append(Violation("knowledge", f"incomplete {took:.0f}s after heal: {gaps[0]}", len(gaps)))
        else:
            res.knowledge_s = took
            if took > KNOWLEDGE_BOUND_S:
                res.violations.append(Violation("knowledge", f"complete after {took:.1f}s > bound "
                                                f"{KNOWLEDGE_BOUND_S:.0f}s"))
        res.violations += self._check_rows_until_stable(acked, doubt, res)
        res.violations += self._check_5xx()
        res.proxy = self.cluster.proxy.call(lambda: dict(self.cluster.proxy.proxy.counts))
        return res

    def _check_rows_until_stable(self, acked: list[Write], doubt: list[Write], res: SeedResult) -> list[Violation]:
        end = time.monotonic() + ROWS_WAIT_S
        while True:
            records = self._records()
            res.rollbacks = len(records)
            found = self._record_gaps(records)
            for t in SPEC.tables:
                reads = {n: self._read(a, t) for n, a in self.cluster.advertised.items()}
                found += check_rows(t, acked, doubt, list(records.values()), reads)
            if not found or time.monotonic() > end:
                return found
            time.sleep(POLL_S)

    def _records(self) -> dict[str, dict[str, Any]]:
        records: dict[str, dict[str, Any]] = {}
        self._per_replica_records = {}
        for n, view in self._views().items():
            self._per_replica_records[n] = {r["id"] for r in view["rollbacks"]}
            for r in view["rollbacks"]:
                records.setdefault(r["id"], r)
        return records

    def _record_gaps(self, records: dict[str, dict[str, Any]]) -> list[Violation]:
        missing = [f"{n} lacks {sorted(set(records) - ids)}" for n, ids in sorted(self._per_replica_records.items())
                   if set(records) - ids]
        return [Violation("rollback-records", missing[0], len(missing))] if missing else []

    def _read(self, address: str, t: TableSpec) -> tuple[np.ndarray, np.ndarray]:
        r = Client(address, key=self.key, timeout=CLIENT_TIMEOUT_S).read(MODEL, t.name, np.arange(t.rows))
        return r.versions, r.values.numpy()

    def _check_5xx(self) -> list[Violation]:
        out = []
        fives = self.cluster.proxy.call(lambda: list(self.cluster.proxy.proxy.http_5xx))
        if fives:
            out.append(Violation("no-5xx", f"{len(fives)} answers, first {fives[0][1]} from {fives[0][0]}; "
                                 f"by status {dict(Counter(s for _, s in fives))}", len(fives)))
        crashes = self.cluster.crash_lines()
        if crashes:
            out.append(Violation("no-5xx", "daemon tracebacks: " + "; ".join(crashes), len(crashes)))
        return out


# --------------------------------------------------------------------------- CLI
def report(res: SeedResult) -> None:
    faults = " ".join(f"{k}={v}" for k, v in sorted(res.faults.items()))
    know = f"{res.knowledge_s:.1f}s" if res.knowledge_s is not None else "never"
    print(f"seed={res.seed} acked={res.acked} in_doubt={res.in_doubt} rollback_records={res.rollbacks} "
          f"violations={len(res.violations)} knowledge_complete={know} (bound {KNOWLEDGE_BOUND_S:.0f}s) "
          f"faults: {faults}", flush=True)
    print(f"  proxy: {' '.join(f'{k}={v}' for k, v in sorted(res.proxy.items()))}", flush=True)
    for note in res.notes[:MAX_PRINTED]:
        print(f"  note: {note}", flush=True)
    for v in res.violations[:MAX_PRINTED * 4]:
        print(f"  VIOLATION seed={res.seed} invariant={v.invariant} rows={v.rows}: {v.detail}", flush=True)


def run_seed(seed: int, duration: float, workdir: Path | None, keep: bool, verbose: bool) -> SeedResult:
    root = Path(tempfile.mkdtemp(prefix=f"nemesis-{seed}-", dir=workdir))
    res = SeedRun(seed, duration, root, verbose).run()
    if res.violations or keep:
        print(f"  logs and data kept in {root}", flush=True)
    else:
        shutil.rmtree(root, ignore_errors=True)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=1, help="number of seeds to run")
    ap.add_argument("--seed", type=int, default=1, help="first seed (replay one with --seeds 1)")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of the fault phase per seed")
    ap.add_argument("--workdir", type=Path, default=None, help="where each seed's temp dir goes")
    ap.add_argument("--keep", action="store_true", help="keep logs and data of passing seeds too")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every fault as it is applied")
    args = ap.parse_args(argv)
    print(f"# {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"# {len(DCS)} DCs x {PER_DC} daemons (--preset local, key, WAL), {PUBLISHERS} publishers, "
          f"RTT {RTT_RANGE_S[0] * 1000:.0f}-{RTT_RANGE_S[1] * 1000:.0f} ms; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
    failed = 0
    for seed in range(args.seed, args.seed + args.seeds):
        res = run_seed(seed, args.duration, args.workdir, args.keep, args.verbose)
        report(res)
        failed += bool(res.violations)
    print(f"# {args.seeds - failed}/{args.seeds} seeds without violations; load average "
          f"{os.getloadavg()[0]:.1f}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
