"""TorchRec embedding collections as ekko tables, found without importing TorchRec.

An unsharded TorchRec ``EmbeddingBagCollection`` keeps one ``nn.EmbeddingBag`` per
table config (in ``embedding_bags[config.name]``) and an ``EmbeddingCollection`` one
``nn.Embedding`` (in ``embeddings[config.name]``); both call it with ``input=`` the
flat ids of every feature the table serves.  So each table config is one ekko table,
named after the config, with ``num_embeddings`` rows of ``embedding_dim`` values, and
the rows a step looks up are recorded by hooks on that inner module, exactly as for a
plain ``nn.Embedding`` (:mod:`ekko.sdk.tracking`).

TorchRec is optional (the ``ekko[torchrec]`` extra, README "Publishing from a training
loop").  Nothing here imports it: a module can only hold TorchRec collections once the
caller has imported TorchRec, so :func:`collection_types` looks in ``sys.modules`` and a
process without TorchRec pays nothing.  Sharded collections
(``DistributedModelParallel``) keep their weights in fused kernels, not in modules, and
are refused with a clear error.

The mapping (:func:`torchrec_tables`) knows nothing of tracking, so serving code can use
it to write replica rows back into a collection's weights.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from torch import nn

from ekko.core.errors import UsageError

#: the TorchRec module that defines the unsharded collections.
TORCHREC_MODULES = "torchrec.modules.embedding_modules"
#: the TorchRec module that defines sharded modules (refused: see the module doc).
TORCHREC_SHARDED = "torchrec.distributed.types"
#: collection class -> (attribute holding its per-table modules, method listing its configs).
COLLECTIONS = {
    "EmbeddingBagCollection": ("embedding_bags", "embedding_bag_configs"),
    "EmbeddingCollection": ("embeddings", "embedding_configs"),
}


@dataclass(frozen=True, eq=False)
class TorchRecTable:
    """One table config of a TorchRec collection and the weight that holds it.

    Attributes:
        name: the config's ``name`` (unique within its collection).
        collection: the collection's qualified name in the module (``""``: the module itself).
        param_name: the weight's qualified name in the module.
        rows / dim: ``num_embeddings`` / ``embedding_dim`` of the config.
        weight: the ``rows x dim`` parameter.
        lookup: the ``nn.Embedding`` / ``nn.EmbeddingBag`` that looks rows up in it.
    """

    name: str
    collection: str
    param_name: str
    rows: int
    dim: int
    weight: nn.Parameter
    lookup: nn.Module


def collection_types() -> dict[type, tuple[str, str]]:
    """The TorchRec collection classes loaded in this process, each with
    ``(modules attribute, configs method)``; empty when TorchRec was not imported."""
    mod = sys.modules.get(TORCHREC_MODULES)
    if mod is None:
        return {}
    return {getattr(mod, cls): how for cls, how in COLLECTIONS.items() if hasattr(mod, cls)}


def _sharded_type() -> type | None:
    mod = sys.modules.get(TORCHREC_SHARDED)
    return getattr(mod, "ShardedModule", None) if mod is not None else None


def torchrec_tables(module: nn.Module) -> list[TorchRecTable]:
    """Every table of every TorchRec collection in ``module``, in module order.

    Raises :class:`UsageError` for a sharded TorchRec module, and for a collection whose
    modules do not match its configs (a missing table, or a weight whose shape is not
    ``num_embeddings x embedding_dim``).

    Example:
        >>> torchrec_tables(nn.Linear(2, 2))     # no TorchRec collection: no tables
        []
    """
    types = collection_types()
    if not types:
        return []
    sharded = _sharded_type()
    out: list[TorchRecTable] = []
    for cname, coll in module.named_modules():
        if sharded is not None and isinstance(coll, sharded):
            raise UsageError(f"{cname or 'the module'} is a sharded TorchRec module ({type(coll).__name__}); "
                             "track the unsharded model (EmbeddingBagCollection / EmbeddingCollection)")
        how = next((h for t, h in types.items() if isinstance(coll, t)), None)
        if how is None:
            continue
        attr, configs = how
        lookups = getattr(coll, attr)
        where = cname or "the module"
        for cfg in getattr(coll, configs)():
            if cfg.name not in lookups:
                raise UsageError(f"{where}: table {cfg.name!r} of its configs has no module in {attr}")
            lookup = lookups[cfg.name]
            w = lookup.weight
            if tuple(w.shape) != (cfg.num_embeddings, cfg.embedding_dim):
                raise UsageError(f"{where}: table {cfg.name!r} is configured {cfg.num_embeddings} x "
                                 f"{cfg.embedding_dim} but its weight is {tuple(w.shape)}")
            prefix = f"{cname}." if cname else ""
            out.append(TorchRecTable(cfg.name, cname, f"{prefix}{attr}.{cfg.name}.weight",
                                     cfg.num_embeddings, cfg.embedding_dim, w, lookup))
    return out
