"""TorchRec stays optional: ekko never imports it, and works as before where it cannot.

Runs in a fresh interpreter (this one may have imported TorchRec for other tests), with
or without TorchRec installed: an import hook makes ``torchrec`` and ``fbgemm_gpu``
unimportable, as on a machine without the extra.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

PROGRAM = r"""
import importlib.abc, sys

class NoTorchRec(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torchrec", "fbgemm_gpu"):
            raise ImportError(f"{name} is blocked")
        return None

if BLOCK:
    sys.meta_path.insert(0, NoTorchRec())

import ekko
from torch import nn
from ekko.sdk.torchrec_tables import collection_types, torchrec_tables
from ekko.sdk.tracking import spec_from_module

tr = ekko.Tracker                                   # the facade's lazy SDK import
m = nn.ModuleDict({"user": nn.Embedding(10, 4), "hist": nn.EmbeddingBag(20, 4), "mlp": nn.Linear(8, 1)})
print([t.name for t in spec_from_module(m, "m").tables])
assert collection_types() == {} and torchrec_tables(m) == []
loaded = sorted(n for n in sys.modules if n.split(".")[0] in ("torchrec", "fbgemm_gpu"))
assert not loaded, loaded
"""


def run(block: bool) -> str:
    proc = subprocess.run([sys.executable, "-c", f"BLOCK = {block}\n" + PROGRAM], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_ekko_does_not_import_torchrec():
    assert run(block=False) == "['user', 'hist', 'mlp_weight', 'mlp_bias']"


def test_sdk_works_where_torchrec_cannot_be_imported():
    assert run(block=True) == "['user', 'hist', 'mlp_weight', 'mlp_bias']"
