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

from broker.audit.key_files import load_or_create_salt, load_or_create_signing_key, write_salt
from broker.audit.ledger import (
    DEFAULT_CHECKPOINT_EVERY,
    DEFAULT_CHECKPOINT_INTERVAL,
    DEFAULT_ORIGIN,
    SqlLedger,
)
from broker.audit.store import AuditLedger
from broker.storage import BUSY_TIMEOUT, Database, Tx


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

    Without `signing_key_path` checkpoints are recorded unsigned (verify says so). With
    `salt_path` the accessor salt lives in that file; a salt an older broker kept in the
    database is moved there (so earlier HMACs still match) when the file does not exist yet.
    Without it (tools reading a ledger) the salt is generated once and kept in the database.
    """
    key = load_or_create_signing_key(signing_key_path) if signing_key_path else None
    owned = isinstance(store, str)
    database = Database.open(store, busy_timeout=busy_timeout) if isinstance(store, str) else store
    salt = None
    if salt_path is not None:
        try:
            salt = adopt_database_salt(database, salt_path)
        except BaseException:
            if owned:
                database.close()
            raise
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


def adopt_database_salt(database: Database, path: Path) -> bytes:
    """The salt at `path`; first moved there from the database if an older broker kept it there.

    The database's copy is deleted once the file holds the same salt: after that a read of the
    database alone yields neither the salt nor what it seals.
    """
    legacy = _database_salt(database)
    if legacy is not None and not path.exists():
        write_salt(path, legacy)
    salt = load_or_create_salt(path)
    if legacy is not None and legacy == salt:

        def forget(tx: Tx) -> None:
            tx.execute("DELETE FROM audit_meta WHERE key = 'accessor_salt'")

        database.write(forget)
    return salt


def _database_salt(database: Database) -> bytes | None:
    def read(tx: Tx) -> bytes | None:
        if not tx.dialect.table_exists(tx, "audit_meta"):
            return None
        rows = tx.rows("SELECT value FROM audit_meta WHERE key = 'accessor_salt'")
        return bytes.fromhex(rows[0][0]) if rows else None

    return database.read(read)
