"""Claim policy: which verified identity may use which grant. Pure; talks to no external system.

Owns the compiled form of every grant's `match` table and the Decision it yields. Patterns are
compiled once, at load (`Policy.compile`), and always applied with `re.fullmatch` (never
"^" + p + "$", which lets "main\\n" through `$`). Semantics, chosen so that type confusion,
wildcard abuse, Unicode lookalikes, name resurrection and missing claims all fail closed:

- AND across claims; a list of patterns is any-of.
- The vacuous case denies: an empty match table or an empty any-of list allows nobody.
- A missing claim denies. Bool claims compare as "true"/"false". int, float, object and null
  claims deny as `claim_type`: real GitLab tokens carry project_id as a string, so an int is
  not the token we think it is.
- A list-valued claim (Okta `groups`, `scp`, `amr`) matches when ANY element matches any
  pattern; every element must be a string. A claim known to be list-valued given as a plain
  string is a type mismatch and denies.
- Byte-exact comparison. Any claim value the policy reads that holds Unicode Cc/Cf characters
  or is not NFC denies as `claim_unsafe`; lookalikes (fullwidth, Cyrillic) simply don't match.
- Every claim of the grant is checked, even after a failure, so the trace is complete; the
  Decision's reason is that of the first failing claim in file order.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from broker.config import Config, GrantConfig, MatchValue, RegexPattern
from broker.patterns import pattern_regex

# Claims whose values are JSON arrays in real tokens (Okta groups/scp, OIDC amr, Entra roles).
LIST_CLAIMS = frozenset({"groups", "scp", "amr", "roles"})

# Display cap for a claim value in a trace; the audit and CLI show at most this many characters.
_DISPLAY_MAX = 80

ALLOWED = "allowed"
UNKNOWN_GRANT = "unknown_grant"
ISSUER_NOT_ALLOWED = "issuer_not_allowed"
CLAIM_MISSING = "claim_missing"
CLAIM_TYPE = "claim_type"
CLAIM_MISMATCH = "claim_mismatch"
CLAIM_UNSAFE = "claim_unsafe"
EMPTY_MATCH = "empty_match"


@dataclass(frozen=True)
class ClaimCheck:
    """One line of a decision's trace: what the grant expected and what the token had."""

    claim: str
    expected: str  # the patterns as written, e.g. '"main" | "release/*" | regex:"v[0-9]+"'
    actual: str  # ascii repr of the token's value, at most 80 characters; "<missing>" if absent
    ok: bool
    why: str


@dataclass(frozen=True)
class Decision:
    """Whether one identity may use one grant, why, and exactly which claims were read."""

    allowed: bool
    grant: str
    reason: str  # allowed | unknown_grant | issuer_not_allowed | claim_missing | claim_type
    #              | claim_mismatch | claim_unsafe | empty_match
    trace: tuple[ClaimCheck, ...]
    claims_read: Mapping[str, Any]  # exactly the claims the policy looked at (what audit stores)


@dataclass(frozen=True)
class _Matcher:
    claim: str
    patterns: tuple[re.Pattern[str], ...]
    expected: str


@dataclass(frozen=True)
class _Compiled:
    grant: GrantConfig
    matchers: tuple[_Matcher, ...]


def display(value: object) -> str:
    """Shorten and escape a claim value for a trace; never raises, whatever the token held."""
    try:
        text = ascii(value)
    except Exception:  # a hostile object's __repr__ must not break a denial
        text = f"<unprintable {type(value).__name__}>"
    if len(text) > _DISPLAY_MAX:
        text = text[: _DISPLAY_MAX - 3] + "..."
    return text


def _describe(pattern: str | RegexPattern) -> str:
    if isinstance(pattern, RegexPattern):
        return f"regex:{pattern.regex!r}"
    return repr(pattern)


def _compile_value(claim: str, value: MatchValue) -> _Matcher:
    patterns = value if isinstance(value, tuple) else (value,)
    compiled = tuple(re.compile(pattern_regex(p)) for p in patterns)
    expected = " | ".join(_describe(p) for p in patterns) or "<nothing>"
    return _Matcher(claim=claim, patterns=compiled, expected=expected)


def _unsafe(text: str) -> bool:
    """Cc/Cf characters (NUL, newline, zero-width, RTL override) or non-NFC text."""
    if any(unicodedata.category(c) in ("Cc", "Cf") for c in text):
        return True
    return not unicodedata.is_normalized("NFC", text)


def _check(matcher: _Matcher, claims: Mapping[str, Any]) -> tuple[ClaimCheck, str | None]:
    """Check one claim; return its trace line and its failure reason (None if it passed)."""
    claim = matcher.claim

    def result(actual: str, reason: str | None, why: str) -> tuple[ClaimCheck, str | None]:
        check = ClaimCheck(claim, matcher.expected, actual, reason is None, why)
        return check, reason

    if claim not in claims:
        return result("<missing>", CLAIM_MISSING, "claim is missing from the token")
    value = claims[claim]
    actual = display(value)
    values: list[str]
    if isinstance(value, bool):
        values = ["true" if value else "false"]
    elif isinstance(value, str):
        if claim in LIST_CLAIMS:
            return result(actual, CLAIM_TYPE, "expected a list of strings, got a string")
        values = [value]
    elif isinstance(value, list):
        if not all(isinstance(v, str) for v in value):
            return result(actual, CLAIM_TYPE, "every element of a list claim must be a string")
        values = list(value)
    else:
        kind = "null" if value is None else type(value).__name__
        return result(actual, CLAIM_TYPE, f"expected a string, got {kind}")
    if any(_unsafe(v) for v in values):
        return result(actual, CLAIM_UNSAFE, "control, format or non-NFC characters")
    if not matcher.patterns:
        # Vacuous case: an empty any-of list would otherwise read as "no constraint".
        return result(actual, CLAIM_MISMATCH, "the grant lists no acceptable value")
    if any(p.fullmatch(v) for p in matcher.patterns for v in values):
        return result(actual, None, "matched")
    return result(actual, CLAIM_MISMATCH, "no pattern matched")


def claim_matcher(claim: str, rule: MatchValue) -> Callable[[object], bool]:
    """Whether a claim value satisfies one grant's `match` rule for that claim, compiled once.

    The same test `Policy.evaluate` applies to a token (list claims, bool claims, unsafe
    characters, the vacuous any-of list), for readers outside a decision such as the audit
    report.
    """
    matcher = _compile_value(claim, rule)

    def matches(value: object) -> bool:
        _, failure = _check(matcher, {claim: value})
        return failure is None

    return matches


class Policy:
    """Every grant's match table, compiled once; evaluation is pure and never raises."""

    def __init__(self, grants: tuple[_Compiled, ...]) -> None:
        self._grants = {c.grant.name: c for c in grants}
        self._order = tuple(c.grant.name for c in grants)

    @classmethod
    def compile(cls, config: Config) -> Policy:
        """Compile all grants' globs and regexes; the loader has already linted them."""
        compiled = tuple(
            _Compiled(
                grant=g,
                matchers=tuple(_compile_value(claim, v) for claim, v in g.match.items()),
            )
            for g in config.grants
        )
        return cls(compiled)

    def grant(self, name: str) -> GrantConfig | None:
        compiled = self._grants.get(name)
        return compiled.grant if compiled else None

    def evaluate(self, grant: str, issuer: str, claims: Mapping[str, Any]) -> Decision:
        """Decide whether a token from `issuer` (its configured name) with `claims` gets `grant`."""
        compiled = self._grants.get(grant)
        if compiled is None:
            return Decision(False, grant, UNKNOWN_GRANT, (), MappingProxyType({}))
        if issuer not in compiled.grant.issuers:
            return Decision(False, grant, ISSUER_NOT_ALLOWED, (), MappingProxyType({}))
        if not compiled.matchers:
            # Vacuous case: a grant that constrains nothing must not admit every token.
            return Decision(False, grant, EMPTY_MATCH, (), MappingProxyType({}))
        trace: list[ClaimCheck] = []
        read: dict[str, Any] = {}
        reason: str | None = None
        for matcher in compiled.matchers:
            check, failure = _check(matcher, claims)
            trace.append(check)
            if matcher.claim in claims:
                value = claims[matcher.claim]
                read[matcher.claim] = tuple(value) if isinstance(value, list) else value
            reason = reason or failure
        return Decision(
            allowed=reason is None,
            grant=grant,
            reason=reason or ALLOWED,
            trace=tuple(trace),
            claims_read=MappingProxyType(read),
        )

    def allowed_grants(self, issuer: str, claims: Mapping[str, Any]) -> tuple[Decision, ...]:
        """Decisions for every grant that accepts `issuer`, in file order (for whoami/explain).

        Grants of other issuers are left out: they say nothing about this identity and listing
        them would disclose policy to a caller who cannot use it.
        """
        return tuple(
            self.evaluate(name, issuer, claims)
            for name in self._order
            if issuer in self._grants[name].grant.issuers
        )
