"""deploy/aws: the IAM policies pass the grammar check, and their trust conditions admit the
example identities' AssumeRole requests and refuse near misses."""

from __future__ import annotations

import datetime as dt
import fnmatch
import re
import warnings
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import pytest
from moto.iam.policy_validation import IAMPolicyDocumentValidator, IAMTrustPolicyDocumentValidator

from broker.config import Config
from broker.config_lint import load_config
from broker.dev.claims import preset_claims
from broker.mint.aws import AssumeRolePlan, plan_assume_role
from broker.policy import Policy

with warnings.catch_warnings():
    # Luigi warns on import unless a luigi.cfg sets [core] autoload_range (ours do; the test
    # process has none), and pytest turns warnings into errors.
    warnings.simplefilter("ignore", DeprecationWarning)


from deploy_files import (
    DEPLOY,
    SYSTEMD,
    aws_json,
    configmap_policy,
    grant,
    k8s_objects,
)


def test_aws_policies_pass_the_iam_grammar_check() -> None:
    """The permission and trust policies pass moto's IAM policy grammar validators."""
    IAMPolicyDocumentValidator(
        (DEPLOY / "aws" / "broker-role-policy.json").read_text(encoding="utf-8")
    ).validate()
    for name in ("target-role-trust-policy.json", "broker-role-trust-policy-eks.json"):
        IAMTrustPolicyDocumentValidator(
            (DEPLOY / "aws" / name).read_text(encoding="utf-8")
        ).validate()


def test_target_role_trusts_only_the_broker_with_tags_and_source_identity() -> None:
    """The target role trusts the broker's role for AssumeRole, TagSession, SetSourceIdentity."""
    [statement] = aws_json("target-role-trust-policy.json")["Statement"]
    assert statement["Effect"] == "Allow"
    broker_role = statement["Principal"]["AWS"]
    assert re.fullmatch(r"arn:aws:iam::\d{12}:role/luigi-creds-broker", broker_role)
    assert set(statement["Action"]) == {
        "sts:AssumeRole",
        "sts:TagSession",
        "sts:SetSourceIdentity",
    }
    condition = statement["Condition"]
    assert condition["Null"]["sts:SourceIdentity"] == "false"
    assert condition["Null"]["aws:RequestTag/project"] == "false"
    assert "aws:RequestTag/project" in condition["StringLike"]


def test_every_grant_on_the_target_role_satisfies_its_trust_conditions() -> None:
    """Grants on luigi-etl-writer send exactly the tag keys and the source identity it demands."""
    [statement] = aws_json("target-role-trust-policy.json")["Statement"]
    tag_keys = set(statement["Condition"]["ForAllValues:StringEquals"]["aws:TagKeys"])
    required = {
        key.split("/", 1)[1]
        for key, value in statement["Condition"]["Null"].items()
        if key.startswith("aws:RequestTag/") and value == "false"
    }
    checked = 0
    for config in (load_config(SYSTEMD / "broker.toml"), configmap_policy()):
        for g in config.grants:
            if g.aws is None or not g.aws.role_arn.endswith(":role/luigi-etl-writer"):
                continue
            checked += 1
            assert set(g.aws.session_tags) <= tag_keys, g.name
            assert required <= set(g.aws.session_tags), g.name
            assert g.aws.source_identity, g.name
    assert checked >= 4


def trust_allows(statement: Mapping[str, Any], plan: AssumeRolePlan) -> bool:
    """Evaluate the trust statement's conditions on one AssumeRole request, as IAM would.

    Only the operators our trust policy uses are known; any other fails the test rather than
    being skipped, so this evaluator cannot silently allow.
    """
    context: dict[str, list[str]] = {f"aws:RequestTag/{k}": [v] for k, v in plan.tags}
    context["aws:TagKeys"] = [k for k, _ in plan.tags]
    if plan.source_identity is not None:
        context["sts:SourceIdentity"] = [plan.source_identity]
    for operator, checks in statement["Condition"].items():
        for key, wanted in checks.items():
            allowed = wanted if isinstance(wanted, list) else [wanted]
            values = context.get(key)
            if operator == "Null":
                ok = (values is None) == (wanted == "true")
            elif operator == "StringLike":
                ok = values is not None and any(
                    fnmatch.fnmatchcase(v, a) for v in values for a in allowed
                )
            elif operator == "ForAllValues:StringEquals":
                ok = all(v in allowed for v in values or [])
            else:
                raise AssertionError(f"trust_allows does not know {operator}")
            if not ok:
                return False
    return True


def k8s_claims(sub: str) -> dict[str, Any]:
    return {"iss": "https://oidc.eks.example", "aud": "luigi-creds", "sub": sub}


NOW = dt.datetime(2026, 11, 22, 2, 0, tzinfo=dt.UTC)

# The identities the CI and worker examples present: (policy, issuer, grant, claims).
EXAMPLES: list[tuple[str, str, str, dict[str, Any]]] = [
    (
        "systemd",
        "gitlab",
        "etl-writer",
        preset_claims(
            "gitlab",
            issuer="https://gitlab.example.com",
            audience="https://luigi-creds.example.com",
            now=NOW,
            overrides={"project_id": "4211", "project_path": "data/warehouse"},
        ),
    ),
    (
        "systemd",
        "github",
        "gh-etl-writer",
        preset_claims(
            "github",
            issuer="https://token.actions.githubusercontent.com",
            audience="https://luigi-creds.example.com",
            now=NOW,
            overrides={
                "repository": "acme/etl",
                "repository_id": "892341765",
                "repository_owner_id": "14101776",
            },
        ),
    ),
    (
        "systemd",
        "bitbucket",
        "bb-etl-writer",
        preset_claims(
            "bitbucket",
            issuer="https://api.bitbucket.org/2.0/workspaces/acme/pipelines-config/identity/oidc",
            audience="ari:cloud:bitbucket::workspace/00000000-0000-4000-8000-000000000001",
            now=NOW,
            overrides={
                "repositoryUuid": "{7d1f1c36-6d0a-4f5e-9d8a-2b3c4d5e6f70}",
                "deploymentEnvironmentUuid": "{a1b2c3d4-0000-4000-8000-000000000abc}",
            },
        ),
    ),
    (
        "kubernetes",
        "kubernetes",
        "etl-writer",
        k8s_claims("system:serviceaccount:luigi:etl-worker"),
    ),
]

# One claim changed so the same identity must be refused: (example index, claim, value).
NEAR_MISSES = [
    (0, "ref_protected", "false"),
    (0, "project_id", "4212"),
    (1, "ref", "refs/heads/feature/x"),
    (2, "deploymentEnvironmentUuid", "{a1b2c3d4-0000-4000-8000-000000000abd}"),
    (3, "sub", "system:serviceaccount:luigi:other"),
]


def example_policy(name: str) -> Config:
    return load_config(SYSTEMD / "broker.toml") if name == "systemd" else configmap_policy()


@pytest.mark.parametrize(("source", "issuer", "grant_name", "claims"), EXAMPLES)
def test_example_identities_get_their_grant_and_the_target_role_trusts_the_request(
    source: str, issuer: str, grant_name: str, claims: dict[str, Any]
) -> None:
    """Each example pipeline's identity is allowed its grant, and the AssumeRole request the
    broker would send meets the target role's trust conditions."""
    config = example_policy(source)
    decision = Policy.compile(config).evaluate(grant_name, issuer, claims)
    assert decision.allowed, decision.reason
    aws = grant(config, grant_name).aws
    assert aws is not None and aws.role_arn.endswith(":role/luigi-etl-writer")
    plan = plan_assume_role(grant_name, aws, claims, request_id="req-1", duration=900)
    [statement] = aws_json("target-role-trust-policy.json")["Statement"]
    assert trust_allows(statement, plan), plan


@pytest.mark.parametrize(("index", "claim", "value"), NEAR_MISSES)
def test_one_changed_claim_denies_the_example_identity(index: int, claim: str, value: str) -> None:
    """Changing one bound claim of an example identity (branch, project, environment, account)
    makes the policy deny it."""
    source, issuer, grant_name, claims = EXAMPLES[index]
    decision = Policy.compile(example_policy(source)).evaluate(
        grant_name, issuer, {**claims, claim: value}
    )
    assert not decision.allowed


def test_target_role_refuses_requests_from_other_projects_or_without_identity() -> None:
    """The trust conditions refuse a foreign project tag, an extra tag or no source identity."""
    [statement] = aws_json("target-role-trust-policy.json")["Statement"]
    good = AssumeRolePlan(
        role_arn="arn:aws:iam::123456789012:role/luigi-etl-writer",
        role_session_name="etl-1",
        duration_seconds=900,
        source_identity="alice",
        tags=(("project", "data/warehouse"), ("pipeline", "1")),
    )
    assert trust_allows(statement, good)
    for bad in (
        replace(good, tags=(("project", "evil/repo"), ("pipeline", "1"))),
        replace(good, tags=(*good.tags, ("team", "x"))),
        replace(good, tags=(("project", "data/warehouse"),)),
        replace(good, source_identity=None),
    ):
        assert not trust_allows(statement, bad), bad


def test_broker_role_may_assume_every_role_the_policies_name() -> None:
    """The broker role's policy allows assuming each role_arn in the deployed policies."""
    statements = aws_json("broker-role-policy.json")["Statement"]
    [allow] = [s for s in statements if s["Effect"] == "Allow"]
    assert {"sts:AssumeRole", "sts:TagSession", "sts:SetSourceIdentity"} == set(allow["Action"])
    assert allow["Condition"]["StringEquals"]["aws:ResourceTag/luigi-creds-target"] == "true"
    [deny] = [s for s in statements if s["Effect"] == "Deny"]
    assert deny["Condition"]["Null"]["aws:RequestTag/project"] == "true"
    for config in (load_config(SYSTEMD / "broker.toml"), configmap_policy()):
        for g in config.grants:
            if g.aws is not None:
                assert fnmatch.fnmatchcase(g.aws.role_arn, allow["Resource"]), g.name


def test_broker_role_trusts_only_its_kubernetes_service_account() -> None:
    """The broker role's EKS trust names the broker's namespace and service account."""
    [statement] = aws_json("broker-role-trust-policy-eks.json")["Statement"]
    assert statement["Action"] == "sts:AssumeRoleWithWebIdentity"
    conditions = statement["Condition"]["StringEquals"]
    account = k8s_objects()["ServiceAccount"]["metadata"]
    subject = f"system:serviceaccount:{account['namespace']}:{account['name']}"
    assert subject in conditions.values() and "sts.amazonaws.com" in conditions.values()
    role = aws_json("target-role-trust-policy.json")["Statement"][0]["Principal"]["AWS"]
    assert account["annotations"]["eks.amazonaws.com/role-arn"] == role
