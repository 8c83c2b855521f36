"""Which table holds which parameter of a module: binding and loading by the model's layout.

A model registered by the publisher's ``track()`` records, per table, the module
parameter it holds (``TableSpec.param``) and a dense parameter's shape
(``TableSpec.shape``).  :func:`plan` maps a serving module's parameters to tables by
that record, so the serving side needs no naming convention of the trainer's; for a
model registered without a layout it falls back to the names ``track()`` gives
(:func:`ekko.sdk.tracking.module_layout`).  Every parameter must find a table of its
shape and dtype, else :class:`~ekko.core.errors.UsageError` and nothing is touched.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from ekko.sdk.tracking import spec_from_module
    >>> net = nn.Linear(3, 2)
    >>> spec = spec_from_module(net, "m")
    >>> [(p.param_name, p.table) for p in plan(net, spec)]
    [('weight', 'weight'), ('bias', 'bias')]
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ekko.core.errors import UsageError
from ekko.core.spec import ModelSpec, TableSpec
from ekko.core.store import TORCH_DTYPES


@dataclass(frozen=True)
class Placement:
    """One parameter of a module and the table that holds it.

    ``view(values)`` gives the parameter's tensor out of the table's ``(rows, dim)``
    values: the whole table for an embedding, a row-major view for a dense parameter.
    """

    param_name: str
    table: str
    shape: tuple[int, ...]
    dense: bool
    #: a hashed table: its rows are ``dim`` values then the key (``ekko.core.hashed``).
    hashed: bool = False

    def view(self, values: torch.Tensor) -> torch.Tensor:
        if self.hashed:
            return values[:, :self.shape[1]]    # the values, never the key bytes
        if not self.dense:
            return values
        return values.view(-1)[:math.prod(self.shape)].view(self.shape)


def plan(module: nn.Module, spec: ModelSpec) -> list[Placement]:
    """Where each of ``module``'s parameters lives in ``spec`` (see the module doc)."""
    params = dict(module.named_parameters(remove_duplicate=True))
    by_param = {t.param: t for t in spec.tables if t.param}
    out: list[Placement] = []
    if by_param:
        for name, p in params.items():
            t = by_param.get(name)
            if t is None:
                raise UsageError(f"parameter {name} has no table in model {spec.name!r}; its tables hold "
                                 f"{sorted(by_param)[:8]}")
            out.append(_check(name, p, t))
        return out
    from ekko.sdk.tracking import module_layout   # a model without a layout: track()'s names
    for lay, p, _ in module_layout(module):
        if not spec.has_table(lay.name):
            raise UsageError(f"model {spec.name!r} has no table {lay.name!r} (for {lay.param_name})")
        out.append(_check(lay.param_name, p, spec.table(lay.name), lay.kind == "dense"))
    return out


def _check(name: str, p: torch.Tensor, t: TableSpec, dense: bool | None = None) -> Placement:
    dense = t.dense if dense is None else dense
    shape = tuple(int(n) for n in p.shape)
    if p.dtype != TORCH_DTYPES[t.dtype]:
        raise UsageError(f"parameter {name} is {p.dtype}, table {t.name!r} holds {t.dtype}")
    if dense:
        if t.shape and t.shape != shape:
            raise UsageError(f"parameter {name} is {shape}, table {t.name!r} holds {t.shape}")
        if not (t.rows - 1) * t.dim < max(1, p.numel()) <= t.rows * t.dim:
            raise UsageError(f"parameter {name} ({p.numel()} elements) does not fit table {t.name!r} "
                             f"({t.rows} x {t.dim})")
    elif shape != (t.rows, t.dim):
        raise UsageError(f"parameter {name} is {shape}, table {t.name!r} is {t.rows} x {t.dim}")
    return Placement(name, t.name, shape, dense, t.hashed)


def hashed_modules(module: nn.Module, placements: list[Placement]) -> list[tuple[nn.Module, Placement]]:
    """Each :class:`~ekko.sdk.hashed_embedding.HashedEmbedding` of ``module`` whose weight is
    placed in a hashed table, with that placement."""
    from ekko.sdk.hashed_embedding import HashedEmbedding
    hashed = {pl.param_name: pl for pl in placements if pl.hashed}
    return [(m, hashed[f"{n}.weight" if n else "weight"]) for n, m in module.named_modules()
            if isinstance(m, HashedEmbedding) and (f"{n}.weight" if n else "weight") in hashed]


def bind(module: nn.Module, placements: list[Placement], values_of, lookup_of=None) -> list[str]:
    """Make each placed parameter of ``module`` a view of its table's values
    (``values_of(table)``), with ``requires_grad=False``; returns the tables bound.

    A hashed table's module (a :class:`~ekko.sdk.hashed_embedding.HashedEmbedding`) then
    finds keys through ``lookup_of(table)`` (``keys -> slots``, the replica's key map),
    never assigning slots itself; without ``lookup_of`` such a module is refused before
    anything is bound."""
    params = dict(module.named_parameters(remove_duplicate=False))
    keyed = hashed_modules(module, placements)
    hashed = [pl.param_name for pl in placements if pl.hashed]
    if len(keyed) != len(hashed):
        raise UsageError(f"parameters {sorted(hashed)} are held by hashed tables: only a HashedEmbedding's "
                         "weight can be bound to one")
    if keyed and lookup_of is None:
        raise UsageError("a hashed table is bound through a replica's key map (ekko.Replica.bind); read it "
                         "here with Client.lookup")
    targets = [(pl, pl.view(values_of(pl.table))) for pl in placements]
    # A weight tied to several modules is bound under each of its names.
    aliases: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    for pl, target in targets:
        bound = nn.Parameter(target, requires_grad=False)
        for name in aliases.get(id(params[pl.param_name]), [pl.param_name]):
            owner_name, _, attr = name.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            setattr(owner, attr, bound)
    for mod, pl in keyed:
        mod.serve_from(lookup_of(pl.table))
    return [pl.table for pl in placements]
