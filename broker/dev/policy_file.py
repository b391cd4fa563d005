"""Pieces of the policy files the dev stack, the test harness and the benchmarks generate.

A small TOML writer (`toml_table`, `broker_table`, `issuer`, `grant`) and the pieces several
policies share, written once (the GitLab ETL grant, the upstream tables), so `luigi-creds-broker
dev`, the integration tests and the benchmarks run the broker on the same grant. Each piece is
TOML text starting at column 0 and ending in a newline; callers put them where their file needs
them. Pure.

The writer covers what these generated files hold (strings, booleans, numbers, arrays of them and
inline tables); a file that must show an exact hand-written layout (a lint test's mistakes)
stays a literal where it is used.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeAlias

from broker.dev.aws import REGION
from broker.dev.claims import GITLAB_PROJECT_ID

ETL_WRITER = "etl-writer"
# The issuer every harness policy names its dev issuer (the GitLab-shaped default token).
GITLAB = "gitlab"
AUDIENCE = "luigi-creds"

TomlValue: TypeAlias = "str | bool | int | float | Sequence[TomlValue] | Mapping[str, TomlValue]"


_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def _escaped(char: str) -> str:
    """`char` as it stands in a TOML basic string: escaped if it is a quote, a backslash or
    not printable."""
    if char in _ESCAPES:
        return _ESCAPES[char]
    if char.isprintable():
        return char
    return f"\\u{ord(char):04x}" if ord(char) <= 0xFFFF else f"\\U{ord(char):08x}"


def toml_value(value: TomlValue) -> str:
    """`value` as a TOML value: a basic string, a boolean, a number, an array or inline table."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, str):
        return '"' + "".join(_escaped(c) for c in value) + '"'
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    return "[" + ", ".join(toml_value(v) for v in value) + "]"


def toml_table(header: str, keys: Mapping[str, TomlValue]) -> str:
    """`header` (e.g. `[grant.aws]`) and one `key = value` line per entry of `keys`."""
    return header + "\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in keys.items())


def broker_table(listen: str, audit_store: str, **settings: TomlValue) -> str:
    """The [broker] table: where it listens, where it keeps its audit ledger, then `settings`."""
    return toml_table("[broker]", {"listen": listen, "audit_store": audit_store, **settings})


def grant(
    name: str,
    match: Mapping[str, TomlValue],
    *,
    aws: Mapping[str, TomlValue] | None = None,
    vault: Mapping[str, TomlValue] | None = None,
    issuers: Sequence[str] = (GITLAB,),
    **settings: TomlValue,
) -> str:
    """One [[grant]]: `settings` (ttl, require_dpop, ...) after its issuers, then its match
    table and its [grant.aws] and/or [grant.vault] target."""
    text = toml_table("[[grant]]", {"name": name, "issuers": list(issuers), **settings})
    text += toml_table("[grant.match]", match)
    if aws is not None:
        text += toml_table("[grant.aws]", aws)
    if vault is not None:
        text += toml_table("[grant.vault]", vault)
    return text


def issuer(name: str, url: str, audiences: Sequence[str], **settings: TomlValue) -> str:
    """One [[issuer]] trusted for `audiences`; `settings` (algorithms, ...) follow."""
    return toml_table(
        "[[issuer]]", {"name": name, "url": url, "audiences": list(audiences), **settings}
    )


def dev_issuer(url: str, **settings: TomlValue) -> str:
    """The harness's dev issuer at `url` as `gitlab`: the dev audience, RS256 and ES256."""
    return issuer(GITLAB, url, [AUDIENCE], algorithms=["RS256", "ES256"], **settings)


def etl_project_grant(name: str, *, ttl: str, **target_and_settings: Any) -> str:
    """A grant of the harness's `gitlab` issuer for the GitLab ETL project (the dev token's
    project id), any ref; `target_and_settings` (aws=, vault=, require_dpop=, ...) as `grant`
    takes them."""
    return grant(name, {"project_id": GITLAB_PROJECT_ID}, ttl=ttl, **target_and_settings)


def etl_writer_grant(*, issuer: str, role_arn: str, session_name: str, ttl: str = "15m") -> str:
    """The GitLab ETL project's protected `main` and `release/*` branches assume `role_arn`,
    with the project and pipeline as session tags and the user as source identity."""
    return grant(
        ETL_WRITER,
        {"project_id": GITLAB_PROJECT_ID, "ref_protected": "true", "ref": ["main", "release/*"]},
        issuers=[issuer],
        ttl=ttl,
        aws={
            "role_arn": role_arn,
            "session_name": session_name,
            "session_tags": {"project": "{project_path}", "pipeline": "{pipeline_id}"},
            "source_identity": "{user_login}",
        },
    )


def upstream_aws(endpoint_url: str) -> str:
    """STS at `endpoint_url` (moto) in the dev region."""
    return toml_table("[upstream.aws]", {"region": REGION, "endpoint_url": endpoint_url})


def upstream_vault_approle(url: str, role_id_file: Path, secret_id_file: Path) -> str:
    """Vault (OpenBao) at `url`, the broker logging in with AppRole from two files."""
    return toml_table(
        "[upstream.vault]",
        {
            "url": url,
            "auth": "approle",
            "role_id_file": str(role_id_file),
            "secret_id_file": str(secret_id_file),
        },
    )


def upstream_vault_token(url: str, token_file: str) -> str:
    """Vault at `url`, the broker using the token in `token_file`."""
    return toml_table("[upstream.vault]", {"url": url, "auth": "token", "token_file": token_file})
