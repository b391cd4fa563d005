"""Fault injectors for crash and outage tests: a delaying HTTP reverse proxy and an SQLite lock.

`start_delaying_proxy` puts a slow hop between the broker and an upstream (moto's STS) so that
requests sit between the broker's `intent` record and its `issued` record long enough to be cut
by a SIGKILL; it also counts what reached the upstream, the ground truth for "every upstream call
follows an intent record".
`hold_sqlite_write_lock` takes an SQLite database's write lock from the test process, so every
writer in the broker waits on its busy timeout (the audit sink hangs);
`hold_pg_audit_head_lock` does the same to the PostgreSQL ledger's head row.
Talks to the upstream over loopback HTTP, to SQLite files and to PostgreSQL (psycopg).
"""

from __future__ import annotations

import contextlib
import http.client
import select
import socket
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psycopg

# Headers that belong to one hop (RFC 9110 §7.6.1) and are not forwarded either way.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# Seconds the proxy waits on the upstream; moto answers in milliseconds.
_UPSTREAM_TIMEOUT = 30.0
# How often a held request checks whether its client is still there.
_POLL_SECONDS = 0.01


def _hung_up(sock: socket.socket) -> bool:
    """True when the client closed its end: the request was read whole, so readable means EOF."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:  # reset by the peer: gone as well
        return True


@dataclass(frozen=True)
class ProxiedRequest:
    """One request that reached the upstream through the proxy (form fields of a POST)."""

    method: str
    path: str
    form: dict[str, list[str]]

    @property
    def action(self) -> str:
        return self.form.get("Action", [""])[0]


class DelayingProxy:
    """A reverse proxy in front of `upstream` that sleeps before forwarding and before answering.

    `delay_before` models a slow network to STS (the call has not happened yet); `delay_after`
    a slow answer (the call happened, the broker has not heard). Both are changeable while it runs.
    A request whose client hangs up during `delay_before` is dropped, never forwarded, as a call
    that had not left a killed process would be; `dropped()` lists those.
    """

    def __init__(self, upstream: str, *, delay_before: float, delay_after: float) -> None:
        parts = urllib.parse.urlsplit(upstream)
        if parts.scheme != "http" or parts.hostname is None or parts.port is None:
            raise ValueError("the proxy forwards to http://host:port only")
        self._upstream = (parts.hostname, parts.port)
        self.delay_before = delay_before
        self.delay_after = delay_after
        self._lock = threading.Lock()
        self._requests: list[ProxiedRequest] = []
        self._dropped: list[ProxiedRequest] = []
        # phase -> {id of a held request: monotonic time its hold ends}
        self._held: dict[str, dict[int, float]] = {"before": {}, "after": {}}
        self._in_flight = 0
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def in_flight(self) -> int:
        """Requests received and not yet answered (or abandoned by a dead client)."""
        with self._lock:
            return self._in_flight

    def waiting(self, phase: str, *, min_left: float = 0.0) -> int:
        """Requests now held `before` the upstream call or `after` it, for `min_left` s more."""
        now = time.monotonic()
        with self._lock:
            return sum(end - now >= min_left for end in self._held[phase].values())

    def dropped(self, action: str | None = None) -> list[ProxiedRequest]:
        """Requests whose client left before they were forwarded; the upstream never saw them."""
        with self._lock:
            seen = list(self._dropped)
        return [r for r in seen if action is None or r.action == action]

    def requests(self, action: str | None = None) -> list[ProxiedRequest]:
        """What reached the upstream so far, oldest first; only `action` (AssumeRole) if given."""
        with self._lock:
            seen = list(self._requests)
        return [r for r in seen if action is None or r.action == action]

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Block until nothing is in flight, or raise TimeoutError."""
        deadline = time.monotonic() + timeout
        while self.in_flight:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.in_flight} proxied requests still in flight")
            time.sleep(0.02)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def _forward(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        request = ProxiedRequest(
            handler.command, handler.path, urllib.parse.parse_qs(body.decode("utf-8", "replace"))
        )
        with self._lock:
            self._in_flight += 1
        try:
            if not self._hold(handler, "before", self.delay_before, watch_client=True):
                with self._lock:
                    self._dropped.append(request)
                return
            with self._lock:
                self._requests.append(request)
            status, reason, headers, payload = self._ask_upstream(handler, body)
            self._hold(handler, "after", self.delay_after, watch_client=False)
            # NOTE: a broker killed meanwhile has closed its socket; the answer goes nowhere.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                handler.send_response(status, reason)
                for name, value in headers:
                    if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                        handler.send_header(name, value)
                handler.send_header("Content-Length", str(len(payload)))
                handler.send_header("Connection", "close")
                handler.end_headers()
                handler.wfile.write(payload)
        finally:
            with self._lock:
                self._in_flight -= 1

    def _hold(
        self, handler: BaseHTTPRequestHandler, phase: str, seconds: float, *, watch_client: bool
    ) -> bool:
        """Sleep `seconds` in `phase`; False as soon as a watched client has hung up."""
        deadline = time.monotonic() + seconds
        key = threading.get_ident()
        with self._lock:
            self._held[phase][key] = deadline
        try:
            while (left := deadline - time.monotonic()) > 0:
                time.sleep(min(left, _POLL_SECONDS))
                if watch_client and _hung_up(handler.connection):
                    return False
            return True
        finally:
            with self._lock:
                del self._held[phase][key]

    def _ask_upstream(
        self, handler: BaseHTTPRequestHandler, body: bytes
    ) -> tuple[int, str, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(*self._upstream, timeout=_UPSTREAM_TIMEOUT)
        try:
            # Host and the SigV4 headers pass unchanged: the signature covers them.
            headers = {k: v for k, v in handler.headers.items() if k.lower() not in _HOP_BY_HOP}
            conn.request(handler.command, handler.path, body=body, headers=headers)
            response = conn.getresponse()
            return response.status, response.reason, response.getheaders(), response.read()
        finally:
            conn.close()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            # HTTP/1.0 default: one request per connection, so a closed socket ends one request.
            def do_GET(self) -> None:
                proxy._forward(self)

            def do_POST(self) -> None:
                proxy._forward(self)

            def log_message(self, format: str, *args: object) -> None:
                """Silent: the test asserts on requests(), not on a log."""

        return Handler


def start_delaying_proxy(
    upstream: str, *, delay_before: float = 0.2, delay_after: float = 0.2
) -> DelayingProxy:
    """A DelayingProxy on a free loopback port, already serving."""
    return DelayingProxy(upstream, delay_before=delay_before, delay_after=delay_after)


@contextlib.contextmanager
def hold_sqlite_write_lock(path: Path) -> Iterator[sqlite3.Connection]:
    """Hold `BEGIN EXCLUSIVE` on the SQLite file at `path` until the block ends.

    In WAL mode this blocks every other writer (they wait on their busy timeout, then fail) while
    readers go on; the block's own connection may still read.
    """
    # timeout=10: the lock is taken while the broker is idle; waiting is only for a stray writer.
    conn = sqlite3.connect(path, timeout=10.0, isolation_level=None)
    try:
        conn.execute("BEGIN EXCLUSIVE")
        try:
            yield conn
        finally:
            conn.execute("ROLLBACK")
    finally:
        conn.close()


@contextlib.contextmanager
def hold_pg_audit_head_lock(url: str) -> Iterator[psycopg.Connection[Any]]:
    """Hold the audit ledger's head row (`SELECT ... FOR UPDATE`) until the block ends.

    Every append locks that row first (broker/audit/ledger.py), so each one, and each write
    transaction that carries one, waits out the store's lock timeout; writes without an audit
    record stay possible.
    """
    with psycopg.connect(url) as conn:
        conn.execute("SELECT 1 FROM audit_head WHERE id = 1 FOR UPDATE")
        try:
            yield conn
        finally:
            conn.rollback()
