"""Serving from a replica's tensors (issue #17): :class:`Replica`, a replica inside the
serving process whose tables a module's parameters can be bound to, and :func:`attach`,
the tables of a sidecar daemon on the same host mapped read-only, and :func:`load`, a
one-time copy of a replica's parameters into a module, and :class:`RowCache`, hot rows
read over HTTP and kept fresh by the change feed."""

from ekko.serving.attach import Attached, attach
from ekko.serving.load import load
from ekko.serving.replica import Replica
from ekko.serving.row_cache import RowCache

__all__ = ["Attached", "Replica", "RowCache", "attach", "load"]
