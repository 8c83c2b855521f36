"""What keeping the undo history with the snapshot costs (rule K7 of docs/design.md).

Fills an UndoHistory to its budget (default 64 MiB, the daemon's ``undo_bytes``) with
applies of random rows to one table, then times, on the same store:

* ``export``: :meth:`UndoHistory.export_model` (runs on the daemon's loop thread,
  in the same instant as the store copy);
* ``save``: :func:`ekko.replica.snapshot.save_snapshot` without and with the history (worker
  thread in the daemon; files fsynced);
* ``load``: :func:`ekko.replica.snapshot.load_undo` and ``import_model`` (at start).

and prints the snapshot's size without and with it.  Median of ``--repeat`` runs.

    python bench/undo_snapshot.py [--undo-mib 64] [--rows 262144] [--dim 32] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Run as a script, this file's folder is sys.path[0]; drop it, so that only packages
# are imported by name.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import numpy as np  # noqa: E402

from ekko.core.delta import Delta
from ekko.replica.snapshot import load_undo, save_snapshot
from ekko.core.spec import ModelSpec, TableSpec
from ekko.core.store import ModelStore
from ekko.core.version import ORIGIN_BITS
from rollback.undo import UndoHistory


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--undo-mib", type=int, default=64)
    ap.add_argument("--rows", type=int, default=262144)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--rows-per-apply", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary dir)")
    a = ap.parse_args()

    spec = ModelSpec("bench", [TableSpec("emb", rows=a.rows, dim=a.dim, shards=16)])
    store = ModelStore(spec, device="cpu")
    budget = a.undo_mib << 20
    h = UndoHistory(budget)
    rng = np.random.default_rng(0)
    seq = counter = 0
    t0 = time.perf_counter()
    # keep applying until the history has been at its budget for a while (it discards the oldest)
    while h.stats()["memory_bytes"] < budget * 0.97 or h.horizon("bench") == 0:
        seq += 1
        ids = np.sort(rng.choice(a.rows, a.rows_per_apply, replace=False)).astype(np.int64)
        versions = (np.arange(counter + 1, counter + 1 + len(ids), dtype=np.int64) << ORIGIN_BITS) | 1
        counter += len(ids)
        vals = rng.standard_normal((len(ids), a.dim), dtype=np.float32)
        h.record("bench", "emb", seq, store.table("emb").apply(Delta("bench", "emb", ids, versions, vals),
                                                               capture_old=True))
    st = h.stats()
    print(f"history: {st['memory_bytes'] / 2**20:.1f} MiB in {st['segments']} segments after {seq} applies "
          f"of {a.rows_per_apply} rows ({time.perf_counter() - t0:.1f} s); table {a.rows} x {a.dim} float32 "
          f"= {a.rows * a.dim * 4 / 2**20:.0f} MiB")

    base = Path(a.dir or tempfile.mkdtemp(prefix="undo-bench-"))
    res: dict[str, list[float]] = {k: [] for k in ("export", "save_without", "save_with", "load", "import")}
    sizes = {}
    for _ in range(a.repeat):
        for which in ("without", "with"):
            d = base / which
            shutil.rmtree(d, ignore_errors=True)
            t = time.perf_counter()
            image = h.export_model("bench", seq) if which == "with" else None
            if image is not None:
                res["export"].append(time.perf_counter() - t)
            t = time.perf_counter()
            save_snapshot(d, store, {}, undo=image)
            res[f"save_{which}"].append(time.perf_counter() - t)
            sizes[which] = du(d)
        t = time.perf_counter()
        img = load_undo(base / "with", spec)
        res["load"].append(time.perf_counter() - t)
        assert img is not None and img.damaged is None
        fresh = UndoHistory(budget)
        t = time.perf_counter()
        fresh.import_model(img)
        res["import"].append(time.perf_counter() - t)
        assert fresh.stats()["memory_bytes"] == st["memory_bytes"]
        del img, fresh
    med = {k: statistics.median(v) for k, v in res.items()}
    print(f"snapshot size: {sizes['without'] / 2**20:.1f} MiB without the history, "
          f"{sizes['with'] / 2**20:.1f} MiB with it (+{(sizes['with'] - sizes['without']) / 2**20:.1f} MiB)")
    print(f"median of {a.repeat}: export {med['export'] * 1e3:.2f} ms (loop thread); save "
          f"{med['save_without']:.3f} s without, {med['save_with']:.3f} s with (+{med['save_with'] - med['save_without']:.3f} s); "
          f"load_undo {med['load']:.3f} s; import {med['import'] * 1e3:.2f} ms")
    print("all runs:", {k: [round(x, 4) for x in v] for k, v in res.items()})
    if a.dir is None:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
