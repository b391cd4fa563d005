"""The plain Python API, for scripts and notebooks: a boto3 session or an hvac client for a grant.

Owns credentials outside Luigi tasks, from the same settings (`[luigi_creds]` in the luigi.cfg
Luigi would read). Under `luigi-creds exec` (or inside a Luigi job's process) it mints through
that job's agent and session; otherwise it starts an agent in this process, whose broker session
ends when the process exits. Every credential is recorded by the broker against `task` (default:
none), and refreshes itself for as long as the session, boto3 session or hvac client lives.
"""

from __future__ import annotations

import threading
from typing import Any

from luigi_creds.agent import ensure_agent, vault_addr
from luigi_creds.credentials import AwsCredentials, BrokerError, Credential, VaultToken

__all__ = ["aws_session", "mint", "vault_client"]

_keepers_lock = threading.Lock()
_keepers: list[Any] = []  # TokenKeepers renewing the tokens of clients handed out


def mint(grant: str, *, task: str | None = None, duration: int | None = None) -> Credential:
    """One credential for `grant` (AWS keys, a Vault token or a dynamic secret)."""
    return ensure_agent().mint(grant, task, duration)


def aws_session(grant: str, *, region_name: str | None = None, task: str | None = None) -> Any:
    """A boto3 Session on `grant`'s AWS credentials, refreshing itself through the broker."""
    from luigi_creds.aws import aws_session as session_for

    def fetch() -> AwsCredentials:
        cred = mint(grant, task=task)
        if not isinstance(cred, AwsCredentials):
            raise BrokerError(
                f"grant {grant!r} does not issue AWS credentials", error="usage", grant=grant
            )
        return cred

    return session_for(fetch, region_name=region_name)


def vault_client(grant: str, *, task: str | None = None) -> Any:
    """An hvac Client holding a Vault token for `grant`, renewed (or re-minted) while this
    process runs; the broker revokes it when the job's session ends."""
    from luigi_creds.vault import TokenKeeper

    def fetch() -> VaultToken:
        cred = mint(grant, task=task)
        if not isinstance(cred, VaultToken):
            raise BrokerError(
                f"grant {grant!r} does not issue Vault tokens", error="usage", grant=grant
            )
        return cred

    keeper = TokenKeeper(fetch(), vault_addr(), remint=fetch)
    keeper.start()
    with _keepers_lock:
        _keepers.append(keeper)
    return keeper.client
