"""From an allowed grant to a credential: picks the AWS or Vault minter and plans the call.

Owns the split between planning (pure: what will be asked of which upstream, recorded in the
`intent` audit record before the call) and execution (the upstream call). Every minted credential
comes back as a `Minted`, the one shape the exchange use case audits, records and returns.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from broker.config import GrantConfig
from broker.mint import UpstreamError
from broker.mint.aws import AwsMinter, clamp_duration, plan_assume_role
from broker.mint.vault import VaultMinter, clamp_ttl, plan_token
from broker.protocol import TOKEN_TYPE_AWS, TOKEN_TYPE_VAULT_SECRET, TOKEN_TYPE_VAULT_TOKEN
from broker.upstream_check import refusal_hint

log = logging.getLogger(__name__)


# Kinds of credential references kept under a refresh session, for revocation at its end.
REF_AWS = "aws"  # AccessKeyId; STS sessions cannot be revoked, only marked in the audit
REF_VAULT_TOKEN = "vault_token"  # token accessor
# "<holder accessor> <lease id>": the token holding a dynamic secret's lease, and the lease
REF_VAULT_LEASE = "vault_lease"


def issued_token_type(grant: GrantConfig) -> str:
    if grant.aws is not None:
        return TOKEN_TYPE_AWS
    if grant.vault is not None and grant.vault.secret:
        return TOKEN_TYPE_VAULT_SECRET
    return TOKEN_TYPE_VAULT_TOKEN


@dataclass(frozen=True)
class Minted:
    token_type: str
    access_token: str = field(repr=False)
    credentials: Mapping[str, Any] = field(repr=False)
    expires_at: datetime
    audit_ref: str  # what the audit records: AccessKeyId, hmac(accessor), lease_id
    session_ref: tuple[str, str]  # (kind, ref) kept with the session for revocation


@dataclass(frozen=True)
class Prepared:
    """A planned upstream call: `target` and `detail` go into the intent; `run` makes the call."""

    target: str
    detail: Mapping[str, Any]
    run: Callable[[], Minted] = field(repr=False, compare=False)


def _logging_refusals(prepared: Prepared, grant: str, request_id: str) -> Callable[[], Minted]:
    """`prepared.run`, logging each upstream refusal with the request id and the upstream's own
    words (the client only ever sees `temporarily_unavailable`)."""
    run = prepared.run

    def logged() -> Minted:
        try:
            return run()
        except UpstreamError as exc:
            log.warning(
                "%s refused grant %s (%s): %s. %s",
                exc.upstream or "upstream",
                grant,
                exc.reason,
                exc.detail or "no detail",
                refusal_hint(exc),
                extra={
                    "request_id": request_id,
                    "grant": grant,
                    "target": prepared.target,
                    "upstream": exc.upstream,
                    "reason": exc.reason,
                    "upstream_error": exc.detail,
                },
            )
            raise

    return logged


# observe(upstream, grant, seconds, outcome): one upstream call's latency and result
# ("ok" or the UpstreamError reason), for the broker's metrics.
Observe = Callable[[str, str, float, str], None]


def _timed(
    run: Callable[[], Minted], upstream: str, grant: str, observe: Observe
) -> Callable[[], Minted]:
    def timed() -> Minted:
        started = time.perf_counter()
        try:
            minted = run()
        except UpstreamError as exc:
            observe(upstream, grant, time.perf_counter() - started, exc.reason)
            raise
        observe(upstream, grant, time.perf_counter() - started, "ok")
        return minted

    return timed


class GrantMinter:
    def __init__(
        self,
        *,
        aws: AwsMinter | None,
        vault: VaultMinter | None,
        hash_ref: Callable[[str], str],
        clock: Callable[[], datetime],
    ) -> None:
        self._aws = aws
        self._vault = vault
        self._hash_ref = hash_ref
        self._clock = clock
        # Set by the composition root once the metrics exist; None: upstream calls are not timed.
        self.observe: Observe | None = None

    def prepare(
        self,
        grant: GrantConfig,
        claims: Mapping[str, Any],
        *,
        requested: int | None,
        request_id: str,
        metadata: Mapping[str, str],
        max_ttl: int,
    ) -> Prepared:
        """Plan the call for `grant`. `max_ttl` is what is left of the refresh session."""
        if grant.aws is not None:
            prepared = self._prepare_aws(grant, claims, requested, request_id)
        elif grant.vault is not None:
            prepared = self._prepare_vault(grant, requested, metadata, max_ttl)
        else:
            raise UpstreamError("upstream_not_configured", retryable=False)
        run = _logging_refusals(prepared, grant.name, request_id)
        if self.observe is not None:
            # Only authorised requests reach here, so the grant label is a configured name.
            run = _timed(run, "sts" if grant.aws else "vault", grant.name, self.observe)
        return replace(prepared, run=run)

    def _prepare_aws(
        self, grant: GrantConfig, claims: Mapping[str, Any], requested: int | None, request_id: str
    ) -> Prepared:
        aws, spec = self._aws, grant.aws
        if aws is None or spec is None:
            raise UpstreamError("upstream_not_configured", retryable=False)
        plan = plan_assume_role(
            grant.name,
            spec,
            claims,
            request_id=request_id,
            duration=clamp_duration(grant.ttl, requested),
        )

        def run() -> Minted:
            creds = aws.assume_role(plan)
            return Minted(
                token_type=TOKEN_TYPE_AWS,
                access_token=creds.session_token,
                credentials=creds.wire(),
                expires_at=creds.expiration,
                audit_ref=creds.access_key_id,
                session_ref=(REF_AWS, creds.access_key_id),
            )

        detail: dict[str, Any] = {
            "duration": plan.duration_seconds,
            "session_name": plan.role_session_name,
        }
        # What narrows or relocates the session, in the intent record (nothing here is secret;
        # an ExternalId is a confused-deputy guard, not a credential, and is not recorded).
        if plan.policy is not None:
            detail["session_policy"] = plan.policy
        if plan.transitive_tag_keys:
            detail["transitive_tags"] = list(plan.transitive_tag_keys)
        if plan.location.region or plan.location.endpoint_url:
            detail["sts"] = plan.location.endpoint_url or plan.location.region
        return Prepared(target=plan.role_arn, detail=detail, run=run)

    def _prepare_vault(
        self,
        grant: GrantConfig,
        requested: int | None,
        metadata: Mapping[str, str],
        max_ttl: int,
    ) -> Prepared:
        vault, spec = self._vault, grant.vault
        if vault is None or spec is None:
            raise UpstreamError("upstream_not_configured", retryable=False)
        ttl = clamp_ttl(grant.ttl, requested)
        if spec.secret:
            path = spec.secret

            def read() -> Minted:
                secret = vault.read_secret(
                    path, ttl=ttl, metadata={**metadata, "grant": grant.name}
                )
                return Minted(
                    token_type=TOKEN_TYPE_VAULT_SECRET,
                    access_token=secret.lease_id,
                    credentials=secret.wire(),
                    expires_at=self._clock() + timedelta(seconds=secret.lease_duration),
                    audit_ref=secret.lease_id,
                    session_ref=(REF_VAULT_LEASE, f"{secret.holder_accessor} {secret.lease_id}"),
                )

            return Prepared(target=f"vault:{path}", detail={"ttl": ttl}, run=read)

        plan = plan_token(grant, ttl=ttl, metadata=metadata, explicit_max_ttl=max(ttl, max_ttl))

        def create() -> Minted:
            token = vault.create_token(plan)
            return Minted(
                token_type=TOKEN_TYPE_VAULT_TOKEN,
                access_token=token.token,
                credentials=token.wire(),
                expires_at=self._clock() + timedelta(seconds=token.lease_duration),
                audit_ref=self._hash_ref(token.accessor),
                session_ref=(REF_VAULT_TOKEN, token.accessor),
            )

        target = "vault:token:" + ",".join(plan.policies)
        return Prepared(target=target, detail={"ttl": ttl, "orphan": plan.orphan}, run=create)

    @property
    def mints_aws(self) -> bool:
        return self._aws is not None

    @property
    def vault(self) -> VaultMinter | None:
        return self._vault

    def readiness_checks(self) -> dict[str, Callable[[], None]]:
        """/readyz checks for the upstreams in use: STS answers; Vault is unsealed and we log in."""
        checks: dict[str, Callable[[], None]] = {}
        if self._aws is not None:
            checks["aws"] = self._aws.check_reachable
        if self._vault is not None:
            checks["vault"] = self._vault.check_ready
        return checks

    def revoke(self, kind: str, ref: str) -> bool:
        """Revoke one session-recorded credential; False when it cannot be (AWS) or failed."""
        vault = self._vault
        if vault is None or not ref or kind not in (REF_VAULT_TOKEN, REF_VAULT_LEASE):
            return False
        try:
            if kind == REF_VAULT_TOKEN:
                vault.revoke_accessor(ref)
            else:
                holder, _, lease_id = ref.partition(" ")
                # The lease first, synchronously (the engine drops the login now), then the
                # holder token with whatever else it holds.
                vault.revoke_lease(lease_id)
                vault.revoke_accessor(holder)
        except UpstreamError as exc:
            # Vault answers 400 to revoking an accessor that no longer exists (the token expired
            # or was revoked before): it is gone, which is what revoking wanted.
            return exc.reason == "upstream_rejected"
        return True
