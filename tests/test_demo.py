"""`make demo` and `luigi-creds-broker dev`, run for real: OpenBao, moto, the broker, Luigi.

The demo runs from a fresh `git clone` of this repository through the Makefile's own `demo`
target, reusing this venv (its install step is marked as done, and a dry run proves make will not
reinstall into it). The `dev` command runs as a child process, is driven through its state file
and `dev token`, and is stopped with SIGTERM.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from broker.config_lint import load_config, parse_config
from broker.dev.cli import parse_claims
from broker.dev.harness import REPO_ROOT
from broker.dev.processes import free_port, http_ok, start_process
from broker.dev.stack import DevStack, DevStackError, _private_dir, grant_names, policy_text

VENV = Path(sys.executable).parent.parent
STAMP = VENV / ".installed"
KV_VALUE = "etl-kv-value"  # the dev stack's secret/etl/db password (broker.dev.vault)


def _clone(tmp_path: Path) -> Path:
    clone = tmp_path / "clone"
    subprocess.run(
        ["git", "clone", "--quiet", "--no-hardlinks", str(REPO_ROOT), str(clone)],
        check=True,
        timeout=60,
    )
    return clone


def _make_demo(clone: Path, tmp_path: Path, *, dry_run: bool) -> subprocess.CompletedProcess[str]:
    argv = ["make", "-C", str(clone), "-o", str(STAMP), f"VENV={VENV}", "demo"]
    if dry_run:
        argv.insert(1, "-n")
    # TMPDIR: the stack's private state dir is made under tmp_path, so the test can see it go.
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    env.pop("XDG_RUNTIME_DIR", None)
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=240, env=env, check=False, cwd=clone
    )


def _found(pattern: str, text: str) -> str:
    """The first group of `pattern`'s first match in `text` (which must have one)."""
    match = re.search(pattern, text)
    assert match is not None, pattern
    return match.group(1)


def _report_rows(output: str) -> dict[str, int]:
    """grant -> credentials issued, from the audit report table the demo prints."""
    rows: dict[str, int] = {}
    for line in output.splitlines():
        match = re.match(r"^\s+([a-z-]+)\s+dev:project_path:\S+\s+(\d+)\s", line)
        if match:
            rows[match.group(1)] = int(match.group(2))
    return rows


@pytest.mark.integration
def test_make_demo_runs_from_a_clean_clone(tmp_path: Path) -> None:
    """`make demo` in a fresh clone runs the pipeline, prints a verified audit, and cleans up."""
    clone = _clone(tmp_path)
    dry = _make_demo(clone, tmp_path, dry_run=True)
    assert dry.returncode == 0, dry.stderr
    assert "pip" not in dry.stdout and "python -m examples.demo" in dry.stdout

    result = _make_demo(clone, tmp_path, dry_run=False)
    out = result.stdout
    assert result.returncode == 0, out[-6000:] + result.stderr[-4000:]

    # The code that ran is the clone's, not this working tree's.
    assert f"(code from {clone})" in out
    for fragment in (
        "extract part 0: wrote s3://luigi-creds-demo/raw/part-0.csv as AWS key ASIA",
        "extract part 2: wrote s3://luigi-creds-demo/raw/part-2.csv",
        "vault: read secret/etl/db (fields: password;",
        "with a token of policies [etl-read]",
        "aws s3 ls (credentials via credential_env): 3 objects",
        "raw/part-1.csv",
        "warehouse: logged in to PostgreSQL as v-",
        "7 ran successfully",
        "revoked 1 session(s)",
    ):
        assert fragment in out, fragment
    # Each extract ran with its own AWS credentials.
    keys = set(re.findall(r"extract part \d: .* as AWS key (ASIA\w+)", out))
    assert len(keys) == 3
    # Two workers: the extract tasks ran in more than one process.
    assert len(set(re.findall(r"\[pid (\d+)\] extract", out))) >= 2

    report = out.split("== luigi-creds-broker audit report", 1)[1]
    rows = _report_rows(report.split("== luigi-creds-broker audit verify", 1)[0])
    # 3 extracts and the aws CLI task at least; more when a start-minted credential is re-minted.
    assert rows["etl-writer"] >= 4
    assert rows["etl-vault"] == 1 and rows["warehouse"] == 1
    assert "Denials by reason\n  (none)" in report
    verify = report.split("== luigi-creds-broker audit verify", 1)[1]
    assert "  OK\n" in verify and "0 records after the last checkpoint" in verify

    # The demo reports its own duration; how long it takes is the benchmark's business, not a
    # pass/fail line here (no duration is promised, and a shared 2-core machine varies widely).
    assert int(_found(r"demo finished in (\d+) s", out)) >= 0
    # No secret in what the demo prints: neither the KV value nor any JWT.
    assert KV_VALUE not in out + result.stderr
    assert not re.search(r"eyJ[\w-]{10,}\.eyJ", out + result.stderr)
    # The private state dir (AppRole files, audit DB, outputs) is gone; the broker is down.
    state_dir = _found(r"state dir (\S+) \(0700", out)
    assert Path(state_dir).parent == tmp_path and not Path(state_dir).exists()
    # Nothing else was left in TMPDIR, and nothing was written into the checkout.
    assert [p.name for p in tmp_path.iterdir()] == ["clone"]
    status = subprocess.run(
        ["git", "-C", str(clone), "status", "--porcelain", "--ignored", "--untracked-files=all"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert all("__pycache__" in line for line in status.splitlines()), status
    broker_url = _found(r"broker (http://127\.0\.0\.1:\d+);", out)
    assert not http_ok(broker_url + "/healthz", timeout=0.5)


def _exchange(broker_url: str, token: str, grant: str) -> tuple[int, dict[str, Any]]:
    form = {
        "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
        "subject_token": token,
        "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
        "audience": grant,
    }
    request = urllib.request.Request(
        broker_url + "/v1/token", data=urllib.parse.urlencode(form).encode("ascii")
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def _dev_token(state_file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "broker", "dev", "token", "--state-file", str(state_file), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=REPO_ROOT,
    )


@pytest.mark.integration
def test_dev_command_serves_tokens_and_stops_on_sigterm(tmp_path: Path) -> None:
    """`dev` brings up a working stack, `dev token` mints from it, SIGTERM stops and cleans up."""
    state_file = tmp_path / "run" / "state.json"
    process = start_process(
        [sys.executable, "-m", "broker", "dev", "--state-file", str(state_file), "--no-database"],
        log_path=tmp_path / "dev.log",
        ready=state_file.exists,
        env={"TMPDIR": str(tmp_path)},
        timeout=120,
        cwd=REPO_ROOT,
    )
    try:
        assert stat.S_IMODE(state_file.stat().st_mode) == 0o600
        state = json.loads(state_file.read_text())
        state_dir = Path(state["state_dir"])
        assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
        assert "warehouse" not in state["grants"]
        secret_id = (state_dir / "vault" / "secret_id").read_text().strip()
        assert stat.S_IMODE((state_dir / "vault" / "secret_id").stat().st_mode) == 0o600
        assert secret_id not in state_file.read_text()
        log = process.log_text()
        assert f"broker_url = {state['broker_url']}" in log
        assert "token_source = env:LUIGI_CREDS_ID_TOKEN" in log

        github = _dev_token(state_file, "--preset", "github")
        assert github.returncode == 0, github.stderr
        status, body = _exchange(state["broker_url"], github.stdout.strip(), "gh-etl")
        assert status == 200, body
        assert body["credentials"]["AccessKeyId"].startswith("ASIA")

        gitlab = _dev_token(state_file, "--preset", "gitlab", "--claim", "ref=feature/x")
        status, body = _exchange(state["broker_url"], gitlab.stdout.strip(), "etl-writer")
        assert (status, body["error"]) == (400, "invalid_target")

        okta = _dev_token(state_file, "--preset", "okta")
        status, body = _exchange(state["broker_url"], okta.stdout.strip(), "okta-etl")
        assert status == 200, body
        assert "etl-read" in body["credentials"]["policies"]
    finally:
        code = process.stop(grace=30)
    assert code == 0, process.log_text()[-4000:]
    assert "dev: stopped" in process.log_text()
    assert not state_file.exists()
    assert not state_dir.exists()
    for url in (state["broker_url"], state["vault_addr"], state["aws_endpoint_url"]):
        assert not http_ok(url + "/", timeout=0.5), url


def test_dev_token_without_a_running_stack_says_how_to_start_one(tmp_path: Path) -> None:
    """`dev token` with no state file exits 2 and names `luigi-creds-broker dev`."""
    result = _dev_token(tmp_path / "missing.json")
    assert result.returncode == 2
    assert "luigi-creds-broker dev" in result.stderr and not result.stdout


def test_claim_arguments_parse_as_strings_or_json() -> None:
    """`k=v` gives a string claim, `k:=json` any JSON value, and a bare word is refused."""
    claims = parse_claims(["ref=release/1", "runner_id:=7", 'groups:=["a"]', "jti:=null"])
    assert claims == {"ref": "release/1", "runner_id": 7, "groups": ["a"], "jti": None}
    with pytest.raises(ValueError, match="NAME=VALUE"):
        parse_claims(["oops"])


EXAMPLE_STATE_DIR = Path("/tmp/luigi-creds-dev-XXXXXXXX")


def _example_policy(database: bool) -> str:
    """The dev policy with the placeholder ports and state dir examples/dev-policy.toml shows."""
    return policy_text(
        listen="127.0.0.1:8480",
        state_dir=EXAMPLE_STATE_DIR,
        issuer_url="http://127.0.0.1:9000",
        moto_url="http://127.0.0.1:5000",
        vault_url="http://127.0.0.1:8200",
        role_arn="arn:aws:iam::123456789012:role/luigi-creds-dev-etl",
        role_id_file=EXAMPLE_STATE_DIR / "vault" / "role_id",
        secret_id_file=EXAMPLE_STATE_DIR / "vault" / "secret_id",
        database=database,
    )


@pytest.mark.parametrize("database", [True, False])
def test_dev_policy_loads_with_every_grant(database: bool) -> None:
    """The generated dev policy passes the broker's loader and names the advertised grants."""
    config = parse_config(_example_policy(database), source="dev.toml")
    assert tuple(g.name for g in config.grants) == grant_names(database)
    assert [i.name for i in config.issuers] == ["dev"]


def test_example_dev_policy_is_what_the_dev_stack_generates() -> None:
    """examples/dev-policy.toml is the generator's output below a comment header, and loads."""
    path = REPO_ROOT / "examples" / "dev-policy.toml"
    text = path.read_text(encoding="utf-8")
    header, generated = text.split("\n\n", 1)
    assert all(line.startswith("# ") for line in header.splitlines())
    assert generated == _example_policy(True)
    assert len(load_config(path).grants) == len(grant_names(True))


def test_state_dir_must_be_a_real_directory_of_ours(tmp_path: Path) -> None:
    """A symlink where the private state dir should be is refused, and a lax mode is tightened."""
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(DevStackError, match="not a directory owned by this user"):
        _private_dir(tmp_path / "link")
    lax = tmp_path / "lax"
    lax.mkdir(mode=0o755)
    _private_dir(lax)
    assert stat.S_IMODE(lax.stat().st_mode) == 0o700


def test_a_second_dev_stack_on_the_same_state_file_is_refused(tmp_path: Path) -> None:
    """While the state file names a live process, starting another stack fails before any work."""
    state_file = tmp_path / "state.json"
    state_file.write_text(json.dumps({**_FAKE_STATE, "pid": os.getpid()}))
    stack = DevStack(state_file=state_file)
    with pytest.raises(DevStackError, match="already running"):
        stack.start()
    assert stack.state_dir is None and stack.bao is None and state_file.exists()


_FAKE_STATE: dict[str, Any] = {
    "pid": 0,
    "state_dir": "/nonexistent",
    "config": "/nonexistent/broker.toml",
    "broker_url": "http://127.0.0.1:1",
    "issuer_url": "http://127.0.0.1:2",
    "vault_addr": "http://127.0.0.1:3",
    "aws_endpoint_url": "http://127.0.0.1:4",
    "bucket": "b",
    "role_arn": "arn:aws:iam::123456789012:role/r",
    "grants": ["etl-writer"],
    "database": False,
    "luigi_config": "/nonexistent/luigi.cfg",
}


@pytest.mark.integration
def test_demo_without_postgresql_leaves_the_database_grant_out(tmp_path: Path) -> None:
    """With no PostgreSQL answering, the demo runs every other task and still succeeds."""
    env = {
        **os.environ,
        "TMPDIR": str(tmp_path),
        "LUIGI_CREDS_TEST_PG": f"postgresql://postgres@127.0.0.1:{free_port()}/test",
        "PATH": f"{VENV / 'bin'}{os.pathsep}{os.environ['PATH']}",
    }
    result = subprocess.run(
        [sys.executable, "-m", "examples.demo"],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        cwd=REPO_ROOT,
        check=False,
    )
    out = result.stdout
    assert result.returncode == 0, out[-6000:] + result.stderr[-4000:]
    assert "no PostgreSQL answers; the `warehouse` database grant is left out" in out
    assert "6 ran successfully" in out and "WarehouseLogin" not in out
    assert "warehouse" not in _report_rows(out)
    assert not list(tmp_path.glob("luigi-creds-dev-*"))


@pytest.mark.integration
def test_demo_interrupted_by_sigterm_stops_the_stack_and_deletes_its_files(tmp_path: Path) -> None:
    """SIGTERM with the stack up ends the demo with 143, its servers down and its state dir gone.

    Sent as soon as the stack is up, not mid-pipeline: the pipeline plus the audit steps after
    it are what leaves time for the signal to land before the demo ends on its own (signalled at
    the pipeline banner, a fast run could finish first and exit 0).
    """
    log_path = tmp_path / "demo.log"

    def pipeline_running() -> bool:
        return log_path.exists() and "(0700: AppRole files" in log_path.read_text()

    demo = start_process(
        [sys.executable, "-m", "examples.demo"],
        log_path=log_path,
        ready=pipeline_running,
        env={"TMPDIR": str(tmp_path), "PATH": f"{VENV / 'bin'}{os.pathsep}{os.environ['PATH']}"},
        timeout=120,
        cwd=REPO_ROOT,
    )
    code = demo.stop(grace=30)
    out = demo.log_text()
    assert code == 143, out[-4000:]
    assert "demo interrupted: the stack is stopped and its state dir deleted" in out
    assert not list(tmp_path.glob("luigi-creds-dev-*"))
    broker_url = _found(r"broker (http://127\.0\.0\.1:\d+);", out)
    assert not http_ok(broker_url + "/healthz", timeout=0.5)
