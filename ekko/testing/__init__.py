"""Tools for tests and benches that exercise real daemons on one machine (a fault and
WAN-emulating TCP proxy); nothing in the product imports them."""
