"""simulator.report: CDF points drawn for large runs."""

from __future__ import annotations

import numpy as np

from simulator.report import cdf_points


def test_cdf_points_are_exact_points_of_the_empirical_cdf_within_the_limit():
    rng = np.random.default_rng(3)
    m = rng.exponential(0.1, size=(300, 1000))   # float64: no ties
    m[rng.random(m.shape) < 0.01] = np.nan            # unapplied samples are left out
    v = np.sort(m[~np.isnan(m)])
    x, f = cdf_points(m, limit=500)
    assert 2 <= len(x) <= 500
    assert x[0] == v[0] and x[-1] == v[-1] and f[-1] == 1.0
    assert np.all(np.diff(x) >= 0) and np.all(np.diff(f) > 0)
    # every drawn point lies on the empirical CDF: F(x) = share of samples <= x
    share = np.searchsorted(v, x, side="right") / len(v)
    np.testing.assert_allclose(f, share)


def test_small_samples_are_drawn_whole_and_empty_ones_give_nothing():
    x, f = cdf_points(np.array([0.3, 0.1, 0.2]))
    assert x.tolist() == [0.1, 0.2, 0.3] and f.tolist() == [1 / 3, 2 / 3, 1.0]
    x, f = cdf_points(np.array([np.nan, np.nan]))
    assert len(x) == 0 and len(f) == 0
