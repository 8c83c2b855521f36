"""A daemon's tables in shared memory, for readers on the same host (``ekko.attach``).

``GET /v1/models/{model}/shared`` (from loopback only: another host cannot map this
one's memory) moves each table of the model into a file under ``/dev/shm`` -- once;
the daemon then applies every update to that memory in place -- and answers where
they are::

    {"model", "node", "incarnation", "spec",
     "tables": {table: {"path", "seq_path", "rows", "dim", "width", "dtype", "device"}}}

A reader maps ``path`` read-only (``rows x width`` of ``dtype``, row-major) and
``seq_path`` (one little-endian int64: :attr:`ekko.core.store.TableStore.write_seq`,
odd while the daemon writes values).  What a reader may see (the rule): a read that
overlaps a write (an apply, a rollback's restore) may see some rows old and some new,
and a row half written; the write counter tells: read it, read the rows, read it
again -- equal and even means no write overlapped (:meth:`ekko.serving.Attached.lookup`
does that).  A daemon that restarts shares new files (its new incarnation in their
names): a reader notices by the ``incarnation`` and attaches again; the old mapping
keeps the last values it had.

A table on the GPU stays where it is: its entry has no ``path`` but a ``cuda`` entry, a
CUDA IPC handle of the table's memory (:func:`ekko.core.cuda_ipc.cuda_ipc_handle`, fresh
for every request: each carries its own reference count), which a reader on the same
host and GPU opens (:func:`ekko.core.cuda_ipc.open_cuda_ipc`).  The write counter stays
a file in host memory; the daemon waits for a write's kernels before it makes the
counter even again (:meth:`ekko.core.store.TableStore._end_write`).  A CUDA mapping
cannot be made read-only: a reader that writes to it changes the daemon's table.

The files are the daemon user's, readable by its group (:data:`SHARED_FILE_MODE`), and
removed when the daemon stops; a killed daemon's are removed by the next process of
the same node id on this host when it first shares.

Example::

    GET /v1/models/ranker/shared
    -> {"tables": {"user": {"path": "/dev/shm/ekko-r1-17336...-ranker-user.values", ...}}}
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from aiohttp import web

from ekko.core.cuda_ipc import cuda_ipc_handle
from ekko.core.store import TORCH_DTYPES
from ekko.replica.node import ReplicaNode
from ekko.server.frames import RequestRejected

log = logging.getLogger(__name__)

#: where the files go (a tmpfs: memory, not disk).
SHM_DIR = Path("/dev/shm")
#: the files' mode: the daemon's user writes, its group reads (run the serving process as
#: that user or in that group); nobody else may read the model.
SHARED_FILE_MODE = 0o640
_SAFE = re.compile(r"[^A-Za-z0-9_.]")


def _safe(name: str) -> str:
    return _SAFE.sub("_", name)


class SharedTables:
    """Moves a node's tables into shared memory on demand and serves where they are.

    Args:
        node: the replica.
        directory: where the files go (``/dev/shm``; tests may give another tmpfs dir).
    """

    def __init__(self, node: ReplicaNode, directory: str | Path = SHM_DIR) -> None:
        self.node = node
        self.directory = Path(directory)
        self.prefix = f"ekko-{_safe(node.node_id)}-"
        self.files: list[Path] = []
        self._shared: dict[tuple[str, str], dict[str, Any]] = {}
        self._swept = False
        #: why tables may not move to shared memory (None: they may): a replica embedded
        #: in a serving process has its tensors bound to modules, which a move would orphan.
        self.refused: str | None = None

    def _sweep(self) -> None:
        """Remove what an earlier process of this node id left here (killed before its cleanup)."""
        mine = f"{self.prefix}{self.node.members.me.incarnation}-"
        for p in self.directory.glob(f"{self.prefix}*"):
            if not p.name.startswith(mine):
                try:
                    p.unlink()
                    log.info("removed %s (left by an earlier process of this node)", p)
                except OSError:
                    pass
        self._swept = True

    def share(self, model: str) -> dict[str, Any]:
        """Put ``model``'s tables in shared memory (once); their description."""
        if not self._swept:
            self._sweep()
        m = self.node.model_state(model)
        inc = self.node.members.me.incarnation
        tables: dict[str, Any] = {}
        for spec in m.spec.tables:
            key = (model, spec.name)
            if key not in self._shared:
                self._shared[key] = self._share_table(model, spec, m.store.table(spec.name), inc)
            entry = self._shared[key]
            if entry["device"] != "cpu":  # a handle of its own for every reader
                entry = dict(entry, cuda=cuda_ipc_handle(m.store.table(spec.name).values))
            tables[spec.name] = entry
        return {"model": model, "node": self.node.node_id, "incarnation": inc, "tables": tables,
                "spec": m.spec.to_dict()}

    def _share_table(self, model: str, spec: Any, ts: Any, inc: int) -> dict[str, Any]:
        """Move one table's values to a file (a GPU table's stay put) and its write counter
        to another; the table's entry."""
        if ts.values is None:
            raise RequestRejected("this replica keeps no values", "not_shareable")
        if ts.blocks is not None:
            # A reader indexes the file by row id; a placed table's file holds its shards packed.
            raise RequestRejected(f"table {spec.name!r} is placed across the DC (replicas_per_shard): "
                                  "read it with Client.lookup, not by attach", "not_shareable")
        device = ts.values.device.type
        if device not in ("cpu", "cuda"):
            raise RequestRejected(f"table {spec.name!r} is on {ts.values.device}: only CPU and CUDA tables "
                                  "are shared", "not_shareable")
        stem = self.directory / f"{self.prefix}{inc}-{_safe(model)}-{_safe(spec.name)}"
        path, seq_path = stem.with_name(stem.name + ".values"), stem.with_name(stem.name + ".seq")
        entry = {"seq_path": str(seq_path), "rows": spec.rows, "dim": spec.dim, "width": spec.width,
                 "dtype": spec.dtype, "device": str(ts.values.device)}
        values = ts.values
        if device == "cpu":
            values = torch.from_file(str(path), shared=True, size=spec.rows * spec.width,
                                     dtype=TORCH_DTYPES[spec.dtype]).view(spec.rows, spec.width)
            self.files.append(path)
            os.chmod(path, SHARED_FILE_MODE)
            values.copy_(ts.values)
            entry["path"] = str(path)
        seq = np.memmap(seq_path, dtype="<i8", mode="w+", shape=(1,))
        self.files.append(seq_path)
        os.chmod(seq_path, SHARED_FILE_MODE)
        # On the loop thread: no apply runs between the copy and the switch.
        ts.values, ts.write_seq = values, seq
        log.info("table %s.%s shared %s", model, spec.name, entry.get("path", f"by CUDA IPC ({values.device})"))
        return entry

    async def shared(self, request: web.Request) -> web.Response:
        """``GET /v1/models/{model}/shared`` (loopback only; see the module doc)."""
        remote = request.remote or ""
        try:
            local = ipaddress.ip_address(remote).is_loopback
        except ValueError:
            local = False
        if not local:
            raise RequestRejected("shared tables are for readers on this host (loopback only)", "forbidden")
        model = request.match_info["model"]
        if model not in self.node.models:
            raise RequestRejected(f"unknown model {model!r}", "unknown_model")
        if self.refused is not None:
            raise RequestRejected(self.refused, "not_shareable")
        return web.json_response(self.share(model))

    def close(self) -> None:
        """Remove the files (readers keep what they mapped)."""
        for p in self.files:
            try:
                p.unlink()
            except OSError:
                pass
        self.files.clear()

