"""The [broker] table: listener and TLS, the audit store, session lifetimes and rate limits."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from broker.config import (
    LEEWAY_MAX,
    SESSION_MAX_CHAINS_LIMIT,
    SESSION_MAX_LIMIT,
    BrokerSettings,
    RateLimit,
)
from broker.config_lint.reader import Lint
from broker.loopback import is_loopback_host
from broker.storage import StoreURL

BROKER_KEYS = frozenset(
    {
        "listen",
        "tls_cert_file",
        "tls_key_file",
        "audit_store",
        "audit_key_file",
        "audit_salt_file",
        "session_max",
        "session_idle",
        "session_max_chains",
        "session_past_token_exp",
        "leeway",
        "max_body_bytes",
        "rate_limit_identity",
        "rate_limit_grant",
        "rate_limit_client_failures",
        "deny_cache_seconds",
        "denial_tally_seconds",
        "trusted_proxies",
        "plain_http_behind_proxy",
        "tls_reload_seconds",
        "single_cpu",
    }
)

_RATE_KEYS = frozenset({"per_second", "burst"})


def broker_settings(lint: Lint, t: Mapping[str, Any]) -> BrokerSettings:
    w = "broker"
    lint.keys(t, w, BROKER_KEYS)
    d = BrokerSettings()
    listen = lint.typed(t, "listen", w, str, d.listen)
    cert = lint.path(t, "tls_cert_file", w)
    key = lint.path(t, "tls_key_file", w)
    if (cert is None) != (key is None):
        lint.add(f"{w}.tls_cert_file", "tls_cert_file and tls_key_file go together")
    host = _listen_host(lint, listen, f"{w}.listen")
    behind_proxy = lint.typed(t, "plain_http_behind_proxy", w, bool, False)
    proxies = _trusted_proxies(lint, t, w)
    plain_off_loopback = host is not None and not is_loopback_host(host) and cert is None
    if plain_off_loopback and not behind_proxy:
        lint.add(
            f"{w}.listen",
            "plain HTTP only on a loopback address; set tls_cert_file and tls_key_file "
            "(or plain_http_behind_proxy = true behind a TLS-terminating proxy)",
        )
    if behind_proxy and not proxies:
        # The proxy that terminates TLS is the one whose X-Forwarded-Proto says "https".
        lint.add(f"{w}.plain_http_behind_proxy", "needs the proxy in trusted_proxies")
    if behind_proxy and cert is not None:
        lint.add(f"{w}.plain_http_behind_proxy", "the broker serves TLS itself; remove it")
    tls_reload = lint.duration(t, "tls_reload_seconds", w, d.tls_reload_seconds)
    audit_store = lint.typed(t, "audit_store", w, str, d.audit_store)
    _audit_store(lint, audit_store, f"{w}.audit_store")
    session_max = lint.duration(t, "session_max", w, d.session_max)
    if session_max > SESSION_MAX_LIMIT:
        lint.add(f"{w}.session_max", "must be at most 7d")
    session_idle = lint.duration(t, "session_idle", w, d.session_idle)
    if session_idle > session_max:
        lint.add(f"{w}.session_idle", "must not exceed session_max")
    max_chains = lint.typed(t, "session_max_chains", w, int, d.session_max_chains)
    if not 1 <= max_chains <= SESSION_MAX_CHAINS_LIMIT:
        lint.add(f"{w}.session_max_chains", f"must be 1 to {SESSION_MAX_CHAINS_LIMIT}")
    leeway = lint.duration(t, "leeway", w, d.leeway)
    if leeway > LEEWAY_MAX:
        lint.add(f"{w}.leeway", "must be at most 300s (5 minutes)")
    max_body = lint.typed(t, "max_body_bytes", w, int, d.max_body_bytes)
    if max_body < 1024:
        lint.add(f"{w}.max_body_bytes", "must be at least 1024")
    return BrokerSettings(
        listen=listen,
        tls_cert_file=cert,
        tls_key_file=key,
        audit_store=audit_store,
        audit_key_file=lint.path(t, "audit_key_file", w),
        audit_salt_file=lint.path(t, "audit_salt_file", w),
        session_max=session_max,
        session_idle=session_idle,
        session_max_chains=max_chains,
        session_past_token_exp=lint.duration(
            t, "session_past_token_exp", w, d.session_past_token_exp
        ),
        leeway=leeway,
        max_body_bytes=max_body,
        rate_limit_identity=_rate(lint, t, "rate_limit_identity", d.rate_limit_identity),
        rate_limit_grant=_rate(lint, t, "rate_limit_grant", d.rate_limit_grant),
        rate_limit_client_failures=_rate(
            lint, t, "rate_limit_client_failures", d.rate_limit_client_failures
        ),
        deny_cache_seconds=lint.duration(t, "deny_cache_seconds", w, d.deny_cache_seconds),
        denial_tally_seconds=max(
            1, lint.duration(t, "denial_tally_seconds", w, d.denial_tally_seconds)
        ),
        trusted_proxies=proxies,
        plain_http_behind_proxy=behind_proxy,
        tls_reload_seconds=tls_reload,
        single_cpu=lint.typed(t, "single_cpu", w, bool, d.single_cpu),
    )


def _trusted_proxies(lint: Lint, t: Mapping[str, Any], w: str) -> tuple[str, ...]:
    proxies = lint.str_list(t, "trusted_proxies", w)
    for proxy in proxies:
        try:
            ipaddress.ip_network(proxy, strict=False)
        except ValueError:
            # "*" (trust every peer) is refused too: it is exactly the forgery this guards.
            lint.add(
                f"{w}.trusted_proxies",
                f"{proxy!r}: expected an IP address or CIDR network of a proxy",
            )
    return proxies


def _listen_host(lint: Lint, listen: str, where: str) -> str | None:
    host, sep, port = listen.rpartition(":")  # "[::1]:8480" keeps its brackets (is_loopback_host)
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        lint.add(where, "expected host:port, e.g. 127.0.0.1:8480 or [::1]:8480")
        return None
    return host


def _audit_store(lint: Lint, url: str, where: str) -> None:
    # The store's own URL rule, so `check-config` fails what `serve` could not open.
    try:
        StoreURL.parse(url)
    except ValueError:
        lint.add(where, "expected sqlite:///absolute/path.db or postgresql://host/db")
        return
    if urlsplit(url).password:
        lint.add(where, "inline secrets are not allowed; use a libpq passfile (PGPASSFILE)")


def _rate(lint: Lint, t: Mapping[str, Any], key: str, default: RateLimit) -> RateLimit:
    where = f"broker.{key}"
    if key not in t:
        return default
    table = lint.table(t[key], where)
    if table is None:
        return default
    lint.keys(table, where, _RATE_KEYS)
    per_second = table.get("per_second", default.per_second)
    burst = lint.typed(table, "burst", where, int, default.burst)
    ok = isinstance(per_second, int | float) and not isinstance(per_second, bool)
    if not ok or per_second <= 0:
        lint.add(f"{where}.per_second", "expected a positive number")
        per_second = default.per_second
    if burst < 1:
        lint.add(f"{where}.burst", "must be at least 1")
    return RateLimit(per_second=float(per_second), burst=burst)
