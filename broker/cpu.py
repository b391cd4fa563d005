"""Which CPU the broker's threads run on.

Decision: one CPU per broker process, by default. The broker is one CPython process: its
threads take turns on one interpreter lock, so they cannot run Python on two CPUs at once
anyway, and on several CPUs every handover of that lock is a wake-up on another CPU. Measured
on two cores with OpenBao beside it, at 16 concurrent Vault-token exchanges: 1.44-1.48 ms of
broker CPU per exchange on both CPUs, 1.16-1.18 ms on one, the same throughput, and 17.5
context switches per exchange against 10. More CPUs are used by running more broker replicas.
`[broker] single_cpu = false` leaves the choice to the kernel's scheduler.

Its threads are also scheduled as batch work (SCHED_BATCH): a thread woken on that CPU (the
answer from Vault arrived, its group commit finished) waits for the running thread to block or
use up its time slice instead of preempting it. Preempting would buy nothing, since the running
thread holds the interpreter lock the woken one needs next: every such wake-up cost two context
switches. Measured the same way (a served broker, 16 threads, 3,000-4,000 exchanges per run):
context switches per exchange 10.6 -> 6.9, the involuntary ones 4.0 -> 0.5; 9-31 % more
exchanges per second in three alternated pairs of that script, but within the noise of the
whole benchmark's load section (c16 of the ceiling 0.55 / 0.53 / 0.55 against 0.56 / 0.52 /
0.45 before, with this round's other changes, three alternated pairs, bench/README.md).
Latency at one thread unchanged. A batch thread still gets its fair share of the CPU.

The CPU is picked at start-up among those the process may use (its affinity mask, which a
container's cpuset narrows): first the one the fewest processes are already pinned to (another
broker replica on the host, say: the kernel can move other work away from us, but not a pinned
process), then the least busy over a short sample of /proc/stat, then by process id. Linux
only; elsewhere nothing changes.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Set
from pathlib import Path

log = logging.getLogger("broker.cpu")

_SAMPLE_SECONDS = 0.1


def pick_cpu(
    allowed: Set[int], busy: Mapping[int, int], pid: int, pinned: Mapping[int, int] | None = None
) -> int:
    """The allowed CPU with the fewest processes `pinned` to it alone, then the fewest busy
    ticks in `busy` (missing: 0); ties by `pid`."""
    cpus = sorted(allowed)
    held = pinned or {}
    return min(cpus, key=lambda cpu: (held.get(cpu, 0), busy.get(cpu, 0), (cpu - pid) % len(cpus)))


def pinned_cpu(status: str) -> int | None:
    """The one CPU a user process may run on, from its /proc/<pid>/status text (None: several,
    or a kernel thread: every CPU has its own, so they say nothing about where to go)."""
    if "VmRSS:" not in status:  # kernel threads have no memory of their own
        return None
    for line in status.splitlines():
        if line.startswith("Cpus_allowed_list:"):
            value = line.partition(":")[2].strip()
            return int(value) if value.isdigit() else None
    return None


def pinned_counts(proc: Path = Path("/proc")) -> dict[int, int]:
    """How many processes (other than this one) are pinned to each CPU alone."""
    counts: dict[int, int] = {}
    me = str(os.getpid())
    for entry in proc.iterdir():
        if not entry.name.isdigit() or entry.name == me:
            continue
        try:
            cpu = pinned_cpu((entry / "status").read_text())
        except OSError:
            continue  # gone meanwhile, or not ours to read
        if cpu is not None:
            counts[cpu] = counts.get(cpu, 0) + 1
    return counts


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
    """Move every thread of this process onto one CPU, scheduled as batch work; return the CPU
    (None: the process may use one CPU only, or this is not Linux)."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    allowed = os.sched_getaffinity(0)
    if len(allowed) < 2:
        _schedule_as_batch()
        return None
    stat = Path("/proc/stat")
    try:
        before = busy_ticks(stat.read_text())
        time.sleep(_SAMPLE_SECONDS)
        after = busy_ticks(stat.read_text())
    except OSError:
        before = after = {}
    busy = {cpu: after.get(cpu, 0) - before.get(cpu, 0) for cpu in allowed}
    cpu = pick_cpu(allowed, busy, os.getpid(), pinned_counts())
    # A thread's affinity is its own (new threads inherit their creator's): set every thread's.
    for tid in _threads():
        try:
            os.sched_setaffinity(tid, {cpu})
        except (OSError, ValueError):
            continue  # a thread that ended meanwhile
    _schedule_as_batch()
    return cpu


def _threads() -> list[int]:
    return [int(task.name) for task in Path("/proc/self/task").iterdir()]


def _schedule_as_batch() -> None:
    """Every thread of this process under SCHED_BATCH (new threads inherit it); no privilege
    is needed to choose it."""
    for tid in _threads():
        try:
            os.sched_setscheduler(tid, os.SCHED_BATCH, os.sched_param(0))
        except (OSError, ValueError):
            continue  # a thread that ended meanwhile
