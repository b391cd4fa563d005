"""AWS STS minting: AssumeRole with the broker's own credentials, templated from token claims.

Owns the translation from a grant + verified claims into an `sts:AssumeRole` call within STS
limits, and the mapping of STS errors onto `UpstreamError`. Talks to AWS STS (or moto) through the
signed keep-alive client in sts_http.py that the composition root builds and passes in.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from broker.config import (
    STS_MAX_DURATION,
    STS_MIN_DURATION,
    STS_POLICY_MAX,
    STS_TAG_CHARS,
    STS_TAG_KEY_MAX,
    STS_TAG_VALUE_MAX,
    AwsGrant,
)
from broker.mint import UpstreamError
from broker.mint.sts_http import StsHTTP, StsRefusal, StsUnreachable, text

# STS: RoleSessionName and SourceIdentity are 2..64 chars of [\w+=,.@-].
_STS_NAME_UNSAFE = re.compile(r"[^\w+=,.@-]", re.ASCII)
_STS_NAME_MAX = 64
# STS: at most 50 session tags; key 1..128, value 0..256 of letters, digits, spaces and _.:/=+-@.
_TAG_UNSAFE = re.compile(f"[^{STS_TAG_CHARS}]")
_PLACEHOLDER = re.compile(r"\{([A-Za-z0-9_]+)\}")
# A claim value put into a session policy may hold only these: no IAM wildcard (* ?), no policy
# variable (${...}), no quote; and it may not be empty, which would turn "lake/{p}/*" into
# "lake//*". Anything else refuses the mint rather than widen what the policy grants.
_POLICY_VALUE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:@=+/-]*", re.ASCII)

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
class StsLocation:
    """Where the AssumeRole call goes and whose credentials sign it (None: the defaults)."""

    region: str | None = None
    endpoint_url: str | None = None
    profile: str | None = None


@dataclass(frozen=True)
class AssumeRolePlan:
    """Exactly what will be sent to STS; also what `explain` shows."""

    role_arn: str
    role_session_name: str
    duration_seconds: int
    source_identity: str | None
    tags: tuple[tuple[str, str], ...]
    policy: str | None = None  # the rendered inline session policy (compact JSON)
    external_id: str | None = None
    transitive_tag_keys: tuple[str, ...] = ()
    location: StsLocation = StsLocation()

    def params(self) -> dict[str, Any]:
        """The AssumeRole parameters, exactly as sent."""
        params: dict[str, Any] = {
            "RoleArn": self.role_arn,
            "RoleSessionName": self.role_session_name,
            "DurationSeconds": self.duration_seconds,
        }
        if self.source_identity:
            params["SourceIdentity"] = self.source_identity
        if self.tags:
            params["Tags"] = [{"Key": k, "Value": v} for k, v in self.tags]
        if self.transitive_tag_keys:
            params["TransitiveTagKeys"] = list(self.transitive_tag_keys)
        if self.policy is not None:
            params["Policy"] = self.policy
        if self.external_id is not None:
            params["ExternalId"] = self.external_id
        return params

    def query_params(self) -> dict[str, str]:
        """The same parameters in the STS Query API's form, as they go on the wire."""
        query: dict[str, str] = {}
        for name, value in self.params().items():
            if name == "Tags":
                for n, tag in enumerate(value, start=1):
                    query[f"Tags.member.{n}.Key"] = tag["Key"]
                    query[f"Tags.member.{n}.Value"] = tag["Value"]
            elif name == "TransitiveTagKeys":
                for n, key in enumerate(value, start=1):
                    query[f"TransitiveTagKeys.member.{n}"] = key
            else:
                query[name] = str(value)
        return query


class SessionPolicyRefused(UpstreamError):
    """A claim the session policy needs is missing or holds characters it may not."""

    def __init__(self, detail: str) -> None:
        super().__init__(
            "session_policy_claim_unsafe", retryable=False, upstream="sts", detail=detail
        )


def render_session_policy(template: str, claims: Mapping[str, Any]) -> str:
    """Fill every `{claim}` in the policy's string values; refuse unsafe or missing values.
    Pure. The result is compact JSON, at most STS's 2048 characters."""

    def value(match: re.Match[str]) -> str:
        text = _claim_text(claims, match.group(1))
        if not _POLICY_VALUE.fullmatch(text):
            raise SessionPolicyRefused(f"claim {match.group(1)!r} is missing or unsafe here")
        return text

    def walk(node: Any) -> Any:
        if isinstance(node, str):
            return _PLACEHOLDER.sub(value, node)
        if isinstance(node, dict):
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    rendered = json.dumps(walk(json.loads(template)), separators=(",", ":"), sort_keys=True)
    if len(rendered) > STS_POLICY_MAX:
        raise SessionPolicyRefused(f"rendered session policy is {len(rendered)} characters")
    return rendered


@dataclass(frozen=True)
class AwsCredentials:
    access_key_id: str
    secret_access_key: str = field(repr=False)
    session_token: str = field(repr=False)
    expiration: datetime

    def wire(self) -> dict[str, Any]:
        """The AWS `credential_process` shape (Version 1) the token response carries."""
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
    """Sanitise to STS's RoleSessionName/SourceIdentity alphabet and length: a claim with other
    characters would make STS refuse the call (or, unsanitised, smuggle text into CloudTrail)."""
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
        value = _TAG_UNSAFE.sub("-", render_template(template, claims))[:STS_TAG_VALUE_MAX]
        tags.append((_TAG_UNSAFE.sub("-", key)[:STS_TAG_KEY_MAX], value))
    kept = {k for k, _ in tags}
    return AssumeRolePlan(
        role_arn=grant.role_arn,
        role_session_name=session_name,
        duration_seconds=duration,
        source_identity=source_identity,
        tags=tuple(tags),
        policy=None
        if grant.session_policy is None
        else render_session_policy(grant.session_policy, claims),
        external_id=grant.external_id,
        transitive_tag_keys=tuple(
            _TAG_UNSAFE.sub("-", k)[:STS_TAG_KEY_MAX]
            for k in grant.transitive_tags
            if _TAG_UNSAFE.sub("-", k)[:STS_TAG_KEY_MAX] in kept
        ),
        location=StsLocation(grant.region, grant.sts_endpoint, grant.profile),
    )


class AwsMinter:
    """Calls STS with the broker's own credentials (resolved by the caller, see sts_http.py).

    A grant with its own region, endpoint or profile gets an STS client of its own, built once
    by `client_for` (the composition root's factory) and kept."""

    def __init__(
        self, sts: StsHTTP, client_for: Callable[[StsLocation], StsHTTP] | None = None
    ) -> None:
        self._sts = sts
        self._client_for = client_for
        self._clients: dict[StsLocation, StsHTTP] = {}
        self._lock = threading.Lock()

    def _client(self, location: StsLocation) -> StsHTTP:
        if location == StsLocation() or self._client_for is None:
            return self._sts
        with self._lock:
            if location not in self._clients:
                self._clients[location] = self._client_for(location)
            return self._clients[location]

    def assume_role(self, plan: AssumeRolePlan) -> AwsCredentials:
        try:
            result = self._client(plan.location).call("AssumeRole", plan.query_params())
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
