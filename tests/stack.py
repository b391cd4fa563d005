"""The broker's real neighbours for integration tests: moto in server mode and the broker itself.

Starts `moto_server` and `luigi-creds-broker serve` as child processes on free loopback ports
(through servers.py) and writes the broker's policy file for a test. Talks to them over HTTP only.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import sys
import textwrap
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import psycopg
from servers import DevIssuer, ManagedProcess, free_port, start_dev_issuer, start_process

from broker.audit import open_store
from broker.audit.events import AuditEvent
from broker.dev.issuer import SigningKey

# moto accepts any credentials; these names only make boto3 sign requests.
MOTO_ENV = {
    "AWS_ACCESS_KEY_ID": "testing-broker",
    "AWS_SECRET_ACCESS_KEY": "testing-broker-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}
ACCOUNT = "123456789012"
TRUST_POLICY = json.dumps(
    {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT}:root"},
                "Action": ["sts:AssumeRole", "sts:TagSession", "sts:SetSourceIdentity"],
            }
        ],
    }
)


@dataclass
class Moto:
    process: ManagedProcess
    url: str

    def client(self, service: str, **creds: str) -> Any:
        return boto3.session.Session(
            aws_access_key_id=creds.get("AccessKeyId", MOTO_ENV["AWS_ACCESS_KEY_ID"]),
            aws_secret_access_key=creds.get("SecretAccessKey", MOTO_ENV["AWS_SECRET_ACCESS_KEY"]),
            aws_session_token=creds.get("SessionToken"),
            region_name="us-east-1",
        ).client(service, endpoint_url=self.url)

    def create_role(self, name: str) -> str:
        iam = self.client("iam")
        role = iam.create_role(RoleName=name, AssumeRolePolicyDocument=TRUST_POLICY)
        return str(role["Role"]["Arn"])

    def stop(self) -> None:
        self.process.stop()


def start_moto(workdir: Path) -> Moto:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = start_process(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        log_path=workdir / "moto.log",
        ready_url=url + "/moto-api/",
        env=MOTO_ENV,
    )
    return Moto(process, url)


def policy_toml(
    *,
    issuer_url: str,
    audit_db: Path | str,
    listen: str,
    moto_url: str,
    role_arn: str,
    extra: str = "",
    broker_extra: str = "",
) -> str:
    """A policy file for the GitLab-shaped dev token: one AWS grant bound to the project id.

    `audit_db` is an SQLite file, or a postgresql:// URL; `extra` is appended TOML.
    """
    store = audit_db if isinstance(audit_db, str) else f"sqlite:///{audit_db}"
    return textwrap.dedent(
        f"""
        [broker]
        listen = "{listen}"
        audit_store = "{store}"
        leeway = "30s"
        {broker_extra}

        [[issuer]]
        name = "gitlab"
        url = "{issuer_url}"
        audiences = ["luigi-creds"]
        algorithms = ["RS256", "ES256"]
        jwks_refetch_cooldown = "1s"

        [[grant]]
        name = "etl-writer"
        issuers = ["gitlab"]
        ttl = "15m"
        [grant.match]
        project_id = "55235664"
        ref_protected = "true"
        ref = ["main", "release/*"]
        [grant.aws]
        role_arn = "{role_arn}"
        session_name = "{{project_path}}"
        session_tags = {{ project = "{{project_path}}", pipeline = "{{pipeline_id}}" }}
        source_identity = "{{user_login}}"

        [upstream.aws]
        region = "us-east-1"
        endpoint_url = "{moto_url}"
        """
    ) + textwrap.dedent(extra)


@dataclass
class Broker:
    process: ManagedProcess
    url: str
    config_path: Path

    def token(self, form: Mapping[str, str]) -> tuple[int, dict[str, Any], Mapping[str, str]]:
        """POST /v1/token; returns status, JSON body and headers (errors included)."""
        data = urllib.parse.urlencode(form).encode("ascii")
        return self.post_raw("/v1/token", data)

    def post_raw(
        self,
        path: str,
        data: bytes,
        content_type: str = "application/x-www-form-urlencoded",
    ) -> tuple[int, dict[str, Any], Mapping[str, str]]:
        request = urllib.request.Request(
            self.url + path, data=data, headers={"Content-Type": content_type}, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                raw = response.read()
                return response.status, json.loads(raw) if raw else {}, response.headers
        except urllib.error.HTTPError as exc:
            body = exc.read()
            return exc.code, json.loads(body) if body else {}, exc.headers

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=30) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def exchange(self, subject_token: str, grant: str = "etl-writer", **extra: str) -> Any:
        return self.token(
            {
                "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
                "subject_token": subject_token,
                "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
                "audience": grant,
                **extra,
            }
        )

    def refresh(self, handle: str, grant: str = "etl-writer", **extra: str) -> Any:
        return self.token(
            {"grant_type": "refresh_token", "refresh_token": handle, "audience": grant, **extra}
        )

    def revoke(self, handle: str) -> Any:
        data = urllib.parse.urlencode({"token": handle, "token_type_hint": "refresh_token"})
        return self.post_raw("/v1/revoke", data.encode("ascii"))

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run `luigi-creds-broker ARGS --config <this broker's file>`."""
        return subprocess.run(
            [sys.executable, "-m", "broker", *args, "--config", str(self.config_path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def stop(self) -> None:
        self.process.stop()


def start_broker(
    workdir: Path, config_text: str, *, env: Mapping[str, str] | None = None
) -> Broker:
    """Run `luigi-creds-broker serve` for `config_text` (its `listen` must be a free port)."""
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "broker.toml"
    config_path.write_text(config_text, encoding="utf-8")
    listen = next(
        line.split("=", 1)[1].strip().strip('"')
        for line in config_text.splitlines()
        if line.strip().startswith("listen")
    )
    url = f"http://{listen}"
    process = start_process(
        [sys.executable, "-m", "broker", "serve", "--config", str(config_path)],
        log_path=workdir / "broker.log",
        ready_url=url + "/healthz",
        env={**MOTO_ENV, **(env or {})},
    )
    return Broker(process, url, config_path)


PG_URL = os.environ.get("LUIGI_CREDS_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


@contextlib.contextmanager
def fresh_pg_database(prefix: str) -> Iterator[str]:
    """A uniquely named database on the test PostgreSQL, dropped afterwards; yields its URL."""
    name = f"{prefix}_{secrets.token_hex(4)}"
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield PG_URL.rsplit("/", 1)[0] + "/" + name
    finally:
        with psycopg.connect(PG_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def audit_events(audit_db: Path) -> list[AuditEvent]:
    """Every record of an SQLite audit store, read through the ledger."""
    store = open_store(f"sqlite:///{audit_db}")
    try:
        return list(store.events())
    finally:
        store.close()


@dataclass
class Stack:
    issuer: DevIssuer
    moto: Moto
    broker: Broker
    audit_db: Path
    workdir: Path
    role_arn: str

    def events(self) -> list[AuditEvent]:
        return audit_events(self.audit_db)

    def events_for(self, request_id: str) -> list[AuditEvent]:
        return [e for e in self.events() if e.request_id == request_id]

    def issuer_key(self, alg: str = "RS256") -> SigningKey:
        """The issuer's active private key, read from its state dir (generated at test time)."""
        entries = json.loads(
            (self.workdir / "dev-issuer-state" / "signing-keys.json").read_text("utf-8")
        )
        return [SigningKey.from_json(e) for e in entries if e["alg"] == alg][-1]

    def stop(self) -> None:
        self.broker.stop()
        self.moto.stop()
        self.issuer.stop()


def start_stack(workdir: Path, *, issuer_extra: str = "") -> Stack:
    """Dev issuer + moto (with role etl-writer) + a broker on the policy_toml policy;
    `issuer_extra` is TOML added to the issuer table (e.g. `require_jti = false`)."""
    issuer = start_dev_issuer(workdir)
    moto = start_moto(workdir)
    role_arn = moto.create_role("etl-writer")
    audit_db = workdir / "audit.db"
    config = policy_toml(
        issuer_url=issuer.url,
        audit_db=audit_db,
        listen=f"127.0.0.1:{free_port()}",
        moto_url=moto.url,
        role_arn=role_arn,
    ).replace('jwks_refetch_cooldown = "1s"', 'jwks_refetch_cooldown = "1s"\n' + issuer_extra)
    broker = start_broker(workdir, config)
    return Stack(issuer, moto, broker, audit_db, workdir, role_arn)
