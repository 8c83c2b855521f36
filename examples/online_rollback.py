"""Online training, a harmful stretch of data, automatic rollback, and the trainer resuming.

Run it (CPU, about a minute)::

    python examples/online_rollback.py

What happens, all on loopback:

1. Four ``ekko daemon`` replicas start in two data centres: ``dc1-r1``/``dc1-r2``
   (the trainer publishes there), ``dc2-r1`` (an inference replica in the other
   DC: its served model is the one evaluated) and ``dc2-r2`` (a *baseline*:
   started with ``baseline_pin_cut = "baseline"``, it holds the model at that cut).
2. A click model (user/item embeddings + MLP) trains online on synthetic traffic,
   publishing the rows each step changed and taking a cut with its state after each
   window (``tracker.cut``).
3. Every window, the "inference side" reads the model served by ``dc2-r1`` and by
   the baseline over HTTP, computes their AUC on fresh impressions (true clicks) and
   reports both to ``dc2-r1`` (``Client.report_quality``).  Its detector compares
   online with baseline.
4. From window ``--harm-at`` on, a logging bug flips the training labels.  The
   served AUC drops, the detector goes uncertain, then corrupted, and the replica
   rolls the model back to the newest cut taken while healthy -- everywhere.
5. The trainer's next publish raises ``RolledBack``; it restores module and
   optimizer to that cut (``tracker.restore``), the poisoned feed is quarantined, and
   training resumes with new versions.  At the end the replica in the other DC
   must equal the trainer's module bit for bit.

The trainer's side is these few lines::

    try:
        tracker.publish()
    except RolledBack as rb:          # the cluster rolled the model back
        tracker.restore(rb)           # module + optimizer back to the cut
        feed.quarantine()             # stop training on the bad data

``--summary FILE`` writes the outcome as JSON (used by the test).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:   # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from ekko import Client, Publisher, RolledBack  # noqa: E402
from ekko.cli.demo import LocalCluster  # noqa: E402
from ekko.sdk.tracking import module_layout, unflatten_dense, dense_rows  # noqa: E402
from ekko.core.store import to_wire_values  # noqa: E402

MODEL = "ctr"
USERS, ITEMS, DIM, TRUE_DIM = 2_000, 1_000, 8, 4
BATCH, STEPS_PER_WINDOW, EVAL_IMPRESSIONS = 256, 8, 8_192
#: quality windows the detector learns its noise from (the daemons' minimum is 3).
WARMUP_WINDOWS = 5
#: seconds to wait for the remote replica to hold the trainer's newest publish.
FRESH_TIMEOUT_S = 10.0
#: seconds to wait for the remote replica to equal the trainer at the end.
CONVERGE_TIMEOUT_S = 60.0
_TEMP: list[Path] = []


class Ranker(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.user = nn.Embedding(USERS, DIM, sparse=True)
        self.item = nn.Embedding(ITEMS, DIM, sparse=True)
        self.mlp = nn.Sequential(nn.Linear(2 * DIM, 16), nn.ReLU(), nn.Linear(16, 1))

    def forward(self, users, items):
        return self.mlp(torch.cat([self.user(users), self.item(items)], 1)).squeeze(1)


class Feed:
    """Synthetic traffic: clicks from hidden user/item vectors; a logging bug flips labels."""

    def __init__(self, seed: int, harm_at: int) -> None:
        self.rng = np.random.default_rng(seed)
        g = np.random.default_rng(1000 + seed)
        self.u_true = g.normal(size=(USERS, TRUE_DIM)) / TRUE_DIM ** 0.25
        self.i_true = g.normal(size=(ITEMS, TRUE_DIM)) / TRUE_DIM ** 0.25
        self.harm_at = harm_at
        self.quarantined = False

    def poisoned(self, window: int) -> bool:
        return window >= self.harm_at and not self.quarantined

    def quarantine(self) -> None:
        self.quarantined = True

    def impressions(self, n: int):
        u = np.minimum(self.rng.zipf(1.3, n), USERS) - 1
        i = np.minimum(self.rng.zipf(1.2, n), ITEMS) - 1
        p = 1 / (1 + np.exp(-(self.u_true[u] * self.i_true[i]).sum(1) * 2.0 + 1.0))
        y = (self.rng.random(n) < p).astype(np.float32)
        return torch.from_numpy(u), torch.from_numpy(i), torch.from_numpy(y)

    def batch(self, window: int):
        u, i, y = self.impressions(BATCH)
        return u, i, (1 - y if self.poisoned(window) else y)


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks)."""
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    s = scores[order]
    i = 0
    while i < len(s):  # average ranks of ties
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    pos = labels > 0.5
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / max(1, n_pos * n_neg))


def served_model(endpoint: str, template: nn.Module) -> nn.Module:
    """The model a replica serves: its tables read over HTTP into a copy of the module."""
    m = Ranker()
    c = Client(endpoint)
    with torch.no_grad():
        params = dict(m.named_parameters())
        for lay, _, _ in module_layout(template):
            rows = c.read_rows(MODEL, lay.name, np.arange(lay.rows))
            p = params[lay.param_name]
            p.copy_(rows if lay.kind == "embedding" else unflatten_dense(rows, p.shape))
    return m


def evaluate(m: nn.Module, x) -> float:
    u, i, y = x
    with torch.no_grad():
        return auc(m(u, i).numpy(), y.numpy())


def equals_module(endpoint: str, module: nn.Module) -> bool:
    c = Client(endpoint)
    for lay, p, _ in module_layout(module):
        want = p.detach() if lay.kind == "embedding" else dense_rows(p, lay.rows, lay.dim)
        got = c.read_rows(MODEL, lay.name, np.arange(lay.rows))
        if not np.array_equal(to_wire_values(got).view(np.uint8), to_wire_values(want).view(np.uint8)):
            return False
    return True


def wait_equal(endpoint: str, module: nn.Module, timeout: float) -> float | None:
    """Until the replica holds exactly the module's weights: seconds waited, None on timeout."""
    t0 = time.monotonic()
    while True:
        try:
            if equals_module(endpoint, module):
                return time.monotonic() - t0
        except Exception:  # the catalog has not reached it yet
            pass
        if time.monotonic() - t0 > timeout:
            return None
        time.sleep(0.05)


def run(args: argparse.Namespace) -> dict:
    warnings.filterwarnings("ignore", message="Sparse invariant checks")
    logging.basicConfig(level=logging.WARNING, format="    [%(name)s] %(message)s")
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="ekko-online-rollback-"))
    if not args.workdir:
        _TEMP.append(work)
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    node = {"quality_warmup_windows": WARMUP_WINDOWS, "snapshot_interval": 0.0}
    cluster = LocalCluster(2, 2, work / "cluster", node_config={
        "dc1-r1": node, "dc1-r2": node, "dc2-r1": node, "dc2-r2": {**node, "baseline_pin_cut": "baseline"}})
    summary: dict = {"windows": [], "rollback": None, "resumed_windows": 0, "remote_equals_trainer": False}
    t0 = time.monotonic()
    with cluster:
        cluster.wait_ready()
        cluster.wait_joined()
        trainer_eps, remote, baseline = cluster.endpoints[:2], cluster.endpoints[2], cluster.endpoints[3]
        print(f"cluster up in {time.monotonic() - t0:.1f}s: trainer -> {trainer_eps}, "
              f"served model evaluated at {remote} (dc2), baseline {baseline} (pinned to cut 'baseline')")
        feed = Feed(args.seed, args.harm_at)
        model = Ranker()
        opt = torch.optim.Adagrad(model.parameters(), lr=0.1)
        rc = Client(remote)
        with Publisher(trainer_eps, origin="trainer-0", state_dir=work / "publisher", timeout=60) as pub:
            tracker = pub.track(model, model=MODEL, optimizer=opt)
            print(f"{'win':>3} {'data':>8} {'loss':>6} {'AUC trainer':>11} {'AUC served dc2':>14} {'(lag s)':>7} "
                  f"{'AUC baseline':>12} {'detector':>9}  events")
            rolled_back_at = None

            def on_rolled_back(rb: RolledBack, w: int, events: list) -> None:
                # --- the trainer's side of the loop: restore, stop the bad feed, go on --------
                restored = tracker.restore(rb)      # module + optimizer back to the cut
                feed.quarantine()
                # ---------------------------------------------------------------------------------
                inc = rb.incident or {}
                events.append(f"trainer: RolledBack to {rb.cut} -> restored module+optimizer from "
                              f"{Path(restored.path).name}, poisoned feed stopped, training resumes")
                fired = summary.pop("_fired_at", None)
                summary["rollback"] = {"id": rb.rollback_id, "cut": rb.cut, "incident": inc.get("id"),
                                       "metric": inc.get("metric"), "window": w,
                                       "trainer_learnt_s": None if fired is None else round(time.monotonic() - fired, 3)}

            for w in range(args.windows):
                poisoned = feed.poisoned(w)
                losses, events = [], []
                for _ in range(STEPS_PER_WINDOW):
                    u, i, y = feed.batch(w)
                    loss = F.binary_cross_entropy_with_logits(model(u, i), y)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    losses.append(loss.item())
                    try:
                        tracker.publish()            # the rows this step changed
                    except RolledBack as rb:
                        on_rolled_back(rb, w, events)
                        rolled_back_at = w
                        break                        # the rest of this window's data is quarantined
                if rolled_back_at is not None and rolled_back_at < w:
                    summary["resumed_windows"] += 1
                if w == 0:
                    tracker.cut("baseline")
                    # The baseline replica holds the model at this cut: let it fetch it before
                    # training overwrites the rows (it keeps only versions the cut covers).
                    waited = wait_equal(baseline, model, CONVERGE_TIMEOUT_S)
                    print(f"baseline replica holds cut 'baseline': {'yes' if waited is not None else 'NOT YET'}")
                # The inference side: quality served in dc2, and the baseline's, on fresh traffic.
                lag = wait_equal(remote, model, FRESH_TIMEOUT_S)
                evalx = feed.impressions(EVAL_IMPRESSIONS)
                a_train = evaluate(model, evalx)
                a_served = evaluate(served_model(remote, model), evalx)
                row = {"window": w, "poisoned": poisoned, "loss": float(np.mean(losses)), "auc_trainer": a_train,
                       "auc_served": a_served, "served_lag_s": lag}
                state = "-"
                if w > 0:
                    a_base = evaluate(served_model(baseline, model), evalx)
                    row["auc_baseline"] = a_base
                    rc.report_quality(MODEL, "baseline", "auc", a_base, EVAL_IMPRESSIONS)
                    ans = rc.report_quality(MODEL, "online", "auc", a_served, EVAL_IMPRESSIONS)
                    state = ans["states"][MODEL]
                    if ans["rollbacks"]:
                        state = "CORRUPTED"   # (and healthy again here once the restore applied)
                        summary["_fired_at"] = time.monotonic()
                        inc = rc.status()["models"][MODEL]["quality"]["incidents"][-1]
                        events.append(f"detector: CORRUPTED, incident {inc['id']} ({inc['metric']}, effect "
                                      f"{inc['effect']:.3f}) -> automatic rollback {ans['rollbacks'][0]} "
                                      f"to cut {inc['cut']} on every replica")
                    # A restore point once the window's served quality is in: a cut taken before
                    # the harm showed is a rollback target, one taken after it is not.
                    try:
                        row["cut"] = tracker.cut(f"w{w}").name
                    except RolledBack as rb:
                        on_rolled_back(rb, w, events)
                        rolled_back_at = w
                row["detector"] = state
                summary["windows"].append(row)
                base = f"{row['auc_baseline']:12.3f}" if "auc_baseline" in row else f"{'-':>12}"
                data = "clean" if not poisoned else "POISONED" if feed.poisoned(w) else "stopped"
                print(f"{w:3d} {data:>8} {row['loss']:6.3f} {a_train:11.3f} {a_served:14.3f} "
                      f"{'>' + str(int(FRESH_TIMEOUT_S)) if lag is None else f'{lag:.2f}':>7} {base} {state:>9}  "
                      f"{'; '.join(events)}", flush=True)
            # Training went on from the cut with new versions: the other DC must equal the trainer.
            end = time.monotonic() + CONVERGE_TIMEOUT_S
            while not (ok := equals_module(remote, model)) and time.monotonic() < end:
                time.sleep(0.2)
            summary["remote_equals_trainer"] = ok
        summary.pop("_fired_at", None)
        rb = summary["rollback"]
        if rb:
            print(f"rollback {rb['id']} to cut {rb['cut']} (incident {rb['incident']}, {rb['metric']}); the trainer "
                  f"learnt of it {rb['trainer_learnt_s']}s after the detector fired and resumed for "
                  f"{summary['resumed_windows']} windows")
        else:
            print("no rollback happened (try more --windows)")
        print(f"replica {remote} in dc2 equals the trainer's module bit for bit: "
              f"{'yes' if summary['remote_equals_trainer'] else 'NO'}; total {time.monotonic() - t0:.1f}s")
    summary["seconds"] = round(time.monotonic() - t0, 1)
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--windows", type=int, default=16, help="training windows (default 16)")
    ap.add_argument("--harm-at", type=int, default=8, help="first window with flipped labels (default 8)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", help="where daemons and publisher keep their files (default: a temp dir)")
    ap.add_argument("--summary", help="write the outcome as JSON here")
    args = ap.parse_args(argv)
    if args.harm_at <= WARMUP_WINDOWS + 1:
        ap.error(f"--harm-at must come after the detector's warm-up (> {WARMUP_WINDOWS + 1})")
    try:
        summary = run(args)
    finally:
        if args.workdir is None and _TEMP:
            shutil.rmtree(_TEMP[0], ignore_errors=True)
    if args.summary:
        Path(args.summary).write_text(json.dumps(summary, indent=1))
    ok = summary["rollback"] is not None and summary["remote_equals_trainer"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
