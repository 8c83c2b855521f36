"""``ekko cuts``, ``ekko cut``, ``ekko baseline`` and ``ekko rollback``: list and take
restore points, pin a baseline replica to one, roll a model back."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from typing import Any

from ekko.cli.options import add_peer_option, resolve_peer
from ekko.core.errors import EkkoError, UsageError


def register_cli(sub: Any) -> None:
    """Add ``cuts``, ``cut``, ``baseline`` and ``rollback`` to the ``ekko`` subcommands."""
    c = sub.add_parser("cuts", help="list a model's cuts (restore points) known to a replica")
    add_peer_option(c, "replica to ask")
    c.add_argument("--model", required=True, help="model whose cuts to list")
    c.add_argument("--json", action="store_true", help="print the cuts as JSON")
    _add_key_options(c)     # a replica that holds a key refuses unsigned reads
    c.set_defaults(func=cuts_cmd)
    t = sub.add_parser("cut", help="take a named cut of a model now (it reaches every replica)")
    add_peer_option(t, "replica that takes the cut")
    t.add_argument("--model", required=True, help="model to cut")
    t.add_argument("--name", help="cut name (default: cut-<unix ms>)")
    _add_key_options(t)
    t.set_defaults(func=cut_cmd)
    b = sub.add_parser("baseline", help="pin a replica as a baseline to a cut, or unpin it (no restart)")
    add_peer_option(b, "the replica to pin")
    b.add_argument("--model", required=True, help="model whose cut to pin to")
    g = b.add_mutually_exclusive_group(required=True)
    g.add_argument("--pin", metavar="CUT", help="cut to hold the replica at (see ekko cuts)")
    g.add_argument("--unpin", action="store_true", help="make it an ordinary replica again")
    _add_key_options(b)
    b.set_defaults(func=baseline_cmd)
    r = sub.add_parser("rollback", help="roll a model back to a cut on every replica")
    add_peer_option(r, "replica that starts the rollback")
    r.add_argument("--model", required=True, help="model to roll back")
    r.add_argument("--to", required=True, metavar="CUT", help="cut name (see ekko cuts)")
    _add_key_options(r)
    r.set_defaults(func=rollback_cmd)


def _add_key_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--key-file", help="file holding the cluster key, when the cluster has one")
    p.add_argument("--keyring", metavar="FILE", help="keyring file (ekko keys) to sign with, instead of --key-file")


def _client(args: argparse.Namespace):
    from ekko.sdk.client import Client
    key = None
    if getattr(args, "keyring", None):
        from ekko.core.keyring import load_keyring
        key = load_keyring(args.keyring)  # signs with its primary (a peer key)
    elif getattr(args, "key_file", None):
        with open(args.key_file, "rb") as f:
            key = f.read().strip()
    return Client(resolve_peer(args), key=key)


def _run(fn) -> int:
    try:
        return fn()
    except UsageError as e:    # a bad --peer, key file ...: nothing was sent
        print(f"ekko: {e}", file=sys.stderr)
        return 2
    except (EkkoError, OSError) as e:
        print(f"ekko: {e}", file=sys.stderr)
        return 1


def cuts_cmd(args: argparse.Namespace) -> int:
    def go() -> int:
        cuts = _client(args).cuts(args.model)
        if args.json:
            print(json.dumps(cuts, indent=2))
            return 0
        if not cuts:
            print(f"no cuts of {args.model}")
            return 0
        print(f"{'cut':32s} {'taken at':25s} {'restorable here':16s} shards")
        for c in cuts:
            at = c.get("taken_at")
            when = datetime.fromtimestamp(at).astimezone().isoformat(timespec="seconds") if at else "?"
            how = "yes" if c["restorable"] else "from peers"   # rows without history come from peers
            notes = ("  (learnt)" if c.get("learnt") else "") + ("  [baseline pin]" if c.get("pinned") else "")
            print(f"{c['name']:32s} {when:25s} {how:16s} {c['shards']}{notes}")
        return 0
    return _run(go)


def cut_cmd(args: argparse.Namespace) -> int:
    return _run(lambda: print(_client(args).cut(args.model, args.name)) or 0)


def baseline_cmd(args: argparse.Namespace) -> int:
    def go() -> int:
        out = _client(args).set_baseline(args.model, "" if args.unpin else args.pin)
        was = out["previous"] or "(none)"
        print(f"{resolve_peer(args)}: baseline pin {was} -> {out['cut'] or '(none: an ordinary replica)'}")
        return 0
    return _run(go)


def rollback_cmd(args: argparse.Namespace) -> int:
    def go() -> int:
        out = _client(args).rollback(args.model, args.to)
        print(f"rolled {args.model} back to {args.to}: {out['rolled_back_rows']} rows restored here; "
              f"the rollback ({out['id']}) is spreading to every replica")
        return 0
    return _run(go)
