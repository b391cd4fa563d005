"""The local development stack behind `luigi-creds-broker dev` and `make demo`.

Owns starting, on loopback only, the four real neighbours a broker has in production and wiring
them together: the local OIDC issuer (in-process, fresh signing keys), an OpenBao dev server set up
as an operator would (AppRole for the broker, token roles, a KV secret and the `etl-read`
policy, optionally the database engine on PostgreSQL), a moto server standing in for STS/IAM/S3,
and the broker itself (`serve`) on a generated policy with SQLite audit. Everything it writes
(signing keys, AppRole files, OpenBao's HOME with its root-token file, the audit database, logs)
lives in one private (0700) state directory that `stop()` deletes; the state file that lets
`dev token` find the running issuer holds URLs and paths only, never a secret.

Talks to OpenBao (hvac, with the dev root token, during setup only), moto (boto3), PostgreSQL
(one probe connection) and the broker's /readyz.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import stat
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TextIO

from broker.dev.aws import Allow, MotoServer, s3_objects, start_moto
from broker.dev.claims import BITBUCKET_REPOSITORY_UUID, GITHUB_REPOSITORY, GITLAB_PROJECT_ID
from broker.dev.issuer import IssuerServer, write_private_json
from broker.dev.policy_file import (
    TomlValue,
    etl_writer_grant,
    grant,
    upstream_aws,
    upstream_vault_approle,
)
from broker.dev.processes import ManagedProcess, free_port, start_process
from broker.errors import BrokerException

if TYPE_CHECKING:
    from broker.dev.vault import OpenBao

ISSUER_NAME = "dev"
AUDIENCE = "luigi-creds"
BUCKET = "luigi-creds-demo"
ROLE_NAME = "luigi-creds-dev-etl"
# The dev token's GitHub repository id (broker.dev.claims) that the github grant binds.
GITHUB_REPOSITORY_ID = "690215432"
# Where the job's CI token is read from (luigi_creds' `token_source = env:...`), like GitLab's
# `id_tokens` variable.
TOKEN_VARIABLE = "LUIGI_CREDS_ID_TOKEN"
DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/test"
PG_ENV = "LUIGI_CREDS_TEST_PG"
# moto_server imports all of moto on start: a few seconds on a slow machine, more under load.
START_TIMEOUT_SECONDS = 60.0


class DevStackError(BrokerException):
    """The dev stack could not start or is not running; the message says which part and why."""


@dataclass(frozen=True)
class DevState:
    """What a client of the running stack needs; written to the state file. Nothing secret."""

    pid: int
    state_dir: str
    config: str
    broker_url: str
    issuer_url: str
    vault_addr: str
    aws_endpoint_url: str
    bucket: str
    role_arn: str
    grants: tuple[str, ...]
    database: bool
    luigi_config: str

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DevState:
        return cls(**{**data, "grants": tuple(data["grants"])})


def default_state_file() -> Path:
    """$XDG_RUNTIME_DIR/luigi-creds-dev/state.json, else /tmp/luigi-creds-dev-<uid>/state.json."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "luigi-creds-dev" / "state.json"
    # NOTE: per-user name under /tmp; `_private_dir` refuses a directory someone else made.
    return Path(tempfile.gettempdir()) / f"luigi-creds-dev-{os.getuid()}" / "state.json"


def _private_dir(path: Path) -> None:
    """Create `path` as a 0700 directory, or accept an existing one only if it is ours."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise DevStackError(f"{path} is not a directory owned by this user")
    if info.st_mode & 0o077:
        os.chmod(path, 0o700)


def read_state(state_file: Path) -> DevState:
    """The running stack's state, or DevStackError if none is running there."""
    try:
        data = json.loads(state_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DevStackError(
            f"no dev stack is running ({state_file} not found); start one with "
            "`luigi-creds-broker dev`"
        ) from None
    except (OSError, ValueError) as exc:
        raise DevStackError(f"cannot read {state_file}: {exc}") from exc
    return DevState.from_json(data)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def postgres_url() -> str | None:
    """$LUIGI_CREDS_TEST_PG (or the local default) if a PostgreSQL answers there, else None."""
    import psycopg

    url = os.environ.get(PG_ENV, DEFAULT_PG)
    try:
        with psycopg.connect(url, connect_timeout=2):
            return url
    except psycopg.Error:
        return None


def policy_text(
    *,
    listen: str,
    state_dir: Path,
    issuer_url: str,
    moto_url: str,
    vault_url: str,
    role_arn: str,
    role_id_file: Path,
    secret_id_file: Path,
    database: bool,
) -> str:
    """The dev policy: one issuer (every preset) and grants each preset's default claims pass."""
    head = textwrap.dedent(
        f"""\
        # Generated by `luigi-creds-broker dev`; removed with its state directory at exit.
        [broker]
        listen = "{listen}"
        audit_store = "sqlite:///{state_dir / "audit.db"}"
        audit_key_file = "{state_dir / "audit-checkpoint.ed25519"}"
        audit_salt_file = "{state_dir / "audit-accessor.salt"}"
        session_max = "1h"
        leeway = "30s"

        # One local issuer signs every preset (gitlab, github, bitbucket, okta).
        [[issuer]]
        name = "{ISSUER_NAME}"
        url = "{issuer_url}"
        audiences = ["{AUDIENCE}"]
        algorithms = ["RS256", "ES256"]
        # Bitbucket's claim set has no jti; the token's sha256 is consumed once instead.
        require_jti = false
        jwks_refetch_cooldown = "1s"
        """
    )
    etl_read = {"token_policies": ["etl-read"]}
    grants = [
        "# GitLab: the ETL project's protected main branch writes to the demo bucket.\n"
        + etl_writer_grant(issuer=ISSUER_NAME, role_arn=role_arn, session_name="etl-{pipeline_id}"),
        "# GitLab: a Vault token that reads secret/etl/*.\n"
        + dev_grant("etl-vault", {"project_id": GITLAB_PROJECT_ID}, ttl="10m", vault=etl_read),
        f"# GitHub Actions: the main branch of {GITHUB_REPOSITORY}, bound by repository id.\n"
        + dev_grant(
            "gh-etl",
            {"repository_id": GITHUB_REPOSITORY_ID, "ref": "refs/heads/main"},
            ttl="15m",
            aws={"role_arn": role_arn},
        ),
        "# Bitbucket Pipelines: one repository, by its uuid.\n"
        + dev_grant(
            "bb-etl",
            {"repositoryUuid": BITBUCKET_REPOSITORY_UUID},
            ttl="15m",
            aws={"role_arn": role_arn},
        ),
        "# Okta: people in data-engineering get the ETL read token.\n"
        + dev_grant("okta-etl", {"groups": "data-engineering"}, ttl="10m", vault=etl_read),
    ]
    if database:
        grants.append(
            "# Dynamic PostgreSQL credentials from Vault's database engine"
            " (lease renewed, revoked).\n"
            + dev_grant(
                "warehouse",
                {"project_id": GITLAB_PROJECT_ID},
                ttl="5m",
                vault={"secret": "database/creds/warehouse"},
            )
        )
    upstreams = [
        upstream_aws(moto_url),
        upstream_vault_approle(vault_url, role_id_file, secret_id_file),
    ]
    return "\n".join((head, *grants, *upstreams))


def dev_grant(name: str, match: Mapping[str, TomlValue], **target: Any) -> str:
    """A grant of the dev issuer's."""
    return grant(name, match, issuers=[ISSUER_NAME], **target)


def client_config(broker_url: str, vault_addr: str) -> str:
    """The `[luigi_creds]` section a Luigi job on this machine uses; nothing in it is secret."""
    return textwrap.dedent(
        f"""\
        [luigi_creds]
        broker_url = {broker_url}
        token_source = env:{TOKEN_VARIABLE}
        vault_addr = {vault_addr}
        """
    )


def grant_names(database: bool) -> tuple[str, ...]:
    names = ("etl-writer", "etl-vault", "gh-etl", "bb-etl", "okta-etl")
    return (*names, "warehouse") if database else names


class DevStack:
    """Issuer, OpenBao, moto and broker on loopback; `start()` them, `stop()` tears all down.

    `state_dir` (default: a fresh private temp dir) is deleted by `stop()` unless `keep`.
    `say` receives one progress line per step.
    """

    def __init__(
        self,
        *,
        state_dir: Path | None = None,
        state_file: Path | None = None,
        broker_port: int = 0,
        database: bool = True,
        keep: bool = False,
        say: Callable[[str], None] = lambda line: None,
    ) -> None:
        self.state_dir = state_dir
        self.state_file = state_file
        self.broker_port = broker_port
        self.want_database = database
        self.keep = keep
        self.say = say
        self.issuer: IssuerServer | None = None
        self.bao: OpenBao | None = None
        self.moto: MotoServer | None = None
        self.broker: ManagedProcess | None = None
        self.state: DevState | None = None
        self._issuer_log: TextIO | None = None
        # A process forked from ours (a Luigi worker in the demo) must never tear the stack down.
        self._owner_pid = os.getpid()

    def __enter__(self) -> DevState:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def config_path(self) -> Path:
        assert self.state_dir is not None
        return self.state_dir / "broker.toml"

    def start(self) -> DevState:
        """Start every part and write the state file; on failure stop what started and raise."""
        # hvac is imported here, not at module level: every `luigi-creds-broker` command builds
        # the parser that imports this module.
        from broker.dev.vault import OpenBao, setup_broker

        if self.state_file is not None and self.state_file.exists():
            running = read_state(self.state_file)
            if pid_alive(running.pid):
                raise DevStackError(
                    f"a dev stack is already running (pid {running.pid}, {self.state_file})"
                )
        if self.state_dir is None:
            self.state_dir = Path(tempfile.mkdtemp(prefix="luigi-creds-dev-"))
        _private_dir(self.state_dir)
        state_dir = self.state_dir
        logs = state_dir / "logs"
        _private_dir(logs)

        self.say("starting the local OIDC issuer (fresh RS256 and ES256 keys)")
        self._issuer_log = (logs / "issuer.log").open("a", encoding="utf-8", buffering=1)
        self.issuer = IssuerServer(
            state_dir=state_dir / "issuer", log_stream=self._issuer_log
        ).start()

        self.say("starting OpenBao (dev server, random root token)")
        self.bao = OpenBao(
            workdir=state_dir / "openbao", port=free_port(), root_token=secrets.token_urlsafe(24)
        )
        self.bao.start()
        pg = postgres_url() if self.want_database else None
        if self.want_database and pg is None:
            self.say("no PostgreSQL answers; the `warehouse` database grant is left out")
        self.say(
            "configuring OpenBao: AppRole for the broker, token roles, secret/etl/db, etl-read"
            + (", database engine on PostgreSQL" if pg else "")
        )
        vault = setup_broker(self.bao, state_dir / "vault", pg_url=pg)

        self.say("starting moto (STS, IAM, S3; every request checked against IAM policies)")
        self.moto = start_moto(logs / "moto.log", timeout=START_TIMEOUT_SECONDS)
        moto_url = self.moto.url
        role_arn = self._prepare_aws(self.moto)

        port = self.broker_port or free_port()
        listen = f"127.0.0.1:{port}"
        self.config_path.write_text(
            policy_text(
                listen=listen,
                state_dir=state_dir,
                issuer_url=self.issuer.url,
                moto_url=moto_url,
                vault_url=self.bao.url,
                role_arn=role_arn,
                role_id_file=vault.role_id_file,
                secret_id_file=vault.secret_id_file,
                database=pg is not None,
            ),
            encoding="utf-8",
        )
        self.say(f"starting the broker on {listen} (SQLite audit in the state dir)")
        broker_url = f"http://{listen}"
        self.broker = start_process(
            [sys.executable, "-m", "broker", "serve", "--config", str(self.config_path)],
            log_path=logs / "broker.log",
            ready_url=broker_url + "/healthz",
            env=self.moto.broker.env(),
            timeout=START_TIMEOUT_SECONDS,
        )
        self._wait_ready(broker_url + "/readyz")
        # The broker's own AWS environment (moto-issued keys, dev only), so that admin commands
        # that call AWS as the broker (`check-config --online`) can run in it: 0600, never printed.
        broker_env = state_dir / "broker.env"
        fd = os.open(broker_env, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.writelines(f"{k}={v}\n" for k, v in self.moto.broker.env().items())
        luigi_config = state_dir / "luigi.cfg"
        luigi_config.write_text(client_config(broker_url, self.bao.url), encoding="utf-8")
        self.state = DevState(
            pid=os.getpid(),
            state_dir=str(state_dir),
            config=str(self.config_path),
            broker_url=broker_url,
            issuer_url=self.issuer.url,
            vault_addr=self.bao.url,
            aws_endpoint_url=moto_url,
            bucket=BUCKET,
            role_arn=role_arn,
            grants=grant_names(pg is not None),
            database=pg is not None,
            luigi_config=str(luigi_config),
        )
        if self.state_file is not None:
            _private_dir(self.state_file.parent)
            write_private_json(self.state_file, asdict(self.state))
        return self.state

    @staticmethod
    def _prepare_aws(moto: MotoServer) -> str:
        """The role the grants assume and the demo bucket, created in moto; returns the role ARN.

        The role may read, write and list the demo bucket and nothing else; moto refuses the rest.
        """
        role_arn = moto.create_role(
            ROLE_NAME,
            [
                s3_objects(BUCKET),
                Allow(("s3:ListBucket",), (f"arn:aws:s3:::{BUCKET}",)),
            ],
        )
        moto.client("s3").create_bucket(Bucket=BUCKET)
        return role_arn

    def _wait_ready(self, url: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while not self._ready(url):
            if self.broker is not None and not self.broker.running():
                raise DevStackError("the broker exited:\n" + self.broker.log_text()[-4000:])
            if time.monotonic() > deadline:
                raise DevStackError(f"{url} not ready within {START_TIMEOUT_SECONDS:.0f} s")
            time.sleep(0.1)

    @staticmethod
    def _ready(url: str) -> bool:
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 (loopback http)
                return int(response.status) == 200
        except (OSError, urllib.error.URLError):
            return False

    def dead_parts(self) -> list[str]:
        """Names of the child servers that have exited since start."""
        parts = {"broker": self.broker, "moto": self.moto.process if self.moto else None}
        if self.bao is not None:
            parts["openbao"] = self.bao.process
        return [name for name, p in parts.items() if p is not None and not p.running()]

    def log_tail(self, name: str, chars: int = 4000) -> str:
        """The end of a child's log ("broker", "moto" or "openbao")."""
        process = {"broker": self.broker, "moto": self.moto.process if self.moto else None}.get(
            name
        )
        if name == "openbao" and self.bao is not None:
            process = self.bao.process
        return process.log_text()[-chars:] if process is not None else ""

    def stop_broker(self) -> None:
        """Stop only the broker (SIGTERM: it signs a last audit checkpoint and exits)."""
        if self.broker is not None and os.getpid() == self._owner_pid:
            self.broker.stop()
            self.broker = None

    def stop(self) -> None:
        """Stop the broker first (it checkpoints its audit), then the rest; delete the state dir."""
        if os.getpid() != self._owner_pid:
            return
        self.stop_broker()
        if self.moto is not None:
            self.moto.stop()
            self.moto = None
        if self.bao is not None:
            self.bao.stop()
            self.bao = None
        if self.issuer is not None:
            self.issuer.stop()
            self.issuer = None
        if self._issuer_log is not None:
            self._issuer_log.close()
            self._issuer_log = None
        if self.state_file is not None and self.state is not None:
            with contextlib.suppress(DevStackError, FileNotFoundError):
                # Only our own state file: a second `dev` that failed to start leaves the
                # running stack's file alone.
                if read_state(self.state_file).pid == os.getpid():
                    self.state_file.unlink()
        if self.state_dir is not None and not self.keep:
            shutil.rmtree(self.state_dir, ignore_errors=True)
