"""Event-core throughput: simulator.events against SimPy, same workloads, same run.

Workloads (every variant processes exactly ``--events`` user events and draws the
same random numbers in the same order):

* ``timers``: N independent "processes", each repeatedly waits an exponential
  delay (mean 1 s) and increments a shared counter.  Ours: a callback that
  reschedules itself.  SimPy two ways: idiomatic generator processes
  (``yield env.timeout(d)``) and its lightest path (``Timeout`` plus a callback).
* ``timers-rng``: as ``timers`` but each delay is drawn inline with
  ``random.Random.expovariate`` instead of read from a pre-drawn numpy array,
  so random-number cost (identical on both sides) dilutes the difference.
* ``pingpong``: M nodes and K tokens; a node receiving a token counts it and
  forwards it to a random other node after an exponential delay.  Ours:
  ``schedule(delay, node.recv, token)``; SimPy: ``Timeout(env, delay, value=token)``
  with a callback (SimPy's cheapest message-passing form).
* ``wan`` (``--wan``): the same store-and-forward pipeline (sender NIC FIFO, shared
  per-DC-pair link FIFO, propagation, receiver NIC FIFO) as
  :class:`simulator.network.WanNetwork`, against the textbook SimPy model of it (a
  process per message holding ``simpy.Resource`` servers).  Both see the same
  Poisson send times, endpoints and sizes; the delivery times are checked equal.
  Reported in messages per second.

Repetitions are interleaved (ours, simpy, ours, simpy, ...) so drift in machine
speed hits both alike; we report medians of events per second and the ratio.
Time is process CPU time (``time.process_time``): on a shared machine wall time
also counts the time other processes hold the CPU.  ``ours-gc-default`` runs our
core with ``tune_gc=False`` (the interpreter's default GC threshold, as SimPy runs).
Run: ``python bench/sim_core.py [--events 300000] [--reps 7] [--n 1000]``.
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import sys
import time

import numpy as np
import simpy

from simulator.events import Simulation
from simulator.network import WanNetwork
from simulator.wan_config import WanConfig

SEED = 12345
_clock = time.process_time  # CPU time of this process (see the module docstring)


def _delays(count: int) -> list[float]:
    # a Python list: indexing it costs the same in every variant
    return np.random.default_rng(SEED).exponential(1.0, count).tolist()


# --- timers ---------------------------------------------------------------------------

def ours_timers(n: int, events: int, delays: list[float] | None, tune_gc: bool = True) -> float:
    sim = Simulation(SEED, tune_gc=tune_gc)
    state = [0]
    if delays is None:
        draw = random.Random(SEED).expovariate

        def tick() -> None:
            state[0] += 1
            if state[0] == events:
                sim.stop()
            sim.schedule(draw(1.0), tick)
    else:
        it = iter(delays)

        def tick() -> None:  # type: ignore[misc]
            state[0] += 1
            if state[0] == events:
                sim.stop()
            sim.schedule(next(it), tick)

        draw = None
    for _ in range(n):
        sim.schedule(draw(1.0) if draw else next(it), tick)
    t0 = _clock()
    sim.run()
    dt = _clock() - t0
    assert state[0] == events, state
    return events / dt


def simpy_proc_timers(n: int, events: int, delays: list[float] | None) -> float:
    env = simpy.Environment()
    state = [0]
    done = env.event()
    nxt = random.Random(SEED).expovariate if delays is None else None
    it = iter(delays) if delays is not None else None

    def proc():
        while True:
            yield env.timeout(nxt(1.0) if nxt else next(it))
            state[0] += 1
            if state[0] == events:
                done.succeed()

    for _ in range(n):
        env.process(proc())
    t0 = _clock()
    env.run(until=done)
    dt = _clock() - t0
    assert state[0] == events, state
    return events / dt


def simpy_cb_timers(n: int, events: int, delays: list[float] | None) -> float:
    env = simpy.Environment()
    Timeout = simpy.Timeout
    state = [0]
    done = env.event()
    nxt = random.Random(SEED).expovariate if delays is None else None
    it = iter(delays) if delays is not None else None

    def tick(_ev) -> None:
        state[0] += 1
        if state[0] == events:
            done.succeed()
        Timeout(env, nxt(1.0) if nxt else next(it)).callbacks.append(tick)

    for _ in range(n):
        Timeout(env, nxt(1.0) if nxt else next(it)).callbacks.append(tick)
    t0 = _clock()
    env.run(until=done)
    dt = _clock() - t0
    assert state[0] == events, state
    return events / dt


# --- ping-pong --------------------------------------------------------------------------

def ours_pingpong(m: int, tokens: int, events: int, delays: list[float], dests: list[int]) -> float:
    sim = Simulation(SEED)
    state = [0]
    it, dit = iter(delays), iter(dests)

    class Node:
        __slots__ = ("received",)

        def __init__(self) -> None:
            self.received = 0

        def recv(self, token: int) -> None:
            self.received += 1
            state[0] += 1
            if state[0] == events:
                sim.stop()
            sim.schedule(next(it), nodes[next(dit)].recv, token)

    nodes = [Node() for _ in range(m)]
    for k in range(tokens):
        sim.schedule(next(it), nodes[next(dit)].recv, k)
    t0 = _clock()
    sim.run()
    dt = _clock() - t0
    assert state[0] == events
    return events / dt


def simpy_pingpong(m: int, tokens: int, events: int, delays: list[float], dests: list[int]) -> float:
    env = simpy.Environment()
    Timeout = simpy.Timeout
    state = [0]
    done = env.event()
    it, dit = iter(delays), iter(dests)

    class Node:
        __slots__ = ("received",)

        def __init__(self) -> None:
            self.received = 0

        def recv(self, ev) -> None:
            self.received += 1
            state[0] += 1
            if state[0] == events:
                done.succeed()
            Timeout(env, next(it), value=ev.value).callbacks.append(nodes[next(dit)].recv)

    nodes = [Node() for _ in range(m)]
    for k in range(tokens):
        Timeout(env, next(it), value=k).callbacks.append(nodes[next(dit)].recv)
    t0 = _clock()
    env.run(until=done)
    dt = _clock() - t0
    assert state[0] == events
    return events / dt


# --- WAN pipeline ------------------------------------------------------------------------

WAN_DCS, WAN_RTT_MS, WAN_NIC_BPS, WAN_LINK_BPS = 5, 60.0, 10e9, 1e9


def _wan_inputs(nodes: int, messages: int) -> tuple[list[float], list[int], list[int], list[int]]:
    rng = np.random.default_rng(SEED + 2)
    gaps = rng.exponential(1.0 / 20_000, messages).tolist()  # 20k msgs/s offered
    src = rng.integers(0, nodes, messages).tolist()
    dst = ((np.array(src) + rng.integers(1, nodes, messages)) % nodes).tolist()  # never to itself
    sizes = rng.integers(200, 20_000, messages).tolist()
    return gaps, src, dst, sizes


def ours_wan(nodes: int, messages: int, inputs, out: list[float]) -> float:
    gaps, src, dst, sizes = inputs
    sim = Simulation(SEED)
    net = WanNetwork(sim, WanConfig.uniform(WAN_DCS, rtt_ms=WAN_RTT_MS, nic_bps=WAN_NIC_BPS,
                                            wan_capacity_bps=WAN_LINK_BPS))
    for i in range(nodes):
        net.add_node(i, f"dc{i % WAN_DCS}")
    k = [0]

    def deliver(s, d, payload) -> None:
        out.append(sim.now)

    def source() -> None:
        i = k[0]
        net.send(src[i], dst[i], None, sizes[i], deliver)
        k[0] = i + 1
        if i + 1 < messages:
            sim.schedule(gaps[i + 1], source)

    sim.schedule(gaps[0], source)
    t0 = _clock()
    sim.run()
    dt = _clock() - t0
    assert len(out) == messages
    return messages / dt


def simpy_wan(nodes: int, messages: int, inputs, out: list[float]) -> float:
    gaps, src, dst, sizes = inputs
    env = simpy.Environment()
    nic_out = [simpy.Resource(env) for _ in range(nodes)]
    nic_in = [simpy.Resource(env) for _ in range(nodes)]
    links = [simpy.Resource(env) for _ in range(WAN_DCS * WAN_DCS)]
    prop_wan, prop_lan = WAN_RTT_MS * 1e-3 / 2, 0.5e-3 / 2  # WanConfig's default intra-DC RTT is 0.5 ms

    def message(s: int, d: int, nbytes: int):
        with nic_out[s].request() as req:
            yield req
            yield env.timeout(nbytes * (8.0 / WAN_NIC_BPS))
        a, b = s % WAN_DCS, d % WAN_DCS
        if a != b:
            with links[a * WAN_DCS + b].request() as req:
                yield req
                yield env.timeout(nbytes * (8.0 / WAN_LINK_BPS))
            yield env.timeout(prop_wan)
        else:
            yield env.timeout(prop_lan)
        with nic_in[d].request() as req:
            yield req
            yield env.timeout(nbytes * (8.0 / WAN_NIC_BPS))
        out.append(env.now)

    def source():
        for i in range(messages):
            yield env.timeout(gaps[i])
            env.process(message(src[i], dst[i], sizes[i]))

    env.process(source())
    t0 = _clock()
    env.run()
    dt = _clock() - t0
    assert len(out) == messages
    return messages / dt


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=300_000, help="user events per measurement")
    ap.add_argument("--reps", type=int, default=7, help="interleaved repetitions (median reported)")
    ap.add_argument("--n", type=int, default=1000, help="timer processes (timers workloads)")
    ap.add_argument("--nodes", type=int, default=100, help="nodes M (pingpong)")
    ap.add_argument("--tokens", type=int, default=1000, help="tokens in flight K (pingpong)")
    ap.add_argument("--wan", action="store_true", help="also run the WAN-pipeline comparison")
    ap.add_argument("--wan-nodes", type=int, default=1000, help="nodes (wan)")
    ap.add_argument("--wan-messages", type=int, default=50_000, help="messages per measurement (wan)")
    a = ap.parse_args(argv)

    total = a.events + max(a.n, a.tokens) + 10
    delays = _delays(total)
    dests = np.random.default_rng(SEED + 1).integers(0, a.nodes, total).tolist()

    variants = {
        "timers": [("ours", lambda: ours_timers(a.n, a.events, delays)),
                   ("ours-gc-default", lambda: ours_timers(a.n, a.events, delays, tune_gc=False)),
                   ("simpy-process", lambda: simpy_proc_timers(a.n, a.events, delays)),
                   ("simpy-callback", lambda: simpy_cb_timers(a.n, a.events, delays))],
        "timers-rng": [("ours", lambda: ours_timers(a.n, a.events, None)),
                       ("simpy-process", lambda: simpy_proc_timers(a.n, a.events, None)),
                       ("simpy-callback", lambda: simpy_cb_timers(a.n, a.events, None))],
        "pingpong": [("ours", lambda: ours_pingpong(a.nodes, a.tokens, a.events, delays, dests)),
                     ("simpy-callback", lambda: simpy_pingpong(a.nodes, a.tokens, a.events, delays, dests))],
    }
    print(f"python {platform.python_version()} ({platform.python_implementation()}) on {platform.machine()}, "
          f"simpy {simpy.__version__}, numpy {np.__version__}; timing: process CPU time")
    print(f"events per measurement: {a.events}, reps: {a.reps} (interleaved, median), "
          f"timers N={a.n}, pingpong M={a.nodes} K={a.tokens}")
    if a.wan:
        wan_in = _wan_inputs(a.wan_nodes, a.wan_messages)
        ours_t: list[float] = []
        simpy_t: list[float] = []
        ours_wan(a.wan_nodes, min(a.wan_messages, 2000), _wan_inputs(a.wan_nodes, 2000), ours_t)
        simpy_wan(a.wan_nodes, min(a.wan_messages, 2000), _wan_inputs(a.wan_nodes, 2000), simpy_t)
        # same model, same inputs: same delivery times (up to float rounding)
        assert np.allclose(sorted(ours_t), sorted(simpy_t), rtol=0, atol=1e-9), "WAN models disagree"
        variants["wan"] = [("ours", lambda: ours_wan(a.wan_nodes, a.wan_messages, wan_in, [])),
                           ("simpy-resource", lambda: simpy_wan(a.wan_nodes, a.wan_messages, wan_in, []))]
        print(f"wan: {a.wan_nodes} nodes in {WAN_DCS} DCs, {a.wan_messages} messages per measurement "
              f"(delivery times of ours and SimPy's checked equal); figures are messages/s")
    print("ratio = median(ours) / median(this); paired = median over reps of ours/this in the same rep")
    print(f"{'workload':12s} {'variant':16s} {'per s (median)':>15s} {'min':>11s} {'max':>11s} "
          f"{'ratio':>7s} {'paired':>7s}")
    for wl, runs in variants.items():
        samples: dict[str, list[float]] = {name: [] for name, _ in runs}
        for _ in range(a.reps):
            for name, fn in runs:
                samples[name].append(fn())
        ours = statistics.median(samples["ours"])
        for name, s in samples.items():
            med = statistics.median(s)
            if name == "ours":
                ratio = paired = ""
            else:
                ratio = f"{ours / med:6.2f}x"
                paired = f"{statistics.median(o / x for o, x in zip(samples['ours'], s)):6.2f}x"
            print(f"{wl:12s} {name:16s} {med:15,.0f} {min(s):11,.0f} {max(s):11,.0f} {ratio:>7s} {paired:>7s}")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
