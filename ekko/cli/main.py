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
import gc
import importlib
import importlib.metadata
import logging
import sys
import textwrap
from typing import Any

from ekko.cli import status as status_cli

# Re-exported (noqa F401): tests and tools merge daemon settings and render status through this module.
from ekko.cli.settings import (  # noqa: F401
    DAEMON_KEYS,
    DEFAULT_TORCH_THREADS,
    KEY_CHOICES,
    REQUIRED_KEYS,
    daemon_settings,
    env_name,
)
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


def package_version() -> str:
    """The installed ekko distribution's version (what ``pip show ekko`` says)."""
    try:
        return importlib.metadata.version("ekko")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "(not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ekko", description="Low-latency model-update dissemination.")
    parser.add_argument("--version", action="version", version=f"ekko {package_version()}",
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
#: columns of the environment-variable list in ``ekko daemon --help``.
HELP_WIDTH = 78


def _add_daemon(sub: Any) -> None:
    required = ", ".join("--" + k.replace("_", "-") for k in REQUIRED_KEYS)
    env = textwrap.fill(" ".join(env_name(k) for k in DAEMON_KEYS), HELP_WIDTH, initial_indent="  ",
                        subsequent_indent="  ")
    p = sub.add_parser(
        "daemon", help="run a replica daemon", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=f"Run one replica until SIGTERM/SIGINT.\n\nRequired: {required}; each as a flag, as an\n"
                    "EKKO_* environment variable, or in the [daemon] table of --config.\n"
                    "Precedence: flags > environment > config file > defaults.",
        epilog=f"environment variables (one per flag; EKKO_SEEDS is comma-separated, EKKO_OPEN_METRICS\n"
               f"is 1/true or 0/false):\n{env}")

    def need(key: str, text: str) -> str:
        return ("(required) " if key in REQUIRED_KEYS else "") + f"{text} [{env_name(key)}]"

    p.add_argument("--node-id", help=need("node_id", "unique replica name"))
    p.add_argument("--dc", help=need("dc", "data centre of this replica"))
    p.add_argument("--listen", metavar="HOST:PORT", help=need("listen", "address to serve on"))
    p.add_argument("--advertise", metavar="HOST:PORT", help=need("advertise", "address peers use (default: --listen)"))
    p.add_argument("--seed", dest="seeds", action="append", metavar="HOST:PORT",
                   help=need("seeds", "replica to join through (repeatable)"))
    p.add_argument("--data-dir", help=need("data_dir", "directory for snapshots and the write-ahead log"))
    p.add_argument("--config", metavar="FILE.toml", help="TOML file: [node] protocol config, [daemon] flags")
    p.add_argument("--preset", choices=KEY_CHOICES["preset"], help=need("preset", "protocol timing preset"))
    p.add_argument("--key-file", help=need("key_file", "file holding the cluster key (HMAC-SHA256); with a key, every "
                                         "frame and every read but /healthz must be signed"))
    p.add_argument("--keyring", dest="keyring_file", metavar="FILE",
                   help=need("keyring_file", "keyring file (ekko keys; mode 600) instead of --key-file; "
                                             "re-read on SIGHUP"))
    p.add_argument("--device", choices=KEY_CHOICES["device"],
                   help=need("device", "where tensors live (default: cuda if present)"))
    p.add_argument("--log-level", choices=KEY_CHOICES["log_level"], help=need("log_level", "default: info"))
    p.add_argument("--torch-threads", type=int, metavar="N",
                   help=need("torch_threads", f"torch intra-op threads (default {DEFAULT_TORCH_THREADS}: "
                                              "the daemon's tensor ops are small)"))
    p.add_argument("--apply-trace", metavar="DIR",
                   help=need("apply_trace", "for benches: record every applied row with its wall time in "
                                            "DIR/<model>.<table>.applies (25 bytes a row)"))
    p.add_argument("--open-metrics", action=argparse.BooleanOptionalAction, default=None,
                   help=need("open_metrics", "serve /metrics unsigned although the daemon holds keys, for "
                                             "Prometheus scrapers (every other read still needs a signature; "
                                             "default off)"))
    p.add_argument("--frame-mac", choices=KEY_CHOICES["frame_mac"],
                   help=need("frame_mac", "how this daemon signs frames, whatever its keys say (default: the "
                                          "keyring's, blake3); hmac-sha256 while a cluster upgrades from daemons "
                                          "that verify only that"))
    p.add_argument("--event-loop", choices=KEY_CHOICES["event_loop"],
                   help=need("event_loop", "the asyncio event loop: uvloop (libuv, in C), asyncio's own, or auto "
                                           "(default: uvloop where it is installed)"))
    p.set_defaults(func=cmd_daemon)


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
                        advertise=settings.get("advertise"), keyring_file=settings.get("keyring_file"),
                        apply_trace=settings.get("apply_trace"), open_metrics=settings["open_metrics"],
                        frame_mac=settings.get("frame_mac"))
        loop_factory = event_loop_factory(settings.get("event_loop") or "auto")
    except UsageError as e:
        print(f"ekko daemon: {e}", file=sys.stderr)
        return 2
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(daemon.serve(ready=_freeze_startup_objects))
    except UsageError as e:  # e.g. the data dir is locked by another daemon
        print(f"ekko daemon: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. the port is taken
        print(f"ekko daemon: cannot serve on {settings['listen']}: {e}", file=sys.stderr)
        return 1
    return 0


def event_loop_factory(choice: str) -> Any:
    """The daemon's event loop: uvloop's where ``choice`` is "uvloop" (it must be installed)
    or "auto" and it is installed, else None (asyncio's own).  uvloop runs the loop and
    the sockets' reads and writes in C (libuv): a daemon's time goes to many small
    messages, and the event loop and transport were a fifth of its busy samples
    (py-spy, bench/daemon_profile.py)."""
    from ekko.core.errors import UsageError
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise UsageError("--event-loop uvloop: uvloop is not installed (pip install uvloop)") from None
        return None
    return uvloop.new_event_loop


def _freeze_startup_objects() -> None:
    """Move what the daemon holds once it serves (torch's and aiohttp's modules, the
    restored models: ~170k objects) out of the collector's reach: every full collection
    walked them all again, a pause of milliseconds that hit a publish at random (1k-row
    publishes in-process: 2.78 -> 2.35 ms p50 without the collector).  The daemon's own
    objects are long-lived and acyclic; new garbage is still collected."""
    gc.collect()
    gc.freeze()


# --------------------------------------------------------------------------- entry point
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
