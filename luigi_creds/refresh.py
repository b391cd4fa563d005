"""Two-window refresh of a short-lived credential, generic over its payload.

Owns the timing of refreshes: when a cached credential is still good, when one thread should try
to replace it without making anyone wait (the advisory window), and when every caller must wait
for a fresh one (the mandatory window). Modelled on botocore's `RefreshableCredentials`, with two
changes: the windows scale down for short credentials (botocore's fixed 15/10 minutes would
refresh a 15-minute STS credential on every call), and failed advisory refreshes back off instead
of being retried on every call. Standard library only; talks to nothing itself: the `fetch`
callable it is given does the network work. The clock is injected.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Generic, TypeVar

from luigi_creds.errors import LuigiCredsError
from luigi_creds.values import Frozen

__all__ = ["RefreshError", "Refresher", "Snapshot", "Windows"]

log = logging.getLogger(__name__)

T = TypeVar("T")

Clock = Callable[[], datetime]


class RefreshError(LuigiCredsError):
    """A mandatory refresh failed, or the credential has expired and could not be replaced."""


class Snapshot(Frozen, Generic[T]):
    """One credential as fetched: immutable, so a reader never sees half of two credentials."""

    _fields = ("value", "expires_at", "fetched_at")
    __slots__ = _fields
    _secret = frozenset({"value"})
    value: T
    expires_at: datetime
    fetched_at: datetime

    def __init__(self, value: T, expires_at: datetime, fetched_at: datetime) -> None:
        self._fill(value, expires_at, fetched_at)

    @property
    def lifetime(self) -> timedelta:
        return self.expires_at - self.fetched_at


class Windows(Frozen):
    """How long before expiry each window opens.

    The defaults are botocore's (advisory 15 min, mandatory 10 min), capped at a fraction of the
    credential's lifetime so a 15-minute credential is refreshed after about 7.5 minutes
    (advisory) and at the latest 3.75 minutes before it expires (mandatory).
    """

    _fields = (
        "advisory",
        "mandatory",
        "advisory_fraction",
        "mandatory_fraction",
        "advisory_backoff",
    )
    __slots__ = _fields
    advisory: timedelta
    mandatory: timedelta
    advisory_fraction: float
    mandatory_fraction: float
    # After a failed advisory refresh, callers keep the cached credential for this long before
    # the next attempt, so a broker outage is not hammered by every S3 call.
    advisory_backoff: timedelta

    def __init__(
        self,
        advisory: timedelta = timedelta(minutes=15),
        mandatory: timedelta = timedelta(minutes=10),
        advisory_fraction: float = 0.5,
        mandatory_fraction: float = 0.25,
        advisory_backoff: timedelta = timedelta(seconds=30),
    ) -> None:
        self._fill(advisory, mandatory, advisory_fraction, mandatory_fraction, advisory_backoff)

    def for_lifetime(self, lifetime: timedelta) -> tuple[timedelta, timedelta]:
        """Return (advisory, mandatory) lead times for a credential that lives `lifetime`."""
        lifetime = max(lifetime, timedelta(0))
        advisory = min(self.advisory, lifetime * self.advisory_fraction)
        mandatory = min(self.mandatory, lifetime * self.mandatory_fraction, advisory)
        return advisory, mandatory


class Refresher(Generic[T]):
    """Keeps one credential fresh for many threads.

    `get()` returns the cached snapshot while it is outside both windows. In the advisory window
    one thread calls `fetch` while the others keep using the cached snapshot; a failure there is
    logged and tolerated. In the mandatory window (or after expiry) callers block until one of them
    has fetched; a failure raises `RefreshError` to each of them.
    """

    def __init__(
        self,
        fetch: Callable[[], tuple[T, datetime]],
        *,
        clock: Clock,
        windows: Windows | None = None,
        name: str = "credential",
    ) -> None:
        self._fetch = fetch
        self._clock = clock
        self._windows = windows or Windows()
        self._name = name
        self._lock = threading.Lock()
        self._current: Snapshot[T] | None = None
        self._advisory_retry_at: datetime | None = None

    def __repr__(self) -> str:
        current = self._current
        expiry = current.expires_at.isoformat() if current else None
        return f"Refresher(name={self._name!r}, expires_at={expiry!r})"

    @property
    def current(self) -> Snapshot[T] | None:
        """The cached snapshot, without refreshing."""
        return self._current

    def get(self) -> Snapshot[T]:
        """Return a snapshot valid now, refreshing it as the windows say."""
        now = self._now()
        snapshot = self._current
        if snapshot is not None and not self._in_advisory(snapshot, now):
            return snapshot
        if snapshot is not None and not self._in_mandatory(snapshot, now):
            return self._advisory_refresh(snapshot, now)
        with self._lock:
            # Another thread may have refreshed while this one waited for the lock.
            snapshot = self._current
            now = self._now()
            if snapshot is not None and not self._in_mandatory(snapshot, now):
                return snapshot
            return self._refresh_locked(now)

    def seed(self, value: T, expires_at: datetime) -> None:
        """Start from a credential fetched elsewhere, unless one is cached already."""
        _require_aware(expires_at)
        with self._lock:
            if self._current is None:
                self._current = Snapshot(value=value, expires_at=expires_at, fetched_at=self._now())

    def invalidate(self) -> None:
        """Forget the cached snapshot: the next `get()` fetches, blocking."""
        with self._lock:
            self._current = None
            self._advisory_retry_at = None

    def _advisory_refresh(self, snapshot: Snapshot[T], now: datetime) -> Snapshot[T]:
        if self._advisory_retry_at is not None and now < self._advisory_retry_at:
            return snapshot
        if not self._lock.acquire(blocking=False):
            return snapshot  # someone else is refreshing; the cached one is still good
        try:
            current = self._current
            if current is not snapshot:
                return current if current is not None else snapshot
            try:
                return self._refresh_locked(now)
            except RefreshError as exc:
                self._advisory_retry_at = now + self._windows.advisory_backoff
                # One line, no traceback: during an outage this repeats every back-off, and the
                # error (a BrokerError's text: broker, grant, reason) says what went wrong.
                log.warning(
                    "advisory refresh of %s failed (%s); using the cached one until %s",
                    self._name,
                    exc.__cause__ if exc.__cause__ is not None else exc,
                    snapshot.expires_at.isoformat(),
                )
                return snapshot
        finally:
            self._lock.release()

    def _refresh_locked(self, now: datetime) -> Snapshot[T]:
        try:
            value, expires_at = self._fetch()
        except Exception as exc:
            raise RefreshError(f"refreshing {self._name} failed: {exc}") from exc
        _require_aware(expires_at)
        fetched_at = self._now()
        if expires_at <= fetched_at:
            raise RefreshError(f"refreshing {self._name} returned an already expired credential")
        snapshot = Snapshot(value=value, expires_at=expires_at, fetched_at=fetched_at)
        self._current = snapshot
        self._advisory_retry_at = None
        return snapshot

    def _in_advisory(self, snapshot: Snapshot[T], now: datetime) -> bool:
        advisory, _ = self._windows.for_lifetime(snapshot.lifetime)
        return snapshot.expires_at - now <= advisory

    def _in_mandatory(self, snapshot: Snapshot[T], now: datetime) -> bool:
        _, mandatory = self._windows.for_lifetime(snapshot.lifetime)
        return snapshot.expires_at - now <= mandatory

    def _now(self) -> datetime:
        now = self._clock()
        _require_aware(now)
        return now


def _require_aware(moment: datetime) -> None:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError("refresh times must be timezone-aware (UTC)")
