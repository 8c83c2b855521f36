"""Track the rows a training loop changes, and publish exactly those.

A model's tables (see :func:`spec_from_module`): every ``nn.Embedding`` and
``nn.EmbeddingBag`` weight is an embedding table (one row per embedding), and so is
every table of a TorchRec ``EmbeddingBagCollection`` / ``EmbeddingCollection``
(named after its config; :mod:`ekko.sdk.torchrec_tables`); a
:class:`~ekko.sdk.hashed_embedding.HashedEmbedding` is a hashed table (64-bit feature
ids; its rows go out by slot with their keys); every other parameter
is a dense table, flattened and cut into rows of :data:`DENSE_CHUNK` elements (the
last row zero-padded).

How :class:`Tracker` finds what changed -- without diffing whole tables:

* **Which rows may have changed.**  A forward pre-hook on each embedding module
  records the rows its input looks up (for ``EmbeddingBag`` the flat ``input``:
  ``offsets`` only group those rows into bags and ``per_sample_weights`` only
  scale them, so neither adds rows).  A gradient hook on each embedding weight
  adds the rows its gradient touches -- the indices of a sparse gradient, the
  non-zero rows of a dense one -- which catches a weight used outside its
  module's ``forward`` (tied weights).  Both run before ``optimizer.step()``.
* **What they held at the last publish.**  The first time a row is recorded
  after a publish, its current value is saved: nothing has moved it since that
  publish (it was not looked up, so it got no gradient).  Memory is therefore
  ``O(rows touched since the last publish x dim)``, plus a one-byte-per-row
  mask that makes "first time" an O(batch) check (1/(4*dim) of a float32
  table).  Everything stays on the weight's device (CPU or CUDA); only the
  changed rows are copied to the host.
* **What to send.**  ``publish()`` compares each recorded row's current bits with
  its saved bits and sends the rows that differ (bitwise, so ``-0.0`` vs
  ``0.0`` counts and replicas end bit-identical), with impact = L2 norm of the
  change (the scheduler's magnitude).  A row whose value did not move (a zero
  gradient, ``padding_idx``) is not sent.
* **Dense parameters** are small: a shadow copy of each (as chunk rows) is kept;
  chunks whose bits differ from the shadow are sent with impact = the chunk's
  change norm, and the shadow takes their new values.
* **The first publish** (``publish_initial=True``) sends every row that is not
  all-zero bits, since replicas start from zeros; pass ``False`` when the
  replicas already hold this module's weights.

Limits, stated plainly: rows moved by the optimizer *without* a gradient in
the interval -- momentum, Adam-style moments on dense gradients, weight decay --
are not seen (sparse gradients with SGD/Adagrad/SparseAdam, the usual setup
for large embedding tables, move only looked-up rows).  Pass ``optimizer=`` to
get a warning for such configurations, or call :meth:`Tracker.mark` for rows
changed by other means.  Call ``publish()`` after ``optimizer.step()``: rows
recorded but not yet moved when it runs are forgotten.  Buffers (e.g. batch-norm
statistics) are not parameters and are not tracked.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import math
import re
import threading
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

from ekko.core.config import MAX_PUBLISH_ROWS
from ekko.core.errors import UsageError
from ekko.core.spec import ModelSpec, TableSpec
from ekko.core.key_index import EMPTY_KEY
from ekko.sdk.ack import PublishAck, PublishError
from ekko.sdk.hashed_embedding import HashedEmbedding
from ekko.sdk.prepare import ROW_OVERHEAD_BYTES, PreparedPublish, SlotKeys
from ekko.sdk.torchrec_tables import torchrec_tables
from ekko.sdk.trainer_state import TrainerCut, load_checkpoint, resolve_cut, restore_module, save_and_cut

#: elements per row of a dense-parameter table: a flattened parameter is cut into
#: chunks of this many elements, each one versioned row (small enough that a
#: partly-changed parameter resends little, large enough that per-row overhead --
#: 8-byte id, 8-byte version -- stays under 1% of float32 payload).
DENSE_CHUNK = 1024
#: bytes of rows per publish call a tracker makes; a bigger update (the initial
#: full publish of a large table) goes out as several frames, in order.
TRACK_FRAME_BYTES = 8 << 20
#: longest table name a spec accepts.
_MAX_NAME = 64
_BAD_CHARS = re.compile(r"[^A-Za-z0-9_.\-]")
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
                torch.float64: "float64"}
#: integer views used to compare values bit for bit.
_BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
         torch.float64: torch.int64}
_EMBEDDING_TYPES = (nn.Embedding, nn.EmbeddingBag)


# ---------------------------------------------------------------------------- layout

@dataclass(frozen=True)
class TableLayout:
    """Where one table of a module-derived model comes from.

    Attributes:
        name: table name in the spec.
        kind: ``"embedding"`` or ``"dense"``.
        param_name: the parameter's qualified name in the module.
        rows / dim: the table's shape.
        numel: elements of the parameter (dense: ``rows * dim`` less the padding).
        dtype: the table dtype name.

    Example:
        >>> lay, param, mods = module_layout(nn.Linear(3, 2))[0]
        >>> lay.name, lay.kind, lay.rows, lay.dim, lay.numel
        ('weight', 'dense', 1, 6, 6)
    """

    name: str
    kind: str
    param_name: str
    rows: int
    dim: int
    numel: int
    dtype: str
    #: the parameter's shape (recorded in the spec of a dense table).
    shape: tuple[int, ...] = ()
    #: a hashed table's spec (a :class:`HashedEmbedding`'s: keys, shards, eviction), else None.
    hashed: TableSpec | None = None

    def table_spec(self) -> TableSpec:
        """The table, with its layout (the parameter's name; a dense one's shape)."""
        if self.hashed is not None:
            h = self.hashed
            return TableSpec(self.name, dim=self.dim, dtype=self.dtype, shards=h.shards, param=self.param_name,
                             keys="int64", capacity=self.rows, eviction=h.eviction)
        dense = self.kind == "dense"
        return TableSpec(self.name, rows=self.rows, dim=self.dim, dtype=self.dtype, dense=dense,
                         param=self.param_name, shape=self.shape if dense else ())


def _table_name(qualname: str) -> str:
    name = _BAD_CHARS.sub("_", qualname.replace(".", "_"))
    if not name[:1].isalnum():
        name = "t" + name
    if len(name) > _MAX_NAME:
        # Keep names readable and unique: a prefix and a hash of the full name.
        name = name[:_MAX_NAME - 9] + "-" + hashlib.blake2b(qualname.encode(), digest_size=4).hexdigest()
    return name


def _dtype_name(p: torch.Tensor, what: str) -> str:
    try:
        return _DTYPE_NAMES[p.dtype]
    except KeyError:
        raise UsageError(f"{what}: dtype {p.dtype} is not supported ({sorted(_DTYPE_NAMES.values())})") from None


def module_layout(module: nn.Module) -> list[tuple[TableLayout, nn.Parameter, list[nn.Module]]]:
    """The tables of a module: ``(layout, parameter, embedding modules using it)`` each.

    TorchRec collection tables come first (named after their table config, see
    :mod:`ekko.sdk.torchrec_tables`), then other embedding tables (named after their
    module, dots -> ``_``), then dense parameters (named after the parameter).  A
    weight shared by several embedding modules is one table.
    """
    if not isinstance(module, nn.Module):
        raise UsageError("expected a torch.nn.Module")
    out: list[tuple[TableLayout, nn.Parameter, list[nn.Module]]] = []
    by_param: dict[int, list[nn.Module]] = {}
    names: set[str] = set()

    def add(layout: TableLayout, p: nn.Parameter, mods: list[nn.Module]) -> None:
        if layout.name in names:
            raise UsageError(f"two tables map to the name {layout.name!r}; rename a module or parameter")
        names.add(layout.name)
        out.append((layout, p, mods))

    for t in torchrec_tables(module):
        if id(t.weight) in by_param:               # one weight in two collections: one table
            by_param[id(t.weight)].append(t.lookup)
            continue
        by_param[id(t.weight)] = [t.lookup]
        add(TableLayout(_table_name(t.name), "embedding", t.param_name, t.rows, t.dim, t.rows * t.dim,
                        _dtype_name(t.weight, t.param_name)), t.weight, by_param[id(t.weight)])
    for mname, mod in module.named_modules():
        if isinstance(mod, HashedEmbedding):
            w = mod.weight
            if id(w) in by_param:
                raise UsageError(f"{mname}: a HashedEmbedding's weight may not be shared")
            by_param[id(w)] = [mod]
            pname = f"{mname}.weight" if mname else "weight"
            add(TableLayout(_table_name(mname or "weight"), "embedding", pname, mod.capacity, mod.dim,
                            mod.capacity * mod.dim, _dtype_name(w, pname), hashed=mod.spec), w, [mod])
            continue
        if not isinstance(mod, _EMBEDDING_TYPES):
            continue
        w = mod.weight
        if id(w) in by_param:
            if not any(m is mod for m in by_param[id(w)]):   # a TorchRec table's own lookup is in already
                by_param[id(w)].append(mod)
            continue
        mods = [mod]
        by_param[id(w)] = mods
        rows, dim = int(w.shape[0]), int(w.shape[1])
        pname = f"{mname}.weight" if mname else "weight"
        add(TableLayout(_table_name(mname or "weight"), "embedding", pname, rows, dim, rows * dim,
                        _dtype_name(w, pname)), w, mods)
    for pname, p in module.named_parameters():
        if id(p) in by_param:
            continue
        numel = p.numel()
        if numel == 0:
            continue
        dim = min(DENSE_CHUNK, numel)
        add(TableLayout(_table_name(pname), "dense", pname, math.ceil(numel / dim), dim, numel,
                        _dtype_name(p, pname), tuple(int(n) for n in p.shape)), p, [])
    if not out:
        raise UsageError("the module has no parameters to publish")
    return out


def spec_from_module(module: nn.Module, model: str, traffic_share: float = 1.0) -> ModelSpec:
    """A :class:`ModelSpec` with one table per embedding weight and dense parameter.

    Example:
        >>> from torch import nn
        >>> m = nn.ModuleDict({"user": nn.Embedding(100, 8), "mlp": nn.Linear(8, 1)})
        >>> [(t.name, t.rows, t.dim, t.dense) for t in spec_from_module(m, "ranker").tables]
        [('user', 100, 8, False), ('mlp_weight', 1, 8, True), ('mlp_bias', 1, 1, True)]
    """
    return ModelSpec(model, tuple(lay.table_spec() for lay, _, _ in module_layout(module)), traffic_share)


def dense_rows(param: torch.Tensor, rows: int, dim: int) -> torch.Tensor:
    """A parameter as its dense table: flattened, zero-padded to ``rows x dim`` (a copy)."""
    flat = param.detach().reshape(-1)
    pad = rows * dim - flat.numel()
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.reshape(rows, dim).clone()


def unflatten_dense(rows: torch.Tensor, shape: Iterable[int]) -> torch.Tensor:
    """The inverse of :func:`dense_rows`: a dense table's rows back to the parameter shape.

    Example:
        >>> p = torch.arange(6.0).reshape(2, 3)
        >>> torch.equal(unflatten_dense(dense_rows(p, 2, 4), (2, 3)), p)
        True
    """
    shape = tuple(shape)
    return rows.reshape(-1)[:math.prod(shape)].reshape(shape)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(_BITS[t.dtype])


def _norm(x: torch.Tensor) -> torch.Tensor:
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    n = x.to(acc).norm(dim=1)
    # Impact travels as float32; a float64 table's huge change saturates, never inf.
    return torch.nan_to_num(n, nan=0.0, posinf=float(torch.finfo(torch.float32).max)).clamp(
        max=float(torch.finfo(torch.float32).max)).to(torch.float32)


# ---------------------------------------------------------------------------- state

@dataclass(eq=False)
class _Embedding:
    layout: TableLayout
    param: nn.Parameter
    full: bool                               # the whole table is still to be sent (initial publish)
    mask: torch.Tensor | None = None         # rows recorded since the last publish
    ids: list[torch.Tensor] = field(default_factory=list)
    before: list[torch.Tensor] = field(default_factory=list)   # their values at the last publish
    restored: bool = False                   # ids may repeat (a failed publish put rows back)
    # The tracker's cut generation of each row's last publish (int32), from the first cut on:
    # the rows published since a cut are those to send again after a restore to it.
    pub_gen: torch.Tensor | None = None
    #: a hashed table's module: its ``keys`` name the key of each slot sent.
    hashed: HashedEmbedding | None = None

    def clear(self) -> None:
        if self.mask is not None and self.ids:
            self.mask[torch.cat(self.ids)] = False
        self.ids, self.before, self.restored = [], [], False


@dataclass(eq=False)
class _Dense:
    layout: TableLayout
    param: nn.Parameter
    shadow: torch.Tensor                     # the table as of the last publish (zeros: nothing sent)


@dataclass(frozen=True)
class TrackedPublish:
    """What one :meth:`Tracker.publish` sent.

    Attributes:
        ids: per table, the rows sent (dense tables: chunk indices), int64.
        impact: per table, the L2 norm of each row's change, float32.
        acks: the acknowledgements, one per frame (several for a large update).

    Example:
        >>> r = TrackedPublish({"emb": np.array([4, 9])}, {"emb": np.array([0.5, 1.0], np.float32)}, ())
        >>> r.rows
        2
    """

    ids: dict[str, np.ndarray]
    impact: dict[str, np.ndarray]
    acks: tuple[PublishAck, ...]

    @property
    def rows(self) -> int:
        return sum(len(v) for v in self.ids.values())


@dataclass(eq=False)
class _Part:
    """Rows of one table collected for sending, and how to put them back on failure."""

    table: str
    state: _Embedding | _Dense
    ids: torch.Tensor
    cur: torch.Tensor
    before: torch.Tensor | None              # None: zeros (the initial publish)
    impact: torch.Tensor
    keys: torch.Tensor | None = None         # a hashed table's key of each slot, as collected


class Tracker:
    """Records the rows a module's training changes and publishes exactly those.

    Args:
        module: the model being trained.
        model: the model name on the cluster.
        publisher: a :class:`ekko.sdk.publisher.Publisher` (not imported here: the
            publisher builds trackers, :meth:`~ekko.sdk.publisher.Publisher.track`).
        publish_initial: the first publish sends the whole module (replicas start
            from zeros); False when they already hold these weights.
        scan_dense_grads: also scan dense embedding gradients for non-zero rows
            (finds tied weights used outside the module's forward; costs one pass
            over the gradient per backward).
        register: register the module's spec with the cluster now.
        traffic_share: the model's share of inference traffic (spec field).
        optimizer: optional; warns when it moves rows without gradients.
        max_frame_bytes: bytes of rows per publish call.

    See the module doc for how rows are found.  Create it after the module is on
    its device (its saved rows live there).  Call :meth:`publish` from the thread
    that trains (after ``optimizer.step()``).

    Example::

        tracker = publisher.track(model, model="ranker", optimizer=opt)
        for batch in loader:
            loss_fn(model(batch)).backward(); opt.step(); opt.zero_grad()
            tracker.publish()          # or tracker.publish_async() to overlap I/O
    """

    def __init__(self, module: nn.Module, model: str, publisher: Any, *, publish_initial: bool = True,
                 scan_dense_grads: bool = True, register: bool = True, traffic_share: float = 1.0,
                 optimizer: torch.optim.Optimizer | None = None, max_frame_bytes: int = TRACK_FRAME_BYTES) -> None:
        self.module = module
        self.optimizer = optimizer
        # Cuts with trainer state taken through this tracker (see cut/restore).
        self._session = uuid.uuid4().hex
        self._gen = 0
        self._cut_gen: dict[str, int] = {}
        self.model = model
        self.publisher = publisher
        self.scan_dense_grads = scan_dense_grads
        self.max_frame_bytes = int(max_frame_bytes)
        if self.max_frame_bytes <= 0:
            raise UsageError("max_frame_bytes must be > 0")
        layout = module_layout(module)
        self.spec = ModelSpec(model, tuple(lay.table_spec() for lay, _, _ in layout), traffic_share)
        self._emb: dict[str, _Embedding] = {}
        self._dense: dict[str, _Dense] = {}
        self._lock = threading.Lock()
        self._hooks: list[Any] = []
        self._send_lock: asyncio.Lock | None = None   # created on the publisher's loop
        for lay, p, mods in layout:
            if lay.kind == "embedding":
                st = _Embedding(lay, p, full=publish_initial)
                self._emb[lay.name] = st
                for mod in mods:
                    if isinstance(mod, HashedEmbedding):
                        # Its input is keys: it reports the slots it reads and the slots it
                        # is about to give to new keys (their old values are saved first).
                        st.hashed = mod
                        touch = self._slot_hook(st)
                        mod.on_lookup.append(touch)
                        mod.on_rebind.append(touch)
                        self._hooks.append(_Unhook(mod, touch))
                        continue
                    self._hooks.append(mod.register_forward_pre_hook(self._pre_hook(st), with_kwargs=True))
                if p.requires_grad:
                    self._hooks.append(p.register_hook(self._grad_hook(st)))
            else:
                shadow = (torch.zeros(lay.rows, lay.dim, dtype=p.dtype, device=p.device) if publish_initial
                          else dense_rows(p, lay.rows, lay.dim))
                self._dense[lay.name] = _Dense(lay, p, shadow)
        if optimizer is not None:
            self._check_optimizer(optimizer)
        if register:
            publisher.register(self.spec)

    # -- lifecycle ------------------------------------------------------------------------
    def close(self) -> None:
        """Remove the hooks."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- recording ------------------------------------------------------------------------
    def _pre_hook(self, st: _Embedding):
        def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            idx = args[0] if args else kwargs.get("input")
            if isinstance(idx, torch.Tensor):
                self._touch(st, idx)
        return hook

    def _slot_hook(self, st: _Embedding):
        def hook(slots: torch.Tensor) -> None:
            self._touch(st, slots)
        return hook

    def _grad_hook(self, st: _Embedding):
        def hook(grad: torch.Tensor) -> None:
            if grad.is_sparse:
                self._touch(st, grad._indices()[0])
            elif self.scan_dense_grads and grad.dim() == 2:
                self._touch(st, grad.ne(0).any(dim=1).nonzero().squeeze(1))
        return hook

    def _touch(self, st: _Embedding, idx: torch.Tensor) -> None:
        if st.full or idx.numel() == 0:
            return  # the whole table goes out anyway
        w = st.param
        with torch.no_grad():
            u = torch.unique(idx.detach().reshape(-1).to(device=w.device, dtype=torch.long))
            if int(u[0]) < 0 or int(u[-1]) >= w.shape[0]:
                return  # out of range: the embedding's own forward reports it
            with self._lock:
                if st.mask is None:
                    st.mask = torch.zeros(w.shape[0], dtype=torch.bool, device=w.device)
                new = u[~st.mask[u]]
                if new.numel():
                    st.mask[new] = True
                    st.ids.append(new)
                    st.before.append(w.detach().index_select(0, new))

    def mark(self, table: str, ids: Any) -> None:
        """Record rows changed outside the tracked paths (before they change)."""
        st = self._emb.get(table)
        if st is None:
            raise UsageError(f"{table!r} is not an embedding table of {self.model} "
                             f"(tables: {sorted(self._emb)})")
        self._touch(st, torch.as_tensor(ids))

    def pending_rows(self) -> dict[str, int]:
        """Rows recorded since the last publish, per embedding table (-1: the whole table)."""
        with self._lock:
            return {n: (-1 if st.full else sum(len(i) for i in st.ids)) for n, st in self._emb.items()}

    def _check_optimizer(self, opt: torch.optim.Optimizer) -> None:
        tracked = {id(st.param) for st in self._emb.values()}
        for group in opt.param_groups:
            if not any(id(p) in tracked for p in group["params"]):
                continue
            why = [k for k in ("momentum", "weight_decay") if group.get(k)]
            if "betas" in group and not isinstance(opt, torch.optim.SparseAdam):
                why.append("moment estimates (betas)")
            if why:
                warnings.warn(f"{type(opt).__name__} moves embedding rows without a gradient ({', '.join(why)}); "
                              "the tracker sends only rows looked up since the last publish", stacklevel=3)

    # -- collecting -----------------------------------------------------------------------
    def _collect(self) -> list[_Part]:
        parts: list[_Part] = []
        with self._lock, torch.no_grad():
            for name, st in self._emb.items():
                w = st.param.detach()
                if st.full:
                    held = _bits(w).ne(0).any(dim=1)
                    if st.hashed is not None:   # slots that hold no key are nobody's rows yet
                        held &= st.hashed.keys != EMPTY_KEY
                    ids = held.nonzero().squeeze(1)
                    cur = w.index_select(0, ids)
                    before = None
                    impact = _norm(cur)
                    st.full = False
                    st.clear()
                    if st.pub_gen is not None:
                        st.pub_gen[ids] = self._gen
                elif st.ids:
                    ids, before = torch.cat(st.ids), torch.cat(st.before)
                    if st.restored:
                        ids, before = _first_per_row(ids, before)
                    st.clear()
                    cur = w.index_select(0, ids)
                    changed = _bits(cur).ne(_bits(before)).any(dim=1)
                    ids, cur, before = ids[changed], cur[changed], before[changed]
                    impact = _change_norm(cur, before)
                    if st.pub_gen is not None:
                        st.pub_gen[ids] = self._gen
                else:
                    continue
                if ids.numel():
                    keys = None
                    if st.hashed is not None:
                        keys = st.hashed.keys.index_select(0, ids)
                        held = keys != EMPTY_KEY   # a slot emptied by a restore: nothing to send
                        ids, cur, impact, keys = ids[held], cur[held], impact[held], keys[held]
                        before = None if before is None else before[held]
                    parts.append(_Part(name, st, ids, cur, before, impact, keys))
            for name, dt in self._dense.items():
                lay = dt.layout
                cur = dense_rows(dt.param, lay.rows, lay.dim)
                changed = _bits(cur).ne(_bits(dt.shadow)).any(dim=1)
                ids = changed.nonzero().squeeze(1)
                if ids.numel():
                    before = dt.shadow.index_select(0, ids)
                    rows = cur.index_select(0, ids)
                    dt.shadow.index_copy_(0, ids, rows)
                    parts.append(_Part(name, dt, ids, rows, before, _change_norm(rows, before)))
        return parts

    def _restore(self, parts: list[_Part]) -> None:
        """Put rows that were not delivered back, so that the next publish sends them."""
        with self._lock, torch.no_grad():
            for p in parts:
                before = p.before if p.before is not None else torch.zeros_like(p.cur)
                if isinstance(p.state, _Dense):
                    p.state.shadow.index_copy_(0, p.ids, before)
                    continue
                st = p.state
                if st.mask is None:
                    st.mask = torch.zeros(st.param.shape[0], dtype=torch.bool, device=st.param.device)
                st.mask[p.ids] = True
                # First, so that the older saved value wins over one recorded since.
                st.ids.insert(0, p.ids)
                st.before.insert(0, before)
                st.restored = True

    def _batches(self, parts: list[_Part]) -> list[list[_Part]]:
        """Cut the parts into publish calls of at most max_frame_bytes (and MAX_PUBLISH_ROWS)."""
        batches: list[list[_Part]] = [[]]
        budget, rows_left = self.max_frame_bytes, MAX_PUBLISH_ROWS
        for p in parts:
            per_row = self.spec.table(p.table).row_bytes + ROW_OVERHEAD_BYTES
            start, n = 0, int(p.ids.numel())
            while start < n:
                fit = min(n - start, rows_left, budget // per_row)
                if fit == 0:
                    if batches[-1]:
                        batches.append([])
                        budget, rows_left = self.max_frame_bytes, MAX_PUBLISH_ROWS
                        continue
                    fit = 1  # a row wider than the budget goes alone
                sl = slice(start, start + fit)
                batches[-1].append(_Part(p.table, p.state, p.ids[sl], p.cur[sl],
                                         None if p.before is None else p.before[sl], p.impact[sl],
                                         None if p.keys is None else p.keys[sl]))
                start += fit
                budget -= fit * per_row
                rows_left -= fit
        return [b for b in batches if b]

    # -- cuts and restores (ekko.sdk.trainer_state) -----------------------------------------------
    def cut(self, name: str | None = None, *, optimizer: torch.optim.Optimizer | None = None,
            path: str | Path | None = None, extra: Any = None) -> TrainerCut:
        """Take a cut of the model with the trainer's state saved for it.

        Publishes what changed and waits until every publish so far is acknowledged,
        saves the module's and the optimizer's ``state_dict`` (``optimizer`` defaults
        to the one given to the tracker; ``extra``: anything ``torch.save`` can write
        with plain types, e.g. the data position) at ``path`` (default
        ``<state_dir>/<origin>.cuts/<model>/<cut>.pt``), then takes the cut at a
        replica holding all of it.  Returns the :class:`~ekko.sdk.trainer_state.TrainerCut`.

        Raises :class:`~ekko.sdk.rollback_watch.RolledBack` first when a rollback is
        waiting for the loop (restore before cutting again).
        """
        self.publish()
        opt = optimizer if optimizer is not None else self.optimizer
        tc = save_and_cut(self.publisher, self.model, self.module, opt, name, path, extra,
                          session=self._session, gen=self._gen + 1)
        with self._lock:
            self._gen += 1
            self._cut_gen[tc.name] = self._gen
            for st in self._emb.values():
                if st.pub_gen is None:
                    st.pub_gen = torch.zeros(st.param.shape[0], dtype=torch.int32, device=st.param.device)
        return tc

    def restore(self, cut: Any, *, optimizer: torch.optim.Optimizer | None = None,
                publish: bool = True) -> TrainerCut:
        """Bring the module and optimizer back to the state saved with ``cut`` (a name, a
        :class:`~ekko.sdk.rollback_watch.RolledBack`, or a TrainerCut) and reset what the
        next publish sends, so training continues from the cut with new versions.

        The replicas hold the cut's values after a rollback, except for rows this
        trainer published after the rollback point (before it learnt of the rollback:
        those versions are not fenced).  So the next publish sends, with the cut's
        values, every row published since the cut (known from this tracker's own
        cuts; for a cut taken by another process: every row) and every dense chunk,
        plus whatever training changes from here.  With ``publish`` (the default) that
        publish happens at once, so the replicas hold the cut's values again without
        waiting for the loop's next step.  Checked before anything changes:
        an unknown cut, a missing or foreign file, or state that does not fit the
        module raises :class:`UsageError` and leaves module, optimizer and tracker as
        they were.
        """
        name, entry = resolve_cut(self.publisher, self.model, cut)
        data = load_checkpoint(entry["path"], self.model, name)
        opt = optimizer if optimizer is not None else self.optimizer
        self.publisher._call(self._drain())       # no publish of the abandoned state in flight
        restore_module(self.module, opt, data, f"the trainer state of cut {name!r}")
        gen = self._cut_gen.get(name) if entry.get("session") == self._session else None
        with self._lock, torch.no_grad():
            for st in self._emb.values():
                st.clear()
                st.full = False
                w = st.param.detach()
                if gen is not None and st.pub_gen is not None:
                    rows = (st.pub_gen >= gen).nonzero().squeeze(1)
                else:
                    rows = torch.arange(w.shape[0], device=w.device)
                if rows.numel():
                    if st.mask is None:
                        st.mask = torch.zeros(w.shape[0], dtype=torch.bool, device=w.device)
                    st.mask[rows] = True
                    st.ids.append(rows)
                    st.before.append(torch.full((rows.numel(), w.shape[1]), float("nan"), dtype=w.dtype,
                                                device=w.device))
            for dt in self._dense.values():
                dt.shadow.fill_(float("nan"))
        if publish:
            self.publish()
        return TrainerCut(self.model, name, entry["path"], float(entry.get("taken_at", 0.0)))

    async def _drain(self) -> None:
        if self._send_lock is None:
            self._send_lock = asyncio.Lock()
        async with self._send_lock:
            pass

    # -- publishing -----------------------------------------------------------------------
    def publish(self) -> TrackedPublish:
        """Send the rows changed since the last publish; blocks until acknowledged.

        On failure the rows that were not delivered are kept for the next publish
        and the error is raised (a frame the publisher kept pending is not lost).
        Raises :class:`~ekko.sdk.rollback_watch.RolledBack` (or calls the publisher's
        ``on_rollback`` callbacks) when the model was rolled back: before collecting
        anything, or after this publish was acknowledged.
        """
        out = self.publish_async().result()
        self.publisher._deliver_rollbacks(self.model)
        return out

    def publish_async(self) -> "concurrent.futures.Future[TrackedPublish]":
        """Collect and copy the changed rows now; send them on the publisher's I/O thread.

        The training loop may go on updating the module at once.  Publishes go out
        in call order.
        """
        core = self.publisher._core
        self.publisher._deliver_rollbacks(self.model)
        parts = self._collect()
        batches = self._batches(parts)
        prepared: list[PreparedPublish] = []
        try:
            for b in batches:
                prepared.append(core.prepare(self.model, {
                    p.table: (_ids_of(p), p.cur, p.impact.cpu().numpy()) for p in b}))
        except BaseException:
            self._restore(parts)
            raise
        return self.publisher._submit(self._send(batches, prepared))

    async def _send(self, batches: list[list[_Part]], prepared: list[PreparedPublish]) -> TrackedPublish:
        if self._send_lock is None:
            self._send_lock = asyncio.Lock()
        core = self.publisher._core
        acks = []
        async with self._send_lock:   # a later publish must not overtake an earlier one's frames
            for k, p in enumerate(prepared):
                try:
                    acks.append(await core.publish_prepared(p))
                except BaseException as e:
                    kept = isinstance(e, PublishError) and e.pending
                    lost = [part for b in batches[k + (1 if kept else 0):] for part in b]
                    self._restore(lost)
                    raise
        ids: dict[str, list[np.ndarray]] = {}
        impact: dict[str, list[np.ndarray]] = {}
        for p in prepared:
            for t, (i, _, imp) in p.tables.items():
                ids.setdefault(t, []).append(i)
                impact.setdefault(t, []).append(imp if imp is not None else np.zeros(len(i), np.float32))
        return TrackedPublish({t: np.concatenate(v) for t, v in ids.items()},
                              {t: np.concatenate(v) for t, v in impact.items()}, tuple(acks))


class _Unhook:
    """Removes a tracker's callback from a :class:`HashedEmbedding` (as a hook handle does)."""

    def __init__(self, mod: HashedEmbedding, fn: Any) -> None:
        self.mod, self.fn = mod, fn

    def remove(self) -> None:
        for hooks in (self.mod.on_lookup, self.mod.on_rebind):
            if self.fn in hooks:
                hooks.remove(self.fn)


def _ids_of(p: _Part) -> Any:
    """What a part publishes as ids: rows, or a hashed table's slots with their keys."""
    ids = p.ids.cpu().numpy()
    return ids if p.keys is None else SlotKeys(ids, p.keys.cpu().numpy())


def _change_norm(cur: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
    """Impact of rows' changes; a NaN "before" (a row to send again after a restore,
    whatever replicas hold) counts the row's whole norm."""
    return _norm(torch.where(before.isnan(), cur, cur - before))


def _first_per_row(ids: torch.Tensor, before: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the first occurrence of each id (restored rows come first and carry the older value)."""
    uniq, inv = torch.unique(ids, return_inverse=True)
    pos = torch.arange(len(ids), device=ids.device)
    first = torch.full((len(uniq),), len(ids), dtype=torch.long, device=ids.device)
    first = first.scatter_reduce(0, inv, pos, reduce="amin")
    return ids[first], before[first]
