"""One keep-alive `http.client` connection pool per upstream server (Vault, STS).

Idle connections are kept (LIFO, so the warm ones are reused) and a connection is used by one
thread at a time; more concurrent callers than idle slots open (and then close) extra ones.
A pooled connection the server has since closed is dropped before reuse, so a request is never
sent on a socket the server already cut (its idle timeout); a request that then fails is a real
failure, not a stale socket.
"""

from __future__ import annotations

import http.client
import queue
import select
import ssl
import weakref
from urllib.parse import SplitResult

# Idle connections kept per pool.
_POOL_IDLE = 32


class ConnectionPool:
    """Keep-alive connections to one http(s) server."""

    def __init__(
        self, parts: SplitResult, *, timeout: float, context: ssl.SSLContext | None = None
    ) -> None:
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("expected an http:// or https://host[:port] URL")
        self.https = parts.scheme == "https"
        self.host = parts.hostname
        self.port = parts.port or (443 if self.https else 80)
        self._timeout = timeout
        self._context = context
        if self.https and context is None:
            self._context = ssl.create_default_context()
        self._idle: queue.LifoQueue[http.client.HTTPConnection] = queue.LifoQueue(_POOL_IDLE)
        # Idle connections close with the pool, whoever drops it last.
        weakref.finalize(self, _close_all, self._idle)

    def __repr__(self) -> str:
        return f"ConnectionPool({self.host}:{self.port})"

    def checkout(self) -> http.client.HTTPConnection:
        while True:
            try:
                conn = self._idle.get_nowait()
            except queue.Empty:
                break
            if _usable(conn):
                return conn
            conn.close()
        if self.https:
            return http.client.HTTPSConnection(
                self.host, self.port, timeout=self._timeout, context=self._context
            )
        return http.client.HTTPConnection(self.host, self.port, timeout=self._timeout)

    def checkin(self, conn: http.client.HTTPConnection, response: http.client.HTTPResponse) -> None:
        """Return `conn` after its `response` was read in full (closed if the server said so)."""
        if response.will_close:
            conn.close()
            return
        try:
            self._idle.put_nowait(conn)
        except queue.Full:
            conn.close()

    def close(self) -> None:
        _close_all(self._idle)


def _close_all(idle: queue.LifoQueue[http.client.HTTPConnection]) -> None:
    while True:
        try:
            idle.get_nowait().close()
        except queue.Empty:
            return


def _usable(conn: http.client.HTTPConnection) -> bool:
    """False if the server closed this idle connection (it is readable: EOF or junk)."""
    sock = conn.sock
    if sock is None:
        return True  # not connected yet: connects on first use
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return False
    return not readable
