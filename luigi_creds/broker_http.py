"""HTTP/1.1 to the broker on the standard library: kept-alive form POSTs for the job's agent.

Owns how `BrokerClient`'s requests travel when nothing stands between the job and the broker:
`http.client` connections, one per request in flight and kept alive for the next (a session on
several refresh chains posts several mints at once), TLS verified with the SSL context httpx would
have built (certifi's CAs, `SSL_CERT_FILE`/`SSL_CERT_DIR`, or `[luigi_creds] ca_bundle`), the
client's timeout on connecting and on every read, redirects never followed. Failures are raised as
httpx's exception types, so `BrokerClient`'s rules hold unchanged: a connection that could not be
made (`ConnectError`, `ConnectTimeout`) is retried, anything after the request left is not.

Why not httpx here: measured on one loopback exchange of the agent's shape, httpx spends about
1.0 ms of the caller's CPU per request, `http.client` 0.33 ms; the agent makes one request per
task on machines whose cores the tasks share. A broker reached through a proxy (`HTTP(S)_PROXY`,
`ALL_PROXY` and `NO_PROXY`, as httpx reads them) keeps httpx (`needs_proxy`).
"""

from __future__ import annotations

import http.client
import select
import socket
import ssl
import threading
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlencode, urlsplit
from urllib.request import getproxies_environment, proxy_bypass

import httpx

__all__ = ["BrokerAnswer", "BrokerHttp", "needs_proxy"]

_Key = tuple[str, str, int]


def needs_proxy(url: str) -> bool:
    """True if the environment routes `url` through a proxy (then httpx, which speaks it)."""
    parts = urlsplit(url)
    proxies = getproxies_environment()
    if not (proxies.get(parts.scheme) or proxies.get("all")):
        return False
    return not proxy_bypass(parts.hostname or "")


class BrokerAnswer:
    """A broker's answer as `BrokerClient` reads it: status, headers, the JSON body."""

    __slots__ = ("_body", "headers", "status_code")

    def __init__(self, status_code: int, headers: dict[str, str], body: bytes) -> None:
        self.status_code = status_code
        self.headers = headers  # names lower-cased: `headers.get("dpop-nonce")`
        self._body = body

    def json(self) -> Any:
        import json

        return json.loads(self._body)


class BrokerHttp:
    """Form POSTs over kept-alive HTTP/1.1 connections; thread-safe (a connection serves one
    request at a time, idle ones wait in a small pool per host)."""

    def __init__(
        self, *, timeout: float, context: ssl.SSLContext | None = None, max_idle: int = 8
    ) -> None:
        self._timeout = timeout
        self._context = context
        self._max_idle = max_idle
        self._lock = threading.Lock()
        self._idle: dict[_Key, list[http.client.HTTPConnection]] = {}

    def __repr__(self) -> str:
        return f"BrokerHttp(timeout={self._timeout})"

    def post(
        self, url: str, *, data: Mapping[str, str], headers: Mapping[str, str]
    ) -> BrokerAnswer:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise httpx.UnsupportedProtocol(f"cannot post to {parts.scheme!r} URLs")
        key = (parts.scheme, parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        body = urlencode(data).encode()
        sent = {**headers, "Content-Type": "application/x-www-form-urlencoded"}
        conn = self._pooled(key) or self._connect(key)
        try:
            conn.request("POST", target, body=body, headers=sent)
            response = conn.getresponse()
            raw = response.read()
        except TimeoutError as exc:
            conn.close()
            raise httpx.ReadTimeout(f"no answer within {self._timeout} s") from exc
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise httpx.ReadError(type(exc).__name__) from exc
        answer = BrokerAnswer(
            response.status, {k.lower(): v for k, v in response.getheaders()}, raw
        )
        if response.will_close:
            conn.close()
        else:
            self._keep(key, conn)
        return answer

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.close()

    def _pooled(self, key: _Key) -> http.client.HTTPConnection | None:
        while True:
            with self._lock:
                conns = self._idle.get(key)
                conn = conns.pop() if conns else None
            if conn is None:
                return None
            if not _dropped(conn):
                return conn
            conn.close()  # the broker closed it while idle: never send on it

    def _keep(self, key: _Key, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            conns = self._idle.setdefault(key, [])
            if len(conns) < self._max_idle:
                conns.append(conn)
                return
        conn.close()

    def _connect(self, key: _Key) -> http.client.HTTPConnection:
        scheme, host, port = key
        conn: http.client.HTTPConnection
        if scheme == "https":
            context = self._context
            if context is None:
                # The context httpx builds for verify=True (certifi, SSL_CERT_FILE/_DIR).
                context = self._context = httpx.create_ssl_context()
            conn = _OneWriteTLS(host, port, timeout=self._timeout, context=context)
        else:
            conn = _OneWrite(host, port, timeout=self._timeout)
        try:
            conn.connect()
        except TimeoutError as exc:
            conn.close()
            raise httpx.ConnectTimeout(f"connecting to {host}:{port} timed out") from exc
        except OSError as exc:  # refused, unreachable, a certificate that does not verify
            conn.close()
            raise httpx.ConnectError(
                f"cannot connect to {host}:{port}: {type(exc).__name__}"
            ) from exc
        if conn.sock is not None:
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn


class _OneWrite(http.client.HTTPConnection):
    """`http.client` writes a request's head and its body apart: two segments, two wake-ups of
    the broker's event loop per request. A bytes body is joined to the head and leaves in one
    write. (`_send_output` is http.client's own step from a buffered head to the socket, the
    same since Python 3.6; any other body goes through it unchanged.)"""

    def _send_output(self, message_body: Any = None, encode_chunked: bool = False) -> None:
        if not isinstance(message_body, bytes) or encode_chunked:
            super()._send_output(message_body, encode_chunked)  # type: ignore[misc]
            return
        buffered = self._buffer  # type: ignore[attr-defined]
        buffered.extend((b"", b""))
        request = b"\r\n".join(buffered) + message_body
        del buffered[:]
        self.send(request)


class _OneWriteTLS(_OneWrite, http.client.HTTPSConnection):
    pass


def _dropped(conn: http.client.HTTPConnection) -> bool:
    """An idle kept-alive connection with something to read has been closed (or broken) by the
    server: nothing is due on it between requests."""
    sock = conn.sock
    if sock is None:
        return True
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)
