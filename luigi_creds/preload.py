"""What a Luigi job's scheduling process under `luigi-creds exec` sets up before Luigi forks.

Owns the scheduling-process side of exec's bootstrap (luigi_creds/bootstrap/sitecustomize.py),
which calls `prepare()` once `luigi` is imported, and again once `boto3` is:

- the code Luigi would import in every task process it forks for `[worker] task_process_context =
  luigi_creds.TaskCredentials` (`luigi_creds.task_process`), and the boto3 bridge
  (`luigi_creds.aws`) once boto3 is loaded, so the task processes inherit them;
- the early start of each such task's credentials (luigi_creds/launch.py): just before Luigi
  forks a task's process, this process asks the agent for the task's bearer and sets its AWS
  mint going, so the fork and the task's set-up overlap the mint;
- boto3's default session for the scheduling process's own AWS calls (`S3Target.exists()`),
  when exec pointed the process at its agent (`AWS_CONTAINER_CREDENTIALS_FULL_URI`) and nothing
  set a default session yet: the same credentials the container endpoint serves (exec's grant,
  from the agent's cache), refreshed on windows scaled to their lifetime. botocore's container
  provider refreshes 15 minutes before expiry, so with a 15-minute grant it would ask the agent
  again on every S3 call the scheduling process makes.

Nothing per task is kept here: the scheduling process's credentials are exec's, not a task's.
A forked task process that gets credentials of its own (TaskCredentials) drops the inherited
ones from the session it inherits (`aws.adopt_session`) or resets boto3's default session; one
that does not (a task family without grants) gets boto3's default session reset, as before.
The connection to the agent is per process: a forked process opens its own.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from urllib.parse import parse_qs, urlsplit

from luigi_creds.agent_client import AgentClient, AgentEndpoint
from luigi_creds.credentials import AwsCredentials

__all__ = ["agent_container_source", "prepare"]

_session_done = False


def prepare() -> bool:
    """Load what the job's task processes will need; True once there is nothing left to do
    (luigi and boto3 both handled)."""
    global _session_done
    import luigi_creds.task_process
    from luigi_creds.launch import Launcher, enabled, install
    from luigi_creds.luigi_config import from_luigi_config

    if enabled():
        install(Launcher(from_luigi_config))
    if "boto3" not in sys.modules:
        return False
    if not _session_done:
        _session_done = True
        import luigi_creds.aws  # noqa: F401  (TaskCredentials' bridge to boto3's default session)

        _install_default_session(os.environ)
    return True


def agent_container_source(
    environ: Mapping[str, str],
) -> tuple[AgentEndpoint, str, str | None] | None:
    """(agent endpoint, grant, task) when the process's container-credentials endpoint is the
    job agent's `/v1/aws`, else None (another endpoint, or none)."""
    endpoint = AgentEndpoint.from_env(environ)
    uri = environ.get("AWS_CONTAINER_CREDENTIALS_FULL_URI", "")
    token = environ.get("AWS_CONTAINER_AUTHORIZATION_TOKEN", "")
    if endpoint is None or not token or not uri.startswith(f"{endpoint.url}/v1/aws?"):
        return None
    query = parse_qs(urlsplit(uri).query)
    grants, tasks = query.get("grant", []), query.get("task", [])
    if len(grants) != 1 or len(tasks) > 1:
        return None
    return AgentEndpoint(endpoint.url, token), grants[0], (tasks[0] if tasks else None)


def _per_process_fetch(
    endpoint: AgentEndpoint, grant: str, task: str | None
) -> Callable[[], AwsCredentials]:
    """Fetches (grant, task) from the agent on a connection of the calling process's own."""
    clients: dict[int, AgentClient] = {}

    def fetch() -> AwsCredentials:
        pid = os.getpid()
        client = clients.get(pid)
        if client is None:
            client = clients[pid] = AgentClient(endpoint)
        return client.aws(grant, task)

    return fetch


def _install_default_session(environ: Mapping[str, str]) -> None:
    import boto3

    if boto3.DEFAULT_SESSION is not None:
        return  # the job set its own
    source = agent_container_source(environ)
    if source is None:
        return
    from luigi_creds.aws import aws_session

    boto3.DEFAULT_SESSION = aws_session(_per_process_fetch(*source))
