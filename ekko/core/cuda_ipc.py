"""CUDA IPC handles as JSON: a GPU tensor of one process opened by another (``ekko.attach``).

:func:`torch.multiprocessing.reductions.reduce_tensor` gives what another process needs
to open a tensor's GPU memory, for pickle; a sidecar daemon answers over HTTP, and a
serving process must not unpickle what a socket gives it, so the same fields travel as
JSON here (bytes in base64) and are opened with torch's own
:func:`~torch.multiprocessing.reductions.rebuild_cuda_tensor`.
"""

from __future__ import annotations

import base64
from typing import Any

import torch

from ekko.core.errors import ProtocolError, UsageError

#: the fields of an entry (:func:`cuda_ipc_handle`), and the JSON types they must have.
ENTRY_FIELDS = {"device": int, "handle": str, "storage_bytes": int, "storage_offset_bytes": int,
                "ref_counter_handle": str, "ref_counter_offset": int, "event_handle": (str, type(None)),
                "event_sync_required": bool, "size": list, "stride": list, "offset": int}


def cuda_ipc_handle(values: torch.Tensor) -> dict[str, Any]:
    """A CUDA IPC handle of ``values`` as JSON (bytes in base64): what
    :func:`torch.multiprocessing.reductions.reduce_tensor` sends a process, without
    pickle.  Each call shares the allocation again with a reference count of its own,
    which the reader releases when its tensor goes (the daemon's table outlives it).

    Example (on a GPU; the reader is another process)::

        entry = cuda_ipc_handle(table)                # in the daemon
        view = open_cuda_ipc(entry, torch.float32)    # in the reader: the same memory
    """
    if values.device.type != "cuda":
        raise ValueError(f"cuda_ipc_handle needs a CUDA tensor, not one on {values.device}")
    storage = values.untyped_storage()
    (device, handle, storage_bytes, storage_offset_bytes, ref_counter_handle, ref_counter_offset,
     event_handle, event_sync_required) = storage._share_cuda_()
    return {"device": int(device), "handle": _b64(handle), "storage_bytes": int(storage_bytes),
            "storage_offset_bytes": int(storage_offset_bytes), "ref_counter_handle": _b64(ref_counter_handle),
            "ref_counter_offset": int(ref_counter_offset), "event_handle": _b64(event_handle),
            "event_sync_required": bool(event_sync_required), "size": list(values.shape),
            "stride": list(values.stride()), "offset": int(values.storage_offset())}


def open_cuda_ipc(entry: dict[str, Any], dtype: torch.dtype) -> torch.Tensor:
    """The tensor a :func:`cuda_ipc_handle` entry describes, opened in this process (which
    must be another process than the daemon's, on the same host, seeing the same GPU)."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor
    bad = [k for k, types in ENTRY_FIELDS.items() if not isinstance(entry.get(k), types)]
    if bad:
        raise ProtocolError(f"not a CUDA IPC entry: fields {bad} missing or of the wrong type", "bad_body")
    if not torch.cuda.is_available():
        raise UsageError("the table is in a GPU's memory and this process has no CUDA")
    return rebuild_cuda_tensor(
        torch.Tensor, torch.Size(entry["size"]), tuple(entry["stride"]), int(entry["offset"]),
        torch.storage.TypedStorage, dtype, int(entry["device"]), _unb64(entry["handle"]),
        int(entry["storage_bytes"]), int(entry["storage_offset_bytes"]), False,
        _unb64(entry["ref_counter_handle"]), int(entry["ref_counter_offset"]),
        _unb64(entry["event_handle"]), bool(entry["event_sync_required"]))


def _b64(b: bytes | None) -> str | None:
    return None if b is None else base64.b64encode(bytes(b)).decode("ascii")


def _unb64(s: str | None) -> bytes | None:
    return None if s is None else base64.b64decode(s)
