"""Match patterns: the one place a policy glob or regex becomes a regular expression. Pure.

Globs: only `*` is special; it matches any run of characters except `/`, and a whole trailing
`**` segment crosses `/`. Regexes are used as written. Either is applied with `re.fullmatch`.
The policy compiles grants through `pattern_regex`; the lint uses `regex_crosses_slash` to refuse
regexes in path claims that could match `/` without writing it.
"""

from __future__ import annotations

import re

from broker.config import RegexPattern


def pattern_regex(pattern: str | RegexPattern) -> str:
    """The regex (for re.fullmatch) of one match pattern: a glob string or `{ regex = ... }`."""
    return pattern.regex if isinstance(pattern, RegexPattern) else glob_to_regex(pattern)


def glob_to_regex(glob: str) -> str:
    """Translate a policy glob into a regex for re.fullmatch (the only place globs compile).

    `*` matches any run except `/`; a whole trailing `**` segment matches one or more
    characters including `/`. The caller has linted the glob, so `**` appears only there.
    """
    if glob == "**":
        return "(?s:.*)"
    tail = ""
    if glob.endswith("/**"):
        glob, tail = glob[:-3], "/(?s:.+)"
    return "[^/]*".join(re.escape(part) for part in glob.split("*")) + tail


def regex_crosses_slash(pattern: str) -> str | None:
    """Conservatively say why a regex could match `/` without writing it, or None.

    A syntactic scan, not a proof: it refuses `.`, `\\S`, `\\W`, `\\D`, numeric escapes,
    negated classes without `/`, and class ranges that span `/` (0x2F).
    """
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern):
            e = pattern[i + 1]
            if e in "SWD":
                return f"'\\{e}' can match '/'"
            if e in "xuUN0":
                return "numeric character escapes are not allowed here; write characters literally"
            i += 2
            continue
        if c == ".":
            return "unescaped '.' can match '/'; escape it as '\\.' or use [^/]"
        if c == "[":
            end, why = _scan_class(pattern, i)
            if why:
                return why
            i = end
            continue
        i += 1
    return None


def _scan_class(pattern: str, start: int) -> tuple[int, str | None]:
    """Scan a character class starting at `[`; return (index after it, reason or None)."""
    i = start + 1
    negated = i < len(pattern) and pattern[i] == "^"
    if negated:
        i += 1
    members: list[str] = []
    first = True
    why: str | None = None
    while i < len(pattern) and (pattern[i] != "]" or first):
        first = False
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern):
            e = pattern[i + 1]
            if e in "SWD":
                why = f"'\\{e}' in a class can match '/'"
            elif e in "xuUN0":
                why = "numeric character escapes are not allowed here; write characters literally"
            members.append(e if e not in "swdSWD" else "")
            i += 2
            continue
        if c == "-" and members and members[-1] and i + 1 < len(pattern) and pattern[i + 1] != "]":
            low, high = members[-1], pattern[i + 1]
            if high == "\\" and i + 2 < len(pattern):
                high = pattern[i + 2]
                i += 1
            if low <= "/" <= high and not negated:
                why = f"the range '{low}-{high}' includes '/'"
            members.append(high)
            i += 2
            continue
        members.append(c)
        i += 1
    if negated and "/" not in members:
        why = why or "a negated class without '/' can match '/'"
    return i + 1, why
