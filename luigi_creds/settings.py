"""The client's settings: the `[luigi_creds]` section of Luigi's config, validated in one pass.

Owns what a user can configure and how a bad value is reported: every problem of every
`[luigi_creds]` / `[luigi_creds:<TaskFamily>]` section in one `ConfigError`, each naming the key
and the value. `ClientSettings.from_mapping` is pure (a mapping in, settings or an error out);
`luigi_config.py` reads the sections through Luigi. Standard library only. Nothing here is
secret.

Per-task-family grants: `[luigi_creds] aws_grant` / `vault_grant` are what every task's process
gets under `TaskCredentials`; a section `[luigi_creds:<TaskFamily>]` with either key overrides it
for that family, and an empty value there gives that family no credential of that kind.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

from luigi_creds.errors import LuigiCredsError
from luigi_creds.values import Frozen

__all__ = [
    "DEFAULT_GITLAB_VARIABLE",
    "FAMILY_SECTION_PREFIX",
    "SECTION",
    "ClientSettings",
    "ConfigError",
    "FamilyGrants",
]

SECTION = "luigi_creds"
# Where a GitLab job exposes its `id_tokens:` token unless `gitlab_variable` says otherwise.
DEFAULT_GITLAB_VARIABLE = "LUIGI_CREDS_ID_TOKEN"
FAMILY_SECTION_PREFIX = SECTION + ":"
# Mints at once per job session unless [luigi_creds] refresh_chains says otherwise.
DEFAULT_REFRESH_CHAINS = 4
TOKEN_SOURCE = re.compile(r"^(env:[A-Za-z_][A-Za-z0-9_]*|file:\S+|gitlab|github|bitbucket|okta)$")
GRANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# Compiled with the module: a task process forked after the module was loaded (exec's preload)
# inherits them, where `re`'s cache would compile each one again in every task process.
HTTP_URL = re.compile(r"^https?://[^/\s]+")
LOOPBACK_HTTP_URL = re.compile(r"^http://(127\.0\.0\.1|localhost|\[::1\])(:\d+)?(/|$)")
WHITESPACE = re.compile(r"\s")
INLINE_COMMENT = re.compile(r"\s[;#]")


class ConfigError(LuigiCredsError):
    """`[luigi_creds]` is missing or wrong; the message lists every problem."""


class FamilyGrants(Frozen):
    """The grants a task family's processes get; None means none of that kind."""

    _fields = ("aws_grant", "vault_grant")
    __slots__ = _fields
    aws_grant: str | None
    vault_grant: str | None

    def __init__(self, aws_grant: str | None = None, vault_grant: str | None = None) -> None:
        self._fill(aws_grant, vault_grant)


# What a `[luigi_creds:<family>]` section may set: the fields of FamilyGrants.
FAMILY_KEYS = FamilyGrants._fields


class ClientSettings(Frozen):
    """`[luigi_creds]` in luigi.cfg / luigi.toml. Nothing in it is secret."""

    _fields = (
        "broker_url",
        "token_source",
        "ca_bundle",
        "audience",
        "gitlab_variable",
        "vault_addr",
        "timeout",
        "refresh_chains",
        "okta_token_endpoint",
        "okta_client_id",
        "okta_private_key_file",
        "okta_scopes",
        "okta_key_id",
        "aws_grant",
        "vault_grant",
        "families",
    )
    __slots__ = _fields
    broker_url: str
    token_source: str
    ca_bundle: Path | None
    audience: str | None  # what the github source requests; default: broker_url
    gitlab_variable: str
    vault_addr: str | None  # for vault_client() and VAULT_ADDR in task environments
    timeout: float  # seconds per broker request
    # Mints the job's session can make at once: its refresh chains (docs/protocol.md), at most
    # the broker's [broker] session_max_chains; as many as the job's Luigi workers is enough.
    refresh_chains: int
    okta_token_endpoint: str | None
    okta_client_id: str | None
    okta_private_key_file: Path | None
    okta_scopes: tuple[str, ...]
    okta_key_id: str | None
    aws_grant: str | None  # what TaskCredentials gives every task's AWS SDKs
    vault_grant: str | None  # what TaskCredentials puts in every task's VAULT_TOKEN
    families: Mapping[str, Mapping[str, str]]

    def __init__(
        self,
        broker_url: str,
        token_source: str,
        ca_bundle: Path | None = None,
        audience: str | None = None,
        gitlab_variable: str = DEFAULT_GITLAB_VARIABLE,
        vault_addr: str | None = None,
        timeout: float = 10.0,
        refresh_chains: int = DEFAULT_REFRESH_CHAINS,
        okta_token_endpoint: str | None = None,
        okta_client_id: str | None = None,
        okta_private_key_file: Path | None = None,
        okta_scopes: tuple[str, ...] = (),
        okta_key_id: str | None = None,
        aws_grant: str | None = None,
        vault_grant: str | None = None,
        families: Mapping[str, Mapping[str, str]] | None = None,
    ) -> None:
        self._fill(
            broker_url,
            token_source,
            ca_bundle,
            audience,
            gitlab_variable,
            vault_addr,
            timeout,
            refresh_chains,
            okta_token_endpoint,
            okta_client_id,
            okta_private_key_file,
            okta_scopes,
            okta_key_id,
            aws_grant,
            vault_grant,
            {} if families is None else families,
        )

    # What `[luigi_creds]` may set: every field but the per-family sections.
    KEYS: ClassVar[tuple[str, ...]] = tuple(f for f in _fields if f != "families")

    def grants_for(self, family: str) -> FamilyGrants:
        """The grants of `family`'s task processes: the family's section over `[luigi_creds]`."""
        override = self.families.get(family, {})
        aws = override.get("aws_grant", self.aws_grant)
        vault = override.get("vault_grant", self.vault_grant)
        return FamilyGrants(aws or None, vault or None)

    @classmethod
    def from_mapping(
        cls,
        raw: Mapping[str, str],
        families: Mapping[str, Mapping[str, str]] | None = None,
    ) -> ClientSettings:
        """Validate a `[luigi_creds]` section (and the per-family ones); every problem is
        listed in one ConfigError, naming the section, the key and the value."""
        raw = {k.replace("-", "_"): str(v) for k, v in raw.items()}
        problems = [f"unknown key {k!r}" for k in raw if k not in cls.KEYS]
        problems += _junk(raw, SECTION)
        broker_url = raw.get("broker_url", "").strip()
        token_source = raw.get("token_source", "").strip()
        if not broker_url:
            problems.append("broker_url is required")
        elif not HTTP_URL.match(broker_url):
            problems.append("broker_url must be an http(s) URL")
        elif broker_url.startswith("http://") and not LOOPBACK_HTTP_URL.match(broker_url):
            problems.append("broker_url must use https unless it is on loopback")
        if not token_source:
            problems.append("token_source is required")
        elif not TOKEN_SOURCE.match(token_source) and not _has_junk(token_source):
            problems.append(
                f"token_source = {token_source!r} is not one of env:VAR, file:PATH, gitlab, "
                "github, bitbucket, okta"
            )
        timeout = 10.0
        try:
            timeout = float(raw.get("timeout", "") or "10")
            if not 0 < timeout <= 300:
                raise ValueError
        except ValueError:
            if not _has_junk(raw.get("timeout", "")):
                problems.append("timeout must be a number of seconds in (0, 300]")
        refresh_chains = DEFAULT_REFRESH_CHAINS
        chains_text = raw.get("refresh_chains", "").strip()
        if chains_text:
            if chains_text.isdigit() and 1 <= int(chains_text) <= 64:
                refresh_chains = int(chains_text)
            elif not _has_junk(chains_text):
                problems.append("refresh_chains must be a whole number from 1 to 64")
        if token_source == "okta":
            for key in ("okta_token_endpoint", "okta_client_id", "okta_private_key_file"):
                if not raw.get(key):
                    problems.append(f"{key} is required for token_source = okta")
        problems += _grant_problems(raw, SECTION)
        cleaned: dict[str, dict[str, str]] = {}
        for family, section in (families or {}).items():
            name = FAMILY_SECTION_PREFIX + family
            section = {k.replace("-", "_"): str(v) for k, v in section.items()}
            problems += [
                f"[{name}]: unknown key {k!r} (only {', '.join(FAMILY_KEYS)})"
                for k in section
                if k not in FAMILY_KEYS
            ]
            problems += [f"[{name}]: {p}" for p in _junk(section, name)]
            problems += [f"[{name}]: {p}" for p in _grant_problems(section, name)]
            cleaned[family] = {k: v.strip() for k, v in section.items() if k in FAMILY_KEYS}
        if problems:
            raise ConfigError("[luigi_creds]: " + "; ".join(problems))

        def path(key: str) -> Path | None:
            value = raw.get(key)
            return Path(value).expanduser() if value else None

        return cls(
            broker_url=broker_url.rstrip("/"),
            token_source=token_source,
            ca_bundle=path("ca_bundle"),
            audience=raw.get("audience") or None,
            gitlab_variable=raw.get("gitlab_variable") or DEFAULT_GITLAB_VARIABLE,
            vault_addr=(raw.get("vault_addr") or "").rstrip("/") or None,
            timeout=timeout,
            refresh_chains=refresh_chains,
            okta_token_endpoint=raw.get("okta_token_endpoint") or None,
            okta_client_id=raw.get("okta_client_id") or None,
            okta_private_key_file=path("okta_private_key_file"),
            okta_scopes=tuple(raw.get("okta_scopes", "").split()),
            okta_key_id=raw.get("okta_key_id") or None,
            aws_grant=raw.get("aws_grant", "").strip() or None,
            vault_grant=raw.get("vault_grant", "").strip() or None,
            families=cleaned,
        )

    @classmethod
    def from_luigi_config(cls) -> ClientSettings:
        from luigi_creds.luigi_config import from_luigi_config

        return from_luigi_config()


# Keys whose value is one word: anything after whitespace is junk (most often an inline comment,
# which Luigi's config parser keeps as part of the value). Every key but the one list.
ONE_WORD_KEYS = frozenset(ClientSettings.KEYS) - {"okta_scopes"}


def _has_junk(value: str) -> bool:
    return bool(WHITESPACE.search(value.strip()))


def _junk(raw: Mapping[str, str], section: str) -> list[str]:
    """Values with text after them. Luigi's parser strips no inline comments, so
    `token_source = gitlab ; env:VAR` is the value `gitlab ; env:VAR`: name the likely cause."""
    problems = []
    for key, value in raw.items():
        text = value.strip()
        comment = INLINE_COMMENT.search(text)
        if comment is not None:
            problems.append(
                f"{key} = {text!r} has text after the value, which looks like an inline comment: "
                f"Luigi's config parser keeps '{text[comment.start() + 1]} ...' as part of the "
                f"value; move the comment to its own line in [{section}]"
            )
        elif key in ONE_WORD_KEYS and _has_junk(text):
            problems.append(
                f"{key} = {text!r} has text after the value (one value expected; a stray "
                "comment or a second value on the line?)"
            )
    return problems


def _grant_problems(raw: Mapping[str, str], section: str) -> list[str]:
    problems = []
    for key in FAMILY_KEYS:
        value = raw.get(key, "").strip()
        if value and not _has_junk(value) and not GRANT_NAME.match(value):
            problems.append(f"{key} = {value!r} is not a grant name")
    return problems
