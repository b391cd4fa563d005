"""The broker client: one token exchange per job, then a refresh session that mints per task.

Owns the client side of the broker's wire protocol: `POST /v1/token` for the
RFC 8693 exchange and the `refresh_token` grant, `POST /v1/revoke`, retries, and the typed,
frozen credential objects parsed from 200 bodies. Talks only to the broker, over the `httpx.Client`
it is given.

Session rule: the broker rotates the refresh handle on every use and treats reuse of an old handle
as theft (the whole session is revoked). So every request that spends the handle holds one lock
from send to parse, and the newest handle replaces the old one before the lock is released.
Retries happen only where the handle cannot have been spent: 429/503 answers (the broker rejects
before rotating) and connection failures before the request was sent.

DPoP (RFC 9449): every request carries a proof signed by the job's ephemeral key
(luigi_creds/dpop.py), so the session the exchange opens is bound to that key. The broker's newest
`DPoP-Nonce` is kept and put into each proof (the exchange needs none); an answer `use_dpop_nonce`
(nothing spent: the broker checks the proof before the token or the handle) is retried once with
the nonce it carries.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from luigi_creds.credentials import (
    AWS_CREDENTIALS,
    VAULT_SECRET,
    VAULT_TOKEN,
    AwsCredentials,
    BrokerError,
    Credential,
    VaultSecret,
    VaultToken,
    describe,
    iso,
    parse_credential,
)
from luigi_creds.dpop import DpopKey
from luigi_creds.identity import IdentityError, TokenSource

__all__ = [
    "AWS_CREDENTIALS",
    "VAULT_SECRET",
    "VAULT_TOKEN",
    "AwsCredentials",
    "BrokerClient",
    "BrokerError",
    "Credential",
    "RetryPolicy",
    "VaultSecret",
    "VaultToken",
    "describe",
    "parse_credential",
]

log = logging.getLogger(__name__)

EXCHANGE_GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
# A requested_token_type no grant issues: how the job's agent has a refusal of its own recorded
# by the broker (see BrokerClient.report_refusal), followed by ":" and what it refused, one of
# AGENT_REFUSALS; the broker audits it as `agent_refused_<what>` (broker/protocol.py).
AGENT_REFUSED = "urn:luigi-creds:token-type:agent-refused"
AGENT_REFUSALS = frozenset({"scope", "delegation", "task_end", "lease"})


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter (AWS architecture blog), bounded twice over."""

    max_attempts: int = 5
    base: float = 0.5  # seconds; attempt n waits uniform(0, min(cap, base * 2**n))
    cap: float = 20.0
    deadline: float = 60.0  # seconds from the first attempt; no wait runs past it
    max_retry_after: float = 30.0  # a Retry-After longer than this is not waited for


@dataclass
class _Session:
    """The refresh session: the newest handle and when it was last rotated."""

    handle: str = field(repr=False)
    # The DPoP key the broker bound the session to (token_type "DPoP"), else None.
    key_thumbprint: str | None = None


class BrokerClient:
    """Exchanges the job's identity once and mints per-task credentials on the refresh session.

    Thread-safe. `sleep` and `rng` are injectable so retry timing is testable; `clock` gives the
    aware UTC now used to turn `expires_in` into an expiry time.
    """

    def __init__(
        self,
        broker_url: str,
        token_source: TokenSource,
        *,
        http: httpx.Client,
        clock: Callable[[], datetime],
        sleep: Callable[[float], None] = time.sleep,
        rng: Callable[[], float] = random.random,
        retry: RetryPolicy | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        dpop_key: DpopKey | None = None,
    ) -> None:
        self.broker_url = broker_url.rstrip("/")
        self._source = token_source
        self._http = http
        self._clock = clock
        self._sleep = sleep
        self._rng = rng
        self._retry = retry or RetryPolicy()
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._session: _Session | None = None
        # One key per client, i.e. per job: made here, in the process that owns the session.
        self._dpop = dpop_key or DpopKey()
        self._pid = os.getpid()  # that process: a forked child may not use the client (_owned)
        self._dpop_nonce: str | None = None

    def __repr__(self) -> str:
        state = "open" if self._session else "none"
        source = self._source.description
        return f"BrokerClient({self.broker_url!r}, source={source!r}, session={state})"

    @property
    def token_source(self) -> TokenSource:
        return self._source

    @property
    def has_session(self) -> bool:
        return self._session is not None

    def mint(self, grant: str, task: str | None = None, duration: int | None = None) -> Credential:
        """Mint a credential for `grant`, recorded by the broker against `task`.

        The first call exchanges the subject token; later calls spend the refresh session. When the
        session is rejected (`invalid_grant`) a renewable token source re-exchanges once.
        """
        self._owned(f"mint grant {grant!r}")
        with self._lock:
            if self._session is None:
                return self._exchange(grant, task, duration)
            try:
                return self._refresh(grant, task, duration)
            except BrokerError as exc:
                if exc.error != "invalid_grant":
                    raise
                self._session = None
                if not self._source.renewable:
                    raise BrokerError(
                        f"broker {self.broker_url} ended the refresh session (invalid_grant) "
                        f"while minting grant {grant!r}, and token source "
                        f"{self._source.description} cannot give a new token; rerun the job",
                        error="invalid_grant",
                        status=exc.status,
                        request_id=exc.request_id,
                        grant=grant,
                    ) from exc
                log.info("refresh session rejected; exchanging a new token for %s", grant)
                return self._exchange(grant, task, duration)

    def explain(self) -> dict[str, Any]:
        """Who the broker says this job is and which grants it may use (POST /v1/explain).

        With a session, the session is asked about (the handle is not rotated); otherwise the
        token source's token is verified without being spent, so `whoami` is safe to run
        before the job's one exchange.
        """
        self._owned("explain")
        with self._lock:
            handle = self._session.handle if self._session is not None else None
        if handle:
            form = {"refresh_token": handle}
        else:
            form = {
                "subject_token": self._source.token(),
                "subject_token_type": self._source.subject_token_type,
            }
        return self._post("/v1/explain", form, grant=None, expect_body=True, what="explain")

    def revoke(self, *, retry: bool = True) -> None:
        """End the refresh session (the broker revokes its Vault tokens and leases).

        `retry=False` makes one attempt only: at a job's exit a broker that is down must not
        hold the process for the whole retry deadline.
        """
        self._owned("end the session")
        with self._lock:
            session, self._session = self._session, None
            if session is None:
                return
            form = {"token": session.handle, "token_type_hint": "refresh_token"}
            self._post("/v1/revoke", form, grant=None, expect_body=False, retry=retry)

    def report_refusal(self, grant: str, task: str | None, refused: str) -> None:
        """Put a refusal by the job's agent into the broker's audit ledger, on this session.

        Sent as a refresh that the broker is bound to deny without minting or rotating the
        handle: `requested_token_type` names a type no grant issues (AGENT_REFUSED and
        `refused`, one of AGENT_REFUSALS), which the broker checks right after the session,
        before the policy. The ledger then holds a DENIED record with the session, the grant
        asked for ("-" for none), the task that asked and the reason `agent_refused_<refused>`.
        One attempt, no retries; nothing to report without a session (nothing was minted yet).
        """
        self._owned("report a refusal")
        with self._lock:
            if self._session is None:
                return
            form = {
                "grant_type": "refresh_token",
                "refresh_token": self._session.handle,
                "audience": grant,
                "requested_token_type": f"{AGENT_REFUSED}:{refused}",
            }
            if task:
                form["task"] = task
            try:
                body = self._post("/v1/token", form, grant=grant, expect_body=True, retry=False)
            except BrokerError:
                return  # the expected answer: refused, and recorded
            handle = body.get("refresh_token")
            if isinstance(handle, str) and handle:
                # Should the broker ever have minted, its new handle is the one to keep.
                self._session = self._new_session(handle, body)

    def revoke_lease(self, lease_id: str) -> None:
        """Revoke one Vault lease this session minted, keeping the session (and its handle).

        The broker checks the lease against the session named by the current handle, which it
        peeks without rotating; a lease from another session is refused with `invalid_grant`.
        """
        self._owned("revoke a Vault lease")
        with self._lock:
            session = self._session
            if session is None:
                raise BrokerError(
                    f"cannot revoke a Vault lease at {self.broker_url}: no refresh session",
                    error="invalid_grant",
                )
            form = {
                "token": lease_id,
                "token_type_hint": VAULT_SECRET,
                "refresh_token": session.handle,
            }
            self._post("/v1/revoke", form, grant=None, expect_body=False, what="lease revoke")

    def _owned(self, what: str) -> None:
        """Refuse in a process forked from the one that made this client, before its lock (a
        parent thread may have held it at the fork) or its pooled connections are touched.

        Decision: refuse rather than carry on. The child would sign with the parent's DPoP key
        as if it were the session's holder, and a refresh from it rotates the handle under the
        parent, whose next refresh then reads as theft and ends the job's session; a revoke
        from it ends the parent's session outright.
        """
        if os.getpid() != self._pid:
            raise BrokerError(
                f"cannot {what}: this client of broker {self.broker_url} belongs to process "
                f"{self._pid}, and process {os.getpid()} was forked from it (the job's session "
                "and DPoP key stay with their process). In a forked process, mint through the "
                "job's agent (luigi_creds.agent.ensure_agent()), or build a BrokerClient here",
                error="forked_process",
            )

    def _exchange(self, grant: str, task: str | None, duration: int | None) -> Credential:
        try:
            subject = self._source.token()
        except IdentityError as exc:
            raise BrokerError(
                f"cannot exchange for grant {grant!r} at {self.broker_url}: {exc}",
                error="identity_unavailable",
                grant=grant,
            ) from exc
        form = {
            "grant_type": EXCHANGE_GRANT,
            "subject_token": subject,
            "subject_token_type": self._source.subject_token_type,
            "audience": grant,
        }
        return self._spend(form, grant, task, duration)

    def _refresh(self, grant: str, task: str | None, duration: int | None) -> Credential:
        assert self._session is not None
        form = {
            "grant_type": "refresh_token",
            "refresh_token": self._session.handle,
            "audience": grant,
        }
        return self._spend(form, grant, task, duration)

    def _spend(
        self, form: dict[str, str], grant: str, task: str | None, duration: int | None
    ) -> Credential:
        if task is not None:
            form["task"] = task
        if duration is not None:
            form["duration"] = str(int(duration))
        body = self._post("/v1/token", form, grant=grant, expect_body=True)
        handle = body.get("refresh_token")
        if isinstance(handle, str) and handle:
            # Keep the newest handle before anything else can fail: the old one is spent now.
            self._session = self._new_session(handle, body)
        try:
            cred = parse_credential(body, grant=grant, now=self._clock())
        except (KeyError, TypeError, ValueError) as exc:
            raise BrokerError(
                f"broker {self.broker_url} answered grant {grant!r} with a malformed credential",
                error="invalid_response",
                status=200,
                request_id=_str_or_none(body.get("request_id")),
                grant=grant,
            ) from exc
        # One line per mint, in the job's log: what was issued and until when, never a secret.
        log.info(
            "luigi-creds: minted grant %r for task %s: %s, expires %s",
            grant,
            task or "-",
            describe(cred),
            iso(cred.expires_at),
        )
        return cred

    def _new_session(self, handle: str, body: dict[str, Any]) -> _Session:
        bound = body.get("token_type") == "DPoP"
        return _Session(handle=handle, key_thumbprint=self._dpop.thumbprint if bound else None)

    def _post(
        self,
        path: str,
        form: dict[str, str],
        *,
        grant: str | None,
        expect_body: bool,
        what: str = "revoke",
        retry: bool = True,
    ) -> dict[str, Any]:
        url = self.broker_url + path
        what = f"grant {grant!r}" if grant else what
        started = self._monotonic()
        attempt = 0
        nonce_retried = False
        while True:
            attempt += 1
            proof = self._dpop.proof("POST", url, now=self._clock(), nonce=self._dpop_nonce)
            headers = {"Accept": "application/json", "DPoP": proof}
            try:
                response = self._http.post(url, data=form, headers=headers)
            except httpx.HTTPError as exc:
                # Only failures before the request left can be retried without spending the handle.
                retryable = isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout)
                error = BrokerError(
                    f"broker {self.broker_url} unreachable for {what}: {type(exc).__name__}",
                    error="unreachable",
                    grant=grant,
                )
                if not (retry and retryable) or not self._wait(attempt, started, None):
                    raise error from None
                continue
            nonce = response.headers.get("dpop-nonce")
            if nonce:
                self._dpop_nonce = nonce
            if response.status_code == 200:
                if not expect_body:
                    return {}
                return self._json_body(response, what, grant)
            error = self._error(response, what, grant)
            if error.error == "use_dpop_nonce" and nonce and not nonce_retried:
                # RFC 9449 §8: once, with the nonce just given; not counted as an attempt.
                nonce_retried = True
                attempt -= 1
                continue
            if (
                not retry
                or response.status_code not in (429, 503)
                or not self._wait(attempt, started, error.retry_after)
            ):
                raise error

    def _wait(self, attempt: int, started: float, retry_after: float | None) -> bool:
        """Sleep before the next attempt; False when the attempts or the deadline are used up."""
        policy = self._retry
        if attempt >= policy.max_attempts:
            return False
        backoff = self._rng() * min(policy.cap, policy.base * 2 ** (attempt - 1))
        if retry_after is not None:
            if retry_after > policy.max_retry_after:
                return False
            backoff = max(backoff, retry_after)
        if self._monotonic() - started + backoff > policy.deadline:
            return False
        self._sleep(backoff)
        return True

    def _json_body(self, response: httpx.Response, what: str, grant: str | None) -> dict[str, Any]:
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise BrokerError(
                f"broker {self.broker_url} answered {what} with a body that is not a JSON object",
                error="invalid_response",
                status=response.status_code,
                grant=grant,
            )
        return body

    def _error(self, response: httpx.Response, what: str, grant: str | None) -> BrokerError:
        try:
            body = response.json()
        except ValueError:
            body = None
        body = body if isinstance(body, dict) else {}
        code = _str_or_none(body.get("error")) or f"http_{response.status_code}"
        description = _str_or_none(body.get("error_description"))
        request_id = _str_or_none(body.get("request_id"))
        reason = code + (f": {description[:200]}" if description else "")
        suffix = f" (request_id {request_id})" if request_id else ""
        return BrokerError(
            f"broker {self.broker_url} refused {what} with HTTP {response.status_code} "
            f"{reason}{suffix}",
            error=code,
            status=response.status_code,
            request_id=request_id,
            grant=grant,
            retry_after=_retry_after(response.headers.get("retry-after"), self._clock()),
        )


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _retry_after(value: str | None, now: datetime) -> float | None:
    """Retry-After as seconds: delta-seconds or an HTTP-date (RFC 9110 §10.2.3)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, (when - now).total_seconds())
