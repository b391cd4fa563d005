"""Rate limits and the denial cache: in-process token buckets in front of policy and minting.

Owns how often one identity (issuer + subject) and one grant may ask for credentials, and the
memory of recent denials, so that a misconfigured job retrying in a loop is turned away cheaply
instead of re-verifying, re-evaluating and hammering STS (whose account quota is about 600
requests per second). Talks to no external system; thread-safe; every time is a monotonic
`now` in seconds passed by the caller (`time.monotonic()` at the composition root).

Limits are per replica: N brokers behind a load balancer admit up to N times the configured
rate. That is deliberate; a shared counter would make every request wait on the database, and
the point of these limits is to shed load before it reaches anything shared.

Memory is bounded: buckets that have refilled completely are indistinguishable from new ones
and are dropped, and at most `max_keys` are kept (least recently used go first).
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

from broker.config import BrokerSettings, RateLimit

# Default cap on remembered keys per limiter and per denial cache: at ~200 bytes a bucket,
# 100k keys is about 20 MB, far above the number of distinct CI identities of one deployment.
DEFAULT_MAX_KEYS = 100_000


def retry_after(seconds: float) -> int:
    """The Retry-After header value (RFC 9110 section 10.2.3: whole seconds), at least 1."""
    return max(1, math.ceil(seconds))


@dataclass
class _Bucket:
    tokens: float
    updated: float


class _Buckets:
    """Token buckets for one limit; not thread-safe, the owner holds a lock."""

    def __init__(self, limit: RateLimit, max_keys: int) -> None:
        if limit.per_second <= 0 or limit.burst < 1:
            raise ValueError("a rate limit needs per_second > 0 and burst >= 1")
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self.rate = float(limit.per_second)
        self.burst = float(limit.burst)
        self.max_keys = max_keys
        # Seconds after which an untouched bucket is full again, i.e. the same as no bucket.
        self.refill_seconds = self.burst / self.rate
        self.buckets: OrderedDict[Hashable, _Bucket] = OrderedDict()

    def wait(self, key: Hashable, now: float) -> float:
        """Seconds until `key` has a whole token; 0.0 when it has one now."""
        bucket = self._refill(key, now)
        return 0.0 if bucket.tokens >= 1.0 else (1.0 - bucket.tokens) / self.rate

    def spend(self, key: Hashable, now: float) -> float:
        """`wait`, and when it is 0.0 spend that token too: one refill for both."""
        bucket = self._refill(key, now)
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / self.rate

    def _refill(self, key: Hashable, now: float) -> _Bucket:
        self._evict_idle(now)
        bucket = self.buckets.get(key)
        if bucket is None:
            bucket = _Bucket(tokens=self.burst, updated=now)
            self.buckets[key] = bucket
            if len(self.buckets) > self.max_keys:
                # NOTE: an evicted, still-draining bucket comes back full. Keys are verified
                # identities, so forcing this takes max_keys distinct valid tokens.
                self.buckets.popitem(last=False)
        else:
            # max(0, ...): a caller's clock that steps back never drains a bucket.
            elapsed = max(0.0, now - bucket.updated)
            bucket.tokens = min(self.burst, bucket.tokens + elapsed * self.rate)
            bucket.updated = max(bucket.updated, now)
            self.buckets.move_to_end(key)
        return bucket

    def _evict_idle(self, now: float) -> None:
        # Least recently used first: stop at the first bucket still refilling. Amortised O(1).
        while self.buckets:
            key, bucket = next(iter(self.buckets.items()))
            if now - bucket.updated < self.refill_seconds:
                return
            del self.buckets[key]

    def __len__(self) -> int:
        return len(self.buckets)


class RateLimiter:
    """One token-bucket limit (`burst` at once, refilled at `per_second`) per key."""

    def __init__(self, limit: RateLimit, *, max_keys: int = DEFAULT_MAX_KEYS) -> None:
        self._buckets = _Buckets(limit, max_keys)
        self._lock = threading.Lock()

    def check(self, key: Hashable, now_monotonic: float) -> float | None:
        """Spend a token for `key`: None if allowed, else seconds until one is available."""
        with self._lock:
            wait = self._buckets.spend(key, now_monotonic)
            return wait if wait > 0.0 else None

    def __len__(self) -> int:
        with self._lock:
            return len(self._buckets)


class RateLimits:
    """The broker's three limits: per client address, per identity and per grant.

    Each budget is spent only by requests that have earned a claim on it, so one tenant cannot
    spend another's:
    - the client address's budget (`client_failures`) by requests that fail to authenticate:
      junk is shed before any verification, and legitimate jobs behind one NAT address are
      not limited by each other's successes;
    - the identity's (issuer, subject) by every request of that verified identity, before the
      policy runs, allowed or not: it is its own budget;
    - the grant's only by requests the policy allowed for it. Spending it earlier would let
      identities the policy refuses flood `audience=<grant>` and starve its real users.
    A request refused by the grant limit gets its identity token back, so it spends from both
    or from neither.
    """

    def __init__(
        self,
        identity: RateLimit,
        grant: RateLimit,
        client: RateLimit | None = None,
        *,
        max_keys: int = DEFAULT_MAX_KEYS,
    ) -> None:
        self._identity = _Buckets(identity, max_keys)
        self._grant = _Buckets(grant, max_keys)
        self._client = _Buckets(client or BrokerSettings.rate_limit_client_failures, max_keys)
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: BrokerSettings) -> RateLimits:
        return cls(
            settings.rate_limit_identity,
            settings.rate_limit_grant,
            settings.rate_limit_client_failures,
        )

    def client_wait(self, client: str, now: float) -> float | None:
        """Before verification: None if `client` may try, else seconds until it may again.

        Spends nothing: only `client_failed` does, once the request failed to authenticate.
        """
        with self._lock:
            wait = self._client.wait(client, now)
            return wait if wait > 0.0 else None

    def client_failed(self, client: str, now: float) -> None:
        """`client` sent a request that did not authenticate: one token of its budget."""
        with self._lock:
            self._client.spend(client, now)

    def identity(self, *, issuer: str, subject: str, now: float) -> float | None:
        """Spend one token of the identity's budget: None if allowed, else seconds to wait."""
        with self._lock:
            wait = self._identity.spend((issuer, subject), now)
            return wait if wait > 0.0 else None

    def grant(self, *, issuer: str, subject: str, grant: str, now: float) -> float | None:
        """After the policy allowed: spend one token of `grant`'s budget, None if allowed.

        When the grant has none left, the identity token spent by `identity` is given back.
        """
        with self._lock:
            wait = self._grant.spend(grant, now)
            if wait > 0.0:
                bucket = self._identity.buckets.get((issuer, subject))
                if bucket is not None:
                    bucket.tokens = min(self._identity.burst, bucket.tokens + 1.0)
                return wait
            return None

    def check(self, *, issuer: str, subject: str, grant: str, now: float) -> float | None:
        """`identity` then `grant` for a request already allowed: both spent, or neither."""
        wait = self.identity(issuer=issuer, subject=subject, now=now)
        if wait is not None:
            return wait
        return self.grant(issuer=issuer, subject=subject, grant=grant, now=now)


class DenyCache:
    """Recent denials by (issuer, subject, grant), remembered for `ttl_seconds`.

    While an entry lives the broker repeats the denial without evaluating policy or calling an
    upstream. Callers key on the verified identity only after the token verified, so a forged
    token cannot plant a denial for someone else. NOTE: the key is the subject, not every claim:
    two tokens of one subject with different claims (say `ref_protected`) share a cached denial
    for up to `ttl_seconds`. That errs on the side of denying; `clear()` on policy reload makes
    a fixed policy effective at once. `ttl_seconds = 0` disables the cache.
    """

    def __init__(self, ttl_seconds: float, *, max_entries: int = DEFAULT_MAX_KEYS) -> None:
        if ttl_seconds < 0 or max_entries < 1:
            raise ValueError("ttl_seconds must be >= 0 and max_entries >= 1")
        self._ttl = float(ttl_seconds)
        self._max = max_entries
        # Ordered by expiry: every entry lives the same ttl, so insertion order is expiry order.
        self._entries: OrderedDict[tuple[str, str, str], tuple[str, float]] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: BrokerSettings) -> DenyCache:
        return cls(settings.deny_cache_seconds)

    def remember(self, *, issuer: str, subject: str, grant: str, reason: str, now: float) -> None:
        """Record a denial with its stable reason code."""
        if self._ttl == 0:
            return
        key = (issuer, subject, grant)
        with self._lock:
            self._expire(now)
            self._entries.pop(key, None)
            self._entries[key] = (reason, now + self._ttl)
            while len(self._entries) > self._max:
                self._entries.popitem(last=False)

    def check(self, *, issuer: str, subject: str, grant: str, now: float) -> str | None:
        """The reason of a live cached denial for this identity and grant, or None."""
        with self._lock:
            self._expire(now)
            entry = self._entries.get((issuer, subject, grant))
            return None if entry is None else entry[0]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def _expire(self, now: float) -> None:
        while self._entries:
            key, (_, until) = next(iter(self._entries.items()))
            if now < until:
                return
            del self._entries[key]

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
