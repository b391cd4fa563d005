"""Per-task credentials with no change to the tasks: `TaskCredentials` for Luigi's
`[worker] task_process_context`.

Owns what a task's process holds while the task runs. Luigi enters the context around the task's
run in the task's own process (a forked `TaskProcess`, or the worker's process when tasks run in
it). On entry, for the task family's grants (`[luigi_creds] aws_grant` / `vault_grant`, overridden
by `[luigi_creds:<TaskFamily>]`, plus a `CredentialsMixin` task's own `grants`):

- the process gets a bearer for its own task and grants only, from the job's agent; the wider
  bearer it inherited is gone from its environment, so neither the task nor any subprocess can
  mint another grant or for another task;
- AWS: `AWS_CONTAINER_CREDENTIALS_FULL_URI` + `AWS_CONTAINER_AUTHORIZATION_TOKEN` point every AWS
  SDK (boto3, awscli, luigi.contrib.s3) at the agent, which mints for this task id; every static
  `AWS_*` variable is removed and boto3's default session is reset, so nothing cached from
  another task is reused. Under `luigi-creds exec` the scheduling process asked for the task's
  bearer, started its first mint and bound it to this process around the fork
  (luigi_creds/launch.py): the context reads the bearer from the connection it inherited, and
  boto3's default session reads the first credential there where the task first signs a
  request, so building the task's clients overlaps the mint, and a refusal fails the task there,
  with the broker's reason. Otherwise one request asks for the bearer and the mint, the process
  sets itself up meanwhile, and the context waits for the answer, so a refusal fails the task
  before it runs;
- Vault: `VAULT_ADDR`/`VAULT_TOKEN` hold a token for this task, renewed in place while it runs
  (re-minted, and `VAULT_TOKEN` updated, when it stops extending).

On exit (success or failure) renewals stop and the agent releases the task's Vault credentials
in the background (a task's own process sends the release and exits without waiting for the
answer); if the process is killed or times out, the agent sees it gone and releases
them itself. A failure to get credentials fails the task through Luigi's normal path, with the
reason as its error.

Kept light on purpose: Luigi imports this module in every task's process (under `luigi-creds exec`
the job's scheduling process has it loaded before Luigi forks: luigi_creds/preload.py), so it
needs nothing beyond the standard library and Luigi until a Vault grant asks for hvac.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from luigi_creds.agent_client import (
    AGENT_TOKEN_VARIABLE,
    AGENT_URL_VARIABLE,
    AgentClient,
    AgentEndpoint,
    container_env,
    launched_aws,
    read_launch,
)
from luigi_creds.childenv import AWS_ENV_VARIABLES
from luigi_creds.credentials import AwsCredentials, BrokerError, VaultToken, describe, iso
from luigi_creds.errors import LuigiCredsError
from luigi_creds.launch import Launch, TaskGrants, take, task_grants
from luigi_creds.luigi_config import from_luigi_config
from luigi_creds.settings import ClientSettings

__all__ = ["TaskCredentials"]

log = logging.getLogger(__name__)


class StartTimings:
    """Where the time from the context's entry to a usable credential went (seconds)."""

    launched = 0.0  # time.perf_counter() when the scheduling process asked, before the fork
    entered = 0.0  # time.perf_counter() when the context was entered
    settings = 0.0
    agent = 0.0  # sending the start request (the agent starts the AWS mint)
    aws = 0.0  # what was left to wait for the answer (bearer, first AWS credential)
    done = 0.0  # time.perf_counter() when the context had set everything up
    vault = 0.0


# The last task's timings in this process (bench/client.py reads them; one task per process
# when Luigi forks).
last_timings: StartTimings | None = None


class TaskCredentials:
    """`[worker] task_process_context = luigi_creds.TaskCredentials`: see the module text."""

    def __init__(self, task_process: Any) -> None:
        self._task = task_process.task
        # Luigi runs the task in a process of its own when it forks one per task.
        self._own_process = bool(getattr(task_process, "use_multiprocessing", False))
        self._saved_env: dict[str, str] | None = None
        self._client: AgentClient | None = None
        self._vault: list[tuple[str, VaultToken]] = []
        self._started_agent = False
        self._owner: AgentClient | None = None  # this process's own agent, when it runs one
        self.timings = StartTimings()

    def __repr__(self) -> str:
        return f"TaskCredentials({self._task.task_id!r})"

    def __enter__(self) -> TaskCredentials:
        try:
            self._enter()
        except LuigiCredsError as exc:
            self._fail_task(exc)
        return self

    def __exit__(self, *exc_info: object) -> None:
        task_id = self._task.task_id
        if self._vault:
            from luigi_creds.vault import stop_keepers

            for grant, _ in self._vault:
                stop_keepers(task_id, grant)
        if self._client is not None:
            try:
                # The agent revokes the task's Vault credentials in the background. A task's
                # own process is about to exit and waits for nothing: the request is sent and
                # the answer left unread. In the worker's process the next task must find the
                # scope gone, so it waits.
                self._client.release(wait=not self._own_process)
            except BrokerError as exc:
                log.warning("luigi-creds: releasing %s failed: %s", task_id, exc)
            self._client.close()
        _reset_boto3()
        if self._started_agent:
            from luigi_creds.agent import stop_agent

            stop_agent(end_session=True)
        if not self._own_process and self._saved_env is not None:
            os.environ.clear()
            os.environ.update(self._saved_env)

    # --- entry ---------------------------------------------------------------------------

    def _enter(self) -> None:
        global last_timings
        started = time.perf_counter()
        self.timings.entered = started
        last_timings = self.timings
        task = self._task
        # Started by the scheduling process before it forked this one, or asked for here.
        launch = take(task.task_id) if self._own_process else None
        settings: ClientSettings | None = None
        if launch is not None:
            wanted = launch.grants
            self.timings.launched = launch.asked_at
        else:
            settings = from_luigi_config()
            wanted = task_grants(settings, task)
        self.timings.settings = time.perf_counter() - started
        if not self._own_process:
            self._saved_env = dict(os.environ)
        for name in AWS_ENV_VARIABLES:
            os.environ.pop(name, None)
        inherited = _default_session()
        _reset_boto3()
        if not wanted.grants:
            # Nothing for this family: it keeps no way to the agent either.
            os.environ.pop(AGENT_URL_VARIABLE, None)
            os.environ.pop(AGENT_TOKEN_VARIABLE, None)
            return
        first = self._take_over(launch, inherited) if launch is not None else None
        if first is None:
            first = self._ask(wanted, inherited)
        endpoint = self._task_client().endpoint
        os.environ.update(endpoint.env())
        lines = []
        if wanted.aws_grant:
            os.environ.update(container_env(endpoint, wanted.aws_grant, task.task_id))
            lines.append(f"AWS grant {wanted.aws_grant!r}: {first.describe()}")
        if wanted.vault_grant:
            if first.pending:
                # A refusal of the AWS grant fails the task before it runs, as without an
                # early start; the Vault token is minted after, on the same connection.
                first.get()
            if settings is None:
                settings = from_luigi_config()
            mark = time.perf_counter()
            lines.append(self._vault_token(settings.vault_addr, wanted.vault_grant))
            self.timings.vault = time.perf_counter() - mark
        log.info("luigi-creds: task %s has %s", task.task_id, "; ".join(lines) or "no credential")
        self.timings.done = time.perf_counter()

    def _take_over(self, launch: Launch, inherited: Any) -> _First | None:
        """The task's start came with the fork: read the task's bearer from the connection the
        scheduling process launched it on, and leave the first AWS credential on it for the
        task's first signed request. None if the agent refused the launch (the task then asks
        for itself, and fails with the reason)."""
        mark = time.perf_counter()
        try:
            self._client, read = read_launch(launch.agent_url, launch.connection)
        except LuigiCredsError as exc:
            log.debug("luigi-creds: the early start of %s failed: %s", self._task.task_id, exc)
            return None
        aws_grant = launch.grants.aws_grant

        def read_first() -> AwsCredentials | None:
            payload = read()
            return launched_aws(payload, aws_grant) if aws_grant else None

        first = _First(read_first)
        self.timings.agent = time.perf_counter() - mark
        if aws_grant:
            _install_default_session(
                self._task_client,
                aws_grant,
                self._task.task_id,
                first.aws,
                inherited,
                self._own_process,
                at_first_use=True,
            )
        return first

    def _ask(self, wanted: TaskGrants, inherited: Any) -> _First:
        """The task's bearer and first AWS credential from the agent, in one round trip."""
        task = self._task
        mark = time.perf_counter()
        parent = self._job_agent()
        # The request for the task's bearer leaves now and the agent mints the task's AWS
        # credentials before it answers; the environment and boto3's session are set up
        # meanwhile, and the answer (bearer and first credential) is read after.
        answer = parent.start_task(
            list(wanted.grants),
            task.task_id,
            pid=os.getpid() if self._own_process else None,
            aws_grant=wanted.aws_grant,
        )
        self.timings.agent = time.perf_counter() - mark
        # Read from the start request's answer, below, before the task can use the session.
        answered: list[AwsCredentials | None] = []
        first = _First(lambda: answered[0])
        if wanted.aws_grant:
            _install_default_session(
                self._task_client,
                wanted.aws_grant,
                task.task_id,
                first.aws,
                inherited,
                self._own_process,
            )
        mark = time.perf_counter()
        # Waiting here for the mint the task's first AWS call would wait for anyway turns a
        # refusal into the task's failure, with the grant and the broker's reason.
        endpoint, aws = answer()
        answered.append(aws)
        self.timings.aws = time.perf_counter() - mark
        # The task's client goes on on the start request's connection; the inherited, wider
        # bearer is of no further use in this process.
        self._client = parent.handing_over(endpoint)
        if parent is not self._owner:
            parent.close()
        first.get()
        return first

    def _task_client(self) -> AgentClient:
        assert self._client is not None, "the task's client is set before its first refresh"
        return self._client

    def _job_agent(self) -> AgentClient:
        """This process's way to the job's agent: inherited, or (no agent in the environment)
        started here, with a broker session of its own for this process."""

        endpoint = AgentEndpoint.from_env(os.environ)
        if endpoint is not None:
            return AgentClient(endpoint)
        from luigi_creds.agent import ensure_agent, owns_agent

        had = owns_agent()
        self._owner = ensure_agent()
        # Forked task processes end by os._exit: the session started here ends with the task.
        self._started_agent = not had and self._own_process
        return self._owner

    def _vault_token(self, addr: str | None, grant: str) -> str:
        assert self._client is not None
        task_id = self._task.task_id
        client = self._client
        cred = client.mint(grant, task_id)
        if not isinstance(cred, VaultToken):
            raise BrokerError(
                f"vault_grant {grant!r} does not issue Vault tokens (a dynamic secret needs "
                "CredentialsMixin.vault_secret)",
                error="usage",
                grant=grant,
            )
        from luigi_creds.vault import TokenKeeper

        def remint() -> VaultToken:
            fresh = client.mint(grant, task_id)
            if not isinstance(fresh, VaultToken):
                raise TypeError("re-mint did not return a Vault token")
            return fresh

        def on_new_token(token: str) -> None:
            os.environ["VAULT_TOKEN"] = token

        TokenKeeper.for_task(task_id, grant, cred, addr, remint=remint, on_new_token=on_new_token)
        self._vault.append((grant, cred))
        os.environ["VAULT_TOKEN"] = cred.token
        if addr:
            os.environ["VAULT_ADDR"] = addr
        return f"Vault grant {grant!r}: {describe(cred)}, expires {iso(cred.expires_at)}"

    def _fail_task(self, exc: LuigiCredsError) -> None:
        """Fail the task through Luigi's own path (FAILURE event, on_failure, the scheduler),
        with the reason as its error, instead of killing the process in the context."""
        log.warning("luigi-creds: no credentials for %s: %s", self._task.task_id, exc)
        error = exc.with_traceback(None)

        def run(*args: Any, **kwargs: Any) -> Iterator[Any]:
            raise error

        self._task.run = run


class _First:
    """The task's first AWS credential: read once, by whoever needs it first (the context, or
    the task's first signed request), from the agent's answer; a refusal is raised to each."""

    def __init__(self, read: Callable[[], AwsCredentials | None]) -> None:
        self._read: Callable[[], AwsCredentials | None] | None = read
        self._lock = threading.Lock()
        self._value: AwsCredentials | None = None
        self._error: BaseException | None = None

    @property
    def pending(self) -> bool:
        return self._read is not None

    def get(self) -> AwsCredentials | None:
        with self._lock:
            read, self._read = self._read, None
            if read is not None:
                try:
                    self._value = read()
                except LuigiCredsError as exc:
                    self._error = exc
        if self._error is not None:
            raise self._error.with_traceback(None)
        return self._value

    def aws(self) -> AwsCredentials:
        cred = self.get()
        if cred is None:
            raise BrokerError(
                "the agent answered a task's start without AWS credentials",
                error="invalid_response",
            )
        return cred

    def describe(self) -> str:
        if self.pending:
            return "minting, read at the task's first AWS call"
        return describe(self._value) if self._value is not None else "none"


def _default_session() -> Any:
    """boto3's default session in this process, if boto3 is loaded and has one."""
    boto3: Any = sys.modules.get("boto3")
    return getattr(boto3, "DEFAULT_SESSION", None)


def _install_default_session(
    client: Callable[[], AgentClient],
    grant: str,
    task_id: str,
    first: Callable[[], AwsCredentials],
    inherited: Any,
    own_process: bool,
    *,
    at_first_use: bool = False,
) -> None:
    """Give boto3's default session (boto3.client, luigi.contrib.s3) the task's credentials,
    refreshed on windows scaled to their lifetime, when boto3 is already loaded.

    botocore's container provider refreshes 15 minutes before expiry, so with the usual
    15-minute credential it would ask the agent again on every API call. The default session
    asks the same agent, for the same task, only when a refresh is due. Sessions the task builds
    itself, and every subprocess, still use the container endpoint (correct, only chattier).
    Importing boto3 here for a task that may never use it would cost more than it saves.

    A task with a process of its own keeps the default session it inherited (its service
    models and handlers) with the inherited credentials dropped; otherwise a new session
    shares only the inherited one's data loader.
    """
    if "boto3" not in sys.modules:
        return
    import boto3

    from luigi_creds.aws import adopt_session, aws_session, session_loader

    pending = [first]

    def fetch() -> AwsCredentials:
        # The task's first credentials (asked for as it started), then the agent's.
        return pending.pop()() if pending else client().aws(grant, task_id)

    if (
        own_process
        and inherited is not None
        and adopt_session(inherited, fetch, at_first_use=at_first_use)
    ):
        boto3.DEFAULT_SESSION = inherited
        return
    boto3.DEFAULT_SESSION = aws_session(
        fetch, loader=session_loader(inherited), at_first_use=at_first_use
    )


def _reset_boto3() -> None:
    """Forget boto3's default session (and the credentials it resolved), if boto3 is loaded."""
    boto3: Any = sys.modules.get("boto3")
    if boto3 is not None:
        boto3.DEFAULT_SESSION = None
