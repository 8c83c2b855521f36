"""The priority scheduler: scoring, top-k% thresholds, bandwidth budgets and per-link queues.

After the Ekko paper (OSDI'22): an update's priority is ``(p_g + p_u) * p_m``
(:mod:`prioritizer.scoring`); the top k% per model, by a threshold estimated
from recent scores (:mod:`prioritizer.quantile`), is high priority; per-link
queues (:mod:`prioritizer.queue`) send high rows first and at once within a
token-bucket budget that leaves room for inference traffic
(:mod:`prioritizer.budget`), age everything else so it still converges,
coalesce repeats, and bound their memory.  Everything is sans-IO.

Wiring (:mod:`prioritizer.pipeline`)::

    prio = Prioritizer(EkkoScorer(ScorerConfig.from_traffic({"ads": 60, "feed": 40})),
                       ThresholdTracker(k_percent=5, rng=seed))
    factory = priority_queue_factory(local_dc, LinkBudgets.from_capacity(...))
    rows = prio.queued_rows(model, table, ids, versions, row_bytes, now, impact, old_versions)
    for q in link_queues: q.put(rows, now)
"""

from prioritizer.budget import LinkBudgets, TokenBucket
from prioritizer.pipeline import DEFAULT_K_PERCENT, Prioritizer, fifo_queue_factory, priority_queue_factory
from prioritizer.quantile import EpochQuantile, ThresholdTracker, rank_error_bound
from prioritizer.queue import FifoBudgetQueue, PriorityLinkQueue, QueueConfig, QueueStats
from prioritizer.scoring import (EkkoScorer, ModelWeights, Scorer, ScorerConfig, fill_unknown_impact,
                                 magnitude_from_values)

__all__ = [
    "DEFAULT_K_PERCENT", "EkkoScorer", "EpochQuantile", "FifoBudgetQueue", "LinkBudgets", "ModelWeights",
    "Prioritizer", "PriorityLinkQueue", "QueueConfig", "QueueStats", "Scorer", "ScorerConfig",
    "ThresholdTracker", "TokenBucket", "fifo_queue_factory", "fill_unknown_impact", "magnitude_from_values",
    "priority_queue_factory", "rank_error_bound",
]
