"""The broker's policy file: TOML parsed into frozen, typed config.

Owns the schema of `broker.toml`, the problems a policy file can have, and the upstream limits
(STS, Vault) every other module reads from here. Pure. Reading and linting the file is
`broker.config_lint`; the secret scanner is `broker.secret_scan`; globs and regexes compile in
`broker.patterns`. Every problem found is collected into one `ConfigError` so an operator fixes
the whole file in one pass.

Forms chosen here (and documented in the README):
- durations: "900s", "15m", "1h30m", "12h", "2d", "1w" or an integer number of seconds;
- rate limits: `rate_limit_identity = { per_second = 10, burst = 50 }` (a table, never "10/s",
  because a bucket needs both numbers);
- match values: a glob string, `{ regex = "..." }`, or a list of those (any-of). In globs only
  `*` is special: it matches any run of characters except `/`; `**` crosses `/` and is allowed
  only as a whole trailing segment (`release/**`). Everything else is literal.
- TOML booleans in `match` (`ref_protected = true`) mean the strings "true"/"false", which is
  how the policy compares bool claims; TOML integers are refused (claims compare as strings).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from broker.durations import DurationError, seconds
from broker.errors import BrokerException


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
    # Refresh chains a session may hold (its first included): a client minting concurrently
    # asks for sibling chains so its mints do not queue on one rotating handle.
    session_max_chains: int = 8
    session_past_token_exp: int = 6 * 3600  # a session ends at most this long after its token's exp
    leeway: int = 60  # seconds of clock skew tolerated on exp/nbf/iat
    max_body_bytes: int = 64 * 1024
    rate_limit_identity: RateLimit = RateLimit(per_second=10.0, burst=50)
    rate_limit_grant: RateLimit = RateLimit(per_second=50.0, burst=200)
    # Requests that fail to authenticate, per client address (the audited one: see
    # trusted_proxies); past it the broker answers 429 before verifying anything.
    rate_limit_client_failures: RateLimit = RateLimit(per_second=5.0, burst=50)
    deny_cache_seconds: int = 30
    # Refusals of requests that never authenticated are counted, not recorded one by one, and
    # written as one `tallied` audit record per this many seconds (broker/denials.py).
    denial_tally_seconds: int = 60
    # Peers whose X-Forwarded-For / X-Forwarded-Proto are believed (IPs or CIDR networks). Empty:
    # forwarded headers are ignored from everyone, loopback included, so a local sidecar cannot
    # let a caller forge the audited client address.
    trusted_proxies: tuple[str, ...] = ()
    # Plain HTTP on a non-loopback address, for a TLS-terminating proxy in front (the proxy
    # must be in trusted_proxies). Off: plain HTTP is refused anywhere but loopback.
    plain_http_behind_proxy: bool = False
    # Seconds between checks of tls_cert_file/tls_key_file for a renewed pair (SIGHUP reloads
    # at once); 0 turns the file check off.
    tls_reload_seconds: int = 30
    # Run every thread on one CPU, picked at start (broker/cpu.py); false: the kernel decides.
    single_cpu: bool = True


@dataclass(frozen=True)
class IssuerConfig:
    name: str
    url: str  # exact `iss`; discovery at <url>/.well-known/openid-configuration
    audiences: tuple[str, ...]
    algorithms: tuple[str, ...] = ("RS256",)
    jwks_file: Path | None = None  # pinned keys; no network at all for this issuer
    max_token_lifetime: int = 6 * 3600  # seconds; exp - iat above this is rejected
    require_jti: bool = True  # false: the token's sha256 is consumed instead of its jti
    # Header `typ` values this issuer's tokens must carry (case-insensitive, "application/"
    # optional, RFC 8725 §3.11); empty accepts any. Keeps e.g. Okta access tokens ("at+jwt")
    # from being presented where only ID tokens are meant (cross-JWT confusion).
    token_types: tuple[str, ...] = ()
    jwks_cache_ttl: int = 900  # seconds before keys are refetched in the background
    # Seconds between refetches triggered by unknown kids. During it an unknown kid is answered
    # 503 with Retry-After (the cooldown left), so it stays within what the client waits for a
    # Retry-After (30 s): a key rotated in during a flood of junk kids is retried, not failed.
    jwks_refetch_cooldown: int = 30
    jwks_max_stale: int = 24 * 3600  # seconds cached keys serve while the issuer is down
    # Every exchange of this issuer's tokens must carry a DPoP proof (RFC 9449), so every
    # session it opens is bound to the client's key.
    require_dpop: bool = False


@dataclass(frozen=True)
class AwsGrant:
    role_arn: str
    session_tags: Mapping[str, str] = field(default_factory=dict)  # values are claim templates
    source_identity: str | None = None  # claim template, e.g. "{user_login}"
    session_name: str | None = None  # claim template; default "<grant>-<request id>"
    # An inline session policy (IAM JSON, kept as canonical JSON text) whose string values are
    # claim templates: the credentials get the intersection of the role's policy and this.
    session_policy: str | None = None
    external_id: str | None = None  # sts:ExternalId the role's trust policy may require
    transitive_tags: tuple[str, ...] = ()  # session_tags keys that survive role chaining
    region: str | None = None  # STS region for this grant (default: [upstream.aws].region)
    sts_endpoint: str | None = None  # STS endpoint URL (default: the region's)
    profile: str | None = None  # AWS profile the broker signs with (another partition's identity)

    @property
    def partition(self) -> str:
        """The role's partition, from its ARN: aws, aws-cn or aws-us-gov."""
        return self.role_arn.split(":", 2)[1] if self.role_arn.count(":") >= 2 else "aws"


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
    # Minted only on a DPoP-bound session (RFC 9449): an exchange without a proof is refused.
    require_dpop: bool = False


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
    # Token roles client tokens are created through (their allowed_policies cap every grant).
    token_role: str = "luigi-creds"
    orphan_token_role: str = "luigi-creds-orphan"


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


# ---------------------------------------------------------------------------------------------
# Problems
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the policy file: `where` names the key, `message` says why."""

    where: str  # e.g. "grant[etl-writer].aws.role_arn"
    message: str


class ConfigError(BrokerException):
    """Every problem found in one policy file; never just the first."""

    def __init__(self, problems: Iterable[Problem], source: str = "<memory>") -> None:
        self.problems: tuple[Problem, ...] = tuple(problems)
        self.source = source
        super().__init__(format_problems(self))

    def __str__(self) -> str:
        return format_problems(self)


def format_problems(err: ConfigError) -> str:
    """Render a ConfigError for an operator: one line per problem, in file order."""
    count = len(err.problems)
    noun = "problem" if count == 1 else "problems"
    lines = [f"{err.source}: {count} {noun}:"]
    lines += [f"  - {p.where}: {p.message}" for p in err.problems]
    return "\n".join(lines)


def parse_duration(value: str | int, *, where: str) -> int:
    """Parse a duration ("15m", "1h30m", "1w", int seconds); raise ConfigError if invalid."""
    try:
        return seconds(value)
    except DurationError as exc:
        raise ConfigError([Problem(where, str(exc))], source=where) from None


# ---------------------------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------------------------

# Claims that pin a tenant (who owns the pipeline), per provider. A grant must bind one of them.
TENANT_CLAIMS = frozenset(
    {
        # GitLab
        "project_id",
        "project_path",
        "namespace_id",
        "namespace_path",
        # GitHub
        "repository",
        "repository_id",
        "repository_owner",
        "repository_owner_id",
        # Bitbucket
        "workspaceUuid",
        "repositoryUuid",
        # any issuer; Okta groups
        "sub",
        "groups",
    }
)

# Claims whose values are `/`-separated paths: a regex here must not match `/` unless written.
PATH_CLAIMS = frozenset(
    {
        "ref",
        "project_path",
        "repository",
        "sub",
        "namespace_path",
        "environment",
        "job_workflow_ref",
        "workflow_ref",
    }
)

# RFC 7518 asymmetric algorithms plus RFC 8037 EdDSA; HS* would make the issuer's JWKS a secret.
ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)

# ---------------------------------------------------------------------------------------------
# Upstream limits: the one place each is written; the lint and the minters read them here.
# ---------------------------------------------------------------------------------------------

# STS AssumeRole limits: DurationSeconds 900..43200 (the role's MaxSessionDuration may lower the
# top); at most 50 session tags; tag key <= 128 characters, tag value <= 256 characters (IAM
# "Tagging AWS STS sessions"); an inline session policy of at most 2048 characters.
STS_MIN_DURATION = 900
STS_MAX_DURATION = 43200
STS_MAX_TAGS = 50
STS_TAG_KEY_MAX = 128
STS_TAG_VALUE_MAX = 256
STS_POLICY_MAX = 2048
# The characters of a session tag key or value (IAM), as a regex character-class body: the lint
# refuses keys outside it, the mint replaces claim text outside it.
STS_TAG_CHARS = "A-Za-z0-9 _.:/=+@-"
# AWS partitions and the prefix of the region names each holds.
AWS_PARTITIONS: Final = {"aws": "", "aws-cn": "cn-", "aws-us-gov": "us-gov-"}
# Vault: a grant's ttl under a minute is useless for a task and churns leases, so the lint
# refuses it. A request may still ask for less, down to VAULT_MIN_TOKEN_TTL: renewing at 2/3 of
# a 10 s lease still leaves ~3 s for the round trip.
VAULT_MIN_GRANT_TTL = 60
VAULT_MIN_TOKEN_TTL = 10
SESSION_MAX_LIMIT = 7 * 86400
LEEWAY_MAX = 300
# A session's refresh chains: enough for any job's concurrent mints, few enough to bound its rows.
SESSION_MAX_CHAINS_LIMIT = 64
