"""The Luigi face: the `[luigi_creds]` config section, the job's agent, and `CredentialsMixin`.

Owns how Luigi tasks get credentials. It is the composition root for in-Luigi use: the only place
that reads Luigi's config and the process environment and builds the broker client.

How the job's session is shared (see `serve.py`): the first `CredentialsMixin` task instantiated
in a process that has no agent starts one (a loopback server holding the `BrokerClient`) and
exports `LUIGI_CREDS_AGENT_URL`/`LUIGI_CREDS_AGENT_TOKEN`. Luigi instantiates tasks in the
scheduling process before any worker forks, so every worker, `force_multiprocessing` task process
and subprocess inherits the variables and mints through the one session. Nothing live is stored
on task instances (they may be pickled): per-process state lives in module registries keyed by
task id, and the broker is contacted lazily, at the first mint. When that process exits, the
agent stops and the job's session is revoked (once, without retries), so no live refresh handle
outlives the job.

Task lifecycle: Luigi's START event mints each of `grants` with the task id. Luigi swallows event
handlers' exceptions, so a failure there is recorded and raised at the first credential use inside
`run()`, where Luigi's normal failure and retry apply. SUCCESS/FAILURE release the task's Vault
credentials and forget its state.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import ssl
import threading
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

import httpx
import luigi
import luigi.configuration

from luigi_creds.aws import aws_session as _aws_session
from luigi_creds.aws import scrub_aws_env
from luigi_creds.client import (
    AwsCredentials,
    BrokerClient,
    BrokerError,
    Credential,
    VaultSecret,
    VaultToken,
)
from luigi_creds.identity import DEFAULT_GITLAB_VARIABLE, OktaSettings, parse_token_source
from luigi_creds.refresh import Windows
from luigi_creds.serve import (
    AGENT_TOKEN_VARIABLE,
    AgentClient,
    AgentEndpoint,
    CredentialAgent,
    container_env,
)

__all__ = [
    "ClientSettings",
    "ConfigError",
    "CredentialsMixin",
    "build_broker_client",
    "ensure_agent",
    "redact",
]

log = logging.getLogger(__name__)

SECTION = "luigi_creds"
# Environment variables whose values are secrets wherever they appear.
SECRET_ENV_NAMES = frozenset(
    {
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_SECURITY_TOKEN",
        "AWS_CONTAINER_AUTHORIZATION_TOKEN",
        "VAULT_TOKEN",
        AGENT_TOKEN_VARIABLE,
        "ACTIONS_ID_TOKEN_REQUEST_TOKEN",
        "BITBUCKET_STEP_OIDC_TOKEN",
    }
)


class ConfigError(Exception):
    """`[luigi_creds]` is missing or wrong; the message lists every problem."""


@dataclass(frozen=True)
class ClientSettings:
    """`[luigi_creds]` in luigi.cfg / luigi.toml. Nothing in it is secret."""

    broker_url: str
    token_source: str
    ca_bundle: Path | None = None
    audience: str | None = None  # what the github source requests; default: broker_url
    gitlab_variable: str = DEFAULT_GITLAB_VARIABLE
    vault_addr: str | None = None  # for vault_client() and VAULT_ADDR in credential_env()
    timeout: float = 10.0  # seconds per broker request
    okta_token_endpoint: str | None = None
    okta_client_id: str | None = None
    okta_private_key_file: Path | None = None
    okta_scopes: tuple[str, ...] = ()
    okta_key_id: str | None = None

    KEYS: ClassVar[tuple[str, ...]] = (
        "broker_url",
        "token_source",
        "ca_bundle",
        "audience",
        "gitlab_variable",
        "vault_addr",
        "timeout",
        "okta_token_endpoint",
        "okta_client_id",
        "okta_private_key_file",
        "okta_scopes",
        "okta_key_id",
    )

    @classmethod
    def from_mapping(cls, raw: Mapping[str, str]) -> ClientSettings:
        """Validate a `[luigi_creds]` section; every problem is listed in one ConfigError."""
        problems = [f"unknown key {k!r}" for k in raw if k not in cls.KEYS]
        broker_url = raw.get("broker_url", "").strip()
        token_source = raw.get("token_source", "").strip()
        if not broker_url:
            problems.append("broker_url is required")
        elif not re.match(r"^https?://[^/\s]+", broker_url):
            problems.append("broker_url must be an http(s) URL")
        elif broker_url.startswith("http://") and not re.match(
            r"^http://(127\.0\.0\.1|localhost|\[::1\])(:\d+)?(/|$)", broker_url
        ):
            problems.append("broker_url must use https unless it is on loopback")
        if not token_source:
            problems.append("token_source is required")
        timeout = 10.0
        try:
            timeout = float(raw.get("timeout", "10"))
            if not 0 < timeout <= 300:
                raise ValueError
        except ValueError:
            problems.append("timeout must be a number of seconds in (0, 300]")
        if token_source == "okta":
            for key in ("okta_token_endpoint", "okta_client_id", "okta_private_key_file"):
                if not raw.get(key):
                    problems.append(f"{key} is required for token_source = okta")
        if problems:
            raise ConfigError("[luigi_creds]: " + "; ".join(problems))

        def path(key: str) -> Path | None:
            value = raw.get(key)
            return Path(value).expanduser() if value else None

        return cls(
            broker_url=broker_url.rstrip("/"),
            token_source=token_source,
            ca_bundle=path("ca_bundle"),
            audience=raw.get("audience") or None,
            gitlab_variable=raw.get("gitlab_variable") or DEFAULT_GITLAB_VARIABLE,
            vault_addr=(raw.get("vault_addr") or "").rstrip("/") or None,
            timeout=timeout,
            okta_token_endpoint=raw.get("okta_token_endpoint") or None,
            okta_client_id=raw.get("okta_client_id") or None,
            okta_private_key_file=path("okta_private_key_file"),
            okta_scopes=tuple(raw.get("okta_scopes", "").split()),
            okta_key_id=raw.get("okta_key_id") or None,
        )

    @classmethod
    def from_luigi_config(cls) -> ClientSettings:
        config = luigi.configuration.get_config()  # type: ignore[no-untyped-call]
        if not config.has_section(SECTION):
            raise ConfigError(f"luigi config has no [{SECTION}] section")
        return cls.from_mapping({k: str(v) for k, v in config.items(SECTION)})


def _utcnow() -> datetime:
    return datetime.now(UTC)


def build_broker_client(
    settings: ClientSettings,
    *,
    environ: Mapping[str, str],
    clock: Callable[[], datetime] = _utcnow,
    transport: httpx.BaseTransport | None = None,
) -> BrokerClient:
    """The composition of settings, token source and HTTP client into a BrokerClient."""
    verify: ssl.SSLContext | bool = True
    if settings.ca_bundle is not None:
        verify = ssl.create_default_context(cafile=str(settings.ca_bundle))
    # NOTE: redirects are not followed: a token POST must never be replayed elsewhere.
    http = httpx.Client(
        verify=verify, timeout=settings.timeout, follow_redirects=False, transport=transport
    )
    okta = None
    if settings.okta_token_endpoint and settings.okta_client_id and settings.okta_private_key_file:
        okta = OktaSettings(
            settings.okta_token_endpoint,
            settings.okta_client_id,
            settings.okta_private_key_file,
            settings.okta_scopes,
            settings.okta_key_id,
        )
    source = parse_token_source(
        settings.token_source,
        environ=environ,
        http=http,
        audience=settings.audience or settings.broker_url,
        clock=clock,
        gitlab_variable=settings.gitlab_variable,
        okta=okta,
    )
    return BrokerClient(settings.broker_url, source, http=http, clock=clock)


# --- the per-process job state -------------------------------------------------------------

_agent_lock = threading.Lock()
_agent: CredentialAgent | None = None
_agent_client: AgentClient | None = None
_agent_client_pid = 0
# The broker session of the agent this process started; ended when the process exits.
_broker: _LazyBroker | None = None
_broker_pid = 0
_exit_hook_registered = False


class _LazyBroker:
    """Builds the BrokerClient at the first mint, so config errors surface inside `run()`."""

    def __init__(self, factory: Callable[[], BrokerClient]) -> None:
        self._factory = factory
        self._lock = threading.Lock()
        self._client: BrokerClient | None = None

    def mint(self, grant: str, task: str | None, duration: int | None) -> Credential:
        with self._lock:
            if self._client is None:
                self._client = self._factory()
        return self._client.mint(grant, task, duration)

    def revoke(self, *, retry: bool = True) -> None:
        if self._client is not None:
            self._client.revoke(retry=retry)

    def revoke_lease(self, lease_id: str) -> None:
        client = self._client
        if client is None:
            raise BrokerError(
                "cannot revoke a Vault lease: this job has no broker session", error="invalid_grant"
            )
        client.revoke_lease(lease_id)


def _default_factory() -> BrokerClient:
    return build_broker_client(ClientSettings.from_luigi_config(), environ=os.environ)


def ensure_agent(
    factory: Callable[[], BrokerClient] | None = None,
    *,
    environ: Any = None,
) -> AgentClient:
    """Return this process's way to the job's agent, starting the agent if there is none.

    `environ` (default `os.environ`) is read for an inherited agent and, when one is started
    here, receives its variables so that forked workers and subprocesses inherit them.
    """
    global _agent, _agent_client, _agent_client_pid, _broker, _broker_pid, _exit_hook_registered
    env = os.environ if environ is None else environ
    with _agent_lock:
        endpoint = AgentEndpoint.from_env(env)
        # A forked child inherits the parent's client, whose pooled sockets it must not share.
        same_process = _agent_client_pid == os.getpid()
        if _agent_client is not None and same_process and endpoint == _agent_client.endpoint:
            return _agent_client
        if endpoint is None:
            broker = _LazyBroker(factory or _default_factory)
            _agent = CredentialAgent(broker.mint, clock=_utcnow, revoke_lease=broker.revoke_lease)
            endpoint = _agent.start()
            _broker, _broker_pid = broker, os.getpid()
            if not _exit_hook_registered:
                # The job is over when the process that holds its session exits: end the session
                # so no live refresh handle outlives the job (forked workers leave by os._exit
                # and never run this; the pid check covers any other child).
                atexit.register(_end_job)
                _exit_hook_registered = True
            env.update(endpoint.env())
            log.info("luigi-creds agent listening on %s", endpoint.url)
        # NOTE: a fresh httpx client per process: connection pools must not cross a fork.
        _agent_client = AgentClient(endpoint, http=httpx.Client(timeout=120.0))
        _agent_client_pid = os.getpid()
        return _agent_client


def _after_fork_in_child() -> None:
    """A forked child keeps the parent's agent variables but none of its threads or locks."""
    global _agent, _agent_lock, _states_lock, _broker
    _agent = None  # the server thread lives in the parent; the child must never stop it
    _broker = None  # nor end the job's session
    _agent_lock = threading.Lock()
    _states_lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def stop_agent(environ: Any = None, *, end_session: bool = False) -> None:
    """Stop the agent started by this process; with `end_session`, end the job's broker session.

    The exit of the process that started the agent does both. A caller that stops the agent
    itself (tests, the demo, which lets an operator revoke the session) may keep the session.
    Ending it is one attempt, best effort: a broker that is down gets a warning, not a wait.
    """
    global _agent, _agent_client, _broker
    env = os.environ if environ is None else environ
    with _agent_lock:
        if _agent is not None:
            _agent.stop()
            _agent = None
            for key in AgentEndpoint("", "").env():
                env.pop(key, None)
        _agent_client = None
        broker, _broker = _broker, None
    if broker is not None and end_session:
        try:
            broker.revoke(retry=False)
        except BrokerError as exc:
            log.warning("luigi-creds: ending the job's broker session failed: %s", exc)


def _end_job() -> None:
    if _broker is not None and _broker_pid == os.getpid():
        stop_agent(end_session=True)


@dataclass
class _TaskState:
    """What one running task holds in this process: start-minted credentials or the failure."""

    minted: dict[str, Credential]
    minted_at: datetime = field(default_factory=lambda: _utcnow())
    error: BaseException | None = None


_states_lock = threading.Lock()
_states: dict[str, _TaskState] = {}
_sessions: dict[tuple[str, str], Any] = {}


def _state(task_id: str) -> _TaskState | None:
    with _states_lock:
        return _states.get(task_id)


class CredentialsMixin:
    """Mix into a `luigi.Task`; list the grants in `grants`; use the accessors inside `run()`."""

    grants: ClassVar[Sequence[str]] = ()
    # Requested lifetime in seconds per grant (the wire's `duration`; the broker caps it by the
    # grant's ttl). Grants not listed get the grant's ttl.
    durations: ClassVar[Mapping[str, int]] = {}

    task_id: str  # provided by luigi.Task

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        try:
            ensure_agent()
        except OSError:
            # No loopback socket: minting falls back to failing loudly at first use.
            log.warning("luigi-creds: cannot start the local credential agent", exc_info=True)

    # --- accessors ---------------------------------------------------------------------

    def credential(self, grant: str) -> Credential:
        """The task's credential for `grant` (minted at start, or now if that one is stale)."""
        self._check_grant(grant)
        state = _state(self.task_id)
        if state is not None and state.error is not None:
            # The error was built in the START handler; raised here without that handler's
            # frames, so the task's failure shows one short traceback ending in the reason.
            raise state.error.with_traceback(None)
        if state is not None:
            cred = state.minted.get(grant)
            # Reused only outside its mandatory refresh window (refresh.Windows), else re-minted.
            if cred is not None:
                _, mandatory = Windows().for_lifetime(cred.expires_at - state.minted_at)
                if cred.expires_at - _utcnow() > mandatory:
                    return cred
        return ensure_agent().mint(grant, self.task_id, self.durations.get(grant))

    def aws_session(self, grant: str, region_name: str | None = None) -> Any:
        """A boto3 Session for `grant` whose credentials refresh themselves while the task runs."""
        key = (self.task_id, grant)
        with _states_lock:
            session = _sessions.get(key)
        if session is not None:
            return session
        first = self.credential(grant)
        if not isinstance(first, AwsCredentials):
            raise BrokerError(f"grant {grant!r} does not issue AWS credentials", error="usage")
        pending: list[AwsCredentials] = [first]
        task_id = self.task_id
        duration = self.durations.get(grant)

        def fetch() -> AwsCredentials:
            if pending:
                return pending.pop()
            cred = ensure_agent().mint(grant, task_id, duration)
            if not isinstance(cred, AwsCredentials):
                raise BrokerError(f"grant {grant!r} stopped issuing AWS credentials", error="usage")
            return cred

        session = _aws_session(fetch, region_name=region_name)
        with _states_lock:
            _sessions[key] = session
        return session

    def vault_client(self, grant: str) -> Any:
        """An hvac Client holding the task's Vault token for `grant`, renewed while it runs."""
        from luigi_creds.vault import TokenKeeper

        cred = self.credential(grant)
        if not isinstance(cred, VaultToken):
            raise BrokerError(f"grant {grant!r} does not issue Vault tokens", error="usage")
        keeper = TokenKeeper.for_task(
            self.task_id, grant, cred, _vault_addr(), duration=self.durations.get(grant)
        )
        return keeper.client

    def vault_secret(self, grant: str) -> Mapping[str, Any]:
        """The data of the task's Vault dynamic secret for `grant`; its lease is renewed while
        the task runs (with the broker's renew token, when `vault_addr` is configured)."""
        cred = self.credential(grant)
        if not isinstance(cred, VaultSecret):
            raise BrokerError(f"grant {grant!r} does not issue Vault secrets", error="usage")
        addr = _vault_addr()
        if cred.renewable and cred.renew_token and addr:
            from luigi_creds.vault import LeaseKeeper

            LeaseKeeper.for_task(self.task_id, grant, cred, addr)
        return cred.data

    def credential_env(self, grant: str, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """Environment for a subprocess (e.g. `ExternalProgramTask.program_environment`).

        AWS grants point the child at the job's agent (container-credentials protocol), so it
        refreshes by itself and no AWS secret sits in its environment; stray AWS variables are
        removed. Vault grants set `VAULT_TOKEN` (and `VAULT_ADDR` if configured) or
        `LUIGI_CREDS_<GRANT>_<KEY>` for each field of a dynamic secret.
        """
        env = scrub_aws_env(os.environ if base is None else base)
        cred = self.credential(grant)
        if isinstance(cred, AwsCredentials):
            agent = ensure_agent()
            env.update(agent.endpoint.env())
            env.update(container_env(agent.endpoint, grant, self.task_id))
        elif isinstance(cred, VaultToken):
            env["VAULT_TOKEN"] = cred.token
            addr = _vault_addr()
            if addr:
                env["VAULT_ADDR"] = addr
        else:
            prefix = "LUIGI_CREDS_" + re.sub(r"[^A-Za-z0-9]", "_", grant).upper() + "_"
            for k, v in cred.data.items():
                env[prefix + re.sub(r"[^A-Za-z0-9]", "_", str(k)).upper()] = str(v)
        return env

    def run(self) -> Any:
        """Run the task body, redacting credentials from `ExternalProgramTask` failures.

        `ExternalProgramRunError` prints the child's whole environment, and Luigi sends that text
        to the log, the scheduler UI and failure e-mails; it is re-raised with secrets masked.
        """
        from luigi.contrib.external_program import ExternalProgramRunError

        try:
            return super().run()  # type: ignore[misc]
        except ExternalProgramRunError as exc:
            hidden = _secrets_of(self.task_id)
            env = {
                k: "***"
                if k in SECRET_ENV_NAMES or k.startswith("LUIGI_CREDS_")
                else redact(v, hidden)
                for k, v in (exc.env or {}).items()
            }
            raise ExternalProgramRunError(  # type: ignore[no-untyped-call]
                exc.message,
                exc.args,
                env=env,
                stdout=redact(exc.out, hidden) if exc.out else exc.out,
                stderr=redact(exc.err, hidden) if exc.err else exc.err,
            ) from None

    def on_failure(self, exception: BaseException) -> str:
        """Luigi's failure explanation, with every credential of this task redacted."""
        text = "Runtime error:\n" + "".join(traceback.format_exception(exception))
        return redact(text, _secrets_of(self.task_id))

    def _check_grant(self, grant: str) -> None:
        if grant not in self.grants:
            raise BrokerError(
                f"grant {grant!r} is not in {type(self).__name__}.grants {self.grants!r}",
                error="usage",
            )


def _vault_addr() -> str | None:
    try:
        return ClientSettings.from_luigi_config().vault_addr
    except ConfigError:
        return os.environ.get("VAULT_ADDR")


def _secrets_of(task_id: str) -> set[str]:
    values: set[str] = set()
    state = _state(task_id)
    creds = list(state.minted.values()) if state else []
    for cred in creds:
        if isinstance(cred, AwsCredentials):
            values |= {cred.secret_access_key, cred.session_token}
        elif isinstance(cred, VaultToken):
            values.add(cred.token)
        else:
            values |= {str(v) for v in cred.data.values()}
    values |= {os.environ[k] for k in SECRET_ENV_NAMES if os.environ.get(k)}
    return {v for v in values if len(v) >= 4}


def redact(text: str, secrets: set[str] | frozenset[str] = frozenset()) -> str:
    """Replace known secret values and the values of secret-named variables with `***`."""
    for value in sorted(secrets, key=len, reverse=True):
        text = text.replace(value, "***")
    names = "|".join([*sorted(SECRET_ENV_NAMES), r"LUIGI_CREDS_\w+"])
    # ExternalProgramRunError prints NAME='value'; shells and dicts use NAME=value / 'NAME': 'v'.
    text = re.sub(rf"\b({names})='[^']*'", r"\1='***'", text)
    text = re.sub(rf"\b({names})=(?!')\S+", r"\1=***", text)
    return re.sub(rf"'({names})': '[^']*'", r"'\1': '***'", text)


# --- Luigi events --------------------------------------------------------------------------


def _on_start(task: luigi.Task) -> None:
    if not isinstance(task, CredentialsMixin):
        return
    state = _TaskState(minted={})
    try:
        agent = ensure_agent()
        for grant in task.grants:
            state.minted[grant] = agent.mint(grant, task.task_id, task.durations.get(grant))
    except Exception as exc:
        # Luigi swallows handler exceptions; the first accessor call inside run() raises this.
        state.error = exc
        log.warning("luigi-creds: minting at start of %s failed: %s", task.task_id, exc)
    with _states_lock:
        _states[task.task_id] = state


def _release(task: luigi.Task) -> None:
    if not isinstance(task, CredentialsMixin):
        return
    with _states_lock:
        state = _states.pop(task.task_id, None)
        for key in [k for k in _sessions if k[0] == task.task_id]:
            del _sessions[key]
    if state is None:
        return
    from luigi_creds.vault import release

    for grant, cred in state.minted.items():
        if isinstance(cred, VaultToken | VaultSecret):
            try:
                release(task.task_id, grant, cred, _vault_addr())
            except Exception as exc:
                # Vault's error bodies are not ours to vet; our own messages are secret-free.
                reason = exc if isinstance(exc, BrokerError) else type(exc).__name__
                log.warning(
                    "luigi-creds: releasing %s for %s failed: %s", grant, task.task_id, reason
                )


def _on_success(task: luigi.Task) -> None:
    _release(task)


def _on_failure(task: luigi.Task, exception: BaseException) -> None:
    _release(task)


for _event, _handler in (
    (luigi.Event.START, _on_start),
    (luigi.Event.SUCCESS, _on_success),
    (luigi.Event.FAILURE, _on_failure),
):
    luigi.Task.event_handler(_event)(_handler)  # type: ignore[no-untyped-call]
