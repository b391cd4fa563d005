"""Exchange once, refresh safely, over real HTTP.

A local OIDC issuer, moto in server mode and `luigi-creds-broker serve` processes on SQLite and on
a shared PostgreSQL database: replay protection, rotating refresh handles, reuse detection,
revocation (HTTP and operator CLI), and per-identity rate limits.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from stack import Upstreams, audit_events, start_upstreams

from broker.audit import open_store
from broker.audit.events import AuditEvent, Outcome
from broker.dev.harness import Broker, fresh_pg_database
from luigi_creds.client import BrokerClient
from luigi_creds.identity import EnvTokenSource

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def upstreams(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstreams]:
    with start_upstreams(tmp_path_factory.mktemp("upstreams")) as up:
        yield up


@pytest.fixture
def broker(upstreams: Upstreams, tmp_path: Path) -> Iterator[tuple[Broker, Path]]:
    db = tmp_path / "audit.db"
    b = upstreams.start_broker(tmp_path, upstreams.config(db))
    try:
        yield b, db
    finally:
        b.stop()


def _all_events(store_url: str) -> list[AuditEvent]:
    store = open_store(store_url)
    try:
        return list(store.events())
    finally:
        store.close()


def _events(store_url: str, request_id: str) -> list[AuditEvent]:
    return [e for e in _all_events(store_url) if e.request_id == request_id]


def test_exchange_once_refresh_per_task_and_reuse_revokes(
    upstreams: Upstreams, broker: tuple[Broker, Path]
) -> None:
    """One exchange, a replay refused, three refreshes for three tasks, then reuse kills it all."""
    b, db = broker
    store = f"sqlite:///{db}"
    token = upstreams.issuer.mint("gitlab")
    status, first, _ = b.exchange(token, task="Extract_2026_11_22")
    assert status == 200, first
    handles = [first["refresh_token"]]
    assert handles[0].startswith("lcr_")

    status, body, _ = b.exchange(token)
    assert (status, body["error"]) == (400, "invalid_request")
    assert [e.reason for e in _events(store, body["request_id"])] == ["token_replayed"]

    keys = {first["credentials"]["AccessKeyId"]}
    for task in ("Load_a", "Load_b", "Load_c"):
        status, body, _ = b.refresh(handles[-1], task=task)
        assert status == 200, body
        assert body["refresh_token"] not in handles
        handles.append(body["refresh_token"])
        keys.add(body["credentials"]["AccessKeyId"])
        (issued,) = [e for e in _events(store, body["request_id"]) if e.outcome == "issued"]
        assert (issued.kind, issued.task) == ("refresh", task)
        assert issued.credential_ref == body["credentials"]["AccessKeyId"]
        assert issued.session_id.startswith("lcs_")
        # The session acts for the token's identity: claims are the ones it was exchanged with.
        assert issued.claims["project_id"] == "55235664"
    assert len(keys) == 4, "every mint is a distinct STS session"

    status, body, _ = b.refresh(handles[0], task="Load_d")
    assert (status, body["error"]) == (400, "invalid_grant")
    assert [(e.outcome, e.reason) for e in _events(store, body["request_id"])] == [
        (Outcome.REVOKED, "reuse_detected"),
        (Outcome.DENIED, "session_reused"),
    ]
    status, body, _ = b.refresh(handles[-1], task="Load_e")
    assert (status, body["error"]) == (400, "invalid_grant")
    ended = [
        e
        for e in _all_events(store)
        if e.outcome == Outcome.REVOKED and e.reason == "reuse_detected"
    ]
    assert len(ended) == 1
    assert sorted(ended[0].detail["aws_marked_revoked"]) == sorted(keys)


def test_revoke_endpoint_ends_the_session(
    upstreams: Upstreams, broker: tuple[Broker, Path]
) -> None:
    """POST /v1/revoke with the refresh handle ends the session; the handle then fails."""
    b, _ = broker
    status, body, _ = b.exchange(upstreams.issuer.mint("gitlab"))
    assert status == 200
    handle = body["refresh_token"]
    assert b.revoke(handle)[0] == 200
    assert b.refresh(handle)[1]["error"] == "invalid_grant"
    # RFC 7009: revoking an unknown token is not an error.
    assert b.revoke("lcr_unknown")[0] == 200


def test_operator_revokes_by_subject_with_the_cli(
    upstreams: Upstreams, broker: tuple[Broker, Path]
) -> None:
    """`sessions revoke --subject` ends every session of that subject; `list` shows why."""
    b, _ = broker
    sub = "project_path:data-platform/etl:ref_type:branch:ref:cli-test"
    handles = []
    for _ in range(2):
        status, body, _ = b.exchange(upstreams.issuer.mint("gitlab", sub=sub))
        assert status == 200
        handles.append(body["refresh_token"])
    listed = b.cli("sessions", "list", "--subject", sub)
    assert listed.returncode == 0 and listed.stdout.count("lcs_") == 2
    revoked = b.cli("sessions", "revoke", "--subject", sub)
    assert revoked.returncode == 0, revoked.stderr
    assert "revoked 2 session(s)" in revoked.stdout
    for handle in handles:
        assert b.refresh(handle)[1]["error"] == "invalid_grant"
    listed = b.cli("sessions", "list", "--subject", sub, "--all")
    assert listed.stdout.count("operator_revoked") == 2


def test_burst_from_one_identity_is_rate_limited_while_another_is_served(
    upstreams: Upstreams, tmp_path: Path
) -> None:
    """A burst from one identity gets 429 with Retry-After; another identity is still served."""
    config = upstreams.config(
        tmp_path / "audit.db",
        broker_extra="rate_limit_identity = { per_second = 0.1, burst = 3 }",
    )
    b = upstreams.start_broker(tmp_path, config)
    try:
        greedy = "project_path:data-platform/etl:ref_type:branch:ref:greedy"
        statuses = []
        for _ in range(6):
            status, body, headers = b.exchange(upstreams.issuer.mint("gitlab", sub=greedy))
            statuses.append(status)
            if status == 429:
                assert body["error"] == "temporarily_unavailable"
                assert int(headers["Retry-After"]) >= 1
        assert statuses == [200, 200, 200, 429, 429, 429]
        status, _, _ = b.exchange(upstreams.issuer.mint("gitlab", sub="someone-else"))
        assert status == 200
    finally:
        b.stop()


def test_two_brokers_on_one_postgresql_agree(upstreams: Upstreams, tmp_path: Path) -> None:
    """Replays and rotated handles are refused at the other broker sharing the database."""
    with fresh_pg_database("luigi_creds_ha") as url:
        one = upstreams.start_broker(tmp_path / "one", upstreams.config(url))
        two = upstreams.start_broker(tmp_path / "two", upstreams.config(url))
        try:
            token = upstreams.issuer.mint("gitlab")
            status, body, _ = one.exchange(token)
            assert status == 200, body
            status, replay, _ = two.exchange(token)
            assert (status, replay["error"]) == (400, "invalid_request")
            assert [e.reason for e in _events(url, replay["request_id"])] == ["token_replayed"]

            handle = body["refresh_token"]
            status, rotated, _ = one.refresh(handle, task="t1")
            assert status == 200
            status, stale, _ = two.refresh(handle, task="t2")
            assert (status, stale["error"]) == (400, "invalid_grant")
            # Reuse at broker two ended the session for broker one too.
            assert one.refresh(rotated["refresh_token"])[1]["error"] == "invalid_grant"
        finally:
            one.stop()
            two.stop()


def test_explain_lists_allowed_grants_without_spending_the_token(
    upstreams: Upstreams, broker: tuple[Broker, Path]
) -> None:
    """POST /v1/explain names the identity and its grants; the token still exchanges after."""
    b, db = broker
    token = upstreams.issuer.mint("gitlab")
    form = {"subject_token": token, "subject_token_type": "urn:ietf:params:oauth:token-type:jwt"}
    status, answer, _ = b.post_raw("/v1/explain", urllib.parse.urlencode(form).encode())
    assert status == 200, answer
    assert answer["issuer"] == "gitlab"
    assert [g["name"] for g in answer["grants"]] == ["etl-writer"]
    (record,) = _events(f"sqlite:///{db}", answer["request_id"])
    assert (record.outcome, record.detail["grants"]) == (Outcome.EXPLAINED, ["etl-writer"])

    status, body, _ = b.exchange(token)
    assert status == 200, body
    form = {"refresh_token": body["refresh_token"]}
    status, answer, _ = b.post_raw("/v1/explain", urllib.parse.urlencode(form).encode())
    assert status == 200 and answer["session"]["id"].startswith("lcs_")
    # Asking about the session does not rotate its handle.
    assert b.refresh(body["refresh_token"])[0] == 200

    denied = upstreams.issuer.mint("gitlab", project_id="1")
    form = {"subject_token": denied, "subject_token_type": "urn:ietf:params:oauth:token-type:jwt"}
    status, answer, _ = b.post_raw("/v1/explain", urllib.parse.urlencode(form).encode())
    assert (status, answer["grants"]) == (200, [])


def test_whoami_cli_shows_identity_and_grants(
    upstreams: Upstreams, broker: tuple[Broker, Path], tmp_path: Path
) -> None:
    """`luigi-creds whoami` prints the identity and its grants and prints no token."""
    b, _ = broker
    token = upstreams.issuer.mint("gitlab")
    cfg = tmp_path / "luigi.cfg"
    cfg.write_text(f"[luigi_creds]\nbroker_url = {b.url}\ntoken_source = env:CI_ID_TOKEN\n")
    done = subprocess.run(
        [sys.executable, "-m", "luigi_creds.cli", "--config", str(cfg), "whoami"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "CI_ID_TOKEN": token, "LUIGI_CONFIG_PATH": str(cfg)},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "grant:        etl-writer  (aws-credentials, ttl 900s)" in done.stdout
    assert token not in done.stdout + done.stderr
    assert b.exchange(token)[0] == 200


def _twenty_copies(brokers: list[Broker], token: str, store_url: str) -> None:
    """Twenty simultaneous exchanges of `token` spread over `brokers`: exactly one issues."""
    start = threading.Barrier(20)
    answers: list[tuple[int, dict[str, object]]] = []

    def exchange(b: Broker) -> None:
        start.wait()
        status, body, _ = b.exchange(token)
        answers.append((status, body))

    threads = [
        threading.Thread(target=exchange, args=(brokers[i % len(brokers)],)) for i in range(20)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(status for status, _ in answers) == [200] + [400] * 19
    events = [e for e in _all_events(store_url) if e.token_sha256]
    mine = [e for e in events if e.request_id in {str(body["request_id"]) for _, body in answers}]
    assert sum(e.outcome == Outcome.ISSUED for e in mine) == 1
    assert sum(e.reason == "token_replayed" for e in mine) == 19


def test_parallel_replays_of_one_token_issue_exactly_once(
    upstreams: Upstreams, broker: tuple[Broker, Path]
) -> None:
    """Twenty simultaneous exchanges of one token: one 200, nineteen token_replayed denials."""
    b, db = broker
    _twenty_copies([b], upstreams.issuer.mint("gitlab"), f"sqlite:///{db}")


def test_parallel_replays_across_two_postgresql_replicas_issue_exactly_once(
    upstreams: Upstreams, tmp_path: Path
) -> None:
    """The same across two brokers sharing PostgreSQL, and their one audit chain verifies."""
    with fresh_pg_database("luigi_creds_twenty") as url:
        one = upstreams.start_broker(tmp_path / "one", upstreams.config(url))
        two = upstreams.start_broker(tmp_path / "two", upstreams.config(url))
        try:
            _twenty_copies([one, two], upstreams.issuer.mint("gitlab"), url)
            verified = one.cli("audit", "verify")
            assert verified.returncode == 0, verified.stdout + verified.stderr
        finally:
            one.stop()
            two.stop()


# -- floods that must not starve anyone -----------------------------------------------------------
# Identities the policy refuses hammer `audience=<a grant>` while its real users keep getting
# credentials; junk that never authenticates is shed per client address and costs one `tallied`
# audit record per window instead of one record each. Figures are printed (`pytest -s`).

# The policy's reason for a token of another project.
REASON = "claim_mismatch"


def start(upstreams: Upstreams, workdir: Path, broker_extra: str) -> tuple[Broker, Path]:
    db = workdir / "audit.db"
    config = upstreams.config(db, broker_extra=broker_extra)
    return upstreams.start_broker(workdir, config), db


def store_bytes(db: Path) -> int:
    """The audit database's bytes on disk, WAL included."""
    return sum(p.stat().st_size for p in db.parent.glob(db.name + "*") if p.is_file())


def record_bytes(db: Path, outcome: str) -> list[int]:
    """The size of each stored audit record (canonical JSON) with this outcome."""
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT LENGTH(record) FROM audit_log WHERE outcome = ?", (outcome,))
        return [int(n) for (n,) in rows]


def test_denied_identities_cannot_starve_a_grants_real_users(
    upstreams: Upstreams, tmp_path: Path
) -> None:
    """A flood of policy-refused identities on audience=etl-writer leaves its budget alone."""
    broker, db = start(upstreams, tmp_path, "rate_limit_grant = { per_second = 0.1, burst = 3 }")
    try:
        # Tokens of other projects: valid signatures, identities the policy refuses.
        attackers = [
            upstreams.issuer.mint("gitlab", project_id="666", sub=f"project_path:evil/{i}")
            for i in range(8)
        ]
        refused: list[int] = []
        lock = threading.Lock()

        def flood(token: str) -> None:
            for _ in range(15):
                status, body, _ = broker.exchange(token)
                with lock:
                    refused.append(status)
                assert (status, body.get("error")) in {
                    (400, "invalid_target"),
                    (429, "temporarily_unavailable"),
                }, body

        started = time.perf_counter()
        threads = [threading.Thread(target=flood, args=(t,)) for t in attackers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - started
        print(f"\nflood held: {len(refused) / elapsed:.0f} refused requests/s ({len(refused)})")
        assert len(refused) == 120 and refused.count(400) == 120

        # The grant's real users: all three of its burst still there.
        issued = []
        for _ in range(3):
            status, body, _ = broker.exchange(upstreams.issuer.mint("gitlab"))
            assert status == 200, body
            issued.append(body["request_id"])
        # The fourth is over the grant's own limit: the limit still works.
        status, body, headers = broker.exchange(upstreams.issuer.mint("gitlab"))
        assert (status, body["error"]) == (429, "temporarily_unavailable")
        assert int(headers["Retry-After"]) >= 1
    finally:
        broker.stop()
    events = audit_events(db)
    by_request: dict[str, list[tuple[str, str]]] = {}
    for e in events:
        by_request.setdefault(e.request_id, []).append((e.outcome, e.reason))
    for request_id in issued:
        assert by_request[request_id] == [
            (Outcome.INTENT, "minting"),
            (Outcome.ISSUED, "issued"),
        ]
    # Authenticated refusals keep their individual records, with the identity: no upstream call
    # (no intent) was made for any of them.
    denied = [
        e
        for e in events
        if e.outcome == Outcome.DENIED and e.subject.startswith("project_path:evil")
    ]
    assert len(denied) == 120
    assert {e.reason for e in denied} == {REASON}
    assert not [
        e
        for e in events
        if e.outcome == Outcome.INTENT and e.subject.startswith("project_path:evil")
    ]
    assert len([e for e in events if e.outcome == Outcome.INTENT]) == 3


def test_explain_floods_spend_only_their_own_identitys_budget(
    upstreams: Upstreams, tmp_path: Path
) -> None:
    """One identity exhausting its explain budget does not make explain 429 for another."""
    broker, _ = start(upstreams, tmp_path, "rate_limit_identity = { per_second = 0.1, burst = 5 }")
    try:
        noisy = upstreams.issuer.mint("gitlab", sub="project_path:noisy/one")
        form = f"subject_token={noisy}&subject_token_type=urn:ietf:params:oauth:token-type:jwt"
        statuses = [broker.post_raw("/v1/explain", form.encode())[0] for _ in range(10)]
        assert statuses == [200] * 5 + [429] * 5
        quiet = upstreams.issuer.mint("gitlab", sub="project_path:quiet/two")
        form = f"subject_token={quiet}&subject_token_type=urn:ietf:params:oauth:token-type:jwt"
        status, body, _ = broker.post_raw("/v1/explain", form.encode())
        assert status == 200, body
        assert [g["name"] for g in body["grants"]] == ["etl-writer"]
    finally:
        broker.stop()


def test_junk_is_shed_per_client_and_tallied_not_recorded_one_by_one(
    upstreams: Upstreams, tmp_path: Path
) -> None:
    """Junk tokens: 400 until the client's failure budget is spent, then 429 before any
    verification; one `tallied` record at shutdown instead of a record per request, which
    `audit verify` accepts and `audit report` counts. An authenticated request from another
    broker's client keeps its individual record."""
    broker, db = start(
        upstreams,
        tmp_path,
        "rate_limit_client_failures = { per_second = 0.5, burst = 20 }",
    )
    junk = 300
    try:
        # One authenticated, refused request first: a record like its is what every junk
        # request used to cost.
        token = upstreams.issuer.mint("gitlab", project_id="666")
        status, body, _ = broker.exchange(token)
        assert (status, body["error"]) == (400, "invalid_target")

        before = store_bytes(db)
        statuses = []
        started = time.perf_counter()
        for i in range(junk):
            status, body, _ = broker.exchange(f"junk.{i}.token", grant="etl-writer")
            statuses.append((status, body["error"]))
        elapsed = time.perf_counter() - started
        during = store_bytes(db) - before
    finally:
        broker.stop()
    (per_record,) = record_bytes(db, "denied")
    (tally_bytes,) = record_bytes(db, "tallied")
    assert statuses[:20] == [(400, "invalid_request")] * 20
    assert set(statuses[20:]) <= {(429, "temporarily_unavailable"), (400, "invalid_request")}
    assert statuses.count((429, "temporarily_unavailable")) >= junk - 40
    print(
        f"\njunk held: {junk / elapsed:.0f} requests/s; store growth while flooding "
        f"{during} bytes; audit per junk request {tally_bytes / junk:.1f} bytes (one tally "
        f"record of {tally_bytes}) against {per_record} bytes for an individual denial record"
    )
    assert during == 0, "junk must not write one record each"

    events = audit_events(db)
    (tally,) = [e for e in events if e.outcome == Outcome.TALLIED]
    assert (tally.kind, tally.reason) == ("denials", "unauthenticated")
    assert tally.detail["total"] == junk
    counts = {(c["outcome"], c["reason"]): c["count"] for c in tally.detail["counts"]}
    assert counts[("denied", "client_rate_limited")] == statuses.count(
        (429, "temporarily_unavailable")
    )
    assert sum(counts.values()) == junk
    assert tally.detail["clients"] == [{"client_addr": "127.0.0.1", "count": junk}]
    assert not [e for e in events if e.outcome == Outcome.DENIED and not e.subject]

    verify = broker.cli("audit", "verify", "--format", "json")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    report = broker.cli("audit", "report", "--format", "json", "--since", "1d")
    assert report.returncode == 0, report.stderr
    denials = {(d["grant"], d["reason"]): d["count"] for d in json.loads(report.stdout)["denials"]}
    assert denials[("", "client_rate_limited")] == counts[("denied", "client_rate_limited")]


# -- sibling refresh chains ---------------------------------------------------------------------


def test_concurrent_mints_take_sibling_chains_and_each_task_gets_its_own(
    upstreams: Upstreams, broker: tuple[Broker, Path]
) -> None:
    """The real client's first refresh opens sibling chains; then four mints from four threads
    are in flight at once (they meet at a barrier before sending, which a client spending one
    handle at a time could never pass), and each task gets its own credential, recorded with
    its task id."""
    b, db = broker
    met = threading.Barrier(4)
    armed = threading.Event()

    def meet(request: httpx.Request) -> None:
        if armed.is_set() and b"grant_type=refresh_token" in request.content:
            met.wait(timeout=20)

    def clock() -> datetime:
        return datetime.now(UTC)

    environ = {"CI_ID_TOKEN": upstreams.issuer.mint("gitlab")}
    with httpx.Client(timeout=30, event_hooks={"request": [meet]}) as http:
        client = BrokerClient(
            b.url, EnvTokenSource("CI_ID_TOKEN", environ), http=http, clock=clock, chains=4
        )
        client.mint("etl-writer", task="Open")  # the exchange: one chain
        client.mint("etl-writer", task="Grow")  # the first refresh asks for three more
        armed.set()
        minted: dict[str, Any] = {}
        failed: list[BaseException] = []

        def mint(task: str) -> None:
            try:
                minted[task] = client.mint("etl-writer", task=task)
            except BaseException as exc:
                failed.append(exc)

        threads = [threading.Thread(target=mint, args=(f"Load_{n}",)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert failed == [] and not met.broken
        client.revoke()
    keys = {task: cred.access_key_id for task, cred in minted.items()}
    assert len(set(keys.values())) == 4
    issued = {e.task: e for e in _all_events(f"sqlite:///{db}") if e.outcome == Outcome.ISSUED}
    for task, key in keys.items():
        assert issued[task].credential_ref == key
    grown = issued["Grow"]
    assert (grown.detail["chains_opened"], grown.detail["session_chains"]) == (3, 4)
    assert len({issued[t].session_id for t in ("Open", "Grow", *keys)}) == 1


def test_reuse_on_one_chain_ends_every_chain(
    upstreams: Upstreams, broker: tuple[Broker, Path]
) -> None:
    """Chain B's handle stays good while chain A rotates; reusing B's spent handle afterwards
    ends the whole session, chain A included."""
    b, db = broker
    status, first, _ = b.exchange(upstreams.issuer.mint("gitlab"))
    assert status == 200
    status, grown, _ = b.refresh(first["refresh_token"], task="Grow", sibling_chains="1")
    assert status == 200, grown
    a1, (b1,) = grown["refresh_token"], grown["sibling_refresh_tokens"]
    status, body, _ = b.refresh(a1, task="A")
    assert status == 200 and "sibling_refresh_tokens" not in body
    a2 = body["refresh_token"]
    status, body, _ = b.refresh(b1, task="B")
    assert status == 200, body
    status, body, _ = b.refresh(b1, task="B_again")
    assert (status, body["error"]) == (400, "invalid_grant")
    assert [(e.outcome, e.reason) for e in _events(f"sqlite:///{db}", body["request_id"])] == [
        (Outcome.REVOKED, "reuse_detected"),
        (Outcome.DENIED, "session_reused"),
    ]
    status, body, _ = b.refresh(a2, task="A_again")
    assert (status, body["error"]) == (400, "invalid_grant")


def test_revoking_with_any_chains_handle_ends_them_all(
    upstreams: Upstreams, broker: tuple[Broker, Path]
) -> None:
    b, _ = broker
    _, first, _ = b.exchange(upstreams.issuer.mint("gitlab"))
    status, grown, _ = b.refresh(first["refresh_token"], sibling_chains="2")
    assert status == 200 and len(grown["sibling_refresh_tokens"]) == 2
    b1, c1 = grown["sibling_refresh_tokens"]
    assert b.revoke(c1)[0] == 200
    for handle in (grown["refresh_token"], b1, c1):
        assert b.refresh(handle)[1]["error"] == "invalid_grant"


def test_the_chain_limit_is_refused_clearly_and_spends_nothing(
    upstreams: Upstreams, broker: tuple[Broker, Path]
) -> None:
    """[broker] session_max_chains (8 by default) counts the first chain; asking past it is
    refused with a description naming the limit, before minting, and the handle stays good."""
    b, db = broker
    _, first, _ = b.exchange(upstreams.issuer.mint("gitlab"))
    handle = first["refresh_token"]
    for asked in ("8", "x", "-1"):
        status, body, _ = b.refresh(handle, sibling_chains=asked)
        assert (status, body["error"]) == (400, "invalid_request")
    status, body, _ = b.refresh(handle, sibling_chains="8")
    assert "session_max_chains" in body["error_description"]
    assert [e.reason for e in _events(f"sqlite:///{db}", body["request_id"])] == [
        "session_max_chains"
    ]
    status, grown, _ = b.refresh(handle, sibling_chains="6")  # 7 chains
    assert status == 200 and len(grown["sibling_refresh_tokens"]) == 6
    status, body, _ = b.refresh(grown["refresh_token"], sibling_chains="2")
    assert (status, body["error"]) == (400, "invalid_request")
    status, body, _ = b.refresh(grown["refresh_token"], sibling_chains="1")  # 8: the limit
    assert status == 200 and len(body["sibling_refresh_tokens"]) == 1
