"""A replica: the sans-IO node that composes the dissemination protocol (:mod:`p2p`) and
the rollback protocol (:mod:`rollback`) over a model store, plus its durable state
(snapshots and the write-ahead log).  The server drives it; the simulator drives it too.
"""
