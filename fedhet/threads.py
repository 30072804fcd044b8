"""How many torch threads a process uses when its config says 0 (the default): as many as the machine has idle
cores, its CPUs less the 1-minute load average, at least one.

Measured by ``benchmarks/sim_threads.py`` (2-core machine, FedAvg CNN, seconds per version in one run): idle, 2
threads took 0.56x the time of 1; beside one busy process, 2 threads took 1.73x the time of 1 (the threads wait for
each other behind the other job); beside two, the same. No fixed count is right on both, so the count follows the
load when the process starts.
"""

from __future__ import annotations

import logging
import os

import torch

__all__ = ["idle_cores", "use_threads"]

log = logging.getLogger(__name__)


def idle_cores() -> int:
    """CPUs less the 1-minute load average (rounded), at least 1; the CPU count where no load average exists."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):  # no load average on this platform
        return cores
    return max(1, min(cores, cores - round(load)))


def use_threads(configured: int, key: str) -> int:
    """Set torch's thread count: ``configured``, or :func:`idle_cores` for 0 (logged, naming ``key``)."""
    threads = configured or idle_cores()
    torch.set_num_threads(threads)
    if not configured:
        log.info("%s=0: %d torch threads (the idle cores now; set %s to choose)", key, threads, key)
    return threads
