"""simulator package: discrete-event core, WAN model and workload generators.

The small public API is re-exported here::

    from simulator import Simulation, WanConfig, WanNetwork, Workload, WorkloadConfig
"""

from simulator.events import Handle, Simulation, Timer
from simulator.network import WanNetwork
from simulator.wan_config import DcSpec, WanConfig
from simulator.workload import (Burst, DenseTable, SparseTable, UpdateBatch, Workload, WorkloadConfig,
                                ZipfRows)

__all__ = ["Burst", "DcSpec", "DenseTable", "Handle", "Simulation", "SparseTable", "Timer", "UpdateBatch",
           "WanConfig", "WanNetwork", "Workload", "WorkloadConfig", "ZipfRows"]
