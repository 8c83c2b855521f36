"""Workload generators: Zipf sampling, new rows, bursts, dense tables, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from ekko.core.errors import UsageError
from ekko.core.spec import TableSpec
from simulator.events import Simulation
from simulator.workload import (Burst, DenseTable, SparseTable, Workload, WorkloadConfig, ZipfRows)


@pytest.mark.parametrize("s", [0.0, 0.7, 1.0, 1.5])
def test_zipf_matches_the_exact_distribution(s):
    n, draws = 20, 200_000
    z = ZipfRows(n, s, np.random.default_rng(3), scramble=False)
    ranks = z.sample_ranks(draws)
    assert ranks.min() >= 1 and ranks.max() <= n
    emp = np.bincount(ranks, minlength=n + 1)[1:] / draws
    p = np.arange(1, n + 1, dtype=float) ** -s
    p /= p.sum()
    # binomial standard error is at most sqrt(0.25/draws) ~ 0.0011
    assert np.abs(emp - p).max() < 0.006


def test_zipf_skew_top_rows_take_most_updates():
    rows = 1_000_000
    z = ZipfRows(rows, 1.1, np.random.default_rng(1))
    ids = z.sample(200_000)
    top = z.top_ids(rows // 100)
    assert np.isin(ids, top).mean() > 0.75  # 1% of rows, most updates
    counts = np.bincount(ids, minlength=rows)
    assert counts[z.top_ids(1)[0]] == counts.max()
    uniform = ZipfRows(rows, 0.0, np.random.default_rng(1)).sample(200_000)
    assert np.isin(uniform, top).mean() < 0.02


def test_zipf_scramble_is_a_bijection_that_spreads_hot_rows_over_shards():
    z = ZipfRows(10_007, 1.0, np.random.default_rng(5))
    all_ids = z.ids_of_ranks(np.arange(1, 10_008))
    assert np.array_equal(np.sort(all_ids), np.arange(10_007))
    spec = TableSpec("t", rows=1 << 20, dim=8, shards=64)
    hot = ZipfRows(spec.rows, 1.1, np.random.default_rng(5)).top_ids(1000)
    assert len(np.unique(spec.shards_of(hot))) > 50  # not all in shard 0
    plain = ZipfRows(spec.rows, 1.1, np.random.default_rng(5), scramble=False).top_ids(1000)
    assert np.array_equal(plain, np.arange(1000))


def test_zipf_validation():
    with pytest.raises(UsageError):
        ZipfRows(0, 1.0, np.random.default_rng())
    with pytest.raises(UsageError):
        ZipfRows(10, -1.0, np.random.default_rng())
    with pytest.raises(UsageError):
        ZipfRows(10, 1.0, np.random.default_rng()).sample(5, active=11)


def test_batches_follow_rate_and_interval_and_collapse_repeats():
    cfg = WorkloadConfig(sparse=[SparseTable("m", "t", rows=1_000_000, rows_per_s=10_000, zipf_s=1.2)],
                         batch_interval_s=0.5)
    w = Workload(cfg, np.random.default_rng(0))
    batches = list(w.batches(until=20.0))
    assert [b.time for b in batches] == pytest.approx([0.5 * k for k in range(1, 41)])
    assert abs(w.updates - 200_000) < 5 * np.sqrt(200_000)
    for b in batches:
        assert b.ids.dtype == np.int64 and b.impact.dtype == np.float32 and b.ids.shape == b.impact.shape
        assert len(np.unique(b.ids)) == len(b.ids)  # repeats collapsed
        assert (b.impact > 0).all()
    assert sum(len(b.ids) for b in batches) < w.updates  # hot rows repeat within a batch


def test_burst_multiplies_rate_within_its_window():
    cfg = WorkloadConfig(sparse=[SparseTable("m", "t", rows=1 << 20, rows_per_s=1000, zipf_s=0.0)],
                         bursts=[Burst(10.0, 20.0, 5.0)], batch_interval_s=1.0, poisson=False)
    w = Workload(cfg, np.random.default_rng(0))
    n_by_time = {b.time: len(b.ids) for b in w.batches(until=30.0)}
    # uniform over a million rows: almost no repeats, so ids ~ updates
    before = [n_by_time[float(t)] for t in range(1, 11)]
    during = [n_by_time[float(t)] for t in range(11, 21)]
    after = [n_by_time[float(t)] for t in range(21, 31)]
    assert all(990 <= n <= 1000 for n in before + after)
    assert all(4950 <= n <= 5000 for n in during)
    assert w.updates == 10 * 1000 + 10 * 5000 + 10 * 1000


def test_rate_integrates_bursts_across_batch_boundaries_and_filters_tables():
    a = SparseTable("m", "a", rows=100, rows_per_s=100)
    b = SparseTable("m", "b", rows=100, rows_per_s=100)
    cfg = WorkloadConfig(sparse=[a, b], bursts=[Burst(0.25, 0.75, 3.0, table="a"), Burst(0.5, 2.0, 2.0)])
    w = Workload(cfg, np.random.default_rng(0))
    # (0, 1]: a gets 0.25*1 + 0.25*3 + 0.25*(3*2) + 0.25*2 = 3 second-equivalents
    assert w.rate(a, 0.0, 1.0) == pytest.approx(300.0)
    assert w.rate(b, 0.0, 1.0) == pytest.approx(150.0)


def test_new_rows_are_brand_new_and_stop_when_the_table_is_full():
    spec = SparseTable("m", "t", rows=20_000, rows_per_s=2000, initial_rows=10_000, new_row_fraction=0.1,
                       zipf_s=1.0)
    w = Workload(WorkloadConfig(sparse=[spec]), np.random.default_rng(1))
    seen: set[int] = set(w.zipf("m", "t").ids_of_ranks(np.arange(1, 10_001)).tolist())
    fresh_total = 0
    for batch in w.batches(until=30.0):
        fresh = [i for i in batch.ids.tolist() if i not in seen]
        fresh_total += len(fresh)
        seen.update(fresh)
    assert fresh_total == w.new_rows
    assert abs(w.new_rows - 6000) < 5 * np.sqrt(6000 * 0.9)  # 10% of ~60k updates
    # the table fills up: later new-row draws are counted, not invented
    list(w.batches(until=200.0, start=30.0))
    assert w.new_rows == 10_000 and w.new_rows_exhausted > 0
    assert len(seen) <= spec.rows


def test_new_rows_get_higher_impact():
    spec = SparseTable("m", "t", rows=1 << 20, rows_per_s=50_000, initial_rows=1 << 19, new_row_fraction=0.5,
                       new_row_impact=10.0, impact_sigma=0.1, zipf_s=0.0)
    w = Workload(WorkloadConfig(sparse=[spec]), np.random.default_rng(2))
    batch = next(iter(w.batches(until=0.1)))
    born = w.zipf("m", "t").ids_of_ranks(np.arange((1 << 19) + 1, (1 << 19) + w.new_rows + 1))
    is_new = np.isin(batch.ids, born)
    assert 0.3 < is_new.mean() < 0.7
    assert batch.impact[is_new].mean() > 5 * batch.impact[~is_new].mean()


def test_dense_tables_are_updated_whole_every_period():
    cfg = WorkloadConfig(sparse=[SparseTable("m", "emb", rows=1000, rows_per_s=10)],
                         dense=[DenseTable("m", "mlp", rows=16, period_s=2.5, offset_s=1.0, impact=0.5)],
                         batch_interval_s=1.0)
    batches = list(Workload(cfg, np.random.default_rng(0)).batches(until=8.0))
    dense = [b for b in batches if b.table == "mlp"]
    assert [b.time for b in dense] == [1.0, 3.5, 6.0]
    assert all(np.array_equal(b.ids, np.arange(16)) and (b.impact == 0.5).all() for b in dense)
    times = [b.time for b in batches]
    assert times == sorted(times)
    assert [b.table for b in batches if b.time == 1.0] == ["emb", "mlp"]  # ties: sparse first


def test_same_seed_same_batches():
    cfg = WorkloadConfig(sparse=[SparseTable("m", "t", rows=50_000, rows_per_s=3000, new_row_fraction=0.05,
                                             initial_rows=40_000)],
                         bursts=[Burst(1.0, 2.0, 3.0)])

    def run(seed):
        return [(b.time, b.ids.tolist(), b.impact.tolist()) for b in
                Workload(cfg, np.random.default_rng(seed)).batches(until=3.0)]

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_drive_delivers_on_the_simulation_clock_and_stops():
    sim = Simulation(4)
    cfg = WorkloadConfig(sparse=[SparseTable("m", "t", rows=1000, rows_per_s=100)], batch_interval_s=0.25)
    w = Workload(cfg, sim.derive_np_rng("workload"))
    seen = []

    def on_batch(b):
        assert sim.now == b.time
        seen.append(b.time)
        if len(seen) == 6:
            driver.stop()

    driver = w.drive(sim, on_batch)
    sim.run(until=100.0)
    assert seen == pytest.approx([0.25 * k for k in range(1, 7)]) and driver.delivered == 6


def test_config_validation():
    with pytest.raises(UsageError):
        SparseTable("m", "t", rows=10, rows_per_s=-1)
    with pytest.raises(UsageError):
        SparseTable("m", "t", rows=10, rows_per_s=1, initial_rows=11)
    with pytest.raises(UsageError):
        Burst(2.0, 1.0, 2.0)
    with pytest.raises(UsageError):
        WorkloadConfig(sparse=[SparseTable("m", "t", 10, 1), SparseTable("m", "t", 10, 1)])
    with pytest.raises(UsageError):
        WorkloadConfig(batch_interval_s=0)
    w = Workload(WorkloadConfig(sparse=[SparseTable("m", "t", 10, 1e12)]), np.random.default_rng())
    with pytest.raises(UsageError):
        list(w.batches(until=1.0))
