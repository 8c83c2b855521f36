"""The settings of ``ekko daemon``: flags, ``EKKO_*`` environment variables and the
TOML file, merged.

Precedence, highest first: command-line flags, environment variables
(``EKKO_`` + the key in capitals: ``EKKO_NODE_ID``, ``EKKO_DC``, ``EKKO_LISTEN``,
``EKKO_DATA_DIR``, ``EKKO_SEEDS`` as ``HOST:PORT,HOST:PORT``, ``EKKO_OPEN_METRICS`` as
``1``/``true``/``0``/``false`` ...; one per :data:`DAEMON_KEYS` entry), the ``[daemon]``
table of ``--config``, defaults.  The ``[node]`` table of the file is the protocol
configuration (:func:`ekko.core.config.config_from_dict`).  Every value is checked: a wrong type
or an unknown name is a :class:`~ekko.core.errors.UsageError` naming the key, what
it must be and where it came from.

Example::

    EKKO_NODE_ID=r1 EKKO_DC=dc1 EKKO_DATA_DIR=/var/lib/ekko/r1 \\
        ekko daemon --config replica.toml --listen 0.0.0.0:7070
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Mapping

from ekko.core.codec import MACS
from ekko.core.config import PRESETS, config_from_dict, load_config
from ekko.core.errors import UsageError

#: [daemon] keys a config file may set (the command-line flags without dashes).
DAEMON_KEYS = ("node_id", "dc", "listen", "advertise", "seeds", "data_dir", "key_file", "device", "preset",
               "log_level", "torch_threads", "keyring_file", "apply_trace", "open_metrics", "frame_mac",
               "event_loop")
#: keys a daemon cannot start without, whichever of flags, environment or file gives them.
REQUIRED_KEYS = ("node_id", "dc", "listen", "data_dir")
#: prefix of the environment variable of each daemon key (``EKKO_NODE_ID`` ...).
ENV_PREFIX = "EKKO_"
#: keys whose value is a list (``seeds``); in the environment, comma-separated.
LIST_KEYS = ("seeds",)
#: keys whose value is an integer.
INT_KEYS = ("torch_threads",)
#: keys whose value is true or false (TOML booleans; in the environment, one of BOOL_WORDS).
BOOL_KEYS = ("open_metrics",)
#: how the environment spells a boolean key's value.
BOOL_WORDS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False,
              "off": False}
#: allowed values of the keys that have a fixed set (the flags' choices too).
KEY_CHOICES: dict[str, tuple[str, ...]] = {"device": ("cpu", "cuda"), "preset": tuple(PRESETS),
                                           "log_level": ("debug", "info", "warning", "error"),
                                           "frame_mac": MACS, "event_loop": ("auto", "uvloop", "asyncio")}
#: default torch intra-op threads of a daemon.  Its tensor work is gathers and scatters of
#: the rows in one message (memory-bound, small), issued from one event-loop thread; an
#: OpenMP team only adds wake-up latency, which explodes on a busy host (a 1.5k-row
#: index_select measured 13 ms with 2 threads vs 0.03 ms with 1 on a loaded 2-core box).
DEFAULT_TORCH_THREADS = 1


def env_name(key: str) -> str:
    """The environment variable of daemon key ``key``: ``node_id`` -> ``EKKO_NODE_ID``."""
    return ENV_PREFIX + key.upper()


def from_environment(environ: Mapping[str, str]) -> dict[str, Any]:
    """The daemon keys set in ``environ`` (empty variables count as unset), converted."""
    out: dict[str, Any] = {}
    for key in DAEMON_KEYS:
        raw = environ.get(env_name(key), "").strip()
        if not raw:
            continue
        if key in LIST_KEYS:
            out[key] = [s.strip() for s in raw.split(",") if s.strip()]
        elif key in INT_KEYS:
            try:
                out[key] = int(raw)
            except ValueError:
                raise UsageError(f"environment {env_name(key)} must be an integer, got {raw!r}") from None
        elif key in BOOL_KEYS:
            if raw.lower() not in BOOL_WORDS:
                raise UsageError(f"environment {env_name(key)} must be one of {list(BOOL_WORDS)}, got {raw!r}")
            out[key] = BOOL_WORDS[raw.lower()]
        else:
            out[key] = raw
    return out


def check_value(key: str, value: Any, where: str) -> None:
    """Raise :class:`UsageError` unless ``value`` fits daemon key ``key``; ``where`` names its source."""
    if key in LIST_KEYS:
        ok, what = isinstance(value, list) and all(isinstance(s, str) for s in value), "a list of HOST:PORT strings"
    elif key in INT_KEYS:
        ok, what = isinstance(value, int) and not isinstance(value, bool) and value >= 1, "a positive integer"
    elif key in BOOL_KEYS:
        ok, what = isinstance(value, bool), "true or false"
    else:
        ok, what = isinstance(value, str), "a string"
    if ok and key in KEY_CHOICES:
        ok, what = value in KEY_CHOICES[key], f"one of {list(KEY_CHOICES[key])}"
    if not ok:
        raise UsageError(f"{where} {key} must be {what}, got {value!r} ({type(value).__name__})")


def daemon_settings(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> tuple[dict[str, Any], Any]:
    """Merge flags, environment and config file: ``(settings, NodeConfig)``.

    Flags win over ``EKKO_*`` variables, which win over the file's ``[daemon]`` table.
    Raises :class:`UsageError` for unknown keys, values of the wrong type, and missing
    required keys (naming the flag and the variable that would give them).
    """
    env = os.environ if environ is None else environ
    raw: dict[str, Any] = load_config(args.config) if args.config else {}
    unknown = set(raw) - {"node", "daemon"}
    if unknown:
        raise UsageError(f"unknown tables in {args.config}: {sorted(unknown)} (use [node] and [daemon])")
    for table in ("node", "daemon"):
        if not isinstance(raw.get(table, {}), dict):
            raise UsageError(f"{args.config}: {table} must be a table ([{table}])")
    file_daemon = dict(raw.get("daemon", {}))
    bad = set(file_daemon) - set(DAEMON_KEYS)
    if bad:
        raise UsageError(f"{args.config}: unknown [daemon] keys: {sorted(bad)}; known: {list(DAEMON_KEYS)}")
    for key, value in file_daemon.items():
        check_value(key, value, f"{args.config}: [daemon]")
    from_env = from_environment(env)
    for key, value in from_env.items():
        check_value(key, value, f"environment {env_name(key)}:")
    settings: dict[str, Any] = {k: file_daemon.get(k) for k in DAEMON_KEYS}
    settings.update(from_env)
    for k in DAEMON_KEYS:
        v = getattr(args, k, None)
        if v is not None:
            settings[k] = v
    missing = [k for k in REQUIRED_KEYS if not settings.get(k)]
    if missing:
        raise UsageError("missing " + ", ".join(f"--{k.replace('_', '-')} (or {env_name(k)})" for k in missing))
    node_cfg = dict(raw.get("node", {}))
    if settings.get("preset"):
        node_cfg["preset"] = settings["preset"]
    settings["seeds"] = list(settings.get("seeds") or [])
    for k in BOOL_KEYS:
        settings[k] = bool(settings.get(k))
    threads = settings.get("torch_threads")
    if threads is None:
        settings["torch_threads"] = DEFAULT_TORCH_THREADS
    elif threads < 1:
        raise UsageError("torch_threads must be a positive integer")
    return settings, config_from_dict(node_cfg, args.config)
