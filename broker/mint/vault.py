"""Vault minting: child/orphan tokens and dynamic secrets through hvac, renewed and revoked.

Owns the broker's own Vault identity (`VaultIdentity`: AppRole or a token file, renewed and
re-authenticated), the translation of a Vault grant into a token-create request (`plan_token`),
the calls that mint, renew and revoke (`VaultMinter`), and the one table that maps hvac/requests
errors onto `UpstreamError`. Talks to Vault or OpenBao over HTTP through hvac; reads the AppRole
`role_id_file`/`secret_id_file` or `token_file` at every login, so a rotated file is picked up.

Decisions:
- Client tokens are created through a token role (`auth/token/create/<role>`), never as plain
  children of the broker's token: a non-root caller may otherwise only hand out a subset of its
  own policies, and the broker must not hold every grant's powers. The role's `allowed_policies`
  is the operator's ceiling. `grant.vault.orphan` picks `orphan_token_role` (a role with
  `orphan=true`). A non-orphan token is a child of the broker's login token and dies when that
  login expires (at the AppRole's `token_max_ttl`), so give that role a max TTL well above the
  grants' TTLs or make the grant orphan.
- Dynamic secrets are read with a per-credential *holder* token: an orphan (via
  `auth/token/create-orphan`, inheriting the broker's policies) whose TTL and explicit max TTL are
  the grant's TTL. Vault revokes a lease when the token that created it dies, so a lease read with
  the broker's own token would die whenever the broker re-authenticates; the holder ties the lease
  to the grant's lifetime instead, and revoking the holder by accessor revokes the lease.
- Lease renewal while a task runs goes *directly* from the client to Vault, not through the
  broker: the response carries a `renew_token`, a non-renewable child of the holder with only the
  `luigi-creds-lease-renew` policy (`sys/leases/renew`, deploy/vault/lease-renew.hcl) and not
  `default` (lookup-self, cubbyhole, wrapping, and whatever an operator adds), living no
  longer than the holder. Vault lets any token with that capability renew a lease whose id it
  knows (checked on OpenBao 2.7), and the client already holds the lease id and the secret, so
  this token adds no power beyond keeping this lease alive, and never past the grant's TTL: when
  the holder expires, the lease and the renew token go with it. This keeps renewal off the refresh
  session (no handle rotation races between parallel workers) and needs no broker endpoint.
  Revocation (session end, `POST /v1/revoke`, an unaudited mint) is `revoke_accessor(holder)`.
- The broker's own token is renewed (`renew-self`) once two thirds of its lease has passed, like
  Vault's LifetimeWatcher; when a renewal comes back shorter than asked for, the token is at its
  max TTL and the identity logs in again at once (the old token stays valid for what is left, so
  calls in flight are unaffected). A 403 logs in again once and retries.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from types import MappingProxyType
from typing import Any, TypeVar
from urllib.parse import urlsplit

import hvac
import hvac.exceptions
import requests

from broker.config import VAULT_MIN_TOKEN_TTL, GrantConfig, UpstreamVault
from broker.mint import UpstreamError, vault_http
from broker.mint.vault_http import VaultHTTP

log = logging.getLogger(__name__)

T = TypeVar("T")
Clock = Callable[[], datetime]

# Metadata keys the broker writes on every token it creates (so Vault's audit log joins ours).
METADATA_KEYS = ("issuer", "subject", "grant", "session", "task", "request_id")
# Metadata values come from claims and client input; keep an allowlisted alphabet
# and a bounded length so nothing can look like a template or blow up Vault's audit lines.
_META_UNSAFE = re.compile(r"[^\w .:/=+@,-]", re.ASCII)
_META_VALUE_MAX = 256
# Renew the broker's token once this fraction of its lease has passed (Vault's LifetimeWatcher
# renews at about 2/3 of the lease).
_RENEW_FRACTION = 2 / 3
# The renew token is only ever used against sys/leases/renew: it carries one policy granting just
# that, without `default` (see the module docstring).
_RENEW_TOKEN_POLICIES = ("luigi-creds-lease-renew",)


@dataclass(frozen=True)
class VaultToken:
    """A Vault token minted for a client; `token` is the secret, `accessor` the audit reference."""

    token: str = field(repr=False)
    accessor: str
    policies: tuple[str, ...]
    renewable: bool
    lease_duration: int

    def wire(self) -> dict[str, Any]:
        """The `credentials` object of a `urn:luigi-creds:token-type:vault-token` answer."""
        return {
            "token": self.token,
            "accessor": self.accessor,
            "policies": list(self.policies),
            "renewable": self.renewable,
            "lease_duration": self.lease_duration,
        }


@dataclass(frozen=True)
class VaultSecret:
    """A dynamic secret and its lease.

    `holder_accessor` names the token that owns the lease (revoking it revokes the lease and the
    renew token); `renew_token` lets the client renew this lease directly (see module docstring).
    """

    lease_id: str
    lease_duration: int
    renewable: bool
    data: Mapping[str, Any] = field(repr=False)
    holder_accessor: str = ""
    renew_token: str = field(default="", repr=False)

    def wire(self) -> dict[str, Any]:
        """The `credentials` object of a `urn:luigi-creds:token-type:vault-secret` answer."""
        return {
            "lease_id": self.lease_id,
            "lease_duration": self.lease_duration,
            "renewable": self.renewable,
            "data": dict(self.data),
            "renew_token": self.renew_token,
        }


@dataclass(frozen=True)
class TokenPlan:
    """Exactly what will be sent to Vault's token-create endpoint; also what `explain` shows."""

    policies: tuple[str, ...]
    ttl: int
    num_uses: int | None
    orphan: bool
    metadata: Mapping[str, str]
    explicit_max_ttl: int | None = None


def token_create_body(plan: TokenPlan) -> dict[str, Any]:
    """The JSON body of the token-create call for `plan`. Pure; the benchmark's ceiling sends
    exactly this, so it measures the very call an exchange makes."""
    body: dict[str, Any] = {
        "policies": list(plan.policies),
        "ttl": f"{plan.ttl}s",
        "meta": dict(plan.metadata),
        # `default` stays attached: it lets the holder renew-self, look itself up and
        # revoke itself, and reads no secrets.
        "renewable": True,
        "display_name": "luigi-creds-" + plan.metadata.get("grant", "grant"),
    }
    if plan.num_uses:
        body["num_uses"] = plan.num_uses
    if plan.explicit_max_ttl:
        body["explicit_max_ttl"] = f"{plan.explicit_max_ttl}s"
    return body


def sanitise_metadata(metadata: Mapping[str, str]) -> Mapping[str, str]:
    """Keep the known keys, with values in a safe alphabet and bounded: no template syntax or
    oversized value from a token reaches Vault's metadata or audit log."""
    clean: dict[str, str] = {}
    for key in METADATA_KEYS:
        value = metadata.get(key)
        if isinstance(value, str) and value:
            clean[key] = _META_UNSAFE.sub("-", value)[:_META_VALUE_MAX]
    return MappingProxyType(clean)


def clamp_ttl(ttl: int, requested: int | None) -> int:
    """The grant's ttl caps the request; `VAULT_MIN_TOKEN_TTL` lifts anything shorter."""
    wanted = ttl if requested is None else min(requested, ttl)
    return max(VAULT_MIN_TOKEN_TTL, wanted)


def plan_token(
    grant: GrantConfig,
    *,
    ttl: int,
    metadata: Mapping[str, str],
    explicit_max_ttl: int | None = None,
) -> TokenPlan:
    """Build the token-create request for a `grant.vault.token_policies` grant. Pure.

    `ttl` is the already clamped lifetime (grant TTL capped by the request); `explicit_max_ttl`,
    when given (e.g. what is left of the refresh session), bounds renewals.
    """
    if grant.vault is None or not grant.vault.token_policies:
        raise ValueError(f"grant {grant.name!r} has no vault token_policies")
    return TokenPlan(
        policies=tuple(grant.vault.token_policies),
        ttl=ttl,
        num_uses=grant.vault.num_uses,
        orphan=grant.vault.orphan,
        metadata=sanitise_metadata({**metadata, "grant": grant.name}),
        explicit_max_ttl=explicit_max_ttl,
    )


# ---------------------------------------------------------------------------------------------
# Errors: the one table
# ---------------------------------------------------------------------------------------------

# Classified by exception type (hvac maps HTTP status to type), never by message text.
_ERROR_TABLE: tuple[tuple[type[BaseException], str, bool], ...] = (
    (hvac.exceptions.Forbidden, "upstream_denied", False),  # 403 (after one re-login)
    (hvac.exceptions.Unauthorized, "upstream_denied", False),  # 401
    (hvac.exceptions.InvalidRequest, "upstream_rejected", False),  # 400
    (hvac.exceptions.InvalidPath, "upstream_rejected", False),  # 404
    (hvac.exceptions.UnsupportedOperation, "upstream_rejected", False),  # 405
    (hvac.exceptions.PreconditionFailed, "upstream_unavailable", True),  # 412: replica behind
    (hvac.exceptions.RateLimitExceeded, "upstream_unavailable", True),  # 429: quota, standby
    (hvac.exceptions.InternalServerError, "upstream_unavailable", True),  # 500
    (hvac.exceptions.VaultNotInitialized, "upstream_unavailable", True),  # 501
    (hvac.exceptions.BadGateway, "upstream_unavailable", True),  # 502
    (hvac.exceptions.VaultDown, "upstream_unavailable", True),  # 503: sealed or down
    (hvac.exceptions.UnexpectedError, "upstream_unavailable", True),  # other 5xx and odd codes
    (requests.RequestException, "upstream_unavailable", True),  # refused, reset, timeout, DNS
    (hvac.exceptions.VaultError, "upstream_rejected", False),  # anything else hvac refuses
    # A 2xx whose body lacks what Vault documents is a broken upstream, not a client error.
    (KeyError, "upstream_unavailable", True),
    (TypeError, "upstream_unavailable", True),
)


def map_error(exc: BaseException) -> UpstreamError:
    """Map an hvac/requests error to `UpstreamError` through `_ERROR_TABLE`; Vault's own error
    text goes into `detail` for the operator's log."""
    detail = _error_detail(exc)
    for kind, reason, retryable in _ERROR_TABLE:
        if isinstance(exc, kind):
            return UpstreamError(reason, retryable=retryable, upstream="vault", detail=detail)
    return UpstreamError("upstream_unavailable", retryable=True, upstream="vault", detail=detail)


def _error_detail(exc: BaseException) -> str:
    """`<class>: <Vault's errors> on <METHOD> <path>`; the path never holds a token."""
    if isinstance(exc, hvac.exceptions.VaultError):
        errors = "; ".join(" ".join(str(e).split()) for e in (exc.errors or ())) or "no error text"
        path = urlsplit(str(exc.url or "")).path
        method = str(exc.method or "").upper()
        return f"{type(exc).__name__}: {errors} on {method} {path}".strip()
    return f"{type(exc).__name__}: {exc}"


_MAPPED: tuple[type[BaseException], ...] = tuple(kind for kind, _, _ in _ERROR_TABLE)


# ---------------------------------------------------------------------------------------------
# The broker's own identity
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Login:
    token: str = field(repr=False)
    accessor: str
    renewable: bool
    lease_duration: int  # seconds; 0 = never expires (root-like token from a token file)
    obtained: datetime


class VaultIdentity:
    """The broker's login at Vault: AppRole or a token file; renewed and re-authenticated.

    `token()` returns a usable token, renewing or logging in first when due. Thread-safe: one lock
    guards the login state, so concurrent requests trigger one renewal or login, not many.
    """

    def __init__(
        self,
        upstream: UpstreamVault,
        *,
        clock: Clock,
        session: requests.Session,
        http_timeout: float = 5.0,
    ) -> None:
        if upstream.auth not in {"approle", "token"}:
            raise ValueError('upstream.vault.auth must be "approle" or "token"')
        self._upstream = upstream
        self._clock = clock
        self._session = session
        self._timeout = http_timeout
        self._lock = threading.Lock()
        self._login: _Login | None = None

    def __repr__(self) -> str:
        accessor = self._login.accessor if self._login else None
        return f"VaultIdentity(url={self._upstream.url!r}, accessor={accessor!r})"

    def client(self, token: str) -> hvac.Client:
        """An hvac client on the shared HTTP session; one per call, so no token is shared.

        `token` is never None: hvac would then read VAULT_TOKEN or ~/.vault-token, and only the
        composition root reads the environment. "" sends no token header at all.
        """
        verify: bool | str = str(self._upstream.ca_cert) if self._upstream.ca_cert else True
        return hvac.Client(
            url=self._upstream.url,
            token=token,
            namespace=self._upstream.namespace,
            session=self._session,
            timeout=self._timeout,
            verify=verify,
        )

    @property
    def accessor(self) -> str | None:
        """The accessor of the current login (for logs and tests; never the token)."""
        with self._lock:
            return self._login.accessor if self._login else None

    def token(self) -> str:
        """A token to call Vault with: renewed at 2/3 of its lease, re-logged at max TTL."""
        with self._lock:
            login = self._login
            now = self._clock()
            if login is None or _expired(login, now):
                login = self._do_login()
            elif _renew_due(login, now):
                try:
                    login = self._renew_or_login(login)
                except UpstreamError as exc:
                    if not exc.retryable:
                        raise
                    # Vault is briefly unreachable and the token has a third of its life left:
                    # keep using it; the next call tries the renewal again.
            self._login = login
            return login.token

    def relogin(self, stale_token: str | None = None) -> str:
        """Log in again (after a 403); a concurrent caller's fresh login is reused, not repeated."""
        with self._lock:
            current = self._login
            if current is not None and stale_token is not None and current.token != stale_token:
                return current.token
            self._login = self._do_login()
            return self._login.token

    def _renew_or_login(self, login: _Login) -> _Login:
        if not login.renewable:
            return self._do_login()
        try:
            auth = self.client(login.token).auth.token.renew_self(increment=login.lease_duration)[
                "auth"
            ]
        except (hvac.exceptions.Forbidden, hvac.exceptions.InvalidRequest):
            # Revoked, expired or no longer renewable: a fresh login is the only way on.
            return self._do_login()
        except _MAPPED as exc:
            raise map_error(exc) from exc
        granted = int(auth["lease_duration"])
        log.debug("vault token renewed", extra={"vault_accessor": login.accessor, "ttl": granted})
        if granted < login.lease_duration:
            # Vault capped the renewal at the token's max TTL: log in again now, while the old
            # token still covers calls in flight.
            return self._do_login()
        return _Login(login.token, login.accessor, bool(auth["renewable"]), granted, self._clock())

    def _do_login(self) -> _Login:
        login = self._login_once()
        log.info(
            "vault login",
            extra={
                "vault_auth": self._upstream.auth,
                "vault_accessor": login.accessor,
                "ttl": login.lease_duration,
            },
        )
        return login

    def _login_once(self) -> _Login:
        upstream = self._upstream
        try:
            if upstream.auth == "approle":
                assert upstream.role_id_file is not None and upstream.secret_id_file is not None
                role_id = upstream.role_id_file.read_text(encoding="utf-8").strip()
                secret_id = upstream.secret_id_file.read_text(encoding="utf-8").strip()
                auth = self.client("").auth.approle.login(
                    role_id=role_id,
                    secret_id=secret_id,
                    use_token=False,
                    mount_point=upstream.approle_mount,
                )["auth"]
                return _Login(
                    token=auth["client_token"],
                    accessor=auth["accessor"],
                    renewable=bool(auth["renewable"]),
                    lease_duration=int(auth["lease_duration"]),
                    obtained=self._clock(),
                )
            assert upstream.token_file is not None
            token = upstream.token_file.read_text(encoding="utf-8").strip()
            data = self.client(token).auth.token.lookup_self()["data"]
            return _Login(
                token=token,
                accessor=str(data.get("accessor", "")),
                renewable=bool(data.get("renewable", False)),
                lease_duration=int(data.get("ttl") or 0),
                obtained=self._clock(),
            )
        except OSError as exc:
            # The credential files are the operator's: unreadable means misconfigured.
            raise UpstreamError("upstream_misconfigured", retryable=False) from exc
        except _MAPPED as exc:
            raise map_error(exc) from exc


def _expired(login: _Login, now: datetime) -> bool:
    if login.lease_duration <= 0:
        return False
    return now >= login.obtained + timedelta(seconds=login.lease_duration)


def _renew_due(login: _Login, now: datetime) -> bool:
    if login.lease_duration <= 0:
        return False
    return now >= login.obtained + timedelta(seconds=login.lease_duration * _RENEW_FRACTION)


# ---------------------------------------------------------------------------------------------
# Minting
# ---------------------------------------------------------------------------------------------


class VaultMinter:
    """Creates, renews and revokes Vault credentials with the broker's own identity."""

    def __init__(
        self,
        upstream: UpstreamVault,
        *,
        clock: Clock,
        http_timeout: float = 5.0,
        session: requests.Session | None = None,
    ) -> None:
        self._upstream = upstream
        self._session = session or requests.Session()
        self._identity = VaultIdentity(
            upstream, clock=clock, session=self._session, http_timeout=http_timeout
        )
        self._timeout = http_timeout
        # The per-exchange call (token creation) goes through a lighter client; see vault_http.
        self._http = VaultHTTP(
            upstream.url,
            timeout=http_timeout,
            ca_cert=upstream.ca_cert,
            namespace=upstream.namespace,
        )

    @property
    def identity(self) -> VaultIdentity:
        return self._identity

    def _call(self, operation: Callable[[hvac.Client], T]) -> T:
        """Run `operation` with the broker's token; on 403 log in again once and retry."""
        token = self._identity.token()
        try:
            return operation(self._identity.client(token))
        except hvac.exceptions.Forbidden:
            token = self._identity.relogin(stale_token=token)
        except _MAPPED as exc:
            raise map_error(exc) from exc
        try:
            return operation(self._identity.client(token))
        except _MAPPED as exc:
            raise map_error(exc) from exc

    def create_token(self, plan: TokenPlan) -> VaultToken:
        """Create a client token through the (orphan) token role; exactly `plan.policies`."""
        role = self._upstream.orphan_token_role if plan.orphan else self._upstream.token_role
        body = token_create_body(plan)
        path = f"/v1/auth/token/create/{role}"
        token = self._identity.token()
        try:
            answer = self._http.post(path, token, body)
        except vault_http.Forbidden:
            # The broker's token was revoked or expired early: log in again once and retry.
            token = self._identity.relogin(stale_token=token)
            try:
                answer = self._http.post(path, token, body)
            except vault_http.Forbidden:
                raise vault_http.classify(403) from None
        try:
            auth = answer["auth"]
        except (KeyError, TypeError) as exc:
            raise UpstreamError("upstream_unavailable", retryable=True) from exc
        minted = VaultToken(
            token=auth["client_token"],
            accessor=auth["accessor"],
            policies=tuple(auth.get("token_policies") or auth.get("policies") or ()),
            renewable=bool(auth["renewable"]),
            lease_duration=int(auth["lease_duration"]),
        )
        if set(minted.policies) - {"default"} != set(plan.policies):
            # The role's allowed_policies or a default policy changed what we asked for: never
            # hand out a token whose powers differ from the grant's.
            self.revoke_accessor(minted.accessor)
            raise UpstreamError(
                "upstream_rejected",
                retryable=False,
                upstream="vault",
                detail=f"token role {role!r} issued policies {sorted(minted.policies)}, the grant "
                f"asked for {sorted(plan.policies)}: check the role's allowed_policies",
            )
        return minted

    def read_secret(self, path: str, *, ttl: int, metadata: Mapping[str, str]) -> VaultSecret:
        """Read a dynamic secret with a fresh holder token; return it with a renew-only token.

        On any failure after the holder exists, the holder is revoked (with any lease it holds)
        before the error is raised, so nothing half-made outlives the call.
        """
        meta = dict(sanitise_metadata(metadata))
        holder_body = {
            "ttl": f"{ttl}s",
            "explicit_max_ttl": f"{ttl}s",
            "renewable": False,
            "meta": meta,
            "display_name": "luigi-creds-holder",
        }

        def create_holder(client: hvac.Client) -> Any:
            return client.adapter.post("/v1/auth/token/create-orphan", json=holder_body)

        holder = self._call(create_holder)["auth"]
        holder_accessor = str(holder["accessor"])
        try:
            as_holder = self._identity.client(holder["client_token"])
            secret = as_holder.read(path.strip("/"))
            if not isinstance(secret, dict) or not secret.get("lease_id"):
                # Not a leased (dynamic) secret: there would be nothing to renew or revoke.
                raise UpstreamError("upstream_rejected", retryable=False)
            renew = as_holder.auth.token.create(
                policies=list(_RENEW_TOKEN_POLICIES),
                no_default_policy=True,
                ttl=f"{ttl}s",
                explicit_max_ttl=f"{ttl}s",
                renewable=False,
                meta=meta,
                display_name="luigi-creds-lease-renew",
            )["auth"]
            return VaultSecret(
                lease_id=str(secret["lease_id"]),
                lease_duration=int(secret["lease_duration"]),
                renewable=bool(secret["renewable"]),
                data=MappingProxyType(dict(secret["data"])),
                holder_accessor=holder_accessor,
                renew_token=str(renew["client_token"]),
            )
        except BaseException as exc:
            self._revoke_quietly(holder_accessor)
            if isinstance(exc, UpstreamError):
                raise
            if isinstance(exc, _MAPPED):
                raise map_error(exc) from exc
            raise

    def renew_lease(self, lease_id: str, increment: int | None = None) -> int:
        """Renew a lease with the broker's token; return the new lease_duration in seconds."""

        def renew(client: hvac.Client) -> Any:
            return client.sys.renew_lease(lease_id=lease_id, increment=increment)

        return int(self._call(renew)["lease_duration"])

    def revoke_accessor(self, accessor: str) -> None:
        """Revoke a token (and its children and leases) by accessor."""

        def revoke(client: hvac.Client) -> Any:
            return client.auth.token.revoke_accessor(accessor)

        self._call(revoke)

    def revoke_lease(self, lease_id: str) -> None:
        """Revoke one lease now (Vault runs the engine's revocation, e.g. DROP ROLE)."""

        def revoke(client: hvac.Client) -> Any:
            return client.sys.revoke_lease(lease_id=lease_id)

        self._call(revoke)

    def revoke_secret(self, secret: VaultSecret) -> None:
        """Revoke a dynamic secret now: its lease synchronously, then its holder and renew token.

        Revoking only the holder also ends the lease, but Vault does that in the background; this
        waits for the engine's revocation (e.g. DROP ROLE) so the caller can rely on it.
        """
        self.revoke_lease(secret.lease_id)
        if secret.holder_accessor:
            self.revoke_accessor(secret.holder_accessor)

    def check_ready(self) -> None:
        """Readiness: Vault answers, is initialised and unsealed, and our login works."""
        url = self._upstream.url.rstrip("/") + "/v1/sys/health"
        verify: bool | str = str(self._upstream.ca_cert) if self._upstream.ca_cert else True
        try:
            # standbyok: a standby forwards requests to the active node, so it is ready enough.
            response = self._session.get(
                url, params={"standbyok": "true"}, timeout=self._timeout, verify=verify
            )
        except requests.RequestException as exc:
            raise map_error(exc) from exc
        # Vault: 200 active (or standby with standbyok); 501 uninitialised; 503 sealed.
        if response.status_code != 200:
            raise UpstreamError("upstream_unavailable", retryable=True)
        self._identity.token()

    def _revoke_quietly(self, accessor: str) -> None:
        try:
            self.revoke_accessor(accessor)
        except UpstreamError:
            # NOTE: the holder's explicit max TTL (the grant's TTL) still bounds what leaks.
            return
