"""The audit store interface the rest of the broker writes through.

Implementations live beside this file (sqlite, postgresql). `open_store(url)` picks one.
"""

from __future__ import annotations

from typing import Protocol

from broker.audit.events import AuditEvent


class AuditUnavailable(Exception):
    """The store could not make a record durable; the caller must fail closed (503)."""


class AuditStore(Protocol):
    def append(self, event: AuditEvent) -> int:
        """Make `event` durable and return its sequence number; raise AuditUnavailable."""
        ...

    def check_writable(self) -> None:
        """Raise AuditUnavailable if an append would fail now (readiness)."""
        ...

    def close(self) -> None: ...
