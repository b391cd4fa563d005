"""Tests for broker.mint.keepalive: the lean HTTP/1.1 exchange against a real socket server
that answers canned bytes (what Vault or STS could send, well-formed or not)."""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from pki import TestCA

from broker.mint.keepalive import BadResponse, ConnectionPool


class Canned:
    """A one-connection-at-a-time server: reads one request head+body, answers the next canned
    answer, and records what it received."""

    def __init__(self, answers: list[bytes]) -> None:
        self.answers = answers
        self.requests: list[bytes] = []
        self.connections = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while self.answers:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                buf = b""
                while self.answers:
                    while b"\r\n\r\n" not in buf:
                        data = conn.recv(65536)
                        if not data:
                            break
                        buf += data
                    if b"\r\n\r\n" not in buf:
                        break
                    head, _, rest = buf.partition(b"\r\n\r\n")
                    length = 0
                    for line in head.split(b"\r\n")[1:]:
                        name, _, value = line.partition(b":")
                        if name.lower() == b"content-length":
                            length = int(value)
                    while len(rest) < length:
                        rest += conn.recv(65536)
                    self.requests.append(head + b"\r\n\r\n" + rest[:length])
                    buf = rest[length:]
                    answer = self.answers.pop(0)
                    conn.sendall(answer)
                    if answer.endswith(b"<close>"):
                        break

    def close(self) -> None:
        self._listener.close()


@pytest.fixture
def serve() -> Iterator[type[Canned]]:
    made: list[Canned] = []

    class Made(Canned):
        def __init__(self, answers: list[bytes]) -> None:
            super().__init__(answers)
            made.append(self)

    yield Made
    for server in made:
        server.close()


def pool(server: Canned) -> ConnectionPool:
    return ConnectionPool(urlsplit(f"http://127.0.0.1:{server.port}"), timeout=5)


def ask(p: ConnectionPool, body: bytes = b"{}") -> tuple[int, bytes, dict[str, str]]:
    conn = p.checkout()
    response = conn.request("POST", "/v1/x", {"X-Token": "t"}, body)
    p.checkin(conn, response)
    return response.status, response.body, response.headers


def test_one_buffer_per_request_with_host_and_length(serve: type[Canned]) -> None:
    server = serve([b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"])
    p = pool(server)
    assert ask(p, b'{"a":1}')[:2] == (200, b"ok")
    p.close()
    assert server.requests == [
        b"POST /v1/x HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nX-Token: t\r\nContent-Length: 7\r\n\r\n"
        b'{"a":1}' % server.port
    ]


def test_content_length_and_chunked_answers_keep_the_connection(serve: type[Canned]) -> None:
    server = serve(
        [
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
            b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3;ext=1\r\nabc\r\nA\r\n0123456789\r\n0\r\nTrailer: x\r\n\r\n",
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n",
            b"HTTP/1.1 400 Bad\r\ncontent-length: 3\r\nX-A: 1\r\nX-A: 2\r\n\r\nbad",
        ]
    )
    p = pool(server)
    assert ask(p)[:2] == (200, b"hello")
    assert ask(p)[:2] == (201, b"abc0123456789")
    assert ask(p)[:2] == (204, b"")
    status, body, headers = ask(p)
    assert (status, body, headers["x-a"]) == (400, b"bad", "1, 2")
    assert server.connections == 1
    p.close()


def test_an_answer_read_to_the_end_of_the_connection_closes_it(serve: type[Canned]) -> None:
    server = serve([b"HTTP/1.0 200 OK\r\n\r\nall of it<close>", b"HTTP/1.1 200 OK\r\n\r\n"])
    p = pool(server)
    conn = p.checkout()
    response = conn.request("POST", "/", {}, b"")
    assert (response.body, response.will_close) == (b"all of it<close>", True)
    p.checkin(conn, response)
    assert conn.sock is None


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/2 200 OK\r\n\r\n",
        b"SMTP 220 hello\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nBad Name: x\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length : 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n folded: x\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nabc",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x3\r\nabc\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcd\r\n0\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\nshort<close>",
        b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70_000 + b"\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n" + b"X: a\r\n" * 101 + b"\r\n",
    ],
)
def test_malformed_answers_are_refused_and_the_connection_dropped(
    serve: type[Canned], answer: bytes
) -> None:
    if not answer.endswith(b"<close>"):
        answer += b"<close>"  # the server hangs up after it, as a broken one would
    server = serve([answer])
    p = pool(server)
    conn = p.checkout()
    with pytest.raises(BadResponse):
        conn.request("POST", "/", {}, b"")
    assert conn.sock is None


def test_bytes_after_an_answer_mean_the_connection_is_not_reused(serve: type[Canned]) -> None:
    server = serve([b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA"])
    conn = pool(server).checkout()
    assert conn.request("POST", "/", {}, b"").will_close
    conn.close()


def test_a_request_head_cannot_be_split(serve: type[Canned]) -> None:
    server = serve([b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"])
    conn = pool(server).checkout()
    for target, headers in (
        ("/a b", {}),
        ("/a\r\nX: y", {}),
        ("/", {"X-Vault-Token": "t\r\nX-Evil: 1"}),
        ("/", {"Bad Name": "v"}),
        ("/", {"X": "\x00"}),
    ):
        with pytest.raises(ValueError):
            conn.request("POST", target, headers, b"")
    conn.close()
    assert server.requests == []


def test_https_answers_are_read_over_tls_with_the_given_ca(tmp_path: Path) -> None:
    """An https:// pool wraps its socket with the caller's context (server name checked) and
    reads answers through TLS like plain ones; a server the CA did not sign is refused."""
    ca = TestCA.create(tmp_path / "ca", "keepalive test CA")
    cert, key = ca.issue_server(tmp_path / "server")
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        with server_context.wrap_socket(listener.accept()[0], server_side=True) as conn:
            for answer in (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",) * 2:
                head = b""
                while not head.endswith(b"\r\n\r\n{}"):
                    head += conn.recv(65536)
                conn.sendall(answer)
        stranger, _ = listener.accept()
        with stranger, contextlib.suppress(OSError):  # the client refuses our certificate
            server_context.wrap_socket(stranger, server_side=True)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    trusting = ssl.create_default_context(cafile=str(ca.cert_file))
    p = ConnectionPool(urlsplit(f"https://127.0.0.1:{port}"), timeout=5, context=trusting)
    assert ask(p)[:2] == (200, b"ok")
    assert ask(p)[:2] == (200, b"ok")  # the same TLS connection, kept alive
    p.close()
    stranger = ConnectionPool(urlsplit(f"https://127.0.0.1:{port}"), timeout=5)
    conn = stranger.checkout()
    with pytest.raises(ssl.SSLCertVerificationError):
        conn.request("POST", "/", {}, b"{}")
    assert conn.sock is None
    thread.join(5)
    listener.close()


def test_a_silent_server_times_out_as_timeouterror_and_the_connection_is_dropped() -> None:
    """A plain connection's deadline comes from the kernel (SO_RCVTIMEO): an answer that never
    comes raises TimeoutError, like Python's own socket timeouts, and is never reused."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    thread = threading.Thread(target=lambda: accepted.append(listener.accept()[0]), daemon=True)
    thread.start()
    try:
        p = ConnectionPool(urlsplit(f"http://127.0.0.1:{listener.getsockname()[1]}"), timeout=0.2)
        conn = p.checkout()
        with pytest.raises(TimeoutError):
            conn.request("POST", "/v1/x", {}, b"{}")
        assert conn.sock is None  # closed: a late answer can never be read as the next one's
    finally:
        thread.join(5)
        for sock in accepted:
            sock.close()
        listener.close()
