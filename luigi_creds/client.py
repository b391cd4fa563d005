"""The broker client: one token exchange per job, then a refresh session that mints per task.

Owns the client side of the broker's wire protocol: `POST /v1/token` for the
RFC 8693 exchange and the `refresh_token` grant, `POST /v1/revoke`, retries, and the typed,
frozen credential objects parsed from 200 bodies. Talks only to the broker, over the form poster
it is given.

Session rule: the broker rotates the refresh handle on every use and treats reuse of an old handle
as theft (the whole session is revoked). So a handle is spent by one request at a time: a request
takes it from the session's pool and gives back its successor (or, when nothing was spent, the
handle itself) before anyone else can take it. The first refresh asks the broker for sibling
refresh chains (`chains` in all, 4 by default; docs/protocol.md): each chain's handle rotates
on its own, so up to `chains` mints run at once instead of queueing on one handle; a broker that
refuses siblings leaves the session on one chain. The newest handle is spent first, so mints made
one at a time keep one chain fresh (the broker expires a handle left unused for its
`session_idle`, each chain's alone); a handle refused with `invalid_grant` is dropped and another
chain's tried, and the session is over only when none is left. Retries happen only where the
handle cannot have been spent: 429/503 answers (the broker rejects before rotating) and
connection failures before the request was sent.

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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any, Protocol

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


class Answer(Protocol):
    """What the client reads of an answer (an httpx.Response, a broker_http.BrokerAnswer)."""

    status_code: int

    @property
    def headers(self) -> Mapping[str, str]: ...

    def json(self) -> Any: ...


class FormPoster(Protocol):
    """How the client's requests travel: an `httpx.Client`, or `broker_http.BrokerHttp` (the
    job's agent, with no proxy in the way). Failures are httpx's exception types either way."""

    def post(self, url: str, *, data: Mapping[str, str], headers: Mapping[str, str]) -> Answer: ...


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
    """The refresh session: the newest handle of each of its chains that no request is
    spending (`idle`), and how many requests are spending one (`busy`)."""

    idle: list[str] = field(repr=False)
    # A handle of the session, of any generation: names the session to revoke it when every
    # current handle is out being spent.
    anchor: str = field(repr=False)
    # The DPoP key the broker bound the session to (token_type "DPoP"), else None.
    key_thumbprint: str | None = None
    busy: int = 0
    # Sibling chains were asked for (once per session, whatever the answer).
    grown: bool = False


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
        http: FormPoster,
        clock: Callable[[], datetime],
        sleep: Callable[[float], None] = time.sleep,
        rng: Callable[[], float] = random.random,
        retry: RetryPolicy | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        dpop_key: DpopKey | None = None,
        chains: int = 4,
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
        # Signalled whenever a handle comes back or the session changes.
        self._ready = threading.Condition(self._lock)
        self._session: _Session | None = None
        self._opening = False  # one caller exchanges the token; the others wait for it
        # How many refresh chains to hold (the broker caps it: [broker] session_max_chains).
        self._chains = max(1, chains)
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

        The first call exchanges the subject token; later calls spend the refresh session. A
        handle the broker refuses (`invalid_grant`) is dropped and another chain's tried: a
        sibling left unused past the broker's session_idle expires alone while the session
        lives on. When no chain is left, the session is over: a renewable token source
        re-exchanges once.
        """
        self._owned(f"mint grant {grant!r}")
        handle, session = self._take()
        refused: BrokerError | None = None
        while session is not None:
            try:
                return self._refresh(session, handle, grant, task, duration)
            except BrokerError as exc:
                if exc.error != "invalid_grant":
                    raise
                refused = exc
            handle, session = self._take()  # ("", None): no chain left, this caller opens
        if refused is not None and not self._source.renewable:
            with self._ready:
                self._opening = False  # nobody opens with this source: its token is spent
                self._ready.notify_all()
            raise BrokerError(
                f"broker {self.broker_url} ended the refresh session (invalid_grant) "
                f"while minting grant {grant!r}, and token source "
                f"{self._source.description} cannot give a new token; rerun the job",
                error="invalid_grant",
                status=refused.status,
                request_id=refused.request_id,
                grant=grant,
            ) from refused
        if refused is not None:
            log.info("refresh session rejected; exchanging a new token for %s", grant)
        return self._open(grant, task, duration)

    def explain(self) -> dict[str, Any]:
        """Who the broker says this job is and which grants it may use (POST /v1/explain).

        With a session, the session is asked about (the handle is not rotated); otherwise the
        token source's token is verified without being spent, so `whoami` is safe to run
        before the job's one exchange.
        """
        self._owned("explain")
        handle, session = self._borrow()
        if session is None:
            form = {
                "subject_token": self._source.token(),
                "subject_token_type": self._source.subject_token_type,
            }
            return self._post("/v1/explain", form, grant=None, expect_body=True, what="explain")
        try:
            form = {"refresh_token": handle}
            return self._post("/v1/explain", form, grant=None, expect_body=True, what="explain")
        finally:
            self._give_back(session, [handle])

    def revoke(self, *, retry: bool = True) -> None:
        """End the refresh session (the broker revokes its Vault tokens and leases).

        `retry=False` makes one attempt only: at a job's exit a broker that is down must not
        hold the process for the whole retry deadline.
        """
        self._owned("end the session")
        with self._ready:
            session, self._session = self._session, None
            self._ready.notify_all()
        if session is None:
            return
        # Any handle names the session (the broker ends every chain); a current one if idle.
        handle = session.idle[0] if session.idle else session.anchor
        form = {"token": handle, "token_type_hint": "refresh_token"}
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
        handle, session = self._borrow()
        if session is None:
            return
        kept = [handle]
        try:
            form = {
                "grant_type": "refresh_token",
                "refresh_token": handle,
                "audience": grant,
                "requested_token_type": f"{AGENT_REFUSED}:{refused}",
            }
            if task:
                form["task"] = task
            try:
                body = self._post("/v1/token", form, grant=grant, expect_body=True, retry=False)
            except BrokerError:
                return  # the expected answer: refused, and recorded
            successor = body.get("refresh_token")
            if isinstance(successor, str) and successor:
                # Should the broker ever have minted, its new handle is the one to keep.
                kept = [successor]
        finally:
            self._give_back(session, kept)

    def revoke_lease(self, lease_id: str) -> None:
        """Revoke one Vault lease this session minted, keeping the session (and its handle).

        The broker checks the lease against the session named by the current handle, which it
        peeks without rotating; a lease from another session is refused with `invalid_grant`.
        """
        self._owned("revoke a Vault lease")
        handle, session = self._borrow()
        if session is None:
            raise BrokerError(
                f"cannot revoke a Vault lease at {self.broker_url}: no refresh session",
                error="invalid_grant",
            )
        try:
            form = {"token": lease_id, "token_type_hint": VAULT_SECRET, "refresh_token": handle}
            self._post("/v1/revoke", form, grant=None, expect_body=False, what="lease revoke")
        finally:
            self._give_back(session, [handle])

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

    # --- the session's handles ---------------------------------------------------------

    def _take(self) -> tuple[str, _Session | None]:
        """A handle no one else is spending, and its session; ("", None) when the caller is
        to open the session (exchange the token): there is none yet, or the broker refused
        every chain's handle. Waits while every handle is out, or while another caller opens
        the session."""
        with self._ready:
            while True:
                session = self._session
                if session is None:
                    if not self._opening:
                        self._opening = True
                        return "", None
                elif session.idle:
                    session.busy += 1
                    # Newest first: one chain carries the mints one at a time, so the session
                    # stays alive exactly as on one chain (each handle expires after the
                    # broker's session_idle unused); siblings serve the mints made at once.
                    return session.idle.pop(), session
                elif session.busy == 0:
                    self._session = None  # every chain was refused: nothing left to spend
                    continue
                self._ready.wait()

    def _borrow(self) -> tuple[str, _Session | None]:
        """A handle to present without spending it (given back unchanged), or ("", None)
        without a session: never opens one."""
        with self._ready:
            while True:
                session = self._session
                if session is None:
                    return "", None
                if session.idle:
                    session.busy += 1
                    return session.idle.pop(), session
                if session.busy == 0:
                    return "", None
                self._ready.wait()

    def _give_back(self, session: _Session, handles: list[str]) -> None:
        """Return a taken handle's successor (and any new sibling chains' first handles), or
        the handle itself when it was not spent. A session ended meanwhile keeps nothing."""
        with self._ready:
            session.busy -= 1
            if self._session is session:
                session.idle.extend(handles)
            self._ready.notify_all()

    def _grow(self, session: _Session) -> int:
        """How many sibling chains the next refresh asks for: the first refresh of a session
        asks for enough to hold `chains`, no later one asks."""
        with self._ready:
            if session.grown or self._chains <= 1:
                return 0
            session.grown = True
            return max(0, self._chains - len(session.idle) - session.busy)

    def _open(self, grant: str, task: str | None, duration: int | None) -> Credential:
        """Exchange the token source's token: the mint that opens the session (`_take` made
        this caller the one to do it; the others wait until it is done)."""
        try:
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
            return self._spend(form, grant, task, duration, self._opened)
        finally:
            with self._ready:
                self._opening = False
                self._ready.notify_all()

    def _opened(self, body: dict[str, Any]) -> None:
        handle = body.get("refresh_token")
        if isinstance(handle, str) and handle:
            with self._ready:
                self._session = self._new_session(handle, body)
                self._ready.notify_all()

    def _refresh(
        self,
        session: _Session,
        handle: str,
        grant: str,
        task: str | None,
        duration: int | None,
    ) -> Credential:
        """Spend `handle` (taken from `session`) on a mint; its successor goes back to the
        pool, with the first handles of any sibling chains this refresh opened."""
        form = {"grant_type": "refresh_token", "refresh_token": handle, "audience": grant}
        siblings = self._grow(session)
        if siblings:
            form["sibling_chains"] = str(siblings)
        returned = False
        dead = False  # refused as invalid_grant: the handle is not given back

        def keep(body: dict[str, Any]) -> None:
            nonlocal returned
            successor = body.get("refresh_token")
            handles = [successor] if isinstance(successor, str) and successor else [handle]
            more = body.get("sibling_refresh_tokens")
            if isinstance(more, list):
                handles += [h for h in more if isinstance(h, str) and h]
            returned = True
            self._give_back(session, handles)

        try:
            try:
                return self._spend(form, grant, task, duration, keep)
            except BrokerError as exc:
                dead = exc.error == "invalid_grant"
                if not siblings or returned or exc.error != "invalid_request":
                    raise
                # Refused before anything was spent: asked once more without siblings. If that
                # is minted, the siblings were the cause (a broker without sibling chains, or
                # a lower [broker] session_max_chains) and the session stays on one chain.
                del form["sibling_chains"]
                try:
                    cred = self._spend(form, grant, task, duration, keep)
                except BrokerError as again:
                    dead = again.error == "invalid_grant"
                    if again.error == "invalid_request":
                        with self._ready:
                            session.grown = False  # the request itself was refused: ask later
                    raise
                log.warning(
                    "luigi-creds: broker %s refused %d sibling refresh chains (%s); "
                    "mints go on one at a time",
                    self.broker_url,
                    siblings,
                    exc,
                )
                return cred
        finally:
            if not returned:
                # Refused before anything was spent: the handle goes back, unless the broker
                # refused the handle itself.
                self._give_back(session, [] if dead else [handle])

    def _spend(
        self,
        form: dict[str, str],
        grant: str,
        task: str | None,
        duration: int | None,
        keep: Callable[[dict[str, Any]], None],
    ) -> Credential:
        if task is not None:
            form["task"] = task
        if duration is not None:
            form["duration"] = str(int(duration))
        body = self._post("/v1/token", form, grant=grant, expect_body=True)
        # Keep the newest handle before anything else can fail: the old one is spent now.
        keep(body)
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
        return _Session(
            idle=[handle], anchor=handle, key_thumbprint=self._dpop.thumbprint if bound else None
        )

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

    def _json_body(self, response: Answer, what: str, grant: str | None) -> dict[str, Any]:
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

    def _error(self, response: Answer, what: str, grant: str | None) -> BrokerError:
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
