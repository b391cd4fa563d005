"""Audit checkpoints are signed by default.

Unit: which key file a configuration resolves to. Over real processes: `serve` on an SQLite store
with no `audit_key_file` creates the Ed25519 key 0600 beside the database and signs with it, and
`audit verify --config` finds that key; `serve` and `check-config` on a PostgreSQL store with no
key refuse, saying what to set.
"""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.audit.key_files import (
    UnsignedAuditRefused,
    checkpoint_key_path,
    required_checkpoint_key_path,
)
from broker.config import BrokerSettings
from broker.dev import policy_file
from broker.dev.claims import GITLAB_PROJECT_ID
from broker.dev.harness import policy_toml, run_broker_cli, start_broker, start_dev_issuer
from broker.dev.processes import free_port
from broker.storage import StoreURL


def test_sqlite_store_defaults_to_a_key_beside_the_database() -> None:
    settings = BrokerSettings(audit_store="sqlite:///var/lib/luigi-creds/audit.db")
    assert checkpoint_key_path(settings) == Path("/var/lib/luigi-creds/audit-checkpoint.ed25519")


@pytest.mark.parametrize(
    "store",
    [
        "sqlite:///srv/ledger/audit.db",
        "sqlite:////srv/ledger/audit.db",  # examples/dev-policy.toml's spelling
        "sqlite+pysqlite:///srv/ledger/audit.db",
        "sqlite:/srv/ledger/audit.db",
        "sqlite:///srv/led%20ger/audit.db",
    ],
)
def test_the_default_key_sits_beside_the_file_the_store_opens(store: str) -> None:
    """The key's directory is the one the store's own parser names: the rule is storage's."""
    opened = Path(StoreURL.parse(store).target)
    key = checkpoint_key_path(BrokerSettings(audit_store=store))
    assert key == opened.parent / "audit-checkpoint.ed25519"
    assert str(key).startswith("/srv/led")  # one canonical spelling, never "//srv/..."


@pytest.mark.parametrize("store", ["sqlite://relative.db", "sqlite:relative.db", "mysql://h/db"])
def test_a_store_url_storage_refuses_has_no_default_key(store: str) -> None:
    with pytest.raises(ValueError):
        StoreURL.parse(store)
    assert checkpoint_key_path(BrokerSettings(audit_store=store)) is None


def test_an_explicit_key_file_wins() -> None:
    for store in ("sqlite:///srv/a.db", "postgresql://broker@db/audit"):
        settings = BrokerSettings(audit_store=store, audit_key_file=Path("/etc/k.pem"))
        assert required_checkpoint_key_path(settings) == Path("/etc/k.pem")


def test_postgresql_store_without_key_has_no_default() -> None:
    settings = BrokerSettings(audit_store="postgresql://broker@db.internal/audit")
    assert checkpoint_key_path(settings) is None
    with pytest.raises(UnsignedAuditRefused, match="audit_key_file") as raised:
        required_checkpoint_key_path(settings)
    assert "openssl genpkey -algorithm ed25519" in str(raised.value)


def _pg_policy(tmp_path: Path) -> Path:
    """A policy on a PostgreSQL store (never opened) with no audit_key_file."""
    path = tmp_path / "broker.toml"
    store = "postgresql://postgres@127.0.0.1:5432/never_opened"
    role = {"role_arn": "arn:aws:iam::123456789012:role/etl-writer"}
    path.write_text(
        "\n".join(
            (
                policy_file.broker_table(f"127.0.0.1:{free_port()}", store),
                policy_file.issuer("gitlab", "https://gitlab.com", ["luigi-creds"]),
                policy_file.grant("etl-writer", {"project_id": GITLAB_PROJECT_ID}, aws=role),
            )
        )
    )
    return path


def test_serve_on_postgresql_without_key_refuses_and_says_what_to_set(tmp_path: Path) -> None:
    policy = _pg_policy(tmp_path)
    done = run_broker_cli("serve", "--config", str(policy))
    assert done.returncode == 2, done.stderr
    assert "audit checkpoints cannot be signed" in done.stderr
    assert "[broker] audit_key_file" in done.stderr
    assert "Traceback" not in done.stderr
    checked = run_broker_cli("check-config", str(policy))
    assert checked.returncode == 1
    assert "audit_key_file" in checked.stderr


def test_serve_on_sqlite_creates_the_key_0600_and_signs_with_it(tmp_path: Path) -> None:
    issuer = start_dev_issuer(tmp_path / "issuer")
    try:
        db = tmp_path / "state" / "audit.db"
        config = policy_toml(
            issuer_url=issuer.url,
            audit_db=db,
            listen=f"127.0.0.1:{free_port()}",
            moto_url="http://127.0.0.1:9",
            role_arn="arn:aws:iam::123456789012:role/etl-writer",
        )
        assert "audit_key_file" not in config
        checked = run_broker_cli("check-config", str(_write(tmp_path / "check.toml", config)))
        assert checked.returncode == 0, checked.stderr
        assert f"signed with {db.parent / 'audit-checkpoint.ed25519'}" in checked.stdout
        broker = start_broker(tmp_path / "broker", config)
        try:
            key = db.parent / "audit-checkpoint.ed25519"
            assert key.exists()
            assert stat.S_IMODE(key.stat().st_mode) == 0o600
            loaded = serialization.load_pem_private_key(key.read_bytes(), password=None)
            assert isinstance(loaded, Ed25519PrivateKey)
            status, body, _ = broker.token(
                {
                    "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
                    "subject_token": "not-a-jwt",
                    "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
                    "audience": "etl-writer",
                }
            )
            assert status == 400 and body["error"] == "invalid_request"
        finally:
            broker.stop()  # a clean stop signs a checkpoint over the deny record
    finally:
        issuer.stop()
    verified = run_broker_cli("audit", "verify", "--config", str(broker.config_path))
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "OK" in verified.stdout
    assert "checkpoints verified" in verified.stdout
    assert " 0 checkpoints verified" not in verified.stdout
    assert "not checked (no key)" not in verified.stdout


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path
