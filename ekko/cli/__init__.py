"""The ``ekko`` command line: the daemon, status, keys, cuts and rollback, the simulator,
and the local demo."""
