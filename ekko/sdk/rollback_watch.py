"""How a trainer learns that its model was rolled back.

After an automatic rollback (quality reports made the model corrupted) or an
operator's one, the trainer still holds the harmful weights and optimizer state;
its next publishes carry new, unfenced versions built on them.  So it must
learn of the rollback, and soon.  Two ways, both served by every daemon:

* **From acknowledgements.**  A publish acknowledgement carries
  ``"rollbacks": [[id, cut], ...]`` -- the rollback records of that model the
  acknowledging replica holds (at most :data:`MAX_ACK_ROLLBACKS`, oldest first;
  the key is left out when there are none).  The SDK compares them with the
  ones it knows; a new ``(id, cut)`` pair is a new rollback (two replicas that
  decided one incident at once merge their records to the older cut: a changed
  cut under a known id is news too).
* **From a watch.**  ``GET /v1/models/{model}/rollbacks`` answers the same
  records with details (the incident: metric, effect, when), for a trainer that
  is not publishing (:meth:`ekko.sdk.publisher.Publisher.watch_rollbacks`).

A publisher that meets a model for the first time takes the rollbacks that
already exist as known (they happened before it started), and remembers, in
``<state_dir>/<origin>.rollbacks.json``, the ones its training loop was told
of; a restarted trainer is therefore told of rollbacks that happened while it
was away, once.

This module is the SDK side (:class:`RollbackWatch`, :class:`RolledBack`): it runs
on the publisher's event loop and hands events to the training thread.  The
daemon answers both ways from the replica's rollback records (:mod:`ekko.server`).
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from ekko.core.config import MAX_ACK_ROLLBACKS
from ekko.core.errors import EkkoError, UsageError
from ekko.core.fsutil import atomic_write

log = logging.getLogger("ekko.sdk.publisher")

#: rollback keys remembered per model (oldest forgotten first): far more than any
#: replica still gossips, so a forgotten key never comes back as news.
MAX_SEEN_ROLLBACKS = 256
#: events queued for the training loop per publisher (oldest dropped beyond, logged).
MAX_QUEUED_EVENTS = 256
#: seconds a watch or an acknowledgement's detail request may take.
WATCH_REQUEST_TIMEOUT_S = 5.0
#: default seconds between two polls of a rollback watch.
DEFAULT_WATCH_INTERVAL_S = 1.0
_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]")


@dataclass(frozen=True)
class RollbackEvent:
    """One rollback of a model, as the SDK learnt of it.

    Attributes:
        model: the model.
        cut: the cut the replicas went back to.
        rollback_id: the record's id (``auto.<model>.<epoch>`` for an automatic one).
        incident: the incident behind an automatic rollback (``id``, ``metric``,
            ``effect``, ``statistic``, ``detected_by``, ``epoch``), or None (an
            operator's rollback, or details not fetched).
        point: the rollback point (HLC counter): versions up to it are fenced.
        endpoint: the replica that told us.
        state_path: the trainer state this publisher saved with ``cut``, or None.

    Example:
        >>> e = RollbackEvent("ranker", "good", "auto.ranker.1", None, 0, "http://127.0.0.1:7070", None)
        >>> e.key
        'auto.ranker.1@good'
    """

    model: str
    cut: str
    rollback_id: str
    incident: dict[str, Any] | None
    point: int
    endpoint: str
    state_path: str | None = None

    @property
    def key(self) -> str:
        return f"{self.rollback_id}@{self.cut}"


class RolledBack(EkkoError):
    """The model was rolled back to a cut; the training loop should restore to it.

    Raised by the training thread's next :meth:`ekko.sdk.tracking.Tracker.publish`,
    :meth:`ekko.sdk.tracking.Tracker.cut` or :meth:`ekko.sdk.publisher.Publisher.check_rollbacks`
    once per rollback (unless a callback was registered with
    :meth:`ekko.sdk.publisher.Publisher.on_rollback`).  Raised by a publish *after* its rows
    were acknowledged, or before anything was collected: nothing is lost either way.

    Attributes:
        model, cut, rollback_id, incident, point, endpoint, state_path: see
            :class:`RollbackEvent`.
        ack: the publish's :class:`ekko.sdk.ack.PublishAck` when raised after it was
            acknowledged (its rows are in), None when raised before anything was sent.
        event: the :class:`RollbackEvent`.

    Example::

        try:
            tracker.publish()
        except RolledBack as rb:
            print(f"{rb.model} rolled back to {rb.cut} ({rb.incident})")
            tracker.restore(rb)       # module + optimizer back to the cut, resume
    """

    def __init__(self, event: RollbackEvent) -> None:
        why = (f" after incident {event.incident.get('id')} ({event.incident.get('metric')})"
               if event.incident else "")
        super().__init__(f"model {event.model!r} was rolled back to cut {event.cut!r} "
                         f"(record {event.rollback_id}){why}")
        self.event = event
        self.model = event.model
        self.cut = event.cut
        self.rollback_id = event.rollback_id
        self.incident = event.incident
        self.point = event.point
        self.endpoint = event.endpoint
        self.state_path = event.state_path
        #: the acknowledgement of the publish that raised this after its rows were
        #: acknowledged; None when raised before anything was sent.
        self.ack: Any = None


def _safe(name: str) -> str:
    return _UNSAFE.sub("_", name)


@dataclass
class RollbackWatch:
    """The rollbacks a publisher knows, and the events waiting for its training loop.

    Thread-safety: :meth:`known`/:meth:`add` run on the publisher's I/O loop,
    :meth:`take` on the training thread; a lock guards the shared state.

    Args:
        path: the JSON file remembering delivered (or pre-existing) rollbacks per model.
        durable: fsync its writes.
        lookup_state: ``(model, cut) -> path or None`` of trainer state saved with a cut.

    Example:
        >>> import tempfile
        >>> w = RollbackWatch(Path(tempfile.mkdtemp()) / "t.rollbacks.json", durable=False)
        >>> w.prime("m", ["auto.m.1@old"])          # existed before we met the model
        >>> w.add(RollbackEvent("m", "old", "auto.m.1", None, 0, "ep")), w.add(RollbackEvent("m", "c", "r2", None, 0, "ep"))
        (False, True)
        >>> w.take("m").cut, w.take("m")
        ('c', None)
    """

    path: Path
    durable: bool = True
    lookup_state: Callable[[str, str], str | None] | None = None
    _seen: dict[str, list[str]] = field(default_factory=dict)      # persisted: delivered/pre-existing
    _queued: set[str] = field(default_factory=set)                  # model/key queued, not delivered
    _events: deque = field(default_factory=deque)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    callbacks: list[Callable[[RollbackEvent], Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.path.exists():
            try:
                raw = json.loads(self.path.read_text())
                self._seen = {str(m): [str(k) for k in keys] for m, keys in raw.get("seen", {}).items()}
            except (OSError, ValueError, AttributeError) as e:
                raise UsageError(f"cannot read {self.path}: {e}") from None

    # -- state ----------------------------------------------------------------------------
    def primed(self, model: str) -> bool:
        """True when this publisher already knows which rollbacks of ``model`` are old news."""
        with self._lock:
            return model in self._seen

    def prime(self, model: str, keys: list[str]) -> None:
        """Take ``keys`` (rollbacks existing when we first met ``model``) as known."""
        with self._lock:
            if model in self._seen:
                return
            self._seen[model] = list(keys)[-MAX_SEEN_ROLLBACKS:]
            self._save_locked()

    def unknown(self, model: str, keys: list[str]) -> list[str]:
        """The keys neither delivered nor queued (news)."""
        with self._lock:
            seen = set(self._seen.get(model, ()))
            return [k for k in keys if k not in seen and f"{model}/{k}" not in self._queued]

    def add(self, event: RollbackEvent) -> bool:
        """Queue an event for the training loop; False when it was known already."""
        if self.lookup_state is not None and event.state_path is None:
            try:
                path = self.lookup_state(event.model, event.cut)
            except Exception:  # a broken index must not lose the event
                path = None
            if path is not None:
                event = RollbackEvent(event.model, event.cut, event.rollback_id, event.incident, event.point,
                                      event.endpoint, path)
        with self._lock:
            qk = f"{event.model}/{event.key}"
            if event.key in self._seen.get(event.model, ()) or qk in self._queued:
                return False
            self._queued.add(qk)
            self._events.append(event)
            while len(self._events) > MAX_QUEUED_EVENTS:
                old = self._events.popleft()
                self._queued.discard(f"{old.model}/{old.key}")
                log.error("dropped rollback event %s of %s: the training loop is not taking them", old.key,
                          old.model)
        log.warning("model %s was rolled back to cut %s (record %s)", event.model, event.cut, event.rollback_id)
        return True

    def pending(self, model: str | None = None) -> list[RollbackEvent]:
        with self._lock:
            return [e for e in self._events if model is None or e.model == model]

    def take(self, model: str | None = None) -> RollbackEvent | None:
        """The oldest undelivered event (of ``model``), marked delivered (persisted)."""
        with self._lock:
            for e in self._events:
                if model is None or e.model == model:
                    self._events.remove(e)
                    self._queued.discard(f"{e.model}/{e.key}")
                    seen = self._seen.setdefault(e.model, [])
                    seen.append(e.key)
                    del seen[:-MAX_SEEN_ROLLBACKS]
                    self._save_locked()
                    return e
        return None

    def _save_locked(self) -> None:
        data = json.dumps({"seen": self._seen}, separators=(",", ":")).encode()
        atomic_write(self.path, data, self.durable)

    # -- parsing --------------------------------------------------------------------------
    @staticmethod
    def keys_of_ack(answer: Mapping[str, Any]) -> list[tuple[str, str]] | None:
        """The ``[[id, cut], ...]`` of an acknowledgement; [] when absent, None when malformed."""
        raw = answer.get("rollbacks", [])
        if not isinstance(raw, list) or len(raw) > MAX_ACK_ROLLBACKS:
            return None
        out = []
        for item in raw:
            if not (isinstance(item, list) and len(item) == 2 and all(isinstance(x, str) for x in item)):
                return None
            out.append((item[0], item[1]))
        return out

    @staticmethod
    def events_of_view(view: Any, endpoint: str) -> list[RollbackEvent]:
        """Events from a ``GET /v1/models/{m}/rollbacks`` answer (malformed entries skipped)."""
        if not isinstance(view, dict) or not isinstance(view.get("rollbacks"), list):
            return []
        model = view.get("model")
        out = []
        for r in view["rollbacks"][-MAX_ACK_ROLLBACKS:]:
            if not isinstance(r, dict) or not isinstance(r.get("id"), str) or not isinstance(r.get("cut"), str):
                continue
            inc = r.get("incident") if isinstance(r.get("incident"), dict) else None
            point = r.get("point") if isinstance(r.get("point"), int) else 0
            out.append(RollbackEvent(str(model), r["cut"], r["id"], inc, point, endpoint))
        return out


def state_file(directory: Path, origin: str) -> Path:
    """Where a publisher remembers the rollbacks it knows: ``<dir>/<origin>.rollbacks.json``."""
    return Path(directory) / f"{_safe(origin)}.rollbacks.json"
