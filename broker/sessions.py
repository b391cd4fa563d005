"""Refresh sessions: rotating refresh handles bound to the identity that opened them.

A session is bound to the identity (issuer, subject, claims) of the token that opened it and
hands out opaque, rotating refresh handles. Only sha256(handle) is stored. Presenting an old
handle ends the whole session (OAuth 2.1 refresh token rotation, draft-ietf-oauth-v2-1 section
4.3.1 / RFC 9700 section 4.14.2): one of the two holders of a handle is an attacker and the
broker cannot tell which, so both lose it. The session also remembers the revocable
credentials minted under it.

The tables (`session_*`) live in the broker's one store (broker/storage.py) beside the audit
ledger and the replay ledger; every database failure is `StoreUnavailable` and the broker
answers 503 without issuing. Writes that must commit together with other records (opening a
session with its token's consumption and the `intent`, a rotation with the `issued` record)
are offered as steps: callables run inside a caller's write transaction.
No function here reads the clock; every time is a `now` parameter (aware UTC).
"""

from __future__ import annotations

import builtins
import hashlib
import json
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any

from broker import replay
from broker.errors import BrokerException
from broker.replay import ReplayLedger
from broker.sealing import SEALED_PREFIX, RefSealer
from broker.storage import Database, Migration, RowInsert, Tx, utc

HANDLE_PREFIX = "lcr_"  # "luigi-creds refresh": lets secret scanners and log filters spot handles
SESSION_ID_PREFIX = "lcs_"
# secrets.token_urlsafe(32): 256 bits of randomness, 43 characters.
_HANDLE_BYTES = 32
# A handle we issued is 47 characters; anything much longer is not ours and is not hashed.
_MAX_HANDLE_CHARS = 128

REASON_REUSE = "reuse_detected"
# A rotation asking for more sibling chains than the session may hold (`branching`).
REASON_TOO_MANY_CHAINS = "too_many_chains"

# `{time}` is the column type of an aware instant (see broker/storage.py). IF NOT EXISTS: the
# tables predate the migrations table in existing deployments.
MIGRATIONS = (
    Migration(
        1,
        "sessions, handles, credentials",
        (
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
        ),
    ),
    # Sibling refresh chains: a session may hold several handles at once, each rotating on
    # its own, so a job's concurrent mints need not queue on one handle. Chain 0 is the one
    # every session opens with; its newest generation stays in session_sessions.generation
    # (existing sessions and single-chain clients are unchanged). Siblings (1, 2, ...) keep
    # theirs in session_chains. A handle row names its chain.
    Migration(
        2,
        "sibling refresh chains",
        (
            "ALTER TABLE session_handles ADD COLUMN chain INTEGER NOT NULL DEFAULT 0",
            """CREATE TABLE IF NOT EXISTS session_chains (
            session_id TEXT NOT NULL REFERENCES session_sessions (id) ON DELETE CASCADE,
            chain INTEGER NOT NULL,
            generation INTEGER NOT NULL,
            PRIMARY KEY (session_id, chain))""",
        ),
    ),
)


def _now_text() -> str:
    return datetime.now(UTC).isoformat()


def open_state(store: str | Database, *, sealer: RefSealer) -> tuple[ReplayLedger, SessionStore]:
    """The replay ledger and session store in `store` (a URL or an open Database); migrate.

    A URL is the `[broker] audit_store` value: ValueError if unsupported, StoreUnavailable if
    the database cannot be reached or prepared. `sealer` encrypts the credential references
    kept per session (broker/sealing.py); references stored in clear by an older broker are
    sealed here. Both objects share the Database; `close()` on either closes it.
    """
    db = Database.open(store) if isinstance(store, str) else store
    try:
        db.migrate("replay_schema_migrations", replay.MIGRATIONS, _now_text)
        db.migrate("session_schema_migrations", MIGRATIONS, _now_text)
        sessions = SessionStore(db, sealer)
        sessions.seal_existing()
    except BaseException:
        if isinstance(store, str):
            db.close()
        raise
    return ReplayLedger(db), sessions


class SessionError(BrokerException):
    """A refresh handle that mints nothing: `reason` is unknown, expired, reused or revoked
    (or, from `branching`, too_many_chains: the handle is left unspent).

    `session` is the session the handle belonged to (None when "unknown"), so the caller can
    audit the session id and, after "reused", revoke the credentials recorded under it.
    """

    def __init__(self, reason: str, session: Session | None = None) -> None:
        self.reason = reason
        self.session = session
        super().__init__(reason)


@dataclass(frozen=True)
class Session:
    """One refresh session as stored; `generation` counts the handles issued so far on its
    first chain (chain 0; sibling chains count theirs in session_chains)."""

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
# Refresh sessions

_SESSION_COLUMNS = (
    "id, issuer, subject, claims, created_at, expires_at, generation, revoked_at, "
    "revoked_reason, key_thumbprint"
)
# Every SQL text here is built from constants and fixed column names; values are always bound.
_SELECT_SESSIONS = f"SELECT {_SESSION_COLUMNS} FROM session_sessions"  # noqa: S608
# A presented handle's chain, generation and issue time, its chain's newest generation (chain 0
# keeps its own in the session row) and its session, in one statement (SessionStore.peek).
_PEEK = (
    "SELECT h.chain, h.generation, h.issued_at, c.generation, "  # noqa: S608
    + ", ".join(f"s.{column}" for column in _SESSION_COLUMNS.split(", "))
    + " FROM session_handles h JOIN session_sessions s ON s.id = h.session_id"
    " LEFT JOIN session_chains c ON c.session_id = h.session_id AND c.chain = h.chain"
    " WHERE h.handle_hash = ?"
)
# Rows a write queues (Tx.insert_later): a batch writes each table's in one statement.
_SESSION_ROWS = RowInsert(
    "session_sessions",
    tuple(_SESSION_COLUMNS.split(", ")),
)
_HANDLE_ROWS = RowInsert(
    "session_handles",
    ("handle_hash", "session_id", "generation", "issued_at", "chain"),
    rank=1,
)
_CREDENTIAL_ROWS = RowInsert(
    "session_credentials",
    ("session_id", "kind", "ref", "expires_at"),
    "ON CONFLICT (session_id, kind, ref) DO NOTHING",
    rank=1,
)


class SessionStore:
    """Refresh sessions with rotating handles, reuse detection and revocation.

    Sessions end at `expires_at` (the caller bounds it by session_max and the original token),
    on revocation, or on reuse of an old handle. Ended sessions stay listed until `purge`.
    """

    def __init__(self, db: Database, sealer: RefSealer) -> None:
        self.database = db
        self._dialect = db.dialect
        self._sealer = sealer

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
        session, handle, step = self.opening(
            issuer=issuer,
            subject=subject,
            claims=claims,
            now=now,
            expires_at=expires_at,
            key_thumbprint=key_thumbprint,
        )
        self.database.write(step)
        return session, handle

    def opening(
        self,
        *,
        issuer: str,
        subject: str,
        claims: Mapping[str, Any],
        now: datetime,
        expires_at: datetime,
        key_thumbprint: str | None = None,
    ) -> tuple[Session, str, Callable[[Tx], None]]:
        """`create` as a step: the session and handle it will store, and the step storing them."""
        claims_text = canonical_claims(claims)
        session = Session(
            id=SESSION_ID_PREFIX + secrets.token_urlsafe(16),
            issuer=issuer,
            subject=subject,
            claims=MappingProxyType(json.loads(claims_text)),
            created_at=utc(now),
            expires_at=utc(expires_at),
            generation=1,
            revoked_at=None,
            revoked_reason="",
            key_thumbprint=key_thumbprint,
        )
        handle = _new_handle()

        def step(tx: Tx) -> None:
            created_at = tx.to_db(session.created_at)
            tx.insert_later(
                _SESSION_ROWS,
                (
                    session.id,
                    issuer,
                    subject,
                    claims_text,
                    created_at,
                    tx.to_db(session.expires_at),
                    1,
                    None,
                    "",
                    key_thumbprint,
                ),
            )
            tx.insert_later(_HANDLE_ROWS, (handle_hash(handle), session.id, 1, created_at, 0))

        return session, handle, step

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
        successor, step = self.rotation(handle, now=now, max_idle=max_idle)
        return rotated(self.database.write(step), successor)

    def rotation(
        self, handle: str, *, now: datetime, max_idle: timedelta | None = None
    ) -> tuple[str, Callable[[Tx], tuple[Session | None, str]]]:
        """`rotate` as a step: the successor handle, and the step that returns (session, refusal).

        The refusal is "" when the handle was spent; `rotated` turns the pair into rotate's
        answer. A "reused" refusal has revoked the session inside the step, so the caller's
        transaction must commit it even though nothing is issued.
        """
        successor, _, step = self.branching(handle, now=now, max_idle=max_idle)
        return successor, step

    def branching(
        self,
        handle: str,
        *,
        now: datetime,
        max_idle: timedelta | None = None,
        siblings: int = 0,
        max_chains: int = 1,
    ) -> tuple[str, tuple[str, ...], Callable[[Tx], tuple[Session | None, str]]]:
        """`rotation` that also opens `siblings` new chains: the successor handle (on the
        presented handle's chain), the first handle of each new chain, and the step.

        Each chain rotates on its own: spending a handle checks it against its own chain's
        newest generation, so concurrent mints on different chains never look like reuse.
        Reuse of a spent handle on any chain still ends the whole session, and so does
        revocation; max_idle applies to each handle. A session holds at most `max_chains`
        chains (its first included): past that the step refuses with "too_many_chains" and
        spends nothing. Concurrent branchings are ordered by the session row's lock.
        """
        now = utc(now)
        presented = _lookup_key(handle)
        successor = _new_handle()
        new_chains = tuple(_new_handle() for _ in range(siblings))
        select = _SELECT_SESSIONS + " WHERE id = ?" + self._dialect.for_update

        def work(cur: Tx) -> tuple[Session | None, str]:
            if presented is None:
                return None, "unknown"
            session, chain, presented_generation, newest, refused = self._presented(
                cur, presented, select, now, max_idle
            )
            if session is None or refused:
                return session, refused
            if presented_generation != newest:
                ended = self._revoke_ids(cur, [session.id], REASON_REUSE, now)
                return (ended[0] if ended else session), "reused"
            held = 0
            if new_chains:
                held = self._sibling_chains(cur, session.id)
                if 1 + held + len(new_chains) > max_chains:
                    return session, REASON_TOO_MANY_CHAINS
            # The chain's newest generation as read under the session row's lock (above): the
            # successor is the next one.
            generation = newest + 1
            if chain == 0:
                cur.execute(
                    "UPDATE session_sessions SET generation = ? WHERE id = ?",
                    (generation, session.id),
                )
                session = replace(session, generation=generation)
            else:
                cur.execute(
                    "UPDATE session_chains SET generation = ? WHERE session_id = ? AND chain = ?",
                    (generation, session.id, chain),
                )
            self._insert_handle(cur, session.id, successor, generation, now, chain=chain)
            # Chains are never removed while the session exists: numbering goes on from the
            # count (0 is the first chain).
            for number, first in enumerate(new_chains, start=held + 1):
                cur.execute(
                    "INSERT INTO session_chains (session_id, chain, generation) VALUES (?, ?, 1)",
                    (session.id, number),
                )
                self._insert_handle(cur, session.id, first, 1, now, chain=number)
            return session, ""

        return successor, new_chains, work

    def chain_count(self, session_id: str) -> int:
        """How many refresh chains the session holds (its first included)."""
        return 1 + self.database.read(lambda cur: self._sibling_chains(cur, session_id))

    def _presented(
        self,
        cur: Tx,
        presented: str,
        select: str,
        now: datetime,
        max_idle: timedelta | None,
    ) -> tuple[Session | None, int, int, int, str]:
        """The session a presented handle belongs to, the handle's chain and generation, its
        chain's newest generation (the handle is spent when older), and why it is refused
        ("unknown", "revoked", "expired"; "" when live; both generations are 0 when refused).
        What a spent handle means is the caller's call. Statement by statement, so that a
        rotation reads the chain's generation only once it holds the session row's lock
        (`select` locks it on PostgreSQL)."""
        found = self._find_handle(cur, presented)
        if found is None:
            return None, 0, 0, 0, "unknown"
        session_id, chain, generation, issued_at = found
        cur.execute(select, (session_id,))
        session = self._row(cur.fetchone())
        refused = _refusal(session, issued_at, now, max_idle)
        if refused:
            return session, chain, 0, 0, refused
        newest = (
            session.generation if chain == 0 else self._chain_generation(cur, session_id, chain)
        )
        return session, chain, generation, newest, ""

    def peek(self, handle: str, *, now: datetime, max_idle: timedelta | None = None) -> Session:
        """Validate `handle` without spending it (for /v1/revoke and introspection).

        Raises SessionError like `rotate`, except that an old generation raises "reused"
        without revoking: peeking changes nothing.

        Decision: one statement (the handle, its session and its chain's generation joined),
        run without a transaction around it: a refresh peeks before every mint, and the three
        statements and BEGIN/ROLLBACK of a read transaction were a fifth of its statements.
        One statement sees one snapshot, as the transaction did; nothing is locked, as before.
        """
        now = utc(now)
        presented = _lookup_key(handle)
        if presented is None:
            raise SessionError("unknown")
        rows = self.database.query(_PEEK, (presented,))
        if not rows:
            raise SessionError("unknown")
        chain, generation, issued_at, chain_newest, *columns = rows[0]
        session = self._row(columns)
        issued = self._dialect.from_db(issued_at)
        assert issued is not None
        refused = _refusal(session, issued, now, max_idle)
        if refused:
            raise SessionError(refused, session)
        if chain == 0:
            newest = session.generation
        else:
            # As _chain_generation: a lost chain row makes the handle read as spent.
            newest = -1 if chain_newest is None else int(chain_newest)
        if int(generation) != newest:
            raise SessionError("reused", session)
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
        now = utc(now)
        db = self._dialect
        presented = _lookup_key(handle) if handle is not None else None
        if handle is not None and presented is None:
            # Not one of our handles: it names no session (and must not widen to "all").
            return []

        def work(cur: Tx) -> builtins.list[Session]:
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
                (
                    f"SELECT id FROM session_sessions WHERE {' AND '.join(where)}"  # noqa: S608
                    f" ORDER BY created_at, id{db.for_update}"
                ),
                params,
            )
            ids = [row[0] for row in cur.fetchall()]
            return self._revoke_ids(cur, ids, reason, now)

        return self.database.write(work)

    def count_active(self, now: datetime) -> int:
        """Refresh sessions neither revoked nor expired at `now` (the active-sessions gauge)."""
        db = self._dialect
        sql = db.sql(
            "SELECT COUNT(*) FROM session_sessions WHERE revoked_at IS NULL AND expires_at > ?"
        )
        return int(self.database.read(lambda tx: tx.rows(sql, (db.to_db(now),)))[0][0])

    def list(
        self,
        *,
        active_only: bool = True,
        subject: str | None = None,
        issuer: str | None = None,
        now: datetime,
    ) -> builtins.list[Session]:
        """Sessions oldest first; `active_only` drops revoked and expired ones."""
        db = self._dialect
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
        sql = f"{_SELECT_SESSIONS}{clause} ORDER BY created_at, id"

        def work(cur: Tx) -> builtins.list[Session]:
            cur.execute(sql, params)
            return [self._row(row) for row in cur.fetchall()]

        return self.database.read(work)

    def get(self, session_id: str) -> Session | None:
        """The session with this id, whatever its state, or None."""
        sql = _SELECT_SESSIONS + " WHERE id = ?"

        def work(cur: Tx) -> Session | None:
            cur.execute(sql, (session_id,))
            row = cur.fetchone()
            return None if row is None else self._row(row)

        return self.database.read(work)

    # -- credentials minted under a session ---------------------------------------------------

    def record_credential(
        self, session_id: str, *, kind: str, ref: str, expires_at: datetime | None
    ) -> None:
        """Remember a revocable credential (Vault accessor, lease id) minted under a session.

        `ref` is what revocation needs (never the secret itself); it is stored sealed, so the
        database alone does not yield it. Recording twice is a no-op.
        """
        self.database.write(
            self.credential_recorder(session_id, kind=kind, ref=ref, expires_at=expires_at)
        )

    def credential_recorder(
        self, session_id: str, *, kind: str, ref: str, expires_at: datetime | None
    ) -> Callable[[Tx], None]:
        """`record_credential` as a step of a larger write transaction."""

        sealed = self._sealer.seal(session_id, kind, ref)

        def step(tx: Tx) -> None:
            tx.insert_later(_CREDENTIAL_ROWS, (session_id, kind, sealed, tx.to_db(expires_at)))

        return step

    def credentials(
        self, session_id: str, *, now: datetime | None = None
    ) -> builtins.list[tuple[str, str]]:
        """(kind, ref) of credentials to revoke when the session ends, in recording order.

        With `now`, credentials that have already expired on their own are left out.
        """
        db = self._dialect
        sql = "SELECT kind, ref FROM session_credentials WHERE session_id = ?"
        params: builtins.list[Any] = [session_id]
        if now is not None:
            sql += " AND (expires_at IS NULL OR expires_at > ?)"
            params.append(db.to_db(now))
        # NOTE: the rowid/ctid is not portable; (kind, ref) order is stable and good enough for
        # a revocation list.
        sql = sql + " ORDER BY kind, ref"

        def work(cur: Tx) -> builtins.list[tuple[str, str]]:
            cur.execute(sql, params)
            return [(str(kind), str(ref)) for kind, ref in cur.fetchall()]

        opened = self._sealer.open
        return [(kind, opened(session_id, kind, ref)) for kind, ref in self.database.read(work)]

    def seal_existing(self) -> int:
        """Seal references an older broker stored in clear; return how many. Idempotent."""
        sealer = self._sealer

        def work(cur: Tx) -> int:
            rows = cur.rows(
                "SELECT session_id, kind, ref FROM session_credentials WHERE ref NOT LIKE ?",
                (SEALED_PREFIX + "%",),
            )
            for session_id, kind, ref in rows:
                cur.execute(
                    "UPDATE session_credentials SET ref = ? "
                    "WHERE session_id = ? AND kind = ? AND ref = ?",
                    (sealer.seal(session_id, kind, ref), session_id, kind, ref),
                )
            return len(rows)

        return self.database.write(work)

    def purge(self, *, before: datetime) -> int:
        """Delete sessions (with their handles and credentials) that ended before `before`.

        Keep ended sessions for as long as operators want to list them; the audit log, not
        this table, is the record of what happened.
        """
        db = self._dialect
        sql = (
            "DELETE FROM session_sessions WHERE expires_at <= ? "
            "OR (revoked_at IS NOT NULL AND revoked_at <= ?)"
        )

        def work(cur: Tx) -> int:
            cur.execute(sql, (db.to_db(before), db.to_db(before)))
            return max(cur.rowcount, 0)

        return self.database.write(work)

    def close(self) -> None:
        self.database.close()

    # -- helpers -------------------------------------------------------------------------------

    def _insert_handle(
        self,
        cur: Tx,
        session_id: str,
        handle: str,
        generation: int,
        now: datetime,
        *,
        chain: int = 0,
    ) -> None:
        db = self._dialect
        cur.execute(
            (
                "INSERT INTO session_handles "
                "(handle_hash, session_id, generation, issued_at, chain) VALUES (?, ?, ?, ?, ?)"
            ),
            (handle_hash(handle), session_id, generation, db.to_db(now), chain),
        )

    def _find_handle(self, cur: Tx, key: str | None) -> tuple[str, int, int, datetime] | None:
        """(session id, chain, generation, issued_at) of a stored handle hash, or None."""
        if key is None:
            return None
        db = self._dialect
        cur.execute(
            (
                "SELECT session_id, chain, generation, issued_at FROM session_handles "
                "WHERE handle_hash = ?"
            ),
            (key,),
        )
        row = cur.fetchone()
        if row is None:
            return None
        issued_at = db.from_db(row[3])
        assert issued_at is not None
        return str(row[0]), int(row[1]), int(row[2]), issued_at

    def _sibling_chains(self, cur: Tx, session_id: str) -> int:
        cur.execute("SELECT COUNT(*) FROM session_chains WHERE session_id = ?", (session_id,))
        return int(cur.fetchone()[0])

    def _chain_generation(self, cur: Tx, session_id: str, chain: int) -> int:
        cur.execute(
            "SELECT generation FROM session_chains WHERE session_id = ? AND chain = ?",
            (session_id, chain),
        )
        row = cur.fetchone()
        # A handle row names only chains its session opened; -1 makes a lost row read as spent.
        return -1 if row is None else int(row[0])

    def _revoke_ids(
        self, cur: Tx, ids: builtins.list[str], reason: str, now: datetime
    ) -> builtins.list[Session]:
        db = self._dialect
        ended: builtins.list[Session] = []
        update = (
            "UPDATE session_sessions SET revoked_at = ?, revoked_reason = ? "
            "WHERE id = ? AND revoked_at IS NULL"
        )
        select = _SELECT_SESSIONS + " WHERE id = ?"
        for session_id in ids:
            cur.execute(update, (db.to_db(now), reason, session_id))
            if cur.rowcount == 1:
                cur.execute(select, (session_id,))
                ended.append(self._row(cur.fetchone()))
        return ended

    def _row(self, row: Sequence[Any]) -> Session:
        db = self._dialect
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


def rotated(outcome: tuple[Session | None, str], successor: str) -> tuple[Session, str]:
    """The answer of a rotation step: the session and its new handle, or SessionError."""
    session, reason = outcome
    if reason or session is None:
        raise SessionError(reason or "unknown", session)
    return session, successor


def _new_handle() -> str:
    return HANDLE_PREFIX + secrets.token_urlsafe(_HANDLE_BYTES)


def _lookup_key(handle: str) -> str | None:
    # Something that cannot be one of our handles is "unknown" without touching the database.
    if not handle.startswith(HANDLE_PREFIX) or len(handle) > _MAX_HANDLE_CHARS:
        return None
    return handle_hash(handle)


def _idle_too_long(issued_at: datetime, now: datetime, max_idle: timedelta | None) -> bool:
    return max_idle is not None and now - issued_at >= max_idle


def _refusal(
    session: Session, issued_at: datetime, now: datetime, max_idle: timedelta | None
) -> str:
    """Why a handle of `session` issued at `issued_at` mints nothing now ("revoked",
    "expired"), or "" while it may; whether it is spent is the chain's to say."""
    if session.revoked_at is not None:
        return "revoked"
    if now >= session.expires_at or _idle_too_long(issued_at, now, max_idle):
        return "expired"
    return ""
