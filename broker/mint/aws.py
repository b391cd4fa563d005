"""AWS STS minting: AssumeRole with the broker's own credentials, templated from token claims.

Owns the translation from a grant + verified claims into an `sts:AssumeRole` call within STS
limits, and the mapping of STS errors onto `UpstreamError`. Talks to AWS STS (or moto) through the
signed keep-alive client in sts_http.py that the composition root builds and passes in.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from broker.config import AwsGrant
from broker.mint import UpstreamError
from broker.mint.sts_http import StsHTTP, StsRefusal, StsUnreachable, text

# STS: DurationSeconds 900..43200 (the role's MaxSessionDuration may lower the top).
STS_MIN_DURATION = 900
STS_MAX_DURATION = 43200
# STS: RoleSessionName and SourceIdentity are 2..64 chars of [\w+=,.@-].
_STS_NAME_UNSAFE = re.compile(r"[^\w+=,.@-]", re.ASCII)
_STS_NAME_MAX = 64
# STS: at most 50 session tags; key 1..128, value 0..256 of letters, digits, spaces and _.:/=+-@.
_TAG_UNSAFE = re.compile(r"[^\w .:/=+@-]", re.ASCII)
_TAG_KEY_MAX = 128
_TAG_VALUE_MAX = 256
_PLACEHOLDER = re.compile(r"\{([A-Za-z0-9_]+)\}")

# Error codes STS answers with when another attempt may succeed.
_RETRYABLE_CODES = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "ServiceUnavailable",
        "InternalFailure",
        "IDPCommunicationError",
    }
)


@dataclass(frozen=True)
class AssumeRolePlan:
    """Exactly what will be sent to STS; also what `explain` shows."""

    role_arn: str
    role_session_name: str
    duration_seconds: int
    source_identity: str | None
    tags: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class AwsCredentials:
    access_key_id: str
    secret_access_key: str = field(repr=False)
    session_token: str = field(repr=False)
    expiration: datetime

    def wire(self) -> dict[str, Any]:
        """The AWS `credential_process` shape SPEC.md puts in the response."""
        return {
            "Version": 1,
            "AccessKeyId": self.access_key_id,
            "SecretAccessKey": self.secret_access_key,
            "SessionToken": self.session_token,
            "Expiration": self.expiration.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }


def _claim_text(claims: Mapping[str, Any], name: str) -> str:
    value = claims.get(name)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int) and not isinstance(value, bool):
        return str(value)
    # NOTE: lists, objects and missing claims render empty rather than as Python reprs.
    return ""


def render_template(template: str, claims: Mapping[str, Any]) -> str:
    """Substitute `{claim}` placeholders; the result is sanitised by the caller per STS field."""
    return _PLACEHOLDER.sub(lambda m: _claim_text(claims, m.group(1)), template)


def sts_name(text: str) -> str:
    """Sanitise to STS's RoleSessionName/SourceIdentity alphabet and length (HOSTILE #52)."""
    cleaned = _STS_NAME_UNSAFE.sub("-", text)[:_STS_NAME_MAX]
    return cleaned


def clamp_duration(ttl: int, requested: int | None) -> int:
    """The grant's ttl caps the request; STS's floor of 900 s lifts anything shorter."""
    wanted = ttl if requested is None else min(requested, ttl)
    return max(STS_MIN_DURATION, min(wanted, STS_MAX_DURATION))


def plan_assume_role(
    grant_name: str,
    grant: AwsGrant,
    claims: Mapping[str, Any],
    *,
    request_id: str,
    duration: int,
) -> AssumeRolePlan:
    """Build the AssumeRole request. Pure.

    The session name always ends in the request id so CloudTrail's AssumeRole event joins our
    audit record; the grant's `session_name` template, if any, fills the part before it.
    """
    prefix = render_template(grant.session_name, claims) if grant.session_name else grant_name
    room = _STS_NAME_MAX - len(request_id) - 1
    session_name = sts_name(f"{sts_name(prefix)[:room]}-{request_id}")

    source_identity = None
    if grant.source_identity:
        rendered = sts_name(render_template(grant.source_identity, claims))
        # STS: SourceIdentity must be 2..64 chars and must not start with "aws:".
        if len(rendered) >= 2 and not rendered.lower().startswith("aws:"):
            source_identity = rendered

    tags: list[tuple[str, str]] = []
    for key, template in grant.session_tags.items():
        value = _TAG_UNSAFE.sub("-", render_template(template, claims))[:_TAG_VALUE_MAX]
        tags.append((_TAG_UNSAFE.sub("-", key)[:_TAG_KEY_MAX], value))
    return AssumeRolePlan(
        role_arn=grant.role_arn,
        role_session_name=session_name,
        duration_seconds=duration,
        source_identity=source_identity,
        tags=tuple(tags),
    )


class AwsMinter:
    """Calls STS with the broker's own credentials (resolved by the caller, see sts_http.py)."""

    def __init__(self, sts: StsHTTP) -> None:
        self._sts = sts

    def assume_role(self, plan: AssumeRolePlan) -> AwsCredentials:
        params = {
            "RoleArn": plan.role_arn,
            "RoleSessionName": plan.role_session_name,
            "DurationSeconds": str(plan.duration_seconds),
        }
        if plan.source_identity:
            params["SourceIdentity"] = plan.source_identity
        for n, (key, value) in enumerate(plan.tags, start=1):
            params[f"Tags.member.{n}.Key"] = key
            params[f"Tags.member.{n}.Value"] = value
        try:
            result = self._sts.call("AssumeRole", params)
            expiration = datetime.fromisoformat(text(result, "Credentials/Expiration"))
            if expiration.tzinfo is None:
                expiration = expiration.replace(tzinfo=UTC)
            return AwsCredentials(
                access_key_id=text(result, "Credentials/AccessKeyId"),
                secret_access_key=text(result, "Credentials/SecretAccessKey"),
                session_token=text(result, "Credentials/SessionToken"),
                expiration=expiration,
            )
        except StsRefusal as exc:
            raise map_sts_refusal(exc) from exc
        except (StsUnreachable, ValueError) as exc:
            # Connection refused, timeouts, DNS, an answer that is not STS's: unreachable.
            raise _unreachable(exc) from exc

    def check_reachable(self) -> None:
        """Readiness: a cheap signed call that proves credentials and endpoint work."""
        try:
            self._sts.call("GetCallerIdentity", {})
        except StsRefusal as exc:
            raise map_sts_refusal(exc) from exc
        except StsUnreachable as exc:
            raise _unreachable(exc) from exc


def _unreachable(exc: Exception) -> UpstreamError:
    return UpstreamError(
        "upstream_unavailable",
        retryable=True,
        upstream="sts",
        detail=f"{type(exc).__name__}: {exc}",
    )


def map_sts_refusal(exc: StsRefusal) -> UpstreamError:
    """One table from STS's error classes to ours; classified by code and status, never text."""
    code, status = exc.code, exc.status
    # STS's own words and request id, for the operator's log (CloudTrail has the same id).
    detail = (
        f"{code or 'error'} (HTTP {status}): {exc.message} [AWS request id {exc.request_id or '-'}]"
    )

    def refused(reason: str, retryable: bool) -> UpstreamError:
        return UpstreamError(reason, retryable=retryable, upstream="sts", detail=detail)

    if code in _RETRYABLE_CODES or status >= 500 or status == 429:
        return refused("upstream_throttled" if "Throttl" in code else "upstream_unavailable", True)
    if code in {"AccessDenied", "AccessDeniedException"}:
        return refused("upstream_denied", False)
    if code in {"RegionDisabledException", "ExpiredTokenException", "InvalidClientTokenId"}:
        return refused("upstream_misconfigured", False)
    return refused("upstream_rejected", False)
