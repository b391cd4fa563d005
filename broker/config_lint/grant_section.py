"""The [[grant]] tables: who (issuers and claim match) gets what (an AWS role or a Vault
credential) for how long."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from broker.config import (
    STS_MAX_DURATION,
    STS_MIN_DURATION,
    VAULT_MIN_GRANT_TTL,
    BrokerSettings,
    GrantConfig,
)
from broker.config_lint.aws_section import aws_grant
from broker.config_lint.claim_match import match_table
from broker.config_lint.reader import Lint
from broker.config_lint.vault_section import vault_grant

GRANT_KEYS = frozenset(
    {"name", "issuers", "match", "ttl", "aws", "vault", "description", "require_dpop"}
)


def grant_configs(
    lint: Lint, value: object, broker: BrokerSettings, issuer_names: set[str]
) -> tuple[GrantConfig, ...]:
    out = [_grant(lint, t, w, broker, issuer_names) for w, t in lint.entries(value, "grant")]
    lint.unique((g.name for g in out), "grant")
    return tuple(out)


def _grant(
    lint: Lint, t: Mapping[str, Any], w: str, broker: BrokerSettings, issuer_names: set[str]
) -> GrantConfig:
    lint.keys(t, w, GRANT_KEYS)
    name = lint.name(t, w)
    issuers = lint.str_list(t, "issuers", w)
    if not issuers:
        lint.add(f"{w}.issuers", "must name at least one configured issuer")
    for issuer in issuers:
        if issuer not in issuer_names:
            lint.add(f"{w}.issuers", f"{issuer!r} is not a configured issuer")
    match = match_table(lint, lint.table(t.get("match", {}), f"{w}.match") or {}, f"{w}.match")
    ttl = lint.duration(t, "ttl", w, GrantConfig(name="", issuers=(), match={}).ttl)
    aws_t = lint.table(t.get("aws"), f"{w}.aws")
    vault_t = lint.table(t.get("vault"), f"{w}.vault")
    if (aws_t is None) == (vault_t is None):
        lint.add(w, "needs exactly one of [grant.aws] or [grant.vault]")
    aws = aws_grant(lint, aws_t, f"{w}.aws") if aws_t is not None else None
    vault = vault_grant(lint, vault_t, f"{w}.vault") if vault_t is not None else None
    if aws is not None and not STS_MIN_DURATION <= ttl <= STS_MAX_DURATION:
        lint.add(f"{w}.ttl", "AWS STS allows 900s..43200s (15m..12h)")
    if vault is not None:
        if ttl < VAULT_MIN_GRANT_TTL:
            lint.add(f"{w}.ttl", "Vault credentials need a ttl of at least 60s")
        elif ttl > broker.session_max:
            lint.add(f"{w}.ttl", "must not exceed broker.session_max")
    description = lint.typed(t, "description", w, str, "")
    return GrantConfig(
        name=name,
        issuers=issuers,
        match=match,
        ttl=ttl,
        aws=aws,
        vault=vault,
        description=description,
        require_dpop=lint.typed(t, "require_dpop", w, bool, False),
    )
