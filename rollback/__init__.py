"""rollback: detect harmful model updates and put every replica back at a cut.

* :mod:`rollback.detector` -- :class:`QualityDetector`, online-vs-baseline CUSUM
  (HEALTHY -> UNCERTAIN -> CORRUPTED, with a warm-up).
* :mod:`rollback.undo` -- :class:`UndoHistory`, the bounded per-replica record of
  what each apply overwrote, and the restore to a cut.
* :mod:`rollback.cuts` -- :class:`Cut` restore points, the :class:`CutRegistry`
  that takes them, and the :class:`Fence` that keeps rolled-back updates out.

Sans-IO throughout: time is an argument, nothing reads a clock or opens a socket.
"""

from rollback.cuts import Cut, CutPolicy, CutRegistry, Fence, FenceRange
from rollback.detector import (HIGHER_IS_BETTER, LOWER_IS_BETTER, DetectorConfig, ModelState, QualityDetector,
                               StateChange)
from rollback.undo import RestoreOutcome, UndoHistory, capture_before_restore

__all__ = ["Cut", "CutPolicy", "CutRegistry", "DetectorConfig", "Fence", "FenceRange", "HIGHER_IS_BETTER",
           "LOWER_IS_BETTER", "ModelState", "QualityDetector", "RestoreOutcome", "StateChange", "UndoHistory",
           "capture_before_restore"]
