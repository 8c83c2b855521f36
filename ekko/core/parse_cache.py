"""Parse a push payload once for all the replicas it fans out to (the simulator).

In the simulator a gateway's push reaches hundreds of replicas as *one* decoded
``deltas`` list (the bytes are only encoded for their size), so every receiver
would decode and validate the same arrays again: at 10,000 replicas that was a
fifth of a push's cost.  A :class:`ParseCache` shared by the simulated nodes keeps
the parsed result of the last few payloads.

A hit needs the very same list object (the entry keeps it alive, so its ``id``
cannot be reused by another object), the same companion objects (the ``prio`` and
``links`` lists of the frame) and the same table specs and values mode at the
receiver; anything else is a miss and parses afresh.  Parsed arrays are made
read-only, so a receiver that tried to change a shared array in place would fail
loudly rather than corrupt the others.  The daemon uses none: each request is
decoded afresh there and nothing would ever hit.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np

#: payloads kept (a gateway's fan-out sends one payload to many peers in a row).
PARSE_CACHE_ENTRIES = 64


class ParseCache:
    """Parsed push payloads keyed by the identity of their decoded ``deltas`` list.

    Example:
        >>> c = ParseCache()
        >>> raw, links = [{"m": "m"}], None
        >>> c.get(raw, (None, links), specs_ok=lambda specs: True) is None
        True
        >>> c.put(raw, (None, links), specs=(), value="parsed")
        >>> c.get(raw, (None, links), specs_ok=lambda specs: True)
        'parsed'
        >>> c.get([{"m": "m"}], (None, links), specs_ok=lambda specs: True) is None   # another list
        True
    """

    def __init__(self, entries: int = PARSE_CACHE_ENTRIES) -> None:
        self.entries = entries
        self._d: OrderedDict[int, tuple[Any, tuple[Any, ...], tuple[Any, ...], Any]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, raw: Any, companions: tuple[Any, ...], specs_ok: Any) -> Any:
        """The value stored for this very ``raw`` object and companions, or None.
        ``specs_ok(specs)`` says whether the receiver resolves the same table specs."""
        e = self._d.get(id(raw))
        if e is not None and e[0] is raw and len(e[1]) == len(companions):
            for a, b in zip(e[1], companions):
                if a is not b:
                    break
            else:
                if specs_ok(e[2]):
                    self.hits += 1
                    return e[3]
        self.misses += 1
        return None

    def put(self, raw: Any, companions: tuple[Any, ...], specs: tuple[Any, ...], value: Any) -> None:
        self._d[id(raw)] = (raw, companions, specs, value)
        self._d.move_to_end(id(raw))
        while len(self._d) > self.entries:
            self._d.popitem(last=False)


def freeze(*arrays: np.ndarray | None) -> None:
    """Make arrays read-only (shared between receivers: nobody may write them)."""
    for a in arrays:
        if a is not None:
            a.flags.writeable = False
