"""What a publish answers: a replica's acknowledgement (:class:`PublishAck`), or the
errors a publish raises besides :class:`~ekko.core.errors.UsageError` and
:class:`~ekko.core.errors.RemoteError`: :class:`PublishError` (not acknowledged in
time, or no replica reachable) and :class:`KeyRejected` (a wrong cluster key).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ekko.core.errors import EkkoError, RemoteError


@dataclass(frozen=True, slots=True)
class PublishAck:
    """A replica's acknowledgement of one publish.

    Attributes:
        model: the model.
        rows: rows in the frame.
        applied: rows that took the new version on the acknowledging replica (a
            re-sent frame that replica already had applies 0).
        versions: per table, the packed versions assigned to the rows, in the order
            the rows were given (see :mod:`ekko.core.version`).
        max_counter: the greatest counter the replica reported for the frame.
        endpoint: the replica that acknowledged (``http://host:port``).
        shadowed: per table, ``(ids, versions)`` of rows the replica already held at a
            *greater* version, so this publish's values for them did not apply and will
            not (another publisher's newer update, or a clock that ran ahead); at most
            ``ekko.server.ingest.MAX_SHADOWED_LISTED`` rows per table are listed.  Empty when
            every row applied or was a re-send.

    Example:
        >>> import numpy as np
        >>> a = PublishAck("m", 2, 2, {"t": np.array([65537, 131073])}, 2, "http://127.0.0.1:7070")
        >>> a.rows, a.versions["t"].tolist()
        (2, [65537, 131073])
    """

    model: str
    rows: int
    applied: int
    versions: dict[str, np.ndarray]
    max_counter: int
    endpoint: str
    shadowed: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)


def shadowed_of(answer: dict[str, Any]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The ``shadowed`` part of a publish answer as arrays (absent or malformed: none)."""
    raw = answer.get("shadowed")
    if not isinstance(raw, dict):
        return {}
    out = {}
    for table, e in raw.items():
        if isinstance(e, dict) and isinstance(e.get("ids"), list) and isinstance(e.get("by"), list):
            out[str(table)] = (np.asarray(e["ids"], np.int64), np.asarray(e["by"], np.int64))
    return out


class PublishError(EkkoError):
    """A publish was not acknowledged before its deadline.

    Attributes:
        model: the model.
        attempts: HTTP attempts made.
        status: the last HTTP status seen, or None (connection errors, timeouts).
        pending: True when the frame is kept (and persisted) to be re-sent first by
            the next publish of this model -- its rows are not lost.

    Example::

        try:
            pub.publish("ranker", "user_emb", ids, values)
        except PublishError as e:
            if not e.pending:
                raise          # these rows were not sent: publish them again later
    """

    def __init__(self, message: str, model: str, attempts: int, status: int | None, pending: bool) -> None:
        super().__init__(message)
        self.model = model
        self.attempts = attempts
        self.status = status
        self.pending = pending


class KeyRejected(RemoteError):
    """A replica rejected the request's signature (HTTP 401): the cluster key (or the
    keyring's primary key) is not one the cluster accepts, or none was given to a cluster
    that requires one.

    A publish frame refused this way is kept (and re-sent first by the next publish): a
    publisher restarted with the right key re-signs it, so no rows are lost.
    :class:`~ekko.sdk.client.Client` calls raise it too.

    Attributes:
        status: 401.
        endpoint: the replica that rejected the key.

    Example::

        try:
            pub.register(spec)
        except KeyRejected as e:
            sys.exit(f"wrong cluster key: {e}")
    """

    def __init__(self, message: str, endpoint: str = "") -> None:
        super().__init__(message, 401)
        self.endpoint = endpoint
