"""What a training or serving job imports: the publisher, module tracking, trainer-side
rollback state, and the read client.  The public names are re-exported from :mod:`ekko`.

Modules, each importing only those listed before it (and :mod:`ekko.core`):

* :mod:`~ekko.sdk.ack` -- what a publish answers or raises (``PublishAck``, ``PublishError``);
  :mod:`~ekko.sdk.prepare` -- validating and converting a publish's rows;
  :mod:`~ekko.sdk.endpoints` -- endpoint addresses, signing key, error answers;
  :mod:`~ekko.sdk.state` -- the publisher's files (chain state, pending frames, lock);
  :mod:`~ekko.sdk.rollback_watch` -- rollbacks learnt of, for the training loop;
* :mod:`~ekko.sdk.transport` -- HTTP to the replicas, with retries and failover;
* :mod:`~ekko.sdk.trainer_state` -- trainer state saved with cuts, and restores;
* :mod:`~ekko.sdk.async_publisher` -- the asyncio core (``AsyncPublisher``);
* :mod:`~ekko.sdk.torchrec_tables` -- TorchRec collections' tables (never imports TorchRec);
* :mod:`~ekko.sdk.tracking` -- which rows a training loop changed (``Tracker``);
* :mod:`~ekko.sdk.publisher` -- the synchronous ``Publisher`` for training loops.

:mod:`~ekko.sdk.client` (``Client``, the read API) stands apart: it needs only the errors
of :mod:`~ekko.sdk.ack`.

The error types a caller catches are exported here (and from :mod:`ekko`):
:class:`PublishError` (a publish not acknowledged in time, or no replica reachable),
:class:`KeyRejected` (a replica rejected the cluster key), and :class:`Unreachable` (a
:class:`Client`'s replica cannot be reached).
"""

from ekko.sdk.ack import KeyRejected, PublishError

__all__ = ["KeyRejected", "PublishError", "Unreachable"]


def __getattr__(name: str):
    # Unreachable lives with the Client, which imports torch: loaded on first use only.
    if name == "Unreachable":
        from ekko.sdk.client import Unreachable
        return Unreachable
    raise AttributeError(f"module 'ekko.sdk' has no attribute {name!r}")
