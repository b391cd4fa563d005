"""Audit event schema: one record per phase of one request.

Owns the shape of what the broker remembers about every request. Pure: no I/O. A record never
holds a secret: the presented token appears only as its sha256, a credential only as its
reference (AWS AccessKeyId, HMAC of a Vault accessor, Vault lease_id).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any


class Outcome(StrEnum):
    INTENT = "intent"  # durable before any STS/Vault call (STS credentials cannot be revoked)
    ISSUED = "issued"  # durable before the credential leaves the process
    DENIED = "denied"  # hostile or disallowed request; nothing minted
    ERROR = "error"  # upstream or internal failure; nothing returned
    REVOKED = "revoked"  # a session or credential ended early
    RECONCILED = "reconciled"  # written at start-up for an intent a crash left dangling
    RECOVERY = "recovery"  # first record after a torn write or crash
    EXPLAINED = "explained"  # POST /v1/explain answered: grants listed, nothing minted
    LOADED = "loaded"  # a policy file took effect (kind "policy"; at start-up and on reload)
    REFUSED = "refused"  # a changed policy file was refused; the policy in force keeps serving
    # Counts of one window's refusals of requests that never authenticated (broker/denials.py),
    # written instead of one record each; `detail` holds the counts.
    TALLIED = "tallied"


@dataclass(frozen=True)
class AuditEvent:
    time: datetime  # aware UTC
    request_id: str
    outcome: Outcome
    reason: str = ""  # stable reason code, e.g. "expired", "policy_denied", "issued"
    kind: str = "exchange"  # exchange | refresh | revoke | explain | session | denials | system
    issuer: str = ""  # issuer name from config
    subject: str = ""
    jti: str = ""
    token_sha256: str = ""
    claims: Mapping[str, Any] = field(default_factory=dict)  # only the claims the policy read
    grant: str = ""
    target: str = ""  # role ARN or Vault path/policies
    credential_ref: str = ""  # AccessKeyId, hmac(accessor), lease_id; never a secret
    expires_at: datetime | None = None
    session_id: str = ""
    task: str = ""
    client_addr: str = ""
    attempt: int = 0
    detail: Mapping[str, Any] = field(default_factory=dict)  # small, non-secret extras
    # sha256 of the policy file in force when the record was written (for a decision: the one
    # it was decided under). "" in records written before the broker recorded it.
    policy_sha256: str = ""
