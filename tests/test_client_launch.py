"""Tests for luigi_creds.launch: the scheduling process starts a task's credentials before Luigi
forks the task's process; the forked child takes the bearer and claims it. A real agent on a
loopback socket, a real fork."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pytest
from test_client_serve import Minter

from luigi_creds import launch
from luigi_creds.agent_client import AgentClient, AgentEndpoint, launched_aws, read_launch
from luigi_creds.credentials import BrokerError
from luigi_creds.launch import Launcher, take
from luigi_creds.serve import CredentialAgent
from luigi_creds.settings import ClientSettings

CONTEXT = "luigi_creds.TaskCredentials"


def _settings(**extra: str) -> ClientSettings:
    raw = {"broker_url": "http://127.0.0.1:1", "token_source": "env:CI_TOKEN", **extra}
    return ClientSettings.from_mapping(raw, {"Denied": {"aws_grant": "other"}})


def _process(task_id: str, family: str = "T", **over: Any) -> Any:
    task = SimpleNamespace(task_id=task_id, task_family=family, grants=())
    return SimpleNamespace(
        **{"use_multiprocessing": True, "context": CONTEXT, "task": task, **over}
    )


@pytest.fixture
def delegate_env() -> Iterator[tuple[CredentialAgent, dict[str, str], Minter]]:
    """An agent, and a scheduling process's environment holding a bearer for grant `etl`."""
    minter = Minter()
    server = CredentialAgent(minter, clock=lambda: datetime.now(UTC))
    root = AgentClient(server.start())
    env = root.scoped(["etl"], None, delegate=True).env()
    yield server, env, minter
    server.stop()
    launch._pending.clear()


def _in_a_fork(launcher: Launcher, task_id: str) -> dict[str, Any]:
    """What a forked child finds for `task_id` and gets from it, the scheduling process (this
    one) sending the binding after the fork as Luigi's wrapped start does."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, then leave without running pytest's exit handlers
        try:
            found = take(task_id)
            result: dict[str, Any] = {"found": found is not None}
            if found is not None:
                result["again"] = take(task_id) is not None
                try:
                    client, read = read_launch(found.agent_url, found.connection)
                    answer = read()
                    grant = found.grants.aws_grant
                    cred = launched_aws(answer, grant) if grant else None
                except BrokerError as exc:
                    result["refused"] = [exc.status, str(exc)]
                else:
                    result["key"] = None if cred is None else cred.access_key_id
                    result["grants"] = list(found.grants.grants)
                    result["bearer"] = client.endpoint.bearer
            os.write(write, json.dumps(result).encode())
        finally:
            os._exit(0)
    os.close(write)
    launcher.after_fork(task_id, pid)
    with os.fdopen(read, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    return dict(json.loads(data))


def test_the_fork_inherits_the_tasks_bearer_and_claims_the_mint_started_before_it(
    delegate_env,  # type: ignore[no-untyped-def]
) -> None:
    """Before the fork the scheduling process gets the task's bearer and the agent starts its
    AWS mint; the forked child takes the launch (once), and its claim gets that same mint's
    credentials; the scheduling process itself never takes it, and keeps nothing after."""
    server, env, minter = delegate_env
    launcher = Launcher(lambda: _settings(aws_grant="etl"), env)
    assert launcher.before_fork(_process("T(1)")) == "T(1)"
    assert take("T(1)") is None  # this is the process that asked
    child = _in_a_fork(launcher, "T(1)")
    bearer = child.pop("bearer")
    assert child == {"found": True, "again": False, "key": "AKIAAGENT0001", "grants": ["etl"]}
    assert minter.calls == [("etl", "T(1)")]
    assert launch._pending == {}
    # The task was bound to its (now gone) process: the agent released it.
    scope = server.scope_of(bearer)
    assert scope is None or scope.pid is not None


def test_a_failed_fork_ends_the_tasks_scope(delegate_env) -> None:  # type: ignore[no-untyped-def]
    """If Luigi's fork fails, nobody holds the task's bearer: its scope is ended."""
    server, env, _ = delegate_env
    launcher = Launcher(lambda: _settings(aws_grant="etl"), env)
    launcher.before_fork(_process("T(2)"))
    launcher.after_fork("T(2)", None)
    assert launch._pending == {}
    assert [s for s in server._scopes.values() if s.task == "T(2)"] == []


def test_no_early_start_where_the_task_would_not_get_its_own_credentials(
    delegate_env,  # type: ignore[no-untyped-def]
) -> None:
    """Nothing is sent for a task run in the scheduling process itself, under another
    context, with no grants, or outside an agent; a grant the scheduling process may not hand
    on is refused to the forked process, which then asks for itself."""
    _, env, minter = delegate_env
    launcher = Launcher(lambda: _settings(aws_grant="etl"), env)
    assert launcher.before_fork(_process("A(1)", use_multiprocessing=False)) is None
    assert launcher.before_fork(_process("A(2)", context="my.Context")) is None
    assert Launcher(lambda: _settings(), env).before_fork(_process("A(3)")) is None
    assert Launcher(lambda: _settings(aws_grant="etl"), {}).before_fork(_process("A(4)")) is None
    assert minter.calls == [] and launch._pending == {}
    assert launcher.before_fork(_process("D(1)", family="Denied")) == "D(1)"
    child = _in_a_fork(launcher, "D(1)")
    status, reason = child["refused"]
    assert status == 403 and "cannot hand out" in reason
    assert minter.calls == []


def test_install_wraps_luigis_fork_once() -> None:
    """`install` wraps TaskProcess.start once per process, keeping Luigi's own start behind it."""
    from luigi.worker import TaskProcess

    original = TaskProcess.start
    try:
        first, second = Launcher(_settings), Launcher(_settings)
        assert launch.install(first)
        wrapped = TaskProcess.start

        def timed(self: Any) -> None:  # something else wrapping Luigi's start after us
            wrapped(self)

        TaskProcess.start = timed  # type: ignore[method-assign]
        assert launch.install(second)
        assert TaskProcess.start is timed
        assert TaskProcess.luigi_creds_launcher is first  # type: ignore[attr-defined]
        assert wrapped.__wrapped__ is original  # type: ignore[attr-defined]
    finally:
        TaskProcess.start = original  # type: ignore[method-assign]
        del TaskProcess.luigi_creds_launcher  # type: ignore[attr-defined]


def test_no_early_start_when_the_agent_cannot_be_reached() -> None:
    """If the agent's address takes no connection, nothing is left for the fork (the task's
    process then asks for itself, and reports the agent unreachable)."""
    env = AgentEndpoint("http://127.0.0.1:1", "b").env()
    launcher = Launcher(lambda: _settings(aws_grant="etl"), env)
    assert launcher.before_fork(_process("T(9)")) is None
    assert launch._pending == {}
