"""The audit ledger: what was asked, what was decided, what was issued. See events.py and store.py.

`open_store(url)` is the one entry point the broker uses: it opens the ledger in the broker's
store (broker/storage.py: SQLite or PostgreSQL by URL scheme), loads (or creates, see
key_files.py) the checkpoint key and accessor salt, and brings the schema up to date. It reads only
the files it is given.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from broker.audit.key_files import load_or_create_salt, load_or_create_signing_key
from broker.audit.ledger import (
    DEFAULT_CHECKPOINT_EVERY,
    DEFAULT_CHECKPOINT_INTERVAL,
    DEFAULT_ORIGIN,
    SqlLedger,
)
from broker.audit.store import AuditLedger
from broker.storage import BUSY_TIMEOUT, Database


def _utcnow() -> datetime:
    return datetime.now(UTC)


def open_store(
    store: str | Database,
    *,
    signing_key_path: Path | None = None,
    salt_path: Path | None = None,
    clock: Callable[[], datetime] = _utcnow,
    origin: str = DEFAULT_ORIGIN,
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
    checkpoint_interval: timedelta = DEFAULT_CHECKPOINT_INTERVAL,
    migrate: bool = True,
    busy_timeout: float = BUSY_TIMEOUT,
) -> SqlLedger:
    """The ledger in `store`: a URL (`sqlite:///abs/path.db`, `postgresql://user@host:port/db`;
    ValueError on others) or a Database the broker already opened (shared with its sessions).

    Without `signing_key_path` checkpoints are recorded unsigned (verify says so); without
    `salt_path` the accessor salt is generated once and kept in the ledger database.
    """
    key = load_or_create_signing_key(signing_key_path) if signing_key_path else None
    salt = load_or_create_salt(salt_path) if salt_path else None
    owned = isinstance(store, str)
    database = Database.open(store, busy_timeout=busy_timeout) if isinstance(store, str) else store
    ledger = SqlLedger(
        database,
        clock=clock,
        signing_key=key,
        salt=salt,
        origin=origin,
        checkpoint_every=checkpoint_every,
        checkpoint_interval=checkpoint_interval,
    )
    if migrate:
        try:
            ledger.migrate()
        except BaseException:
            if owned:
                ledger.close()
            raise
    return ledger


def _conforms(store: SqlLedger) -> AuditLedger:
    """Static check only: mypy proves every store satisfies the AuditLedger protocol."""
    return store
