"""Credentials as the broker issues them: typed, frozen values and the parsing of a 200 body.

Owns what a minted credential is (AWS STS keys, a Vault token, a Vault dynamic secret), how a
`/v1/token` (or agent `/v1/mint`) 200 body becomes one, what identifies it in logs, and
`BrokerError`, the refusal every minting path raises. Standard library only: a task's process
imports it without pulling in an HTTP stack. Secrets are kept out of every repr. The value types
are written out (values.py), not dataclasses, because every task process defines them again.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from luigi_creds.errors import LuigiCredsError
from luigi_creds.values import Frozen

__all__ = [
    "AWS_CREDENTIALS",
    "VAULT_SECRET",
    "VAULT_TOKEN",
    "AwsCredentials",
    "BrokerError",
    "Credential",
    "VaultSecret",
    "VaultToken",
    "describe",
    "iso",
    "parse_credential",
    "parse_time",
]

AWS_CREDENTIALS = "urn:luigi-creds:token-type:aws-credentials"
VAULT_TOKEN = "urn:luigi-creds:token-type:vault-token"
VAULT_SECRET = "urn:luigi-creds:token-type:vault-secret"


class BrokerError(LuigiCredsError):
    """The broker refused or could not be reached.

    `error` is the RFC 6749 code (or `unreachable` / `invalid_response` / `identity_unavailable`
    / `forked_process` for client-side failures), `status` the HTTP status (0 when there was
    none), `request_id` the broker's id for the audit trail. The message names the broker URL,
    the grant and the reason, never a token or credential.
    """

    def __init__(
        self,
        message: str,
        *,
        error: str,
        status: int = 0,
        request_id: str | None = None,
        grant: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.error = error
        self.status = status
        self.request_id = request_id
        self.grant = grant
        self.retry_after = retry_after


class AwsCredentials(Frozen):
    """STS credentials for one grant; secrets hidden from repr."""

    _fields = (
        "grant",
        "request_id",
        "access_key_id",
        "secret_access_key",
        "session_token",
        "expires_at",
    )
    __slots__ = _fields
    _secret = frozenset({"secret_access_key", "session_token"})
    grant: str
    request_id: str
    access_key_id: str
    secret_access_key: str
    session_token: str
    expires_at: datetime

    def __init__(
        self,
        grant: str,
        request_id: str,
        access_key_id: str,
        secret_access_key: str,
        session_token: str,
        expires_at: datetime,
    ) -> None:
        self._fill(grant, request_id, access_key_id, secret_access_key, session_token, expires_at)

    def credential_process(self) -> dict[str, Any]:
        """The AWS `credential_process` JSON shape (Version 1)."""
        return {
            "Version": 1,
            "AccessKeyId": self.access_key_id,
            "SecretAccessKey": self.secret_access_key,
            "SessionToken": self.session_token,
            "Expiration": iso(self.expires_at),
        }


class VaultToken(Frozen):
    """A Vault token minted for one grant; the token hidden from repr."""

    _fields = (
        "grant",
        "request_id",
        "token",
        "accessor",
        "policies",
        "renewable",
        "lease_duration",
        "expires_at",
    )
    __slots__ = _fields
    _secret = frozenset({"token"})
    grant: str
    request_id: str
    token: str
    accessor: str
    policies: tuple[str, ...]
    renewable: bool
    lease_duration: int
    expires_at: datetime

    def __init__(
        self,
        grant: str,
        request_id: str,
        token: str,
        accessor: str,
        policies: tuple[str, ...],
        renewable: bool,
        lease_duration: int,
        expires_at: datetime,
    ) -> None:
        self._fill(
            grant, request_id, token, accessor, policies, renewable, lease_duration, expires_at
        )


class VaultSecret(Frozen):
    """A Vault dynamic secret (with its lease) for one grant; the data hidden from repr."""

    _fields = (
        "grant",
        "request_id",
        "lease_id",
        "lease_duration",
        "renewable",
        "data",
        "expires_at",
        "renew_token",
    )
    __slots__ = _fields
    _secret = frozenset({"data", "renew_token"})
    grant: str
    request_id: str
    lease_id: str
    lease_duration: int
    renewable: bool
    data: Mapping[str, Any]
    expires_at: datetime
    # A token that may only renew this lease (sys/leases/renew), issued by the broker so the
    # client renews the lease with Vault directly; empty if the broker sent none.
    renew_token: str

    def __init__(
        self,
        grant: str,
        request_id: str,
        lease_id: str,
        lease_duration: int,
        renewable: bool,
        data: Mapping[str, Any],
        expires_at: datetime,
        renew_token: str = "",
    ) -> None:
        self._fill(
            grant, request_id, lease_id, lease_duration, renewable, data, expires_at, renew_token
        )


Credential = AwsCredentials | VaultToken | VaultSecret


def describe(cred: Credential) -> str:
    """What identifies `cred` in logs and the audit (access key id, accessor, lease id)."""
    if isinstance(cred, AwsCredentials):
        return f"access key {cred.access_key_id}"
    if isinstance(cred, VaultToken):
        return f"Vault token accessor {cred.accessor}"
    return f"Vault lease {cred.lease_id}"


def parse_credential(body: Mapping[str, Any], *, grant: str, now: datetime) -> Credential:
    """Parse a 200 `/v1/token` body into a typed credential (KeyError/TypeError/ValueError)."""
    token_type = body["issued_token_type"]
    creds = body["credentials"]
    request_id = str(body.get("request_id", ""))
    expires_in = body.get("expires_in")
    fallback = (
        now + timedelta(seconds=int(expires_in))
        if isinstance(expires_in, int) and not isinstance(expires_in, bool)
        else None
    )
    if not isinstance(creds, dict):
        raise TypeError("credentials is not an object")
    if token_type == AWS_CREDENTIALS:
        return AwsCredentials(
            grant=grant,
            request_id=request_id,
            access_key_id=_req_str(creds, "AccessKeyId"),
            secret_access_key=_req_str(creds, "SecretAccessKey"),
            session_token=_req_str(creds, "SessionToken"),
            expires_at=parse_time(_req_str(creds, "Expiration")),
        )
    if token_type == VAULT_TOKEN:
        lease = _req_int(creds, "lease_duration")
        policies = creds.get("policies") or []
        if not isinstance(policies, list) or not all(isinstance(p, str) for p in policies):
            raise TypeError("policies is not a list of strings")
        return VaultToken(
            grant=grant,
            request_id=request_id,
            token=_req_str(creds, "token"),
            accessor=_req_str(creds, "accessor"),
            policies=tuple(policies),
            renewable=bool(creds.get("renewable", False)),
            lease_duration=lease,
            expires_at=fallback or now + timedelta(seconds=lease),
        )
    if token_type == VAULT_SECRET:
        lease = _req_int(creds, "lease_duration")
        data = creds.get("data")
        if not isinstance(data, dict):
            raise TypeError("data is not an object")
        renew_token = creds.get("renew_token")
        return VaultSecret(
            grant=grant,
            request_id=request_id,
            lease_id=_req_str(creds, "lease_id"),
            lease_duration=lease,
            renewable=bool(creds.get("renewable", False)),
            data=dict(data),
            expires_at=now + timedelta(seconds=lease),
            renew_token=renew_token if isinstance(renew_token, str) else "",
        )
    raise ValueError(f"unknown issued_token_type {token_type!r}")


def _req_str(obj: Mapping[str, Any], key: str) -> str:
    value = obj[key]
    if not isinstance(value, str) or not value:
        raise TypeError(f"{key} is not a non-empty string")
    return value


def _req_int(obj: Mapping[str, Any], key: str) -> int:
    value = obj[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise TypeError(f"{key} is not a non-negative integer")
    return value


def parse_time(text: str) -> datetime:
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        raise ValueError("Expiration has no time zone")
    return moment.astimezone(UTC)


def iso(moment: datetime) -> str:
    """`moment` as the second-precision UTC text AWS uses (2026-01-01T00:00:00Z)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
