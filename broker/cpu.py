"""Which CPU the broker's threads run on.

Decision: one CPU per broker process, by default. The broker is one CPython process: its
threads take turns on one interpreter lock, so they cannot run Python on two CPUs at once
anyway, and on several CPUs every handover of that lock is a wake-up on another CPU. Measured
on two cores with OpenBao beside it, at 16 concurrent Vault-token exchanges: 1.44-1.48 ms of
broker CPU per exchange on both CPUs, 1.16-1.18 ms on one, the same throughput, and 17.5
context switches per exchange against 10. More CPUs are used by running more broker replicas.
`[broker] single_cpu = false` leaves the choice to the kernel's scheduler.

The CPU is picked at start-up among those the process may use (its affinity mask, which a
container's cpuset narrows): the least busy over a short sample of /proc/stat, ties broken by
the process id so replicas started together spread out. Linux only; elsewhere nothing changes.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Set
from pathlib import Path

log = logging.getLogger("broker.cpu")

_SAMPLE_SECONDS = 0.1


def pick_cpu(allowed: Set[int], busy: Mapping[int, int], pid: int) -> int:
    """The allowed CPU with the fewest busy ticks in `busy` (missing: 0); ties by `pid`."""
    cpus = sorted(allowed)
    return min(cpus, key=lambda cpu: (busy.get(cpu, 0), (cpu - pid) % len(cpus)))


def busy_ticks(stat: str) -> dict[int, int]:
    """Per CPU, the ticks /proc/stat counts as busy (everything but idle and iowait)."""
    ticks = {}
    for line in stat.splitlines():
        name, _, rest = line.partition(" ")
        if name.startswith("cpu") and name[3:].isdigit():
            fields = [int(v) for v in rest.split()]
            ticks[int(name[3:])] = sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)
    return ticks


def run_on_one_cpu() -> int | None:
    """Move every thread of this process onto one CPU; return it (None: nothing to do)."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    allowed = os.sched_getaffinity(0)
    if len(allowed) < 2:
        return None
    stat = Path("/proc/stat")
    try:
        before = busy_ticks(stat.read_text())
        time.sleep(_SAMPLE_SECONDS)
        after = busy_ticks(stat.read_text())
    except OSError:
        before = after = {}
    busy = {cpu: after.get(cpu, 0) - before.get(cpu, 0) for cpu in allowed}
    cpu = pick_cpu(allowed, busy, os.getpid())
    # A thread's affinity is its own (new threads inherit their creator's): set every thread's.
    for task in Path("/proc/self/task").iterdir():
        try:
            os.sched_setaffinity(int(task.name), {cpu})
        except (OSError, ValueError):
            continue  # a thread that ended meanwhile
    return cpu
