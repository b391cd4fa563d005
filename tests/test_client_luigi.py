"""Tests for luigi_creds.luigi: config, redaction, and real luigi.build runs against a fake broker.

The fake broker is a stdlib HTTP server on a free loopback port that speaks the broker's wire
protocol (exchange once, rotating refresh handles, reuse detection); the end-to-end tests against
the real broker live elsewhere.
"""

from __future__ import annotations

import json
import os
import threading
import time
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest

with warnings.catch_warnings():
    # Luigi 3.8 warns on import unless luigi.cfg sets [core] autoload_range; the test suite has
    # no luigi.cfg of its own, and pytest turns warnings into errors.
    warnings.simplefilter("ignore", DeprecationWarning)
    import luigi
    import luigi.configuration
from luigi.contrib.external_program import ExternalProgramTask

from luigi_creds.luigi import (
    ClientSettings,
    ConfigError,
    CredentialsMixin,
    _on_start,
    redact,
    stop_agent,
)


class FakeBroker:
    """Records every mint as (grant, task, access key id)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.mints: list[tuple[str, str, str]] = []
        self.reported: list[tuple[str, str]] = []
        self.handles: set[str] = set()
        self.spent: set[str] = set()
        self.exchanges = 0
        # A CI token is accepted once; a renewable source (okta, github) gives a new one each time.
        self.exchanges_allowed = 1
        self.revoked = 0
        self.ttl = 900  # seconds each minted credential lives
        self.down = False
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        broker = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a: Any) -> None:
                pass

            def do_POST(self) -> None:
                if self.path == "/v1/explain":
                    self.rfile.read(int(self.headers["Content-Length"]))
                    data = json.dumps(broker.explained()).encode()
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                if self.path == "/v1/revoke":
                    self.rfile.read(int(self.headers["Content-Length"]))
                    broker.revoked += 1
                    self.send_response(200)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                form = {
                    k: v[0]
                    for k, v in parse_qs(
                        self.rfile.read(int(self.headers["Content-Length"])).decode()
                    ).items()
                }
                status, body = broker.token(form)
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler

    def explained(self) -> dict[str, Any]:
        """What the real broker's POST /v1/explain answers, for an identity with one grant."""
        return {
            "issuer": "gitlab",
            "subject": "project_path:g/p",
            "grants": [
                {
                    "name": "etl-writer",
                    "description": "",
                    "issued_token_type": "urn:luigi-creds:token-type:aws-credentials",
                    "ttl": 900,
                }
            ],
            "request_id": "r-explain",
        }

    def token(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        with self.lock:
            if self.down:
                return 503, {"error": "temporarily_unavailable", "request_id": "r"}
            if form.get("requested_token_type"):
                # The real broker issues no such type: a refusal the agent reports is denied
                # (and recorded) without rotating the handle.
                self.reported.append((form["audience"], form.get("task", "")))
                return 400, {"error": "invalid_request", "request_id": "r-reported"}
            if form["audience"] == "denied":
                # Denied before the token's jti is consumed (the session is not started).
                return 400, {"error": "invalid_target", "request_id": "r-denied"}
            if form["grant_type"].endswith("token-exchange"):
                if self.exchanges >= self.exchanges_allowed:
                    return 400, {"error": "invalid_request", "request_id": "r"}
                self.exchanges += 1
            else:
                handle = form["refresh_token"]
                if handle in self.spent or handle not in self.handles:
                    return 400, {"error": "invalid_grant", "request_id": "r"}
                self.spent.add(handle)
            n = len(self.mints) + 1
            key = f"AKIAFAKE{n:08d}"
            self.mints.append((form["audience"], form.get("task", ""), key))
            handle = f"handle-{n}"
            self.handles.add(handle)
            expiry = datetime.now(UTC) + timedelta(seconds=self.ttl)
            return 200, {
                "access_token": key,
                "issued_token_type": "urn:luigi-creds:token-type:aws-credentials",
                "token_type": "N_A",
                "expires_in": self.ttl,
                "refresh_token": handle,
                "request_id": f"req-{n}",
                "credentials": {
                    "Version": 1,
                    "AccessKeyId": key,
                    "SecretAccessKey": f"fake-secret-{n}-xyz",
                    "SessionToken": f"fake-session-{n}-xyz",
                    "Expiration": expiry.strftime("%Y-%m-%dT%H:%M:%SZ"),
                },
            }


@pytest.fixture
def broker(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeBroker]:
    fake = FakeBroker()
    config = luigi.configuration.get_config()
    added = []
    for section in ("luigi_creds", "worker"):
        if not config.has_section(section):
            config.add_section(section)
            added.append(section)
    config.set("luigi_creds", "broker_url", fake.url)
    config.set("luigi_creds", "token_source", "env:TEST_CI_TOKEN")
    config.set("worker", "force_multiprocessing", "true")
    monkeypatch.setenv("TEST_CI_TOKEN", "ci.jwt.sig")
    yield fake
    stop_agent()
    for section in added:
        config.remove_section(section)
    fake.server.shutdown()
    fake.server.server_close()


class WriteKey(CredentialsMixin, luigi.Task):
    """Writes the access key id its aws_session holds."""

    n = luigi.IntParameter()
    out = luigi.Parameter()
    grants = ("etl-writer",)

    def output(self) -> luigi.LocalTarget:
        return luigi.LocalTarget(f"{self.out}/{self.n}.txt")

    def run(self) -> None:
        creds = self.aws_session("etl-writer").get_credentials().get_frozen_credentials()
        with self.output().open("w") as f:
            f.write(f"{creds.access_key} {creds.secret_key}")


def test_settings_list_every_problem() -> None:
    """A bad [luigi_creds] section is reported with all its problems at once."""
    with pytest.raises(ConfigError) as info:
        ClientSettings.from_mapping(
            {"broker_url": "http://broker.example.com", "password": "x", "timeout": "-1"}
        )
    text = str(info.value)
    for fragment in (
        "unknown key 'password'",
        "https unless",
        "token_source is required",
        "timeout",
    ):
        assert fragment in text


def test_settings_parse() -> None:
    """A good section becomes ClientSettings with defaults filled in."""
    s = ClientSettings.from_mapping(
        {
            "broker_url": "https://broker.example.com/",
            "token_source": "gitlab",
            "ca_bundle": "/ca.pem",
        }
    )
    assert s.broker_url == "https://broker.example.com"
    assert s.gitlab_variable == "LUIGI_CREDS_ID_TOKEN"
    assert s.ca_bundle == Path("/ca.pem")


def test_redact_masks_values_and_secret_variables() -> None:
    """redact hides known values and the values of secret-named variables in every quoting."""
    text = "AWS_SESSION_TOKEN='abc' VAULT_TOKEN=hvs.x {'AWS_SECRET_ACCESS_KEY': 'k'} mine=s3cr3t"
    out = redact(text, {"s3cr3t"})
    assert "abc" not in out and "hvs.x" not in out and "'k'" not in out and "s3cr3t" not in out
    assert "AWS_SESSION_TOKEN='***'" in out


def test_build_with_forked_workers_gets_one_credential_per_task(
    broker: FakeBroker, tmp_path: Path
) -> None:
    """Three forked workers run six tasks; each task gets its own credential minted with its id."""
    tasks = [WriteKey(n=i, out=str(tmp_path)) for i in range(6)]
    assert luigi.build(tasks, workers=3, local_scheduler=True, log_level="WARNING")
    keys = {(tmp_path / f"{i}.txt").read_text().split()[0] for i in range(6)}
    assert len(keys) == 6
    assert broker.exchanges == 1
    assert {task for _, task, _ in broker.mints} == {t.task_id for t in tasks}
    assert {k for _, _, k in broker.mints} == keys


class Denied(CredentialsMixin, luigi.Task):
    grants = ("denied",)
    out = luigi.Parameter()

    def output(self) -> luigi.LocalTarget:
        return luigi.LocalTarget(f"{self.out}/denied.txt")

    def run(self) -> None:
        self.aws_session("denied")


def test_start_failure_fails_the_task_at_first_use(broker: FakeBroker, tmp_path: Path) -> None:
    """A denied grant fails the task inside run() with the broker's error, not the whole run."""
    result = luigi.build(
        [Denied(out=str(tmp_path)), WriteKey(n=1, out=str(tmp_path))],
        workers=1,
        local_scheduler=True,
        detailed_summary=True,
        log_level="WARNING",
    )
    assert result.status.name == "FAILED"
    assert (tmp_path / "1.txt").exists()
    # What the user reads as the failed task's error (the worker reports it to the scheduler):
    # the broker, the grant, the broker's error code and its request id.
    task_id = Denied(out=str(tmp_path)).task_id
    error = result.worker._scheduler.fetch_error(task_id)["error"]
    expected = (
        f"luigi_creds.credentials.BrokerError: broker {broker.url} refused grant "
        "'denied' with HTTP 400 invalid_target (request_id r-denied)"
    )
    assert expected in error, error


class Failing(CredentialsMixin, ExternalProgramTask):
    grants = ("etl-writer",)

    def program_args(self) -> list[str]:
        return ["false"]

    def program_environment(self) -> dict[str, str]:
        env = self.credential_env("etl-writer")
        env["AWS_SECRET_ACCESS_KEY"] = "leaky-secret-value"
        return env


def test_external_program_failure_is_redacted(broker: FakeBroker) -> None:
    """An ExternalProgramTask failure explanation shows no credential or agent bearer."""
    task = Failing()
    _on_start(task)
    with pytest.raises(Exception) as info:
        task.run()
    explanation = task.on_failure(info.value)
    bearer = os.environ["LUIGI_CREDS_AGENT_TOKEN"]
    assert "leaky-secret-value" not in explanation
    assert bearer not in explanation and bearer not in str(info.value)
    assert "AWS_CONTAINER_CREDENTIALS_FULL_URI" in str(info.value)


class LongRunning(CredentialsMixin, luigi.Task):
    """Uses its S3 session for longer than one credential lives."""

    out = luigi.Parameter()
    grants = ("etl-writer",)

    def output(self) -> luigi.LocalTarget:
        return luigi.LocalTarget(f"{self.out}/long.txt")

    def run(self) -> None:
        creds = self.aws_session("etl-writer").get_credentials()
        seen = []
        end = time.monotonic() + 5
        while time.monotonic() < end:
            frozen = creds.get_frozen_credentials()
            seen.append(frozen.access_key)
            time.sleep(0.1)
        with self.output().open("w") as f:
            f.write(" ".join(dict.fromkeys(seen)))


def test_task_outlives_its_credential(broker: FakeBroker, tmp_path: Path) -> None:
    """A task running 5 s on 3-second credentials refreshes them, each mint carrying its id."""
    broker.ttl = 3
    task = LongRunning(out=str(tmp_path))
    assert luigi.build([task], workers=1, local_scheduler=True, log_level="WARNING")
    keys = (tmp_path / "long.txt").read_text().split()
    assert len(keys) >= 2
    assert {t for _, t, _ in broker.mints} == {task.task_id}


class CheckedRemotely(CredentialsMixin, luigi.Task):
    """Needs credentials in complete(), which Luigi calls in the scheduling process."""

    grants = ("etl-writer",)

    def complete(self) -> bool:
        key = self.aws_session("etl-writer").get_credentials().get_frozen_credentials().access_key
        return key.startswith("AKIAFAKE")


def test_complete_outside_run_gets_credentials(broker: FakeBroker) -> None:
    """complete() in the scheduling process mints for its task id without a task start."""
    task = CheckedRemotely()
    assert luigi.build([task], workers=1, local_scheduler=True, log_level="WARNING")
    assert [t for _, t, _ in broker.mints] == [task.task_id]


# --- TaskCredentials: per-task credentials with no code in the tasks ------------------------


class PlainBoto(luigi.Task):
    """A stock task: plain boto3, no luigi_creds import; records what its process was given."""

    n = luigi.IntParameter()
    out = luigi.Parameter()

    def output(self) -> luigi.LocalTarget:
        return luigi.LocalTarget(f"{self.out}/plain-{self.n}.json")

    def run(self) -> None:
        import boto3

        key = boto3.Session().get_credentials().get_frozen_credentials().access_key
        # What a hostile task could try with what it holds: another grant, another task.
        from luigi_creds.serve import AgentClient, AgentEndpoint

        mine = AgentEndpoint.from_env(os.environ)
        assert mine is not None
        attempts = {}
        for grant, task in (("etl-vault", self.task_id), ("etl-writer", "Other(n=1)")):
            try:
                AgentClient(mine).mint(grant, task)
                attempts[f"{grant}/{task}"] = "minted"
            except Exception as exc:
                attempts[f"{grant}/{task}"] = str(getattr(exc, "status", exc))
        with self.output().open("w") as f:
            json.dump(
                {
                    "key": key,
                    "pid": os.getpid(),
                    "bearer": mine.bearer,
                    "stray": os.environ.get("AWS_ACCESS_KEY_ID"),
                    "attempts": attempts,
                },
                f,
            )


@pytest.fixture
def task_context(broker: FakeBroker, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeBroker]:
    """[worker] task_process_context = luigi_creds.TaskCredentials, aws_grant = etl-writer,
    and the job's agent started in this (the scheduling) process, as `luigi-creds exec` does."""
    from luigi_creds.agent import ensure_agent

    config = luigi.configuration.get_config()
    config.set("worker", "task_process_context", "luigi_creds.TaskCredentials")
    config.set("luigi_creds", "aws_grant", "etl-writer")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIASTRAYSTRAYSTRAY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "stray-secret")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
    ensure_agent()
    yield broker
    config.remove_option("worker", "task_process_context")
    config.remove_option("luigi_creds", "aws_grant")


def test_task_credentials_give_each_forked_task_its_own_key(
    task_context: FakeBroker, tmp_path: Path
) -> None:
    """Six stock tasks on three forked workers: each task's plain boto3 gets its own key,
    minted with its task id; no stray static key wins; a task's bearer is its own and can
    mint neither another grant nor for another task."""
    tasks = [PlainBoto(n=i, out=str(tmp_path)) for i in range(6)]
    assert luigi.build(tasks, workers=3, local_scheduler=True, log_level="WARNING")
    seen = [json.loads((tmp_path / f"plain-{i}.json").read_text()) for i in range(6)]
    keys = {s["key"] for s in seen}
    assert len(keys) == 6 and "AKIASTRAYSTRAYSTRAY" not in keys
    assert all(s["stray"] is None for s in seen)
    assert len({s["bearer"] for s in seen}) == 6
    assert os.environ["LUIGI_CREDS_AGENT_TOKEN"] not in {s["bearer"] for s in seen}
    assert all(set(s["attempts"].values()) == {"403"} for s in seen), seen
    # One mint per task, under its id, on the one session.
    assert sorted(t for _, t, _ in task_context.mints) == sorted(t.task_id for t in tasks)
    assert {k for _, _, k in task_context.mints} == keys
    assert task_context.exchanges == 1
    # Each refusal reached the broker's ledger once, against the task that asked.
    deadline = time.monotonic() + 10
    while len(task_context.reported) < 12 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sorted(task_context.reported) == sorted(
        [("etl-vault", t.task_id) for t in tasks] + [("etl-writer", t.task_id) for t in tasks]
    )


def test_task_credentials_fail_a_denied_task_with_the_grant_named(
    task_context: FakeBroker, tmp_path: Path
) -> None:
    """A family whose grant the broker denies fails through Luigi with the grant in the error;
    its neighbour still runs; the denied task never ran its body."""
    config = luigi.configuration.get_config()
    config.add_section("luigi_creds:PlainBoto")
    try:
        config.set("luigi_creds:PlainBoto", "aws_grant", "denied")
        result = luigi.build(
            [PlainBoto(n=1, out=str(tmp_path))],
            workers=1,
            local_scheduler=True,
            detailed_summary=True,
            log_level="WARNING",
        )
    finally:
        config.remove_section("luigi_creds:PlainBoto")
    assert result.status.name == "FAILED"
    assert not (tmp_path / "plain-1.json").exists()
    assert [g for g, _, _ in task_context.mints] == []


def test_plain_api_and_one_log_line_per_mint(
    broker: FakeBroker, caplog: pytest.LogCaptureFixture
) -> None:
    """`luigi_creds.aws_session(grant)` works outside Luigi from the same settings; each mint
    logs the grant, task, access key id and expiry, never a secret; errors share one base."""
    import logging

    import luigi_creds

    caplog.set_level(logging.INFO, logger="luigi_creds")
    session = luigi_creds.aws_session("etl-writer", task="notebook")
    frozen = session.get_credentials().get_frozen_credentials()
    assert frozen.access_key.startswith("AKIAFAKE")
    assert broker.mints[-1] == ("etl-writer", "notebook", frozen.access_key)
    lines = [r.getMessage() for r in caplog.records if "minted grant" in r.getMessage()]
    assert len(lines) == 1
    assert lines[0].startswith(
        f"luigi-creds: minted grant 'etl-writer' for task notebook: access key {frozen.access_key}"
    )
    assert " expires 20" in lines[0]
    assert frozen.secret_key not in caplog.text and frozen.token not in caplog.text
    with pytest.raises(luigi_creds.LuigiCredsError) as info:
        luigi_creds.aws_session("denied").get_credentials()
    assert "denied" in str(info.value)


def test_task_credentials_without_exec_use_a_session_per_task_process(
    broker: FakeBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no agent to inherit (luigi started directly) and a token source that gives a new
    token each time, each forked task process exchanges for itself, mints for its task, and
    ends its session when the task ends."""
    config = luigi.configuration.get_config()
    config.set("worker", "task_process_context", "luigi_creds.TaskCredentials")
    config.set("luigi_creds", "aws_grant", "etl-writer")
    for name in ("LUIGI_CREDS_AGENT_URL", "LUIGI_CREDS_AGENT_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
    broker.exchanges_allowed = 10
    try:
        tasks = [PlainBoto(n=i, out=str(tmp_path)) for i in range(3)]
        assert luigi.build(tasks, workers=3, local_scheduler=True, log_level="WARNING")
    finally:
        config.remove_option("worker", "task_process_context")
        config.remove_option("luigi_creds", "aws_grant")
    seen = [json.loads((tmp_path / f"plain-{i}.json").read_text()) for i in range(3)]
    assert len({s["key"] for s in seen}) == 3
    assert all(set(s["attempts"].values()) == {"403"} for s in seen), seen
    assert broker.exchanges == 3
    assert sorted(t for _, t, _ in broker.mints) == sorted(t.task_id for t in tasks)
    # Each task process ended its own session, after it reported its result to Luigi.
    deadline = time.monotonic() + 10
    while broker.revoked < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert broker.revoked == 3
    assert "LUIGI_CREDS_AGENT_URL" not in os.environ  # the scheduling process started none
