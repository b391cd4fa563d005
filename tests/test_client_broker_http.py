"""luigi_creds.broker_http against real local HTTP and HTTPS servers: kept-alive connections,
a connection the server closed while idle, failures as httpx's types (what BrokerClient retries),
TLS verification, and the proxy rule that keeps httpx."""

from __future__ import annotations

import json
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from pki import TestCA

from broker.dev.processes import free_port
from luigi_creds.broker_http import BrokerHttp, needs_proxy


class Server:
    """A broker stand-in: answers every POST with the form it got; counts connections."""

    def __init__(self, *, close_idle: bool = False, hold: threading.Event | None = None) -> None:
        self.connections = 0
        self.forms: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                server.connections += 1
                super().setup()

            def do_POST(self) -> None:
                form = self.rfile.read(int(self.headers["Content-Length"])).decode()
                server.forms.append(form)
                if hold is not None:
                    hold.wait(10)
                body = json.dumps({"form": form, "ctype": self.headers["Content-Type"]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("DPoP-Nonce", "n-1")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                if close_idle:
                    # Closed after answering, without saying so: as a server ending an idle
                    # kept-alive connection does.
                    self.close_connection = True

            def log_message(self, *args: Any) -> None:
                pass

        self.closed = threading.Semaphore(0)  # released each time the server closes one

        class Httpd(ThreadingHTTPServer):
            def shutdown_request(self, request: Any) -> None:
                super().shutdown_request(request)
                server.closed.release()

        self.httpd = Httpd(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server()
    yield s
    s.stop()


def test_requests_share_one_kept_alive_connection(server: Server) -> None:
    http = BrokerHttp(timeout=5)
    for n in range(3):
        answer = http.post(
            server.url + "/v1/token", data={"grant_type": "refresh_token", "n": str(n)}, headers={}
        )
        assert answer.status_code == 200
        assert answer.headers.get("dpop-nonce") == "n-1"
        assert answer.json() == {
            "form": f"grant_type=refresh_token&n={n}",
            "ctype": "application/x-www-form-urlencoded",
        }
    assert server.connections == 1
    http.close()


def test_a_request_leaves_in_one_write(server: Server, socket_writes: list[bytes]) -> None:
    """Head and form body go to the socket together (http.client alone writes them apart)."""
    writes = socket_writes
    http = BrokerHttp(timeout=5)
    answer = http.post(server.url + "/v1/token", data={"grant_type": "x"}, headers={"A": "b"})
    assert answer.status_code == 200
    # (The stand-in server's answers are written in this process too.)
    (request,) = [w for w in writes if w.startswith(b"POST")]
    assert b"grant_type=x" not in writes  # no body written on its own
    assert request.startswith(b"POST /v1/token HTTP/1.1\r\n")
    assert request.endswith(b"\r\n\r\ngrant_type=x")
    http.close()


def test_a_connection_the_server_closed_while_idle_is_never_sent_on() -> None:
    server = Server(close_idle=True)
    try:
        http = BrokerHttp(timeout=5)
        for _ in range(3):
            assert http.post(server.url + "/v1/token", data={}, headers={}).status_code == 200
            # The server's close has happened before the next request (not racing it).
            assert server.closed.acquire(timeout=10)
        assert server.connections == 3 and len(server.forms) == 3
        http.close()
    finally:
        server.stop()


def test_no_listener_is_a_connect_error_which_the_client_may_retry() -> None:
    http = BrokerHttp(timeout=5)
    with pytest.raises(httpx.ConnectError):
        http.post(f"http://127.0.0.1:{free_port()}/v1/token", data={}, headers={})


def test_no_answer_in_time_is_a_read_timeout_never_retried() -> None:
    hold = threading.Event()
    server = Server(hold=hold)
    try:
        with pytest.raises(httpx.ReadTimeout):
            BrokerHttp(timeout=0.3).post(server.url + "/v1/token", data={}, headers={})
        assert server.forms == [""]  # it had left: the handle may be spent
    finally:
        hold.set()
        server.stop()


def test_tls_is_verified_against_the_given_cas(tmp_path: Path) -> None:
    ca = TestCA.create(tmp_path / "ca", "luigi-creds test CA")
    cert, key = ca.issue_server(tmp_path / "server")
    server = Server()
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    server.httpd.socket = tls.wrap_socket(server.httpd.socket, server_side=True)
    url = server.url.replace("http://", "https://") + "/v1/token"
    try:
        trusting = BrokerHttp(timeout=5, context=ssl.create_default_context(cafile=ca.cert_file))
        assert trusting.post(url, data={"a": "b"}, headers={}).json()["form"] == "a=b"
        trusting.close()
        # httpx's default trust (certifi) does not know the test CA: refused before sending.
        with pytest.raises(httpx.ConnectError):
            BrokerHttp(timeout=5).post(url, data={"a": "c"}, headers={})
        assert server.forms == ["a=b"]
    finally:
        server.stop()


def test_a_proxy_in_the_environment_keeps_httpx(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    assert not needs_proxy("https://broker.example.com")
    monkeypatch.setenv("https_proxy", "http://proxy.example.com:3128")
    assert needs_proxy("https://broker.example.com")
    monkeypatch.setenv("no_proxy", "broker.example.com")
    assert not needs_proxy("https://broker.example.com")
