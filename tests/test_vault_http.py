"""Vault credentials through the broker over real HTTP, end to end.

A local OIDC issuer, an OpenBao dev server (AppRole for the broker, KV, the database secrets
engine on the real PostgreSQL) and `luigi-creds-broker serve` run as child processes. Every
case goes through POST /v1/token and /v1/revoke: token grants that read only
their KV path and carry our metadata, dynamic PostgreSQL logins dropped on revoke, a 10 s token
the client keeps alive for 30 s, fail-closed minting while OpenBao is down (and recovery of the
same broker process), revocation of a credential minted but not audited, and session end revoking
everything the session minted. No issued secret may reach the broker's log or the audit database.
"""

from __future__ import annotations

import secrets
import sqlite3
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import hvac
import hvac.exceptions
import psycopg
import pytest
from stack import audit_events

from broker.audit.events import AuditEvent, Outcome
from broker.audit.key_files import hmac_ref
from broker.dev.claims import GITLAB_PROJECT_ID
from broker.dev.harness import Broker, DevIssuer, pg_url, start_broker, start_dev_issuer
from broker.dev.policy_file import broker_table, dev_issuer, grant, upstream_vault_approle
from broker.dev.processes import free_port
from broker.dev.vault import DB_ROLE, ETL_POLICY, BrokerVault, OpenBao, setup_broker, start_openbao
from luigi_creds.client import BrokerClient, VaultToken
from luigi_creds.identity import EnvTokenSource
from luigi_creds.vault import TokenKeeper

pytestmark = pytest.mark.integration

TOKEN_GRANT = "etl-vault"
SECRET_GRANT = "warehouse"
VAULT_TOKEN = "urn:luigi-creds:token-type:vault-token"
VAULT_SECRET = "urn:luigi-creds:token-type:vault-secret"
# Vault revokes a dead token's leases in the background; in these tests DROP ROLE lands well
# within this many seconds.
BACKGROUND_REVOKE_WAIT = 10.0


@dataclass
class Stack:
    issuer: DevIssuer
    bao: OpenBao
    broker: Broker
    workdir: Path
    audit_db: Path
    role_prefix: str  # every PostgreSQL role this module's OpenBao creates starts with it

    def root(self) -> hvac.Client:
        return self.bao.root()


def setup_vault(bao: OpenBao, workdir: Path, role_prefix: str) -> BrokerVault:
    """Apply the operator's setup (again after a restart: a dev server restarts empty)."""
    return setup_broker(
        bao,
        workdir / "vault-files",
        pg_url=pg_url(),
        db_username_template=role_prefix + "{{random 12}}",
    )


def broker_toml(issuer_url: str, audit_db: Path, vault: BrokerVault) -> str:
    protected = {"project_id": GITLAB_PROJECT_ID, "ref_protected": "true"}
    return "\n".join(
        (
            broker_table(f"127.0.0.1:{free_port()}", f"sqlite:///{audit_db}", leeway="30s"),
            dev_issuer(issuer_url),
            grant(
                TOKEN_GRANT,
                {**protected, "ref": ["main", "release/*"]},
                ttl="5m",
                vault={"token_policies": [ETL_POLICY]},
            ),
            grant(SECRET_GRANT, protected, ttl="2m", vault={"secret": f"database/creds/{DB_ROLE}"}),
            upstream_vault_approle(vault.upstream.url, vault.role_id_file, vault.secret_id_file),
        )
    )


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("vault-http")
    role_prefix = f"lce2e-{secrets.token_hex(3)}-"
    audit_db = workdir / "audit.db"
    issuer = start_dev_issuer(workdir)
    bao = start_openbao(workdir)
    try:
        vault = setup_vault(bao, workdir, role_prefix)
        broker = start_broker(workdir / "broker", broker_toml(issuer.url, audit_db, vault))
        try:
            yield Stack(issuer, bao, broker, workdir, audit_db, role_prefix)
        finally:
            broker.stop()
    finally:
        bao.stop()
        issuer.stop()


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def events(stack: Stack, request_id: str) -> list[AuditEvent]:
    return [e for e in audit_events(stack.audit_db) if e.request_id == request_id]


def session_events(stack: Stack, session_id: str) -> list[AuditEvent]:
    return [e for e in audit_events(stack.audit_db) if e.session_id == session_id]


def issued_event(stack: Stack, request_id: str) -> AuditEvent:
    (issued,) = [e for e in events(stack, request_id) if e.outcome == Outcome.ISSUED]
    return issued


def assert_not_leaked(stack: Stack, *values: str) -> None:
    """None of `values` appears in the broker's log or in any byte of the audit database."""
    log = stack.broker.process.log_text().encode()
    stored = b"".join(
        path.read_bytes()
        for path in stack.audit_db.parent.glob(stack.audit_db.name + "*")
        if path.is_file()
    )
    assert log and stored
    for value in values:
        assert value, "a secret to look for must not be empty"
        assert value.encode() not in log
        assert value.encode() not in stored


def revoke_lease(broker: Broker, lease_id: str, handle: str) -> tuple[int, dict[str, Any]]:
    form = {"token": lease_id, "token_type_hint": VAULT_SECRET, "refresh_token": handle}
    status, body, _ = broker.post_raw("/v1/revoke", urllib.parse.urlencode(form).encode())
    return status, body


def pg_role_names(prefix: str) -> set[str]:
    with psycopg.connect(pg_url()) as conn:
        rows = conn.execute(
            "SELECT rolname FROM pg_roles WHERE starts_with(rolname, %s)", (prefix,)
        ).fetchall()
    return {str(row[0]) for row in rows}


def pg_login(username: str, password: str) -> Any:
    """Log in as `username` and run a query; return its result (raises when login fails)."""
    location = pg_url().split("@", 1)[1]
    with psycopg.connect(
        f"postgresql://{location}", user=username, password=password, connect_timeout=5
    ) as conn:
        return conn.execute("SELECT current_user, 40 + 2").fetchone()


def login_fails(username: str, password: str) -> bool:
    try:
        pg_login(username, password)
    except psycopg.OperationalError:
        return True
    return False


def accessor_alive(root: hvac.Client, accessor: str) -> bool:
    try:
        root.auth.token.lookup_accessor(accessor)
    except hvac.exceptions.InvalidRequest:
        return False
    return True


def lease_alive(root: hvac.Client, lease_id: str) -> bool:
    try:
        root.sys.read_lease(lease_id)
    except hvac.exceptions.InvalidRequest:
        return False
    return True


def token_alive(bao: OpenBao, token: str) -> bool:
    try:
        hvac.Client(url=bao.url, token=token).auth.token.lookup_self()
    except hvac.exceptions.Forbidden:
        return False
    return True


def wait_for(condition: Callable[[], bool], timeout: float = BACKGROUND_REVOKE_WAIT) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


def secret_gone(stack: Stack, creds: dict[str, Any]) -> bool:
    """A dynamic secret's lease, PostgreSQL role and renew token are all gone."""
    username = creds["data"]["username"]
    return (
        not lease_alive(stack.root(), creds["lease_id"])
        and username not in pg_role_names(stack.role_prefix)
        and login_fails(username, creds["data"]["password"])
        and not token_alive(stack.bao, creds["renew_token"])
    )


def exchange(stack: Stack, grant: str, **extra: str) -> tuple[dict[str, Any], str]:
    """Exchange a fresh GitLab-shaped token for `grant`; return the 200 body and its handle."""
    status, body, _ = stack.broker.exchange(stack.issuer.mint("gitlab"), grant, **extra)
    assert status == 200, body
    return body, body["refresh_token"]


# ---------------------------------------------------------------------------------------------
# Token grants
# ---------------------------------------------------------------------------------------------


def test_token_grant_reads_its_kv_only_and_carries_our_metadata(stack: Stack) -> None:
    """A GitLab token becomes a Vault token that reads its KV path only and names its origin."""
    task = "Extract_2026_11_22_6c9d7d10ef"
    body, _ = exchange(stack, TOKEN_GRANT, task=task)
    assert body["issued_token_type"] == VAULT_TOKEN
    creds = body["credentials"]
    assert body["access_token"] == creds["token"]
    assert sorted(creds["policies"]) == ["default", ETL_POLICY]

    client = hvac.Client(url=stack.bao.url, token=creds["token"])
    secret = client.secrets.kv.v2.read_secret_version("etl/db", raise_on_deleted_version=True)
    assert secret["data"]["data"] == {"password": "etl-kv-value"}
    with pytest.raises(hvac.exceptions.Forbidden):
        client.secrets.kv.v2.read_secret_version("other/db", raise_on_deleted_version=True)

    issued = issued_event(stack, body["request_id"])
    looked = stack.root().auth.token.lookup_accessor(creds["accessor"])["data"]
    assert looked["meta"] == {
        "issuer": "gitlab",
        "subject": issued.subject,
        "grant": TOKEN_GRANT,
        "session": issued.session_id,
        "task": task,
        "request_id": body["request_id"],
    }
    assert issued.subject.startswith("project_path:")
    # The audit names the token by a keyed hash of its accessor, never by the token.
    assert issued.credential_ref and issued.credential_ref != creds["accessor"]
    assert_not_leaked(stack, creds["token"])


# ---------------------------------------------------------------------------------------------
# Dynamic database secrets
# ---------------------------------------------------------------------------------------------


def test_database_login_works_until_lease_revoke_and_session_revoke(stack: Stack) -> None:
    """Dynamic PostgreSQL logins work; the lease revoke drops one, the session revoke the rest."""
    first, handle = exchange(stack, SECRET_GRANT, task="Load_a")
    assert first["issued_token_type"] == VAULT_SECRET
    one = first["credentials"]
    assert one["lease_id"].startswith(f"database/creds/{DB_ROLE}/") and one["renewable"]
    status, second, _ = stack.broker.refresh(handle, SECRET_GRANT, task="Load_b")
    assert status == 200, second
    handle = second["refresh_token"]
    two = second["credentials"]

    for creds in (one, two):
        username, password = creds["data"]["username"], creds["data"]["password"]
        assert username.startswith(stack.role_prefix)
        row = pg_login(username, password)
        assert row == (username, 42)

    # The client renews its lease directly at Vault with the renew-only token it was given.
    renewer = hvac.Client(url=stack.bao.url, token=one["renew_token"])
    assert renewer.sys.renew_lease(one["lease_id"], increment=90)["lease_duration"] == 90
    with pytest.raises(hvac.exceptions.Forbidden):
        renewer.read(f"database/creds/{DB_ROLE}")
    meta = stack.root().auth.token.lookup(one["renew_token"])["data"]["meta"]
    issued = issued_event(stack, first["request_id"])
    assert (meta["session"], meta["task"]) == (issued.session_id, "Load_a")
    assert meta["request_id"] == first["request_id"]

    status, body = revoke_lease(stack.broker, one["lease_id"], handle)
    assert status == 200, body
    # The single-lease revoke waits for the engine's DROP ROLE: no polling needed.
    assert one["data"]["username"] not in pg_role_names(stack.role_prefix)
    gone = secret_gone(stack, one)
    assert gone
    row = pg_login(two["data"]["username"], two["data"]["password"])
    assert row[1] == 42

    status, body, _ = stack.broker.revoke(handle)
    assert status == 200, body
    assert wait_for(lambda: secret_gone(stack, two))
    assert_not_leaked(
        stack, *(c[k] for c in (one, two) for k in ("renew_token",)), one["data"]["password"]
    )
    assert_not_leaked(stack, two["data"]["password"], handle)


def test_renew_token_can_renew_its_lease_and_nothing_else(stack: Stack) -> None:
    """The renew_token carries only luigi-creds-lease-renew, not `default`: it extends the lease
    (Vault's answer says so) and is refused everything `default` would have allowed: looking
    itself up, its cubbyhole, response wrapping, random bytes, making tokens, reading or
    revoking secrets."""
    body, handle = exchange(stack, SECRET_GRANT, task="Renew_only")
    creds = body["credentials"]
    assert [e.outcome for e in events(stack, body["request_id"])] == [
        Outcome.INTENT,
        Outcome.ISSUED,
    ]
    looked = stack.root().auth.token.lookup(creds["renew_token"])["data"]
    assert looked["policies"] == ["luigi-creds-lease-renew"]
    assert looked["renewable"] is False and looked["num_uses"] == 0

    renewer = hvac.Client(url=stack.bao.url, token=creds["renew_token"])
    assert renewer.sys.renew_lease(creds["lease_id"], increment=70)["lease_duration"] == 70
    refused: dict[str, Callable[[], Any]] = {
        "lookup-self": renewer.auth.token.lookup_self,
        "renew-self": renewer.auth.token.renew_self,
        "cubbyhole write": lambda: renewer.write("cubbyhole/x", value="y"),
        "response wrapping": lambda: renewer.adapter.post("/v1/sys/wrapping/wrap", json={"a": 1}),
        "sys/tools/random": lambda: renewer.adapter.post("/v1/sys/tools/random/16", json={}),
        "token create": lambda: renewer.auth.token.create(ttl="60s"),
        "read secret": lambda: renewer.read(f"database/creds/{DB_ROLE}"),
        "revoke lease": lambda: renewer.sys.revoke_lease(creds["lease_id"]),
    }
    for name, call in refused.items():
        with pytest.raises(hvac.exceptions.Forbidden):
            call()
            pytest.fail(f"{name} was allowed")
    assert lease_alive(stack.root(), creds["lease_id"])
    assert stack.broker.revoke(handle)[0] == 200
    assert wait_for(lambda: secret_gone(stack, creds))


# ---------------------------------------------------------------------------------------------
# Client renewal
# ---------------------------------------------------------------------------------------------


def test_ten_second_token_kept_alive_by_the_client_for_thirty_seconds(stack: Stack) -> None:
    """BrokerClient mints a 10 s token that TokenKeeper renews through 30 s of continuous reads."""
    source = EnvTokenSource("GITLAB_ID_TOKEN", {"GITLAB_ID_TOKEN": stack.issuer.mint("gitlab")})
    with httpx.Client(timeout=30) as http:
        client = BrokerClient(stack.broker.url, source, http=http, clock=lambda: datetime.now(UTC))
        kept = client.mint(TOKEN_GRANT, task="Renew_30s", duration=10)
        control = client.mint(TOKEN_GRANT, task="Unrenewed", duration=10)
        assert isinstance(kept, VaultToken) and isinstance(control, VaultToken)
        assert kept.lease_duration <= 10 and kept.renewable

        keeper = TokenKeeper(kept, stack.bao.url, remint=None)
        keeper.start()
        try:
            # OpenBao expires the token on its own clock, so real time must pass: the loop runs
            # until at least 30 s (three lifetimes) have gone by. That is a lower bound only; a
            # slow machine makes fewer reads, and each one must still succeed.
            start, reads = time.monotonic(), 0
            while True:
                secret = keeper.client.secrets.kv.v2.read_secret_version(
                    "etl/db", raise_on_deleted_version=True
                )
                assert secret["data"]["data"]["password"] == "etl-kv-value"
                reads += 1
                if time.monotonic() - start >= 30:
                    break
                time.sleep(1)
            looked = keeper.client.auth.token.lookup_self()["data"]
        finally:
            keeper.stop()
        assert reads >= 2
        assert looked["accessor"] == kept.accessor  # renewed, never re-minted
        assert looked["last_renewal_time"] and looked["ttl"] > 0
        assert not accessor_alive(stack.root(), control.accessor)

        # The session ends: the broker revokes the renewed token although it is past the
        # expiry recorded when it was minted, and counts the expired control token as gone.
        client.revoke()
        alive = token_alive(stack.bao, kept.token)
        assert not alive
        (ended,) = [
            e
            for e in session_events(stack, issued_event(stack, kept.request_id).session_id)
            if e.kind == "session"
        ]
        assert (ended.reason, len(ended.detail["vault_revoked"])) == ("client_revoked", 2)
        assert ended.detail["vault_revoke_failed"] == []
    assert_not_leaked(stack, kept.token, control.token)


# ---------------------------------------------------------------------------------------------
# Minted but not audited
# ---------------------------------------------------------------------------------------------


def test_credential_minted_but_not_audited_is_revoked(stack: Stack) -> None:
    """When the `issued` record cannot be written, the minted token and lease die at Vault."""
    before_leases = lease_ids(stack)
    before_roles = pg_role_names(stack.role_prefix)
    with sqlite3.connect(stack.audit_db) as db:
        db.execute(
            "CREATE TRIGGER e2e_refuse_issued BEFORE INSERT ON audit_log"
            " WHEN NEW.outcome = 'issued' BEGIN SELECT RAISE(ABORT, 'refused by test'); END"
        )
    try:
        refused = []
        for grant in (TOKEN_GRANT, SECRET_GRANT):
            status, body, headers = stack.broker.exchange(stack.issuer.mint("gitlab"), grant)
            assert (status, body["error"]) == (503, "temporarily_unavailable"), body
            assert "credentials" not in body and headers["Retry-After"]
            refused.append(body["request_id"])
    finally:
        with sqlite3.connect(stack.audit_db) as db:
            db.execute("DROP TRIGGER e2e_refuse_issued")

    for request_id in refused:
        trail = events(stack, request_id)
        assert [(e.outcome, e.reason) for e in trail] == [
            (Outcome.INTENT, "minting"),
            (Outcome.ERROR, "minted_not_delivered"),
        ]
        assert trail[1].detail["revoked"] is True and trail[1].credential_ref
    # The lease really was minted (the error record names it) and is revoked now.
    lease_ref = events(stack, refused[1])[1].credential_ref
    assert lease_ref.startswith(f"database/creds/{DB_ROLE}/")
    assert not lease_alive(stack.root(), lease_ref)
    # No token carrying the refused requests' ids is left at Vault.
    root = stack.root()
    for accessor in root.list("auth/token/accessors")["data"]["keys"]:
        meta = root.auth.token.lookup_accessor(accessor)["data"].get("meta") or {}
        assert meta.get("request_id") not in refused
    assert lease_ids(stack) == before_leases
    assert pg_role_names(stack.role_prefix) == before_roles


def lease_ids(stack: Stack) -> set[str]:
    try:
        listed = stack.root().sys.list_leases(f"database/creds/{DB_ROLE}")
    except hvac.exceptions.InvalidPath:
        return set()
    return set(listed["data"]["keys"])


# ---------------------------------------------------------------------------------------------
# Session end
# ---------------------------------------------------------------------------------------------


def test_reusing_an_old_handle_revokes_every_token_and_lease_of_the_session(stack: Stack) -> None:
    """Reuse of a spent handle ends the session and revokes its tokens and dynamic secrets."""
    first, h0 = exchange(stack, TOKEN_GRANT, task="A")
    status, second, _ = stack.broker.refresh(h0, SECRET_GRANT, task="B")
    assert status == 200, second
    status, third, _ = stack.broker.refresh(second["refresh_token"], TOKEN_GRANT, task="C")
    assert status == 200, third
    tokens = [first["credentials"], third["credentials"]]
    lease = second["credentials"]
    alive = [token_alive(stack.bao, t["token"]) for t in tokens]
    assert alive == [True, True]

    status, body, _ = stack.broker.refresh(h0, TOKEN_GRANT, task="D")
    assert (status, body["error"]) == (400, "invalid_grant")
    for token in tokens:
        assert not accessor_alive(stack.root(), token["accessor"])
    assert wait_for(lambda: secret_gone(stack, lease))
    (ended,) = [e for e in events(stack, body["request_id"]) if e.reason == "reuse_detected"]
    assert len(ended.detail["vault_revoked"]) == 3 and not ended.detail["vault_revoke_failed"]


def test_accessors_and_lease_ids_are_sealed_at_rest_and_revocation_still_works(
    stack: Stack,
) -> None:
    """The store holds no Vault accessor, lease id or salt in clear; session revoke uses them."""
    first, handle = exchange(stack, TOKEN_GRANT, task="A")
    status, second, _ = stack.broker.refresh(handle, SECRET_GRANT, task="B")
    assert status == 200, second
    accessor = first["credentials"]["accessor"]
    stored = b"".join(
        path.read_bytes()
        for path in stack.audit_db.parent.glob(stack.audit_db.name + "*")
        if path.is_file()
    )
    # (A lease id is in the audit by design: Vault's own audit names it too; it revokes
    # nothing without a token allowed to, and its holder's accessor is sealed.)
    assert accessor.encode() not in stored
    renew = stack.root().auth.token.lookup(second["credentials"]["renew_token"])["data"]
    assert renew["accessor"].encode() not in stored
    salt = bytes.fromhex((stack.audit_db.parent / "audit-accessor.salt").read_text().strip())
    assert salt.hex().encode() not in stored and salt not in stored
    with sqlite3.connect(stack.audit_db) as db:
        refs = [row[0] for row in db.execute("SELECT ref FROM session_credentials")]
        meta = [row[0] for row in db.execute("SELECT key FROM audit_meta")]
    assert refs and all(ref.startswith("sealed1:") for ref in refs)
    assert "accessor_salt" not in meta
    # The audit's HMAC of the accessor is keyed by the salt file.
    assert issued_event(stack, first["request_id"]).credential_ref == hmac_ref(salt, accessor)

    session_id = issued_event(stack, first["request_id"]).session_id
    done = stack.broker.cli("sessions", "revoke", "--session", session_id)
    assert done.returncode == 0, done.stderr
    assert not accessor_alive(stack.root(), accessor)
    assert wait_for(lambda: secret_gone(stack, second["credentials"]))
    (ended,) = [e for e in session_events(stack, session_id) if e.kind == "session"]
    assert ended.detail["vault_revoked"] and not ended.detail["vault_revoke_failed"]


def test_explain_with_a_superseded_handle_is_reuse_and_ends_the_session(stack: Stack) -> None:
    """/v1/explain with a spent handle revokes the session and its Vault token like refresh."""
    first, h0 = exchange(stack, TOKEN_GRANT, task="A")
    status, second, _ = stack.broker.refresh(h0, TOKEN_GRANT, task="B")
    assert status == 200, second
    session_id = issued_event(stack, first["request_id"]).session_id
    tokens = [first["credentials"], second["credentials"]]
    assert [token_alive(stack.bao, t["token"]) for t in tokens] == [True, True]

    form = urllib.parse.urlencode({"refresh_token": h0}).encode()
    status, body, _ = stack.broker.post_raw("/v1/explain", form)
    assert (status, body["error"]) == (400, "invalid_grant")
    for token in tokens:
        assert not accessor_alive(stack.root(), token["accessor"])
    trail = [(e.kind, e.outcome, e.reason) for e in events(stack, body["request_id"])]
    assert trail == [
        ("session", Outcome.REVOKED, "reuse_detected"),
        ("explain", Outcome.DENIED, "session_reused"),
    ]
    (ended,) = [e for e in events(stack, body["request_id"]) if e.kind == "session"]
    assert ended.session_id == session_id and len(ended.detail["vault_revoked"]) == 2
    # The current handle is dead too: the thief and the job both lose the session.
    status, body, _ = stack.broker.refresh(second["refresh_token"], TOKEN_GRANT, task="C")
    assert (status, body["error"]) == (400, "invalid_grant")
    assert [e.reason for e in events(stack, body["request_id"])] == ["session_revoked"]


def test_operator_sessions_revoke_revokes_every_token_and_lease(stack: Stack) -> None:
    """`luigi-creds-broker sessions revoke` revokes the session's Vault token and lease."""
    first, handle = exchange(stack, TOKEN_GRANT, task="A")
    status, second, _ = stack.broker.refresh(handle, SECRET_GRANT, task="B")
    assert status == 200, second
    session_id = issued_event(stack, first["request_id"]).session_id

    done = stack.broker.cli("sessions", "revoke", "--session", session_id)
    assert done.returncode == 0, done.stderr
    assert "revoked 1 session(s)" in done.stdout
    assert not accessor_alive(stack.root(), first["credentials"]["accessor"])
    assert wait_for(lambda: secret_gone(stack, second["credentials"]))
    status, body, _ = stack.broker.refresh(second["refresh_token"], TOKEN_GRANT)
    assert (status, body["error"]) == (400, "invalid_grant")
    assert_not_leaked(stack, first["credentials"]["token"], second["credentials"]["renew_token"])


# ---------------------------------------------------------------------------------------------
# Vault sealed, then down (last: it restarts OpenBao)
# ---------------------------------------------------------------------------------------------


def assert_nothing_issued(stack: Stack, request_id: str) -> None:
    """The request's trail is intent(s) then one error: no credential was issued."""
    outcomes = [e.outcome for e in events(stack, request_id)]
    assert Outcome.INTENT in outcomes and Outcome.ISSUED not in outcomes
    assert outcomes[-1] == Outcome.ERROR and outcomes.count(Outcome.ERROR) == 1


def test_sealed_vault_answers_503_and_the_broker_mints_once_unsealed(stack: Stack) -> None:
    """With OpenBao sealed the exchange answers 503 and issues nothing; unsealed, it mints."""
    token = stack.issuer.mint("gitlab")
    stack.root().sys.seal()
    try:
        status, body, headers = stack.broker.exchange(token, TOKEN_GRANT, task="Sealed")
        assert (status, body["error"]) == (503, "temporarily_unavailable"), body
        assert int(headers["Retry-After"]) > 0
        assert_nothing_issued(stack, body["request_id"])
        status, ready = stack.broker.get("/readyz")
        assert status == 503 and '"vault":"fail"' in ready.replace(" ", "")
    finally:
        stack.bao.unseal()
    status, body, _ = stack.broker.exchange(token, TOKEN_GRANT, task="Unsealed")
    assert status == 200, body


# ---------------------------------------------------------------------------------------------
# Vault down (last: it restarts OpenBao)
# ---------------------------------------------------------------------------------------------


def test_vault_down_answers_503_issues_nothing_and_the_same_broker_recovers(stack: Stack) -> None:
    """With OpenBao stopped exchange and refresh answer 503; restarted, the same broker mints."""
    _, handle = exchange(stack, TOKEN_GRANT, task="Before")
    pid = stack.broker.process.pid
    stack.bao.stop()
    try:
        token = stack.issuer.mint("gitlab")
        status, body, headers = stack.broker.exchange(token, TOKEN_GRANT, task="During")
        assert (status, body["error"]) == (503, "temporarily_unavailable"), body
        assert int(headers["Retry-After"]) > 0
        refused = [body["request_id"]]
        status, body, headers = stack.broker.refresh(handle, SECRET_GRANT, task="During")
        assert (status, body["error"]) == (503, "temporarily_unavailable"), body
        assert int(headers["Retry-After"]) > 0
        refused.append(body["request_id"])
        for request_id in refused:
            assert_nothing_issued(stack, request_id)
        status, ready = stack.broker.get("/readyz")
        assert status == 503 and '"vault":"fail"' in ready.replace(" ", "")
    finally:
        stack.bao.start()
    setup_vault(stack.bao, stack.workdir, stack.role_prefix)

    # The same process, the same CI token (nothing was issued, so its jti was released) and
    # the same refresh handle (a failed refresh does not rotate it).
    status, body, _ = stack.broker.exchange(token, TOKEN_GRANT, task="After")
    assert status == 200, body
    client = hvac.Client(url=stack.bao.url, token=body["credentials"]["token"])
    assert client.secrets.kv.v2.read_secret_version("etl/db", raise_on_deleted_version=True)
    status, body, _ = stack.broker.refresh(handle, SECRET_GRANT, task="After")
    assert status == 200, body
    creds = body["credentials"]
    row = pg_login(creds["data"]["username"], creds["data"]["password"])
    assert row[1] == 42
    status, ready = stack.broker.get("/readyz")
    assert status == 200, ready
    assert stack.broker.process.pid == pid and stack.broker.process.running()
    status, _, _ = stack.broker.revoke(body["refresh_token"])
    assert status == 200
    assert wait_for(lambda: secret_gone(stack, creds))
    assert_not_leaked(stack, creds["data"]["password"], creds["renew_token"])
