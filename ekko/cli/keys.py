"""``ekko keys``: create and edit keyring files (see :mod:`ekko.core.keyring`).

Rotation with no downtime (every replica keeps talking to every other)::

    ekko keys add ring.json --id 2          # new key, verify-only
    # copy ring.json to every replica and publisher host, then: kill -HUP <daemon pid>
    ekko keys promote ring.json --id 2      # sign with key 2 from now on
    # copy, kill -HUP again everywhere
    ekko keys remove ring.json --id 1       # the old key is gone
    # copy, kill -HUP again everywhere

``ekko keys list`` shows ids, roles, grants and a fingerprint per key (never a
secret); compare fingerprints across hosts to check a rollout.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ekko.core.errors import UsageError


def register_cli(sub: Any) -> None:
    k = sub.add_parser("keys", help="create and rotate keyring files (cluster and publisher keys)",
                       description="Edit a keyring file: the HMAC keys a daemon or publisher holds.")
    ks = k.add_subparsers(dest="keys_command", metavar="ACTION")
    ks.required = True
    n = ks.add_parser("new", help="create a keyring with one new peer key (primary)")
    n.add_argument("file")
    n.add_argument("--id", type=int, default=1, help="key id, 1..255 (default 1)")
    n.add_argument("--force", action="store_true", help="overwrite an existing file")
    n.set_defaults(func=cmd_new)
    a = ks.add_parser("add", help="add a verify-only key (generated, or copied --from another keyring)")
    a.add_argument("file")
    a.add_argument("--id", type=int, required=True, help="key id, 1..255")
    a.add_argument("--from", dest="source", metavar="FILE", help="copy key --id (secret and grant) from this keyring")
    a.add_argument("--publisher", action="store_true", help="a publisher key (publishes only, see --model/--origin)")
    a.add_argument("--reader", action="store_true",
                   help="a reader key (signs reads only, see --model); a daemon that holds any key "
                        "answers unsigned reads with 401")
    a.add_argument("--model", dest="models", action="append", metavar="NAME",
                   help="model this publisher key may write, or this reader key read (repeatable; default any)")
    a.add_argument("--origin", dest="origins", action="append", metavar="NAME_OR_ID",
                   help="origin this publisher key may write as (repeatable; default any)")
    a.add_argument("--primary", action="store_true", help="also make it primary (a new publisher's own file)")
    a.set_defaults(func=cmd_add)
    p = ks.add_parser("promote", help="make a key primary (it signs from now on)")
    p.add_argument("file")
    p.add_argument("--id", type=int, required=True)
    p.set_defaults(func=cmd_promote)
    r = ks.add_parser("remove", help="remove a key (not the primary)")
    r.add_argument("file")
    r.add_argument("--id", type=int, required=True)
    r.set_defaults(func=cmd_remove)
    ls = ks.add_parser("list", help="list keys: id, role, primary, grants, fingerprint (no secrets)")
    ls.add_argument("file")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_list)


def _run(action: str, fn: Any) -> int:
    try:
        fn()
    except UsageError as e:
        print(f"ekko keys {action}: {e}", file=sys.stderr)
        return 2
    return 0


def _entry(doc: dict[str, Any], kid: int) -> dict[str, Any] | None:
    return next((e for e in doc["keys"] if e["id"] == kid), None)


def cmd_new(args: argparse.Namespace) -> int:
    from ekko.core.keyring import new_doc, save_keyring

    def go() -> None:
        if Path(args.file).exists() and not args.force:
            raise UsageError(f"{args.file} exists (use --force to replace it, or `ekko keys add` to rotate)")
        save_keyring(args.file, new_doc(args.id))
        print(f"created {args.file} with peer key {args.id} (primary)")
    return _run("new", go)


def cmd_add(args: argparse.Namespace) -> int:
    from ekko.core.keyring import key_entry, new_secret, read_doc, save_keyring

    def go() -> None:
        if args.publisher and args.reader:
            raise UsageError("a key is a publisher key or a reader key, not both")
        if args.origins and args.reader:
            raise UsageError("--origin applies to publisher keys only")
        if (args.models or args.origins) and not (args.publisher or args.reader) and not args.source:
            raise UsageError("--model/--origin apply to publisher (or reader) keys: add --publisher or --reader")
        target = Path(args.file)
        doc = read_doc(target) if target.exists() else None
        if doc is not None and _entry(doc, args.id) is not None:
            raise UsageError(f"key id {args.id} is already in {args.file}")
        if args.source:
            src = _entry(read_doc(args.source), args.id)
            if src is None:
                raise UsageError(f"key id {args.id} is not in {args.source}")
            entry = dict(src)
            if args.publisher or args.reader or args.models or args.origins:
                raise UsageError("--from copies the key's role and grant; do not combine with "
                                 "--publisher/--reader/--model/--origin")
        else:
            role = "publisher" if args.publisher else "reader" if args.reader else "peer"
            entry = key_entry(args.id, new_secret(), role, args.models, args.origins)
        if doc is None:
            # A publisher's own file starts with its key (copied from the cluster's file).
            doc = {"format": 1, "primary": args.id, "keys": [entry]}
        else:
            doc["keys"].append(entry)
            if args.primary:
                doc["primary"] = args.id
        save_keyring(target, doc)
        role = entry.get("role", "peer")
        print(f"added {role} key {args.id} to {args.file} ({'primary' if doc['primary'] == args.id else 'verify-only'})")
    return _run("add", go)


def cmd_promote(args: argparse.Namespace) -> int:
    from ekko.core.keyring import read_doc, save_keyring

    def go() -> None:
        doc = read_doc(args.file)
        if _entry(doc, args.id) is None:
            raise UsageError(f"key id {args.id} is not in {args.file}")
        doc["primary"] = args.id
        save_keyring(args.file, doc)
        print(f"key {args.id} is now primary in {args.file}")
    return _run("promote", go)


def cmd_remove(args: argparse.Namespace) -> int:
    from ekko.core.keyring import read_doc, save_keyring

    def go() -> None:
        doc = read_doc(args.file)
        if _entry(doc, args.id) is None:
            raise UsageError(f"key id {args.id} is not in {args.file}")
        if doc["primary"] == args.id:
            raise UsageError(f"key {args.id} is primary: promote another key first")
        doc["keys"] = [e for e in doc["keys"] if e["id"] != args.id]
        save_keyring(args.file, doc)
        print(f"removed key {args.id} from {args.file}")
    return _run("remove", go)


def cmd_list(args: argparse.Namespace) -> int:
    from ekko.core.keyring import describe, read_doc

    def go() -> None:
        rows = describe(read_doc(args.file))
        if args.json:
            print(json.dumps(rows, indent=1))
            return
        print(f"{'id':>3}  {'role':<9} {'primary':<7} {'fingerprint':<16}  grant")
        for r in rows:
            grant = ""
            if r["role"] == "publisher":
                grant = (f"models={','.join(r['models']) if r['models'] else '*'} "
                         f"origins={','.join(map(str, r['origins'])) if r['origins'] else '*'}")
            elif r["role"] == "reader":
                grant = f"reads models={','.join(r['models']) if r.get('models') else '*'}"
            print(f"{r['id']:>3}  {r['role']:<9} {'yes' if r['primary'] else '':<7} {r['fingerprint']:<16}  {grant}")
    return _run("list", go)

