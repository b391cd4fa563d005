"""Floods that must not starve anyone, over real HTTP against `luigi-creds-broker serve`.

Identities the policy refuses hammer `audience=<a grant>` while that grant's real users keep
getting credentials; junk that never authenticates is shed per client address and costs one
`tallied` audit record per window instead of one record each. Measured figures are printed
(`pytest -s`) for the record.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from servers import DevIssuer, free_port, start_dev_issuer
from stack import Broker, Moto, audit_events, policy_toml, start_broker, start_moto

from broker.audit.events import Outcome

# The policy's reason for a token of another project.
REASON = "claim_mismatch"

pytestmark = pytest.mark.integration


@dataclass
class Upstreams:
    issuer: DevIssuer
    moto: Moto
    role_arn: str


@pytest.fixture(scope="module")
def upstreams(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstreams]:
    workdir = tmp_path_factory.mktemp("limits-upstreams")
    issuer = start_dev_issuer(workdir)
    moto = start_moto(workdir)
    try:
        yield Upstreams(issuer, moto, moto.create_role("etl-writer"))
    finally:
        moto.stop()
        issuer.stop()


def start(upstreams: Upstreams, workdir: Path, broker_extra: str) -> tuple[Broker, Path]:
    db = workdir / "audit.db"
    config = policy_toml(
        issuer_url=upstreams.issuer.url,
        audit_db=db,
        listen=f"127.0.0.1:{free_port()}",
        moto_url=upstreams.moto.url,
        role_arn=upstreams.role_arn,
        broker_extra=broker_extra,
    )
    return start_broker(workdir, config, env=upstreams.moto.broker_env), db


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
