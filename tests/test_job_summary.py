"""The job summary (luigi_creds/summary.py): what is recorded per mint, the Markdown, where it
is written. Unit tests; real `luigi-creds exec` and Luigi runs that write it are in
test_luigi_e2e.py."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from luigi_creds.credentials import AwsCredentials, VaultSecret, VaultToken
from luigi_creds.summary import (
    GITHUB_STEP_SUMMARY,
    SUMMARY_FILE_ENV,
    MintLog,
    from_json,
    publish,
    publish_summary,
    render_markdown,
)

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
SECRETS = ("aws-secret-value", "aws-session-token", "hvs.vault-token", "db-password", "renew-tok")


def creds() -> dict[str, object]:
    return {
        "etl-writer": AwsCredentials(
            "etl-writer", "req-aws", "ASIAEXAMPLE000000001", "aws-secret-value",
            "aws-session-token", NOW + timedelta(minutes=15),
        ),
        "etl-vault": VaultToken(
            "etl-vault", "req-tok", "hvs.vault-token", "accessor-abc", ("etl-read",), True, 300,
            NOW + timedelta(minutes=5),
        ),
        "warehouse": VaultSecret(
            "warehouse", "req-lease", "database/creds/w/lease1", 120, True,
            {"password": "db-password"}, NOW + timedelta(minutes=2), "renew-tok",
        ),
    }  # fmt: skip


def filled_log() -> MintLog:
    log = MintLog(lambda: NOW)
    table = creds()
    mint = log.wrap(lambda grant, task, duration: table[grant])  # type: ignore[arg-type,return-value]
    mint("etl-writer", None, None)
    mint("etl-writer", "Copy|S3_1", None)
    mint("etl-vault", "Load_2", None)
    mint("warehouse", "Load_2", None)
    return log


def test_every_mint_is_recorded_by_what_identifies_it() -> None:
    entries = filled_log().entries()
    assert [
        (e.task, e.grant, e.kind, e.ref, e.request_id, e.lifetime_seconds) for e in entries
    ] == [
        ("", "etl-writer", "aws", "ASIAEXAMPLE000000001", "req-aws", 900),
        ("Copy|S3_1", "etl-writer", "aws", "ASIAEXAMPLE000000001", "req-aws", 900),
        ("Load_2", "etl-vault", "vault-token", "accessor-abc", "req-tok", 300),
        ("Load_2", "warehouse", "vault-secret", "database/creds/w/lease1", "req-lease", 120),
    ]


def test_a_refused_mint_records_nothing() -> None:
    log = MintLog(lambda: NOW)

    def refuse(grant: str, task: str | None, duration: int | None) -> AwsCredentials:
        raise RuntimeError("denied")

    with pytest.raises(RuntimeError):
        log.wrap(refuse)("etl-writer", "t", None)
    assert log.entries() == []


def test_markdown_has_one_row_per_credential_and_no_secret() -> None:
    markdown = render_markdown(filled_log().entries())
    rows = [line for line in markdown.splitlines() if line.startswith("| ") and "`" in line]
    assert len(rows) == 4
    assert rows[0].startswith("| (job) | etl-writer | AWS key | `ASIAEXAMPLE000000001` |")
    assert rows[1].startswith("| Copy\\|S3_1 | etl-writer |")  # a pipe cannot break the table
    assert "| 5m00s | `req-tok` |" in rows[2]
    assert "4 credential(s) for 2 task(s) and the job itself, 3 grant(s)" in markdown
    assert not [s for s in SECRETS if s in markdown]


def test_json_round_trip_and_malformed_input() -> None:
    log = filled_log()
    assert from_json(log.as_json()) == log.entries()
    assert not [s for s in SECRETS if s in str(log.as_json())]
    with pytest.raises(ValueError):
        from_json({"credentials": [{"task": "t"}]})
    with pytest.raises(ValueError):
        from_json({})


def test_publish_appends_to_the_step_summary_and_writes_the_file(tmp_path: Path) -> None:
    step = tmp_path / "step.md"
    step.write_text("earlier\n")
    out = tmp_path / "out" / "summary.md"
    env = {GITHUB_STEP_SUMMARY: str(step), SUMMARY_FILE_ENV: str(out)}
    assert publish("# s", env) == [step, out]
    assert step.read_text() == "earlier\n# s\n" and out.read_text() == "# s\n"
    # An explicit output wins over the variable.
    other = tmp_path / "other.md"
    assert publish("# t", {SUMMARY_FILE_ENV: str(out)}, other) == [other]


def test_publish_never_raises_and_writes_nothing_unasked(tmp_path: Path) -> None:
    assert publish_summary(filled_log(), {}) == []
    blocked = tmp_path / "file"
    blocked.write_text("")
    assert publish("# s", {SUMMARY_FILE_ENV: str(blocked / "x.md")}) == []
