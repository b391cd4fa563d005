"""The harness that drives a broker and its real neighbours as child processes, for the
integration tests and the benchmarks (one harness, so a benchmark runs what the tests run).

Starts, on free loopback ports: the local OIDC issuer (`python -m broker.dev.issuer`), moto in
server mode with IAM enforcement on (broker.dev.aws) and `luigi-creds-broker serve` on a policy
file written for the run (`policy_toml`); creates a uniquely named database on the test
PostgreSQL. Talks to them over HTTP (and PostgreSQL) only. The generic process pieces (free
ports, starting a child and waiting until it is ready) are broker.dev.processes.
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
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from typing import Any

import psycopg

from broker.dev.aws import Allow, AwsKeys, MotoServer
from broker.dev.aws import start_moto as start_moto_server
from broker.dev.policy_file import GITLAB, broker_table, dev_issuer, etl_writer_grant, upstream_aws
from broker.dev.processes import ManagedProcess, start_process
from broker.dev.stack import DEFAULT_PG, PG_ENV
from broker.protocol import GRANT_TYPE_REFRESH, GRANT_TYPE_TOKEN_EXCHANGE, SUBJECT_TOKEN_TYPE_JWT

# Children run from the checkout so `python -m broker...` imports this tree's code.
REPO_ROOT = Path(__file__).resolve().parents[2]


def pg_url() -> str:
    """The test PostgreSQL: $LUIGI_CREDS_TEST_PG, else the local default."""
    return os.environ.get(PG_ENV, DEFAULT_PG)


class DevIssuer:
    """Handle on a running `python -m broker.dev.issuer` process, driven over its HTTP API."""

    def __init__(self, process: ManagedProcess, url: str) -> None:
        self.process = process
        self.url = url

    def _post(self, path: str, body: Mapping[str, object]) -> dict[str, object]:
        request = urllib.request.Request(
            self.url + path,
            data=json.dumps(body).encode("utf-8"),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            result: dict[str, object] = json.load(response)
            return result

    def mint(
        self,
        preset: str = "gitlab",
        *,
        audience: str | list[str] = "luigi-creds",
        alg: str = "RS256",
        ttl: int = 300,
        header: Mapping[str, object] | None = None,
        claims: Mapping[str, object] | None = None,
        **claim_overrides: object,
    ) -> str:
        """A token of `preset` signed by the active `alg` key; a claim set to None is removed."""
        body = {
            "preset": preset,
            "audience": audience,
            "alg": alg,
            "ttl": ttl,
            "header": dict(header or {}),
            "claims": {**(claims or {}), **claim_overrides},
        }
        return str(self._post("/token", body)["token"])

    def rotate(self, alg: str = "RS256", *, drop_old: bool = False) -> str:
        """Publish a new active key for `alg` and return its kid."""
        return str(self._post("/rotate", {"alg": alg, "drop_old": drop_old})["kid"])

    def set_faults(self, *, jwks: str | None = None, discovery: str | None = None) -> None:
        """Make /jwks or discovery misbehave: ok, html, bad_json, 500, slow or redirect."""
        faults = {k: v for k, v in {"jwks": jwks, "discovery": discovery}.items() if v}
        self._post("/faults", faults)

    def stats(self) -> dict[str, int]:
        with urllib.request.urlopen(self.url + "/stats", timeout=10) as response:
            return {str(k): int(v) for k, v in json.load(response).items()}

    def stop(self) -> int:
        return self.process.stop()


def _announced_url(log_path: Path) -> str | None:
    try:
        lines = log_path.read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return None
    for line in lines:
        if line.startswith('{"issuer"'):
            return str(json.loads(line)["issuer"])
    return None


def start_dev_issuer(
    workdir: Path, *, algs: str = "RS256,ES256", issuer_url: str | None = None
) -> DevIssuer:
    """Start the local OIDC issuer on a free loopback port; keys and log live under `workdir`."""
    log_path = workdir / "dev-issuer.log"
    restarts = 1
    while log_path.exists():  # a restart in the same dir must not read the old announcement
        restarts += 1
        log_path = workdir / f"dev-issuer-{restarts}.log"
    argv = [
        sys.executable,
        "-m",
        "broker.dev.issuer",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--state-dir",
        str(workdir / "dev-issuer-state"),
        "--algs",
        algs,
    ]
    if issuer_url is not None:
        argv += ["--issuer-url", issuer_url]
    process = start_process(
        argv,
        log_path=log_path,
        ready=lambda: _announced_url(log_path) is not None,
        cwd=REPO_ROOT,
    )
    url = _announced_url(log_path)
    assert url is not None
    return DevIssuer(process, url)


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
    grant_ttl: str = "15m",
) -> str:
    """A policy file for the GitLab-shaped dev token: one AWS grant bound to the project id
    (its credentials live `grant_ttl` seconds).

    `audit_db` is an SQLite file, or a postgresql:// URL; `extra` is appended TOML;
    `issuer_extra` goes into the issuer's table (e.g. `require_dpop = true`).
    """
    store = audit_db if isinstance(audit_db, str) else f"sqlite:///{audit_db}"
    if store.startswith("postgresql://") and "audit_key_file" not in broker_extra:
        # Replicas on one database sign checkpoints with one key; serve refuses to start on
        # PostgreSQL without one. Keyed by database name, so every replica of a test shares it.
        key = Path(tempfile.gettempdir()) / "luigi-creds-test-keys" / f"{store.rsplit('/', 1)[-1]}"
        broker_extra += f'\naudit_key_file = "{key}.ed25519"'
    head = "\n".join(
        (
            broker_table(listen, store, leeway="30s") + broker_extra + "\n",
            dev_issuer(issuer_url, jwks_refetch_cooldown="1s") + issuer_extra + "\n",
            etl_writer_grant(
                issuer=GITLAB, role_arn=role_arn, session_name="{project_path}", ttl=grant_ttl
            ),
            upstream_aws(moto_url),
        )
    )
    return head + textwrap.dedent(extra)


def exchange_form(subject_token: str, grant: str = "etl-writer", **extra: str) -> dict[str, str]:
    """The form of POST /v1/token exchanging a CI token for `grant`."""
    return {
        "grant_type": GRANT_TYPE_TOKEN_EXCHANGE,
        "subject_token": subject_token,
        "subject_token_type": SUBJECT_TOKEN_TYPE_JWT,
        "audience": grant,
        **extra,
    }


def refresh_form(handle: str, grant: str = "etl-writer", **extra: str) -> dict[str, str]:
    """The form of POST /v1/token refreshing a session for `grant`."""
    return {"grant_type": GRANT_TYPE_REFRESH, "refresh_token": handle, "audience": grant, **extra}


def run_broker_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run `luigi-creds-broker ARGS` from the checkout to its end; its output is captured."""
    return subprocess.run(
        [sys.executable, "-m", "broker", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=REPO_ROOT,
    )


@dataclass
class Broker:
    process: ManagedProcess
    url: str
    config_path: Path
    # Trust for an https:// broker (the test CA); None for plain loopback HTTP.
    tls: ssl.SSLContext | None = None

    def token(
        self, form: Mapping[str, str], headers: Mapping[str, str] | None = None
    ) -> tuple[int, dict[str, Any], Message[str, str]]:
        """POST /v1/token; returns status, JSON body and headers (errors included)."""
        data = urllib.parse.urlencode(form).encode("ascii")
        return self.post_raw("/v1/token", data, headers=headers)

    def post_raw(
        self,
        path: str,
        data: bytes,
        content_type: str = "application/x-www-form-urlencoded",
        headers: Mapping[str, str] | None = None,
    ) -> tuple[int, dict[str, Any], Message[str, str]]:
        request = urllib.request.Request(
            self.url + path,
            data=data,
            headers={"Content-Type": content_type, **(headers or {})},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=30, context=self.tls) as response:
                raw = response.read()
                answer: dict[str, Any] = json.loads(raw) if raw else {}
                return response.status, answer, response.headers
        except urllib.error.HTTPError as exc:
            body = exc.read()
            error: dict[str, Any] = json.loads(body) if body else {}
            return exc.code, error, exc.headers

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
        return run_broker_cli(*args, "--config", str(self.config_path))

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


@contextlib.contextmanager
def fresh_pg_database(prefix: str) -> Iterator[str]:
    """A uniquely named database on the test PostgreSQL, dropped afterwards; yields its URL."""
    admin_url = pg_url()
    name = f"{prefix}_{secrets.token_hex(4)}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield admin_url.rsplit("/", 1)[0] + "/" + name
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
