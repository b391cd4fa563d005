"""Tests for luigi_creds.serve: the loopback agent over a real socket, read by real botocore."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import botocore.session
import httpx
import pytest

from luigi_creds.client import AwsCredentials, BrokerError, Credential, VaultSecret
from luigi_creds.serve import AgentClient, AgentEndpoint, CredentialAgent, container_env


class Minter:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str | None]] = []

    def __call__(self, grant: str, task: str | None, duration: int | None) -> Credential:
        self.calls.append((grant, task))
        n = len(self.calls)
        expires = datetime.now(UTC) + timedelta(minutes=15)
        if grant == "denied":
            raise BrokerError(
                "broker https://b refused grant 'denied' with HTTP 400 invalid_target",
                error="invalid_target",
                status=400,
                request_id="rid-1",
                grant=grant,
            )
        if grant == "db":
            return VaultSecret(
                grant, f"r{n}", "database/creds/x/1", 600, True, {"password": "pw"}, expires
            )
        return AwsCredentials(grant, f"r{n}", f"AKIAAGENT{n:04d}", f"sk{n}", f"st{n}", expires)


@pytest.fixture
def agent() -> Iterator[tuple[CredentialAgent, AgentEndpoint, Minter]]:
    minter = Minter()
    server = CredentialAgent(minter, clock=lambda: datetime.now(UTC))
    endpoint = server.start()
    yield server, endpoint, minter
    server.stop()


def test_requests_without_the_bearer_are_refused(agent) -> None:  # type: ignore[no-untyped-def]
    """The agent answers 401 to a request with no or a wrong bearer and mints nothing."""
    _, endpoint, minter = agent
    assert endpoint.url.startswith("http://127.0.0.1:")
    r = httpx.get(f"{endpoint.url}/v1/aws?grant=g")
    assert r.status_code == 401
    r = httpx.post(f"{endpoint.url}/v1/mint", json={"grant": "g"}, headers={"Authorization": "x"})
    assert r.status_code == 401
    assert minter.calls == []
    assert endpoint.bearer not in repr(endpoint)


def test_botocore_container_provider_reads_the_agent(agent, monkeypatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """botocore's default chain finds the agent through the container-credentials variables."""
    _, endpoint, minter = agent
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    env = container_env(endpoint, "etl-writer", "Task(x=1)")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    found = botocore.session.Session().get_credentials()
    assert found.method == "container-role"
    creds = found.get_frozen_credentials()
    assert creds.access_key == "AKIAAGENT0001"
    assert creds.token == "st1"
    assert minter.calls == [("etl-writer", "Task(x=1)")]
    again = httpx.get(
        env["AWS_CONTAINER_CREDENTIALS_FULL_URI"], headers={"Authorization": endpoint.bearer}
    )
    assert again.json()["AccessKeyId"] == "AKIAAGENT0001"
    assert set(again.json()) == {"AccessKeyId", "SecretAccessKey", "Token", "Expiration"}
    assert len(minter.calls) == 1


def test_agent_client_round_trips_credentials(agent) -> None:  # type: ignore[no-untyped-def]
    """AgentClient.mint returns the typed credential the agent minted, with the task passed on."""
    _, endpoint, minter = agent
    client = AgentClient(endpoint)
    aws = client.mint("etl-writer", "T1")
    secret = client.mint("db", "T2")
    assert isinstance(aws, AwsCredentials) and aws.session_token == "st1"
    assert isinstance(secret, VaultSecret) and secret.data == {"password": "pw"}
    assert minter.calls == [("etl-writer", "T1"), ("db", "T2")]


def test_agent_passes_broker_errors_through(agent) -> None:  # type: ignore[no-untyped-def]
    """A broker refusal reaches the worker with its code, status, request id and message."""
    _, endpoint, _ = agent
    client = AgentClient(endpoint)
    with pytest.raises(BrokerError, match="invalid_target") as info:
        client.mint("denied", "T1")
    assert (info.value.error, info.value.status, info.value.request_id) == (
        "invalid_target",
        400,
        "rid-1",
    )


def test_agent_gone_is_a_clear_error() -> None:
    """A worker whose agent has exited gets an `unreachable` error naming the agent."""
    server = CredentialAgent(Minter(), clock=lambda: datetime.now(UTC))
    endpoint = server.start()
    server.stop()
    with pytest.raises(BrokerError, match="credential agent") as info:
        AgentClient(endpoint).mint("g")
    assert info.value.error == "unreachable"


def test_agent_relays_lease_revocation() -> None:
    """POST /v1/revoke-lease with the bearer reaches the revoke callable; errors keep their code."""
    revoked: list[str] = []

    def revoke(lease_id: str) -> None:
        if lease_id.endswith("foreign"):
            raise BrokerError(
                "broker https://b refused lease revoke", error="invalid_grant", status=400
            )
        revoked.append(lease_id)

    server = CredentialAgent(Minter(), clock=lambda: datetime.now(UTC), revoke_lease=revoke)
    endpoint = server.start()
    try:
        with httpx.Client() as http:
            client = AgentClient(endpoint)
            client.revoke_lease("database/creds/x/1")
            assert revoked == ["database/creds/x/1"]
            with pytest.raises(BrokerError) as info:
                client.revoke_lease("database/creds/x/foreign")
            assert info.value.error == "invalid_grant" and info.value.status == 400
            r = http.post(
                f"{endpoint.url}/v1/revoke-lease", json={"lease_id": "database/creds/x/2"}
            )
            assert r.status_code == 401
            r = http.post(
                f"{endpoint.url}/v1/revoke-lease",
                json={"lease_id": 7},
                headers={"Authorization": f"Bearer {endpoint.bearer}"},
            )
            assert r.status_code == 400
        assert revoked == ["database/creds/x/1"]
    finally:
        server.stop()


def test_agent_without_a_lease_revoker_refuses(agent) -> None:  # type: ignore[no-untyped-def]
    """An agent built without a revoke callable answers a lease revocation with an error."""
    _, endpoint, _ = agent
    with pytest.raises(BrokerError) as info:
        AgentClient(endpoint).revoke_lease("database/creds/x/1")
    assert info.value.error == "unsupported_token_type"


# --- scoped bearers -----------------------------------------------------------------------


def test_a_task_bearer_mints_only_its_own_grants_for_its_own_task(agent, caplog) -> None:  # type: ignore[no-untyped-def]
    """A bearer scoped to (grants, task) mints those grants for that task; every other grant,
    task, wider bearer or lease of another task is refused with 403 and logged; nothing minted."""
    server, endpoint, minter = agent
    root = AgentClient(endpoint)
    delegate = AgentClient(root.scoped(["etl", "db"], None, delegate=True))
    task = AgentClient(delegate.scoped(["etl"], "Task(a=1)"))
    assert task.endpoint.bearer not in (endpoint.bearer, delegate.endpoint.bearer)

    assert isinstance(task.mint("etl", "Task(a=1)"), AwsCredentials)
    assert isinstance(task.mint("etl"), AwsCredentials)  # its own task by default
    assert task.aws("etl").access_key_id.startswith("AKIAAGENT")
    assert minter.calls == [("etl", "Task(a=1)")] * 2

    refused = [
        lambda: task.mint("other", "Task(a=1)"),
        lambda: task.mint("etl", "Task(a=2)"),
        lambda: task.aws("etl", "Task(a=2)"),
        lambda: task.scoped(["etl", "other"], "Task(a=1)"),
        lambda: task.scoped(["etl"], "Task(a=2)"),
        lambda: task.scoped(["etl"], None, delegate=True),
        lambda: delegate.mint("admin", "Task(a=1)"),
        lambda: delegate.scoped(None, None, delegate=True),
        lambda: task.release("Task(a=2)"),
    ]
    for attempt in refused:
        with pytest.raises(BrokerError) as info:
            attempt()
        assert info.value.status == 403 and info.value.error == "access_denied"
        assert "refused" in str(info.value)
    assert server.refusals == len(refused)
    assert minter.calls == [("etl", "Task(a=1)")] * 2
    logged = [r.getMessage() for r in caplog.records if "agent refused" in r.getMessage()]
    assert len(logged) == len(refused)
    assert any("grant 'other' for task 'Task(a=1)'" in line for line in logged)
    assert all(endpoint.bearer not in line for line in logged)

    # A narrower bearer for the same task (a subprocess's) is fine; release ends them all.
    child = AgentClient(task.scoped(["etl"], "Task(a=1)"))
    task.release()
    for gone in (task, child):
        with pytest.raises(BrokerError) as info:
            gone.mint("etl")
        assert info.value.status == 401


def test_a_dead_task_process_has_its_vault_credentials_released() -> None:
    """A task scope bound to a process: when the process dies without releasing, the agent
    releases what the task held (here a dynamic secret) by itself."""
    import subprocess
    import sys
    import time

    released: list[tuple[str, list[str]]] = []

    def release(task: str, creds: object) -> None:
        released.append((task, [c.lease_id for c in creds]))  # type: ignore[attr-defined]

    server = CredentialAgent(Minter(), clock=lambda: datetime.now(UTC), release=release)
    endpoint = server.start()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        task = AgentClient(AgentClient(endpoint).scoped(["db"], "T(1)", pid=child.pid))
        assert isinstance(task.mint("db"), VaultSecret)
        time.sleep(2 * CredentialAgent.REAP_INTERVAL)
        assert released == []  # alive: nothing released
        child.kill()
        child.wait()
        deadline = time.monotonic() + 10
        while not released and time.monotonic() < deadline:
            time.sleep(0.05)
        assert released == [("T(1)", ["database/creds/x/1"])]
        with pytest.raises(BrokerError) as info:
            task.mint("db")
        assert info.value.status == 401
    finally:
        child.kill()
        server.stop()


def test_a_task_start_mints_once_while_the_task_sets_up(agent) -> None:  # type: ignore[no-untyped-def]
    """A task's bearer request starts its AWS mint and answers at once; the task's first
    request waits for that same mint (one broker call), and a refusal comes back once, to the
    task, with the broker's words, without a second try at the broker."""
    _, endpoint, minter = agent
    root = AgentClient(endpoint)
    bearer, first = root.task_bearer(["etl"], "T(1)", pid=None, aws_grant="etl", wait=False)
    assert first is None
    task = AgentClient(bearer)
    assert task.aws("etl", "T(1)").access_key_id.startswith("AKIAAGENT")
    assert minter.calls == [("etl", "T(1)")]

    bearer, _ = root.task_bearer(["denied"], "T(2)", pid=None, aws_grant="denied", wait=False)
    with pytest.raises(BrokerError) as info:
        AgentClient(bearer).aws("denied", "T(2)")
    assert "refused grant 'denied'" in str(info.value) and info.value.status == 400
    assert minter.calls.count(("denied", "T(2)")) == 1

    _, waited = root.task_bearer(["etl"], "T(3)", pid=None, aws_grant="etl")
    assert waited is not None and waited.grant == "etl"


def test_a_task_start_is_one_round_trip_on_one_connection(agent) -> None:  # type: ignore[no-untyped-def]
    """`start_task` sends the start request at once and reads the answer later (the bearer and
    the first AWS credential, one mint); the task's client goes on on the same connection; a
    release sent without waiting still ends the task's scope."""
    import time

    server, endpoint, minter = agent
    root = AgentClient(endpoint)
    answer = root.start_task(["etl"], "T(1)", pid=None, aws_grant="etl")
    bearer, first = answer()
    assert first is not None and first.access_key_id.startswith("AKIAAGENT")
    assert minter.calls == [("etl", "T(1)")]
    task = root.handing_over(bearer)
    connection = task._conn
    assert connection is not None and root._conn is None
    assert task.aws("etl").access_key_id == first.access_key_id  # the same mint, cached
    assert task._conn is connection and minter.calls == [("etl", "T(1)")]

    task.release(wait=False)
    assert task._conn is None
    deadline = time.monotonic() + 10
    while server.scope_of(f"Bearer {bearer.bearer}") is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.scope_of(f"Bearer {bearer.bearer}") is None

    denied = root.start_task(["denied"], "T(2)", pid=None, aws_grant="denied")
    with pytest.raises(BrokerError) as info:
        denied()
    assert "refused grant 'denied'" in str(info.value) and info.value.status == 400


def test_a_mixin_start_mints_every_grant_with_its_bearer(agent) -> None:  # type: ignore[no-untyped-def]
    """`start_minting`: the task's bearer and each grant minted for the task in one request;
    a refused grant ends the new scope (its Vault credentials released) and raises the refusal;
    the scope's limits hold (a grant outside it is refused, nothing minted)."""
    released: list[str] = []
    minter = Minter()
    server = CredentialAgent(
        minter, clock=lambda: datetime.now(UTC), release=lambda t, c: released.append(t)
    )
    root = AgentClient(server.start())
    try:
        bearer, minted = root.start_minting(
            ["etl", "db"], "T(1)", pid=None, durations={"etl": 900, "db": None}
        )
        assert isinstance(minted["etl"], AwsCredentials) and isinstance(minted["db"], VaultSecret)
        assert minted["db"].data == {"password": "pw"}
        assert minter.calls == [("etl", "T(1)"), ("db", "T(1)")]
        task = AgentClient(bearer)
        assert task.aws("etl").access_key_id == minted["etl"].access_key_id  # seeded, no mint
        assert len(minter.calls) == 2

        with pytest.raises(BrokerError) as info:
            root.start_minting(["db", "denied"], "T(2)", pid=None, durations={})
        assert info.value.error == "invalid_target" and "denied" in str(info.value)
        assert released == ["T(2)"]  # the db secret minted before the refusal is released

        delegate = AgentClient(root.scoped(["etl"], None, delegate=True))
        with pytest.raises(BrokerError) as info:
            delegate.start_minting(["etl", "db"], "T(3)", pid=None, durations={})
        assert info.value.status == 403
        assert ("db", "T(3)") not in minter.calls and ("etl", "T(3)") not in minter.calls
    finally:
        server.stop()


def test_a_launch_is_sent_by_one_process_and_read_by_another(agent) -> None:  # type: ignore[no-untyped-def]
    """A scheduling process sends a task's bearer request, then (the task's process forked)
    the binding to that process and the request for its first credential, on one connection
    and without reading; whoever holds the connection next reads the task's bearer, then the
    credentials of the one mint the first request started. The task is bound to its process."""
    import os

    from luigi_creds.agent_client import launched_aws, read_launch

    server, endpoint, minter = agent
    delegate = AgentClient(AgentClient(endpoint).scoped(None, None, delegate=True))
    conn = delegate.send_launch(["etl"], "T(1)", "etl")
    delegate.send_bind(conn, "T(1)", os.getpid(), "etl")
    task, read = read_launch(endpoint.url, conn)
    cred = launched_aws(read(), "etl")
    assert cred is not None and cred.access_key_id == "AKIAAGENT0001"
    assert minter.calls == [("etl", "T(1)")]
    scope = server.scope_of(task.endpoint.bearer)
    assert scope is not None and scope.task == "T(1)" and scope.pid == os.getpid()
    assert task._conn is conn  # the task's client goes on on the launch's connection
    assert task.aws("etl").access_key_id == "AKIAAGENT0001"


def _bind(caller: AgentClient, task: str, pid: int) -> dict:  # type: ignore[type-arg]
    conn = caller._connect()
    try:
        caller.send_bind(conn, task, pid, None)
        return caller.read_answer(conn, "a bind")
    finally:
        conn.close()


def test_binding_a_task_to_a_process_is_for_delegating_bearers_once(agent) -> None:  # type: ignore[no-untyped-def]
    """Only a bearer that starts tasks binds one to its process, and a task bound to a process
    stays bound to it; a bad pid is a bad request; a refused bind binds nothing."""
    import os

    server, endpoint, minter = agent
    delegate = AgentClient(AgentClient(endpoint).scoped(None, None, delegate=True))
    bearer, _ = delegate.task_bearer(["etl"], "T(1)", pid=None, aws_grant="etl", wait=False)
    with pytest.raises(BrokerError) as info:
        _bind(AgentClient(bearer), "T(1)", os.getpid())
    assert info.value.status == 403 and info.value.error == "access_denied"
    assert server.scope_of(bearer.bearer).pid is None  # type: ignore[union-attr]
    assert _bind(delegate, "T(1)", os.getpid()) == {"aws": {}}
    assert server.scope_of(bearer.bearer).pid == os.getpid()  # type: ignore[union-attr]
    assert _bind(delegate, "T(1)", os.getpid()) == {"aws": {}}  # the same process again
    with pytest.raises(BrokerError) as info:
        _bind(delegate, "T(1)", os.getpid() + 1)
    assert info.value.status == 403
    # A task that has ended gets no first mint from a late bind.
    delegate.release("T(1)")
    calls = len(minter.calls)
    conn = delegate._connect()
    delegate.send_bind(conn, "T(1)", os.getpid(), "etl")
    with pytest.raises(BrokerError) as info:
        delegate.read_answer(conn, "a bind")
    assert info.value.status == 400 and "has ended" in str(info.value)
    assert len(minter.calls) == calls
    conn.close()
    r = httpx.post(
        f"{endpoint.url}/v1/claim",
        json={"task": "T(1)", "pid": True},
        headers={"Authorization": f"Bearer {delegate.endpoint.bearer}"},
    )
    assert r.status_code == 400


def test_a_bound_task_is_released_when_its_process_is_gone(agent) -> None:  # type: ignore[no-untyped-def]
    """Once bound, the task is watched like one asked for by its own process: when that
    process exits, its bearer stops working."""
    import subprocess
    import sys
    import time

    server, endpoint, _ = agent
    delegate = AgentClient(AgentClient(endpoint).scoped(None, None, delegate=True))
    bearer, _ = delegate.task_bearer(["etl"], "T(1)", pid=None, aws_grant="etl", wait=False)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        _bind(delegate, "T(1)", child.pid)
        child.kill()
        child.wait()
        deadline = time.monotonic() + 10
        while server.scope_of(bearer.bearer) is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(BrokerError) as info:
            AgentClient(bearer).aws("etl")
        assert info.value.status == 401
    finally:
        child.kill()


def test_an_agent_request_leaves_in_one_write(agent, socket_writes) -> None:  # type: ignore[no-untyped-def]
    """The client writes a request's head and body together (one wake-up of the agent)."""
    _, endpoint, _ = agent
    AgentClient(endpoint).mint("etl", "T(1)")
    (request,) = [w for w in socket_writes if w.startswith(b"POST")]
    assert request.endswith(b'\r\n\r\n{"grant": "etl", "task": "T(1)"}')


def test_a_bearer_with_a_line_break_is_never_sent(agent) -> None:  # type: ignore[no-untyped-def]
    """A bearer (from the environment) with a line break would add a header of its own: the
    request is refused before it is written, as an unreachable agent, naming no secret."""
    _, endpoint, minter = agent
    client = AgentClient(AgentEndpoint(endpoint.url, endpoint.bearer + "\r\nX-Injected: 1"))
    with pytest.raises(BrokerError) as info:
        client.mint("etl", "T(1)")
    assert info.value.error == "unreachable" and endpoint.bearer not in str(info.value)
    assert minter.calls == []


def test_an_answer_that_is_not_http_is_an_unreachable_agent() -> None:
    """Whatever listens at the agent's address and does not answer HTTP (or hangs up) gives
    the caller the agent's one error, naming what was asked, never a parser's traceback."""
    import socket
    import threading

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    answers = [b"SSH-2.0-OpenSSH\r\n\r\n", b"", b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n"]

    def serve() -> None:
        for answer in answers:
            conn, _ = listener.accept()
            conn.recv(65536)
            conn.sendall(answer)
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    try:
        for _ in answers:
            client = AgentClient(AgentEndpoint(f"http://127.0.0.1:{port}", "b"))
            with pytest.raises(BrokerError) as info:
                client.mint("etl")
            assert info.value.error == "unreachable" and "grant 'etl'" in str(info.value)
    finally:
        listener.close()


def test_two_answers_read_together_are_both_kept(agent) -> None:  # type: ignore[no-untyped-def]
    """Two requests sent before either answer is read (a task's launch): the answers may
    arrive in one read, and the second is kept for the next `getresponse`."""
    import time

    _, endpoint, _ = agent
    client = AgentClient(endpoint)
    conn = client._connect()
    for task in ("T(1)", "T(2)"):
        data = json.dumps({"grants": ["etl"], "task": task, "delegate": False}).encode()
        conn.request("POST", "/v1/bearer", data, client._headers(data))
    time.sleep(0.2)  # both answers are in the socket's buffer before the first read
    first, second = conn.getresponse(), conn.getresponse()
    assert first.status == second.status == 200
    assert json.loads(first.read())["bearer"] != json.loads(second.read())["bearer"]
    conn.close()


def test_a_malformed_request_head_is_refused_and_mints_nothing(agent) -> None:  # type: ignore[no-untyped-def]
    """The agent's own head parser: a bad request line or header line is a 400, too many or
    too long header lines a 431, an over-long body a 413; each closes the connection and
    nothing is minted. Header names match in any case; HTTP/1.0 closes after its answer."""
    import socket

    _, endpoint, minter = agent
    host, port = endpoint.url.removeprefix("http://").split(":")

    def send(raw: bytes) -> bytes:
        with socket.create_connection((host, int(port)), timeout=10) as conn:
            conn.sendall(raw)
            chunks = []
            while chunk := conn.recv(65536):
                chunks.append(chunk)
            return b"".join(chunks)

    auth = f"authorization: Bearer {endpoint.bearer}\r\n".encode()
    body = b'{"grant": "etl"}'
    assert send(b"GARBAGE\r\n\r\n").startswith(b"HTTP/1.1 400")
    assert send(b"POST /v1/mint HTTP/2.0\r\n\r\n").startswith(b"HTTP/1.1 400")
    assert send(b"POST /v1/mint HTTP/1.1\r\nno colon here\r\n\r\n").startswith(b"HTTP/1.1 400")
    many = b"".join(b"X-%d: y\r\n" % n for n in range(101))
    assert send(b"POST /v1/mint HTTP/1.1\r\n" + many + b"\r\n").startswith(b"HTTP/1.1 431")
    long = b"X: " + b"y" * 70000 + b"\r\n"
    assert send(b"POST /v1/mint HTTP/1.1\r\n" + long + b"\r\n").startswith(b"HTTP/1.1 431")
    big = b"POST /v1/mint HTTP/1.1\r\n" + auth + b"Content-Length: 999999\r\n\r\n"
    assert send(big).startswith(b"HTTP/1.1 413")
    assert minter.calls == []
    # HTTP/1.0 without keep-alive: answered, then closed (send() reads to the end).
    ok = send(
        b"POST /v1/mint HTTP/1.0\r\n" + auth + b"CONTENT-LENGTH: %d\r\n\r\n" % len(body) + body
    )
    assert ok.startswith(b"HTTP/1.1 200") and b"AKIAAGENT0001" in ok


def test_a_mixin_tasks_launch_mints_each_grant_meanwhile(agent) -> None:  # type: ignore[no-untyped-def]
    """A launch with durations mints each grant for the task while the answers wait; the
    second answer holds them all. If one is refused, the refusal comes back there and the
    task's scope is ended, releasing what was minted before it."""
    import os

    from luigi_creds.agent_client import launched_minted, read_launch

    server, endpoint, minter = agent
    released: list[str] = []
    server._release = lambda task, creds: released.append(task)
    delegate = AgentClient(AgentClient(endpoint).scoped(None, None, delegate=True))
    conn = delegate.send_launch(["etl", "db"], "T(1)", None, {"etl": 900, "db": None})
    delegate.send_bind(conn, "T(1)", os.getpid(), None, minted=True)
    task, read = read_launch(endpoint.url, conn)
    minted = launched_minted(read(), ["etl", "db"])
    assert isinstance(minted["etl"], AwsCredentials) and isinstance(minted["db"], VaultSecret)
    assert minter.calls == [("etl", "T(1)"), ("db", "T(1)")]
    assert server.scope_of(task.endpoint.bearer).pid == os.getpid()  # type: ignore[union-attr]
    task.close()

    conn = delegate.send_launch(["db", "denied"], "T(2)", None, {})
    delegate.send_bind(conn, "T(2)", os.getpid(), None, minted=True)
    task, read = read_launch(endpoint.url, conn)
    with pytest.raises(BrokerError) as info:
        read()
    assert "refused grant 'denied'" in str(info.value) and info.value.status == 400
    assert server.scope_of(task.endpoint.bearer) is None
    task.close()
    import time

    deadline = time.monotonic() + 5
    while "T(2)" not in released and time.monotonic() < deadline:
        time.sleep(0.02)
    assert released == ["T(2)"]
