"""Claim presets: the payloads real CI systems and Okta put into their OIDC tokens.

Owns the claim shapes the local issuer signs, so tests and `luigi-creds-broker dev` exercise the
policy engine with what GitLab, GitHub, Bitbucket and Okta really send (types included: GitLab's
ids are strings, its `runner_id` a number; Okta's `scp` and `groups` are lists). Talks to nothing.

Sources: GitLab "OpenID Connect (OIDC) Authentication Using ID Tokens" claim table; GitHub
"About security hardening with OpenID Connect" example token; Bitbucket "Integrate Pipelines with
resource servers using OIDC"; Okta "Access token" claim reference.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

PRESETS = ("gitlab", "github", "bitbucket", "okta")

# Default identities. project_id 55235664 is the id the example policy (examples/broker.toml) binds.
GITLAB_PROJECT_ID = "55235664"
GITLAB_PROJECT_PATH = "data-platform/etl"
GITHUB_REPOSITORY = "example-org/etl"
BITBUCKET_WORKSPACE_UUID = "{6f1a2b3c-4d5e-4f60-8a7b-9c0d1e2f3a4b}"
BITBUCKET_REPOSITORY_UUID = "{2d4e6f80-1a3b-4c5d-8e7f-a0b1c2d3e4f5}"
BITBUCKET_STEP_UUID = "{9a8b7c6d-5e4f-4a3b-9c2d-1e0f2a3b4c5d}"
BITBUCKET_PIPELINE_UUID = "{0b1c2d3e-4f5a-4b6c-8d7e-9f0a1b2c3d4e}"


def _gitlab() -> dict[str, Any]:
    ref = "main"
    return {
        "namespace_id": "72",
        "namespace_path": "data-platform",
        "project_id": GITLAB_PROJECT_ID,
        "project_path": GITLAB_PROJECT_PATH,
        "user_id": "4021",
        "user_login": "alice",
        "user_email": "alice@example.com",
        "user_access_level": "maintainer",
        "pipeline_id": "1350228412",
        "pipeline_source": "push",
        "job_id": "7241099131",
        "ref": ref,
        "ref_type": "branch",
        "ref_path": f"refs/heads/{ref}",
        "ref_protected": "true",
        "environment": "production",
        "environment_protected": "true",
        "deployment_tier": "production",
        "runner_id": 12270840,
        "runner_environment": "gitlab-hosted",
        "sha": "714a629c0b401fdce83e847fc9589983fc6f46bc",
        "project_visibility": "private",
        "ci_config_ref_uri": f"gitlab.com/{GITLAB_PROJECT_PATH}//.gitlab-ci.yml@refs/heads/{ref}",
        "ci_config_sha": "714a629c0b401fdce83e847fc9589983fc6f46bc",
        "sub": f"project_path:{GITLAB_PROJECT_PATH}:ref_type:branch:ref:{ref}",
        "jti": str(uuid.uuid4()),
    }


def _github() -> dict[str, Any]:
    ref = "refs/heads/main"
    workflow_ref = f"{GITHUB_REPOSITORY}/.github/workflows/etl.yml@{ref}"
    return {
        "repository": GITHUB_REPOSITORY,
        "repository_id": "690215432",
        "repository_owner": "example-org",
        "repository_owner_id": "142857005",
        "repository_visibility": "private",
        "ref": ref,
        "ref_type": "branch",
        "sha": "e3f9e5b4d5a5c9c0b1ff2a6d8a7c1e4b9f0a2d31",
        "workflow": "etl",
        "workflow_ref": workflow_ref,
        "job_workflow_ref": workflow_ref,
        "run_id": "9130482211",
        "run_number": "412",
        "run_attempt": "1",
        "actor": "alice",
        "actor_id": "1289731",
        "environment": "production",
        "event_name": "push",
        "runner_environment": "github-hosted",
        "sub": f"repo:{GITHUB_REPOSITORY}:ref:{ref}",
        "jti": str(uuid.uuid4()),
    }


def _bitbucket() -> dict[str, Any]:
    # NOTE: Bitbucket's documented claim set carries no `jti`; an issuer configured for it uses
    # `require_jti = false`, and tests that need one add it through `overrides`.
    return {
        "accountUuid": "{a1b2c3d4-e5f6-4a7b-8c9d-0e1f2a3b4c5d}",
        "workspaceUuid": BITBUCKET_WORKSPACE_UUID,
        "repositoryUuid": BITBUCKET_REPOSITORY_UUID,
        "pipelineUuid": BITBUCKET_PIPELINE_UUID,
        "stepUuid": BITBUCKET_STEP_UUID,
        "branchName": "main",
        "deploymentEnvironmentUuid": "{c3d4e5f6-a7b8-4c9d-8e0f-1a2b3c4d5e6f}",
        "sub": f"{BITBUCKET_REPOSITORY_UUID}:{BITBUCKET_STEP_UUID}",
    }


def _okta() -> dict[str, Any]:
    return {
        "ver": 1,
        "jti": "AT." + uuid.uuid4().hex,
        "cid": "0oa1b2c3d4e5f6g7h8i9",
        "uid": "00u1a2b3c4d5e6f7g8h9",
        "scp": ["openid", "profile", "luigi-creds"],
        "groups": ["data-engineering"],
        "sub": "alice@example.com",
    }


_BUILDERS: Mapping[str, Callable[[], dict[str, Any]]] = {
    "gitlab": _gitlab,
    "github": _github,
    "bitbucket": _bitbucket,
    "okta": _okta,
}


def preset_claims(
    preset: str,
    *,
    issuer: str,
    audience: str | list[str],
    now: datetime,
    ttl: int = 300,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Claims of a `preset` token issued by `issuer` for `audience` at `now`, valid `ttl` seconds.

    `overrides` replace claims by name; an override of None deletes the claim (to build tokens
    with a claim missing). Raises ValueError for an unknown preset or a naive `now`.
    """
    builder = _BUILDERS.get(preset)
    if builder is None:
        raise ValueError(f"unknown preset {preset!r}; expected one of {', '.join(PRESETS)}")
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be an aware datetime")
    issued_at = int(now.timestamp())
    claims: dict[str, Any] = {
        "iss": issuer,
        "aud": audience,
        **builder(),
        "iat": issued_at,
        "nbf": issued_at,
        "exp": issued_at + ttl,
    }
    if preset == "okta":
        # Okta access tokens carry auth_time and no nbf.
        claims["auth_time"] = issued_at
        del claims["nbf"]
    for name, value in (overrides or {}).items():
        if value is None:
            claims.pop(name, None)
        else:
            claims[name] = value
    return claims
