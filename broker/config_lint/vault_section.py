"""Vault: a grant's [grant.vault] table and the [upstream.vault] table (address and auth)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from broker.config import UpstreamVault, VaultGrant
from broker.config_lint.reader import Lint

_VAULT_GRANT_KEYS = frozenset({"secret", "token_policies", "orphan", "num_uses"})

UPSTREAM_VAULT_KEYS = frozenset(
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


def vault_grant(lint: Lint, t: Mapping[str, Any], w: str) -> VaultGrant:
    lint.keys(t, w, _VAULT_GRANT_KEYS)
    secret = lint.typed(t, "secret", w, str, "") or None
    policies = lint.str_list(t, "token_policies", w) if "token_policies" in t else ()
    if (secret is None) == (not policies):
        lint.add(w, "needs exactly one of secret or token_policies")
    if "root" in policies:
        lint.add(f"{w}.token_policies", "the root policy is never issued")
    num_uses = lint.typed(t, "num_uses", w, int, 0) if "num_uses" in t else None
    if num_uses is not None and num_uses < 1:
        lint.add(f"{w}.num_uses", "must be at least 1 (omit it for unlimited uses)")
    return VaultGrant(
        secret=secret,
        token_policies=policies,
        orphan=lint.typed(t, "orphan", w, bool, False),
        num_uses=num_uses,
    )


def upstream_vault(lint: Lint, t: Mapping[str, Any]) -> UpstreamVault:
    w = "upstream.vault"
    lint.keys(t, w, UPSTREAM_VAULT_KEYS)
    url = lint.required_str(t, "url", w)
    if url:
        lint.url(url, f"{w}.url")
    auth = lint.required_str(t, "auth", w)
    role_id_file = lint.path(t, "role_id_file", w)
    secret_id_file = lint.path(t, "secret_id_file", w)
    token_file = lint.path(t, "token_file", w)
    if auth == "approle":
        if role_id_file is None or secret_id_file is None:
            lint.add(w, 'auth = "approle" needs role_id_file and secret_id_file')
    elif auth == "token":
        if token_file is None:
            lint.add(w, 'auth = "token" needs token_file')
    elif auth:
        lint.add(f"{w}.auth", 'expected "approle" or "token"')
    namespace = lint.typed(t, "namespace", w, str, "") or None
    return UpstreamVault(
        url=url,
        auth=auth,
        role_id_file=role_id_file,
        secret_id_file=secret_id_file,
        token_file=token_file,
        approle_mount=lint.typed(t, "approle_mount", w, str, "approle"),
        token_role=lint.typed(t, "token_role", w, str, UpstreamVault.token_role),
        orphan_token_role=lint.typed(
            t, "orphan_token_role", w, str, UpstreamVault.orphan_token_role
        ),
        ca_cert=lint.path(t, "ca_cert", w),
        namespace=namespace,
    )
