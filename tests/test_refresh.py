"""Unit tests for luigi_creds.refresh: the two refresh windows, under a fake clock."""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime, timedelta

import pytest

from luigi_creds.refresh import Refresher, RefreshError, Windows

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


class FakeClock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **kw: float) -> None:
        self.now += timedelta(**kw)


class Fetcher:
    """Mints numbered credentials that live `ttl` from the fake clock's now."""

    def __init__(self, clock: FakeClock, ttl: timedelta = timedelta(minutes=15)) -> None:
        self.clock = clock
        self.ttl = ttl
        self.calls = 0
        self.fail = False

    def __call__(self) -> tuple[int, datetime]:
        self.calls += 1
        if self.fail:
            raise ConnectionError("broker down")
        return self.calls, self.clock() + self.ttl


def test_cached_credential_is_reused_outside_the_windows() -> None:
    """A fresh credential is returned from cache without fetching again."""
    clock = FakeClock()
    fetch = Fetcher(clock)
    r = Refresher(fetch, clock=clock)
    assert r.get().value == 1
    clock.advance(minutes=7)
    assert r.get().value == 1
    assert fetch.calls == 1


def test_windows_scale_with_short_lifetimes() -> None:
    """A 15-minute credential opens its advisory window at 7.5 and its mandatory at 3.75 minutes."""
    advisory, mandatory = Windows().for_lifetime(timedelta(minutes=15))
    assert advisory == timedelta(minutes=7.5)
    assert mandatory == timedelta(minutes=3.75)
    assert Windows().for_lifetime(timedelta(hours=1)) == (
        timedelta(minutes=15),
        timedelta(minutes=10),
    )


def test_advisory_window_refreshes() -> None:
    """Inside the advisory window the next caller fetches a new credential."""
    clock = FakeClock()
    fetch = Fetcher(clock)
    r = Refresher(fetch, clock=clock)
    r.get()
    clock.advance(minutes=8)
    assert r.get().value == 2


def test_advisory_failure_keeps_the_cached_credential_and_backs_off(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A failed advisory refresh keeps the still-valid cached credential, backs off, and logs
    one line with the reason and no traceback."""
    clock = FakeClock()
    fetch = Fetcher(clock)
    r = Refresher(fetch, clock=clock)
    r.get()
    clock.advance(minutes=8)
    fetch.fail = True
    with caplog.at_level(logging.WARNING):
        assert r.get().value == 1
        assert r.get().value == 1
    assert fetch.calls == 2  # the second call is inside the 30 s back-off
    (record,) = caplog.records
    assert record.exc_info is None and "advisory refresh" in record.getMessage()
    clock.advance(seconds=31)
    fetch.fail = False
    assert r.get().value == 3


def test_mandatory_failure_raises() -> None:
    """A failed refresh inside the mandatory window raises RefreshError naming the credential."""
    clock = FakeClock()
    fetch = Fetcher(clock)
    r = Refresher(fetch, clock=clock, name="aws etl-writer")
    r.get()
    clock.advance(minutes=12)
    fetch.fail = True
    with pytest.raises(RefreshError, match="aws etl-writer"):
        r.get()


def test_expired_fetch_is_refused() -> None:
    """A fetch that returns an already expired credential raises instead of caching it."""
    clock = FakeClock()
    r = Refresher(lambda: ("x", clock() - timedelta(seconds=1)), clock=clock)
    with pytest.raises(RefreshError, match="already expired"):
        r.get()


def test_naive_clock_is_rejected() -> None:
    """A clock that returns naive datetimes is refused."""
    r = Refresher(lambda: ("x", T0), clock=lambda: datetime(2026, 1, 1))
    with pytest.raises(ValueError, match="timezone-aware"):
        r.get()


def test_six_hour_task_with_fifteen_minute_credentials() -> None:
    """A six-hour run never sees a credential near expiry and refreshes about every 7.5 min."""
    clock = FakeClock()
    fetch = Fetcher(clock)
    r = Refresher(fetch, clock=clock)
    end = T0 + timedelta(hours=6)
    while clock() < end:
        snap = r.get()
        assert snap.expires_at - clock() > timedelta(minutes=3)
        clock.advance(seconds=10)
    assert 45 <= fetch.calls <= 50


def test_only_one_thread_fetches_in_the_mandatory_window() -> None:
    """Concurrent callers in the mandatory window block on one fetch and all get its result."""
    clock = FakeClock()
    gate = threading.Event()
    started = threading.Event()
    calls = []

    def fetch() -> tuple[int, datetime]:
        calls.append(1)
        started.set()
        gate.wait(5)
        return len(calls), clock() + timedelta(minutes=15)

    r = Refresher(fetch, clock=clock)
    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(r.get().value)) for _ in range(8)]
    for t in threads:
        t.start()
    started.wait(5)
    gate.set()
    for t in threads:
        t.join(5)
    assert results == [1] * 8
    assert len(calls) == 1


def test_advisory_refresh_does_not_block_other_threads() -> None:
    """While one thread refreshes in the advisory window, others get the cached one at once."""
    clock = FakeClock()
    gate = threading.Event()
    started = threading.Event()
    n = [0]

    def fetch() -> tuple[int, datetime]:
        n[0] += 1
        if n[0] > 1:
            started.set()
            gate.wait(5)
        return n[0], clock() + timedelta(minutes=15)

    r = Refresher(fetch, clock=clock)
    r.get()
    clock.advance(minutes=8)
    refresher = threading.Thread(target=r.get)
    refresher.start()
    started.wait(5)
    assert r.get().value == 1
    gate.set()
    refresher.join(5)
    assert r.get().value == 2


def test_repr_shows_no_value() -> None:
    """Neither the refresher's nor a snapshot's repr contains the credential value."""
    clock = FakeClock()
    r = Refresher(lambda: ("s3cr3t-value", clock() + timedelta(hours=1)), clock=clock)
    snap = r.get()
    assert "s3cr3t" not in repr(r)
    assert "s3cr3t" not in repr(snap)
