"""Unit tests of the exchange use case's fail-closed rules, with an in-memory audit store.

The issuer keys are pinned (jwks_file, no network), tokens are really signed, and STS is a
scripted server on loopback (tests/fake_sts.py) that the broker's own signed client talks to,
so what is faked is only the audit store's ability to fail on demand and STS's answers.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from botocore.credentials import Credentials
from fake_sts import FakeSts

from broker.audit.events import AuditEvent, Outcome
from broker.config_lint import parse_config
from broker.dev.claims import preset_claims
from broker.dev.issuer import SigningKey, encode_jwt
from broker.exchange import ExchangeError, Exchanger
from broker.issuers import IssuerRegistry
from broker.mint.aws import AwsMinter
from broker.mint.grants import GrantMinter
from broker.mint.sts_http import StsHTTP
from broker.policy import Policy
from broker.protocol import GRANT_TYPE_TOKEN_EXCHANGE, SUBJECT_TOKEN_TYPE_JWT, TokenRequest
from broker.revocation import SessionEnder
from broker.sealing import RefSealer
from broker.sessions import open_state
from broker.storage import StoreUnavailable, Tx

# Seals the session store's credential references; generated per test run.
SEALER = RefSealer(secrets.token_bytes(32))

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
ISSUER = "https://gitlab.example.com"
ROLE = "arn:aws:iam::123456789012:role/etl-writer"


def _hash_ref(value: str) -> str:
    return "h:" + value


class MemoryAudit:
    """An audit store that keeps events in a list and fails on chosen append numbers."""

    def __init__(self) -> None:
        self.events: list[AuditEvent] = []
        self.fail_on: set[int] = set()
        self.calls = 0

    def append(self, event: AuditEvent) -> int:
        self.calls += 1
        if self.calls in self.fail_on:
            raise StoreUnavailable("disk full")
        self.events.append(event)
        return len(self.events) - 1

    def appender(self, event: AuditEvent) -> Callable[[Tx], None]:
        # Appends when its transaction runs the step; a failure rolls the transaction back.
        def step(tx: Tx) -> None:
            self.append(event)

        return step

    def check_writable(self) -> None:
        return None

    def close(self) -> None:
        return None


@pytest.fixture
def key() -> SigningKey:
    return SigningKey.generate("RS256")


class Clock:
    """A settable clock: tests move time instead of sleeping."""

    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def setup(
    tmp_path: Path, key: SigningKey, clock: Clock, request: pytest.FixtureRequest
) -> Iterator[tuple[Exchanger, MemoryAudit, FakeSts]]:
    """An exchanger for one GitLab issuer and one AWS grant; `request.param` extends the issuer."""
    issuer_extra = getattr(request, "param", "")
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [key.public_jwk()]}))
    config = parse_config(
        f"""
        [broker]
        audit_store = "sqlite:///{tmp_path}/unused.db"
        session_max = "1h"
        session_idle = "1h"
        [[issuer]]
        name = "gitlab"
        url = "{ISSUER}"
        audiences = ["luigi-creds"]
        jwks_file = "{jwks}"
        {issuer_extra}
        [[grant]]
        name = "etl-writer"
        issuers = ["gitlab"]
        ttl = "15m"
        [grant.match]
        project_id = "55235664"
        [grant.aws]
        role_arn = "{ROLE}"
        """
    )
    fake_sts = FakeSts()
    sts = StsHTTP(fake_sts.url, "us-east-1", lambda: Credentials("AKIAEXAMPLE", "y"), timeout=5.0)
    audit = MemoryAudit()
    replay, sessions = open_state(f"sqlite:///{tmp_path}/state.db", sealer=SEALER)
    minter = GrantMinter(aws=AwsMinter(sts), vault=None, hash_ref=_hash_ref, clock=clock)
    with httpx.Client() as http:
        registry = IssuerRegistry(config.issuers, http, clock=lambda: NOW)
        exchanger = Exchanger(
            config,
            Policy.compile(config),
            registry,
            audit,
            minter=minter,
            replay=replay,
            sessions=sessions,
            ender=SessionEnder(sessions, minter, audit, hash_ref=_hash_ref, clock=clock),
            clock=clock,
            sleep=lambda _: None,
        )
        try:
            yield exchanger, audit, fake_sts
        finally:
            sts.close()
            fake_sts.close()
    sessions.close()


def _request(key: SigningKey, **claims: Any) -> TokenRequest:
    body = preset_claims("gitlab", issuer=ISSUER, audience="luigi-creds", now=NOW, overrides=claims)
    return TokenRequest(
        request_id="req1",
        client_addr="127.0.0.1",
        grant_type=GRANT_TYPE_TOKEN_EXCHANGE,
        audience="etl-writer",
        subject_token=encode_jwt(body, key),
        subject_token_type=SUBJECT_TOKEN_TYPE_JWT,
        task="Task_1",
    )


def _sts_ok(fake_sts: FakeSts) -> None:
    fake_sts.add_credentials(
        "ASIAEXAMPLEEXAMPLE01", "s" * 40, "t" * 100, NOW + timedelta(minutes=15)
    )


def test_issue_writes_intent_then_issued(
    setup: tuple[Exchanger, MemoryAudit, FakeSts], key: SigningKey
) -> None:
    """A good token yields credentials after an intent and an issued record, in that order."""
    exchanger, audit, fake_sts = setup
    _sts_ok(fake_sts)
    issued = exchanger.handle(_request(key))
    assert issued.credentials["AccessKeyId"] == "ASIAEXAMPLEEXAMPLE01"
    assert issued.expires_in == 900
    assert [e.outcome for e in audit.events] == [Outcome.INTENT, Outcome.ISSUED]
    assert audit.events[1].credential_ref == "ASIAEXAMPLEEXAMPLE01"
    assert "s" * 40 not in repr(issued) and "t" * 100 not in repr(issued)


def test_audit_failure_before_mint_calls_no_upstream(
    setup: tuple[Exchanger, MemoryAudit, FakeSts], key: SigningKey
) -> None:
    """If the intent cannot be written, STS is never called and the caller gets 503."""
    exchanger, audit, fake_sts = setup
    _sts_ok(fake_sts)
    audit.fail_on = {1, 2}
    request = _request(key)
    with pytest.raises(ExchangeError) as caught:
        exchanger.handle(request)
    assert (caught.value.status, caught.value.error) == (503, "temporarily_unavailable")
    assert not fake_sts.requests and len(fake_sts.answers) == 1  # STS was never asked
    assert audit.events == []
    # The intent commits with the token's consumption and the session, or none of them does:
    # the token is still unspent.
    audit.fail_on = set()
    assert exchanger.handle(replace(request, request_id="req2")).refresh_token


def test_audit_failure_after_mint_returns_nothing(
    setup: tuple[Exchanger, MemoryAudit, FakeSts], key: SigningKey
) -> None:
    """If the issued record cannot be written, the minted credential is withheld: 503."""
    exchanger, audit, fake_sts = setup
    _sts_ok(fake_sts)
    audit.fail_on = {2}
    with pytest.raises(ExchangeError) as caught:
        exchanger.handle(_request(key))
    assert caught.value.status == 503
    assert not fake_sts.answers
    # The intent names the session, so the orphan can be joined in CloudTrail; the terminal
    # record says the credential was minted but withheld.
    assert [e.outcome for e in audit.events] == [Outcome.INTENT, Outcome.ERROR]
    assert audit.events[0].detail["session_name"].endswith("-req1")
    assert audit.events[1].reason == "minted_not_delivered"
    assert audit.events[1].credential_ref == "ASIAEXAMPLEEXAMPLE01"


def test_sts_throttling_is_retried_with_one_intent_per_attempt(
    setup: tuple[Exchanger, MemoryAudit, FakeSts], key: SigningKey
) -> None:
    """Throttling is retried; every attempt has its own intent record with its number."""
    exchanger, audit, fake_sts = setup
    fake_sts.add_error("Throttling", 400)
    _sts_ok(fake_sts)
    exchanger.handle(_request(key))
    assert [(e.outcome, e.attempt) for e in audit.events] == [
        (Outcome.INTENT, 1),
        (Outcome.INTENT, 2),
        (Outcome.ISSUED, 2),
    ]


def test_sts_down_gives_503_after_bounded_attempts(
    setup: tuple[Exchanger, MemoryAudit, FakeSts], key: SigningKey
) -> None:
    """A persistently failing STS ends in 503 with an error record after three attempts."""
    exchanger, audit, fake_sts = setup
    for _ in range(3):
        fake_sts.add_error("ServiceUnavailable", 503)
    with pytest.raises(ExchangeError) as caught:
        exchanger.handle(_request(key))
    assert caught.value.status == 503 and caught.value.retry_after
    assert [e.outcome for e in audit.events] == [Outcome.INTENT] * 3 + [Outcome.ERROR]


def test_sts_access_denied_is_not_retried(
    setup: tuple[Exchanger, MemoryAudit, FakeSts], key: SigningKey
) -> None:
    """AccessDenied from STS is final: one attempt, 503, reason upstream_denied."""
    exchanger, audit, fake_sts = setup
    fake_sts.add_error("AccessDenied", 403)
    with pytest.raises(ExchangeError):
        exchanger.handle(_request(key))
    assert audit.events[-1].reason == "upstream_denied"
    assert len(audit.events) == 2


def test_denial_is_audited_with_the_claims_read(
    setup: tuple[Exchanger, MemoryAudit, FakeSts], key: SigningKey
) -> None:
    """A policy denial is invalid_target, audited with only the claims the policy read."""
    exchanger, audit, _ = setup
    with pytest.raises(ExchangeError) as caught:
        exchanger.handle(_request(key, project_id="1"))
    assert caught.value.error == "invalid_target"
    (event,) = audit.events
    assert event.outcome == Outcome.DENIED
    assert dict(event.claims) == {"project_id": "1"}


def test_denial_that_cannot_be_audited_becomes_503(
    setup: tuple[Exchanger, MemoryAudit, FakeSts], key: SigningKey
) -> None:
    """Nothing goes unaudited: a deny whose record fails is answered 503 instead."""
    exchanger, audit, _ = setup
    audit.fail_on = {1}
    with pytest.raises(ExchangeError) as caught:
        exchanger.handle(_request(key, project_id="1"))
    assert caught.value.status == 503


def _refresh(handle: str, task: str) -> TokenRequest:
    return TokenRequest(
        request_id="req-" + task,
        client_addr="127.0.0.1",
        grant_type="refresh_token",
        audience="etl-writer",
        refresh_token=handle,
        task=task,
    )


def test_session_ends_at_session_max(
    setup: tuple[Exchanger, MemoryAudit, FakeSts], key: SigningKey, clock: Clock
) -> None:
    """A refresh handle works until session_max after the exchange and is refused after it."""
    exchanger, audit, fake_sts = setup
    _sts_ok(fake_sts)
    handle = exchanger.handle(_request(key)).refresh_token
    clock.now = NOW + timedelta(minutes=50)
    _sts_ok(fake_sts)
    handle = exchanger.handle(_refresh(handle, "t1")).refresh_token
    clock.now = NOW + timedelta(minutes=61)
    with pytest.raises(ExchangeError) as caught:
        exchanger.handle(_refresh(handle, "t2"))
    assert (caught.value.error, caught.value.reason) == ("invalid_grant", "session_expired")
    assert audit.events[-1].session_id == audit.events[0].session_id


def test_failed_exchange_leaves_the_token_usable(
    setup: tuple[Exchanger, MemoryAudit, FakeSts], key: SigningKey
) -> None:
    """An exchange that minted nothing does not consume the CI job's one token."""
    exchanger, _, fake_sts = setup
    for _ in range(3):
        fake_sts.add_error("ServiceUnavailable", 503)
    request = _request(key)
    with pytest.raises(ExchangeError):
        exchanger.handle(request)
    _sts_ok(fake_sts)
    assert exchanger.handle(replace(request, request_id="req2")).refresh_token
    with pytest.raises(ExchangeError) as caught:
        exchanger.handle(replace(request, request_id="req3"))
    assert caught.value.reason == "token_replayed"


def test_upstream_denial_is_cached_without_asking_sts_again(
    setup: tuple[Exchanger, MemoryAudit, FakeSts], key: SigningKey
) -> None:
    """After STS AccessDenied the same identity and grant get 503 from the cache, not STS."""
    exchanger, audit, fake_sts = setup
    fake_sts.add_error("AccessDenied", 403)
    with pytest.raises(ExchangeError):
        exchanger.handle(_request(key))
    with pytest.raises(ExchangeError) as caught:
        exchanger.handle(replace(_request(key), request_id="req2"))  # no STS answer queued
    assert caught.value.status == 503 and caught.value.reason == "cached_upstream_denied"
    assert audit.events[-1].outcome == Outcome.ERROR


@pytest.mark.parametrize("setup", ['token_types = ["JWT"]'], indirect=True)
def test_issuer_typ_profile_refuses_other_token_types(
    setup: tuple[Exchanger, MemoryAudit, FakeSts], key: SigningKey
) -> None:
    """With token_types = ["JWT"], an access token (typ at+jwt) is refused before any key use."""
    exchanger, _, fake_sts = setup
    body = preset_claims("gitlab", issuer=ISSUER, audience="luigi-creds", now=NOW)
    access = encode_jwt(body, key, header={"typ": "at+jwt"})
    with pytest.raises(ExchangeError) as caught:
        exchanger.handle(replace(_request(key), subject_token=access))
    assert caught.value.reason == "wrong_token_type"
    # "application/JWT" is the same media type as "JWT" (RFC 7515 §4.1.9).
    _sts_ok(fake_sts)
    id_token = encode_jwt(body, key, header={"typ": "application/JWT"})
    assert exchanger.handle(replace(_request(key), request_id="r2", subject_token=id_token))
