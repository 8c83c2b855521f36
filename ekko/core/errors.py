"""Exception types.

Following h11, local misuse and remote bad data are different types:

* :class:`UsageError` -- the caller of this process's API did something wrong
  (bad argument, unknown model).  Raised on the call path.
* :class:`ProtocolError` -- bytes or a message that arrived from somewhere else
  are malformed, oversized, unauthenticated or carry impossible versions.
  Raised only on the receive path; it is the *only* exception the decoders
  raise for bad input.
* :class:`RemoteError` -- a peer or daemon answered with an error (SDK side).
"""

from __future__ import annotations


class EkkoError(Exception):
    """Base class of every ekko exception."""


class UsageError(EkkoError, ValueError):
    """Local misuse of an API: the caller passed something invalid."""


class ProtocolError(EkkoError):
    """Bad data from the network: malformed, oversized, unauthenticated, impossible.

    Attributes:
        reason: a short machine-readable tag (``"bad_magic"``, ``"too_large"``,
            ``"bad_mac"`` ...) used as a metrics label.
    """

    def __init__(self, message: str, reason: str = "malformed") -> None:
        super().__init__(message)
        self.reason = reason


class RemoteError(EkkoError):
    """A daemon answered a request with an error status.

    Attributes:
        status: the HTTP status code.
        retry_after: seconds the server asked us to wait (429/503), else None.
    """

    def __init__(self, message: str, status: int, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after
