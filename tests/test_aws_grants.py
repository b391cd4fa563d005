"""Deeper AWS grants, without a server: the config lint, the session policy rendered from
claims (and refused when a claim would widen it), exactly what AssumeRole is sent, and which
STS endpoint each grant's partition and region reach. On moto: test_aws_grants_moto.py."""

from __future__ import annotations

import json
import secrets
import xml.etree.ElementTree as ET
from typing import Any

import pytest
from test_config import ISSUERS, has, problems

from broker.__main__ import _sts_client_at
from broker.config import Problem
from broker.config_lint import parse_config
from broker.mint.aws import (
    AwsMinter,
    SessionPolicyRefused,
    StsLocation,
    plan_assume_role,
    render_session_policy,
)

CN_ROLE = "arn:aws-cn:iam::123456789012:role/etl"
GOV_ROLE = "arn:aws-us-gov:iam::123456789012:role/etl"


def aws_grant(body: str, role: str = "arn:aws:iam::123456789012:role/r") -> str:
    """Grant `g` of project 1 assuming `role`; `body` is the rest of its [grant.aws] table."""
    return f"""
[[grant]]
name = "g"
issuers = ["gitlab"]
[grant.match]
project_id = "1"
[grant.aws]
role_arn = "{role}"
{body}
"""


DEEP = aws_grant(
    """\
external_id = "luigi-creds-data-platform"
region = "eu-west-1"
sts_endpoint = "https://sts.eu-west-1.amazonaws.com"
session_tags = { project = "{project_path}", pipeline = "{pipeline_id}" }
transitive_tags = ["project"]
[grant.aws.session_policy]
Version = "2012-10-17"
[[grant.aws.session_policy.Statement]]
Effect = "Allow"
Action = ["s3:PutObject", "s3:GetObject"]
Resource = ["arn:aws:s3:::lake/{project_path}/*"]
""",
    role="arn:aws:iam::123456789012:role/lake-writer",
)

POLICY = "[grant.aws.session_policy]"
TAGS = 'session_tags = { project = "{project_path}" }'
CLAIMS = {"project_path": "data-platform/etl", "pipeline_id": "42", "project_id": "1"}


def test_a_deep_grant_loads_and_plans_every_sts_parameter() -> None:
    grant = parse_config(ISSUERS + DEEP).grant("g")
    assert grant is not None and grant.aws is not None
    plan = plan_assume_role("g", grant.aws, CLAIMS, request_id="rid", duration=900)
    params = plan.params()
    assert params["ExternalId"] == "luigi-creds-data-platform"
    assert params["TransitiveTagKeys"] == ["project"]
    assert {t["Key"]: t["Value"] for t in params["Tags"]} == {
        "project": "data-platform/etl",
        "pipeline": "42",
    }
    assert json.loads(params["Policy"]) == {
        "Statement": [
            {
                "Action": ["s3:PutObject", "s3:GetObject"],
                "Effect": "Allow",
                "Resource": ["arn:aws:s3:::lake/data-platform/etl/*"],
            }
        ],
        "Version": "2012-10-17",
    }
    assert plan.location == StsLocation("eu-west-1", "https://sts.eu-west-1.amazonaws.com", None)


@pytest.mark.parametrize(
    "value",
    ["", "*", "data/*", "a?b", "${aws:username}", 'x"}', "a b", None, ["data-platform"], "/abs"],
)
def test_a_claim_that_would_widen_the_session_policy_is_refused(value: Any) -> None:
    """An empty value turns lake/{p}/* into lake//*, a wildcard or policy variable widens it,
    a quote would break out of the string: each refuses the mint (fail closed)."""
    template = json.dumps({"Statement": [{"Resource": "arn:aws:s3:::lake/{project_path}/*"}]})
    claims = {} if value is None else {"project_path": value}
    with pytest.raises(SessionPolicyRefused) as info:
        render_session_policy(template, claims)
    assert info.value.reason == "session_policy_claim_unsafe" and not info.value.retryable


def test_a_rendered_policy_over_the_sts_limit_is_refused() -> None:
    template = json.dumps({"Statement": [{"Resource": "{project_path}"}]})
    with pytest.raises(SessionPolicyRefused) as info:
        render_session_policy(template, {"project_path": "a" * 2100})
    assert "characters" in info.value.detail


@pytest.mark.parametrize(
    ("body", "role", "where", "fragment"),
    [
        (f"{POLICY}\nVersion = \"2012-10-17\"", None, "session_policy", "Statement"),
        (f'{POLICY}\nStatement = [{{ Resource = "{{bad claim}}" }}]', None,
         "session_policy.Statement[0].Resource", "placeholders"),
        (f"transitive_tags = ['team']\n{TAGS}", None, "transitive_tags", "'team'"),
        ('external_id = "x"', None, "external_id", "2-1224"),
        ('external_id = "has space"', None, "external_id", "2-1224"),
        ("", CN_ROLE, "region", "required for a role in partition aws-cn"),
        ('region = "eu-west-1"', CN_ROLE, "region", "needs a cn-* region"),
        ('region = "cn-north-1"', None, "region", "outside cn- and us-gov-"),
        ('region = "us-gov-west-1"', CN_ROLE, "region", "cn-*"),
        ('region = "Europe"', None, "region", "region name"),
        ('partition = "aws-cn"\nregion = "cn-north-1"', None, "role_arn", "not 'aws-cn'"),
        ('partition = "aws-mars"', None, "partition", "aws-us-gov"),
        ('sts_endpoint = "http://sts.example.com"', None, "sts_endpoint", "https://"),
    ],
)  # fmt: skip
def test_lint_names_each_problem(body: str, role: str | None, where: str, fragment: str) -> None:
    found: list[Problem] = problems(aws_grant(body, role or "arn:aws:iam::123456789012:role/r"))
    assert has(found, f"grant[g].aws.{where}", fragment), found


def test_partitions_load_with_their_regions() -> None:
    for role, region in ((CN_ROLE, "cn-north-1"), (GOV_ROLE, "us-gov-west-1")):
        config = parse_config(ISSUERS + aws_grant(f'region = "{region}"', role))
        grant = config.grant("g")
        assert grant is not None and grant.aws is not None
        assert grant.aws.partition == role.split(":")[1]


class RecordingSts:
    """Stands in for the signed STS client (broker/mint/sts_http.py): records each call's
    Query parameters and answers with AssumeRole's XML shape."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls: list[dict[str, str]] = []

    def call(self, action: str, params: dict[str, str]) -> ET.Element:
        assert action == "AssumeRole"
        self.calls.append(params)
        key = f"ASIA{self.name.upper():0<16}"[:20]
        return ET.fromstring(  # noqa: S314 (our own literal, not untrusted input)
            "<AssumeRoleResult><Credentials>"
            f"<AccessKeyId>{key}</AccessKeyId><SecretAccessKey>s</SecretAccessKey>"
            "<SessionToken>t</SessionToken><Expiration>2030-01-01T00:00:00Z</Expiration>"
            "</Credentials></AssumeRoleResult>"
        )


def test_each_location_gets_its_own_client_built_once() -> None:
    default = RecordingSts("default")
    built: list[StsLocation] = []

    def client_for(location: StsLocation) -> RecordingSts:
        built.append(location)
        return RecordingSts("other")

    minter = AwsMinter(default, client_for)  # type: ignore[arg-type]
    grant = parse_config(ISSUERS + DEEP).grant("g")
    assert grant is not None and grant.aws is not None
    plan = plan_assume_role("g", grant.aws, CLAIMS, request_id="rid", duration=900)
    minter.assume_role(plan)
    minter.assume_role(plan)
    plain = parse_config(ISSUERS + aws_grant("")).grant("g")
    assert plain is not None and plain.aws is not None
    minter.assume_role(plan_assume_role("g", plain.aws, CLAIMS, request_id="r2", duration=900))
    assert built == [plan.location]
    assert len(default.calls) == 1 and "Policy" not in default.calls[0]


@pytest.mark.parametrize(
    ("region", "endpoint", "expected"),
    [
        ("cn-north-1", None, "https://sts.cn-north-1.amazonaws.com.cn"),
        ("us-gov-west-1", None, "https://sts.us-gov-west-1.amazonaws.com"),
        # Same partition as [upstream.aws]: its endpoint_url (a private endpoint) is kept.
        ("eu-west-1", None, "https://sts.internal.example"),
        ("eu-west-1", "https://sts.eu-west-1.amazonaws.com", "https://sts.eu-west-1.amazonaws.com"),
    ],
)
def test_sts_client_reaches_the_partition_of_the_grant(
    region: str, endpoint: str | None, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Any key lets boto3 build the client (nothing is sent); made here, never a literal.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA" + secrets.token_hex(8).upper())
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secrets.token_urlsafe(30))
    config = parse_config(
        ISSUERS
        + aws_grant("")
        + '\n[upstream.aws]\nregion = "us-east-1"\nendpoint_url = "https://sts.internal.example"\n'
    )
    client = _sts_client_at(config, StsLocation(region, endpoint, None))
    assert client.meta.endpoint_url == expected
    assert client.meta.region_name == region
