"""The serving side of ``ekko demo``: an inference loop on a replica of another DC.

A copy of the demo model is bound, with :func:`ekko.attach`, to the tables of the
first replica of the last data centre (the daemons run on this host): its parameters
*are* that replica's tensors, updated in place as updates arrive.  A thread serves
batches of synthetic requests with it (a click stream of its own) and keeps the
served log loss; the live view shows it beside the trainer's loss on the same
held-out batch, and the replica's freshness lag, so the quality served in the far DC
can be watched following training.

Example::

    serving = ServingLoop(replica_address, "demo-ranker", lambda: build_model(0), seed=1)
    serving.start()
    serving.view(trainer_model)     # {"requests": ..., "served_loss": ..., "trainer_loss": ...}
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any, Callable

#: requests (rows) per served batch.
SERVE_BATCH = 256
#: seconds between two served batches (the demo's serving is light: it shares the
#: trainer's process and cores).
SERVE_INTERVAL_S = 0.02
#: rows of the held-out batch both losses are measured on.
EVAL_ROWS = 4096
#: weight of the newest batch in the running served loss.
LOSS_SMOOTHING = 0.05
#: seconds the far replica gets to learn the model before serving starts (catalog gossip).
MODEL_WAIT_S = 30.0


class ServingLoop(threading.Thread):
    """Serves the demo model from a replica's tables (see the module doc).

    Args:
        endpoint: the replica (a daemon on this host).
        model: the model name.
        factory: builds a fresh demo model (its own weights are replaced by the binding).
        seed: of the request stream.
        stream: builds the click stream from a seed (the demo's ``ClickStream``).
        key: the cluster key of a keyed replica (it signs the attach).
    """

    def __init__(self, endpoint: str, model: str, factory: Callable[[], Any], seed: int,
                 stream: Callable[[int], Any], key: Any = None) -> None:
        super().__init__(name="ekko-demo-serving", daemon=True)
        from ekko.serving import attach
        self.attached = attach(endpoint, model, key)
        self.model = factory()
        self.attached.bind(self.model)
        self.requests = stream(seed)
        self.eval = stream(seed + 1).batch(EVAL_ROWS)
        self.served = 0
        self.served_loss = float("nan")
        self.stopped = threading.Event()
        self.lock = threading.Lock()
        self.node_id, self.dc = endpoint, ""   # named by the caller

    def run(self) -> None:
        import torch
        import torch.nn.functional as F
        while not self.stopped.is_set():
            users, items, y = self.requests.batch(SERVE_BATCH)
            with torch.no_grad():
                loss = float(F.binary_cross_entropy_with_logits(self.model(users, items), y))
            with self.lock:
                self.served += len(y)
                self.served_loss = loss if math.isnan(self.served_loss) else \
                    (1 - LOSS_SMOOTHING) * self.served_loss + LOSS_SMOOTHING * loss
            self.stopped.wait(SERVE_INTERVAL_S)

    def view(self, trainer: Any) -> dict[str, float]:
        """Requests served, the running served loss, and both models' loss on the held-out batch."""
        import torch
        import torch.nn.functional as F
        users, items, y = self.eval
        with torch.no_grad():
            served = float(F.binary_cross_entropy_with_logits(self.model(users, items), y))
            trained = float(F.binary_cross_entropy_with_logits(trainer(users, items), y))
        with self.lock:
            return {"requests": self.served, "running_loss": self.served_loss, "served_eval_loss": served,
                    "trainer_eval_loss": trained}


def wait_for_model(endpoint: str, model: str, timeout: float, key: Any = None) -> bool:
    """Until the replica holds the model (the catalog reaches it by gossip); ``key`` signs
    the reads of a keyed replica."""
    import urllib.error
    import urllib.request

    from ekko.core import read_auth
    url = f"http://{endpoint}/v1/models/{model}"
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=read_auth.read_headers(key, url)),
                                        timeout=5) as r:
                if r.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    return False
