"""EkkoScorer on hand-computed examples, and the magnitude helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ekko.core.errors import UsageError
from prioritizer import (EkkoScorer, ModelWeights, Prioritizer, Scorer, ScorerConfig, fill_unknown_impact,
                         magnitude_from_values)

F, T = False, True


def f32(*xs):
    return np.array(xs, dtype=np.float32)


def test_formula_cold_start_then_history():
    s = EkkoScorer(ScorerConfig(models={"ads": ModelWeights(traffic_share=0.5, new_row_bonus=2.0)}))
    # cold start: p_g relative to this batch's mean (2.0): [0.5, 1.5]; + p_u on the new row; * p_m
    out = s("ads", f32(1.0, 3.0), np.array([F, T]), now=0.0)
    assert out.dtype == np.float32
    assert out.tolist() == [(0.5 + 0) * 0.5, (1.5 + 2.0) * 0.5]
    # history: average 2.0 (two rows); this batch is judged against it, not itself
    out = s("ads", f32(4.0, 8.0), np.array([F, F]), now=0.0)
    assert out.tolist() == [2.0 * 0.5, 4.0 * 0.5]
    # now the average is (1 + 3 + 4 + 8) / 4 = 4
    assert s.average("ads", 0.0) == pytest.approx(4.0)


def test_running_average_decays_with_half_life():
    s = EkkoScorer(ScorerConfig(average_halflife_s=60.0))
    s("m", f32(1, 1, 1, 1), np.zeros(4, bool), now=0.0)              # sum 4, weight 4
    out = s("m", f32(10, 10, 10, 10), np.zeros(4, bool), now=60.0)   # avg before: still 1.0
    assert out.tolist() == [10.0] * 4
    # after: (4 * 0.5 + 40) / (4 * 0.5 + 4) = 42 / 6 = 7
    assert s.average("m", 60.0) == pytest.approx(7.0)
    # the mean of decayed weights is unchanged by decay alone
    assert s.average("m", 600.0) == pytest.approx(7.0)
    out = s("m", f32(7.0), np.zeros(1, bool), now=600.0)
    assert out.tolist() == [1.0]


def test_unknown_impact_is_an_average_update():
    s = EkkoScorer(ScorerConfig(default=ModelWeights(1.0, 1.0)))
    out = s("m", f32(np.nan, np.nan), np.array([F, T]), now=0.0)     # nothing known at all
    assert out.tolist() == [1.0, 2.0]
    assert s.average("m", 0.0) is None
    s("m", f32(2.0), np.array([F]), now=0.0)
    out = s("m", f32(np.nan, -1.0, np.inf, 4.0), np.zeros(4, bool), now=0.0)   # bad values: unknown too
    assert out.tolist() == [1.0, 1.0, 1.0, 2.0]


def test_gradient_ratio_is_capped_and_zero_share_scores_zero():
    s = EkkoScorer(ScorerConfig(max_gradient_ratio=10.0, models={"off": ModelWeights(0.0, 5.0)}))
    s("m", f32(1.0), np.array([F]), now=0.0)
    assert s("m", f32(1e9, 0.0), np.array([F, F]), now=0.0).tolist() == [10.0, 0.0]
    assert s("off", f32(1.0, 2.0), np.array([T, F]), now=0.0).tolist() == [0.0, 0.0]


def test_models_are_independent_and_weights_change_at_runtime():
    s = EkkoScorer(ScorerConfig.from_traffic({"a": 3, "b": 1}, new_row_bonus=0.0))
    assert s.weights("a").traffic_share == 0.75 and s.weights("zzz") == ModelWeights()
    s("a", f32(100.0), np.array([F]), now=0.0)
    assert s("b", f32(1.0, 3.0), np.array([F, F]), now=0.0).tolist() == [0.125, 0.375]
    s.set_weights("b", ModelWeights(traffic_share=1.0, new_row_bonus=0.0))
    assert s("b", f32(2.0), np.array([F]), now=0.0).tolist() == [1.0]


def test_vectorized_matches_a_scalar_evaluation():
    rng = np.random.default_rng(0)
    cfg = ScorerConfig(default=ModelWeights(0.3, 1.5), max_gradient_ratio=50.0)
    s = EkkoScorer(cfg)
    s("m", rng.lognormal(size=100).astype(np.float32), np.zeros(100, bool), now=0.0)
    avg = s.average("m", 0.0)
    x = rng.lognormal(size=1000).astype(np.float32)
    x[::7] = np.nan
    new = rng.random(1000) < 0.1
    got = s("m", x, new, now=0.0)
    want = [((1.0 if np.isnan(v) else min(50.0, float(v) / avg)) + 1.5 * n) * 0.3 for v, n in zip(x, new)]
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_scorer_protocol_and_validation():
    scorer: Scorer = EkkoScorer()
    assert scorer("m", f32(1.0), np.array([F]), now=0.0).shape == (1,)
    with pytest.raises(UsageError):
        scorer("m", f32(1.0, 2.0), np.array([F]), now=0.0)
    for bad in (dict(traffic_share=1.5), dict(traffic_share=-0.1), dict(new_row_bonus=-1.0)):
        with pytest.raises(UsageError):
            ModelWeights(**bad)
    with pytest.raises(UsageError):
        ScorerConfig(average_halflife_s=0)
    with pytest.raises(UsageError):
        ScorerConfig.from_traffic({"a": 0})


def test_magnitude_from_values_numpy_torch_and_bf16():
    old = np.array([[0, 0, 0], [1, 1, 1], [300, 0, 0]], np.float32)
    new = np.array([[3, 4, 0], [1, 1, 1], [0, 400, 0]], np.float32)
    want = [5.0, 0.0, 500.0]
    assert magnitude_from_values(old, new).tolist() == want
    # float16 rows: the squares (250000) overflow float16, the result must not
    assert magnitude_from_values(old.astype(np.float16), new.astype(np.float16)).tolist() == want
    assert magnitude_from_values(torch.from_numpy(old), torch.from_numpy(new)).tolist() == want
    assert magnitude_from_values(None, new).tolist() == [5.0, float(np.float32(np.sqrt(3.0))), 400.0]
    bf = lambda a: (torch.from_numpy(a).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16))  # noqa: E731
    assert magnitude_from_values(bf(old), bf(new), dtype="bfloat16").tolist() == want
    with pytest.raises(UsageError):
        magnitude_from_values(None, np.zeros(3, np.float32))


def test_fill_unknown_impact_fills_only_nan_rows():
    old = np.zeros((3, 2), np.float32)
    new = np.array([[3, 4], [6, 8], [0, 1]], np.float32)
    out = fill_unknown_impact(f32(7.0, np.nan, np.nan), old, new)
    assert out.tolist() == [7.0, 10.0, 1.0]
    assert fill_unknown_impact(None, None, new).tolist() == [5.0, 10.0, 1.0]
    out = fill_unknown_impact(f32(np.nan, 2.0, np.nan), torch.from_numpy(old), torch.from_numpy(new))
    assert out.tolist() == [5.0, 2.0, 1.0]


def test_prioritizer_scores_classifies_and_learns():
    p = Prioritizer()
    rng = np.random.default_rng(1)
    for i in range(20):
        impact = rng.lognormal(size=5_000).astype(np.float32)
        r = p.queued_rows("m", "t", np.arange(5_000), np.full(5_000, i + 1), 256, now=float(i), impact=impact,
                          old_versions=np.where(rng.random(5_000) < 0.01, 0, 3))
    assert r.scores.dtype == np.float32 and r.high.dtype == bool
    assert 0.03 < r.high.mean() < 0.07                  # about the top 5%
    assert p.threshold.threshold("m") < np.inf
    with pytest.raises(UsageError):
        p.queued_rows("m", "t", np.arange(3), np.ones(3), 8, now=0.0, impact=f32(1.0))
