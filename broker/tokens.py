"""Parse and verify compact JWS JWTs: framing, header rules, signature, registered claims.

Owns the decision "is this token authentic and current for this issuer". Pure: talks to no
external system and never reads the clock (`now` is passed in); keys come from `broker.jwk`
(fetched by `broker.issuers`). Built on `cryptography` alone so that every check is ours to see.

Order of work, cheapest first, and everything before any cryptography, so junk costs no
signature check:
length cap, then the compact-form regex, then per-segment caps, canonical base64url, strict
UTF-8/JSON, then header rules. `verify_signature` enforces the issuer's algorithm allowlist and
the key/alg binding; `validate_claims` checks iss/aud/exp/iat/nbf/sub/jti.

Every failure raises TokenError with a stable `reason` for the audit record; `str(exc)` is a
generic sentence that never contains token bytes or claim values.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import Any, Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from broker.errors import BrokerException
from broker.jwk import JoseDecodeError, VerificationKey, b64url_decode, loads_strict_json

MAX_TOKEN_LENGTH: Final = 8192  # CI ID tokens are 1-2 KiB; bounds all work on one token
MAX_HEADER_BYTES: Final = 1024  # decoded; joserfc's header limit is 512, real headers ~100 B
MAX_SIGNATURE_BYTES: Final = 1024  # an RSA-8192 signature, the largest key jwk.py accepts
MAX_KID_LENGTH: Final = 256
MAX_JTI_LENGTH: Final = 256
MAX_NUMERIC_DATE: Final = 2**40  # year ~36812; bounds arithmetic on attacker integers (2**70)

_COMPACT_JWT: Final = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
# RFC 7515 allows an empty payload; only the raw-JWS layer (Wycheproof) needs that.
_COMPACT_JWS: Final = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+")
_KID_CHARS: Final = re.compile(r"[\x20-\x7e]+")  # printable ASCII: no NUL, newline or Unicode

# Header members that point at keys or certificates: never dereferenced, never trusted. Any
# token carrying one is refused outright (RFC 8725 §3.10): a token must not choose the key that
# verifies it. `enc`, `zip`, `epk` and `p2c` mark JWE, compression, ECDH-ES or PBES2, which a
# signed JWT never uses (nothing to decrypt or inflate before the signature is checked).
_FORBIDDEN_HEADERS: Final = frozenset({"jku", "x5u", "x5c", "jwk", "enc", "zip", "epk", "p2c"})
# A DPoP proof carries its own public key (`jwk`); every other key pointer is still refused.
_FORBIDDEN_HEADERS_PROOF: Final = _FORBIDDEN_HEADERS - {"jwk"}

_RSA_PKCS1: Final = {"RS256": hashes.SHA256(), "RS384": hashes.SHA384(), "RS512": hashes.SHA512()}
_RSA_PSS: Final = {"PS256": hashes.SHA256(), "PS384": hashes.SHA384(), "PS512": hashes.SHA512()}
_ECDSA: Final = {"ES256": hashes.SHA256(), "ES384": hashes.SHA384(), "ES512": hashes.SHA512()}
_EDDSA: Final = frozenset({"EdDSA", "Ed25519"})
SUPPORTED_ALGORITHMS: Final = frozenset((*_RSA_PKCS1, *_RSA_PSS, *_ECDSA, *_EDDSA))

# Group orders (SEC 2 v2 §2.4.2, 2.5.1, 2.6.1) and coordinate sizes of the ES* curves.
_EC_ORDER: Final = {
    "secp256r1": 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551,
    "secp384r1": int(
        "FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF"
        "581A0DB248B0A77AECEC196ACCC52973",
        16,
    ),
    "secp521r1": int(
        "01FF" + "FFFFFFFF" * 7 + "FFFFFFFA"
        "51868783BF2F966B7FCC0148F709A5D03BB5C9B8899C47AEBB6FB71E91386409",
        16,
    ),
}
_EC_COORD_BYTES: Final = {"secp256r1": 32, "secp384r1": 48, "secp521r1": 66}
# Ed25519 group order L (RFC 8032 §5.1); S >= L is a malleable signature (RFC 8032 §5.1.7).
_ED25519_L: Final = 2**252 + 27742317777372353535851937790883648493

_MESSAGES: Final = {
    "malformed": "The token is not a compact JWS.",
    "too_large": "The token is too large.",
    "bad_encoding": "The token is not canonically encoded.",
    "bad_json": "The token contains invalid JSON.",
    "duplicate_member": "The token contains a duplicated JSON member.",
    "bad_header": "The token header is invalid.",
    "alg_none": "Unsigned tokens are not accepted.",
    "alg_not_allowed": "The token's algorithm is not allowed.",
    "forbidden_header": "The token header carries a member that is not accepted.",
    "unsupported_crit": "The token requires an extension that is not supported.",
    "bad_kid": "The token's key identifier is invalid.",
    "nested_jwt": "Nested tokens are not accepted.",
    "key_alg_mismatch": "The token's algorithm does not fit its key.",
    "bad_signature": "The token's signature is invalid.",
    "expired": "The token has expired.",
    "not_yet_valid": "The token is not valid yet.",
    "issued_in_future": "The token was issued in the future.",
    "lifetime_exceeded": "The token's lifetime is too long.",
    "missing_claim": "The token lacks a required claim.",
    "bad_claim_type": "A token claim has the wrong type.",
    "wrong_issuer": "The token's issuer is not accepted.",
    "wrong_audience": "The token's audience is not accepted.",
    "missing_jti": "The token lacks a token identifier.",
}


class TokenError(BrokerException):
    """A token we refuse; `reason` is the stable code the audit record carries."""

    def __init__(self, reason: str) -> None:
        super().__init__(_MESSAGES.get(reason, "The token is not acceptable."))
        self.reason = reason

    def __repr__(self) -> str:
        return f"TokenError({self.reason!r})"


@dataclass(frozen=True)
class ParsedJws:
    """A compact JWS whose header passed every rule; payload still opaque, signature unchecked."""

    header: Mapping[str, Any]
    payload: bytes = field(repr=False)
    signing_input: bytes = field(repr=False)
    signature: bytes = field(repr=False)
    sha256: str

    @property
    def kid(self) -> str | None:
        kid = self.header.get("kid")
        return kid if isinstance(kid, str) else None

    @property
    def alg(self) -> str:
        return str(self.header["alg"])


@dataclass(frozen=True)
class UnverifiedToken:
    """A JWT parsed and screened, signature not yet verified: trust nothing in it yet."""

    header: Mapping[str, Any]
    claims: Mapping[str, Any] = field(repr=False)
    signing_input: bytes = field(repr=False)
    signature: bytes = field(repr=False)
    sha256: str  # hex sha256 of the raw token: what the audit records, never the token

    @property
    def signed_sha256(self) -> str:
        """Hex SHA-256 of the signing input (`header.payload`), the bytes the signature covers.

        The replay key for tokens without `jti`: a signature can be re-encoded without the
        issuer's key (an ECDSA (r, s) has the twin (r, n - s)), so a key over the whole token
        would let one spent token pass again under a second encoding.
        """
        return hashlib.sha256(self.signing_input).hexdigest()

    @property
    def kid(self) -> str | None:
        kid = self.header.get("kid")
        return kid if isinstance(kid, str) else None

    @property
    def alg(self) -> str:
        return str(self.header["alg"])


def token_sha256(raw: str) -> str:
    """Hex SHA-256 of the raw token text (audit, replay ledger when a token has no jti)."""
    return hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest()


def _decode_json_segment(segment: str) -> Any:
    try:
        return loads_strict_json(b64url_decode(segment))
    except JoseDecodeError as exc:
        raise TokenError(exc.reason) from exc


def _check_header(header: Any, forbidden: frozenset[str]) -> None:
    if not isinstance(header, dict):
        raise TokenError("malformed")
    alg = header.get("alg")
    if not isinstance(alg, str) or not alg:
        raise TokenError("bad_header")  # missing, null, number or list
    if alg.strip().lower() == "none":
        raise TokenError("alg_none")  # "none", "NONE", "nOnE", "none "
    if forbidden & header.keys():
        raise TokenError("forbidden_header")
    # We implement no JWS extension, so any `crit` (even empty or malformed) is refused
    # (RFC 7515 §4.1.11); `b64` only has meaning through crit (RFC 7797), refused either way.
    if "crit" in header or "b64" in header:
        raise TokenError("unsupported_crit")
    if "kid" in header:
        kid = header["kid"]
        if not isinstance(kid, str) or len(kid) > MAX_KID_LENGTH or not _KID_CHARS.fullmatch(kid):
            raise TokenError("bad_kid")
    if "cty" in header:
        cty = header["cty"]
        if not isinstance(cty, str):
            raise TokenError("bad_header")
        if cty.lower() in ("jwt", "application/jwt"):
            raise TokenError("nested_jwt")  # RFC 8725 §3.3: no token inside a token
    if "typ" in header and not isinstance(header["typ"], str):
        raise TokenError("bad_header")


# Headers that passed every rule, by their encoded text: one issuer signs every token with the
# same few headers, so decoding and checking one again was a fifth of parsing a token. Bounded,
# and emptied when full, so headers made up by a client cannot grow it; they only miss.
_HEADERS: dict[tuple[str, frozenset[str]], Mapping[str, Any]] = {}
_HEADERS_KEPT = 64
_SHAREABLE = frozenset({str, int, bool, float, type(None)})


def _header(header_b64: str, forbidden: frozenset[str]) -> Mapping[str, Any]:
    """The decoded, checked header, read-only (shared by every token that carries it)."""
    key = (header_b64, forbidden)
    header = _HEADERS.get(key)
    if header is None:
        decoded = _decode_json_segment(header_b64)
        _check_header(decoded, forbidden)
        header = MappingProxyType(decoded)
        if all(type(v) in _SHAREABLE for v in decoded.values()):
            # Only flat headers: a nested value (a DPoP proof's `jwk`) could be changed by one
            # reader under the next.
            if len(_HEADERS) >= _HEADERS_KEPT:
                _HEADERS.clear()
            _HEADERS[key] = header
    return header


def _parse(
    raw: object,
    max_length: int,
    pattern: re.Pattern[str],
    forbidden: frozenset[str] = _FORBIDDEN_HEADERS,
) -> ParsedJws:
    if not isinstance(raw, str):
        raise TokenError("malformed")
    if len(raw) > max_length:
        raise TokenError("too_large")  # before any other work on attacker-sized input
    if not raw:
        raise TokenError("malformed")
    if not pattern.fullmatch(raw):
        raise TokenError("malformed")
    header_b64, payload_b64, signature_b64 = raw.split(".")
    # base64url expands 3 bytes to 4 characters
    if len(header_b64) > MAX_HEADER_BYTES * 4 // 3 + 2:
        raise TokenError("too_large")
    if len(signature_b64) > MAX_SIGNATURE_BYTES * 4 // 3 + 2:
        raise TokenError("too_large")
    header = _header(header_b64, forbidden)
    try:
        payload = b64url_decode(payload_b64)
        signature = b64url_decode(signature_b64)
    except JoseDecodeError as exc:
        raise TokenError(exc.reason) from exc
    return ParsedJws(
        header=header,
        payload=payload,
        signing_input=f"{header_b64}.{payload_b64}".encode("ascii"),
        signature=signature,
        sha256=token_sha256(raw),
    )


def parse_jws(raw: str, *, max_length: int = MAX_TOKEN_LENGTH) -> ParsedJws:
    """Parse a compact JWS with an opaque (possibly empty) payload under the same header rules
    as parse_token. For conformance suites; the broker itself only handles JWTs."""
    return _parse(raw, max_length, _COMPACT_JWS)


def parse_token(
    raw: str, *, max_length: int = MAX_TOKEN_LENGTH, embedded_key: bool = False
) -> UnverifiedToken:
    """Parse a compact JWS JWT; reject anything malformed before any cryptography runs.

    `embedded_key`: the header's `jwk` member is allowed (every other key or certificate
    pointer still is not). Only for DPoP proofs (RFC 9449 §4.2), whose signing key is the public
    key the header carries and which are trusted only through that key's thumbprint; a subject
    token never chooses its own key.
    """
    forbidden = _FORBIDDEN_HEADERS_PROOF if embedded_key else _FORBIDDEN_HEADERS
    jws = _parse(raw, max_length, _COMPACT_JWT, forbidden)
    try:
        claims = loads_strict_json(jws.payload)
    except JoseDecodeError as exc:
        raise TokenError(exc.reason) from exc
    if not isinstance(claims, dict):
        raise TokenError("malformed")  # `[]`, `"x"`, `1`, `null`
    return UnverifiedToken(
        header=jws.header,
        claims=MappingProxyType(claims),
        signing_input=jws.signing_input,
        signature=jws.signature,
        sha256=jws.sha256,
    )


def _verify_rsa(key: rsa.RSAPublicKey, alg: str, message: bytes, signature: bytes) -> None:
    modulus = key.public_numbers().n
    # RFC 8017 §8.2.2/§8.1.2: the signature is exactly k octets and, as an integer, below n.
    if len(signature) != (modulus.bit_length() + 7) // 8:
        raise InvalidSignature
    if int.from_bytes(signature, "big") >= modulus:
        raise InvalidSignature
    if alg in _RSA_PKCS1:
        key.verify(signature, message, padding.PKCS1v15(), _RSA_PKCS1[alg])
        return
    digest = _RSA_PSS[alg]
    # RFC 7518 §3.5: MGF1 with the same hash, salt length = hash output length.
    pss = padding.PSS(mgf=padding.MGF1(digest), salt_length=digest.digest_size)
    key.verify(signature, message, pss, digest)


def _verify_ecdsa(
    key: ec.EllipticCurvePublicKey, alg: str, message: bytes, signature: bytes
) -> None:
    curve = key.curve.name
    size, order = _EC_COORD_BYTES[curve], _EC_ORDER[curve]
    # RFC 7518 §3.4: raw R || S, each exactly the coordinate size; DER or padded forms refused.
    if len(signature) != 2 * size:
        raise InvalidSignature
    r = int.from_bytes(signature[:size], "big")
    s = int.from_bytes(signature[size:], "big")
    # Psychic signatures (CVE-2022-21449): r, s must lie in [1, n-1], checked here, not trusted
    # to the backend.
    if not (0 < r < order and 0 < s < order):
        raise InvalidSignature
    # (r, s) and (r, n - s) both verify, so anyone holding a token can make a second encoding of
    # it without the key. Both are accepted: JWS does not require low-S and stock signers (Go,
    # KMS, HSMs) produce high S about half the time, so refusing it would refuse every second
    # token of such an issuer. What must not be possible is spending one token twice; the replay
    # ledger therefore keys jti-less tokens on `signed_sha256` (the signing input), which both
    # encodings share.
    key.verify(encode_dss_signature(r, s), message, ec.ECDSA(_ECDSA[alg]))


def _verify_ed25519(key: Ed25519PublicKey, message: bytes, signature: bytes) -> None:
    if len(signature) != 64 or int.from_bytes(signature[32:], "little") >= _ED25519_L:
        raise InvalidSignature
    key.verify(signature, message)


def verify_signature(
    token: UnverifiedToken | ParsedJws,
    key: VerificationKey,
    algorithms: Sequence[str],
) -> None:
    """Verify the signature with `key`, allowing only `algorithms` (the issuer's allowlist,
    never the header's say-so). HS* is never supported: no symmetric keys exist here."""
    if isinstance(algorithms, str):  # "RS256" would allow every substring of itself
        raise TypeError("algorithms must be a sequence of names, not a string")
    alg = token.alg
    if alg not in algorithms or alg not in SUPPORTED_ALGORITHMS:
        raise TokenError("alg_not_allowed")
    if not key.fits(alg):
        raise TokenError("key_alg_mismatch")  # kty/crv/JWK alg disagree (RFC 8725 §3.1)
    public_key = key.public_key
    try:
        if alg in _RSA_PKCS1 or alg in _RSA_PSS:
            if not isinstance(public_key, rsa.RSAPublicKey):
                raise TokenError("key_alg_mismatch")
            _verify_rsa(public_key, alg, token.signing_input, token.signature)
        elif alg in _ECDSA:
            if not isinstance(public_key, ec.EllipticCurvePublicKey):
                raise TokenError("key_alg_mismatch")
            _verify_ecdsa(public_key, alg, token.signing_input, token.signature)
        else:
            if not isinstance(public_key, Ed25519PublicKey):
                raise TokenError("key_alg_mismatch")
            _verify_ed25519(public_key, token.signing_input, token.signature)
    except (InvalidSignature, ValueError) as exc:
        raise TokenError("bad_signature") from exc


def _numeric_date(claims: Mapping[str, Any], name: str, *, required: bool) -> int | None:
    if name not in claims:
        if required:
            raise TokenError("missing_claim")
        return None
    value = claims[name]
    # RFC 7519 NumericDate, narrowed: JSON integers only. Floats are refused even when integral
    # (1.5e9 and 1500000000.0 alike): no CI issuer sends them, and one rule is easier to audit.
    # bool is an int subclass in Python, so it is excluded by name.
    if isinstance(value, bool) or not isinstance(value, int):
        raise TokenError("bad_claim_type")
    if not 0 <= value <= MAX_NUMERIC_DATE:
        raise TokenError("bad_claim_type")
    return value


def _non_empty_str(claims: Mapping[str, Any], name: str, missing: str) -> str:
    if name not in claims:
        raise TokenError(missing)
    value = claims[name]
    if not isinstance(value, str) or not value:
        raise TokenError("bad_claim_type")
    return value


def validate_claims(
    claims: Mapping[str, Any],
    *,
    issuer: str,
    audiences: Sequence[str],
    now: datetime,
    leeway: int,
    max_lifetime: int,
    require_jti: bool,
) -> None:
    """Check the registered claims of a signature-verified token against one issuer profile.

    `iss` must equal `issuer` exactly; `aud` (string or non-empty list of strings) must share
    an entry with `audiences`; `exp` and `iat` are required, `nbf` optional, all within
    `leeway` seconds; `exp - iat` at most `max_lifetime`; `sub` a non-empty string; `jti` a
    non-empty string of at most 256 characters, required when `require_jti`.
    """
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be an aware datetime")
    if leeway < 0:
        raise ValueError("leeway must not be negative")
    if isinstance(audiences, str):  # `aud in "https://broker..."` would be a substring match
        raise TypeError("audiences must be a sequence of strings, not a string")

    iss = _non_empty_str(claims, "iss", "missing_claim")
    if iss != issuer:  # exact, byte-for-byte: a trailing / or case change is another issuer
        raise TokenError("wrong_issuer")

    if "aud" not in claims:
        raise TokenError("missing_claim")
    aud = claims["aud"]
    if isinstance(aud, str):
        presented = [aud]
    elif isinstance(aud, list) and aud and all(isinstance(a, str) for a in aud):
        presented = aud
    else:
        raise TokenError("bad_claim_type")  # [], [["broker"]], 1, null
    # Any-of, as Vault and SPIRE do. An empty `audiences` allowlist matches nothing: the
    # vacuous case denies, so a misconfigured issuer cannot accept every audience.
    if not any(entry in audiences for entry in presented):
        raise TokenError("wrong_audience")

    exp = _numeric_date(claims, "exp", required=True)
    iat = _numeric_date(claims, "iat", required=True)
    nbf = _numeric_date(claims, "nbf", required=False)
    assert exp is not None and iat is not None
    current = now.timestamp()
    if current > exp + leeway:  # boundary: now == exp + leeway is still accepted
        raise TokenError("expired")
    if nbf is not None and nbf > current + leeway:
        raise TokenError("not_yet_valid")
    if iat > current + leeway:
        raise TokenError("issued_in_future")
    if exp - iat > max_lifetime:
        raise TokenError("lifetime_exceeded")

    _non_empty_str(claims, "sub", "missing_claim")

    if "jti" in claims or require_jti:
        jti = _non_empty_str(claims, "jti", "missing_jti")
        if len(jti) > MAX_JTI_LENGTH:
            raise TokenError("bad_claim_type")
