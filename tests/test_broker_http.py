"""Broker core over real HTTP: local OIDC issuer, moto server and `luigi-creds-broker serve`.

End to end: a GitLab-shaped token becomes working AWS credentials (moto enforces IAM), every
hostile token is refused with the documented error and a deny record, and an unwritable audit
store refuses to hand out anything.
"""

from __future__ import annotations

import base64
import hashlib
import json
import sqlite3
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import hashes, hmac, serialization
from stack import Stack, start_stack

from broker.audit.events import Outcome
from broker.dev.claims import GITLAB_PROJECT_PATH
from broker.dev.harness import refresh_form
from broker.dev.issuer import SigningKey, encode_jwt
from luigi_creds.client import AwsCredentials, BrokerError

pytestmark = pytest.mark.integration

EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One issuer + moto + broker for the module (the hostile table shares it)."""
    workdir = tmp_path_factory.mktemp("stack")
    s = start_stack(workdir)
    try:
        yield s
    finally:
        s.broker.stop()
        s.moto.stop()
        s.issuer.stop()


def test_exchange_returns_aws_credentials_that_work_in_s3(stack: Stack) -> None:
    """A GitLab-shaped token is exchanged for STS credentials that put and get an S3 object."""
    token = stack.issuer.mint("gitlab")
    status, body, headers = stack.broker.exchange(token, task="CopyToS3_2026_11_22_abc123")
    assert status == 200, body
    assert headers["Cache-Control"] == "no-store"
    assert body["issued_token_type"] == "urn:luigi-creds:token-type:aws-credentials"
    assert body["token_type"] == "N_A"
    assert 0 < body["expires_in"] <= 900
    creds = body["credentials"]
    assert creds["Version"] == 1 and creds["AccessKeyId"].startswith("ASIA")

    s3 = stack.moto.client("s3", **creds)
    s3.create_bucket(Bucket="lake")
    s3.put_object(Bucket="lake", Key="raw/day.csv", Body=b"a,b\n1,2\n")
    assert s3.get_object(Bucket="lake", Key="raw/day.csv")["Body"].read() == b"a,b\n1,2\n"

    identity = stack.moto.client("sts", **creds).get_caller_identity()
    # The session name is the templated project path, then the request id (CloudTrail join key).
    assert identity["Arn"] == (
        f"arn:aws:sts::123456789012:assumed-role/etl-writer/"
        f"{GITLAB_PROJECT_PATH.replace('/', '-')}-{body['request_id']}"
    )

    records = stack.events_for(body["request_id"])
    assert [r.outcome for r in records] == [Outcome.INTENT, Outcome.ISSUED]
    issued = records[-1]
    assert issued.credential_ref == creds["AccessKeyId"]
    assert issued.task == "CopyToS3_2026_11_22_abc123"
    assert issued.grant == "etl-writer" and issued.issuer == "gitlab"
    assert issued.target == stack.role_arn
    assert issued.token_sha256 == hashlib.sha256(token.encode()).hexdigest()
    assert issued.claims["project_id"] == "55235664"
    # Nothing secret reaches the audit store or the broker's log.
    raw_db = stack.audit_db.read_bytes()
    log = stack.broker.process.log_text()
    for secret in (creds["SecretAccessKey"], creds["SessionToken"], token):
        assert secret.encode() not in raw_db
        assert secret not in log


def test_requested_duration_is_capped_by_the_grant(stack: Stack) -> None:
    """A duration above the grant ttl is clamped to the ttl, never extended."""
    status, body, _ = stack.broker.exchange(stack.issuer.mint("gitlab"), duration="40000")
    assert status == 200, body
    assert 800 < body["expires_in"] <= 900


# -- hostile tokens ------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _segments(token: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    h, p, s = token.split(".")
    pad = lambda x: x + "=" * (-len(x) % 4)  # noqa: E731
    return (
        json.loads(base64.urlsafe_b64decode(pad(h))),
        json.loads(base64.urlsafe_b64decode(pad(p))),
        s,
    )


def _unsigned(header: dict[str, Any], claims: dict[str, Any], sig: str = "") -> str:
    return f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}.{sig}"


def _alg_none(s: Stack, variant: str) -> str:
    _, claims, _ = _segments(s.issuer.mint("gitlab"))
    return _unsigned({"alg": variant, "typ": "JWT"}, claims)


def _hs256_with_public_key(s: Stack) -> str:
    """HMAC over header.payload with the issuer's public key PEM as the secret (key confusion)."""
    key = s.issuer_key("RS256")
    _, claims, _ = _segments(s.issuer.mint("gitlab"))
    pem = key.private_key.public_key().public_bytes(  # type: ignore[union-attr]
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    signing_input = (
        f"{_b64(json.dumps({'alg': 'HS256', 'kid': key.kid}).encode())}."
        f"{_b64(json.dumps(claims).encode())}"
    )
    mac = hmac.HMAC(pem, hashes.SHA256())
    mac.update(signing_input.encode())
    return f"{signing_input}.{_b64(mac.finalize())}"


def _foreign_key(s: Stack) -> str:
    """Signed by a key the issuer never published, under the issuer's real kid."""
    real = s.issuer_key("RS256")
    _, claims, _ = _segments(s.issuer.mint("gitlab"))
    return encode_jwt(claims, SigningKey.generate("RS256"), header={"kid": real.kid})


def _psychic_es256(s: Stack) -> str:
    h, p, _ = s.issuer.mint("gitlab", alg="ES256").split(".")
    return f"{h}.{p}.{_b64(bytes(64))}"


def _unknown_kid(s: Stack, kid: str) -> str:
    """A token naming `kid`, sent once the policy's 1 s refetch cooldown has surely passed: an
    unknown kid is a final 400 only for the request that refetched; within the cooldown it is
    503 with Retry-After (test_security_http covers that)."""
    time.sleep(1.1)
    return s.issuer.mint("gitlab", header={"kid": kid})


def _resign(s: Stack, claims_change: dict[str, Any], header: dict[str, Any] | None = None) -> str:
    """Re-sign a preset token with the issuer's real key after changing claims (None deletes)."""
    _, claims, _ = _segments(s.issuer.mint("gitlab"))
    for k, v in claims_change.items():
        if v is None:
            claims.pop(k, None)
        else:
            claims[k] = v
    return encode_jwt(claims, s.issuer_key("RS256"), header=header)


def _now() -> int:
    return int(time.time())


def _jwe(s: Stack) -> str:
    header = _b64(json.dumps({"alg": "RSA-OAEP", "enc": "A256GCM"}).encode())
    return ".".join([header, "AAAA", "BBBB", "CCCC", "DDDD"])


def _bad_base64(s: Stack) -> str:
    h, p, sig = s.issuer.mint("gitlab").split(".")
    return f"{h}.{p[:10]}+{p[10:]}.{sig}"


def _padded(s: Stack) -> str:
    h, p, sig = s.issuer.mint("gitlab").split(".")
    return f"{h}=.{p}.{sig}"


def _oversized(s: Stack) -> str:
    return _resign(s, {"padding": "x" * 9000})


def _unconfigured_issuer(s: Stack) -> str:
    _, claims, _ = _segments(s.issuer.mint("gitlab"))
    claims["iss"] = "https://attacker.example"
    return encode_jwt(claims, SigningKey.generate("RS256"))


def _duplicate_sub(s: Stack) -> str:
    key = s.issuer_key("RS256")
    _, claims, _ = _segments(s.issuer.mint("gitlab"))
    body = json.dumps(claims)[:-1] + ', "project_id": "1"}'
    signing_input = (
        f"{_b64(json.dumps({'alg': 'RS256', 'kid': key.kid}).encode())}.{_b64(body.encode())}"
    )
    return f"{signing_input}.{_b64(key.sign(signing_input.encode()))}"


# (case id, token builder, expected error, expected audit reason or None for "any")
REFUSED_TOKENS: list[tuple[str, Callable[[Stack], str], str, str | None]] = [
    ("alg-none", lambda s: _alg_none(s, "none"), "invalid_request", None),
    ("alg-None", lambda s: _alg_none(s, "None"), "invalid_request", None),
    ("alg-nOnE", lambda s: _alg_none(s, "nOnE"), "invalid_request", None),
    ("hs256-with-rsa-public-key", _hs256_with_public_key, "invalid_request", None),
    (
        "unknown-kid",
        lambda s: _unknown_kid(s, "nope"),
        "invalid_request",
        "unknown_kid",
    ),
    (
        "kid-wrong-type",
        lambda s: s.issuer.mint("gitlab", header={"kid": ["a"]}),
        "invalid_request",
        None,
    ),
    (
        "kid-path-traversal",
        lambda s: _unknown_kid(s, "../../../../dev/null"),
        "invalid_request",
        None,
    ),
    ("signature-from-another-key", _foreign_key, "invalid_request", "bad_signature"),
    ("es256-r-s-zero", _psychic_es256, "invalid_request", None),
    (
        "expired",
        lambda s: _resign(s, {"exp": _now() - 120, "iat": _now() - 600}),
        "invalid_request",
        "expired",
    ),
    (
        "nbf-in-future",
        lambda s: _resign(s, {"nbf": _now() + 600}),
        "invalid_request",
        "not_yet_valid",
    ),
    ("iat-in-future", lambda s: _resign(s, {"iat": _now() + 600}), "invalid_request", None),
    ("missing-exp", lambda s: _resign(s, {"exp": None}), "invalid_request", "missing_claim"),
    ("missing-iat", lambda s: _resign(s, {"iat": None}), "invalid_request", "missing_claim"),
    ("missing-sub", lambda s: _resign(s, {"sub": None}), "invalid_request", "missing_claim"),
    ("missing-aud", lambda s: _resign(s, {"aud": None}), "invalid_request", None),
    ("exp-as-string", lambda s: _resign(s, {"exp": str(_now() + 300)}), "invalid_request", None),
    (
        "lifetime-exceeded",
        lambda s: _resign(s, {"iat": _now() - 7 * 3600, "exp": _now() + 60}),
        "invalid_request",
        None,
    ),
    (
        "wrong-iss-trailing-slash",
        lambda s: _resign(s, {"iss": s.issuer.url + "/"}),
        "invalid_request",
        "unknown_issuer",
    ),
    (
        "wrong-aud",
        lambda s: _resign(s, {"aud": "another-service"}),
        "invalid_request",
        "wrong_audience",
    ),
    (
        "aud-list-without-ours",
        lambda s: _resign(s, {"aud": ["a", "b"]}),
        "invalid_request",
        "wrong_audience",
    ),
    (
        "jku-header",
        lambda s: _resign(s, {}, {"jku": "http://169.254.169.254/jwks"}),
        "invalid_request",
        "forbidden_header",
    ),
    (
        "x5u-header",
        lambda s: _resign(s, {}, {"x5u": "https://attacker/x.pem"}),
        "invalid_request",
        "forbidden_header",
    ),
    (
        "embedded-jwk",
        lambda s: _resign(s, {}, {"jwk": s.issuer_key().public_jwk()}),
        "invalid_request",
        "forbidden_header",
    ),
    (
        "unknown-crit",
        lambda s: _resign(s, {}, {"crit": ["exp2"], "exp2": 1}),
        "invalid_request",
        None,
    ),
    ("jwe-five-parts", _jwe, "invalid_request", None),
    ("bad-base64-char", _bad_base64, "invalid_request", None),
    ("base64-padding", _padded, "invalid_request", None),
    ("oversized-token", _oversized, "invalid_request", None),
    ("unconfigured-issuer", _unconfigured_issuer, "invalid_request", "unknown_issuer"),
    ("duplicate-claim", _duplicate_sub, "invalid_request", None),
    ("nested-jwt", lambda s: _resign(s, {}, {"cty": "JWT"}), "invalid_request", None),
    (
        "ref-glob-across-slash",
        lambda s: _resign(s, {"ref": "release/1/evil"}),
        "invalid_target",
        None,
    ),
    (
        "project-id-as-number",
        lambda s: _resign(s, {"project_id": 55235664}),
        "invalid_target",
        None,
    ),
    ("other-project", lambda s: _resign(s, {"project_id": "1"}), "invalid_target", None),
    ("ref-unprotected", lambda s: _resign(s, {"ref_protected": "false"}), "invalid_target", None),
    ("empty-subject-token", lambda s: "", "invalid_request", None),
]


@pytest.mark.parametrize(
    ("builder", "error", "reason"),
    [pytest.param(b, e, r, id=i) for i, b, e, r in REFUSED_TOKENS],
)
def test_hostile_token_is_refused_and_audited(
    stack: Stack, builder: Callable[[Stack], str], error: str, reason: str | None
) -> None:
    """Each hostile token gets a 400 with the documented error and mints nothing. One that
    proves no identity is counted in a `tallied` record; one that verified keeps its own."""
    token = builder(stack)
    before = stack.tallies()
    status, body, headers = stack.broker.exchange(token)
    assert status == 400, body
    assert body["error"] == error
    assert set(body) == {"error", "error_description", "request_id"}
    assert headers["Cache-Control"] == "no-store"
    records = stack.events_for(body["request_id"])
    if records:
        # A token that verified but asks for what the policy refuses: its own record.
        assert [(r.outcome, bool(r.subject)) for r in records] == [(Outcome.DENIED, True)]
        assert records[0].reason == reason or (reason is None and records[0].reason)
    else:
        grown = stack.assert_tallied(body["request_id"], before, reason)
        assert all(outcome == Outcome.DENIED for _, outcome, _ in grown)
    # Error bodies stay small and never echo the token, so nothing of it reaches a client's log.
    raw = json.dumps(body)
    assert len(raw) < 1024
    if token:
        assert token.split(".")[1][:40] not in raw


def test_oversized_form_body_is_413_and_audited(stack: Stack) -> None:
    """A form body over the configured limit is answered 413 and still counted in the audit."""
    before = stack.tallies()
    status, body, _ = stack.broker.post_raw("/v1/token", b"subject_token=" + b"a" * 70_000)
    assert status == 413
    stack.assert_tallied(body["request_id"], before, "body_too_large")


@pytest.mark.parametrize(
    ("data", "content_type"),
    [
        pytest.param(
            b"grant_type=a&grant_type=b", "application/x-www-form-urlencoded", id="repeated"
        ),
        pytest.param(b'{"grant_type": "x"}', "application/json", id="json-body"),
        pytest.param(
            b"grant_type=x", "application/x-www-form-urlencoded; charset=utf-16", id="utf16"
        ),
        pytest.param(b"grant_type=%ff", "application/x-www-form-urlencoded", id="bad-utf8"),
    ],
)
def test_malformed_form_is_invalid_request(stack: Stack, data: bytes, content_type: str) -> None:
    """Repeated parameters, JSON bodies and non-UTF-8 forms are refused as invalid_request."""
    status, body, _ = stack.broker.post_raw("/v1/token", data, content_type)
    assert (status, body["error"]) == (400, "invalid_request")


def test_wrong_grant_type_is_unsupported(stack: Stack) -> None:
    """grant_type=password is answered unsupported_grant_type."""
    status, body, _ = stack.broker.token({"grant_type": "password"})
    assert (status, body["error"]) == (400, "unsupported_grant_type")


def test_unknown_grant_is_invalid_target(stack: Stack) -> None:
    """A valid token asking for a grant that does not exist is invalid_target."""
    status, body, _ = stack.broker.exchange(stack.issuer.mint("gitlab"), grant="root")
    assert (status, body["error"]) == (400, "invalid_target")


def test_health_metrics_and_openapi_answer(stack: Stack) -> None:
    """healthz, readyz, metrics and openapi.json answer with the expected content."""
    assert stack.broker.get("/healthz")[0] == 200
    status, ready = stack.broker.get("/readyz")
    assert status == 200, ready
    assert json.loads(ready)["checks"] == {"issuers": "ok", "audit": "ok", "aws": "ok"}
    status, text = stack.broker.get("/metrics")
    assert status == 200
    assert (
        'luigi_creds_requests_total{endpoint="token",grant="etl-writer",outcome="issued"}' in text
    )
    assert "luigi_creds_jwks_fetches_total" in text
    status, text = stack.broker.get("/openapi.json")
    assert status == 200 and "/v1/token" in json.loads(text)["paths"]


def test_unwritable_audit_store_returns_503_and_no_credentials(tmp_path: Path) -> None:
    """With the audit store refusing writes the broker answers 503 and returns no credential."""
    s = start_stack(tmp_path)
    try:
        assert s.broker.exchange(s.issuer.mint("gitlab"))[0] == 200
        before = len(s.events())
        db = sqlite3.connect(s.audit_db)
        # A real write failure at the store, as a full disk would give, for every insert.
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for table in tables:
            db.execute(
                f'CREATE TRIGGER "refuse_{table}" BEFORE INSERT ON "{table}" '
                "BEGIN SELECT RAISE(ABORT, 'disk full'); END"
            )
        db.commit()
        db.close()
        status, body, headers = s.broker.exchange(s.issuer.mint("gitlab"))
        assert status == 503
        assert body["error"] == "temporarily_unavailable"
        assert "credentials" not in body and "access_token" not in body
        assert int(headers["Retry-After"]) > 0
        assert len(s.events()) == before
        assert s.broker.get("/readyz")[0] == 503
    finally:
        s.broker.stop()
        s.moto.stop()
        s.issuer.stop()


def test_server_timing_names_the_phases(stack: Stack) -> None:
    """An exchange reports where its time went: verify, policy, state and mint, in ms, and the
    total they are part of."""
    status, _, headers = stack.broker.exchange(stack.issuer.mint("gitlab"))
    assert status == 200
    phases = {
        name: float(ms)
        for name, ms in (
            part.strip().split(";dur=") for part in headers["Server-Timing"].split(",")
        )
    }
    assert {"verify", "policy", "state", "mint", "total"} <= set(phases)
    assert all(ms >= 0 for ms in phases.values())
    assert phases["total"] >= sum(ms for name, ms in phases.items() if name != "total")
    status, _, headers = stack.broker.exchange(stack.issuer.mint("gitlab", project_id="1"))
    assert status == 400 and "policy;dur=" in headers["Server-Timing"]
    assert "total;dur=" in headers["Server-Timing"]


def test_issued_event_time_is_aware_utc(stack: Stack) -> None:
    """Audit times are aware UTC datetimes."""
    status, body, _ = stack.broker.exchange(stack.issuer.mint("gitlab"))
    assert status == 200
    event = stack.events_for(body["request_id"])[-1]
    assert event.time.tzinfo is not None
    assert abs((datetime.now(UTC) - event.time).total_seconds()) < 60


def test_issuer_key_rotation_is_picked_up_after_one_refetch(tmp_path: Path) -> None:
    """After the issuer swaps keys, new tokens verify after one refetch; old-key tokens fail."""
    s = start_stack(tmp_path)
    try:
        old_token = s.issuer.mint("gitlab")
        assert s.broker.exchange(s.issuer.mint("gitlab"))[0] == 200
        fetches = s.issuer.stats()["jwks_fetches"]
        s.issuer.rotate("RS256", drop_old=True)
        status, body, _ = s.broker.exchange(s.issuer.mint("gitlab"))
        assert status == 200, body
        assert s.issuer.stats()["jwks_fetches"] == fetches + 1
        # The dropped key's tokens now name a kid the issuer no longer publishes.
        time.sleep(1.1)  # the policy's jwks_refetch_cooldown is 1 s
        before = s.tallies()
        status, body, _ = s.broker.exchange(old_token)
        assert (status, body["error"]) == (400, "invalid_request")
        s.assert_tallied(body["request_id"], before, "unknown_kid")
        _, metrics = s.broker.get("/metrics")
        assert 'luigi_creds_jwks_fetches_total{issuer="gitlab",outcome="ok"}' in metrics
    finally:
        s.broker.stop()
        s.moto.stop()
        s.issuer.stop()


AGENT_REFUSED = "urn:luigi-creds:token-type:agent-refused"


def test_an_agent_refusal_report_is_audited_as_what_the_agent_refused(stack: Stack) -> None:
    """A refusal the job's agent reports on the session is answered invalid_request (the
    documented code), mints and rotates nothing, and is audited as DENIED with the reason the
    agent gave, whatever grant it names: one the policy allows, one it does not know, or none."""
    status, body, _ = stack.broker.exchange(stack.issuer.mint("gitlab"))
    assert status == 200, body
    handle = body["refresh_token"]
    (issued,) = [e for e in stack.events_for(body["request_id"]) if e.outcome == Outcome.ISSUED]
    reports = [
        ("scope", "etl-writer", "agent_refused_scope"),
        ("scope", "no-such-grant", "agent_refused_scope"),
        ("delegation", "etl-writer", "agent_refused_delegation"),
        ("task_end", "-", "agent_refused_task_end"),
        ("lease", "-", "agent_refused_lease"),
        ("from-a-newer-client", "etl-writer", "agent_refused"),  # never its text
    ]
    for refused, grant, reason in reports:
        form = refresh_form(
            handle, grant, task="Task(a=2)", requested_token_type=f"{AGENT_REFUSED}:{refused}"
        )
        status, answer, _ = stack.broker.token(form)
        assert (status, answer["error"]) == (400, "invalid_request"), answer
        assert "refresh_token" not in answer
        (event,) = stack.events_for(answer["request_id"])
        assert (event.outcome, event.reason, event.grant, event.task, event.session_id) == (
            Outcome.DENIED,
            reason,
            grant,
            "Task(a=2)",
            issued.session_id,
        )
    # A requested type no grant issues that is not an agent's report keeps its own reason.
    form = refresh_form(handle, requested_token_type="urn:luigi-creds:token-type:vault-token")
    status, answer, _ = stack.broker.token(form)
    assert (status, answer["error"]) == (400, "invalid_request")
    assert [e.reason for e in stack.events_for(answer["request_id"])] == [
        "unsupported_requested_token_type"
    ]
    # Nothing was rotated: the handle still mints.
    status, body, _ = stack.broker.token(refresh_form(handle))
    assert status == 200, body


def test_the_job_agent_reports_what_it_refused_on_the_job_session(stack: Stack) -> None:
    """The real agent over its socket, minting through the real client: each refusal by the
    agent (another task, a grant outside the bearer, a wider bearer, ending another task, a
    lease of another task) reaches the broker's ledger with a reason naming it."""
    from luigi_creds.agent_client import AgentClient
    from luigi_creds.client import BrokerClient
    from luigi_creds.identity import parse_token_source
    from luigi_creds.serve import CredentialAgent

    def clock() -> datetime:
        return datetime.now(UTC)

    with httpx.Client(timeout=30) as http:
        source = parse_token_source(
            "env:CI_ID_TOKEN",
            environ={"CI_ID_TOKEN": stack.issuer.mint("gitlab")},
            http=http,
            audience=stack.broker.url,
            clock=clock,
        )
        broker = BrokerClient(stack.broker.url, source, http=http, clock=clock)
        agent = CredentialAgent(
            broker.mint,
            clock=clock,
            revoke_lease=broker.revoke_lease,
            report_refusal=broker.report_refusal,
        )
        endpoint = agent.start()
        try:
            delegate = AgentClient(
                AgentClient(endpoint).scoped(["etl-writer"], None, delegate=True)
            )
            task = AgentClient(delegate.scoped(["etl-writer"], "Task(a=1)"))
            task.mint("etl-writer")  # the job's session
            refusals = [
                lambda: task.mint("etl-writer", "Task(a=2)"),
                lambda: task.mint("no-such-grant"),
                lambda: task.scoped(["etl-writer"], None, delegate=True),
                lambda: task.release("Task(a=2)"),
                lambda: task.revoke_lease("database/creds/other/1"),
            ]
            for refusal in refusals:
                with pytest.raises(BrokerError) as info:
                    refusal()
                assert (info.value.status, info.value.error) == (403, "access_denied")
            expected = {
                ("agent_refused_scope", "etl-writer", "Task(a=1)"),
                ("agent_refused_scope", "no-such-grant", "Task(a=1)"),
                ("agent_refused_delegation", "etl-writer", "Task(a=1)"),
                ("agent_refused_task_end", "-", "Task(a=2)"),
                ("agent_refused_lease", "-", "Task(a=1)"),
            }
            (session,) = {e.session_id for e in stack.events() if e.task == "Task(a=1)"}
            deadline = time.monotonic() + 15  # reported in the background
            while True:
                denied = {
                    (e.reason, e.grant, e.task)
                    for e in stack.events()
                    if e.session_id == session and e.outcome == Outcome.DENIED
                }
                if denied == expected or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            assert denied == expected
            assert isinstance(task.mint("etl-writer"), AwsCredentials)  # the session lives on
        finally:
            agent.stop()
            broker.revoke(retry=False)
