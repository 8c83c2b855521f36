"""The long-running replica daemon: HTTP handlers, recovery and snapshots, timers, the
HTTP transport, metrics and back-pressure.  Everything that touches sockets and clocks
for a replica lives here; the node it drives (:mod:`ekko.replica`) stays sans-IO.
"""
