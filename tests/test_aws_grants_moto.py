"""Deeper AWS grants against moto with IAM enforced: ExternalId, a per-grant STS endpoint and
region, a session policy templated from the token's project path, transitive tags.

What moto enforces here: the role's trust policy principal and its `StringEquals` on
`sts:ExternalId` (a grant sending another ExternalId is refused by moto; one sending none is let
through by moto, where AWS refuses it), signatures, and the role's own permission policy. What
it does not: session policies (an inline Policy is accepted and then ignored, so a write
outside the project's prefix succeeds on moto where AWS refuses it), session tags and
transitive tag keys. For those the tests assert what the broker sent to STS:
the rendered policy and tags in the intent record, and AssumeRole's parameters in
test_aws_grants.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from botocore.exceptions import ClientError
from stack import Stack, start_upstreams

from broker.audit.events import Outcome
from broker.dev.aws import s3_objects
from broker.dev.claims import GITLAB_PROJECT_PATH
from broker.dev.policy_file import TomlValue, etl_project_grant, toml_table
from broker.dev.processes import free_port

pytestmark = pytest.mark.integration

EXTERNAL_ID = "luigi-creds-data-platform"


def deep_grant(name: str, role_arn: str, sts: str, *, external_id: str = EXTERNAL_ID) -> str:
    aws: dict[str, TomlValue] = {
        "role_arn": role_arn,
        "external_id": external_id,
        "region": "eu-west-1",
        "sts_endpoint": sts,
        "session_tags": {"project": "{project_path}", "pipeline": "{pipeline_id}"},
        "transitive_tags": ["project"],
    }
    statement: dict[str, TomlValue] = {
        "Effect": "Allow",
        "Action": ["s3:PutObject", "s3:GetObject"],
        "Resource": ["arn:aws:s3:::lake/{project_path}/*"],
    }
    return (
        etl_project_grant(name, ttl="15m", aws=aws)
        + toml_table("[grant.aws.session_policy]", {"Version": "2012-10-17"})
        + toml_table("[[grant.aws.session_policy.Statement]]", statement)
    )


@pytest.fixture(scope="module")
def deep(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("deep-aws")
    with start_upstreams(workdir) as up:
        role = up.moto.create_role("lake-writer", (s3_objects("lake"),), external_id=EXTERNAL_ID)
        up.moto.client("s3").create_bucket(Bucket="lake")
        up.moto.client("s3").create_bucket(Bucket="archive")
        # [upstream.aws] points nowhere: only a grant's own sts_endpoint reaches STS.
        stack = up.serve(
            workdir,
            moto_url=f"http://127.0.0.1:{free_port()}",
            role_arn=role,
            extra=deep_grant("project-lake", role, up.moto.url)
            + deep_grant("wrong-external-id", role, up.moto.url, external_id="another-team"),
        )
        try:
            yield stack
        finally:
            stack.broker.stop()


def test_session_policy_grant_writes_the_project_prefix(deep: Stack) -> None:
    """Through the grant's own endpoint, with the ExternalId the role demands: the credentials
    write the project's prefix; the role (moto-enforced) refuses another bucket; the intent
    record holds the session policy as sent, narrowed to the token's project path."""
    status, body, _ = deep.broker.exchange(deep.issuer.mint("gitlab"), "project-lake")
    assert status == 200, body
    creds = body["credentials"]
    s3 = deep.moto.client("s3", **creds)
    s3.put_object(Bucket="lake", Key=f"{GITLAB_PROJECT_PATH}/day.csv", Body=b"a\n")
    with pytest.raises(ClientError) as refused:
        s3.put_object(Bucket="archive", Key=f"{GITLAB_PROJECT_PATH}/day.csv", Body=b"a\n")
    assert refused.value.response["Error"]["Code"] == "AccessDenied"
    # NOTE: moto ignores session policies: this write outside the project's prefix succeeds
    # here, and AWS refuses it. What the broker sent is checked below instead.
    s3.put_object(Bucket="lake", Key="other-project/day.csv", Body=b"a\n")

    intent, issued = deep.events_for(body["request_id"])
    assert (intent.outcome, issued.outcome) == (Outcome.INTENT, Outcome.ISSUED)
    policy = json.loads(intent.detail["session_policy"])
    assert policy["Statement"][0]["Resource"] == [f"arn:aws:s3:::lake/{GITLAB_PROJECT_PATH}/*"]
    assert intent.detail["transitive_tags"] == ["project"]
    assert intent.detail["sts"] == deep.moto.url
    assert EXTERNAL_ID not in json.dumps(dict(intent.detail))


def test_a_grant_with_another_external_id_is_refused_by_sts(deep: Stack) -> None:
    """moto enforces the trust policy's sts:ExternalId: a grant sending another value gets
    nothing. (moto lets a call with no ExternalId through, where AWS refuses it.)"""
    status, body, _ = deep.broker.exchange(deep.issuer.mint("gitlab"), "wrong-external-id")
    assert status == 503 and body["error_description"] != "", body
    records = deep.events_for(body["request_id"])
    assert records[-1].outcome == Outcome.ERROR
    assert records[-1].reason == "upstream_denied"
    assert not [r for r in records if r.outcome == Outcome.ISSUED]


@pytest.mark.parametrize("project_path", ["*", "", "${aws:username}"])
def test_a_claim_that_would_widen_the_policy_mints_nothing(deep: Stack, project_path: str) -> None:
    """A token whose project_path would widen lake/{project_path}/* is refused before STS."""
    token = deep.issuer.mint("gitlab", project_path=project_path)
    status, body, _ = deep.broker.exchange(token, "project-lake")
    assert status == 503, body
    records = deep.events_for(body["request_id"])
    assert [r.reason for r in records] == ["session_policy_claim_unsafe"]
    assert not [r for r in records if r.outcome in (Outcome.INTENT, Outcome.ISSUED)]
