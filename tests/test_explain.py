"""`luigi-creds-broker explain` and `check-config` as an operator runs them, offline.

The examples' policy and the provider claim fixtures go through the real CLI in a subprocess:
an allow shows what would be minted, a deny names the failing claim, and exit codes say which.
"""

from __future__ import annotations

import json
from pathlib import Path

from broker.dev.harness import run_broker_cli

ROOT = Path(__file__).resolve().parents[1]
POLICY = ROOT / "examples" / "broker.toml"
GITLAB = ROOT / "tests" / "fixtures" / "claims" / "gitlab.json"


def test_explain_allow_shows_what_would_be_minted() -> None:
    """An allowed grant exits 0 and prints each claim check and the AssumeRole it would send."""
    done = run_broker_cli(
        "explain", "--config", str(POLICY), "--claims", str(GITLAB), "--grant", "etl-writer"
    )
    assert done.returncode == 0, done.stderr
    assert "grant etl-writer: ALLOW (allowed)" in done.stdout
    assert "[ok  ] project_id: expected '55235664', got '55235664'" in done.stdout
    assert "sts:AssumeRole arn:aws:iam::123456789012:role/etl-writer" in done.stdout
    assert "RoleSessionName  etl-1350228412-<request id>" in done.stdout
    assert "SourceIdentity   alice" in done.stdout


def test_explain_deny_names_the_failing_claim(tmp_path: Path) -> None:
    """A claim that misses its pattern exits 1 and the trace marks exactly that claim FAIL."""
    claims = json.loads(GITLAB.read_text(encoding="utf-8"))
    claims["ref"] = "release/1/evil"  # `release/*` never crosses a `/`
    path = tmp_path / "claims.json"
    path.write_text(json.dumps(claims), encoding="utf-8")
    done = run_broker_cli(
        "explain", "--config", str(POLICY), "--claims", str(path), "--grant", "etl-writer"
    )
    assert done.returncode == 1
    assert "grant etl-writer: DENY (claim_mismatch)" in done.stdout
    fails = [line for line in done.stdout.splitlines() if "[FAIL]" in line]
    assert len(fails) == 1 and fails[0].strip().startswith("[FAIL] ref:")
    assert "would mint" not in done.stdout


def test_explain_without_grant_lists_every_grant_of_the_issuer() -> None:
    """Without --grant, every grant that accepts the issuer is evaluated."""
    done = run_broker_cli("explain", "--config", str(POLICY), "--claims", str(GITLAB))
    assert done.returncode == 0
    assert done.stdout.count("grant ") >= 2


def test_explain_unknown_issuer_is_a_deny() -> None:
    """Claims from an issuer the policy does not name are denied before any grant is looked at."""
    done = run_broker_cli(
        "explain",
        "--config",
        str(ROOT / "examples" / "dev-policy.toml"),
        "--claims",
        str(GITLAB),
    )
    assert done.returncode == 1
    assert "is not a configured issuer" in done.stdout


def test_check_config_lists_every_problem(tmp_path: Path) -> None:
    """check-config exits 1 and lists all problems of a broken file, and 0 for a good one."""
    good = run_broker_cli("check-config", str(POLICY))
    assert good.returncode == 0 and "ok (5 issuers" in good.stdout
    bad = tmp_path / "broker.toml"
    bad.write_text(
        '[broker]\nlisen = "x"\n[[issuer]]\nname = "i"\nurl = "http://gitlab.example.com"\n'
        'audiences = []\n[[grant]]\nname = "g"\nissuers = ["nope"]\nttl = "1m"\n'
        '[grant.match]\nref = "main"\n[grant.aws]\nrole_arn = "arn:aws:iam::123456789012:role/r"\n',
        encoding="utf-8",
    )
    done = run_broker_cli("check-config", str(bad))
    assert done.returncode == 1
    problems = [line for line in done.stderr.splitlines() if line.strip().startswith("- ")]
    assert len(problems) >= 5, done.stderr
    assert "broker.lisen" in done.stderr
