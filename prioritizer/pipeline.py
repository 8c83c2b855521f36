"""Wiring for the push path: score a batch once, classify it, and make per-link queues.

A node applies a batch of row updates, then queues references to the rows that
changed on every outbound link.  Scoring and the threshold are per node, not
per link (every link sees the same rows), so :class:`Prioritizer` runs once
per batch and hands back a :class:`~p2p.outbound.QueuedRows` with ``scores`` and
``high`` filled in, which the node ``put``\\ s on each link's queue.  The queue
factories build one queue per link with that link's budget, matching
:data:`p2p.outbound.QueueFactory`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ekko.core.errors import UsageError
from p2p.outbound import DEFAULT_QUEUE_ROWS, QueueFactory, QueuedRows
from prioritizer.budget import LinkBudgets
from prioritizer.popularity import AccessTracker
from prioritizer.quantile import ThresholdTracker
from prioritizer.queue import FifoBudgetQueue, PriorityLinkQueue, QueueConfig
from prioritizer.scoring import EkkoScorer, Scorer

#: ``observer(model, table, rows)`` sees every classified batch (simulator, metrics).
ClassifyObserver = Callable[[str, str, QueuedRows], None]

#: the Ekko paper's example split: the top 5% of updates are high priority.
DEFAULT_K_PERCENT = 5.0


class Prioritizer:
    """Scores row updates and marks the top k% of each model high priority.

    The score is the scorer's (Ekko's ``(p_g + p_u) * p_m`` by default) times
    the row's popularity ``p_a`` (:class:`~prioritizer.popularity.AccessTracker`:
    its update rate over the average's), the paper's traffic share ``p_m``
    carried down from models to rows.  The top-k% threshold is taken on that
    product, so "high" means a large change to a row that is read often.

    Args:
        scorer: any :class:`~prioritizer.scoring.Scorer`; default ``EkkoScorer()``.
        threshold: the per-model top-k% tracker; default
            ``ThresholdTracker(DEFAULT_K_PERCENT, rng=0)``.
        access: the per-row popularity tracker; default ``AccessTracker()``;
            ``False`` leaves it out (every row weighs the same, as in the paper).

    Example:
        >>> import numpy as np
        >>> p = Prioritizer(access=False)
        >>> rows = p.queued_rows("m", "t", ids=np.arange(4), versions=np.full(4, 7), row_bytes=256, now=0.0,
        ...                      impact=np.array([1, 1, 1, 5], np.float32), old_versions=np.array([3, 3, 3, 3]))
        >>> rows.scores.tolist(), rows.high.tolist()
        ([0.5, 0.5, 0.5, 2.5], [False, False, False, True])
    """

    def __init__(self, scorer: Scorer | None = None, threshold: ThresholdTracker | None = None,
                 access: AccessTracker | None | bool = None) -> None:
        self.scorer = scorer if scorer is not None else EkkoScorer()
        self.threshold = threshold if threshold is not None else ThresholdTracker(DEFAULT_K_PERCENT, rng=0)
        self.access: AccessTracker | None = (AccessTracker() if access is None or access is True else
                                             (access or None))
        self.observers: list[ClassifyObserver] = []

    def queued_rows(self, model: str, table: str, ids: np.ndarray, versions: np.ndarray, row_bytes: int,
                    now: float, impact: np.ndarray | None = None, old_versions: np.ndarray | None = None,
                    is_new: np.ndarray | None = None) -> QueuedRows:
        """Score a batch and classify it (the threshold learns from the batch first).

        Args:
            ids, versions: the rows that changed and their new packed versions.
            row_bytes: wire bytes of one row's value.
            now: current time, seconds.
            impact: float32 magnitude per row (NaN/None = unknown; fill it first with
                :func:`~prioritizer.scoring.fill_unknown_impact` when the old values are at hand).
            old_versions: versions before the update; ``0`` marks a new row.  The
                new-row bonus goes only to rows whose ``impact`` is unknown: a known
                magnitude is the change against the value replicas hold (for a row
                never written, against its initial value), so it already says how
                far a replica without the update is off, and a bonus on top would
                count a first write twice.
            is_new: alternatively, the new-row flags directly (taken as given).
        """
        ids = np.asarray(ids, dtype=np.int64)
        n = ids.shape[0]
        if impact is None:
            impact = np.full(n, np.nan, np.float32)
        if is_new is None:
            if old_versions is not None:
                if np.shape(old_versions) != (n,):
                    raise UsageError(f"old_versions must have shape ({n},)")
                is_new = (np.asarray(old_versions) == 0) & np.isnan(np.asarray(impact, np.float32))
            else:
                is_new = np.zeros(n, bool)
        if np.shape(impact) != (n,) or np.shape(is_new) != (n,):
            raise UsageError(f"impact and is_new/old_versions must have shape ({n},)")
        scores = self.scorer(model, impact, is_new, now)
        if self.access is not None:
            scores = scores * self.access.observe(model, table, ids, now)
        self.threshold.update(model, scores, now)
        high = self.threshold.is_high(model, scores)
        rows = QueuedRows(model, table, ids, np.asarray(versions, dtype=np.int64), int(row_bytes),
                          scores=scores, high=high)
        for obs in self.observers:
            obs(model, table, rows)
        return rows


def priority_queue_factory(local_dc: str, budgets: LinkBudgets | None = None,
                           config: QueueConfig | None = None) -> QueueFactory:
    """``factory(peer_id, peer_dc)`` making a :class:`PriorityLinkQueue` with the link's budget.

    Example:
        >>> f = priority_queue_factory("us", LinkBudgets())
        >>> f("peer-7", "eu").bucket.rate
        3125000.0
    """
    budgets = budgets if budgets is not None else LinkBudgets()

    def make(peer_id: str, peer_dc: str) -> PriorityLinkQueue:
        return PriorityLinkQueue(budgets.bucket(local_dc, peer_dc), config)

    return make


def fifo_queue_factory(local_dc: str, budgets: LinkBudgets | None = None,
                       max_rows: int = DEFAULT_QUEUE_ROWS) -> QueueFactory:
    """``factory(peer_id, peer_dc)`` making the ``fifo`` baseline: same budget and bound, FIFO order."""
    budgets = budgets if budgets is not None else LinkBudgets()

    def make(peer_id: str, peer_dc: str) -> FifoBudgetQueue:
        return FifoBudgetQueue(budgets.bucket(local_dc, peer_dc), max_rows=max_rows)

    return make
