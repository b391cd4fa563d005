"""The broker's real neighbours for integration tests: moto in server mode and the broker itself.

Starts `moto_server` (IAM enforcement on, see broker.dev.aws) and `luigi-creds-broker serve` as
child processes on free loopback ports (through servers.py) and writes the broker's policy file for
a test. Talks to them over HTTP only.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import ssl
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from servers import DevIssuer, ManagedProcess, free_port, start_dev_issuer, start_process

from broker.audit import open_store
from broker.audit.events import AuditEvent, Outcome
from broker.dev.aws import Allow, AwsKeys, MotoServer
from broker.dev.aws import start_moto as start_moto_server
from broker.dev.issuer import SigningKey

# The role a test's grant assumes unless it asks for less: S3 only, on any bucket. Tests of
# scoping create roles with narrower policies (tests/test_aws_enforced.py).
ANY_S3 = Allow(("s3:*",), ("arn:aws:s3:::*",))


@dataclass
class Moto:
    """moto with IAM enforcement on (broker.dev.aws): unknown keys, wrong session tokens and
    requests outside the caller's policies are refused."""

    server: MotoServer

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def process(self) -> ManagedProcess:
        return self.server.process

    @property
    def broker_env(self) -> dict[str, str]:
        """The environment a broker signs its STS calls with: its own IAM user's key."""
        return self.server.broker.env()

    def client(self, service: str, **creds: str) -> Any:
        """A client signing with minted `creds` (AccessKeyId, ...), else as the administrator."""
        if not creds:
            return self.server.client(service)
        keys = AwsKeys(creds["AccessKeyId"], creds["SecretAccessKey"])
        return self.server.client(service, keys, creds.get("SessionToken"))

    def create_role(
        self,
        name: str,
        allow: Sequence[Allow] = (ANY_S3,),
        *,
        trusted: str | None = None,
        external_id: str | None = None,
    ) -> str:
        """A role the broker may assume (trust names its user) with `allow` as permissions."""
        return self.server.create_role(name, allow, trusted=trusted, external_id=external_id)

    def stop(self) -> None:
        self.server.stop()


def start_moto(workdir: Path) -> Moto:
    return Moto(start_moto_server(workdir / "moto.log"))


def policy_toml(
    *,
    issuer_url: str,
    audit_db: Path | str,
    listen: str,
    moto_url: str,
    role_arn: str,
    extra: str = "",
    broker_extra: str = "",
    issuer_extra: str = "",
) -> str:
    """A policy file for the GitLab-shaped dev token: one AWS grant bound to the project id.

    `audit_db` is an SQLite file, or a postgresql:// URL; `extra` is appended TOML;
    `issuer_extra` goes into the issuer's table (e.g. `require_dpop = true`).
    """
    store = audit_db if isinstance(audit_db, str) else f"sqlite:///{audit_db}"
    if store.startswith("postgresql://") and "audit_key_file" not in broker_extra:
        # Replicas on one database sign checkpoints with one key; serve refuses to start on
        # PostgreSQL without one. Keyed by database name, so every replica of a test shares it.
        key = Path(tempfile.gettempdir()) / "luigi-creds-test-keys" / f"{store.rsplit('/', 1)[-1]}"
        broker_extra += f'\naudit_key_file = "{key}.ed25519"'
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
        {issuer_extra}

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


def exchange_form(subject_token: str, grant: str = "etl-writer", **extra: str) -> dict[str, str]:
    """The form of POST /v1/token exchanging a CI token for `grant`."""
    return {
        "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
        "subject_token": subject_token,
        "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
        "audience": grant,
        **extra,
    }


def refresh_form(handle: str, grant: str = "etl-writer", **extra: str) -> dict[str, str]:
    """The form of POST /v1/token refreshing a session for `grant`."""
    return {"grant_type": "refresh_token", "refresh_token": handle, "audience": grant, **extra}


@dataclass
class Broker:
    process: ManagedProcess
    url: str
    config_path: Path
    # Trust for an https:// broker (the test CA); None for plain loopback HTTP.
    tls: ssl.SSLContext | None = None

    def token(
        self, form: Mapping[str, str], headers: Mapping[str, str] | None = None
    ) -> tuple[int, dict[str, Any], Mapping[str, str]]:
        """POST /v1/token; returns status, JSON body and headers (errors included)."""
        data = urllib.parse.urlencode(form).encode("ascii")
        return self.post_raw("/v1/token", data, headers=headers)

    def post_raw(
        self,
        path: str,
        data: bytes,
        content_type: str = "application/x-www-form-urlencoded",
        headers: Mapping[str, str] | None = None,
    ) -> tuple[int, dict[str, Any], Mapping[str, str]]:
        request = urllib.request.Request(
            self.url + path,
            data=data,
            headers={"Content-Type": content_type, **(headers or {})},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=30, context=self.tls) as response:
                raw = response.read()
                return response.status, json.loads(raw) if raw else {}, response.headers
        except urllib.error.HTTPError as exc:
            body = exc.read()
            return exc.code, json.loads(body) if body else {}, exc.headers

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=30, context=self.tls) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def exchange(self, subject_token: str, grant: str = "etl-writer", **extra: str) -> Any:
        return self.token(exchange_form(subject_token, grant, **extra))

    def refresh(self, handle: str, grant: str = "etl-writer", **extra: str) -> Any:
        return self.token(refresh_form(handle, grant, **extra))

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
    workdir: Path,
    config_text: str,
    *,
    env: Mapping[str, str] | None = None,
    ca_file: Path | None = None,
) -> Broker:
    """Run `luigi-creds-broker serve` for `config_text` (its `listen` must be a free port).

    A broker with AWS grants needs `env=moto.broker_env`: moto refuses any other key. A broker
    whose config serves TLS needs `ca_file`, the CA its certificate chains to: it is then
    reached (and its readiness checked) over https, verifying that chain.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "broker.toml"
    config_path.write_text(config_text, encoding="utf-8")
    listen = next(
        line.split("=", 1)[1].strip().strip('"')
        for line in config_text.splitlines()
        if line.strip().startswith("listen")
    )
    tls = ssl.create_default_context(cafile=str(ca_file)) if ca_file is not None else None
    url = f"{'https' if tls else 'http'}://{listen}"

    def ready() -> bool:
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=2, context=tls) as response:
                return int(response.status) == 200
        except OSError:
            return False

    process = start_process(
        [sys.executable, "-m", "broker", "serve", "--config", str(config_path)],
        log_path=workdir / "broker.log",
        ready=ready,
        env=env,
    )
    return Broker(process, url, config_path, tls)


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


def tally_counts(audit_db: Path) -> Counter[tuple[str, str, str]]:
    """(kind, outcome, reason) -> how many unauthenticated refusals the `tallied` records count."""
    counts: Counter[tuple[str, str, str]] = Counter()
    for event in audit_events(audit_db):
        if event.outcome == Outcome.TALLIED:
            for entry in event.detail["counts"]:
                counts[(entry["kind"], entry["outcome"], entry["reason"])] += entry["count"]
    return counts


def wait_tallied(
    audit_db: Path, before: Counter[tuple[str, str, str]], kind: str, reason: str | None
) -> Counter[tuple[str, str, str]]:
    """Wait (a few tally windows) until the tallies count one more refusal of `kind` with
    `reason` (any reason if None) than `before`; return the new counts' increase."""
    deadline = time.monotonic() + 10
    while True:
        grown = tally_counts(audit_db) - before
        if any(k[0] == kind and (reason is None or k[2] == reason) for k in grown):
            return grown
        assert time.monotonic() < deadline, f"no {kind} refusal {reason} tallied"
        time.sleep(0.2)


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

    def tallies(self) -> Counter[tuple[str, str, str]]:
        return tally_counts(self.audit_db)

    def assert_tallied(
        self, request_id: str, before: Counter[tuple[str, str, str]], reason: str | None
    ) -> Counter[tuple[str, str, str]]:
        """An unauthenticated refusal: no record of its own, counted in a `tallied` record."""
        assert self.events_for(request_id) == []
        return wait_tallied(self.audit_db, before, "exchange", reason)

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
        # Unauthenticated refusals are tallied; a short window lets tests see them soon.
        broker_extra='denial_tally_seconds = "1s"',
    ).replace('jwks_refetch_cooldown = "1s"', 'jwks_refetch_cooldown = "1s"\n' + issuer_extra)
    broker = start_broker(workdir, config, env=moto.broker_env)
    return Stack(issuer, moto, broker, audit_db, workdir, role_arn)
