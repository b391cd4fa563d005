"""No secret in the policy file: secret-named keys and credential-shaped values are refused
anywhere in it (the patterns live in broker.secret_scan)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from broker.config_lint.reader import Lint, entry_label
from broker.secret_scan import SECRET_KEYS, looks_like_credential


def _refuse_inline(lint: Lint, node: object, where: str) -> None:
    """Refuse secret-named keys and credential-shaped strings anywhere in the file."""
    if isinstance(node, dict):
        for key, value in node.items():
            child = f"{where}.{key}" if where else key
            if key in SECRET_KEYS:
                lint.add(child, f"inline secrets are not allowed; use {key}_file")
            else:
                _refuse_inline(lint, value, child)
        return
    if isinstance(node, list):
        for index, item in enumerate(node):
            _refuse_inline(lint, item, f"{where}[{index}]")
        return
    if isinstance(node, str):
        kind = looks_like_credential(node)
        if kind:
            lint.add(where, f"value looks like {kind}; inline secrets are not allowed")


def scan_secrets(lint: Lint, raw: Mapping[str, Any]) -> None:
    """Every table of the file, each problem labelled by the issuer or grant it is in."""
    for key, value in raw.items():
        if key in ("issuer", "grant") and isinstance(value, list):
            for index, entry in enumerate(value):
                label = entry_label(key, entry, index)
                if not isinstance(entry, dict):
                    continue
                for k, v in entry.items():
                    if key == "grant" and k == "vault" and isinstance(v, dict):
                        # In a Vault grant `secret` names a dynamic-secret path, not a secret.
                        rest = {kk: vv for kk, vv in v.items() if kk != "secret"}
                        _refuse_inline(lint, rest, f"{label}.vault")
                        if "secret" in v:
                            _refuse_inline(lint, v["secret"], f"{label}.vault.secret")
                    else:
                        _refuse_inline(lint, {k: v}, label)
        else:
            _refuse_inline(lint, {key: value}, "")
