"""Smoke test of the exchange benchmark (bench/exchange.py): a tiny run, and the report's shape.

Not a timed test: it runs `python -m bench.exchange` with a handful of requests against the real
servers the benchmark starts (issuer, OpenBao, moto, broker) and checks that every scenario ran
without errors on both systems and that the ratios line up. No figure is asserted.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from bench.exchange import FORGED_KINDS, percentile, ratios
from bench.load import OwnTime

REPO_ROOT = Path(__file__).resolve().parents[1]
REFUSED = [*(f"reject_{k}" for k in FORGED_KINDS), "deny_other_project"]
SCENARIOS = ["vault_token", "vault_refresh", "aws_exchange", *REFUSED]
PEERED = {"vault_token", *REFUSED}


def run_bench(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`python -m MODULE ARGS` from the checkout, this interpreter's bin directory first on
    PATH (the tools the benchmark starts); its output is captured."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


def test_percentile_is_nearest_rank() -> None:
    """Percentiles take the nearest-rank sample, so p50 of 1..10 is 5 and p99 is 10."""
    values = [float(v) for v in range(1, 11)]
    assert percentile(values, 50) == 5.0
    assert percentile(values, 95) == 10.0
    assert percentile(values, 99) == 10.0
    assert percentile([7.0], 50) == 7.0


def test_ratios_divide_ours_by_the_peer_and_mark_unpeered_rows() -> None:
    """Ratios are ours/peer per phase; the refresh chain compares with the login; AWS has none."""
    rows = [
        {
            "phase": "sequential",
            "scenario": s,
            "system": sys_,
            "p50_ms": p,
            "p95_ms": p,
            "p99_ms": p,
            "throughput_rps": rps,
        }
        for s, sys_, p, rps in [
            ("vault_token", "openbao", 2.0, 400.0),
            ("vault_token", "luigi-creds", 6.0, 100.0),
            ("vault_refresh", "luigi-creds", 4.0, 200.0),
            ("aws_exchange", "luigi-creds", 9.0, 50.0),
        ]
    ]
    by_scenario = {r["scenario"]: r for r in ratios(rows)}
    assert by_scenario["vault_token"]["p50"] == 3.0
    assert by_scenario["vault_token"]["throughput"] == 0.25
    assert by_scenario["vault_refresh"]["p99"] == 2.0
    assert by_scenario["vault_refresh"]["peer"] == "openbao vault_token"
    assert by_scenario["aws_exchange"]["peer"] is None
    assert by_scenario["aws_exchange"]["p50"] is None


@pytest.mark.integration
def test_own_time_is_total_minus_mint_or_the_phases_of_an_older_broker() -> None:
    """The broker's own time: Server-Timing total - mint; without total, the four phases."""
    own = OwnTime()
    own.add({"server-timing": "verify;dur=0.20, state;dur=0.50, mint;dur=3.00, total;dur=4.25"})
    own.add({"server-timing": "verify;dur=0.30, policy;dur=0.10, state;dur=0.40, mint;dur=2.00"})
    own.add({})  # no Server-Timing: nothing, not zero
    assert own.values == pytest.approx([1.25, 0.8])


def test_tiny_benchmark_run_reports_every_scenario(tmp_path: Path) -> None:
    """A tiny run hands out equal Vault tokens on both sides and reports every scenario."""
    out = tmp_path / "bench.json"
    done = run_bench(
        "bench.exchange",
        "--requests=3",
        "--concurrency=2",
        "--hostile=6",
        "--warmup=1",
        "--load-scale=0.01",
        f"--json={out}",
        f"--workdir={tmp_path / 'work'}",
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text(encoding="utf-8"))

    assert report["machine"]["cores"] >= 1
    assert report["machine"]["python"] == platform.python_version()
    assert "OpenBao" in report["machine"]["bao"]
    assert report["settings"]["openbao_audit_device"] == "file"
    assert (tmp_path / "work" / "openbao-audit.jsonl").stat().st_size > 0
    tokens = report["vault_tokens"]
    assert tokens["luigi-creds"] == tokens["openbao"]
    assert tokens["openbao"]["policies"] == ["default", "etl-read"]
    assert tokens["openbao"]["creation_ttl"] == 900
    assert tokens["openbao"]["reads_etl_secret"] is True
    results = {(r["phase"], r["scenario"], r["system"]): r for r in report["results"]}
    for phase, threads in (("sequential", 1), ("concurrent", 2)):
        for scenario in SCENARIOS:
            systems = ["luigi-creds", "openbao"] if scenario in PEERED else ["luigi-creds"]
            for system in systems:
                row = results.pop((phase, scenario, system))
                # --hostile=6 is 2 tokens per kind, dealt over the phase's threads.
                expected = 2 if scenario in REFUSED else 3 * threads
                assert row["requests"] == expected, row
                assert row["errors"] == 0, row
                assert 0 < row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"], row
                assert row["throughput_rps"] > 0, row
                if system == "luigi-creds":
                    # Unknown kids refetch the JWKS at most once per cooldown (60 s default).
                    assert row["jwks_fetches"] <= 1, row
    assert results == {}, "rows for unexpected scenarios"

    compared = {(r["phase"], r["scenario"]): r for r in report["ratios"]}
    assert len(compared) == 2 * (len(SCENARIOS))
    for (_, scenario), entry in compared.items():
        if scenario == "aws_exchange":
            assert entry["peer"] is None and entry["p50"] is None
        else:
            assert entry["peer"].startswith("openbao ")
            assert entry["p50"] > 0 and entry["throughput"] > 0
    assert "ratios ours/peer" in done.stdout
    assert "| phase" in done.stdout

    # The load section: every level against ceiling and peer, refresh, AWS, two PG replicas.
    load = report["load"]
    rows = {(r["phase"], r["scenario"], r["system"]): r for r in load["results"]}
    for level in ("c1", "c16", "c64"):
        for system in ("openbao-create", "openbao", "luigi-creds"):
            row = rows[(level, "vault_token", system)]
            assert row["errors"] == 0 and row["throughput_rps"] > 0, row
            # Present, but possibly 0 here: two requests can fall inside one clock tick of the
            # process CPU counters (10 ms); the full run measures hundreds.
            assert row["cpu_ms_per_request"] >= 0, row
        assert load["own_time"][level]["p50_ms"] >= 0
    assert rows[("c16", "vault_refresh", "luigi-creds")]["errors"] == 0
    assert rows[("c1", "aws_assume_role", "moto-direct")]["errors"] == 0
    assert rows[("c1", "aws_assume_role", "luigi-creds")]["errors"] == 0
    assert rows[("c1", "aws_assume_role", "luigi-creds")]["cpu_ms_per_request"] >= 0
    for edge in ("edge_healthz", "edge_refused"):  # right answers only (checked per request)
        assert rows[("c1", edge, "luigi-creds")]["errors"] == 0
        assert rows[("c1", edge, "luigi-creds")]["cpu_ms_per_request"] >= 0
    assert 0 < load["peak_rss_mb_after_c64"] < 1024
    replicas = load["two_replicas_pg"]
    assert [r for r in replicas if "chain_verifies" in r] == [{"chain_verifies": True}]
    assert all(r["errors"] == 0 for r in replicas if "errors" in r)
    assert "ratios in this run" in done.stdout


@pytest.mark.integration
def test_tiny_dpop_benchmark_run_compares_bound_and_unbound(tmp_path: Path) -> None:
    """bench/dpop.py: a tiny run drives both sessions in both scenarios and reports ratios."""
    done = run_bench("bench.dpop", "--requests=4", "--refreshes=2", "--batch=2")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(done.stdout)
    for scenario in ("explain", "refresh"):
        row = report[scenario]
        assert row["bound_p50_ms"] > 0 and row["unbound_p50_ms"] > 0
        assert row["ratio_p50"] == round(row["bound_p50_ms"] / row["unbound_p50_ms"], 2)


@pytest.mark.integration
def test_tiny_refresh_cpu_run_measures_both_brokers(tmp_path: Path) -> None:
    """bench/refresh_cpu.py: a tiny run against a second broker (here this same checkout)
    reports the CPU per refresh mint of both, block by block."""
    out = tmp_path / "refresh.json"
    done = run_bench(
        "bench.refresh_cpu",
        "--blocks=2",
        "--block=3",
        "--warmup=2",
        f"--against={REPO_ROOT}",
        f"--json={out}",
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    sides = json.loads(out.read_text())["sides"]
    assert set(sides) == {"this", "against"}
    for side in sides.values():
        assert len(side["broker_ms_per_mint"]) == 2
        assert side["broker_ms_mean"] > 0 and side["healthz_ms"] >= 0
    assert "this - against" in done.stdout
