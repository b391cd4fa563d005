"""The broker's one durable store: SQLite or PostgreSQL behind one small interface.

Everything the broker must not forget lives in one database (the `[broker] audit_store` URL):
the audit ledger (`audit_*` tables, broker/audit/ledger.py), the replay ledger (`replay_*`,
broker/replay.py) and refresh sessions (`session_*`, broker/sessions.py). This module owns what
they share: URL parsing, connections and their settings, transactions, migrations, and the one
error every failure becomes, `StoreUnavailable` (the broker then answers 503 and issues nothing).

Writes are group-committed. `Database.write(work)` queues `work`; one writer at a time runs
every write queued meanwhile in one transaction and commits once: one fsync (SQLite) or one
commit round trip (PostgreSQL) for the whole batch. A write that raises refuses only itself
(see `_transact`). A caller returns only after the commit that holds its own writes, so
"returned" still means "durable". A batch holds the database write lock once: on SQLite
`BEGIN IMMEDIATE`, on PostgreSQL the audit head row, locked when the batch's records are linked
into the chain just before its commit (values a write `hold`s on its `Tx` are written then, once
per batch), so the audit stays one hash chain in one order across every process and replica.

The writer is a caller, not a thread of its own (leader/follower group commit): a write that
finds no batch running runs the batch itself on its own thread; writes arriving meanwhile queue,
and when that batch is done the first of them is woken to lead the next one with all the others.
Decision: measured in-process on one Vault exchange (two writes), a dedicated writer thread cost
two thread handoffs per write (a Condition notify, an Event set, the wakeups and the GIL passing
between threads); an uncontended write now costs none, and concurrent writes still share one
commit as before.

Deadlines: a write waits at most `busy_timeout` seconds to start (queued behind this process's
batches, then for another process's lock), then fails closed. A write that has started is never
abandoned by its caller: once its batch holds the lock the outcome is known within one commit,
and a caller told "unavailable" must be able to trust that nothing of its write is kept.

Reads use a small pool of connections and plain read transactions.
"""

from __future__ import annotations

import contextlib
import queue
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Generic, TypeVar
from urllib.parse import unquote, urlsplit

import psycopg

from broker.errors import BrokerException

T = TypeVar("T")

# The write deadline: how long a write may wait for the lock before the request gets 503. Writes
# take milliseconds, so only a hung or externally locked store ever reaches it.
BUSY_TIMEOUT = 3.0
# PostgreSQL: connection attempts give up after this (seconds, libpq connect_timeout).
PG_CONNECT_TIMEOUT = 5
# PostgreSQL: bounds any one statement, maintenance (prune) included.
PG_STATEMENT_TIMEOUT_MS = 10_000
# PostgreSQL: waiting for a row lock (the audit head) gives up after this, like BUSY_TIMEOUT.
PG_LOCK_TIMEOUT_MS = int(BUSY_TIMEOUT * 1000)
# Key of the transaction-level advisory lock that serialises schema migrations across brokers
# starting at once: the ASCII bytes "lcau".
MIGRATION_LOCK = 0x6C636175
# Idle read connections kept; more concurrent readers open (and then close) extra ones.
_POOL_IDLE = 8
# Writes per batch: bounds one transaction's size and the time its lock is held.
_MAX_BATCH = 128
# An instant as SqliteDialect.to_db writes it (years 1000 and later): read back by fromisoformat.
_STORED_INSTANT = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{6}Z")


class StoreUnavailable(BrokerException):
    """The store cannot answer or cannot make a write durable now; the caller fails closed."""


@dataclass(frozen=True)
class StoreURL:
    """A parsed store URL: `sqlite` with an absolute file path, or a `postgresql` conninfo URL."""

    dialect: str
    target: str = field(repr=False)  # may carry a password: never shown

    @classmethod
    def parse(cls, url: str) -> StoreURL:
        """`sqlite:///abs/path.db` or `postgresql://...` (`postgres`, `+driver` suffixes allowed).

        The URL is never echoed in errors: a PostgreSQL URL may carry a password.
        """
        parts = urlsplit(url)
        scheme = parts.scheme.split("+", 1)[0]
        if scheme == "sqlite":
            path = unquote(parts.path)
            if parts.netloc or not path.startswith("/"):
                raise ValueError("an SQLite store URL is sqlite:///absolute/path.db")
            # sqlite:////abs/path.db (SQLAlchemy's spelling) parses to "//abs/path.db": one
            # spelling of the path, so whoever derives a path from it (the audit key files
            # beside the database) names the same file as "/abs/path.db".
            return cls("sqlite", "/" + path.lstrip("/"))
        if scheme in ("postgresql", "postgres"):
            return cls("postgresql", parts._replace(scheme="postgresql").geturl())
        raise ValueError("the store URL must be sqlite:///absolute/path.db or postgresql://...")


@dataclass(frozen=True)
class RowInsert:
    """An INSERT of whole rows into one table that a write transaction runs once, for every row
    its steps queued (`Tx.insert_later`), instead of once per row.

    Decision: in a batch of writes most statements are such inserts (a session, its first
    handle, a credential per exchange), and each costs the broker a send and the database a
    statement. Queued, a batch sends one multi-row INSERT per table. Only on PostgreSQL
    (`Dialect.queues_rows`): on SQLite a statement is a call into the library in-process, and
    queueing cost more than it saved (in-process, one thread: 7-10% more CPU per exchange,
    measured); there `insert_later` writes the row at once.

    A queued row is not in the table until written, so it is written before any statement of
    its transaction that names a table of its family (the name up to its first underscore:
    `session_handles` and `session_credentials` reference `session_sessions`), and at the
    latest before the commit; a family's tables are written together, lowest `rank` first. Its
    write counts as a statement of whichever step triggers it (see `Database._transact` on a
    refusing write that had written).
    """

    table: str
    columns: tuple[str, ...]
    tail: str = ""  # what follows the rows, e.g. "ON CONFLICT (...) DO NOTHING"
    # Within a family, a table whose rows reference another's ranks after it.
    rank: int = 0

    @property
    def family(self) -> str:
        return self.table.split("_", 1)[0] + "_"

    @property
    def key(self) -> str:
        return _ROWS_PREFIX + self.table


# Keys under which a transaction holds rows queued for a RowInsert.
_ROWS_PREFIX = "rows:"


class Tx:
    """One transaction in progress, cursor-like. SQL is written with `?` placeholders."""

    def __init__(self, conn: Any, dialect: Dialect, pipeline: Any = None) -> None:
        self._conn = conn
        self.dialect = dialect
        # PostgreSQL write batches run in pipeline mode (see Database._transact): a statement
        # is sent without waiting for its result; reading one (rows, rowcount) waits for it.
        self._pipeline = pipeline
        self._cur: Any = None
        self.executed = 0  # statements run so far: whether a refusing write had written
        # Values one step keeps for the next steps of the same transaction, and the writes they
        # owe before it commits (`hold`): a batch of writes reads and writes the audit head once
        # instead of once per record.
        self._held: dict[str, Any] = {}
        self._owed: dict[str, Callable[[Tx], None]] = {}
        self._families = False  # rows may be queued (`insert_later`): statements check them

    def held(self, key: str) -> Any:
        """What a step of this transaction `hold`s under `key`, or None."""
        return self._held.get(key)

    def hold(self, key: str, value: Any, write: Callable[[Tx], None]) -> None:
        """Keep `value` for later steps; `write(tx)` stores it once, before the commit."""
        self._held[key] = value
        self._owed[key] = write

    def mark(self) -> tuple[dict[str, Any], dict[str, Callable[[Tx], None]]]:
        """What is held now: `rewind` to it when the statements since are rolled back."""
        return dict(self._held), dict(self._owed)

    def rewind(self, mark: tuple[dict[str, Any], dict[str, Callable[[Tx], None]]]) -> None:
        self._held, self._owed = dict(mark[0]), dict(mark[1])
        self._families = any(key.startswith(_ROWS_PREFIX) for key in self._held)

    def take(self, key: str) -> Any:
        """What is held under `key` (or None), no longer held and no longer owing its write."""
        self._owed.pop(key, None)
        return self._held.pop(key, None)

    def settle(self) -> None:
        """Run the writes held values owe, oldest first (one may owe another); then the
        transaction may commit."""
        while self._owed:
            key = next(iter(self._owed))
            self._owed.pop(key)(self)

    def insert(self, insert: RowInsert, rows: Sequence[Sequence[Any]]) -> None:
        """Write `rows` for `insert` now, in one statement where the dialect can."""
        self.dialect.insert_rows(self, insert, rows)

    def insert_later(self, insert: RowInsert, row: Sequence[Any]) -> None:
        """Queue `row` for `insert`, written with the transaction's other rows for it (see
        RowInsert for when)."""
        if not self.dialect.queues_rows:
            self.insert(insert, (tuple(row),))
            return
        queued = self._held.get(insert.key)
        rows = (tuple(row),) if queued is None else (*queued[1], tuple(row))
        self.hold(insert.key, (insert, rows), _write_rows(insert.family))
        self._families = True

    def write_rows(self, family: str) -> None:
        """Write now the rows queued for the tables of `family`, lowest rank first."""
        keys = [
            key
            for key, value in self._held.items()
            if key.startswith(_ROWS_PREFIX) and value[0].family == family
        ]
        queued = sorted((self.take(key) for key in keys), key=lambda q: q[0].rank)
        for insert, rows in queued:
            self.insert(insert, rows)

    @property
    def rowcount(self) -> int:
        cur = self._cur
        if self._pipeline is not None and cur.pgresult is None:
            # Not answered yet (fetchone/fetchall wait by themselves): one round trip for this
            # statement and every one sent before it.
            self._pipeline.sync()
        return int(cur.rowcount)

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Tx:
        if self._families:
            self._before(sql)
        return self.execute_now(sql, params)

    def execute_now(self, sql: str, params: Sequence[Any] = ()) -> Tx:
        """`execute` without first writing queued rows (the dialect writing them uses it)."""
        self.executed += 1
        self._cur = self._conn.execute(self.dialect.sql(sql), tuple(params))
        return self

    def executemany_now(self, sql: str, rows: Sequence[Sequence[Any]]) -> Tx:
        """One statement for many parameter rows, without first writing queued rows."""
        self.executed += 1
        self._cur = self._conn.cursor()
        self._cur.executemany(self.dialect.sql(sql), [tuple(row) for row in rows])
        return self

    def _before(self, sql: str) -> None:
        """Write the queued rows `sql` may read or depend on: those of every family it names."""
        families = {
            value[0].family for key, value in self._held.items() if key.startswith(_ROWS_PREFIX)
        }
        self._families = bool(families)
        for family in families:
            if family in sql:
                self.write_rows(family)

    def fetchone(self) -> Any:
        return self._cur.fetchone()

    def fetchall(self) -> list[Any]:
        return list(self._cur.fetchall())

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        return self.execute(sql, params).fetchall()

    def to_db(self, value: datetime | None) -> Any:
        return self.dialect.to_db(value)

    def from_db(self, value: Any) -> datetime | None:
        return self.dialect.from_db(value)


def _write_rows(family: str) -> Callable[[Tx], None]:
    def write(tx: Tx) -> None:
        tx.write_rows(family)

    return write


class Dialect:
    """What differs between SQLite and PostgreSQL; everything else is portable SQL."""

    name = ""
    errors: tuple[type[BaseException], ...] = ()
    # Appended to a SELECT that must lock the rows it reads until commit.
    for_update = ""
    # Column type of an aware instant, `{time}` in migration SQL.
    time_type = ""
    # The database's own clock as an SQL expression comparable with stored instants. Used
    # where replicas must agree on "now" (purging replay rows): one clock, not one per host.
    now_sql = ""
    # Whether Tx.insert_later queues rows (see RowInsert) or writes each at once.
    queues_rows = False

    def __init__(self, target: str, busy_timeout: float) -> None:
        self._target = target
        self.busy_timeout = busy_timeout
        self._sql_cache: dict[str, str] = {}
        self._rows_sql: dict[tuple[str, int], str] = {}

    def sql(self, text: str) -> str:
        return text

    def connect(self) -> Any:
        raise NotImplementedError

    def begin_write(self, conn: Any, timeout: float) -> None:
        raise NotImplementedError

    def pipelined(self, conn: Any) -> contextlib.AbstractContextManager[Any]:
        """Where a write batch runs: the pipeline it is sent through, or None (no pipeline)."""
        return contextlib.nullcontext()

    def insert_rows(self, tx: Tx, insert: RowInsert, rows: Sequence[Sequence[Any]]) -> None:
        """Run `insert` for `rows` in `tx`: the one-row INSERT (executemany for several)."""
        sql = self._rows_sql.get((insert.key, 1))
        if sql is None:
            marks = ", ".join("?" * len(insert.columns))
            sql = self._rows_sql[(insert.key, 1)] = (
                f"INSERT INTO {insert.table} ({', '.join(insert.columns)})"  # noqa: S608
                f" VALUES ({marks}) {insert.tail}".rstrip()
            )
        if len(rows) == 1:
            tx.execute_now(sql, rows[0])
        else:
            tx.executemany_now(sql, rows)

    def begin_migration(self, conn: Any) -> None:
        raise NotImplementedError

    def table_exists(self, tx: Tx, name: str) -> bool:
        raise NotImplementedError

    def is_connection_error(self, exc: BaseException) -> bool:
        return False

    def lost(self, conn: Any, exc: BaseException) -> bool:
        """Whether `exc` means `conn` itself is gone (not the statement or the data)."""
        return False

    def to_db(self, value: datetime | None) -> Any:
        raise NotImplementedError

    def from_db(self, value: Any) -> datetime | None:
        raise NotImplementedError


class SqliteDialect(Dialect):
    """One database file through sqlite3; WAL journal, `synchronous=FULL` (commit = fsync)."""

    name = "sqlite"
    errors = (sqlite3.Error, OSError)
    time_type = "TEXT"  # fixed-width UTC text; see to_db
    # The clock of the host the one database file lives on (every replica sharing a SQLite file
    # runs there), in to_db's format: %f gives milliseconds, padded to microseconds.
    now_sql = "(strftime('%Y-%m-%dT%H:%M:%f', 'now') || '000Z')"

    _busy_conn: Any = None  # the connection whose busy_timeout was last set, and its value
    _busy_ms = 0
    # False once Database.checkpoint_in_background is called: commits stop checkpointing.
    autocheckpoint = True

    def connect(self) -> sqlite3.Connection:
        Path(self._target).parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we issue BEGIN/COMMIT ourselves so the lock mode is explicit.
        # check_same_thread=False: a connection is used by one thread at a time, but may be
        # closed from another.
        conn = sqlite3.connect(
            self._target,
            timeout=self.busy_timeout,
            isolation_level=None,
            check_same_thread=False,
        )
        try:
            self._enable_wal(conn)
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            # Temporary files (statement and savepoint journals among them) in memory: when a
            # batch still took a savepoint per write, a batch of sixteen exchanges wrote as many
            # pages to a fresh temp file on disk as to the WAL.
            conn.execute("PRAGMA temp_store=MEMORY")
            if not self.autocheckpoint:
                conn.execute("PRAGMA wal_autocheckpoint=0")
        except BaseException:
            conn.close()
            raise
        return conn

    def _enable_wal(self, conn: sqlite3.Connection) -> None:
        # WAL lets readers proceed while one writer holds the lock. Switching a fresh file needs
        # an exclusive lock, and SQLite answers SQLITE_BUSY at once, without its busy handler,
        # when another process is doing the same: retry until the busy timeout. WAL persists in
        # the file, so later connections only read the mode.
        deadline = time.monotonic() + self.busy_timeout
        while True:
            try:
                if conn.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal":
                    return
            except sqlite3.OperationalError:
                if time.monotonic() > deadline:
                    raise
            if time.monotonic() > deadline:
                raise sqlite3.OperationalError("could not switch the database to WAL")
            time.sleep(0.02)

    def begin_write(self, conn: Any, timeout: float) -> None:
        # BEGIN IMMEDIATE takes the database write lock up front, so read-check-write sequences
        # (the audit head, a handle rotation) are serialised across processes without
        # deadlock-retry loops; the busy handler waits for another process at most `timeout`.
        # Set only when it changes: rounded down to 100 ms (a deadline a little early, never
        # late), consecutive batches on one connection need no PRAGMA statement of their own.
        ms = max(1, int(timeout * 1000))
        if ms > 100:
            ms -= ms % 100
        if self._busy_conn is not conn or self._busy_ms != ms:
            conn.execute(f"PRAGMA busy_timeout = {ms}")
            self._busy_conn, self._busy_ms = conn, ms
        conn.execute("BEGIN IMMEDIATE")

    def begin_migration(self, conn: Any) -> None:
        self.begin_write(conn, self.busy_timeout)

    def table_exists(self, tx: Tx, name: str) -> bool:
        return bool(
            tx.rows("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,))
        )

    def to_db(self, value: datetime | None) -> Any:
        # Fixed-width UTC text: string order is time order, so comparisons in SQL are correct.
        if value is None:
            return None
        value = utc(value)
        if value.year >= 1000:  # isoformat: the same text, faster; glibc's %Y pads no year
            return value.isoformat(timespec="microseconds")[:-6] + "Z"
        return value.strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    def from_db(self, value: Any) -> datetime | None:
        if value is None:
            return None
        # Decision: to_db's own fixed-width text goes through fromisoformat (C, about 60x
        # cheaper than strptime, which a refresh ran six times); anything else keeps the strict
        # strptime parse, so what is accepted is unchanged.
        if isinstance(value, str) and _STORED_INSTANT.fullmatch(value):
            return datetime.fromisoformat(value[:-1]).replace(tzinfo=UTC)
        return datetime.strptime(value, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


class PostgresDialect(Dialect):
    """One PostgreSQL database through psycopg 3; `synchronous_commit=on` (commit = on disk)."""

    name = "postgresql"
    errors = (psycopg.Error, OSError)
    for_update = " FOR UPDATE"
    time_type = "TIMESTAMPTZ"
    queues_rows = True
    now_sql = "now()"  # the server's clock at the start of the transaction

    def sql(self, text: str) -> str:
        cached = self._sql_cache.get(text)
        if cached is None:
            cached = self._sql_cache[text] = text.replace("?", "%s")
        return cached

    def insert_rows(self, tx: Tx, insert: RowInsert, rows: Sequence[Sequence[Any]]) -> None:
        """One multi-row `INSERT ... VALUES (...), (...)`: one statement (prepared once per
        connection for each row count that recurs). Decision: not `SELECT FROM unnest(...)`
        of one array per column, one statement text for any count: psycopg builds array
        parameters in Python, which cost more client CPU than the statements saved (2-3x a
        VALUES insert of the same rows, measured)."""
        key = (insert.key, len(rows))
        sql = self._rows_sql.get(key)
        if sql is None:
            one = "(" + ", ".join(["%s"] * len(insert.columns)) + ")"
            sql = self._rows_sql[key] = (
                f"INSERT INTO {insert.table} ({', '.join(insert.columns)})"  # noqa: S608
                f" VALUES {', '.join([one] * len(rows))} {insert.tail}".rstrip()
            )
        tx.execute_now(sql, [value for row in rows for value in row])

    def connect(self) -> psycopg.Connection[Any]:
        # autocommit: transactions are opened with BEGIN explicitly, as on SQLite.
        conn = psycopg.connect(self._target, autocommit=True, connect_timeout=PG_CONNECT_TIMEOUT)
        try:
            conn.execute(f"SET statement_timeout = {PG_STATEMENT_TIMEOUT_MS}")
            conn.execute(f"SET lock_timeout = {PG_LOCK_TIMEOUT_MS}")
            conn.execute("SET synchronous_commit = on")
        except BaseException:
            conn.close()
            raise
        return conn

    def begin_write(self, conn: Any, timeout: float) -> None:
        # READ COMMITTED; writers that must see the latest state lock the row they read
        # (SELECT ... FOR UPDATE), which lock_timeout bounds.
        conn.execute("BEGIN")

    def pipelined(self, conn: Any) -> contextlib.AbstractContextManager[Any]:
        # Decision: a write batch is one pipeline. Statements whose result no step reads (the
        # inserts, the head update, BEGIN and COMMIT) are sent without waiting for an answer;
        # a step that reads (a row, a rowcount) waits for everything sent so far, once. Without a
        # pipeline every statement is a round trip: its own send, poll and receive, and the
        # thread giving up and taking back the interpreter lock while it waits. The pipeline's exit
        # waits for the last answer, the COMMIT's: a batch's callers still return only once
        # it is durable. An error the server reports surfaces at the next wait, perhaps in a
        # later step than the statement that caused it; every driver error fails the whole
        # batch anyway, so which step sees it does not matter.
        pipeline: contextlib.AbstractContextManager[Any] = conn.pipeline()
        return pipeline

    def begin_migration(self, conn: Any) -> None:
        conn.execute("BEGIN")
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))

    def table_exists(self, tx: Tx, name: str) -> bool:
        return tx.rows("SELECT to_regclass(?)", (name,))[0][0] is not None

    def is_connection_error(self, exc: BaseException) -> bool:
        # psycopg raises these when the server went away or the connection is closed.
        return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)

    def lost(self, conn: Any, exc: BaseException) -> bool:
        # An OperationalError is also a lock or statement timeout, on a connection still good.
        return self.is_connection_error(exc) and bool(conn.broken or conn.closed)

    def to_db(self, value: datetime | None) -> Any:
        return None if value is None else utc(value)

    def from_db(self, value: Any) -> datetime | None:
        return None if value is None else utc(value)


def utc(value: datetime) -> datetime:
    """`value` in UTC; naive times are refused (every stored time is an aware instant)."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError("stored times must be timezone-aware")
    return value.astimezone(UTC)


# A migration step: a SQL statement, or a function run in the migration's transaction.
Step = str | Callable[[Tx], None]


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    steps: tuple[Step, ...]


class _Write(Generic[T]):
    """One caller's write, waiting in the queue. `done` is a lock held until the write is
    finished (or its caller is made the next batch's leader): the cheapest one-shot signal."""

    __slots__ = (
        "deadline",
        "done",
        "error",
        "finished",
        "lead",
        "result",
        "started",
        "work",
    )

    def __init__(self, work: Callable[[Tx], T], deadline: float) -> None:
        self.work = work
        self.deadline = deadline
        self.done = threading.Lock()
        self.done.acquire()
        self.started = False
        self.lead = False  # woken to run the next batch rather than with its outcome
        self.finished = False
        self.result: Any = None
        self.error: BaseException | None = None


class Database:
    """Connections to one store, its group-committed writes, and its read pool."""

    def __init__(self, url: StoreURL, *, busy_timeout: float = BUSY_TIMEOUT) -> None:
        dialect_class = SqliteDialect if url.dialect == "sqlite" else PostgresDialect
        self.dialect: Dialect = dialect_class(url.target, busy_timeout)
        self.busy_timeout = busy_timeout
        self._idle: queue.LifoQueue[Any] = queue.LifoQueue(maxsize=_POOL_IDLE)
        # Guards the queue, the leader flag and `_closed`; held only for list operations.
        self._lock = threading.Lock()
        self._pending: list[_Write[Any]] = []
        self._leading = False  # a caller is running a batch (or has been woken to run one)
        self._writer_conn: Any = None
        self._checkpoint_conn: Any = None  # SQLite: checkpoint_wal's own connection
        self._closed = False
        self.commits = 0  # write transactions committed (one per batch): for tests and stats
        # Metrics hooks (broker/metrics.py): a committed batch's size and commit seconds, and
        # each write's seconds from submission until durable (or failed).
        self.on_batch: Callable[[int, float], None] | None = None
        self.on_write: Callable[[float], None] | None = None

    @classmethod
    def open(cls, url: str, *, busy_timeout: float = BUSY_TIMEOUT) -> Database:
        """Parse `url` (ValueError if unsupported); StoreUnavailable if the store is silent."""
        db = cls(StoreURL.parse(url), busy_timeout=busy_timeout)
        try:
            conn = db.dialect.connect()
        except db.dialect.errors as exc:
            raise StoreUnavailable("the store is unreachable") from exc
        db._checkin(conn)
        return db

    def __repr__(self) -> str:
        return f"Database({self.dialect.name})"  # never the URL: it may carry a password

    # -- writes --------------------------------------------------------------------------------

    def write(self, work: Callable[[Tx], T]) -> T:
        """Run `work` in a write transaction shared with concurrent writes; return once durable.

        `work` runs inside its own savepoint, on this thread or on the thread leading the batch
        it joined: if it raises, only its own statements are undone and the exception is raised
        here. Driver errors and missed deadlines raise StoreUnavailable, and then nothing `work`
        wrote is kept.
        """
        submitted = time.monotonic()
        item: _Write[T] = _Write(work, submitted + self.busy_timeout)
        with self._lock:
            if self._closed:
                raise StoreUnavailable("the store is closed")
            self._pending.append(item)
            lead = not self._leading
            if lead:
                self._leading = item.lead = True
        if not lead and not item.done.acquire(timeout=self.busy_timeout):
            with self._lock:
                if not item.started and not item.lead:
                    self._pending.remove(item)
                    raise StoreUnavailable("the store did not take the write within its deadline")
            # Started (its outcome is decided by one commit) or made the next leader: wait.
            item.done.acquire()
        if item.lead:
            self._lead(item)
        if self.on_write is not None:
            self.on_write(time.monotonic() - submitted)
        if item.error is not None:
            raise item.error
        result: T = item.result
        return result

    def _lead(self, own: _Write[Any]) -> None:
        """Run one batch (which holds `own`), then hand the lead to the first write queued."""
        with self._lock:
            batch = self._pending[:_MAX_BATCH]
            del self._pending[:_MAX_BATCH]
            for item in batch:
                item.started = True
        try:
            self._run_batch(batch, own)
        finally:
            for item in batch:
                if not item.finished:
                    # Only if _run_batch itself failed: no caller may wait forever.
                    self._finish(item, error=StoreUnavailable("the write was not run"))
            with self._lock:
                if self._pending:
                    successor = self._pending[0]
                    successor.lead = True
                    successor.done.release()
                else:
                    self._leading = False

    def _run_batch(self, batch: list[_Write[Any]], own: _Write[Any] | None = None) -> None:
        now = time.monotonic()
        live = []
        for item in batch:
            if item.deadline <= now:
                self._finish(
                    item, own, error=StoreUnavailable("the write waited past its deadline")
                )
            else:
                live.append(item)
        if not live:
            return
        timeout = min(item.deadline for item in live) - now
        try:
            outcomes = self._transact(live, timeout)
        except Exception as exc:  # the driver's, or anything else: no write of this batch is kept
            self._drop_writer_conn()
            for item in live:
                failure = StoreUnavailable("the store could not make the write durable")
                failure.__cause__ = exc
                self._finish(item, own, error=failure)
            return
        if self.on_batch is not None:
            self.on_batch(len(live), time.monotonic() - now)
        for item, (result, error) in zip(live, outcomes, strict=True):
            self._finish(item, own, result=result, error=error)

    def _transact(
        self, batch: list[_Write[Any]], timeout: float
    ) -> list[tuple[Any, BaseException | None]]:
        """Run the batch's writes in one transaction and commit; each write's (result, error).

        A write that raises refuses only itself. Decision: no savepoint per write. Writes
        almost never refuse themselves, and two extra statements per write (SAVEPOINT and
        RELEASE; on PostgreSQL two round trips) were a third of a batch's statements. A write
        that refuses after it wrote nothing is simply dropped (its held values rewound); one
        that refuses after writing makes the whole transaction roll back, and the others run
        again, without it, in a new one. Steps are functions of the transaction, so running
        one again is safe.
        """
        outcomes: dict[int, tuple[Any, BaseException | None]] = {}
        dialect = self.dialect
        retry = True
        while True:
            todo = [i for i in range(len(batch)) if i not in outcomes or outcomes[i][1] is None]
            if not todo:
                return [outcomes[i] for i in range(len(batch))]
            fresh = self._writer_conn is None
            if fresh:
                self._writer_conn = dialect.connect()
            conn = self._writer_conn
            ending = False  # COMMIT or ROLLBACK sent: from then on the outcome may be either
            try:
                with dialect.pipelined(conn) as pipeline:
                    dialect.begin_write(conn, timeout)
                    tx = Tx(conn, dialect, pipeline)
                    committed = self._run_writes(tx, batch, todo, outcomes)
                    if committed:
                        tx.settle()
                    ending = True
                    conn.execute("COMMIT" if committed else "ROLLBACK")
            except dialect.errors as exc:
                if retry and not fresh and not ending and dialect.lost(conn, exc):
                    # The server dropped this connection (a restart, an idle cut) before
                    # anything was committed: run the batch once more on a new one. (In a
                    # pipeline, BEGIN's failure shows only when a step first waits.) Any
                    # other error, a lock wait past lock_timeout among them, fails the batch.
                    retry = False
                    self._drop_writer_conn()
                    continue
                with contextlib.suppress(*dialect.errors):
                    conn.execute("ROLLBACK")
                raise
            except BaseException:
                with contextlib.suppress(*dialect.errors):
                    conn.execute("ROLLBACK")
                raise
            if committed:
                self.commits += 1
                return [outcomes[i] for i in range(len(batch))]

    def _run_writes(
        self,
        tx: Tx,
        batch: list[_Write[Any]],
        todo: list[int],
        outcomes: dict[int, tuple[Any, BaseException | None]],
    ) -> bool:
        """Run the writes `todo` in `tx`, recording each outcome; False if one refused after
        writing (the transaction must then roll back and the rest run again)."""
        for index in todo:
            mark, executed = tx.mark(), tx.executed
            try:
                outcomes[index] = (batch[index].work(tx), None)
            except self.dialect.errors:
                raise  # the store failed, not this write: the whole batch fails
            except Exception as exc:
                # This write refused itself (a check failed, an event could not be encoded).
                outcomes[index] = (None, exc)
                if tx.executed != executed:
                    return False
                tx.rewind(mark)
        return True

    def _finish(
        self,
        item: _Write[Any],
        own: _Write[Any] | None = None,
        result: Any = None,
        error: BaseException | None = None,
    ) -> None:
        item.result, item.error, item.finished = result, error, True
        if item is not own:  # the leader's own caller is not waiting: it is running the batch
            item.done.release()

    def _drop_writer_conn(self) -> None:
        conn, self._writer_conn = self._writer_conn, None
        if conn is not None:
            _discard(conn)

    # -- reads ---------------------------------------------------------------------------------

    def read(self, work: Callable[[Tx], T]) -> T:
        """Run `work` in a read transaction on a pooled connection; map failures."""
        end = "COMMIT" if self.dialect.name == "postgresql" else "ROLLBACK"

        def transaction(conn: Any) -> T:
            conn.execute("BEGIN")
            try:
                return work(Tx(conn, self.dialect))
            finally:
                conn.execute(end)

        return self._pooled(transaction)

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """The rows of one SELECT run on its own, on a pooled connection; map failures.

        Decision: no explicit transaction. One statement sees one snapshot by itself (the
        connections are in autocommit mode on both dialects), so the BEGIN and ROLLBACK around
        it in `read` are two statements (on PostgreSQL two round trips) that add nothing: a
        refresh made two such reads, a fifth of its statements.
        """

        def statement(conn: Any) -> list[Any]:
            return Tx(conn, self.dialect).rows(sql, params)

        return self._pooled(statement)

    def _pooled(self, use: Callable[[Any], T]) -> T:
        """`use(conn)` on a pooled connection (a fresh one if the pooled one turns out gone)."""
        dialect = self.dialect
        if self._closed:
            raise StoreUnavailable("the store is closed")
        for attempt in (1, 2):
            try:
                conn, pooled = self._checkout(fresh=attempt > 1)
            except dialect.errors as exc:
                raise StoreUnavailable("the store is unreachable") from exc
            try:
                result = use(conn)
            except dialect.errors as exc:
                _discard(conn)
                if pooled and attempt == 1 and dialect.is_connection_error(exc):
                    self._drain()
                    continue
                raise StoreUnavailable("the store could not be read") from exc
            except BaseException:
                _discard(conn)
                raise
            self._checkin(conn)
            return result
        raise AssertionError("unreachable")  # pragma: no cover

    def _checkout(self, fresh: bool) -> tuple[Any, bool]:
        if not fresh:
            try:
                return self._idle.get_nowait(), True
            except queue.Empty:
                pass
        return self.dialect.connect(), False

    def _checkin(self, conn: Any) -> None:
        if self._closed:
            _discard(conn)
            return
        try:
            self._idle.put_nowait(conn)
        except queue.Full:
            _discard(conn)

    def _drain(self) -> None:
        while True:
            try:
                _discard(self._idle.get_nowait())
            except queue.Empty:
                return

    # -- schema --------------------------------------------------------------------------------

    def migrate(self, table: str, migrations: Sequence[Migration], clock: Callable[[], str]) -> int:
        """Apply the `migrations` not yet recorded in `table`; return the schema version.

        Safe when several brokers start at once (SQLite: the write lock; PostgreSQL: an
        advisory lock). A database whose version is newer than the code's is refused.
        """
        dialect = self.dialect
        latest = migrations[-1].version
        try:
            conn = dialect.connect()
        except dialect.errors as exc:
            raise StoreUnavailable("the store is unreachable") from exc
        try:
            dialect.begin_migration(conn)
            try:
                tx = Tx(conn, dialect)
                if not dialect.table_exists(tx, table):
                    tx.execute(
                        f"CREATE TABLE {table} (version INTEGER PRIMARY KEY,"
                        " name TEXT NOT NULL, applied_at TEXT NOT NULL)"
                    )
                current = int(tx.rows(f"SELECT MAX(version) FROM {table}")[0][0] or 0)  # noqa: S608
                if current > latest:
                    raise StoreUnavailable(
                        f"{table}: schema version {current} is newer than this broker's {latest}"
                    )
                for migration in migrations:
                    if migration.version <= current:
                        continue
                    for step in migration.steps:
                        if isinstance(step, str):
                            tx.execute(step.replace("{time}", dialect.time_type))
                        else:
                            step(tx)
                    tx.execute(
                        f"INSERT INTO {table} (version, name, applied_at) VALUES (?, ?, ?)",  # noqa: S608
                        (migration.version, migration.name, clock()),
                    )
                tx.settle()
                conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(*dialect.errors):
                    conn.execute("ROLLBACK")
                raise
        except dialect.errors as exc:
            raise StoreUnavailable(f"{table}: schema migration failed") from exc
        finally:
            _discard(conn)
        return max(current, latest)

    # -- lifecycle -----------------------------------------------------------------------------

    # -- the SQLite write-ahead log ---------------------------------------------------------

    def checkpoint_in_background(self) -> bool:
        """Stop commits from checkpointing the SQLite WAL: the caller runs `checkpoint_wal`
        now and then instead. False (nothing changed) for PostgreSQL.

        Decision: SQLite checkpoints by default inside the commit that takes the WAL past
        1,000 pages, so every fiftieth or so exchange waited for a checkpoint (pages copied
        into the database file and an fsync of it) before its answer: 10-60 ms at c1 where
        the median is 3. A checkpoint on another connection does the same work off every
        request's path; PASSIVE never waits for a writer or a reader.
        """
        if not isinstance(self.dialect, SqliteDialect):
            return False
        self.dialect.autocheckpoint = False  # for every connection made from now on
        with self._lock:
            # Meant for start-up, before requests: a writer connection busy with a batch now
            # keeps checkpointing until it is replaced.
            if self._writer_conn is not None and not self._leading:
                self._writer_conn.execute("PRAGMA wal_autocheckpoint=0")
        return True

    def checkpoint_wal(self) -> tuple[int, int, int]:
        """A PASSIVE checkpoint of the SQLite WAL: (busy, WAL frames, frames checkpointed)."""
        if self._checkpoint_conn is None:
            self._checkpoint_conn = self.dialect.connect()
        row = self._checkpoint_conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        return int(row[0]), int(row[1]), int(row[2])

    def close(self) -> None:
        """Finish queued writes, close every connection; later calls fail."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        # Writes already queued still run: wait for the last batch's leader to finish.
        deadline = time.monotonic() + self.busy_timeout + 1
        while self._leading and time.monotonic() < deadline:
            time.sleep(0.001)
        self._drop_writer_conn()
        if self._checkpoint_conn is not None:
            _discard(self._checkpoint_conn)
            self._checkpoint_conn = None
        self._drain()


def _discard(conn: Any) -> None:
    # Closing a connection that may already be broken is best effort.
    with contextlib.suppress(Exception):
        conn.close()
