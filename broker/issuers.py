"""Discovery and JWKS cache for every configured issuer: the only module that fetches keys.

Owns the fetch policy towards the OIDC issuers (GitLab, GitHub, Bitbucket, Okta, or the local dev
issuer): OpenID discovery at `<url>/.well-known/openid-configuration`, then the JWKS it names,
both over HTTP(S) through the injected httpx client. Keys are parsed and validated by
`broker.jwk`; this module decides when to fetch, what to trust, and what to keep when a fetch
goes wrong:

- the discovery `issuer` must equal the configured url byte for byte, and `jwks_uri` must be on
  the issuer's own scheme, host and port (pinned); plain HTTP only for loopback hosts;
- no redirects; bodies are streamed and cut at 256 KiB; one fetch (discovery + JWKS) has 5 s;
- a failed or poisoned fetch never replaces the last good keys; those serve until
  `jwks_max_stale` after the last successful fetch, then the issuer is unavailable (503);
- keys are refetched `jwks_cache_ttl` after the last success; an unknown `kid` forces a refetch
  at most once per `jwks_refetch_cooldown`, and a failed fetch is retried no sooner than that;
- concurrent callers share one in-flight fetch (single-flight);
- an issuer with `jwks_file` uses those pinned keys and never touches the network.

`by_url` maps a token's `iss` to its configuration with an exact string lookup and no I/O, so a
token from an unknown issuer is rejected before anything is fetched: an attacker-chosen `iss`
never makes the broker fetch from a URL of the attacker's choosing.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import httpx

from broker.config import IssuerConfig
from broker.errors import BrokerException
from broker.jwk import KeySet, KeySetError, VerificationKey, parse_jwks
from broker.loopback import is_loopback_host

log = logging.getLogger(__name__)

# octo-sts caps discovery/JWKS at 100 KiB; large IdPs publish a handful of keys (< 10 KiB), and
# 256 KiB leaves room for x5c-carrying key sets while bounding memory per fetch.
MAX_BODY_BYTES = 256 * 1024
# Total wall time for one fetch (discovery + JWKS together), drip-feed included, so a slow issuer
# cannot hold a worker thread.
FETCH_DEADLINE_SECONDS = 5.0
DISCOVERY_PATH = "/.well-known/openid-configuration"

# Outcomes passed to `on_fetch`; a small fixed set so they can label a metric.
OK = "ok"


class IssuerUnavailable(BrokerException):
    """No usable keys for the issuer and it cannot be reached now; the broker answers 503.

    `audit_reason` is the reason the refusal is audited under; `retry_after` (seconds) is when
    asking again may help.
    """

    audit_reason = "issuer_unavailable"

    def __init__(self, issuer: str, reason: str, *, retry_after: int = 5) -> None:
        super().__init__(f"issuer {issuer!r} has no usable keys ({reason})")
        self.issuer = issuer
        self.reason = reason
        self.retry_after = retry_after


class KeyRefetchPending(IssuerUnavailable):
    """The `kid` is unknown and the keys cannot be refetched before the cooldown ends.

    The key may have been rotated in since the last fetch, so the answer is "retry after the
    cooldown" (503), not "no such key" (400): otherwise a stream of random kids, each spending
    the one refetch per cooldown, keeps a freshly rotated legitimate key refused for good.
    """

    audit_reason = "kid_refetch_pending"


class UnknownKey(BrokerException):
    """The issuer's keys are current but none matches the token's `kid` and `alg`."""

    def __init__(self, issuer: str, kid: str | None, alg: str) -> None:
        # NOTE: the kid is attacker-chosen; only its length goes into the message.
        shown = "none" if kid is None else f"{len(kid)} chars"
        super().__init__(f"issuer {issuer!r} has no {alg} key for that kid ({shown})")
        self.issuer = issuer
        self.kid = kid
        self.alg = alg


class _FetchFailed(BrokerException):
    """One fetch went wrong; `reason` is a stable code, the message carries details for logs."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass
class _Entry:
    """Cache state of one issuer. Fields change only while `fetch_lock` is held."""

    config: IssuerConfig
    keys: KeySet | None = None
    pinned: bool = False
    last_success: datetime | None = None
    last_attempt: datetime | None = None
    last_attempt_ok: bool = False
    last_forced: datetime | None = None  # last refetch triggered by an unknown kid
    last_error: str | None = None
    attempts: int = 0  # fetches started; lets a waiter see that someone fetched meanwhile
    fetch_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    default_port = {"https": 443, "http": 80}.get(url.scheme)
    return (url.scheme, url.host.lower(), url.port or default_port)


class IssuerRegistry:
    """The configured issuers and their verification keys, fetched and cached by policy."""

    def __init__(
        self,
        issuers: Sequence[IssuerConfig],
        http: httpx.Client,
        *,
        clock: Callable[[], datetime],
        on_fetch: Callable[[str, str], None] | None = None,
    ) -> None:
        self._http = http
        self._clock = clock
        self._on_fetch = on_fetch
        self._by_url: dict[str, IssuerConfig] = {}
        self._entries: dict[str, _Entry] = {}
        for issuer in issuers:
            if issuer.url in self._by_url or issuer.name in self._entries:
                raise ValueError(f"issuer {issuer.name!r}: duplicate name or url")
            entry = _Entry(config=issuer)
            if issuer.jwks_file is not None:
                # Pinned keys: read once here; a broken file stops start-up rather than
                # leaving an issuer that can never verify anything.
                try:
                    entry.keys = parse_jwks(issuer.jwks_file.read_bytes())
                except (OSError, KeySetError) as exc:
                    raise ValueError(f"issuer {issuer.name!r}: jwks_file unusable: {exc}") from exc
                entry.pinned = True
            self._by_url[issuer.url] = issuer
            self._entries[issuer.name] = entry

    def by_url(self, iss: object) -> IssuerConfig | None:
        """The issuer whose configured url is exactly `iss` (no normalisation, no I/O)."""
        if not isinstance(iss, str):
            return None
        return self._by_url.get(iss)

    def resolve_key(self, issuer: IssuerConfig, kid: str | None, alg: str) -> VerificationKey:
        """The key that should have signed a token from `issuer` with header `kid` and `alg`.

        Raises UnknownKey when the keys are good (fresh, just refetched, or the refetch cooldown
        has not passed) and none matches; IssuerUnavailable when there are no keys that may
        still be used, or the kid is unknown while the issuer's last fetch failed.
        """
        entry = self._entry(issuer)
        if entry.pinned:
            assert entry.keys is not None
            key = entry.keys.find(kid, alg)
            if key is None:
                raise UnknownKey(issuer.name, kid, alg)
            return key
        attempts_before = entry.attempts
        keys = self._usable_keys(entry)
        key = keys.find(kid, alg)
        if key is not None:
            return key
        keys, retry_in = self._refetch_for_unknown_kid(entry)
        key = keys.find(kid, alg)
        if key is not None:
            return key
        if not entry.last_attempt_ok:
            # While the issuer serves garbage or is down we cannot tell a rotated-in key from a
            # forged kid, so the caller retries later (503), not 400.
            raise IssuerUnavailable(issuer.name, entry.last_error or "refetch failed")
        if entry.attempts == attempts_before:
            # No fetch since this request began: the cooldown held the refetch back.
            raise KeyRefetchPending(issuer.name, "refetch cooldown", retry_after=retry_in)
        raise UnknownKey(issuer.name, kid, alg)

    def warm(self) -> None:
        """Fetch every network issuer once, best effort (start-up); failures are only logged."""
        for entry in self._entries.values():
            if entry.pinned:
                continue
            observed = entry.attempts
            with entry.fetch_lock:
                if entry.attempts == observed:
                    self._fetch_locked(entry, self._clock())

    def key_ages(self) -> Mapping[str, float | None]:
        """Issuer name -> seconds since its keys were last fetched (or loaded); None if never."""
        now = self._clock()
        return {
            name: None if e.last_success is None else (now - e.last_success).total_seconds()
            for name, e in self._entries.items()
        }

    def status(self) -> Mapping[str, bool]:
        """Issuer name -> whether it has keys that may be used now (for /readyz)."""
        now = self._clock()
        return {name: self._has_usable(entry, now) for name, entry in self._entries.items()}

    def _entry(self, issuer: IssuerConfig) -> _Entry:
        entry = self._entries.get(issuer.name)
        if entry is None or entry.config != issuer:
            raise ValueError(f"issuer {issuer.name!r} is not configured in this registry")
        return entry

    @staticmethod
    def _has_usable(entry: _Entry, now: datetime) -> bool:
        if entry.pinned:
            return True
        if entry.keys is None or entry.last_success is None:
            return False
        return now - entry.last_success <= timedelta(seconds=entry.config.jwks_max_stale)

    def _usable_keys(self, entry: _Entry) -> KeySet:
        """Current keys, refetching first if the cache TTL has passed (single-flight)."""
        now = self._clock()
        keys = entry.keys
        # Lock-free fast path; anything doubtful (a fetch may be half-recorded) takes the lock.
        if (
            keys is not None
            and not self._needs_refresh(entry, now)
            and self._has_usable(entry, now)
        ):
            return keys
        observed = entry.attempts
        with entry.fetch_lock:
            now = self._clock()
            # Another caller fetched while we waited for the lock: share its result.
            if entry.attempts == observed and self._needs_refresh(entry, now):
                self._fetch_locked(entry, now)
            if not self._has_usable(entry, now):
                raise IssuerUnavailable(entry.config.name, entry.last_error or "stale")
            assert entry.keys is not None
            return entry.keys

    def _needs_refresh(self, entry: _Entry, now: datetime) -> bool:
        config = entry.config
        if entry.last_attempt is not None and not entry.last_attempt_ok:
            # The last fetch failed: do not hammer a broken issuer; retry once per cooldown.
            return now - entry.last_attempt >= timedelta(seconds=config.jwks_refetch_cooldown)
        if entry.keys is None or entry.last_success is None:
            return True
        return now - entry.last_success >= timedelta(seconds=config.jwks_cache_ttl)

    def _refetch_for_unknown_kid(self, entry: _Entry) -> tuple[KeySet, int]:
        """Refetch because a kid was not found, at most once per cooldown per issuer.

        Returns the keys and the whole seconds (at least 1) until the next refetch may run.
        """
        observed = entry.attempts
        with entry.fetch_lock:
            now = self._clock()
            cooldown = timedelta(seconds=entry.config.jwks_refetch_cooldown)
            recent = (entry.last_forced is not None and now - entry.last_forced < cooldown) or (
                entry.last_attempt is not None
                and now - entry.last_attempt < cooldown
                and not entry.last_attempt_ok
            )
            if entry.attempts == observed and not recent:
                entry.last_forced = now
                self._fetch_locked(entry, now)
            if not self._has_usable(entry, now):
                raise IssuerUnavailable(entry.config.name, entry.last_error or "stale")
            assert entry.keys is not None
            last_forced = entry.last_forced or now
            retry_in = math.ceil((last_forced + cooldown - now).total_seconds())
            return entry.keys, max(1, retry_in)

    def _fetch_locked(self, entry: _Entry, now: datetime) -> None:
        """One fetch; on success replace the keys, on failure keep the last good ones."""
        name = entry.config.name
        entry.attempts += 1
        try:
            keys = self._fetch_keys(entry.config)
        except _FetchFailed as exc:
            entry.last_attempt = now
            entry.last_attempt_ok = False
            entry.last_error = exc.reason
            log.warning("issuer %s: key fetch failed (%s): %s", name, exc.reason, exc)
            self._report(name, exc.reason)
            return
        entry.keys = keys
        entry.last_success = now
        entry.last_attempt = now
        entry.last_attempt_ok = True
        entry.last_error = None
        self._report(name, OK)

    def _report(self, name: str, outcome: str) -> None:
        if self._on_fetch is not None:
            self._on_fetch(name, outcome)

    def _fetch_keys(self, issuer: IssuerConfig) -> KeySet:
        deadline = time.monotonic() + FETCH_DEADLINE_SECONDS
        try:
            issuer_url = httpx.URL(issuer.url)
        except httpx.InvalidURL as exc:
            raise _FetchFailed("insecure_url", "issuer url does not parse") from exc
        if issuer_url.scheme != "https" and not (
            issuer_url.scheme == "http" and is_loopback_host(issuer_url.host)
        ):
            raise _FetchFailed("insecure_url", "issuer url must be https (http only on loopback)")
        discovery = self._get_json(issuer.url.rstrip("/") + DISCOVERY_PATH, deadline)
        if not isinstance(discovery, dict):
            raise _FetchFailed("bad_discovery", "discovery document is not a JSON object")
        if discovery.get("issuer") != issuer.url:
            raise _FetchFailed("issuer_mismatch", "discovery `issuer` differs from the config url")
        jwks_uri = discovery.get("jwks_uri")
        if not isinstance(jwks_uri, str):
            raise _FetchFailed("bad_discovery", "discovery has no string `jwks_uri`")
        try:
            jwks_url = httpx.URL(jwks_uri)
        except httpx.InvalidURL as exc:
            raise _FetchFailed("jwks_uri_not_pinned", "jwks_uri does not parse") from exc
        # SSRF guard: the keys must come from the issuer's own origin, never a URL the discovery
        # document (or whoever spoofs it) points elsewhere.
        if _origin(jwks_url) != _origin(issuer_url) or jwks_url.userinfo:
            raise _FetchFailed("jwks_uri_not_pinned", f"jwks_uri off the issuer origin: {jwks_uri}")
        body = self._get(jwks_uri, deadline)
        try:
            keys = parse_jwks(body)
        except KeySetError as exc:
            raise _FetchFailed("bad_keyset", f"keyset rejected: {exc.reason}") from exc
        if not keys.keys:
            # Warehouse skips empty keysets too: an empty answer is an outage, not a rotation.
            raise _FetchFailed("bad_keyset", "keyset is empty")
        return keys

    def _get_json(self, url: str, deadline: float) -> object:
        body = self._get(url, deadline)
        try:
            return json.loads(body)
        except (ValueError, RecursionError) as exc:
            raise _FetchFailed("bad_json", f"{url} did not return JSON") from exc

    def _get(self, url: str, deadline: float) -> bytes:
        """GET `url` without redirects; at most MAX_BODY_BYTES, finished before `deadline`."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _FetchFailed("timeout", f"no time left for {url}")
        # NOTE: the read timeout bounds each read; the elapsed check after every chunk bounds
        # the whole body, so a 1 byte/s drip-feed is cut at the deadline.
        headers = {"Accept": "application/json", "Accept-Encoding": "identity"}
        try:
            with self._http.stream(
                "GET",
                url,
                headers=headers,
                follow_redirects=False,
                timeout=httpx.Timeout(remaining),
            ) as response:
                if response.is_redirect:
                    raise _FetchFailed("redirect", f"{url} answered a redirect; not followed")
                if response.status_code != 200:
                    raise _FetchFailed("http_status", f"{url} answered {response.status_code}")
                encoding = response.headers.get("content-encoding", "identity").lower()
                if encoding != "identity":
                    # Refused so a compressed body cannot expand past the cap (zip bomb); with
                    # identity only, iter_bytes below yields the bytes as they came.
                    raise _FetchFailed("bad_encoding", f"{url} sent content-encoding {encoding}")
                declared = response.headers.get("content-length")
                if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
                    raise _FetchFailed("too_large", f"{url} declares {declared} bytes")
                body = bytearray()
                for chunk in response.iter_bytes():
                    body += chunk
                    if len(body) > MAX_BODY_BYTES:
                        raise _FetchFailed("too_large", f"{url} body exceeds {MAX_BODY_BYTES}")
                    if time.monotonic() > deadline:
                        raise _FetchFailed("timeout", f"{url} too slow")
                return bytes(body)
        except httpx.TimeoutException as exc:
            raise _FetchFailed("timeout", f"{url} timed out") from exc
        except httpx.HTTPError as exc:
            raise _FetchFailed("unreachable", f"{url}: {type(exc).__name__}") from exc
