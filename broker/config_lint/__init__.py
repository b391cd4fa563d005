"""Loading the policy file: TOML read, linted and built into the typed schema of broker.config.

Talks to nothing but the file system, and only in `load_config`. The linting parser walks the
raw TOML once, building the frozen config and collecting every problem, so an operator fixes the
whole file in one pass (`ConfigError`). One module per part of the file: `broker_section`
([broker]), `issuer_section` ([[issuer]]), `grant_section` ([[grant]]) with `claim_match`
([grant.match]), `aws_section` and `vault_section` ([grant.aws], [grant.vault] and their
[upstream.*] tables), `inline_secrets` (the whole file); `reader` holds the shared readers.
Limits come from broker.config, the secret scan from broker.secret_scan, glob and regex
compilation from broker.patterns.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from broker.config import Config, ConfigError, Problem
from broker.config_lint.aws_section import upstream_aws
from broker.config_lint.broker_section import broker_settings
from broker.config_lint.grant_section import grant_configs
from broker.config_lint.inline_secrets import scan_secrets
from broker.config_lint.issuer_section import issuer_configs
from broker.config_lint.reader import Lint
from broker.config_lint.vault_section import upstream_vault

__all__ = ["load_config", "parse_config"]

_TOP_KEYS = frozenset({"broker", "issuer", "grant", "upstream"})
_UPSTREAM_KEYS = frozenset({"aws", "vault"})


def load_config(path: Path) -> Config:
    """Read and parse one policy file; relative `*_file` paths resolve against its directory."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([Problem("file", f"cannot read: {exc}")], source=str(path)) from None
    return parse_config(text, source=str(path), base_dir=path.parent)


def parse_config(text: str, *, source: str = "<memory>", base_dir: Path | None = None) -> Config:
    """Parse policy TOML into a Config, or raise ConfigError listing every problem found."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([Problem("toml", str(exc))], source=source) from None
    lint = Lint(base_dir)
    config = _config(lint, raw, source)
    if lint.problems:
        raise ConfigError(lint.problems, source=source)
    return config


def _config(lint: Lint, raw: Mapping[str, Any], source: str) -> Config:
    scan_secrets(lint, raw)
    lint.keys(raw, "", _TOP_KEYS)
    broker = broker_settings(lint, lint.table(raw.get("broker", {}), "broker") or {})
    issuers = issuer_configs(lint, raw.get("issuer", []))
    upstream = lint.table(raw.get("upstream", {}), "upstream") or {}
    lint.keys(upstream, "upstream", _UPSTREAM_KEYS)
    aws = upstream_aws(lint, lint.table(upstream.get("aws", {}), "upstream.aws") or {})
    vault_table = lint.table(upstream.get("vault"), "upstream.vault")
    vault = upstream_vault(lint, vault_table) if vault_table is not None else None
    grants = grant_configs(lint, raw.get("grant", []), broker, {i.name for i in issuers})
    if vault is None and any(g.vault for g in grants):
        lint.add("upstream.vault", "required: a grant mints Vault credentials")
    return Config(
        broker=broker, issuers=issuers, grants=grants, aws=aws, vault=vault, source=source
    )
