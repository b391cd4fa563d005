"""Unit tests for luigi_creds.client against a scripted broker on httpx.MockTransport."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs

import httpx
import pytest

from luigi_creds.client import (
    AWS_CREDENTIALS,
    VAULT_SECRET,
    VAULT_TOKEN,
    AwsCredentials,
    BrokerClient,
    BrokerError,
    RetryPolicy,
    VaultSecret,
    VaultToken,
)
from luigi_creds.identity import EnvTokenSource, FileTokenSource

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
URL = "https://broker.test"


def aws_body(n: int, handle: str) -> dict[str, object]:
    return {
        "access_token": f"AKIA{n}",
        "issued_token_type": AWS_CREDENTIALS,
        "token_type": "N_A",
        "expires_in": 900,
        "refresh_token": handle,
        "request_id": f"req-{n}",
        "credentials": {
            "Version": 1,
            "AccessKeyId": f"AKIA{n}",
            "SecretAccessKey": f"secret-{n}",
            "SessionToken": f"session-{n}",
            "Expiration": (T0 + timedelta(minutes=15)).isoformat().replace("+00:00", "Z"),
        },
    }


@dataclass
class FakeBroker:
    """A scripted broker: rotates handles, detects reuse, can be told to fail."""

    responses: list[Callable[[dict[str, list[str]]], httpx.Response]]
    forms: list[dict[str, list[str]]]

    def __call__(self, request: httpx.Request) -> httpx.Response:
        form = parse_qs(request.content.decode())
        form["_path"] = [request.url.path]
        self.forms.append(form)
        if self.responses:
            return self.responses.pop(0)(form)
        n = len(self.forms)
        return httpx.Response(200, json=aws_body(n, f"handle-{n}"))


def make(
    responses: list[Callable[[dict[str, list[str]]], httpx.Response]] | None = None,
    source=None,  # type: ignore[no-untyped-def]
) -> tuple[BrokerClient, FakeBroker, list[float]]:
    broker = FakeBroker(responses or [], [])
    sleeps: list[float] = []
    client = BrokerClient(
        URL,
        source or EnvTokenSource("TOK", {"TOK": "ci.jwt.sig"}, label="gitlab"),
        http=httpx.Client(transport=httpx.MockTransport(broker)),
        clock=lambda: T0,
        sleep=sleeps.append,
        rng=lambda: 1.0,
        monotonic=lambda: 0.0,
    )
    return client, broker, sleeps


def error(status: int, code: str, headers: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    body = {"error": code, "error_description": "nope", "request_id": "rid-9"}
    return lambda form: httpx.Response(status, json=body, headers=headers or {})


def test_first_mint_exchanges_then_refreshes_with_newest_handle() -> None:
    """The first mint is a token exchange; later mints spend the newest rotated handle."""
    client, broker, _ = make()
    first = client.mint("etl-writer", task="Copy(day=1)", duration=900)
    client.mint("etl-writer", task="Copy(day=2)")
    client.mint("etl-reader", task="Copy(day=3)")
    ex, r1, r2 = broker.forms
    assert ex["grant_type"] == ["urn:ietf:params:oauth:grant-type:token-exchange"]
    assert ex["subject_token"] == ["ci.jwt.sig"]
    assert ex["subject_token_type"] == ["urn:ietf:params:oauth:token-type:jwt"]
    assert ex["audience"] == ["etl-writer"]
    assert ex["task"] == ["Copy(day=1)"]
    assert ex["duration"] == ["900"]
    assert ex["_path"] == ["/v1/token"]
    assert r1["grant_type"] == ["refresh_token"]
    assert r1["refresh_token"] == ["handle-1"]
    assert r2["refresh_token"] == ["handle-2"]
    assert r2["audience"] == ["etl-reader"]
    assert isinstance(first, AwsCredentials)
    assert first.access_key_id == "AKIA1"
    assert first.expires_at == T0 + timedelta(minutes=15)
    assert first.credential_process()["SessionToken"] == "session-1"
    assert "secret-1" not in repr(first) and "session-1" not in repr(first)


def test_vault_shapes_parse() -> None:
    """Vault token and dynamic-secret bodies become VaultToken and VaultSecret."""
    token_body = {
        "issued_token_type": VAULT_TOKEN,
        "expires_in": 600,
        "refresh_token": "h1",
        "request_id": "r1",
        "credentials": {
            "token": "hvs.secret",
            "accessor": "acc1",
            "policies": ["etl-read"],
            "renewable": True,
            "lease_duration": 600,
        },
    }
    secret_body = {
        "issued_token_type": VAULT_SECRET,
        "expires_in": 3600,
        "refresh_token": "h2",
        "request_id": "r2",
        "credentials": {
            "lease_id": "database/creds/w/abc",
            "lease_duration": 3600,
            "renewable": True,
            "data": {"username": "u", "password": "p4ss"},
        },
    }
    client, _, _ = make(
        [
            lambda f: httpx.Response(200, json=token_body),
            lambda f: httpx.Response(200, json=secret_body),
        ]
    )
    tok = client.mint("etl-vault")
    sec = client.mint("warehouse-load")
    assert (
        isinstance(tok, VaultToken) and tok.token == "hvs.secret" and tok.policies == ("etl-read",)
    )
    assert tok.expires_at == T0 + timedelta(seconds=600)
    assert isinstance(sec, VaultSecret) and sec.data["password"] == "p4ss"
    assert "hvs.secret" not in repr(tok) and "p4ss" not in repr(sec)


def test_429_is_retried_honouring_retry_after() -> None:
    """A 429 with Retry-After waits at least that long and then succeeds."""
    client, broker, sleeps = make([error(429, "temporarily_unavailable", {"Retry-After": "3"})])
    creds = client.mint("etl-writer")
    assert isinstance(creds, AwsCredentials)
    assert sleeps == [3.0]
    assert len(broker.forms) == 2


def test_503_backoff_is_exponential_with_full_jitter_and_bounded() -> None:
    """Repeated 503s back off 0.5, 1, 2, 4 s (jitter at max) and give up after 5 attempts."""
    client, broker, sleeps = make([error(503, "temporarily_unavailable")] * 10)
    with pytest.raises(BrokerError) as info:
        client.mint("etl-writer")
    assert sleeps == [0.5, 1.0, 2.0, 4.0]
    assert len(broker.forms) == 5
    assert info.value.status == 503
    assert info.value.error == "temporarily_unavailable"


def test_deadline_stops_retries() -> None:
    """A Retry-After that would pass the deadline ends the retries at once."""
    client, broker, sleeps = make([error(503, "temporarily_unavailable", {"Retry-After": "120"})])
    with pytest.raises(BrokerError):
        client.mint("etl-writer")
    assert sleeps == []
    assert len(broker.forms) == 1


@pytest.mark.parametrize(
    ("status", "code"), [(400, "invalid_target"), (400, "invalid_request"), (413, "x")]
)
def test_other_4xx_are_not_retried(status: int, code: str) -> None:
    """Client errors other than 429 fail at once with the code, status and request id."""
    client, broker, sleeps = make([error(status, code)])
    with pytest.raises(BrokerError) as info:
        client.mint("etl-writer", task="T1")
    assert sleeps == [] and len(broker.forms) == 1
    exc = info.value
    assert (exc.error, exc.status, exc.request_id, exc.grant) == (
        code,
        status,
        "rid-9",
        "etl-writer",
    )
    assert URL in str(exc) and "'etl-writer'" in str(exc) and code in str(exc)
    assert "ci.jwt.sig" not in str(exc)


def test_invalid_grant_with_fixed_token_is_a_clear_error() -> None:
    """A rejected session with a one-shot CI token raises invalid_grant telling to rerun."""
    client, _, _ = make(
        [lambda f: httpx.Response(200, json=aws_body(1, "h1")), error(400, "invalid_grant")]
    )
    client.mint("etl-writer")
    with pytest.raises(BrokerError, match="cannot give a new token") as info:
        client.mint("etl-writer")
    assert info.value.error == "invalid_grant"
    assert not client.has_session


def test_invalid_grant_with_renewable_source_reexchanges(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A rejected session with a file source re-exchanges the file's current token once."""
    path = tmp_path / "tok"
    path.write_text("first.jwt.sig")
    client, broker, _ = make(
        [lambda f: httpx.Response(200, json=aws_body(1, "h1")), error(400, "invalid_grant")],
        source=FileTokenSource(path),
    )
    client.mint("etl-writer")
    path.write_text("second.jwt.sig")
    creds = client.mint("etl-writer")
    assert isinstance(creds, AwsCredentials)
    assert broker.forms[2]["subject_token"] == ["second.jwt.sig"]


def test_connect_errors_are_retried_but_reported() -> None:
    """A broker that refuses connections is retried and then reported as unreachable."""
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        raise httpx.ConnectError("refused")

    sleeps: list[float] = []
    client = BrokerClient(
        URL,
        EnvTokenSource("TOK", {"TOK": "ci.jwt.sig"}),
        http=httpx.Client(transport=httpx.MockTransport(handler)),
        clock=lambda: T0,
        sleep=sleeps.append,
        rng=lambda: 0.0,
        retry=RetryPolicy(max_attempts=3),
    )
    with pytest.raises(BrokerError, match="unreachable") as info:
        client.mint("etl-writer")
    assert info.value.error == "unreachable"
    assert len(calls) == 3


def test_read_timeouts_are_not_retried() -> None:
    """A request that may have reached the broker is not retried, so no handle is reused."""
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        raise httpx.ReadTimeout("slow")

    client = BrokerClient(
        URL,
        EnvTokenSource("TOK", {"TOK": "x"}),
        http=httpx.Client(transport=httpx.MockTransport(handler)),
        clock=lambda: T0,
        sleep=lambda s: None,
    )
    with pytest.raises(BrokerError, match="ReadTimeout"):
        client.mint("g")
    assert len(calls) == 1


def test_concurrent_mints_never_reuse_a_handle() -> None:
    """Many threads minting at once each spend a distinct handle."""
    client, broker, _ = make()
    threads = [threading.Thread(target=client.mint, args=("g", f"t{i}")) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    handles = [f["refresh_token"][0] for f in broker.forms[1:]]
    assert len(handles) == 19 and len(set(handles)) == 19


def test_revoke_sends_the_newest_handle() -> None:
    """revoke posts the current handle to /v1/revoke and forgets the session."""
    client, broker, _ = make(
        [lambda f: httpx.Response(200, json=aws_body(1, "h1")), lambda f: httpx.Response(200)]
    )
    client.mint("g")
    client.revoke()
    form = broker.forms[-1]
    assert form["_path"] == ["/v1/revoke"]
    assert form["token"] == ["h1"] and form["token_type_hint"] == ["refresh_token"]
    assert not client.has_session
    client.revoke()
    assert len(broker.forms) == 2


def test_malformed_success_is_invalid_response() -> None:
    """A 200 without usable credentials raises invalid_response, keeping the rotated handle."""
    client, _, _ = make(
        [
            lambda f: httpx.Response(
                200, json={"refresh_token": "h1", "issued_token_type": "x", "credentials": {}}
            )
        ]
    )
    with pytest.raises(BrokerError) as info:
        client.mint("g")
    assert info.value.error == "invalid_response"
    assert client.has_session


def test_missing_identity_is_reported() -> None:
    """A token source with no token gives identity_unavailable naming the source."""
    client, broker, _ = make(source=EnvTokenSource("NOPE", {}))
    with pytest.raises(BrokerError, match="NOPE is not set") as info:
        client.mint("g")
    assert info.value.error == "identity_unavailable"
    assert broker.forms == []


def test_revoke_lease_presents_the_lease_and_the_current_handle() -> None:
    """revoke_lease posts the lease id with the vault-secret hint and the current handle, and
    keeps the session, which the broker did not rotate."""
    client, broker, _ = make(
        [
            lambda f: httpx.Response(200, json=aws_body(1, "h1")),
            lambda f: httpx.Response(200),
            error(400, "invalid_grant"),
        ]
    )
    client.mint("g")
    client.revoke_lease("database/creds/warehouse/abc")
    form = broker.forms[-1]
    assert form["_path"] == ["/v1/revoke"]
    assert form["token"] == ["database/creds/warehouse/abc"]
    assert form["token_type_hint"] == ["urn:luigi-creds:token-type:vault-secret"]
    assert form["refresh_token"] == ["h1"]
    assert client.has_session
    with pytest.raises(BrokerError) as info:
        client.revoke_lease("database/creds/warehouse/not-ours")
    assert info.value.error == "invalid_grant"
    assert URL in str(info.value) and "lease revoke" in str(info.value)


def test_revoke_lease_without_a_session_is_refused_locally() -> None:
    """With no session there is no lease of ours: revoke_lease raises and sends nothing."""
    client, broker, _ = make()
    with pytest.raises(BrokerError) as info:
        client.revoke_lease("database/creds/warehouse/abc")
    assert info.value.error == "invalid_grant"
    assert broker.forms == []


def test_first_refresh_asks_for_sibling_chains_and_mints_spend_every_chain() -> None:
    """The first refresh asks for chains-1 siblings (once); later mints present each chain's
    newest handle, never one twice."""

    def grow(form: dict[str, list[str]]) -> httpx.Response:
        body = aws_body(2, "a1")
        body["sibling_refresh_tokens"] = ["b1", "c1", "d1"]
        return httpx.Response(200, json=body)

    client, broker, _ = make([lambda f: httpx.Response(200, json=aws_body(1, "a0")), grow])
    client.mint("g", "Open")
    client.mint("g", "Grow")
    for n in range(4):
        client.mint("g", f"Load_{n}")
    ex, grown, *spent = broker.forms
    assert "sibling_chains" not in ex
    assert grown["sibling_chains"] == ["3"] and grown["refresh_token"] == ["a0"]
    presented = [f["refresh_token"][0] for f in spent]
    # One at a time, the newest handle goes on (its chain stays fresh); never one twice.
    assert presented == ["d1", "handle-3", "handle-4", "handle-5"]
    assert all("sibling_chains" not in f for f in spent)
    session = client._session
    assert session is not None and sorted(session.idle) == ["a1", "b1", "c1", "handle-6"]


def test_a_refused_handle_is_dropped_and_another_chain_mints() -> None:
    """invalid_grant for one chain's handle (a sibling unused past session_idle): the next
    chain's handle mints; the refused one is never presented again."""

    def grow(form: dict[str, list[str]]) -> httpx.Response:
        body = aws_body(2, "a1")
        body["sibling_refresh_tokens"] = ["b1", "c1"]
        return httpx.Response(200, json=body)

    client, broker, _ = make(
        [lambda f: httpx.Response(200, json=aws_body(1, "a0")), grow, error(400, "invalid_grant")]
    )
    client.mint("g", "Open")
    client.mint("g", "Grow")
    cred = client.mint("g", "Load")
    refused, retried = (f["refresh_token"][0] for f in broker.forms[2:])
    assert (refused, retried) == ("c1", "b1") and isinstance(cred, AwsCredentials)
    session = client._session
    assert session is not None and "c1" not in session.idle and len(session.idle) == 2


def test_every_chain_refused_with_a_fixed_token_is_a_clear_error() -> None:
    def grow(form: dict[str, list[str]]) -> httpx.Response:
        body = aws_body(2, "a1")
        body["sibling_refresh_tokens"] = ["b1"]
        return httpx.Response(200, json=body)

    client, broker, _ = make(
        [
            lambda f: httpx.Response(200, json=aws_body(1, "a0")),
            grow,
            error(400, "invalid_grant"),
            error(400, "invalid_grant"),
        ]
    )
    client.mint("g", "Open")
    client.mint("g", "Grow")
    with pytest.raises(BrokerError, match="cannot give a new token") as info:
        client.mint("g", "Load")
    assert info.value.error == "invalid_grant" and not client.has_session
    assert [f["refresh_token"][0] for f in broker.forms[2:]] == ["b1", "a1"]


def test_a_broker_refusing_sibling_chains_leaves_the_session_on_one() -> None:
    """invalid_request to a refresh asking for siblings (an older broker, or a lower
    session_max_chains): the same, unspent handle is presented once more without asking."""

    def refuse_siblings(form: dict[str, list[str]]) -> httpx.Response:
        assert form["sibling_chains"] == ["3"]
        return error(400, "invalid_request")(form)

    client, broker, _ = make(
        [lambda f: httpx.Response(200, json=aws_body(1, "a0")), refuse_siblings]
    )
    client.mint("g", "Open")
    cred = client.mint("g", "Grow")
    client.mint("g", "Next")
    _, asked, again, after = broker.forms
    assert asked["refresh_token"] == again["refresh_token"] == ["a0"]
    assert "sibling_chains" not in again and "sibling_chains" not in after
    assert isinstance(cred, AwsCredentials) and after["refresh_token"] == ["handle-3"]


def test_a_refresh_refused_for_itself_does_not_give_up_sibling_chains() -> None:
    """invalid_request with and without siblings: the request was the problem (raised), and
    the next refresh asks for the siblings again."""
    client, broker, _ = make(
        [
            lambda f: httpx.Response(200, json=aws_body(1, "a0")),
            error(400, "invalid_request"),
            error(400, "invalid_request"),
        ]
    )
    client.mint("g", "Open")
    with pytest.raises(BrokerError):
        client.mint("g", "bad task")
    client.mint("g", "Next")
    _, asked, again, next_refresh = broker.forms
    assert asked["sibling_chains"] == ["3"] and "sibling_chains" not in again
    assert next_refresh["sibling_chains"] == ["3"] and next_refresh["refresh_token"] == ["a0"]
