"""The store writes rows in host memory through numpy; the torch path (devices) must agree.

``TableStore`` writes a CPU table's rows with numpy's fancy assignment and keeps
``index_copy_`` for tables on a device.  Both paths get the same random applies and
restores (new rows, stale rows, duplicate ids, tombstones, each dtype) here; the device
path is forced on the CPU by hiding the host view.  And the table's values are
advised onto huge pages only where that can work (large private CPU memory).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ekko.core import hugepages
from ekko.core.delta import Delta
from ekko.core.spec import TableSpec
from ekko.core.store import TableStore
from ekko.core.version import ORIGIN_BITS


def random_deltas(spec: TableSpec, rng: np.random.Generator, n: int = 40):
    wire = np.uint16 if spec.dtype == "bfloat16" else np.dtype(spec.dtype)
    out = []
    for i in range(n):
        k = int(rng.integers(1, 60))
        ids = rng.integers(0, spec.rows, k).astype(np.int64)            # repeats now and then
        counters = rng.integers(1, 4 * (i + 1), k).astype(np.int64)     # some stale, some new
        versions = (counters << ORIGIN_BITS) | int(rng.integers(1, 4))
        if wire == np.uint16:
            vals = torch.randn(k, spec.width).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        else:
            vals = rng.standard_normal((k, spec.width)).astype(wire)
        tomb = rng.random(k) < 0.1 if rng.random() < 0.5 else None
        out.append(Delta("m", "t", ids, versions, vals, tomb))
    return out


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
def test_host_writes_equal_the_device_path(dtype, monkeypatch):
    spec = TableSpec("t", rows=300, dim=6, dtype=dtype)
    host, dev = TableStore(spec, device="cpu"), TableStore(spec, device="cpu")
    assert host._host_view() is not None
    rng = np.random.default_rng(7)
    deltas = random_deltas(spec, rng)
    for d in deltas:
        with monkeypatch.context() as mp:
            mp.setattr(dev, "_host_view", lambda: None)
            r_dev = dev.apply(d, capture_old=True)
        r_host = host.apply(d, capture_old=True)
        assert np.array_equal(r_host.ids, r_dev.ids) and np.array_equal(r_host.versions, r_dev.versions)
        assert np.array_equal(r_host.old_values, r_dev.old_values)
    assert torch.equal(host.values, dev.values) and np.array_equal(host.versions, dev.versions)
    assert np.array_equal(host.tombstone, dev.tombstone)
    # Rows never written stay zero; tombstoned rows hold zeros on both paths.
    assert bool((host.values[torch.from_numpy(host.tombstone)] == 0).all())
    # restore_rows (a rollback) through both paths.
    ids = np.arange(0, spec.rows, 7, dtype=np.int64)
    vers = np.arange(1, len(ids) + 1, dtype=np.int64) << ORIGIN_BITS
    vals = random_deltas(spec, rng, 1)[0].values[:1].repeat(len(ids), axis=0)
    host.restore_rows(ids, vers, vals)
    with monkeypatch.context() as mp:
        mp.setattr(dev, "_host_view", lambda: None)
        dev.restore_rows(ids, vers, vals)
    assert torch.equal(host.values, dev.values) and np.array_equal(host.versions, dev.versions)


def test_a_read_only_delta_is_written_and_left_unchanged():
    # A parsed push shared by simulated receivers is frozen (read-only): written from, never to.
    spec = TableSpec("t", rows=50, dim=4)
    ts = TableStore(spec, device="cpu")
    vals = np.arange(12, dtype=np.float32).reshape(3, 4)
    tomb = np.array([False, True, False])
    for a in (vals, tomb):
        a.flags.writeable = False
    d = Delta("m", "t", np.array([3, 9, 20]), np.array([1 << ORIGIN_BITS | 1] * 3), vals, tomb)
    ts.apply(d)
    assert ts.values[3].tolist() == [0.0, 1.0, 2.0, 3.0] and ts.values[9].tolist() == [0.0] * 4
    assert vals[1].tolist() == [4.0, 5.0, 6.0, 7.0]      # the tombstone zeroed a copy


def test_huge_pages_are_asked_only_for_large_cpu_memory():
    small = torch.empty(16, 4)
    assert not hugepages.advise_huge(small.data_ptr(), small.numel() * 4)   # below MIN_HUGE_BYTES
    t = hugepages.zeros_tensor((hugepages.MIN_HUGE_BYTES // 4 + 1024,), torch.float32, "cpu")
    assert t.dtype == torch.float32 and not bool(t.any())
    # Where madvise exists it is asked over whole 2 MiB pages only (the result depends on
    # the kernel); where it does not, nothing is asked.
    if hugepages._madvise() is None:
        assert not hugepages.advise_huge(t.data_ptr(), t.numel() * 4)
