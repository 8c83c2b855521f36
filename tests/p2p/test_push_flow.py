"""Flow control of pushes (p2p.push.EagerPush.flush with host.push_room): a peer's link
that has no room keeps the rows in the node's queue -- nothing is dropped, nothing spins
on a timer -- and the next flush after the driver reports room sends them, links intact."""

from __future__ import annotations

import numpy as np

from cluster import Trainer, converged, make_cluster
from ekko.core.codec import MsgType
from ekko.core.config import NodeConfig


def test_a_full_link_holds_the_pushes_until_there_is_room():
    net = make_cluster(dcs=1, per_dc=3, seed=4, config=NodeConfig(ae_interval=1e6))
    net.run(2.0)
    ingest = net.nodes["n0-0"]
    room = {"n0-1": 0, "n0-2": 8}
    ingest.push_room = lambda peer: room[peer]
    sent = []
    real = ingest.send
    ingest.send = lambda out: (sent.append(out), real(out))[1]
    trainer = Trainer(net, "n0-0", seed=4)
    for k in range(3):
        trainer.publish("emb", 50, ids=np.arange(50 * k, 50 * k + 50, dtype=np.int64))
    pushes = [o.dst for o in sent if o.msg_type == MsgType.PUSH]
    assert "n0-1" not in pushes and "n0-2" in pushes          # only the peer with room got them
    assert ingest.eager_push.held_back
    assert ingest.next_deadline() > net.now                   # waiting for room is not a deadline
    net.run(net.now + 1.0)
    assert not converged(net, trainer, ["n0-1"])              # held, not sent, not dropped
    assert ingest.queues["n0-1"].rows == 150 and ingest.queues["n0-1"].dropped == 0
    room["n0-1"] = 1                                           # the driver reports room: one frame
    sent.clear()
    ingest.eager_push.flush(net.now)
    assert [o.dst for o in sent if o.msg_type == MsgType.PUSH] == ["n0-1"]
    net.run(net.now + 0.5)
    assert converged(net, trainer)                             # the three batches went in one frame
    assert ingest.eager_push.held_back is False
    assert net.nodes["n0-1"].counters["push_links"] > 0        # with their chain links
