"""Policy file loader and lint: every problem is collected, named by where, with why."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import MappingProxyType

import pytest

from broker.audit import cli as audit_cli
from broker.config import (
    ConfigError,
    Problem,
    RateLimit,
    RegexPattern,
    format_problems,
    parse_duration,
)
from broker.config_lint import load_config, parse_config

ROOT = Path(__file__).resolve().parent.parent

ISSUERS = """
[[issuer]]
name = "gitlab"
url = "https://gitlab.com"
audiences = ["https://broker.example.com"]

[[issuer]]
name = "okta"
url = "https://acme.okta.com/oauth2/default"
audiences = ["api://luigi-creds"]
"""

VAULT = """
[upstream.vault]
url = "http://127.0.0.1:8200"
auth = "token"
token_file = "vault-token"
"""

ROLE = 'role_arn = "arn:aws:iam::123456789012:role/r"'


def grant(match: str, *, target: str = f"[grant.aws]\n{ROLE}", extra: str = "") -> str:
    """One [[grant]] named g for gitlab with the given match body and target."""
    return f"""
[[grant]]
name = "g"
issuers = ["gitlab"]
{extra}
[grant.match]
{match}
{target}
"""


def problems(text: str) -> list[Problem]:
    with pytest.raises(ConfigError) as info:
        parse_config(ISSUERS + VAULT + text, source="broker.toml")
    return list(info.value.problems)


def has(found: list[Problem], where: str, fragment: str) -> bool:
    return any(p.where == where and fragment in p.message for p in found)


def test_example_policy_loads_clean() -> None:
    """examples/broker.toml, which uses every feature, loads without a problem."""
    config = load_config(ROOT / "examples" / "broker.toml")
    assert config.source.endswith("broker.toml")
    assert config.broker.session_max == 12 * 3600
    assert config.broker.rate_limit_identity == RateLimit(per_second=10.0, burst=50)
    etl = config.grant("etl-writer")
    assert etl is not None
    assert etl.ttl == 900
    assert etl.match["ref"] == ("main", "release/*")
    assert etl.match["ref_protected"] == "true"
    assert isinstance(etl.match, MappingProxyType)
    release = config.grant("gh-release")
    assert release is not None
    assert isinstance(release.match["ref"], RegexPattern)
    assert config.vault is not None
    assert config.vault.secret_id_file == ROOT / "examples" / "keys" / "vault-secret-id"
    assert {g.name for g in config.grants if g.vault} == {"warehouse-load", "etl-vault"}
    lake = config.grant("etl-project-lake")
    assert lake is not None and lake.aws is not None and lake.aws.session_policy is not None
    assert lake.aws.transitive_tags == ("project",)
    cn = config.grant("etl-cn-writer")
    assert cn is not None and cn.aws is not None and cn.aws.partition == "aws-cn"


def test_minimal_policy_loads_with_defaults() -> None:
    """A grant with only a binding claim and a role gets the documented defaults."""
    config = parse_config(ISSUERS + grant('project_id = "1"'))
    assert config.broker.listen == "127.0.0.1:8480"
    assert config.grants[0].ttl == 3600
    assert config.issuers[0].algorithms == ("RS256",)
    assert config.vault is None


def test_relative_files_resolve_against_the_policy_file(tmp_path: Path) -> None:
    """load_config resolves relative *_file paths against the file's directory."""
    path = tmp_path / "conf" / "broker.toml"
    path.parent.mkdir()
    path.write_text(ISSUERS + VAULT + grant('project_id = "1"'), encoding="utf-8")
    config = load_config(path)
    assert config.vault is not None
    assert config.vault.token_file == tmp_path / "conf" / "vault-token"


def test_many_problems_are_all_reported() -> None:
    """A file with many mistakes reports every one of them in one error, in file order."""
    text = """
[broker]
listen = "0.0.0.0:8480"
sesion_max = "12h"
leeway = "10m"

[[issuer]]
name = "gitlab"
url = "http://gitlab.com"
audiences = []
algorithms = ["HS256"]

[[grant]]
name = "etl"
issuers = ["gitlab", "github"]
ttl = "5m"
[grant.match]
ref = "main"
[grant.aws]
role_arn = "arn:aws:iam::1234:role/etl"

[[grant]]
name = "etl"
issuers = ["gitlab"]
[grant.match]
project_id = 55235664
[grant.vault]
token_policies = ["root"]
"""
    with pytest.raises(ConfigError) as info:
        parse_config(text, source="broker.toml")
    found = info.value.problems
    expected = [
        ("broker.sesion_max", "did you mean 'session_max'?"),
        ("broker.listen", "plain HTTP only on a loopback address"),
        ("broker.leeway", "at most 300s"),
        ("issuer[gitlab].url", "must be an https:// URL"),
        ("issuer[gitlab].audiences", "at least one audience"),
        ("issuer[gitlab].algorithms", "symmetric algorithms are not supported"),
        ("grant[etl].issuers", "'github' is not a configured issuer"),
        ("grant[etl].match", "no tenant-binding claim"),
        ("grant[etl].ttl", "900s..43200s"),
        ("grant[etl].aws.role_arn", "arn:aws:iam::<12 digits>"),
        ("grant[etl].match.project_id", 'write 55235664 as a string "55235664"'),
        ("grant[etl].vault.token_policies", "root policy"),
        ("grant[etl]", "grant name is used 2 times"),
        ("upstream.vault", "required: a grant mints Vault credentials"),
    ]
    for where, fragment in expected:
        assert has(list(found), where, fragment), (where, fragment, found)
    assert len(found) >= len(expected)
    text_out = str(info.value)
    assert text_out.startswith(f"broker.toml: {len(found)} problems:\n  - ")
    assert format_problems(info.value) == text_out


def test_unknown_keys_suggest_the_closest_key() -> None:
    """Unknown keys at every level are refused, with the nearest known key suggested."""
    found = problems(
        grant(
            'project_id = { regexp = "1" }',
            target=f"[grant.aws]\n{ROLE}\nsession_tag = {{}}",
            extra='tll = "15m"',
        )
        + '\n[upstream.aws]\nregon = "eu-west-1"\n[upsteam]\n'
    )
    assert has(found, "grant[g].tll", "did you mean 'ttl'?")
    assert has(found, "grant[g].aws.session_tag", "did you mean 'session_tags'?")
    assert has(found, "grant[g].match.project_id.regexp", "did you mean 'regex'?")
    assert has(found, "upstream.aws.regon", "did you mean 'region'?")
    assert has(found, "upsteam", "did you mean 'upstream'?")


def test_inline_secret_keys_are_refused_everywhere() -> None:
    """Secret-named keys anywhere in the file point to their *_file form."""
    text = grant('project_id = "1"').replace(ROLE, f'{ROLE}\nsecret_access_key = "x"')
    found = problems(text + '\n[broker]\npassword = "hunter2"\n')
    with pytest.raises(ConfigError) as info:
        parse_config(
            ISSUERS
            + grant('project_id = "1"')
            + '\n[upstream.vault]\nurl = "https://vault"\nauth = "approle"\nrole_id = "r"\n'
            'secret_id = "s"\n'
        )
    found += info.value.problems
    assert has(found, "grant[g].aws.secret_access_key", "use secret_access_key_file")
    assert has(found, "broker.password", "inline secrets are not allowed; use password_file")
    assert has(found, "upstream.vault.secret_id", "use secret_id_file")
    assert has(found, "upstream.vault.role_id", "use role_id_file")


def test_vault_secret_path_is_not_mistaken_for_a_secret() -> None:
    """In [grant.vault], `secret` names a dynamic-secret path and is allowed."""
    config = parse_config(
        ISSUERS + VAULT + grant('groups = "dba"', target='[grant.vault]\nsecret = "db/creds/x"')
    )
    assert config.grants[0].vault is not None
    assert config.grants[0].vault.secret == "db/creds/x"


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        ("AKIA" + "Q" * 16, "an AWS access key id"),
        ("ASIA" + "7" * 16, "an AWS access key id"),
        ("hvs." + "A1b2" * 6, "a Vault token"),
        ("s." + "a1B2" * 6, "a Vault token"),
        ("-----BEGIN " + "PRIVATE KEY-----", "a PEM key"),
        (secrets.token_urlsafe(32), "a high-entropy secret"),
    ],
)
def test_credential_shaped_values_are_refused(value: str, kind: str) -> None:
    """A string that looks like a credential is refused whatever key holds it."""
    found = problems(grant('project_id = "1"', extra=f'description = "x {value}"'))
    assert has(found, "grant[g].description", f"value looks like {kind}")


def test_url_paths_are_identifiers_but_url_passwords_are_secrets() -> None:
    """An EKS-style issuer URL ending in a hex cluster id loads; a password in a URL does not."""
    eks = "https://oidc.eks.eu-west-1.amazonaws.com/id/9F3E1C0B7A2D4E6F8A1B3C5D7E9F0A2B"
    config = parse_config(
        ISSUERS + VAULT + grant('project_id = "1"', extra=f'description = "{eks}"')
    )
    assert config.grants[0].description == eks
    leaked = f"https://user:{secrets.token_urlsafe(32)}@example.com/"
    found = problems(grant('project_id = "1"', extra=f'description = "{leaked}"'))
    assert has(found, "grant[g].description", "value looks like a high-entropy secret")


@pytest.mark.parametrize(
    "url", ["http://[127.0.0.1]:8080", "https://[not-an-ip]/", "https://[::1/"]
)
def test_a_url_that_does_not_parse_is_a_problem_not_a_crash(url: str) -> None:
    """urlsplit raises on these: the lint reports the URL instead of failing with a traceback."""
    text = f'[[issuer]]\nname = "idp"\nurl = "{url}"\naudiences = ["luigi-creds"]\n'
    assert has(problems(text), "issuer[idp].url", "must be an https:// URL")


def test_audit_store_password_is_refused() -> None:
    """A password inside the audit store URL is an inline secret."""
    found = problems(
        grant('project_id = "1"') + '\n[broker]\naudit_store = "postgresql://u:pw@db/audit"\n'
    )
    assert has(found, "broker.audit_store", "inline secrets are not allowed")


@pytest.mark.parametrize("store", ["sqlite://relative.db", "sqlite:relative.db", "mysql://h/db"])
def test_an_audit_store_url_the_store_would_refuse_is_a_problem(store: str) -> None:
    """The lint applies storage's own URL rule: what `serve` could not open fails the check."""
    found = problems(grant('project_id = "1"') + f'\n[broker]\naudit_store = "{store}"\n')
    assert has(found, "broker.audit_store", "sqlite:///")


@pytest.mark.parametrize(
    "match",
    [
        'ref = "main"',
        'project_id = "*"',
        'repository = "*"\nref = "main"',
        'project_id = ["55235664", "*"]',
        'groups = { regex = "[^/]*" }',
        'sub = { regex = "[^/]+" }',
        "project_id = []",
    ],
)
def test_grant_without_tenant_binding_is_refused(match: str) -> None:
    """A grant must bind a tenant claim to something narrower than everything."""
    assert has(problems(grant(match)), "grant[g].match", "no tenant-binding claim")


@pytest.mark.parametrize(
    ("match", "fragment"),
    [
        ('project_path = "data/**"', "'**' may not cross '/' in a tenant-binding claim"),
        ('project_id = "1"\nref = "release/**/x"', "whole trailing segment"),
        ('project_id = "1"\nref = "release**"', "whole trailing segment"),
        ('project_id = "1"\nref = "**/main"', "whole trailing segment"),
        ('project_id = "1"\nref = "***"', "'***' is not a glob"),
        ('repository = "acme/etl*"', "must stand for a whole segment"),
        ('sub = "repo:acme/app*"', "must stand for a whole segment"),
    ],
)
def test_globs_that_cross_or_widen_are_refused(match: str, fragment: str) -> None:
    """`**` only as a whole trailing segment, never in tenant claims; no partial-name `*`."""
    found = problems(grant(match))
    assert any(fragment in p.message and p.where.startswith("grant[g].match.") for p in found)


def test_accepted_globs() -> None:
    """Whole-segment globs and trailing `**` on a non-tenant claim load."""
    config = parse_config(
        ISSUERS
        + grant('repository = "acme/*"\nsub = "repo:acme/*:ref:*"\nref = "refs/heads/feature/**"')
    )
    assert config.grants[0].match["ref"] == "refs/heads/feature/**"


@pytest.mark.parametrize(
    ("pattern", "fragment"),
    [
        ("refs/heads/.*", "unescaped '.'"),
        ("refs/heads/\\\\S+", "'\\S' can match '/'"),
        ("refs/heads/\\\\W+", "'\\W' can match '/'"),
        ("refs/heads/[^a]+", "negated class without '/'"),
        ("refs/heads/[!-~]+", "range '!-~' includes '/'"),
        ("refs\\\\x2fheads", "numeric character escapes"),
        ("refs/heads/(", "invalid regex"),
        ("(?i)refs/heads/main", "case-insensitive"),
        ("refs/heads/(?i:main)", "case-insensitive"),
    ],
)
def test_regexes_that_can_match_slash_are_refused(pattern: str, fragment: str) -> None:
    """In path claims, a regex must not match `/` unless written literally; bad regex refused."""
    found = problems(grant(f'project_id = "1"\nref = {{ regex = "{pattern}" }}'))
    assert any(p.where == "grant[g].match.ref" and fragment in p.message for p in found), found


def test_safe_regexes_load() -> None:
    """Escaped dots, `[^/]` classes and `.` in non-path claims are accepted."""
    config = parse_config(
        ISSUERS
        + grant(
            'project_id = "1"\n'
            'ref = { regex = "refs/tags/v[0-9]+\\\\.[0-9]+/[^/]+" }\n'
            'pipeline_source = { regex = "push|web.*" }'
        )
    )
    assert config.grants[0].match["ref"] == RegexPattern("refs/tags/v[0-9]+\\.[0-9]+/[^/]+")


@pytest.mark.parametrize(
    ("body", "where", "fragment"),
    [
        ('ttl = "5m"', "grant[g].ttl", "900s..43200s"),
        ('ttl = "13h"', "grant[g].ttl", "900s..43200s"),
        ('ttl = "15 minutes"', "grant[g].ttl", "is not a duration"),
        ('ttl = "1.5h"', "grant[g].ttl", "is not a duration"),
        ("ttl = true", "grant[g].ttl", "got a bool"),
        ("ttl = -5", "grant[g].ttl", "cannot be negative"),
    ],
)
def test_aws_ttl_range(body: str, where: str, fragment: str) -> None:
    """AWS grant TTLs must parse and fall within STS's 900..43200 seconds."""
    assert has(problems(grant('project_id = "1"', extra=body)), where, fragment)


@pytest.mark.parametrize("value", ["0", "65"])
def test_session_max_chains_out_of_range_is_refused(value: str) -> None:
    """[broker] session_max_chains: 1 to 64 refresh chains per session (default 8)."""
    found = problems(grant('project_id = "1"') + f"\n[broker]\nsession_max_chains = {value}\n")
    assert has(found, "broker.session_max_chains", "must be 1 to 64")
    text = ISSUERS + VAULT + grant('project_id = "1"')
    assert parse_config(text, source="b.toml").broker.session_max_chains == 8
    chosen = parse_config(text + "\n[broker]\nsession_max_chains = 64\n", source="b.toml")
    assert chosen.broker.session_max_chains == 64


def test_vault_and_broker_duration_limits() -> None:
    """Vault TTLs need >= 60 s and <= session_max; session_max <= 7d; leeway <= 300 s."""
    found = problems(
        grant('project_id = "1"', target='[grant.vault]\nsecret = "db/x"', extra='ttl = "30s"')
        + '\n[broker]\nsession_max = "8d"\nleeway = "301s"\nsession_idle = "9d"\n'
    )
    assert has(found, "grant[g].ttl", "at least 60s")
    assert has(found, "broker.session_max", "at most 7d")
    assert has(found, "broker.leeway", "at most 300s")
    assert has(found, "broker.session_idle", "must not exceed session_max")
    over = problems(
        grant('project_id = "1"', target='[grant.vault]\nsecret = "db/x"', extra='ttl = "2h"')
        + '\n[broker]\nsession_max = "1h"\n'
    )
    assert has(over, "grant[g].ttl", "must not exceed broker.session_max")


def test_grant_structure() -> None:
    """Grants need issuers, exactly one target, and a Vault grant exactly one kind."""
    neither = problems(grant('project_id = "1"', target=""))
    both = problems(
        grant('project_id = "1"', target=f'[grant.aws]\n{ROLE}\n[grant.vault]\nsecret = "x"')
    )
    vault_both = problems(
        grant('project_id = "1"', target='[grant.vault]\nsecret = "x"\ntoken_policies = ["p"]')
    )
    vault_none = problems(grant('project_id = "1"', target="[grant.vault]\norphan = true"))
    no_issuers = problems(grant('project_id = "1"').replace('issuers = ["gitlab"]', "issuers = []"))
    assert has(neither, "grant[g]", "exactly one of [grant.aws] or [grant.vault]")
    assert has(both, "grant[g]", "exactly one of [grant.aws] or [grant.vault]")
    assert has(vault_both, "grant[g].vault", "exactly one of secret or token_policies")
    assert has(vault_none, "grant[g].vault", "exactly one of secret or token_policies")
    assert has(no_issuers, "grant[g].issuers", "at least one configured issuer")


def test_duplicate_issuer_names() -> None:
    """Issuer names are unique."""
    found = problems(ISSUERS + grant('project_id = "1"'))
    assert has(found, "issuer[gitlab]", "issuer name is used 2 times")


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("https://gitlab.example.com", True),
        ("http://127.0.0.1:9000", True),
        ("http://[::1]:9000", True),
        ("http://localhost:9000", True),
        ("http://gitlab.example.com", False),
        ("ftp://gitlab.example.com", False),
        ("https://", False),
    ],
)
def test_issuer_url_scheme(url: str, ok: bool) -> None:
    """Issuer URLs are https, or http only on loopback hosts."""
    text = f'[[issuer]]\nname = "x"\nurl = "{url}"\naudiences = ["a"]\n'
    text += grant('project_id = "1"').replace('"gitlab"', '"x"')
    if ok:
        assert parse_config(text).issuers[0].url == url
    else:
        with pytest.raises(ConfigError) as info:
            parse_config(text)
        assert has(list(info.value.problems), "issuer[x].url", "https://")


def test_algorithms() -> None:
    """Algorithms must be a non-empty subset of the asymmetric JOSE algorithms."""
    text = (
        '[[issuer]]\nname = "x"\nurl = "https://x"\naudiences = ["a"]\n'
        'algorithms = ["HS512", "none", "ES256"]\n'
        '[[issuer]]\nname = "y"\nurl = "https://y"\naudiences = ["a"]\nalgorithms = []\n'
    )
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    found = list(info.value.problems)
    assert has(found, "issuer[x].algorithms", "HS512: symmetric algorithms are not supported")
    assert has(found, "issuer[x].algorithms", "'none' is not supported")
    assert has(found, "issuer[y].algorithms", "at least one algorithm")


@pytest.mark.parametrize(
    ("target", "where", "fragment"),
    [
        ('source_identity = "{{ .sub }}"', "grant[g].aws.source_identity", "placeholders"),
        ('session_name = "ci-{user-login}"', "grant[g].aws.session_name", "placeholders"),
        ('session_name = "ci-{user_login"', "grant[g].aws.session_name", "unbalanced"),
        (
            'role_arn = "arn:aws:iam::123456789012:user/r"',
            "grant[g].aws.role_arn",
            "expected arn:aws:iam",
        ),
        ('session_tags = { "aws:x" = "y" }', "grant[g].aws.session_tags.aws:x", "reserved"),
        (
            "session_tags = { " + "k" * 129 + ' = "v" }',
            "grant[g].aws.session_tags." + "k" * 129,
            "1-128",
        ),
        (
            "session_tags = { " + ", ".join(f't{i} = "v"' for i in range(51)) + " }",
            "grant[g].aws.session_tags",
            "at most 50 session tags",
        ),
    ],
)
def test_aws_target_lint(target: str, where: str, fragment: str) -> None:
    """Role ARNs, claim templates and session tags are checked against STS limits."""
    text = grant('project_id = "1"', target=f"[grant.aws]\n{target}")
    if "role_arn" not in target:
        text = text.replace("[grant.aws]\n", f"[grant.aws]\n{ROLE}\n")
    assert has(problems(text), where, fragment)


def test_upstream_vault_auth() -> None:
    """AppRole auth needs both id files; token auth needs token_file; others are refused."""
    base = grant('project_id = "1"')

    def vault_problems(body: str) -> list[Problem]:
        with pytest.raises(ConfigError) as info:
            parse_config(ISSUERS + base + f'\n[upstream.vault]\nurl = "https://v"\n{body}\n')
        return list(info.value.problems)

    assert has(
        vault_problems('auth = "approle"\nrole_id_file = "r"'),
        "upstream.vault",
        "needs role_id_file and secret_id_file",
    )
    assert has(vault_problems('auth = "token"'), "upstream.vault", "needs token_file")
    assert has(vault_problems('auth = "userpass"'), "upstream.vault.auth", "expected")


@pytest.mark.parametrize(
    ("broker", "ok"),
    [
        ('listen = "127.0.0.1:8480"', True),
        ('listen = "[::1]:8480"', True),
        ('listen = "localhost:8480"', True),
        ('listen = "0.0.0.0:8443"', False),
        ('listen = "0.0.0.0:8443"\ntls_cert_file = "c.pem"\ntls_key_file = "k.pem"', True),
        ('listen = "0.0.0.0:8443"\ntls_cert_file = "c.pem"', False),
        ('listen = "8480"', False),
        # Behind a TLS-terminating proxy, and only naming it.
        (
            'listen = "0.0.0.0:8480"\nplain_http_behind_proxy = true\n'
            'trusted_proxies = ["10.0.0.0/8"]',
            True,
        ),
        ('listen = "0.0.0.0:8480"\nplain_http_behind_proxy = true', False),
        (
            'listen = "0.0.0.0:8443"\ntls_cert_file = "c.pem"\ntls_key_file = "k.pem"\n'
            'plain_http_behind_proxy = true\ntrusted_proxies = ["10.0.0.0/8"]',
            False,
        ),
    ],
)
def test_listen_requires_tls_off_loopback(broker: str, ok: bool) -> None:
    """Plain HTTP listens only on loopback unless both TLS files are set."""
    text = ISSUERS + grant('project_id = "1"') + f"\n[broker]\n{broker}\n"
    if ok:
        parse_config(text)
    else:
        with pytest.raises(ConfigError) as info:
            parse_config(text)
        assert any(p.where.startswith("broker.") for p in info.value.problems)


def test_rate_limit_table_form() -> None:
    """Rate limits are { per_second, burst } tables; other shapes are refused."""
    config = parse_config(
        ISSUERS
        + grant('project_id = "1"')
        + "\n[broker]\nrate_limit_grant = { per_second = 2.5, burst = 5 }\n"
    )
    assert config.broker.rate_limit_grant == RateLimit(per_second=2.5, burst=5)
    found = problems(
        grant('project_id = "1"')
        + '\n[broker]\nrate_limit_identity = "10/s"\n'
        + "rate_limit_grant = { per_second = 0, burst = 0 }\n"
    )
    assert has(found, "broker.rate_limit_identity", "expected a table")
    assert has(found, "broker.rate_limit_grant.per_second", "positive number")
    assert has(found, "broker.rate_limit_grant.burst", "at least 1")


def test_toml_syntax_error_is_one_problem() -> None:
    """A file that is not TOML fails with a single problem naming the position."""
    with pytest.raises(ConfigError) as info:
        parse_config("[broker\n", source="b.toml")
    assert len(info.value.problems) == 1
    assert str(info.value).startswith("b.toml: 1 problem:\n  - toml: ")


def test_unreadable_file(tmp_path: Path) -> None:
    """load_config reports a missing file as a ConfigError, not an OSError."""
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "missing.toml")
    assert info.value.problems[0].where == "file"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("15m", 900),
        ("12h", 43200),
        ("900s", 900),
        ("1h30m", 5400),
        ("2d", 172800),
        ("1d2h3m4s", 93784),
        ("1w", 604800),
        ("2w1d", 1296000),
        (3600, 3600),
        ("0s", 0),
    ],
)
def test_parse_duration(value: str | int, expected: int) -> None:
    """Durations parse from unit strings or integer seconds."""
    assert parse_duration(value, where="x") == expected


@pytest.mark.parametrize(
    "value", ["", "15", "m", "1m1h", "1.5h", " 15m", "15M", "-5s", "1d1w", "1W"]
)
def test_parse_duration_rejects(value: str) -> None:
    """Malformed durations raise a ConfigError naming where."""
    with pytest.raises(ConfigError) as info:
        parse_duration(value, where="grant[g].ttl")
    assert info.value.problems[0].where == "grant[g].ttl"


@pytest.mark.parametrize(("text", "days"), [("7d", 7), ("2w", 14), ("1w3d", 10)])
def test_audit_cli_spans_use_the_policy_files_grammar(text: str, days: int) -> None:
    """`--since`/`--before` read durations with the same parser as the policy file."""
    now = datetime(2026, 12, 1, tzinfo=UTC)
    assert audit_cli._when(text, now) == now - timedelta(days=days)
    assert parse_duration(text, where="x") == days * 86400


@pytest.mark.parametrize("text", ["7x", "1d1w", "soon", ""])
def test_audit_cli_refuses_what_the_policy_file_refuses(text: str) -> None:
    with pytest.raises(audit_cli.UsageError, match="not a date or duration"):
        audit_cli._when(text, datetime(2026, 12, 1, tzinfo=UTC))


def test_require_dpop_on_grants_and_issuers() -> None:
    """`require_dpop` is a boolean on a grant and on an issuer; off unless set."""
    issuers = ISSUERS.replace(
        'audiences = ["api://luigi-creds"]',
        'audiences = ["api://luigi-creds"]\nrequire_dpop = true',
    )
    config = parse_config(issuers + grant('project_id = "1"', extra="require_dpop = true"))
    assert config.grants[0].require_dpop
    assert [i.require_dpop for i in config.issuers] == [False, True]
    assert not parse_config(ISSUERS + grant('project_id = "1"')).grants[0].require_dpop
    found = problems(ISSUERS + grant('project_id = "1"', extra='require_dpop = "yes"'))
    assert has(found, "grant[g].require_dpop", "")


def test_tls_reload_seconds_is_a_duration() -> None:
    text = ISSUERS + grant('project_id = "1"') + '\n[broker]\ntls_reload_seconds = "2m"\n'
    assert parse_config(text).broker.tls_reload_seconds == 120
    assert parse_config(ISSUERS + grant('project_id = "1"')).broker.tls_reload_seconds == 30
