"""The CPU this process has: its share of the machine, and lower priority for background threads."""

from __future__ import annotations

import os
import threading


def cpu_share() -> int:
    """CPUs this process may use: affinity mask, capped by a cgroup v2 quota if one is set."""
    cpus = len(os.sched_getaffinity(0))
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()
        if quota != "max":
            cpus = min(cpus, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cpus


def renice(nice: int) -> None:
    """Lower the calling thread's CPU priority by ``nice`` (Linux: a thread's own niceness)."""
    if not nice:
        return
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except OSError:  # where a thread id is not a process id (not Linux): keep the process's niceness
        pass
