"""luigi-creds client helper: short-lived AWS and Vault credentials for Luigi tasks.

Owns nothing itself; re-exports the Luigi face (`CredentialsMixin`) lazily so that importing a
pure submodule such as `luigi_creds.refresh` does not import Luigi, boto3 or hvac. Never imports
`broker`: the two packages meet only on the wire protocol (SPEC.md).
"""

from __future__ import annotations

from typing import Any

__all__ = ["CredentialsMixin"]


def __getattr__(name: str) -> Any:
    if name == "CredentialsMixin":
        from luigi_creds.luigi import CredentialsMixin

        return CredentialsMixin
    raise AttributeError(f"module 'luigi_creds' has no attribute {name!r}")
