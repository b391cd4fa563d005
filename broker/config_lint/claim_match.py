"""A grant's [grant.match] table: claim globs and regexes, and the rule that every grant binds
a tenant (a claim whose owner segment is written out)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Final

from broker.config import PATH_CLAIMS, TENANT_CLAIMS, MatchValue, RegexPattern
from broker.config_lint.reader import CLAIM_NAME, Lint
from broker.patterns import pattern_regex, regex_crosses_slash

_CASE_FOLD = re.compile(r"\(\?[aiLmsux-]*i[aiLmsux-]*[:)]")


def match_table(lint: Lint, t: Mapping[str, Any], where: str) -> Mapping[str, MatchValue]:
    out: dict[str, MatchValue] = {}
    binds = False
    unbound: list[str] = []
    for claim, raw in t.items():
        w = f"{where}.{claim}"
        if not CLAIM_NAME.fullmatch(claim):
            lint.add(w, "claim names are letters, digits and '_'")
            continue
        items = raw if isinstance(raw, list) else [raw]
        patterns: list[str | RegexPattern] = []
        for item in items:
            pattern = _pattern(lint, claim, item, w)
            if pattern is not None:
                patterns.append(pattern)
        if isinstance(raw, list):
            if not raw:
                lint.add(w, "an empty any-of list matches nothing; remove the claim or add")
            out[claim] = tuple(patterns)
        elif patterns:
            out[claim] = patterns[0]
        if claim in TENANT_CLAIMS and patterns and len(patterns) == len(items):
            why = [w for w in (_binds_no_tenant(claim, p) for p in patterns) if w]
            binds = binds or not why
            unbound.extend(f"{claim}: {w}" for w in why)
    if not binds:
        names = ", ".join(sorted(TENANT_CLAIMS))
        detail = f" ({'; '.join(unbound)})" if unbound else ""
        lint.add(
            where,
            f"no tenant-binding claim{detail}; bind one of {names} to a value whose owner "
            "segment is written out",
        )
    return MappingProxyType(out)


def _pattern(lint: Lint, claim: str, item: object, where: str) -> str | RegexPattern | None:
    if isinstance(item, bool):
        return "true" if item else "false"
    if isinstance(item, int | float):
        lint.add(where, f'write {item} as a string "{item}": claims compare as strings')
        return None
    if isinstance(item, dict):
        return _regex(lint, claim, item, where)
    if not isinstance(item, str):
        lint.add(where, "expected a string, { regex = ... }, or a list of them")
        return None
    _glob(lint, claim, item, where)
    return item


def _glob(lint: Lint, claim: str, glob: str, where: str) -> None:
    if "***" in glob:
        lint.add(where, f"{glob!r}: '***' is not a glob")
        return
    segments = glob.split("/")
    for index, segment in enumerate(segments):
        if "**" not in segment:
            continue
        if segment != "**" or index != len(segments) - 1:
            lint.add(where, f"{glob!r}: '**' is allowed only as a whole trailing segment")
            return
        if claim in TENANT_CLAIMS:
            lint.add(where, f"{glob!r}: '**' may not cross '/' in a tenant-binding claim")
            return
    if claim in TENANT_CLAIMS and glob != "*":
        # `org/app*` would also match `org/app-evil`: a partial-name wildcard in a tenant
        # claim binds a prefix, not a tenant. Wildcards must stand for whole segments.
        for match in re.finditer(r"\*", glob):
            before = glob[match.start() - 1] if match.start() else "/"
            after = glob[match.end()] if match.end() < len(glob) else "/"
            if before not in "/:" or after not in "/:":
                lint.add(
                    where,
                    f"{glob!r}: in a tenant-binding claim '*' must stand for a whole "
                    "segment between '/' or ':' (a prefix like 'app*' also matches "
                    "'app-evil')",
                )
                return


def _regex(lint: Lint, claim: str, t: Mapping[str, Any], where: str) -> RegexPattern | None:
    lint.keys(t, where, frozenset({"regex"}))
    pattern = t.get("regex")
    if not isinstance(pattern, str) or not pattern:
        lint.add(where, 'expected { regex = "..." } with a non-empty string')
        return None
    try:
        re.compile(pattern)
    except re.error as exc:
        lint.add(where, f"invalid regex: {exc}")
        return None
    if claim in TENANT_CLAIMS or claim in PATH_CLAIMS:
        why = regex_crosses_slash(pattern)
        if _CASE_FOLD.search(pattern):
            # Unicode case folding lets `(?i)s` match U+017F and `(?i)k` U+212A: comparison
            # in identity claims stays byte-exact.
            why = "case-insensitive matching is not allowed; list the spellings"
        if why:
            lint.add(where, f"regex {pattern!r} in a path or tenant claim: {why}")
            return None
    return RegexPattern(pattern)


# Probe values a tenant binding must not accept all of, one family per shape of value, every
# segment attacker-chosen: a pattern that fullmatches a whole family binds nothing (`*`, `.*`,
# `*/*`, `[^/]+/[^/]+`, ...). Families of one shape, because `*/*` matches no one-segment value
# yet every repository.
_PROBE_FAMILIES: Final = (
    ("x", "evil", "attacker"),
    ("1", "123456789", "987654321"),
    ("{00000000-0000-0000-0000-000000000000}", "{ffffffff-ffff-ffff-ffff-ffffffffffff}"),
    ("attacker/x", "evil/evil", "x/y"),
    ("attacker/x/y", "evil/evil/evil", "x/y/z"),
    ("attacker:x", "evil:evil", "x:y"),
    ("repo:attacker/x:ref:refs/heads/main", "repo:evil/y:ref:refs/heads/x"),
    ("repo:attacker/x:environment:prod", "repo:evil/y:environment:x"),
    ("repo:attacker/x:pull_request", "repo:evil/y:pull_request"),
    (
        "project_path:attacker/x:ref_type:branch:ref:main",
        "project_path:evil/y/z:ref_type:tag:ref:x",
    ),
)

# `sub` values are `field:value[:field:value...]` (GitHub `repo:owner/name:...`, GitLab
# `project_path:group/project:...`, custom GitHub sub templates): when the first `:` segment is
# one of these field names, the owner is the first `/` segment of the value after it.
_SUB_FIELDS: Final = frozenset(
    {
        "repo",
        "project_path",
        "namespace_path",
        "repository",
        "repository_owner",
        "repository_owner_id",
        "repository_id",
        "project_id",
        "namespace_id",
        "workspace",
    }
)


def _owner_segment(claim: str, glob: str) -> str:
    """The part of a tenant-claim glob that names the owner: the first `/` segment of the value
    (`octo` in `octo/app`; `octo` in sub `repo:octo/app:ref:...`)."""
    value = glob
    if claim == "sub":
        field, sep, rest = glob.partition(":")
        if sep and field in _SUB_FIELDS:
            value = rest.partition(":")[0]
    return value.partition("/")[0]


def _binds_no_tenant(claim: str, pattern: str | RegexPattern) -> str | None:
    """Why `pattern` in tenant claim `claim` binds no tenant, or None when it binds one.

    A glob binds a tenant only when its owner segment is written out: a wildcard there (`*/*`,
    `*/app`, sub `repo:*/app:*`) matches an owner anyone can create. A regex cannot be read
    segment by segment, so it is run against probe values of every shape (see _PROBE_FAMILIES);
    one matching a whole family binds nothing.
    """
    if isinstance(pattern, str) and "*" in _owner_segment(claim, pattern):
        return f"{pattern!r} has a wildcard where the owner is named"
    regex = pattern_regex(pattern)
    try:
        compiled = re.compile(regex)
    except re.error:
        return None
    for family in _PROBE_FAMILIES:
        if all(compiled.fullmatch(probe) for probe in family):
            return f"{_shown(pattern)} matches every value shaped like {family[0]!r}"
    return None


def _shown(pattern: str | RegexPattern) -> str:
    return repr(pattern) if isinstance(pattern, str) else f"regex {pattern.regex!r}"
