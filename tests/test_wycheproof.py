"""Wycheproof JOSE conformance: json_web_signature_test.json and json_web_key_test.json.

Vectors from C2SP/wycheproof, copied into tests/vectors/wycheproof (its README gives provenance,
license and the data quirks).
Each JWS runs the broker's path: parse_jws, then parse_jwks on the group's public key (the private
JWK when no public one exists), KeySet.find by kid and alg, verify_signature with the group key's
`alg` as the allowlist. Every `invalid` must be rejected, every `valid` accepted, except:

- HMAC groups (kty "oct"): we support no symmetric keys at all, so key confusion has no surface
  (an RSA public key used as an HMAC secret). Their `valid` cases are asserted REJECTED with
  reason `symmetric_key`.
- README quirks: 346/350 (header PS384 under a PS256-pinned key: no key fits), 347/351 (JWK
  alg "ES521", not a registered name), 372/373 (`?` inside base64url) are labelled valid; a
  strict verifier rejects them, and we assert that. 367/370 are byte-identical to valid 357
  (an HMAC case, so rejected).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from broker.jwk import KeySetError, parse_jwks
from broker.tokens import TokenError, parse_jws, verify_signature

WYCHEPROOF = Path(__file__).resolve().parent / "vectors" / "wycheproof"

STRICT_REJECTS = {
    346: "no_key",  # the PS256-pinned key does not fit PS384, so find() offers no key
    347: "alg_curve_mismatch",
    350: "no_key",
    351: "alg_curve_mismatch",
    372: "malformed",
    373: "malformed",
}
# HMAC-group cases with framing defects: our parser refuses them on its own, before the
# (refused) HMAC key is ever consulted.
HMAC_FRAMING_REJECTS = {3, 4, 7, *range(9, 18), *range(360, 367), 368, 369, 371, 372, 373, 374, 375}


def _load(name: str) -> dict[str, Any]:
    return dict(json.loads((WYCHEPROOF / name).read_text()))


def _group_key(group: dict[str, Any]) -> dict[str, Any]:
    return dict(group.get("public") or group["private"])


def _jws_cases() -> list[Any]:
    params = []
    for group in _load("json_web_signature_test.json")["testGroups"]:
        for test in group["tests"]:
            params.append(
                pytest.param(
                    group, test, id=f"tc{test['tcId']}-{group['comment']}-{test['comment']}"
                )
            )
    return params


def run_jws(group: dict[str, Any], jws: Any) -> str:
    """'accepted' or the KeySetError/TokenError reason (or 'no_key')."""
    jwk = _group_key(group)
    try:
        parsed = parse_jws(jws)  # the token is screened before any key is consulted
        keyset = parse_jwks({"keys": [jwk]})
        key = keyset.find(parsed.kid, parsed.alg)
        if key is None:
            return "no_key"
        verify_signature(parsed, key, [jwk["alg"]] if "alg" in jwk else [])
    except (KeySetError, TokenError) as exc:
        return exc.reason
    return "accepted"


@pytest.mark.parametrize(("group", "test"), _jws_cases())
def test_json_web_signature_vector(group: dict[str, Any], test: dict[str, Any]) -> None:
    """Each Wycheproof JWS vector gets the verdict a strict, asymmetric-only verifier owes it."""
    result = run_jws(group, test["jws"])
    tc_id = test["tcId"]
    if tc_id in STRICT_REJECTS:
        assert result == STRICT_REJECTS[tc_id]
    elif tc_id in HMAC_FRAMING_REJECTS:
        assert result in {"malformed", "bad_encoding"}
    elif _group_key(group).get("kty") == "oct":
        assert result == "symmetric_key"  # rejected by design: no HMAC keys exist here
    elif test["result"] == "valid":
        assert result == "accepted"
    else:
        assert result != "accepted"


def test_signature_file_is_complete_and_mostly_accepted() -> None:
    """All 401 vectors are present and every asymmetric valid vector outside the quirks verifies."""
    data = _load("json_web_signature_test.json")
    tests = [(g, t) for g in data["testGroups"] for t in g["tests"]]
    assert len(tests) == data["numberOfTests"] == 401
    accepted = {t["tcId"] for g, t in tests if run_jws(g, t["jws"]) == "accepted"}
    expected = {
        t["tcId"]
        for g, t in tests
        if t["result"] == "valid"
        and _group_key(g).get("kty") != "oct"
        and t["tcId"] not in STRICT_REJECTS
    }
    assert accepted == expected
    assert len(expected) == 32


def test_hmac_group_valid_framing_parses() -> None:
    """The well-framed HMAC vectors parse, so their rejection is the key policy, not the parser."""
    data = _load("json_web_signature_test.json")
    for group in data["testGroups"]:
        if _group_key(group).get("kty") != "oct":
            continue
        for test in group["tests"]:
            if test["result"] == "valid" and test["tcId"] not in STRICT_REJECTS:
                assert parse_jws(test["jws"]).alg.startswith("HS")


def _jwk_cases() -> list[Any]:
    params = []
    for group in _load("json_web_key_test.json")["testGroups"]:
        for test in group["tests"]:
            params.append(
                pytest.param(
                    group, test, id=f"tc{test['tcId']}-{group['comment']}-{test['comment']}"
                )
            )
    return params


@pytest.mark.parametrize(("group", "test"), _jwk_cases())
def test_json_web_key_vector(group: dict[str, Any], test: dict[str, Any]) -> None:
    """Invalid key sets are refused by parse_jwks; the valid RSA set verifies its JWS."""
    keys = group.get("public") or group["private"]
    all_oct = all(k.get("kty") == "oct" for k in keys["keys"])
    if test["result"] == "invalid":
        with pytest.raises(KeySetError):
            parse_jwks(keys)
        with pytest.raises(KeySetError):
            parse_jwks(json.dumps(keys).encode())
    elif all_oct:
        with pytest.raises(KeySetError) as caught:
            parse_jwks(keys)
        assert caught.value.reason == "symmetric_key"  # by design: no HMAC keys exist here
    else:
        keyset = parse_jwks(keys)
        parsed = parse_jws(test["jws"])
        key = keyset.find(parsed.kid, parsed.alg)
        assert key is not None
        verify_signature(parsed, key, [parsed.alg])


def test_header_alg_outside_a_pinned_jwk_alg_is_a_key_mismatch() -> None:
    """tc346: a PS384 token under a JWK pinned to PS256 fails as key_alg_mismatch if forced."""
    data = _load("json_web_signature_test.json")
    group, test = next((g, t) for g in data["testGroups"] for t in g["tests"] if t["tcId"] == 346)
    key = parse_jwks({"keys": [_group_key(group)]}).keys[0]
    with pytest.raises(TokenError) as caught:
        verify_signature(parse_jws(test["jws"]), key, ["PS384"])
    assert caught.value.reason == "key_alg_mismatch"
