"""An in-memory network for tests: real frames, simulated time, injected faults.

:class:`MemNet` drives any sans-IO node (an object with ``receive(frame, now)``,
``tick(now)``, ``next_deadline()``, ``drain()``, ``node_id``, ``dc`` and
``address``) under a simulated clock.  Every message is encoded and decoded
with the real codec, so tests exercise the wire format.  Faults: loss,
duplication, delay jitter (which reorders), partitions, killed nodes.  All
randomness comes from one seeded generator, so a seed replays exactly.

It is deliberately small; the WAN simulator in :mod:`simulator` models
bandwidth, queueing and propagation for experiments.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Protocol

from ekko.core.codec import Keyring, decode_frame, encode_frame
from ekko.core.errors import ProtocolError


class SansIONode(Protocol):
    node_id: str
    dc: str
    address: str

    def receive(self, frame: Any, now: float, src_address: str = "") -> None: ...
    def tick(self, now: float) -> None: ...
    def next_deadline(self) -> float: ...
    def drain(self) -> list[Any]: ...


@dataclass
class Faults:
    """Fault knobs (probabilities per message; seconds).

    Attributes:
        loss: probability a message is dropped.
        duplicate: probability a message is delivered twice.
        latency: base one-way latency inside a DC.
        wan_latency: base one-way latency between DCs.
        jitter: extra uniform random delay in [0, jitter]; reorders messages.
    """

    loss: float = 0.0
    duplicate: float = 0.0
    latency: float = 0.0005
    wan_latency: float = 0.04
    jitter: float = 0.0


@dataclass
class MemNet:
    """Simulated-time network of sans-IO nodes.

    Example:
        >>> net = MemNet(seed=1)
        >>> net.now
        0.0
    """

    seed: int = 0
    faults: Faults = field(default_factory=Faults)
    keyring: Keyring | None = None
    now: float = 0.0
    nodes: dict[str, SansIONode] = field(default_factory=dict)
    by_address: dict[str, str] = field(default_factory=dict)
    dead: set[str] = field(default_factory=set)
    groups: list[set[str]] | None = None
    bytes_between: Counter = field(default_factory=Counter)   # (src_dc, dst_dc) -> bytes
    messages: Counter = field(default_factory=Counter)
    rejected: Counter = field(default_factory=Counter)
    wan_by_type: Counter = field(default_factory=Counter)
    bytes_to: Counter = field(default_factory=Counter)        # destination node id -> bytes

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self._heap: list[tuple[float, int, str, Any]] = []
        self._seq = itertools.count()
        self._timer_at: dict[str, float] = {}

    # -- topology and faults ------------------------------------------------------------
    def add(self, node: SansIONode) -> None:
        self.nodes[node.node_id] = node
        self.by_address[node.address] = node.node_id
        self.dead.discard(node.node_id)
        self._arm(node)

    def kill(self, node_id: str) -> None:
        """Crash a node: it stops sending, receiving and ticking."""
        self.dead.add(node_id)

    def replace(self, node: SansIONode) -> None:
        """Bring a node back (typically a fresh object restored from its data dir)."""
        self.add(node)

    def partition(self, groups: Iterable[Iterable[str]]) -> None:
        """Split the network; a group may list node ids or DC names."""
        self.groups = [set(g) for g in groups]

    def heal(self) -> None:
        self.groups = None

    def _side(self, node: SansIONode) -> int:
        assert self.groups is not None
        for i, g in enumerate(self.groups):
            if node.node_id in g or node.dc in g:
                return i
        return -1

    def _connected(self, a: SansIONode, b: SansIONode) -> bool:
        return self.groups is None or self._side(a) == self._side(b)

    # -- loop ------------------------------------------------------------------------------
    def _arm(self, node: SansIONode) -> None:
        t = max(self.now, node.next_deadline())
        if self._timer_at.get(node.node_id) != t:
            self._timer_at[node.node_id] = t
            heapq.heappush(self._heap, (t, next(self._seq), "tick", node.node_id))

    def _flush(self, node: SansIONode) -> None:
        for out in node.drain():
            dst_id = out.dst or self.by_address.get(out.address, "")
            dst = self.nodes.get(dst_id)
            frame = encode_frame(out.msg_type, out.body, self.keyring)
            nbytes = len(frame) + getattr(out, "extra_bytes", 0)
            self.messages[out.msg_type.name] += 1
            if dst is None:
                continue
            self.bytes_between[(node.dc, dst.dc)] += nbytes
            self.bytes_to[dst_id] += nbytes
            if node.dc != dst.dc:
                self.wan_by_type[out.msg_type.name + ("/" + out.body["k"] if "k" in out.body else "")] += nbytes
            if node.node_id in self.dead or dst_id in self.dead or not self._connected(node, dst):
                continue
            copies = 0 if self.rng.random() < self.faults.loss else 1
            if copies and self.rng.random() < self.faults.duplicate:
                copies = 2
            for _ in range(copies):
                base = self.faults.latency if node.dc == dst.dc else self.faults.wan_latency
                t = self.now + base + self.rng.uniform(0, self.faults.jitter)
                heapq.heappush(self._heap, (t, next(self._seq), "msg", (dst_id, frame, node.address)))

    def call(self, node_id: str, fn: str, *args: Any, **kw: Any) -> Any:
        """Call a node's local API at the current time and send what it produced."""
        node = self.nodes[node_id]
        result = getattr(node, fn)(*args, **kw)
        self._flush(node)
        self._arm(node)
        return result

    def run(self, until: float) -> None:
        """Process events up to simulated time ``until``."""
        while self._heap and self._heap[0][0] <= until:
            t, _, kind, payload = heapq.heappop(self._heap)
            self.now = t
            if kind == "tick":
                node = self.nodes.get(payload)
                if node is None or self._timer_at.get(payload) != t:
                    continue
                del self._timer_at[payload]
                if payload in self.dead:
                    continue
                node.tick(t)
            else:
                dst_id, frame, src_addr = payload
                node = self.nodes.get(dst_id)
                if node is None or dst_id in self.dead:
                    continue
                try:
                    node.receive(decode_frame(frame, self.keyring), t, src_addr)
                except ProtocolError as e:
                    self.rejected[e.reason] += 1
            self._flush(node)
            if payload not in self.dead and getattr(node, "node_id", None) not in self.dead:
                self._arm(node)
        self.now = max(self.now, until)

    def run_until(self, predicate, timeout: float, step: float = 0.05) -> bool:
        """Advance in ``step``s until ``predicate()`` holds or ``timeout`` simulated seconds pass."""
        end = self.now + timeout
        while self.now < end:
            if predicate():
                return True
            self.run(self.now + step)
        return predicate()

    def wan_bytes(self) -> int:
        return sum(b for (a, c), b in self.bytes_between.items() if a != c)
