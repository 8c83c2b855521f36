"""Trainer state saved with a cut, so that a rolled-back trainer can resume from it.

A cut (:mod:`rollback.cuts`) names a restore point of the *replicas*; a trainer
rolled back to it must also go back -- its module's weights and its optimizer's
state (Adagrad sums, Adam moments) -- or its next publishes rebuild the harmful
model.  :meth:`ekko.sdk.tracking.Tracker.cut` (or :meth:`ekko.sdk.publisher.Publisher.cut` with
``state=``) therefore

1. publishes what the module changed and waits until every publish so far is
   acknowledged (so the state saved is exactly what the replicas hold),
2. saves ``{"module": state_dict, "optimizer": state_dict, ...}`` with
   :func:`save_checkpoint` (``torch.save`` to a temporary file, fsync, rename,
   directory fsync: a crash leaves the old file or the new one, whole),
3. takes the cut at a replica whose knowledge covers the publisher's
   acknowledged chain heads (the ``covers`` field of the ``CUT`` frame: a
   replica that has not yet heard of some acknowledged frame answers 503 and
   the publisher retries or fails over), and
4. records the cut and its file in an index, ``<state_dir>/<origin>.cuts/<model>/index.json``,
   so that a later process with the same state directory finds it.

Files go to ``<state_dir>/<origin>.cuts/<model>/<cut>.pt`` unless the trainer
names a path.  The index keeps the newest :data:`MAX_INDEXED_CUTS` cuts per model;
older files in the default directory are deleted (files at paths the trainer
named are left alone).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ekko.core.errors import UsageError
from ekko.core.fsutil import atomic_write, atomic_write_with
from ekko.core.spec import check_name
from ekko.sdk.rollback_watch import RollbackEvent, RolledBack

#: checkpoint format written by :func:`save_checkpoint` (bumped on incompatible changes).
CHECKPOINT_FORMAT = 1
#: cuts with saved trainer state remembered per model; beyond it the oldest are forgotten
#: (and their files deleted when they live in the default directory).  More than a
#: replica keeps named cuts (rollback.cuts.DEFAULT_MAX_NAMED), so every cut a rollback
#: can still choose has its state.
MAX_INDEXED_CUTS = 32
_SAFE = re.compile(r"[^A-Za-z0-9_.\-]")


@dataclass(frozen=True)
class TrainerCut:
    """A cut with the trainer state saved for it.

    Attributes:
        model: the model.
        name: the cut's name (for ``Client.rollback`` / ``ekko rollback --to``).
        path: the checkpoint file (``torch.load``-able: ``module``, ``optimizer``, ``extra``).
        taken_at: Unix time the state was saved.

    Example:
        >>> TrainerCut("ranker", "day-1", "/tmp/s/trainer-0.cuts/ranker/day-1.pt", 0.0).name
        'day-1'
    """

    model: str
    name: str
    path: str
    taken_at: float


def default_cut_name() -> str:
    """A cut name from the wall clock (``cut-<unix ms>``), as a daemon names an unnamed cut."""
    return f"cut-{int(time.time() * 1000)}"


def save_checkpoint(path: Path, payload: dict[str, Any], durable: bool = True) -> None:
    """``torch.save(payload)`` atomically (:func:`ekko.core.fsutil.atomic_write_with`): a
    temporary file in the same directory, fsync, rename over ``path``, fsync of the
    directory (``durable``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_with(path, lambda f: torch.save(payload, f), durable)


def load_checkpoint(path: str | Path, model: str, cut: str) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`; :class:`UsageError` when it is
    missing, unreadable or saved for another model or cut."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"the trainer state of cut {cut!r} of {model!r} is missing: no file {p}")
    try:
        # weights_only: a checkpoint holds tensors and plain containers; never unpickle code.
        data = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a damaged file
        raise UsageError(f"cannot read the trainer state {p} of cut {cut!r}: {type(e).__name__}: {e}") from None
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT or "module" not in data:
        raise UsageError(f"{p} is not an ekko trainer checkpoint (format {CHECKPOINT_FORMAT})")
    if data.get("model") != model or data.get("cut") != cut:
        raise UsageError(f"{p} holds the state of cut {data.get('cut')!r} of {data.get('model')!r}, "
                         f"not of cut {cut!r} of {model!r}")
    return data


def check_module_state(module: torch.nn.Module, state: dict[str, Any], what: str) -> None:
    """Raise :class:`UsageError` unless ``state`` loads into ``module`` exactly (same keys,
    shapes, dtypes) -- checked *before* anything is copied, so a mismatch changes nothing."""
    own = module.state_dict()
    if not isinstance(state, dict) or set(state) != set(own):
        missing = sorted(set(own) - set(state or {}))[:5]
        extra = sorted(set(state or {}) - set(own))[:5]
        raise UsageError(f"{what} does not fit the module: missing {missing}, unexpected {extra}")
    for k, v in own.items():
        s = state[k]
        if not isinstance(s, torch.Tensor) or s.shape != v.shape or s.dtype != v.dtype:
            raise UsageError(f"{what}: {k} is {getattr(s, 'dtype', type(s).__name__)} "
                             f"{tuple(getattr(s, 'shape', ()))}, the module's {v.dtype} {tuple(v.shape)}")


def check_optimizer_state(optimizer: torch.optim.Optimizer, state: Any, what: str) -> None:
    """Raise :class:`UsageError` unless ``state`` fits ``optimizer``'s parameter groups."""
    groups = state.get("param_groups") if isinstance(state, dict) else None
    if not isinstance(groups, list) or len(groups) != len(optimizer.param_groups) or any(
            len(g.get("params", ())) != len(o["params"]) for g, o in zip(groups, optimizer.param_groups)):
        raise UsageError(f"{what}: the saved optimizer state does not fit this optimizer's parameter groups")


def restore_module(module: torch.nn.Module, optimizer: torch.optim.Optimizer | None, data: dict[str, Any],
                   what: str) -> None:
    """Load a checkpoint's module (and optimizer) state in place; checked first, so bad
    input changes nothing.  Gradients are dropped (they belong to the abandoned state)."""
    check_module_state(module, data["module"], what)
    opt_state = data.get("optimizer")
    if optimizer is not None:
        if opt_state is None:
            raise UsageError(f"{what} was saved without optimizer state")
        check_optimizer_state(optimizer, opt_state, what)
    with torch.no_grad():
        module.load_state_dict(data["module"], strict=True)
    if optimizer is not None:
        optimizer.load_state_dict(opt_state)
    for p in module.parameters():
        p.grad = None


class CutStateIndex:
    """Which cuts of which model have trainer state, and where (one publisher origin).

    Args:
        directory: the publisher's state directory.
        origin: the publisher's name.
        durable: fsync the index and checkpoints.

    Example:
        >>> import tempfile
        >>> idx = CutStateIndex(Path(tempfile.mkdtemp()), "trainer-0")
        >>> p = idx.default_path("ranker", "good"); p.name
        'good.pt'
        >>> idx.record("ranker", TrainerCut("ranker", "good", str(p), 1.0), session="s", gen=1)
        >>> idx.lookup("ranker", "good")["gen"], idx.lookup("ranker", "nope")
        (1, None)
    """

    def __init__(self, directory: Path, origin: str, durable: bool = True) -> None:
        self.root = Path(directory) / f"{_SAFE.sub('_', origin)}.cuts"
        self.durable = durable

    def model_dir(self, model: str) -> Path:
        return self.root / _SAFE.sub("_", model)

    def default_path(self, model: str, cut: str) -> Path:
        check_name("cut", cut)
        return self.model_dir(model) / f"{cut}.pt"

    def _index_path(self, model: str) -> Path:
        return self.model_dir(model) / "index.json"

    def entries(self, model: str) -> dict[str, dict[str, Any]]:
        p = self._index_path(model)
        if not p.exists():
            return {}
        try:
            raw = json.loads(p.read_text())
        except (OSError, ValueError) as e:
            raise UsageError(f"cannot read the cut index {p}: {e}") from None
        return raw.get("cuts", {}) if isinstance(raw, dict) else {}

    def lookup(self, model: str, cut: str) -> dict[str, Any] | None:
        return self.entries(model).get(cut)

    def path_of(self, model: str, cut: str) -> str | None:
        e = self.lookup(model, cut)
        return e.get("path") if e else None

    def record(self, model: str, tc: TrainerCut, session: str, gen: int) -> None:
        """Add a cut (newest last); forget the oldest beyond :data:`MAX_INDEXED_CUTS`."""
        entries = self.entries(model)
        entries.pop(tc.name, None)
        entries[tc.name] = {"path": tc.path, "taken_at": tc.taken_at, "session": session, "gen": gen}
        dropped = list(entries)[:-MAX_INDEXED_CUTS]
        for name in dropped:
            old = entries.pop(name)
            path = Path(old.get("path", ""))
            if path.parent == self.model_dir(model) and path.suffix == ".pt":
                try:
                    path.unlink()
                except OSError:
                    pass
        self.model_dir(model).mkdir(parents=True, exist_ok=True)
        atomic_write(self._index_path(model), json.dumps({"cuts": entries}, indent=1).encode(), self.durable)


# ---------------------------------------------------------------------------- cut and restore

def _module_and_optimizer(state: Any) -> tuple[torch.nn.Module, torch.optim.Optimizer | None]:
    if isinstance(state, torch.nn.Module):
        return state, None
    if isinstance(state, (tuple, list)) and len(state) == 2 and isinstance(state[0], torch.nn.Module) and (
            state[1] is None or isinstance(state[1], torch.optim.Optimizer)):
        return state[0], state[1]
    raise UsageError("state must be a Tracker, a torch.nn.Module or a (module, optimizer) pair")


def save_and_cut(publisher: Any, model: str, module: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                 name: str | None, path: str | Path | None, extra: Any, session: str = "", gen: int = 0
                 ) -> TrainerCut:
    """Save the trainer state, then take the cut (the caller has had every publish acknowledged).

    A failed cut removes the file and raises: nothing is recorded.
    """
    core = publisher._core
    name = check_name("cut", name) if name is not None else default_cut_name()
    target = Path(path).expanduser() if path is not None else core.cut_states.default_path(model, name)
    now = time.time()
    payload = {"format": CHECKPOINT_FORMAT, "model": model, "cut": name, "origin": core.origin_name,
               "saved_at": now, "module": module.state_dict(),
               "optimizer": optimizer.state_dict() if optimizer is not None else None, "extra": extra}
    save_checkpoint(target, payload, core._state.durable)
    try:
        got = publisher._call(core.cut(model, name))
    except BaseException:
        try:
            target.unlink()
        except OSError:
            pass
        raise
    tc = TrainerCut(model, got, str(target), now)
    core.cut_states.record(model, tc, session, gen)
    return tc


def cut_with_state(publisher: Any, model: str, state: Any, name: str | None, path: str | Path | None,
                   extra: Any) -> TrainerCut:
    """:meth:`ekko.sdk.publisher.Publisher.cut` with ``state=`` a module or ``(module, optimizer)``
    (a Tracker's own :meth:`~ekko.sdk.tracking.Tracker.cut` does the same for its module)."""
    module, optimizer = _module_and_optimizer(state)
    publisher._deliver_rollbacks(model)
    publisher.flush()   # every publish so far acknowledged: the cut holds what we save
    return save_and_cut(publisher, model, module, optimizer, name, path, extra)


def resolve_cut(publisher: Any, model: str, cut: Any) -> tuple[str, dict[str, Any]]:
    """``cut`` (a name, a RolledBack/RollbackEvent or a TrainerCut) -> (name, index entry);
    :class:`UsageError` when no trainer state was saved with it."""
    if isinstance(cut, (RolledBack, RollbackEvent)):
        if cut.model != model:
            raise UsageError(f"that rollback is of model {cut.model!r}, not {model!r}")
        name = cut.cut
    elif isinstance(cut, TrainerCut):
        name = cut.name
    elif isinstance(cut, str):
        name = cut
    else:
        raise UsageError("cut must be a cut name, a RolledBack or a TrainerCut")
    entry = publisher._core.cut_states.lookup(model, name)
    if entry is None:
        known = list(publisher._core.cut_states.entries(model))[-8:]
        raise UsageError(f"no trainer state was saved with cut {name!r} of {model!r} by this publisher "
                         f"(newest cuts with state: {known or 'none'}); take cuts with Tracker.cut()")
    return name, entry


def restore_state(publisher: Any, model: str, cut: Any, state: Any) -> TrainerCut:
    """:meth:`ekko.sdk.publisher.Publisher.restore` into a module or ``(module, optimizer)``
    (a Tracker's own :meth:`~ekko.sdk.tracking.Tracker.restore` also resets what it publishes)."""
    module, optimizer = _module_and_optimizer(state)
    name, entry = resolve_cut(publisher, model, cut)
    data = load_checkpoint(entry["path"], model, name)
    restore_module(module, optimizer, data, f"the trainer state of cut {name!r}")
    return TrainerCut(model, name, entry["path"], float(entry.get("taken_at", 0.0)))
