"""ekko: low-latency model-update dissemination for recommendation models.

The small public API lives here; see ``docs/design.md`` for the layering.
The SDK names (:class:`Publisher`, :class:`AsyncPublisher`, :class:`PublishAck`,
:class:`Client`, :class:`Tracker`, :class:`Replica`) load on first use: they pull in torch and
aiohttp, which ``import ekko`` alone (e.g. the CLI's ``ekko status``) should not.
"""

from typing import TYPE_CHECKING, Any

from ekko.core.delta import Delta
from ekko.core.errors import EkkoError, ProtocolError, RemoteError, UsageError
from ekko.core.spec import ModelSpec, TableSpec
from ekko.core.version import Knowledge, Version

if TYPE_CHECKING:  # pragma: no cover
    from ekko.sdk.ack import KeyRejected, PublishAck, PublishError
    from ekko.sdk.async_publisher import AsyncPublisher
    from ekko.sdk.client import Client
    from ekko.sdk.publisher import Publisher
    from ekko.sdk.rollback_watch import RollbackEvent, RolledBack
    from ekko.sdk.tracking import Tracker
    from ekko.sdk.trainer_state import TrainerCut
    from ekko.serving.attach import Attached, attach
    from ekko.serving.load import load
    from ekko.serving.replica import Replica
    from ekko.serving.row_cache import RowCache

__version__ = "0.1.0"

#: lazily imported public names -> their modules.
_LAZY = {"Publisher": "ekko.sdk.publisher", "AsyncPublisher": "ekko.sdk.async_publisher", "PublishAck": "ekko.sdk.ack",
         "PublishError": "ekko.sdk.ack", "KeyRejected": "ekko.sdk.ack", "Client": "ekko.sdk.client", "Tracker": "ekko.sdk.tracking",
         "RolledBack": "ekko.sdk.rollback_watch", "RollbackEvent": "ekko.sdk.rollback_watch",
         "TrainerCut": "ekko.sdk.trainer_state", "Replica": "ekko.serving.replica",
         "attach": "ekko.serving.attach", "Attached": "ekko.serving.attach", "load": "ekko.serving.load",
         "RowCache": "ekko.serving.row_cache"}

__all__ = ["AsyncPublisher", "Attached", "Client", "Delta", "EkkoError", "KeyRejected", "Knowledge", "ModelSpec", "ProtocolError",
           "PublishAck", "PublishError", "Publisher", "RemoteError", "Replica", "RollbackEvent", "RolledBack", "RowCache",
           "TableSpec", "Tracker", "TrainerCut", "UsageError", "Version", "__version__", "attach", "load"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ekko' has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
