"""The local OIDC issuer: its keys, its JWS (checked by joserfc), claim presets and its process."""

from __future__ import annotations

import json
import signal
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from joserfc import jwt
from joserfc.jwk import KeySet as JoseKeySet

from broker.dev.claims import PRESETS, preset_claims
from broker.dev.harness import DevIssuer, start_dev_issuer
from broker.dev.issuer import ALGORITHMS, IssuerServer, SigningKey, encode_jwt
from broker.jwk import b64url_decode, parse_jwks

NOW = datetime(2026, 11, 22, 2, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def keys() -> dict[str, SigningKey]:
    return {alg: SigningKey.generate(alg) for alg in ALGORITHMS}


def _segments(token: str) -> tuple[dict[str, Any], dict[str, Any], bytes]:
    header, payload, signature = token.split(".")
    return (
        json.loads(b64url_decode(header)),
        json.loads(b64url_decode(payload)),
        b64url_decode(signature),
    )


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


# joserfc 1.8 warns that "EdDSA" is superseded by "Ed25519" (RFC 9864); IdPs still publish EdDSA.
@pytest.mark.filterwarnings("ignore:EdDSA is deprecated")
@pytest.mark.parametrize("alg", ALGORITHMS)
def test_encode_jwt_verifies_with_an_independent_library(
    keys: dict[str, SigningKey], alg: str
) -> None:
    """A token from encode_jwt verifies with joserfc against the key's public JWK."""
    key = keys[alg]
    token = encode_jwt({"sub": "alice", "n": 1}, key)
    decoded = jwt.decode(token, JoseKeySet.import_key_set({"keys": [key.public_jwk()]}), [alg])
    assert decoded.claims == {"sub": "alice", "n": 1}
    assert decoded.header == {"alg": alg, "typ": "JWT", "kid": key.kid}


def test_es256_signature_is_raw_r_and_s(keys: dict[str, SigningKey]) -> None:
    """An ES256 signature is the 64-byte r||s concatenation, not DER."""
    _, _, signature = _segments(encode_jwt({"sub": "x"}, keys["ES256"]))
    assert len(signature) == 64


@pytest.mark.parametrize("alg", ALGORITHMS)
def test_kid_is_the_rfc7638_thumbprint(keys: dict[str, SigningKey], alg: str) -> None:
    """A generated key's kid equals the RFC 7638 thumbprint broker.jwk computes for its JWK."""
    key = keys[alg]
    parsed = parse_jwks({"keys": [key.public_jwk()]}).keys[0]
    assert key.kid == key.thumbprint() == parsed.thumbprint()


def test_random_kid_and_explicit_kid() -> None:
    """A key can carry a random or caller-chosen kid instead of its thumbprint."""
    random_key = SigningKey.generate("ES256", random_kid=True)
    assert random_key.kid != random_key.thumbprint()
    assert SigningKey.generate("ES256", kid="k1").kid == "k1"


def test_unknown_algorithm_is_refused() -> None:
    """Generating a key for an algorithm the issuer does not implement raises ValueError."""
    with pytest.raises(ValueError, match="unsupported algorithm"):
        SigningKey.generate("HS256")


def test_header_overrides_add_and_drop_members(keys: dict[str, SigningKey]) -> None:
    """Header overrides add members and a None override removes one, such as the kid."""
    token = encode_jwt({"sub": "x"}, keys["RS256"], header={"kid": None, "typ": "at+jwt"})
    header, _, _ = _segments(token)
    assert header == {"alg": "RS256", "typ": "at+jwt"}


def test_key_file_round_trips_with_owner_only_mode(
    keys: dict[str, SigningKey], tmp_path: Path
) -> None:
    """A key written to disk is mode 0600 and reads back signing identically verifiable tokens."""
    path = tmp_path / "key.json"
    keys["ES256"].write(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = SigningKey.read(path)
    assert (loaded.alg, loaded.kid) == ("ES256", keys["ES256"].kid)
    token = encode_jwt({"sub": "y"}, loaded)
    jose_keys = JoseKeySet.import_key_set({"keys": [keys["ES256"].public_jwk()]})
    assert jwt.decode(token, jose_keys, ["ES256"]).claims == {"sub": "y"}


def test_repr_hides_the_private_key(keys: dict[str, SigningKey]) -> None:
    """The repr of a signing key names its alg and kid and nothing of the private key."""
    text = repr(keys["RS256"])
    assert "private" not in text
    assert keys["RS256"].kid in text


def test_gitlab_preset_has_gitlab_claim_types() -> None:
    """The GitLab preset carries string ids, a numeric runner_id and a sub built from the ref."""
    claims = preset_claims("gitlab", issuer="https://gitlab.example", audience="b", now=NOW)
    assert claims["project_id"] == "55235664"
    assert claims["ref_protected"] == "true"
    assert isinstance(claims["runner_id"], int)
    assert claims["sub"] == "project_path:data-platform/etl:ref_type:branch:ref:main"
    assert claims["exp"] - claims["iat"] == 300
    assert claims["iss"] == "https://gitlab.example"


def test_presets_have_distinct_jtis_and_expected_shapes() -> None:
    """Each preset has its CI-specific identity claims, and two tokens never share a jti."""
    made = {p: preset_claims(p, issuer="https://i", audience="a", now=NOW, ttl=60) for p in PRESETS}
    assert made["github"]["sub"] == "repo:example-org/etl:ref:refs/heads/main"
    assert made["bitbucket"]["sub"] == (
        made["bitbucket"]["repositoryUuid"] + ":" + made["bitbucket"]["stepUuid"]
    )
    assert made["bitbucket"]["workspaceUuid"].startswith("{")
    assert made["okta"]["groups"] == ["data-engineering"]
    assert isinstance(made["okta"]["scp"], list)
    again = preset_claims("gitlab", issuer="https://i", audience="a", now=NOW)
    assert again["jti"] != made["gitlab"]["jti"]


def test_overrides_replace_and_delete_claims() -> None:
    """An override replaces a claim, and a None override removes it."""
    claims = preset_claims(
        "gitlab",
        issuer="https://i",
        audience="a",
        now=NOW,
        overrides={"ref": "release/1", "jti": None, "exp": None},
    )
    assert claims["ref"] == "release/1"
    assert "jti" not in claims
    assert "exp" not in claims


def test_preset_rejects_unknown_names_and_naive_time() -> None:
    """An unknown preset or a naive datetime raises ValueError."""
    with pytest.raises(ValueError, match="unknown preset"):
        preset_claims("jenkins", issuer="https://i", audience="a", now=NOW)
    with pytest.raises(ValueError, match="aware"):
        preset_claims("gitlab", issuer="https://i", audience="a", now=datetime(2026, 1, 1))


@pytest.mark.integration
def test_process_serves_discovery_and_verifiable_tokens(oidc_issuer: DevIssuer) -> None:
    """The issuer process publishes same-origin discovery and a JWKS that verifies its tokens."""
    discovery = _get_json(oidc_issuer.url + "/.well-known/openid-configuration")
    assert discovery["issuer"] == oidc_issuer.url
    assert discovery["jwks_uri"] == oidc_issuer.url + "/jwks"
    assert set(discovery["id_token_signing_alg_values_supported"]) == {"RS256", "ES256"}
    jwks = _get_json(discovery["jwks_uri"])
    assert len(parse_jwks(jwks).keys) == 2
    for alg in ("RS256", "ES256"):
        token = oidc_issuer.mint("github", audience="broker", alg=alg, actor="bob", jti=None)
        claims = jwt.decode(token, JoseKeySet.import_key_set(jwks), [alg]).claims
        assert claims["iss"] == oidc_issuer.url
        assert claims["aud"] == "broker"
        assert claims["actor"] == "bob"
        assert "jti" not in claims
    assert oidc_issuer.stats()["jwks_fetches"] == 1


@pytest.mark.integration
def test_rotation_keeps_old_keys_published_unless_dropped(oidc_issuer: DevIssuer) -> None:
    """Rotating publishes a new active kid beside the old one; drop_old leaves only the new one."""
    old_kid = _segments(oidc_issuer.mint())[0]["kid"]
    new_kid = oidc_issuer.rotate("RS256")
    assert _segments(oidc_issuer.mint())[0]["kid"] == new_kid
    kids = {k["kid"] for k in _get_json(oidc_issuer.url + "/jwks")["keys"]}
    assert {old_kid, new_kid} <= kids
    newest = oidc_issuer.rotate("RS256", drop_old=True)
    rsa_kids = {k["kid"] for k in _get_json(oidc_issuer.url + "/jwks")["keys"] if k["kty"] == "RSA"}
    assert rsa_kids == {newest}


@pytest.mark.integration
def test_faults_change_only_the_jwks_answer(oidc_issuer: DevIssuer) -> None:
    """The html fault makes /jwks answer HTML while discovery stays healthy."""
    oidc_issuer.set_faults(jwks="html")
    with urllib.request.urlopen(oidc_issuer.url + "/jwks", timeout=10) as response:
        assert response.headers["Content-Type"] == "text/html"
    assert _get_json(oidc_issuer.url + "/.well-known/openid-configuration")["issuer"]


@pytest.mark.integration
def test_sigterm_stops_the_process_cleanly(tmp_path: Path) -> None:
    """SIGTERM makes the issuer stop serving and exit with status 0."""
    issuer = start_dev_issuer(tmp_path)
    issuer.process.popen.send_signal(signal.SIGTERM)
    assert issuer.process.popen.wait(timeout=10) == 0


@pytest.mark.integration
def test_keys_persist_in_the_state_dir_across_restarts(tmp_path: Path) -> None:
    """Keys are saved 0600 in the state dir and a restarted issuer publishes the same kids."""
    first = start_dev_issuer(tmp_path)
    try:
        kids = {k["kid"] for k in _get_json(first.url + "/jwks")["keys"]}
    finally:
        first.stop()
    keys_file = tmp_path / "dev-issuer-state" / "signing-keys.json"
    assert stat.S_IMODE(keys_file.stat().st_mode) == 0o600
    again = start_dev_issuer(tmp_path)
    try:
        assert {k["kid"] for k in _get_json(again.url + "/jwks")["keys"]} == kids
    finally:
        again.stop()


@pytest.mark.integration
def test_refuses_to_listen_on_a_non_loopback_address() -> None:
    """Asked to bind a non-loopback address, the issuer exits with an error before listening."""
    result = subprocess.run(
        [sys.executable, "-m", "broker.dev.issuer", "--host", "192.0.2.1", "--port", "0"],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert b"non-loopback" in result.stderr
    assert result.stdout == b""


@pytest.mark.integration
def test_in_process_server_answers_bad_requests_with_400(tmp_path: Path) -> None:
    """The in-process server refuses unknown presets, algorithms and faults with 400."""
    server = IssuerServer(state_dir=tmp_path).start()
    try:
        for path, body in [
            ("/token", {"preset": "jenkins"}),
            ("/token", {"alg": "HS256"}),
            ("/token", {"ttl": "300"}),
            ("/rotate", {"alg": "none"}),
            ("/faults", {"jwks": "teapot"}),
            ("/token", ["not", "an", "object"]),
        ]:
            request = urllib.request.Request(
                server.url + path, data=json.dumps(body).encode(), method="POST"
            )
            with pytest.raises(urllib.error.HTTPError) as caught:
                urllib.request.urlopen(request, timeout=10)
            caught.value.close()
            assert caught.value.code == 400
    finally:
        server.stop()


@pytest.mark.integration
def test_in_process_server_signs_with_an_algorithm_added_on_demand() -> None:
    """Asking for a PS256 token adds a PS256 key to the JWKS and signs with it."""
    server = IssuerServer(algorithms=("ES256",)).start()
    try:
        token = server.state.mint({"preset": "okta", "alg": "PS256"}, now=NOW)
        header, claims, _ = _segments(token)
        assert header["alg"] == "PS256"
        assert claims["iss"] == server.url
        jwks = _get_json(server.url + "/jwks")
        assert {k["alg"] for k in jwks["keys"]} == {"ES256", "PS256"}
        assert jwt.decode(token, JoseKeySet.import_key_set(jwks), ["PS256"]).claims == claims
    finally:
        server.stop()
