"""The audit ledger: what was asked, what was decided, what was issued. See events.py and store.py.

`open_store(url)` is the one entry point the broker uses: it picks the SQLite or PostgreSQL store
by URL scheme, loads (or creates, see keys.py) the checkpoint key and accessor salt, and brings the
schema up to date. It reads only the files it is given.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import unquote, urlsplit

from broker.audit.keys import load_or_create_salt, load_or_create_signing_key
from broker.audit.ledger import (
    DEFAULT_CHECKPOINT_EVERY,
    DEFAULT_CHECKPOINT_INTERVAL,
    DEFAULT_ORIGIN,
    SqlLedger,
)
from broker.audit.store import AuditLedger


def _utcnow() -> datetime:
    return datetime.now(UTC)


def open_store(
    url: str,
    *,
    signing_key_path: Path | None = None,
    salt_path: Path | None = None,
    clock: Callable[[], datetime] = _utcnow,
    origin: str = DEFAULT_ORIGIN,
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
    checkpoint_interval: timedelta = DEFAULT_CHECKPOINT_INTERVAL,
    migrate: bool = True,
) -> SqlLedger:
    """Open `sqlite:///abs/path.db` or `postgresql://user@host:port/db`; raise ValueError on others.

    Without `signing_key_path` checkpoints are recorded unsigned (verify says so); without
    `salt_path` the accessor salt is generated once and kept in the ledger database.
    """
    key = load_or_create_signing_key(signing_key_path) if signing_key_path else None
    salt = load_or_create_salt(salt_path) if salt_path else None
    parts = urlsplit(url)
    scheme = parts.scheme.split("+", 1)[0]
    store: SqlLedger
    if scheme == "sqlite":
        path = unquote(parts.path)
        if parts.netloc or not path.startswith("/"):
            raise ValueError("an SQLite audit store URL is sqlite:///absolute/path.db")
        from broker.audit.sqlite import SqliteAuditStore

        store = SqliteAuditStore(
            Path(path),
            clock=clock,
            signing_key=key,
            salt=salt,
            origin=origin,
            checkpoint_every=checkpoint_every,
            checkpoint_interval=checkpoint_interval,
        )
    elif scheme in ("postgresql", "postgres"):
        from broker.audit.postgresql import PostgresAuditStore

        store = PostgresAuditStore(
            parts._replace(scheme="postgresql").geturl(),
            clock=clock,
            signing_key=key,
            salt=salt,
            origin=origin,
            checkpoint_every=checkpoint_every,
            checkpoint_interval=checkpoint_interval,
        )
    else:
        raise ValueError(f"unsupported audit store scheme {parts.scheme!r}")
    if migrate:
        try:
            store.migrate()
        except BaseException:
            store.close()
            raise
    return store


def _conforms(store: SqlLedger) -> AuditLedger:
    """Static check only: mypy proves every store satisfies the AuditLedger protocol."""
    return store
