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

:mod:`~ekko.sdk.client` (``Client``, the read API) stands apart: it needs none of them.
"""
