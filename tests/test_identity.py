"""Unit tests for luigi_creds.identity: each token source, HTTP ones over MockTransport."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import parse_qs

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from joserfc import jwt
from joserfc.jwk import ECKey, RSAKey

from luigi_creds.identity import (
    ACCESS_TOKEN_TYPE,
    FileTokenSource,
    IdentityError,
    OktaSettings,
    parse_token_source,
)

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
AUD = "https://broker.example.com"


def _source(spec: str, environ: dict[str, str], handler=None, **kw):  # type: ignore[no-untyped-def]
    http = httpx.Client(transport=httpx.MockTransport(handler or (lambda r: httpx.Response(500))))
    return parse_token_source(
        spec, environ=environ, http=http, audience=AUD, clock=lambda: T0, **kw
    )


def test_env_source_reads_the_variable_at_use() -> None:
    """env:VAR reads the variable when a token is asked for, not when the source is built."""
    environ: dict[str, str] = {}
    src = _source("env:MY_TOKEN", environ)
    environ["MY_TOKEN"] = "eyJ.a.b\n"
    assert src.token() == "eyJ.a.b"
    assert src.description == "env:MY_TOKEN"
    assert not src.renewable


def test_missing_variable_names_it() -> None:
    """A missing variable raises IdentityError naming the variable."""
    with pytest.raises(IdentityError, match="MY_TOKEN is not set"):
        _source("env:MY_TOKEN", {}).token()


def test_gitlab_uses_configurable_variable() -> None:
    """gitlab reads LUIGI_CREDS_ID_TOKEN by default and the configured variable otherwise."""
    assert _source("gitlab", {"LUIGI_CREDS_ID_TOKEN": "t1"}).token() == "t1"
    src = _source("gitlab", {"BROKER_ID_TOKEN": "t2"}, gitlab_variable="BROKER_ID_TOKEN")
    assert src.token() == "t2"
    assert src.description == "gitlab"


def test_bitbucket_reads_step_token() -> None:
    """bitbucket reads BITBUCKET_STEP_OIDC_TOKEN."""
    assert _source("bitbucket", {"BITBUCKET_STEP_OIDC_TOKEN": "bb"}).token() == "bb"


def test_file_source_rereads_a_rotating_file(tmp_path: Path) -> None:
    """file:PATH returns the file's current content on every use."""
    path = tmp_path / "token"
    path.write_text("first\n")
    src = _source(f"file:{path}", {})
    assert src.token() == "first"
    path.write_text("second")
    assert src.token() == "second"
    assert src.renewable


def test_file_source_errors_are_clear(tmp_path: Path) -> None:
    """A missing, empty or oversized token file raises IdentityError naming the file."""
    with pytest.raises(IdentityError, match="cannot read"):
        FileTokenSource(tmp_path / "nope").token()
    (tmp_path / "empty").write_text("  \n")
    with pytest.raises(IdentityError, match="empty"):
        FileTokenSource(tmp_path / "empty").token()
    (tmp_path / "big").write_text("a" * 20000)
    with pytest.raises(IdentityError, match="16 KiB"):
        FileTokenSource(tmp_path / "big").token()


def test_github_appends_audience_and_sends_bearer() -> None:
    """github GETs the request URL with &audience= and the request token as bearer."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"value": "gh.jwt.sig"})

    env = {
        "ACTIONS_ID_TOKEN_REQUEST_URL": "https://pipelines.example/idtoken?api-version=2.0",
        "ACTIONS_ID_TOKEN_REQUEST_TOKEN": "req-bearer-secret",
    }
    src = _source("github", env, handler)
    assert src.token() == "gh.jwt.sig"
    assert parse_qs(seen[0].url.query.decode())["audience"] == [AUD]
    assert seen[0].headers["authorization"] == "bearer req-bearer-secret"
    assert "req-bearer-secret" not in repr(src)


def test_github_without_permissions_explains() -> None:
    """github without the request variables says to grant id-token: write."""
    with pytest.raises(IdentityError, match="id-token: write"):
        _source("github", {})


def test_github_error_status_is_reported() -> None:
    """A non-200 answer from the request URL raises IdentityError with the status."""
    env = {"ACTIONS_ID_TOKEN_REQUEST_URL": "https://x/t", "ACTIONS_ID_TOKEN_REQUEST_TOKEN": "b"}
    with pytest.raises(IdentityError, match="HTTP 403"):
        _source("github", env, lambda r: httpx.Response(403)).token()


def test_unknown_spec_is_rejected() -> None:
    """An unknown token_source lists the accepted forms."""
    with pytest.raises(IdentityError, match="env:VAR, file:PATH"):
        _source("vault", {})


@pytest.mark.parametrize("kind", ["rsa", "ec"])
def test_okta_client_credentials_with_private_key_jwt(tmp_path: Path, kind: str) -> None:
    """okta posts a client assertion signed with the key file and caches the access token."""
    if kind == "rsa":
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    else:
        private = ec.generate_private_key(ec.SECP256R1())  # type: ignore[assignment]
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    key_file = tmp_path / "okta.pem"
    key_file.write_bytes(pem)
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    public = RSAKey.import_key(public_pem) if kind == "rsa" else ECKey.import_key(public_pem)
    endpoint = "https://example.okta.com/oauth2/aus1/v1/token"
    forms: list[dict[str, list[str]]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        forms.append(parse_qs(request.content.decode()))
        return httpx.Response(
            200, json={"access_token": f"okta-at-{len(forms)}", "expires_in": 3600}
        )

    now = [T0]
    http = httpx.Client(transport=httpx.MockTransport(handler))
    src = parse_token_source(
        "okta",
        environ={},
        http=http,
        audience=AUD,
        clock=lambda: now[0],
        okta=OktaSettings(endpoint, "client-1", key_file, scopes=("luigi",), key_id="k1"),
    )
    assert src.token() == "okta-at-1"
    assert src.token() == "okta-at-1"
    now[0] += timedelta(minutes=59, seconds=30)
    assert src.token() == "okta-at-2"
    assert src.subject_token_type == ACCESS_TOKEN_TYPE
    form = forms[0]
    assert form["grant_type"] == ["client_credentials"]
    assert form["scope"] == ["luigi"]
    token = jwt.decode(form["client_assertion"][0], public)
    assert token.claims["iss"] == token.claims["sub"] == "client-1"
    assert token.claims["aud"] == endpoint
    assert token.header["kid"] == "k1"
    assert "PRIVATE" not in repr(src)


def test_okta_error_names_endpoint_not_secret(tmp_path: Path) -> None:
    """An Okta error reports the endpoint, status and error code."""
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    key_file = tmp_path / "okta.pem"
    key_file.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    body = json.dumps({"error": "invalid_client"})
    src = _source(
        "okta",
        {},
        lambda r: httpx.Response(401, content=body),
        okta=OktaSettings("https://o/token", "c", key_file),
    )
    with pytest.raises(
        IdentityError, match=r"https://o/token answered HTTP 401 \(invalid_client\)"
    ):
        src.token()
