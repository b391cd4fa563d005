"""luigi_creds end to end against the real broker and its real neighbours.

A local OIDC issuer for GitLab-shaped tokens and one for GitHub-shaped tokens, moto in server mode
(STS, S3, IAM), OpenBao with the broker's AppRole and the database engine on the test PostgreSQL,
and `luigi-creds-broker serve` on SQLite; Luigi jobs are real `luigi.build` runs in a child
process (tests/pipelines.py) with workers and `force_multiprocessing` set in the job's luigi.cfg;
the AWS CLI is the real `aws` (awscli). Assertions read the broker's audit ledger, moto's S3,
OpenBao and PostgreSQL, never the client's own account of what happened.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import hvac.exceptions
import psycopg
import pytest
from screenshots import chromium_screenshot
from stack import READ_ONLY_SEALER

from broker.audit import open_store
from broker.audit.events import AuditEvent, Outcome
from broker.dev.harness import (
    Broker,
    DevIssuer,
    Moto,
    pg_url,
    policy_toml,
    start_broker,
    start_dev_issuer,
    start_moto,
)
from broker.dev.processes import free_port
from broker.dev.vault import DB_ROLE, BrokerVault, OpenBao, setup_broker, start_openbao
from broker.sessions import open_state
from luigi_creds.client import AwsCredentials, BrokerClient, BrokerError
from luigi_creds.identity import parse_token_source

pytestmark = pytest.mark.integration


ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
BUCKET = "e2e-pipeline"  # pipelines.BUCKET; not imported: importing pipelines imports Luigi
GITLAB_SUBJECT = "project_path:data-platform/etl:ref_type:branch:ref:main"
GITHUB_SUBJECT = "repo:example-org/etl:ref:refs/heads/main"
GH_REQUEST_BEARER = "gh-request-bearer-for-tests"
# Vault token lifetimes for the long task: 12 s per token (the task's `durations`), and a token
# role whose explicit max TTL of 18 s stops renewals, so the client must re-mint once.
TOKEN_MAX_TTL = "18s"


@dataclass
class Stack:
    workdir: Path
    issuer: DevIssuer
    gh_issuer: DevIssuer
    moto: Moto
    role_arn: str
    bao: OpenBao
    broker: Broker
    audit_url: str

    def events(self) -> list[AuditEvent]:
        store = open_store(self.audit_url)
        try:
            return list(store.events())
        finally:
            store.close()

    def gitlab_token(self, **claims: object) -> str:
        return self.issuer.mint("gitlab", ttl=600, **claims)


def _grants_toml(*, gh_issuer_url: str, broker_url: str, role_arn: str, vault: BrokerVault) -> str:
    """The GitHub issuer, an AWS grant for it, and the Vault grants (token and dynamic secret)."""
    return f"""
[[issuer]]
name = "github"
url = "{gh_issuer_url}"
audiences = ["{broker_url}"]
algorithms = ["RS256"]
require_dpop = true

[[grant]]
name = "gh-writer"
issuers = ["github"]
ttl = "15m"
[grant.match]
repository_id = "690215432"
ref = "refs/heads/main"
[grant.aws]
role_arn = "{role_arn}"

[[grant]]
name = "etl-admin"
issuers = ["gitlab"]
ttl = "15m"
[grant.match]
project_id = "1"
[grant.aws]
role_arn = "{role_arn}"

[[grant]]
name = "etl-vault"
issuers = ["gitlab"]
ttl = "5m"
[grant.match]
project_id = "55235664"
[grant.vault]
token_policies = ["etl-read"]

[[grant]]
name = "warehouse"
issuers = ["gitlab"]
ttl = "2m"
[grant.match]
project_id = "55235664"
[grant.vault]
secret = "database/creds/{DB_ROLE}"

[upstream.vault]
url = "{vault.upstream.url}"
auth = "approle"
role_id_file = "{vault.role_id_file}"
secret_id_file = "{vault.secret_id_file}"
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("e2e")
    started: list[Any] = []
    try:
        issuer = start_dev_issuer(workdir / "gitlab-issuer")
        started.append(issuer)
        gh_issuer = start_dev_issuer(workdir / "github-issuer", algs="RS256")
        started.append(gh_issuer)
        moto = start_moto(workdir)
        started.append(moto)
        role_arn = moto.create_role("etl-writer")
        moto.client("s3").create_bucket(Bucket=BUCKET)
        bao = start_openbao(workdir / "bao")
        started.append(bao)
        files = setup_broker(bao, workdir / "bao-files", pg_url=pg_url())
        # Tokens through this role stop extending 18 s after they are created (see above).
        bao.root().write(
            "auth/token/roles/luigi-creds",
            allowed_policies="etl-read",
            orphan=False,
            renewable=True,
            token_explicit_max_ttl=TOKEN_MAX_TTL,
        )
        port = free_port()
        broker_url = f"http://127.0.0.1:{port}"
        db = workdir / "broker" / "audit.db"
        config = policy_toml(
            issuer_url=issuer.url,
            audit_db=db,
            listen=f"127.0.0.1:{port}",
            moto_url=moto.url,
            role_arn=role_arn,
            # Every job in this module runs on sessions bound to its DPoP key (RFC 9449).
            issuer_extra="require_dpop = true",
            extra=_grants_toml(
                gh_issuer_url=gh_issuer.url, broker_url=broker_url, role_arn=role_arn, vault=files
            ),
        )
        broker = start_broker(workdir / "broker", config, env=moto.broker_env)
        started.append(broker)
        yield Stack(workdir, issuer, gh_issuer, moto, role_arn, bao, broker, f"sqlite:///{db}")
    finally:
        for server in reversed(started):
            server.stop()


# --- running Luigi jobs ---------------------------------------------------------------------------


@dataclass
class Job:
    popen: subprocess.Popen[bytes]
    out: Path
    result_path: Path
    log_path: Path

    def wait(self, timeout: float = 120) -> dict[str, Any]:
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"job still running after {timeout} s:\n{self.log()[-4000:]}"
            ) from None
        assert self.result_path.exists(), self.log()[-4000:]
        result: dict[str, Any] = json.loads(self.result_path.read_text())
        return result

    def kill(self) -> None:
        """SIGKILL the job and its forked workers (the job leads its own process group)."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def markers(self, pattern: str) -> list[dict[str, Any]]:
        return [json.loads(p.read_text()) for p in sorted(self.out.glob(pattern))]


_jobs: list[Job] = []


@pytest.fixture(autouse=True)
def _no_job_left_behind() -> Iterator[None]:
    """A test that fails while its job runs must not leave the job's processes behind."""
    yield
    while _jobs:
        _jobs.pop().kill()


def _assert_bound_to_one_key(stack: Stack, issued: list[AuditEvent]) -> None:
    """Every credential of the job's session was minted on a proof by one DPoP key, the key
    the session row is bound to (the issuer requires DPoP, so nothing else could mint)."""
    (jkt,) = {e.detail.get("dpop_jkt") for e in issued}
    assert isinstance(jkt, str) and len(jkt) == 43
    _replay, sessions = open_state(stack.audit_url, sealer=READ_ONLY_SEALER)
    try:
        (session_id,) = {e.session_id for e in issued}
        session = sessions.get(session_id)
        assert session is not None and session.key_thumbprint == jkt
    finally:
        sessions.close()


def _clean_env() -> dict[str, str]:
    """The test's environment minus anything that would pick credentials for a child."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AWS_", "LUIGI_CREDS_", "VAULT_", "BAO_", "ACTIONS_"))
        and k != "GITHUB_STEP_SUMMARY"  # a job summary goes where a test says, not to CI's page
    }


def _write_luigi_cfg(path: Path, broker_url: str, token_source: str, vault_addr: str) -> None:
    path.write_text(
        "[core]\n"
        "autoload_range = false\n"
        "workers = 3\n"
        "\n[worker]\n"
        "force_multiprocessing = true\n"
        "\n[luigi_creds]\n"
        f"broker_url = {broker_url}\n"
        f"token_source = {token_source}\n"
        f"vault_addr = {vault_addr}\n"
    )


def start_job(
    stack: Stack,
    workdir: Path,
    scenario: str,
    *,
    token_source: str,
    broker_url: str | None = None,
    env: dict[str, str] | None = None,
    luigi_cfg: str | None = None,
) -> Job:
    """Start `pipelines.main(scenario)` in a child process with its own luigi.cfg and log.

    `luigi_cfg` replaces the generated file (then `token_source` and `broker_url` are unused)."""
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = workdir / "luigi.cfg"
    if luigi_cfg is None:
        _write_luigi_cfg(cfg, broker_url or stack.broker.url, token_source, stack.bao.url)
    else:
        cfg.write_text(luigi_cfg)
    out = workdir / "out"
    out.mkdir()
    result = workdir / "result.json"
    log_path = workdir / "job.log"
    child_env = {
        **_clean_env(),
        "LUIGI_CONFIG_PATH": str(cfg),
        "PYTHONPATH": f"{ROOT / 'tests'}{os.pathsep}{ROOT}",
        "PIPELINE_S3_URL": stack.moto.url,
        "AWS_CONFIG_FILE": str(workdir / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(workdir / "no-aws-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
        # A stray key in the job's environment: the broker's credentials must win over it.
        "AWS_ACCESS_KEY_ID": "AKIASTRAYSTRAYSTRAY",
        **(env or {}),
    }
    with log_path.open("wb") as log:
        popen = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sys, pipelines; sys.exit(pipelines.main())",
                scenario,
                "--out",
                str(out),
                "--result",
                str(result),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=child_env,
            cwd=workdir,
            start_new_session=True,
        )
    job = Job(popen, out, result, log_path)
    _jobs.append(job)
    return job


def _issued(events: list[AuditEvent], tasks: set[str]) -> list[AuditEvent]:
    return [e for e in events if e.outcome == Outcome.ISSUED and e.task in tasks]


# --- twelve tasks, three forked workers -----------------------------------------------------------


def test_twelve_tasks_on_three_forked_workers_get_twelve_audited_credentials(
    stack: Stack, tmp_path: Path
) -> None:
    """Twelve tasks on three forked workers write to S3 with twelve distinct audited keys."""
    token_file = tmp_path / "ci-token"
    token_file.write_text(stack.gitlab_token())
    job = start_job(stack, tmp_path / "job", "twelve", token_source=f"file:{token_file}")
    result = job.wait()
    log = job.log()
    assert result["ok"], log[-4000:]
    task_ids = set(result["tasks"]["WriteObject"])
    assert len(task_ids) == 12

    markers = job.markers("write-*.json")
    assert {m["task"] for m in markers} == task_ids
    keys = {m["access_key_id"] for m in markers}
    assert len(keys) == 12
    assert "AKIASTRAYSTRAYSTRAY" not in keys
    # force_multiprocessing: every task ran in a process of its own, none in the job's process.
    pids = {m["pid"] for m in markers}
    assert len(pids) == 12 and job.popen.pid not in pids
    # The job's process set each task's mint going before it forked the task's process.
    assert all(m["launched"] for m in markers)

    s3 = stack.moto.client("s3")
    listed = s3.list_objects_v2(Bucket=BUCKET, Prefix="objects/")["Contents"]
    assert len(listed) == 12
    bodies = [json.loads(s3.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read()) for o in listed]
    assert {(b["task"], b["access_key_id"]) for b in bodies} == {
        (m["task"], m["access_key_id"]) for m in markers
    }

    issued = _issued(stack.events(), task_ids)
    assert len(issued) == 12
    assert {e.task for e in issued} == task_ids
    assert {e.credential_ref for e in issued} == keys
    assert {(m["task"], m["access_key_id"]) for m in markers} == {
        (e.task, e.credential_ref) for e in issued
    }
    # One exchange of the file's token, then eleven mints on the same refresh session.
    assert sorted(e.kind for e in issued) == ["exchange"] + ["refresh"] * 11
    assert len({e.session_id for e in issued}) == 1
    _assert_bound_to_one_key(stack, issued)
    # The job's process ended the session when it exited.
    ended = [
        e for e in stack.events() if e.kind == "revoke" and e.session_id == issued[0].session_id
    ]
    assert [(e.outcome, e.reason) for e in ended] == [(Outcome.REVOKED, "client_revoked")]
    assert all(e.subject == GITLAB_SUBJECT and e.grant == "etl-writer" for e in issued)
    assert "Traceback" not in log
    assert token_file.read_text() not in log


def test_the_readmes_luigi_cfg_drives_a_real_build(stack: Stack, tmp_path: Path) -> None:
    """The README's [luigi_creds] section, verbatim but for the broker's address, configures a
    real luigi.build on three forked workers; the GitLab source reads the job's token variable."""
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```ini\n(.*?)```", readme, flags=re.DOTALL)
    (section,) = [block for block in blocks if "[luigi_creds]" in block]
    assert "token_source = gitlab\n" in section
    section = section.replace("https://broker.example.com", stack.broker.url).replace(
        "https://vault.example.com", stack.bao.url
    )
    # The README's own [worker] section (task_process_context) gets the forked workers added.
    assert "[worker]\n" in section
    section = section.replace("[worker]\n", "[worker]\nforce_multiprocessing = true\n", 1)
    cfg = "[core]\nautoload_range = false\nworkers = 3\n\n" + section
    token = stack.gitlab_token()
    job = start_job(
        stack,
        tmp_path / "job",
        "twelve",
        token_source="unused",
        luigi_cfg=cfg,
        env={"LUIGI_CREDS_ID_TOKEN": token},
    )
    result = job.wait()
    assert result["ok"], job.log()[-4000:]
    task_ids = set(result["tasks"]["WriteObject"])
    issued = _issued(stack.events(), task_ids)
    assert {e.task for e in issued} == task_ids
    assert all(e.subject == GITLAB_SUBJECT for e in issued)
    # Per task: the mixin's etl-writer, and from the README's zero-code settings one more
    # etl-writer (what the task's SDKs get) and one etl-vault token (VAULT_TOKEN).
    per_task = Counter((e.task, e.grant) for e in issued)
    assert per_task == Counter(
        {**{(t, "etl-writer"): 2 for t in task_ids}, **{(t, "etl-vault"): 1 for t in task_ids}}
    )
    assert token not in job.log()


# --- a task outlives its Vault token; a task's lease ends with it ---------------------------------


def _pg_role_exists(name: str) -> bool:
    with psycopg.connect(pg_url(), autocommit=True) as conn:
        return (
            conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,)).fetchone()
            is not None
        )


def test_task_outlives_its_vault_token_and_its_lease_ends_with_it(
    stack: Stack, tmp_path: Path
) -> None:
    """An 18 s task on 12 s Vault tokens renews then re-mints without error; a lease is revoked."""
    ci_token = stack.gitlab_token()
    job = start_job(
        stack, tmp_path / "job", "vault", token_source="env:CI_ID_TOKEN",
        env={"CI_ID_TOKEN": ci_token},
    )  # fmt: skip
    result = job.wait()
    log = job.log()
    assert result["ok"], log[-4000:]
    (long_id,) = result["tasks"]["LongVault"]
    (secret_id,) = result["tasks"]["UseSecret"]

    (marker,) = job.markers("long-vault.json")
    seen = [(accessor, ttl) for accessor, ttl in marker["seen"]]
    assert marker["reads"] >= 20  # a KV read about every 0.5 s for 18 s, none failed
    accessors = list(dict.fromkeys(a for a, _ in seen))
    assert len(accessors) >= 2, seen  # re-minted when the first token stopped extending
    first = [ttl for a, ttl in seen if a == accessors[0]]
    assert any(b > a for a, b in itertools.pairwise(first)), first  # renewed in place
    assert all(ttl > 0 for _, ttl in seen)
    # Released at success: the newest token is revoked, not left to run out its TTL.
    with pytest.raises(hvac.exceptions.InvalidRequest):
        stack.bao.root().auth.token.lookup_accessor(accessors[-1])

    events = stack.events()
    long_issued = _issued(events, {long_id})
    assert len(long_issued) >= 2  # the re-mint is in the audit, under the task's id
    assert all(e.grant == "etl-vault" for e in long_issued)
    assert len({e.credential_ref for e in long_issued}) == len(long_issued)

    (used,) = job.markers("use-secret.json")
    (secret_issued,) = _issued(events, {secret_id})
    assert secret_issued.credential_ref == used["lease_id"]
    revoked = [
        e for e in events if e.outcome == Outcome.REVOKED and e.credential_ref == used["lease_id"]
    ]
    assert [e.reason for e in revoked] == ["lease_revoked"]
    assert revoked[0].session_id == secret_issued.session_id
    assert not _pg_role_exists(used["username"])
    assert "Traceback" not in log and "renewal failed" not in log
    assert ci_token not in log and "etl-kv-value" not in log


# --- the real AWS CLI -----------------------------------------------------------------------------


def _cli_env(stack: Stack, tmp_path: Path, *, token_source: str) -> dict[str, str]:
    cfg = tmp_path / "luigi.cfg"
    _write_luigi_cfg(cfg, stack.broker.url, token_source, stack.bao.url)
    return {
        **_clean_env(),
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "LUIGI_CONFIG_PATH": str(cfg),
        "AWS_CONFIG_FILE": str(tmp_path / "aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_DEFAULT_REGION": "us-east-1",
    }


def _run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=False)


def test_exec_runs_the_aws_cli_on_broker_credentials(stack: Stack, tmp_path: Path) -> None:
    """`luigi-creds exec` runs two `aws` commands on the agent's credentials, then revokes."""
    token_file = tmp_path / "ci-token"
    token_file.write_text(stack.gitlab_token())
    env = _cli_env(stack, tmp_path, token_source=f"file:{token_file}")
    env["AWS_ACCESS_KEY_ID"] = "AKIASTRAYSTRAYSTRAY"  # removed by exec before the child starts
    script = (
        f"aws s3 ls --endpoint-url {stack.moto.url} && "
        f"aws sts get-caller-identity --endpoint-url {stack.moto.url} --output json"
    )
    argv = ["luigi-creds", "exec", "--grant", "etl-writer", "--task", "cli-exec"]
    out = _run([*argv, "--", "sh", "-c", script], env)
    assert out.returncode == 0, out.stderr
    assert BUCKET in out.stdout
    assert token_file.read_text() not in out.stdout + out.stderr
    identity = json.loads(out.stdout[out.stdout.index("{") :])
    assert ":assumed-role/etl-writer/" in identity["Arn"]

    events = stack.events()
    issued = _issued(events, {"cli-exec"})
    # exec's own mint (an exchange), which the agent then serves to the AWS SDK's container
    # provider: no second mint for the same grant and task.
    assert [e.kind for e in issued] == ["exchange"]
    session = issued[0].session_id
    assert [e.reason for e in events if e.kind == "revoke" and e.session_id == session] == [
        "client_revoked"
    ]


AWS_PROFILE_CONFIG = (
    "[profile etl]\n"
    "region = us-east-1\n"
    "credential_process = luigi-creds credential-process --grant etl-writer --task {task}\n"
)


def test_credential_process_in_aws_config_serves_the_aws_cli(stack: Stack, tmp_path: Path) -> None:
    """The `aws` CLI gets credentials from `credential_process = luigi-creds credential-process`,
    one exchange per run with a one-shot CI token, and no second attempt that would replay it."""
    env = _cli_env(stack, tmp_path, token_source="env:CI_ID_TOKEN")
    (tmp_path / "aws-config").write_text(AWS_PROFILE_CONFIG.format(task="cli-cp"))
    # A GitLab-style token is accepted once; each `aws` run is its own job with its own token.
    env["CI_ID_TOKEN"] = stack.gitlab_token()
    listed = _run(["aws", "--profile", "etl", "s3", "ls", "--endpoint-url", stack.moto.url], env)
    assert listed.returncode == 0, listed.stderr
    assert BUCKET in listed.stdout
    env["CI_ID_TOKEN"] = stack.gitlab_token()
    who = _run(
        ["aws", "--profile", "etl", "sts", "get-caller-identity", "--endpoint-url", stack.moto.url,
         "--output", "json"],
        env,
    )  # fmt: skip
    assert who.returncode == 0, who.stderr
    assert ":assumed-role/etl-writer/" in json.loads(who.stdout)["Arn"]

    events = [e for e in stack.events() if e.task == "cli-cp"]
    issued = [e for e in events if e.outcome == Outcome.ISSUED]
    assert [e.kind for e in issued] == ["exchange", "exchange"]
    assert len({e.credential_ref for e in issued}) == 2
    # botocore did not re-run credential_process for an early refresh, which the broker would
    # have refused as a replay of the spent token.
    assert [e for e in events if e.outcome == Outcome.DENIED] == []


def test_credential_process_under_exec_shares_one_session(stack: Stack, tmp_path: Path) -> None:
    """Inside `luigi-creds exec`, every `aws` run's credential_process mints through the agent:
    one CI token, one exchange, refreshes after it, and the session ends with exec."""
    env = _cli_env(stack, tmp_path, token_source="env:CI_ID_TOKEN")
    env["CI_ID_TOKEN"] = stack.gitlab_token()
    (tmp_path / "aws-config").write_text(AWS_PROFILE_CONFIG.format(task="cli-cp-exec"))
    script = (
        f"aws --profile etl s3 ls --endpoint-url {stack.moto.url} && "
        f"aws --profile etl sts get-caller-identity --endpoint-url {stack.moto.url} --output json"
    )
    argv = ["luigi-creds", "exec", "--grant", "etl-writer", "--task", "cli-cp-exec"]
    out = _run([*argv, "--", "sh", "-c", script], env)
    assert out.returncode == 0, out.stderr
    assert BUCKET in out.stdout
    assert ":assumed-role/etl-writer/" in json.loads(out.stdout[out.stdout.index("{") :])["Arn"]

    events = [e for e in stack.events() if e.task == "cli-cp-exec"]
    issued = [e for e in events if e.outcome == Outcome.ISSUED]
    # exec's own mint, then at least one credential_process run per `aws` command.
    assert [e.kind for e in issued][:1] == ["exchange"] and len(issued) >= 3
    assert {e.kind for e in issued[1:]} == {"refresh"}
    assert len({e.session_id for e in issued}) == 1
    assert [e for e in events if e.outcome == Outcome.DENIED] == []
    session = issued[0].session_id
    ended = [e.reason for e in stack.events() if e.kind == "revoke" and e.session_id == session]
    assert ended == ["client_revoked"]


# --- GitHub request URL; a rotating token file ----------------------------------------------------


class GitHubIdTokenEndpoint:
    """Stands in for ACTIONS_ID_TOKEN_REQUEST_URL: checks bearer and audience, returns a token."""

    def __init__(self, issuer: DevIssuer, audience: str) -> None:
        self.issuer = issuer
        self.audience = audience
        self.served = 0
        self.refused: list[str] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/_apis/idtoken?api-version=2.0"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                query = parse_qs(urlsplit(self.path).query)
                status, body = 200, b""
                if self.headers.get("Authorization") != f"bearer {GH_REQUEST_BEARER}":
                    endpoint.refused.append("bearer")
                    status = 401
                elif query.get("audience") != [endpoint.audience]:
                    endpoint.refused.append("audience")
                    status = 400
                else:
                    endpoint.served += 1
                    token = endpoint.issuer.mint("github", audience=endpoint.audience)
                    body = json.dumps({"value": token}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        return Handler

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextlib.contextmanager
def _client(stack: Stack, spec: str, environ: dict[str, str]) -> Iterator[BrokerClient]:
    """A broker client for the token source `spec`, as `[luigi_creds] token_source` builds it."""

    def clock() -> datetime:
        return datetime.now(UTC)

    with httpx.Client(timeout=30, follow_redirects=False) as http:
        source = parse_token_source(
            spec, environ=environ, http=http, audience=stack.broker.url, clock=clock
        )
        yield BrokerClient(stack.broker.url, source, http=http, clock=clock)


def test_github_source_fetches_from_the_request_url_and_renews_a_revoked_session(
    stack: Stack,
) -> None:
    """The github source asks the request URL with its bearer and audience, and asks again
    for a new token when the operator revokes the session."""
    endpoint = GitHubIdTokenEndpoint(stack.gh_issuer, audience=stack.broker.url)
    environ = {
        "ACTIONS_ID_TOKEN_REQUEST_URL": endpoint.url,
        "ACTIONS_ID_TOKEN_REQUEST_TOKEN": GH_REQUEST_BEARER,
    }
    wrong = {**environ, "ACTIONS_ID_TOKEN_REQUEST_TOKEN": "wrong-request-bearer"}
    try:
        with _client(stack, "github", environ) as client:
            assert isinstance(client.mint("gh-writer", task="gh-1"), AwsCredentials)
            assert (endpoint.served, endpoint.refused) == (1, [])

            ended = stack.broker.cli("sessions", "revoke", "--subject", GITHUB_SUBJECT)
            assert ended.returncode == 0 and "revoked 1 session" in ended.stdout, ended.stderr
            assert isinstance(client.mint("gh-writer", task="gh-2"), AwsCredentials)
            assert endpoint.served == 2

        with _client(stack, "github", wrong) as bad, pytest.raises(BrokerError) as info:
            bad.mint("gh-writer", task="gh-3")
        assert info.value.error == "identity_unavailable" and "HTTP 401" in str(info.value)
        assert "wrong-request-bearer" not in str(info.value)
        assert endpoint.refused == ["bearer"]
    finally:
        endpoint.stop()

    issued = _issued(stack.events(), {"gh-1", "gh-2"})
    assert [(e.task, e.kind, e.issuer, e.subject) for e in issued] == [
        ("gh-1", "exchange", "github", GITHUB_SUBJECT),
        ("gh-2", "exchange", "github", GITHUB_SUBJECT),
    ]
    assert issued[0].jti != issued[1].jti


def test_rotated_token_file_re_establishes_a_revoked_session(stack: Stack, tmp_path: Path) -> None:
    """After the session is revoked the file source re-exchanges, succeeding once the file
    holds a new token (the old one's jti is spent)."""
    subject = GITLAB_SUBJECT + ":rotation"
    token_file = tmp_path / "projected-token"
    token_file.write_text(stack.gitlab_token(sub=subject))
    with _client(stack, f"file:{token_file}", {}) as client:
        assert isinstance(client.mint("etl-writer", task="rot-1"), AwsCredentials)
        assert isinstance(client.mint("etl-writer", task="rot-2"), AwsCredentials)

        ended = stack.broker.cli("sessions", "revoke", "--subject", subject)
        assert ended.returncode == 0 and "revoked 1 session" in ended.stdout, ended.stderr
        with pytest.raises(BrokerError) as info:
            client.mint("etl-writer", task="rot-3")  # the file still holds the spent token
        assert info.value.error == "invalid_request"
        assert stack.broker.url in str(info.value) and "'etl-writer'" in str(info.value)

        token_file.write_text(stack.gitlab_token(sub=subject))  # the kubelet rotates the file
        assert isinstance(client.mint("etl-writer", task="rot-4"), AwsCredentials)

    issued = _issued(stack.events(), {"rot-1", "rot-2", "rot-3", "rot-4"})
    assert [(e.task, e.kind) for e in issued] == [
        ("rot-1", "exchange"),
        ("rot-2", "refresh"),
        ("rot-4", "exchange"),
    ]
    assert issued[0].session_id == issued[1].session_id != issued[2].session_id
    assert issued[0].jti != issued[2].jti


# --- the broker stops mid-pipeline ----------------------------------------------------------------


def _wait_for(paths: list[Path], job: Job, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        assert job.popen.poll() is None, job.log()[-4000:]
        assert time.monotonic() < deadline, job.log()[-4000:]
        time.sleep(0.05)


def test_broker_stopped_mid_pipeline(stack: Stack, tmp_path: Path) -> None:
    """With the broker stopped mid-job, running tasks finish on cached credentials and the
    task that needs a new one fails with the broker URL, grant and reason, without noise."""
    port = free_port()
    config = policy_toml(
        issuer_url=stack.issuer.url,
        audit_db=tmp_path / "down-audit.db",
        listen=f"127.0.0.1:{port}",
        moto_url=stack.moto.url,
        role_arn=stack.role_arn,
    )
    broker = start_broker(tmp_path / "down-broker", config, env=stack.moto.broker_env)
    ci_token = stack.gitlab_token()
    try:
        job = start_job(
            stack, tmp_path / "job", "broker-down", token_source="env:CI_ID_TOKEN",
            broker_url=broker.url, env={"CI_ID_TOKEN": ci_token},
        )  # fmt: skip
        _wait_for([job.out / "started-1", job.out / "started-2"], job)
    finally:
        broker.stop()
    (job.out / "go").touch()
    result = job.wait()
    log = job.log()

    assert not result["ok"]
    assert [m["task"] for m in job.markers("hold-*.json")] == sorted(result["tasks"]["Hold"])
    s3 = stack.moto.client("s3")
    held = s3.list_objects_v2(Bucket=BUCKET, Prefix="held/")["Contents"]
    assert sorted(o["Key"] for o in held) == ["held/1", "held/2"]
    assert not (job.out / "late.json").exists()

    failure = f"BrokerError: broker {broker.url} unreachable for grant 'etl-writer'"
    assert failure in log, log[-4000:]
    # Luigi's own report of the failed task is the only traceback; nothing chained to it.
    assert log.count("Traceback (most recent call last)") == 1, log[-4000:]
    assert "During handling of the above exception" not in log
    assert "The above exception was the direct cause" not in log
    # ...and it shows the task's own frames down to the accessor, none from HTTP or the agent.
    frames = log.split("Traceback (most recent call last)")[1].split(failure)[0]
    files = {line.split('"')[1] for line in frames.splitlines() if line.strip().startswith("File")}
    assert {Path(f).name for f in files} == {"worker.py", "pipelines.py", "luigi.py"}, frames
    assert "luigi-creds: minting at start of Late" in log
    # At exit the job tries once to end its session, and says so in one line when it cannot.
    assert "luigi-creds: ending the job's broker session failed: broker" in log
    assert ci_token not in log


# --- Must show 6: a stock pipeline, no code changes, under `luigi-creds exec` -----------------

PLAIN_PIPELINE = ROOT / "tests" / "plain_pipeline.py"


def _plain_job(
    stack: Stack, workdir: Path, grants: list[str], extra_cfg: str = "", task: str = "PlainAll"
) -> tuple[subprocess.CompletedProcess[str], Path, str]:
    """`luigi-creds exec --grant ... -- luigi --module plain_pipeline PlainAll --workers 3`."""
    argv, env, markers, token = _plain_job_argv(stack, workdir, grants, extra_cfg, task)
    out = subprocess.run(
        argv, env=env, cwd=workdir, capture_output=True, text=True, timeout=300, check=False
    )
    return out, markers, token


def _plain_job_argv(
    stack: Stack, workdir: Path, grants: list[str], extra_cfg: str, task: str
) -> tuple[list[str], dict[str, str], Path, str]:
    workdir.mkdir(parents=True, exist_ok=True)
    token_file = workdir / "ci-token"
    token_file.write_text(stack.gitlab_token())
    markers = workdir / "markers"
    markers.mkdir()
    cfg = workdir / "luigi.cfg"
    cfg.write_text(
        "[core]\nautoload_range = false\n"
        "\n[retcode]\ntask_failed = 3\n"
        "\n[worker]\nforce_multiprocessing = true\n"
        "task_process_context = luigi_creds.TaskCredentials\n"
        f"\n[s3]\nendpoint_url = {stack.moto.url}\n"
        f"\n[luigi_creds]\nbroker_url = {stack.broker.url}\ntoken_source = file:{token_file}\n"
        f"vault_addr = {stack.bao.url}\naws_grant = etl-writer\n{extra_cfg}"
    )
    env = {
        **_clean_env(),
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "LUIGI_CONFIG_PATH": str(cfg),
        "PYTHONPATH": f"{ROOT / 'tests'}{os.pathsep}{ROOT}",
        "PIPELINE_S3_URL": stack.moto.url,
        "PIPELINE_MARKERS": str(markers),
        "PIPELINE_PREFIX": workdir.name,
        "AWS_CONFIG_FILE": str(workdir / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(workdir / "no-aws-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_DEFAULT_REGION": "us-east-1",
        # A stray static key: it must never be what a task signs with.
        "AWS_ACCESS_KEY_ID": "AKIASTRAYSTRAYSTRAY",
        "AWS_SECRET_ACCESS_KEY": "stray-secret-never-used",
    }
    argv = ["luigi-creds", "exec"]
    for grant in grants:
        argv += ["--grant", grant]
    argv += ["--", "luigi", "--module", "plain_pipeline", task, "--workers", "3",
             "--local-scheduler"]  # fmt: skip
    return argv, env, markers, token_file.read_text()


def test_stock_pipeline_under_exec_gets_per_task_credentials(stack: Stack, tmp_path: Path) -> None:
    """A pipeline that never imports luigi_creds (S3Target outputs, plain boto3, the aws CLI in
    a subprocess), under `luigi-creds exec` with 3 forked workers: each task has its own
    access key minted for its id, awscli sees the grant's role, the scheduling process's
    exists() checks mint nothing of their own, and a child's bearer can mint neither another
    grant nor for another task (refused, and recorded by the broker)."""
    source = PLAIN_PIPELINE.read_text()
    assert "import luigi_creds" not in source and "from luigi_creds" not in source
    out, markers, ci_token = _plain_job(stack, tmp_path / "job", ["etl-writer"])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    seen = [json.loads(p.read_text()) for p in sorted(markers.glob("plain-*.json"))]
    assert len(seen) == 6
    tasks = {m["task"] for m in seen}
    keys = {m["access_key_id"] for m in seen}
    assert len(tasks) == 6 and len(keys) == 6 and "AKIASTRAYSTRAYSTRAY" not in keys
    assert len({m["pid"] for m in seen}) == 6  # a forked process per task
    # exec's bootstrap preloaded the task-process modules (and the boto3 bridge) into the
    # scheduling process, which forked every task process: they inherited them.
    (scheduling,) = [json.loads(p.read_text()) for p in markers.parent.glob("scheduling-*.json")]
    assert scheduling["preloaded"] and scheduling["boto3_bridge"]
    assert {m["ppid"] for m in seen} == {scheduling["pid"]}
    assert all(m["stray"] is None for m in seen)
    # The scheduling process started each task's mint before it forked the task's process.
    assert all(m["launched"] for m in seen)
    for m in seen:
        assert ":assumed-role/etl-writer/" in m["boto3_arn"]
        assert ":assumed-role/etl-writer/" in m["cli_arn"]
        assert m["probes"] == {
            f"etl-writer {m['task']}": "200",
            f"etl-vault {m['task']}": "403",
            "etl-writer PlainWrite(n=99)": "403",
        }
    s3 = stack.moto.client("s3")
    written = {
        json.loads(s3.get_object(Bucket=BUCKET, Key=f"job/{n}.json")["Body"].read())["task"]
        for n in range(6)
    }
    assert written == tasks

    events = stack.events()
    issued = [e for e in events if e.outcome == Outcome.ISSUED and e.task in tasks]
    assert {(e.task, e.credential_ref) for e in issued} == {
        (m["task"], m["access_key_id"]) for m in seen
    }
    session = issued[0].session_id
    in_session = [e for e in events if e.session_id == session]
    # exec's own mint (the scheduling process's credential, which every exists() check used),
    # then one per task process, the wrapper's included (its process checks its requirements'
    # S3 outputs); nothing else was issued on the session.
    job_issued = [e for e in in_session if e.outcome == Outcome.ISSUED]
    _assert_bound_to_one_key(stack, job_issued)
    (wrapper,) = {e.task for e in job_issued if e.task.startswith("PlainAll_")}
    assert sorted((e.kind, e.task) for e in job_issued) == sorted(
        [("exchange", "")] + [("refresh", t) for t in {*tasks, wrapper}]
    )
    refused = [e for e in in_session if e.outcome == Outcome.DENIED]
    assert sorted((e.task, e.grant) for e in refused) == sorted(
        [(t, "etl-vault") for t in tasks] + [(t, "etl-writer") for t in tasks]
    )
    assert {e.reason for e in refused} == {"agent_refused_scope"}
    assert [e.reason for e in in_session if e.kind == "revoke"] == ["client_revoked"]

    log = out.stderr
    for m in seen:
        assert (
            f"minted grant 'etl-writer' for task {m['task']}: access key {m['access_key_id']}"
            in log
        )
    assert log.count("luigi-creds agent refused") == 12
    assert ci_token not in log + out.stdout and "stray-secret-never-used" not in log


def test_stock_pipeline_job_summary_and_rotation_report(stack: Stack, tmp_path: Path) -> None:
    """The stock pipeline under `luigi-creds exec --summary FILE` with $GITHUB_STEP_SUMMARY set:
    when it ends, both hold the same Markdown, one row per credential the job was given (each
    task's key, exec's own), naming task, grant, key id, lifetime and the broker's request id,
    and no secret. The broker's rotation report shows the same keys under the same tasks; its
    HTML is rendered by headless Chromium (screenshot path printed)."""
    workdir = tmp_path / "summary-job"  # its own S3 prefix: earlier runs' outputs are complete
    argv, env, markers, ci_token = _plain_job_argv(stack, workdir, ["etl-writer"], "", "PlainAll")
    step = tmp_path / "github-step-summary.md"
    step.write_text("## an earlier step\n")
    env["GITHUB_STEP_SUMMARY"] = str(step)
    artifact = tmp_path / "artifacts" / "luigi-creds-summary.md"
    argv = [*argv[:2], "--summary", str(artifact), *argv[2:]]
    out = subprocess.run(
        argv, env=env, cwd=workdir, capture_output=True, text=True, timeout=300, check=False
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    seen = [json.loads(p.read_text()) for p in sorted(markers.glob("plain-*.json"))]
    summary = artifact.read_text()
    assert step.read_text() == "## an earlier step\n" + summary
    print(f"\njob summary ({artifact}):\n{summary}")

    events = stack.events()
    tasks = {m["task"] for m in seen}
    issued = {e.credential_ref: e for e in events if e.outcome == Outcome.ISSUED}
    rows = [line for line in summary.splitlines() if line.startswith("| ") and "`" in line]
    for m in seen:
        (row,) = [r for r in rows if f"`{m['access_key_id']}`" in r]
        record = issued[m["access_key_id"]]
        assert row.startswith(f"| {m['task']} | etl-writer | AWS key |")
        assert f"`{record.request_id}`" in row
        # 15 minutes from STS's issue, counted from when the job received it: a slow answer
        # on a busy machine shows 14m5Xs.
        assert re.search(r"\| (15m00s|14m5\ds) \|", row), row
    # exec's own credential (the scheduling process's), the wrapper's, and one per task.
    assert len(rows) == len(tasks) + 2
    secrets = [ci_token, "stray-secret-never-used", "SecretAccessKey", "SessionToken"]
    assert not [s for s in secrets if s in summary]

    # The rotation report over the same ledger: each task -> etl-writer -> role -> its key.
    report = stack.broker.cli("audit", "rotation", "--since", "1h", "--format", "json")
    assert report.returncode == 0, report.stderr
    data = json.loads(report.stdout)
    assert data["ledger"]["ok"] is True
    chains = {c["credential_ref"]: c for c in data["credentials"]}
    for m in seen:
        chain = chains[m["access_key_id"]]
        assert (chain["task"], chain["grant"], chain["target"]) == (
            m["task"],
            "etl-writer",
            stack.role_arn,
        )
        # exec ended the session: the keys are marked revoked, and (STS keys cannot be revoked
        # early) their lifetime is still the 15 minutes to expiry.
        assert (chain["state"], chain["revoked_reason"]) == ("revoked", "client_revoked")
        assert chain["lifetime_seconds"] == 900
    page = tmp_path / "rotation.html"
    report = stack.broker.cli("audit", "rotation", "--since", "1h", "--output", str(page))
    assert report.returncode == 0, report.stderr
    html_text = page.read_text()
    assert all(m["access_key_id"] in html_text for m in seen)
    shot = tmp_path / "rotation.png"
    width, _, _ = chromium_screenshot(page, shot, 1200, 900)
    assert width == 1200 and shot.stat().st_size > 10_000
    print(f"rotation report for this job: {page}\nscreenshot: {shot}")


def test_summary_command_asks_the_running_agent(stack: Stack, tmp_path: Path) -> None:
    """`luigi-creds summary` inside exec prints what exec's agent minted so far."""
    token_file = tmp_path / "ci-token"
    token_file.write_text(stack.gitlab_token())
    env = _cli_env(stack, tmp_path, token_source=f"file:{token_file}")
    argv = ["luigi-creds", "exec", "--grant", "etl-writer", "--task", "cli-summary"]
    out = _run([*argv, "--", "luigi-creds", "summary"], env)
    assert out.returncode == 0, out.stderr
    [row] = [line for line in out.stdout.splitlines() if line.startswith("| cli-summary |")]
    [issued] = _issued(stack.events(), {"cli-summary"})
    assert f"`{issued.credential_ref}`" in row and f"`{issued.request_id}`" in row
    outside = _run(["luigi-creds", "summary"], env)
    assert outside.returncode == 2 and "no job agent" in outside.stderr


def test_stock_pipeline_with_a_denied_grant_fails_naming_it(stack: Stack, tmp_path: Path) -> None:
    """A grant the policy denies fails the run before anything starts, naming the grant; a
    family given a grant outside exec's fails its tasks, naming it; neither falls back to the
    stray static key or anything else (nothing is written)."""
    out, markers, _ = _plain_job(stack, tmp_path / "denied", ["etl-admin"])
    assert out.returncode == 2
    assert "refused grant 'etl-admin' with HTTP 400 invalid_target" in out.stderr
    assert list(markers.iterdir()) == []

    out, markers, _ = _plain_job(
        stack,
        tmp_path / "family",
        ["etl-writer"],
        "\n[luigi_creds:PlainWrite]\naws_grant = etl-admin\n",
    )
    assert out.returncode == 3  # luigi's [retcode] task_failed, passed on by exec
    log = out.stdout + out.stderr
    assert "luigi-creds: no credentials for PlainWrite" in log
    assert "grants ['etl-admin']" in log
    assert list(markers.iterdir()) == []
    for prefix in ("denied/", "family/"):
        listed = stack.moto.client("s3").list_objects_v2(Bucket=BUCKET, Prefix=prefix)
        assert listed.get("Contents", []) == []
    denied = [e for e in stack.events() if e.grant == "etl-admin"]
    assert denied and all(e.outcome == Outcome.DENIED for e in denied)


def test_stock_task_vault_token_is_released_however_the_task_ends(
    stack: Stack, tmp_path: Path
) -> None:
    """`hvac.Client()` in a stock task finds a Vault token of its own in VAULT_ADDR/VAULT_TOKEN;
    the token of the task that succeeded and of the task whose process was SIGKILLed are both
    revoked while the job (and its session) still runs; the Vault family gets no AWS."""
    workdir = tmp_path / "vault"
    extra = "\n[luigi_creds:PlainVault]\naws_grant =\nvault_grant = etl-vault\n"
    argv, env, markers, ci_token = _plain_job_argv(
        stack, workdir, ["etl-writer", "etl-vault"], extra, "VaultJob"
    )
    log_path = workdir / "job.log"
    with log_path.open("wb") as log:
        popen = subprocess.Popen(
            argv, env=env, cwd=workdir, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    job = Job(popen, markers, workdir / "none", log_path)
    _jobs.append(job)
    _wait_for([markers / "vault-0.json", markers / "vault-1.json"], job)
    seen = [json.loads((markers / f"vault-{n}.json").read_text()) for n in (0, 1)]
    assert all(m["read"] for m in seen) and all(m["aws"] is None for m in seen)
    assert seen[0]["accessor"] != seen[1]["accessor"]
    root = stack.bao.root()
    deadline = time.monotonic() + 30
    alive = {m["accessor"] for m in seen}
    while alive and time.monotonic() < deadline:
        for accessor in list(alive):
            try:
                root.auth.token.lookup_accessor(accessor)
            except hvac.exceptions.InvalidRequest:
                alive.discard(accessor)
        time.sleep(0.1)
    assert not alive, job.log()[-4000:]
    assert popen.poll() is None  # released by the agent, not by the end of the session
    (markers / "go").touch()
    popen.wait(timeout=120)
    log = job.log()
    assert "ended without releasing; releasing" in log
    assert f"task {seen[1]['task']} ended without releasing" in log
    events = stack.events()
    for m in seen:
        (issued,) = _issued(events, {m["task"]})
        assert issued.grant == "etl-vault"
    assert ci_token not in log and "etl-kv-value" not in log


SCRIPT = """
import json, sys
import luigi_creds

s3 = luigi_creds.aws_session("etl-writer", region_name="us-east-1", task="notebook-1").client(
    "s3", endpoint_url=sys.argv[1])
vault = luigi_creds.vault_client("etl-vault", task="notebook-1")
secret = vault.secrets.kv.v2.read_secret_version(
    path="etl/db", mount_point="secret", raise_on_deleted_version=True)
print(json.dumps({
    "buckets": [b["Name"] for b in s3.list_buckets()["Buckets"]],
    "read": secret["data"]["data"]["password"] == "etl-kv-value",
    "accessor": vault.auth.token.lookup_self()["data"]["accessor"],
}))
"""


def test_plain_python_api_in_a_script(stack: Stack, tmp_path: Path) -> None:
    """A script (no Luigi task) gets a boto3 session and an hvac client from the same
    [luigi_creds] settings; both are recorded against its task label; its session ends with it."""
    token_file = tmp_path / "ci-token"
    token_file.write_text(stack.gitlab_token())
    env = _cli_env(stack, tmp_path, token_source=f"file:{token_file}")
    out = _run([sys.executable, "-c", SCRIPT, stack.moto.url], env)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert BUCKET in seen["buckets"] and seen["read"]
    issued = _issued(stack.events(), {"notebook-1"})
    assert sorted(e.grant for e in issued) == ["etl-vault", "etl-writer"]
    session = issued[0].session_id
    assert {e.session_id for e in issued} == {session}
    ended = [e.reason for e in stack.events() if e.kind == "revoke" and e.session_id == session]
    assert ended == ["client_revoked"]
    with pytest.raises(hvac.exceptions.InvalidRequest):
        stack.bao.root().auth.token.lookup_accessor(seen["accessor"])
