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

import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from broker.audit import open_store
from broker.audit.events import AuditEvent, Outcome
from broker.dev.aws import Allow, s3_objects
from broker.dev.harness import (
    Broker,
    DevIssuer,
    Moto,
    policy_toml,
    start_broker,
    start_dev_issuer,
    start_moto,
)
from broker.dev.processes import free_port

pytestmark = pytest.mark.integration

LAKE = "lake"
ARCHIVE = "archive"


def aws_grant(name: str, role_arn: str) -> str:
    """A grant like the default `etl-writer`, on another role."""
    return textwrap.dedent(
        f"""
        [[grant]]
        name = "{name}"
        issuers = ["gitlab"]
        ttl = "15m"
        [grant.match]
        project_id = "55235664"
        [grant.aws]
        role_arn = "{role_arn}"
        """
    )


@dataclass
class Enforced:
    issuer: DevIssuer
    moto: Moto
    broker: Broker
    audit_db: Path

    def mint(self, grant: str) -> dict[str, Any]:
        status, body, _ = self.broker.exchange(self.issuer.mint("gitlab"), grant=grant)
        assert status == 200, body
        creds: dict[str, Any] = body["credentials"]
        return creds

    def s3(self, creds: dict[str, Any]) -> Any:
        return self.moto.client("s3", **creds)

    def events_for(self, request_id: str) -> list[AuditEvent]:
        store = open_store(f"sqlite:///{self.audit_db}")
        try:
            return [e for e in store.events() if e.request_id == request_id]
        finally:
            store.close()


@pytest.fixture(scope="module")
def enforced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Enforced]:
    """Issuer, auth-enforcing moto with two scoped roles and an untrusting one, and a broker."""
    workdir = tmp_path_factory.mktemp("enforced")
    issuer = start_dev_issuer(workdir)
    moto = start_moto(workdir)
    try:
        for bucket in (LAKE, ARCHIVE):
            moto.client("s3").create_bucket(Bucket=bucket)
        # etl-writer (the policy's default grant) may write raw/ in the lake only.
        lake_role = moto.create_role("luigi-lake-raw", [s3_objects(LAKE, "raw/")])
        archive_role = moto.create_role(
            "luigi-archive",
            [s3_objects(ARCHIVE), Allow(("s3:ListBucket",), (f"arn:aws:s3:::{ARCHIVE}",))],
        )
        # A role that trusts someone else: the broker's AssumeRole must be refused by moto.
        foreign_role = moto.create_role(
            "luigi-foreign",
            [s3_objects(LAKE)],
            trusted="arn:aws:iam::123456789012:user/someone-else",
        )
        audit_db = workdir / "audit.db"
        config = policy_toml(
            issuer_url=issuer.url,
            audit_db=audit_db,
            listen=f"127.0.0.1:{free_port()}",
            moto_url=moto.url,
            role_arn=lake_role,
            extra=aws_grant("archive-writer", archive_role) + aws_grant("foreign", foreign_role),
        )
        broker = start_broker(workdir / "broker", config, env=moto.broker_env)
        try:
            yield Enforced(issuer, moto, broker, audit_db)
        finally:
            broker.stop()
    finally:
        moto.stop()
        issuer.stop()


def refusal(call: Any) -> str:
    """The AWS error code moto answers `call()` with; fails the test if moto allows it."""
    with pytest.raises(ClientError) as caught:
        call()
    return str(caught.value.response["Error"]["Code"])


def test_minted_credential_may_do_what_its_role_allows(enforced: Enforced) -> None:
    """etl-writer's credential writes and reads under raw/ in its bucket, and lives at most the
    grant's 15 minutes (moto sets Expiration from the DurationSeconds the broker asked for)."""
    creds = enforced.mint("etl-writer")
    lifetime = datetime.fromisoformat(creds["Expiration"]) - datetime.now(UTC)
    assert timedelta(0) < lifetime <= timedelta(minutes=15)
    s3 = enforced.s3(creds)
    s3.put_object(Bucket=LAKE, Key="raw/day.csv", Body=b"a,b\n1,2\n")
    assert s3.get_object(Bucket=LAKE, Key="raw/day.csv")["Body"].read() == b"a,b\n1,2\n"
    s3.delete_object(Bucket=LAKE, Key="raw/day.csv")


def test_minted_credential_is_refused_what_its_role_does_not_allow(enforced: Enforced) -> None:
    """Outside raw/, other S3 actions, IAM and role chaining are refused by moto."""
    creds = enforced.mint("etl-writer")
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
    enforced: Enforced,
) -> None:
    """The lake grant's key cannot touch the archive, and the archive grant's not the lake."""
    lake = enforced.s3(enforced.mint("etl-writer"))
    archive = enforced.s3(enforced.mint("archive-writer"))
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


def test_a_tampered_credential_is_refused(enforced: Enforced) -> None:
    """A changed secret fails the signature; a changed or missing session token is refused."""
    creds = enforced.mint("etl-writer")

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


def test_a_role_that_does_not_trust_the_broker_is_never_issued(enforced: Enforced) -> None:
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
    enforced: Enforced, tmp_path: Path
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
