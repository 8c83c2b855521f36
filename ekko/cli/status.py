"""``ekko status`` and ``ekko members``: a replica's ``/v1/status`` as tables.

``status`` shows the replica's models (tables, sizes, digests), their freshness (the
newest update applied, as a wall time and an age, and the lag behind the most advanced
replica) and, with ``--cluster``, every member; ``members`` shows only the members.
Tables fit an 80-column terminal for realistic names; counts read ``100k``/``1.2M``,
durations carry units.  ``--json`` prints the answer as the replica sent it (raw
counters, packed heads, nanosecond incarnations).

Example::

    ekko status --peer 127.0.0.1:7070 --cluster
    EKKO_PEER=http://127.0.0.1:7070 ekko members
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from typing import Any

from ekko.cli.human import head_age, human_count, human_seconds, started
from ekko.cli.options import add_peer_option, peer_url, resolve_peer
from ekko.core import read_auth
from ekko.core.errors import UsageError

#: seconds ``ekko status`` waits for a replica's answer.
STATUS_TIMEOUT_S = 10.0
#: hex characters of a table digest shown by ``ekko status`` (enough to tell replicas apart).
DIGEST_PREFIX = 12
#: colour of each member state.
STATE_COLOURS = {"alive": "green", "suspect": "yellow", "dead": "red"}


def register_cli(sub: Any) -> None:
    """Add ``status`` and ``members`` to the ``ekko`` subcommands."""
    p = sub.add_parser("status", help="show a replica's models and the cluster's freshness",
                       description="Ask a replica for /v1/status and print it.")
    add_peer_option(p, "replica to ask")
    p.add_argument("--json", action="store_true", help="print the raw JSON (counters, packed heads, ns)")
    p.add_argument("--cluster", action="store_true", help="also list every member with DC, state and lag")
    add_read_key_options(p)
    p.set_defaults(func=cmd_status)
    m = sub.add_parser("members", help="list the cluster's members as a replica sees them",
                       description="Every member a replica knows: node id, DC, address, state, when it "
                                   "started (its incarnation) and its freshness lag per model.")
    add_peer_option(m, "replica to ask")
    m.add_argument("--json", action="store_true", help="print the member list as JSON")
    add_read_key_options(m)
    m.set_defaults(func=cmd_members)


def add_read_key_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--key-file", help="file holding a key to sign the read with (a replica that holds a key "
                                      "refuses unsigned reads)")
    p.add_argument("--keyring", metavar="FILE", help="keyring file (ekko keys) whose primary key signs the read")


def read_keyring(args: argparse.Namespace) -> Any:
    """The key a read is signed with (``--keyring``, ``--key-file``), or None."""
    from ekko.core.codec import Keyring
    if getattr(args, "keyring", None):
        from ekko.core.keyring import load_keyring
        return load_keyring(args.keyring)
    if getattr(args, "key_file", None):
        try:
            with open(args.key_file, "rb") as f:
                return Keyring.single(f.read().strip())
        except OSError as e:
            raise UsageError(f"cannot read key file {args.key_file}: {e}") from None
    return None


def fetch_status(peer: str, cluster: bool = False, timeout: float = STATUS_TIMEOUT_S,
                 keyring: Any = None) -> dict[str, Any]:
    """GET ``/v1/status`` from ``peer`` (``HOST:PORT`` or a URL), signed with ``keyring``
    when given; raises :class:`RuntimeError` with a readable message (:class:`UsageError`
    for a malformed address)."""
    path = "/v1/status" + ("?cluster=1" if cluster else "")
    base = peer_url(peer)
    headers = read_auth.read_headers(keyring, base + path)
    try:
        with urllib.request.urlopen(urllib.request.Request(base + path, headers=headers), timeout=timeout) as resp:
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


def _table(title: str | None = None) -> Any:
    """A compact rich table: no vertical borders, so more columns fit in 80."""
    from rich import box
    from rich.table import Table

    return Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, title_justify="left")


def render_status(st: dict[str, Any], console: Any = None, now: float | None = None) -> None:
    """Print a status answer as rich tables (``now``: Unix seconds ages are taken at)."""
    from rich.console import Console

    console = console or Console()
    console.print(f"[bold]{st.get('node_id')}[/] dc {st.get('dc')} at {st.get('address')}, "
                  f"started {started(st.get('incarnation'), now)}"
                  + ("" if st.get("serving", True) else " [red](draining)[/]"))
    models = st.get("models", {})
    if not models:
        console.print("no models registered")
    else:
        t = _table("models")
        for col in ("model", "table", "rows", "written", "dim", "dtype", "shards", "digest"):
            t.add_column(col, justify="right" if col in ("rows", "written", "dim", "shards") else "left")
        for name in sorted(models):
            for i, (tname, info) in enumerate(sorted(models[name].get("tables", {}).items())):
                t.add_row(name if i == 0 else "", tname, human_count(info.get("rows")),
                          human_count(info.get("written_rows")), str(info.get("dim")),
                          str(info.get("dtype")) + (" dense" if info.get("dense") else "")
                          + (f" hashed {info.get('eviction')}" if info.get("keys") == "int64" else ""),
                          str(info.get("shards")), str(info.get("digest", "-"))[:DIGEST_PREFIX])
        console.print(t)
        f = _table("freshness")
        for col in ("model", "newest update", "age", "lag"):
            f.add_column(col, justify="left" if col == "model" else "right")
        for name in sorted(models):
            at, age = head_age(models[name].get("head"), now)
            f.add_row(name, at, age, human_seconds(models[name].get("lag_s")))
        console.print(f)
    _render_quality(models, console)
    if st.get("members") is not None:
        render_members(st["members"], sorted(models), console, now)


def render_members(members: list[dict[str, Any]], models: list[str], console: Any = None,
                   now: float | None = None) -> None:
    """Print the member list of ``/v1/status?cluster=1``: node, DC, address, state, start
    time (incarnation) and the freshness lag of each model in ``models``."""
    from rich.console import Console

    console = console or Console()
    c = _table(f"cluster ({len(members)} members)")
    for col in ("node", "dc", "address", "state", "started"):
        c.add_column(col)
    for n in models:
        c.add_column(f"lag {n}", justify="right")
    for mem in members:
        state = mem.get("state", "?")
        c.add_row(str(mem.get("node_id", "?")), str(mem.get("dc", "?")), str(mem.get("address", "?")),
                  f"[{STATE_COLOURS.get(state, 'white')}]{state}[/]", started(mem.get("incarnation"), now),
                  *[human_seconds(mem.get("lag_s", {}).get(n)) for n in models])
    console.print(c)


def _render_quality(models: dict[str, Any], console: Any) -> None:
    """Model states (this replica, the cluster) and incidents, when any model has quality data."""
    colour = {"healthy": "green", "warmup": "white", "uncertain": "yellow", "corrupted": "red"}
    q = {name: m["quality"] for name, m in sorted(models.items()) if isinstance(m.get("quality"), dict)}
    if not q:
        return
    t = _table("model states")
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
        i = _table("incidents")
        for col in ("incident", "detected by", "metric", "effect", "cut", "restored", "restore"):
            i.add_column(col)
        for name, inc in rows:
            i.add_row(str(inc.get("id")), str(inc.get("detected_by")), str(inc.get("metric")),
                      f"{100.0 * float(inc.get('effect') or 0.0):.2f}%", str(inc.get("cut") or "- (none eligible)"),
                      "yes" if inc.get("restored_at") is not None else "no",
                      human_seconds(inc.get("restore_s")))
        console.print(i)


def _fetch(args: argparse.Namespace, cluster: bool) -> dict[str, Any] | int:
    """The status answer, or the exit status after printing a one-line error."""
    try:
        return fetch_status(resolve_peer(args), cluster=cluster, keyring=read_keyring(args))
    except UsageError as e:
        print(f"ekko {args.command}: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"ekko {args.command}: {e}", file=sys.stderr)
        return 1


def cmd_status(args: argparse.Namespace) -> int:
    """``ekko status``: exit 0, 1 when the replica cannot be reached, 2 for a bad ``--peer``."""
    st = _fetch(args, args.cluster)
    if isinstance(st, int):
        return st
    if args.json:
        print(json.dumps(st, indent=2, sort_keys=True))
    else:
        render_status(st)
    return 0


def cmd_members(args: argparse.Namespace) -> int:
    """``ekko members``: the member table of ``status --cluster`` alone."""
    st = _fetch(args, True)
    if isinstance(st, int):
        return st
    members = st.get("members") or []
    if args.json:
        print(json.dumps(members, indent=2, sort_keys=True))
    else:
        render_members(members, sorted(st.get("models", {})))
    return 0
