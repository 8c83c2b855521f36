"""Copy-on-write views of a table (``TableStore.freeze``): the blocks read back are the
values of the freeze's instant, whatever is written meanwhile, and they cost only the
rows written ahead of the reader."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
import torch

from ekko.core.delta import Delta
from ekko.core.frozen import call_on_loop
from ekko.core.spec import ModelSpec, TableSpec
from ekko.core.store import ModelStore, TableStore

ROWS, DIM = 1000, 4


def _delta(rng, version: int, n: int, rows: int = ROWS, dups: bool = False) -> Delta:
    ids = rng.integers(0, rows, n) if dups else rng.choice(rows, n, replace=False)
    values = rng.standard_normal((n, DIM)).astype(np.float32)
    return Delta("m", "t", ids.astype(np.int64), np.full(n, version, np.int64), values)


@pytest.mark.parametrize("seed", range(8))
def test_blocks_hold_the_values_of_the_instant_while_applies_and_restores_go_on(seed):
    rng = np.random.default_rng(seed)
    ts = TableStore(TableSpec("t", rows=ROWS, dim=DIM), device="cpu")
    for v in range(1, 4):
        ts.apply(_delta(rng, v, 300))
    at_freeze = ts.values.clone()
    frozen = ts.freeze()
    blocks, lo, version = [], 0, 10
    while lo < ROWS:
        # writes of every kind between two reads: applies (repeated ids too) and a rollback's restore
        for _ in range(int(rng.integers(0, 3))):
            ts.apply(_delta(rng, version, int(rng.integers(1, 200)), dups=bool(rng.integers(0, 2))))
            version += 1
        if rng.random() < 0.3:
            ids = rng.choice(ROWS, 50, replace=False)
            ts.restore_rows(ids, np.zeros(50, np.int64), np.zeros((50, DIM), np.float32))
        hi = min(ROWS, lo + int(rng.integers(1, 150)))
        blocks.append(frozen.block(lo, hi))
        lo = hi
    frozen.close()
    assert torch.equal(torch.cat(blocks), at_freeze)
    assert not torch.equal(ts.values, at_freeze), "the test must write during the read"


def test_only_rows_ahead_of_the_reader_are_saved_and_each_once():
    ts = TableStore(TableSpec("t", rows=ROWS, dim=DIM), device="cpu")
    rng = np.random.default_rng(0)
    frozen = ts.freeze()
    frozen.block(0, 500)
    behind = np.arange(0, 500)
    ahead = np.arange(500, 600)
    for v in (1, 2, 3):     # the same rows three times: saved the first time only
        ts.apply(Delta("m", "t", np.concatenate([behind, ahead]), np.full(600, v, np.int64),
                       rng.standard_normal((600, DIM)).astype(np.float32)))
    assert frozen.saved_rows == 100
    assert torch.equal(frozen.block(500, ROWS)[:100], torch.zeros(100, DIM))
    frozen.close()
    ts.apply(_delta(rng, 9, 100))   # closed: nothing is saved any more
    assert frozen.saved_rows == 100 and not ts._frozen


def test_out_of_order_or_closed_reads_are_refused():
    ts = TableStore(TableSpec("t", rows=ROWS, dim=DIM), device="cpu")
    frozen = ts.freeze()
    with pytest.raises(ValueError, match="out of order"):
        frozen.block(10, 20)
    with pytest.raises(ValueError, match="out of order"):
        frozen.block(0, ROWS + 1)
    frozen.close()
    with pytest.raises(RuntimeError, match="after close"):
        frozen.block(0, 10)
    with pytest.raises(ValueError, match="without values"):
        TableStore(TableSpec("t", rows=4, dim=1), device="cpu", with_values=False).freeze()


def test_model_freeze_copies_versions_and_views_every_table():
    spec = ModelSpec("m", tables=[TableSpec("t", rows=ROWS, dim=DIM), TableSpec("u", rows=10, dim=2)])
    ms = ModelStore(spec, device="cpu")
    rng = np.random.default_rng(1)
    ms.table("t").apply(_delta(rng, 1, 100))
    versions = ms.table("t").versions.copy()
    state, views = ms.freeze()
    ms.table("t").apply(_delta(rng, 2, 100))
    assert np.array_equal(state.table("t").versions, versions) and state.table("t").values is None
    assert sorted(views) == ["t", "u"] and views["t"].saved_rows > 0
    for v in views.values():
        v.close()
    assert not ms.table("t")._frozen and not ms.table("u")._frozen


def test_a_reader_on_another_thread_has_the_loop_copy_each_block():
    """The snapshot writer's shape: blocks read from a worker thread while the loop applies."""
    async def main():
        loop = asyncio.get_running_loop()
        ts = TableStore(TableSpec("t", rows=ROWS, dim=DIM), device="cpu")
        rng = np.random.default_rng(2)
        ts.apply(_delta(rng, 1, 500))
        at_freeze = ts.values.clone()
        frozen = ts.freeze(call_on_loop(loop))
        threads = set()

        def read():
            threads.add(threading.get_ident())
            out = []
            for lo in range(0, ROWS, 10):
                out.append(frozen.block(lo, lo + 10))
            return torch.cat(out)

        reader = loop.run_in_executor(None, read)
        version = 2
        while not reader.done():
            ts.apply(_delta(rng, version, 50))
            version += 1
            await asyncio.sleep(0)
        frozen.close()
        assert torch.equal(await reader, at_freeze)
        assert threading.get_ident() not in threads and version > 3
    asyncio.run(main())
