"""``ekko cuts`` and ``ekko rollback``: list restore points and roll a model back."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ekko.errors import EkkoError


def register_cli(sub: Any) -> None:
    c = sub.add_parser("cuts", help="list a model's cuts (restore points) known to a replica")
    c.add_argument("--peer", required=True, metavar="HOST:PORT")
    c.add_argument("--model", required=True)
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cuts_cmd)
    t = sub.add_parser("cut", help="take a named cut of a model now (it reaches every replica)")
    t.add_argument("--peer", required=True, metavar="HOST:PORT")
    t.add_argument("--model", required=True)
    t.add_argument("--name", help="cut name (default: cut-<unix ms>)")
    t.add_argument("--key-file", help="cluster key, when the cluster has one")
    t.add_argument("--keyring", metavar="FILE", help="keyring file (ekko keys) to sign with, instead of --key-file")
    t.set_defaults(func=cut_cmd)
    r = sub.add_parser("rollback", help="roll a model back to a cut on every replica")
    r.add_argument("--peer", required=True, metavar="HOST:PORT")
    r.add_argument("--model", required=True)
    r.add_argument("--to", required=True, metavar="CUT", help="cut name (see ekko cuts)")
    r.add_argument("--key-file", help="cluster key, when the cluster has one")
    r.add_argument("--keyring", metavar="FILE", help="keyring file (ekko keys) to sign with, instead of --key-file")
    r.set_defaults(func=rollback_cmd)


def _client(args: argparse.Namespace):
    from ekko.client import Client
    key = None
    if getattr(args, "keyring", None):
        from ekko.keyring_file import load_keyring
        key = load_keyring(args.keyring)  # signs with its primary (a peer key)
    elif getattr(args, "key_file", None):
        with open(args.key_file, "rb") as f:
            key = f.read().strip()
    return Client(args.peer, key=key)


def _run(fn) -> int:
    try:
        return fn()
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
        for c in cuts:
            print(f"{c['name']:40s} restorable={c['restorable']}  shards={c['shards']}")
        return 0
    return _run(go)


def cut_cmd(args: argparse.Namespace) -> int:
    return _run(lambda: print(_client(args).cut(args.model, args.name)) or 0)


def rollback_cmd(args: argparse.Namespace) -> int:
    def go() -> int:
        out = _client(args).rollback(args.model, args.to)
        print(f"rolled {args.model} back to {args.to}: {out['rolled_back_rows']} rows restored here; "
              f"the rollback ({out['id']}) is spreading to every replica")
        return 0
    return _run(go)
