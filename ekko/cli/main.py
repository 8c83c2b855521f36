"""The ``ekko`` command line.

This module owns the argparse skeleton and two subcommands:

* ``ekko daemon`` -- run one replica (:class:`ekko.server.daemon.Daemon`) until
  SIGTERM/SIGINT; exits 0 after a graceful shutdown.
* ``ekko status`` -- ask a replica for ``/v1/status`` and print it as tables
  (``--cluster``: every member with its DC, state and freshness lag).

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
import json
import logging
import sys
import urllib.error
import urllib.request
from typing import Any

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

#: seconds ``ekko status`` waits for a replica's answer.
STATUS_TIMEOUT_S = 10.0
#: hex characters of a table digest shown by ``ekko status``.
DIGEST_PREFIX = 12
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
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _add_daemon(sub)
    _add_status(sub)
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


# --------------------------------------------------------------------------- ekko status
def _add_status(sub: Any) -> None:
    p = sub.add_parser("status", help="show a replica's models and the cluster's freshness",
                       description="Ask a replica for /v1/status and print it.")
    p.add_argument("--peer", required=True, metavar="HOST:PORT", help="replica to ask")
    p.add_argument("--json", action="store_true", help="print the raw JSON")
    p.add_argument("--cluster", action="store_true", help="also list every member with DC, state and lag")
    p.set_defaults(func=cmd_status)


def fetch_status(peer: str, cluster: bool = False, timeout: float = STATUS_TIMEOUT_S) -> dict[str, Any]:
    """GET ``/v1/status`` from ``peer``; raises :class:`RuntimeError` with a readable message."""
    url = f"http://{peer}/v1/status" + ("?cluster=1" if cluster else "")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as e:
        try:
            detail = json.loads(e.read()).get("error", "")
        except (ValueError, AttributeError):
            detail = ""
        raise RuntimeError(f"{peer} answered {e.code}: {detail or e.reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise RuntimeError(f"cannot reach {peer}: {reason}") from None


def _fmt_lag(s: Any) -> str:
    return "-" if s is None else f"{float(s):.3f}s"


def render_status(st: dict[str, Any], console: Any = None) -> None:
    """Print a status answer as rich tables."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    console.print(f"[bold]{st.get('node_id')}[/] dc={st.get('dc')} address={st.get('address')} "
                  f"incarnation={st.get('incarnation')}"
                  + ("" if st.get("serving", True) else " [red](draining)[/]"))
    t = Table(title="models", show_lines=False)
    for col in ("model", "table", "rows", "written", "dim", "dtype", "shards", "digest", "head", "lag"):
        t.add_column(col, justify="right" if col in ("rows", "written", "dim", "shards", "head", "lag") else "left")
    models = st.get("models", {})
    for name in sorted(models):
        m = models[name]
        for i, (tname, info) in enumerate(sorted(m.get("tables", {}).items())):
            first = i == 0
            t.add_row(name if first else "", tname, str(info.get("rows")), str(info.get("written_rows")),
                      str(info.get("dim")), str(info.get("dtype")) + (" dense" if info.get("dense") else ""),
                      str(info.get("shards")), str(info.get("digest", "-"))[:DIGEST_PREFIX],
                      str(m.get("head")) if first else "", _fmt_lag(m.get("lag_s")) if first else "")
    if not models:
        console.print("no models registered")
    else:
        console.print(t)
    _render_quality(models, console)
    members = st.get("members")
    if members is not None:
        names = sorted(models)
        c = Table(title=f"cluster ({len(members)} members)")
        for col in ("node", "dc", "address", "state", "incarnation"):
            c.add_column(col)
        for n in names:
            c.add_column(f"lag {n}", justify="right")
        colour = {"alive": "green", "suspect": "yellow", "dead": "red"}
        for mem in members:
            state = mem.get("state", "?")
            c.add_row(mem.get("node_id", "?"), mem.get("dc", "?"), mem.get("address", "?"),
                      f"[{colour.get(state, 'white')}]{state}[/]", str(mem.get("incarnation")),
                      *[_fmt_lag(mem.get("lag_s", {}).get(n)) for n in names])
        console.print(c)


def _render_quality(models: dict[str, Any], console: Any) -> None:
    """Model states (this replica, the cluster) and incidents, when any model has quality data."""
    from rich.table import Table

    colour = {"healthy": "green", "warmup": "white", "uncertain": "yellow", "corrupted": "red"}
    q = {name: m["quality"] for name, m in sorted(models.items()) if isinstance(m.get("quality"), dict)}
    if not q:
        return
    t = Table(title="model states")
    for col in ("model", "here", "cluster", "replicas by state", "incidents"):
        t.add_column(col)
    for name, st in q.items():
        by = ", ".join(f"{k} {v}" for k, v in sorted(st.get("replicas_by_state", {}).items()))
        t.add_row(name, f"[{colour.get(st.get('state'), 'white')}]{st.get('state')}[/]",
                  f"[{colour.get(st.get('cluster_state'), 'white')}]{st.get('cluster_state')}[/]", by,
                  str(st.get("epoch", 0)))
    console.print(t)
    rows = [(name, inc) for name, st in q.items() for inc in st.get("incidents", [])]
    if rows:
        i = Table(title="incidents")
        for col in ("incident", "detected by", "metric", "effect", "cut", "restored", "restore"):
            i.add_column(col)
        for name, inc in rows:
            i.add_row(str(inc.get("id")), str(inc.get("detected_by")), str(inc.get("metric")),
                      f"{100.0 * float(inc.get('effect') or 0.0):.2f}%", str(inc.get("cut") or "- (none eligible)"),
                      "yes" if inc.get("restored_at") is not None else "no",
                      "-" if inc.get("restore_s") is None else f"{float(inc['restore_s']):.3f}s")
        console.print(i)


def cmd_status(args: argparse.Namespace) -> int:
    try:
        st = fetch_status(args.peer, cluster=args.cluster)
    except RuntimeError as e:
        print(f"ekko status: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(st, indent=2, sort_keys=True))
    else:
        render_status(st)
    return 0


# --------------------------------------------------------------------------- entry point
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
