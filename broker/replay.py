"""The replay ledger: each (issuer, token id) is consumed once, by one broker or by many.

A CI job's token is exchanged once; a second presentation is a replay. The primary key of
`replay_tokens` decides, so the answer is the same for many threads in one broker and for
several brokers sharing one PostgreSQL. Rows live until the token could verify no more (its exp
plus the verification leeway); after that a replay fails verification anyway, so forgetting the
row cannot let one through. Token ids are stored hashed, so an oversized jti cannot bloat the
index. Expired rows are purged by the database's clock, never a replica's: a replica whose clock
runs ahead must not delete rows that the others would still need to refuse a replay. Otherwise no
function here reads a clock; every other time is a `now` parameter (aware UTC).
"""

from __future__ import annotations

import hashlib
import threading
from datetime import datetime, timedelta

from broker.storage import Database, Migration, Tx, utc

# How often consume() also deletes rows past their expiry, measured on the callers' `now`
# (only the pace: which rows have expired is decided by the database's clock).
_PURGE_EVERY = timedelta(seconds=60)

MIGRATIONS = (
    Migration(
        1,
        "replay tokens",
        (
            """CREATE TABLE IF NOT EXISTS replay_tokens (
            issuer TEXT NOT NULL,
            token_hash TEXT NOT NULL,
            expires_at {time} NOT NULL,
            PRIMARY KEY (issuer, token_hash))""",
            "CREATE INDEX IF NOT EXISTS replay_tokens_expires ON replay_tokens (expires_at)",
        ),
    ),
)

_INSERT = (
    "INSERT INTO replay_tokens (issuer, token_hash, expires_at) VALUES (?, ?, ?) "
    "ON CONFLICT (issuer, token_hash) DO NOTHING"
)
_DELETE_EXPIRED = "DELETE FROM replay_tokens WHERE expires_at <= {now}"


def _delete_expired(tx: Tx) -> int:
    """Delete rows whose expiry has passed by the database's clock; return how many went."""
    return max(tx.execute(_DELETE_EXPIRED.format(now=tx.dialect.now_sql)).rowcount, 0)


def _key(token_id: str) -> str:
    return hashlib.sha256(token_id.encode("utf-8", "surrogatepass")).hexdigest()


class ReplayLedger:
    """Consume-once ledger of (issuer, token id)."""

    def __init__(self, db: Database) -> None:
        self.database = db
        self._lock = threading.Lock()
        self._last_purge: datetime | None = None

    def consume(self, issuer: str, token_id: str, *, expires_at: datetime, now: datetime) -> bool:
        """True the first time (issuer, token_id) is seen, False on every later call anywhere.

        `expires_at` is the token's exp plus the verification leeway: until then a replay would
        still verify, so the row must be kept at least that long. `token_id` is the jti, or the
        token's sha256 for issuers that send none. Raises StoreUnavailable.
        """
        consume = self.consumer(issuer, token_id, expires_at=expires_at, now=now)
        return self.database.write(consume)

    def consumer(
        self, issuer: str, token_id: str, *, expires_at: datetime, now: datetime
    ) -> _Consume:
        """`consume` as a step of a larger write transaction: call it with the transaction."""
        now, expires_at = utc(now), utc(expires_at)
        return _Consume(issuer, _key(token_id), expires_at, self._purge_due(now))

    def seen(self, issuer: str, token_id: str, *, now: datetime) -> bool:
        """Whether (issuer, token_id) was consumed and its row has not expired; a read only.

        For a caller that consumes inside a later write transaction (`consumer`) and wants a
        replay refused before it does any work; the consumption still decides.
        """
        db = self.database
        rows = db.query(
            "SELECT 1 FROM replay_tokens WHERE issuer = ? AND token_hash = ? AND expires_at > ?",
            (issuer, _key(token_id), db.dialect.to_db(utc(now))),
        )
        return bool(rows)

    def release(self, issuer: str, token_id: str) -> None:
        """Forget a consumption whose exchange issued nothing (upstream or audit failed first).

        Safe against replay: only a token that produced no credential is released, so the token
        still yields at most one issuance; the CI job can retry with the token it cannot renew.
        """
        key = _key(token_id)

        def work(tx: Tx) -> None:
            tx.execute(
                "DELETE FROM replay_tokens WHERE issuer = ? AND token_hash = ?", (issuer, key)
            )

        self.database.write(work)

    def purge(self) -> int:
        """Delete every row whose expiry has passed by the database's clock; return how many."""
        return self.database.write(_delete_expired)

    def _purge_due(self, now: datetime) -> bool:
        with self._lock:
            if self._last_purge is not None and now - self._last_purge < _PURGE_EVERY:
                return False
            self._last_purge = now
            return True

    def close(self) -> None:
        self.database.close()


class _Consume:
    """One consumption, ready to run inside a write transaction; returns True on first use."""

    def __init__(self, issuer: str, key: str, expires_at: datetime, purge: bool) -> None:
        self._issuer, self._key = issuer, key
        self._expires_at, self._purge = expires_at, purge

    def __call__(self, tx: Tx) -> bool:
        if self._purge:
            _delete_expired(tx)
        tx.execute(_INSERT, (self._issuer, self._key, tx.to_db(self._expires_at)))
        return tx.rowcount == 1
