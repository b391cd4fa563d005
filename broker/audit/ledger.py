"""The SQL audit ledger shared by the SQLite and PostgreSQL stores.

Owns the audit tables (all prefixed `audit_`), their migrations, and the append algorithm. The
store itself (connections, transactions, the write lock, error mapping) is broker/storage.py,
shared with the replay ledger and the sessions.

Decisions:
- Hand-written SQL over DB-API rather than SQLAlchemy Core: the schema is four tables, every
  statement below is portable SQL (only the `?`/`%s` placeholder differs), and the parts that are
  not portable - how a write transaction takes the ledger lock, WAL/fsync pragmas, advisory locks -
  are dialect code in broker/storage.py either way. It keeps the broker's dependencies to
  psycopg (already required).
- One global sequence, not per-replica chains. Every append runs in one transaction that locks
  the single `audit_head` row (SQLite: `BEGIN IMMEDIATE`, the database write lock; PostgreSQL:
  `SELECT ... FOR UPDATE` on the head row), reads seq/prev_hash/frontier, inserts the record and
  moves the head. Trade-off: appends from all replicas are serialised, in exchange for one total
  order, one Merkle tree, one checkpoint stream and a verifier that needs no merge rules. The
  cost is bounded by group commit (broker/storage.py): one transaction carries every append
  queued in a process meanwhile, and its records are linked into the chain together just before
  it commits (encoded beforehand, outside the lock), so a replica holds the head lock for one
  head read, one multi-row insert, one head update and the commit, once per batch. Per-replica
  chains would scale writes but make deletions at a replica's tail invisible unless every
  replica's checkpoints are cross-witnessed.
- `append` returning means durable: SQLite in WAL mode with `synchronous=FULL` fsyncs the WAL at
  commit; PostgreSQL commits with `synchronous_commit=on`. Any driver error becomes
  `StoreUnavailable` and the caller fails closed.
- Checkpoints (C2SP, Ed25519-signed) are written inside the same transaction every
  `checkpoint_every` records, or on the first append after `checkpoint_interval` has passed.
  NOTE: there is no background timer; an idle ledger does not need new checkpoints.
- Each checkpoint row also keeps the compact range (frontier) and last entry hash at its size, so
  `prune` can delete the records before a checkpoint and verification restarts from there.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.audit import chain, key_files
from broker.audit.events import AuditEvent, Outcome
from broker.storage import Database, Migration, RowInsert, StoreUnavailable, Tx

Clock = Callable[[], datetime]

DEFAULT_ORIGIN = "luigi-creds/audit"
# 1,000 records or 5 minutes: a checkpoint costs one Ed25519 signature and one small row, so this
# bounds the unsigned tail to what a few seconds of peak load or five quiet minutes produce.
DEFAULT_CHECKPOINT_EVERY = 1000
DEFAULT_CHECKPOINT_INTERVAL = timedelta(minutes=5)
PAGE = 1000  # rows per keyset page when streaming records

_HEAD_SQL = (
    "SELECT size, last_hash, frontier, checkpoint_size, checkpoint_time"
    " FROM audit_head WHERE id = 1"
)

# Records a write transaction has queued (`SqlLedger.appender`), linked in before it commits.
_QUEUED_KEY = "audit_queued"


class _Receipt:
    """Where a queued record's seq is put once the record is linked into the chain."""

    __slots__ = ("seq",)

    def __init__(self) -> None:
        self.seq = -1


@dataclass(frozen=True)
class _Queued:
    event: AuditEvent
    template: chain.RecordTemplate
    receipt: _Receipt


# A transaction's records, inserted together (PostgreSQL: one statement for them all).
_LOG_ROWS = RowInsert(
    "audit_log",
    ("seq", "time", "request_id", "outcome", "record", "prev_hash", "entry_hash"),
)

# The head a write transaction has moved: appends in one batch each advance it in memory and
# the row is written once, before the commit (Tx.hold).
_HEAD_KEY = "audit_head"


def _set_head(tx: Tx, head: Head) -> None:
    tx.hold(_HEAD_KEY, head, _write_head)


def _write_head(tx: Tx) -> None:
    head: Head = tx.held(_HEAD_KEY)
    tx.execute(
        "UPDATE audit_head SET size = ?, last_hash = ?, frontier = ?,"
        " checkpoint_size = ?, checkpoint_time = ? WHERE id = 1",
        (head.size, head.last_hash, head.frontier, head.checkpoint_size, head.checkpoint_time),
    )


TERMINAL = frozenset({Outcome.ISSUED, Outcome.DENIED, Outcome.ERROR, Outcome.RECONCILED})

# Append new versions; never edit an applied one.
MIGRATIONS = (
    Migration(
        1,
        "ledger, head, checkpoints, meta",
        (
            "CREATE TABLE audit_log ("
            " seq BIGINT PRIMARY KEY,"
            " time TEXT NOT NULL,"
            " request_id TEXT NOT NULL,"
            " outcome TEXT NOT NULL,"
            " record TEXT NOT NULL,"
            " prev_hash TEXT NOT NULL,"
            " entry_hash TEXT NOT NULL)",
            "CREATE INDEX audit_log_request_idx ON audit_log (request_id, outcome)",
            "CREATE INDEX audit_log_time_idx ON audit_log (time)",
            "CREATE TABLE audit_head ("
            " id INTEGER PRIMARY KEY,"
            " size BIGINT NOT NULL,"
            " last_hash TEXT NOT NULL,"
            " frontier TEXT NOT NULL,"
            " checkpoint_size BIGINT NOT NULL,"
            " checkpoint_time TEXT NOT NULL)",
            # no unique key on size: a second, conflicting checkpoint for a size must be storable
            # so that verify can report the fork instead of the database hiding it.
            "CREATE TABLE audit_checkpoint ("
            " size BIGINT NOT NULL,"
            " time TEXT NOT NULL,"
            " root TEXT NOT NULL,"
            " note TEXT NOT NULL,"
            " frontier TEXT NOT NULL,"
            " last_hash TEXT NOT NULL)",
            "CREATE INDEX audit_checkpoint_size_idx ON audit_checkpoint (size)",
            "CREATE TABLE audit_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        ),
    ),
)
SCHEMA_VERSION = MIGRATIONS[-1].version


@dataclass(frozen=True)
class StoredRecord:
    seq: int
    time: str
    request_id: str
    outcome: str
    record: str  # the canonical JSON exactly as hashed
    prev_hash: str
    entry_hash: str


@dataclass(frozen=True)
class StoredCheckpoint:
    size: int
    time: str
    root: str  # hex
    note: str  # the signed note, as shipped
    frontier: str
    last_hash: str


@dataclass(frozen=True)
class Head:
    size: int
    last_hash: str
    frontier: str
    checkpoint_size: int
    checkpoint_time: str


@dataclass(frozen=True)
class PruneResult:
    deleted: int
    anchor_size: int  # first retained seq; a checkpoint of exactly this size anchors verification


def _text(value: str) -> str:
    # A hostile token can carry a lone surrogate ("\\ud800" in its JSON); it cannot be UTF-8, so
    # it is recorded as its escape text instead of failing the append (evidence kept, no 5xx).
    if value.isascii():
        return value
    return value.encode("utf-8", "backslashreplace").decode("utf-8")


def _plain(value: Any) -> Any:
    """Make claims/detail JSON-safe for hashing: floats become their repr (see chain.py NOTE),
    other non-JSON values their str(), and strings valid UTF-8."""
    kind = type(value)
    if kind is str:
        return value if value.isascii() else _text(value)
    if value is None or kind is int or kind is bool:
        return value
    if kind is dict:  # the common case, by exact type; other mappings below
        return {
            (k if type(k) is str and k.isascii() else _text(str(k))): _plain(v)
            for k, v in value.items()
        }
    if isinstance(value, str):
        return _text(value)
    if isinstance(value, bool | int | datetime):
        return value
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, Mapping):
        return {_text(str(k)): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_plain(v) for v in value]
    return _text(str(value))


# The event's free-text fields (all but `outcome`, an enum), looked up once.
_TEXT_FIELDS = tuple(
    f.name for f in dataclasses.fields(AuditEvent) if f.type == "str" and f.name != "outcome"
)


def _recordable(event: AuditEvent, policy_sha256: str = "") -> AuditEvent:
    """The event with every free-text field made encodable (times and numbers untouched), and
    naming `policy_sha256` if it names no policy itself."""
    fields = event.__dict__
    changes: dict[str, Any] = {"claims": _plain(event.claims), "detail": _plain(event.detail)}
    if policy_sha256 and not event.policy_sha256:
        changes["policy_sha256"] = policy_sha256
    for name in _TEXT_FIELDS:
        value = fields[name]
        if isinstance(value, str) and not value.isascii():
            changes[name] = _text(value)
    # A copy with `changes`, built without dataclasses.replace, which re-runs __init__ through
    # generic field code (a third of this function's cost): AuditEvent has no __post_init__,
    # so copying its fields is the same object replace would make.
    copy = object.__new__(AuditEvent)
    copy.__dict__.update(fields)
    copy.__dict__.update(changes)
    return copy


class SqlLedger:
    """The AuditStore over the broker's store (broker/storage.py), SQLite or PostgreSQL."""

    def __init__(
        self,
        database: Database,
        *,
        clock: Clock,
        signing_key: Ed25519PrivateKey | None,
        salt: bytes | None,
        origin: str = DEFAULT_ORIGIN,
        checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
        checkpoint_interval: timedelta = DEFAULT_CHECKPOINT_INTERVAL,
    ) -> None:
        if checkpoint_every < 1:
            raise ValueError("checkpoint_every is at least 1")
        self.database = database
        self._clock = clock
        self._signing_key = signing_key
        self._salt = salt
        self.origin = origin
        self._every = checkpoint_every
        self._interval = checkpoint_interval
        self._policy_sha256 = ""

    def __repr__(self) -> str:
        return f"SqlLedger({self.database!r})"

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self.database.read(lambda tx: tx.rows(sql, params))

    def migrate(self) -> None:
        """Bring the schema to SCHEMA_VERSION; safe when several processes start at once."""
        now = chain.format_time(self._clock())

        def genesis(tx: Tx) -> None:
            tx.execute(
                "INSERT INTO audit_head (id, size, last_hash, frontier,"
                " checkpoint_size, checkpoint_time) VALUES (1, 0, ?, '', 0, ?)",
                (chain.GENESIS_HASH, now),
            )

        migrations = [
            Migration(m.version, m.name, (*m.steps, genesis)) if m.version == 1 else m
            for m in MIGRATIONS
        ]
        self.database.migrate("audit_schema_migrations", migrations, lambda: now)

    def schema_version(self) -> int:
        return int(self._read("SELECT MAX(version) FROM audit_schema_migrations")[0][0] or 0)

    # -- AuditStore ---------------------------------------------------------------------------

    def append(self, event: AuditEvent) -> int:
        """Make `event` durable as the next record and return its seq; raise StoreUnavailable."""
        step, receipt = self._appending(event)
        self.database.write(step)
        return receipt.seq

    def appender(self, event: AuditEvent) -> Callable[[Tx], None]:
        """`append` as a step of a larger write transaction.

        The record is durable when that transaction commits; if it rolls back, the head does too.
        """
        return self._appending(event)[0]

    def _appending(self, event: AuditEvent) -> tuple[Callable[[Tx], None], _Receipt]:
        """The step queueing `event` in a write transaction, and where its seq will be.

        The record is encoded here, in the caller's thread before the write: the transaction
        only links it into the chain (`_write_queued`, run once per transaction just before the
        commit or before anything reads the head), so a batch holds the head lock for that
        alone. An event that cannot be put in canonical form gives a step that fails closed.
        """
        event = _recordable(event, self._policy_sha256)
        receipt = _Receipt()
        try:
            queued = _Queued(event, chain.RecordTemplate(event), receipt)
        except (TypeError, ValueError) as exc:
            cause = exc

            def refused(tx: Tx) -> None:
                raise StoreUnavailable("the event cannot be recorded") from cause

            return refused, receipt

        def step(tx: Tx) -> None:
            earlier: tuple[_Queued, ...] = tx.held(_QUEUED_KEY) or ()
            tx.hold(_QUEUED_KEY, (*earlier, queued), self._write_queued)

        return step, receipt

    def _write_queued(self, tx: Tx) -> None:
        """Link the records queued in this transaction into the chain, in queue order: one
        head read, one multi-row insert, checkpoints where due, the head moved once."""
        queued: tuple[_Queued, ...] | None = tx.take(_QUEUED_KEY)
        if not queued:
            return
        head = self._current_head(tx)
        size, last_hash = head.size, head.last_hash
        cp_size, cp_time = head.checkpoint_size, head.checkpoint_time
        frontier = chain.decode_frontier(head.frontier)
        now = self._clock()
        rows = []
        for item in queued:
            seq = size
            raw = item.template.fill(seq=seq, prev_hash=last_hash)
            digest = chain.entry_hash(raw)
            event = item.event
            rows.append(
                (
                    seq,
                    chain.format_time(event.time),
                    event.request_id,
                    str(event.outcome),
                    raw.decode(),
                    last_hash,
                    digest,
                )
            )
            frontier = chain.frontier_append(frontier, seq, bytes.fromhex(digest))
            size, last_hash = seq + 1, digest
            item.receipt.seq = seq
            if size - cp_size >= self._every or now - chain.parse_time(cp_time) >= self._interval:
                self._write_checkpoint(tx, size, frontier, digest, now)
                cp_size, cp_time = size, chain.format_time(now)
        tx.insert(_LOG_ROWS, rows)
        _set_head(tx, Head(size, last_hash, chain.encode_frontier(frontier), cp_size, cp_time))

    def stamp_policy(self, sha256: str) -> None:
        """Name the policy in force in every later record that does not name one itself."""
        self._policy_sha256 = sha256

    def check_writable(self) -> None:
        """Take and release the write lock without writing; raise StoreUnavailable if we can't."""
        self.database.write(self._head)

    def close(self) -> None:
        self.database.close()

    # -- checkpoints --------------------------------------------------------------------------

    def _head(self, tx: Tx) -> Head:
        """The head after every record queued so far in this transaction."""
        self._write_queued(tx)
        return self._current_head(tx)

    def _current_head(self, tx: Tx) -> Head:
        """The head as this transaction left it; read (and on PostgreSQL locked until commit:
        the ledger's write lock) once per transaction, however many records it appends."""
        held: Head | None = tx.held(_HEAD_KEY)
        if held is not None:
            return held
        row = tx.rows(_HEAD_SQL + tx.dialect.for_update)[0]
        return Head(int(row[0]), row[1], row[2], int(row[3]), row[4])

    def _write_checkpoint(
        self, tx: Tx, size: int, frontier: Sequence[bytes], last_hash: str, now: datetime
    ) -> None:
        root = chain.frontier_root(frontier)
        checkpoint = chain.Checkpoint(origin=self.origin, size=size, root=root)
        if self._signing_key is None:
            note = checkpoint.body()  # NOTE: unsigned; verify reports it as such
        else:
            note = chain.sign_checkpoint(checkpoint, self._signing_key)
        tx.execute(
            "INSERT INTO audit_checkpoint (size, time, root, note, frontier, last_hash)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (
                size,
                chain.format_time(now),
                root.hex(),
                note,
                chain.encode_frontier(frontier),
                last_hash,
            ),
        )

    def checkpoint(self) -> int:
        """Sign a checkpoint of the current head now (if it has grown); return its size."""

        def step(tx: Tx) -> int:
            head = self._head(tx)
            if head.size == head.checkpoint_size and head.size > 0:
                return head.size
            now = self._clock()
            frontier = chain.decode_frontier(head.frontier)
            self._write_checkpoint(tx, head.size, frontier, head.last_hash, now)
            _set_head(
                tx,
                dataclasses.replace(
                    head, checkpoint_size=head.size, checkpoint_time=chain.format_time(now)
                ),
            )
            return head.size

        return self.database.write(step)

    # -- reading ------------------------------------------------------------------------------

    def head(self) -> Head:
        row = self._read(_HEAD_SQL)[0]
        return Head(int(row[0]), row[1], row[2], int(row[3]), row[4])

    def records(self, start_seq: int = 0, since: datetime | None = None) -> Iterator[StoredRecord]:
        """Stored rows in seq order, streamed a page at a time (keyset pagination on seq)."""
        after = start_seq - 1
        since_text = chain.format_time(since) if since is not None else ""
        while True:
            rows = self._read(
                "SELECT seq, time, request_id, outcome, record, prev_hash, entry_hash"
                " FROM audit_log WHERE seq > ? AND time >= ? ORDER BY seq LIMIT ?",
                (after, since_text, PAGE),
            )
            for row in rows:
                yield StoredRecord(int(row[0]), *row[1:])
            if len(rows) < PAGE:
                return
            after = int(rows[-1][0])

    def events(self, since: datetime | None = None) -> Iterator[AuditEvent]:
        """Events (oldest seq first) whose time is at or after `since`."""
        for row in self.records(since=since):
            yield chain.event_from_record(json.loads(row.record))

    def checkpoints(self) -> list[StoredCheckpoint]:
        rows = self._read(
            "SELECT size, time, root, note, frontier, last_hash FROM audit_checkpoint"
            " ORDER BY size, time"
        )
        return [StoredCheckpoint(int(r[0]), *r[1:]) for r in rows]

    def dangling_intents(self) -> list[AuditEvent]:
        """The latest `intent` of each request that has no terminal record (crash recovery)."""
        terminal = sorted(o.value for o in TERMINAL)
        rows = self._read(
            "SELECT i.record FROM audit_log i WHERE i.outcome = 'intent' AND NOT EXISTS"
            " (SELECT 1 FROM audit_log t WHERE t.request_id = i.request_id"
            " AND t.outcome IN (?, ?, ?, ?)) ORDER BY i.seq",
            terminal,
        )
        latest: dict[str, AuditEvent] = {}
        for (record,) in rows:
            event = chain.event_from_record(json.loads(record))
            latest[event.request_id] = event
        return list(latest.values())

    # -- proofs -------------------------------------------------------------------------------

    def _leaves(self, size: int) -> list[bytes]:
        leaves: list[bytes] = []
        for row in self.records():
            if row.seq >= size:
                break
            if row.seq != len(leaves):
                raise ValueError(f"records before seq {row.seq} are pruned or missing")
            leaves.append(bytes.fromhex(row.entry_hash))
        if len(leaves) != size:
            raise ValueError(f"the ledger holds fewer than {size} records")
        return leaves

    def inclusion_proof(self, seq: int, size: int) -> list[bytes]:
        """RFC 6962 audit path proving record `seq` is in the tree of `size` records."""
        return chain.inclusion_proof(seq, self._leaves(size))

    def consistency_proof(self, size1: int, size2: int) -> list[bytes]:
        """RFC 6962 proof that the tree of `size2` records extends the tree of `size1`."""
        return chain.consistency_proof(size1, self._leaves(size2))

    # -- secrets ------------------------------------------------------------------------------

    def hash_ref(self, value: str) -> str:
        """HMAC a Vault accessor (or other reference) with the per-deployment salt."""
        return key_files.hmac_ref(self._salt_bytes(), value)

    def accessor_salt(self) -> bytes:
        """The per-deployment salt: keys `hash_ref` and, derived, the session store's sealing."""
        return self._salt_bytes()

    def _salt_bytes(self) -> bytes:
        if self._salt is not None:
            return self._salt
        # No salt file configured: the salt lives in the ledger's own database, created once.
        rows = self._read("SELECT value FROM audit_meta WHERE key = 'accessor_salt'")
        if not rows:
            fresh = secrets.token_hex(key_files.SALT_BYTES)

            def keep(tx: Tx) -> None:
                # ON CONFLICT: another broker may have kept its salt first; theirs stays.
                tx.execute(
                    "INSERT INTO audit_meta (key, value) VALUES ('accessor_salt', ?)"
                    " ON CONFLICT (key) DO NOTHING",
                    (fresh,),
                )

            self.database.write(keep)
            rows = self._read("SELECT value FROM audit_meta WHERE key = 'accessor_salt'")
        self._salt = bytes.fromhex(rows[0][0])
        return self._salt

    # -- retention ----------------------------------------------------------------------------

    def prune(self, before: datetime) -> PruneResult:
        """Delete records older than `before` up to the newest checkpoint that allows it.

        Only whole prefixes ending at a checkpoint go, so verification restarts from that signed
        checkpoint (its stored frontier rebuilds the Merkle root). No record at or after `before`
        is deleted; checkpoints are kept (they are small and carry the history's signatures).
        """

        def step(tx: Tx) -> PruneResult:
            head = self._head(tx)
            first = tx.rows("SELECT MIN(seq) FROM audit_log")[0][0]
            newer = tx.rows(
                "SELECT MIN(seq) FROM audit_log WHERE time >= ?", (chain.format_time(before),)
            )[0][0]
            boundary = head.size if newer is None else int(newer)
            found = tx.rows("SELECT MAX(size) FROM audit_checkpoint WHERE size <= ?", (boundary,))[
                0
            ][0]
            if first is None or found is None or int(found) <= int(first):
                return PruneResult(0, 0 if first is None else int(first))
            anchor = int(found)
            tx.execute("DELETE FROM audit_log WHERE seq < ?", (anchor,))
            return PruneResult(anchor - int(first), anchor)

        return self.database.write(step)
