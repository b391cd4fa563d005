"""Minted AWS credentials against a moto that enforces IAM: allowed what their role allows only.

moto runs with request authentication on (broker.dev.aws): every call must be signed by a key
moto issued, and is checked against the caller's identity policies (action and resource) and,
for AssumeRole, the role's trust policy principal. Two grants map to two roles, each allowed one
bucket prefix, so these tests see a real server refuse a credential outside its grant, a tampered
credential, and a broker whose role trust or own key is wrong.

What moto does not check (expiry, condition keys, session tags) is covered elsewhere; see
tests/README.md.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError
from stack import Stack, start_upstreams

from broker.audit.events import Outcome
from broker.dev.aws import Allow, s3_objects
from broker.dev.harness import policy_toml, start_broker
from broker.dev.policy_file import etl_project_grant
from broker.dev.processes import free_port

pytestmark = pytest.mark.integration

LAKE = "lake"
ARCHIVE = "archive"


def aws_grant(name: str, role_arn: str) -> str:
    """A grant like the default `etl-writer`, on another role."""
    return etl_project_grant(name, ttl="15m", aws={"role_arn": role_arn})


@pytest.fixture(scope="module")
def enforced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Issuer, auth-enforcing moto with two scoped roles and an untrusting one, and a broker."""
    workdir = tmp_path_factory.mktemp("enforced")
    with start_upstreams(workdir) as up:
        for bucket in (LAKE, ARCHIVE):
            up.moto.client("s3").create_bucket(Bucket=bucket)
        # etl-writer (the policy's default grant) may write raw/ in the lake only.
        lake_role = up.moto.create_role("luigi-lake-raw", [s3_objects(LAKE, "raw/")])
        archive_role = up.moto.create_role(
            "luigi-archive",
            [s3_objects(ARCHIVE), Allow(("s3:ListBucket",), (f"arn:aws:s3:::{ARCHIVE}",))],
        )
        # A role that trusts someone else: the broker's AssumeRole must be refused by moto.
        foreign_role = up.moto.create_role(
            "luigi-foreign",
            [s3_objects(LAKE)],
            trusted="arn:aws:iam::123456789012:user/someone-else",
        )
        stack = up.serve(
            workdir,
            role_arn=lake_role,
            extra=aws_grant("archive-writer", archive_role) + aws_grant("foreign", foreign_role),
        )
        try:
            yield stack
        finally:
            stack.broker.stop()


def refusal(call: Any) -> str:
    """The AWS error code moto answers `call()` with; fails the test if moto allows it."""
    with pytest.raises(ClientError) as caught:
        call()
    return str(caught.value.response["Error"]["Code"])


def test_minted_credential_may_do_what_its_role_allows(enforced: Stack) -> None:
    """etl-writer's credential writes and reads under raw/ in its bucket, and lives at most the
    grant's 15 minutes (moto sets Expiration from the DurationSeconds the broker asked for)."""
    creds = enforced.credentials("etl-writer")
    lifetime = datetime.fromisoformat(creds["Expiration"]) - datetime.now(UTC)
    assert timedelta(0) < lifetime <= timedelta(minutes=15)
    s3 = enforced.s3(creds)
    s3.put_object(Bucket=LAKE, Key="raw/day.csv", Body=b"a,b\n1,2\n")
    assert s3.get_object(Bucket=LAKE, Key="raw/day.csv")["Body"].read() == b"a,b\n1,2\n"
    s3.delete_object(Bucket=LAKE, Key="raw/day.csv")


def test_minted_credential_is_refused_what_its_role_does_not_allow(enforced: Stack) -> None:
    """Outside raw/, other S3 actions, IAM and role chaining are refused by moto."""
    creds = enforced.credentials("etl-writer")
    s3 = enforced.s3(creds)
    assert refusal(lambda: s3.put_object(Bucket=LAKE, Key="curated/x", Body=b"x")) == (
        "AccessDenied"
    )
    assert refusal(lambda: s3.list_objects_v2(Bucket=LAKE)) == "AccessDenied"
    assert refusal(lambda: s3.create_bucket(Bucket="elsewhere")) == "AccessDenied"
    assert refusal(lambda: s3.delete_bucket(Bucket=LAKE)) == "AccessDenied"
    iam = enforced.moto.client("iam", **creds)
    assert refusal(lambda: iam.list_roles()) == "AccessDenied"
    sts = enforced.moto.client("sts", **creds)
    lake_role = "arn:aws:iam::123456789012:role/luigi-lake-raw"
    assert refusal(lambda: sts.assume_role(RoleArn=lake_role, RoleSessionName="chain")) == (
        "AccessDenied"
    )


def test_a_credential_of_one_grant_is_refused_the_resource_of_another(
    enforced: Stack,
) -> None:
    """The lake grant's key cannot touch the archive, and the archive grant's not the lake."""
    lake = enforced.s3(enforced.credentials("etl-writer"))
    archive = enforced.s3(enforced.credentials("archive-writer"))
    archive.put_object(Bucket=ARCHIVE, Key="2026/11/day.csv", Body=b"x")
    assert [o["Key"] for o in archive.list_objects_v2(Bucket=ARCHIVE)["Contents"]] == [
        "2026/11/day.csv"
    ]
    lake.put_object(Bucket=LAKE, Key="raw/mine", Body=b"x")
    assert refusal(lambda: lake.put_object(Bucket=ARCHIVE, Key="2026/11/x", Body=b"x")) == (
        "AccessDenied"
    )
    assert refusal(lambda: lake.get_object(Bucket=ARCHIVE, Key="2026/11/day.csv")) == (
        "AccessDenied"
    )
    assert refusal(lambda: archive.get_object(Bucket=LAKE, Key="raw/mine")) == "AccessDenied"
    assert refusal(lambda: archive.put_object(Bucket=LAKE, Key="raw/x", Body=b"x")) == (
        "AccessDenied"
    )


def test_a_tampered_credential_is_refused(enforced: Stack) -> None:
    """A changed secret fails the signature; a changed or missing session token is refused."""
    creds = enforced.credentials("etl-writer")

    def put(**changed: str) -> None:
        enforced.s3({**creds, **changed}).put_object(Bucket=LAKE, Key="raw/t", Body=b"x")

    secret = creds["SecretAccessKey"]
    wrong_secret = secret[:-1] + ("A" if secret[-1] != "A" else "B")
    assert refusal(lambda: put(SecretAccessKey=wrong_secret)) == "SignatureDoesNotMatch"
    assert refusal(lambda: put(SessionToken=creds["SessionToken"][:-4] + "AAAA")) == (
        "InvalidToken"
    )
    unsigned_session = {k: v for k, v in creds.items() if k != "SessionToken"}
    assert refusal(
        lambda: enforced.s3(unsigned_session).put_object(Bucket=LAKE, Key="raw/t", Body=b"x")
    ) in ("InvalidAccessKeyId", "InvalidToken")
    assert refusal(lambda: put(AccessKeyId="ASIA" + "Z" * 16)) == "InvalidAccessKeyId"


def test_a_role_that_does_not_trust_the_broker_is_never_issued(enforced: Stack) -> None:
    """moto refuses the broker's AssumeRole on a role trusting someone else: a 503 naming the
    upstream's refusal, no credential, and an audit trail that says so."""
    status, body, _ = enforced.broker.exchange(enforced.issuer.mint("gitlab"), grant="foreign")
    assert (status, body["error"]) == (503, "temporarily_unavailable"), body
    assert "credentials" not in body
    events = enforced.events_for(body["request_id"])
    assert [e.outcome for e in events] == [Outcome.INTENT, Outcome.ERROR]
    assert events[-1].reason == "upstream_denied"
    assert events[-1].credential_ref in (None, "")


def test_a_broker_with_a_key_moto_never_issued_mints_nothing(
    enforced: Stack, tmp_path: Path
) -> None:
    """The broker's own AWS identity is checked: with a made-up key it is not ready and every
    AWS exchange fails as misconfigured."""
    config = policy_toml(
        issuer_url=enforced.issuer.url,
        audit_db=tmp_path / "audit.db",
        listen=f"127.0.0.1:{free_port()}",
        moto_url=enforced.moto.url,
        role_arn="arn:aws:iam::123456789012:role/luigi-lake-raw",
    )
    made_up = {
        "AWS_ACCESS_KEY_ID": "AKIA" + "Q" * 16,
        "AWS_SECRET_ACCESS_KEY": "made-up-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    broker = start_broker(tmp_path, config, env=made_up)
    try:
        assert broker.get("/readyz")[0] == 503
        status, body, _ = broker.exchange(enforced.issuer.mint("gitlab"))
        assert (status, body["error"]) == (503, "temporarily_unavailable"), body
        assert "credentials" not in body
    finally:
        broker.stop()
