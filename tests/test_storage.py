"""Tests for broker.storage: URL rules, group commit, per-write rollback, deadlines, failures.

SQLite runs in the test's tmp_path; PostgreSQL is the real server at $LUIGI_CREDS_TEST_PG, in a
uniquely named database dropped afterwards. Threads are synchronised with events, never sleeps.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from broker.dev.harness import fresh_pg_database
from broker.storage import Database, RowInsert, StoreUnavailable, StoreURL, Tx


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """An open store with one table `t (k TEXT PRIMARY KEY)`."""
    pg = fresh_pg_database("storage") if request.param == "postgresql" else nullcontext("")
    with pg as pg_url:
        url = pg_url or f"sqlite:///{tmp_path}/store.db"
        database = Database.open(url)
        database.write(lambda tx: tx.execute("CREATE TABLE t (k TEXT PRIMARY KEY)"))
        try:
            yield database
        finally:
            database.close()


def keys(db: Database) -> list[str]:
    return [row[0] for row in db.read(lambda tx: tx.rows("SELECT k FROM t ORDER BY k"))]


def insert(key: str) -> Callable[[Tx], int]:
    def step(tx: Tx) -> int:
        return tx.execute("INSERT INTO t (k) VALUES (?)", (key,)).rowcount

    return step


def hold_the_writer(
    db: Database,
    then: Callable[[Tx], object] = lambda tx: None,
    run: Callable[[Callable[[Tx], object]], object] | None = None,
) -> tuple[threading.Thread, threading.Event]:
    """Starts a write (through `run`, db.write by default) that holds the writer until the
    returned event is set, then runs `then` in its transaction; returns once it holds it."""
    running, release = threading.Event(), threading.Event()

    def held(tx: Tx) -> None:
        running.set()
        release.wait(10)
        then(tx)

    thread = threading.Thread(target=run or db.write, args=(held,))
    thread.start()
    assert running.wait(10)
    return thread, release


def wait_queued(db: Database, count: int) -> None:
    while len(db._pending) < count:
        threading.Event().wait(0.001)


def test_urls_are_parsed_by_one_rule() -> None:
    """SQLite needs an absolute path; postgres/postgresql (with +driver) are one dialect."""
    assert StoreURL.parse("sqlite:///var/lib/a.db") == StoreURL("sqlite", "/var/lib/a.db")
    # One spelling of a path: "sqlite:////abs" (four slashes, as SQLAlchemy writes it) too.
    assert StoreURL.parse("sqlite:////var/lib/a.db") == StoreURL("sqlite", "/var/lib/a.db")
    assert StoreURL.parse("postgres://u@h/db").dialect == "postgresql"
    assert StoreURL.parse("postgresql+psycopg://u@h/db").target == "postgresql://u@h/db"
    for bad in ("sqlite://relative.db", "sqlite:relative.db", "mysql://root:pw@h/db"):
        with pytest.raises(ValueError) as info:
            StoreURL.parse(bad)
        assert "pw" not in str(info.value)
    assert "secret" not in repr(StoreURL.parse("postgresql://u:secret@h/db"))


def test_concurrent_writes_share_one_commit(db: Database) -> None:
    """Writes queued while a batch runs commit together, in one transaction, and all return."""
    first, release = hold_the_writer(db, insert("first"))
    before = db.commits
    results: list[object] = []
    writers = [
        threading.Thread(target=lambda i=i: results.append(db.write(insert(f"k{i:02}"))))
        for i in range(10)
    ]
    for w in writers:
        w.start()
    wait_queued(db, 10)  # all ten queued behind the running batch
    release.set()
    first.join()
    for w in writers:
        w.join()
    assert results == [1] * 10
    assert db.commits == before + 2  # the blocking write's batch, then one for all ten
    assert keys(db) == ["first"] + [f"k{i:02}" for i in range(10)]


def test_a_failing_write_rolls_back_alone(db: Database) -> None:
    """A write that raises undoes only its own statements; its batch-mates commit."""

    def half_then_fail(tx: Tx) -> None:
        tx.execute("INSERT INTO t (k) VALUES ('half')")
        raise RuntimeError("refused")

    errors: list[BaseException] = []

    def run_failing() -> None:
        try:
            db.write(half_then_fail)
        except RuntimeError as exc:
            errors.append(exc)

    holder, release = hold_the_writer(db)
    threads = [
        threading.Thread(target=db.write, args=(insert("a"),)),
        threading.Thread(target=run_failing),
        threading.Thread(target=db.write, args=(insert("b"),)),
    ]
    for t in threads:
        t.start()
    wait_queued(db, 3)
    release.set()
    for t in [holder, *threads]:
        t.join()
    assert [str(e) for e in errors] == ["refused"]
    assert keys(db) == ["a", "b"]


@pytest.mark.parametrize("wrote_first", [True, False])
def test_a_refusing_write_reruns_its_batch_mates_only_if_it_had_written(
    db: Database, wrote_first: bool
) -> None:
    """No savepoints: a write refusing after it wrote rolls the batch back and the others run
    again in a new transaction (each committed once); one refusing before writing is dropped
    and the others run once."""
    runs: list[str] = []

    def counted(key: str) -> Callable[[Tx], int]:
        def step(tx: Tx) -> int:
            runs.append(key)
            return insert(key)(tx)

        return step

    def refusing(tx: Tx) -> None:
        if wrote_first:
            tx.execute("INSERT INTO t (k) VALUES ('refused')")
        raise RuntimeError("refused")

    results: dict[str, object] = {}

    def run(name: str, step: Callable[[Tx], object]) -> None:
        try:
            results[name] = db.write(step)
        except RuntimeError as exc:
            results[name] = str(exc)

    holder, release = hold_the_writer(db)
    before = db.commits
    threads = []
    for name, step in (("a", counted("a")), ("r", refusing), ("b", counted("b"))):
        threads.append(threading.Thread(target=run, args=(name, step)))
        threads[-1].start()
        wait_queued(db, len(threads))
    release.set()
    for t in [holder, *threads]:
        t.join()
    assert results == {"a": 1, "r": "refused", "b": 1}
    assert keys(db) == ["a", "b"]
    assert runs == (["a", "a", "b"] if wrote_first else ["a", "b"])
    assert db.commits == before + 2  # the holder's, then one for the batch


def test_driver_error_fails_the_write_as_store_unavailable(db: Database) -> None:
    """A statement the database refuses becomes StoreUnavailable and nothing is kept."""

    def duplicate(tx: Tx) -> None:
        tx.execute("INSERT INTO t (k) VALUES ('x')")
        tx.execute("INSERT INTO t (k) VALUES ('x')")

    with pytest.raises(StoreUnavailable):
        db.write(duplicate)
    assert keys(db) == []
    db.write(insert("after"))  # the writer recovered
    assert keys(db) == ["after"]


PARENTS = RowInsert("fam_parent", ("k",))
CHILDREN = RowInsert("fam_child", ("k", "parent"), rank=1)


def family_tables(tx: Tx) -> None:
    tx.execute("CREATE TABLE fam_parent (k TEXT PRIMARY KEY)")
    tx.execute(
        "CREATE TABLE fam_child (k TEXT PRIMARY KEY,"
        " parent TEXT NOT NULL REFERENCES fam_parent (k))"
    )


def test_queued_rows_are_written_together_before_a_statement_naming_their_family(
    db: Database,
) -> None:
    """Rows queued with insert_later (PostgreSQL) are one statement per table, written before
    the first statement of the transaction that names a table of their family (parents before
    the children that reference them, whatever the queueing order) or else before the commit.
    SQLite writes each row at once."""
    db.write(family_tables)
    queues = db.dialect.queues_rows
    seen: dict[str, object] = {}

    def step(tx: Tx) -> None:
        if queues:
            tx.insert_later(CHILDREN, ("c1", "p1"))  # queued before its parent: rank orders
        tx.insert_later(PARENTS, ("p1",))
        if not queues:
            tx.insert_later(CHILDREN, ("c1", "p1"))
        tx.insert_later(PARENTS, ("p2",))
        tx.execute("INSERT INTO t (k) VALUES ('other')")  # another family: nothing written
        seen["other"] = tx.executed
        seen["read"] = [row[0] for row in tx.rows("SELECT k FROM fam_parent ORDER BY k")]
        seen["read_at"] = tx.executed  # queued: the parents' insert, the children's, the read
        tx.insert_later(CHILDREN, ("c2", "p2"))  # written before the commit

    db.write(step)
    counts = {"other": 1, "read_at": 4} if queues else {"other": 4, "read_at": 5}
    assert seen == {**counts, "read": ["p1", "p2"]}
    children = db.read(lambda tx: tx.rows("SELECT k, parent FROM fam_child ORDER BY k"))
    assert [tuple(row) for row in children] == [("c1", "p1"), ("c2", "p2")]


def test_a_refusing_write_leaves_no_queued_row_and_its_mates_theirs(db: Database) -> None:
    """A write that queued rows and then refused wrote nothing: its rows are dropped, it is not
    run again, and the rows its batch-mates queued commit with one statement per table. (On
    SQLite it had written them: the batch rolls back and its mates run again.)"""
    db.write(family_tables)
    runs: list[str] = []

    def queue(key: str, refuse: bool = False) -> Callable[[Tx], None]:
        def step(tx: Tx) -> None:
            runs.append(key)
            tx.insert_later(PARENTS, (key,))
            tx.insert_later(CHILDREN, (key + "-child", key))
            if refuse:
                raise RuntimeError("refused")

        return step

    errors: list[str] = []

    def run(step: Callable[[Tx], None]) -> None:
        try:
            db.write(step)
        except RuntimeError as exc:
            errors.append(str(exc))

    holder, release = hold_the_writer(db)
    before = db.commits
    threads = []
    for step in (queue("a"), queue("r", refuse=True), queue("b")):
        threads.append(threading.Thread(target=run, args=(step,)))
        threads[-1].start()
        wait_queued(db, len(threads))
    release.set()
    for t in [holder, *threads]:
        t.join()
    assert errors == ["refused"]
    assert runs == (["a", "r", "b"] if db.dialect.queues_rows else ["a", "r", "a", "b"])
    assert db.commits == before + 2
    parents = db.read(lambda tx: tx.rows("SELECT k FROM fam_parent ORDER BY k"))
    children = db.read(lambda tx: tx.rows("SELECT parent FROM fam_child ORDER BY k"))
    assert [row[0] for row in parents] == ["a", "b"] == [row[0] for row in children]


def test_sqlite_write_locked_elsewhere_fails_within_the_deadline(tmp_path: Path) -> None:
    """Another process holding the write lock: the write fails after busy_timeout, not later."""
    path = tmp_path / "locked.db"
    db = Database.open(f"sqlite:///{path}", busy_timeout=0.3)
    db.write(lambda tx: tx.execute("CREATE TABLE t (k TEXT PRIMARY KEY)"))
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StoreUnavailable):
            db.write(insert("during"))
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    db.write(insert("after"))
    assert keys(db) == ["after"]
    db.close()


def test_closed_store_refuses_reads_and_writes(tmp_path: Path) -> None:
    db = Database.open(f"sqlite:///{tmp_path}/c.db")
    db.close()
    with pytest.raises(StoreUnavailable):
        db.write(lambda tx: None)
    with pytest.raises(StoreUnavailable):
        db.read(lambda tx: None)
    with pytest.raises(StoreUnavailable):
        db.query("SELECT 1")


def test_a_write_queued_past_its_deadline_fails_alone_and_the_queue_moves_on(
    tmp_path: Path,
) -> None:
    """Behind a batch that holds the writer too long, a queued write gives up (nothing of it
    kept) and leaves the queue; the writes after it run once the batch is done."""
    db = Database.open(f"sqlite:///{tmp_path}/d.db", busy_timeout=0.3)
    db.write(lambda tx: tx.execute("CREATE TABLE t (k TEXT PRIMARY KEY)"))
    holder, release = hold_the_writer(db, insert("first"))
    with pytest.raises(StoreUnavailable):
        db.write(insert("late"))  # waits 0.3 s, never started
    assert db._pending == []
    results: list[object] = []
    after = threading.Thread(target=lambda: results.append(db.write(insert("after"))))
    after.start()
    wait_queued(db, 1)
    release.set()
    holder.join()
    after.join()
    assert results == [1]
    assert keys(db) == ["after", "first"]
    db.close()


def test_a_leader_interrupted_mid_batch_hands_the_queue_on(db: Database) -> None:
    """If the thread running a batch is interrupted, its batch is rolled back and the write
    queued behind it still runs (it leads the next batch) instead of waiting forever."""

    def interrupted(tx: Tx) -> None:
        tx.execute("INSERT INTO t (k) VALUES ('lost')")
        raise KeyboardInterrupt

    def lead(step: Callable[[Tx], object]) -> None:
        with pytest.raises(KeyboardInterrupt):
            db.write(step)

    errors: list[BaseException] = []

    def follow() -> None:
        try:
            db.write(insert("mate"))
        except StoreUnavailable as exc:
            errors.append(exc)

    leader, release = hold_the_writer(db, interrupted, run=lead)
    mate = threading.Thread(target=follow)
    mate.start()
    wait_queued(db, 1)
    release.set()
    leader.join()
    mate.join()
    # The mate was queued behind the interrupted batch, so it led the next one and committed.
    assert errors == []
    assert keys(db) == ["mate"]


def test_commits_leave_the_wal_to_a_background_checkpoint_when_asked(db: Database) -> None:
    """After checkpoint_in_background, no commit checkpoints the SQLite WAL (SQLite would at
    1,000 pages); checkpoint_wal does, off the writers' path. PostgreSQL has nothing to do."""
    if db.dialect.name != "sqlite":
        assert db.checkpoint_in_background() is False
        return
    assert db.checkpoint_in_background() is True
    db.write(lambda tx: tx.execute("CREATE TABLE big (v TEXT)"))
    page = "x" * 4000
    for _ in range(1200):  # a page or more per commit: past the 1,000-page default
        db.write(lambda tx: tx.execute("INSERT INTO big (v) VALUES (?)", (page,)))
    busy, frames, done = db.checkpoint_wal()
    assert busy == 0 and frames > 1200 and done == frames
    _, frames, _ = db.checkpoint_wal()
    assert frames == done  # nothing new: the next write starts the WAL over


def test_sqlite_instants_read_back_as_written() -> None:
    """Instants in to_db's text come back equal and aware (the fast path); other texts the
    strict format accepts (a shorter fraction) still parse, and anything else is refused."""
    dialect = Database(StoreURL.parse("sqlite:////unused.db")).dialect
    for instant in (
        datetime(2026, 12, 2, 14, 0, 0, 123456, tzinfo=UTC),
        datetime(2026, 1, 1, tzinfo=UTC),
        datetime(2026, 6, 1, 12, tzinfo=timezone(timedelta(hours=2))),
    ):
        text = dialect.to_db(instant)
        assert text.endswith("Z") and len(text) == 27
        back = dialect.from_db(text)
        assert back == instant and back is not None and back.tzinfo == UTC
    assert dialect.from_db("2026-12-02T14:00:00.5Z") == datetime(
        2026, 12, 2, 14, 0, 0, 500000, tzinfo=UTC
    )
    assert dialect.from_db(None) is None
    for bad in ("2026-12-02 14:00:00.000000Z", "2026-13-02T14:00:00.000000Z", "2026-12-02"):
        with pytest.raises(ValueError):
            dialect.from_db(bad)


def test_a_single_statement_query_reads_committed_rows_and_maps_failures(db: Database) -> None:
    """Database.query: one SELECT outside any transaction, on the read pool; a statement the
    database refuses is StoreUnavailable, and the pool keeps serving afterwards."""
    db.write(insert("a"))
    db.write(insert("b"))
    assert db.query("SELECT k FROM t WHERE k > ? ORDER BY k", ("a",)) == [("b",)]
    with pytest.raises(StoreUnavailable):
        db.query("SELECT k FROM no_such_table")
    assert [row[0] for row in db.query("SELECT k FROM t ORDER BY k")] == ["a", "b"]
