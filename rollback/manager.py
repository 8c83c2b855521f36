"""The model-state manager: quality samples in, model states and rollback decisions out.

One :class:`ModelStateManager` per replica (sans-IO: time is an argument).  Per
model it

* feeds online-vs-baseline quality samples to a :class:`~rollback.detector.QualityDetector`
  and keeps the model's state (``warmup`` -> ``healthy`` <-> ``uncertain`` ->
  ``corrupted``, the detector's states and hysteresis; see its module docstring);
* remembers every cut it learns of, with the state the model was in when the cut
  became known here, so that it can pick a cut taken *while healthy*;
* estimates when a degradation began: the last window at which the alarming
  metric's CUSUM statistic was zero (Page's change-point estimate: the statistic
  starts its final climb there).  A cut known later than ``onset - margin`` may
  already hold harmful rows although the model still looked healthy, so it is
  never chosen, and it is marked *tainted* so that no later incident picks it;
* on ``corrupted`` opens an :class:`Incident` and, with ``auto_rollback``, returns a
  :class:`RollbackDecision`: roll back to the newest eligible cut (known while
  healthy or in warm-up, not tainted, older than the onset minus the margin, and
  accepted by the caller's ``eligible`` filter, e.g. "still restorable").

State transitions (the model's state is the worst over its metrics)::

    warmup --(warm-up windows done)--> healthy
    healthy --(CUSUM >= h_warn)--> uncertain --(CUSUM <= h_clear)--> healthy
    healthy/uncertain --(CUSUM >= h_alarm)--> corrupted   [incident opened, rollback decided]
    corrupted --(rollback applied here: rollback_applied)--> healthy   [CUSUM zeroed]
    corrupted --(no eligible cut: stays until CUSUM <= h_clear or an operator rolls back)

One rollback per incident cluster-wide: incidents are numbered per model by an
*epoch* (incidents this replica has seen for the model, replicated with the
rollback records), and an automatic rollback's record id is ``auto.<model>.<epoch>``.
Replicas that detect at the same time build records with the same id; two such
records merge deterministically (:func:`merge_rollback_records`: the older cut,
the greater rollback point per origin), so every replica ends with the same fence
and the same restored state whatever order the records arrive in.  A replica that
learns of an incident of the current epoch before detecting it itself adopts it
instead of opening its own.

Example:
    >>> import random
    >>> from rollback.detector import DetectorConfig
    >>> rng = random.Random(3)
    >>> mgr = ModelStateManager("r1", ManagerConfig(detector=DetectorConfig(warmup_windows=20)))
    >>> def window(t, ctr):
    ...     mgr.observe("m", "baseline", "ctr", rng.gauss(0.04, 0.0004), 10_000, now=t)
    ...     return mgr.observe("m", "online", "ctr", rng.gauss(ctr, 0.0004), 10_000, now=t)
    >>> _ = [window(float(t), 0.04) for t in range(60)]
    >>> mgr.note_cut("m", "good", now=60.0)
    >>> decisions = [d for d in (window(float(t), 0.038) for t in range(100, 200)) if d]
    >>> decisions[0].cut, decisions[0].incident.metric, mgr.state("m").value
    ('good', 'ctr', 'corrupted')
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

from ekko.core.errors import ProtocolError, UsageError
from rollback.detector import DetectorConfig, ModelState, QualityDetector

#: incidents kept per model (oldest dropped first).
MAX_INCIDENTS = 32
#: cuts remembered per model (oldest dropped first); the node keeps at most its cut retention.
MAX_TRACKED_CUTS = 256
#: longest metric / model name accepted in a quality sample.
MAX_NAME_LEN = 64
#: quality sample counts above this are refused (a typo, not a window of traffic).
MAX_SAMPLE_COUNT = 1e15
#: states a cut may be known in to be a rollback target.
_GOOD_STATES = (ModelState.HEALTHY, ModelState.WARMUP)


@dataclass(frozen=True, slots=True)
class ManagerConfig:
    """Policy of :class:`ModelStateManager`.

    Attributes:
        detector: the anomaly detector's configuration.
        auto_rollback: on ``corrupted`` decide a rollback (False: record the incident only).
        onset_margin_windows: a cut must be known at least this many quality windows
            (mean interval between the alarming metric's windows) before the estimated
            onset.  The CUSUM change point is only known to a window or two: a window
            partly filled with harmful traffic may still leave the statistic at zero.
    """

    detector: DetectorConfig = field(default_factory=DetectorConfig)
    auto_rollback: bool = True
    onset_margin_windows: float = 2.0

    def __post_init__(self) -> None:
        if not (isinstance(self.onset_margin_windows, (int, float)) and self.onset_margin_windows >= 0):
            raise UsageError("onset_margin_windows must be >= 0")


@dataclass(slots=True)
class Incident:
    """A model found corrupted, and what was done about it.

    Times are seconds on the clock of the replica that holds this copy
    (``detected_at`` and ``onset_at`` on the detecting replica's clock, as sent).

    Attributes:
        id: ``<model>.<epoch>``: the same on every replica for one incident.
        model, epoch: the model and its incident number.
        detected_by: node id of the replica whose detector raised it.
        detected_at: when its detector moved to corrupted.
        metric: the metric that alarmed; ``statistic`` its CUSUM, ``effect`` the
            relative degradation (0.05 = online 5 % worse than baseline).
        onset_at: estimated start of the degradation.
        cut: the cut rolled back to (None: no eligible cut, nothing restored).
        rollback_id: id of the rollback record (``auto.<model>.<epoch>``).
        received_at: when this replica learnt of the incident (its own clock).
        restored_at: when this replica finished restoring (its own clock).
    """

    id: str
    model: str
    epoch: int
    detected_by: str
    detected_at: float
    metric: str
    statistic: float
    effect: float
    onset_at: float
    cut: str | None
    rollback_id: str | None
    received_at: float
    restored_at: float | None = None

    @property
    def restore_s(self) -> float | None:
        """Seconds from learning of the incident to the end of the restore here."""
        return None if self.restored_at is None else self.restored_at - self.received_at

    def to_wire(self) -> dict[str, Any]:
        return {"id": self.id, "model": self.model, "epoch": self.epoch, "by": self.detected_by,
                "at": self.detected_at, "metric": self.metric, "stat": self.statistic, "effect": self.effect,
                "onset": self.onset_at, "cut": self.cut, "rb": self.rollback_id}

    @classmethod
    def from_wire(cls, data: object, received_at: float) -> "Incident":
        """Decode :meth:`to_wire`'s form; bad input raises :class:`ProtocolError`."""
        if not isinstance(data, dict):
            raise ProtocolError("incident must be a map", "bad_incident")
        try:
            inc = cls(data["id"], data["model"], data["epoch"], data["by"], data["at"], data["metric"],
                      data["stat"], data["effect"], data["onset"], data["cut"], data["rb"], received_at)
        except KeyError as e:
            raise ProtocolError(f"incident without {e}", "bad_incident") from None
        for name in ("id", "model", "detected_by", "metric"):
            v = getattr(inc, name)
            if not isinstance(v, str) or not 0 < len(v) <= 2 * MAX_NAME_LEN + 24:
                raise ProtocolError(f"bad incident {name}", "bad_incident")
        for name in ("cut", "rollback_id"):
            v = getattr(inc, name)
            if v is not None and (not isinstance(v, str) or len(v) > 2 * MAX_NAME_LEN + 24):
                raise ProtocolError(f"bad incident {name}", "bad_incident")
        if not isinstance(inc.epoch, int) or isinstance(inc.epoch, bool) or not 0 < inc.epoch < 1 << 32:
            raise ProtocolError("bad incident epoch", "bad_incident")
        for name in ("detected_at", "statistic", "effect", "onset_at"):
            v = getattr(inc, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ProtocolError(f"bad incident {name}", "bad_incident")
        if inc.id != incident_id(inc.model, inc.epoch):
            raise ProtocolError("incident id does not match its model and epoch", "bad_incident")
        return inc

    def view(self) -> dict[str, Any]:
        """JSON-ready status entry."""
        return {"id": self.id, "model": self.model, "epoch": self.epoch, "detected_by": self.detected_by,
                "detected_at": self.detected_at, "metric": self.metric, "statistic": self.statistic,
                "effect": self.effect, "onset_at": self.onset_at, "cut": self.cut, "rollback_id": self.rollback_id,
                "received_at": self.received_at, "restored_at": self.restored_at, "restore_s": self.restore_s}


@dataclass(frozen=True, slots=True)
class RollbackDecision:
    """Roll ``model`` back to ``cut`` under record id ``rollback_id`` (see :class:`Incident`)."""

    model: str
    cut: str
    rollback_id: str
    incident: Incident


def incident_id(model: str, epoch: int) -> str:
    return f"{model}.{epoch}"


def auto_rollback_id(model: str, epoch: int) -> str:
    """The record id every replica uses for the automatic rollback of one incident."""
    return f"auto.{model}.{epoch}"


def cut_order_key(cut_wire: dict[str, Any]) -> tuple[int, str]:
    """Total order of cuts for merging: greatest counter in its knowledge, then name.

    HLC counters follow wall time, so the cut that covers less is the older one;
    the name breaks ties identically on every replica.
    """
    top = 0
    for entry in cut_wire.get("knowledge", ()):
        k = entry[-1] if isinstance(entry, (list, tuple)) and entry else ()
        for pair in k if isinstance(k, (list, tuple)) else ():
            if isinstance(pair, (list, tuple)) and len(pair) == 2 and isinstance(pair[1], int):
                top = max(top, pair[1])
    return top, str(cut_wire.get("name", ""))


def merge_rollback_records(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Join two rollback records with the same id: the older cut, the greater point per origin.

    Commutative, associative and idempotent, so replicas that build the record of one
    incident concurrently converge to one fence and one restored state.

    Example:
        >>> a = {"id": "x", "model": "m", "cut": {"name": "c1", "knowledge": []}, "upper": [[1, 10]]}
        >>> b = {"id": "x", "model": "m", "cut": {"name": "c0", "knowledge": []}, "upper": [[1, 7], [2, 3]]}
        >>> m = merge_rollback_records(a, b)
        >>> m["cut"]["name"], m["upper"]
        ('c0', [[1, 10], [2, 3]])
    """
    # Origin 0 is the wildcard (every origin a record does not name), so an origin one
    # record names and the other covers only by its wildcard takes the greater of the two.
    points = [{o: c for o, c in rec.get("upper", ())} for rec in (a, b)]
    upper: dict[int, int] = {}
    for o in set().union(*points):
        upper[o] = max(p.get(o, p.get(0, 0)) for p in points)
    cut = min(a["cut"], b["cut"], key=cut_order_key)
    out = dict(a)
    out["cut"] = cut
    out["upper"] = [[o, upper[o]] for o in sorted(upper)]
    incs = [r["incident"] for r in (a, b) if isinstance(r.get("incident"), dict)]
    if incs:
        # The incident copy that names the chosen cut (deterministic: ties by detector id).
        named = [i for i in incs if i.get("cut") == cut.get("name")] or incs
        out["incident"] = min(named, key=lambda i: str(i.get("by", "")))
    return out


@dataclass(slots=True)
class _CutNote:
    name: str
    known_at: float
    state: ModelState
    tainted: bool = False


@dataclass(slots=True)
class _ModelInfo:
    cuts: list[_CutNote] = field(default_factory=list)
    incidents: list[Incident] = field(default_factory=list)
    epoch: int = 0  # greatest incident epoch seen for this model
    # per metric: last time its CUSUM was zero, last window time, EWMA window interval
    last_zero: dict[str, float] = field(default_factory=dict)
    last_window: dict[str, float] = field(default_factory=dict)
    interval: dict[str, float] = field(default_factory=dict)
    corrupted: bool = False  # a corrupted episode is open (incident recorded)


class ModelStateManager:
    """Per-replica model states, cut health, incidents and automatic rollback decisions.

    Args:
        node_id: this replica (named in the incidents it raises).
        config: a :class:`ManagerConfig`.

    See the module docstring for the policy and an example.
    """

    def __init__(self, node_id: str, config: ManagerConfig | None = None) -> None:
        self.node_id = node_id
        self.config = config or ManagerConfig()
        self.detector = QualityDetector(self.config.detector)
        self._models: dict[str, _ModelInfo] = {}
        self.counters: dict[str, int] = {"samples": 0, "incidents": 0, "auto_rollbacks": 0,
                                         "incidents_without_cut": 0}

    def _info(self, model: str) -> _ModelInfo:
        m = self._models.get(model)
        if m is None:
            m = self._models[model] = _ModelInfo()
        return m

    # -- inputs -------------------------------------------------------------------------
    def note_cut(self, model: str, name: str, now: float) -> None:
        """A cut of ``model`` became known here (taken here or received from a peer)."""
        m = self._info(model)
        if any(c.name == name for c in m.cuts):
            return
        state = self.detector.state(model)
        # A cut learnt of during a corrupted episode is never a target, whatever the detector says now.
        m.cuts.append(_CutNote(name, now, state, tainted=m.corrupted))
        if len(m.cuts) > MAX_TRACKED_CUTS:
            del m.cuts[0]

    def observe(self, model: str, variant: str, metric: str, value: float, count: float, now: float,
                eligible: Callable[[str], bool] | None = None) -> RollbackDecision | None:
        """Take one quality sample; returns a rollback decision when the model just became corrupted.

        Raises :class:`UsageError` on a bad sample (nothing changes).
        """
        check_sample(model, variant, metric, value, count)
        change = self.detector.observe(model, variant, metric, value, count, now)
        self.counters["samples"] += 1
        m = self._info(model)
        stat = self.detector.statistic(model, metric)
        if stat is not None:
            last = m.last_window.get(metric)
            if last is None or last != now:
                if last is not None:
                    dt = now - last
                    prev = m.interval.get(metric)
                    m.interval[metric] = dt if prev is None else prev + 0.2 * (dt - prev)
                m.last_window[metric] = now
            if stat <= 0.0:
                m.last_zero[metric] = now
        if change is None or change.new is not ModelState.CORRUPTED or m.corrupted:
            if change is not None and change.new in (ModelState.HEALTHY,) and m.corrupted:
                m.corrupted = False  # decayed without a rollback (no eligible cut, or manual handling)
            return None
        m.corrupted = True
        margin = self.config.onset_margin_windows * m.interval.get(metric, 0.0)
        onset = m.last_zero.get(metric, change.at)
        for c in m.cuts:
            if c.known_at > onset - margin:
                c.tainted = True
        target = None
        for c in reversed(m.cuts):
            if c.state in _GOOD_STATES and not c.tainted and (eligible is None or eligible(c.name)):
                target = c.name
                break
        m.epoch += 1
        rid = auto_rollback_id(model, m.epoch) if (target is not None and self.config.auto_rollback) else None
        inc = Incident(incident_id(model, m.epoch), model, m.epoch, self.node_id, change.at, metric,
                       change.statistic, change.effect, onset, target, rid, received_at=now)
        self._record(m, inc)
        self.counters["incidents"] += 1
        if rid is None:
            self.counters["incidents_without_cut"] += int(target is None)
            return None
        self.counters["auto_rollbacks"] += 1
        return RollbackDecision(model, target, rid, inc)

    def adopt(self, incident: Incident) -> bool:
        """An incident learnt from a peer (a rollback record or gossip); True when new here.

        Raises the model's epoch to the incident's, so this replica does not open a second
        incident for the same corruption, and taints cuts learnt during it.
        """
        m = self._info(incident.model)
        for i, cur in enumerate(m.incidents):
            if cur.id == incident.id:
                # Records of one incident merged (another detector, maybe an older cut):
                # follow the merged copy, so every replica shows the same; keep our times.
                incident.received_at, incident.restored_at = cur.received_at, cur.restored_at
                m.incidents[i] = incident
                return False
        m.epoch = max(m.epoch, incident.epoch)
        m.corrupted = True
        for c in m.cuts:
            if c.name != incident.cut and c.known_at >= incident.received_at:
                c.tainted = True
        self._record(m, incident)
        return True

    def rollback_applied(self, model: str, rollback_id: str, cut: str, now: float) -> Incident | None:
        """The rollback of an incident finished restoring here: close it, zero the detector.

        The model is then healthy again (its statistic restarts at zero: the windows
        after the restore measure the restored parameters).
        """
        m = self._info(model)
        inc = next((i for i in reversed(m.incidents) if i.rollback_id == rollback_id), None)
        if inc is None and m.corrupted and m.incidents and m.incidents[-1].rollback_id is None:
            # An operator's rollback closes an incident that found no cut of its own.
            inc = m.incidents[-1]
            inc.rollback_id = rollback_id
        if inc is not None and inc.restored_at is None:
            inc.restored_at = now
            inc.cut = cut
        self.detector.reset(model)
        m.corrupted = False
        m.last_zero.clear()
        return inc

    def forget(self, model: str) -> None:
        self._models.pop(model, None)
        self.detector.forget(model)

    @staticmethod
    def _record(m: _ModelInfo, inc: Incident) -> None:
        m.incidents.append(inc)
        if len(m.incidents) > MAX_INCIDENTS:
            del m.incidents[0]

    # -- outputs ------------------------------------------------------------------------
    def state(self, model: str) -> ModelState:
        """The model's state here; a corrupted episode with its rollback pending stays corrupted."""
        st = self.detector.state(model)
        m = self._models.get(model)
        if m is not None and m.corrupted and st.severity < ModelState.CORRUPTED.severity:
            return ModelState.CORRUPTED
        return st

    def epoch(self, model: str) -> int:
        m = self._models.get(model)
        return m.epoch if m is not None else 0

    def incidents(self, model: str | None = None) -> list[Incident]:
        if model is not None:
            m = self._models.get(model)
            return list(m.incidents) if m is not None else []
        return [i for m in self._models.values() for i in m.incidents]

    def cut_health(self, model: str) -> list[dict[str, Any]]:
        m = self._models.get(model)
        return [{"name": c.name, "known_at": c.known_at, "state": c.state.value, "tainted": c.tainted}
                for c in (m.cuts if m else [])]

    def snapshot(self) -> dict[str, Any]:
        """JSON-ready: per model its state, detector view, incidents and cut health."""
        det = self.detector.snapshot()
        out: dict[str, Any] = {}
        for name in sorted(set(det) | set(self._models)):
            out[name] = {"state": self.state(name).value, "epoch": self.epoch(name),
                         "detector": det.get(name, {}).get("metrics", {}),
                         "incidents": [i.view() for i in self.incidents(name)],
                         "cuts": self.cut_health(name)}
        return out


def check_sample(model: Any, variant: Any, metric: Any, value: Any, count: Any) -> None:
    """Validate one quality sample's fields (types, ranges); :class:`UsageError` when bad."""
    for name, v in (("model", model), ("metric", metric)):
        if not isinstance(v, str) or not 0 < len(v) <= MAX_NAME_LEN:
            raise UsageError(f"quality sample {name} must be a string of 1..{MAX_NAME_LEN} characters")
    if variant not in ("online", "baseline"):
        raise UsageError(f"quality sample variant must be 'online' or 'baseline', got {variant!r:.40}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UsageError(f"quality sample value must be a finite number, got {value!r:.40}")
    if (isinstance(count, bool) or not isinstance(count, (int, float)) or not math.isfinite(count)
            or not 0 < count <= MAX_SAMPLE_COUNT):
        raise UsageError(f"quality sample count must be a number in (0, {MAX_SAMPLE_COUNT:g}], got {count!r:.40}")
