"""Vault minting against a real OpenBao dev server and the real PostgreSQL.

Covers the broker's AppRole identity (login, renew, re-login), client tokens (policies, TTL, uses,
metadata), a renewed 10 s token, dynamic database secrets (login, renew, revoke) and recovery
after OpenBao is stopped, sealed and restarted; plus pure checks of the plan and error table.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import hvac
import hvac.exceptions
import psycopg
import pytest
import requests

from broker.config import GrantConfig, VaultGrant
from broker.dev.harness import pg_url
from broker.dev.vault import (
    BROKER_POLICY,
    DB_ROLE,
    ETL_POLICY,
    BrokerVault,
    OpenBao,
    setup_broker,
    start_openbao,
    write_approle_files,
)
from broker.mint import UpstreamError
from broker.mint.vault import (
    VaultMinter,
    VaultSecret,
    VaultToken,
    clamp_ttl,
    map_error,
    plan_token,
    sanitise_metadata,
)


class FakeClock:
    """An aware-UTC clock the test moves by hand (the identity schedules renewals by it)."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def etl_grant(**vault: object) -> GrantConfig:
    return GrantConfig(
        name="etl-vault",
        issuers=("gitlab",),
        match={"project_id": "42"},
        ttl=120,
        vault=VaultGrant(token_policies=(ETL_POLICY,), **vault),  # type: ignore[arg-type]
    )


METADATA = {
    "issuer": "gitlab",
    "subject": "project_path:group/app:ref_type:branch:ref:main",
    "session": "sess-1",
    "task": "CopyToS3_2026_11_22_6c9d7d10ef",
    "request_id": "req-123",
}


@pytest.fixture(scope="module")
def bao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenBao]:
    server = start_openbao(tmp_path_factory.mktemp("openbao"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def broker_vault(bao: OpenBao, tmp_path_factory: pytest.TempPathFactory) -> BrokerVault:
    return setup_broker(bao, tmp_path_factory.mktemp("broker-files"), pg_url=pg_url())


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def minter(broker_vault: BrokerVault, clock: FakeClock) -> VaultMinter:
    return VaultMinter(broker_vault.upstream, clock=clock)


def pg_roles(name: str) -> list[tuple[str, datetime | None]]:
    with psycopg.connect(pg_url()) as conn:
        rows = conn.execute(
            "SELECT rolname, rolvaliduntil FROM pg_roles WHERE rolname = %s", (name,)
        ).fetchall()
    return [(str(r[0]), r[1]) for r in rows]


def connect_as(username: str, password: str) -> psycopg.Connection[tuple[object, ...]]:
    parts = pg_url().split("@", 1)[1]
    return psycopg.connect(f"postgresql://{parts}", user=username, password=password)


# ---------------------------------------------------------------------------------------------
# Pure
# ---------------------------------------------------------------------------------------------


def test_plan_token_takes_policies_uses_and_sanitised_metadata() -> None:
    """plan_token copies the grant's policies and uses and bounds hostile metadata values."""
    hostile = {**METADATA, "subject": "a{{ .x }}\n\u202e" + "b" * 500, "evil": "x"}
    plan = plan_token(etl_grant(num_uses=3, orphan=True), ttl=90, metadata=hostile)
    assert plan.policies == (ETL_POLICY,)
    assert (plan.ttl, plan.num_uses, plan.orphan) == (90, 3, True)
    assert plan.metadata["grant"] == "etl-vault"
    assert "evil" not in plan.metadata
    subject = plan.metadata["subject"]
    assert len(subject) == 256
    assert "{" not in subject and "\n" not in subject and "\u202e" not in subject


def test_error_table_classifies_by_type() -> None:
    """Connection errors, 5xx, sealed and 429 are retryable; 403, 400 and 404 are not."""
    cases: list[tuple[BaseException, str, bool]] = [
        (requests.ConnectionError(), "upstream_unavailable", True),
        (requests.Timeout(), "upstream_unavailable", True),
        (hvac.exceptions.VaultDown(), "upstream_unavailable", True),
        (hvac.exceptions.InternalServerError(), "upstream_unavailable", True),
        (hvac.exceptions.RateLimitExceeded(), "upstream_unavailable", True),
        (hvac.exceptions.Forbidden(), "upstream_denied", False),
        (hvac.exceptions.InvalidRequest(), "upstream_rejected", False),
        (hvac.exceptions.InvalidPath(), "upstream_rejected", False),
    ]
    for exc, reason, retryable in cases:
        mapped = map_error(exc)
        assert (mapped.reason, mapped.retryable) == (reason, retryable), exc


def test_clamp_ttl_caps_by_grant_and_lifts_to_the_floor() -> None:
    """The grant's TTL caps a requested TTL, and nothing goes below 10 s."""
    assert clamp_ttl(120, None) == 120
    assert clamp_ttl(120, 600) == 120
    assert clamp_ttl(120, 30) == 30
    assert clamp_ttl(120, 1) == 10


def test_reprs_hide_tokens_and_secret_data() -> None:
    """Tokens, renew tokens and secret data never appear in reprs."""
    token = VaultToken("hvs.SECRET-TOKEN", "acc", ("etl-read",), True, 60)
    secret = VaultSecret("lease/1", 60, True, {"password": "pw-SECRET"}, "acc", "hvs.RENEW")
    assert "SECRET" not in repr(token)
    assert "SECRET" not in repr(secret) and "RENEW" not in repr(secret)
    assert sanitise_metadata({"task": "ok"}) == {"task": "ok"}


# ---------------------------------------------------------------------------------------------
# Identity
# ---------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_identity_logs_in_renews_and_relogins_after_revoke(
    bao: OpenBao, minter: VaultMinter, clock: FakeClock
) -> None:
    """The broker logs in by AppRole, renews at 2/3 of its TTL, and logs in again once revoked."""
    identity = minter.identity
    identity.token()
    first = identity.accessor
    assert first is not None
    looked = bao.root().auth.token.lookup_accessor(first)["data"]
    assert BROKER_POLICY in looked["policies"]
    assert not looked.get("last_renewal_time")

    clock.advance(41)  # AppRole token_ttl 60 s: renewal is due after 40 s
    identity.token()
    assert identity.accessor == first
    assert bao.root().auth.token.lookup_accessor(first)["data"].get("last_renewal_time")

    bao.root().auth.token.revoke_accessor(first)
    token = minter.create_token(plan_token(etl_grant(), ttl=60, metadata=METADATA))
    assert token.accessor
    assert identity.accessor not in (None, first)


@pytest.mark.integration
def test_identity_relogins_at_max_ttl_with_rotated_secret_id(
    bao: OpenBao, broker_vault: BrokerVault, tmp_path: Path, clock: FakeClock
) -> None:
    """At max TTL the identity logs in again, reading a rotated secret_id file; threads share it."""
    root = bao.root()
    root.auth.approle.create_or_update_approle(
        "broker-short", token_policies=[BROKER_POLICY], token_ttl="20s", token_max_ttl="20s"
    )
    role_id_file, secret_id_file = tmp_path / "role_id", tmp_path / "secret_id"
    _, old_secret = write_approle_files(bao, "broker-short", role_id_file, secret_id_file)
    upstream = replace(
        broker_vault.upstream, role_id_file=role_id_file, secret_id_file=secret_id_file
    )
    identity = VaultMinter(upstream, clock=clock).identity
    identity.token()
    first = identity.accessor

    # Rotate: a new secret id in the file, the old one destroyed at Vault.
    write_approle_files(bao, "broker-short", role_id_file, secret_id_file)
    root.auth.approle.destroy_secret_id("broker-short", old_secret)

    # Past 2/3 of 20 s on the broker's clock; a little real time passes too, so Vault's renewal
    # comes back shorter than asked for (capped by the 20 s max TTL).
    time.sleep(1.5)
    clock.advance(14)
    seen: set[str | None] = set()
    threads = [
        threading.Thread(target=lambda: seen.add(identity.token() and identity.accessor))
        for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(seen) == 1
    assert seen != {first}
    assert "secret_id" not in repr(identity) and old_secret not in repr(identity)


@pytest.mark.integration
def test_identity_from_token_file(bao: OpenBao, broker_vault: BrokerVault, tmp_path: Path) -> None:
    """With auth = "token" the broker uses the token in its file and mints with it."""
    created = bao.root().auth.token.create(policies=[BROKER_POLICY], ttl="60s")["auth"]
    token_file = tmp_path / "vault-token"
    token_file.write_text(created["client_token"] + "\n", encoding="utf-8")
    os.chmod(token_file, 0o600)
    upstream = replace(
        broker_vault.upstream,
        auth="token",
        role_id_file=None,
        secret_id_file=None,
        token_file=token_file,
    )
    minter = VaultMinter(upstream, clock=lambda: datetime.now(UTC))
    minter.create_token(plan_token(etl_grant(), ttl=30, metadata=METADATA))
    assert minter.identity.accessor == created["accessor"]


# ---------------------------------------------------------------------------------------------
# Tokens
# ---------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_create_token_has_exact_policies_ttl_uses_and_metadata(
    bao: OpenBao, minter: VaultMinter
) -> None:
    """A minted token has the grant's policies, TTL, uses and metadata, and reads only its KV."""
    plan = plan_token(etl_grant(num_uses=5), ttl=120, metadata=METADATA)
    token = minter.create_token(plan)
    assert set(token.policies) == {"default", ETL_POLICY}
    assert token.lease_duration == 120 and token.renewable

    looked = bao.root().auth.token.lookup_accessor(token.accessor)["data"]
    assert sorted(looked["policies"]) == ["default", ETL_POLICY]
    assert 100 <= looked["ttl"] <= 120
    assert looked["num_uses"] == 5
    assert looked["orphan"] is False
    assert looked["path"] == "auth/token/create/luigi-creds"
    assert looked["meta"] == {**METADATA, "grant": "etl-vault"}

    client = hvac.Client(url=bao.url, token=token.token)
    secret = client.secrets.kv.v2.read_secret_version("etl/db", raise_on_deleted_version=True)
    assert secret["data"]["data"] == {"password": "etl-kv-value"}
    with pytest.raises(hvac.exceptions.Forbidden):
        client.secrets.kv.v2.read_secret_version("other/db", raise_on_deleted_version=True)


@pytest.mark.integration
def test_orphan_grant_mints_an_orphan_that_survives_the_broker_login(
    bao: OpenBao, minter: VaultMinter
) -> None:
    """An orphan grant's token has no parent and outlives the broker's own token."""
    token = minter.create_token(plan_token(etl_grant(orphan=True), ttl=60, metadata=METADATA))
    broker_accessor = minter.identity.accessor
    assert broker_accessor is not None
    bao.root().auth.token.revoke_accessor(broker_accessor)
    looked = bao.root().auth.token.lookup_accessor(token.accessor)["data"]
    assert looked["orphan"] is True


@pytest.mark.integration
def test_ten_second_token_renewed_by_its_holder_for_thirty_seconds(
    bao: OpenBao, minter: VaultMinter
) -> None:
    """A 10 s token renewed with renew-self keeps working for 30 s; an unrenewed one expires."""
    renewed = minter.create_token(plan_token(etl_grant(), ttl=10, metadata=METADATA))
    control = minter.create_token(plan_token(etl_grant(), ttl=10, metadata=METADATA))
    client = hvac.Client(url=bao.url, token=renewed.token)
    # OpenBao expires tokens on its own clock, so real time must pass: the loop runs until at
    # least 30 s (three lifetimes) have gone by, a lower bound only. The holder renews once a
    # third of the lease is used, leaving two thirds as slack for a slow machine.
    start = time.monotonic()
    lease, lease_start, reads = renewed.lease_duration, start, 0
    while True:
        client.secrets.kv.v2.read_secret_version("etl/db", raise_on_deleted_version=True)
        reads += 1
        if time.monotonic() - start >= 30:
            break
        if time.monotonic() - lease_start >= lease / 3:
            lease = int(client.auth.token.renew_self(increment=10)["auth"]["lease_duration"])
            lease_start = time.monotonic()
        time.sleep(1)
    assert reads >= 2
    assert client.auth.token.lookup_self()["data"]["ttl"] > 0
    with pytest.raises(hvac.exceptions.InvalidRequest):
        bao.root().auth.token.lookup_accessor(control.accessor)


@pytest.mark.integration
def test_policy_outside_the_role_is_rejected_and_unknown_role_denied(
    broker_vault: BrokerVault, minter: VaultMinter, clock: FakeClock
) -> None:
    """A policy outside the token role is rejected; a role the broker may not use is denied."""
    grant = replace(etl_grant(), vault=VaultGrant(token_policies=(BROKER_POLICY,)))
    with pytest.raises(UpstreamError) as caught:
        minter.create_token(plan_token(grant, ttl=30, metadata=METADATA))
    assert (caught.value.reason, caught.value.retryable) == ("upstream_rejected", False)

    other = VaultMinter(replace(broker_vault.upstream, token_role="someone-else"), clock=clock)
    other.identity.token()
    first = other.identity.accessor
    with pytest.raises(UpstreamError) as caught:
        other.create_token(plan_token(etl_grant(), ttl=30, metadata=METADATA))
    assert (caught.value.reason, caught.value.retryable) == ("upstream_denied", False)
    assert other.identity.accessor != first  # the 403 logged in again once before giving up


# ---------------------------------------------------------------------------------------------
# Dynamic secrets
# ---------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_database_secret_logs_in_renews_and_is_gone_after_revoke(
    bao: OpenBao, broker_vault: BrokerVault, minter: VaultMinter
) -> None:
    """A dynamic PostgreSQL login works, renews, and is dropped at once by revoke_secret."""
    secret = minter.read_secret(f"database/creds/{DB_ROLE}", ttl=120, metadata=METADATA)
    username, password = secret.data["username"], secret.data["password"]
    assert secret.lease_id.startswith(f"database/creds/{DB_ROLE}/")
    assert secret.renewable and secret.lease_duration == 60
    assert "password" not in repr(secret) and password not in repr(secret)
    with connect_as(username, password) as conn:
        assert conn.execute("SELECT current_user, 1 + 1").fetchone() == (username, 2)
    [(_, valid_until)] = pg_roles(username)
    assert valid_until is not None

    holder = bao.root().auth.token.lookup_accessor(secret.holder_accessor)["data"]
    assert holder["orphan"] is True and holder["meta"]["request_id"] == "req-123"

    renewer = hvac.Client(url=bao.url, token=secret.renew_token)
    assert renewer.sys.renew_lease(secret.lease_id, increment=90)["lease_duration"] == 90
    with pytest.raises(hvac.exceptions.Forbidden):
        renewer.read(f"database/creds/{DB_ROLE}")
    assert minter.renew_lease(secret.lease_id, 100) == 100

    minter.revoke_secret(secret)
    with pytest.raises(hvac.exceptions.Forbidden):
        renewer.auth.token.lookup_self()
    with pytest.raises(psycopg.OperationalError):
        connect_as(username, password).close()
    assert pg_roles(username) == []


@pytest.mark.integration
def test_revoking_the_holder_revokes_lease_and_renew_token(
    bao: OpenBao, broker_vault: BrokerVault, minter: VaultMinter
) -> None:
    """Revoking the holder by accessor drops the database role and kills the renew token."""
    secret = minter.read_secret(f"database/creds/{DB_ROLE}", ttl=120, metadata=METADATA)
    assert len(pg_roles(secret.data["username"])) == 1
    minter.revoke_accessor(secret.holder_accessor)
    # Vault revokes a dead token's leases in the background: wait for the DROP ROLE.
    deadline = time.monotonic() + 10
    while pg_roles(secret.data["username"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert pg_roles(secret.data["username"]) == []
    with pytest.raises(hvac.exceptions.Forbidden):
        hvac.Client(url=bao.url, token=secret.renew_token).auth.token.lookup_self()


@pytest.mark.integration
def test_failed_secret_read_leaves_no_holder_token(bao: OpenBao, minter: VaultMinter) -> None:
    """A refused read revokes the holder it made, so no token is left behind."""

    def accessors() -> set[str]:
        return set(bao.root().list("auth/token/accessors")["data"]["keys"])

    minter.identity.token()
    before = accessors()
    with pytest.raises(UpstreamError) as caught:
        minter.read_secret("secret/data/other/db", ttl=60, metadata=METADATA)
    assert (caught.value.reason, caught.value.retryable) == ("upstream_denied", False)
    assert accessors() == before


@pytest.mark.integration
def test_no_secret_reaches_any_log_record(
    broker_vault: BrokerVault, minter: VaultMinter, caplog: pytest.LogCaptureFixture
) -> None:
    """Logs from a login, a token, a dynamic secret and revocations carry none of their secrets."""
    caplog.set_level(logging.DEBUG)
    token = minter.create_token(plan_token(etl_grant(), ttl=30, metadata=METADATA))
    secret = minter.read_secret(f"database/creds/{DB_ROLE}", ttl=60, metadata=METADATA)
    minter.revoke_secret(secret)
    minter.revoke_accessor(token.accessor)
    logged = "\n".join(repr(vars(record)) for record in caplog.records)
    assert "vault login" in logged
    secret_id = broker_vault.secret_id_file.read_text(encoding="utf-8").strip()
    identity_token = minter.identity.token()
    for value in (
        token.token,
        secret.renew_token,
        secret.data["password"],
        secret_id,
        identity_token,
    ):
        assert value not in logged


# ---------------------------------------------------------------------------------------------
# Faults
# ---------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_sealed_or_stopped_vault_is_retryable_and_recovers_after_restart(tmp_path: Path) -> None:
    """Sealed or stopped OpenBao raises retryable errors; restarted, the same minter works again."""
    server = start_openbao(tmp_path / "bao")
    try:
        files = tmp_path / "files"
        vault = setup_broker(server, files)
        clock = FakeClock()
        minter = VaultMinter(vault.upstream, clock=clock, http_timeout=2.0)
        plan = plan_token(etl_grant(), ttl=60, metadata=METADATA)
        minter.check_ready()
        assert minter.create_token(plan).accessor

        server.root().sys.seal()
        for call in (minter.check_ready, lambda: minter.create_token(plan)):
            with pytest.raises(UpstreamError) as caught:
                call()
            assert (caught.value.reason, caught.value.retryable) == ("upstream_unavailable", True)

        server.stop()
        held = minter.identity.token()
        clock.advance(45)  # renewal due (2/3 of 60 s) but Vault is down: the token is kept
        assert minter.identity.token() == held
        for call in (minter.check_ready, lambda: minter.create_token(plan)):
            with pytest.raises(UpstreamError) as caught:
                call()
            assert (caught.value.reason, caught.value.retryable) == ("upstream_unavailable", True)

        server.start()
        setup_broker(server, files)  # a dev server restarts empty; new AppRole ids in the files
        minter.check_ready()
        token = minter.create_token(plan)
        looked = server.root().auth.token.lookup_accessor(token.accessor)["data"]
        assert ETL_POLICY in looked["policies"]
    finally:
        server.stop()
