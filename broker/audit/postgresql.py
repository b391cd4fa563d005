"""The multi-replica audit store: PostgreSQL through psycopg 3.

Talks to one PostgreSQL database (the URL's search_path may place the tables in a schema). Every
connection runs in autocommit mode and writes inside explicit transactions. The ledger lock is the
`audit_head` row, locked with `SELECT ... FOR UPDATE`, so appends from all replicas queue in the
server and each sees the previous commit's head. `synchronous_commit` is forced on per session:
a returned `append` is on the server's disk. Statement and lock timeouts bound how long a writer
can hang (fail closed within a deadline; HOSTILE.md F2).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import timedelta
from typing import Any

import psycopg
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.audit.ledger import (
    DEFAULT_CHECKPOINT_EVERY,
    DEFAULT_CHECKPOINT_INTERVAL,
    DEFAULT_ORIGIN,
    Clock,
    SqlLedger,
)

CONNECT_TIMEOUT = 5  # seconds
STATEMENT_TIMEOUT_MS = 10_000  # bounds maintenance statements (prune) as well as appends
# The audit deadline (HOSTILE F2): waiting for the head-row lock gives up after this, then 503.
LOCK_TIMEOUT_MS = 3_000
# Key of the transaction-level advisory lock that serialises schema migrations across replicas:
# the ASCII bytes "lcau" (luigi-creds audit).
MIGRATION_LOCK = 0x6C636175


class PostgresAuditStore(SqlLedger):
    placeholder = "%s"
    db_errors = (psycopg.Error, OSError)

    def __init__(
        self,
        url: str,
        *,
        clock: Clock,
        signing_key: Ed25519PrivateKey | None,
        salt: bytes | None,
        origin: str = DEFAULT_ORIGIN,
        checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
        checkpoint_interval: timedelta = DEFAULT_CHECKPOINT_INTERVAL,
    ) -> None:
        super().__init__(
            clock=clock,
            signing_key=signing_key,
            salt=salt,
            origin=origin,
            checkpoint_every=checkpoint_every,
            checkpoint_interval=checkpoint_interval,
        )
        self._url = url

    def __repr__(self) -> str:
        # NOTE: the URL may carry a password; it is never shown.
        return "PostgresAuditStore(<url>)"

    def _connect(self) -> Any:
        conn = psycopg.connect(self._url, autocommit=True, connect_timeout=CONNECT_TIMEOUT)
        conn.execute(f"SET statement_timeout = {STATEMENT_TIMEOUT_MS}")
        conn.execute(f"SET lock_timeout = {LOCK_TIMEOUT_MS}")
        conn.execute("SET synchronous_commit = on")
        return conn

    @contextmanager
    def _txn(self, conn: Any) -> Iterator[Any]:
        with conn.transaction():
            yield conn

    def _write_txn(self, conn: Any) -> AbstractContextManager[Any]:
        return self._txn(conn)

    def _head_sql(self) -> str:
        return super()._head_sql() + " FOR UPDATE"

    @contextmanager
    def _migration_txn(self, conn: Any) -> Iterator[Any]:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            yield conn

    def _table_exists(self, conn: Any, name: str) -> bool:
        rows = self._rows(conn, "SELECT to_regclass(?)", (name,))
        return rows[0][0] is not None

    def _local_lock(self) -> AbstractContextManager[Any]:
        # the head row lock already queues writers fairly inside the server
        return contextlib.nullcontext()
