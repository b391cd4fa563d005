"""The token endpoint's use cases: exchange, refresh, revoke and explain. No HTTP types here.

Owns the order of operations and the fail-closed rules:
- a request ends in exactly one terminal audit record (`denied`, `error` or `issued`);
- an `intent` is durable before any STS/Vault call (STS credentials cannot be revoked);
- a credential leaves this module only after its `issued` record is durable; a Vault credential
  minted but not audited is revoked, an AWS one withheld;
- a CI token's `jti` is consumed once; the answer carries a rotating refresh handle whose
  session mints further credentials until `session_max`.
Durable writes are grouped so each request commits twice: the token's consumption, its new
session and the first `intent` together before the upstream call; the credential's session
record, the handle rotation (refresh) and `issued` together after it. Each group commits or
rolls back whole, so a failed write leaves nothing to undo.
Talks to the issuer registry, the audit store, the session store and the minters it is given;
reads the clock only through the injected `clock` and `monotonic`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn, TypeVar

from broker.audit.events import AuditEvent, Outcome
from broker.audit.store import AuditStore
from broker.config import Config, GrantConfig
from broker.denials import DenialTally
from broker.dpop import DpopGuard, NonceSource, Proof, ProofError
from broker.errors import BrokerException
from broker.issuers import IssuerRegistry, IssuerUnavailable, UnknownKey
from broker.mint import UpstreamError
from broker.mint.grants import REF_VAULT_LEASE, GrantMinter, Minted, Prepared, issued_token_type
from broker.policy import Policy
from broker.policy_reload import ActivePolicy, LoadedPolicy
from broker.protocol import (
    AGENT_REFUSALS,
    AGENT_REFUSED,
    ERROR_DESCRIPTIONS,
    GRANT_TYPE_REFRESH,
    GRANT_TYPE_TOKEN_EXCHANGE,
    SUBJECT_TOKEN_TYPES,
    TOKEN_TYPE_DPOP,
    TOKEN_TYPE_NOT_APPLICABLE,
    ClientRequest,
    ExplainRequest,
    Issued,
    RevokeRequest,
    Timings,
    TokenRequest,
)
from broker.ratelimit import DenyCache, RateLimits, retry_after
from broker.replay import ReplayLedger
from broker.revocation import SessionEnder
from broker.sessions import (
    REASON_TOO_MANY_CHAINS,
    Session,
    SessionError,
    SessionStore,
    rotated,
)
from broker.storage import StoreUnavailable, Tx
from broker.tokens import TokenError, parse_token, token_sha256, validate_claims, verify_signature

log = logging.getLogger("broker.exchange")
T = TypeVar("T")

# A Luigi task id is `Family_param_hash`; 512 printable characters is far beyond real ones.
_TASK_RE = re.compile(r"[\x21-\x7e]{1,512}")
_DURATION_RE = re.compile(r"[0-9]{1,6}")
# Reasons that mean the store just failed a write: the request is refused without trying
# another (terminal) write that would only wait out the same deadline.
_STORE_FAILED = frozenset({"audit_unavailable", "store_unavailable"})
# Bounded upstream retries inside the request deadline: at most 2 retries, so a failing
# upstream is not hammered and the client's own timeout is not outlived.
_MAX_UPSTREAM_ATTEMPTS = 3


class ExchangeError(BrokerException):
    """A request that ends without a credential: RFC 6749 error code, HTTP status and reason.

    `reason` is the stable code for audit and logs; callers see only `error` and a generic
    description, never the reason's details: no policy or upstream internals leak.
    `authenticated`: the caller had proven an identity (token or session) before the refusal.
    """

    authenticated = False

    def __init__(
        self,
        status: int,
        error: str,
        reason: str,
        *,
        retry_after: int | None = None,
        description: str | None = None,
    ) -> None:
        super().__init__(reason)
        self.status = status
        self.error = error
        self.reason = reason
        self.retry_after = retry_after
        # Only for refusals whose cause is the request's own shape and no secret of the
        # broker's (a limit the operator set), where the generic text would leave the
        # client guessing.
        self._description = description

    @property
    def description(self) -> str:
        return self._description or ERROR_DESCRIPTIONS[self.error]


def _bad_request(reason: str) -> ExchangeError:
    return ExchangeError(400, "invalid_request", reason)


def _agent_refusal(requested_token_type: str) -> str | None:
    """The audit reason of a refusal the job's agent reports (broker/protocol.py AGENT_REFUSED),
    or None when `requested_token_type` is not such a report."""
    if requested_token_type != AGENT_REFUSED and not requested_token_type.startswith(
        AGENT_REFUSED + ":"
    ):
        return None
    refused = requested_token_type[len(AGENT_REFUSED) + 1 :]
    return f"agent_refused_{refused}" if refused in AGENT_REFUSALS else "agent_refused"


def _unavailable(reason: str, retry_after: int = 5) -> ExchangeError:
    return ExchangeError(503, "temporarily_unavailable", reason, retry_after=retry_after)


def _within_limit(wait: float | None, reason: str = "rate_limited") -> None:
    """A rate limit that says to wait `wait` seconds refuses the request: 429, Retry-After."""
    if wait is not None:
        raise ExchangeError(429, "temporarily_unavailable", reason, retry_after=retry_after(wait))


@contextlib.contextmanager
def _reading_state() -> Iterator[None]:
    """A session, replay or DPoP store that fails to answer refuses the request: 503
    `state_unavailable` (a failed durable write is `store_unavailable`, see _durably)."""
    try:
        yield
    except StoreUnavailable as exc:
        raise _unavailable("state_unavailable") from exc


@dataclass(frozen=True)
class _Identity:
    """Who is asking: verified token claims (exchange) or a refresh session's stored claims."""

    issuer: str
    subject: str
    claims: Mapping[str, Any]
    token_exp: int | None = None  # exchange only: the subject token's exp
    token_id: str = ""  # exchange only: jti, or the token hash for issuers without jti


class _Record:
    """The audit event being built as the request goes; emitted on every path.

    Kept as a field dict and built into an AuditEvent only when read or emitted: a request
    sets fields a dozen times, and copying the frozen event each time was measurable.
    """

    def __init__(self, event: AuditEvent, timings: Timings) -> None:
        self._fields = {f.name: getattr(event, f.name) for f in _EVENT_FIELDS}
        self._event: AuditEvent | None = event
        self.timings = timings
        self.terminal_written = False

    @property
    def event(self) -> AuditEvent:
        if self._event is None:
            self._event = AuditEvent(**self._fields)
        return self._event

    def set(self, **changes: Any) -> None:
        self._fields.update(changes)
        self._event = None

    def add_detail(self, entries: Mapping[str, Any]) -> None:
        """Merge `entries` into the event's `detail` (without building the event to read it)."""
        self.set(detail={**self._fields["detail"], **entries})

    def emit(self, **changes: Any) -> AuditEvent:
        """The event as it stands with `changes`, without keeping them."""
        return AuditEvent(**{**self._fields, **changes})


_EVENT_FIELDS = dataclasses.fields(AuditEvent)


def _media_type(typ: object) -> str:
    """`typ` compared case-insensitively, "application/" optional (RFC 7515 §4.1.9)."""
    if not isinstance(typ, str):
        return ""
    return typ.lower().removeprefix("application/")


def _now_utc() -> datetime:
    return datetime.now(UTC)


_PROOF_REPLAYED = "dpop_replayed"


def _spending_first(
    spend: Callable[[Tx], bool],
    rotation: Callable[[Tx], tuple[Session | None, str]],
    session: Session,
) -> Callable[[Tx], tuple[Session | None, str]]:
    """A rotation step that first spends the DPoP proof's jti; a spent one refuses it."""

    def step(tx: Tx) -> tuple[Session | None, str]:
        if not spend(tx):
            return session, _PROOF_REPLAYED
        return rotation(tx)

    return step


class Exchanger:
    def __init__(
        self,
        config: Config,
        policy: Policy,
        issuers: IssuerRegistry,
        audit: AuditStore,
        *,
        minter: GrantMinter,
        replay: ReplayLedger,
        sessions: SessionStore,
        ender: SessionEnder,
        limits: RateLimits | None = None,
        deny_cache: DenyCache | None = None,
        tally: DenialTally | None = None,
        clock: Callable[[], datetime] = _now_utc,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        dpop: DpopGuard | None = None,
        active: ActivePolicy | None = None,
    ) -> None:
        # Policy reload: `active` may swap the grants (broker/policy_reload.py); [broker]
        # settings never change without a restart, so `self._config.broker` stays valid.
        self._config = config
        self._active = active or ActivePolicy(LoadedPolicy(config, policy, ""))
        self._active.subscribe(self._policy_swapped)
        self._issuers = issuers
        self._audit = audit
        self._minter = minter
        self._replay = replay
        self._sessions = sessions
        self._ender = ender
        # How long a refresh handle may go unused; [broker] settings never change without a restart.
        self._max_idle = timedelta(seconds=config.broker.session_idle)
        self._max_chains = config.broker.session_max_chains
        self._limits = limits or RateLimits.from_settings(config.broker)
        self._deny_cache = deny_cache or DenyCache.from_settings(config.broker)
        self._tally = tally or DenialTally(config.broker.denial_tally_seconds)
        self._clock = clock
        self._monotonic = monotonic
        self._sleep = sleep
        self._last_append_failed = False
        # Replicas share the nonce key through the store (see build_app); alone, any key works.
        self._dpop = dpop or DpopGuard(replay, NonceSource.random(), leeway=config.broker.leeway)

    @property
    def _policy(self) -> Policy:
        return self._active.current.policy

    def _policy_swapped(self, loaded: LoadedPolicy) -> None:
        # A cached denial was decided under the old policy: a fixed policy applies at once.
        self._deny_cache.clear()

    # -- entry points ------------------------------------------------------------------------

    def knows_grant(self, name: str) -> bool:
        return self._policy.grant(name) is not None

    def dpop_nonce(self) -> str:
        """The server nonce (RFC 9449 §8) every token, revoke and explain answer carries."""
        return self._dpop.nonces.issue(self._clock())

    def check_audit(self) -> None:
        """Readiness: not ready while the last append failed, even if a probe would pass."""
        if self._last_append_failed:
            raise StoreUnavailable("the last audit append failed")
        self._audit.check_writable()

    def reject(self, req: ClientRequest, status: int, reason: str) -> Issued:
        """Audit and refuse a request the HTTP edge found malformed (bad framing, too large)."""
        record = self._new_record(req, "exchange")
        self._unauthenticated(record, Outcome.DENIED, reason)
        raise ExchangeError(status, "invalid_request", reason)

    def handle(self, req: TokenRequest) -> Issued:
        """Serve one POST /v1/token; raises ExchangeError for every non-200 answer."""
        kind = "refresh" if req.grant_type == GRANT_TYPE_REFRESH else "exchange"
        record = self._new_record(req, kind, task=req.task, grant=req.audience)
        with self._terminal_on_error(record):
            self._admit(req)
            if req.grant_type == GRANT_TYPE_TOKEN_EXCHANGE:
                return self._exchange(req, record)
            if req.grant_type == GRANT_TYPE_REFRESH:
                return self._refresh(req, record)
            raise ExchangeError(400, "unsupported_grant_type", "unsupported_grant_type")
        raise AssertionError("unreachable")  # pragma: no cover - the context manager re-raises

    def revoke(self, req: RevokeRequest) -> None:
        """POST /v1/revoke (RFC 7009): end the session a refresh handle belongs to.

        Unknown or already-ended handles succeed silently, as RFC 7009 §2.2 asks; the audit
        still records the attempt.
        """
        record = self._new_record(req, "revoke")
        with self._terminal_on_error(record):
            self._admit(req)
            if not req.refresh_token:
                raise _bad_request("missing_token")
            now = self._clock()
            with _reading_state():
                try:
                    named: Session | None = self._sessions.peek(req.refresh_token, now=now)
                except SessionError as exc:
                    named = exc.session
            if named is not None:
                self._prove(req, record, now, bound=named.key_thumbprint, holder=named)
            with _reading_state():
                ended = self._sessions.revoke(
                    handle=req.refresh_token, reason="client_revoked", now=now
                )
            for session in ended:
                self._ender.end(session, reason="client_revoked", request_id=req.request_id)
            if not ended:
                # Names no live session: proves nothing about anyone, so it is only counted.
                self._unauthenticated(record, Outcome.REVOKED, "unknown_handle")
                return
            first = ended[0]
            record.set(session_id=first.id, issuer=first.issuer, subject=first.subject)
            self._terminal(record, Outcome.REVOKED, "client_revoked")

    def explain(self, req: ExplainRequest) -> dict[str, Any]:
        """POST /v1/explain: who the token (or session) is and which grants it may use.

        The subject token is verified like an exchange but its jti is NOT consumed, so a CI
        job can ask before its one exchange (`luigi-creds whoami`). Only allowed grants are
        listed: an identity learns its own powers, never the rest of the policy.
        """
        record = self._new_record(req, "explain")
        with self._terminal_on_error(record):
            self._admit(req)
            now = self._clock()
            session: Session | None = None
            if req.refresh_token:
                # A superseded handle shown here is reuse like anywhere else: one of its two
                # holders is an attacker, so the session ends, not a silent probe. For a
                # key-bound session only its key holder gets that far.
                session = self._held_session(req, req.refresh_token, record, now)
                self._prove(req, record, now, bound=session.key_thumbprint, holder=session)
                identity = _Identity(
                    issuer=session.issuer, subject=session.subject, claims=session.claims
                )
                record.set(session_id=session.id, issuer=session.issuer, subject=session.subject)
            else:
                self._check_subject_token(req.subject_token, req.subject_token_type, record)
                identity = self._verify(req.subject_token, now, record)
            # The identity's own budget only: a shared explain bucket would let one identity
            # (or many the policy refuses) starve everyone else's explain.
            self._spend_identity_budget(identity, self._monotonic())
            grants = []
            for decision in self._policy.allowed_grants(identity.issuer, identity.claims):
                grant = self._policy.grant(decision.grant)
                if decision.allowed and grant is not None:
                    grants.append(
                        {
                            "name": grant.name,
                            "description": grant.description,
                            "issued_token_type": issued_token_type(grant),
                            "ttl": grant.ttl,
                        }
                    )
            record.add_detail({"grants": [g["name"] for g in grants]})
            self._terminal(record, Outcome.EXPLAINED, "explained")
            answer: dict[str, Any] = {
                "issuer": identity.issuer,
                "subject": identity.subject,
                "grants": grants,
                "request_id": req.request_id,
            }
            if session is not None:
                answer["session"] = {
                    "id": session.id,
                    "expires_at": session.expires_at.isoformat(),
                }
                if session.key_thumbprint:
                    # RFC 9449 §6: the key the session is bound to, as a confirmation claim.
                    answer["session"]["cnf"] = {"jkt": session.key_thumbprint}
            return answer
        raise AssertionError("unreachable")  # pragma: no cover - the context manager re-raises

    def revoke_lease(self, req: RevokeRequest) -> None:
        """POST /v1/revoke for one dynamic secret, by the session that minted it.

        A Luigi task's Vault lease ends with the task, not with the job's session: the client
        names the lease and proves it holds the session with its current refresh handle
        (peeked, not rotated). A lease the session did not mint is refused like an unknown
        handle, so one job cannot revoke another's.
        """
        record = self._new_record(req, "revoke")
        with self._terminal_on_error(record):
            self._admit(req)
            if not req.refresh_token or not req.lease_id:
                raise _bad_request("missing_token")
            now = self._clock()
            session = self._held_session(req, req.refresh_token, record, now)
            with _reading_state():
                refs = self._sessions.credentials(session.id)
            self._prove(req, record, now, bound=session.key_thumbprint, holder=session)
            record.set(session_id=session.id, issuer=session.issuer, subject=session.subject)
            match = [
                (kind, ref)
                for kind, ref in refs
                if kind == REF_VAULT_LEASE and ref.partition(" ")[2] == req.lease_id
            ]
            if not match:
                raise ExchangeError(400, "invalid_grant", "lease_not_in_session")
            record.set(credential_ref=req.lease_id)
            if not self._minter.revoke(*match[0]):
                raise _unavailable("upstream_unavailable")
            self._terminal(record, Outcome.REVOKED, "lease_revoked")

    # -- exchange ----------------------------------------------------------------------------

    def _exchange(self, req: TokenRequest, record: _Record) -> Issued:
        task = self._check_task(req.task)
        self._check_subject_token(req.subject_token, req.subject_token_type, record)
        if not req.audience:
            raise _bad_request("missing_audience")
        now = self._clock()
        with record.timings.phase("verify"):
            identity = self._verify(req.subject_token, now, record)
        with record.timings.phase("policy"):
            grant = self._authorize(identity, req, record)
        requested = self._duration(req.duration)
        # Before the token is consumed: a refused proof leaves the CI job's one token unspent.
        proof = self._prove(
            req, record, now, bound=None, required=self._dpop_required(identity, grant)
        )

        settings = self._config.broker
        leeway = timedelta(seconds=settings.leeway)
        token_expires = datetime.fromtimestamp(identity.token_exp or 0, UTC)
        session_end = min(
            now + timedelta(seconds=settings.session_max),
            token_expires + timedelta(seconds=settings.session_past_token_exp),
        )
        session, handle, open_session = self._sessions.opening(
            issuer=identity.issuer,
            subject=identity.subject,
            claims=dict(identity.claims),
            now=now,
            expires_at=session_end,
            key_thumbprint=proof.jkt if proof else None,
        )
        prepared = self._prepare(grant, identity.claims, requested, task, session, record)
        # Consumed only now: a request the policy refuses does not burn the CI job's one token.
        # The consumption, the session and the first intent commit together or not at all, so a
        # failed write leaves the token unspent and nothing to undo.
        consume = self._replay.consumer(
            identity.issuer, identity.token_id, expires_at=token_expires + leeway, now=now
        )
        append_intent = self._audit.appender(
            self._intent(record, prepared, attempt=1, session_id=session.id)
        )

        def open_durably(tx: Tx) -> bool:
            if not consume(tx):
                return False
            open_session(tx)
            append_intent(tx)
            return True

        # Without the ledger we cannot prove the token unused: a failed write fails closed.
        if not self._durably(open_durably, record):
            raise _bad_request("token_replayed")
        # _call_upstream records the target and the grant's detail.
        record.set(session_id=session.id)
        try:
            minted = self._call_upstream(prepared, grant, session, record, intent_written=True)
        except ExchangeError:
            # Nothing was issued: free the token so the job can retry, and close the session.
            self._release(identity)
            with contextlib.suppress(StoreUnavailable):
                self._sessions.revoke(session_id=session.id, reason="exchange_failed", now=now)
            raise
        return self._issue(minted, session, handle, record)

    def _verify(self, raw: str, now: datetime, record: _Record) -> _Identity:
        """Structure, issuer, key, signature, then claims; the cheapest checks first."""
        try:
            token = parse_token(raw)
        except TokenError as exc:
            raise _bad_request(exc.reason) from exc
        iss = token.claims.get("iss")
        if not isinstance(iss, str):
            raise _bad_request("missing_claim" if iss is None else "bad_claim_type")
        # Static `iss` -> config map before any network I/O: an unknown issuer URL in a token
        # must never make the broker fetch anything.
        issuer = self._issuers.by_url(iss)
        if issuer is None:
            raise _bad_request("unknown_issuer")
        record.set(issuer=issuer.name)
        if token.alg not in issuer.algorithms:
            # Before key lookup: a foreign alg (none, HS256 with a public key as secret) must not
            # cost a JWKS refetch.
            raise _bad_request("alg_not_allowed")
        if issuer.token_types and _media_type(token.header.get("typ")) not in {
            _media_type(t) for t in issuer.token_types
        }:
            # Another JWT kind of the same issuer (an access token for an ID token, say) is not
            # accepted in its place.
            raise _bad_request("wrong_token_type")
        try:
            key = self._issuers.resolve_key(issuer, token.kid, token.alg)
        except UnknownKey as exc:
            raise _bad_request("unknown_kid") from exc
        except IssuerUnavailable as exc:
            raise _unavailable(exc.audit_reason, retry_after=exc.retry_after) from exc
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
        subject = str(token.claims["sub"])
        jti = token.claims.get("jti")
        record.set(subject=subject[:256], jti=jti[:256] if isinstance(jti, str) else "")
        return _Identity(
            issuer=issuer.name,
            subject=subject,
            claims=token.claims,
            token_exp=int(token.claims["exp"]),
            # Issuers configured without jti consume the hash of what the signature covers:
            # each token is spent once, whatever encoding of its signature is presented (an
            # ECDSA signature has a second valid encoding anyone can compute).
            token_id=jti
            if isinstance(jti, str) and jti
            else "signed-sha256:" + token.signed_sha256,
        )

    def _release(self, identity: _Identity) -> None:
        with contextlib.suppress(StoreUnavailable):
            self._replay.release(identity.issuer, identity.token_id)

    # -- refresh -----------------------------------------------------------------------------

    def _refresh(self, req: TokenRequest, record: _Record) -> Issued:
        task = self._check_task(req.task)
        if not req.refresh_token:
            raise _bad_request("missing_refresh_token")
        if not req.audience:
            raise _bad_request("missing_audience")
        now = self._clock()
        session = self._held_session(req, req.refresh_token, record, now)
        # Before anything else about the session: a stolen handle without its key learns nothing.
        # The proof's jti is spent with the handle's rotation (one write fewer per refresh).
        proof = self._prove(
            req, record, now, bound=session.key_thumbprint, holder=session, spend=False
        )
        record.set(
            session_id=session.id,
            issuer=session.issuer,
            subject=session.subject[:256],
            jti=str(session.claims.get("jti", ""))[:256],
        )
        # Refused once the session is known, so the refusal is recorded against it.
        siblings = self._sibling_chains(req.sibling_chains)
        identity = _Identity(issuer=session.issuer, subject=session.subject, claims=session.claims)
        refused = _agent_refusal(req.requested_token_type)
        if refused is not None:
            # The job's agent recording a refusal of its own on its session: before the policy,
            # since the grant it names may be one the policy denies, unknown, or "-" (none).
            # The identity's budget is spent, so a looping agent cannot flood the ledger.
            self._spend_identity_budget(identity, self._monotonic())
            raise _bad_request(refused)
        with record.timings.phase("policy"):
            grant = self._authorize(identity, req, record)
        if proof is None and self._dpop_required(identity, grant):
            # A session opened without a key cannot be bound later: the grant needs a new one.
            raise ExchangeError(400, "invalid_dpop_proof", "dpop_required")
        requested = self._duration(req.duration)
        if siblings:
            # Checked before minting, so a refused request costs the upstream nothing (the
            # rotation checks again under the session's lock).
            with record.timings.phase("state"), _reading_state():
                held = self._sessions.chain_count(session.id)
            if held + siblings > self._max_chains:
                raise self._too_many_chains()
            # Recorded in the issued record: which session grew how many chains.
            record.add_detail({"chains_opened": siblings, "session_chains": held + siblings})
        prepared = self._prepare(grant, session.claims, requested, task, session, record)
        minted = self._call_upstream(prepared, grant, session, record, intent_written=False)
        # Rotate only after minting, so an upstream failure leaves the client's handle valid;
        # the rotation (and any sibling chains it opens) commits with the issued record.
        handle, sibling_handles, rotation = self._sessions.branching(
            req.refresh_token,
            now=now,
            max_idle=self._max_idle,
            siblings=siblings,
            max_chains=self._max_chains,
        )
        if proof is not None:
            rotation = _spending_first(self._dpop.spender(proof, now), rotation, session)
        outcome = self._issue_outcome(minted, session, record, rotation)
        try:
            rotated(outcome, handle)
        except SessionError as exc:
            self._discard(minted, record)
            if exc.reason == REASON_TOO_MANY_CHAINS:
                raise self._too_many_chains() from exc
            self._session_refused(exc, record, req.request_id, now)
        issued = self._answer(minted, handle, record, session)
        if sibling_handles:
            issued = dataclasses.replace(issued, sibling_refresh_tokens=sibling_handles)
        return issued

    def _sibling_chains(self, value: str) -> int:
        """The refresh's `sibling_chains`: absent, or a count the session may hold."""
        if not value:
            return 0
        if not value.isdigit() or len(value) > 3:
            raise _bad_request("bad_sibling_chains")
        count = int(value)
        if count >= self._max_chains:
            raise self._too_many_chains()
        return count

    def _too_many_chains(self) -> ExchangeError:
        return ExchangeError(
            400,
            "invalid_request",
            "session_max_chains",
            description=(
                f"The session would hold more than {self._max_chains} refresh chains "
                "([broker] session_max_chains); ask for fewer sibling_chains."
            ),
        )

    def _held_session(
        self, req: ClientRequest, handle: str, record: _Record, now: datetime
    ) -> Session:
        """The live session `handle` belongs to, peeked, not rotated. A refused handle is
        answered invalid_grant (its key holder first proving it, see _prove_refused)."""
        try:
            with record.timings.phase("state"), _reading_state():
                return self._sessions.peek(handle, now=now, max_idle=self._max_idle)
        except SessionError as exc:
            self._prove_refused(req, exc, record, now)
            self._session_refused(exc, record, req.request_id, now)

    def _session_refused(
        self, exc: SessionError, record: _Record, request_id: str, now: datetime
    ) -> NoReturn:
        """Map a refused handle to invalid_grant; a reused one ends its whole session."""
        session = exc.session
        if session is not None:
            record.set(session_id=session.id, issuer=session.issuer, subject=session.subject)
        if exc.reason == _PROOF_REPLAYED:
            # A proof spent by a concurrent request: refused, and the session left as it is.
            raise ExchangeError(400, "invalid_dpop_proof", _PROOF_REPLAYED) from exc
        if exc.reason == "reused" and session is not None:
            with contextlib.suppress(StoreUnavailable):
                self._sessions.revoke(session_id=session.id, reason="reuse_detected", now=now)
            self._ender.end(session, reason="reuse_detected", request_id=request_id)
        raise ExchangeError(400, "invalid_grant", f"session_{exc.reason}") from exc

    # -- DPoP (RFC 9449): the checks live in broker/dpop.py ----------------------------------

    def _prove(
        self,
        req: ClientRequest,
        record: _Record,
        now: datetime,
        *,
        bound: str | None,
        required: bool = False,
        spend: bool = True,
        holder: Session | None = None,
    ) -> Proof | None:
        """The proof `req` carried (None: no proof, none needed); refusals audited.

        `spend=False`: the caller spends the jti in its own write (DpopGuard.spender).
        `holder`: the live session whose handle came with the proof. A refused proof is then
        recorded one by one against that session (someone holds its handle without its key:
        the owner's security team wants that record), not folded into the tally of requests
        that proved nothing."""
        try:
            with record.timings.phase("verify"), _reading_state():
                proof = self._dpop.check(
                    req.dpop,
                    method=req.method,
                    url=req.url,
                    now=now,
                    bound_jkt=bound,
                    required=required,
                    spend=spend,
                )
        except ProofError as exc:
            if exc.jkt:
                record.add_detail({"dpop_jkt": exc.jkt})
            if holder is not None:
                record.set(session_id=holder.id, issuer=holder.issuer, subject=holder.subject)
            raise ExchangeError(400, exc.error, exc.reason) from exc
        if proof is not None:
            record.add_detail({"dpop_jkt": proof.jkt})
        return proof

    def _prove_refused(
        self, req: ClientRequest, exc: SessionError, record: _Record, now: datetime
    ) -> None:
        """A refused handle of a bound session is answered as refused only to its key holder:
        without the key, the caller learns nothing and an old handle cannot end the session
        (reuse detection would otherwise let a thief revoke the owner's session)."""
        if exc.session is not None and exc.session.key_thumbprint is not None:
            self._prove(req, record, now, bound=exc.session.key_thumbprint, holder=exc.session)

    def _dpop_required(self, identity: _Identity, grant: GrantConfig) -> bool:
        issuer = self._config.issuer(identity.issuer)
        return grant.require_dpop or (issuer is not None and issuer.require_dpop)

    # -- shared steps ------------------------------------------------------------------------

    def _authorize(self, identity: _Identity, req: TokenRequest, record: _Record) -> GrantConfig:
        """Rate limits, the deny cache, then the policy, for the grant named by `audience`."""
        active = self._active.current  # one policy for the whole decision, named in the record
        record.set(policy_sha256=active.sha256)
        grant = active.policy.grant(req.audience)
        if grant is None:
            raise ExchangeError(400, "invalid_target", "unknown_grant")
        now_mono = self._monotonic()
        # The identity's own budget first; the grant's is spent only once the policy allowed
        # (below), so identities it refuses cannot starve the grant's real users.
        self._spend_identity_budget(identity, now_mono)
        cached = self._deny_cache.check(
            issuer=identity.issuer, subject=identity.subject, grant=grant.name, now=now_mono
        )
        if cached is not None:
            # The upstream refused this identity and grant moments ago (e.g. STS AccessDenied
            # from a trust policy): answer as it did, without asking it again.
            raise _unavailable(
                f"cached_{cached}", retry_after=self._config.broker.deny_cache_seconds or 1
            )
        decision = active.policy.evaluate(grant.name, identity.issuer, identity.claims)
        record.set(claims=dict(decision.claims_read))
        if not decision.allowed:
            # NOTE: policy denials are not cached: evaluating is cheap and the next token may
            # carry other claims. The cache guards the upstream (see _mint).
            raise ExchangeError(400, "invalid_target", decision.reason)
        if req.requested_token_type and req.requested_token_type != issued_token_type(grant):
            raise _bad_request("unsupported_requested_token_type")
        _within_limit(
            self._limits.grant(
                issuer=identity.issuer, subject=identity.subject, grant=grant.name, now=now_mono
            )
        )
        return grant

    def _spend_identity_budget(self, identity: _Identity, now_mono: float) -> None:
        _within_limit(
            self._limits.identity(issuer=identity.issuer, subject=identity.subject, now=now_mono)
        )

    def _check_subject_token(self, token: str, token_type: str, record: _Record) -> None:
        """A subject token is present (its hash recorded) and of a type we verify."""
        if not token:
            raise _bad_request("missing_subject_token")
        record.set(token_sha256=token_sha256(token))
        if token_type not in SUBJECT_TOKEN_TYPES:
            raise _bad_request("unsupported_subject_token_type")

    def _check_task(self, task: str) -> str:
        if task and not _TASK_RE.fullmatch(task):
            raise _bad_request("bad_task")
        return task

    def _duration(self, raw: str) -> int | None:
        if not raw:
            return None
        if not _DURATION_RE.fullmatch(raw) or int(raw) == 0:
            raise _bad_request("bad_duration")
        return int(raw)

    def _prepare(
        self,
        grant: GrantConfig,
        claims: Mapping[str, Any],
        requested: int | None,
        task: str,
        session: Session,
        record: _Record,
    ) -> Prepared:
        """Plan the upstream call for `grant` within what is left of `session`."""
        request_id = record.event.request_id
        remaining = int((session.expires_at - self._clock()).total_seconds())
        try:
            return self._minter.prepare(
                grant,
                claims,
                requested=requested,
                request_id=request_id,
                metadata={
                    "issuer": session.issuer,
                    "subject": session.subject,
                    "session": session.id,
                    "task": task,
                    "request_id": request_id,
                },
                max_ttl=max(remaining, 0),
            )
        except UpstreamError as exc:
            raise _unavailable(exc.reason) from exc

    def _intent(
        self, record: _Record, prepared: Prepared, attempt: int, **changes: Any
    ) -> AuditEvent:
        return record.emit(
            **changes,
            target=prepared.target,
            detail=dict(prepared.detail),
            attempt=attempt,
            outcome=Outcome.INTENT,
            reason="minting",
            time=self._clock(),
        )

    def _call_upstream(
        self,
        prepared: Prepared,
        grant: GrantConfig,
        session: Session,
        record: _Record,
        *,
        intent_written: bool,
    ) -> Minted:
        """The upstream call with bounded retries, each attempt after its own durable intent.

        `intent_written`: the first attempt's intent already committed with the session.
        """
        record.set(target=prepared.target)
        record.add_detail(prepared.detail)
        for attempt in range(1, _MAX_UPSTREAM_ATTEMPTS + 1):
            record.set(attempt=attempt)
            if attempt > 1 or not intent_written:
                with record.timings.phase("audit"):
                    self._append(self._intent(record, prepared, attempt))
            try:
                with record.timings.phase("mint"):
                    minted = prepared.run()
                break
            except UpstreamError as exc:
                if exc.reason == "upstream_denied":
                    # An upstream that refuses this grant will keep refusing: stop hammering it.
                    self._deny_cache.remember(
                        issuer=session.issuer,
                        subject=session.subject,
                        grant=grant.name,
                        reason=exc.reason,
                        now=self._monotonic(),
                    )
                if not exc.retryable or attempt == _MAX_UPSTREAM_ATTEMPTS:
                    raise _unavailable(exc.reason) from exc
                # Full jitter on a small base keeps the request well inside client timeouts.
                self._sleep(random.uniform(0, 0.2 * 2**attempt))  # noqa: S311 - jitter, not crypto
        record.set(credential_ref=minted.audit_ref, expires_at=minted.expires_at)
        return minted

    def _issue(self, minted: Minted, session: Session, handle: str, record: _Record) -> Issued:
        """The issued record (with the credential's session record), then the answer."""
        self._issue_outcome(minted, session, record, None)
        return self._answer(minted, handle, record, session)

    def _issue_outcome(
        self,
        minted: Minted,
        session: Session,
        record: _Record,
        rotation: Callable[[Tx], tuple[Session | None, str]] | None,
    ) -> tuple[Session | None, str]:
        """Commit the handle rotation (if any), the credential's record and `issued` together.

        A refused rotation (reused, revoked, expired handle) commits alone, issuing nothing; its
        outcome is returned for the caller to refuse. If the write fails, the credential is
        withheld (a Vault one revoked) and the request answered 503.
        """
        kind, ref = minted.session_ref
        remember = self._sessions.credential_recorder(
            session.id, kind=kind, ref=ref, expires_at=minted.expires_at
        )
        append_issued = self._audit.appender(
            record.emit(outcome=Outcome.ISSUED, reason="issued", time=self._clock())
        )

        def deliver(tx: Tx) -> tuple[Session | None, str]:
            outcome: tuple[Session | None, str] = (session, "")
            if rotation is not None:
                outcome = rotation(tx)
                if outcome[1]:
                    return outcome
            remember(tx)
            append_issued(tx)
            return outcome

        try:
            outcome = self._durably(deliver, record)
        except ExchangeError:
            record.terminal_written = True
            self._discard(minted, record)
            raise
        if not outcome[1]:
            record.terminal_written = True
        return outcome

    def _answer(self, minted: Minted, handle: str, record: _Record, session: Session) -> Issued:
        expires_in = int((minted.expires_at - self._clock()).total_seconds())
        return Issued(
            token_type=TOKEN_TYPE_DPOP if session.key_thumbprint else TOKEN_TYPE_NOT_APPLICABLE,
            request_id=record.event.request_id,
            issued_token_type=minted.token_type,
            access_token=minted.access_token,
            expires_in=max(0, expires_in),
            credentials=minted.credentials,
            refresh_token=handle,
        )

    def _discard(self, minted: Minted, record: _Record) -> None:
        """A minted credential that will not be returned: revoke it where the upstream can.

        Vault tokens and leases are revoked; an AWS session cannot be, so it is withheld and
        the intent (naming its session, joinable in CloudTrail) plus this error record remain.
        """
        revoked = self._minter.revoke(*minted.session_ref)
        log.error(
            "credential minted but not delivered",
            extra={"request_id": record.event.request_id, "revoked": revoked},
        )
        record.terminal_written = True
        with contextlib.suppress(StoreUnavailable):
            self._write(
                record.emit(
                    outcome=Outcome.ERROR,
                    reason="minted_not_delivered",
                    time=self._clock(),
                    detail={**record.event.detail, "revoked": revoked},
                )
            )

    # -- audit -------------------------------------------------------------------------------

    def _new_record(
        self, req: ClientRequest, kind: str, *, task: str = "", grant: str = ""
    ) -> _Record:
        """The record of `req`; `task` and `grant` are what a token request names."""
        return _Record(
            AuditEvent(
                time=self._clock(),
                request_id=req.request_id,
                outcome=Outcome.DENIED,
                kind=kind,
                client_addr=req.client_addr,
                task=task[:512],
                grant=grant[:128],
            ),
            req.timings,
        )

    @contextlib.contextmanager
    def _terminal_on_error(self, record: _Record) -> Iterator[None]:
        """Every path that raises ends in one terminal record; unforeseen errors become 503."""
        try:
            yield
        except ExchangeError as exc:
            exc.authenticated = bool(record.event.subject)
            # After the audit store just failed, a second write would only wait out its
            # deadline again: the request is refused at once and logged instead.
            if not record.terminal_written and exc.reason not in _STORE_FAILED:
                outcome = Outcome.ERROR if exc.status >= 500 else Outcome.DENIED
                if exc.authenticated:
                    self._terminal(record, outcome, exc.reason)
                else:
                    self._unauthenticated(record, outcome, exc.reason)
            raise
        except Exception as exc:
            log.exception("unexpected failure", extra={"request_id": record.event.request_id})
            if not record.terminal_written:
                self._terminal(record, Outcome.ERROR, "internal_error")
            raise _unavailable("internal_error") from exc

    def _write(self, event: AuditEvent) -> None:
        try:
            self._audit.append(event)
        except StoreUnavailable:
            self._last_append_failed = True
            log.error(
                "audit append failed; request refused",
                extra={"request_id": event.request_id, "outcome": str(event.outcome)},
            )
            raise
        self._last_append_failed = False

    def _durably(self, step: Callable[[Tx], T], record: _Record) -> T:
        """Run `step` (state changes with their audit records) as one durable write."""
        try:
            with record.timings.phase("state"):
                result = self._sessions.database.write(step)
        except StoreUnavailable as exc:
            self._last_append_failed = True
            log.error(
                "store write failed; request refused",
                extra={"request_id": record.event.request_id},
            )
            raise _unavailable("store_unavailable") from exc
        self._last_append_failed = False
        return result

    def _append(self, event: AuditEvent) -> None:
        try:
            self._write(event)
        except StoreUnavailable as exc:
            raise _unavailable("audit_unavailable") from exc

    def _admit(self, req: ClientRequest) -> None:
        """Before any verification: a client address that keeps failing to authenticate waits."""
        _within_limit(
            self._limits.client_wait(req.client_addr, self._monotonic()), "client_rate_limited"
        )

    def _unauthenticated(self, record: _Record, outcome: Outcome, reason: str) -> None:
        """A refusal of a request that proved no identity: counted, and spends its client's
        failure budget, instead of a durable record each (see broker/denials.py)."""
        record.terminal_written = True
        event = record.event
        self._limits.client_failed(event.client_addr, self._monotonic())
        self._tally.add(
            kind=event.kind,
            outcome=str(outcome),
            reason=reason,
            issuer=event.issuer,
            client=event.client_addr,
            now=self._clock(),
        )
        if self._tally.due(self._clock()):
            self.flush_denials()

    def flush_denials(self) -> int:
        """Write the tally of unauthenticated refusals as one `tallied` record; return its count.

        Called when a window is due, periodically and at shutdown; the write joins the store's
        group commit. If the store fails, the counts are kept for the next flush.
        """
        window = self._tally.take()
        if window is None:
            return 0
        try:
            self._write(window.event(self._clock()))
        except StoreUnavailable:
            self._tally.put_back(window)
            return 0
        return window.total()

    def _terminal(self, record: _Record, outcome: Outcome, reason: str) -> None:
        """Write the one terminal record. If it cannot be written, the answer becomes 503."""
        record.terminal_written = True
        with record.timings.phase("audit"):
            self._append(record.emit(outcome=outcome, reason=reason, time=self._clock()))
