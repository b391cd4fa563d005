"""Unit tests for luigi_creds.aws: boto3 sessions that refresh broker credentials."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from botocore.awsrequest import AWSResponse

from luigi_creds.aws import aws_session, credential_env
from luigi_creds.client import AwsCredentials, BrokerError

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


class FakeClock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


class Minter:
    """Stands in for BrokerClient.mint: numbered 15-minute credentials."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.calls = 0

    def __call__(self) -> AwsCredentials:
        self.calls += 1
        return AwsCredentials(
            grant="etl-writer",
            request_id=f"r{self.calls}",
            access_key_id=f"AKIAFAKE{self.calls:04d}",
            secret_access_key=f"secret{self.calls}",
            session_token=f"token{self.calls}",
            expires_at=self.clock() + timedelta(minutes=15),
        )


class _Raw:
    def stream(self, **kw: Any) -> Any:
        yield b"<ListAllMyBucketsResult><Buckets/></ListAllMyBucketsResult>"


def test_session_refreshes_over_six_hours() -> None:
    """Frozen credentials stay valid across a six-hour run and are re-minted about every 7.5 min."""
    clock = FakeClock()
    mint = Minter(clock)
    session = aws_session(mint, region_name="us-east-1", clock=clock)
    creds = session.get_credentials()
    assert creds.method == "luigi-creds"
    seen = set()
    while clock.now < T0 + timedelta(hours=6):
        frozen = creds.get_frozen_credentials()
        seen.add(frozen.access_key)
        n = int(frozen.access_key[-4:])
        assert frozen.secret_key == f"secret{n}" and frozen.token == f"token{n}"
        clock.now += timedelta(seconds=30)
    assert 45 <= mint.calls <= 50
    assert len(seen) == mint.calls


def test_provider_wins_over_stray_env_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """An AWS_ACCESS_KEY_ID in the environment does not replace the broker's credentials."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIASTRAY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "stray")
    clock = FakeClock()
    session = aws_session(Minter(clock), region_name="us-east-1", clock=clock)
    assert session.get_credentials().get_frozen_credentials().access_key == "AKIAFAKE0001"


def test_clients_sign_with_broker_credentials() -> None:
    """An S3 client from the session signs its requests with the minted key and session token."""
    clock = FakeClock()
    session = aws_session(Minter(clock), region_name="us-east-1", clock=clock)
    sent = _list_buckets(session.client("s3"))
    assert "Credential=AKIAFAKE0001/" in sent[0].headers["Authorization"].decode()
    assert sent[0].headers["X-Amz-Security-Token"] == b"token1"


def _list_buckets(s3: Any) -> list[Any]:
    """The requests `s3.list_buckets()` sends, signed, answered here without a server."""
    sent: list[Any] = []

    def capture(request: Any, **kw: Any) -> AWSResponse:
        sent.append(request)
        return AWSResponse(request.url, 200, {}, _Raw())

    s3.meta.events.register("before-send", capture)
    s3.list_buckets()
    return sent


def test_credential_env_replaces_stray_aws_variables() -> None:
    """credential_env sets the minted keys and drops profile and container variables."""
    creds = Minter(FakeClock())()
    env = credential_env(
        creds, {"PATH": "/bin", "AWS_PROFILE": "prod", "AWS_CONTAINER_CREDENTIALS_FULL_URI": "x"}
    )
    assert env["AWS_ACCESS_KEY_ID"] == "AKIAFAKE0001"
    assert env["AWS_SESSION_TOKEN"] == "token1"
    assert env["AWS_CREDENTIAL_EXPIRATION"] == "2026-01-01T12:15:00Z"
    assert "AWS_PROFILE" not in env and "AWS_CONTAINER_CREDENTIALS_FULL_URI" not in env
    assert env["PATH"] == "/bin"


class FlakyMinter(Minter):
    """A Minter whose broker can be taken down; counts the attempts made while it is down."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock)
        self.down = False
        self.failed = 0

    def __call__(self) -> AwsCredentials:
        if self.down:
            self.failed += 1
            raise BrokerError(
                "broker http://127.0.0.1:1 unreachable for grant 'etl-writer': ConnectError",
                error="unreachable",
                grant="etl-writer",
            )
        return super().__call__()


def test_broker_outage_in_advisory_time_keeps_the_credential_quietly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With the broker down in the advisory window, calls keep the current credential, the
    broker is tried once per 30 s back-off, and nothing logs a traceback."""
    clock = FakeClock()
    mint = FlakyMinter(clock)
    creds = aws_session(mint, region_name="us-east-1", clock=clock).get_credentials()
    mint.down = True
    clock.now = T0 + timedelta(minutes=8)  # 7 min left: advisory (7.5), not mandatory (3.75)
    with caplog.at_level(logging.WARNING):
        for _ in range(20):
            assert creds.get_frozen_credentials().access_key == "AKIAFAKE0001"
            clock.now += timedelta(seconds=1)
        assert mint.failed == 1
        clock.now += timedelta(seconds=11)  # past the back-off
        assert creds.get_frozen_credentials().access_key == "AKIAFAKE0001"
        assert mint.failed == 2
        mint.down = False
        clock.now += timedelta(seconds=31)
        assert creds.get_frozen_credentials().access_key == "AKIAFAKE0002"
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 2 and all(r.exc_info is None for r in warnings)
    assert "unreachable for grant 'etl-writer'" in warnings[0].getMessage()


def test_broker_outage_in_mandatory_time_fails_with_one_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """In the mandatory window a broker outage raises the BrokerError to the caller, and
    botocore's warning about it is one line with the reason, not a traceback."""
    clock = FakeClock()
    mint = FlakyMinter(clock)
    creds = aws_session(mint, region_name="us-east-1", clock=clock).get_credentials()
    mint.down = True
    clock.now = T0 + timedelta(minutes=12)  # 3 min left: mandatory
    with caplog.at_level(logging.WARNING), pytest.raises(BrokerError) as info:
        creds.get_frozen_credentials()
    assert "http://127.0.0.1:1" in str(info.value) and "'etl-writer'" in str(info.value)
    (record,) = [r for r in caplog.records if r.name == "botocore.credentials"]
    assert record.exc_info is None
    assert "mandatory" in record.getMessage() and "ConnectError" in record.getMessage()


def test_an_adopted_session_forgets_its_credentials_and_keeps_what_it_parsed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A forked task process's inherited default session: the scheduling process's keys are
    dropped, every credential comes from the task's fetch (a stray env key cannot win), and a
    new session can share the parsed service models without any credential."""
    import boto3

    from luigi_creds.aws import adopt_session, aws_session, session_loader

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIASCHEDULER")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "scheduler-secret")
    inherited = boto3.Session(region_name="us-east-1")
    assert inherited.get_credentials().get_frozen_credentials().access_key == "AKIASCHEDULER"
    inherited.client("s3")  # parses the S3 model into the session's loader

    expires = datetime.now(UTC) + timedelta(minutes=15)
    task = AwsCredentials("etl-writer", "r", "AKIATASK", "task-secret", "task-token", expires)
    assert adopt_session(inherited, lambda: task)
    frozen = inherited.get_credentials().get_frozen_credentials()
    assert (frozen.access_key, frozen.token) == ("AKIATASK", "task-token")

    loader = session_loader(inherited)
    assert loader is not None
    fresh = aws_session(lambda: task, loader=loader)
    assert session_loader(fresh) is loader
    assert fresh.get_credentials().get_frozen_credentials().access_key == "AKIATASK"
    assert not adopt_session(object(), lambda: task)


def test_a_session_prepared_before_fork_goes_once_to_each_forked_process() -> None:
    """prepare_session(): the preparing process never takes the session; a forked process's
    first aws_session() takes its own copy and gets only its own credentials; its second
    aws_session() is a new session; the parent's copy never held a credential."""
    import json
    import os

    from luigi_creds import aws

    clock = FakeClock()
    aws.prepare_session()
    assert aws._prepared is not None
    prepared = aws._prepared[1]
    here = aws_session(Minter(clock), clock=clock)
    assert here is not prepared and aws._prepared is not None  # not taken where it was built

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        try:
            first = aws_session(Minter(clock), region_name="eu-west-1", clock=clock)
            second = aws_session(Minter(clock), clock=clock)
            key = first.get_credentials().get_frozen_credentials().access_key
            report = {
                "took": first is prepared,
                "second_new": second is not prepared and second is not first,
                "left": aws._prepared is None,
                "region": first.region_name,
                "key": key,
            }
            os.write(write, json.dumps(report).encode())
        finally:
            os._exit(0)
    os.close(write)
    report = json.loads(os.read(read, 4096))
    os.waitpid(pid, 0)
    assert report == {
        "took": True,
        "second_new": True,
        "left": True,
        "region": "eu-west-1",
        "key": "AKIAFAKE0001",
    }
    # The parent's copy is as it was built: no credentials were ever resolved on it.
    assert prepared._session._credentials is None
    aws.prepare_session()  # once per process: the same session stays
    assert aws._prepared is not None and aws._prepared[1] is prepared


def test_first_use_credentials_let_a_client_be_built_before_the_mint() -> None:
    """With `at_first_use` the session's credentials are not fetched when a client is built,
    only where its first request is signed; from then on they refresh on the same scaled
    windows as credentials fetched at once (six hours, about every 7.5 minutes)."""
    clock = FakeClock()
    mint = Minter(clock)
    session = aws_session(mint, region_name="us-east-1", clock=clock, at_first_use=True)
    s3 = session.client("s3")
    assert mint.calls == 0
    sent = _list_buckets(s3)
    assert mint.calls == 1
    assert "Credential=AKIAFAKE0001/" in sent[0].headers["Authorization"].decode()
    creds = session.get_credentials()
    while clock.now < T0 + timedelta(hours=6):
        frozen = creds.get_frozen_credentials()
        assert frozen.secret_key == f"secret{int(frozen.access_key[-4:])}"
        clock.now += timedelta(seconds=30)
    assert 45 <= mint.calls <= 50


def test_first_use_credentials_raise_a_refusal_where_the_task_signs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A first mint that fails is raised to the caller that needed the credential, with the
    broker's words and nothing else, and asked again at the next use."""
    clock = FakeClock()
    mint = FlakyMinter(clock)
    mint.down = True
    creds = aws_session(mint, clock=clock, at_first_use=True).get_credentials()
    with pytest.raises(BrokerError, match="unreachable for grant 'etl-writer'"):
        creds.get_frozen_credentials()
    mint.down = False
    assert creds.get_frozen_credentials().access_key == "AKIAFAKE0001"
    assert mint.failed == 1 and mint.calls == 1
