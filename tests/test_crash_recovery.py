"""Crash and fault tests for the audit ledger through the real broker.

A broker under load from several client threads, with STS slowed by a delaying reverse proxy in
front of moto, is killed with SIGKILL while requests sit between their `intent` and `issued`
records, then restarted on the same audit store (SQLite file, then PostgreSQL). The tests check
the ledger's crash invariants: no credential left without an `issued` record, every dangling
intent reconciled by request id, every STS call preceded by an intent, the chain verifies, and
no secret reaches a log or the store; a client cut by the kill sees a closed connection, never
part of an answer. A clean SIGTERM stop signs a checkpoint over the whole ledger; an edited
record fails `audit verify`; a held store write lock (SQLite or PostgreSQL) makes the exchange
fail closed with 503 in bounded time, and one taken after the STS call withholds the minted
credential and records why.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import pytest
from deploy_files import k8s_objects
from faults import (
    DelayingProxy,
    hold_pg_audit_head_lock,
    hold_sqlite_write_lock,
    start_delaying_proxy,
)
from stack import Upstreams, start_upstreams

from broker.audit import open_store
from broker.audit.events import AuditEvent, Outcome
from broker.audit.ledger import StoredCheckpoint
from broker.dev.harness import Broker, DevIssuer, exchange_form, fresh_pg_database, refresh_form
from broker.storage import BUSY_TIMEOUT, PG_LOCK_TIMEOUT_MS

pytestmark = pytest.mark.integration

CLIENT_THREADS = 4
REFRESHES_PER_SESSION = 2
# Kill once this many credentials were delivered and the proxy holds at least one STS call that
# has not reached moto and one whose answer the broker has not had: each kind of request
# (answered; cut between intent and STS call; cut between STS call and `issued`) is then certain.
DELIVERED_BEFORE_KILL = 8
IN_FLIGHT_AT_KILL = 2
# Seconds an STS call must still have to wait in the proxy at the kill for the proxy to see the
# broker's socket close first (the kernel closes it as the process dies, within milliseconds).
KILL_MARGIN = 0.1
# Seconds each STS call spends in the proxy before and after moto answers.
STS_DELAY = 0.25
# The client threads and identities share one grant; the default per-identity limit (10/s)
# would answer 429 to a load test that is about crashes, not rate limits.
BROKER_EXTRA = "rate_limit_identity = { per_second = 1000.0, burst = 1000 }"


@dataclass(frozen=True)
class Answer:
    """What one client call saw: an HTTP status and body, or how the exchange broke.

    `broken` is "" for a whole answer; "cut" when the connection closed or was refused before any
    status line arrived (what a killed broker does); "partial" when a status line arrived but the
    body did not arrive whole; "garbled" when what arrived is not HTTP, or a body that is not JSON;
    "timeout" when nothing arrived in time. Only "cut" is an acceptable way for a kill to end a
    request: the others would be a broker sending part of an answer.
    """

    kind: str  # exchange | refresh
    status: int | None
    broken: str = ""
    request_id: str = ""
    access_key_id: str = ""
    secrets: tuple[str, ...] = field(default=(), repr=False)  # SecretAccessKey, SessionToken


@dataclass
class ProxiedUpstreams(Upstreams):
    """The module's issuer and moto, and the delaying proxy in front of moto's STS."""

    proxy: DelayingProxy


@dataclass
class CrashRun:
    """Everything one kill-restart-stop cycle observed, for the tests to assert on."""

    store_url: str
    key_file: Path
    broker: Broker  # the restarted broker, stopped; its `cli` still runs admin commands
    logs: str  # both brokers' logs
    answers: list[Answer]  # from the clients of the killed broker
    answers_after_restart: list[Answer]
    before_restart: list[AuditEvent]
    dangling_before_restart: list[str]
    verify_before_restart: dict[str, Any]
    verify_after_restart: subprocess.CompletedProcess[str]
    verify_after_stop: subprocess.CompletedProcess[str]
    stop_status: int
    after_stop: list[AuditEvent]
    head_size: int
    checkpoints: list[StoredCheckpoint]
    sts_session_names: list[str]
    dropped_session_names: list[str]  # AssumeRole calls the kill cut before they reached STS

    def delivered(self) -> list[Answer]:
        return [a for a in self.answers if a.status == 200 and not a.broken]


def _read_ledger(url: str) -> tuple[list[AuditEvent], int, list[StoredCheckpoint], list[str]]:
    """Events, head size, checkpoints and dangling intents' request ids, read as an auditor."""
    store = open_store(url, migrate=False)
    try:
        events = list(store.events())
        dangling = [e.request_id for e in store.dangling_intents()]
        return events, store.head().size, store.checkpoints(), dangling
    finally:
        store.close()


def _post(url: str, form: dict[str, str]) -> tuple[int | None, str, bytes]:
    """POST `form` to `url` on a fresh connection; (status, how it broke, body bytes)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=30)
    try:
        try:
            conn.request(
                "POST",
                parts.path,
                body=urlencode(form),
                headers={"Content-Type": "application/x-www-form-urlencoded"},
            )
            response = conn.getresponse()
        except TimeoutError:
            return None, "timeout", b""
        # RemoteDisconnected is a ConnectionError (and a BadStatusLine): closed before any byte.
        except ConnectionError:
            return None, "cut", b""
        except http.client.HTTPException:  # a status line that is not HTTP
            return None, "garbled", b""
        try:
            return response.status, "", response.read()
        except TimeoutError:
            return response.status, "timeout", b""
        except (http.client.IncompleteRead, ConnectionError):
            return response.status, "partial", b""
    finally:
        conn.close()


def _call(kind: str, broker: Broker, form: dict[str, str]) -> tuple[Answer, str]:
    """Send one request; return what the client saw and the refresh handle it was given."""
    status, broken, raw = _post(broker.url + "/v1/token", form)
    if broken:
        return Answer(kind, status, broken), ""
    try:
        body = json.loads(raw)
    except ValueError:
        return Answer(kind, status, "garbled"), ""
    if not isinstance(body, dict):
        return Answer(kind, status, "garbled"), ""
    creds = body.get("credentials") or {}
    answer = Answer(
        kind,
        status,
        request_id=str(body.get("request_id", "")),
        access_key_id=str(creds.get("AccessKeyId", "")),
        secrets=tuple(str(creds[k]) for k in ("SecretAccessKey", "SessionToken") if k in creds),
    )
    return answer, str(body.get("refresh_token", "")) if status == 200 else ""


def _client(
    broker: Broker, issuer: DevIssuer, stop: threading.Event, answers: list[Answer]
) -> None:
    """One CI job after another: exchange a fresh token, then refresh the session a few times."""
    while not stop.is_set():
        token = issuer.mint("gitlab")
        answer, handle = _call("exchange", broker, exchange_form(token))
        answers.append(answer)
        for _ in range(REFRESHES_PER_SESSION):
            if stop.is_set() or not handle:
                break
            answer, handle = _call("refresh", broker, refresh_form(handle))
            answers.append(answer)


def _broker_config(
    up: ProxiedUpstreams, store_url: str, key_file: Path, *, sts_url: str | None = None
) -> str:
    return up.config(
        store_url,
        # [upstream.aws] endpoint_url: STS through the slow proxy, so kills land mid-mint.
        moto_url=sts_url or up.proxy.url,
        broker_extra=f'{BROKER_EXTRA}\naudit_key_file = "{key_file}"',
    )


def _verify(broker: Broker, *extra: str) -> subprocess.CompletedProcess[str]:
    return broker.cli("audit", "verify", "--format", "json", *extra)


def _crash_run(up: ProxiedUpstreams, workdir: Path, store_url: str) -> CrashRun:
    """Load, SIGKILL mid-mint, snapshot the ledger, restart, a little more load, SIGTERM."""
    key_file = workdir / "audit-key.pem"
    sts_seen = len(up.proxy.requests("AssumeRole"))
    dropped_seen = len(up.proxy.dropped("AssumeRole"))
    first = up.start_broker(workdir / "killed", _broker_config(up, store_url, key_file))
    answers: list[Answer] = []  # list.append is atomic under the GIL
    stop = threading.Event()
    clients = [
        threading.Thread(target=_client, args=(first, up.issuer, stop, answers), daemon=True)
        for _ in range(CLIENT_THREADS)
    ]
    for thread in clients:
        thread.start()
    try:
        deadline = time.monotonic() + 30
        while not (
            sum(a.status == 200 and not a.broken for a in answers) >= DELIVERED_BEFORE_KILL
            and up.proxy.waiting("before", min_left=KILL_MARGIN) >= 1
            and up.proxy.waiting("after") >= 1
        ):
            assert time.monotonic() < deadline, f"no load built up: {answers[-5:]}"
            time.sleep(0.005)
        first.process.kill()
    finally:
        stop.set()
        for thread in clients:
            thread.join(timeout=30)
        first.process.kill()
    up.proxy.wait_idle()

    before, _, _, dangling = _read_ledger(store_url)
    # The killed broker's ledger as an auditor finds it: young intents are reported, not failed.
    pre = _verify(first)
    assert pre.returncode == 0, pre.stdout + pre.stderr
    verify_before = json.loads(pre.stdout)

    second = up.start_broker(workdir / "restarted", _broker_config(up, store_url, key_file))
    try:
        verify_after_restart = _verify(second)
        token = up.issuer.mint("gitlab")
        answer, handle = _call("exchange", second, exchange_form(token))
        later = [answer, _call("refresh", second, refresh_form(handle))[0]]
    finally:
        stop_status = second.process.stop()
    verify_after_stop = _verify(second)
    after, head_size, checkpoints, _ = _read_ledger(store_url)
    return CrashRun(
        store_url=store_url,
        key_file=key_file,
        broker=second,
        logs=first.process.log_text() + second.process.log_text(),
        answers=answers,
        answers_after_restart=later,
        before_restart=before,
        dangling_before_restart=dangling,
        verify_before_restart=verify_before,
        verify_after_restart=verify_after_restart,
        verify_after_stop=verify_after_stop,
        stop_status=stop_status,
        after_stop=after,
        head_size=head_size,
        checkpoints=checkpoints,
        sts_session_names=[
            r.form["RoleSessionName"][0] for r in up.proxy.requests("AssumeRole")[sts_seen:]
        ],
        dropped_session_names=[
            r.form["RoleSessionName"][0] for r in up.proxy.dropped("AssumeRole")[dropped_seen:]
        ],
    )


@pytest.fixture(scope="module")
def upstreams(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxiedUpstreams]:
    """Dev issuer, moto, and the delaying proxy in front of moto, shared by the module."""
    with start_upstreams(tmp_path_factory.mktemp("upstreams")) as up:
        proxy = start_delaying_proxy(up.moto.url, delay_before=STS_DELAY, delay_after=STS_DELAY)
        try:
            yield ProxiedUpstreams(up.issuer, up.moto, up.role_arn, up.workdir, proxy)
        finally:
            proxy.stop()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def crash(
    request: pytest.FixtureRequest,
    upstreams: ProxiedUpstreams,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[CrashRun]:
    """One kill-restart-stop cycle per audit store kind."""
    workdir = tmp_path_factory.mktemp(f"crash-{request.param}")
    with contextlib.ExitStack() as stack:
        if request.param == "sqlite":
            url = f"sqlite:///{workdir / 'audit.db'}"
        else:
            url = stack.enter_context(fresh_pg_database("crash"))
        yield _crash_run(upstreams, workdir, url)


# -- SIGKILL under load, restart ------------------------------------------------------------------


def test_audit_verify_passes_after_sigkill_and_restart(crash: CrashRun) -> None:
    """After a SIGKILL under load and a restart on the same store, `audit verify` exits 0."""
    assert crash.verify_after_restart.returncode == 0, crash.verify_after_restart.stdout
    report = json.loads(crash.verify_after_restart.stdout)
    assert report["ok"] and report["first_bad_seq"] is None
    assert report["in_flight"] == []


def test_every_delivered_credential_has_its_issued_record_from_before_the_crash(
    crash: CrashRun,
) -> None:
    """Every AccessKeyId a client got in a 200 was already in its request's `issued` record."""
    issued = {
        e.request_id: e.credential_ref for e in crash.before_restart if e.outcome == Outcome.ISSUED
    }
    delivered = crash.delivered()
    assert len(delivered) >= DELIVERED_BEFORE_KILL
    assert {a.kind for a in delivered} == {"exchange", "refresh"}
    for answer in delivered:
        assert answer.access_key_id.startswith("ASIA")
        assert issued.get(answer.request_id) == answer.access_key_id, answer
    # The restarted broker goes on serving, on the same rules.
    issued_later = {
        e.request_id: e.credential_ref for e in crash.after_stop if e.outcome == Outcome.ISSUED
    }
    assert [a.status for a in crash.answers_after_restart] == [200, 200]
    for answer in crash.answers_after_restart:
        assert issued_later[answer.request_id] == answer.access_key_id


def test_requests_cut_by_the_kill_got_no_credential(crash: CrashRun) -> None:
    """The clients whose requests the kill cut saw a connection closed before any status line,
    never a partial, garbled or wrong answer; every whole answer is a 200 with credentials."""
    assert [a for a in crash.answers if a.broken not in ("", "cut")] == []
    cut = [a for a in crash.answers if a.broken == "cut"]
    assert len(cut) >= IN_FLIGHT_AT_KILL
    assert all(a.status is None and not a.access_key_id and not a.secrets for a in cut)
    whole = [a for a in crash.answers if not a.broken]
    assert {a.status for a in whole} == {200}
    assert all(a.access_key_id.startswith("ASIA") and len(a.secrets) == 2 for a in whole)


def test_dangling_intents_are_reconciled_by_request_id_at_restart(crash: CrashRun) -> None:
    """Each intent the kill left without a terminal record gets a `reconciled` record at restart."""
    dangling = crash.dangling_before_restart
    assert len(dangling) >= IN_FLIGHT_AT_KILL
    assert sorted(crash.verify_before_restart["in_flight"]) == sorted(dangling)
    assert not any(e.outcome == Outcome.RECONCILED for e in crash.before_restart)
    reconciled = [e for e in crash.after_stop if e.outcome == Outcome.RECONCILED]
    assert sorted(e.request_id for e in reconciled) == sorted(dangling)
    intents = {e.request_id: e for e in crash.before_restart if e.outcome == Outcome.INTENT}
    for record in reconciled:
        assert record.reason == "issued_unknown_delivery"
        # The reconciled record repeats what the intent knew: who asked, for what, which attempt.
        intent = intents[record.request_id]
        assert (record.session_id, record.subject, record.grant, record.target, record.attempt) == (
            intent.session_id,
            intent.subject,
            intent.grant,
            intent.target,
            intent.attempt,
        )
    # Reconciliation happens once: nothing dangles after the restart.
    terminal = {Outcome.ISSUED, Outcome.DENIED, Outcome.ERROR, Outcome.RECONCILED}
    closed = {e.request_id for e in crash.after_stop if e.outcome in terminal}
    assert {e.request_id for e in crash.after_stop if e.outcome == Outcome.INTENT} <= closed


def test_the_kill_cut_requests_on_both_sides_of_the_sts_call(crash: CrashRun) -> None:
    """The dangling intents include one whose STS call never happened and one whose call did."""

    def called(request_id: str, names: list[str]) -> bool:
        return any(n.endswith("-" + request_id) for n in names)

    dangling = crash.dangling_before_restart
    before_sts = [r for r in dangling if called(r, crash.dropped_session_names)]
    after_sts = [r for r in dangling if called(r, crash.sts_session_names)]
    assert before_sts and after_sts, (dangling, crash.dropped_session_names)
    assert not set(before_sts) & set(after_sts)
    # NOTE: reconciliation does not look upstream (CloudTrail or Vault metadata could tell the
    # two apart), so both kinds are recorded alike, as a credential that may exist upstream.
    reasons = {e.request_id: e.reason for e in crash.after_stop if e.outcome == Outcome.RECONCILED}
    assert {reasons[r] for r in before_sts + after_sts} == {"issued_unknown_delivery"}


def test_every_sts_call_was_preceded_by_an_intent(crash: CrashRun) -> None:
    """Each AssumeRole that reached STS names (in RoleSessionName) a request with an intent."""
    intents: dict[str, int] = {}
    for event in crash.after_stop:
        if event.outcome == Outcome.INTENT:
            intents[event.request_id] = intents.get(event.request_id, 0) + 1
    calls: dict[str, int] = {}
    for name in crash.sts_session_names:
        request_id = next((r for r in intents if name.endswith("-" + r)), None)
        assert request_id is not None, f"STS call {name} has no intent"
        calls[request_id] = calls.get(request_id, 0) + 1
    assert len(calls) >= DELIVERED_BEFORE_KILL
    for request_id, count in calls.items():
        assert count <= intents[request_id]
    # An intent without an STS call is one the kill cut before the call left the broker.
    uncalled = {r for r, n in intents.items() if calls.get(r, 0) < n}
    assert uncalled <= set(crash.dangling_before_restart)


def test_no_secret_reaches_the_logs_or_the_ledger(crash: CrashRun) -> None:
    """No SecretAccessKey or SessionToken a client received appears in a broker log or a record."""
    records = "\n".join(repr(e) for e in crash.after_stop) + crash.verify_after_stop.stdout
    raw = b""
    if crash.store_url.startswith("sqlite:"):
        # The whole file, free pages and the sessions tables included, not only live records.
        db = Path(crash.store_url.removeprefix("sqlite:///"))
        raw = b"".join(p.read_bytes() for p in db.parent.glob(db.name + "*"))
    secrets = [s for a in crash.answers + crash.answers_after_restart for s in a.secrets]
    assert secrets
    for secret in secrets:
        assert secret not in crash.logs
        assert secret not in records
        assert secret.encode() not in raw


# -- clean stop (checkpoint) --------------------------------------------------------------------


def test_clean_sigterm_signs_a_checkpoint_over_the_whole_ledger(crash: CrashRun) -> None:
    """A SIGTERM stop runs the shutdown hook and leaves a signed checkpoint at the ledger's head."""
    # uvicorn re-raises the signal after its graceful shutdown, so the status is -SIGTERM (which
    # systemd counts as a clean exit); what matters is that shutdown ran to the end.
    assert crash.stop_status in (0, -signal.SIGTERM), crash.logs[-2000:]
    assert "Application shutdown complete" in crash.logs  # only the restarted broker stops
    assert crash.checkpoints, "no checkpoint at all"
    last = crash.checkpoints[-1]
    assert last.size == crash.head_size == len(crash.after_stop)
    assert crash.verify_after_stop.returncode == 0, crash.verify_after_stop.stdout
    report = json.loads(crash.verify_after_stop.stdout)
    assert report["ok"] and report["unsigned_tail"] == 0
    assert report["checkpoints_verified"] == len(crash.checkpoints)
    assert not [f for f in report["findings"] if f["kind"] in ("unsigned", "bad_signature")]


# -- tampering after the run ---------------------------------------------------------------------


def test_edited_record_fails_verify_naming_its_seq(crash: CrashRun, tmp_path: Path) -> None:
    """Editing one `issued` record's AccessKeyId makes `audit verify` exit 1 naming that seq."""
    victim = next(a.access_key_id for a in crash.delivered())
    forged = "ASIA" + "F" * (len(victim) - 4)
    sql_find = "SELECT seq, record FROM audit_log WHERE outcome = 'issued' AND record LIKE ?"
    sql_edit = "UPDATE audit_log SET record = ? WHERE seq = ?"
    if crash.store_url.startswith("sqlite:"):
        # Edit a copy of the file; the module's other tests keep reading the original.
        copy = tmp_path / "tampered.db"
        original = crash.store_url.removeprefix("sqlite:///")
        with (
            contextlib.closing(sqlite3.connect(original)) as src,
            contextlib.closing(sqlite3.connect(copy)) as dst,
        ):
            src.backup(dst)
            seq, record = dst.execute(sql_find, (f"%{victim}%",)).fetchone()
            dst.execute(sql_edit, (record.replace(victim, forged), seq))
            dst.commit()
        result = _verify(crash.broker, "--store", f"sqlite:///{copy}")
    else:
        import psycopg

        with psycopg.connect(crash.store_url, autocommit=True) as conn:
            row = conn.execute(sql_find.replace("?", "%s"), (f"%{victim}%",)).fetchone()
            assert row is not None
            seq, record = row
            conn.execute(sql_edit.replace("?", "%s"), (record.replace(victim, forged), seq))
            try:
                result = _verify(crash.broker)
            finally:
                conn.execute(sql_edit.replace("?", "%s"), (record, seq))
    assert result.returncode == 1, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["first_bad_seq"] == seq
    assert any(f["seq"] == seq and f["fatal"] for f in report["findings"])
    text = _verify(crash.broker).stdout
    assert json.loads(text)["ok"], "the original ledger must be untouched"


# -- the audit store hangs -----------------------------------------------------------------------

# SQLite: one exchange meets the held lock twice. The replay ledger's write (sessions.py, same
# file) waits out its busy timeout and fails, then the `error` record waits out the audit store's.
# PostgreSQL: the replay ledger's tables stay writable; the `intent` waits out the audit store's
# lock timeout, and no second write is attempted after it failed (exchange.py). NOTE: with 4-6
# parallel requests one of them is observed to reach the store only after the others gave up
# (a thread dump shows no worker thread for it meanwhile; anyio's worker reuse is suspected, not
# proven), so the bound allows two lock timeouts. 5 s: CPU slack on a busy shared machine.
HANG_BOUND = {
    "sqlite": 2 * BUSY_TIMEOUT + 5.0,
    "postgresql": 2 * PG_LOCK_TIMEOUT_MS / 1000 + 5.0,
}
# The liveness probe's timeoutSeconds in deploy/kubernetes/deployment.yaml.
LIVENESS_TIMEOUT = float(
    k8s_objects()["Deployment"]["spec"]["template"]["spec"]["containers"][0]["livenessProbe"][
        "timeoutSeconds"
    ]
)


@contextlib.contextmanager
def _hung_store(kind: str, workdir: Path) -> Iterator[tuple[str, Any]]:
    """A store URL and a function that holds its write lock (as a context) while called."""
    if kind == "sqlite":
        db = workdir / "audit.db"
        yield f"sqlite:///{db}", lambda: hold_sqlite_write_lock(db)
    else:
        with fresh_pg_database("hang") as url:
            yield url, lambda: hold_pg_audit_head_lock(url)


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_held_audit_lock_answers_503_in_bounded_time_then_recovers(
    kind: str, upstreams: ProxiedUpstreams, tmp_path: Path
) -> None:
    """A held audit write lock makes parallel exchanges answer 503 in bounded time, then heals."""
    bound = HANG_BOUND[kind]
    with _hung_store(kind, tmp_path) as (url, hold_lock):
        config = _broker_config(upstreams, url, tmp_path / "key.pem")
        broker = upstreams.start_broker(tmp_path / "broker", config)
        try:
            status, body, _ = broker.exchange(upstreams.issuer.mint("gitlab"))
            assert status == 200, body
            sts_before = len(upstreams.proxy.requests("AssumeRole"))
            tokens = [upstreams.issuer.mint("gitlab") for _ in range(CLIENT_THREADS)]
            answers: list[tuple[float, Any]] = []
            with hold_lock():

                def exchange(token: str) -> None:
                    started = time.monotonic()
                    answer = broker.exchange(token)
                    answers.append((time.monotonic() - started, answer))

                workers = [
                    threading.Thread(target=exchange, args=(t,), daemon=True) for t in tokens
                ]
                for worker in workers:
                    worker.start()
                # The event loop is not blocked: liveness answers while requests wait, within
                # the liveness probe's timeout the shipped Deployment gives kubelet (3 s), which
                # would otherwise restart a broker that is only waiting on its store.
                time.sleep(0.5)
                started = time.monotonic()
                health, _ = broker.get("/healthz")
                assert health == 200
                assert time.monotonic() - started < LIVENESS_TIMEOUT
                for worker in workers:
                    worker.join(timeout=bound + 5)
                # Answered while the lock is still held: the broker gave up, it did not wait it
                # out; requests queued behind each other share the bound, not add it up.
                assert len(answers) == CLIENT_THREADS, "an exchange hung past the bound"
                for elapsed, (status, body, headers) in answers:
                    assert status == 503, body
                    assert body["error"] == "temporarily_unavailable"
                    assert "credentials" not in body and headers["Retry-After"]
                    assert elapsed < bound, [round(e, 1) for e, _ in answers]
                assert len(upstreams.proxy.requests("AssumeRole")) == sts_before
            # Nothing was burned: a job that met the outage retries with the same token.
            status, body, _ = broker.exchange(tokens[0])
            assert status == 200, body
            assert broker.get("/readyz")[0] == 200
        finally:
            broker.stop()
        events, _, _, _ = _read_ledger(url)
    issued = [e for e in events if e.outcome == Outcome.ISSUED]
    assert len(issued) == 2 and body["request_id"] == issued[-1].request_id
    # NOTE: a refused request whose records could not be written leaves no record (the store
    # that would hold it is the one that hangs) and the broker logs nothing of it either.


# -- the store stops accepting writes after the STS call -----------------------------------------

# Seconds the proxy holds STS's answer once the test has taken the lock: the broker hears back
# after the lock is in place, so the first write after the mint is the one that waits.
ANSWER_DELAY = 0.5
# What that first write is and how long it waits before failing: SQLite, the session's credential
# row (sessions.py, same file); PostgreSQL, the `issued` record (the audit head row is locked).
FIRST_WRITE_TIMEOUT = {"sqlite": BUSY_TIMEOUT, "postgresql": PG_LOCK_TIMEOUT_MS / 1000}


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_credential_minted_while_the_store_hangs_is_withheld_and_recorded(
    kind: str, upstreams: ProxiedUpstreams, tmp_path: Path
) -> None:
    """A store hanging after the STS call means a 503 and an `error` record naming the held key."""
    proxy = start_delaying_proxy(upstreams.moto.url, delay_before=0.0, delay_after=ANSWER_DELAY)
    # The lock outlasts the first write's timeout by 2 s, so the `error` record that follows
    # waits for the release and then succeeds (its own timeout is far longer than 2 s).
    hold_seconds = FIRST_WRITE_TIMEOUT[kind] + ANSWER_DELAY + 2.0
    try:
        with _hung_store(kind, tmp_path) as (url, hold_lock):
            config = _broker_config(upstreams, url, tmp_path / "key.pem", sts_url=proxy.url)
            broker = upstreams.start_broker(tmp_path / "broker", config)
            try:
                answer: list[Any] = []
                worker = threading.Thread(
                    target=lambda: answer.append(broker.exchange(upstreams.issuer.mint("gitlab"))),
                    daemon=True,
                )
                worker.start()
                deadline = time.monotonic() + 10
                while not proxy.waiting("after"):
                    assert time.monotonic() < deadline, "the STS call never came"
                    time.sleep(0.005)
                with hold_lock():
                    time.sleep(hold_seconds)
                worker.join(timeout=30)
                status, body, _ = answer[0]
            finally:
                broker.stop()
            assert status == 503, body
            assert body["error"] == "temporarily_unavailable" and "credentials" not in body
            events, _, _, dangling = _read_ledger(url)
            verify = _verify(broker)
    finally:
        proxy.stop()
    request_id = body["request_id"]
    # STS did mint: its session name carries the request id (the CloudTrail join key).
    calls = [r.form["RoleSessionName"][0] for r in proxy.requests("AssumeRole")]
    assert [c.endswith("-" + request_id) for c in calls] == [True]
    records = [e for e in events if e.request_id == request_id]
    assert [r.outcome for r in records] == [Outcome.INTENT, Outcome.ERROR]
    error = records[-1]
    assert error.reason == "minted_not_delivered"
    # The withheld AWS key is named for the auditor; STS cannot revoke it (AWS docs).
    assert error.credential_ref.startswith("ASIA") and error.detail["revoked"] is False
    assert not [e for e in events if e.outcome == Outcome.ISSUED]
    assert dangling == []
    assert verify.returncode == 0, verify.stdout
    log = broker.process.log_text()
    assert any(
        "credential minted but not delivered" in line and request_id in line
        for line in log.splitlines()
    )
