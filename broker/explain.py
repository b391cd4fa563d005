"""Offline explanation of a policy decision: why allowed or denied, and what would be minted.

Pure: takes a Config and a claims mapping, returns text. Used by `luigi-creds-broker explain`
and by operators troubleshooting "why was my job denied" without a live token.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from broker.config import Config, GrantConfig
from broker.mint.aws import clamp_duration, plan_assume_role
from broker.policy import Decision, Policy


def _issuer_name(config: Config, claims: Mapping[str, Any], issuer: str | None) -> str | None:
    if issuer:
        return issuer
    iss = claims.get("iss")
    match = next((i for i in config.issuers if i.url == iss), None)
    return match.name if match else None


def _minted(grant: GrantConfig, claims: Mapping[str, Any]) -> list[str]:
    if grant.aws is not None:
        # A real request id has 20 hex digits; a stand-in of that length shows the real cut.
        stand_in = "0" * 20
        plan = plan_assume_role(
            grant.name,
            grant.aws,
            claims,
            request_id=stand_in,
            duration=clamp_duration(grant.ttl, None),
        )
        session_name = plan.role_session_name.replace(stand_in, "<request id>")
        lines = [
            f"  sts:AssumeRole {plan.role_arn}",
            f"    RoleSessionName  {session_name}",
            f"    DurationSeconds  {plan.duration_seconds}",
            f"    SourceIdentity   {plan.source_identity or '-'}",
        ]
        lines += [f"    Tag {key} = {value}" for key, value in plan.tags]
        return lines
    if grant.vault is not None:
        if grant.vault.secret:
            return [f"  vault read {grant.vault.secret} (lease kept for renew/revoke)"]
        policies = ", ".join(grant.vault.token_policies)
        kind = "orphan token" if grant.vault.orphan else "child token"
        return [f"  vault {kind}: policies [{policies}], ttl {grant.ttl}s"]
    return []


def _render(decision: Decision, grant: GrantConfig | None, claims: Mapping[str, Any]) -> list[str]:
    verdict = "ALLOW" if decision.allowed else "DENY"
    lines = [f"grant {decision.grant}: {verdict} ({decision.reason})"]
    for check in decision.trace:
        mark = "ok  " if check.ok else "FAIL"
        lines.append(
            f"  [{mark}] {check.claim}: expected {check.expected}, got {check.actual}"
            + (f" ({check.why})" if check.why else "")
        )
    if decision.allowed and grant is not None:
        lines.append("would mint:")
        lines += _minted(grant, claims)
    return lines


def explain(
    config: Config, claims: Mapping[str, Any], *, grant: str | None, issuer: str | None
) -> tuple[str, bool]:
    """Return the explanation text and whether the (or any, without --grant) grant is allowed."""
    policy = Policy.compile(config)
    issuer_name = _issuer_name(config, claims, issuer)
    if issuer_name is None:
        return (
            f"DENY: iss {claims.get('iss')!r} is not a configured issuer "
            f"(configured: {', '.join(i.url for i in config.issuers)})",
            False,
        )
    lines = [f"issuer {issuer_name}"]
    if grant is not None:
        decisions: tuple[Decision, ...] = (policy.evaluate(grant, issuer_name, claims),)
    else:
        decisions = policy.allowed_grants(issuer_name, claims)
    for decision in decisions:
        lines += _render(decision, policy.grant(decision.grant), claims)
    return "\n".join(lines), any(d.allowed for d in decisions)
