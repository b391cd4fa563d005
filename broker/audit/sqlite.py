"""The embedded audit store: one SQLite database file (the default, single-host broker).

Talks to the local file system through Python's sqlite3. Durability: WAL journal with
`synchronous=FULL`, so a returned `append` has been fsync'd. The ledger lock is SQLite's database
write lock, taken up front with `BEGIN IMMEDIATE`, which serialises appends across processes;
threads of one process first queue on a local lock so they do not spin in SQLite's busy handler.
Queueing and the busy handler share one deadline per write, so a hung writer elsewhere costs each
waiting request at most BUSY_TIMEOUT, however many requests queue behind it.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.audit.ledger import (
    DEFAULT_CHECKPOINT_EVERY,
    DEFAULT_CHECKPOINT_INTERVAL,
    DEFAULT_ORIGIN,
    Clock,
    SqlLedger,
)

# Seconds a writer waits for another process's write lock before the append fails (fail closed
# within a bounded time; HOSTILE.md F2).
# The audit deadline (HOSTILE F2): a request waits at most this long for the ledger, then 503.
# Appends take milliseconds, so only a hung or locked store ever reaches it.
BUSY_TIMEOUT = 3.0


class SqliteAuditStore(SqlLedger):
    db_errors = (sqlite3.Error, OSError)

    def __init__(
        self,
        path: Path,
        *,
        clock: Clock,
        signing_key: Ed25519PrivateKey | None,
        salt: bytes | None,
        origin: str = DEFAULT_ORIGIN,
        checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
        checkpoint_interval: timedelta = DEFAULT_CHECKPOINT_INTERVAL,
        busy_timeout: float = BUSY_TIMEOUT,
    ) -> None:
        super().__init__(
            clock=clock,
            signing_key=signing_key,
            salt=salt,
            origin=origin,
            checkpoint_every=checkpoint_every,
            checkpoint_interval=checkpoint_interval,
        )
        self.path = path
        self._busy_timeout = busy_timeout
        self._process_lock = threading.Lock()
        self._deadline = threading.local()  # monotonic deadline of this thread's current write

    def __repr__(self) -> str:
        return f"SqliteAuditStore({str(self.path)!r})"

    def _connect(self) -> Any:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we issue BEGIN/COMMIT ourselves so the lock mode is explicit.
        # check_same_thread=False only so close() may run on another thread; otherwise each
        # connection stays with the thread that opened it (SqlLedger keeps one per thread).
        conn = sqlite3.connect(
            self.path, timeout=self._busy_timeout, isolation_level=None, check_same_thread=False
        )
        try:
            self._enable_wal(conn)
            conn.execute("PRAGMA synchronous=FULL")
        except BaseException:
            conn.close()
            raise
        return conn

    def _enable_wal(self, conn: sqlite3.Connection) -> None:
        # Switching a fresh file to WAL needs an exclusive lock and SQLite answers SQLITE_BUSY at
        # once, without its busy handler, when another process is doing the same; retry until the
        # busy timeout. WAL is persistent, so later connections only read the mode.
        deadline = time.monotonic() + self._busy_timeout
        while True:
            try:
                if conn.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal":
                    return
            except sqlite3.OperationalError:
                if time.monotonic() > deadline:
                    raise
            if time.monotonic() > deadline:
                raise sqlite3.OperationalError("could not switch the audit database to WAL")
            time.sleep(0.02)

    @contextmanager
    def _txn(self, conn: Any, timeout: float) -> Iterator[Any]:
        conn.execute(f"PRAGMA busy_timeout = {max(1, int(timeout * 1000))}")
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _write_txn(self, conn: Any) -> AbstractContextManager[Any]:
        # What the queue in _local_lock left of this write's deadline (HOSTILE F2).
        deadline = getattr(self._deadline, "value", None)
        if deadline is None:
            return self._txn(conn, self._busy_timeout)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise sqlite3.OperationalError("audit write lock not obtained within the busy timeout")
        return self._txn(conn, remaining)

    def _migration_txn(self, conn: Any) -> AbstractContextManager[Any]:
        return self._txn(conn, self._busy_timeout)

    def _table_exists(self, conn: Any, name: str) -> bool:
        rows = self._rows(
            conn, "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)
        )
        return bool(rows)

    @contextmanager
    def _queue(self) -> Iterator[None]:
        # Without a bound here, N requests behind a hung writer would fail one busy timeout after
        # another (the Nth after N timeouts), each holding a worker thread meanwhile.
        deadline = time.monotonic() + self._busy_timeout
        if not self._process_lock.acquire(timeout=self._busy_timeout):
            raise sqlite3.OperationalError("audit writers queued past the busy timeout")
        self._deadline.value = deadline
        try:
            yield
        finally:
            self._deadline.value = None
            self._process_lock.release()

    def _local_lock(self) -> AbstractContextManager[Any]:
        return self._queue()
