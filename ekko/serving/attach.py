"""Attach to a sidecar daemon's tables: ``ekko.attach`` (issue #17).

A serving process on the same host as an ``ekko daemon`` maps the daemon's tables
(:mod:`ekko.server.shared_tables`) read-only, with no copy: the daemon applies every
update to that memory in place, so the mapped tensors are always the newest, with no
request per lookup and no re-attach.  What a read may see while the daemon writes,
and how :meth:`Attached.lookup` reads whole updates only, is in the module doc of
:mod:`ekko.server.shared_tables`.

Example::

    import ekko
    att = ekko.attach("127.0.0.1:7070", "ranker")
    emb = att.lookup("user", ids)            # (len(ids), dim), no torn rows
    att.bind(model)                          # model's tables are the daemon's (read-only)
    scores = model(batch)
"""

from __future__ import annotations

import json
import time
import urllib.parse
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ekko.core.cuda_ipc import open_cuda_ipc
from ekko.core.errors import ProtocolError, RemoteError, UsageError
from ekko.core.spec import ModelSpec
from ekko.core.store import TORCH_DTYPES

#: how many times :meth:`Attached.lookup` retries a read that overlapped a write.
MAX_READ_RETRIES = 1000
#: seconds one request to the daemon may take.
ATTACH_TIMEOUT_S = 30.0
#: numpy dtypes the files are mapped as (bfloat16 as its bits).
_NP_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.int16, "float64": np.float64}


class TornRead(RuntimeError):
    """A lookup overlapped the daemon's writes :data:`MAX_READ_RETRIES` times in a row."""


class Attached:
    """A model's tables of a daemon on this host, mapped read-only (see :func:`attach`).

    Attributes:
        model: the model.
        incarnation: the daemon process the mapping is of (a restart shares new files).
    """

    def __init__(self, endpoint: str, model: str, description: dict[str, Any], key: Any = None) -> None:
        self.endpoint, self.model, self._key = endpoint, model, key
        self.incarnation = int(description["incarnation"])
        #: the model's spec (its tables and their layout).
        self.spec = ModelSpec.from_dict(description["spec"])
        self._tables: dict[str, torch.Tensor] = {}
        self._seq: dict[str, np.ndarray] = {}
        for name, t in description["tables"].items():
            dtype = t["dtype"]
            if dtype not in _NP_DTYPES:
                raise UsageError(f"table {name!r}: dtype {dtype!r} cannot be attached")
            # A hashed table's rows hold their key after the values (ekko.core.hashed): the
            # file is rows x width, the tensor shown its first dim columns.
            rows, dim = int(t["rows"]), int(t["dim"])
            width = int(t.get("width", dim))
            if "cuda" in t:     # the daemon's GPU memory (ekko.server.shared_tables)
                tensor = open_cuda_ipc(t["cuda"], TORCH_DTYPES[dtype])
                if tuple(tensor.shape) != (rows, width):
                    raise ProtocolError(f"table {name!r}: the CUDA handle is of a {tuple(tensor.shape)} "
                                        f"tensor, not ({rows}, {width})")
            else:
                arr = np.memmap(Path(t["path"]), dtype=_NP_DTYPES[dtype], mode="r", shape=(rows, width))
                with warnings.catch_warnings():
                    # The mapping is read-only (PROT_READ): torch warns that it cannot enforce that.
                    warnings.simplefilter("ignore", UserWarning)
                    tensor = torch.from_numpy(arr)
                if dtype == "bfloat16":
                    tensor = tensor.view(torch.bfloat16)
            assert tensor.dtype == TORCH_DTYPES[dtype]
            self._tables[name] = tensor[:, :dim] if width != dim else tensor
            self._seq[name] = np.memmap(Path(t["seq_path"]), dtype="<i8", mode="r", shape=(1,))

    @property
    def tables(self) -> list[str]:
        return list(self._tables)

    def tensor(self, table: str) -> torch.Tensor:
        """The table's ``(rows, dim)`` values, live.  Read-only: on the CPU a write crashes
        this process; on a GPU nothing stops it, and it changes the daemon's table."""
        try:
            return self._tables[table]
        except KeyError:
            raise UsageError(f"model {self.model!r} has no table {table!r}; tables: {self.tables}") from None

    def write_count(self, table: str) -> int:
        """The daemon's write counter of a table (odd: a write is under way)."""
        self.tensor(table)
        return int(self._seq[table][0])

    def lookup(self, table: str, ids: Any) -> torch.Tensor:
        """Rows ``ids`` of a table, copied (on the table's device), with no write of the
        daemon overlapping the copy (a read that overlapped one is done again)."""
        t = self.tensor(table)
        idx = torch.as_tensor(ids, dtype=torch.int64).to(t.device)
        seq = self._seq[table]
        for _ in range(MAX_READ_RETRIES):
            before = int(seq[0])
            if before & 1:
                time.sleep(0)          # a write is under way: let it finish
                continue
            out = t.index_select(0, idx)
            if out.is_cuda:     # the copy must be done before the counter is read again
                torch.cuda.current_stream(out.device).synchronize()
            if int(seq[0]) == before:
                return out
        raise TornRead(f"table {table!r}: every one of {MAX_READ_RETRIES} reads overlapped a write")

    def bind(self, module: nn.Module) -> list[str]:
        """Make ``module``'s parameters the mapped tensors of their tables (by the model's
        layout: :mod:`ekko.serving.layout`), with no copy; returns the bound table names.
        Everything must fit (shape, dtype), else nothing is bound (:class:`UsageError`).
        A forward pass that overlaps a write may see it half done (see the module doc)."""
        from ekko.serving import layout
        return layout.bind(module, layout.plan(module, self.spec), self.tensor)

    def current(self) -> bool:
        """Whether the daemon is still the process this mapping is of (else attach again)."""
        try:
            return _describe(self.endpoint, self.model, self._key)["incarnation"] == self.incarnation
        except (OSError, RemoteError):
            return False


def _describe(endpoint: str, model: str, key: Any = None) -> dict[str, Any]:
    from ekko.sdk.client import Client
    client = Client(endpoint, key=key, timeout=ATTACH_TIMEOUT_S)
    try:
        return json.loads(client._ok("GET", f"/v1/models/{urllib.parse.quote(model, safe='')}/shared"))
    finally:
        client.close()


def attach(endpoint: str, model: str, key: Any = None) -> Attached:
    """Map ``model``'s tables of the daemon at ``endpoint`` (on this host) read-only.

    The daemon moves the tables into shared memory on the first attach; every later
    update is applied there, in place.  ``key`` signs the request (the cluster key or
    a reader key allowed the model, where the daemon holds keys: :mod:`ekko.core.read_auth`).
    """
    return Attached(endpoint, model, _describe(endpoint, model, key), key)
