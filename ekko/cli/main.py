"""The ``ekko`` command line.

This module owns the argparse skeleton (with ``ekko --version``) and ``ekko daemon``
-- run one replica (:class:`ekko.server.daemon.Daemon`) until SIGTERM/SIGINT; exits 0
after a graceful shutdown.  ``ekko status`` and ``ekko members`` (a replica's
``/v1/status`` as tables) live in :mod:`ekko.cli.status`; every command that talks to
a replica takes ``--peer`` or ``$EKKO_PEER`` (:mod:`ekko.cli.options`).

Other subcommands (``demo``, ``rollback``, ``sim`` ...) live in their own
modules and register themselves: each module named in
:data:`SUBCOMMAND_MODULES` that exists defines ``register_cli(subparsers)``,
which adds its parser(s) and sets ``func=handler`` where ``handler(args) -> int``
returns the exit status.  Modules are imported only when the parser is built,
and a missing module is skipped, so every subcommand stays optional.

Example::

    ekko daemon --node-id r1 --dc dc1 --listen 127.0.0.1:7070 --data-dir /tmp/r1 --preset local
    ekko status --peer 127.0.0.1:7070 --cluster
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Any

from ekko import __version__
from ekko.cli import status as status_cli
# Re-exported: tests and tools render and fetch status through this module.
from ekko.cli.status import STATUS_TIMEOUT_S, fetch_status, render_status  # noqa: F401

# ---------------------------------------------------------------------------------------------
# Other subcommands register here.  Each module (if it exists) provides
#     def register_cli(subparsers: argparse._SubParsersAction) -> None
# and sets ``func`` on its parser(s) to ``handler(args: argparse.Namespace) -> int``.
# Keep module-level imports of these modules light: they load for every ``ekko`` command.
SUBCOMMAND_MODULES: tuple[str, ...] = (
    "ekko.cli.demo",          # ekko demo: a local cluster with a training loop
    "ekko.cli.rollback",  # ekko rollback
    "ekko.cli.keys",      # ekko keys: keyring files and rotation
    "simulator.cli",      # ekko sim run SCENARIO
)
# ---------------------------------------------------------------------------------------------

#: [daemon] keys a config file may set (the command-line flags without dashes).
DAEMON_KEYS = ("node_id", "dc", "listen", "advertise", "seeds", "data_dir", "key_file", "device", "preset",
               "log_level", "torch_threads", "keyring_file")
#: default torch intra-op threads of a daemon.  Its tensor work is gathers and scatters of
#: the rows in one message (memory-bound, small), issued from one event-loop thread; an
#: OpenMP team only adds wake-up latency, which explodes on a busy host (a 1.5k-row
#: index_select measured 13 ms with 2 threads vs 0.03 ms with 1 on a loaded 2-core box).
DEFAULT_TORCH_THREADS = 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ekko", description="Low-latency model-update dissemination.")
    parser.add_argument("--version", action="version", version=f"ekko {__version__}",
                        help="print the version of ekko and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _add_daemon(sub)
    status_cli.register_cli(sub)
    for name in SUBCOMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name is not None and (name == e.name or name.startswith(e.name + ".")):
                continue  # that subcommand is not part of this build
            print(f"ekko: subcommands of {name} unavailable: {e}", file=sys.stderr)
            continue
        except Exception as e:  # a broken optional subcommand must not take `ekko daemon` down
            print(f"ekko: subcommands of {name} unavailable: {type(e).__name__}: {e}", file=sys.stderr)
            continue
        register = getattr(mod, "register_cli", None)
        if register is not None:
            register(sub)
    return parser


# --------------------------------------------------------------------------- ekko daemon
def _add_daemon(sub: Any) -> None:
    p = sub.add_parser("daemon", help="run a replica daemon",
                       description="Run one replica until SIGTERM/SIGINT. Flags override the config file.")
    p.add_argument("--node-id", help="unique replica name")
    p.add_argument("--dc", help="data centre of this replica")
    p.add_argument("--listen", metavar="HOST:PORT", help="address to serve on")
    p.add_argument("--advertise", metavar="HOST:PORT", help="address peers use (default: --listen)")
    p.add_argument("--seed", dest="seeds", action="append", metavar="HOST:PORT",
                   help="replica to join through (repeatable)")
    p.add_argument("--data-dir", help="directory for snapshots")
    p.add_argument("--config", metavar="FILE.toml", help="TOML file: [node] protocol config, [daemon] flags")
    p.add_argument("--preset", choices=["local", "lan", "wan"], help="protocol timing preset")
    p.add_argument("--key-file", help="file holding the cluster key (HMAC-SHA256)")
    p.add_argument("--keyring", dest="keyring_file", metavar="FILE",
                   help="keyring file (ekko keys; mode 600) instead of --key-file; re-read on SIGHUP")
    p.add_argument("--device", choices=["cpu", "cuda"], help="where tensors live (default: cuda if present)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="default: info")
    p.add_argument("--torch-threads", type=int, metavar="N",
                   help=f"torch intra-op threads (default {DEFAULT_TORCH_THREADS}: the daemon's tensor ops are small)")
    p.set_defaults(func=cmd_daemon)


def daemon_settings(args: argparse.Namespace) -> tuple[dict[str, Any], Any]:
    """Merge the config file and the flags: ``(settings, NodeConfig)``; flags win."""
    from ekko.core.config import config_from_dict, load_config
    from ekko.core.errors import UsageError

    raw: dict[str, Any] = load_config(args.config) if args.config else {}
    unknown = set(raw) - {"node", "daemon"}
    if unknown:
        raise UsageError(f"unknown tables in {args.config}: {sorted(unknown)} (use [node] and [daemon])")
    file_daemon = dict(raw.get("daemon", {}))
    bad = set(file_daemon) - set(DAEMON_KEYS)
    if bad:
        raise UsageError(f"unknown [daemon] keys: {sorted(bad)}; known: {list(DAEMON_KEYS)}")
    settings = {k: file_daemon.get(k) for k in DAEMON_KEYS}
    for k in DAEMON_KEYS:
        v = getattr(args, k, None)
        if v is not None:
            settings[k] = v
    missing = [k for k in ("node_id", "dc", "listen", "data_dir") if not settings.get(k)]
    if missing:
        raise UsageError("missing " + ", ".join("--" + k.replace("_", "-") for k in missing))
    node_cfg = dict(raw.get("node", {}))
    if settings.get("preset"):
        node_cfg["preset"] = settings["preset"]
    seeds = settings.get("seeds") or []
    if isinstance(seeds, str) or not all(isinstance(s, str) for s in seeds):
        raise UsageError("seeds must be a list of HOST:PORT strings")
    settings["seeds"] = list(seeds)
    threads = settings.get("torch_threads")
    if threads is None:
        settings["torch_threads"] = DEFAULT_TORCH_THREADS
    elif not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise UsageError("torch_threads must be a positive integer")
    return settings, config_from_dict(node_cfg)


def _read_key(path: str) -> bytes:
    from ekko.core.errors import UsageError
    try:
        with open(path, "rb") as f:
            key = f.read().strip()
    except OSError as e:
        raise UsageError(f"cannot read key file {path}: {e}") from None
    if len(key) < 8:
        raise UsageError(f"key file {path} holds fewer than 8 bytes")
    return key


def cmd_daemon(args: argparse.Namespace) -> int:
    import asyncio

    from ekko.core.errors import UsageError

    try:
        settings, config = daemon_settings(args)
        key = _read_key(settings["key_file"]) if settings.get("key_file") else None
        logging.basicConfig(level=getattr(logging, (settings.get("log_level") or "info").upper()),
                            format=f"%(asctime)s %(levelname)s {settings['node_id']} %(name)s: %(message)s",
                            stream=sys.stderr)
        import torch

        from ekko.server.daemon import Daemon  # heavy (torch): only for this command
        torch.set_num_threads(settings["torch_threads"])
        daemon = Daemon(settings["node_id"], settings["dc"], settings["listen"], settings["seeds"],
                        settings["data_dir"], config, key=key, device=settings.get("device"),
                        advertise=settings.get("advertise"), keyring_file=settings.get("keyring_file"))
    except UsageError as e:
        print(f"ekko daemon: {e}", file=sys.stderr)
        return 2
    try:
        asyncio.run(daemon.serve())
    except UsageError as e:  # e.g. the data dir is locked by another daemon
        print(f"ekko daemon: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. the port is taken
        print(f"ekko daemon: cannot serve on {settings['listen']}: {e}", file=sys.stderr)
        return 1
    return 0


# --------------------------------------------------------------------------- entry point
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
