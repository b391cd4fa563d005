"""Claim policy against realistic GitLab, GitHub, Bitbucket and Okta claim sets.

Covers type confusion, wildcards, Unicode, name resurrection and missing claims.

The fixtures in tests/fixtures/claims/ follow each provider's documented claim table. For
github_immutable.json we use the immutable-ID `sub` form from GitHub's changelog of 2026-04-23
("Immutable subject claims for GitHub Actions OIDC tokens"): owner and repository names each
followed by "-<numeric id>", e.g. `repo:octocat-123456/my-repo-456789:ref:refs/heads/main`.
NOTE: a later, unmerged github/docs pull request (#45221) describes an "@" delimiter instead
(`repo:octocat@123456/...`); policies should bind `repository_id`/`repository_owner_id`, which
are stable whichever `sub` form a repository uses.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from broker.config import AwsGrant, BrokerSettings, Config, GrantConfig, IssuerConfig
from broker.config_lint import load_config, parse_config
from broker.dev import policy_file
from broker.policy import ClaimCheck, Decision, Policy, display

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "claims"
DROP = object()  # marks a claim removed from the fixture
BROKER_AUDIENCE = "https://broker.example.com"


def role(name: str) -> dict[str, policy_file.TomlValue]:
    """A [grant.aws] target: the role named like its grant."""
    return {"role_arn": f"arn:aws:iam::123456789012:role/{name}"}


# Issuers and grants examples/broker.toml does not have: Okta people, GitHub bound by `sub` or
# by owner glob, GitLab by project path.
EXTRA_POLICY = "\n".join(
    (
        policy_file.issuer("okta", "https://acme.okta.com/oauth2/default", ["api://luigi-creds"]),
        policy_file.grant(
            "okta-people",
            {"groups": ["data-engineering", "data-platform"], "scp": "warehouse.write"},
            issuers=["okta"],
            aws=role("okta-people"),
        ),
        policy_file.issuer(
            "github", "https://token.actions.githubusercontent.com", [BROKER_AUDIENCE]
        ),
        policy_file.issuer("gitlab", "https://gitlab.com", [BROKER_AUDIENCE]),
        policy_file.grant(
            "gh-sub",
            {
                "sub": [
                    "repo:acme/etl:ref:refs/heads/main",
                    "repo:acme-14101776/etl-892341765:ref:refs/tags/*",
                ]
            },
            issuers=["github"],
            aws=role("gh-sub"),
        ),
        policy_file.grant(
            "gh-org",
            {"repository": "acme/*", "repository_owner_id": "14101776"},
            issuers=["github"],
            aws=role("gh-org"),
        ),
        policy_file.grant(
            "gl-path",
            {"project_path": "data/platform/etl", "ref": "main"},
            issuers=["gitlab"],
            aws=role("gl-path"),
        ),
    )
)


def claims(provider: str, **changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / f"{provider}.json").read_text("utf-8"))
    for key, value in changes.items():
        if value is DROP:
            del data[key]
        else:
            data[key] = value
    return data


@pytest.fixture(scope="module")
def policy() -> Policy:
    return Policy.compile(load_config(ROOT / "examples" / "broker.toml"))


@pytest.fixture(scope="module")
def extra() -> Policy:
    return Policy.compile(parse_config(EXTRA_POLICY))


# (provider fixture, issuer name, grant, claim changes, expected reason)
EXAMPLE_ROWS: list[tuple[str, str, str, dict[str, Any], str]] = [
    # GitLab: the happy path and its typed variants
    ("gitlab", "gitlab", "etl-writer", {}, "allowed"),
    ("gitlab", "gitlab", "etl-writer", {"ref": "release/1.4"}, "allowed"),
    ("gitlab", "gitlab", "etl-writer", {"ref_protected": True}, "allowed"),
    ("gitlab", "gitlab", "etl-writer", {"pipeline_source": "schedule"}, "allowed"),
    ("gitlab", "gitlab", "etl-vault", {}, "allowed"),
    # type confusion
    ("gitlab", "gitlab", "etl-writer", {"project_id": 55235664}, "claim_type"),
    ("gitlab", "gitlab", "etl-writer", {"project_id": None}, "claim_type"),
    ("gitlab", "gitlab", "etl-writer", {"project_id": 55235664.0}, "claim_type"),
    ("gitlab", "gitlab", "etl-writer", {"project_id": {"id": "55235664"}}, "claim_type"),
    ("gitlab", "gitlab", "etl-writer", {"project_id": ["55235664"]}, "allowed"),
    ("gitlab", "gitlab", "etl-writer", {"ref_protected": False}, "claim_mismatch"),
    ("gitlab", "gitlab", "etl-writer", {"ref_protected": "True"}, "claim_mismatch"),
    ("gitlab", "gitlab", "etl-writer", {"ref_protected": 1}, "claim_type"),
    # wildcard abuse: globs are anchored and `*` stops at `/`
    ("gitlab", "gitlab", "etl-writer", {"ref": "main-hack"}, "claim_mismatch"),
    ("gitlab", "gitlab", "etl-writer", {"ref": "xmain"}, "claim_mismatch"),
    ("gitlab", "gitlab", "etl-writer", {"ref": "release/1.4/../../main"}, "claim_mismatch"),
    ("gitlab", "gitlab", "etl-writer", {"ref": "release/"}, "allowed"),
    ("gitlab", "gitlab", "etl-writer", {"ref": "release"}, "claim_mismatch"),
    ("gitlab", "gitlab", "etl-vault", {"namespace_path": "data/platform/sub"}, "claim_mismatch"),
    ("gitlab", "gitlab", "etl-vault", {"namespace_path": "data-evil/platform"}, "claim_mismatch"),
    # Unicode: lookalikes don't match, control/format/non-NFC are unsafe
    ("gitlab", "gitlab", "etl-writer", {"ref": "ｍａｉｎ"}, "claim_mismatch"),
    ("gitlab", "gitlab", "etl-writer", {"ref": "mаin"}, "claim_mismatch"),
    ("gitlab", "gitlab", "etl-writer", {"ref": "Main"}, "claim_mismatch"),
    ("gitlab", "gitlab", "etl-writer", {"ref": "ma\u200bin"}, "claim_unsafe"),
    ("gitlab", "gitlab", "etl-writer", {"ref": "main\u0000"}, "claim_unsafe"),
    ("gitlab", "gitlab", "etl-writer", {"ref": "main\n"}, "claim_unsafe"),
    ("gitlab", "gitlab", "etl-writer", {"ref": "release/cafe\u0301"}, "claim_unsafe"),
    ("gitlab", "gitlab", "etl-writer", {"ref": "release/caf\u00e9"}, "allowed"),
    ("gitlab", "gitlab", "etl-vault", {"namespace_path": "data/\u202eplatform"}, "claim_unsafe"),
    # name resurrection and forks
    ("gitlab", "gitlab", "etl-writer", {"project_id": "55235665"}, "claim_mismatch"),
    (
        "gitlab",
        "gitlab",
        "etl-writer",
        {"pipeline_source": "merge_request_event"},
        "claim_mismatch",
    ),
    # missing claims fail closed
    ("gitlab", "gitlab", "etl-writer", {"ref_protected": DROP}, "claim_missing"),
    ("gitlab", "gitlab", "etl-writer", {"project_id": DROP}, "claim_missing"),
    # grant and issuer checks
    ("gitlab", "github", "etl-writer", {}, "issuer_not_allowed"),
    ("gitlab", "gitlab", "no-such-grant", {}, "unknown_grant"),
    # GitHub
    ("github_immutable", "github", "gh-release", {}, "allowed"),
    ("github", "github", "gh-release", {}, "claim_mismatch"),
    (
        "github_immutable",
        "github",
        "gh-release",
        {"ref": "refs/tags/v1.2.3-evil"},
        "claim_mismatch",
    ),
    ("github_immutable", "github", "gh-release", {"ref": "refs/tags/v1.2"}, "claim_mismatch"),
    ("github_immutable", "github", "gh-release", {"ref": "refs/tags/v1.2.3\n"}, "claim_unsafe"),
    ("github_immutable", "github", "gh-release", {"repository_id": "100000001"}, "claim_mismatch"),
    ("github_immutable", "github", "gh-release", {"repository_id": 892341765}, "claim_type"),
    ("github_immutable", "github", "gh-release", {"environment": DROP}, "claim_missing"),
    ("github_immutable", "github", "gh-release", {"environment": "Production"}, "claim_mismatch"),
    ("github", "github", "gh-staging-read", {"ref": "refs/heads/feature/x"}, "allowed"),
    ("github", "github", "gh-staging-read", {"ref": "refs/heads/feature/x/y"}, "allowed"),
    ("github", "github", "gh-staging-read", {"ref": "refs/heads/feature"}, "claim_mismatch"),
    ("github", "github", "gh-staging-read", {"ref": "refs/heads/featurex/y"}, "claim_mismatch"),
    ("github", "github", "gh-staging-read", {}, "claim_mismatch"),
    ("github", "gitlab", "gh-staging-read", {}, "issuer_not_allowed"),
    # Bitbucket: braced UUIDs compared byte for byte
    ("bitbucket", "bitbucket", "bb-deploy", {}, "allowed"),
    (
        "bitbucket",
        "bitbucket",
        "bb-deploy",
        {"repositoryUuid": "{7D1F1C36-6D0A-4F5E-9D8A-2B3C4D5E6F70}"},
        "claim_mismatch",
    ),
    (
        "bitbucket",
        "bitbucket",
        "bb-deploy",
        {"repositoryUuid": "7d1f1c36-6d0a-4f5e-9d8a-2b3c4d5e6f70"},
        "claim_mismatch",
    ),
    ("bitbucket", "bitbucket", "bb-deploy", {"deploymentEnvironmentUuid": DROP}, "claim_missing"),
    # Okta service app (client credentials): `sub` and `cid` are the client id, `scp` a list
    ("okta_service", "okta", "warehouse-load", {}, "allowed"),
    ("okta_service", "okta", "warehouse-load", {"scp": ["openid", "warehouse.write"]}, "allowed"),
    ("okta_service", "okta", "warehouse-load", {"scp": "warehouse.write"}, "claim_type"),
    ("okta_service", "okta", "warehouse-load", {"scp": ["warehouse.read"]}, "claim_mismatch"),
    ("okta_service", "okta", "warehouse-load", {"scp": DROP}, "claim_missing"),
    (
        "okta_service",
        "okta",
        "warehouse-load",
        {"sub": "0oa8f2otherapp000", "cid": "0oa8f2otherapp000"},
        "claim_mismatch",
    ),
    # a person's token from an app with that client id: `sub` is the person, not the app
    ("okta", "okta", "warehouse-load", {"cid": "0oa8f2luigiworker697"}, "claim_mismatch"),
    ("okta_service", "github", "warehouse-load", {}, "issuer_not_allowed"),
    ("okta_service", "airgap", "warehouse-load", {}, "issuer_not_allowed"),
]


def assert_decides(
    policy: Policy, provider: str, issuer: str, grant: str, changes: dict[str, Any], reason: str
) -> None:
    """`provider`'s claims with `changes`, from `issuer`, asking for `grant`: `reason`, allowed
    exactly when that is "allowed", and the decision names the grant asked for."""
    decision = policy.evaluate(grant, issuer, claims(provider, **changes))
    assert decision.reason == reason
    assert decision.allowed is (reason == "allowed")
    assert decision.grant == grant


@pytest.mark.parametrize(("provider", "issuer", "grant", "changes", "reason"), EXAMPLE_ROWS)
def test_example_policy_table(
    policy: Policy,
    provider: str,
    issuer: str,
    grant: str,
    changes: dict[str, Any],
    reason: str,
) -> None:
    """The sample policy allows and denies each provider's claim variants with the stated reason."""
    assert_decides(policy, provider, issuer, grant, changes, reason)


EXTRA_ROWS: list[tuple[str, str, str, dict[str, Any], str]] = [
    ("github", "github", "gh-sub", {}, "allowed"),
    ("github_immutable", "github", "gh-sub", {}, "allowed"),
    # wildcard abuse: `repo:org/app` bound exactly, so `app-evil` and `main-hack` do not match
    (
        "github",
        "github",
        "gh-sub",
        {"sub": "repo:acme/etl-evil:ref:refs/heads/main"},
        "claim_mismatch",
    ),
    (
        "github",
        "github",
        "gh-sub",
        {"sub": "repo:acme/etl:ref:refs/heads/main-hack"},
        "claim_mismatch",
    ),
    (
        "github",
        "github",
        "gh-sub",
        {"sub": "repo:acme/etl:ref:refs/heads/main/x"},
        "claim_mismatch",
    ),
    (
        "github_immutable",
        "github",
        "gh-sub",
        {"sub": "repo:acme-14101776/etl-892341765:ref:refs/tags/v1/evil"},
        "claim_mismatch",
    ),
    # name resurrection: a recycled owner name carries another immutable owner id
    (
        "github_immutable",
        "github",
        "gh-sub",
        {"sub": "repo:acme-66600666/etl-892341765:ref:refs/tags/v1.2.3"},
        "claim_mismatch",
    ),
    ("github", "github", "gh-org", {}, "allowed"),
    ("github", "github", "gh-org", {"repository": "acme/other"}, "allowed"),
    ("github", "github", "gh-org", {"repository": "acme-evil/etl"}, "claim_mismatch"),
    ("github", "github", "gh-org", {"repository": "acme/etl/x"}, "claim_mismatch"),
    ("github", "github", "gh-org", {"repository_owner_id": "99"}, "claim_mismatch"),
    ("gitlab", "gitlab", "gl-path", {}, "allowed"),
    ("gitlab", "gitlab", "gl-path", {"project_path": "data/platform/etl\u202e"}, "claim_unsafe"),
    ("gitlab", "gitlab", "gl-path", {"project_path": "data/platform/etl-evil"}, "claim_mismatch"),
    # Okta people (a user's access token with a groups claim): list claims match when any
    # element matches
    ("okta", "okta", "okta-people", {}, "allowed"),
    ("okta", "okta", "okta-people", {"groups": ["data-platform"]}, "allowed"),
    ("okta", "okta", "okta-people", {"groups": "data-engineering"}, "claim_type"),
    ("okta", "okta", "okta-people", {"groups": ["data-engineering", 5]}, "claim_type"),
    ("okta", "okta", "okta-people", {"groups": [["data-engineering"]]}, "claim_type"),
    ("okta", "okta", "okta-people", {"groups": []}, "claim_mismatch"),
    ("okta", "okta", "okta-people", {"groups": ["Data-Engineering"]}, "claim_mismatch"),
    ("okta", "okta", "okta-people", {"groups": ["data-engineering "]}, "claim_mismatch"),
    ("okta", "okta", "okta-people", {"groups": ["Everyone", "x\u200b"]}, "claim_unsafe"),
    ("okta", "okta", "okta-people", {"groups": DROP}, "claim_missing"),
    ("okta", "okta", "okta-people", {"scp": "warehouse.write"}, "claim_type"),
    ("okta", "okta", "okta-people", {"scp": ["openid"]}, "claim_mismatch"),
]


@pytest.mark.parametrize(("provider", "issuer", "grant", "changes", "reason"), EXTRA_ROWS)
def test_sub_and_glob_table(
    extra: Policy,
    provider: str,
    issuer: str,
    grant: str,
    changes: dict[str, Any],
    reason: str,
) -> None:
    """Anchored, segment-aware globs bind `sub`, `repository` and `project_path` exactly."""
    assert_decides(extra, provider, issuer, grant, changes, reason)


def test_trace_covers_every_claim_after_a_failure(policy: Policy) -> None:
    """Every claim of the grant appears in the trace, and the reason is the first failure's."""
    decision = policy.evaluate(
        "etl-writer", "gitlab", claims("gitlab", project_id=7, ref_protected=DROP, ref="dev")
    )
    assert [c.claim for c in decision.trace] == [
        "project_id",
        "ref_protected",
        "pipeline_source",
        "ref",
    ]
    assert [c.ok for c in decision.trace] == [False, False, True, False]
    assert decision.reason == "claim_type"
    assert decision.trace[1] == ClaimCheck(
        "ref_protected", "'true'", "<missing>", False, "claim is missing from the token"
    )
    assert decision.trace[3].expected == "'main' | 'release/*'"


def test_claims_read_are_exactly_the_matched_claims(policy: Policy) -> None:
    """The decision records only the claims its grant reads, never the rest of the token."""
    decision = policy.evaluate("etl-writer", "gitlab", claims("gitlab"))
    assert dict(decision.claims_read) == {
        "project_id": "55235664",
        "ref_protected": "true",
        "pipeline_source": "push",
        "ref": "main",
    }
    okta = policy.evaluate("warehouse-load", "okta", claims("okta_service"))
    assert okta.claims_read["scp"] == ("warehouse.write",)
    assert set(okta.claims_read) == {"sub", "cid", "scp"}


def test_denials_before_claims_read_nothing(policy: Policy) -> None:
    """Unknown grants and disallowed issuers read no claims and have an empty trace."""
    for decision in (
        policy.evaluate("nope", "gitlab", claims("gitlab")),
        policy.evaluate("etl-writer", "okta", claims("gitlab")),
    ):
        assert not decision.allowed
        assert decision.trace == ()
        assert dict(decision.claims_read) == {}


def test_regex_is_applied_with_fullmatch(policy: Policy) -> None:
    """A regex pattern must match the whole value, not a prefix."""
    good = policy.evaluate("gh-release", "github", claims("github_immutable"))
    prefix = policy.evaluate(
        "gh-release", "github", claims("github_immutable", ref="refs/tags/v1.2.3x")
    )
    assert good.allowed
    assert prefix.reason == "claim_mismatch"


def _config(match: Mapping[str, Any]) -> Config:
    return Config(
        broker=BrokerSettings(),
        issuers=(IssuerConfig(name="gitlab", url="https://gitlab.com", audiences=("a",)),),
        grants=(
            GrantConfig(
                name="g",
                issuers=("gitlab",),
                match=match,
                aws=AwsGrant(role_arn="arn:aws:iam::123456789012:role/r"),
            ),
        ),
    )


def test_empty_match_table_denies() -> None:
    """A grant with no match claims denies every token (the vacuous case)."""
    decision = Policy.compile(_config({})).evaluate("g", "gitlab", claims("gitlab"))
    assert (decision.allowed, decision.reason) == (False, "empty_match")


def test_empty_any_of_denies() -> None:
    """An empty any-of list accepts no value, even for a present claim."""
    decision = Policy.compile(_config({"project_id": ()})).evaluate("g", "gitlab", claims("gitlab"))
    assert (decision.allowed, decision.reason) == (False, "claim_mismatch")


def test_weird_values_never_raise_and_display_short() -> None:
    """Hostile claim values produce a bounded, escaped display and a denial, never an error."""

    class Hostile:
        def __repr__(self) -> str:
            raise RuntimeError("boom")

    policy = Policy.compile(_config({"project_id": "55235664"}))
    for value in (Hostile(), "x" * 100_000, "\u202e" * 500, [None] * 10, {"a": [1]}):
        decision = policy.evaluate("g", "gitlab", {"project_id": value})
        assert not decision.allowed
        actual = decision.trace[0].actual
        assert len(actual) <= 80
        assert actual.isascii()
    assert display("mаin") == "'m\\u0430in'"


def test_allowed_grants_lists_the_issuers_grants(policy: Policy) -> None:
    """allowed_grants returns a decision for each grant accepting the issuer, in file order."""
    decisions = policy.allowed_grants("gitlab", claims("gitlab"))
    assert [(d.grant, d.allowed) for d in decisions] == [
        ("etl-writer", True),
        ("etl-project-lake", True),
        ("etl-cn-writer", True),
        ("etl-vault", True),
    ]
    assert all(isinstance(d, Decision) for d in decisions)
    okta = policy.allowed_grants("okta", claims("okta", groups=["nobody"]))
    assert [(d.grant, d.reason) for d in okta] == [("warehouse-load", "claim_mismatch")]


def test_grant_lookup(policy: Policy) -> None:
    """Policy.grant returns the configured grant by name, or None."""
    grant = policy.grant("etl-writer")
    assert grant is not None
    assert grant.aws is not None
    assert grant.aws.role_arn == "arn:aws:iam::123456789012:role/etl-writer"
    assert policy.grant("nope") is None
