"""The audit store interface the rest of the broker writes through.

The implementation is `SqlLedger` (ledger.py) over the broker's store; `open_store(url)` opens it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Protocol

from broker.audit.events import AuditEvent
from broker.storage import Tx


class AuditStore(Protocol):
    def append(self, event: AuditEvent) -> int:
        """Make `event` durable and return its sequence number; raise StoreUnavailable."""
        ...

    def appender(self, event: AuditEvent) -> Callable[[Tx], None]:
        """`append` as a step of a write transaction in the broker's store (broker/storage.py):
        the record commits, or not, with the rest of that transaction."""
        ...

    def check_writable(self) -> None:
        """Raise StoreUnavailable if an append would fail now (readiness)."""
        ...

    def close(self) -> None: ...


class AuditLedger(AuditStore, Protocol):
    """What `open_store` returns beyond AuditStore: the calls start-up recovery and minting make.

    A separate protocol so that minimal AuditStore fakes in tests need not implement these.
    """

    def hash_ref(self, value: str) -> str:
        """`hmac-sha256:<hex>` of a Vault accessor under the per-deployment salt."""
        ...

    def dangling_intents(self) -> list[AuditEvent]:
        """The latest intent of every request with no issued/denied/error/reconciled record."""
        ...

    def events(self, since: datetime | None = None) -> Iterator[AuditEvent]:
        """Events in seq order whose time is at or after `since`."""
        ...

    def stamp_policy(self, sha256: str) -> None:
        """Record `sha256` as the policy in force in every later record that names none."""
        ...
