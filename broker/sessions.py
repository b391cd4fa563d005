"""Replay ledger and refresh sessions: the broker's shared state (issue 3).

Owns two things and their tables in the audit store's database (SQLite via `sqlite3`, or
PostgreSQL via psycopg 3; the audit ledger's own tables are prefixed `audit_`, ours `replay_`
and `session_`):

- `ReplayLedger`: each (issuer, jti) is consumed once. The primary key decides, so the answer is
  the same for many threads in one broker and for several brokers sharing one PostgreSQL.
- `SessionStore`: refresh sessions. A session is bound to the identity (issuer, subject, claims)
  of the token that opened it and hands out opaque, rotating refresh handles. Only
  sha256(handle) is stored. Presenting an old handle ends the whole session (OAuth 2.1 refresh
  token rotation, draft-ietf-oauth-v2-1 section 4.3.1 / RFC 9700 section 4.14.2): one of the two
  holders of a handle is an attacker and the broker cannot tell which, so both lose it.

Every database failure becomes `StateUnavailable`, and the broker answers 503 without issuing:
a replay ledger that cannot be read cannot prove a token unused (HOSTILE.md F12, fail closed).
No function here reads the clock; every time is a `now` parameter (aware UTC).
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import json
import queue
import secrets
import sqlite3
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any, Protocol, TypeVar
from urllib.parse import unquote, urlsplit

import psycopg

T = TypeVar("T")

HANDLE_PREFIX = "lcr_"  # "luigi-creds refresh": lets secret scanners and log filters spot handles
SESSION_ID_PREFIX = "lcs_"
# secrets.token_urlsafe(32): 256 bits of randomness, 43 characters.
_HANDLE_BYTES = 32
# A handle we issued is 47 characters; anything much longer is not ours and is not hashed.
_MAX_HANDLE_CHARS = 128
# How often a ReplayLedger deletes rows past their expiry, measured on the callers' `now`.
_PURGE_EVERY = timedelta(seconds=60)
# SQLite: how long a writer waits for another writer's lock before we call the store unavailable.
_SQLITE_BUSY_SECONDS = 2.0  # state writes take milliseconds; beyond this the store is hung
# PostgreSQL: connection attempts give up after this (seconds, libpq connect_timeout).
_PG_CONNECT_TIMEOUT = 5
# Idle connections kept per store; more concurrent callers open (and then close) extra ones.
_POOL_IDLE = 8

REASON_REUSE = "reuse_detected"


class StateUnavailable(Exception):
    """The state database cannot answer now; the broker fails closed with 503 (HOSTILE F12)."""


class SessionError(Exception):
    """A refresh handle that mints nothing: `reason` is unknown, expired, reused or revoked.

    `session` is the session the handle belonged to (None when "unknown"), so the caller can
    audit the session id and, after "reused", revoke the credentials recorded under it.
    """

    def __init__(self, reason: str, session: Session | None = None) -> None:
        self.reason = reason
        self.session = session
        super().__init__(reason)


@dataclass(frozen=True)
class Session:
    """One refresh session as stored; `generation` counts the handles issued so far."""

    id: str
    issuer: str
    subject: str
    claims: Mapping[str, Any]
    created_at: datetime
    expires_at: datetime
    generation: int
    revoked_at: datetime | None
    revoked_reason: str
    key_thumbprint: str | None  # reserved for DPoP (RFC 9449) binding: the job key's JWK thumbprint

    def active(self, now: datetime) -> bool:
        return self.revoked_at is None and now < self.expires_at


def handle_hash(handle: str) -> str:
    """The only form of a refresh handle that is ever stored or logged: hex sha256."""
    return hashlib.sha256(handle.encode("utf-8", "surrogatepass")).hexdigest()


def canonical_claims(claims: Mapping[str, Any]) -> str:
    """Claims as canonical JSON: sorted keys, no whitespace, UTF-8; one text per claim set."""
    return json.dumps(claims, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


# ---------------------------------------------------------------------------------------------
# Database access: one small interface over sqlite3 and psycopg


class _Cursor(Protocol):
    rowcount: int

    def execute(self, sql: str, params: Sequence[Any] = ...) -> Any: ...
    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...


class _Database:
    """A pool of connections to one database and a transaction runner that maps failures.

    `run(work)` calls `work(cursor)` inside one transaction and commits. If a pooled connection
    turns out dead before COMMIT was sent (the server restarted, an idle connection was cut),
    nothing was written, so the transaction is retried once on a fresh connection. A failure
    during COMMIT is never retried: its outcome is unknown, and a retried rotation could look
    like reuse.
    """

    dialect: str
    # SQL is written with `?`; PostgreSQL wants `%s`.
    placeholder = "?"
    for_update = ""

    def __init__(self) -> None:
        self._idle: queue.LifoQueue[Any] = queue.LifoQueue(maxsize=_POOL_IDLE)
        self._closed = False

    def connect(self) -> Any:
        raise NotImplementedError

    def begin(self, conn: Any, write: bool) -> None:
        raise NotImplementedError

    def errors(self) -> tuple[type[BaseException], ...]:
        raise NotImplementedError

    def to_db(self, value: datetime | None) -> Any:
        raise NotImplementedError

    def from_db(self, value: Any) -> datetime | None:
        raise NotImplementedError

    def prepare(self) -> None:
        """Once per process, before the first transaction."""

    def sql(self, text: str) -> str:
        return text.replace("?", "%s") if self.placeholder == "%s" else text

    def _checkout(self, fresh: bool) -> tuple[Any, bool]:
        if not fresh:
            try:
                return self._idle.get_nowait(), True
            except queue.Empty:
                pass
        return self.connect(), False

    def _checkin(self, conn: Any) -> None:
        if self._closed:
            conn.close()
            return
        try:
            self._idle.put_nowait(conn)
        except queue.Full:
            conn.close()

    # SQLite: one in-process queue in front of the database write lock. Threads that wait in
    # SQLite's busy handler sleep in steps of up to 100 ms; a queue hands the lock on at once
    # (measured in bench/: the 8-thread p99 of an exchange fell about threefold).
    _write_queue: threading.Lock | None = None

    def run(self, work: Callable[[_Cursor], T], *, write: bool = True) -> T:
        queue_lock = self._write_queue if write else None
        if queue_lock is None:
            return self._run(work, write)
        if not queue_lock.acquire(timeout=_SQLITE_BUSY_SECONDS):
            raise StateUnavailable("state database busy")
        try:
            return self._run(work, write)
        finally:
            queue_lock.release()

    def _run(self, work: Callable[[_Cursor], T], write: bool) -> T:
        errors = self.errors()
        for attempt in (1, 2):
            try:
                conn, pooled = self._checkout(fresh=attempt > 1)
            except errors as exc:
                raise StateUnavailable("state database unreachable") from exc
            committing = False
            try:
                self.begin(conn, write)
                cur = conn.cursor()
                try:
                    result = work(cur)
                finally:
                    cur.close()
                committing = True
                conn.commit()
            except errors as exc:
                _discard(conn)
                if pooled and attempt == 1 and not committing and _is_connection_error(exc):
                    # The server dropped this connection, so likely every idle one (a restart):
                    # drop them all and retry once on a new connection.
                    self._drain()
                    continue
                raise StateUnavailable("state database failed") from exc
            except BaseException:
                try:
                    conn.rollback()
                except errors:
                    _discard(conn)
                else:
                    self._checkin(conn)
                raise
            self._checkin(conn)
            return result
        raise AssertionError("unreachable")  # pragma: no cover

    def _drain(self) -> None:
        while True:
            try:
                _discard(self._idle.get_nowait())
            except queue.Empty:
                return

    def close(self) -> None:
        self._closed = True
        self._drain()


def _discard(conn: Any) -> None:
    # The connection is already suspect; closing it is best effort.
    with contextlib.suppress(Exception):
        conn.close()


def _is_connection_error(exc: BaseException) -> bool:
    # psycopg marks a connection broken when the server went away; SQLite has no such case.
    return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)


class _Sqlite(_Database):
    dialect = "sqlite"

    def __init__(self, path: str) -> None:
        super().__init__()
        self._path = path
        self._write_queue = threading.Lock()

    def connect(self) -> sqlite3.Connection:
        # isolation_level=None: we issue BEGIN ourselves. check_same_thread=False: a pooled
        # connection is used by one thread at a time, never concurrently.
        conn = sqlite3.connect(
            self._path,
            timeout=_SQLITE_BUSY_SECONDS,
            isolation_level=None,
            check_same_thread=False,
        )
        conn.execute("PRAGMA foreign_keys = ON")
        return conn

    def prepare(self) -> None:
        # WAL lets readers proceed while one writer holds the lock; it persists in the file and
        # cannot be switched inside a transaction.
        try:
            conn = self.connect()
            try:
                conn.execute("PRAGMA journal_mode=WAL")
            finally:
                conn.close()
        except sqlite3.Error as exc:
            raise StateUnavailable("state database unreachable") from exc

    def begin(self, conn: Any, write: bool) -> None:
        # BEGIN IMMEDIATE takes the database write lock up front, so read-check-write sequences
        # (rotation) are serialised across threads and processes without deadlock-retry loops.
        conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")

    def errors(self) -> tuple[type[BaseException], ...]:
        return (sqlite3.Error,)

    def to_db(self, value: datetime | None) -> Any:
        # Fixed-width UTC text: string order is time order, so comparisons in SQL are correct.
        return None if value is None else _utc(value).strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    def from_db(self, value: Any) -> datetime | None:
        if value is None:
            return None
        return datetime.strptime(value, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


class _Postgres(_Database):
    dialect = "postgresql"
    placeholder = "%s"
    for_update = " FOR UPDATE"

    def __init__(self, url: str) -> None:
        super().__init__()
        self._url = url

    def connect(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self._url, connect_timeout=_PG_CONNECT_TIMEOUT)

    def begin(self, conn: Any, write: bool) -> None:
        # psycopg opens the transaction implicitly on the first statement (READ COMMITTED);
        # rotation takes a row lock with SELECT ... FOR UPDATE.
        return

    def errors(self) -> tuple[type[BaseException], ...]:
        return (psycopg.Error,)

    def to_db(self, value: datetime | None) -> Any:
        return None if value is None else _utc(value)

    def from_db(self, value: Any) -> datetime | None:
        return None if value is None else _utc(value)


def _utc(value: datetime) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError("state times must be timezone-aware")
    return value.astimezone(UTC)


# One schema for both databases; `{time}` is the column type of an aware instant: fixed-width
# UTC text on SQLite (string order is time order), TIMESTAMPTZ on PostgreSQL.
_TABLES = [
    """CREATE TABLE IF NOT EXISTS replay_tokens (
        issuer TEXT NOT NULL,
        token_hash TEXT NOT NULL,
        expires_at {time} NOT NULL,
        PRIMARY KEY (issuer, token_hash))""",
    "CREATE INDEX IF NOT EXISTS replay_tokens_expires ON replay_tokens (expires_at)",
    """CREATE TABLE IF NOT EXISTS session_sessions (
        id TEXT PRIMARY KEY,
        issuer TEXT NOT NULL,
        subject TEXT NOT NULL,
        claims TEXT NOT NULL,
        created_at {time} NOT NULL,
        expires_at {time} NOT NULL,
        generation INTEGER NOT NULL,
        revoked_at {time},
        revoked_reason TEXT NOT NULL DEFAULT '',
        key_thumbprint TEXT)""",
    """CREATE INDEX IF NOT EXISTS session_sessions_identity
        ON session_sessions (issuer, subject)""",
    """CREATE TABLE IF NOT EXISTS session_handles (
        handle_hash TEXT PRIMARY KEY,
        session_id TEXT NOT NULL REFERENCES session_sessions (id) ON DELETE CASCADE,
        generation INTEGER NOT NULL,
        issued_at {time} NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS session_handles_session ON session_handles (session_id)",
    """CREATE TABLE IF NOT EXISTS session_credentials (
        session_id TEXT NOT NULL REFERENCES session_sessions (id) ON DELETE CASCADE,
        kind TEXT NOT NULL,
        ref TEXT NOT NULL,
        expires_at {time},
        PRIMARY KEY (session_id, kind, ref))""",
]
_SCHEMA = {
    "sqlite": [t.format(time="TEXT") for t in _TABLES],
    "postgresql": [
        # Several brokers may start at once; CREATE ... IF NOT EXISTS alone races on the
        # catalogue, so start-up DDL runs under one transaction-scoped advisory lock.
        # 0x6c63735f = "lcs_"; any constant shared by all brokers works.
        "SELECT pg_advisory_xact_lock(1818456927)",
        *(t.format(time="TIMESTAMPTZ") for t in _TABLES),
    ],
}


def _open_database(url: str) -> _Database:
    parts = urlsplit(url)
    if parts.scheme == "sqlite":
        # sqlite:///abs/path.db -> /abs/path.db (the audit store's form, SPEC.md)
        path = unquote(parts.path)
        if not path or parts.netloc:
            raise ValueError("expected sqlite:///absolute/path.db")
        return _Sqlite(path)
    if parts.scheme in ("postgresql", "postgres"):
        return _Postgres(url)
    # NOTE: the URL is not echoed: a postgresql:// URL may carry a password.
    raise ValueError("state store URL must be sqlite:///path or postgresql://...")


def open_state(url: str) -> tuple[ReplayLedger, SessionStore]:
    """Open the replay ledger and session store in the database at `url`; create tables.

    `url` is the `[broker] audit_store` value. Raises StateUnavailable if the database cannot
    be reached or prepared, ValueError if the URL is not one we support. Both objects share one
    connection pool; `close()` on either closes it (later calls still work, unpooled).
    """
    db = _open_database(url)
    statements = _SCHEMA[db.dialect]

    def create(cur: _Cursor) -> None:
        for statement in statements:
            cur.execute(statement)

    db.prepare()
    db.run(create)
    return ReplayLedger(db), SessionStore(db)


# ---------------------------------------------------------------------------------------------
# Replay ledger


class ReplayLedger:
    """Consume-once ledger of (issuer, token id); rows live until the token could verify no more."""

    def __init__(self, db: _Database) -> None:
        self._db = db
        self._lock = threading.Lock()
        self._last_purge: datetime | None = None

    def consume(self, issuer: str, token_id: str, *, expires_at: datetime, now: datetime) -> bool:
        """True the first time (issuer, token_id) is seen, False on every later call anywhere.

        `expires_at` is the token's exp plus the verification leeway: until then a replay would
        still verify, so the row must be kept at least that long. `token_id` is the jti, or the
        token's sha256 for issuers that send none; it is stored hashed so an 8 KiB jti cannot
        bloat the index (HOSTILE F15). Raises StateUnavailable.
        """
        now, expires_at = _utc(now), _utc(expires_at)
        db = self._db
        key = hashlib.sha256(token_id.encode("utf-8", "surrogatepass")).hexdigest()
        purge = self._purge_due(now)
        insert = db.sql(
            "INSERT INTO replay_tokens (issuer, token_hash, expires_at) VALUES (?, ?, ?) "
            "ON CONFLICT (issuer, token_hash) DO NOTHING"
        )
        delete = db.sql("DELETE FROM replay_tokens WHERE expires_at <= ?")

        def work(cur: _Cursor) -> bool:
            if purge:
                # Purged rows are past exp + leeway: the token no longer verifies, so forgetting
                # it cannot let a replay through.
                cur.execute(delete, (db.to_db(now),))
            cur.execute(insert, (issuer, key, db.to_db(expires_at)))
            return cur.rowcount == 1

        return db.run(work)

    def release(self, issuer: str, token_id: str) -> None:
        """Forget a consumption whose exchange issued nothing (upstream or audit failed first).

        Safe against replay: only a token that produced no credential is released, so the token
        still yields at most one issuance; the CI job can retry with the token it cannot renew.
        """
        db = self._db
        key = hashlib.sha256(token_id.encode("utf-8", "surrogatepass")).hexdigest()

        def work(cur: _Cursor) -> None:
            cur.execute(
                db.sql("DELETE FROM replay_tokens WHERE issuer = ? AND token_hash = ?"),
                (issuer, key),
            )

        db.run(work)

    def purge(self, *, now: datetime) -> int:
        """Delete every row whose expiry has passed; return how many went."""
        db = self._db

        def work(cur: _Cursor) -> int:
            cur.execute(db.sql("DELETE FROM replay_tokens WHERE expires_at <= ?"), (db.to_db(now),))
            return max(cur.rowcount, 0)

        return db.run(work)

    def _purge_due(self, now: datetime) -> bool:
        with self._lock:
            if self._last_purge is not None and now - self._last_purge < _PURGE_EVERY:
                return False
            self._last_purge = now
            return True

    def close(self) -> None:
        self._db.close()


# ---------------------------------------------------------------------------------------------
# Refresh sessions

_SESSION_COLUMNS = (
    "id, issuer, subject, claims, created_at, expires_at, generation, revoked_at, "
    "revoked_reason, key_thumbprint"
)
# Every SQL text here is built from constants and fixed column names; values are always bound.
_SELECT_SESSIONS = f"SELECT {_SESSION_COLUMNS} FROM session_sessions"  # noqa: S608
_INSERT_SESSION = (
    f"INSERT INTO session_sessions ({_SESSION_COLUMNS}) "  # noqa: S608
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


class SessionStore:
    """Refresh sessions with rotating handles, reuse detection and revocation.

    Sessions end at `expires_at` (the caller bounds it by session_max and the original token),
    on revocation, or on reuse of an old handle. Ended sessions stay listed until `purge`.
    """

    def __init__(self, db: _Database) -> None:
        self._db = db

    # -- lifecycle ---------------------------------------------------------------------------

    def create(
        self,
        *,
        issuer: str,
        subject: str,
        claims: Mapping[str, Any],
        now: datetime,
        expires_at: datetime,
        key_thumbprint: str | None = None,
    ) -> tuple[Session, str]:
        """Open a session; return it and its first refresh handle (generation 1)."""
        db = self._db
        session = Session(
            id=SESSION_ID_PREFIX + secrets.token_urlsafe(16),
            issuer=issuer,
            subject=subject,
            claims=MappingProxyType(json.loads(canonical_claims(claims))),
            created_at=_utc(now),
            expires_at=_utc(expires_at),
            generation=1,
            revoked_at=None,
            revoked_reason="",
            key_thumbprint=key_thumbprint,
        )
        handle = _new_handle()

        def work(cur: _Cursor) -> None:
            cur.execute(
                db.sql(_INSERT_SESSION),
                (
                    session.id,
                    issuer,
                    subject,
                    canonical_claims(claims),
                    db.to_db(session.created_at),
                    db.to_db(session.expires_at),
                    1,
                    None,
                    "",
                    key_thumbprint,
                ),
            )
            self._insert_handle(cur, session.id, handle, 1, now)

        db.run(work)
        return session, handle

    def rotate(
        self, handle: str, *, now: datetime, max_idle: timedelta | None = None
    ) -> tuple[Session, str]:
        """Spend `handle` and return the session with its next handle, atomically.

        Raises SessionError: "unknown" (never issued), "revoked", "expired" (now >= expires_at,
        or the handle sat unused longer than `max_idle`), or "reused": the handle is an older
        generation, so the whole session is revoked (reason "reuse_detected") before raising.
        Two concurrent rotations of one handle: the session row lock orders them; the first
        wins, the second finds an old generation and is treated as reuse, which ends the
        session. That is the OAuth 2.1 rotation rule; a client must never race itself.
        """
        now = _utc(now)
        db = self._db
        presented = _lookup_key(handle)
        if presented is None:
            raise SessionError("unknown")
        successor = _new_handle()
        select = db.sql(_SELECT_SESSIONS + " WHERE id = ?")
        select += db.for_update

        def work(cur: _Cursor) -> tuple[Session | None, str]:
            found = self._find_handle(cur, presented)
            if found is None:
                return None, "unknown"
            session_id, generation, issued_at = found
            cur.execute(select, (session_id,))
            session = self._row(cur.fetchone())
            if session.revoked_at is not None:
                return session, "revoked"
            if now >= session.expires_at or _idle_too_long(issued_at, now, max_idle):
                return session, "expired"
            if generation != session.generation:
                ended = self._revoke_ids(cur, [session.id], REASON_REUSE, now)
                return (ended[0] if ended else session), "reused"
            cur.execute(
                db.sql("UPDATE session_sessions SET generation = ? WHERE id = ?"),
                (session.generation + 1, session.id),
            )
            self._insert_handle(cur, session.id, successor, session.generation + 1, now)
            return replace(session, generation=session.generation + 1), ""

        session, reason = db.run(work)
        if reason or session is None:
            raise SessionError(reason or "unknown", session)
        return session, successor

    def peek(self, handle: str, *, now: datetime, max_idle: timedelta | None = None) -> Session:
        """Validate `handle` without spending it (for /v1/revoke and introspection).

        Raises SessionError like `rotate`, except that an old generation raises "reused"
        without revoking: peeking changes nothing.
        """
        now = _utc(now)
        db = self._db
        presented = _lookup_key(handle)
        if presented is None:
            raise SessionError("unknown")
        select = db.sql(_SELECT_SESSIONS + " WHERE id = ?")

        def work(cur: _Cursor) -> tuple[Session | None, str]:
            found = self._find_handle(cur, presented)
            if found is None:
                return None, "unknown"
            session_id, generation, issued_at = found
            cur.execute(select, (session_id,))
            session = self._row(cur.fetchone())
            if session.revoked_at is not None:
                return session, "revoked"
            if now >= session.expires_at or _idle_too_long(issued_at, now, max_idle):
                return session, "expired"
            if generation != session.generation:
                return session, "reused"
            return session, ""

        session, reason = db.run(work, write=False)
        if reason or session is None:
            raise SessionError(reason or "unknown", session)
        return session

    def revoke(
        self,
        *,
        session_id: str | None = None,
        subject: str | None = None,
        issuer: str | None = None,
        handle: str | None = None,
        reason: str,
        now: datetime,
    ) -> builtins.list[Session]:
        """End the active sessions matching every filter given; return them as they now stand.

        At least one filter is required: revoking every session takes an explicit choice of
        issuer. A handle of any generation names its session. Already-ended sessions are left
        as they are and not returned.
        """
        if session_id is None and subject is None and issuer is None and handle is None:
            raise ValueError("revoke needs session_id, subject, issuer or handle")
        now = _utc(now)
        db = self._db
        presented = _lookup_key(handle) if handle is not None else None
        if handle is not None and presented is None:
            # Not one of our handles: it names no session (and must not widen to "all").
            return []

        def work(cur: _Cursor) -> builtins.list[Session]:
            where, params = ["revoked_at IS NULL", "expires_at > ?"], [db.to_db(now)]
            if presented is not None:
                found = self._find_handle(cur, presented)
                if found is None:
                    return []
                where.append("id = ?")
                params.append(found[0])
            for column, value in (("id", session_id), ("subject", subject), ("issuer", issuer)):
                if value is not None:
                    where.append(f"{column} = ?")
                    params.append(value)
            cur.execute(
                db.sql(
                    f"SELECT id FROM session_sessions WHERE {' AND '.join(where)}"  # noqa: S608
                    f" ORDER BY created_at, id{db.for_update}"
                ),
                params,
            )
            ids = [row[0] for row in cur.fetchall()]
            return self._revoke_ids(cur, ids, reason, now)

        return db.run(work)

    def list(
        self,
        *,
        active_only: bool = True,
        subject: str | None = None,
        issuer: str | None = None,
        now: datetime,
    ) -> builtins.list[Session]:
        """Sessions oldest first; `active_only` drops revoked and expired ones."""
        db = self._db
        where: builtins.list[str] = []
        params: builtins.list[Any] = []
        if active_only:
            where += ["revoked_at IS NULL", "expires_at > ?"]
            params.append(db.to_db(now))
        for column, value in (("subject", subject), ("issuer", issuer)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        sql = db.sql(f"{_SELECT_SESSIONS}{clause} ORDER BY created_at, id")

        def work(cur: _Cursor) -> builtins.list[Session]:
            cur.execute(sql, params)
            return [self._row(row) for row in cur.fetchall()]

        return db.run(work, write=False)

    def get(self, session_id: str) -> Session | None:
        """The session with this id, whatever its state, or None."""
        db = self._db
        sql = db.sql(_SELECT_SESSIONS + " WHERE id = ?")

        def work(cur: _Cursor) -> Session | None:
            cur.execute(sql, (session_id,))
            row = cur.fetchone()
            return None if row is None else self._row(row)

        return db.run(work, write=False)

    # -- credentials minted under a session ---------------------------------------------------

    def record_credential(
        self, session_id: str, *, kind: str, ref: str, expires_at: datetime | None
    ) -> None:
        """Remember a revocable credential (Vault accessor, lease id) minted under a session.

        `ref` is what revocation needs (never the secret itself). Recording twice is a no-op.
        """
        db = self._db
        sql = db.sql(
            "INSERT INTO session_credentials (session_id, kind, ref, expires_at) "
            "VALUES (?, ?, ?, ?) ON CONFLICT (session_id, kind, ref) DO NOTHING"
        )

        def work(cur: _Cursor) -> None:
            cur.execute(sql, (session_id, kind, ref, db.to_db(expires_at)))

        db.run(work)

    def credentials(
        self, session_id: str, *, now: datetime | None = None
    ) -> builtins.list[tuple[str, str]]:
        """(kind, ref) of credentials to revoke when the session ends, in recording order.

        With `now`, credentials that have already expired on their own are left out.
        """
        db = self._db
        sql = "SELECT kind, ref FROM session_credentials WHERE session_id = ?"
        params: builtins.list[Any] = [session_id]
        if now is not None:
            sql += " AND (expires_at IS NULL OR expires_at > ?)"
            params.append(db.to_db(now))
        # NOTE: the rowid/ctid is not portable; (kind, ref) order is stable and good enough for
        # a revocation list.
        sql = db.sql(sql + " ORDER BY kind, ref")

        def work(cur: _Cursor) -> builtins.list[tuple[str, str]]:
            cur.execute(sql, params)
            return [(str(kind), str(ref)) for kind, ref in cur.fetchall()]

        return db.run(work, write=False)

    def purge(self, *, before: datetime) -> int:
        """Delete sessions (with their handles and credentials) that ended before `before`.

        Keep ended sessions for as long as operators want to list them; the audit log, not
        this table, is the record of what happened.
        """
        db = self._db
        sql = db.sql(
            "DELETE FROM session_sessions WHERE expires_at <= ? "
            "OR (revoked_at IS NOT NULL AND revoked_at <= ?)"
        )

        def work(cur: _Cursor) -> int:
            cur.execute(sql, (db.to_db(before), db.to_db(before)))
            return max(cur.rowcount, 0)

        return db.run(work)

    def close(self) -> None:
        self._db.close()

    # -- helpers -------------------------------------------------------------------------------

    def _insert_handle(
        self, cur: _Cursor, session_id: str, handle: str, generation: int, now: datetime
    ) -> None:
        db = self._db
        cur.execute(
            db.sql(
                "INSERT INTO session_handles (handle_hash, session_id, generation, issued_at) "
                "VALUES (?, ?, ?, ?)"
            ),
            (handle_hash(handle), session_id, generation, db.to_db(now)),
        )

    def _find_handle(self, cur: _Cursor, key: str | None) -> tuple[str, int, datetime] | None:
        if key is None:
            return None
        db = self._db
        cur.execute(
            db.sql(
                "SELECT session_id, generation, issued_at FROM session_handles "
                "WHERE handle_hash = ?"
            ),
            (key,),
        )
        row = cur.fetchone()
        if row is None:
            return None
        issued_at = db.from_db(row[2])
        assert issued_at is not None
        return str(row[0]), int(row[1]), issued_at

    def _revoke_ids(
        self, cur: _Cursor, ids: builtins.list[str], reason: str, now: datetime
    ) -> builtins.list[Session]:
        db = self._db
        ended: builtins.list[Session] = []
        update = db.sql(
            "UPDATE session_sessions SET revoked_at = ?, revoked_reason = ? "
            "WHERE id = ? AND revoked_at IS NULL"
        )
        select = db.sql(_SELECT_SESSIONS + " WHERE id = ?")
        for session_id in ids:
            cur.execute(update, (db.to_db(now), reason, session_id))
            if cur.rowcount == 1:
                cur.execute(select, (session_id,))
                ended.append(self._row(cur.fetchone()))
        return ended

    def _row(self, row: Sequence[Any]) -> Session:
        db = self._db
        created_at, expires_at = db.from_db(row[4]), db.from_db(row[5])
        assert created_at is not None and expires_at is not None
        return Session(
            id=str(row[0]),
            issuer=str(row[1]),
            subject=str(row[2]),
            claims=MappingProxyType(json.loads(row[3])),
            created_at=created_at,
            expires_at=expires_at,
            generation=int(row[6]),
            revoked_at=db.from_db(row[7]),
            revoked_reason=str(row[8]),
            key_thumbprint=None if row[9] is None else str(row[9]),
        )


def _new_handle() -> str:
    return HANDLE_PREFIX + secrets.token_urlsafe(_HANDLE_BYTES)


def _lookup_key(handle: str) -> str | None:
    # Something that cannot be one of our handles is "unknown" without touching the database.
    if not handle.startswith(HANDLE_PREFIX) or len(handle) > _MAX_HANDLE_CHARS:
        return None
    return handle_hash(handle)


def _idle_too_long(issued_at: datetime, now: datetime, max_idle: timedelta | None) -> bool:
    return max_idle is not None and now - issued_at >= max_idle
