"""PolicyReloader against a real SQLite ledger: swaps, refusals, restart-only changes, the audit.

In-process: the watcher's `check()` is called directly (the running broker's thread and SIGHUP
are covered over HTTP in test_policy_reload_http.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from broker.audit import open_store
from broker.audit.events import AuditEvent, Outcome
from broker.audit.ledger import SqlLedger
from broker.audit.verify import verify_ledger
from broker.config import GrantConfig
from broker.dev.policy_file import TomlValue
from broker.dev.policy_file import grant as grant_toml
from broker.policy_reload import (
    ActivePolicy,
    PolicyMetrics,
    PolicyReloader,
    file_sha256,
    read_policy,
)
from broker.storage import StoreUnavailable

BASE = """
[broker]
audit_store = "sqlite:///unused.db"

[[issuer]]
name = "gitlab"
url = "https://gitlab.com"
audiences = ["luigi-creds"]
"""


def project_grant(name: str, **target: Mapping[str, TomlValue]) -> str:
    """A grant of gitlab's project 1 with its `aws=` or `vault=` target."""
    return grant_toml(name, {"project_id": "1"}, **target)


WRITER = project_grant("writer", aws={"role_arn": "arn:aws:iam::123456789012:role/writer"})
READER = project_grant("reader", aws={"role_arn": "arn:aws:iam::123456789012:role/reader"})
VAULT_GRANT = project_grant("db", vault={"token_policies": ["db"]})

VAULT_UPSTREAM = """
[upstream.vault]
url = "http://127.0.0.1:8200"
auth = "token"
token_file = "vault-token"
"""

CLAIMS = {"project_id": "1"}


def now() -> datetime:
    return datetime.now(UTC)


class Ledger:
    """The real SqlLedger, with a switch that makes appends fail like a store outage."""

    def __init__(self, store: SqlLedger) -> None:
        self.store = store
        self.down = False

    def append(self, event: AuditEvent) -> int:
        if self.down:
            raise StoreUnavailable("down")
        return self.store.append(event)

    def appender(self, event: AuditEvent) -> object:
        return self.store.appender(event)

    def check_writable(self) -> None:
        self.store.check_writable()

    def close(self) -> None:
        self.store.close()


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    store = open_store(f"sqlite:///{tmp_path / 'audit.db'}")
    try:
        yield Ledger(store)
    finally:
        store.close()


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "broker.toml"
    path.write_text(BASE + WRITER, encoding="utf-8")
    return path


def reloader(path: Path, ledger: Ledger, registry: CollectorRegistry) -> PolicyReloader:
    def can_mint(grant: GrantConfig) -> str | None:
        return "a vault grant needs a restart" if grant.vault is not None else None

    r = PolicyReloader(
        path,
        ActivePolicy(read_policy(path, now)),
        ledger,  # type: ignore[arg-type]
        now,
        metrics=PolicyMetrics(registry),
        can_mint=can_mint,
        stamp=ledger.store.stamp_policy,
    )
    r.announce()
    return r


def write(path: Path, text: str) -> None:
    # A different size always: the stat poll sees the change even within one mtime tick.
    path.write_text(text, encoding="utf-8")


def allowed(r: PolicyReloader, grant: str) -> bool:
    return r.active.current.policy.evaluate(grant, "gitlab", CLAIMS).allowed


def gauge(registry: CollectorRegistry, name: str) -> float | None:
    return registry.get_sample_value(name)


def test_a_valid_edit_swaps_the_policy_and_is_audited(policy_file: Path, ledger: Ledger) -> None:
    registry = CollectorRegistry()
    r = reloader(policy_file, ledger, registry)
    first = r.active.current.sha256
    assert first == file_sha256(policy_file.read_bytes())
    assert r.check() == "unchanged"
    assert not allowed(r, "reader")

    write(policy_file, BASE + WRITER + READER)
    assert r.check() == "loaded"
    assert allowed(r, "reader") and allowed(r, "writer")
    second = r.active.current.sha256
    assert second != first and r.status()["state"] == "current"
    assert registry.get_sample_value("luigi_creds_policy_reloads_total", {"outcome": "loaded"}) == 2
    assert registry.get_sample_value("luigi_creds_policy_info", {"sha256": second[:16]}) == 1

    # A later record that names no policy is stamped with the one in force.
    ledger.append(AuditEvent(time=now(), request_id="r1", outcome=Outcome.DENIED))
    events = list(ledger.store.events())
    assert [(e.kind, e.outcome, e.policy_sha256) for e in events] == [
        ("policy", Outcome.LOADED, first),
        ("policy", Outcome.LOADED, second),
        ("exchange", Outcome.DENIED, second),
    ]
    assert events[0].reason == "startup" and events[1].reason == "reloaded"
    assert events[1].detail["grants"] == ["writer", "reader"]
    assert events[1].detail["previous_sha256"] == first


def test_subscribers_hear_of_every_swap(policy_file: Path, ledger: Ledger) -> None:
    r = reloader(policy_file, ledger, CollectorRegistry())
    heard: list[str] = []
    r.active.subscribe(lambda loaded: heard.append(loaded.sha256))
    write(policy_file, BASE + WRITER + READER)
    r.check()
    assert heard == [r.active.current.sha256]


def test_a_broken_file_is_refused_and_the_old_policy_serves(
    policy_file: Path, ledger: Ledger, caplog: pytest.LogCaptureFixture
) -> None:
    registry = CollectorRegistry()
    r = reloader(policy_file, ledger, registry)
    serving = r.active.current
    # Two lint problems in one file: both are reported, not just the first.
    broken = BASE + WRITER + READER.replace('issuers = ["gitlab"]', 'issuers = ["nobody"]')
    broken = broken.replace("arn:aws:iam::123456789012:role/reader", "not-an-arn")
    write(policy_file, broken)
    with caplog.at_level("ERROR", logger="broker.policy_reload"):
        assert r.check() == "refused"
    assert r.active.current is serving
    status = r.status()
    assert status["state"] == "refused_file_on_disk"
    problems = status["refused"]["problems"]
    assert len(problems) >= 2, problems
    assert any("nobody" in p for p in problems) and any("role_arn" in p for p in problems)
    # Every problem is logged, each on its own line.
    logged = [rec for rec in caplog.records if rec.getMessage().startswith("policy file refused")]
    assert len(logged) == len(problems)
    assert gauge(registry, "luigi_creds_policy_refused") == 1
    # Looking again at the same refused bytes neither re-audits nor re-logs.
    assert r.check(force=True) == "refused"
    refusals = [e for e in ledger.store.events() if e.outcome == Outcome.REFUSED]
    assert len(refusals) == 1
    assert refusals[0].policy_sha256 == serving.sha256
    assert refusals[0].detail["refused_sha256"] == file_sha256(broken.encode())
    assert refusals[0].detail["problems"] == problems

    # Fixing the file loads it and clears the refusal.
    write(policy_file, BASE + WRITER + READER)
    assert r.check() == "loaded"
    assert r.status()["state"] == "current" and gauge(registry, "luigi_creds_policy_refused") == 0


def test_a_toml_syntax_error_is_refused(policy_file: Path, ledger: Ledger) -> None:
    r = reloader(policy_file, ledger, CollectorRegistry())
    write(policy_file, BASE + "[[grant]\n")
    assert r.check() == "refused"
    assert r.status()["refused"]["problems"][0].startswith("toml:")


def test_restoring_the_serving_file_clears_a_refusal(policy_file: Path, ledger: Ledger) -> None:
    r = reloader(policy_file, ledger, CollectorRegistry())
    good = policy_file.read_text()
    write(policy_file, "not toml = = =")
    assert r.check() == "refused"
    write(policy_file, good)
    assert r.check() == "unchanged"
    assert r.status()["state"] == "current"


def test_a_deleted_file_is_refused_and_the_policy_keeps_serving(
    policy_file: Path, ledger: Ledger
) -> None:
    r = reloader(policy_file, ledger, CollectorRegistry())
    policy_file.unlink()
    assert r.check() == "refused"
    assert allowed(r, "writer")
    assert "cannot read" in r.status()["refused"]["problems"][0]


@pytest.mark.parametrize(
    ("edit", "where"),
    [
        (lambda t: t.replace("[broker]\n", '[broker]\nleeway = "5s"\n'), "[broker]"),
        (lambda t: t.replace('audiences = ["luigi-creds"]', 'audiences = ["x"]'), "[[issuer]]"),
        (lambda t: t + '\n[upstream.aws]\nregion = "eu-west-1"\n', "[upstream.aws]"),
        (lambda t: t + VAULT_GRANT + VAULT_UPSTREAM, "grant[db]"),
    ],
)
def test_what_only_a_restart_applies_is_refused(
    policy_file: Path, ledger: Ledger, edit: object, where: str
) -> None:
    r = reloader(policy_file, ledger, CollectorRegistry())
    text = policy_file.read_text()
    assert callable(edit)
    write(policy_file, edit(text))
    assert r.check() == "refused"
    assert any(p.startswith(where) for p in r.status()["refused"]["problems"])
    assert r.active.current.config.grants[0].name == "writer"


def test_no_swap_without_its_audit_record(policy_file: Path, ledger: Ledger) -> None:
    """If the `loaded` record cannot be written the old policy stays; the next look retries."""
    r = reloader(policy_file, ledger, CollectorRegistry())
    write(policy_file, BASE + WRITER + READER)
    ledger.down = True
    assert r.check() == "retry"
    assert not allowed(r, "reader")
    ledger.down = False
    assert r.check() == "loaded"
    assert allowed(r, "reader")


def test_records_with_and_without_a_policy_hash_verify_together(
    policy_file: Path, ledger: Ledger
) -> None:
    """Records written before the field existed (schema 1) and after (schema 2) form one chain
    that `audit verify` accepts."""
    ledger.append(AuditEvent(time=now(), request_id="old", outcome=Outcome.DENIED))
    reloader(policy_file, ledger, CollectorRegistry())
    ledger.append(AuditEvent(time=now(), request_id="new", outcome=Outcome.DENIED))
    rows = list(ledger.store.records())
    versions = [json.loads(row.record)["schema_version"] for row in rows]
    assert versions == [1, 2, 2]
    report = verify_ledger(ledger.store, public_keys=None, now=now())
    assert report.ok, report
