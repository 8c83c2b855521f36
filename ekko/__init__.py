"""ekko: low-latency model-update dissemination for recommendation models.

The small public API lives here; see ``../shared/DESIGN.md`` for the layering.
The SDK names (:class:`Publisher`, :class:`AsyncPublisher`, :class:`PublishAck`,
:class:`Client`, :class:`Tracker`) load on first use: they pull in torch and
aiohttp, which ``import ekko`` alone (e.g. the CLI's ``ekko status``) should not.
"""

from typing import TYPE_CHECKING, Any

from ekko.delta import Delta
from ekko.errors import EkkoError, ProtocolError, RemoteError, UsageError
from ekko.spec import ModelSpec, TableSpec
from ekko.version import Knowledge, Version

if TYPE_CHECKING:  # pragma: no cover
    from ekko.client import Client
    from ekko.rollback_watch import RollbackEvent, RolledBack
    from ekko.sdk import AsyncPublisher, PublishAck, Publisher, PublishError
    from ekko.tracking import Tracker
    from ekko.trainer_state import TrainerCut

__version__ = "0.1.0"

#: lazily imported public names -> their modules.
_LAZY = {"Publisher": "ekko.sdk", "AsyncPublisher": "ekko.sdk", "PublishAck": "ekko.sdk",
         "PublishError": "ekko.sdk", "Client": "ekko.client", "Tracker": "ekko.tracking",
         "RolledBack": "ekko.rollback_watch", "RollbackEvent": "ekko.rollback_watch",
         "TrainerCut": "ekko.trainer_state"}

__all__ = ["AsyncPublisher", "Client", "Delta", "EkkoError", "Knowledge", "ModelSpec", "ProtocolError",
           "PublishAck", "PublishError", "Publisher", "RemoteError", "RollbackEvent", "RolledBack", "TableSpec",
           "Tracker", "TrainerCut", "UsageError", "Version", "__version__"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ekko' has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
