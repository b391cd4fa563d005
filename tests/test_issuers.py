"""The JWKS fetch policy of broker.issuers: unit tests on a mock IdP, then the real dev issuer."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

import broker.issuers
from broker.config import IssuerConfig
from broker.dev.harness import DevIssuer
from broker.dev.issuer import SigningKey
from broker.issuers import IssuerRegistry, IssuerUnavailable, KeyRefetchPending, UnknownKey
from broker.jwk import b64url_decode

URL = "https://idp.example"
START = datetime(2026, 11, 22, 2, 0, tzinfo=UTC)
TTL, COOLDOWN, MAX_STALE = 900, 60, 3600


class Clock:
    """An injected clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


class FakeIdP:
    """A mock-transport IdP: discovery and JWKS for `url`, with knobs for hostile answers."""

    def __init__(self, url: str = URL) -> None:
        self.url = url
        self.keys = [SigningKey.generate("ES256")]
        self.discovery: dict[str, Any] = {"issuer": url, "jwks_uri": url + "/jwks"}
        self.jwks_answer: Callable[[], httpx.Response] | None = None
        self.discovery_answer: Callable[[], httpx.Response] | None = None
        self.jwks_delay = 0.0
        self.paths: list[str] = []
        self._lock = threading.Lock()

    @property
    def jwks_fetches(self) -> int:
        return sum(1 for p in self.paths if p.endswith("/jwks"))

    def jwks(self) -> dict[str, Any]:
        return {"keys": [k.public_jwk() for k in self.keys]}

    def handle(self, request: httpx.Request) -> httpx.Response:
        with self._lock:
            self.paths.append(str(request.url))
        if str(request.url) == self.url + "/.well-known/openid-configuration":
            if self.discovery_answer is not None:
                return self.discovery_answer()
            return httpx.Response(200, json=self.discovery)
        if str(request.url) == self.url + "/jwks":
            time.sleep(self.jwks_delay)
            if self.jwks_answer is not None:
                return self.jwks_answer()
            return httpx.Response(200, json=self.jwks())
        return httpx.Response(404)


def issuer_config(url: str = URL, **overrides: Any) -> IssuerConfig:
    base = IssuerConfig(
        name="idp",
        url=url,
        audiences=("broker",),
        algorithms=("ES256", "RS256"),
        jwks_cache_ttl=TTL,
        jwks_refetch_cooldown=COOLDOWN,
        jwks_max_stale=MAX_STALE,
    )
    return replace(base, **overrides)


def registry_for(
    idp: FakeIdP, config: IssuerConfig | None = None, clock: Clock | None = None
) -> tuple[IssuerRegistry, IssuerConfig, Clock, list[tuple[str, str]]]:
    config = config or issuer_config(idp.url)
    clock = clock or Clock()
    outcomes: list[tuple[str, str]] = []
    http = httpx.Client(transport=httpx.MockTransport(idp.handle))
    registry = IssuerRegistry(
        [config], http, clock=clock, on_fetch=lambda n, o: outcomes.append((n, o))
    )
    return registry, config, clock, outcomes


def test_resolves_a_published_key_and_caches_it() -> None:
    """A published kid resolves after one discovery and one JWKS fetch, then from the cache."""
    idp = FakeIdP()
    registry, config, clock, outcomes = registry_for(idp)
    kid = idp.keys[0].kid
    assert registry.resolve_key(config, kid, "ES256").kid == kid
    clock.advance(TTL - 1)
    assert registry.resolve_key(config, kid, "ES256").kid == kid
    assert idp.paths == [URL + "/.well-known/openid-configuration", URL + "/jwks"]
    assert outcomes == [("idp", "ok")]
    assert registry.status() == {"idp": True}


def test_by_url_is_an_exact_lookup_without_io() -> None:
    """Only the exact configured url maps to the issuer; look-alikes and non-strings do not."""
    idp = FakeIdP()
    registry, config, _, _ = registry_for(idp)
    assert registry.by_url(URL) == config
    for spoof in (URL + "/", "HTTPS://IDP.EXAMPLE", "http://idp.example", URL + ".evil", 42, None):
        assert registry.by_url(spoof) is None
    assert idp.paths == []


def test_cache_ttl_expiry_refetches_and_drops_removed_keys() -> None:
    """After the cache TTL the next call refetches, and a key removed at the IdP is rejected."""
    idp = FakeIdP()
    registry, config, clock, _ = registry_for(idp)
    old = idp.keys[0]
    registry.resolve_key(config, old.kid, "ES256")
    new = SigningKey.generate("ES256")
    idp.keys = [new]
    clock.advance(TTL)
    assert registry.resolve_key(config, new.kid, "ES256").kid == new.kid
    assert idp.jwks_fetches == 2
    with pytest.raises(UnknownKey):
        registry.resolve_key(config, old.kid, "ES256")


def test_unknown_kid_flood_costs_at_most_one_fetch_per_cooldown() -> None:
    """A thousand unknown kids cause one refetch per cooldown and are all refused: the one that
    refetched as unknown, the rest as pending until the cooldown ends."""
    idp = FakeIdP()
    registry, config, clock, _ = registry_for(idp)
    registry.warm()
    with pytest.raises(UnknownKey):
        registry.resolve_key(config, "kid-first", "ES256")
    for i in range(1000):
        with pytest.raises(KeyRefetchPending) as pending:
            registry.resolve_key(config, f"kid-{i}", "ES256")
        assert pending.value.retry_after == COOLDOWN
    assert idp.jwks_fetches == 2
    clock.advance(COOLDOWN / 2)
    with pytest.raises(KeyRefetchPending) as pending:
        registry.resolve_key(config, "kid-half-way", "ES256")
    assert pending.value.retry_after == COOLDOWN / 2
    clock.advance(COOLDOWN / 2)
    with pytest.raises(UnknownKey):
        registry.resolve_key(config, "kid-after-cooldown", "ES256")
    assert idp.jwks_fetches == 3


def test_rotated_in_kid_resolves_after_the_cooldown_of_a_kid_flood() -> None:
    """A key rotated in just after a random kid spent the refetch is pending (retry later), not
    unknown; once the cooldown passes, whichever request refetches brings it in."""
    idp = FakeIdP()
    registry, config, clock, _ = registry_for(idp)
    registry.warm()
    with pytest.raises(UnknownKey):
        registry.resolve_key(config, "random-1", "ES256")
    new = SigningKey.generate("ES256")
    idp.keys.append(new)
    with pytest.raises(KeyRefetchPending) as pending:
        registry.resolve_key(config, new.kid, "ES256")
    clock.advance(pending.value.retry_after)
    with pytest.raises(UnknownKey):
        registry.resolve_key(config, "random-2", "ES256")  # the flood wins the refetch
    assert registry.resolve_key(config, new.kid, "ES256").kid == new.kid
    assert idp.jwks_fetches == 3


def test_rotated_in_kid_resolves_after_one_refetch() -> None:
    """A kid added at the IdP resolves on first sight through a single refetch."""
    idp = FakeIdP()
    registry, config, _, _ = registry_for(idp)
    registry.warm()
    new = SigningKey.generate("ES256")
    idp.keys.append(new)
    assert registry.resolve_key(config, new.kid, "ES256").kid == new.kid
    assert idp.jwks_fetches == 2


def test_concurrent_callers_share_one_fetch() -> None:
    """Twenty threads asking a cold cache at once cause exactly one discovery and JWKS fetch."""
    idp = FakeIdP()
    idp.jwks_delay = 0.2
    registry, config, _, _ = registry_for(idp)
    kid = idp.keys[0].kid
    barrier = threading.Barrier(20)
    found: list[str | None] = []
    errors: list[BaseException] = []

    def worker() -> None:
        barrier.wait()
        try:
            found.append(registry.resolve_key(config, kid, "ES256").kid)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert errors == []
    assert found == [kid] * 20
    assert len(idp.paths) == 2


def test_oversized_jwks_is_cut_off() -> None:
    """A JWKS body past 256 KiB, declared or streamed without end, is refused unread."""
    idp = FakeIdP()
    registry, config, _, outcomes = registry_for(idp)
    padded = json.dumps(idp.jwks()).encode() + b" " * (300 * 1024)
    idp.jwks_answer = lambda: httpx.Response(200, content=padded)
    with pytest.raises(IssuerUnavailable):
        registry.resolve_key(config, idp.keys[0].kid, "ES256")

    def endless() -> Iterator[bytes]:
        while True:
            yield b" " * 65536

    idp2 = FakeIdP()
    idp2.jwks_answer = lambda: httpx.Response(200, content=endless())
    registry2, config2, _, outcomes2 = registry_for(idp2)
    with pytest.raises(IssuerUnavailable):
        registry2.resolve_key(config2, idp2.keys[0].kid, "ES256")
    assert outcomes == [("idp", "too_large")]
    assert outcomes2 == [("idp", "too_large")]


def test_drip_fed_jwks_is_abandoned_at_the_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    """A JWKS trickling in byte by byte is abandoned when the fetch deadline passes."""
    monkeypatch.setattr(broker.issuers, "FETCH_DEADLINE_SECONDS", 0.5)
    idp = FakeIdP()
    body = json.dumps(idp.jwks()).encode()

    sent: list[int] = []

    def drip() -> Iterator[bytes]:
        for i in range(len(body)):
            time.sleep(0.1)
            sent.append(i)
            yield body[i : i + 1]

    idp.jwks_answer = lambda: httpx.Response(200, content=drip())
    registry, config, _, outcomes = registry_for(idp)
    started = time.monotonic()
    with pytest.raises(IssuerUnavailable):
        registry.resolve_key(config, idp.keys[0].kid, "ES256")
    # Abandoned, not read to the end: the whole drip takes len(body)/10 s (tens of seconds).
    assert len(sent) < len(body) // 2
    # The promised deadline, with a margin that holds on a busy 2-core machine.
    assert time.monotonic() - started < broker.issuers.FETCH_DEADLINE_SECONDS + 5.0
    assert outcomes == [("idp", "timeout")]


def test_redirects_are_not_followed() -> None:
    """A redirect from discovery is a failed fetch and its target is never requested."""
    idp = FakeIdP()
    idp.discovery_answer = lambda: httpx.Response(
        302, headers={"Location": "http://169.254.169.254/latest/meta-data/"}
    )
    registry, config, _, outcomes = registry_for(idp)
    with pytest.raises(IssuerUnavailable):
        registry.resolve_key(config, idp.keys[0].kid, "ES256")
    assert idp.paths == [URL + "/.well-known/openid-configuration"]
    assert outcomes == [("idp", "redirect")]


@pytest.mark.parametrize(
    "jwks_uri",
    [
        "https://evil.example/jwks",
        "https://idp.example:8443/jwks",
        "http://idp.example/jwks",
        "https://idp.example.evil/jwks",
        "https://user@idp.example/jwks",
        "file:///etc/passwd",
    ],
)
def test_jwks_uri_is_pinned_to_the_issuer_origin(jwks_uri: str) -> None:
    """A jwks_uri off the issuer's scheme, host and port is refused and never fetched."""
    idp = FakeIdP()
    idp.discovery["jwks_uri"] = jwks_uri
    registry, config, _, outcomes = registry_for(idp)
    with pytest.raises(IssuerUnavailable):
        registry.resolve_key(config, idp.keys[0].kid, "ES256")
    assert idp.paths == [URL + "/.well-known/openid-configuration"]
    assert outcomes == [("idp", "jwks_uri_not_pinned")]


def test_discovery_issuer_must_match_exactly() -> None:
    """Discovery naming a different issuer string (even a trailing slash) is refused."""
    idp = FakeIdP()
    idp.discovery["issuer"] = URL + "/"
    registry, config, _, outcomes = registry_for(idp)
    with pytest.raises(IssuerUnavailable):
        registry.resolve_key(config, idp.keys[0].kid, "ES256")
    assert outcomes == [("idp", "issuer_mismatch")]


def test_plain_http_is_refused_except_on_loopback() -> None:
    """An http:// issuer off loopback is refused without any request; on 127.0.0.1 it works."""
    remote = FakeIdP("http://idp.example")
    registry, config, _, outcomes = registry_for(remote)
    with pytest.raises(IssuerUnavailable):
        registry.resolve_key(config, remote.keys[0].kid, "ES256")
    assert remote.paths == []
    assert outcomes == [("idp", "insecure_url")]
    local = FakeIdP("http://127.0.0.1:8080")
    registry, config, _, _ = registry_for(local)
    assert registry.resolve_key(config, local.keys[0].kid, "ES256")


def test_compressed_bodies_are_refused() -> None:
    """A JWKS with a content-encoding is refused so it cannot inflate past the size cap."""
    idp = FakeIdP()
    idp.jwks_answer = lambda: httpx.Response(
        200, content=b"\x1f\x8b", headers={"Content-Encoding": "gzip"}
    )
    registry, config, _, outcomes = registry_for(idp)
    with pytest.raises(IssuerUnavailable):
        registry.resolve_key(config, idp.keys[0].kid, "ES256")
    assert outcomes == [("idp", "bad_encoding")]


def test_cached_keys_serve_until_max_stale_while_the_issuer_is_down() -> None:
    """While the IdP fails, cached keys serve until max_stale after the last success, then 503."""
    idp = FakeIdP()
    registry, config, clock, _ = registry_for(idp)
    kid = idp.keys[0].kid
    registry.resolve_key(config, kid, "ES256")
    idp.jwks_answer = lambda: httpx.Response(500)
    clock.advance(TTL)
    assert registry.resolve_key(config, kid, "ES256").kid == kid
    fetches = idp.jwks_fetches
    clock.advance(COOLDOWN - 1)
    registry.resolve_key(config, kid, "ES256")
    assert idp.jwks_fetches == fetches  # a failing issuer is retried once per cooldown
    clock.now = START + timedelta(seconds=MAX_STALE)
    assert registry.resolve_key(config, kid, "ES256").kid == kid
    assert registry.status() == {"idp": True}
    clock.advance(1)
    with pytest.raises(IssuerUnavailable):
        registry.resolve_key(config, kid, "ES256")
    assert registry.status() == {"idp": False}


def test_unreachable_issuer_without_keys_is_unavailable() -> None:
    """An issuer that never answered has no usable keys and reports not ready."""

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    config = issuer_config()
    registry = IssuerRegistry(
        [config], httpx.Client(transport=httpx.MockTransport(refuse)), clock=Clock()
    )
    registry.warm()
    assert registry.status() == {"idp": False}
    with pytest.raises(IssuerUnavailable) as caught:
        registry.resolve_key(config, "any", "ES256")
    assert caught.value.reason == "unreachable"


@pytest.mark.parametrize(
    "answer",
    [
        lambda idp: httpx.Response(200, text="<html>down</html>"),
        lambda idp: httpx.Response(200, text='{"keys": [{"kty": "EC"'),
        lambda idp: httpx.Response(200, json={"keys": "x"}),
        lambda idp: httpx.Response(200, json={"keys": []}),
        lambda idp: httpx.Response(200, json={"keys": [idp.jwks()["keys"][0]] * 2}),
        lambda idp: httpx.Response(200, json={"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}),
    ],
    ids=["html", "truncated", "keys_not_list", "empty", "duplicate_kid", "symmetric"],
)
def test_bad_keysets_keep_the_last_good_keys(answer: Callable[[FakeIdP], httpx.Response]) -> None:
    """A refetch returning garbage or a poisoned keyset keeps the last good keys in service."""
    idp = FakeIdP()
    registry, config, clock, outcomes = registry_for(idp)
    kid = idp.keys[0].kid
    registry.resolve_key(config, kid, "ES256")
    idp.jwks_answer = lambda: answer(idp)
    clock.advance(TTL)
    assert registry.resolve_key(config, kid, "ES256").kid == kid
    assert outcomes[0] == ("idp", "ok")
    assert outcomes[1][1] in {"bad_keyset", "bad_json"}
    # While the issuer misbehaves an unknown kid may be a rotated-in key: 503, not 400.
    clock.advance(COOLDOWN)
    with pytest.raises(IssuerUnavailable):
        registry.resolve_key(config, "rotated-in?", "ES256")


def test_pinned_jwks_file_never_touches_the_network(tmp_path: Path) -> None:
    """An issuer with jwks_file resolves from that file and makes no request at all."""
    key = SigningKey.generate("ES256")
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [key.public_jwk()]}))

    def no_network(request: httpx.Request) -> httpx.Response:
        raise AssertionError(f"unexpected request to {request.url}")

    config = issuer_config(jwks_file=path)
    registry = IssuerRegistry(
        [config], httpx.Client(transport=httpx.MockTransport(no_network)), clock=Clock()
    )
    registry.warm()
    assert registry.resolve_key(config, key.kid, "ES256").kid == key.kid
    with pytest.raises(UnknownKey):
        registry.resolve_key(config, "other", "ES256")
    assert registry.status() == {"idp": True}


def test_broken_pinned_jwks_file_fails_construction(tmp_path: Path) -> None:
    """A jwks_file holding a poisoned keyset stops the registry from being built."""
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}))
    with pytest.raises(ValueError, match="jwks_file unusable"):
        IssuerRegistry([issuer_config(jwks_file=path)], httpx.Client(), clock=Clock())


def test_unknown_kid_message_does_not_echo_the_kid() -> None:
    """The UnknownKey message gives the kid's length, never the attacker-chosen text."""
    idp = FakeIdP()
    registry, config, _, _ = registry_for(idp)
    with pytest.raises(UnknownKey) as caught:
        registry.resolve_key(config, "../../etc/passwd", "ES256")
    assert "passwd" not in str(caught.value)


# --- integration: the real dev issuer process over loopback HTTP ---------------------------


def _kid(token: str) -> str:
    header: dict[str, str] = json.loads(b64url_decode(token.split(".")[0]))
    return header["kid"]


def _verifies(token: str, public_key: object) -> bool:
    """Check the token's signature with the resolved key (RS256 or ES256)."""
    signing_input, signature = token.rsplit(".", 1)
    raw = b64url_decode(signature)
    if isinstance(public_key, rsa.RSAPublicKey):
        public_key.verify(raw, signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return True
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    public_key.verify(der, signing_input.encode(), ec.ECDSA(hashes.SHA256()))
    return True


@pytest.fixture
def live(
    oidc_issuer: DevIssuer,
) -> Iterator[tuple[DevIssuer, IssuerRegistry, IssuerConfig, Clock]]:
    clock = Clock()
    config = issuer_config(oidc_issuer.url)
    with httpx.Client(follow_redirects=False, trust_env=False) as http:
        yield oidc_issuer, IssuerRegistry([config], http, clock=clock), config, clock


@pytest.mark.integration
def test_live_keys_verify_tokens_from_the_dev_issuer(
    live: tuple[DevIssuer, IssuerRegistry, IssuerConfig, Clock],
) -> None:
    """Keys fetched from the real issuer verify its RS256 and ES256 tokens."""
    issuer, registry, config, _ = live
    for alg in ("RS256", "ES256"):
        token = issuer.mint("gitlab", alg=alg)
        assert _verifies(token, registry.resolve_key(config, _kid(token), alg).public_key)
    assert issuer.stats()["jwks_fetches"] == 1


@pytest.mark.integration
def test_live_rotation_resolves_after_one_refetch_and_floods_are_rate_limited(
    live: tuple[DevIssuer, IssuerRegistry, IssuerConfig, Clock],
) -> None:
    """A rotated-in kid resolves after one refetch; then a kid flood causes no further fetch
    and is answered pending until the cooldown ends."""
    issuer, registry, config, clock = live
    registry.warm()
    issuer.rotate("RS256")
    token = issuer.mint("github")
    assert _verifies(token, registry.resolve_key(config, _kid(token), "RS256").public_key)
    assert issuer.stats()["jwks_fetches"] == 2
    for i in range(200):
        with pytest.raises(KeyRefetchPending):
            registry.resolve_key(config, f"flood-{i}", "RS256")
    assert issuer.stats()["jwks_fetches"] == 2
    clock.advance(COOLDOWN)
    with pytest.raises(UnknownKey):
        registry.resolve_key(config, "flood-late", "RS256")
    assert issuer.stats()["jwks_fetches"] == 3


@pytest.mark.integration
def test_live_dropped_key_is_rejected_after_the_next_refetch(
    live: tuple[DevIssuer, IssuerRegistry, IssuerConfig, Clock],
) -> None:
    """A key the issuer stops publishing is rejected once the cache TTL has passed."""
    issuer, registry, config, clock = live
    old_token = issuer.mint()
    registry.resolve_key(config, _kid(old_token), "RS256")
    issuer.rotate("RS256", drop_old=True)
    clock.advance(TTL)
    with pytest.raises(UnknownKey):
        registry.resolve_key(config, _kid(old_token), "RS256")


@pytest.mark.integration
def test_live_stopped_issuer_serves_cached_keys_until_max_stale(
    live: tuple[DevIssuer, IssuerRegistry, IssuerConfig, Clock],
) -> None:
    """With the issuer process gone, cached keys resolve until max_stale, then 503."""
    issuer, registry, config, clock = live
    kid = _kid(issuer.mint())
    registry.resolve_key(config, kid, "RS256")
    issuer.stop()
    clock.advance(TTL)
    assert registry.resolve_key(config, kid, "RS256").kid == kid
    clock.now = START + timedelta(seconds=MAX_STALE + 1)
    with pytest.raises(IssuerUnavailable):
        registry.resolve_key(config, kid, "RS256")


@pytest.mark.integration
@pytest.mark.parametrize("fault", ["html", "bad_json", "500", "redirect", "slow"])
def test_live_jwks_faults_keep_the_last_good_keys(
    live: tuple[DevIssuer, IssuerRegistry, IssuerConfig, Clock],
    monkeypatch: pytest.MonkeyPatch,
    fault: str,
) -> None:
    """Whatever a misbehaving JWKS endpoint answers, the last good keys keep verifying."""
    monkeypatch.setattr(broker.issuers, "FETCH_DEADLINE_SECONDS", 1.0)
    issuer, registry, config, clock = live
    token = issuer.mint()
    registry.resolve_key(config, _kid(token), "RS256")
    issuer.set_faults(jwks=fault)
    clock.advance(TTL)
    started = time.monotonic()
    assert _verifies(token, registry.resolve_key(config, _kid(token), "RS256").public_key)
    # Within the promised fetch deadline, with a margin that holds on a busy 2-core machine.
    assert time.monotonic() - started < broker.issuers.FETCH_DEADLINE_SECONDS + 5.0
    assert issuer.stats()["jwks_fetches"] == 2
