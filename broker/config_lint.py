"""Loading the policy file: TOML read, linted and built into the typed schema of broker.config.

Talks to nothing but the file system, and only in `load_config`. The linting parser walks the
raw TOML once, building the frozen config and collecting every problem, so an operator fixes the
whole file in one pass (`ConfigError`). Limits come from broker.config, the secret scan from
broker.secret_scan, glob and regex compilation from broker.patterns.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import re
import tomllib
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit

from broker.config import (
    ASYMMETRIC_ALGORITHMS,
    AWS_PARTITIONS,
    LEEWAY_MAX,
    PATH_CLAIMS,
    SESSION_MAX_LIMIT,
    STS_MAX_DURATION,
    STS_MAX_TAGS,
    STS_MIN_DURATION,
    STS_POLICY_MAX,
    STS_TAG_KEY_MAX,
    STS_TAG_VALUE_MAX,
    TENANT_CLAIMS,
    VAULT_MIN_GRANT_TTL,
    AwsGrant,
    BrokerSettings,
    Config,
    ConfigError,
    GrantConfig,
    IssuerConfig,
    MatchValue,
    Problem,
    RateLimit,
    RegexPattern,
    UpstreamAws,
    UpstreamVault,
    VaultGrant,
)
from broker.durations import DurationError, seconds
from broker.patterns import pattern_regex, regex_crosses_slash
from broker.secret_scan import SECRET_KEYS, looks_like_credential

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_ROLE_ARN = re.compile(r"arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]+")
_CLAIM_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_CASE_FOLD = re.compile(r"\(\?[aiLmsux-]*i[aiLmsux-]*[:)]")
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_TAG_KEY = re.compile(r"[A-Za-z0-9 _.:/=+@-]+")  # IAM tag key character set
_REGION = re.compile(r"[a-z]{2}(?:-gov|-iso[a-z]?)?-[a-z]+-\d")
# STS: ExternalId is 2..1224 characters of [\w+=,.@:/-]; the inline Policy at most 2048.
_EXTERNAL_ID = re.compile(r"[\w+=,.@:/-]{2,1224}", re.ASCII)

_TOP_KEYS = frozenset({"broker", "issuer", "grant", "upstream"})
_BROKER_KEYS = frozenset(
    {
        "listen",
        "tls_cert_file",
        "tls_key_file",
        "audit_store",
        "audit_key_file",
        "audit_salt_file",
        "session_max",
        "session_idle",
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
    }
)
_RATE_KEYS = frozenset({"per_second", "burst"})
_ISSUER_KEYS = frozenset(
    {
        "name",
        "url",
        "audiences",
        "algorithms",
        "jwks_file",
        "max_token_lifetime",
        "require_jti",
        "token_types",
        "jwks_cache_ttl",
        "jwks_refetch_cooldown",
        "jwks_max_stale",
        "require_dpop",
    }
)
_GRANT_KEYS = frozenset(
    {"name", "issuers", "match", "ttl", "aws", "vault", "description", "require_dpop"}
)
_AWS_GRANT_KEYS = frozenset(
    {
        "role_arn",
        "session_tags",
        "source_identity",
        "session_name",
        "session_policy",
        "external_id",
        "transitive_tags",
        "region",
        "sts_endpoint",
        "profile",
        "partition",
    }
)
_VAULT_GRANT_KEYS = frozenset({"secret", "token_policies", "orphan", "num_uses"})
_UPSTREAM_KEYS = frozenset({"aws", "vault"})
_UPSTREAM_AWS_KEYS = frozenset({"region", "endpoint_url"})
_UPSTREAM_VAULT_KEYS = frozenset(
    {
        "url",
        "auth",
        "role_id_file",
        "secret_id_file",
        "token_file",
        "token_role",
        "orphan_token_role",
        "approle_mount",
        "ca_cert",
        "namespace",
    }
)


def load_config(path: Path) -> Config:
    """Read and parse one policy file; relative `*_file` paths resolve against its directory."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([Problem("file", f"cannot read: {exc}")], source=str(path)) from None
    return parse_config(text, source=str(path), base_dir=path.parent)


def parse_config(text: str, *, source: str = "<memory>", base_dir: Path | None = None) -> Config:
    """Parse policy TOML into a Config, or raise ConfigError listing every problem found."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([Problem("toml", str(exc))], source=source) from None
    lint = _Lint(base_dir)
    config = lint.config(raw, source)
    if lint.problems:
        raise ConfigError(lint.problems, source=source)
    return config


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ---------------------------------------------------------------------------------------------
# The linting parser
# ---------------------------------------------------------------------------------------------

_T = TypeVar("_T")


class _Lint:
    """Walks the raw TOML once, building typed config and collecting every problem."""

    def __init__(self, base_dir: Path | None) -> None:
        self.base_dir = base_dir
        self.problems: list[Problem] = []

    def add(self, where: str, message: str) -> None:
        self.problems.append(Problem(where, message))

    # -- generic readers ----------------------------------------------------------------------

    def keys(self, table: Mapping[str, Any], where: str, known: frozenset[str]) -> None:
        for key in table:
            if key in known or key in SECRET_KEYS:
                continue  # secret keys are reported once by the secrets scan
            near = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            self.add(f"{where}.{key}" if where else key, f"unknown key{hint}")

    def table(self, value: object, where: str) -> Mapping[str, Any] | None:
        if value is None:
            return None
        if not isinstance(value, dict):
            self.add(where, f"expected a table, got {type(value).__name__}")
            return None
        return value

    def typed(self, t: Mapping[str, Any], key: str, where: str, kind: type[_T], default: _T) -> _T:
        if key not in t:
            return default
        value = t[key]
        # bool is an int in Python; a TOML `true` where a number belongs is a mistake.
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            self.add(f"{where}.{key}", f"expected {kind.__name__}, got {type(value).__name__}")
            return default
        return value

    def required_str(self, t: Mapping[str, Any], key: str, where: str) -> str:
        if key not in t:
            self.add(f"{where}.{key}", "required")
            return ""
        value = self.typed(t, key, where, str, "")
        if key in t and isinstance(t[key], str) and not value:
            self.add(f"{where}.{key}", "must not be empty")
        return value

    def str_list(self, t: Mapping[str, Any], key: str, where: str) -> tuple[str, ...]:
        value = t.get(key, [])
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            self.add(f"{where}.{key}", "expected a list of non-empty strings")
            return ()
        return tuple(value)

    def duration(self, t: Mapping[str, Any], key: str, where: str, default: int) -> int:
        if key not in t:
            return default
        try:
            return seconds(t[key])
        except DurationError as exc:
            self.add(f"{where}.{key}", str(exc))
            return default

    def path(self, t: Mapping[str, Any], key: str, where: str) -> Path | None:
        value = self.typed(t, key, where, str, "")
        if not value:
            return None
        p = Path(value)
        if not p.is_absolute() and self.base_dir is not None:
            p = self.base_dir / p
        return p

    def url(self, value: str, where: str) -> None:
        parts = urlsplit(value)
        if parts.scheme == "https" and parts.hostname:
            return
        if parts.scheme == "http" and parts.hostname and is_loopback(parts.hostname):
            return
        self.add(where, "must be an https:// URL (http:// only for 127.0.0.1, ::1 or localhost)")

    # -- secrets --------------------------------------------------------------------------------

    def secrets(self, node: object, where: str) -> None:
        """Refuse secret-named keys and credential-shaped strings anywhere in the file."""
        if isinstance(node, dict):
            for key, value in node.items():
                child = f"{where}.{key}" if where else key
                if key in SECRET_KEYS:
                    self.add(child, f"inline secrets are not allowed; use {key}_file")
                else:
                    self.secrets(value, child)
            return
        if isinstance(node, list):
            for index, item in enumerate(node):
                self.secrets(item, f"{where}[{index}]")
            return
        if isinstance(node, str):
            kind = looks_like_credential(node)
            if kind:
                self.add(where, f"value looks like {kind}; inline secrets are not allowed")

    def scan_secrets(self, raw: Mapping[str, Any]) -> None:
        for key, value in raw.items():
            if key in ("issuer", "grant") and isinstance(value, list):
                for index, entry in enumerate(value):
                    label = _label(key, entry, index)
                    if not isinstance(entry, dict):
                        continue
                    for k, v in entry.items():
                        if key == "grant" and k == "vault" and isinstance(v, dict):
                            # In a Vault grant `secret` names a dynamic-secret path, not a secret.
                            rest = {kk: vv for kk, vv in v.items() if kk != "secret"}
                            self.secrets(rest, f"{label}.vault")
                            if "secret" in v:
                                self.secrets(v["secret"], f"{label}.vault.secret")
                        else:
                            self.secrets({k: v}, label)
            else:
                self.secrets({key: value}, "")

    # -- sections -------------------------------------------------------------------------------

    def config(self, raw: Mapping[str, Any], source: str) -> Config:
        self.scan_secrets(raw)
        self.keys(raw, "", _TOP_KEYS)
        broker = self.broker(self.table(raw.get("broker", {}), "broker") or {})
        issuers = self.issuers(raw.get("issuer", []))
        upstream = self.table(raw.get("upstream", {}), "upstream") or {}
        self.keys(upstream, "upstream", _UPSTREAM_KEYS)
        aws = self.upstream_aws(self.table(upstream.get("aws", {}), "upstream.aws") or {})
        vault_table = self.table(upstream.get("vault"), "upstream.vault")
        vault = self.upstream_vault(vault_table) if vault_table is not None else None
        grants = self.grants(raw.get("grant", []), broker, {i.name for i in issuers})
        if vault is None and any(g.vault for g in grants):
            self.add("upstream.vault", "required: a grant mints Vault credentials")
        return Config(
            broker=broker, issuers=issuers, grants=grants, aws=aws, vault=vault, source=source
        )

    def broker(self, t: Mapping[str, Any]) -> BrokerSettings:
        w = "broker"
        self.keys(t, w, _BROKER_KEYS)
        d = BrokerSettings()
        listen = self.typed(t, "listen", w, str, d.listen)
        cert = self.path(t, "tls_cert_file", w)
        key = self.path(t, "tls_key_file", w)
        if (cert is None) != (key is None):
            self.add(f"{w}.tls_cert_file", "tls_cert_file and tls_key_file go together")
        host = self.listen_host(listen, f"{w}.listen")
        behind_proxy = self.typed(t, "plain_http_behind_proxy", w, bool, False)
        proxies = self.trusted_proxies(t, w)
        plain_off_loopback = host is not None and not is_loopback(host) and cert is None
        if plain_off_loopback and not behind_proxy:
            self.add(
                f"{w}.listen",
                "plain HTTP only on a loopback address; set tls_cert_file and tls_key_file "
                "(or plain_http_behind_proxy = true behind a TLS-terminating proxy)",
            )
        if behind_proxy and not proxies:
            # The proxy that terminates TLS is the one whose X-Forwarded-Proto says "https".
            self.add(f"{w}.plain_http_behind_proxy", "needs the proxy in trusted_proxies")
        if behind_proxy and cert is not None:
            self.add(f"{w}.plain_http_behind_proxy", "the broker serves TLS itself; remove it")
        tls_reload = self.duration(t, "tls_reload_seconds", w, d.tls_reload_seconds)
        audit_store = self.typed(t, "audit_store", w, str, d.audit_store)
        self.audit_store(audit_store, f"{w}.audit_store")
        session_max = self.duration(t, "session_max", w, d.session_max)
        if session_max > SESSION_MAX_LIMIT:
            self.add(f"{w}.session_max", "must be at most 7d")
        session_idle = self.duration(t, "session_idle", w, d.session_idle)
        if session_idle > session_max:
            self.add(f"{w}.session_idle", "must not exceed session_max")
        leeway = self.duration(t, "leeway", w, d.leeway)
        if leeway > LEEWAY_MAX:
            self.add(f"{w}.leeway", "must be at most 300s (5 minutes)")
        max_body = self.typed(t, "max_body_bytes", w, int, d.max_body_bytes)
        if max_body < 1024:
            self.add(f"{w}.max_body_bytes", "must be at least 1024")
        return BrokerSettings(
            listen=listen,
            tls_cert_file=cert,
            tls_key_file=key,
            audit_store=audit_store,
            audit_key_file=self.path(t, "audit_key_file", w),
            audit_salt_file=self.path(t, "audit_salt_file", w),
            session_max=session_max,
            session_idle=session_idle,
            session_past_token_exp=self.duration(
                t, "session_past_token_exp", w, d.session_past_token_exp
            ),
            leeway=leeway,
            max_body_bytes=max_body,
            rate_limit_identity=self.rate(t, "rate_limit_identity", d.rate_limit_identity),
            rate_limit_grant=self.rate(t, "rate_limit_grant", d.rate_limit_grant),
            rate_limit_client_failures=self.rate(
                t, "rate_limit_client_failures", d.rate_limit_client_failures
            ),
            deny_cache_seconds=self.duration(t, "deny_cache_seconds", w, d.deny_cache_seconds),
            denial_tally_seconds=max(
                1, self.duration(t, "denial_tally_seconds", w, d.denial_tally_seconds)
            ),
            trusted_proxies=proxies,
            plain_http_behind_proxy=behind_proxy,
            tls_reload_seconds=tls_reload,
        )

    def trusted_proxies(self, t: Mapping[str, Any], w: str) -> tuple[str, ...]:
        proxies = self.str_list(t, "trusted_proxies", w)
        for proxy in proxies:
            try:
                ipaddress.ip_network(proxy, strict=False)
            except ValueError:
                # "*" (trust every peer) is refused too: it is exactly the forgery this guards.
                self.add(
                    f"{w}.trusted_proxies",
                    f"{proxy!r}: expected an IP address or CIDR network of a proxy",
                )
        return proxies

    def listen_host(self, listen: str, where: str) -> str | None:
        host, sep, port = listen.rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            self.add(where, "expected host:port, e.g. 127.0.0.1:8480 or [::1]:8480")
            return None
        return host

    def audit_store(self, url: str, where: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("sqlite", "postgresql", "postgres"):
            self.add(where, "expected sqlite:///path or postgresql://host/db")
        elif parts.password:
            self.add(where, "inline secrets are not allowed; use a libpq passfile (PGPASSFILE)")

    def rate(self, t: Mapping[str, Any], key: str, default: RateLimit) -> RateLimit:
        where = f"broker.{key}"
        if key not in t:
            return default
        table = self.table(t[key], where)
        if table is None:
            return default
        self.keys(table, where, _RATE_KEYS)
        per_second = table.get("per_second", default.per_second)
        burst = self.typed(table, "burst", where, int, default.burst)
        ok = isinstance(per_second, int | float) and not isinstance(per_second, bool)
        if not ok or per_second <= 0:
            self.add(f"{where}.per_second", "expected a positive number")
            per_second = default.per_second
        if burst < 1:
            self.add(f"{where}.burst", "must be at least 1")
        return RateLimit(per_second=float(per_second), burst=burst)

    def issuers(self, value: object) -> tuple[IssuerConfig, ...]:
        if not isinstance(value, list):
            self.add("issuer", "expected [[issuer]] tables")
            return ()
        out: list[IssuerConfig] = []
        for index, entry in enumerate(value):
            w = _label("issuer", entry, index)
            t = self.table(entry, w)
            if t is None:
                continue
            self.keys(t, w, _ISSUER_KEYS)
            name = self.name(t, w)
            url = self.required_str(t, "url", w)
            if url:
                self.url(url, f"{w}.url")
            audiences = self.str_list(t, "audiences", w)
            if not audiences:
                # Vacuous case: no audience would accept every token the issuer ever signed.
                self.add(f"{w}.audiences", "must list at least one audience")
            algorithms = self.str_list(t, "algorithms", w) if "algorithms" in t else ("RS256",)
            self.algorithms(algorithms, f"{w}.algorithms")
            d = IssuerConfig(name="", url="", audiences=())
            out.append(
                IssuerConfig(
                    name=name,
                    url=url,
                    audiences=audiences,
                    algorithms=algorithms,
                    jwks_file=self.path(t, "jwks_file", w),
                    max_token_lifetime=self.duration(
                        t, "max_token_lifetime", w, d.max_token_lifetime
                    ),
                    require_jti=self.typed(t, "require_jti", w, bool, d.require_jti),
                    token_types=self.str_list(t, "token_types", w),
                    jwks_cache_ttl=self.duration(t, "jwks_cache_ttl", w, d.jwks_cache_ttl),
                    jwks_refetch_cooldown=self.duration(
                        t, "jwks_refetch_cooldown", w, d.jwks_refetch_cooldown
                    ),
                    jwks_max_stale=self.duration(t, "jwks_max_stale", w, d.jwks_max_stale),
                    require_dpop=self.typed(t, "require_dpop", w, bool, d.require_dpop),
                )
            )
        self.unique((i.name for i in out), "issuer")
        return tuple(out)

    def algorithms(self, algorithms: tuple[str, ...], where: str) -> None:
        if not algorithms:
            self.add(where, "must list at least one algorithm")
        for alg in algorithms:
            if alg.upper().startswith("HS"):
                self.add(where, f"{alg}: symmetric algorithms are not supported")
            elif alg not in ASYMMETRIC_ALGORITHMS:
                allowed = ", ".join(sorted(ASYMMETRIC_ALGORITHMS))
                self.add(where, f"{alg!r} is not supported; use one of {allowed}")

    def name(self, t: Mapping[str, Any], where: str) -> str:
        name = self.required_str(t, "name", where)
        if name and not _NAME.fullmatch(name):
            self.add(f"{where}.name", "use 1-64 of A-Z a-z 0-9 . _ -, starting alphanumeric")
        return name

    def unique(self, names: Iterable[str], kind: str) -> None:
        for name, count in Counter(names).items():
            if name and count > 1:
                self.add(f"{kind}[{name}]", f"{kind} name is used {count} times")

    def grants(
        self, value: object, broker: BrokerSettings, issuer_names: set[str]
    ) -> tuple[GrantConfig, ...]:
        if not isinstance(value, list):
            self.add("grant", "expected [[grant]] tables")
            return ()
        out: list[GrantConfig] = []
        for index, entry in enumerate(value):
            w = _label("grant", entry, index)
            t = self.table(entry, w)
            if t is not None:
                out.append(self.grant(t, w, broker, issuer_names))
        self.unique((g.name for g in out), "grant")
        return tuple(out)

    def grant(
        self, t: Mapping[str, Any], w: str, broker: BrokerSettings, issuer_names: set[str]
    ) -> GrantConfig:
        self.keys(t, w, _GRANT_KEYS)
        name = self.name(t, w)
        issuers = self.str_list(t, "issuers", w)
        if not issuers:
            self.add(f"{w}.issuers", "must name at least one configured issuer")
        for issuer in issuers:
            if issuer not in issuer_names:
                self.add(f"{w}.issuers", f"{issuer!r} is not a configured issuer")
        match = self.match(self.table(t.get("match", {}), f"{w}.match") or {}, f"{w}.match")
        ttl = self.duration(t, "ttl", w, GrantConfig(name="", issuers=(), match={}).ttl)
        aws_t = self.table(t.get("aws"), f"{w}.aws")
        vault_t = self.table(t.get("vault"), f"{w}.vault")
        if (aws_t is None) == (vault_t is None):
            self.add(w, "needs exactly one of [grant.aws] or [grant.vault]")
        aws = self.aws_grant(aws_t, f"{w}.aws") if aws_t is not None else None
        vault = self.vault_grant(vault_t, f"{w}.vault") if vault_t is not None else None
        if aws is not None and not STS_MIN_DURATION <= ttl <= STS_MAX_DURATION:
            self.add(f"{w}.ttl", "AWS STS allows 900s..43200s (15m..12h)")
        if vault is not None:
            if ttl < VAULT_MIN_GRANT_TTL:
                self.add(f"{w}.ttl", "Vault credentials need a ttl of at least 60s")
            elif ttl > broker.session_max:
                self.add(f"{w}.ttl", "must not exceed broker.session_max")
        description = self.typed(t, "description", w, str, "")
        return GrantConfig(
            name=name,
            issuers=issuers,
            match=match,
            ttl=ttl,
            aws=aws,
            vault=vault,
            description=description,
            require_dpop=self.typed(t, "require_dpop", w, bool, False),
        )

    # -- match ----------------------------------------------------------------------------------

    def match(self, t: Mapping[str, Any], where: str) -> Mapping[str, MatchValue]:
        out: dict[str, MatchValue] = {}
        binds = False
        unbound: list[str] = []
        for claim, raw in t.items():
            w = f"{where}.{claim}"
            if not _CLAIM_NAME.fullmatch(claim):
                self.add(w, "claim names are letters, digits and '_'")
                continue
            items = raw if isinstance(raw, list) else [raw]
            patterns: list[str | RegexPattern] = []
            for item in items:
                pattern = self.pattern(claim, item, w)
                if pattern is not None:
                    patterns.append(pattern)
            if isinstance(raw, list):
                if not raw:
                    self.add(w, "an empty any-of list matches nothing; remove the claim or add")
                out[claim] = tuple(patterns)
            elif patterns:
                out[claim] = patterns[0]
            if claim in TENANT_CLAIMS and patterns and len(patterns) == len(items):
                why = [w for w in (_binds_no_tenant(claim, p) for p in patterns) if w]
                binds = binds or not why
                unbound.extend(f"{claim}: {w}" for w in why)
        if not binds:
            names = ", ".join(sorted(TENANT_CLAIMS))
            detail = f" ({'; '.join(unbound)})" if unbound else ""
            self.add(
                where,
                f"no tenant-binding claim{detail}; bind one of {names} to a value whose owner "
                "segment is written out",
            )
        return MappingProxyType(out)

    def pattern(self, claim: str, item: object, where: str) -> str | RegexPattern | None:
        if isinstance(item, bool):
            return "true" if item else "false"
        if isinstance(item, int | float):
            self.add(where, f'write {item} as a string "{item}": claims compare as strings')
            return None
        if isinstance(item, dict):
            return self.regex(claim, item, where)
        if not isinstance(item, str):
            self.add(where, "expected a string, { regex = ... }, or a list of them")
            return None
        self.glob(claim, item, where)
        return item

    def glob(self, claim: str, glob: str, where: str) -> None:
        if "***" in glob:
            self.add(where, f"{glob!r}: '***' is not a glob")
            return
        segments = glob.split("/")
        for index, segment in enumerate(segments):
            if "**" not in segment:
                continue
            if segment != "**" or index != len(segments) - 1:
                self.add(where, f"{glob!r}: '**' is allowed only as a whole trailing segment")
                return
            if claim in TENANT_CLAIMS:
                self.add(where, f"{glob!r}: '**' may not cross '/' in a tenant-binding claim")
                return
        if claim in TENANT_CLAIMS and glob != "*":
            # `org/app*` would also match `org/app-evil`: a partial-name wildcard in a tenant
            # claim binds a prefix, not a tenant. Wildcards must stand for whole segments.
            for match in re.finditer(r"\*", glob):
                before = glob[match.start() - 1] if match.start() else "/"
                after = glob[match.end()] if match.end() < len(glob) else "/"
                if before not in "/:" or after not in "/:":
                    self.add(
                        where,
                        f"{glob!r}: in a tenant-binding claim '*' must stand for a whole "
                        "segment between '/' or ':' (a prefix like 'app*' also matches "
                        "'app-evil')",
                    )
                    return

    def regex(self, claim: str, t: Mapping[str, Any], where: str) -> RegexPattern | None:
        self.keys(t, where, frozenset({"regex"}))
        pattern = t.get("regex")
        if not isinstance(pattern, str) or not pattern:
            self.add(where, 'expected { regex = "..." } with a non-empty string')
            return None
        try:
            re.compile(pattern)
        except re.error as exc:
            self.add(where, f"invalid regex: {exc}")
            return None
        if claim in TENANT_CLAIMS or claim in PATH_CLAIMS:
            why = regex_crosses_slash(pattern)
            if _CASE_FOLD.search(pattern):
                # Unicode case folding lets `(?i)s` match U+017F and `(?i)k` U+212A: comparison
                # in identity claims stays byte-exact.
                why = "case-insensitive matching is not allowed; list the spellings"
            if why:
                self.add(where, f"regex {pattern!r} in a path or tenant claim: {why}")
                return None
        return RegexPattern(pattern)

    # -- grant targets --------------------------------------------------------------------------

    def aws_grant(self, t: Mapping[str, Any], w: str) -> AwsGrant:
        self.keys(t, w, _AWS_GRANT_KEYS)
        role_arn = self.required_str(t, "role_arn", w)
        if role_arn and not _ROLE_ARN.fullmatch(role_arn):
            self.add(f"{w}.role_arn", "expected arn:aws:iam::<12 digits>:role/<name>")
        tags_t = self.table(t.get("session_tags", {}), f"{w}.session_tags") or {}
        tags: dict[str, str] = {}
        if len(tags_t) > STS_MAX_TAGS:
            self.add(f"{w}.session_tags", f"STS allows at most {STS_MAX_TAGS} session tags")
        for key, value in tags_t.items():
            tw = f"{w}.session_tags.{key}"
            if len(key) > STS_TAG_KEY_MAX or not _TAG_KEY.fullmatch(key):
                self.add(tw, "tag keys are 1-128 of A-Z a-z 0-9 space _ . : / = + - @")
            elif key.lower().startswith("aws:"):
                self.add(tw, "the aws: prefix is reserved")
            if not isinstance(value, str):
                self.add(tw, 'expected a string template such as "{project_path}"')
                continue
            if len(_PLACEHOLDER.sub("", value)) > STS_TAG_VALUE_MAX:
                self.add(tw, "STS tag values are at most 256 characters")
            self.template(value, tw)
            tags[key] = value
        source_identity = self.optional_template(t, "source_identity", w)
        session_name = self.optional_template(t, "session_name", w)
        transitive = self.str_list(t, "transitive_tags", w) if "transitive_tags" in t else ()
        for key in transitive:
            if key not in tags:
                self.add(f"{w}.transitive_tags", f"{key!r} is not one of this grant's session_tags")
        external_id = self.typed(t, "external_id", w, str, "") or None
        if external_id is not None and not _EXTERNAL_ID.fullmatch(external_id):
            self.add(f"{w}.external_id", "STS takes 2-1224 characters of A-Z a-z 0-9 +=,.@:/-_")
        grant = AwsGrant(
            role_arn=role_arn,
            session_tags=MappingProxyType(tags),
            source_identity=source_identity,
            session_name=session_name,
            session_policy=self.session_policy(t, w),
            external_id=external_id,
            transitive_tags=transitive,
            region=self.typed(t, "region", w, str, "") or None,
            sts_endpoint=self.typed(t, "sts_endpoint", w, str, "") or None,
            profile=self.typed(t, "profile", w, str, "") or None,
        )
        self.aws_location(t, grant, w)
        return grant

    def aws_location(self, t: Mapping[str, Any], grant: AwsGrant, w: str) -> None:
        """Partition, region and endpoint agree: a role in aws-cn is reached in a cn- region."""
        partition = self.typed(t, "partition", w, str, "") or grant.partition
        if partition not in AWS_PARTITIONS:
            self.add(f"{w}.partition", f"expected one of {', '.join(AWS_PARTITIONS)}")
            return
        if grant.role_arn and grant.partition != partition:
            self.add(f"{w}.role_arn", f"the role's partition is not {partition!r}")
        if grant.region is not None:
            prefix = AWS_PARTITIONS[partition]
            in_partition = [
                p for p, pre in AWS_PARTITIONS.items() if pre and grant.region.startswith(pre)
            ]
            if not _REGION.fullmatch(grant.region):
                self.add(f"{w}.region", "expected a region name such as eu-west-1")
            elif (in_partition[0] if in_partition else "aws") != partition:
                where = f"a {prefix}* region" if prefix else "a region outside cn- and us-gov-"
                self.add(f"{w}.region", f"partition {partition} needs {where}")
        elif partition != "aws":
            self.add(f"{w}.region", f"required for a role in partition {partition}")
        if grant.sts_endpoint is not None:
            self.url(grant.sts_endpoint, f"{w}.sts_endpoint")

    def session_policy(self, t: Mapping[str, Any], w: str) -> str | None:
        """The inline session policy table as canonical JSON; string values may hold claim
        templates. Checked: a Statement, balanced placeholders, STS's 2048-character limit."""
        if "session_policy" not in t:
            return None
        where = f"{w}.session_policy"
        policy = self.table(t["session_policy"], where)
        if policy is None:
            return None
        if "Statement" not in policy:
            self.add(where, "an IAM policy needs a Statement")

        def walk(node: object, at: str) -> None:
            if isinstance(node, str):
                self.template(node, at)
            elif isinstance(node, dict):
                for key, value in node.items():
                    walk(value, f"{at}.{key}")
            elif isinstance(node, list):
                for i, value in enumerate(node):
                    walk(value, f"{at}[{i}]")

        walk(policy, where)
        text = json.dumps(policy, separators=(",", ":"), sort_keys=True, default=str)
        # Placeholders count at their rendered size, unknown here: checked again when minting.
        if len(_PLACEHOLDER.sub("", text)) > STS_POLICY_MAX:
            self.add(
                where, f"STS takes an inline session policy of at most {STS_POLICY_MAX} characters"
            )
        return text

    def optional_template(self, t: Mapping[str, Any], key: str, w: str) -> str | None:
        value = self.typed(t, key, w, str, "")
        if key in t and isinstance(t[key], str):
            self.template(value, f"{w}.{key}")
            return value
        return None

    def template(self, value: str, where: str) -> None:
        for placeholder in _PLACEHOLDER.findall(value):
            if not _CLAIM_NAME.fullmatch(placeholder):
                self.add(where, f"{{{placeholder}}}: placeholders are {{claim_name}} only")
        if "{" in _PLACEHOLDER.sub("", value) or "}" in _PLACEHOLDER.sub("", value):
            self.add(where, "unbalanced '{' or '}'; placeholders are {claim_name} only")

    def vault_grant(self, t: Mapping[str, Any], w: str) -> VaultGrant:
        self.keys(t, w, _VAULT_GRANT_KEYS)
        secret = self.typed(t, "secret", w, str, "") or None
        policies = self.str_list(t, "token_policies", w) if "token_policies" in t else ()
        if (secret is None) == (not policies):
            self.add(w, "needs exactly one of secret or token_policies")
        if "root" in policies:
            self.add(f"{w}.token_policies", "the root policy is never issued")
        num_uses = self.typed(t, "num_uses", w, int, 0) if "num_uses" in t else None
        if num_uses is not None and num_uses < 1:
            self.add(f"{w}.num_uses", "must be at least 1 (omit it for unlimited uses)")
        return VaultGrant(
            secret=secret,
            token_policies=policies,
            orphan=self.typed(t, "orphan", w, bool, False),
            num_uses=num_uses,
        )

    # -- upstreams ------------------------------------------------------------------------------

    def upstream_aws(self, t: Mapping[str, Any]) -> UpstreamAws:
        w = "upstream.aws"
        self.keys(t, w, _UPSTREAM_AWS_KEYS)
        endpoint = self.typed(t, "endpoint_url", w, str, "") or None
        if endpoint:
            self.url(endpoint, f"{w}.endpoint_url")
        return UpstreamAws(
            region=self.typed(t, "region", w, str, UpstreamAws().region), endpoint_url=endpoint
        )

    def upstream_vault(self, t: Mapping[str, Any]) -> UpstreamVault:
        w = "upstream.vault"
        self.keys(t, w, _UPSTREAM_VAULT_KEYS)
        url = self.required_str(t, "url", w)
        if url:
            self.url(url, f"{w}.url")
        auth = self.required_str(t, "auth", w)
        role_id_file = self.path(t, "role_id_file", w)
        secret_id_file = self.path(t, "secret_id_file", w)
        token_file = self.path(t, "token_file", w)
        if auth == "approle":
            if role_id_file is None or secret_id_file is None:
                self.add(w, 'auth = "approle" needs role_id_file and secret_id_file')
        elif auth == "token":
            if token_file is None:
                self.add(w, 'auth = "token" needs token_file')
        elif auth:
            self.add(f"{w}.auth", 'expected "approle" or "token"')
        namespace = self.typed(t, "namespace", w, str, "") or None
        return UpstreamVault(
            url=url,
            auth=auth,
            role_id_file=role_id_file,
            secret_id_file=secret_id_file,
            token_file=token_file,
            approle_mount=self.typed(t, "approle_mount", w, str, "approle"),
            token_role=self.typed(t, "token_role", w, str, UpstreamVault.token_role),
            orphan_token_role=self.typed(
                t, "orphan_token_role", w, str, UpstreamVault.orphan_token_role
            ),
            ca_cert=self.path(t, "ca_cert", w),
            namespace=namespace,
        )


def _label(kind: str, entry: object, index: int) -> str:
    name = entry.get("name") if isinstance(entry, dict) else None
    return f"{kind}[{name}]" if isinstance(name, str) and name else f"{kind}[{index}]"


# Probe values a tenant binding must not accept all of, one family per shape of value, every
# segment attacker-chosen: a pattern that fullmatches a whole family binds nothing (`*`, `.*`,
# `*/*`, `[^/]+/[^/]+`, ...). Families of one shape, because `*/*` matches no one-segment value
# yet every repository.
_PROBE_FAMILIES: Final = (
    ("x", "evil", "attacker"),
    ("1", "123456789", "987654321"),
    ("{00000000-0000-0000-0000-000000000000}", "{ffffffff-ffff-ffff-ffff-ffffffffffff}"),
    ("attacker/x", "evil/evil", "x/y"),
    ("attacker/x/y", "evil/evil/evil", "x/y/z"),
    ("attacker:x", "evil:evil", "x:y"),
    ("repo:attacker/x:ref:refs/heads/main", "repo:evil/y:ref:refs/heads/x"),
    ("repo:attacker/x:environment:prod", "repo:evil/y:environment:x"),
    ("repo:attacker/x:pull_request", "repo:evil/y:pull_request"),
    (
        "project_path:attacker/x:ref_type:branch:ref:main",
        "project_path:evil/y/z:ref_type:tag:ref:x",
    ),
)

# `sub` values are `field:value[:field:value...]` (GitHub `repo:owner/name:...`, GitLab
# `project_path:group/project:...`, custom GitHub sub templates): when the first `:` segment is
# one of these field names, the owner is the first `/` segment of the value after it.
_SUB_FIELDS: Final = frozenset(
    {
        "repo",
        "project_path",
        "namespace_path",
        "repository",
        "repository_owner",
        "repository_owner_id",
        "repository_id",
        "project_id",
        "namespace_id",
        "workspace",
    }
)


def _owner_segment(claim: str, glob: str) -> str:
    """The part of a tenant-claim glob that names the owner: the first `/` segment of the value
    (`octo` in `octo/app`; `octo` in sub `repo:octo/app:ref:...`)."""
    value = glob
    if claim == "sub":
        field, sep, rest = glob.partition(":")
        if sep and field in _SUB_FIELDS:
            value = rest.partition(":")[0]
    return value.partition("/")[0]


def _binds_no_tenant(claim: str, pattern: str | RegexPattern) -> str | None:
    """Why `pattern` in tenant claim `claim` binds no tenant, or None when it binds one.

    A glob binds a tenant only when its owner segment is written out: a wildcard there (`*/*`,
    `*/app`, sub `repo:*/app:*`) matches an owner anyone can create. A regex cannot be read
    segment by segment, so it is run against probe values of every shape (see _PROBE_FAMILIES);
    one matching a whole family binds nothing.
    """
    if isinstance(pattern, str) and "*" in _owner_segment(claim, pattern):
        return f"{pattern!r} has a wildcard where the owner is named"
    regex = pattern_regex(pattern)
    try:
        compiled = re.compile(regex)
    except re.error:
        return None
    for family in _PROBE_FAMILIES:
        if all(compiled.fullmatch(probe) for probe in family):
            return f"{_shown(pattern)} matches every value shaped like {family[0]!r}"
    return None


def _shown(pattern: str | RegexPattern) -> str:
    return repr(pattern) if isinstance(pattern, str) else f"regex {pattern.regex!r}"
