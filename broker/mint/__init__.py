"""Minting: turning an allowed decision into a real credential at an upstream (AWS STS, Vault)."""

from __future__ import annotations

from broker.errors import BrokerException


class UpstreamError(BrokerException):
    """An upstream refused or failed; nothing was minted.

    `reason` is the stable code recorded in the audit; `retryable` says whether another attempt
    inside the same request may succeed (throttling, 5xx, timeouts). `upstream` ("vault", "sts")
    and `detail` (the upstream's own error text and request id, for the operator's log; never
    sent to the client, and scrubbed when logged) say what the upstream actually answered.
    """

    def __init__(
        self, reason: str, *, retryable: bool, upstream: str = "", detail: str = ""
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable
        self.upstream = upstream
        self.detail = detail
