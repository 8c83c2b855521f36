"""Fill a fresh module from a replica once: ``ekko.load`` (issue #17).

For a serving process that wants a copy of the newest parameters rather than a live
binding (:class:`ekko.serving.Replica`, :func:`ekko.attach`): it reads every table of
the model from a replica over HTTP and copies each into the parameter the model's
layout names for it (:mod:`ekko.serving.layout`).  The copy is of that moment: rows
updated while it reads may be older in some tables than in others.

Example::

    model = Ranker()
    ekko.load("10.0.1.5:7070", "ranker", model)      # model now holds the replica's parameters
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from ekko.core.key_index import EMPTY_KEY
from ekko.sdk.client import Client
from ekko.serving import layout


def load(endpoint: str, model: str, module: nn.Module, key: Any = None, timeout: float = 30.0) -> list[str]:
    """Copy the replica's tables into ``module``'s parameters; returns the tables read.

    Every parameter must find its table (by the layout, else by ``track()``'s names)
    with its shape and dtype, else :class:`~ekko.core.errors.UsageError` before anything
    is read or written.
    """
    client = Client(endpoint, key=key, timeout=timeout)
    try:
        spec = client.spec(model)
        placements = layout.plan(module, spec)
        reads = {pl.table: client.read(model, pl.table, np.arange(spec.table(pl.table).rows)) for pl in placements}
    finally:
        client.close()
    params = dict(module.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for pl in placements:
            p = params[pl.param_name]
            p.copy_(pl.view(reads[pl.table].values).to(p.device))
    for mod, pl in layout.hashed_modules(module, placements):   # a hashed table's keys, too
        read = reads[pl.table]
        mod.load_keys(np.where(read.found, read.keys, EMPTY_KEY))
    return [pl.table for pl in placements]
