"""Tests for broker.cpu: which CPU the broker picks, and a served broker's threads on one CPU."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from broker.cpu import busy_ticks, pick_cpu, pinned_counts, pinned_cpu
from broker.dev.harness import policy_toml, start_broker, start_dev_issuer
from broker.dev.processes import free_port

STAT = """cpu  500 0 300 9000 40 0 10 0 0 0
cpu0 100 0 100 4000 20 0 5 0 0 0
cpu1 400 0 200 5000 20 0 5 0 0 0
intr 123 0 0
"""


def test_busy_ticks_count_everything_but_idle_and_iowait() -> None:
    assert busy_ticks(STAT) == {0: 205, 1: 605}


def test_the_least_busy_allowed_cpu_is_picked_and_ties_spread_by_pid() -> None:
    assert pick_cpu({0, 1, 2}, {0: 50, 1: 3, 2: 9}, pid=7) == 1
    assert pick_cpu({2, 3}, {1: 0, 2: 10, 3: 10}, pid=4) == 2  # only the allowed ones
    assert pick_cpu({0, 1}, {}, pid=10) == 0
    assert pick_cpu({0, 1}, {}, pid=11) == 1


def test_a_cpu_other_processes_are_pinned_to_is_avoided_before_a_busy_one() -> None:
    # Another replica pinned to 0: take 1, even if something else keeps 1 busier just now.
    assert pick_cpu({0, 1}, {0: 0, 1: 40}, pid=10, pinned={0: 1}) == 1
    assert pick_cpu({0, 1}, {0: 0, 1: 40}, pid=10, pinned={0: 1, 1: 1}) == 0


def test_pinned_cpu_reads_a_single_cpu_from_a_status_file() -> None:
    status = "Name:\tpython\nVmRSS:\t90000 kB\nCpus_allowed_list:\t{}\nMems_allowed:\t1\n"
    assert pinned_cpu(status.format("1")) == 1
    assert pinned_cpu(status.format("0-1")) is None
    assert pinned_cpu(status.format("0,2")) is None
    # A per-CPU kernel thread (ksoftirqd/1 and the like) is not a placement to avoid.
    assert pinned_cpu("Name:\tksoftirqd/1\nKthread:\t1\nCpus_allowed_list:\t1\n") is None


def test_pinned_counts_find_a_process_pinned_here(tmp_path: Path) -> None:
    for pid, cpus in (("101", "3"), ("102", "0-3"), ("103", "3"), ("self", "1")):
        (tmp_path / pid).mkdir()
        (tmp_path / pid / "status").write_text(f"VmRSS:\t1 kB\nCpus_allowed_list:\t{cpus}\n")
    (tmp_path / "104").mkdir()  # a process that ended while we looked: no status file
    assert pinned_counts(tmp_path) == {3: 2}


def _cpus_of_threads(pid: int) -> set[frozenset[int]]:
    return {
        frozenset(os.sched_getaffinity(int(task.name)))
        for task in Path(f"/proc/{pid}/task").iterdir()
    }


def _policies_of_threads(pid: int) -> set[int]:
    return {os.sched_getscheduler(int(task.name)) for task in Path(f"/proc/{pid}/task").iterdir()}


@pytest.mark.integration
@pytest.mark.parametrize("single_cpu", [True, False])
def test_a_served_broker_runs_every_thread_on_one_cpu_as_batch_work_unless_told_not_to(
    tmp_path: Path, single_cpu: bool
) -> None:
    # The broker inherits this process's CPUs. With one (CI machines have two), both cases
    # leave the mask alone and the assertions below still hold: one thread mask, that CPU.
    allowed = os.sched_getaffinity(0)
    issuer = start_dev_issuer(tmp_path / "issuer")
    try:
        config = policy_toml(
            issuer_url=issuer.url,
            audit_db=tmp_path / "audit.db",
            listen=f"127.0.0.1:{free_port()}",
            moto_url="http://127.0.0.1:9",
            role_arn="arn:aws:iam::123456789012:role/etl-writer",
            broker_extra="" if single_cpu else "\nsingle_cpu = false",
        )
        broker = start_broker(tmp_path / "broker", config)
        try:
            masks = _cpus_of_threads(broker.process.pid)
            policies = _policies_of_threads(broker.process.pid)
        finally:
            broker.stop()
    finally:
        issuer.stop()
    if single_cpu:
        assert len(masks) == 1
        (mask,) = masks
        assert len(mask) == 1 and mask <= allowed
        assert policies == {os.SCHED_BATCH}
    else:
        assert masks == {frozenset(allowed)}
        assert policies == {os.SCHED_OTHER}
