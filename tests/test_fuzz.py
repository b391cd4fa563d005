"""Property-based tests (hypothesis) for the code that reads attacker input first.

- the token pre-parser (`parse_token`): whatever the text, it returns a parsed token or raises
  TokenError with a documented reason, never another exception; what it returns is what was
  encoded;
- the claim checks (`validate_claims`): any claim set is accepted or refused with TokenError,
  and an accepted one satisfies every documented rule;
- policy evaluation (`Policy.evaluate`): never raises, and allows exactly when every claim of
  the grant holds a safe string value matching one of its patterns, where `*` never crosses `/`.

Examples are derandomised (the same cases on every run, no example database written), so a
failure reproduces; `HYPOTHESIS_PROFILE=deep pytest --timeout=0 tests/test_fuzz.py` runs 20,000
random cases per property (about 25 minutes). The case counts are printed with
`-s` and checked to be non-trivial.
"""

from __future__ import annotations

import base64
import json
import os
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from broker.config import BrokerSettings, Config, GrantConfig, RegexPattern
from broker.patterns import glob_to_regex
from broker.policy import ALLOWED, Policy
from broker.tokens import (
    _MESSAGES,
    MAX_TOKEN_LENGTH,
    TokenError,
    parse_token,
    token_sha256,
    validate_claims,
)

settings.register_profile(
    "suite",
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "deep", max_examples=20_000, deadline=None, database=None, derandomize=False
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "suite"))

REASONS = frozenset(_MESSAGES)
CASES: Counter[str] = Counter()

NOW = datetime(2026, 11, 22, 2, 0, 0, tzinfo=UTC)
T = int(NOW.timestamp())
ISSUER = "https://gitlab.example.com"
AUDIENCE = "luigi-creds"
LEEWAY, MAX_LIFETIME = 60, 3600


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


# -- strategies -----------------------------------------------------------------------------------

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
header_members = st.fixed_dictionaries(
    {"alg": st.sampled_from(["RS256", "ES256", "EdDSA", "none", "HS256", "", "PS512"])},
    optional={
        "kid": st.one_of(st.text(max_size=40), json_scalars),
        "typ": st.one_of(st.sampled_from(["JWT", "at+jwt"]), json_scalars),
        "cty": st.sampled_from(["JWT", "json", "application/jwt"]),
        "crit": st.lists(st.text(max_size=5), max_size=2),
        "jku": st.just("https://attacker.example/jwks"),
        "zip": st.just("DEF"),
    },
)
compact_chars = st.text(alphabet=string.ascii_letters + string.digits + "-_.=+/ \n", max_size=400)
B64URL = string.ascii_letters + string.digits + "-_"
# Dot-joined base64url runs: mostly well framed, so the parser gets past its regex and caps.
framed = st.lists(st.text(alphabet=B64URL, max_size=60), min_size=1, max_size=5).map(".".join)
encoded_segments = st.lists(
    st.one_of(
        st.binary(max_size=60).map(lambda b: b64(b)),
        json_values.map(lambda v: b64(json.dumps(v).encode())),
    ),
    min_size=3,
    max_size=3,
).map(".".join)
valid_headers = st.fixed_dictionaries(
    {"alg": st.sampled_from(["RS256", "ES256", "EdDSA", "PS384"])},
    optional={
        "kid": st.text(alphabet=string.printable[:94], min_size=1, max_size=20),
        "typ": st.just("JWT"),
    },
)


# -- token pre-parser -----------------------------------------------------------------------------


def _parse_outcome(raw: Any) -> str:
    try:
        parse_token(raw)
    except TokenError as exc:
        assert exc.reason in REASONS, exc.reason
        assert str(exc) == _MESSAGES[exc.reason]  # generic sentence, never token bytes
        return exc.reason
    return "parsed"


@given(
    st.one_of(
        st.text(max_size=600),
        compact_chars,
        framed,
        encoded_segments,
        st.binary(max_size=100),
        json_scalars,
    )
)
def test_parse_token_raises_only_token_errors_on_any_input(raw: Any) -> None:
    """Any text, bytes or JSON value: parsed, or a TokenError with a documented reason."""
    CASES["pre-parser arbitrary input"] += 1
    event(_parse_outcome(raw))


@given(
    st.one_of(valid_headers, valid_headers, header_members, json_values),
    st.one_of(st.dictionaries(st.text(max_size=10), json_values, max_size=6), json_values),
    st.binary(min_size=1, max_size=80),
)
def test_parse_token_returns_exactly_what_was_encoded(header: Any, claims: Any, sig: bytes) -> None:
    """Well-framed tokens from arbitrary JSON: when parsing succeeds, header, claims, signing
    input, signature and hash are those encoded; refusals name a documented reason."""
    CASES["pre-parser encoded JSON"] += 1
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    raw = f"{signing_input}.{b64(sig)}"
    try:
        token = parse_token(raw)
    except TokenError as exc:
        assert exc.reason in REASONS
        event(exc.reason)
        return
    event("parsed")
    assert len(raw) <= MAX_TOKEN_LENGTH
    assert isinstance(header, dict) and isinstance(claims, dict)
    assert dict(token.header) == header and dict(token.claims) == claims
    assert token.signing_input == signing_input.encode()
    assert token.signature == sig
    assert token.sha256 == token_sha256(raw)
    assert str(header["alg"]).strip().lower() != "none"
    assert not {"jku", "zip", "crit"} & header.keys()


@given(st.text(alphabet=string.ascii_letters + string.digits + "-_", min_size=2, max_size=60))
def test_non_canonical_base64_is_refused(segment: str) -> None:
    """A payload segment that is not the canonical base64url of its bytes (padding, a length
    of 1 mod 4, stray unused bits) never parses."""
    CASES["pre-parser base64 canonical"] += 1
    header = b64(json.dumps({"alg": "RS256"}).encode())
    raw = f"{header}.{segment}.AAAA"
    try:
        decoded = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
        canonical = b64(decoded) == segment
    except ValueError:
        canonical = False
    outcome = _parse_outcome(raw)
    if not canonical:
        assert outcome == "bad_encoding", outcome


# -- claim checks ---------------------------------------------------------------------------------

times = st.one_of(
    st.integers(min_value=T - 2 * MAX_LIFETIME, max_value=T + 2 * MAX_LIFETIME),
    st.integers(min_value=-(2**70), max_value=2**70),
    json_scalars,
)
hostile_claims = st.fixed_dictionaries(
    {},
    optional={
        "iss": st.one_of(st.sampled_from([ISSUER + "/", ISSUER.upper(), ""]), json_scalars),
        "aud": st.one_of(
            st.lists(st.sampled_from([AUDIENCE, "other", ""]), max_size=3), json_values
        ),
        "exp": times,
        "iat": times,
        "nbf": times,
        "sub": st.one_of(st.text(max_size=10), json_scalars),
        "jti": st.one_of(st.text(max_size=300), json_scalars),
    },
)


@st.composite
def claim_sets(draw: st.DrawFn) -> dict[str, Any]:
    """A claim set that is valid but for a few members changed or removed by `hostile_claims`
    (so both verdicts occur), or an entirely arbitrary one."""
    iat = draw(st.integers(min_value=T - MAX_LIFETIME, max_value=T + 2 * LEEWAY))
    base: dict[str, Any] = {
        "iss": ISSUER,
        "aud": draw(st.sampled_from([AUDIENCE, [AUDIENCE], ["other", AUDIENCE]])),
        "iat": iat,
        "exp": draw(st.integers(min_value=iat, max_value=iat + MAX_LIFETIME + LEEWAY)),
        "sub": draw(st.text(min_size=1, max_size=10)),
        "jti": draw(st.text(min_size=1, max_size=20)),
    }
    if draw(st.booleans()):
        base["nbf"] = draw(st.integers(min_value=iat - LEEWAY, max_value=T + 2 * LEEWAY))
    changes = draw(hostile_claims)
    dropped = draw(st.sets(st.sampled_from(sorted(base)), max_size=2))
    merged = {k: v for k, v in {**base, **changes}.items() if k not in dropped}
    return draw(st.sampled_from([merged, base, changes]))


@given(claim_sets(), st.booleans())
def test_validate_claims_accepts_only_claim_sets_that_keep_every_rule(
    claims: Mapping[str, Any], require_jti: bool
) -> None:
    """Arbitrary claim sets: refused with TokenError, or accepted and then every rule holds."""
    CASES["claim checks"] += 1
    try:
        validate_claims(
            claims,
            issuer=ISSUER,
            audiences=(AUDIENCE,),
            now=NOW,
            leeway=LEEWAY,
            max_lifetime=MAX_LIFETIME,
            require_jti=require_jti,
        )
    except TokenError as exc:
        assert exc.reason in REASONS
        event(exc.reason)
        return
    event("accepted")
    assert claims["iss"] == ISSUER
    aud = claims["aud"]
    assert aud == AUDIENCE or (isinstance(aud, list) and AUDIENCE in aud)
    for name in ("exp", "iat", "nbf"):
        value = claims.get(name, 0)
        assert type(value) is int and 0 <= value <= 2**40
    assert claims["exp"] + LEEWAY >= T
    assert claims["iat"] <= T + LEEWAY and claims.get("nbf", T) <= T + LEEWAY
    assert claims["exp"] - claims["iat"] <= MAX_LIFETIME
    assert isinstance(claims["sub"], str) and claims["sub"]
    if require_jti or "jti" in claims:
        assert isinstance(claims["jti"], str) and 0 < len(claims["jti"]) <= 256


# -- policy evaluation ----------------------------------------------------------------------------

segment = st.text(alphabet=string.ascii_lowercase + "-", min_size=1, max_size=6)
globs = st.lists(st.one_of(segment, st.just("*")), min_size=1, max_size=3).map("/".join)
claim_values = st.one_of(
    st.lists(st.one_of(segment, st.just("*")), min_size=1, max_size=4).map("/".join),
    st.text(max_size=12),
    st.booleans(),
    json_values,
    st.lists(st.one_of(segment, st.text(max_size=5)), max_size=3),
)
CLAIMS = ("project_path", "ref", "groups")


def _instance(glob: str, fill: str) -> str:
    return glob.replace("*", fill)


@st.composite
def grants_and_claims(draw: st.DrawFn) -> tuple[GrantConfig, dict[str, Any]]:
    """A grant over a few claims, and claims that often instantiate its own patterns (so
    allowed decisions occur) and otherwise carry arbitrary or hostile values."""
    names = draw(st.lists(st.sampled_from(CLAIMS), min_size=1, max_size=3, unique=True))
    match: dict[str, Any] = {}
    claims: dict[str, Any] = {}
    for name in names:
        options = draw(st.lists(globs, min_size=0, max_size=3))
        as_regex = draw(st.lists(st.booleans(), min_size=len(options), max_size=len(options)))
        patterns = [_regex_of(g) if r else g for g, r in zip(options, as_regex, strict=True)]
        match[name] = draw(st.sampled_from([tuple(patterns), *patterns])) if patterns else ()
        fill = draw(st.one_of(segment, st.just("a/b"), st.just("x\n"), st.just("")))
        own = [_instance(g, fill) for g in options] or ["x"]
        value = draw(st.one_of(st.sampled_from(own), claim_values))
        if name == "groups" and draw(st.booleans()):
            value = [value] if isinstance(value, str) else value
        if draw(st.integers(min_value=0, max_value=9)):  # mostly present
            claims[name] = value
    extra = draw(st.dictionaries(st.sampled_from(["sub", "aud"]), claim_values, max_size=2))
    return GrantConfig(name="g", issuers=("gitlab",), match=match), {**extra, **claims}


def _regex_of(glob: str) -> RegexPattern:
    return RegexPattern(glob_to_regex(glob))


def _expected(grant: GrantConfig, claims: Mapping[str, Any]) -> bool:
    """The documented semantics, written independently of broker.policy."""
    if not grant.match:
        return False
    for claim, value in grant.match.items():
        patterns = value if isinstance(value, tuple) else (value,)
        regexes = [p.regex if isinstance(p, RegexPattern) else glob_to_regex(p) for p in patterns]
        if claim not in claims:
            return False
        got = claims[claim]
        if isinstance(got, bool):
            values = ["true" if got else "false"]
        elif isinstance(got, str) and claim != "groups":
            values = [got]
        elif isinstance(got, list) and all(isinstance(v, str) for v in got):
            values = got
        else:
            return False
        if any(
            any(unicodedata.category(c) in ("Cc", "Cf") for c in v)
            or not unicodedata.is_normalized("NFC", v)
            for v in values
        ):
            return False
        if not any(re.fullmatch(r, v) for r in regexes for v in values):
            return False
    return True


@given(grants_and_claims())
@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
def test_policy_allows_exactly_by_the_documented_rules(case: tuple[GrantConfig, Any]) -> None:
    """Evaluation never raises; it allows exactly when every claim of the grant holds a safe
    value matching a pattern; the trace covers every claim and claims_read only those."""
    CASES["policy evaluation"] += 1
    grant, claims = case
    policy = Policy.compile(Config(broker=BrokerSettings(), issuers=(), grants=(grant,)))
    decision = policy.evaluate("g", "gitlab", claims)
    event(decision.reason)
    assert decision.allowed == _expected(grant, claims), (grant.match, claims, decision)
    assert decision.allowed == (decision.reason == ALLOWED)
    assert set(decision.claims_read) <= set(grant.match)
    if grant.match:
        assert [c.claim for c in decision.trace] == list(grant.match)
    assert not policy.evaluate("g", "other-issuer", claims).allowed


@given(globs, st.lists(segment, min_size=1, max_size=4))
def test_a_glob_star_never_crosses_a_slash(glob: str, parts: list[str]) -> None:
    """A value matches a `*` glob only with as many `/` segments as the glob has."""
    CASES["glob semantics"] += 1
    value = "/".join(parts)
    if re.fullmatch(glob_to_regex(glob), value):
        assert value.count("/") == glob.count("/")
        for pattern_part, value_part in zip(glob.split("/"), parts, strict=True):
            assert pattern_part in ("*", value_part)


def test_zz_property_case_counts() -> None:
    """Runs last in this module: every property ran a non-trivial number of cases."""
    print("hypothesis cases:", dict(CASES), "total", sum(CASES.values()))
    if os.environ.get("HYPOTHESIS_PROFILE", "suite") == "suite":
        assert all(count >= 100 for count in CASES.values()), CASES
