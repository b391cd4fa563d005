"""The linting walk's shared readers: typed values, durations, paths, URLs and names.

A `Lint` collects every problem of the file instead of stopping at the first, so an operator
fixes the whole file in one pass; each section of the file has its module beside this one.
"""

from __future__ import annotations

import difflib
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from broker.config import Problem
from broker.durations import DurationError, seconds
from broker.loopback import is_loopback_host
from broker.secret_scan import SECRET_KEYS

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
CLAIM_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


_T = TypeVar("_T")


class Lint:
    """The problems found so far, and the readers every section uses: each reads one value,
    records what is wrong with it, and returns a usable default so the walk goes on."""

    def __init__(self, base_dir: Path | None) -> None:
        self.base_dir = base_dir
        self.problems: list[Problem] = []

    def add(self, where: str, message: str) -> None:
        self.problems.append(Problem(where, message))

    def entries(self, value: object, kind: str) -> Iterator[tuple[str, Mapping[str, Any]]]:
        """The tables of the array `[[kind]]`, each with its label; anything else is reported."""
        if not isinstance(value, list):
            self.add(kind, f"expected [[{kind}]] tables")
            return
        for index, entry in enumerate(value):
            where = entry_label(kind, entry, index)
            table = self.table(entry, where)
            if table is not None:
                yield where, table

    def keys(self, table: Mapping[str, Any], where: str, known: frozenset[str]) -> None:
        for key in table:
            if key in known or key in SECRET_KEYS:
                continue  # secret keys are reported once by the secrets scan
            near = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            self.add(f"{where}.{key}" if where else key, f"unknown key{hint}")

    def table(self, value: object, where: str) -> Mapping[str, Any] | None:
        if value is None:
            return None
        if not isinstance(value, dict):
            self.add(where, f"expected a table, got {type(value).__name__}")
            return None
        return value

    def typed(self, t: Mapping[str, Any], key: str, where: str, kind: type[_T], default: _T) -> _T:
        if key not in t:
            return default
        value = t[key]
        # bool is an int in Python; a TOML `true` where a number belongs is a mistake.
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            self.add(f"{where}.{key}", f"expected {kind.__name__}, got {type(value).__name__}")
            return default
        return value

    def required_str(self, t: Mapping[str, Any], key: str, where: str) -> str:
        if key not in t:
            self.add(f"{where}.{key}", "required")
            return ""
        value = self.typed(t, key, where, str, "")
        if key in t and isinstance(t[key], str) and not value:
            self.add(f"{where}.{key}", "must not be empty")
        return value

    def str_list(self, t: Mapping[str, Any], key: str, where: str) -> tuple[str, ...]:
        value = t.get(key, [])
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            self.add(f"{where}.{key}", "expected a list of non-empty strings")
            return ()
        return tuple(value)

    def duration(self, t: Mapping[str, Any], key: str, where: str, default: int) -> int:
        if key not in t:
            return default
        try:
            return seconds(t[key])
        except DurationError as exc:
            self.add(f"{where}.{key}", str(exc))
            return default

    def path(self, t: Mapping[str, Any], key: str, where: str) -> Path | None:
        value = self.typed(t, key, where, str, "")
        if not value:
            return None
        p = Path(value)
        if not p.is_absolute() and self.base_dir is not None:
            p = self.base_dir / p
        return p

    def url(self, value: str, where: str) -> None:
        try:
            parts = urlsplit(value)
        except ValueError:  # e.g. an IPv4 address in brackets: reported, not raised
            parts = urlsplit("")
        if parts.scheme == "https" and parts.hostname:
            return
        if parts.scheme == "http" and parts.hostname and is_loopback_host(parts.hostname):
            return
        self.add(where, "must be an https:// URL (http:// only for 127.0.0.1, ::1 or localhost)")

    def name(self, t: Mapping[str, Any], where: str) -> str:
        name = self.required_str(t, "name", where)
        if name and not _NAME.fullmatch(name):
            self.add(f"{where}.name", "use 1-64 of A-Z a-z 0-9 . _ -, starting alphanumeric")
        return name

    def unique(self, names: Iterable[str], kind: str) -> None:
        for name, count in Counter(names).items():
            if name and count > 1:
                self.add(f"{kind}[{name}]", f"{kind} name is used {count} times")


def entry_label(kind: str, entry: object, index: int) -> str:
    name = entry.get("name") if isinstance(entry, dict) else None
    return f"{kind}[{name}]" if isinstance(name, str) and name else f"{kind}[{index}]"
