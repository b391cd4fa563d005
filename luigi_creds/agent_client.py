"""The way to the job's credential agent from any process: its endpoint and its client.

Owns what a task's process (or any child) needs to reach the agent that `serve.py` runs: the two
environment variables that carry the agent's URL and a bearer, the AWS container-credentials
variables, and `AgentClient`. Standard library only (sockets, and `http.client`'s exceptions):
Luigi imports `TaskCredentials` in every task's process, which should pay for no HTTP stack or
server code.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, urlsplit

from luigi_creds.credentials import (
    AwsCredentials,
    BrokerError,
    Credential,
    parse_credential,
    parse_time,
)
from luigi_creds.values import Frozen

__all__ = [
    "AGENT_TOKEN_VARIABLE",
    "AGENT_URL_VARIABLE",
    "AgentClient",
    "AgentConnection",
    "AgentEndpoint",
    "container_env",
    "launched_aws",
    "launched_minted",
    "read_launch",
]

AGENT_URL_VARIABLE = "LUIGI_CREDS_AGENT_URL"
AGENT_TOKEN_VARIABLE = "LUIGI_CREDS_AGENT_TOKEN"


class AgentEndpoint(Frozen):
    """Where a running agent listens, and the bearer that opens it."""

    _fields = ("url", "bearer")
    __slots__ = _fields
    _secret = frozenset({"bearer"})
    url: str
    bearer: str

    def __init__(self, url: str, bearer: str) -> None:
        self._fill(url, bearer)

    def env(self) -> dict[str, str]:
        return {AGENT_URL_VARIABLE: self.url, AGENT_TOKEN_VARIABLE: self.bearer}

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> AgentEndpoint | None:
        url, bearer = environ.get(AGENT_URL_VARIABLE), environ.get(AGENT_TOKEN_VARIABLE)
        return cls(url, bearer) if url and bearer else None


def container_env(endpoint: AgentEndpoint, grant: str, task: str | None) -> dict[str, str]:
    """Variables that make any AWS SDK fetch `grant`'s credentials from the agent."""
    query = f"grant={quote(grant, safe='')}"
    if task:
        query += f"&task={quote(task, safe='')}"
    return {
        "AWS_CONTAINER_CREDENTIALS_FULL_URI": f"{endpoint.url}/v1/aws?{query}",
        "AWS_CONTAINER_AUTHORIZATION_TOKEN": endpoint.bearer,
    }


class AgentAnswer:
    """An answer read in full: its status, its body, and whether the agent closes after it."""

    __slots__ = ("_body", "status", "will_close")

    def __init__(self, status: int, body: bytes, will_close: bool) -> None:
        self.status = status
        self._body = body
        self.will_close = will_close

    def read(self) -> bytes:
        return self._body


class AgentConnection:
    """One kept-alive HTTP/1.1 connection to the agent, with the part of `http.client`'s
    interface `AgentClient` uses (`request`, `getresponse`, `close`) and its exceptions.

    The agent (serve.py) is ours and gives every answer a Content-Length, so a request leaves in
    one write and an answer is read with one small parser. `http.client` writes a request's
    head and its body apart (two wake-ups of the agent) and parses an answer's head with the
    email package: about 0.4 ms more CPU per request (measured: 0.64 ms per request through
    http.client), on the path of the scheduling process and of every task's process.
    """

    MAX_HEAD = 64 * 1024
    MAX_BODY = 1024 * 1024  # the agent's answers are a few kB at most

    def __init__(self, host: str, port: int, *, timeout: float) -> None:
        self._address = (host, port)
        self._host_header = f"Host: {host}:{port}\r\n"
        self._timeout = timeout
        self._sock: socket.socket | None = None
        # What was read past the last answer: the start of the next one, when two requests
        # were sent before either answer was read (a task's launch).
        self._unread = bytearray()

    def request(
        self, method: str, path: str, body: bytes | None, headers: Mapping[str, str]
    ) -> None:
        if self._sock is None:
            sock = socket.create_connection(self._address, self._timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sock = sock
        data = body or b""
        fields = [f"{name}: {value}" for name, value in headers.items()]
        if any(c in text for text in (path, *fields) for c in "\r\n"):
            # A bearer from the environment with a line break in it, say: never sent as is.
            raise http.client.HTTPException("a line break in a request's head")
        head = [f"{method} {path} HTTP/1.1\r\n", self._host_header]
        head += [f"{field}\r\n" for field in fields]
        head.append(f"Content-Length: {len(data)}\r\n\r\n")
        self._sock.sendall("".join(head).encode("latin-1") + data)

    def getresponse(self) -> AgentAnswer:
        sock = self._sock
        if sock is None:
            raise http.client.ResponseNotReady("no request sent")
        buffer, self._unread = self._unread, bytearray()
        while (end := buffer.find(b"\r\n\r\n")) < 0:
            chunk = sock.recv(8192)
            if not chunk:
                if not buffer:
                    # Closed with no answer: the agent dropped a kept-alive connection.
                    raise http.client.RemoteDisconnected("the agent closed the connection")
                raise http.client.IncompleteRead(bytes(buffer))
            buffer += chunk
            if len(buffer) > self.MAX_HEAD:
                raise http.client.LineTooLong("answer head")
        lines = bytes(buffer[:end]).decode("latin-1").split("\r\n")
        version, _, rest = lines[0].partition(" ")
        code = rest[:3]
        if not version.startswith("HTTP/1.") or not code.isdigit():
            raise http.client.BadStatusLine(lines[0])
        fields = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
        length = fields.get("content-length", "")
        if not length.isdigit() or int(length) > self.MAX_BODY:
            raise http.client.HTTPException("answer without a usable Content-Length")
        size = int(length)
        body = bytes(buffer[end + 4 :])
        while len(body) < size:
            chunk = sock.recv(size - len(body))
            if not chunk:
                raise http.client.IncompleteRead(body)
            body += chunk
        self._unread = bytearray(body[size:])
        will_close = version == "HTTP/1.0" or fields.get("connection", "").lower() == "close"
        return AgentAnswer(int(code), body[:size], will_close)

    def close(self) -> None:
        sock, self._sock = self._sock, None
        self._unread = bytearray()
        if sock is not None:
            sock.close()


class AgentClient:
    """Mints through a running agent; what task processes and subprocesses use.

    A small HTTP/1.1 client of its own (`AgentConnection`) on one kept-alive connection: a
    task's process pays neither an HTTP stack's import nor a connection per request.
    Thread-safe (one request at a time); make one per process: a connection is never used by
    two processes (a task's launch connection is handed over whole: luigi_creds/launch.py).
    """

    def __init__(self, endpoint: AgentEndpoint, *, timeout: float = 120.0) -> None:
        self.endpoint = endpoint
        parts = urlsplit(endpoint.url)
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or 80
        self._timeout = timeout
        self._lock = threading.Lock()
        self._conn: AgentConnection | None = None

    def __repr__(self) -> str:
        return f"AgentClient({self.endpoint.url!r})"

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __del__(self) -> None:
        # A client dropped without close() must not leave its kept-alive socket to the GC.
        conn = getattr(self, "_conn", None)
        if conn is not None:
            conn.close()

    def scoped(
        self,
        grants: Sequence[str] | None,
        task: str | None,
        *,
        delegate: bool = False,
        pid: int | None = None,
    ) -> AgentEndpoint:
        """A bearer for a narrower scope (a task's own grants, or a delegate for a scheduling
        process); the agent refuses what this client's own bearer does not cover."""
        body = {
            "grants": None if grants is None else list(grants),
            "task": task,
            "delegate": delegate,
            "pid": pid,
        }
        payload = self._call("POST", "/v1/bearer", body, what="a task's bearer")
        endpoint, _ = self._task_start_answer(payload, None)
        return endpoint

    def task_bearer(
        self,
        grants: Sequence[str],
        task: str,
        *,
        pid: int | None,
        aws_grant: str | None,
        wait: bool = True,
    ) -> tuple[AgentEndpoint, AwsCredentials | None]:
        """A bearer for `task` and `grants`; the agent starts minting `aws_grant` for the task
        at once and, with `wait`, returns it in the same round trip (a refusal raises, naming
        the grant). Without `wait`, `aws()` later waits for that same mint."""
        body, what = _task_start_body(grants, task, pid, aws_grant, wait)
        payload = self._call("POST", "/v1/bearer", body, what=what, grant=aws_grant)
        return self._task_start_answer(payload, aws_grant if wait else None)

    def start_task(
        self, grants: Sequence[str], task: str, *, pid: int | None, aws_grant: str | None
    ) -> Callable[[], tuple[AgentEndpoint, AwsCredentials | None]]:
        """`task_bearer(..., wait=True)` in two halves: the request is sent now, and the
        returned callable reads the answer (the task's bearer and its first AWS credentials).
        The caller sets the task up in between, while the agent and the broker mint, and the
        whole start costs one round trip on one connection. The callable must be called once;
        this client sends nothing else on that connection until then."""
        body, what = _task_start_body(grants, task, pid, aws_grant, True)

        def again() -> dict[str, Any]:
            return self._call("POST", "/v1/bearer", body, what=what, grant=aws_grant)

        read = self._send_now("/v1/bearer", body, what=what, grant=aws_grant, again=again)
        return lambda: self._task_start_answer(read(), aws_grant)

    def send_launch(
        self,
        grants: Sequence[str],
        task: str,
        aws_grant: str | None,
        durations: Mapping[str, int | None] | None = None,
    ) -> AgentConnection:
        """For a scheduling process, just before it forks `task`'s process: a connection of
        its own on which the request for the task's bearer has been sent, the agent starting
        the task's AWS mint at once. Nothing is read here: the forked process reads the answers
        (`read_launch`), and this process closes its copy of the connection once it has sent
        `send_bind` after the fork. With `durations` (a CredentialsMixin task), each of
        `grants` is minted for the task meanwhile, for `send_bind(..., minted=True)`."""
        body, what = _task_start_body(grants, task, None, aws_grant, False)
        if durations is not None:
            body["mint"] = [{"grant": g, "duration": durations.get(g)} for g in grants]
        conn = self._connect()
        self._send_unread(conn, "/v1/bearer", body, what, aws_grant)
        return conn

    def send_bind(
        self,
        conn: AgentConnection,
        task: str,
        pid: int,
        aws_grant: str | None,
        *,
        minted: bool = False,
    ) -> None:
        """After the fork, on the launch's connection: bind `task`'s bearer to its process
        `pid` (the agent releases the task when the process is gone) and ask for the task's
        first AWS credential (and, with `minted`, the credentials `send_launch` started), for
        the forked process to read (`read_launch`)."""
        body = {"task": task, "pid": pid, "aws": aws_grant, "minted": minted}
        self._send_unread(conn, "/v1/claim", body, "a task's process", aws_grant)

    def _send_unread(
        self,
        conn: AgentConnection,
        path: str,
        body: Mapping[str, Any],
        what: str,
        grant: str | None,
    ) -> None:
        data = json.dumps(body).encode()
        try:
            conn.request("POST", path, body=data, headers=self._headers(data))
        except OSError as exc:
            conn.close()
            raise self._unreachable(what, grant, exc) from None

    def _send_now(
        self,
        path: str,
        body: Mapping[str, Any],
        *,
        what: str,
        grant: str | None,
        again: Callable[[], dict[str, Any]],
    ) -> Callable[[], dict[str, Any]]:
        """Send a POST now and return the callable that reads its answer (once). The connection
        is this client's kept-alive one, taken out of the pool until the answer is read, so
        the client's other requests meanwhile use a connection of their own. A kept-alive
        connection that the agent had closed while idle is retried once with `again` (the
        whole request in one call)."""
        data = json.dumps(body).encode()
        headers = self._headers(data)
        with self._lock:
            conn, self._conn = self._conn, None
        reused = conn is not None
        try:
            if conn is None:
                conn = self._connect()
            conn.request("POST", path, body=data, headers=headers)
        except (OSError, http.client.HTTPException) as exc:
            if conn is not None:
                conn.close()
            if reused:
                payload = again()
                return lambda: payload
            raise self._unreachable(what, grant, exc) from None
        return self._reader(conn, what, grant, again if reused else None)

    def read_answer(self, conn: AgentConnection, what: str) -> dict[str, Any]:
        """The answer to a request this client sent on `conn` without reading it (`send_launch`);
        the connection is kept for this client's next request."""
        return self._reader(conn, what, None)()

    def _reader(
        self,
        sent: AgentConnection,
        what: str,
        grant: str | None,
        again: Callable[[], dict[str, Any]] | None = None,
    ) -> Callable[[], dict[str, Any]]:
        """The callable that reads the answer to a request already sent on `sent`, then keeps
        the connection for this client's next request. `again` asks once more if the agent
        had closed a kept-alive connection before answering."""

        def read() -> dict[str, Any]:
            try:
                response = sent.getresponse()
                raw = response.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as exc:
                sent.close()
                if again is not None:
                    return again()
                raise self._unreachable(what, grant, exc) from None
            except (OSError, http.client.HTTPException) as exc:
                sent.close()
                raise self._unreachable(what, grant, exc) from None
            with self._lock:
                if response.will_close or self._conn is not None:
                    sent.close()
                else:
                    self._conn = sent
            return _payload(response.status, raw, 200, what, grant)

        return read

    def start_minting(
        self,
        grants: Sequence[str],
        task: str,
        *,
        pid: int | None,
        durations: Mapping[str, int | None],
    ) -> tuple[AgentEndpoint, dict[str, Credential]]:
        """A bearer for `task` and `grants`, and each of `grants` minted for the task (with its
        duration from `durations`), in one round trip: a CredentialsMixin task's start. If one
        mint fails, the agent ends the new scope and this raises its refusal, naming the grant."""
        body = {
            "grants": list(grants),
            "task": task,
            "pid": pid,
            "mint": [{"grant": g, "duration": durations.get(g)} for g in grants],
        }
        payload = self._call("POST", "/v1/bearer", body, what=f"grants {list(grants)!r}")
        endpoint, _ = self._task_start_answer(payload, None)
        minted = payload.get("minted")
        if not isinstance(minted, dict) or set(minted) != set(grants):
            raise BrokerError(
                "credential agent answered a start request with a malformed body",
                error="invalid_response",
            )
        return endpoint, {g: _credential_from_wire(minted[g], g) for g in grants}

    def _task_start_answer(
        self, payload: dict[str, Any], aws_grant: str | None
    ) -> tuple[AgentEndpoint, AwsCredentials | None]:
        bearer = payload.get("bearer")
        aws = payload.get("aws") or {}
        if not isinstance(bearer, str) or not bearer or not isinstance(aws, dict):
            raise BrokerError(
                "credential agent answered a bearer request with a malformed body",
                error="invalid_response",
            )
        first = _aws_from_body(aws_grant, aws.get(aws_grant)) if aws_grant else None
        return AgentEndpoint(self.endpoint.url, bearer), first

    def handing_over(self, endpoint: AgentEndpoint) -> AgentClient:
        """A client for `endpoint` (a narrower bearer on the same agent) that takes over this
        client's kept-alive connection: the agent checks the bearer of every request, not of
        the connection, so a task goes on where its start request left off."""
        client = AgentClient(endpoint, timeout=self._timeout)
        with self._lock:
            client._conn, self._conn = self._conn, None
        return client

    def release(self, task: str | None = None, *, wait: bool = True) -> None:
        """End this client's own task scope, or (a delegating client) `task`: the agent forgets
        the task's bearers and releases its Vault credentials in the background.

        Without `wait` the request is sent and the connection closed without reading the
        answer (a task process about to exit has no use for it: nothing it does depends on
        the release, which the agent carries out all the same). Only a failure to send raises.
        """
        body = {"task": task}
        if wait:
            self._call("POST", "/v1/release", body, what="a release", expect=204)
            return
        data = json.dumps(body).encode()
        with self._lock:
            conn, self._conn = self._conn, None
        conn = conn or self._connect()
        try:
            conn.request("POST", "/v1/release", body=data, headers=self._headers(data))
        except (OSError, http.client.HTTPException) as exc:
            raise self._unreachable("a release", None, exc) from None
        finally:
            # The request is in the kernel's hands; closing sends it on, then the FIN.
            conn.close()

    def revoke_lease(self, lease_id: str) -> None:
        """Ask the agent to revoke one Vault lease of the job's session (BrokerError if not)."""
        body = {"lease_id": lease_id}
        self._call("POST", "/v1/revoke-lease", body, what="a lease revoke", expect=204)

    def aws(self, grant: str, task: str | None = None) -> AwsCredentials:
        """The agent's cached AWS credentials for (grant, task), as the AWS SDKs get them."""
        query = f"grant={quote(grant, safe='')}" + (f"&task={quote(task, safe='')}" if task else "")
        body = self._call("GET", f"/v1/aws?{query}", None, what=f"grant {grant!r}", grant=grant)
        return _aws_from_body(grant, body)

    def summary(self) -> dict[str, Any]:
        """What the job's agent minted so far (luigi_creds/summary.py; nothing secret)."""
        return self._call("GET", "/v1/summary", None, what="the job summary")

    def mint(self, grant: str, task: str | None = None, duration: int | None = None) -> Credential:
        body: dict[str, Any] = {"grant": grant, "task": task}
        if duration is not None:
            body["duration"] = duration
        payload = self._call("POST", "/v1/mint", body, what=f"grant {grant!r}", grant=grant)
        return _credential_from_wire(payload, grant)

    def _call(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None,
        *,
        what: str,
        expect: int = 200,
        grant: str | None = None,
    ) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        headers = self._headers(data)
        with self._lock:
            try:
                status, raw = self._send(method, path, data, headers)
            except (OSError, http.client.HTTPException) as exc:
                raise self._unreachable(what, grant, exc) from None
        return _payload(status, raw, expect, what, grant)

    def _headers(self, data: bytes | None) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self.endpoint.bearer}"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        return headers

    def _connect(self) -> AgentConnection:
        return AgentConnection(self._host, self._port, timeout=self._timeout)

    def _unreachable(self, what: str, grant: str | None, exc: BaseException) -> BrokerError:
        return BrokerError(
            f"the job's credential agent at {self.endpoint.url} is unreachable for "
            f"{what} ({type(exc).__name__}); did the process that started the job exit?",
            error="unreachable",
            grant=grant,
        )

    def _send(
        self, method: str, path: str, data: bytes | None, headers: dict[str, str]
    ) -> tuple[int, bytes]:
        for attempt in (1, 2):
            conn = self._conn
            reused = conn is not None
            if conn is None:
                conn = self._connect()
            self._conn = None
            try:
                conn.request(method, path, body=data, headers=headers)
                response = conn.getresponse()
                raw = response.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                conn.close()
                # A kept-alive connection the agent closed while idle: send once more on a
                # new one. A fresh connection that fails is a real failure.
                if not reused or attempt == 2:
                    raise
                continue
            except BaseException:
                conn.close()
                raise
            if response.will_close:
                conn.close()
            else:
                self._conn = conn
            return response.status, raw
        raise AssertionError("unreachable")  # pragma: no cover


def read_launch(
    url: str, conn: AgentConnection, *, timeout: float = 120.0
) -> tuple[AgentClient, Callable[[], dict[str, Any]]]:
    """In a task's forked process, on the connection its scheduling process launched it on
    (`send_launch`, then `send_bind`): the task's own client, from the first answer (its
    bearer; a refusal raises), and the callable that reads the second (the task's first
    credentials once the agent's mints are done, see `launched_aws` and `launched_minted`; a
    refusal raises). The client goes on on that connection once both are read. Call the
    callable once."""
    what = "a task's bearer"
    try:
        response = conn.getresponse()
        payload = _payload(response.status, response.read(), 200, what, None)
    except (OSError, http.client.HTTPException) as exc:
        conn.close()
        raise AgentClient(AgentEndpoint(url, ""))._unreachable(what, None, exc) from None
    except BrokerError:
        conn.close()
        raise
    bearer = payload.get("bearer")
    if not isinstance(bearer, str) or not bearer:
        conn.close()
        raise BrokerError(
            "credential agent answered a bearer request with a malformed body",
            error="invalid_response",
        )
    client = AgentClient(AgentEndpoint(url, bearer), timeout=timeout)
    return client, client._reader(conn, "a task's first credentials", None)


def launched_aws(payload: Mapping[str, Any], grant: str) -> AwsCredentials:
    """The AWS credentials for `grant` in a launch's second answer."""
    aws = payload.get("aws")
    return _aws_from_body(grant, aws.get(grant) if isinstance(aws, dict) else None)


def launched_minted(payload: Mapping[str, Any], grants: Sequence[str]) -> dict[str, Credential]:
    """The credentials of each of `grants` in a launch's second answer (`minted`)."""
    minted = payload.get("minted")
    if not isinstance(minted, dict) or set(minted) != set(grants):
        raise BrokerError(
            "credential agent answered a task's start with a malformed body",
            error="invalid_response",
        )
    return {g: _credential_from_wire(minted[g], g) for g in grants}


def _task_start_body(
    grants: Sequence[str], task: str, pid: int | None, aws_grant: str | None, wait: bool
) -> tuple[dict[str, Any], str]:
    body = {
        "grants": list(grants),
        "task": task,
        "pid": pid,
        "aws": [aws_grant] if aws_grant else [],
        "wait": wait,
    }
    return body, (f"grant {aws_grant!r}" if aws_grant else "a task's bearer")


def _payload(status: int, raw: bytes, expect: int, what: str, grant: str | None) -> dict[str, Any]:
    """The JSON object of an answer; a BrokerError with the agent's reason unless `expect`."""
    try:
        payload = json.loads(raw) if raw else {}
    except ValueError:
        payload = {}
    payload = payload if isinstance(payload, dict) else {}
    if status != expect:
        description = payload.get("error_description")
        request_id = payload.get("request_id")
        raise BrokerError(
            description
            if isinstance(description, str)
            else f"credential agent answered HTTP {status} for {what}",
            error=str(payload.get("error") or f"http_{status}"),
            status=status,
            request_id=request_id if isinstance(request_id, str) else None,
            grant=grant,
        )
    return payload


def _credential_from_wire(payload: Any, grant: str) -> Credential:
    """A credential from the agent's mint answer (the broker's 200 shape; BrokerError if
    malformed)."""
    try:
        cred = parse_credential(payload, grant=grant, now=datetime.now(UTC))
        expires_at = payload.get("expires_at")
        if isinstance(expires_at, str) and not isinstance(cred, AwsCredentials):
            cred = cred.replace(expires_at=datetime.fromisoformat(expires_at))
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise BrokerError(
            f"credential agent answered grant {grant!r} with a malformed credential",
            error="invalid_response",
            status=200,
            grant=grant,
        ) from exc
    return cred


def _aws_from_body(grant: str, body: Any) -> AwsCredentials:
    """AWS credentials from a container-credentials answer (BrokerError if malformed)."""
    try:
        return AwsCredentials(
            grant=grant,
            request_id="",
            access_key_id=body["AccessKeyId"],
            secret_access_key=body["SecretAccessKey"],
            session_token=body["Token"],
            expires_at=parse_time(body["Expiration"]),
        )
    except (KeyError, TypeError, ValueError):
        raise BrokerError(
            f"credential agent answered grant {grant!r} with malformed AWS credentials",
            error="invalid_response",
            grant=grant,
        ) from None
