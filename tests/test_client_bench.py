"""Smoke test of the client benchmark (bench/client.py): a tiny run, and the report's shape.

Not a timed test: a few tasks per variant against the real servers the benchmark starts
(issuer, moto, broker); no figure is asserted, only that every variant ran every task (each
per-task variant with a distinct key per task) and that the report has every section.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_tiny_client_bench_run(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.client", "--tasks", "3", "--workers", "2", "--rounds", "1",
         "--exchanges", "3", "--calls", "1000", "--json", str(out), "--workdir", str(tmp_path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    summary = report["summary"]
    assert set(summary["median_s"]) == {"static", "zero", "mixin"}
    assert set(summary["overhead_pct"]) == {"zero", "mixin"}
    first = summary["first_credential"]
    assert set(first["phases_p50_ms"]) == {
        "settings",
        "task bearer (the mint starts)",
        "set-up while the mint runs",
        "left to wait for the mint",
        "Luigi and the SDK until the keys are in hand",
    }
    assert len(first["split_p50_ms"]) == 2
    assert first["p50_ms"] > 0 and first["ratio_to_broker_exchange"] > 0
    assert report["exchange"]["broker_refresh_p50_ms"] > 0
    # CPU per task by process group, every variant, and each per-task variant over static.
    groups = {
        "scheduling process",
        "task processes",
        "agent (exec, while the job ran)",
        "exec start-up/exit, job exit",
        "broker",
        "moto",
        "total",
    }
    per_task = summary["cpu_ms_per_task"]
    assert set(per_task) == {"static", "zero", "mixin"}
    assert all(set(figures) == groups for figures in per_task.values())
    assert set(summary["cpu_ms_per_task_over_static"]) == {"zero", "mixin"}
    for variant, figures in per_task.items():
        assert figures["scheduling process"] > 0 and figures["task processes"] > 0
        # Only the jobs under `luigi-creds exec` have an agent (whose CPU is read in clock
        # ticks: a tiny job's may round to 0).
        agent = figures["agent (exec, while the job ran)"]
        assert agent == 0 if variant == "static" else agent >= 0
    assert "CPU ms per task by process group" in done.stdout
    # The jobs run `luigi.build` with forked workers; under `luigi-creds exec` the scheduling
    # process had the task-process modules before the forks (exec's preload), never static's.
    assert summary["preloaded"] == {"static": False, "zero": True, "mixin": True}
    assert all(us > 0 for us in report["cached_us"].values())
    assert "overhead" in done.stdout and "cached credential access" in done.stdout
    # Each task's marker is in the report, its key only as a fingerprint: no access key id in
    # a result file.
    markers = [m for runs in report["markers"].values() for run in runs for m in run]
    assert markers and all(len(m["key"]) == 16 for m in markers)
    assert not re.search(r"(AKIA|ASIA)[A-Z0-9]{16}", out.read_text() + done.stdout)


def test_tiny_client_bench_run_with_the_preload_off(tmp_path: Path) -> None:
    """`LUIGI_CREDS_PRELOAD=0` (the `-nopreload` variants): exec's bootstrap loads nothing into
    the scheduling process, and every task still gets its own key (the benchmark checks it)."""
    out = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.client", "--tasks", "3", "--workers", "2", "--rounds", "1",
         "--exchanges", "3", "--calls", "1000", "--variants", "static,zero-nopreload,zero",
         "--json", str(out), "--workdir", str(tmp_path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads(out.read_text())["summary"]
    assert summary["preloaded"] == {"static": False, "zero-nopreload": False, "zero": True}
    assert set(summary["first_credential_p50_ms"]) == {"zero-nopreload", "zero"}
