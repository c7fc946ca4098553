"""discache.sim: a deterministic simulated kernel with v14 volatile ranges, on its compiled core
(discache.sim._sim); discache.sim.backend makes it the "simulated" segment kind."""
from .kernel import (
    ADVICE_NAMES,
    MADV_COLD,
    MADV_DONTNEED,
    MADV_FREE,
    MADV_NONVOLATILE,
    MADV_PAGEOUT,
    MADV_VOLATILE,
    MADV_VOLATILE_ZEROFILL,
    VA_BASE,
    Process,
    SimulatedKernel,
)

__all__ = [
    "ADVICE_NAMES",
    "MADV_COLD",
    "MADV_DONTNEED",
    "MADV_FREE",
    "MADV_NONVOLATILE",
    "MADV_PAGEOUT",
    "MADV_VOLATILE",
    "MADV_VOLATILE_ZEROFILL",
    "VA_BASE",
    "Process",
    "SimulatedKernel",
]
