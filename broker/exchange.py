"""The token-exchange use case: verify -> policy -> mint -> audit. No HTTP types here.

Owns the order of operations and the fail-closed rules of SPEC.md: a request ends in exactly one
terminal audit record (`denied`, `error` or `issued`); an `intent` is durable before any upstream
call; a credential leaves this module only after its `issued` record is durable. Talks to the
issuer registry, the audit store and the minters it is given; reads the clock only through the
injected `clock`.
"""

from __future__ import annotations

import contextlib
import logging
import random
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from broker.audit.events import AuditEvent, Outcome
from broker.audit.store import AuditStore, AuditUnavailable
from broker.config import Config, GrantConfig
from broker.issuers import IssuerRegistry, IssuerUnavailable, UnknownKey
from broker.mint import UpstreamError
from broker.mint.aws import AwsMinter, clamp_duration, plan_assume_role
from broker.policy import Policy
from broker.tokens import TokenError, parse_token, token_sha256, validate_claims, verify_signature

log = logging.getLogger("broker.exchange")

GRANT_TYPE_TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
GRANT_TYPE_REFRESH = "refresh_token"
SUBJECT_TOKEN_TYPES = frozenset(
    {
        "urn:ietf:params:oauth:token-type:jwt",
        "urn:ietf:params:oauth:token-type:id_token",
        "urn:ietf:params:oauth:token-type:access_token",
    }
)
TOKEN_TYPE_AWS = "urn:luigi-creds:token-type:aws-credentials"
TOKEN_TYPE_VAULT_TOKEN = "urn:luigi-creds:token-type:vault-token"
TOKEN_TYPE_VAULT_SECRET = "urn:luigi-creds:token-type:vault-secret"

# A Luigi task id is `Family_param_hash`; 512 printable characters is far beyond real ones.
_TASK_RE = re.compile(r"[\x21-\x7e]{1,512}")
_DURATION_RE = re.compile(r"[0-9]{1,6}")
# STS: bounded retries inside the request deadline (HOSTILE F10: at most 2 retries).
_MAX_UPSTREAM_ATTEMPTS = 3

_DESCRIPTIONS = {
    "invalid_request": "The request or its subject token is not acceptable.",
    "invalid_grant": "The refresh token is not valid.",
    "invalid_target": "The requested grant is not available to this identity.",
    "unsupported_grant_type": "The grant_type is not supported.",
    "temporarily_unavailable": "The service is temporarily unavailable; retry later.",
}


class ExchangeError(Exception):
    """A request that ends without a credential: RFC 6749 error code, HTTP status and reason.

    `reason` is the stable code for audit and logs; callers see only `error` and a generic
    description, never the reason's details (SPEC: no policy or upstream internals).
    """

    def __init__(
        self, status: int, error: str, reason: str, *, retry_after: int | None = None
    ) -> None:
        super().__init__(reason)
        self.status = status
        self.error = error
        self.reason = reason
        self.retry_after = retry_after

    @property
    def description(self) -> str:
        return _DESCRIPTIONS[self.error]


def _bad_request(reason: str) -> ExchangeError:
    return ExchangeError(400, "invalid_request", reason)


def _unavailable(reason: str, retry_after: int = 5) -> ExchangeError:
    return ExchangeError(503, "temporarily_unavailable", reason, retry_after=retry_after)


@dataclass(frozen=True)
class TokenRequest:
    """The form fields of POST /v1/token after the HTTP edge checked framing."""

    request_id: str
    client_addr: str
    grant_type: str
    audience: str = ""
    subject_token: str = field(default="", repr=False)
    subject_token_type: str = ""
    requested_token_type: str = ""
    refresh_token: str = field(default="", repr=False)
    duration: str = ""
    task: str = ""


@dataclass(frozen=True)
class Issued:
    request_id: str
    issued_token_type: str
    access_token: str = field(repr=False)
    expires_in: int
    credentials: Mapping[str, Any] = field(repr=False)
    refresh_token: str = field(default="", repr=False)

    def wire(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "access_token": self.access_token,
            "issued_token_type": self.issued_token_type,
            "token_type": "N_A",
            "expires_in": self.expires_in,
            "request_id": self.request_id,
            "credentials": dict(self.credentials),
        }
        if self.refresh_token:
            body["refresh_token"] = self.refresh_token
        return body


@dataclass
class _Record:
    """The audit event being built as the request goes; emitted on every path."""

    event: AuditEvent
    terminal_written: bool = False

    def set(self, **changes: Any) -> None:
        self.event = replace(self.event, **changes)


def issued_token_type(grant: GrantConfig) -> str:
    if grant.aws is not None:
        return TOKEN_TYPE_AWS
    if grant.vault is not None and grant.vault.secret:
        return TOKEN_TYPE_VAULT_SECRET
    return TOKEN_TYPE_VAULT_TOKEN


class Exchanger:
    def __init__(
        self,
        config: Config,
        policy: Policy,
        issuers: IssuerRegistry,
        audit: AuditStore,
        *,
        aws: AwsMinter | None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._config = config
        self._policy = policy
        self._issuers = issuers
        self._audit = audit
        self._aws = aws
        self._clock = clock
        self._sleep = sleep
        self._last_append_failed = False

    # -- entry point -------------------------------------------------------------------------

    def knows_grant(self, name: str) -> bool:
        return self._policy.grant(name) is not None

    def _new_record(self, req: TokenRequest) -> _Record:
        return _Record(
            AuditEvent(
                time=self._clock(),
                request_id=req.request_id,
                outcome=Outcome.DENIED,
                kind="refresh" if req.grant_type == GRANT_TYPE_REFRESH else "exchange",
                client_addr=req.client_addr,
                task=req.task[:512],
                grant=req.audience[:128],
            )
        )

    def reject(self, req: TokenRequest, status: int, reason: str) -> Issued:
        """Audit and refuse a request the HTTP edge found malformed (bad framing, too large)."""
        record = self._new_record(req)
        self._terminal(record, Outcome.DENIED, reason)
        raise ExchangeError(status, "invalid_request", reason)

    def handle(self, req: TokenRequest) -> Issued:
        """Serve one POST /v1/token; raises ExchangeError for every non-200 answer."""
        record = self._new_record(req)
        try:
            return self._handle(req, record)
        except ExchangeError as exc:
            if not record.terminal_written:
                outcome = Outcome.ERROR if exc.status >= 500 else Outcome.DENIED
                self._terminal(record, outcome, exc.reason)
            raise
        except Exception as exc:
            # Anything unforeseen still ends in one terminal record and a generic 503.
            if not record.terminal_written:
                self._terminal(record, Outcome.ERROR, "internal_error")
            raise _unavailable("internal_error") from exc

    # -- steps -------------------------------------------------------------------------------

    def _handle(self, req: TokenRequest, record: _Record) -> Issued:
        if req.grant_type == GRANT_TYPE_REFRESH:
            raise ExchangeError(400, "unsupported_grant_type", "refresh_not_enabled")
        if req.grant_type != GRANT_TYPE_TOKEN_EXCHANGE:
            raise ExchangeError(400, "unsupported_grant_type", "unsupported_grant_type")
        task = self._check_task(req.task)
        if not req.subject_token:
            raise _bad_request("missing_subject_token")
        record.set(token_sha256=token_sha256(req.subject_token))
        if req.subject_token_type not in SUBJECT_TOKEN_TYPES:
            raise _bad_request("unsupported_subject_token_type")
        if not req.audience:
            raise _bad_request("missing_audience")

        now = self._clock()
        claims, issuer_name = self._verify(req.subject_token, now, record)

        grant = self._policy.grant(req.audience)
        if grant is None:
            raise ExchangeError(400, "invalid_target", "unknown_grant")
        decision = self._policy.evaluate(grant.name, issuer_name, claims)
        record.set(claims=dict(decision.claims_read))
        if not decision.allowed:
            raise ExchangeError(400, "invalid_target", decision.reason)
        if req.requested_token_type and req.requested_token_type != issued_token_type(grant):
            raise _bad_request("unsupported_requested_token_type")
        duration = self._duration(req.duration, grant)
        return self._mint(grant, claims, duration, task, record)

    def _check_task(self, task: str) -> str:
        if task and not _TASK_RE.fullmatch(task):
            raise _bad_request("bad_task")
        return task

    def _duration(self, raw: str, grant: GrantConfig) -> int | None:
        if not raw:
            return None
        if not _DURATION_RE.fullmatch(raw) or int(raw) == 0:
            raise _bad_request("bad_duration")
        return int(raw)

    def _verify(self, raw: str, now: datetime, record: _Record) -> tuple[Mapping[str, Any], str]:
        """Structure, issuer, key, signature, then claims; the cheapest checks first."""
        try:
            token = parse_token(raw)
        except TokenError as exc:
            raise _bad_request(exc.reason) from exc
        iss = token.claims.get("iss")
        if not isinstance(iss, str):
            raise _bad_request("missing_claim" if iss is None else "bad_claim_type")
        # Static `iss` -> config map before any network I/O (HOSTILE #59).
        issuer = self._issuers.by_url(iss)
        if issuer is None:
            raise _bad_request("unknown_issuer")
        record.set(issuer=issuer.name)
        if token.alg not in issuer.algorithms:
            # Before key lookup: a foreign alg must not cost a JWKS refetch (HOSTILE #13, #14).
            raise _bad_request("alg_not_allowed")
        try:
            key = self._issuers.resolve_key(issuer, token.kid, token.alg)
        except UnknownKey as exc:
            raise _bad_request("unknown_kid") from exc
        except IssuerUnavailable as exc:
            raise _unavailable("issuer_unavailable") from exc
        try:
            verify_signature(token, key, issuer.algorithms)
            validate_claims(
                token.claims,
                issuer=issuer.url,
                audiences=issuer.audiences,
                now=now,
                leeway=self._config.broker.leeway,
                max_lifetime=issuer.max_token_lifetime,
                require_jti=issuer.require_jti,
            )
        except TokenError as exc:
            raise _bad_request(exc.reason) from exc
        subject = token.claims.get("sub")
        jti = token.claims.get("jti")
        record.set(
            subject=subject[:256] if isinstance(subject, str) else "",
            jti=jti[:256] if isinstance(jti, str) else "",
        )
        return token.claims, issuer.name

    def _mint(
        self,
        grant: GrantConfig,
        claims: Mapping[str, Any],
        requested: int | None,
        task: str,
        record: _Record,
    ) -> Issued:
        if grant.aws is None or self._aws is None:
            # Vault grants arrive with the Vault minter; until then they are unavailable.
            raise _unavailable("upstream_not_configured")
        duration = clamp_duration(grant.ttl, requested)
        plan = plan_assume_role(
            grant.name, grant.aws, claims, request_id=record.event.request_id, duration=duration
        )
        record.set(target=plan.role_arn)
        for attempt in range(1, _MAX_UPSTREAM_ATTEMPTS + 1):
            # The intent is durable before STS is called: STS credentials cannot be revoked.
            self._append(
                replace(
                    record.event,
                    outcome=Outcome.INTENT,
                    reason="minting",
                    attempt=attempt,
                    time=self._clock(),
                    detail={"duration": duration, "session_name": plan.role_session_name},
                )
            )
            record.set(attempt=attempt)
            try:
                creds = self._aws.assume_role(plan)
                break
            except UpstreamError as exc:
                if not exc.retryable or attempt == _MAX_UPSTREAM_ATTEMPTS:
                    raise _unavailable(exc.reason) from exc
                # Full jitter on a small base keeps the request well inside client timeouts.
                self._sleep(random.uniform(0, 0.2 * 2**attempt))  # noqa: S311 - jitter, not crypto
        record.set(
            credential_ref=creds.access_key_id,
            expires_at=creds.expiration,
            detail={"duration": duration, "session_name": plan.role_session_name},
        )
        # NOTE: if this write fails the AWS credential cannot be revoked; it is simply never
        # returned, and the intent above names its session, which CloudTrail can join.
        self._terminal(record, Outcome.ISSUED, "issued")
        now = self._clock()
        return Issued(
            request_id=record.event.request_id,
            issued_token_type=TOKEN_TYPE_AWS,
            access_token=creds.session_token,
            expires_in=max(0, int((creds.expiration - now) / timedelta(seconds=1))),
            credentials=creds.wire(),
        )

    # -- audit -------------------------------------------------------------------------------

    def check_audit(self) -> None:
        """Readiness: not ready while the last append failed, even if a probe would pass."""
        if self._last_append_failed:
            raise AuditUnavailable("the last audit append failed")
        self._audit.check_writable()

    def _write(self, event: AuditEvent) -> None:
        try:
            self._audit.append(event)
        except AuditUnavailable:
            self._last_append_failed = True
            raise
        self._last_append_failed = False

    def _append(self, event: AuditEvent) -> None:
        try:
            self._write(event)
        except AuditUnavailable as exc:
            raise _unavailable("audit_unavailable") from exc

    def _terminal(self, record: _Record, outcome: Outcome, reason: str) -> None:
        """Write the one terminal record. If it cannot be written, the answer becomes 503."""
        record.terminal_written = True
        try:
            self._write(replace(record.event, outcome=outcome, reason=reason, time=self._clock()))
        except AuditUnavailable as exc:
            if outcome is Outcome.ISSUED:
                self._withhold(record)
            raise _unavailable("audit_unavailable") from exc

    def _withhold(self, record: _Record) -> None:
        """A credential was minted but its `issued` record failed: it is never returned (F3).

        Try once more to close the intent with an error record (the failure may be transient);
        either way the alert names the credential reference, never the credential.
        """
        log.error(
            "credential minted but not audited; withheld",
            extra={"request_id": record.event.request_id, "ref": record.event.credential_ref},
        )
        with contextlib.suppress(AuditUnavailable):
            self._write(
                replace(
                    record.event,
                    outcome=Outcome.ERROR,
                    reason="audit_failed_after_mint",
                    time=self._clock(),
                )
            )
