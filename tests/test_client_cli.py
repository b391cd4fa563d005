"""Tests for the `luigi-creds` CLI, run as real processes against a fake broker on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_client_luigi import FakeBroker

CLI = [sys.executable, "-m", "luigi_creds.cli"]
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def env(tmp_path: Path) -> Iterator[tuple[FakeBroker, dict[str, str]]]:
    fake = FakeBroker()
    cfg = tmp_path / "luigi.cfg"
    cfg.write_text(
        f"[core]\nautoload_range = false\n\n[luigi_creds]\nbroker_url = {fake.url}\n"
        "token_source = env:TEST_CI_TOKEN\n"
    )
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "LUIGI_CREDS_"))}
    environ.update(
        LUIGI_CONFIG_PATH=str(cfg),
        TEST_CI_TOKEN="eyJhbGciOiJub25lIn0.eyJzdWIiOiJwcm9qZWN0X3BhdGg6Zy9wIiwiaXNzIjoiaHR0cHM6Ly9naXRsYWIuZXhhbXBsZSJ9.c2ln",
        PYTHONPATH=str(ROOT),
        AWS_CONFIG_FILE=str(tmp_path / "none"),
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
        AWS_EC2_METADATA_DISABLED="true",
        AWS_ACCESS_KEY_ID="AKIASTRAY",
    )
    yield fake, environ
    fake.server.shutdown()
    fake.server.server_close()


def run(args: list[str], environ: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(CLI + args, env=environ, capture_output=True, text=True, timeout=60)


def test_credential_process_prints_version_1_json(env) -> None:  # type: ignore[no-untyped-def]
    """credential-process prints the AWS credential_process JSON for the grant and task, as a
    static credential when its token source is one-shot."""
    fake, environ = env
    out = run(["credential-process", "--grant", "etl-writer", "--task", "manual"], environ)
    assert out.returncode == 0, out.stderr
    body = json.loads(out.stdout)
    assert body["Version"] == 1
    assert body["AccessKeyId"] == "AKIAFAKE00000001"
    # env: cannot give a second token, so the SDK must not plan to run this again to refresh.
    assert set(body) == {"Version", "AccessKeyId", "SecretAccessKey", "SessionToken"}
    assert fake.mints == [("etl-writer", "manual", "AKIAFAKE00000001")]


def test_exec_gives_the_child_refreshing_credentials_and_no_secret(env) -> None:  # type: ignore[no-untyped-def]
    """exec runs the command with the agent as its AWS credential source, then revokes."""
    fake, environ = env
    child = (
        "import os, json, botocore.session;"
        "c = botocore.session.Session().get_credentials();"
        "print(json.dumps([c.method, c.get_frozen_credentials().access_key,"
        " sorted(k for k in os.environ if k.startswith('AWS_'))]));"
        "raise SystemExit(7)"
    )
    out = run(["exec", "--grant", "etl-writer", "--", sys.executable, "-c", child], environ)
    assert out.returncode == 7, out.stderr
    method, key, names = json.loads(out.stdout)
    assert method == "container-role"
    assert key.startswith("AKIAFAKE")
    assert "AWS_ACCESS_KEY_ID" not in names and "AWS_SECRET_ACCESS_KEY" not in names
    assert fake.revoked == 1
    assert fake.exchanges == 1


def test_credential_process_under_exec_reuses_the_session(env) -> None:  # type: ignore[no-untyped-def]
    """A credential-process run inside exec mints through the agent, not a second exchange."""
    fake, environ = env
    out = run(
        [
            "exec",
            "--grant",
            "etl-writer",
            "--",
            *CLI,
            "credential-process",
            "--grant",
            "etl-writer",
        ],
        environ,
    )
    assert out.returncode == 0, out.stderr
    body = json.loads(out.stdout)
    assert body["Version"] == 1 and "Expiration" in body  # the agent can refresh it
    assert fake.exchanges == 1
    assert len(fake.mints) == 2


def test_refusal_is_one_clear_line(env) -> None:  # type: ignore[no-untyped-def]
    """A denied grant exits 2 with the broker URL, grant and reason and no traceback."""
    fake, environ = env
    out = run(["credential-process", "--grant", "denied"], environ)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert fake.url in out.stderr and "'denied'" in out.stderr and "invalid_target" in out.stderr


def test_whoami_shows_claims_without_the_token(env) -> None:  # type: ignore[no-untyped-def]
    """whoami prints the token source and its claims, never the token, and spends nothing."""
    fake, environ = env
    out = run(["whoami"], environ)
    assert out.returncode == 0, out.stderr
    assert "env:TEST_CI_TOKEN" in out.stdout
    assert '"project_path:g/p"' in out.stdout
    assert "grant:        etl-writer  (aws-credentials, ttl 900s)" in out.stdout
    assert environ["TEST_CI_TOKEN"] not in out.stdout
    assert fake.exchanges == 0


def test_help_explains_configuration() -> None:
    """--help documents the config section and the commands."""
    out = subprocess.run([*CLI, "--help"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0
    assert "[luigi_creds]" in out.stdout and "credential_process" in out.stdout
