"""The long-running replica daemon: everything that touches sockets and clocks for a
replica lives here; the node it drives (:mod:`ekko.replica`) stays sans-IO.

* :mod:`ekko.server.daemon` -- :class:`~ekko.server.daemon.Daemon`: owns the node, wires
  the parts below, runs the lifecycle (startup, shutdown, lock file, signals).
* :mod:`ekko.server.driver` -- the timer loop and the node's outbox through the transport.
* :mod:`ekko.server.http_api` -- routes and request middleware; handlers in
  :mod:`ekko.server.ingest` (the write path) and :mod:`ekko.server.operator_api`
  (reads and operator actions); request frames read by :mod:`ekko.server.frames`.
* :mod:`ekko.server.persistence` -- snapshots, the write-ahead log, recovery.
* :mod:`ekko.server.rollback_view` -- what a replica tells trainers about rollbacks.
* :mod:`ekko.server.transport`, :mod:`ekko.server.metrics`, :mod:`ekko.server.backpressure`.
"""
