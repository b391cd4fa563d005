"""The broker's signed STS client against a scripted STS on loopback (tests/fake_sts.py).

What it sends (the AssumeRole form, SigV4 headers), what it makes of STS's answers and refusals,
and that it refuses answers it should not parse. Signature correctness is checked by moto, which
verifies every signature, in tests/test_aws_enforced.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from botocore.credentials import Credentials
from fake_sts import FakeSts

from broker.dev.processes import free_port
from broker.mint import UpstreamError
from broker.mint.aws import AssumeRolePlan, AwsMinter
from broker.mint.sts_http import StsHTTP

EXPIRES = datetime(2026, 11, 22, 12, 15, tzinfo=UTC)
PLAN = AssumeRolePlan(
    role_arn="arn:aws:iam::123456789012:role/etl-writer",
    role_session_name="etl-writer-req1",
    duration_seconds=900,
    source_identity="alice@example.com",
    tags=(("project", "55235664"), ("pipeline", "nightly load")),
)


@pytest.fixture
def fake() -> Iterator[FakeSts]:
    server = FakeSts()
    yield server
    server.close()


@pytest.fixture
def minter(fake: FakeSts) -> Iterator[AwsMinter]:
    sts = StsHTTP(
        fake.url, "eu-west-1", lambda: Credentials("AKIAEXAMPLE", "secret", "tok"), timeout=5
    )
    yield AwsMinter(sts)
    sts.close()


def test_assume_role_sends_the_plan_signed_and_reads_the_credentials(
    fake: FakeSts, minter: AwsMinter
) -> None:
    fake.add_credentials("ASIAEXAMPLE01", "s" * 40, "t" * 100, EXPIRES)
    creds = minter.assume_role(PLAN)
    assert (creds.access_key_id, creds.secret_access_key, creds.session_token) == (
        "ASIAEXAMPLE01",
        "s" * 40,
        "t" * 100,
    )
    assert creds.expiration == EXPIRES
    ((form, headers),) = fake.requests
    assert form == {
        "Action": "AssumeRole",
        "Version": "2011-06-15",
        "RoleArn": PLAN.role_arn,
        "RoleSessionName": "etl-writer-req1",
        "DurationSeconds": "900",
        "SourceIdentity": "alice@example.com",
        "Tags.member.1.Key": "project",
        "Tags.member.1.Value": "55235664",
        "Tags.member.2.Key": "pipeline",
        "Tags.member.2.Value": "nightly load",
    }
    assert (
        headers["authorization"].startswith("AWS4-HMAC-SHA256 Credential=AKIAEXAMPLE/")
        and "/eu-west-1/sts/aws4_request" in headers["authorization"]
    )
    assert headers["x-amz-security-token"] == "tok"
    assert headers["content-type"].startswith("application/x-www-form-urlencoded")


def test_calls_reuse_one_kept_alive_connection(fake: FakeSts, minter: AwsMinter) -> None:
    for _ in range(3):
        fake.add_credentials("ASIAEXAMPLE01", "s" * 40, "t" * 100, EXPIRES)
        minter.assume_role(PLAN)
    assert len(set(fake.client_ports)) == 1


@pytest.mark.parametrize(
    ("code", "status", "reason", "retryable"),
    [
        ("AccessDenied", 403, "upstream_denied", False),
        ("Throttling", 400, "upstream_throttled", True),
        ("ServiceUnavailable", 503, "upstream_unavailable", True),
        ("ExpiredTokenException", 400, "upstream_misconfigured", False),
        ("ValidationError", 400, "upstream_rejected", False),
    ],
)
def test_refusals_map_by_code_and_keep_sts_words_and_request_id(
    fake: FakeSts, minter: AwsMinter, code: str, status: int, reason: str, retryable: bool
) -> None:
    fake.add_error(code, status, "User: arn:x is\n not authorized <here>")
    with pytest.raises(UpstreamError) as caught:
        minter.assume_role(PLAN)
    assert (caught.value.reason, caught.value.retryable, caught.value.upstream) == (
        reason,
        retryable,
        "sts",
    )
    assert caught.value.detail == (
        f"{code} (HTTP {status}): User: arn:x is not authorized <here>"
        f" [AWS request id 4f1c-{status}]"
    )


def test_the_other_query_error_shape_is_read_too(fake: FakeSts, minter: AwsMinter) -> None:
    """<Response><Errors><Error>, as moto's IAM enforcement and other Query services answer."""
    fake.add_raw(
        403,
        "<?xml version='1.0' encoding='UTF-8'?><Response><Errors><Error><Code>AccessDenied"
        "</Code><Message>User: arn:x is not authorized to perform: sts:AssumeRole</Message>"
        "</Error></Errors><RequestID>7a62c49f</RequestID></Response>",
    )
    with pytest.raises(UpstreamError) as caught:
        minter.assume_role(PLAN)
    assert caught.value.reason == "upstream_denied"
    assert caught.value.detail == (
        "AccessDenied (HTTP 403): User: arn:x is not authorized to perform: sts:AssumeRole"
        " [AWS request id 7a62c49f]"
    )


@pytest.mark.parametrize(
    "body",
    [
        # An entity-expanding DTD is never handed to the parser.
        '<?xml version="1.0"?><!DOCTYPE r [<!ENTITY a "aaaa">]><AssumeRoleResponse>&a;'
        "</AssumeRoleResponse>",
        "not xml at all",
        "<AssumeRoleResponse><AssumeRoleResult><Credentials><AccessKeyId>A</AccessKeyId>"
        "</Credentials></AssumeRoleResult></AssumeRoleResponse>",  # parts missing
    ],
)
def test_an_answer_that_is_not_sts_s_is_unavailable_not_credentials(
    fake: FakeSts, minter: AwsMinter, body: str
) -> None:
    fake.add_raw(200, body)
    with pytest.raises(UpstreamError) as caught:
        minter.assume_role(PLAN)
    assert (caught.value.reason, caught.value.retryable) == ("upstream_unavailable", True)


def test_an_unreachable_sts_is_unavailable_and_retryable() -> None:
    sts = StsHTTP(
        f"http://127.0.0.1:{free_port()}", "us-east-1", lambda: Credentials("AKIAX", "y"), timeout=2
    )
    with pytest.raises(UpstreamError) as caught:
        AwsMinter(sts).assume_role(PLAN)
    assert (caught.value.reason, caught.value.retryable) == ("upstream_unavailable", True)
    assert "ConnectionRefusedError" in caught.value.detail


def test_no_credentials_yet_is_unavailable_until_they_appear(fake: FakeSts) -> None:
    """A broker whose credential chain finds nothing (an instance profile not answering yet)
    mints nothing and sends nothing, and works once credentials are found, without a restart."""
    found: list[Credentials] = []
    sts = StsHTTP(fake.url, "us-east-1", lambda: found[0] if found else None, timeout=5)
    with pytest.raises(UpstreamError) as caught:
        AwsMinter(sts).assume_role(PLAN)
    assert (caught.value.reason, caught.value.retryable) == ("upstream_unavailable", True)
    assert "no AWS credentials" in caught.value.detail and not fake.requests
    found.append(Credentials("AKIALATE", "y"))
    fake.add_credentials("ASIAEXAMPLE01", "s" * 40, "t" * 100, EXPIRES)
    assert AwsMinter(sts).assume_role(PLAN).access_key_id == "ASIAEXAMPLE01"
    assert "Credential=AKIALATE/" in fake.requests[0][1]["authorization"]
    sts.close()


def test_readiness_is_a_signed_get_caller_identity(fake: FakeSts, minter: AwsMinter) -> None:
    fake.add_raw(
        200,
        '<GetCallerIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">'
        "<GetCallerIdentityResult><Arn>arn:aws:iam::123456789012:user/broker</Arn>"
        "</GetCallerIdentityResult></GetCallerIdentityResponse>",
    )
    minter.check_reachable()
    assert fake.requests[0][0] == {"Action": "GetCallerIdentity", "Version": "2011-06-15"}
    fake.add_error("InvalidClientTokenId", 403)
    with pytest.raises(UpstreamError) as caught:
        minter.check_reachable()
    assert caught.value.reason == "upstream_misconfigured"
