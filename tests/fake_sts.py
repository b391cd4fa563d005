"""A scripted STS Query API server on loopback, for unit tests of the exchange's STS handling.

Answers each POST with the next queued XML answer (AWS's own shapes) and records the request's
form and headers, so a test sees exactly what the broker sent over a real socket. Signatures
are checked for shape only; tests/test_aws_enforced.py runs against moto, which verifies them.
"""

from __future__ import annotations

import threading
from collections import deque
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs
from xml.sax.saxutils import escape

_NS = "https://sts.amazonaws.com/doc/2011-06-15/"


class FakeSts:
    def __init__(self) -> None:
        self.answers: deque[tuple[int, str]] = deque()
        self.requests: list[tuple[dict[str, str], dict[str, str]]] = []
        self.client_ports: list[int] = []  # the broker's side of each request's connection
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body leave at once

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                form = {k: v[0] for k, v in parse_qs(body.decode(), keep_blank_values=True).items()}
                fake.requests.append((form, {k.lower(): v for k, v in self.headers.items()}))
                fake.client_ports.append(self.client_address[1])
                status, xml = fake.answers.popleft() if fake.answers else fake._unscripted()
                data = xml.encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/xml")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                return None

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def _unscripted(self) -> tuple[int, str]:
        return error_answer("InternalFailure", "the test queued no answer for this call", 500)

    def add_credentials(
        self, access_key_id: str, secret: str, session_token: str, expiration: datetime
    ) -> None:
        stamp = expiration.strftime("%Y-%m-%dT%H:%M:%SZ")
        self.answers.append(
            (
                200,
                f'<AssumeRoleResponse xmlns="{_NS}"><AssumeRoleResult><Credentials>'
                f"<AccessKeyId>{access_key_id}</AccessKeyId>"
                f"<SecretAccessKey>{secret}</SecretAccessKey>"
                f"<SessionToken>{session_token}</SessionToken>"
                f"<Expiration>{stamp}</Expiration></Credentials>"
                "<AssumedRoleUser><Arn>arn:aws:sts::123456789012:assumed-role/r/s</Arn>"
                "<AssumedRoleId>AROAEXAMPLE:s</AssumedRoleId></AssumedRoleUser>"
                "</AssumeRoleResult><ResponseMetadata><RequestId>req-ok</RequestId>"
                "</ResponseMetadata></AssumeRoleResponse>",
            )
        )

    def add_error(self, code: str, status: int, message: str = "refused") -> None:
        self.answers.append(error_answer(code, message, status))

    def add_raw(self, status: int, body: str) -> None:
        self.answers.append((status, body))

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def error_answer(code: str, message: str, status: int) -> tuple[int, str]:
    return (
        status,
        f'<ErrorResponse xmlns="{_NS}"><Error><Type>Sender</Type><Code>{code}</Code>'
        f"<Message>{escape(message)}</Message></Error>"
        f"<RequestId>4f1c-{status}</RequestId></ErrorResponse>",
    )
