"""A task's credentials set going by the scheduling process, just before Luigi forks the task.

Owns the hand-over of a task's start from a Luigi job's scheduling process to the process Luigi
forks for the task. Installed by exec's preload (luigi_creds/preload.py) and by the first
`CredentialsMixin` task instantiated, Luigi's `TaskProcess.start` first opens a connection to
the job's agent and sends, for a task that gets credentials in a process of its own (through
`TaskCredentials`, or a `CredentialsMixin` task's `grants`), the request for the task's bearer
(its grants, its task id); the agent starts minting the task's credentials at once (its AWS
grant's for TaskCredentials, each of a mixin task's grants with its duration).
Luigi then forks, and the scheduling process sends on the same connection the binding of the
task to its new process (whose pid it now knows) and the request for its first credential, and
closes its copy of the connection without reading anything: it never waits for the agent. The
forked process inherited the connection: `TaskCredentials` (or the mixin's START handler)
reads the first answer (its bearer: it never travels through the environment, a file or a pipe)
and leaves the second (the first credentials) for the task's first AWS call (or first
`credential()`). The fork, Luigi's start of the task and the task's
own set-up (building its clients) so run while the agent, the broker and STS mint.

A connection is only ever used by one process at a time: the scheduling process writes both
requests, and only the forked process reads. Whatever goes wrong (no agent in the environment,
a config error, a refusal, an agent that does not answer) leaves the task to start as it does
without this: its own process asks, and the error reaches the task where it fails it. The
scheduling process keeps nothing per task after the fork.

Kept light: Luigi imports `task_process` (and so this module) in every task process.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from luigi_creds.agent_client import AgentClient, AgentConnection, AgentEndpoint
from luigi_creds.credentials import BrokerError
from luigi_creds.errors import LuigiCredsError
from luigi_creds.settings import ClientSettings

__all__ = [
    "EARLY_START_VARIABLE",
    "Launch",
    "Launcher",
    "TaskGrants",
    "enabled",
    "install",
    "take",
    "task_grants",
]

log = logging.getLogger(__name__)

# `LUIGI_CREDS_EARLY_START=0` (in exec's environment or the job's) turns the early start off.
EARLY_START_VARIABLE = "LUIGI_CREDS_EARLY_START"

# How `[worker] task_process_context` names TaskCredentials (the package re-exports it).
CONTEXT_NAMES = frozenset(
    {"luigi_creds.TaskCredentials", "luigi_creds.task_process.TaskCredentials"}
)


@dataclass(frozen=True)
class TaskGrants:
    """What a task's process gets: its family's grants (`[luigi_creds]`, overridden by
    `[luigi_creds:<TaskFamily>]`) plus a CredentialsMixin task's own, each once."""

    grants: tuple[str, ...]
    aws_grant: str | None
    vault_grant: str | None


def task_grants(settings: ClientSettings, task: Any) -> TaskGrants:
    family = settings.grants_for(task.task_family)
    extra = tuple(getattr(task, "grants", ()) or ())
    named = (family.aws_grant, family.vault_grant, *extra)
    grants = tuple(dict.fromkeys(g for g in named if g))
    return TaskGrants(grants, family.aws_grant, family.vault_grant)


@dataclass(frozen=True)
class Launch:
    """A task's start, sent by the scheduling process before the fork; its answers are the
    forked process's to read."""

    grants: TaskGrants
    agent_url: str
    connection: AgentConnection
    launcher_pid: int  # the scheduling process that sent it
    asked_at: float  # time.perf_counter() as it asked (the bench's phases)
    # A CredentialsMixin task's: each of its grants minted with its duration (`minted` in the
    # second answer); None for TaskCredentials (its AWS grant's credentials under `aws`).
    durations: Mapping[str, int | None] | None = None


# task id -> its launch, between the request and the fork (at most one: Luigi forks one task
# at a time, under its fork lock).
_pending: dict[str, Launch] = {}


def take(task_id: str) -> Launch | None:
    """In `task_id`'s forked process: the launch the scheduling process left for it, once.
    None anywhere else (the scheduling process itself), or when there was none."""
    launch = _pending.get(task_id)
    if launch is None or launch.launcher_pid == os.getpid():
        return None
    _pending.clear()
    return launch


class Launcher:
    """The scheduling process's side: `before_fork(process)` and `after_fork(task_id, pid)`
    around Luigi's fork of a task process."""

    def __init__(
        self,
        read_settings: Callable[[], ClientSettings],
        environ: Any = None,
    ) -> None:
        self._read_settings = read_settings
        self._environ = os.environ if environ is None else environ
        # Read once per scheduling process: Luigi's config does not change during a build, and
        # this process is the job's busiest (it forks, checks outputs, talks to the scheduler).
        self._settings: ClientSettings | None = None
        self._client: AgentClient | None = None
        self._client_pid = 0

    def before_fork(self, process: Any) -> str | None:
        """Send the request for the task's bearer (the agent starts the task's mints); the task
        id when a launch is left for the fork, else None (the task starts as it would
        without)."""
        if not getattr(process, "use_multiprocessing", False):
            return None  # the task runs in this process, which must not hold a task's bearer
        task = process.task
        durations = None
        try:
            if getattr(process, "context", None) in CONTEXT_NAMES:
                if self._settings is None:
                    self._settings = self._read_settings()
                wanted = task_grants(self._settings, task)
            elif _is_mixin(task):
                grants = tuple(dict.fromkeys(task.grants))
                wanted = TaskGrants(grants, None, None)
                durations = {g: task.durations.get(g) for g in grants}
            else:
                return None
            client = self._agent() if wanted.grants else None
            if client is None:
                return None
            asked_at = time.perf_counter()
            conn = client.send_launch(wanted.grants, task.task_id, wanted.aws_grant, durations)
        except LuigiCredsError as exc:
            # The task's own process asks, and fails the task with the reason.
            log.debug("luigi-creds: no early start for %s: %s", task.task_id, exc)
            return None
        _pending[task.task_id] = Launch(
            wanted, client.endpoint.url, conn, os.getpid(), asked_at, durations
        )
        return str(task.task_id)

    def after_fork(self, task_id: str, pid: int | None) -> None:
        """After Luigi's fork: bind the task to its process `pid` and ask for its first
        credentials, for the forked process to read, then let go of the connection. If the
        fork failed (`pid` None), end the task's scope (nobody will hold its bearer)."""
        launch = _pending.pop(task_id, None)
        client = self._client
        if launch is None or client is None:
            return
        try:
            if pid is not None:
                client.send_bind(
                    launch.connection,
                    task_id,
                    pid,
                    launch.grants.aws_grant,
                    minted=launch.durations is not None,
                )
            else:
                # Rare (a fork that failed): the scope exists once the agent has answered.
                client.read_answer(launch.connection, "a task's bearer")
                client.release(task_id)
        except BrokerError as exc:
            # The task's process reads a failed answer and asks for itself.
            log.warning("luigi-creds: starting %s early: %s", task_id, exc)
        finally:
            # This process's copy only: the forked process holds the connection open.
            launch.connection.close()

    def _agent(self) -> AgentClient | None:
        """This process's client of the job's agent (its delegating bearer), one per process."""
        if self._client is None or self._client_pid != os.getpid():
            endpoint = AgentEndpoint.from_env(self._environ)
            if endpoint is None:
                return None
            self._client, self._client_pid = AgentClient(endpoint), os.getpid()
        return self._client


def _is_mixin(task: Any) -> bool:
    """A CredentialsMixin task with grants (its module is loaded wherever such a task is)."""
    mixin = sys.modules.get("luigi_creds.luigi")
    return mixin is not None and isinstance(task, mixin.CredentialsMixin) and bool(task.grants)


def enabled(environ: Any = None) -> bool:
    """False when `LUIGI_CREDS_EARLY_START=0` turns the early start off."""
    env = os.environ if environ is None else environ
    return str(env.get(EARLY_START_VARIABLE, "1")) != "0"


def install(launcher: Launcher) -> bool:
    """Wrap Luigi's `TaskProcess.start` with `launcher` (once per process); True if it now is."""
    from luigi.worker import TaskProcess

    # Marked on the class, not the function: whatever wraps `start` after us (a profiler, a
    # benchmark's timer) must not make a second launcher wrap it again.
    if getattr(TaskProcess, "luigi_creds_launcher", None) is not None:
        return True
    original = TaskProcess.start

    def start(self: Any) -> None:
        try:
            task_id = launcher.before_fork(self)
        except Exception:  # never break Luigi's run loop over an early start
            log.warning("luigi-creds: starting a task's credentials early failed", exc_info=True)
            task_id = None
        pid = None
        try:
            original(self)
            pid = self.pid
        finally:
            if task_id is not None:
                launcher.after_fork(task_id, pid)

    start.__wrapped__ = original  # type: ignore[attr-defined]
    TaskProcess.start = start  # type: ignore[method-assign]
    TaskProcess.luigi_creds_launcher = launcher  # type: ignore[attr-defined]
    return True
