"""Tests for broker.sessions: the replay ledger and refresh sessions on SQLite and PostgreSQL.

SQLite runs in the test's tmp_path; PostgreSQL is the real server at $LUIGI_CREDS_TEST_PG
(default postgresql://postgres@127.0.0.1:5432/test), where this module creates a uniquely named
database and drops it at the end. Every time is injected; no test sleeps.
"""

from __future__ import annotations

import multiprocessing
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from races import run_at_once

from broker.audit import open_store
from broker.dev.processes import free_port
from broker.replay import ReplayLedger
from broker.sealing import RefSealer, SealError
from broker.sessions import (
    HANDLE_PREFIX,
    MIGRATIONS,
    REASON_REUSE,
    REASON_TOO_MANY_CHAINS,
    SessionError,
    SessionStore,
    canonical_claims,
    handle_hash,
    open_state,
    rotated,
)
from broker.storage import Database, StoreUnavailable, Tx

# Seals the session store's credential references; generated per test run.
SEALER = RefSealer(secrets.token_bytes(32))

PG_ADMIN_URL = os.environ.get("LUIGI_CREDS_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
# Now, to the second: replay rows are purged by the database's clock, so their expiries must be
# real times; the session tests pass their own `now` and need no particular instant.
T0 = datetime.now(UTC).replace(microsecond=0)
HOUR = timedelta(hours=1)
TABLES = (
    "session_credentials",
    "session_handles",
    "session_chains",
    "session_sessions",
    "replay_tokens",
)
CLAIMS = {"project_path": "data/etl", "ref": "main", "ref_protected": "true", "sub": "s"}


def _with_db(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


@pytest.fixture(scope="module")
def pg_database() -> Iterator[tuple[str, str]]:
    """A fresh PostgreSQL database for this module: (url, name); dropped afterwards."""
    name = f"luigi_creds_sessions_{secrets.token_hex(6)}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield _with_db(PG_ADMIN_URL, name), name
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@dataclass
class State:
    url: str
    ledger: ReplayLedger
    store: SessionStore

    def open_another(self) -> tuple[ReplayLedger, SessionStore]:
        """A second broker's view: its own connections to the same database."""
        return open_state(self.url, sealer=SEALER)


@pytest.fixture(
    params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)],
)
def state(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[State]:
    """An empty replay ledger and session store on the parametrised backend."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/state.db"
    else:
        url, _ = request.getfixturevalue("pg_database")
        with psycopg.connect(url, autocommit=True) as conn:
            exists = conn.execute("SELECT to_regclass('session_sessions')").fetchone()
            if exists is not None and exists[0] is not None:
                conn.execute(f"TRUNCATE {', '.join(TABLES)}")
    ledger, store = open_state(url, sealer=SEALER)
    try:
        yield State(url, ledger, store)
    finally:
        ledger.close()
        store.close()


def dump_tables(url: str) -> str:
    """Every row of our tables as text, to search for things that must not be stored."""
    rows: list[Any] = []
    if url.startswith("sqlite"):
        conn = sqlite3.connect(urlsplit(url).path)
        try:
            for table in TABLES:
                rows += conn.execute(f"SELECT * FROM {table}").fetchall()  # noqa: S608
        finally:
            conn.close()
    else:
        with psycopg.connect(url) as pg:
            for table in TABLES:
                rows += pg.execute(f"SELECT * FROM {table}").fetchall()  # noqa: S608
    return repr(rows)


def reason_of(call: Callable[[], object]) -> str:
    with pytest.raises(SessionError) as info:
        call()
    return info.value.reason


# ---------------------------------------------------------------------------------------------
# Replay ledger


def test_consume_once(state: State) -> None:
    """A token id is accepted the first time and refused every later time, per issuer."""
    ledger = state.ledger
    assert ledger.consume("gitlab", "jti-1", expires_at=T0 + HOUR, now=T0) is True
    assert ledger.consume("gitlab", "jti-1", expires_at=T0 + HOUR, now=T0) is False
    assert ledger.consume("gitlab", "jti-1", expires_at=T0 + HOUR, now=T0 + HOUR / 2) is False
    assert ledger.consume("github", "jti-1", expires_at=T0 + HOUR, now=T0) is True
    assert ledger.consume("gitlab", "jti-2", expires_at=T0 + HOUR, now=T0) is True


def test_consume_hostile_token_ids(state: State) -> None:
    """Huge, empty and non-ASCII token ids are consumed like any other, once."""
    ledger = state.ledger
    for token_id in ("x" * 8192, "", "j\u00e9ti\u202e", "a'; DROP TABLE replay_tokens; --"):
        assert ledger.consume("gitlab", token_id, expires_at=T0 + HOUR, now=T0) is True
        assert ledger.consume("gitlab", token_id, expires_at=T0 + HOUR, now=T0) is False


def test_consume_twenty_threads_one_winner(state: State) -> None:
    """Twenty threads consuming one jti at once get exactly one True."""
    results: list[bool] = []
    lock = threading.Lock()

    def worker() -> None:
        outcome = state.ledger.consume("gitlab", "raced", expires_at=T0 + HOUR, now=T0)
        with lock:
            results.append(outcome)

    run_at_once(worker, 20)
    assert sorted(results) == [False] * 19 + [True]


def test_replay_rows_kept_until_expiry_then_purged(state: State) -> None:
    """A consumed id stays refused until its expiry by the database's clock, then is purged."""
    ledger = state.ledger
    now = datetime.now(UTC)
    assert ledger.consume("gitlab", "short", expires_at=now + timedelta(seconds=1), now=now)
    assert ledger.consume("gitlab", "long", expires_at=now + HOUR, now=now)
    assert ledger.purge() == 0
    assert not ledger.consume("gitlab", "short", expires_at=now + HOUR, now=now)
    time.sleep(1.2)
    assert ledger.purge() == 1
    assert not ledger.consume("gitlab", "long", expires_at=now + HOUR, now=now)
    assert "long" not in dump_tables(state.url)


def test_purge_goes_by_the_database_clock_not_the_replicas(state: State) -> None:
    """A replica whose clock runs a day ahead purges nothing the database still holds live.

    Its own `now` only paces the purges; a row deleted by that clock would let a replay through
    at every replica whose clock is right.
    """
    ledger = state.ledger
    now = datetime.now(UTC)
    assert ledger.consume("gitlab", "live", expires_at=now + HOUR, now=now)
    ahead, _ = state.open_another()
    try:
        skewed = now + timedelta(days=1)
        # The skewed replica's consumption is due a purge on its clock; the row survives.
        assert ahead.consume("gitlab", "other", expires_at=skewed + HOUR, now=skewed)
        assert not ahead.consume("gitlab", "live", expires_at=skewed + HOUR, now=skewed)
        assert not ledger.consume("gitlab", "live", expires_at=now + HOUR, now=now)
        assert ahead.purge() == 0
    finally:
        ahead.close()


def test_consume_purges_expired_rows_opportunistically(state: State) -> None:
    """Consuming purges rows past their expiry without a separate purge call."""
    ledger = state.ledger
    now = datetime.now(UTC)
    ledger.consume("gitlab", "old", expires_at=now - timedelta(seconds=1), now=now)
    later = now + timedelta(minutes=10)  # paces the purge: one is due
    ledger.consume("gitlab", "new", expires_at=later + HOUR, now=later)
    assert dump_tables(state.url).count("gitlab") == 1


def test_two_ledgers_share_one_database(state: State) -> None:
    """A token consumed through one broker's ledger is refused by another's."""
    other_ledger, other_store = state.open_another()
    try:
        assert state.ledger.consume("gitlab", "shared", expires_at=T0 + HOUR, now=T0)
        assert not other_ledger.consume("gitlab", "shared", expires_at=T0 + HOUR, now=T0)
    finally:
        other_ledger.close()
        other_store.close()


def _consume_all(url: str, ids: list[str], barrier: Any, out: Any) -> None:
    """Child process body: open the state, wait for the other process, consume every id."""
    ledger, store = open_state(url, sealer=SEALER)
    barrier.wait()
    won = [i for i in ids if ledger.consume("gitlab", i, expires_at=T0 + HOUR, now=T0)]
    out.put(won)
    ledger.close()
    store.close()


def test_two_processes_race_on_one_database(state: State) -> None:
    """Two broker processes consuming the same ids on one database: each id wins exactly once."""
    url = state.url
    ids = [f"proc-race-{secrets.token_hex(4)}-{i}" for i in range(100)]
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    out = ctx.Queue()
    procs = [ctx.Process(target=_consume_all, args=(url, ids, barrier, out)) for _ in range(2)]
    for p in procs:
        p.start()
    won = [out.get(timeout=60), out.get(timeout=60)]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert sorted(won[0] + won[1]) == sorted(ids)
    assert not set(won[0]) & set(won[1])


# ---------------------------------------------------------------------------------------------
# Refresh sessions


def new_session(store: SessionStore, **overrides: Any) -> tuple[Any, str]:
    kwargs: dict[str, Any] = {
        "issuer": "gitlab",
        "subject": "project_path:data/etl:ref_type:branch:ref:main",
        "claims": CLAIMS,
        "now": T0,
        "expires_at": T0 + 12 * HOUR,
    }
    kwargs.update(overrides)
    return store.create(**kwargs)


def test_create_returns_opaque_handle_and_stores_only_its_hash(state: State) -> None:
    """A new session has generation 1 and a prefixed random handle stored only as sha256."""
    session, handle = new_session(
        state.store, key_thumbprint="NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
    )
    assert handle.startswith(HANDLE_PREFIX) and len(handle) == len(HANDLE_PREFIX) + 43
    assert session.generation == 1 and session.revoked_at is None and session.active(T0)
    assert session.created_at == T0 and session.expires_at == T0 + 12 * HOUR
    rows = dump_tables(state.url)
    assert handle not in rows and handle[len(HANDLE_PREFIX) :] not in rows
    assert handle_hash(handle) in rows
    stored = state.store.get(session.id)
    assert stored == session
    assert stored is not None and stored.key_thumbprint == session.key_thumbprint


def test_claims_are_stored_as_canonical_json(state: State) -> None:
    """Claims round-trip unchanged and are stored as canonical JSON."""
    claims = {"z": 1, "a": ["x", {"k": True}], "n\u00e9": None}
    session, _ = new_session(state.store, claims=claims)
    assert dict(session.claims) == claims
    assert canonical_claims(claims) == '{"a":["x",{"k":true}],"n\u00e9":null,"z":1}'
    assert canonical_claims(claims) in dump_tables(state.url)
    stored = state.store.get(session.id)
    assert stored is not None and dict(stored.claims) == claims


def test_rotation_chain_then_reuse_revokes_the_session(state: State) -> None:
    """Three rotations each give a new handle; reusing the first revokes the session for all."""
    store = state.store
    session, first = new_session(store)
    handles = [first]
    for step in range(3):
        rotated, handle = store.rotate(handles[-1], now=T0 + (step + 1) * timedelta(minutes=10))
        assert rotated.id == session.id and rotated.generation == step + 2
        handles.append(handle)
    assert len(set(handles)) == 4
    with pytest.raises(SessionError) as info:
        store.rotate(handles[0], now=T0 + HOUR)
    assert info.value.reason == "reused" and str(info.value) == "reused"
    assert info.value.session is not None and info.value.session.id == session.id
    assert info.value.session.revoked_reason == REASON_REUSE
    ended = store.get(session.id)
    assert ended is not None
    assert ended.revoked_reason == REASON_REUSE and ended.revoked_at == T0 + HOUR
    assert reason_of(lambda: store.rotate(handles[-1], now=T0 + HOUR)) == "revoked"
    assert reason_of(lambda: store.peek(handles[-1], now=T0 + HOUR)) == "revoked"


def test_concurrent_rotation_of_one_handle_has_one_winner(state: State) -> None:
    """When threads rotate the same handle at once, one wins and the rest end the session."""
    session, handle = new_session(state.store)
    wins: list[str] = []
    reasons: list[str] = []
    lock = threading.Lock()

    def worker() -> None:
        try:
            _, successor = state.store.rotate(handle, now=T0)
        except SessionError as exc:
            with lock:
                reasons.append(exc.reason)
        else:
            with lock:
                wins.append(successor)

    run_at_once(worker, 8)
    assert len(wins) == 1
    assert "reused" in reasons and set(reasons) <= {"reused", "revoked"}
    ended = state.store.get(session.id)
    assert ended is not None and ended.revoked_reason == REASON_REUSE
    assert reason_of(lambda: state.store.rotate(wins[0], now=T0)) == "revoked"


def branch(store: SessionStore, handle: str, siblings: int, *, now: datetime = T0) -> Any:
    """Spend `handle` opening `siblings` chains (at most 8 in all): (session, successor,
    the new chains' first handles)."""
    successor, firsts, step = store.branching(handle, now=now, siblings=siblings, max_chains=8)
    session, successor = rotated(store.database.write(step), successor)
    return session, successor, firsts


def test_sibling_chains_rotate_on_their_own_and_reuse_on_any_ends_them_all(state: State) -> None:
    """Each chain spends its own handles, interleaved with the others' rotations; reusing a
    spent handle of one sibling chain revokes the session, every chain with it."""
    store = state.store
    session, first = new_session(store)
    _, a1, (b1, c1) = branch(store, first, 2)
    assert len({first, a1, b1, c1}) == 4 and store.chain_count(session.id) == 3
    # Chain A rotates, then B spends the handle it had before A rotated: not reuse.
    _, a2 = store.rotate(a1, now=T0)
    _, b2 = store.rotate(b1, now=T0)
    _, c2 = store.rotate(c1, now=T0)
    rotated_a, a3 = store.rotate(a2, now=T0)
    assert rotated_a.generation == 4  # chain A (the first chain): first, a1, a2, a3
    assert store.peek(b2, now=T0).id == session.id
    assert reason_of(lambda: store.peek(b1, now=T0)) == "reused"  # peeking changes nothing
    assert store.peek(c2, now=T0).id == session.id

    assert reason_of(lambda: store.rotate(b1, now=T0 + HOUR / 2)) == "reused"
    ended = store.get(session.id)
    assert ended is not None and ended.revoked_reason == REASON_REUSE
    for handle in (a3, b2, c2):
        assert reason_of(lambda h=handle: store.rotate(h, now=T0 + HOUR / 2)) == "revoked"


def test_revoking_by_a_sibling_handle_ends_every_chain(state: State) -> None:
    store = state.store
    session, first = new_session(store)
    _, a1, (b1,) = branch(store, first, 1)
    _, b2 = store.rotate(b1, now=T0)
    (ended,) = store.revoke(handle=b2, reason="client_revoked", now=T0)
    assert ended.id == session.id
    assert reason_of(lambda: store.rotate(a1, now=T0)) == "revoked"
    assert reason_of(lambda: store.rotate(b2, now=T0)) == "revoked"


def test_chain_limit_refuses_without_spending_the_handle(state: State) -> None:
    """Past max_chains the rotation is refused as too_many_chains and nothing is spent."""
    store = state.store
    session, first = new_session(store)
    _, a1, siblings = branch(store, first, 6)  # 7 chains of 8
    assert len(siblings) == 6
    for handle in (a1, siblings[0]):
        _, _, step = store.branching(handle, now=T0, siblings=2, max_chains=8)
        assert store.database.write(step)[1] == REASON_TOO_MANY_CHAINS
    assert store.chain_count(session.id) == 7
    # The refused handles still work; one more chain fits exactly.
    _, _, (last,) = branch(store, a1, 1)
    assert store.chain_count(session.id) == 8
    store.rotate(siblings[0], now=T0)
    store.rotate(last, now=T0)
    live = store.get(session.id)
    assert live is not None and live.revoked_at is None


def test_an_idle_sibling_handle_expires_on_its_own(state: State) -> None:
    """max_idle applies per handle: a sibling chain left unused expires while another chain,
    spent recently, goes on."""
    store = state.store
    _, first = new_session(store)
    idle = timedelta(minutes=30)
    _, a1, (b1,) = branch(store, first, 1)
    _, a2 = store.rotate(a1, now=T0 + timedelta(minutes=20), max_idle=idle)
    later = T0 + timedelta(minutes=40)
    assert reason_of(lambda: store.rotate(b1, now=later, max_idle=idle)) == "expired"
    store.rotate(a2, now=later, max_idle=idle)


def test_chains_rotated_from_many_threads_at_once_all_succeed(state: State) -> None:
    """Concurrent rotations of different chains of one session do not look like reuse."""
    store = state.store
    session, first = new_session(store)
    _, a1, siblings = branch(store, first, 3)
    handles = iter([a1, *siblings])
    lock = threading.Lock()
    successors: list[str] = []
    failures: list[str] = []

    def worker() -> None:
        with lock:
            mine = next(handles)
        try:
            _, successor = store.rotate(mine, now=T0)
        except SessionError as exc:
            with lock:
                failures.append(exc.reason)
        else:
            with lock:
                successors.append(successor)

    run_at_once(worker, 4)
    assert failures == [] and len(set(successors)) == 4
    live = store.get(session.id)
    assert live is not None and live.revoked_at is None


def test_sessions_opened_before_sibling_chains_keep_working(tmp_path: Path) -> None:
    """A store at schema version 1 (an older broker's) migrates in place: its sessions'
    handles rotate, can open sibling chains, and reuse still ends them."""
    url = f"sqlite:///{tmp_path}/old.db"
    db = Database.open(url)
    db.migrate("session_schema_migrations", MIGRATIONS[:1], lambda: T0.isoformat())
    handle = HANDLE_PREFIX + "x" * 43

    def old_broker_opens_a_session(tx: Tx) -> None:
        tx.execute(
            "INSERT INTO session_sessions (id, issuer, subject, claims, created_at, expires_at,"
            " generation, revoked_at, revoked_reason, key_thumbprint)"
            " VALUES (?, ?, ?, ?, ?, ?, 1, NULL, '', NULL)",
            ("lcs_old", "gitlab", "s", "{}", tx.to_db(T0), tx.to_db(T0 + HOUR)),
        )
        tx.execute(
            "INSERT INTO session_handles (handle_hash, session_id, generation, issued_at)"
            " VALUES (?, ?, 1, ?)",
            (handle_hash(handle), "lcs_old", tx.to_db(T0)),
        )

    db.write(old_broker_opens_a_session)
    db.close()
    ledger, store = open_state(url, sealer=SEALER)
    try:
        session, a1, (b1,) = branch(store, handle, 1)
        assert session.id == "lcs_old" and session.generation == 2
        store.rotate(b1, now=T0)
        assert reason_of(lambda: store.rotate(handle, now=T0)) == "reused"
        assert reason_of(lambda: store.rotate(a1, now=T0)) == "revoked"
    finally:
        ledger.close()
        store.close()


def test_rotation_at_one_broker_invalidates_the_handle_at_another(state: State) -> None:
    """A handle rotated through one broker's store counts as reuse at another broker's store."""
    other_ledger, other_store = state.open_another()
    try:
        _, handle = new_session(state.store)
        _, newer = state.store.rotate(handle, now=T0)
        assert other_store.peek(newer, now=T0).generation == 2
        assert reason_of(lambda: other_store.rotate(handle, now=T0)) == "reused"
        assert reason_of(lambda: state.store.rotate(newer, now=T0)) == "revoked"
    finally:
        other_ledger.close()
        other_store.close()


def test_session_expires_at_its_bound(state: State) -> None:
    """A handle works until expires_at and is "expired" from that instant on."""
    store = state.store
    session, handle = new_session(store, expires_at=T0 + HOUR)
    _, handle = store.rotate(handle, now=T0 + HOUR - timedelta(seconds=1))
    assert reason_of(lambda: store.rotate(handle, now=T0 + HOUR)) == "expired"
    assert reason_of(lambda: store.peek(handle, now=T0 + HOUR)) == "expired"
    assert store.list(now=T0 + HOUR) == []
    assert [s.id for s in store.list(now=T0 + HOUR - timedelta(seconds=1))] == [session.id]
    # Expiry is not revocation: the row stays unrevoked, listed among all sessions.
    everything = store.list(active_only=False, now=T0 + HOUR)
    assert [s.revoked_at for s in everything] == [None]


def test_idle_handle_expires(state: State) -> None:
    """With max_idle, a handle left unused that long is "expired"; a fresh one is not."""
    store = state.store
    _, handle = new_session(store)
    idle = timedelta(minutes=30)
    _, handle = store.rotate(handle, now=T0 + timedelta(minutes=29), max_idle=idle)
    later = T0 + timedelta(minutes=58)
    assert store.peek(handle, now=later, max_idle=idle).generation == 2
    too_late = T0 + timedelta(minutes=59)
    assert reason_of(lambda: store.rotate(handle, now=too_late, max_idle=idle)) == "expired"


def test_unknown_and_malformed_handles(state: State) -> None:
    """Handles never issued, malformed or oversized are "unknown"."""
    store = state.store
    new_session(store)
    for bogus in (
        HANDLE_PREFIX + secrets.token_urlsafe(32),
        "",
        "lcr_",
        "not-a-handle",
        HANDLE_PREFIX + "A" * 100_000,
        HANDLE_PREFIX + "\udcff\x00",
    ):
        assert reason_of(lambda b=bogus: store.rotate(b, now=T0)) == "unknown"
        assert reason_of(lambda b=bogus: store.peek(b, now=T0)) == "unknown"
    assert store.revoke(handle="not-a-handle", reason="x", now=T0) == []


def test_peek_validates_without_rotating(state: State) -> None:
    """Peeking neither spends the handle nor revokes on an old one."""
    store = state.store
    session, first = new_session(store)
    assert store.peek(first, now=T0).generation == 1
    _, second = store.rotate(first, now=T0)
    assert reason_of(lambda: store.peek(first, now=T0)) == "reused"
    stored = store.get(session.id)
    assert stored is not None and stored.revoked_at is None
    assert store.rotate(second, now=T0)[0].generation == 3


def test_revoke_by_handle(state: State) -> None:
    """Revoking by handle ends that handle's session only and returns it."""
    store = state.store
    session, handle = new_session(store)
    other, other_handle = new_session(store)
    ended = store.revoke(handle=handle, reason="client_revoked", now=T0 + HOUR)
    assert [s.id for s in ended] == [session.id]
    assert ended[0].revoked_at == T0 + HOUR and ended[0].revoked_reason == "client_revoked"
    assert reason_of(lambda: store.rotate(handle, now=T0 + HOUR)) == "revoked"
    assert store.rotate(other_handle, now=T0 + HOUR)[0].id == other.id
    # Ending an ended session ends nothing.
    assert store.revoke(handle=handle, reason="again", now=T0 + 2 * HOUR) == []


def test_revoke_by_old_handle_ends_the_session(state: State) -> None:
    """An old handle still names its session for revocation."""
    store = state.store
    session, first = new_session(store)
    _, newest = store.rotate(first, now=T0)
    assert [s.id for s in store.revoke(handle=first, reason="client_revoked", now=T0)] == [
        session.id
    ]
    assert reason_of(lambda: store.rotate(newest, now=T0)) == "revoked"


def test_revoke_by_session_subject_and_issuer(state: State) -> None:
    """Operators end sessions by id, by subject or by issuer; each returns what it ended."""
    store = state.store
    a, _ = new_session(store, subject="alice")
    b, _ = new_session(store, subject="bob")
    c, _ = new_session(store, subject="bob")
    d, _ = new_session(store, subject="carol", issuer="okta")
    e, _ = new_session(store, subject="dave", issuer="okta")
    assert [s.id for s in store.revoke(session_id=a.id, reason="operator", now=T0)] == [a.id]
    by_subject = store.revoke(subject="bob", reason="operator", now=T0)
    assert sorted(s.id for s in by_subject) == sorted([b.id, c.id])
    assert [s.id for s in store.revoke(subject="bob", issuer="okta", reason="x", now=T0)] == []
    by_issuer = store.revoke(issuer="okta", reason="issuer_compromised", now=T0)
    assert sorted(s.id for s in by_issuer) == sorted([d.id, e.id])
    assert all(s.revoked_reason == "issuer_compromised" for s in by_issuer)
    assert store.list(now=T0) == []
    with pytest.raises(ValueError):
        store.revoke(reason="everything", now=T0)


def test_list_filters(state: State) -> None:
    """Listing returns active sessions oldest first, filtered by subject and issuer."""
    store = state.store
    a, _ = new_session(store, subject="alice", now=T0)
    b, _ = new_session(store, subject="bob", now=T0 + timedelta(seconds=1))
    c, _ = new_session(store, subject="alice", issuer="okta", now=T0 + timedelta(seconds=2))
    d, _ = new_session(store, subject="alice", now=T0, expires_at=T0 + timedelta(minutes=1))
    store.revoke(session_id=b.id, reason="operator", now=T0 + timedelta(seconds=3))
    later = T0 + timedelta(minutes=5)
    assert [s.id for s in store.list(now=later)] == [a.id, c.id]
    assert [s.id for s in store.list(subject="alice", now=later)] == [a.id, c.id]
    assert [s.id for s in store.list(subject="alice", issuer="okta", now=later)] == [c.id]
    everything = store.list(active_only=False, now=later)
    assert {s.id for s in everything} == {a.id, b.id, c.id, d.id}
    assert [s.id for s in store.list(active_only=False, subject="bob", now=later)] == [b.id]


def test_record_credential_and_list_for_revocation(state: State) -> None:
    """Credentials minted under a session are remembered once each, for revocation at its end."""
    store = state.store
    session, _ = new_session(store)
    other, _ = new_session(store)
    store.record_credential(
        session.id, kind="vault_accessor", ref="acc-1", expires_at=T0 + timedelta(minutes=15)
    )
    store.record_credential(
        session.id, kind="vault_lease", ref="database/creds/x/1", expires_at=None
    )
    store.record_credential(
        session.id, kind="vault_accessor", ref="acc-1", expires_at=T0 + timedelta(minutes=15)
    )
    store.record_credential(other.id, kind="vault_accessor", ref="acc-2", expires_at=None)
    assert store.credentials(session.id) == [
        ("vault_accessor", "acc-1"),
        ("vault_lease", "database/creds/x/1"),
    ]
    assert store.credentials(session.id, now=T0 + HOUR) == [("vault_lease", "database/creds/x/1")]
    assert store.credentials(other.id) == [("vault_accessor", "acc-2")]
    assert store.credentials("lcs_nonexistent") == []


def test_what_a_write_queues_is_seen_by_the_later_steps_of_its_transaction(
    state: State,
) -> None:
    """A session's rows and a credential's are queued until their transaction writes them
    together; a later step of the same transaction (here a rotation and a revocation, as
    batch-mates would run them) still finds them, and the credential is listed afterwards."""
    store = state.store
    earlier, _ = new_session(store)
    session, handle, opening = store.opening(
        issuer="gitlab", subject="s", claims=CLAIMS, now=T0, expires_at=T0 + HOUR
    )
    successor, rotation = store.rotation(handle, now=T0)
    remember_earlier = store.credential_recorder(
        earlier.id, kind="vault_accessor", ref="acc-earlier", expires_at=None
    )
    remember = store.credential_recorder(
        session.id, kind="vault_accessor", ref="acc-new", expires_at=None
    )

    def step(tx: Tx) -> tuple[Any, str]:
        remember_earlier(tx)  # queued first, for a session already stored
        opening(tx)
        remember(tx)  # for the session queued just now: written after it
        outcome = rotation(tx)
        remember(tx)  # twice: still one row
        return outcome

    rotated_session, refused = store.database.write(step)
    assert refused == "" and rotated_session.id == session.id
    assert rotated_session.generation == 2
    assert store.rotate(successor, now=T0)[0].generation == 3
    assert store.credentials(session.id) == [("vault_accessor", "acc-new")]
    assert store.credentials(earlier.id) == [("vault_accessor", "acc-earlier")]


def test_purge_removes_ended_sessions_with_their_rows(state: State) -> None:
    """Purging deletes sessions that ended before the cut-off, with handles and credentials."""
    store = state.store
    old, old_handle = new_session(store, expires_at=T0 + HOUR)
    store.record_credential(old.id, kind="vault_lease", ref="lease-old", expires_at=None)
    _, old_handle, (old_sibling,) = branch(store, old_handle, 1)
    live, _ = new_session(store, expires_at=T0 + 24 * HOUR)
    revoked, _ = new_session(store, expires_at=T0 + 24 * HOUR)
    store.revoke(session_id=revoked.id, reason="operator", now=T0 + timedelta(minutes=1))
    assert store.purge(before=T0 + 2 * HOUR) == 2
    assert [s.id for s in store.list(active_only=False, now=T0)] == [live.id]
    rows = dump_tables(state.url)
    assert "lease-old" not in rows and handle_hash(old_handle) not in rows
    assert handle_hash(old_sibling) not in rows and old.id not in rows  # its chains too
    assert reason_of(lambda: store.rotate(old_handle, now=T0)) == "unknown"


def test_naive_times_are_refused(state: State) -> None:
    """A timezone-naive time is a programming error, not a silently wrong comparison."""
    naive = datetime(2026, 3, 1, 12, 0)
    _, handle = new_session(state.store)
    with pytest.raises(ValueError):
        new_session(state.store, now=naive)
    with pytest.raises(ValueError):
        state.store.rotate(handle, now=naive)
    with pytest.raises(ValueError):
        state.ledger.consume("gitlab", "j", expires_at=naive, now=T0)
    assert state.store.peek(handle, now=T0).generation == 1


# ---------------------------------------------------------------------------------------------
# Failing closed


def test_unreachable_sqlite_is_state_unavailable(tmp_path: Path) -> None:
    """A SQLite path that cannot be opened raises StoreUnavailable at start-up."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    with pytest.raises(StoreUnavailable):
        open_state(f"sqlite:///{blocker}/state.db", sealer=SEALER)


def test_unsupported_url_is_refused_without_echoing_it() -> None:
    """An unsupported URL scheme is a ValueError that does not repeat the URL."""
    with pytest.raises(ValueError) as info:
        open_state("mysql://admin:hunter2@db/x", sealer=SEALER)
    assert "hunter2" not in str(info.value)


@pytest.mark.integration
def test_unreachable_postgresql_is_state_unavailable() -> None:
    """A PostgreSQL nobody answers is StoreUnavailable, and the password is not in the error."""
    url = f"postgresql://postgres:sup3r-secret-pw@127.0.0.1:{free_port()}/nowhere"
    with pytest.raises(StoreUnavailable) as info:
        open_state(url, sealer=SEALER)
    text = f"{info.value!s} {info.value!r} {info.value.__cause__!s}"
    assert "sup3r-secret-pw" not in text


@pytest.mark.integration
def test_postgresql_outage_fails_closed_then_recovers(pg_database: tuple[str, str]) -> None:
    """While the database refuses connections every call fails closed; afterwards it recovers."""
    url, name = pg_database
    ledger, store = open_state(url, sealer=SEALER)
    _, handle = new_session(store)
    assert ledger.consume("gitlab", "before-outage", expires_at=T0 + HOUR, now=T0)
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,)
        )
    try:
        with pytest.raises(StoreUnavailable):
            ledger.consume("gitlab", "during-outage", expires_at=T0 + HOUR, now=T0)
        with pytest.raises(StoreUnavailable):
            store.rotate(handle, now=T0)
        with pytest.raises(StoreUnavailable):
            store.list(now=T0)
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
    # Nothing was consumed or rotated during the outage.
    assert ledger.consume("gitlab", "during-outage", expires_at=T0 + HOUR, now=T0)
    assert store.rotate(handle, now=T0)[0].generation == 2
    ledger.close()
    store.close()


@pytest.mark.integration
def test_pooled_connection_cut_by_server_is_replaced(pg_database: tuple[str, str]) -> None:
    """Idle pooled connections killed by the server are replaced transparently on next use."""
    url, name = pg_database
    ledger, store = open_state(url, sealer=SEALER)
    # Fill the idle pool with several connections, as a busy broker would.
    barrier = threading.Barrier(4)

    def busy(i: int) -> None:
        barrier.wait()
        ledger.consume("gitlab", f"warm-{i}", expires_at=T0 + HOUR, now=T0)

    warmers = [threading.Thread(target=busy, args=(i,)) for i in range(4)]
    for t in warmers:
        t.start()
    for t in warmers:
        t.join()
    assert ledger.consume("gitlab", "cut-1", expires_at=T0 + HOUR, now=T0)
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        )
    assert ledger.consume("gitlab", "cut-2", expires_at=T0 + HOUR, now=T0)
    assert not ledger.consume("gitlab", "cut-1", expires_at=T0 + HOUR, now=T0)
    ledger.close()
    store.close()


def test_references_stored_in_clear_by_an_older_broker_are_sealed_at_start(
    tmp_path: Path,
) -> None:
    """Rows and a database-kept salt from before sealing: the salt moves to its file (earlier
    HMACs still match), every reference is sealed, and revocation still lists them."""
    url = f"sqlite:///{tmp_path}/state.db"
    legacy = open_store(url)  # no salt file: the old default kept the salt in the database
    old_hmac = legacy.hash_ref("accessor-1")
    legacy.close()
    ledger, store = open_state(url, sealer=SEALER)
    session, _ = store.create(issuer="gitlab", subject="s", claims={}, now=T0, expires_at=T0 + HOUR)
    ledger.close()
    with sqlite3.connect(tmp_path / "state.db") as db:
        db.execute(
            "INSERT INTO session_credentials (session_id, kind, ref) VALUES (?, ?, ?)",
            (session.id, "vault_token", "accessor-1"),
        )

    salt_file = tmp_path / "audit-accessor.salt"
    audit = open_store(url, salt_path=salt_file)
    assert audit.hash_ref("accessor-1") == old_hmac
    sealer = RefSealer(audit.accessor_salt())
    audit.close()
    ledger, store = open_state(url, sealer=sealer)
    try:
        assert store.credentials(session.id) == [("vault_token", "accessor-1")]
        assert store.seal_existing() == 0
    finally:
        ledger.close()
    dump = dump_tables(url)
    assert "accessor-1" not in dump
    with sqlite3.connect(tmp_path / "state.db") as db:
        assert not db.execute("SELECT 1 FROM audit_meta WHERE key = 'accessor_salt'").fetchall()
    # Another deployment's key does not open the sealed reference.
    _, other = open_state(url, sealer=RefSealer(secrets.token_bytes(32)))
    try:
        with pytest.raises(SealError):
            other.credentials(session.id)
    finally:
        other.close()


def test_peek_reads_a_handle_as_the_rotation_does(state: State) -> None:
    """peek (one joined statement) and a rotation (statement by statement, under the session's
    lock) tell live, spent and orphaned handles apart alike; peek returns the stored session."""
    store = state.store
    session, first = new_session(store)
    _, a1, (b1,) = branch(store, first, 1)
    _, b2 = store.rotate(b1, now=T0)
    stored = store.get(session.id)
    assert stored is not None
    assert stored.generation == 2 and store.peek(a1, now=T0) == stored
    assert store.peek(b2, now=T0) == stored
    assert reason_of(lambda: store.peek(first, now=T0)) == "reused"
    assert reason_of(lambda: store.peek(b1, now=T0)) == "reused"
    # A sibling chain whose row is gone: its handles read as spent, by peek and by rotation.
    store.database.write(
        lambda tx: tx.execute(
            "DELETE FROM session_chains WHERE session_id = ? AND chain = 1", (session.id,)
        )
    )
    assert reason_of(lambda: store.peek(b2, now=T0)) == "reused"
    assert store.get(session.id) == stored  # peeking changed nothing
    assert reason_of(lambda: store.rotate(b2, now=T0)) == "reused"
    assert reason_of(lambda: store.peek(a1, now=T0)) == "revoked"
