"""JWK and JWKS parsing into verification keys, and the strict JOSE encodings they share.

Owns what counts as an acceptable public signing key (RFC 7517/7518/8037) and the two strict
decoders every JOSE object here goes through: canonical base64url and duplicate-free, depth-capped
JSON.
Pure: talks to no external system; `broker.issuers` fetches the bytes and hands them in, and
`broker.tokens` verifies signatures with the keys built here.

A key set is all-or-nothing: one poisoned key (private member, symmetric key, weak RSA, off-curve
point, duplicate `kid`, ...) rejects the whole set, so the caller keeps its last good keys
(Wycheproof `json_web_key_test.json` exercises this).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from broker.errors import BrokerException

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | Ed25519PublicKey

# --- strict encodings -------------------------------------------------------------------------

_B64URL_CHARS: Final = re.compile(r"[A-Za-z0-9_-]*")
_B64URL_VALUE: Final = {
    c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
}
_UNUSED_BITS: Final = {2: 0x0F, 3: 0x03}  # by the length of the last, partial quantum
MAX_JSON_DEPTH: Final = 16  # JWT headers/claims and JWKS nest 3-4 levels; 16 leaves room, no more


class JoseDecodeError(BrokerException, ValueError):
    """Bytes that are not strict base64url / UTF-8 / JSON; `reason` is a stable code."""

    def __init__(self, reason: str) -> None:
        super().__init__("input is not strictly encoded")
        self.reason = reason


def b64url_encode(data: bytes) -> str:
    """Unpadded base64url (RFC 7515 §2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Decode canonical unpadded base64url; reject padding, stray characters, length 1 mod 4
    and non-zero unused trailing bits (Wycheproof tc374/375), so one value has one encoding."""
    tail = len(text) % 4
    if not _B64URL_CHARS.fullmatch(text) or tail == 1:
        raise JoseDecodeError("bad_encoding")
    # The last character of a 2- or 3-character tail carries 4 or 2 unused bits, which must be
    # zero: the same test as re-encoding and comparing, without the re-encoding.
    if tail and _B64URL_VALUE[text[-1]] & _UNUSED_BITS[tail]:
        raise JoseDecodeError("bad_encoding")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise JoseDecodeError("bad_encoding") from exc


# A JSON string (escapes included; an unterminated one runs to the end) or a bracket.
_JSON_STRING_OR_BRACKET: Final = re.compile(r'"(?:[^"\\]|\\.)*"?|[\[\]{}]', re.DOTALL)


def _json_depth_ok(text: str, limit: int) -> bool:
    """True when `[`/`{` nesting outside strings never exceeds `limit`; run before json.loads so
    10,000 nested brackets cost a linear scan, not a RecursionError."""
    depth = 0
    for match in _JSON_STRING_OR_BRACKET.finditer(text):
        token = match.group()
        if token in ("[", "{"):
            depth += 1
            if depth > limit:
                return False
        elif token in ("]", "}"):
            depth -= 1
    return True


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # RFC 7515 §4 / RFC 7519 §4 allow "reject or last-wins"; we reject, because two parsers reading
    # one token differently is how a check gets bypassed.
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise JoseDecodeError("duplicate_member")
        obj[key] = value
    return obj


def _reject_constant(name: str) -> Any:
    raise JoseDecodeError("bad_json")  # NaN, Infinity, -Infinity are not JSON (RFC 8259 §6)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400 parses to inf
        raise JoseDecodeError("bad_json")
    return value


def _check_strings(value: Any) -> None:
    """Reject lone surrogates smuggled in as `\\ud800` escapes: they cannot be re-encoded as
    UTF-8 and would fail later, far from here (audit, policy)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise JoseDecodeError("bad_encoding") from exc
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def loads_strict_json(data: bytes, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse UTF-8 JSON strictly: no BOM, no invalid UTF-8 (overlong forms, encoded surrogates),
    no duplicate members, no NaN/Infinity/overflowing floats, nesting at most `max_depth`.

    Raises JoseDecodeError with reason bad_encoding, bad_json or duplicate_member.
    """
    try:
        text = data.decode("utf-8")  # the strict codec rejects overlong and surrogate sequences
    except UnicodeDecodeError as exc:
        raise JoseDecodeError("bad_encoding") from exc
    if text.startswith("\ufeff"):  # RFC 8259 §8.1: MUST NOT add a BOM
        raise JoseDecodeError("bad_encoding")
    # Nesting never exceeds the number of openers: most documents need no scan at all.
    openers = text.count("{") + text.count("[")
    if openers > max_depth and not _json_depth_ok(text, max_depth):
        raise JoseDecodeError("bad_json")
    try:
        value = json.loads(
            text,
            object_pairs_hook=_reject_duplicates,
            parse_constant=_reject_constant,
            parse_float=_finite_float,
        )
    except JoseDecodeError:
        raise
    except (ValueError, RecursionError) as exc:
        # ValueError covers JSONDecodeError and ints beyond sys.int_info.str_digits_check_threshold
        raise JoseDecodeError("bad_json") from exc
    if "\\u" in text:
        # Strictly decoded UTF-8 holds no surrogates, so only a \u escape can introduce one.
        _check_strings(value)
    return value


# --- keys -------------------------------------------------------------------------------------

MAX_KEYS: Final = 100  # real IdPs publish 1-4 keys; octo-sts-style bound on attacker-sized sets
MAX_JWKS_BYTES: Final = 256 * 1024  # matches the fetch cap in broker.issuers
MIN_RSA_BITS: Final = 2048  # NIST SP 800-131A; Wycheproof tc8 rejects 1024
MAX_RSA_BITS: Final = 8192  # bounds verification cost; no IdP uses more than 4096
MAX_RSA_EXPONENT_BITS: Final = 64  # e is 65537 in practice; huge e is a CPU lever

PRIVATE_MEMBERS: Final = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})

RSA_ALGS: Final = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
EC_ALG_FOR_CURVE: Final = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}
# "EdDSA" (RFC 8037) and the fully specified "Ed25519" (RFC 9864) name the same primitive here.
OKP_ALGS: Final = frozenset({"EdDSA", "Ed25519"})

_CURVES: Final[Mapping[str, ec.EllipticCurve]] = {
    "P-256": ec.SECP256R1(),
    "P-384": ec.SECP384R1(),
    "P-521": ec.SECP521R1(),
}
_COORD_BYTES: Final = {"P-256": 32, "P-384": 48, "P-521": 66}

# ROCA (CVE-2017-15361) fingerprint, Nemec et al. 2017: a modulus from the flawed Infineon
# generator has n mod p inside the subgroup generated by 65537 for every one of these primes.
_ROCA_PRIMES: Final = (
    *(3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71, 73, 79, 83, 89),
    *(97, 101, 103, 107, 109, 113, 127, 131, 137, 139, 149, 151, 157, 163, 167),
)


def _subgroup_mask(prime: int) -> int:
    mask, element = 0, 1
    while not mask >> element & 1:
        mask |= 1 << element
        element = element * 65537 % prime
    return mask


_ROCA_MASKS: Final = tuple((p, _subgroup_mask(p)) for p in _ROCA_PRIMES)


def is_roca_modulus(n: int) -> bool:
    """True when `n` carries the ROCA fingerprint (false-positive rate about 2**-154)."""
    return all(mask >> (n % prime) & 1 for prime, mask in _ROCA_MASKS)


class KeySetError(BrokerException, ValueError):
    """A JWK or JWKS we refuse. `reason` is a stable code; the message names no key material."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"key set rejected: {reason}" + (f" ({detail})" if detail else ""))
        self.reason = reason


@dataclass(frozen=True)
class VerificationKey:
    """One public signing key, validated; `alg`/`crv` as the JWK stated them."""

    kid: str | None
    kty: str  # "RSA" | "EC" | "OKP"
    alg: str | None
    crv: str | None
    # cryptography's key objects are unhashable, so equality and hashing go through `jkt`,
    # the RFC 7638 thumbprint: two keys are equal only when their public material is.
    public_key: PublicKey = field(repr=False, compare=False)
    jkt: str = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "jkt", self._compute_thumbprint())

    def fits(self, alg: str) -> bool:
        """Whether a JWS with header `alg` may be verified with this key (RFC 8725 §3.1)."""
        if self.alg is not None and self.alg != alg:
            return False
        if self.kty == "RSA":
            return alg in RSA_ALGS
        if self.kty == "EC":
            return self.crv is not None and EC_ALG_FOR_CURVE.get(self.crv) == alg
        return self.kty == "OKP" and alg in OKP_ALGS

    def thumbprint(self) -> str:
        """RFC 7638 JWK thumbprint (SHA-256, base64url) over the required public members."""
        return self.jkt

    def _compute_thumbprint(self) -> str:
        key = self.public_key
        members: dict[str, str]
        if isinstance(key, rsa.RSAPublicKey):
            numbers = key.public_numbers()
            members = {"e": _b64_int(numbers.e), "kty": "RSA", "n": _b64_int(numbers.n)}
        elif isinstance(key, ec.EllipticCurvePublicKey):
            assert self.crv is not None
            size = _COORD_BYTES[self.crv]
            point = key.public_numbers()
            members = {
                "crv": self.crv,
                "kty": "EC",
                "x": b64url_encode(point.x.to_bytes(size, "big")),
                "y": b64url_encode(point.y.to_bytes(size, "big")),
            }
        else:
            raw = key.public_bytes(Encoding.Raw, PublicFormat.Raw)
            members = {"crv": "Ed25519", "kty": "OKP", "x": b64url_encode(raw)}
        canonical = json.dumps(members, separators=(",", ":"), sort_keys=True)
        return b64url_encode(hashlib.sha256(canonical.encode("ascii")).digest())


def _b64_int(value: int) -> str:
    return b64url_encode(value.to_bytes((value.bit_length() + 7) // 8 or 1, "big"))


def _member_bytes(obj: Mapping[str, Any], name: str) -> bytes:
    value = obj.get(name)
    if not isinstance(value, str) or not value:
        raise KeySetError("bad_member", f"{name} missing or not a string")
    try:
        return b64url_decode(value)
    except JoseDecodeError as exc:
        raise KeySetError("bad_encoding", name) from exc


def _parse_rsa(obj: Mapping[str, Any]) -> rsa.RSAPublicKey:
    # NOTE: a leading zero octet on n (RFC 7518 §6.3.1.1 says MUST NOT) is tolerated: some IdP
    # libraries emit it, and the value is still unambiguous.
    n = int.from_bytes(_member_bytes(obj, "n"), "big")
    e = int.from_bytes(_member_bytes(obj, "e"), "big")
    if n.bit_length() < MIN_RSA_BITS:
        raise KeySetError("weak_rsa", f"modulus {n.bit_length()} bits")
    if n.bit_length() > MAX_RSA_BITS:
        raise KeySetError("weak_rsa", "modulus too large")
    if e < 3 or e % 2 == 0 or e.bit_length() > MAX_RSA_EXPONENT_BITS:
        raise KeySetError("bad_rsa_exponent")
    if is_roca_modulus(n):
        raise KeySetError("roca_key")
    try:
        return rsa.RSAPublicNumbers(e, n).public_key()
    except ValueError as exc:
        raise KeySetError("bad_member", "RSA numbers") from exc


def _parse_ec(obj: Mapping[str, Any], crv: str) -> ec.EllipticCurvePublicKey:
    size = _COORD_BYTES[crv]
    x_raw, y_raw = _member_bytes(obj, "x"), _member_bytes(obj, "y")
    if len(x_raw) != size or len(y_raw) != size:  # RFC 7518 §6.2.1.2: full coordinate size
        raise KeySetError("point_not_on_curve", "coordinate length")
    numbers = ec.EllipticCurvePublicNumbers(
        int.from_bytes(x_raw, "big"), int.from_bytes(y_raw, "big"), _CURVES[crv]
    )
    try:
        return numbers.public_key()
    except ValueError as exc:  # cryptography checks the point is on the curve
        raise KeySetError("point_not_on_curve") from exc


def parse_jwk(obj: Mapping[str, Any]) -> VerificationKey:
    """Validate one public JWK and build its verification key; raise KeySetError otherwise.

    Reason `unsupported_kty` marks a key type we do not know (parse_jwks skips those).
    """
    if not isinstance(obj, Mapping):
        raise KeySetError("bad_member", "key is not an object")
    kty = obj.get("kty")
    if not isinstance(kty, str):
        raise KeySetError("bad_member", "kty missing or not a string")
    if kty == "oct":
        raise KeySetError("symmetric_key")  # no HMAC anywhere: no key-confusion surface
    if PRIVATE_MEMBERS & obj.keys():
        raise KeySetError("private_key")
    # Presence, not truthiness: `"kid": null` or `"use": null` is a malformed member, not absent.
    kid = obj.get("kid")
    if "kid" in obj and not isinstance(kid, str):
        raise KeySetError("bad_kid")
    if "use" in obj and obj["use"] != "sig":
        raise KeySetError("wrong_use")
    key_ops = obj.get("key_ops")
    if "key_ops" in obj and (
        not isinstance(key_ops, list)
        or not all(isinstance(op, str) for op in key_ops)
        or "verify" not in key_ops
    ):
        raise KeySetError("wrong_use", "key_ops")
    alg = obj.get("alg")
    if "alg" in obj and not isinstance(alg, str):
        raise KeySetError("bad_alg")

    crv = obj.get("crv")
    public_key: PublicKey
    if kty == "RSA":
        if alg is not None and alg not in RSA_ALGS:
            raise KeySetError("bad_alg")
        public_key, crv = _parse_rsa(obj), None
    elif kty == "EC":
        if not isinstance(crv, str) or crv not in _CURVES:
            raise KeySetError("bad_curve")
        if alg is not None and alg != EC_ALG_FOR_CURVE[crv]:
            raise KeySetError("alg_curve_mismatch")
        public_key = _parse_ec(obj, crv)
    elif kty == "OKP":
        if crv != "Ed25519":
            raise KeySetError("bad_curve", "only Ed25519")
        if alg is not None and alg not in OKP_ALGS:
            raise KeySetError("bad_alg")
        raw = _member_bytes(obj, "x")
        if len(raw) != 32:
            raise KeySetError("bad_member", "Ed25519 x length")
        public_key = Ed25519PublicKey.from_public_bytes(raw)
    else:
        raise KeySetError("unsupported_kty")
    return VerificationKey(kid=kid, kty=kty, alg=alg, crv=crv, public_key=public_key)


@dataclass(frozen=True)
class KeySet:
    """The validated signing keys of one issuer."""

    keys: tuple[VerificationKey, ...]

    def find(self, kid: str | None, alg: str) -> VerificationKey | None:
        """The key to verify a token with header `kid`/`alg`, or None.

        With a kid: the key of that kid, if it fits `alg`. Without: only when exactly one key
        fits, because guessing among several is how key confusion starts.
        """
        if kid is not None:
            for key in self.keys:
                if key.kid == kid:
                    return key if key.fits(alg) else None
            return None
        fitting = [key for key in self.keys if key.fits(alg)]
        return fitting[0] if len(fitting) == 1 else None

    def kids(self) -> frozenset[str]:
        return frozenset(key.kid for key in self.keys if key.kid is not None)


def parse_jwks(data: bytes | Mapping[str, Any]) -> KeySet:
    """Validate a whole JWKS (RFC 7517 §5); any bad key rejects the set.

    Keys of an unknown `kty` are skipped rather than fatal: IdPs may publish newer key types
    (e.g. post-quantum) beside the ones we verify with, and such a key can never be selected.
    They still pass the private-member, `kid` and duplicate checks.
    """
    if isinstance(data, bytes | bytearray):
        if len(data) > MAX_JWKS_BYTES:
            raise KeySetError("too_large")
        try:
            data = loads_strict_json(bytes(data))
        except JoseDecodeError as exc:
            raise KeySetError("bad_json", exc.reason) from exc
    if not isinstance(data, Mapping):
        raise KeySetError("bad_json", "not an object")
    entries = data.get("keys")
    if not isinstance(entries, list):
        raise KeySetError("keys_not_list")
    if len(entries) > MAX_KEYS:
        raise KeySetError("too_many_keys")
    keys: list[VerificationKey] = []
    seen_kids: set[str] = set()
    for index, entry in enumerate(entries):
        try:
            key = parse_jwk(entry)
        except KeySetError as exc:
            if exc.reason != "unsupported_kty":
                raise KeySetError(exc.reason, f"key {index}") from exc
            kid = entry.get("kid")
        else:
            keys.append(key)
            kid = key.kid
        if kid is not None:
            if kid in seen_kids:
                raise KeySetError("duplicate_kid", f"key {index}")
            seen_kids.add(kid)
    if not keys:
        raise KeySetError("empty_keyset")
    return KeySet(keys=tuple(keys))
