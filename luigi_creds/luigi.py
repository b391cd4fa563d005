"""The Luigi face for tasks that name their grants in code: `CredentialsMixin` and its events.

Owns how a task class with `grants = (...)` gets its credentials. The first `CredentialsMixin`
task instantiated in a process with no agent starts one (`agent.ensure_agent`); Luigi instantiates
tasks in the scheduling process before any worker forks, so every task process inherits the way
to the one session. Nothing live is stored on task instances (they may be pickled): per-process
state lives in module registries keyed by task id, and the broker is contacted lazily.

Task lifecycle: Luigi's START event narrows the process to the task (a bearer for its own grants
and task id, when the task has the process to itself) and mints each of `grants`. When the
scheduling process started the task's mints before it forked the task's process
(luigi_creds/launch.py), the event only takes the bearer it inherited, and the mints are read at
the first credential the task asks for. Luigi swallows event handlers' exceptions, so a failure
there is recorded and raised at the first credential use inside `run()`, where Luigi's normal
failure and retry apply. SUCCESS/FAILURE stop the task's
renewals and hand its Vault credentials to the agent to release; a task process that dies
without either is released by the agent when it notices the process is gone.

For pipelines that should not change their code, `TaskCredentials` (task_process.py) gives every
task process credentials through Luigi's `[worker] task_process_context` instead.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar

import boto3
import luigi

# Imported with this module, in the scheduling process, rather than in run(): every forked
# task process would import it afresh (0.5 ms of CPU each).
from luigi.contrib.external_program import ExternalProgramRunError

from luigi_creds.agent import (
    adopt_task_client,
    build_broker_client,
    ensure_agent,
    narrow_to_task,
    owns_agent,
    stop_agent,
    vault_addr,
)
from luigi_creds.agent_client import AgentClient, launched_minted, read_launch
from luigi_creds.aws import aws_session as _aws_session
from luigi_creds.aws import prepare_session, session_loader
from luigi_creds.childenv import SECRET_ENV_NAMES, child_env, redact, secret_values
from luigi_creds.credentials import (
    AwsCredentials,
    BrokerError,
    Credential,
    VaultSecret,
    VaultToken,
)
from luigi_creds.errors import LuigiCredsError
from luigi_creds.launch import Launch, Launcher, enabled, install, take
from luigi_creds.luigi_config import from_luigi_config
from luigi_creds.refresh import Windows
from luigi_creds.settings import ClientSettings, ConfigError

__all__ = [
    "ClientSettings",
    "ConfigError",
    "CredentialsMixin",
    "build_broker_client",
    "ensure_agent",
    "redact",
    "stop_agent",
]

log = logging.getLogger(__name__)


def _utcnow() -> datetime:
    return datetime.now(UTC)


def task_has_process(task_id: str) -> bool:
    """True when this process is Luigi's process for `task_id` alone (a forked TaskProcess)."""
    import multiprocessing

    current = multiprocessing.current_process()
    task = getattr(current, "task", None)
    return getattr(task, "task_id", None) == task_id and not owns_agent()


@dataclass
class _TaskState:
    """What one running task holds in this process: its agent client and minted credentials."""

    agent: AgentClient | None
    minted: dict[str, Credential]
    minted_at: datetime = field(default_factory=_utcnow)
    error: BaseException | None = None
    # Reads the task's credentials minted since the scheduling process launched it (the
    # answer is read at the first credential the task asks for: luigi_creds/launch.py).
    pending: Callable[[], dict[str, Credential]] | None = None
    launched: bool = False  # started by the scheduling process before the fork
    lock: threading.Lock = field(default_factory=threading.Lock)

    def settle(self) -> None:
        """Read the launch's credentials, if they are still on their way (once)."""
        with self.lock:
            read, self.pending = self.pending, None
            if read is None:
                return
            try:
                self.minted = read()
                self.minted_at = _utcnow()
            except Exception as exc:
                self.error = exc


_states_lock = threading.Lock()
_states: dict[str, _TaskState] = {}
_sessions: dict[tuple[str, str], Any] = {}


def _after_fork_in_child() -> None:
    global _states_lock
    _states_lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _state(task_id: str) -> _TaskState | None:
    with _states_lock:
        return _states.get(task_id)


def _agent_for(task_id: str) -> AgentClient:
    state = _state(task_id)
    if state is not None and state.agent is not None:
        return state.agent
    return ensure_agent()


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
        # Luigi instantiates tasks in the scheduling process before it forks task processes:
        # each forked task's aws_session() then starts from a session built here once, and
        # each task's mints start just before its fork (luigi_creds/launch.py).
        prepare_session()
        _install_launcher()

    # --- accessors ---------------------------------------------------------------------

    def credential(self, grant: str) -> Credential:
        """The task's credential for `grant` (minted at start, or now if that one is stale)."""
        self._check_grant(grant)
        state = _state(self.task_id)
        if state is not None:
            state.settle()
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
        return _agent_for(self.task_id).mint(grant, self.task_id, self.durations.get(grant))

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
            cred = _agent_for(task_id).mint(grant, task_id, duration)
            if not isinstance(cred, AwsCredentials):
                raise BrokerError(f"grant {grant!r} stopped issuing AWS credentials", error="usage")
            return cred

        # Shares what the default session has parsed (service models), never its credentials.
        session = _aws_session(
            fetch, region_name=region_name, loader=session_loader(boto3.DEFAULT_SESSION)
        )
        with _states_lock:
            _sessions[key] = session
        return session

    def vault_client(self, grant: str) -> Any:
        """An hvac Client holding the task's Vault token for `grant`, renewed while it runs."""
        from luigi_creds.vault import TokenKeeper

        cred = self.credential(grant)
        if not isinstance(cred, VaultToken):
            raise BrokerError(f"grant {grant!r} does not issue Vault tokens", error="usage")
        task_id, duration = self.task_id, self.durations.get(grant)
        keeper = TokenKeeper.for_task(
            task_id,
            grant,
            cred,
            vault_addr(),
            remint=lambda: _agent_for(task_id).mint(grant, task_id, duration),
        )
        return keeper.client

    def vault_secret(self, grant: str) -> Mapping[str, Any]:
        """The data of the task's Vault dynamic secret for `grant`; its lease is renewed while
        the task runs (with the broker's renew token, when `vault_addr` is configured)."""
        cred = self.credential(grant)
        if not isinstance(cred, VaultSecret):
            raise BrokerError(f"grant {grant!r} does not issue Vault secrets", error="usage")
        addr = vault_addr()
        if cred.renewable and cred.renew_token and addr:
            from luigi_creds.vault import LeaseKeeper

            LeaseKeeper.for_task(self.task_id, grant, cred, addr)
        return cred.data

    def credential_env(self, grant: str, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """Environment for a subprocess (e.g. `ExternalProgramTask.program_environment`).

        AWS grants point the child at the job's agent (container-credentials protocol) with a
        bearer for this task and grant only, so it refreshes by itself and holds no AWS secret
        nor anything that mints for other grants or tasks; stray AWS variables are removed.
        Vault grants set `VAULT_TOKEN` (and `VAULT_ADDR` if configured) or
        `LUIGI_CREDS_<GRANT>_<KEY>` for each field of a dynamic secret.
        """
        cred = self.credential(grant)
        scoped = _agent_for(self.task_id).scoped([grant], self.task_id)
        return child_env(
            os.environ if base is None else base,
            [cred],
            scoped,
            self.task_id,
            vault_addr=vault_addr(),
        )

    def run(self) -> Any:
        """Run the task body, redacting credentials from `ExternalProgramTask` failures.

        `ExternalProgramRunError` prints the child's whole environment, and Luigi sends that text
        to the log, the scheduler UI and failure e-mails; it is re-raised with secrets masked.
        """
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


def _secrets_of(task_id: str) -> set[str]:
    state = _state(task_id)
    if state is not None:
        state.settle()
    return secret_values(list(state.minted.values()) if state else [], os.environ)


# --- Luigi events --------------------------------------------------------------------------


def _on_start(task: luigi.Task) -> None:
    if not isinstance(task, CredentialsMixin):
        return
    state = _TaskState(agent=None, minted={})
    try:
        own = task_has_process(task.task_id)
        launch = take(task.task_id) if own else None
        if (
            launch is not None
            and launch.durations is not None
            and _take_over(state, launch, task.task_id)
        ):
            pass  # the scheduling process started the task's mints before it forked
        elif own or task.grants:
            # The task's bearer and its credentials in one round trip.
            durations = {g: task.durations.get(g) for g in task.grants}
            state.agent, state.minted, refusal = narrow_to_task(
                task.task_id, task.grants, own_process=own, durations=durations
            )
            if refusal is not None:
                raise refusal
    except Exception as exc:
        # Luigi swallows handler exceptions; the first accessor call inside run() raises this.
        state.error = exc
        log.warning("luigi-creds: minting at start of %s failed: %s", task.task_id, exc)
    with _states_lock:
        _states[task.task_id] = state


def _install_launcher() -> None:
    if enabled():
        install(Launcher(from_luigi_config))


def _take_over(state: _TaskState, launch: Launch, task_id: str) -> bool:
    """The task's start came with the fork: its bearer from the connection the scheduling
    process launched it on (this process's agent client from now on); its credentials are read
    at the first one the task asks for. False if the agent refused the launch."""
    try:
        client, read = read_launch(launch.agent_url, launch.connection)
    except LuigiCredsError as exc:
        log.debug("luigi-creds: the early start of a task failed: %s", exc)
        return False
    grants = list(launch.grants.grants)

    def minted() -> dict[str, Credential]:
        try:
            return launched_minted(read(), grants)
        except Exception as exc:
            log.warning("luigi-creds: minting at start of %s failed: %s", task_id, exc)
            raise

    state.agent = client
    state.pending = minted
    state.launched = True
    adopt_task_client(client)
    return True


def _release(task: luigi.Task) -> None:
    if not isinstance(task, CredentialsMixin):
        return
    with _states_lock:
        state = _states.pop(task.task_id, None)
        for key in [k for k in _sessions if k[0] == task.task_id]:
            del _sessions[key]
    if state is None:
        return
    # Keepers exist only where luigi_creds.vault was imported (vault_client, vault_secret);
    # importing it here would load hvac in every task process at its end (10-15 ms of CPU).
    vault = sys.modules.get("luigi_creds.vault")
    if vault is not None:
        for grant in state.minted:
            vault.stop_keepers(task.task_id, grant)
    if state.agent is not None:
        try:
            # The agent releases the task's Vault credentials in the background. A task's own
            # process exits next and waits for nothing: the release is sent, its answer unread.
            state.agent.release(wait=not task_has_process(task.task_id))
        except BrokerError as exc:
            log.warning("luigi-creds: releasing %s failed: %s", task.task_id, exc)


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
