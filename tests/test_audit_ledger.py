"""The audit ledger on real SQLite files and a real PostgreSQL server: appends, tamper detection,
dangling intents, prune, key material and fail-closed errors.

PostgreSQL tests run against $LUIGI_CREDS_TEST_PG (default postgresql://postgres@127.0.0.1:5432/test),
each in its own freshly created schema that is dropped afterwards.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.audit import chain, open_store
from broker.audit.events import AuditEvent, Outcome
from broker.audit.key_files import load_or_create_signing_key, load_public_keys
from broker.audit.ledger import SqlLedger
from broker.audit.verify import VerifyReport, verify_ledger
from broker.storage import StoreUnavailable, Tx

PG_BASE = os.environ.get("LUIGI_CREDS_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
T0 = datetime(2026, 11, 16, 8, 0, tzinfo=UTC)


class FakeClock:
    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A PostgreSQL URL whose search_path is a schema made for this test and dropped after it."""
    schema = "audit_t_" + uuid.uuid4().hex[:12]
    with psycopg.connect(PG_BASE, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    sep = "&" if "?" in PG_BASE else "?"
    try:
        yield f"{PG_BASE}{sep}options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(PG_BASE, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


@dataclass
class Ledger:
    url: str
    key_path: Path
    salt_path: Path
    clock: FakeClock
    opened: list[SqlLedger] = field(default_factory=list)

    def open(self, **kw: Any) -> SqlLedger:
        """The store with this test's key and salt (checkpoint every 4 records unless told)."""
        kw.setdefault("checkpoint_every", 4)
        kw.setdefault("signing_key_path", self.key_path)
        kw.setdefault("salt_path", self.salt_path)
        store = open_store(self.url, clock=self.clock, **kw)
        self.opened.append(store)
        return store

    def close_all(self) -> None:
        for store in self.opened:
            store.close()

    def sql(self, statement: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Run SQL behind the store's back, as an attacker with database access would."""
        if self.url.startswith("sqlite"):
            conn = sqlite3.connect(self.url.removeprefix("sqlite://"))
            try:
                rows = conn.execute(statement, params).fetchall()
                conn.commit()
                return rows
            finally:
                conn.close()
        with psycopg.connect(self.url, autocommit=True) as pg:
            cur = pg.execute(statement.replace("?", "%s"), params)
            return cur.fetchall() if cur.description else []

    def verify(self, store: SqlLedger, now: datetime | None = None) -> VerifyReport:
        return verify_ledger(
            store, public_keys=load_public_keys(self.key_path), now=now or self.clock.now
        )


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Ledger]:
    """An empty ledger on each store, with a key and salt generated in tmp_path."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/audit.db"
    else:
        url = request.getfixturevalue("pg_url")
    lg = Ledger(url, tmp_path / "audit-key.pem", tmp_path / "audit-salt", FakeClock())
    try:
        yield lg
    finally:
        lg.close_all()


def event(i: int, outcome: Outcome = Outcome.ISSUED, **kw: Any) -> AuditEvent:
    fields: dict[str, Any] = {
        "time": T0 + timedelta(seconds=i),
        "request_id": f"req-{i}",
        "outcome": outcome,
        "reason": str(outcome),
        "issuer": "gitlab",
        "subject": "alice" if i % 2 else "bob",
        "grant": "etl-writer",
        "credential_ref": f"ASIA{i:016d}",
        "claims": {"ref": "main", "project_id": "42"},
    }
    fields.update(kw)
    return AuditEvent(**fields)


def seeded(ledger: Ledger, n: int = 10) -> SqlLedger:
    store = ledger.open()
    for i in range(n):
        assert store.append(event(i)) == i
    return store


def test_appends_are_contiguous_and_verify(ledger: Ledger) -> None:
    """Appends get seq 0..n-1, checkpoints are signed every N records, and the ledger verifies."""
    store = seeded(ledger, 10)
    report = ledger.verify(store)
    assert report.ok, report.findings
    assert report.size == 10 and report.first_bad_seq is None
    assert [cp.size for cp in store.checkpoints()] == [4, 8]
    assert report.checkpoints_verified == 2 and report.unsigned_tail == 2
    assert [e.request_id for e in store.events()] == [f"req-{i}" for i in range(10)]
    assert [e.request_id for e in store.events(since=T0 + timedelta(seconds=7))] == [
        "req-7",
        "req-8",
        "req-9",
    ]
    assert next(iter(store.events())) == event(0)
    store.close()


def test_a_batch_moves_the_head_once_and_a_refused_write_leaves_no_trace(ledger: Ledger) -> None:
    """Appends committed together read the head once and write it once; a write of the batch
    that refuses itself after appending takes its record and its head move back with it."""
    store = seeded(ledger, 2)
    db = store.database
    running, release = threading.Event(), threading.Event()
    statements: list[str] = []

    def holder(tx: Tx) -> None:
        running.set()
        release.wait(10)

    def counting(tx: Tx) -> None:
        # Seen from inside the batch's transaction: every statement it runs from here on.
        original = tx.execute

        def execute(sql: str, params: Sequence[Any] = ()) -> Tx:
            statements.append(sql)
            return original(sql, params)

        tx.execute = execute  # type: ignore[method-assign]

    def refused(tx: Tx) -> None:
        store.appender(event(90))(tx)
        raise RuntimeError("refused after appending")

    first = threading.Thread(target=db.write, args=(holder,))
    first.start()
    assert running.wait(10)
    errors: list[BaseException] = []

    def run(step: Callable[[Tx], object]) -> None:
        try:
            db.write(step)
        except RuntimeError as exc:
            errors.append(exc)

    steps = [counting, store.appender(event(2)), refused, store.appender(event(3))]
    threads = []
    for step in steps:  # queued in this order: one batch after the holder's
        threads.append(threading.Thread(target=run, args=(step,)))
        threads[-1].start()
        while len(db._pending) < len(threads):
            threading.Event().wait(0.001)
    release.set()
    for t in [first, *threads]:
        t.join()
    assert [str(e) for e in errors] == ["refused after appending"]
    head_reads = [s for s in statements if "FROM audit_head" in s]
    head_writes = [s for s in statements if s.startswith("UPDATE audit_head")]
    assert len(head_reads) == 1 and len(head_writes) == 1
    assert [e.request_id for e in store.events()] == ["req-0", "req-1", "req-2", "req-3"]
    assert store.head().size == 4
    report = ledger.verify(store)
    assert report.ok, report.findings
    store.close()


def test_checkpoint_every_interval(ledger: Ledger) -> None:
    """A checkpoint is also written on the first append after the checkpoint interval elapses."""
    store = ledger.open(checkpoint_every=1000, checkpoint_interval=timedelta(minutes=5))
    store.append(event(0))
    assert store.checkpoints() == []
    ledger.clock.now += timedelta(minutes=6)
    store.append(event(1))
    assert [cp.size for cp in store.checkpoints()] == [2]
    assert store.checkpoint() == 2  # nothing new: no second checkpoint of the same size
    store.append(event(2))
    assert store.checkpoint() == 3
    assert [cp.size for cp in store.checkpoints()] == [2, 3]
    assert ledger.verify(store).ok
    store.close()


def _swap(ledger: Ledger, a: int, b: int) -> None:
    rows = {
        s: ledger.sql("SELECT record, prev_hash, entry_hash FROM audit_log WHERE seq = ?", (s,))[0]
        for s in (a, b)
    }
    for s, other in ((a, b), (b, a)):
        ledger.sql(
            "UPDATE audit_log SET record = ?, prev_hash = ?, entry_hash = ? WHERE seq = ?",
            (*rows[other], s),
        )


def _rehash(ledger: Ledger, seq: int, old: str, new: str) -> None:
    record = ledger.sql("SELECT record FROM audit_log WHERE seq = ?", (seq,))[0][0]
    record = record.replace(old, new)
    ledger.sql(
        "UPDATE audit_log SET record = ?, entry_hash = ? WHERE seq = ?",
        (record, chain.entry_hash(record.encode()), seq),
    )


def _forge_checkpoint(ledger: Ledger, size: int) -> None:
    key = load_or_create_signing_key(ledger.key_path)
    fake_root = chain.leaf_hash(b"another history")
    note = chain.sign_checkpoint(chain.Checkpoint("luigi-creds/audit", size, fake_root), key)
    ledger.sql(
        "INSERT INTO audit_checkpoint (size, time, root, note, frontier, last_hash)"
        " VALUES (?, ?, ?, ?, '', '')",
        (size, chain.format_time(T0), fake_root.hex(), note),
    )


def _flip_signature(ledger: Ledger, size: int) -> None:
    note = ledger.sql("SELECT note FROM audit_checkpoint WHERE size = ?", (size,))[0][0]
    body, sig = note.rsplit(" ", 1)
    flipped = ("B" if sig[10] != "B" else "C").join([sig[:10], sig[11:]])
    ledger.sql("UPDATE audit_checkpoint SET note = ? WHERE size = ?", (f"{body} {flipped}", size))


TAMPERS: dict[str, tuple[Callable[[Ledger], None], str, int]] = {
    "edit record": (
        lambda lg: lg.sql(
            "UPDATE audit_log SET record = replace(record, 'alice', 'mallory') WHERE seq = 5"
        ),
        "edited",
        5,
    ),
    "edit record and its hash": (lambda lg: _rehash(lg, 5, "alice", "mallory"), "edited", 5),
    "edit indexed column": (
        lambda lg: lg.sql("UPDATE audit_log SET outcome = 'denied' WHERE seq = 2"),
        "edited",
        2,
    ),
    "delete record": (lambda lg: lg.sql("DELETE FROM audit_log WHERE seq = 5"), "deleted", 5),
    "delete first records": (
        lambda lg: lg.sql("DELETE FROM audit_log WHERE seq < 3"),
        "deleted",
        0,
    ),
    "reorder records": (lambda lg: _swap(lg, 5, 6), "reordered", 5),
    "duplicate record": (
        lambda lg: (
            lg.sql(
                "INSERT INTO audit_log SELECT 10, time, request_id, outcome, record, prev_hash,"
                " entry_hash FROM audit_log WHERE seq = 3"
            ),
            lg.sql("UPDATE audit_head SET size = 11"),
        ),
        "duplicated",
        10,
    ),
    "truncate tail": (lambda lg: lg.sql("DELETE FROM audit_log WHERE seq >= 9"), "truncated", 9),
    "truncate tail and head": (
        lambda lg: (
            lg.sql("DELETE FROM audit_log WHERE seq >= 6"),
            lg.sql("UPDATE audit_head SET size = 6"),
        ),
        "truncated",
        6,
    ),
    "bad checkpoint signature": (lambda lg: _flip_signature(lg, 8), "bad_signature", 7),
    "forked checkpoint": (lambda lg: _forge_checkpoint(lg, 8), "fork", 7),
}


@pytest.mark.parametrize("tamper", list(TAMPERS))
def test_tampering_is_detected_at_the_right_record(ledger: Ledger, tamper: str) -> None:
    """Each kind of edit made directly in the database fails verify and names the first bad seq."""
    store = seeded(ledger, 10)
    assert ledger.verify(store).ok
    action, kind, seq = TAMPERS[tamper]
    action(ledger)
    report = ledger.verify(store)
    assert not report.ok
    assert report.first_bad_seq == seq, report.findings
    first = next(f for f in report.findings if f.fatal and f.seq == seq)
    assert first.kind == kind, report.findings
    store.close()


def test_rewritten_history_fails_against_signed_checkpoints(ledger: Ledger) -> None:
    """Rewriting every hash after an edit keeps the chain intact but not the signed Merkle root."""
    store = seeded(ledger, 10)
    _rehash(ledger, 1, "bob", "eve")  # seq 1 is alice; rewrite 2 (bob) and relink everything
    prev = ledger.sql("SELECT entry_hash FROM audit_log WHERE seq = 0")[0][0]
    for seq in range(1, 10):
        record = ledger.sql("SELECT record FROM audit_log WHERE seq = ?", (seq,))[0][0]
        old_prev = ledger.sql("SELECT prev_hash FROM audit_log WHERE seq = ?", (seq,))[0][0]
        record = record.replace(old_prev, prev)
        if seq == 2:
            record = record.replace('"subject":"bob"', '"subject":"eve"')
        digest = chain.entry_hash(record.encode())
        ledger.sql(
            "UPDATE audit_log SET record = ?, prev_hash = ?, entry_hash = ? WHERE seq = ?",
            (record, prev, digest, seq),
        )
        prev = digest
    report = ledger.verify(store)
    assert not report.ok
    assert {f.kind for f in report.findings if f.fatal} == {"root_mismatch"}
    assert report.first_bad_seq == 3  # the first signed checkpoint (size 4) no longer matches
    store.close()


def test_checkpoints_from_another_key_fail(ledger: Ledger, tmp_path: Path) -> None:
    """Checkpoints verify only under the pinned key; a different key file reports bad signatures."""
    store = seeded(ledger, 8)
    other = tmp_path / "other.pem"
    load_or_create_signing_key(other)
    report = verify_ledger(store, public_keys=load_public_keys(other), now=T0)
    assert not report.ok and {f.kind for f in report.findings if f.fatal} == {"bad_signature"}
    store.close()


def test_external_checkpoint_detects_a_fork(ledger: Ledger) -> None:
    """A checkpoint shipped elsewhere earlier conflicts with a log rebuilt from seq 0."""
    store = seeded(ledger, 4)
    shipped = store.checkpoints()[0].note
    store.close()
    ledger.sql("DELETE FROM audit_log")
    ledger.sql("DELETE FROM audit_checkpoint")
    ledger.sql(
        "UPDATE audit_head SET size = 0, last_hash = ?, frontier = '', checkpoint_size = 0",
        (chain.GENESIS_HASH,),
    )
    store = ledger.open()
    for i in range(4):
        store.append(event(i, subject="someone-else"))
    report = verify_ledger(
        store,
        public_keys=load_public_keys(ledger.key_path),
        now=T0,
        external_checkpoints=[shipped],
    )
    assert not report.ok
    assert "fork" in {f.kind for f in report.findings}
    store.close()


def test_dangling_intents_are_listed_and_fail_verify_once_stale(ledger: Ledger) -> None:
    """An intent without a terminal record dangles until a reconciled record closes it."""
    store = ledger.open()
    store.append(event(0, Outcome.INTENT, request_id="a", attempt=1))
    store.append(event(1, Outcome.ISSUED, request_id="a"))
    store.append(event(2, Outcome.INTENT, request_id="b", attempt=1))
    store.append(event(3, Outcome.INTENT, request_id="b", attempt=2))
    store.append(event(4, Outcome.INTENT, request_id="c"))
    store.append(event(5, Outcome.DENIED, request_id="c"))
    dangling = store.dangling_intents()
    assert [(e.request_id, e.attempt) for e in dangling] == [("b", 2)]

    young = ledger.verify(store, now=T0 + timedelta(minutes=1))
    assert young.ok and young.in_flight == ("b",)
    stale = ledger.verify(store, now=T0 + timedelta(hours=1))
    assert not stale.ok and stale.first_bad_seq == 3
    assert stale.findings[0].kind == "dangling_intent"

    store.append(event(6, Outcome.RECONCILED, request_id="b", reason="not_issued"))
    assert store.dangling_intents() == []
    assert ledger.verify(store, now=T0 + timedelta(hours=1)).ok
    store.close()


def test_prune_keeps_verification_from_the_last_retained_checkpoint(ledger: Ledger) -> None:
    """Prune deletes whole checkpointed prefixes before the date and the rest still verifies."""
    store = ledger.open()
    for i in range(10):
        store.append(event(i, time=T0 + timedelta(days=i)))
    result = store.prune(T0 + timedelta(days=6, hours=1))
    assert (result.deleted, result.anchor_size) == (4, 4)  # checkpoints at 4 and 8; day 7 > date
    assert next(e.request_id for e in store.events()) == "req-4"
    report = ledger.verify(store)
    assert report.ok, report.findings
    assert report.first_seq == 4 and report.size == 10
    store.append(event(10, time=T0 + timedelta(days=10)))
    assert ledger.verify(store).ok
    ledger.sql("UPDATE audit_log SET record = replace(record, 'alice', 'mallory') WHERE seq = 5")
    assert ledger.verify(store).first_bad_seq == 5
    assert store.prune(T0).deleted == 0
    store.close()


def test_hash_ref_is_a_salted_hmac(ledger: Ledger, tmp_path: Path) -> None:
    """Accessors are stored as HMAC-SHA256 under the deployment salt, stable across reopen."""
    store = ledger.open()
    ref = store.hash_ref("accessor-123")
    assert ref.startswith("hmac-sha256:") and "accessor-123" not in ref
    assert store.hash_ref("accessor-123") == ref != store.hash_ref("accessor-124")
    store.close()
    assert ledger.open().hash_ref("accessor-123") == ref
    assert stat.S_IMODE(ledger.salt_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(ledger.key_path.stat().st_mode) == 0o600
    assert ledger.open(salt_path=tmp_path / "salt2").hash_ref("accessor-123") != ref


def test_salt_without_a_file_lives_in_the_database(ledger: Ledger) -> None:
    """Without a salt file the salt is generated once and kept in the ledger database."""
    first = ledger.open(salt_path=None).hash_ref("acc")
    assert ledger.open(salt_path=None).hash_ref("acc") == first


def test_unsigned_checkpoints_are_reported(ledger: Ledger) -> None:
    """Unsigned checkpoints still bind the Merkle root, and verify says they are unsigned."""
    store = ledger.open(signing_key_path=None, checkpoint_every=2)
    for i in range(4):
        store.append(event(i))
    report = verify_ledger(store, public_keys=None, now=T0)
    assert report.ok and "unsigned" in {f.kind for f in report.findings}
    load_or_create_signing_key(ledger.key_path)
    strict = ledger.verify(store)
    assert not strict.ok and {f.kind for f in strict.findings if f.fatal} == {"bad_signature"}


def test_floats_are_recorded_as_strings(ledger: Ledger) -> None:
    """A float that reaches the store is stored as its repr instead of failing the append."""
    store = ledger.open()
    store.append(event(0, claims={"weird": 1.5}, detail={"x": [0.25]}))
    stored = next(iter(store.events()))
    assert stored.claims == {"weird": "1.5"} and stored.detail == {"x": ["0.25"]}


def test_schema_is_versioned(ledger: Ledger) -> None:
    """The migrations table records version 1, and a newer schema than the code is refused."""
    store = ledger.open()
    assert store.schema_version() == 1
    assert ledger.open().schema_version() == 1  # reopening applies nothing twice
    store.close()
    ledger.sql(
        "INSERT INTO audit_schema_migrations (version, name, applied_at) VALUES (99, 'f', 'x')"
    )
    with pytest.raises(StoreUnavailable):
        ledger.open()


def test_closed_store_fails_closed(ledger: Ledger) -> None:
    """After close, append and check_writable raise StoreUnavailable rather than a driver error."""
    store = ledger.open()
    store.check_writable()
    store.close()
    with pytest.raises(StoreUnavailable):
        store.append(event(0))
    with pytest.raises(StoreUnavailable):
        store.check_writable()


def test_sqlite_lock_held_elsewhere_fails_within_the_timeout(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A writer blocked by another process's lock gets StoreUnavailable after its busy timeout."""
    path = tmp_path / "a.db"
    open_store(f"sqlite:///{path}").close()
    store = open_store(f"sqlite:///{path}", clock=FakeClock(), busy_timeout=0.2)
    request.addfinalizer(store.close)
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StoreUnavailable):
            store.append(event(0))
        with pytest.raises(StoreUnavailable):
            store.check_writable()
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert store.append(event(0)) == 0


def test_unwritable_sqlite_path_is_audit_unavailable(tmp_path: Path) -> None:
    """A database file that cannot be created surfaces as StoreUnavailable, not sqlite3.Error."""
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    with pytest.raises(StoreUnavailable):
        open_store(f"sqlite:///{blocked}/audit.db")


@pytest.mark.integration
def test_unreachable_postgresql_is_audit_unavailable() -> None:
    """A PostgreSQL server that does not answer surfaces as StoreUnavailable."""
    with pytest.raises(StoreUnavailable):
        open_store("postgresql://postgres@127.0.0.1:1/none?connect_timeout=1")


def test_store_urls_are_checked() -> None:
    """Relative SQLite paths and unknown schemes are refused."""
    for url in ("sqlite://relative.db", "mysql://x/y", "sqlite:relative.db"):
        with pytest.raises(ValueError):
            open_store(url)


def test_key_file_is_generated_once(tmp_path: Path) -> None:
    """An absent key file is created with a fresh Ed25519 key and reused on the next open."""
    path = tmp_path / "k" / "key.pem"
    first = load_or_create_signing_key(path)
    again = load_or_create_signing_key(path)
    assert isinstance(first, Ed25519PrivateKey)
    assert first.private_bytes_raw() == again.private_bytes_raw()
    assert [k.public_bytes_raw() for k in load_public_keys(path)] == [
        first.public_key().public_bytes_raw()
    ]


def test_proofs_verify_against_signed_checkpoints(ledger: Ledger) -> None:
    """Inclusion and consistency proofs from the ledger verify against signed checkpoint roots."""
    store = seeded(ledger, 10)
    keys = load_public_keys(ledger.key_path)
    cp4, cp8 = (chain.verify_checkpoint(cp.note, keys, store.origin) for cp in store.checkpoints())
    record = next(r for r in store.records() if r.seq == 5)
    leaf = bytes.fromhex(record.entry_hash)
    assert leaf == chain.leaf_hash(record.record.encode())
    chain.verify_inclusion(5, 8, leaf, store.inclusion_proof(5, 8), cp8.root)
    chain.verify_consistency(4, 8, store.consistency_proof(4, 8), cp4.root, cp8.root)
    with pytest.raises(ValueError):
        store.inclusion_proof(5, 11)


def test_hostile_text_is_recorded_not_fatal(ledger: Ledger) -> None:
    """Lone surrogates and odd values from a hostile token are recorded as text, not a failure."""
    store = ledger.open()
    store.append(
        event(0, subject="ma\ud800in", claims={"ref": "x\udfff", "n": 2**70}, detail={"b": b"\x00"})
    )
    stored = next(iter(store.events()))
    assert stored.subject == "ma\\ud800in" and stored.claims == {"ref": "x\\udfff", "n": 2**70}
    assert stored.detail == {"b": "b'\\x00'"}
    assert ledger.verify(store).ok


def test_unrecordable_event_fails_closed(ledger: Ledger) -> None:
    """An event with a naive timestamp raises StoreUnavailable and writes nothing."""
    store = ledger.open()
    with pytest.raises(StoreUnavailable):
        store.append(event(0, time=datetime(2026, 1, 1)))
    assert store.head().size == 0


def test_the_recordable_copy_is_the_event_with_only_its_text_made_encodable() -> None:
    """What the ledger hashes: the same event, claims/detail made JSON-safe, lone surrogates
    as escape text, the policy in force named if the event names none; the original untouched."""
    from dataclasses import replace

    from broker.audit.ledger import _recordable

    event = AuditEvent(
        time=T0,
        request_id="r1",
        outcome=Outcome.DENIED,
        subject="bad\ud800",
        claims={"n": 1.5, "ok": "é", 3: [True, None]},
        detail={"when": T0},
    )
    copy = _recordable(event, "p" * 64)
    assert copy == replace(
        event,
        subject="bad\\ud800",
        claims={"n": "1.5", "ok": "é", "3": [True, None]},
        detail={"when": T0},
        policy_sha256="p" * 64,
    )
    assert event.subject == "bad\ud800" and event.policy_sha256 == ""
    named = replace(event, policy_sha256="q" * 64)
    assert _recordable(named, "p" * 64).policy_sha256 == "q" * 64
