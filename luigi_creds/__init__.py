"""luigi-creds client helper: short-lived AWS and Vault credentials for Luigi tasks and scripts.

Owns nothing itself; re-exports the public names lazily so that importing a light submodule
(`luigi_creds.task_process`, which Luigi imports in every task's process, or `luigi_creds.refresh`)
does not import Luigi's task machinery, boto3, hvac or an HTTP stack. Never imports `broker`: the
two packages meet only on the broker's wire protocol.

- `TaskCredentials`: `[worker] task_process_context`, per-task credentials with no code change.
- `CredentialsMixin`: for tasks that name several grants in code.
- `aws_session`, `vault_client`, `mint`: for scripts and notebooks.
- `LuigiCredsError`: the base of every error the package raises.
"""

from __future__ import annotations

from typing import Any

from luigi_creds.errors import LuigiCredsError

__all__ = [
    "CredentialsMixin",
    "LuigiCredsError",
    "TaskCredentials",
    "aws_session",
    "mint",
    "vault_client",
]

_HOMES = {
    "CredentialsMixin": "luigi_creds.luigi",
    "TaskCredentials": "luigi_creds.task_process",
    "aws_session": "luigi_creds.api",
    "mint": "luigi_creds.api",
    "vault_client": "luigi_creds.api",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'luigi_creds' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(home), name)
