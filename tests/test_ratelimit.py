"""Unit tests for broker.ratelimit: token buckets, the paired identity/grant limits, deny cache.

Pure in-process code: every test drives an injected monotonic clock (plain floats).
"""

from __future__ import annotations

import threading

import pytest
from races import run_at_once

from broker.config import BrokerSettings, RateLimit
from broker.ratelimit import DenyCache, RateLimiter, RateLimits, retry_after


def test_burst_then_denied_with_retry_after() -> None:
    """A key gets `burst` requests at once, then a wait of one token's refill time."""
    limiter = RateLimiter(RateLimit(per_second=2.0, burst=3))
    assert [limiter.check("a", 100.0) for _ in range(3)] == [None, None, None]
    wait = limiter.check("a", 100.0)
    assert wait == pytest.approx(0.5)
    assert retry_after(wait) == 1


def test_retry_after_rounds_up_to_whole_seconds() -> None:
    """Retry-After is the wait rounded up, and never 0."""
    limiter = RateLimiter(RateLimit(per_second=0.4, burst=1))
    assert limiter.check("a", 0.0) is None
    wait = limiter.check("a", 0.0)
    assert wait == pytest.approx(2.5)
    assert retry_after(wait) == 3
    assert retry_after(0.0001) == 1
    assert retry_after(2.0) == 2


def test_another_key_is_unaffected() -> None:
    """Exhausting one key's bucket leaves every other key its full burst."""
    limiter = RateLimiter(RateLimit(per_second=1.0, burst=2))
    limiter.check("noisy", 0.0)
    limiter.check("noisy", 0.0)
    assert limiter.check("noisy", 0.0) is not None
    assert limiter.check("quiet", 0.0) is None
    assert limiter.check("quiet", 0.0) is None


def test_refill_with_injected_clock() -> None:
    """Tokens come back at per_second and never beyond burst."""
    limiter = RateLimiter(RateLimit(per_second=10.0, burst=5))
    for _ in range(5):
        assert limiter.check("a", 0.0) is None
    assert limiter.check("a", 0.0) == pytest.approx(0.1)
    assert limiter.check("a", 0.05) == pytest.approx(0.05)
    assert limiter.check("a", 0.1) is None
    assert limiter.check("a", 0.1) is not None
    # An hour later the bucket holds burst tokens, not 36000.
    allowed = [limiter.check("a", 3600.0) for _ in range(7)]
    assert allowed.count(None) == 5


def test_clock_stepping_back_does_not_drain() -> None:
    """A `now` earlier than the last one neither adds nor removes tokens."""
    limiter = RateLimiter(RateLimit(per_second=1.0, burst=1))
    assert limiter.check("a", 50.0) is None
    assert limiter.check("a", 10.0) is not None
    assert limiter.check("a", 51.0) is None


def test_idle_buckets_are_evicted() -> None:
    """Buckets that have refilled completely are dropped, so idle keys cost no memory."""
    limiter = RateLimiter(RateLimit(per_second=1.0, burst=2))
    for i in range(1000):
        limiter.check(("issuer", f"subject-{i}"), 0.0)
    assert len(limiter) == 1000
    limiter.check("late", 2.0)
    assert len(limiter) == 1


def test_key_count_is_capped() -> None:
    """At most max_keys buckets are kept; the least recently used goes first."""
    limiter = RateLimiter(RateLimit(per_second=0.001, burst=1), max_keys=100)
    for i in range(1000):
        limiter.check(i, 0.0)
    assert len(limiter) == 100
    # The most recent keys are still limited; the oldest came back full.
    assert limiter.check(999, 0.0) is not None
    assert limiter.check(0, 0.0) is None


def test_concurrent_checks_spend_exactly_burst() -> None:
    """Many threads hitting one key at one instant get exactly `burst` admissions."""
    limiter = RateLimiter(RateLimit(per_second=0.001, burst=25))
    results: list[float | None] = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(20):
            outcome = limiter.check("k", 1.0)
            with lock:
                results.append(outcome)

    run_at_once(worker, 8)
    assert results.count(None) == 25
    assert len(results) == 160


def test_invalid_limits_are_refused() -> None:
    """A limit that could never admit anything is a configuration error, not a silent block."""
    with pytest.raises(ValueError):
        RateLimiter(RateLimit(per_second=0.0, burst=5))
    with pytest.raises(ValueError):
        RateLimiter(RateLimit(per_second=1.0, burst=0))


def test_identity_limit_blocks_one_identity_while_another_is_served() -> None:
    """A burst from one identity is limited while another identity on the same grant is served."""
    limits = RateLimits(RateLimit(per_second=1.0, burst=3), RateLimit(per_second=100.0, burst=100))
    for _ in range(3):
        assert limits.check(issuer="gitlab", subject="job-a", grant="etl", now=0.0) is None
    wait = limits.check(issuer="gitlab", subject="job-a", grant="etl", now=0.0)
    assert wait == pytest.approx(1.0)
    assert limits.check(issuer="gitlab", subject="job-b", grant="etl", now=0.0) is None
    # Same subject string at another issuer is another identity.
    assert limits.check(issuer="github", subject="job-a", grant="etl", now=0.0) is None


def test_grant_limit_spans_identities_and_spends_nothing_when_refused() -> None:
    """The grant limit caps all identities together; a refused request costs no identity token."""
    limits = RateLimits(RateLimit(per_second=1.0, burst=2), RateLimit(per_second=1.0, burst=3))
    assert limits.check(issuer="i", subject="a", grant="g", now=0.0) is None
    assert limits.check(issuer="i", subject="b", grant="g", now=0.0) is None
    assert limits.check(issuer="i", subject="c", grant="g", now=0.0) is None
    assert limits.check(issuer="i", subject="d", grant="g", now=0.0) is not None
    # "d" was refused by the grant limit: its own bucket is still full (2 on another grant).
    assert limits.check(issuer="i", subject="d", grant="other", now=0.0) is None
    assert limits.check(issuer="i", subject="d", grant="other", now=0.0) is None
    assert limits.check(issuer="i", subject="d", grant="other", now=0.0) is not None


def test_limits_from_settings() -> None:
    """The broker settings' identity and grant limits are the ones applied."""
    settings = BrokerSettings(
        rate_limit_identity=RateLimit(per_second=1.0, burst=1),
        rate_limit_grant=RateLimit(per_second=1.0, burst=10),
    )
    limits = RateLimits.from_settings(settings)
    assert limits.check(issuer="i", subject="s", grant="g", now=0.0) is None
    assert limits.check(issuer="i", subject="s", grant="g", now=0.0) == pytest.approx(1.0)


def test_deny_cache_remembers_for_ttl() -> None:
    """A denial is repeated from the cache until deny_cache_seconds have passed."""
    cache = DenyCache.from_settings(BrokerSettings(deny_cache_seconds=30))
    key = {"issuer": "gitlab", "subject": "project_path:g/p", "grant": "etl"}
    assert cache.check(**key, now=0.0) is None
    cache.remember(**key, reason="policy_denied", now=0.0)
    assert cache.check(**key, now=29.9) == "policy_denied"
    assert cache.check(issuer="gitlab", subject="project_path:g/p", grant="other", now=1.0) is None
    assert cache.check(issuer="gitlab", subject="project_path:g/q", grant="etl", now=1.0) is None
    assert cache.check(**key, now=30.0) is None
    assert len(cache) == 0


def test_deny_cache_is_bounded_and_clearable() -> None:
    """The cache keeps at most max_entries denials, newest first, and clear() forgets them all."""
    cache = DenyCache(60, max_entries=10)
    for i in range(50):
        cache.remember(issuer="i", subject=f"s{i}", grant="g", reason="r", now=float(i) / 100)
    assert len(cache) == 10
    assert cache.check(issuer="i", subject="s49", grant="g", now=1.0) == "r"
    assert cache.check(issuer="i", subject="s0", grant="g", now=1.0) is None
    cache.clear()
    assert cache.check(issuer="i", subject="s49", grant="g", now=1.0) is None


def test_deny_cache_ttl_zero_disables() -> None:
    """With deny_cache_seconds = 0 nothing is remembered."""
    cache = DenyCache(0)
    cache.remember(issuer="i", subject="s", grant="g", reason="r", now=0.0)
    assert cache.check(issuer="i", subject="s", grant="g", now=0.0) is None


def test_grant_budget_is_spent_only_after_the_policy_allowed() -> None:
    """Identities spend their own buckets; only `grant` (after the policy) spends the grant's,
    and a request it refuses gets its identity token back."""
    limits = RateLimits(RateLimit(per_second=0.001, burst=2), RateLimit(per_second=0.001, burst=1))
    for i in range(50):  # refused identities: their own budget, never the grant's
        limits.identity(issuer="gitlab", subject=f"evil-{i}", now=0.0)
    assert limits.identity(issuer="gitlab", subject="victim", now=0.0) is None
    assert limits.grant(issuer="gitlab", subject="victim", grant="etl", now=0.0) is None
    assert limits.identity(issuer="gitlab", subject="other", now=0.0) is None
    assert limits.grant(issuer="gitlab", subject="other", grant="etl", now=0.0) is not None
    # The refused one got its identity token back: two more identity checks pass.
    assert limits.identity(issuer="gitlab", subject="other", now=0.0) is None
    assert limits.identity(issuer="gitlab", subject="other", now=0.0) is None
    assert limits.identity(issuer="gitlab", subject="other", now=0.0) is not None


def test_client_failure_budget_is_spent_by_failures_only() -> None:
    limits = RateLimits(
        RateLimit(per_second=1, burst=1),
        RateLimit(per_second=1, burst=1),
        RateLimit(per_second=0.5, burst=3),
    )
    for _ in range(3):
        assert limits.client_wait("10.0.0.1", 0.0) is None
        limits.client_failed("10.0.0.1", 0.0)
    wait = limits.client_wait("10.0.0.1", 0.0)
    assert wait is not None and wait == pytest.approx(2.0)
    assert limits.client_wait("10.0.0.2", 0.0) is None
    assert limits.client_wait("10.0.0.1", 2.0) is None
