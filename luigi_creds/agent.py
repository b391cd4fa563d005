"""The job's agent, per process: who holds the job's session, and how each process reaches it.

Owns the agent's lifecycle inside a process. The first process that needs credentials and finds
no agent in its environment (a Luigi job's scheduling process, `luigi-creds exec`, a script) starts
one (`serve.CredentialAgent`) holding the `BrokerClient`, built lazily at the first mint so a
config error surfaces where the credential is used. That process keeps the agent's root bearer in
memory only. What it exports in `LUIGI_CREDS_AGENT_URL`/`LUIGI_CREDS_AGENT_TOKEN` for forked
workers and subprocesses is a delegating bearer; a task's process narrows it to a bearer for its
own task and grants (`narrow_to_task`) before the task's code runs, so what a task or its
subprocesses hold can mint nothing else. When the owning process exits, the agent stops and the
job's session is revoked (once, without retries), so no live refresh handle outlives the job.

Composition root for in-Luigi use: the only place that reads settings and the process
environment to build the broker client.
"""

from __future__ import annotations

import atexit
import logging
import os
import ssl
import threading
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from luigi_creds.agent_client import AgentClient, AgentEndpoint
from luigi_creds.credentials import BrokerError, Credential
from luigi_creds.luigi_config import from_luigi_config
from luigi_creds.serve import CredentialAgent
from luigi_creds.settings import ClientSettings, ConfigError
from luigi_creds.summary import MintLog

if TYPE_CHECKING:
    # The broker client and its HTTP stack (httpx, ~70 ms to import) are loaded only where a
    # session is opened: a scheduling process under `luigi-creds exec` never imports them.
    import httpx

    from luigi_creds.client import BrokerClient

__all__ = [
    "adopt_task_client",
    "build_broker_client",
    "ensure_agent",
    "narrow_to_task",
    "stop_agent",
    "vault_addr",
]

log = logging.getLogger(__name__)


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
    import httpx

    from luigi_creds.broker_http import BrokerHttp, needs_proxy
    from luigi_creds.client import BrokerClient, FormPoster
    from luigi_creds.identity import OktaSettings, parse_token_source

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
    # The broker's own requests on the standard library (a third of httpx's CPU per request),
    # unless a test's transport or a proxy is in the way; the token sources keep httpx.
    poster: FormPoster = http
    if transport is None and not needs_proxy(settings.broker_url):
        context = verify if isinstance(verify, ssl.SSLContext) else None
        poster = BrokerHttp(timeout=settings.timeout, context=context)
    return BrokerClient(
        settings.broker_url, source, http=poster, clock=clock, chains=settings.refresh_chains
    )


def vault_addr() -> str | None:
    """`[luigi_creds] vault_addr`, else the process's VAULT_ADDR."""
    try:
        return from_luigi_config().vault_addr
    except ConfigError:
        return os.environ.get("VAULT_ADDR")


class LazyBroker:
    """Builds the BrokerClient at the first mint, so config errors surface where it is used."""

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

    def report_refusal(self, grant: str, task: str | None, refused: str) -> None:
        if self._client is not None:
            self._client.report_refusal(grant, task, refused)

    def revoke_lease(self, lease_id: str) -> None:
        client = self._client
        if client is None:
            raise BrokerError(
                "cannot revoke a Vault lease: this job has no broker session", error="invalid_grant"
            )
        client.revoke_lease(lease_id)


def _default_factory() -> BrokerClient:
    return build_broker_client(from_luigi_config(), environ=os.environ)


def start_job_agent(broker: LazyBroker | BrokerClient) -> CredentialAgent:
    """An agent minting through `broker`, releasing a task's Vault credentials when it ends."""
    from luigi_creds.vault import revoke

    def release(task: str, creds: Sequence[Credential]) -> None:
        addr = vault_addr()
        for cred in creds:
            revoke(cred, addr, revoke_lease=broker.revoke_lease)

    mint_log = MintLog(_utcnow)  # the job summary's source: every mint, refreshes included
    return CredentialAgent(
        mint_log.wrap(broker.mint),
        clock=_utcnow,
        revoke_lease=broker.revoke_lease,
        release=release,
        report_refusal=broker.report_refusal,
        mint_log=mint_log,
    )


# --- the per-process job state -------------------------------------------------------------

_agent_lock = threading.Lock()
_agent: CredentialAgent | None = None  # the agent this process runs (it owns the session)
_root: AgentClient | None = None  # this process's in-memory way to its own agent
_client: AgentClient | None = None  # this process's way to an inherited agent
_client_pid = 0
_broker: LazyBroker | None = None
_broker_pid = 0
_exit_hook_registered = False


def ensure_agent(
    factory: Callable[[], BrokerClient] | None = None,
    *,
    environ: MutableMapping[str, str] | None = None,
) -> AgentClient:
    """Return this process's way to the job's agent, starting the agent if there is none.

    `environ` (default `os.environ`) is read for an inherited agent and, when one is started
    here, receives a delegating bearer so that forked workers and subprocesses reach it.
    """
    global _agent, _root, _client, _client_pid, _broker, _broker_pid, _exit_hook_registered
    env = os.environ if environ is None else environ
    with _agent_lock:
        if _root is not None and _broker_pid == os.getpid():
            return _root
        endpoint = AgentEndpoint.from_env(env)
        # A forked child inherits the parent's client, whose pooled sockets it must not share.
        if _client is not None and _client_pid == os.getpid() and endpoint == _client.endpoint:
            return _client
        if endpoint is not None:
            _client, _client_pid = AgentClient(endpoint), os.getpid()
            return _client
        broker = LazyBroker(factory or _default_factory)
        _agent = start_job_agent(broker)
        root = AgentClient(_agent.start())
        _broker, _broker_pid, _root = broker, os.getpid(), root
        if not _exit_hook_registered:
            # The job is over when the process that holds its session exits: end the session
            # so no live refresh handle outlives the job (forked workers leave by os._exit
            # and never run this; the pid check covers any other child).
            atexit.register(_end_job)
            _exit_hook_registered = True
        env.update(root.scoped(None, None, delegate=True).env())
        log.info("luigi-creds agent listening on %s", root.endpoint.url)
        return root


def owns_agent() -> bool:
    """True in the process that runs the job's agent (and holds its session)."""
    return _root is not None and _broker_pid == os.getpid()


def narrow_to_task(
    task_id: str,
    grants: Sequence[str],
    *,
    own_process: bool,
    durations: Mapping[str, int | None] | None = None,
) -> tuple[AgentClient, dict[str, Credential], BrokerError | None]:
    """A client whose bearer mints only `grants` for `task_id`; with `durations`, each of
    `grants` minted for the task in the same round trip (or the refusal, returned for the
    caller to raise where the task uses a credential). With `own_process` (the task has this
    process to itself) the process's agent variables are replaced by the task's bearer, so its
    code and its subprocesses hold nothing wider, and the agent releases the task when this
    process is gone."""
    parent = ensure_agent()
    pid = os.getpid() if own_process else None
    minted: dict[str, Credential] = {}
    refusal: BrokerError | None = None
    endpoint: AgentEndpoint | None = None
    if durations is not None and grants:
        try:
            endpoint, minted = parent.start_minting(grants, task_id, pid=pid, durations=durations)
        except BrokerError as exc:
            # The agent ended the scope it had opened; the task still gets a bearer of its
            # own scope (never keeps the wider one it inherited), and the refusal.
            refusal = exc
    if endpoint is None:
        endpoint = parent.scoped(list(grants), task_id, pid=pid)
    # The task's client goes on on the same kept-alive connection.
    client = parent.handing_over(endpoint)
    if own_process:
        adopt_task_client(client)
    return client, minted, refusal


def adopt_task_client(client: AgentClient) -> None:
    """In a process that is its task's alone: `client` (the task's bearer) becomes this
    process's way to the agent, and its agent variables hold that bearer, so the task's code
    and subprocesses hold nothing wider."""
    global _client, _client_pid
    with _agent_lock:
        os.environ.update(client.endpoint.env())
        _client, _client_pid = client, os.getpid()


def _after_fork_in_child() -> None:
    """A forked child keeps the parent's agent variables but none of its threads or locks, and
    must never reach the agent with the parent's root bearer."""
    global _agent, _root, _agent_lock, _broker
    _agent = None  # the server thread lives in the parent; the child must never stop it
    _root = None
    _broker = None  # nor end the job's session
    _agent_lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def stop_agent(environ: Any = None, *, end_session: bool = False) -> None:
    """Stop the agent started by this process; with `end_session`, end the job's broker session.

    The exit of the process that started the agent does both. A caller that stops the agent
    itself (tests, the demo, which lets an operator revoke the session) may keep the session.
    Ending it is one attempt, best effort: a broker that is down gets a warning, not a wait.
    """
    global _agent, _root, _client, _broker
    env = os.environ if environ is None else environ
    with _agent_lock:
        if _agent is not None:
            _agent.stop()
            _agent = None
            for key in AgentEndpoint("", "").env():
                env.pop(key, None)
        _root = None
        _client = None
        broker, _broker = _broker, None
    if broker is not None and end_session:
        try:
            broker.revoke(retry=False)
        except BrokerError as exc:
            log.warning("luigi-creds: ending the job's broker session failed: %s", exc)


def _end_job() -> None:
    if _broker is not None and _broker_pid == os.getpid():
        stop_agent(end_session=True)
