"""The [[issuer]] tables: the OIDC issuers whose tokens the broker accepts."""

from __future__ import annotations

from broker.config import ASYMMETRIC_ALGORITHMS, IssuerConfig
from broker.config_lint.reader import Lint

ISSUER_KEYS = frozenset(
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


def issuer_configs(lint: Lint, value: object) -> tuple[IssuerConfig, ...]:
    out: list[IssuerConfig] = []
    for w, t in lint.entries(value, "issuer"):
        lint.keys(t, w, ISSUER_KEYS)
        name = lint.name(t, w)
        url = lint.required_str(t, "url", w)
        if url:
            lint.url(url, f"{w}.url")
        audiences = lint.str_list(t, "audiences", w)
        if not audiences:
            # Vacuous case: no audience would accept every token the issuer ever signed.
            lint.add(f"{w}.audiences", "must list at least one audience")
        algorithms = lint.str_list(t, "algorithms", w) if "algorithms" in t else ("RS256",)
        _algorithms(lint, algorithms, f"{w}.algorithms")
        d = IssuerConfig(name="", url="", audiences=())
        out.append(
            IssuerConfig(
                name=name,
                url=url,
                audiences=audiences,
                algorithms=algorithms,
                jwks_file=lint.path(t, "jwks_file", w),
                max_token_lifetime=lint.duration(t, "max_token_lifetime", w, d.max_token_lifetime),
                require_jti=lint.typed(t, "require_jti", w, bool, d.require_jti),
                token_types=lint.str_list(t, "token_types", w),
                jwks_cache_ttl=lint.duration(t, "jwks_cache_ttl", w, d.jwks_cache_ttl),
                jwks_refetch_cooldown=lint.duration(
                    t, "jwks_refetch_cooldown", w, d.jwks_refetch_cooldown
                ),
                jwks_max_stale=lint.duration(t, "jwks_max_stale", w, d.jwks_max_stale),
                require_dpop=lint.typed(t, "require_dpop", w, bool, d.require_dpop),
            )
        )
    lint.unique((i.name for i in out), "issuer")
    return tuple(out)


def _algorithms(lint: Lint, algorithms: tuple[str, ...], where: str) -> None:
    if not algorithms:
        lint.add(where, "must list at least one algorithm")
    for alg in algorithms:
        if alg.upper().startswith("HS"):
            lint.add(where, f"{alg}: symmetric algorithms are not supported")
        elif alg not in ASYMMETRIC_ALGORITHMS:
            allowed = ", ".join(sorted(ASYMMETRIC_ALGORITHMS))
            lint.add(where, f"{alg!r} is not supported; use one of {allowed}")
