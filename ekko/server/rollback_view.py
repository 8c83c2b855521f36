"""What a replica tells trainers about rollbacks: the server half of :mod:`ekko.sdk.rollback_watch`.

A publish acknowledgement carries ``"rollbacks": [[id, cut], ...]``
(:func:`rollback_keys`) and ``GET /v1/models/{model}/rollbacks`` answers
:func:`rollback_view`.  Both are sans-IO and only read a
:class:`ekko.replica.node.ReplicaNode`; the SDK side, which compares these
records with the ones a publisher knows, lives in :mod:`ekko.sdk.rollback_watch`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ekko.core.config import MAX_ACK_ROLLBACKS

if TYPE_CHECKING:  # pragma: no cover
    from ekko.replica.node import ReplicaNode


def rollback_keys(node: "ReplicaNode", model: str) -> list[list[str]]:
    """``[[rollback id, cut name], ...]`` of ``model``'s records held by ``node``, oldest first.

    Example:
        >>> from ekko.replica.node import ReplicaNode
        >>> rollback_keys(ReplicaNode("r1", "dc1", "127.0.0.1:1", device="cpu"), "m")
        []
    """
    out = []
    for rid, rec in node.rollbacks.items():
        if rec.get("model") == model:
            cut = rec.get("cut")
            out.append([rid, cut.get("name", "") if isinstance(cut, dict) else ""])
    return out[-MAX_ACK_ROLLBACKS:]


def rollback_view(node: "ReplicaNode", model: str) -> dict[str, Any]:
    """The answer of ``GET /v1/models/{model}/rollbacks``: the model's state here and its
    rollback records (id, cut, rollback point, incident), oldest first."""
    records = []
    for rid, cut in rollback_keys(node, model):
        rec = node.rollbacks[rid]
        upper = rec.get("upper") or []
        incident = None
        if isinstance(rec.get("incident"), dict):
            inc = rec["incident"]
            incident = {k: inc.get(w) for k, w in (("id", "id"), ("metric", "metric"), ("effect", "effect"),
                                                   ("statistic", "stat"), ("detected_by", "by"),
                                                   ("epoch", "epoch"))}
        records.append({"id": rid, "cut": cut, "point": max((int(c) for _, c in upper), default=0),
                        "incident": incident})
    return {"model": model, "state": node.quality.state(model).value, "rollbacks": records}
