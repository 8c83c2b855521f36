"""ekko: low-latency model-update dissemination for recommendation models.

The small public API lives here; see ``../shared/DESIGN.md`` for the layering.
"""

from ekko.delta import Delta
from ekko.errors import EkkoError, ProtocolError, RemoteError, UsageError
from ekko.spec import ModelSpec, TableSpec
from ekko.version import Knowledge, Version

__version__ = "0.1.0"

__all__ = ["Delta", "EkkoError", "Knowledge", "ModelSpec", "ProtocolError", "RemoteError", "TableSpec",
           "UsageError", "Version", "__version__"]
