"""Unit tests for broker.jwk: JWK/JWKS validation, key selection and the strict decoders.

Keys are generated at test time; the only fixed key material is public (RFC 7638's example and
the Wycheproof ROCA modulus read from tests/vectors/wycheproof).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa, x25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from broker.jwk import (
    JoseDecodeError,
    KeySetError,
    b64url_decode,
    b64url_encode,
    is_roca_modulus,
    loads_strict_json,
    parse_jwk,
    parse_jwks,
)

WYCHEPROOF = Path(__file__).resolve().parent / "vectors" / "wycheproof"

# RFC 7638 §3.1 example key (public) and its thumbprint.
RFC7638_N = (
    "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPe"
    "bWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY3"
    "68QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM"
    "4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"
)
RFC7638_THUMBPRINT = "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
DROP = object()  # marks a JWK member to delete


def _int(value: int) -> str:
    return b64url_encode(value.to_bytes((value.bit_length() + 7) // 8, "big"))


def rsa_jwk(key: rsa.RSAPublicKey, **extra: Any) -> dict[str, Any]:
    numbers = key.public_numbers()
    return {"kty": "RSA", "n": _int(numbers.n), "e": _int(numbers.e), **extra}


def ec_jwk(key: ec.EllipticCurvePublicKey, crv: str, size: int, **extra: Any) -> dict[str, Any]:
    point = key.public_numbers()
    return {
        "kty": "EC",
        "crv": crv,
        "x": b64url_encode(point.x.to_bytes(size, "big")),
        "y": b64url_encode(point.y.to_bytes(size, "big")),
        **extra,
    }


@pytest.fixture(scope="module")
def rsa_public() -> rsa.RSAPublicKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()


@pytest.fixture(scope="module")
def p256_public() -> ec.EllipticCurvePublicKey:
    return ec.generate_private_key(ec.SECP256R1()).public_key()


@pytest.fixture(scope="module")
def ed_public() -> ed25519.Ed25519PublicKey:
    return ed25519.Ed25519PrivateKey.generate().public_key()


def _ed_jwk(key: ed25519.Ed25519PublicKey, **extra: Any) -> dict[str, Any]:
    raw = key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return {"kty": "OKP", "crv": "Ed25519", "x": b64url_encode(raw), **extra}


# --- accepted keys --------------------------------------------------------------------------


def test_rsa_jwk_parses_and_matches_rfc7638_thumbprint() -> None:
    """The RFC 7638 example key parses and its thumbprint equals the RFC's value."""
    key = parse_jwk(
        {"kty": "RSA", "n": RFC7638_N, "e": "AQAB", "alg": "RS256", "kid": "2011-04-29"}
    )
    assert (key.kty, key.alg, key.kid, key.crv) == ("RSA", "RS256", "2011-04-29", None)
    assert key.thumbprint() == RFC7638_THUMBPRINT


@pytest.mark.parametrize(
    ("curve", "crv", "size"),
    [(ec.SECP256R1(), "P-256", 32), (ec.SECP384R1(), "P-384", 48), (ec.SECP521R1(), "P-521", 66)],
    ids=["P-256", "P-384", "P-521"],
)
def test_ec_jwk_parses_on_each_supported_curve(
    curve: ec.EllipticCurve, crv: str, size: int
) -> None:
    """EC keys on P-256, P-384 and P-521 parse, keep their curve and round-trip the thumbprint."""
    public = ec.generate_private_key(curve).public_key()
    jwk = ec_jwk(public, crv, size, kid="k1", use="sig")
    key = parse_jwk(jwk)
    assert (key.kty, key.crv, key.kid) == ("EC", crv, "k1")
    members = {k: jwk[k] for k in ("crv", "kty", "x", "y")}
    assert key.thumbprint() == _thumbprint_of(members)


def test_ed25519_jwk_parses(ed_public: ed25519.Ed25519PublicKey) -> None:
    """An OKP Ed25519 key parses and fits EdDSA only."""
    key = parse_jwk(_ed_jwk(ed_public, alg="EdDSA"))
    assert key.kty == "OKP" and key.fits("EdDSA") and not key.fits("ES256")
    assert key.thumbprint() == _thumbprint_of(
        {k: v for k, v in _ed_jwk(ed_public).items() if k in ("crv", "kty", "x")}
    )


def _thumbprint_of(members: dict[str, str]) -> str:
    canonical = json.dumps(members, separators=(",", ":"), sort_keys=True).encode()
    return b64url_encode(hashlib.sha256(canonical).digest())


def test_verification_key_repr_has_no_key_numbers(rsa_public: rsa.RSAPublicKey) -> None:
    """A key's repr names kid and kty but not the public key object."""
    key = parse_jwk(rsa_jwk(rsa_public, kid="abc"))
    assert "abc" in repr(key)
    assert "public_key" not in repr(key)


# --- rejected keys and key sets --------------------------------------------------------------

Builder = Callable[[rsa.RSAPublicKey, ec.EllipticCurvePublicKey], Any]


def _small_rsa(_: rsa.RSAPublicKey, __: ec.EllipticCurvePublicKey) -> Any:
    weak = rsa.generate_private_key(65537, 1024)  # noqa: S505 - the weak key is the point
    return {"keys": [rsa_jwk(weak.public_key())]}


def _with_exponent(e: int) -> Builder:
    def build(r: rsa.RSAPublicKey, _: ec.EllipticCurvePublicKey) -> Any:
        return {"keys": [{**rsa_jwk(r), "e": _int(e)}]}

    return build


def _ec_with(**changes: Any) -> Builder:
    def build(_: rsa.RSAPublicKey, p: ec.EllipticCurvePublicKey) -> Any:
        return {"keys": [{**ec_jwk(p, "P-256", 32), **changes}]}

    return build


def _rsa_with(**changes: Any) -> Builder:
    def build(r: rsa.RSAPublicKey, _: ec.EllipticCurvePublicKey) -> Any:
        return {"keys": [{**rsa_jwk(r), **changes}]}

    return build


def _off_curve(_: rsa.RSAPublicKey, p: ec.EllipticCurvePublicKey) -> Any:
    jwk = ec_jwk(p, "P-256", 32)
    y = p.public_numbers().y ^ 1
    return {"keys": [{**jwk, "y": b64url_encode(y.to_bytes(32, "big"))}]}


def _short_coordinate(_: rsa.RSAPublicKey, p: ec.EllipticCurvePublicKey) -> Any:
    jwk = ec_jwk(p, "P-256", 32)
    return {"keys": [{**jwk, "x": b64url_encode(b"\x01" * 31)}]}


def _okp(public: Any, crv: str) -> Builder:
    def build(_: rsa.RSAPublicKey, __: ec.EllipticCurvePublicKey) -> Any:
        raw = public.public_bytes(Encoding.Raw, PublicFormat.Raw)
        return {"keys": [{"kty": "OKP", "crv": crv, "x": b64url_encode(raw)}]}

    return build


def _duplicate_kid(r: rsa.RSAPublicKey, p: ec.EllipticCurvePublicKey) -> Any:
    return {"keys": [rsa_jwk(r, kid="same"), ec_jwk(p, "P-256", 32, kid="same")]}


def _duplicate_kid_unknown_kty(r: rsa.RSAPublicKey, _: ec.EllipticCurvePublicKey) -> Any:
    return {"keys": [rsa_jwk(r, kid="same"), {"kty": "AKP", "kid": "same", "pub": "AA"}]}


def _private_in_unknown_kty(r: rsa.RSAPublicKey, _: ec.EllipticCurvePublicKey) -> Any:
    return {"keys": [rsa_jwk(r), {"kty": "AKP", "pub": "AA", "d": "AA"}]}


def _roca(_: rsa.RSAPublicKey, __: ec.EllipticCurvePublicKey) -> Any:
    data = json.loads((WYCHEPROOF / "json_web_key_test.json").read_text())
    group = next(g for g in data["testGroups"] if g["comment"] == "jws_rsa_roca_key")
    return group["public"]


def _many(r: rsa.RSAPublicKey, _: ec.EllipticCurvePublicKey) -> Any:
    return {"keys": [rsa_jwk(r, kid=f"k{i}") for i in range(101)]}


REJECTED: list[tuple[str, Builder, str]] = [
    ("duplicate-kid", _duplicate_kid, "duplicate_kid"),
    ("duplicate-kid-with-skipped-key", _duplicate_kid_unknown_kty, "duplicate_kid"),
    *[(f"private-{m}", _rsa_with(**{m: "AQAB"}), "private_key") for m in ("d", "p", "q", "dp")],
    *[(f"private-{m}", _rsa_with(**{m: "AQAB"}), "private_key") for m in ("dq", "qi", "oth")],
    ("private-d-on-ec", _ec_with(d="AQAB"), "private_key"),
    ("private-in-unknown-kty", _private_in_unknown_kty, "private_key"),
    ("oct", lambda r, p: {"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}, "symmetric_key"),
    (
        "oct-beside-good-key",
        lambda r, p: {"keys": [rsa_jwk(r), {"kty": "oct", "k": "AA"}]},
        "symmetric_key",
    ),
    ("rsa-1024", _small_rsa, "weak_rsa"),
    ("rsa-e-1", _with_exponent(1), "bad_rsa_exponent"),
    ("rsa-e-even", _with_exponent(65536), "bad_rsa_exponent"),
    ("rsa-e-huge", _with_exponent(2**100 + 1), "bad_rsa_exponent"),
    ("rsa-roca", _roca, "roca_key"),
    ("rsa-alg-es256", _rsa_with(alg="ES256"), "bad_alg"),
    ("rsa-alg-encryption", _rsa_with(alg="RSA-OAEP"), "bad_alg"),
    ("rsa-alg-not-string", _rsa_with(alg=256), "bad_alg"),
    ("rsa-n-padded-base64", _rsa_with(n="AQAB=="), "bad_encoding"),
    ("rsa-n-missing", _rsa_with(n=DROP), "bad_member"),
    ("ec-crv-p192", _ec_with(crv="P-192"), "bad_curve"),
    ("ec-crv-secp256k1", _ec_with(crv="secp256k1"), "bad_curve"),
    ("ec-point-off-curve", _off_curve, "point_not_on_curve"),
    ("ec-short-coordinate", _short_coordinate, "point_not_on_curve"),
    ("ec-alg-es384-on-p256", _ec_with(alg="ES384"), "alg_curve_mismatch"),
    ("ec-alg-es521-typo", _ec_with(alg="ES521"), "alg_curve_mismatch"),
    ("ec-wrong-curve-p384", _ec_with(crv="P-384"), "point_not_on_curve"),
    ("okp-x25519", _okp(x25519.X25519PrivateKey.generate().public_key(), "X25519"), "bad_curve"),
    ("okp-ed448", _okp(ed448.Ed448PrivateKey.generate().public_key(), "Ed448"), "bad_curve"),
    ("use-enc", _rsa_with(use="enc"), "wrong_use"),
    ("key-ops-encrypt", _rsa_with(key_ops=["encrypt"]), "wrong_use"),
    ("key-ops-not-list", _rsa_with(key_ops="verify"), "wrong_use"),
    ("kid-int", _rsa_with(kid=123), "bad_kid"),
    ("kid-list", _rsa_with(kid=["a"]), "bad_kid"),
    ("kid-null", lambda r, p: {"keys": [{**rsa_jwk(r), "kid": None}]}, "bad_kid"),
    ("use-null", lambda r, p: {"keys": [{**rsa_jwk(r), "use": None}]}, "wrong_use"),
    ("alg-null", lambda r, p: {"keys": [{**rsa_jwk(r), "alg": None}]}, "bad_alg"),
    ("kty-missing", _rsa_with(kty=DROP), "bad_member"),
    ("key-not-object", lambda r, p: {"keys": ["RSA"]}, "bad_member"),
    ("keys-string", lambda r, p: {"keys": "x"}, "keys_not_list"),
    ("keys-object", lambda r, p: {"keys": {}}, "keys_not_list"),
    ("keys-missing", lambda r, p: {}, "keys_not_list"),
    ("keys-empty", lambda r, p: {"keys": []}, "empty_keyset"),
    ("only-unknown-kty", lambda r, p: {"keys": [{"kty": "AKP", "pub": "AA"}]}, "empty_keyset"),
    ("too-many-keys", _many, "too_many_keys"),
    ("top-level-list", lambda r, p: [rsa_jwk(r)], "bad_json"),
]


@pytest.mark.parametrize(
    ("builder", "reason"), [c[1:] for c in REJECTED], ids=[c[0] for c in REJECTED]
)
def test_poisoned_keyset_is_rejected_whole(
    builder: Builder,
    reason: str,
    rsa_public: rsa.RSAPublicKey,
    p256_public: ec.EllipticCurvePublicKey,
) -> None:
    """A key set with one unacceptable key is rejected as a whole with a stable reason."""
    document = builder(rsa_public, p256_public)
    if isinstance(document, dict) and isinstance(document.get("keys"), list):
        for key in document["keys"]:
            if isinstance(key, dict):
                for name in [k for k, v in key.items() if v is DROP]:
                    del key[name]
    with pytest.raises(KeySetError) as caught:
        parse_jwks(document)
    assert caught.value.reason == reason
    with pytest.raises(KeySetError) as caught_bytes:
        parse_jwks(json.dumps(document).encode())
    assert caught_bytes.value.reason == reason


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"<html>nope</html>", "bad_json"),
        (b'{"keys": [], "keys": []}', "bad_json"),
        (b'{"keys": [' * 40 + b"]" * 40 + b"}", "bad_json"),
        (b"\xef\xbb\xbf{}", "bad_json"),
        (b'{"keys": NaN}', "bad_json"),
        (b" " * (256 * 1024 + 1), "too_large"),
    ],
    ids=["html", "duplicate-member", "deep-nesting", "bom", "nan", "oversized"],
)
def test_jwks_bytes_must_be_strict_json(data: bytes, reason: str) -> None:
    """JWKS bytes that are not strict, bounded JSON are rejected before any key is looked at."""
    with pytest.raises(KeySetError) as caught:
        parse_jwks(data)
    assert caught.value.reason == reason


def test_unknown_kty_is_skipped(rsa_public: rsa.RSAPublicKey) -> None:
    """A key of an unknown type is skipped while the known keys of the set are kept."""
    keyset = parse_jwks(
        {"keys": [{"kty": "AKP", "kid": "pq", "pub": "AA"}, rsa_jwk(rsa_public, kid="r")]}
    )
    assert [k.kid for k in keyset.keys] == ["r"]
    assert keyset.find("pq", "RS256") is None


def test_error_message_names_no_key_material(rsa_public: rsa.RSAPublicKey) -> None:
    """A KeySetError message gives the reason and index, never the key's members."""
    jwk = rsa_jwk(rsa_public, d="c2VjcmV0LWV4cG9uZW50")
    with pytest.raises(KeySetError) as caught:
        parse_jwks({"keys": [jwk]})
    assert "c2VjcmV0" not in str(caught.value) and jwk["n"][:20] not in str(caught.value)


# --- key selection ---------------------------------------------------------------------------


def test_find_selects_by_kid_and_alg(
    rsa_public: rsa.RSAPublicKey, p256_public: ec.EllipticCurvePublicKey
) -> None:
    """find returns the key of the named kid only when it fits the token's algorithm."""
    keyset = parse_jwks(
        {"keys": [rsa_jwk(rsa_public, kid="r"), ec_jwk(p256_public, "P-256", 32, kid="e")]}
    )
    rsa_key = keyset.find("r", "RS256")
    assert rsa_key is not None and rsa_key.kty == "RSA"
    assert keyset.find("r", "PS512") is rsa_key
    ec_key = keyset.find("e", "ES256")
    assert ec_key is not None and ec_key.kty == "EC"
    assert keyset.find("r", "ES256") is None
    assert keyset.find("e", "RS256") is None
    assert keyset.find("e", "ES384") is None
    assert keyset.find("r", "HS256") is None
    assert keyset.find("unknown", "RS256") is None


def test_find_honours_jwk_alg(rsa_public: rsa.RSAPublicKey) -> None:
    """A JWK that names its alg fits that alg only (Wycheproof WrongPrimitive)."""
    keyset = parse_jwks({"keys": [rsa_jwk(rsa_public, kid="r", alg="PS256")]})
    assert keyset.find("r", "PS256") is not None
    assert keyset.find("r", "PS384") is None
    assert keyset.find("r", "RS256") is None


def test_find_without_kid_needs_exactly_one_fitting_key(
    rsa_public: rsa.RSAPublicKey, p256_public: ec.EllipticCurvePublicKey
) -> None:
    """Without a kid a key is chosen only when exactly one fits; two RSA keys give none."""
    other = rsa.generate_private_key(65537, 2048).public_key()
    mixed = parse_jwks(
        {"keys": [rsa_jwk(rsa_public, kid="r"), ec_jwk(p256_public, "P-256", 32, kid="e")]}
    )
    rsa_key = mixed.find(None, "RS256")
    assert rsa_key is not None and rsa_key.kid == "r"
    two_rsa = parse_jwks({"keys": [rsa_jwk(rsa_public, kid="a"), rsa_jwk(other, kid="b")]})
    assert two_rsa.find(None, "RS256") is None
    assert two_rsa.kids() == {"a", "b"}


# --- strict decoders -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["AB", "A", "QQ=", "QQ==", "Q Q", "Q+Q/", "QR", "AAF"],
    ids=[
        "unused-bits",
        "len-1-mod-4",
        "pad1",
        "pad2",
        "space",
        "std-alphabet",
        "qr-bits",
        "aaf-bits",
    ],
)
def test_b64url_decode_rejects_non_canonical(text: str) -> None:
    """base64url input with padding, foreign characters or non-zero unused bits is refused."""
    with pytest.raises(JoseDecodeError) as caught:
        b64url_decode(text)
    assert caught.value.reason == "bad_encoding"


def test_b64url_round_trips() -> None:
    """Canonical base64url decodes to the bytes that encode back to it."""
    for data in (b"", b"\x00", b"ab", b"abc", bytes(range(256))):
        assert b64url_decode(b64url_encode(data)) == data


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b'{"a":1,"a":2}', "duplicate_member"),
        (b'{"a":1,"\\u0061":2}', "duplicate_member"),
        (b'{"a":NaN}', "bad_json"),
        (b'{"a":-Infinity}', "bad_json"),
        (b'{"a":1e400}', "bad_json"),
        (b"[" * 10_000 + b"]" * 10_000, "bad_json"),
        (b'{"a":"\\ud800"}', "bad_encoding"),
        (b'{"a":"\xed\xa0\x80"}', "bad_encoding"),
        (b'{"a":"\xc0\xaf"}', "bad_encoding"),
        (b"\xef\xbb\xbf{}", "bad_encoding"),
        ('{"a":1}'.encode("utf-16"), "bad_encoding"),
        (b'{"a":"caf\xe9"}', "bad_encoding"),
        (b'{"a":' + b"1" * 5000 + b"}", "bad_json"),
        (b'{"a":1', "bad_json"),
    ],
    ids=[
        "duplicate",
        "duplicate-escaped",
        "nan",
        "neg-infinity",
        "float-overflow",
        "depth-10000",
        "escaped-lone-surrogate",
        "utf8-surrogate",
        "overlong",
        "bom",
        "utf-16",
        "latin-1",
        "int-5000-digits",
        "truncated",
    ],
)
def test_loads_strict_json_rejects(data: bytes, reason: str) -> None:
    """Strict JSON refuses duplicates, non-finite numbers, deep nesting and non-UTF-8 input."""
    with pytest.raises(JoseDecodeError) as caught:
        loads_strict_json(data)
    assert caught.value.reason == reason


def test_loads_strict_json_depth_boundary() -> None:
    """Nesting of exactly 16 parses; 17 does not; brackets inside strings do not count."""
    assert loads_strict_json(b"[" * 16 + b"]" * 16) is not None
    with pytest.raises(JoseDecodeError):
        loads_strict_json(b"[" * 17 + b"]" * 17)
    assert loads_strict_json(b'{"a":"[[[[[[[[[[[[[[[[[[[[\\"[[["}') == {
        "a": '[[[[[[[[[[[[[[[[[[[["[[['
    }


def test_roca_fingerprint_spares_generated_keys(rsa_public: rsa.RSAPublicKey) -> None:
    """Keys from a sound generator do not carry the ROCA fingerprint."""
    assert not is_roca_modulus(rsa_public.public_numbers().n)
    assert not is_roca_modulus(
        rsa.generate_private_key(65537, 2048).public_key().public_numbers().n
    )


def test_keys_compare_by_public_material(rsa_public: rsa.RSAPublicKey) -> None:
    """Two parses of one JWK are equal and hashable; another key under the same kid is not equal."""
    first = parse_jwk(rsa_jwk(rsa_public, kid="r"))
    again = parse_jwk(rsa_jwk(rsa_public, kid="r"))
    other = parse_jwk(rsa_jwk(rsa.generate_private_key(65537, 2048).public_key(), kid="r"))
    assert first == again and hash(first) == hash(again)
    assert first != other
    assert len({first, again, other}) == 2
