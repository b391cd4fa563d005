"""The example policies against tokens shaped like the ones each issuer really sends.

For every grant in examples/broker.toml and the Okta/Bitbucket grants of deploy/systemd/broker.toml,
a token with that issuer's real claim set (names, types, `jti` present or not, audience) is signed
by the dev issuer's signing code, parsed and verified by the broker's token path against the
example's issuer profile (issuer URL, audiences, algorithms, `require_jti`), and then explained
against the grant: it is allowed. One claim changed the way a neighbour's token differs (another
workspace, repository, project or client, an unprotected ref, another environment) is denied.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from broker.config import Config
from broker.config_lint import load_config, parse_config
from broker.dev.claims import preset_claims
from broker.dev.issuer import SigningKey, encode_jwt
from broker.explain import explain
from broker.jwk import parse_jwks
from broker.tokens import parse_token, validate_claims, verify_signature

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "broker.toml"
SYSTEMD = ROOT / "deploy" / "systemd" / "broker.toml"
NOW = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)

BB_WORKSPACE = "{6f1a2b3c-4d5e-4f60-8a7b-9c0d1e2f3a4b}"
BB_REPOSITORY = "{7d1f1c36-6d0a-4f5e-9d8a-2b3c4d5e6f70}"
BB_PRODUCTION = "{a1b2c3d4-0000-4000-8000-000000000abc}"
OKTA_APP = "0oa8f2luigiworker697"


def _gitlab(**changes: Any) -> dict[str, Any]:
    return {"project_id": "55235664", "namespace_path": "data/platform", **changes}


def _github(**changes: Any) -> dict[str, Any]:
    return {"repository": "acme/etl", "repository_id": "892341765", **changes}


def _bitbucket(**changes: Any) -> dict[str, Any]:
    # A deployment step's token: `sub` joins repository, environment and step, no `jti`.
    return {
        "workspaceUuid": BB_WORKSPACE,
        "repositoryUuid": BB_REPOSITORY,
        "deploymentEnvironmentUuid": BB_PRODUCTION,
        "sub": f"{BB_REPOSITORY}{BB_PRODUCTION}:{{9a8b7c6d-5e4f-4a3b-9c2d-1e0f2a3b4c5d}}",
        **changes,
    }


def _okta_service(**changes: Any) -> dict[str, Any]:
    # Client credentials: the app is `sub` and `cid`; no person, so no `uid` and no `groups`.
    return {
        "sub": OKTA_APP,
        "cid": OKTA_APP,
        "uid": None,
        "groups": None,
        "scp": ["warehouse.write", "luigi-creds.exchange"],
        **changes,
    }


# (policy file, issuer name, preset, grant, claims allowed, {near miss: changed claims})
CASES: list[tuple[Path, str, str, str, dict[str, Any], dict[str, dict[str, Any]]]] = [
    (
        EXAMPLES,
        "gitlab",
        "gitlab",
        "etl-writer",
        _gitlab(ref="release/2.1"),
        {
            "other project": {"project_id": "55235665"},
            "unprotected ref": {"ref_protected": "false", "ref": "main"},
            "merge request pipeline": {"pipeline_source": "merge_request_event"},
        },
    ),
    (
        EXAMPLES,
        "gitlab",
        "gitlab",
        "etl-vault",
        _gitlab(ref="feature/x"),
        {
            "other project": {"project_id": "11"},
            "other group": {"namespace_path": "sales/platform"},
        },
    ),
    (
        EXAMPLES,
        "github",
        "github",
        "gh-release",
        _github(
            repository_owner_id="14101776",
            ref="refs/tags/v1.4.0",
            ref_type="tag",
            environment="production",
        ),
        {
            "other environment": {"environment": "staging"},
            "other repository": {"repository_id": "892341766"},
            "a branch, not a tag": {"ref": "refs/heads/main", "ref_type": "branch"},
            "no environment": {"environment": None},
        },
    ),
    (
        EXAMPLES,
        "github",
        "github",
        "gh-staging-read",
        _github(repository_owner_id="14101776", ref="refs/heads/feature/new-loader"),
        {
            "other organisation": {"repository_owner_id": "99999999"},
            "not a feature branch": {"ref": "refs/heads/main"},
        },
    ),
    (
        EXAMPLES,
        "bitbucket",
        "bitbucket",
        "bb-deploy",
        _bitbucket(),
        {
            "other workspace": {"workspaceUuid": "{00000000-1111-4222-8333-444444444444}"},
            "other repository": {"repositoryUuid": "{11111111-2222-4333-8444-555555555555}"},
            "other environment": {
                "deploymentEnvironmentUuid": "{b2c3d4e5-0000-4000-8000-000000000def}"
            },
            "not a deployment step": {"deploymentEnvironmentUuid": None},
        },
    ),
    (
        EXAMPLES,
        "okta",
        "okta",
        "warehouse-load",
        _okta_service(),
        {
            "other service app": {"sub": "0oa8f2otherapp0000", "cid": "0oa8f2otherapp0000"},
            "scope not granted": {"scp": ["luigi-creds.exchange"]},
            "a person's token": {"sub": "alice@example.com", "uid": "00u1a2b3c4d5e6f7g8h9"},
        },
    ),
    (
        SYSTEMD,
        "bitbucket",
        "bitbucket",
        "bb-etl-writer",
        _bitbucket(),
        {
            "other workspace": {"workspaceUuid": "{00000000-1111-4222-8333-444444444444}"},
            "other environment": {
                "deploymentEnvironmentUuid": "{b2c3d4e5-0000-4000-8000-000000000def}"
            },
        },
    ),
    (
        SYSTEMD,
        "okta",
        "okta",
        "warehouse-load",
        _okta_service(),
        {"other service app": {"sub": "0oa8f2otherapp0000", "cid": "0oa8f2otherapp0000"}},
    ),
    (
        SYSTEMD,
        "okta",
        "okta",
        "warehouse-raw-read",
        _okta_service(),
        {"other service app": {"sub": "0oa8f2otherapp0000", "cid": "0oa8f2otherapp0000"}},
    ),
]

_KEY = SigningKey.generate("RS256")


def _verified_claims(
    config: Config, issuer_name: str, preset: str, claims: Mapping[str, Any]
) -> Mapping[str, Any]:
    """Sign a token of `preset` shape with `claims`, then take it through the broker's parse,
    signature and registered-claim checks under the example's issuer profile."""
    issuer = config.issuer(issuer_name)
    assert issuer is not None
    raw = encode_jwt(
        preset_claims(
            preset, issuer=issuer.url, audience=issuer.audiences[0], now=NOW, overrides=claims
        ),
        _KEY,
    )
    token = parse_token(raw)
    key = parse_jwks({"keys": [_KEY.public_jwk()]}).find(token.kid, token.alg)
    assert key is not None
    verify_signature(token, key, issuer.algorithms)
    validate_claims(
        token.claims,
        issuer=issuer.url,
        audiences=issuer.audiences,
        now=NOW,
        leeway=config.broker.leeway,
        max_lifetime=issuer.max_token_lifetime,
        require_jti=issuer.require_jti,
    )
    return token.claims


def _ids() -> list[str]:
    return [f"{path.parent.name}-{grant}" for path, _, _, grant, _, _ in CASES]


@pytest.mark.parametrize(
    ("path", "issuer", "preset", "grant", "claims", "misses"), CASES, ids=_ids()
)
def test_example_grant_allows_a_real_shaped_token_and_denies_near_misses(
    path: Path,
    issuer: str,
    preset: str,
    grant: str,
    claims: dict[str, Any],
    misses: dict[str, dict[str, Any]],
) -> None:
    config = load_config(path)
    verified = _verified_claims(config, issuer, preset, claims)
    text, allowed = explain(config, verified, grant=grant, issuer=None)
    assert allowed, text
    assert f"grant {grant}: ALLOW" in text
    for miss, changes in misses.items():
        near = _verified_claims(config, issuer, preset, {**claims, **changes})
        text, allowed = explain(config, near, grant=grant, issuer=None)
        assert not allowed, f"{miss}: {text}"
        assert f"grant {grant}: DENY" in text, miss


def test_issuer_profiles_follow_what_each_issuer_sends() -> None:
    """Bitbucket step tokens have no `jti`; GitHub, GitLab and Okta tokens do. Bitbucket's
    audience is the workspace's ARI; Okta's issuer is a custom authorization server."""
    for path in (EXAMPLES, SYSTEMD):
        config = load_config(path)
        bitbucket, okta = config.issuer("bitbucket"), config.issuer("okta")
        assert bitbucket is not None and okta is not None
        assert bitbucket.require_jti is False, path
        assert bitbucket.audiences == (
            "ari:cloud:bitbucket::workspace/" + BB_WORKSPACE.strip("{}"),
        )
        assert okta.require_jti is True and "/oauth2/" in okta.url, path
        for name in ("gitlab", "github"):
            profile = config.issuer(name)
            assert profile is not None and profile.require_jti is True, (path, name)
        for grant in config.grants:
            if "okta" in grant.issuers:
                assert "groups" not in grant.match, (path, grant.name)
    claims = preset_claims("bitbucket", issuer="https://b", audience="a", now=NOW)
    assert "jti" not in claims


def test_okta_guide_policy_allows_the_guides_token() -> None:
    """deploy/okta/README.md: its TOML loads and its sample token's claims are allowed."""
    guide = (ROOT / "deploy" / "okta" / "README.md").read_text(encoding="utf-8")
    (toml_block,) = re.findall(r"```toml\n(.*?)```", guide, flags=re.DOTALL)
    (json_block,) = re.findall(r"```json\n(.*?)```", guide, flags=re.DOTALL)
    config = parse_config(
        '[broker]\naudit_store = "sqlite:///tmp/unused.db"\n'
        + toml_block
        + '[upstream.vault]\nurl = "http://127.0.0.1:8200"\nauth = "token"\n'
        'token_file = "/run/credentials/vault-token"\n'
    )
    claims = json.loads(json_block)
    assert claims == json.loads((ROOT / "tests/fixtures/claims/okta_service.json").read_text())
    text, allowed = explain(config, claims, grant="warehouse-load", issuer=None)
    assert allowed, text
    text, allowed = explain(
        config, {**claims, "sub": "alice@example.com"}, grant="warehouse-load", issuer=None
    )
    assert not allowed, text
