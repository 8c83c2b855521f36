"""An embedding looked up by 64-bit feature ids: the trainer's side of a hashed table.

:class:`HashedEmbedding` holds ``capacity`` rows (slots) and assigns them to the feature
ids it is asked for, by the same rules as a publisher
(:class:`ekko.core.hashed_slots.HashedSlots`: a key takes a slot of its shard's region;
a full region evicts its least recently / least frequently *looked-up* key, whose slot
is re-initialised for the newcomer).  Its slots are the replicas' slots: a
:class:`~ekko.sdk.tracking.Tracker` publishes the rows it changes by slot, with their
keys (:class:`~ekko.sdk.prepare.SlotKeys`), so each replica holds the module's table
bit for bit, keys included, and serves it by key (``Client.lookup``).

The key of every slot is a buffer (``keys``), so ``state_dict`` -- and a cut's saved
trainer state -- holds the assignment; loading it rebuilds the index.  Slot ranks for
eviction (recency, use counts) are not saved: after a load every held key counts as
used once, at the load.

Example:
    >>> import torch
    >>> emb = HashedEmbedding(capacity=64, dim=4, shards=1, eviction="lru")
    >>> out = emb(torch.tensor([[10**15, 7], [7, -3]]))
    >>> out.shape, emb.slots_of(torch.tensor([7, 99])).tolist()
    (torch.Size([2, 2, 4]), [1, -1])
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ekko.core.errors import UsageError
from ekko.core.hashed import check_keys
from ekko.core.hashed_slots import HashedSlots
from ekko.core.key_index import EMPTY_KEY
from ekko.core.spec import TableSpec


class HashedEmbedding(nn.Module):
    """``capacity`` x ``dim`` embedding rows looked up by int64 feature ids.

    Args:
        capacity: rows (slots) held; the table's ``capacity`` on the replicas.
        dim: elements per row.
        shards: shards of the table (default: as :class:`TableSpec` chooses); a key's
            slot lies in its shard's region.
        eviction: ``"lru"``, ``"lfu"`` (by lookups) or ``"none"`` (a lookup of a new key
            into a full region raises :class:`UsageError`).
        sparse: sparse gradients (what moves only looked-up rows with SGD/Adagrad).
        init_std: new rows start as ``N(0, init_std^2)``; must be > 0, so that a slot
            given to another key always changes (and is published).
        dtype, device: of the weight.
    """

    def __init__(self, capacity: int, dim: int, *, shards: int | None = None, eviction: str = "lru",
                 sparse: bool = True, init_std: float = 0.01, dtype: torch.dtype = torch.float32,
                 device: Any = None) -> None:
        super().__init__()
        if not init_std > 0:
            raise UsageError("init_std must be > 0: a slot given to another key must change")
        # The table as the replicas will hold it (the name is the tracker's to give).
        self.spec = TableSpec("hashed", dim=dim, keys="int64", capacity=capacity, shards=shards, eviction=eviction)
        self.sparse, self.init_std = bool(sparse), float(init_std)
        self.weight = nn.Parameter(torch.empty(capacity, dim, dtype=dtype, device=device).normal_(0.0, init_std))
        self.register_buffer("keys", torch.full((capacity,), EMPTY_KEY, dtype=torch.int64, device=device))
        self._slots = HashedSlots(self.spec)
        #: called with the slots about to be given to new keys (before they are re-initialised).
        self.on_rebind: list[Callable[[torch.Tensor], None]] = []
        #: called with the slots a lookup reads.
        self.on_lookup: list[Callable[[torch.Tensor], None]] = []
        # Serving: keys -> slots by a replica's key map, not by this module (serve_from).
        self._serving: Callable[[np.ndarray], np.ndarray] | None = None
        self.register_load_state_dict_post_hook(lambda mod, _incompatible: mod._reindex())

    @property
    def capacity(self) -> int:
        return self.spec.rows

    @property
    def dim(self) -> int:
        return self.spec.dim

    @property
    def evicted(self) -> int:
        """Keys evicted so far (their slots given to other keys)."""
        return self._slots.evicted

    def slots_of(self, keys: Any) -> torch.Tensor:
        """The slot of each key, -1 where none holds it (no assignment, no eviction)."""
        return torch.from_numpy(self._slots.index.lookup(check_keys(_flat(keys)))).reshape(tuple(np.shape(keys)))

    def serve_from(self, lookup: Callable[[np.ndarray], np.ndarray]) -> None:
        """Find keys with ``lookup`` (int64 keys -> slots, -1: not held; a replica's key
        map, :func:`ekko.serving.layout.bind`) from now on: a key not held reads as
        zeros, and nothing is assigned, evicted or written."""
        self._serving = lookup

    def forward(self, keys: torch.Tensor) -> torch.Tensor:
        """Rows of ``keys`` (any shape of int64 feature ids), giving new keys slots (or,
        serving, the replica's rows of them: zeros for a key it does not hold)."""
        flat = check_keys(_flat(keys))
        if self._serving is not None:
            slots = torch.from_numpy(np.asarray(self._serving(flat), np.int64)).to(self.weight.device)
            held = (slots >= 0).reshape(tuple(keys.shape) + (1,))
            out = F.embedding(slots.clamp(min=0).reshape(tuple(keys.shape)), self.weight)
            return out * held.to(out.dtype)
        uniq, inverse = np.unique(flat, return_inverse=True)
        slots = self._slots.assign(uniq)   # UsageError (nothing changed) when a full region may not evict
        dev = self.weight.device
        s = torch.from_numpy(slots).to(dev)
        fresh = s[self.keys[s] != torch.from_numpy(uniq).to(dev)]
        if fresh.numel():
            for fn in self.on_rebind:
                fn(fresh)
            with torch.no_grad():
                self.weight[fresh] = torch.empty(fresh.numel(), self.dim, dtype=self.weight.dtype,
                                                 device=dev).normal_(0.0, self.init_std)
                self.keys[s] = torch.from_numpy(uniq).to(dev)
        for fn in self.on_lookup:
            fn(s)
        idx = s[torch.from_numpy(inverse).to(dev)].reshape(tuple(keys.shape))
        return F.embedding(idx, self.weight, sparse=self.sparse)

    def load_keys(self, keys: np.ndarray) -> None:
        """Take the key of every slot (``EMPTY_KEY``: none), e.g. as a replica holds them."""
        k = torch.as_tensor(np.asarray(keys, np.int64))
        if tuple(k.shape) != (self.capacity,):
            raise UsageError(f"load_keys needs {self.capacity} keys, got shape {tuple(k.shape)}")
        with torch.no_grad():
            self.keys.copy_(k.to(self.keys.device))
        self._reindex()

    def _reindex(self) -> None:
        """Rebuild the key index from the ``keys`` buffer (after a state dict load)."""
        self._slots = HashedSlots(self.spec)
        held = torch.nonzero(self.keys != EMPTY_KEY).squeeze(1)
        if held.numel():
            self._slots.resume(held.cpu().numpy(), self.keys[held].cpu().numpy())
            self._slots.index.touch(held.cpu().numpy(), 0)

    def extra_repr(self) -> str:
        return f"capacity={self.capacity}, dim={self.dim}, shards={self.spec.num_shards}, eviction={self.spec.eviction}"


def _flat(keys: Any) -> Any:
    """Feature ids of any shape, flattened (a tensor stays a tensor: check_keys takes both)."""
    return keys.reshape(-1) if hasattr(keys, "reshape") else np.asarray(keys).reshape(-1)
