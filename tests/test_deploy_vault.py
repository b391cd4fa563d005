"""deploy/vault: broker.hcl names every path the broker uses; the AppRole setup script runs
against a real OpenBao and the broker mints, renews and revokes with what it creates."""

from __future__ import annotations

import datetime as dt
import os
import re
import stat
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path

import hvac
import hvac.exceptions
import pytest

from broker.config import GrantConfig, VaultGrant
from broker.config_lint import parse_config
from broker.dev.harness import pg_url
from broker.dev.vault import BAO, DB_ROLE, OpenBao, enable_database, start_openbao
from broker.mint import UpstreamError
from broker.mint.vault import VaultMinter, plan_token

with warnings.catch_warnings():
    # Luigi warns on import unless a luigi.cfg sets [core] autoload_range (ours do; the test
    # process has none), and pytest turns warnings into errors.
    warnings.simplefilter("ignore", DeprecationWarning)


from deploy_files import (
    DEPLOY,
)

VAULT_PATHS = (
    "auth/token/create/luigi-creds",
    "auth/token/create/luigi-creds-orphan",
    "auth/token/create-orphan",
    "auth/token/create",
    "sys/leases/renew",
    "sys/leases/revoke",
    "auth/token/revoke-accessor",
    "auth/token/lookup-accessor",
    "auth/token/roles/luigi-creds",
    "auth/token/roles/luigi-creds-orphan",
    "database/creds/*",
)


def test_vault_policy_names_every_path_the_broker_uses() -> None:
    """broker.hcl grants each path the broker calls, and the setup script names the settings."""
    hcl = (DEPLOY / "vault" / "broker.hcl").read_text(encoding="utf-8")
    declared = re.findall(r'^path "([^"]+)"', hcl, re.M)
    assert sorted(declared) == sorted(VAULT_PATHS)
    capabilities = re.findall(r"capabilities = \[([^\]]*)\]", hcl)
    assert len(capabilities) == len(VAULT_PATHS)
    for granted in capabilities:
        assert set(re.findall(r'"(\w+)"', granted)) <= {"read", "update"}, granted
    script = (DEPLOY / "vault" / "approle-setup.sh").read_text(encoding="utf-8")
    for setting in (
        "secret_id_ttl",
        "token_ttl",
        "token_max_ttl",
        "secret_id_bound_cidrs",
        "token_bound_cidrs",
        "allowed_policies",
    ):
        assert f"{setting}=" in script, setting
    subprocess.run(["bash", "-n", str(DEPLOY / "vault" / "approle-setup.sh")], check=True)


@pytest.fixture
def openbao(tmp_path: Path) -> Iterator[OpenBao]:
    server = start_openbao(tmp_path / "openbao")
    try:
        yield server
    finally:
        server.stop()


def run_approle_setup(bao: OpenBao, out_dir: Path, home: Path) -> str:
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(home),
        "VAULT_CLI": BAO,
        "VAULT_ADDR": bao.url,
        "VAULT_TOKEN": bao.root_token,
        "BROKER_CIDRS": "127.0.0.1/32",
        "GRANT_POLICIES": "etl-read",
        "OUT_DIR": str(out_dir),
        "TOKEN_TTL": "5m",
        "TOKEN_MAX_TTL": "1h",
    }
    result = subprocess.run(
        ["bash", str(DEPLOY / "vault" / "approle-setup.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.integration
def test_approle_setup_creates_a_bound_approle_with_0600_files(
    openbao: OpenBao, tmp_path: Path
) -> None:
    """The setup script is idempotent, binds the AppRole to CIDRs, and writes 0600 id files."""
    out = tmp_path / "out"
    run_approle_setup(openbao, out, tmp_path)
    run_approle_setup(openbao, out, tmp_path)
    for name in ("vault-role-id", "vault-secret-id"):
        mode = stat.S_IMODE((out / name).stat().st_mode)
        assert mode == 0o600, f"{name}: {oct(mode)}"
        assert (out / name).read_text(encoding="utf-8").strip()
    role = openbao.root().read("auth/approle/role/luigi-creds-broker")["data"]
    assert role["token_policies"] == ["luigi-creds-broker", "luigi-creds-lease-renew"]
    # OpenBao normalises a /32 token binding to the bare address.
    assert role["token_bound_cidrs"] in (["127.0.0.1"], ["127.0.0.1/32"])
    assert role["secret_id_bound_cidrs"] in (["127.0.0.1"], ["127.0.0.1/32"])
    assert role["secret_id_ttl"] == 720 * 3600
    assert (role["token_ttl"], role["token_max_ttl"]) == (300, 3600)
    for name, orphan in (("luigi-creds", False), ("luigi-creds-orphan", True)):
        token_role = openbao.root().read(f"auth/token/roles/{name}")["data"]
        assert token_role["allowed_policies"] == ["etl-read"]
        assert token_role["orphan"] is orphan


def etl_vault_grant(*policies: str, orphan: bool = False) -> GrantConfig:
    return GrantConfig(
        name="etl-vault",
        issuers=("gitlab",),
        match={"project_id": "4211"},
        ttl=300,
        vault=VaultGrant(token_policies=policies, orphan=orphan),
    )


@pytest.mark.integration
def test_broker_mints_renews_and_revokes_with_the_shipped_policy(
    openbao: OpenBao, tmp_path: Path
) -> None:
    """With broker.hcl and the AppRole from the script, the broker mints tokens and database
    logins, renews and revokes them, and can do nothing beyond that."""
    enable_database(openbao, pg_url())
    out = tmp_path / "out"
    run_approle_setup(openbao, out, tmp_path)
    config = parse_config(
        f"""
[[issuer]]
name = "gitlab"
url = "https://gitlab.example.com"
audiences = ["https://luigi-creds.example.com"]

[upstream.vault]
url = "{openbao.url}"
auth = "approle"
role_id_file = "{out / "vault-role-id"}"
secret_id_file = "{out / "vault-secret-id"}"
"""
    )
    assert config.vault is not None
    minter = VaultMinter(config.vault, clock=lambda: dt.datetime.now(dt.UTC))
    metadata = {"request_id": "deploy-test"}

    token = minter.create_token(plan_token(etl_vault_grant("etl-read"), ttl=300, metadata=metadata))
    assert set(token.policies) == {"default", "etl-read"}
    orphan = minter.create_token(
        plan_token(etl_vault_grant("etl-read", orphan=True), ttl=300, metadata=metadata)
    )
    root = openbao.root()
    assert root.auth.token.lookup_accessor(orphan.accessor)["data"]["orphan"] is True
    with pytest.raises(UpstreamError):
        minter.create_token(plan_token(etl_vault_grant("admin"), ttl=300, metadata=metadata))

    secret = minter.read_secret(f"database/creds/{DB_ROLE}", ttl=120, metadata=metadata)
    assert minter.renew_lease(secret.lease_id, 90) == 90
    renewer = hvac.Client(url=openbao.url, token=secret.renew_token)
    assert renewer.sys.renew_lease(secret.lease_id, increment=80)["lease_duration"] == 80
    # The renew token carries lease-renew.hcl alone (no `default`): it cannot even look itself up.
    assert root.auth.token.lookup(secret.renew_token)["data"]["policies"] == [
        "luigi-creds-lease-renew"
    ]
    with pytest.raises(hvac.exceptions.Forbidden):
        renewer.auth.token.lookup_self()
    with pytest.raises(hvac.exceptions.Forbidden):
        renewer.write("cubbyhole/x", value="y")

    # The broker's own login: lookup by accessor works; it cannot copy itself or read secrets.
    login = hvac.Client(url=openbao.url, token=minter.identity.token())
    assert login.auth.token.lookup_accessor(token.accessor)["data"]["policies"] == [
        "default",
        "etl-read",
    ]
    for policies in (None, ["luigi-creds-broker"], ["default", "luigi-creds-broker"]):
        with pytest.raises(hvac.exceptions.Forbidden):
            login.auth.token.create(policies=policies, ttl="60s")
    # Renew-only children only, and only without `default`.
    for no_default in (None, False):
        with pytest.raises(hvac.exceptions.Forbidden):
            login.auth.token.create(
                policies=["luigi-creds-lease-renew"], no_default_policy=no_default, ttl="60s"
            )
    child = login.auth.token.create(
        policies=["luigi-creds-lease-renew"], no_default_policy=True, ttl="60s"
    )["auth"]
    assert child["policies"] == ["luigi-creds-lease-renew"]
    login.auth.token.revoke_accessor(child["accessor"])
    with pytest.raises(hvac.exceptions.Forbidden):
        login.read("secret/data/etl/db")

    minter.revoke_secret(secret)
    minter.revoke_accessor(token.accessor)
    minter.revoke_accessor(orphan.accessor)
    with pytest.raises(hvac.exceptions.Forbidden):
        renewer.auth.token.lookup_self()
    with pytest.raises(hvac.exceptions.InvalidRequest):
        root.auth.token.lookup_accessor(token.accessor)
