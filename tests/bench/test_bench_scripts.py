"""The scripts in bench/ run as documented: ``python bench/<name>.py``.

Run that way, bench/ is the first entry of ``sys.path``, so a bench file named like a
package (``bench/rollback.py`` and the ``rollback`` package, issue #15) or like a module
it imports would be imported in its place.  Checked here: no file in bench/ has the name
of a top-level package or module of this repository, of the standard library, or of
anything importable from the installed environment; and every script answers ``--help``
with exit status 0.
"""

from __future__ import annotations

import importlib.machinery
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench"
SCRIPTS = sorted(p for p in BENCH.glob("*.py") if not p.name.startswith("_"))


def _repo_top_level() -> set[str]:
    """Packages (folders with __init__.py) and modules at the repository root."""
    names = {p.name for p in REPO.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    return names | {p.stem for p in REPO.glob("*.py")}


def test_bench_has_scripts() -> None:
    assert len(SCRIPTS) >= 5, SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bench_file_shadows_nothing(script: Path) -> None:
    name = script.stem
    assert name not in _repo_top_level(), f"bench/{script.name} shadows this repository's {name!r}"
    assert name not in sys.stdlib_module_names and name not in sys.builtin_module_names, \
        f"bench/{script.name} shadows the standard library's {name!r}"
    # Anything importable under that name from elsewhere (installed dependencies included):
    # test_overload puts bench/ on sys.path, so leave bench/ out of the search.
    path = [p for p in sys.path if Path(p or os.curdir).resolve() != BENCH]
    spec = importlib.machinery.PathFinder.find_spec(name, path)
    assert spec is None, f"bench/{script.name} shadows {name!r} from {spec.origin or spec.submodule_search_locations}"


def test_the_shadow_check_catches_one() -> None:
    """The check above is not vacuous: a bench file called ``rollback.py`` or ``numpy.py`` is caught."""
    assert "rollback" in _repo_top_level()
    assert importlib.machinery.PathFinder.find_spec("numpy", sys.path) is not None


@pytest.mark.slow
def test_every_script_answers_help() -> None:
    """``python bench/<each>.py --help`` exits 0 (started together: each imports torch or numpy)."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = {s.name: subprocess.Popen([sys.executable, str(s), "--help"], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for s in SCRIPTS}
    failed = {}
    for name, p in procs.items():
        try:
            out, _ = p.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate()
        if p.returncode != 0:
            failed[name] = out.decode(errors="replace")[-1500:]
    assert not failed, "\n\n".join(f"bench/{n} --help:\n{o}" for n, o in failed.items())
