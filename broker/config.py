"""The broker's policy file: TOML parsed into frozen, typed config.

Owns the schema of `broker.toml` (SPEC.md, "Policy file") and its lint. Talks to nothing but the
file system, and only in `load_config`. Every problem found is collected into one `ConfigError`
so an operator fixes the whole file in one pass.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class RegexPattern:
    """A `{ regex = "..." }` match value; always applied with `re.fullmatch`."""

    regex: str


# A match value as written: one pattern (glob string or regex), or an any-of list of patterns.
MatchValue = str | RegexPattern | tuple[str | RegexPattern, ...]


@dataclass(frozen=True)
class RateLimit:
    """Token bucket: `burst` requests at once, refilled at `per_second`."""

    per_second: float
    burst: int


@dataclass(frozen=True)
class BrokerSettings:
    listen: str = "127.0.0.1:8480"
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    audit_store: str = "sqlite:///var/lib/luigi-creds/audit.db"
    audit_key_file: Path | None = None  # Ed25519 key that signs audit checkpoints
    audit_salt_file: Path | None = None  # per-deployment HMAC salt for Vault accessors
    session_max: int = 12 * 3600  # seconds
    session_idle: int = 3600  # seconds a refresh handle may sit unused
    leeway: int = 60  # seconds of clock skew tolerated on exp/nbf/iat
    max_body_bytes: int = 64 * 1024
    rate_limit_identity: RateLimit = RateLimit(per_second=10.0, burst=50)
    rate_limit_grant: RateLimit = RateLimit(per_second=50.0, burst=200)
    deny_cache_seconds: int = 30


@dataclass(frozen=True)
class IssuerConfig:
    name: str
    url: str  # exact `iss`; discovery at <url>/.well-known/openid-configuration
    audiences: tuple[str, ...]
    algorithms: tuple[str, ...] = ("RS256",)
    jwks_file: Path | None = None  # pinned keys; no network at all for this issuer
    max_token_lifetime: int = 6 * 3600  # seconds; exp - iat above this is rejected
    require_jti: bool = True  # false: the token's sha256 is consumed instead of its jti
    jwks_cache_ttl: int = 900  # seconds before keys are refetched in the background
    jwks_refetch_cooldown: int = 60  # seconds between refetches triggered by unknown kids
    jwks_max_stale: int = 24 * 3600  # seconds cached keys serve while the issuer is down


@dataclass(frozen=True)
class AwsGrant:
    role_arn: str
    session_tags: Mapping[str, str] = field(default_factory=dict)  # values are claim templates
    source_identity: str | None = None  # claim template, e.g. "{user_login}"
    session_name: str | None = None  # claim template; default "<grant>-<request id>"


@dataclass(frozen=True)
class VaultGrant:
    secret: str | None = None  # dynamic secret path, e.g. database/creds/warehouse-writer
    token_policies: tuple[str, ...] = ()
    orphan: bool = False
    num_uses: int | None = None


@dataclass(frozen=True)
class GrantConfig:
    name: str
    issuers: tuple[str, ...]
    match: Mapping[str, MatchValue]
    ttl: int = 3600  # seconds
    aws: AwsGrant | None = None
    vault: VaultGrant | None = None
    description: str = ""


@dataclass(frozen=True)
class UpstreamAws:
    region: str = "us-east-1"
    endpoint_url: str | None = None


@dataclass(frozen=True)
class UpstreamVault:
    url: str
    auth: str  # "approle" | "token"
    role_id_file: Path | None = None
    secret_id_file: Path | None = None
    token_file: Path | None = None
    approle_mount: str = "approle"
    ca_cert: Path | None = None
    namespace: str | None = None


@dataclass(frozen=True)
class Config:
    broker: BrokerSettings
    issuers: tuple[IssuerConfig, ...]
    grants: tuple[GrantConfig, ...]
    aws: UpstreamAws = UpstreamAws()
    vault: UpstreamVault | None = None
    source: str = "<memory>"

    def issuer(self, name: str) -> IssuerConfig | None:
        return next((i for i in self.issuers if i.name == name), None)

    def grant(self, name: str) -> GrantConfig | None:
        return next((g for g in self.grants if g.name == name), None)
