"""Serving from a replica's tensors (issue #17): :class:`Replica`, a replica inside the
serving process whose tables a module's parameters can be bound to."""

from ekko.serving.replica import Replica

__all__ = ["Replica"]
