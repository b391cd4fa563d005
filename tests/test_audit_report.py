"""`audit report`, `export`, `prune` and `verify` through the CLI, on a seeded week of events whose
figures were computed by hand (see the comments beside each event).
"""

from __future__ import annotations

import csv
import io
import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from audit_cli import ledger_policy, project_grant, run_audit_cli, seed_ledger
from screenshots import chromium_screenshot

from broker.audit.events import AuditEvent, Outcome
from broker.audit.report import build_report, render
from broker.config import BrokerSettings, Config, GrantConfig, IssuerConfig

T0 = datetime(2026, 11, 16, tzinfo=UTC)  # the week is [T0, T0 + 7d)
NOW = T0 + timedelta(days=7)

CONFIG = Config(
    broker=BrokerSettings(session_max=12 * 3600),
    issuers=(
        IssuerConfig(name="gitlab", url="https://gitlab.com", audiences=("b",)),
        IssuerConfig(name="okta", url="https://okta.example.com", audiences=("b",)),
    ),
    grants=(
        GrantConfig(
            name="etl-writer",
            issuers=("gitlab",),
            match={"project_id": "42", "ref": ("main", "release/*")},
            ttl=900,
        ),
        GrantConfig(name="warehouse-load", issuers=("okta",), match={"groups": "de"}, ttl=3600),
        GrantConfig(name="etl-vault", issuers=("gitlab",), match={"project_id": "42"}, ttl=1800),
    ),
)

TOML = ledger_policy(
    project_grant("etl-writer", refs=["main", "release/*"], ttl="15m"), session_max="12h"
)


def at(day: int, hour: int, minute: int = 0) -> datetime:
    return T0 + timedelta(days=day, hours=hour, minutes=minute)


_n = 0


def ev(
    when: datetime, outcome: Outcome, grant: str, issuer: str, subject: str, **kw: Any
) -> AuditEvent:
    global _n
    _n += 1
    lifetime = kw.pop("lifetime", None)
    return AuditEvent(
        time=when,
        request_id=kw.pop("request_id", f"r{_n}"),
        outcome=outcome,
        reason=kw.pop("reason", str(outcome)),
        issuer=issuer,
        subject=subject,
        grant=grant,
        expires_at=None if lifetime is None else when + timedelta(seconds=lifetime),
        **kw,
    )


def week() -> list[AuditEvent]:
    issued, alice, bob = Outcome.ISSUED, ("gitlab", "alice"), ("gitlab", "bob")
    carol, dave = ("okta", "carol"), ("okta", "dave")
    main = {"ref": "main"}
    return [
        ev(T0 - timedelta(hours=1), issued, "etl-vault", *alice, lifetime=60),  # before window
        # etl-writer / alice: lifetimes 900, 600, 1200 -> max 1200, median 900; 1200 > 900 TTL
        ev(at(0, 10), Outcome.INTENT, "etl-writer", *alice, request_id="a1"),
        ev(
            at(0, 10),
            issued,
            "etl-writer",
            *alice,
            request_id="a1",
            lifetime=900,
            claims=main,
            session_id="s1",
            credential_ref="ASIA0000000000000001",
        ),
        ev(at(1, 10), issued, "etl-writer", *alice, lifetime=600, claims=main),
        ev(
            at(2, 10),
            issued,
            "etl-writer",
            *alice,
            lifetime=1200,
            claims=main,
            request_id="long",
            credential_ref="ASIA0000000000000003",
        ),
        # session s1 spans 0d10:00 .. 0d23:30 = 13.5 h > 12 h session_max
        ev(at(0, 23, 30), Outcome.REVOKED, "etl-writer", *alice, session_id="s1", kind="session"),
        # etl-writer / bob: 900, 300 -> max 900, median 600; feature/x matches neither pattern
        ev(at(3, 9), issued, "etl-writer", *bob, lifetime=900, claims={"ref": "release/1.2"}),
        ev(at(4, 9), issued, "etl-writer", *bob, lifetime=300, claims={"ref": "feature/x"}),
        # warehouse-load / carol: 3600, 3600, 1800 -> max 3600, median 3600; staging vs usual prod
        ev(
            at(1, 8),
            issued,
            "warehouse-load",
            *carol,
            lifetime=3600,
            claims={"environment": "prod"},
            session_id="s2",
        ),
        ev(at(1, 9), Outcome.REVOKED, "warehouse-load", *carol, session_id="s2"),  # 1 h session
        ev(
            at(2, 8),
            issued,
            "warehouse-load",
            *carol,
            lifetime=3600,
            claims={"environment": "prod"},
        ),
        ev(
            at(5, 8),
            issued,
            "warehouse-load",
            *carol,
            lifetime=1800,
            claims={"environment": "staging"},
            credential_ref="hmac-sha256:abc",
        ),
        # warehouse-load / dave: 3600
        ev(
            at(6, 8), issued, "warehouse-load", *dave, lifetime=3600, claims={"environment": "prod"}
        ),
        # denials: etl-writer policy_denied x2, expired x1; unknown grant token_replayed x1
        ev(at(0, 11), Outcome.DENIED, "etl-writer", *bob, reason="policy_denied"),
        ev(at(3, 11), Outcome.DENIED, "etl-writer", *bob, reason="policy_denied"),
        ev(at(3, 12), Outcome.DENIED, "etl-writer", *bob, reason="expired"),
        ev(at(4, 12), Outcome.DENIED, "", "gitlab", "", reason="token_replayed"),
        ev(NOW + timedelta(minutes=1), issued, "etl-vault", *alice, lifetime=60),  # after window
    ]


def test_report_matches_hand_computed_figures() -> None:
    """The report over the seeded week gives the figures computed by hand in the seed comments."""
    report = build_report(week(), CONFIG, since=T0, until=NOW)
    rows = {(r.grant, r.identity): r for r in report.per_grant_identity}
    assert set(rows) == {
        ("etl-writer", "gitlab:alice"),
        ("etl-writer", "gitlab:bob"),
        ("warehouse-load", "okta:carol"),
        ("warehouse-load", "okta:dave"),
    }
    alice = rows[("etl-writer", "gitlab:alice")]
    assert (alice.issued, alice.lifetime_max, alice.lifetime_median, alice.outlived_ttl) == (
        3,
        1200,
        900,
        1,
    )
    bob = rows[("etl-writer", "gitlab:bob")]
    assert (bob.issued, bob.lifetime_max, bob.lifetime_median, bob.outlived_ttl) == (2, 900, 600, 0)
    carol = rows[("warehouse-load", "okta:carol")]
    assert (carol.issued, carol.lifetime_max, carol.lifetime_median) == (3, 3600, 3600)
    assert rows[("warehouse-load", "okta:dave")].issued == 1

    assert [(o.request_id, o.lifetime, o.ttl) for o in report.outlived] == [("long", 1200, 900)]
    assert [(s.session_id, s.seconds) for s in report.long_sessions] == [("s1", 48600)]
    assert [(d.grant, d.reason, d.count) for d in report.denials] == [
        ("", "token_replayed", 1),
        ("etl-writer", "expired", 1),
        ("etl-writer", "policy_denied", 2),
    ]
    assert report.unused_grants == ("etl-vault",)
    assert [(u.grant, u.identity, u.claim, u.value, u.expected) for u in report.unexpected] == [
        ("etl-writer", "gitlab:bob", "ref", "feature/x", "main | release/*"),
        ("warehouse-load", "okta:carol", "environment", "staging", "prod"),
    ]
    assert len(report.issuances) == 9


def test_report_renders_every_format() -> None:
    """Table, JSON, CSV and HTML carry the same figures; HTML has both charts and no script."""
    report = build_report(week(), CONFIG, since=T0, until=NOW)
    table = render(report, CONFIG, "table")
    assert re.search(r"etl-writer +gitlab:alice +3 ", table) and "0h20m00s" in table  # 1200 s max
    data = json.loads(render(report, CONFIG, "json"))
    assert data["unused_grants"] == ["etl-vault"]
    assert data["per_grant_identity"][0]["lifetime_max"] == 1200
    rows = list(csv.reader(io.StringIO(render(report, CONFIG, "csv"))))
    assert ["Grants never used", "etl-vault"] in rows
    page = render(report, CONFIG, "html")
    assert "<script" not in page.lower() and "http://" not in page.replace(
        'xmlns="http://www.w3.org/2000/svg"', ""
    )
    assert page.count('class="issuance"') == 9
    assert page.count('class="lifetime-max"') == 2 and page.count('class="ttl"') == 2
    assert 'id="timeline"' in page and 'id="lifetimes"' in page


def test_html_escapes_recorded_values() -> None:
    """Token values are escaped in the HTML report, so a hostile subject cannot inject markup."""
    hostile = ev(
        at(1, 1), Outcome.ISSUED, "etl-writer", "gitlab", "<img src=x onerror=1>", lifetime=60
    )
    page = render(build_report([hostile], CONFIG, since=T0, until=NOW), CONFIG, "html")
    assert "<img" not in page and "&lt;img src=x onerror=1&gt;" in page


# ------------------------------------------------------------------------------------------ CLI


def _run(*argv: str) -> tuple[int, str, str]:
    return run_audit_cli(*argv, now=NOW)


@pytest.fixture
def seeded_config(tmp_path: Path) -> Path:
    """A broker.toml whose SQLite ledger holds the seeded week, checkpointed every 4 records."""
    return seed_ledger(tmp_path, week(), policy=TOML, now=NOW, checkpoint_every=4)


def test_cli_verify_exit_codes(seeded_config: Path, tmp_path: Path) -> None:
    """verify exits 0 on an intact ledger, 1 after an edit (naming the seq), 2 on a bad config."""
    code, out, _ = _run("audit", "verify", "--config", str(seeded_config))
    assert code == 0 and out.startswith("OK"), out
    import sqlite3

    conn = sqlite3.connect(tmp_path / "audit.db")
    conn.execute("UPDATE audit_log SET record = replace(record, 'bob', 'eve') WHERE seq = 6")
    conn.commit()
    conn.close()
    code, out, _ = _run("audit", "verify", "--config", str(seeded_config), "--format", "json")
    assert code == 1 and json.loads(out)["first_bad_seq"] == 6
    code, _, err = _run("audit", "verify", "--config", str(tmp_path / "missing.toml"))
    assert code == 2 and "missing.toml" in err
    code, _, err = _run("audit", "verify", "--store", "mysql://nope")
    assert code == 2


def test_cli_verify_without_the_key_file_is_a_usage_error(
    seeded_config: Path, tmp_path: Path
) -> None:
    """verify refuses to run (exit 2) rather than create a missing checkpoint key."""
    (tmp_path / "key.pem").unlink()
    code, _, err = _run("audit", "verify", "--config", str(seeded_config))
    assert code == 2 and "key file not found" in err
    assert not (tmp_path / "key.pem").exists()


def test_cli_report_from_config(seeded_config: Path, tmp_path: Path) -> None:
    """report --since 7d reads the ledger named in the config and writes the chosen format."""
    code, out, _ = _run("audit", "report", "--config", str(seeded_config), "--format", "json")
    data = json.loads(out)
    assert code == 0 and data["since"] == "2026-11-16T00:00:00.000000Z"
    assert [o["request_id"] for o in data["outlived"]] == ["long"]
    target = tmp_path / "report.html"
    code, _, _ = _run(
        "audit",
        "report",
        "--config",
        str(seeded_config),
        "--format",
        "html",
        "--output",
        str(target),
    )
    assert code == 0 and target.read_text().count('class="issuance"') == 9


def test_cli_export_joins_cloudtrail_and_vault(seeded_config: Path) -> None:
    """export rows carry the AccessKeyId and the accessor HMAC in their own join columns."""
    code, out, _ = _run("audit", "export", "--config", str(seeded_config), "--format", "jsonl")
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and len(rows) == len(week())
    assert [r["seq"] for r in rows] == list(range(len(rows)))
    keyed = {r["aws_access_key_id"]: r for r in rows if r["aws_access_key_id"]}
    assert keyed["ASIA0000000000000003"]["request_id"] == "long"
    assert [r["vault_accessor_hmac"] for r in rows if r["vault_accessor_hmac"]] == [
        "hmac-sha256:abc"
    ]
    code, out, _ = _run(
        "audit",
        "export",
        "--config",
        str(seeded_config),
        "--format",
        "csv",
        "--since",
        "2026-11-21",
    )
    table = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and {r["time"][:10] for r in table} == {
        "2026-11-21",
        "2026-11-22",
        "2026-11-23",
    }


def test_cli_prune_keeps_the_ledger_verifiable(seeded_config: Path) -> None:
    """prune --before deletes a checkpointed prefix and verify still passes afterwards."""
    code, out, _ = _run("audit", "prune", "--config", str(seeded_config), "--before", "2026-11-18")
    assert code == 0
    deleted = int(re.match(r"pruned (\d+)", out).group(1))  # type: ignore[union-attr]
    assert deleted > 0
    code, out, _ = _run("audit", "verify", "--config", str(seeded_config))
    assert code == 0, out
    assert "pruned" in out


# ----------------------------------------------------------------------------- headless Chromium


@pytest.mark.integration
def test_html_report_screenshot_shows_the_charts(tmp_path: Path) -> None:
    """Headless Chromium renders the HTML report and the screenshot shows timeline dots and bars."""
    page = tmp_path / "report.html"
    page.write_text(render(build_report(week(), CONFIG, since=T0, until=NOW), CONFIG, "html"))
    width, height, rows = chromium_screenshot(page, tmp_path / "report.png", 940, 420)
    assert (width, height) == (940, 420)

    def count(rgb: tuple[int, int, int], top: int, bottom: int) -> int:
        needle = bytes(rgb)
        return sum(
            1 for row in rows[top:bottom] for x in range(0, len(row), 3) if row[x : x + 3] == needle
        )

    # the charts sit below the title; colours from report.py's SVG
    assert count((0x1F, 0x77, 0xB4), 120, 260) > 20  # etl-writer timeline dots
    assert count((0xD6, 0x27, 0x28), 120, 260) > 20  # warehouse-load dots
    assert count((0x31, 0x82, 0xBD), 260, 420) > 2000  # median lifetime bars
    assert count((0x9E, 0xCA, 0xE1), 260, 420) > 2000  # max lifetime bars
