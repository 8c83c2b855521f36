"""simulator package: discrete-event core, WAN model and workload generators.

The small public API is re-exported here::

    from simulator import Simulation, WanConfig, WanNetwork, DcSpec
"""

from simulator.events import Handle, Simulation, Timer
from simulator.network import DcSpec, WanConfig, WanNetwork

__all__ = ["DcSpec", "Handle", "Simulation", "Timer", "WanConfig", "WanNetwork"]
