"""The layering of ../shared/DESIGN.md, checked on the source (imports point down only)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: modules a package must never import (at any depth of the module name).
FORBIDDEN = {
    "p2p": ("aiohttp", "ekko.server.daemon", "ekko.server.transport", "ekko.replica.node", "ekko.sdk.publisher", "ekko.cli.main", "simulator"),
    "prioritizer": ("aiohttp", "ekko.server.daemon", "ekko.server.transport", "ekko.replica.node", "ekko.sdk.publisher", "simulator", "p2p.memnet"),
    "rollback": ("aiohttp", "ekko.server.daemon", "ekko.server.transport", "ekko.replica.node", "ekko.sdk.publisher", "simulator"),
    "simulator": ("aiohttp", "ekko.server.daemon", "ekko.server.transport", "ekko.sdk.publisher"),
}
#: the sans-IO core must not read clocks, sleep or open sockets.
SANS_IO = ["p2p", "prioritizer", "rollback", "ekko/replica/node.py", "ekko/replica/publish.py",
           "ekko/replica/state.py", "ekko/replica/status.py", "ekko/core/chain.py"]


def imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


def files(target: str) -> list[Path]:
    p = ROOT / target
    return [p] if p.is_file() else sorted(p.rglob("*.py"))


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_point_down(package):
    bad = []
    for f in files(package):
        for mod in imports(f):
            if any(mod == x or mod.startswith(x + ".") for x in FORBIDDEN[package]):
                bad.append(f"{f.relative_to(ROOT)} imports {mod}")
    assert not bad, bad


@pytest.mark.parametrize("target", SANS_IO)
def test_protocol_core_is_sans_io(target):
    bad = []
    for f in files(target):
        tree = ast.parse(f.read_text(), str(f))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                call = f"{node.value.id}.{node.attr}"
                if call in ("time.time", "time.monotonic", "time.sleep", "time.perf_counter", "asyncio.sleep",
                            "socket.socket", "random.random", "random.choice", "random.shuffle", "random.randint"):
                    bad.append(f"{f.relative_to(ROOT)}:{node.lineno} uses {call}")
        for mod in imports(f):
            if mod in ("socket", "asyncio", "aiohttp", "time"):
                bad.append(f"{f.relative_to(ROOT)} imports {mod}")
    assert not bad, bad
