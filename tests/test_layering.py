"""The layering of docs/design.md, checked on the source.

Three rules, each read from the code with :mod:`ast` (no imports are executed):

* **Imports point down.**  Every module belongs to one layer; a layer may import its own
  modules and lower layers only, and layers of the same rank (the server, the SDK, the
  simulator) do not import each other.
* **No import circles**, counting imports inside functions and under ``TYPE_CHECKING``:
  a lazy import that dodges a circle at run time is still a circle in the design.
* **Small pieces**: no module over :data:`MAX_MODULE_LINES` lines and no class over
  :data:`MAX_CLASS_LINES`, outside tests.

The checkers take the root of a source tree, so the tests at the end run them on small
synthetic trees to show that each rule fails where it should.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: the layers, lowest first; a module may import from its own layer and from layers of a
#: lower rank.  Layers that share a rank must not import each other.  ``ekko`` is the
#: public facade (``ekko/__init__.py`` only).
LAYERS: list[tuple[int, str]] = [
    (0, "ekko.core"),
    (1, "rollback"),
    (2, "p2p"),
    (3, "prioritizer"),
    (4, "ekko.replica"),
    (5, "ekko.server"),
    (5, "ekko.sdk"),
    (5, "simulator"),
    (5, "ekko.testing"),
    (6, "ekko.serving"),
    (7, "ekko.cli"),
    (8, "ekko"),
]
#: top-level packages of the product (bench/, examples/ and tests/ sit outside the layers).
PACKAGES = ("ekko", "p2p", "rollback", "prioritizer", "simulator")
#: size limits outside tests (the issue's "about 700" and "about 400", with a little slack).
MAX_MODULE_LINES = 750
MAX_CLASS_LINES = 450
#: modules or classes allowed over a limit, each with the reason it reads better whole.
SIZE_EXCEPTIONS: dict[str, str] = {
    "simulator.network.WanNetwork": "every simulated message reads its flat per-node and per-link slot lists "
                                    "directly; a split would add an attribute hop per event or give a second "
                                    "object write access to lists that heal() and set_loss() replace",
}


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_modules(root: Path) -> dict[str, Path]:
    """Every product module under ``root``: dotted name -> file."""
    out = {}
    for pkg in PACKAGES:
        for f in sorted((root / pkg).rglob("*.py")) if (root / pkg).is_dir() else []:
            out[module_name(root, f)] = f
    return out


def layer_of(module: str) -> tuple[int, str] | None:
    """The layer of ``module``: the longest layer name it is or lies under.  The facade
    layer ``ekko`` holds ``ekko`` itself only."""
    best = None
    for rank, name in LAYERS:
        inside = module == name or (module.startswith(name + ".") and name != "ekko")
        if inside and (best is None or len(name) > len(best[1])):
            best = (rank, name)
    return best


def imported_modules(path: Path, known: set[str], self_name: str) -> list[tuple[int, str]]:
    """``(line, module)`` of every product module ``path`` imports, at any depth of the
    file (function bodies and ``TYPE_CHECKING`` blocks included).  ``from a import b``
    names ``a.b`` where that is a module, else ``a``."""
    out = []
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for a in node.names:
                out.append((node.lineno, a.name))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                pkg = self_name.split(".") if is_pkg else self_name.split(".")[:-1]
                pkg = pkg[:len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.append((node.lineno, sub if sub in known else base))
    return [(line, m) for line, m in out if m.split(".")[0] in PACKAGES and m in known]


def import_graph(root: Path) -> tuple[dict[str, Path], dict[str, list[tuple[int, str]]]]:
    mods = source_modules(root)
    known = set(mods)
    return mods, {m: imported_modules(f, known, m) for m, f in mods.items()}


def layer_violations(root: Path) -> list[str]:
    """Imports that point up, sideways between layers of one rank, or come from a module
    outside every layer."""
    mods, graph = import_graph(root)
    bad = []
    for mod, edges in graph.items():
        src = layer_of(mod)
        rel = mods[mod].relative_to(root)
        if src is None:
            bad.append(f"{rel}: module {mod} belongs to no layer (add it to LAYERS)")
            continue
        for line, target in sorted(set(edges)):
            dst = layer_of(target)
            if dst is None or dst[1] == src[1]:
                continue
            if dst[0] > src[0]:
                bad.append(f"{rel}:{line} imports {target}: {src[1]} (rank {src[0]}) may not import "
                           f"the higher layer {dst[1]} (rank {dst[0]})")
            elif dst[0] == src[0]:
                bad.append(f"{rel}:{line} imports {target}: {src[1]} and {dst[1]} share rank {src[0]} "
                           f"and must not import each other")
    return bad


def import_cycles(root: Path) -> list[list[str]]:
    """Strongly connected components of the module import graph with more than one
    module, or a module importing itself (Tarjan's algorithm, iterative)."""
    _, graph = import_graph(root)
    succ = {m: sorted({t for _, t in edges}) for m, edges in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    cycles = []
    counter = 0
    for start in sorted(succ):
        if start in index:
            continue
        work = [(start, 0)]
        while work:
            v, i = work.pop()
            if i == 0:
                index[v] = low[v] = counter
                counter += 1
                stack.append(v)
                on_stack.add(v)
            if i < len(succ[v]):
                work.append((v, i + 1))
                w = succ[v][i]
                if w not in index:
                    work.append((w, 0))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            if work:  # v is done: fold its low-link into its parent's
                parent = work[-1][0]
                low[parent] = min(low[parent], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1 or v in succ[v]:
                    cycles.append(sorted(comp))
    return cycles


def oversized(root: Path) -> list[str]:
    """Modules over :data:`MAX_MODULE_LINES` and classes over :data:`MAX_CLASS_LINES`."""
    bad = []
    for mod, f in source_modules(root).items():
        text = f.read_text()
        lines = text.count("\n")
        if lines > MAX_MODULE_LINES and mod not in SIZE_EXCEPTIONS:
            bad.append(f"{f.relative_to(root)}: {lines} lines (limit {MAX_MODULE_LINES})")
        for node in ast.walk(ast.parse(text, str(f))):
            if isinstance(node, ast.ClassDef):
                size = node.end_lineno - node.lineno + 1
                name = f"{mod}.{node.name}"
                if size > MAX_CLASS_LINES and name not in SIZE_EXCEPTIONS:
                    bad.append(f"{f.relative_to(root)}:{node.lineno} class {node.name}: {size} lines "
                               f"(limit {MAX_CLASS_LINES})")
    return bad


# ------------------------------------------------------------------------- the real tree

def test_imports_point_down():
    assert layer_violations(ROOT) == []


def test_no_import_cycles():
    assert import_cycles(ROOT) == []


def test_no_giant_modules_or_classes():
    assert oversized(ROOT) == []


def test_every_layer_exists():
    mods = source_modules(ROOT)
    for _, name in LAYERS:
        assert name in mods, f"layer {name} has no package"


#: the sans-IO core must not read clocks, sleep or open sockets.
SANS_IO = ["p2p", "prioritizer", "rollback", "ekko/replica/node.py", "ekko/replica/publish.py",
           "ekko/replica/state.py", "ekko/replica/status.py", "ekko/core/chain.py"]


@pytest.mark.parametrize("target", SANS_IO)
def test_protocol_core_is_sans_io(target):
    p = ROOT / target
    bad = []
    for f in [p] if p.is_file() else sorted(p.rglob("*.py")):
        tree = ast.parse(f.read_text(), str(f))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                call = f"{node.value.id}.{node.attr}"
                if call in ("time.time", "time.monotonic", "time.sleep", "time.perf_counter", "asyncio.sleep",
                            "socket.socket", "random.random", "random.choice", "random.shuffle", "random.randint"):
                    bad.append(f"{f.relative_to(ROOT)}:{node.lineno} uses {call}")
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            bad += [f"{f.relative_to(ROOT)}:{node.lineno} imports {n}" for n in names
                    if n.split(".")[0] in ("socket", "asyncio", "aiohttp", "time")]
    assert not bad, bad


# ------------------------------------------------------------- the checkers can fail

def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        f = tmp_path / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    for rel in list(files):  # every folder on the way is a package
        d = (tmp_path / rel).parent
        while d != tmp_path:
            (d / "__init__.py").touch(exist_ok=True)
            d = d.parent
    return tmp_path


def test_checker_flags_an_upward_import(tmp_path):
    root = _tree(tmp_path, {
        "ekko/core/spec.py": "X = 1\n",
        "ekko/replica/node.py": "from ekko.core.spec import X\n",
        "p2p/push.py": "def f():\n    from ekko.replica.node import Y  # lazy, still upward\n",
    })
    bad = layer_violations(root)
    assert len(bad) == 1 and "p2p/push.py:2 imports ekko.replica.node" in bad[0]


def test_checker_flags_a_sideways_import(tmp_path):
    root = _tree(tmp_path, {"ekko/server/daemon.py": "import ekko.sdk.client\n",
                            "ekko/sdk/client.py": "X = 1\n"})
    assert ["share rank 5" in b for b in layer_violations(root)] == [True]


def test_checker_flags_a_module_outside_the_layers(tmp_path):
    root = _tree(tmp_path, {"ekko/stray.py": "X = 1\n"})
    assert any("belongs to no layer" in b for b in layer_violations(root))


def test_checker_flags_an_import_circle(tmp_path):
    root = _tree(tmp_path, {
        "p2p/a.py": "from p2p.b import B\nA = 1\n",
        "p2p/b.py": "from typing import TYPE_CHECKING\nB = 1\nif TYPE_CHECKING:\n    from p2p.c import C\n",
        "p2p/c.py": "def f():\n    from p2p import a\n",
        "p2p/d.py": "from p2p.a import A\n",
    })
    assert import_cycles(root) == [["p2p.a", "p2p.b", "p2p.c"]]
    assert layer_violations(root) == []


def test_checker_flags_giant_pieces(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_CLASS_LINES + 1))
    root = _tree(tmp_path, {"rollback/big.py": f"class Big:\n{body}\n"})
    assert [b.split(": ")[0] for b in oversized(root)] == ["rollback/big.py:1 class Big"]
