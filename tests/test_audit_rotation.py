"""`audit rotation` on a seeded day whose figures were worked out by hand (comments beside events):
per task chains with state and lifetime, the ledger's verdict and checkpoint signature on top,
denials by reason over time, longest-lived credentials, unused grants and unusual identities.
JSON figures are checked exactly; the HTML is rendered by headless Chromium and its screenshot
checked for the chart's colours.
"""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from audit_cli import ledger_policy, project_grant, run_audit_cli, seed_ledger
from screenshots import chromium_screenshot

from broker.audit.events import AuditEvent, Outcome
from broker.audit.rotation import ref_kind

T0 = datetime(2026, 11, 20, tzinfo=UTC)  # the window is [T0, T0 + 24h]
NOW = T0 + timedelta(hours=24)
ROLE = "arn:aws:iam::123456789012:role/etl-writer"
VAULT_TOKEN = "vault:token:warehouse-read"

TOML = ledger_policy(
    project_grant("etl-writer", ttl="1h"),
    *(project_grant(name) for name in ("g2", "g3", "g4", "g5", "never-used")),
)


def at(hour: int, minute: int = 0) -> datetime:
    return T0 + timedelta(hours=hour, minutes=minute)


def issued(when: datetime, rid: str, task: str, grant: str, subject: str, **kw: Any) -> AuditEvent:
    lifetime = kw.pop("lifetime", 3600)
    return AuditEvent(
        time=when,
        request_id=rid,
        outcome=Outcome.ISSUED,
        reason="issued",
        issuer="gitlab",
        subject=subject,
        grant=grant,
        task=task,
        target=kw.pop("target", ROLE),
        expires_at=when + timedelta(seconds=lifetime),
        **kw,
    )


def session_ended(
    when: datetime, rid: str, reason: str, session_id: str, detail: dict[str, Any], **kw: Any
) -> AuditEvent:
    return AuditEvent(
        time=when,
        request_id=rid,
        outcome=Outcome.REVOKED,
        reason=reason,
        kind="session",
        session_id=session_id,
        detail=detail,
        **kw,
    )


def denied(when: datetime, reason: str) -> AuditEvent:
    return AuditEvent(
        time=when,
        request_id=f"d-{when.isoformat()}-{reason}",
        outcome=Outcome.DENIED,
        reason=reason,
    )


def day() -> list[AuditEvent]:
    return [
        issued(T0 - timedelta(hours=2), "before", "Old", "etl-writer", "alice"),  # outside
        # t1: AWS key, lived its full hour -> expired, 1h00m00s
        issued(
            at(1), "r1", "CopyToS3_1", "etl-writer", "alice", credential_ref="ASIAAAAAAAAAAAAAAA01"
        ),
        # t2: Vault token (accessor HMAC), session s2 revoked at 2:30 -> revoked after 30 min
        issued(
            at(2),
            "r2",
            "LoadWarehouse_1",
            "g2",
            "alice",
            target=VAULT_TOKEN,
            credential_ref="hmac-sha256:feed",
            session_id="s2",
            lifetime=7200,
        ),
        session_ended(
            at(2, 30),
            "end-s2",
            "operator_revoked",
            "s2",
            {"aws_marked_revoked": [], "vault_revoked": ["hmac-sha256:feed"]},
            issuer="gitlab",
            subject="alice",
        ),
        # t3: AWS key of session s3, marked revoked at 3:10: STS keys cannot be revoked early,
        # so its lifetime is still the full 2h to expiry
        issued(
            at(3),
            "r3",
            "CopyToS3_2",
            "etl-writer",
            "bob",
            credential_ref="ASIAAAAAAAAAAAAAAA03",
            session_id="s3",
            lifetime=7200,
        ),
        session_ended(
            at(3, 10),
            "end-s3",
            "client_revoked",
            "s3",
            {"aws_marked_revoked": ["ASIAAAAAAAAAAAAAAA03"]},
        ),
        # t4: a Vault lease revoked by the client after 5 minutes
        issued(
            at(4),
            "r4",
            "Dump_1",
            "g3",
            "bob",
            target="vault:database/creds/dump",
            credential_ref="database/creds/dump/abc",
        ),
        AuditEvent(
            time=at(4, 5),
            request_id="lease",
            outcome=Outcome.REVOKED,
            reason="lease_revoked",
            credential_ref="database/creds/dump/abc",
        ),
        # carol uses 5 distinct grants; alice 2 (etl-writer, g2), bob 2 (etl-writer, g3), dave 1:
        # counts [1, 2, 2, 5]: median 2, IQR (inclusive quartiles 1.75 .. 2.75) 1 -> fence 2 + 2
        *[
            issued(
                at(5, i),
                f"c{i}",
                f"Fan_{i}",
                g,
                "carol",
                credential_ref=f"ASIACAROL00000000{i:03d}",
            )
            for i, g in enumerate(("etl-writer", "g2", "g3", "g4", "g5"))
        ],
        issued(at(6), "d1", "Solo_1", "etl-writer", "dave", credential_ref="ASIADAVE000000000001"),
        # denials: 3 claim_mismatch at 7h, 1 expired + 1 claim_mismatch at 9h, 2 token_replayed 9h
        denied(at(7, 1), "claim_mismatch"),
        denied(at(7, 2), "claim_mismatch"),
        denied(at(7, 3), "claim_mismatch"),
        denied(at(9, 1), "expired"),
        denied(at(9, 2), "claim_mismatch"),
        denied(at(9, 3), "token_replayed"),
        denied(at(9, 4), "token_replayed"),
        # t5: still valid at the window's end (issued 23:30, 1 h) -> issued, 1h planned
        issued(
            at(23, 30), "r5", "Late_1", "etl-writer", "alice", credential_ref="ASIAAAAAAAAAAAAAAA05"
        ),
    ]


def _run(*argv: str) -> tuple[int, str, str]:
    return run_audit_cli(*argv, now=NOW)


@pytest.fixture
def seeded(tmp_path: Path) -> Path:
    """A broker.toml whose SQLite ledger holds the seeded day, checkpointed every 5 records."""
    return seed_ledger(tmp_path, day(), policy=TOML, now=NOW, checkpoint_every=5)


def rotation_json(config: Path, *extra: str) -> dict[str, Any]:
    code, out, err = _run(
        "audit", "rotation", "--config", str(config), "--since", "24h", "--format", "json", *extra
    )
    assert code == 0, err
    data = json.loads(out)
    assert isinstance(data, dict)
    return data


def test_each_task_chain_has_its_state_and_lifetime(seeded: Path) -> None:
    data = rotation_json(seeded)
    chains = {c["task"]: c for c in data["credentials"]}
    assert "Old" not in chains  # before the window
    assert len(chains) == 11
    t1, t2, t3, t4, t5 = (
        chains[t] for t in ("CopyToS3_1", "LoadWarehouse_1", "CopyToS3_2", "Dump_1", "Late_1")
    )
    assert (t1["grant"], t1["target"], t1["credential_ref"]) == (
        "etl-writer",
        ROLE,
        "ASIAAAAAAAAAAAAAAA01",
    )
    assert (t1["ref_kind"], t1["state"], t1["lifetime_seconds"]) == (
        "aws access key id",
        "expired",
        3600,
    )
    assert (t2["target"], t2["credential_ref"], t2["ref_kind"]) == (
        VAULT_TOKEN,
        "hmac-sha256:feed",
        "vault accessor (HMAC)",
    )
    assert (t2["state"], t2["revoked_reason"], t2["lifetime_seconds"]) == (
        "revoked",
        "operator_revoked",
        1800,
    )
    assert t2["ended_at"] == "2026-11-20T02:30:00.000000Z"
    # An AWS key marked revoked still lives to its expiry: reported as such.
    assert (t3["state"], t3["revoked_reason"], t3["lifetime_seconds"]) == (
        "revoked",
        "client_revoked",
        7200,
    )
    assert (t4["state"], t4["ref_kind"], t4["lifetime_seconds"]) == (
        "revoked",
        "vault lease id",
        300,
    )
    assert (t5["state"], t5["ended_at"], t5["lifetime_seconds"]) == ("issued", None, 3600)
    assert data["totals"] == {
        "credentials": 11,
        "issued": 1,
        "expired": 7,
        "revoked": 3,
        "denials": 7,
    }


def test_ledger_verdict_and_checkpoint_signature_are_on_top(seeded: Path, tmp_path: Path) -> None:
    ledger = rotation_json(seeded)["ledger"]
    assert ledger["ok"] is True and ledger["keys_checked"] is True
    assert ledger["records"] == len(day())
    cp = ledger["checkpoint"]
    assert cp["verified"] is True and cp["signature"].startswith("\u2014 ")
    assert cp["size"] == 20  # checkpoint_every=5 over 23 records
    # The whole ledger is verified, not only the window: an edit anywhere shows here.
    conn = sqlite3.connect(tmp_path / "audit.db")
    conn.execute("UPDATE audit_log SET record = replace(record, 'alice', 'mallory') WHERE seq = 0")
    conn.commit()
    conn.close()
    ledger = rotation_json(seeded)["ledger"]
    assert ledger["ok"] is False and ledger["first_bad_seq"] == 0


def test_denials_longest_unused_and_unusual(seeded: Path) -> None:
    data = rotation_json(seeded)
    assert data["denial_bucket"] == "hour" and len(data["denials_over_time"]) == 24
    by_hour = {b["start"][11:13]: b["counts"] for b in data["denials_over_time"] if b["counts"]}
    assert by_hour == {
        "07": {"claim_mismatch": 3},
        "09": {"claim_mismatch": 1, "expired": 1, "token_replayed": 2},
    }
    assert data["denial_reasons"] == ["claim_mismatch", "token_replayed", "expired"]
    longest = [(c["task"], c["lifetime_seconds"]) for c in data["longest_lived"]]
    assert longest[:2] == [("CopyToS3_2", 7200), ("CopyToS3_1", 3600)]
    assert data["grants_never_used"] == ["never-used"]
    [unusual] = data["unusual_identities"]
    assert (unusual["identity"], unusual["count"], unusual["threshold"]) == ("gitlab:carol", 5, 4.0)


def test_any_since_window(seeded: Path) -> None:
    """--since/--until select the window: only 5h..7h here."""
    data = rotation_json(
        seeded, "--since", "2026-11-20T05:00:00+00:00", "--until", "2026-11-20T07:30:00+00:00"
    )
    assert sorted(c["task"] for c in data["credentials"]) == [
        "Fan_0",
        "Fan_1",
        "Fan_2",
        "Fan_3",
        "Fan_4",
        "Solo_1",
    ]
    assert data["totals"]["denials"] == 3
    assert "LoadWarehouse_1" not in json.dumps(data)


def test_nothing_secret_and_everything_escaped(seeded: Path) -> None:
    code, page, _ = _run("audit", "rotation", "--config", str(seeded), "--since", "24h")
    assert code == 0
    assert "<script" not in page and "http://" not in page.replace("http://www.w3.org/2000/svg", "")
    assert "hmac-sha256:feed" in page  # the ledger's HMAC, never an accessor


def test_ref_kinds() -> None:
    assert ref_kind("ASIAXXXX") == "aws access key id"
    assert ref_kind("hmac-sha256:00") == "vault accessor (HMAC)"
    assert ref_kind("database/creds/x/1") == "vault lease id"
    assert ref_kind("") == "none"


@pytest.mark.integration
def test_rotation_html_screenshot(seeded: Path, tmp_path: Path) -> None:
    """Headless Chromium renders the report; the screenshot shows the verdict and the denial
    bars in their reasons' colours. The PNG is kept in the test's tmp dir (path printed)."""
    page = tmp_path / "rotation.html"
    code, _, _ = _run(
        "audit", "rotation", "--config", str(seeded), "--since", "24h", "--output", str(page)
    )
    assert code == 0
    shot = tmp_path / "rotation.png"
    width, height, rows = chromium_screenshot(page, shot, 1000, 560)
    print(f"\nrotation report screenshot: {shot}")
    assert (width, height) == (1000, 560)

    def count(rgb: tuple[int, int, int]) -> int:
        needle = bytes(rgb)
        return sum(1 for row in rows for x in range(0, len(row), 3) if row[x : x + 3] == needle)

    assert count((0x2C, 0xA0, 0x2C)) > 200  # the green VERIFIED verdict
    assert count((0xD6, 0x27, 0x28)) > 300  # claim_mismatch bars (the most frequent reason)
    assert count((0xFF, 0x7F, 0x0E)) > 100  # token_replayed
    assert count((0x94, 0x67, 0xBD)) > 50  # expired
