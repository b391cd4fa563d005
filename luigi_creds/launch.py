"""A task's credentials set going by the scheduling process, just before Luigi forks the task.

Owns the hand-over of a task's bearer from a Luigi job's scheduling process to the process Luigi
forks for the task. Under `luigi-creds exec` (luigi_creds/preload.py installs it), Luigi's
`TaskProcess.start` first asks the job's agent, for a task that `TaskCredentials` will give
credentials in a process of its own, for the task's bearer (its grants, its task id) without
waiting for the mint: the agent answers at once and starts minting the task's AWS credentials.
The answer stays in this module's memory for the fork to copy (the bearer never travels through
the environment, a file or a pipe) and the scheduling process drops it as soon as the fork is
done. In the child, `TaskCredentials` takes it (`take`), binds the bearer to its own process and
asks for the first credential in one request whose answer it reads at the task's first AWS call
(`AgentClient.claim`). The fork, Luigi's start of the task and the task's own set-up (building
its clients) so run while the agent, the broker and STS mint, instead of before or after.

Whatever goes wrong here (no agent in the environment, a config error, a refusal, an agent that
does not answer) leaves the task to start as it does without this: its own process asks, and
the error reaches the task where it fails it. The scheduling process keeps nothing per task
after the fork; the task bearer it held for a moment is narrower than its own.

Kept light: Luigi imports `task_process` (and so this module) in every task process.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from luigi_creds.agent_client import AgentClient, AgentEndpoint
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
CONTEXT_NAMES = frozenset({"luigi_creds.TaskCredentials", "luigi_creds.task_process.TaskCredentials"})


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
    """A task's start, asked for by the scheduling process before the fork."""

    endpoint: AgentEndpoint  # the task's own bearer (its repr hides it)
    grants: TaskGrants
    launcher_pid: int  # the scheduling process that asked
    asked_at: float  # time.perf_counter() as it asked (the bench's phases)
    answered_at: float  # and when the agent had answered


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
    """The scheduling process's side: `before_fork(process)` and `after_fork(task_id, forked)`
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
        # Grant sets the agent refused to hand on: their tasks' own processes ask (and fail,
        # reporting it) without a second refusal per task from here.
        self._refused: set[tuple[str, ...]] = set()

    def before_fork(self, process: Any) -> str | None:
        """Ask the agent for the task's bearer and set its AWS mint going; the task id when a
        launch is left for the fork, else None (the task starts as it would without this)."""
        if not getattr(process, "use_multiprocessing", False):
            return None  # the task runs in this process, which must not hold a task's bearer
        if getattr(process, "context", None) not in CONTEXT_NAMES:
            return None
        task = process.task
        try:
            if self._settings is None:
                self._settings = self._read_settings()
            wanted = task_grants(self._settings, task)
            client = self._agent() if wanted.grants else None
            if client is None or wanted.grants in self._refused:
                return None
            asked_at = time.perf_counter()
            endpoint, _ = client.task_bearer(
                wanted.grants, task.task_id, pid=None, aws_grant=wanted.aws_grant, wait=False
            )
        except LuigiCredsError as exc:
            # The task's own process asks again and fails the task with the reason.
            log.debug("luigi-creds: no early start for %s: %s", task.task_id, exc)
            if isinstance(exc, BrokerError) and exc.status == 403:
                self._refused.add(wanted.grants)
            return None
        _pending[task.task_id] = Launch(
            endpoint, wanted, os.getpid(), asked_at, time.perf_counter()
        )
        return str(task.task_id)

    def after_fork(self, task_id: str, forked: bool) -> None:
        """Forget the task's launch in this process; if the fork failed, end the task's scope
        (nobody holds its bearer)."""
        launch = _pending.pop(task_id, None)
        if launch is not None and not forked and self._client is not None:
            try:
                self._client.release(task_id)
            except BrokerError as exc:
                log.warning("luigi-creds: releasing %s after a failed fork: %s", task_id, exc)

    def _agent(self) -> AgentClient | None:
        """This process's client of the job's agent (its delegating bearer), one per process."""
        if self._client is None or self._client_pid != os.getpid():
            endpoint = AgentEndpoint.from_env(self._environ)
            if endpoint is None:
                return None
            self._client, self._client_pid = AgentClient(endpoint), os.getpid()
        return self._client


def enabled(environ: Any = None) -> bool:
    env = os.environ if environ is None else environ
    return str(env.get(EARLY_START_VARIABLE, "1")) != "0"


def install(launcher: Launcher) -> bool:
    """Wrap Luigi's `TaskProcess.start` with `launcher` (once per process); True if it now is."""
    from luigi.worker import TaskProcess

    original = TaskProcess.start
    if getattr(original, "_luigi_creds_launcher", None) is not None:
        return True

    def start(self: Any) -> None:
        try:
            task_id = launcher.before_fork(self)
        except Exception:  # never break Luigi's run loop over an early start
            log.warning("luigi-creds: starting a task's credentials early failed", exc_info=True)
            task_id = None
        forked = False
        try:
            original(self)
            forked = True
        finally:
            if task_id is not None:
                launcher.after_fork(task_id, forked)

    start._luigi_creds_launcher = launcher  # type: ignore[attr-defined]
    start.__wrapped__ = original  # type: ignore[attr-defined]
    TaskProcess.start = start  # type: ignore[method-assign]
    return True
