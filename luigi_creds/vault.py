"""The hvac bridge: Vault tokens kept alive for the life of a task, then revoked.

Owns renewing broker-minted Vault tokens with Vault's LifetimeWatcher timing (renew at about 2/3 of
the remaining lease, minus up to 10 % jitter, back off on errors) and re-minting through the job's
agent when the token stops extending (its max TTL is reached) or renewal keeps failing. Talks to
Vault (OpenBao) through hvac, and to the broker only through the `remint` callable it is given.

Dynamic-secret leases (`vault_secret`) are renewed directly with Vault using the `renew_token`
the broker sends with the secret (a token whose only power is `sys/leases/renew`), on the same
timing. That token cannot revoke the lease: at the task's end `release` asks the job's agent,
which holds the refresh session, to have the broker revoke that one lease (`/v1/revoke` with
`token_type_hint` vault-secret), so a task's database login ends with the task, not the job.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from typing import Any, ClassVar

import hvac
import hvac.exceptions

from luigi_creds.credentials import Credential, VaultSecret, VaultToken

__all__ = ["LeaseKeeper", "TokenKeeper", "release", "renew_delay"]

log = logging.getLogger(__name__)

# Vault's api.LifetimeWatcher: sleep 2/3 of the lease, minus up to 10 % of that as jitter.
RENEW_FRACTION = 2 / 3
JITTER_FRACTION = 0.1
# Error back-off, doubling from 1 s, capped at 1/3 of the lease so a retry still fits before expiry.
ERROR_BACKOFF_START = 1.0


def renew_delay(lease_seconds: float, rng: Callable[[], float] = random.random) -> float:
    """Seconds to wait before renewing a lease that has `lease_seconds` left."""
    base = max(lease_seconds, 0.0) * RENEW_FRACTION
    return base - rng() * JITTER_FRACTION * base


def error_delay(attempt: int, lease_seconds: float) -> float:
    """Back-off after the `attempt`-th consecutive failed renewal."""
    return min(ERROR_BACKOFF_START * 2.0 ** (attempt - 1), max(lease_seconds / 3, 0.5))


class TokenKeeper:
    """An hvac Client whose token a background thread renews (or re-mints) until `stop()`."""

    _registry: ClassVar[dict[tuple[str, str], TokenKeeper]] = {}
    _registry_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(
        self,
        cred: VaultToken,
        addr: str | None,
        *,
        remint: Callable[[], Credential] | None = None,
        rng: Callable[[], float] = random.random,
        on_new_token: Callable[[str], None] | None = None,
    ) -> None:
        self.client = hvac.Client(url=addr, token=cred.token)
        self._remint = remint
        self._on_new_token = on_new_token
        self._rng = rng
        self._renewable = cred.renewable
        self._lease = float(cred.lease_duration)
        self._initial_lease = self._lease
        self._final = False  # the last renewal was capped by the token's max TTL
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"TokenKeeper(url={self.client.url!r})"

    @classmethod
    def for_task(
        cls,
        task_id: str,
        grant: str,
        cred: VaultToken,
        addr: str | None,
        *,
        remint: Callable[[], Credential] | None = None,
        on_new_token: Callable[[str], None] | None = None,
    ) -> TokenKeeper:
        """The keeper for (task, grant) in this process, started on first use; `remint` gets a
        new token for the same grant and task when the old one stops extending."""
        with cls._registry_lock:
            keeper = cls._registry.get((task_id, grant))
            if keeper is None:
                keeper = cls(cred, addr, remint=remint, on_new_token=on_new_token)
                keeper.start()
                cls._registry[(task_id, grant)] = keeper
            return keeper

    @classmethod
    def pop(cls, task_id: str, grant: str) -> TokenKeeper | None:
        with cls._registry_lock:
            return cls._registry.pop((task_id, grant), None)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="luigi-creds-vault", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        failures = 0
        wait = renew_delay(self._lease, self._rng)
        while not self._stop.wait(wait):
            try:
                granted = self._renew_or_remint()
                failures = 0
                wait = renew_delay(granted, self._rng)
            except Exception as exc:
                failures += 1
                wait = error_delay(failures, self._lease)
                log.warning(
                    "vault token renewal failed (%s); retrying in %.1fs", type(exc).__name__, wait
                )

    def _renew_or_remint(self) -> float:
        if self._renewable and not (self._final and self._remint is not None):
            answer = self.client.auth.token.renew_self()
            granted = float(answer["auth"]["lease_duration"])
            # Like Vault's LifetimeWatcher: a renewal that grants less than the token's TTL has
            # hit its max TTL and will not extend again, so the next cycle re-mints instead.
            self._final = granted < self._initial_lease
            self._lease = granted
            return granted
        if self._remint is None:
            raise RuntimeError("token is not renewable and cannot be re-minted")
        fresh = self._remint()
        if not isinstance(fresh, VaultToken):
            raise TypeError("re-mint did not return a Vault token")
        self.client.token = fresh.token
        if self._on_new_token is not None:
            self._on_new_token(fresh.token)
        self._renewable = fresh.renewable
        self._lease = self._initial_lease = float(fresh.lease_duration)
        self._final = False
        return self._lease


class LeaseKeeper:
    """Renews one dynamic secret's lease until `stop()` or until Vault stops extending it.

    `renew(increment)` returns the granted lease duration; `for_task` binds it to hvac's
    `sys.renew_lease` with the broker-issued renew token. A lease at its max TTL cannot be kept
    alive: Vault's watcher would re-read the secret, but a running task holds the old password,
    so the keeper stops and logs; the task's credential ends with the grant's TTL.
    """

    _registry: ClassVar[dict[tuple[str, str], LeaseKeeper]] = {}
    _registry_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(
        self,
        renew: Callable[[int], float],
        lease_duration: float,
        *,
        rng: Callable[[], float] = random.random,
        name: str = "lease",
    ) -> None:
        self._renew = renew
        self._lease = float(lease_duration)
        self._initial = self._lease
        self._rng = rng
        self._name = name
        self._stop = threading.Event()
        self.renewals = 0
        self.done = threading.Event()

    def __repr__(self) -> str:
        return f"LeaseKeeper({self._name!r})"

    @classmethod
    def for_task(cls, task_id: str, grant: str, cred: VaultSecret, addr: str) -> LeaseKeeper:
        with cls._registry_lock:
            keeper = cls._registry.get((task_id, grant))
            if keeper is None:
                client = hvac.Client(url=addr, token=cred.renew_token)

                def renew(increment: int) -> float:
                    answer = client.sys.renew_lease(lease_id=cred.lease_id, increment=increment)
                    return float(answer["lease_duration"])

                keeper = cls(renew, cred.lease_duration, name=cred.lease_id)
                keeper.start()
                cls._registry[(task_id, grant)] = keeper
            return keeper

    @classmethod
    def pop(cls, task_id: str, grant: str) -> LeaseKeeper | None:
        with cls._registry_lock:
            return cls._registry.pop((task_id, grant), None)

    def start(self) -> None:
        threading.Thread(target=self._run, name="luigi-creds-lease", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        failures = 0
        wait = renew_delay(self._lease, self._rng)
        try:
            while not self._stop.wait(wait):
                try:
                    granted = self._renew(int(self._initial))
                except Exception as exc:
                    failures += 1
                    wait = error_delay(failures, self._lease)
                    log.warning(
                        "renewing lease %s failed (%s); retrying in %.1fs",
                        self._name,
                        type(exc).__name__,
                        wait,
                    )
                    continue
                failures = 0
                self.renewals += 1
                self._lease = granted
                if granted < self._initial:
                    log.info("lease %s reached its max TTL; it ends in %.0fs", self._name, granted)
                    return
                wait = renew_delay(granted, self._rng)
        finally:
            self.done.set()


def release(
    task_id: str,
    grant: str,
    cred: Any,
    addr: str | None,
    *,
    revoke_lease: Callable[[str], None] | None = None,
) -> None:
    """End a task's Vault credential: stop renewing, then revoke the token (and its leases) or,
    for a dynamic secret, have the broker revoke the lease through `revoke_lease`."""
    stop_keepers(task_id, grant)
    revoke(cred, addr, revoke_lease=revoke_lease)


def stop_keepers(task_id: str, grant: str) -> None:
    """Stop renewing (task, grant)'s token and lease in this process."""
    lease_keeper = LeaseKeeper.pop(task_id, grant)
    if lease_keeper is not None:
        lease_keeper.stop()
    keeper = TokenKeeper.pop(task_id, grant)
    if keeper is not None:
        keeper.stop()


def revoke(
    cred: Any, addr: str | None, *, revoke_lease: Callable[[str], None] | None = None
) -> None:
    """Revoke a Vault token at `addr` (it revokes itself, with its child leases), or a dynamic
    secret's lease through `revoke_lease` (the broker, which holds the power to revoke it).
    A token that is already gone (expired, or revoked with its session) is not an error."""
    if isinstance(cred, VaultToken) and addr:
        try:
            hvac.Client(url=addr, token=cred.token).auth.token.revoke_self()
        except hvac.exceptions.Forbidden:
            log.debug("Vault token %s was already gone at release", cred.accessor)
    elif isinstance(cred, VaultSecret) and cred.lease_id and revoke_lease is not None:
        revoke_lease(cred.lease_id)
