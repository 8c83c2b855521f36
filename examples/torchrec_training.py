"""A TorchRec model trained online, its changed rows published to replicas in two DCs.

Needs TorchRec (README, "Publishing from a training loop")::

    pip install -e '.[torchrec]' && pip install --no-deps torchrec==1.8.0 fbgemm-gpu-cpu==1.8.0
    python examples/torchrec_training.py

Two ``ekko daemon`` replicas start on loopback, one per DC.  A click model -- an
``EmbeddingBagCollection`` (user ids; item ids and recently seen items pooled in one
``item`` table), an ``EmbeddingCollection`` (query words) and an MLP -- trains with
Adagrad; after every step ``tracker.publish()`` sends exactly the rows that step changed
(a few hundred of the tables' 100k).  At the end the replica in the other DC must hold
the trainer's tables bit for bit.  ``--summary FILE`` writes the outcome as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:   # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torchrec import (EmbeddingBagCollection, EmbeddingBagConfig, EmbeddingCollection,  # noqa: E402
                      EmbeddingConfig, KeyedJaggedTensor)

from ekko import Client, Publisher  # noqa: E402
from ekko.cli.demo import LocalCluster  # noqa: E402
from ekko.core.store import to_wire_values  # noqa: E402
from ekko.sdk.tracking import dense_rows, module_layout  # noqa: E402

MODEL = "torchrec-ranker"
USERS, ITEMS, WORDS, DIM = 50_000, 40_000, 10_000, 16
BATCH = 256
#: seconds the replica in the other DC gets to hold the trainer's last publish.
CONVERGE_TIMEOUT_S = 30.0


class Ranker(nn.Module):
    """Pooled user and item features + summed query words -> MLP -> click logit."""

    def __init__(self) -> None:
        super().__init__()
        self.sparse = EmbeddingBagCollection(tables=[
            EmbeddingBagConfig(name="user", embedding_dim=DIM, num_embeddings=USERS, feature_names=["uid"]),
            EmbeddingBagConfig(name="item", embedding_dim=DIM, num_embeddings=ITEMS, feature_names=["iid", "seen"]),
        ])
        self.query = EmbeddingCollection(tables=[
            EmbeddingConfig(name="word", embedding_dim=DIM, num_embeddings=WORDS, feature_names=["words"])])
        self.mlp = nn.Sequential(nn.Linear(4 * DIM, 32), nn.ReLU(), nn.Linear(32, 1))

    def forward(self, ids: KeyedJaggedTensor, words: KeyedJaggedTensor) -> torch.Tensor:
        pooled = self.sparse(ids).values()                  # uid | iid | seen
        jt = self.query(words)["words"]
        sample = torch.repeat_interleave(torch.arange(pooled.shape[0]), jt.lengths())
        q = torch.zeros(pooled.shape[0], DIM).index_add(0, sample, jt.values())
        return self.mlp(torch.cat([pooled, q], dim=1)).squeeze(1)


def batch(rng: np.random.Generator):
    """Synthetic traffic: Zipf-popular ids, 0-5 seen items and 1-4 query words per impression."""
    def jagged(keys, rows, lo, hi):
        lengths = [np.ones(BATCH, np.int64) if lo == hi else rng.integers(lo, hi + 1, BATCH) for _ in keys]
        values = [np.minimum(rng.zipf(1.2, int(n.sum())), r) - 1 for n, r in zip(lengths, rows)]
        return KeyedJaggedTensor.from_lengths_sync(keys=keys, values=torch.from_numpy(np.concatenate(values)),
                                                   lengths=torch.from_numpy(np.concatenate(lengths)))
    ids = KeyedJaggedTensor.concat([jagged(["uid", "iid"], [USERS, ITEMS], 1, 1), jagged(["seen"], [ITEMS], 0, 5)])
    words = jagged(["words"], [WORDS], 1, 4)
    return ids, words, torch.from_numpy(rng.integers(0, 2, BATCH).astype(np.float32))


def equals_module(endpoint: str, module: nn.Module) -> bool:
    """Whether the replica holds every table of the module bit for bit."""
    c = Client(endpoint)
    for lay, p, _ in module_layout(module):
        want = p.detach() if lay.kind == "embedding" else dense_rows(p, lay.rows, lay.dim)
        try:
            got = c.read_rows(MODEL, lay.name, np.arange(lay.rows))
        except Exception:   # the catalog has not reached it yet
            return False
        if not np.array_equal(to_wire_values(got).view(np.uint8), to_wire_values(want).view(np.uint8)):
            return False
    return True


def run(steps: int, seed: int, work: Path) -> dict:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = Ranker()
    opt = torch.optim.Adagrad(model.parameters(), lr=0.05)   # moves only the rows a step looks up
    with LocalCluster(2, 1, work / "cluster") as cluster:
        cluster.wait_ready()
        cluster.wait_joined()
        trainer_ep, remote = cluster.endpoints
        with Publisher([trainer_ep], origin="trainer-0", state_dir=work / "publisher", timeout=60) as pub:
            tracker = pub.track(model, model=MODEL, optimizer=opt)
            print("tables:", ", ".join(f"{t.name} {t.rows}x{t.dim}" for t in tracker.spec.tables))
            first = tracker.publish()
            print(f"initial publish: {first.rows} rows")
            rows = []
            for step in range(steps):
                ids, words, y = batch(rng)
                loss = F.binary_cross_entropy_with_logits(model(ids, words), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sent = tracker.publish()              # exactly the rows this step changed
                per_table = {t: len(v) for t, v in sent.ids.items()}
                rows.append(per_table)
                print(f"step {step:3d} loss {loss.item():.3f} published {sent.rows:5d} rows {per_table}")
            tracker.close()
        t0 = time.monotonic()
        while not (equal := equals_module(remote, model)) and time.monotonic() - t0 < CONVERGE_TIMEOUT_S:
            time.sleep(0.1)
        print(f"replica {remote} in dc2 equals the trainer's tables bit for bit: {'yes' if equal else 'NO'}")
    return {"rows_per_step": rows, "remote_equals_trainer": equal}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20, help="training steps, each followed by a publish")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", help="where daemons and publisher keep their files (default: a temp dir)")
    ap.add_argument("--summary", help="write the outcome as JSON here")
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error("--steps must be >= 1")
    with tempfile.TemporaryDirectory(prefix="ekko-torchrec-") as tmp:
        out = run(args.steps, args.seed, Path(args.workdir) if args.workdir else Path(tmp))
    if args.summary:
        Path(args.summary).write_text(json.dumps(out))
    return 0 if out["remote_equals_trainer"] else 1


if __name__ == "__main__":
    sys.exit(main())
