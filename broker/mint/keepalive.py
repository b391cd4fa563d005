"""A lean keep-alive HTTP/1.1 client: one connection pool per upstream server (Vault, STS).

Why not `http.client`: measured in-process on the per-exchange Vault call, `http.client` spent
most of its client CPU outside the socket: header lines put one by one, headers and body in two
`sendall`s (two send syscalls), and every answer's headers parsed through the `email` package.
Here a request is one buffer and one send, and an answer is read with a small reader that knows
what the broker's upstream calls need: a status line, header lines, and a body framed by
`Content-Length`, `Transfer-Encoding: chunked` or the connection's end. Anything else (a status
line that is not HTTP/1.x, a header line without a colon, two different lengths, a transfer
coding other than chunked, an oversized line, header block or body, bytes after the answer) is
refused as `BadResponse` and the connection is closed.

Idle connections are kept (LIFO, so the warm ones are reused) and a connection is used by one
thread at a time; more concurrent callers than idle slots open (and then close) extra ones.
A pooled connection the server has since closed is dropped before reuse, so a request is never
sent on a socket the server already cut (its idle timeout); a request that then fails is a real
failure, not a stale socket. No retries here: the callers decide (a POST is never re-sent).
"""

from __future__ import annotations

import contextlib
import re
import select
import socket
import ssl
import struct
import weakref
from collections.abc import Mapping
from urllib.parse import SplitResult

from broker.errors import BrokerException

# Idle connections kept per pool.
_POOL_IDLE = 32
# Bounds on an answer: the broker's upstream answers are a few kilobytes.
_MAX_LINE = 64 * 1024
_MAX_HEADERS = 100
_MAX_BODY = 16 * 1024 * 1024
_RECV = 64 * 1024
_HEX = re.compile(rb"[0-9A-Fa-f]{1,15}")


class BadResponse(BrokerException):
    """The server's answer is not well-formed HTTP/1.1, is too large, or was cut short."""


class Response:
    """A complete answer: status, headers (names lower-cased), the body, and whether the
    connection must be closed after it."""

    __slots__ = ("body", "headers", "status", "will_close")

    def __init__(self, status: int, headers: dict[str, str], body: bytes, will_close: bool) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.will_close = will_close


class Connection:
    """One HTTP/1.1 connection, opened on first use and kept alive between requests."""

    def __init__(
        self, host: str, port: int, host_header: str, timeout: float, context: ssl.SSLContext | None
    ) -> None:
        self._host = host
        self._port = port
        self._host_header = host_header
        self._timeout = timeout
        self._context = context
        self.sock: socket.socket | None = None
        self._buf = b""

    def request(
        self, method: str, target: str, headers: Mapping[str, str], body: bytes
    ) -> Response:
        """Send one request (one `sendall`) and read its whole answer.

        OSError if the connection fails, BadResponse for an answer that is not HTTP; either way
        the connection is closed and must not be reused.
        """
        head = [f"{method} {_checked(target, _TARGET)} HTTP/1.1\r\nHost: {self._host_header}\r\n"]
        for name, value in headers.items():
            head.append(f"{_checked(name, _NAME)}: {_checked(value, _VALUE)}\r\n")
        head.append(f"Content-Length: {len(body)}\r\n\r\n")
        data = "".join(head).encode("latin-1") + body
        try:
            if self.sock is None:
                self._connect()
            assert self.sock is not None
            try:
                self.sock.sendall(data)
            except BlockingIOError as exc:  # SO_SNDTIMEO ran out (see _connect)
                raise TimeoutError("timed out") from exc
            return self._response(method)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        sock, self.sock = self.sock, None
        self._buf = b""
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()

    def _connect(self) -> None:
        sock = socket.create_connection((self._host, self._port), timeout=self._timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._context is not None:
                sock = self._context.wrap_socket(sock, server_hostname=self._host)
            else:
                _kernel_timeouts(sock, self._timeout)
        except BaseException:
            sock.close()
            raise
        self.sock = sock

    # -- the answer ----------------------------------------------------------------------------

    def _response(self, method: str) -> Response:
        while True:
            version, status = self._status_line()
            headers = self._headers()
            if not 100 <= status < 200 or status == 101:
                break
            # 1xx (100 Continue and the like) precede the real answer; 101 we never ask for.
        if status == 101:
            raise BadResponse("unexpected 101 Switching Protocols")
        connection = headers.get("connection", "").lower()
        will_close = "close" in connection or (version == "1.0" and "keep-alive" not in connection)
        coding = headers.get("transfer-encoding")
        length = headers.get("content-length")
        if method == "HEAD" or status in (204, 304):
            body = b""
        elif coding is not None:
            if length is not None:
                # Both framings at once: a smuggling attempt or a broken proxy (RFC 9112 6.3).
                raise BadResponse("both Transfer-Encoding and Content-Length")
            if coding.lower() != "chunked":
                raise BadResponse("unsupported transfer coding")
            body = self._chunked()
        elif length is not None:
            body = self._exactly(_length(length))
        else:
            body = self._until_close()
            will_close = True
        if self._buf:
            # Bytes after a complete answer: nothing may follow it unasked.
            will_close = True
        return Response(status, headers, body, will_close)

    def _status_line(self) -> tuple[str, int]:
        line = self._line()
        parts = line.split(None, 2)
        if len(parts) < 2 or parts[0] not in (b"HTTP/1.1", b"HTTP/1.0"):
            raise BadResponse("not an HTTP/1.x status line")
        code = parts[1]
        if len(code) != 3 or not code.isdigit():
            raise BadResponse("bad status code")
        return parts[0][5:].decode(), int(code)

    def _headers(self) -> dict[str, str]:
        headers: dict[str, str] = {}
        for _ in range(_MAX_HEADERS + 1):
            line = self._line()
            if not line:
                return headers
            name, colon, value = line.partition(b":")
            if not colon or not name or name != name.strip() or b" " in name:
                raise BadResponse("malformed header line")
            key = name.decode("latin-1").lower()
            text = value.strip().decode("latin-1")
            if key in headers:
                if key == "content-length" and headers[key] != text:
                    raise BadResponse("conflicting Content-Length")
                if key != "content-length":
                    headers[key] = f"{headers[key]}, {text}"
            else:
                headers[key] = text
        raise BadResponse("too many header lines")

    def _chunked(self) -> bytes:
        parts: list[bytes] = []
        total = 0
        while True:
            size_text = self._line().split(b";", 1)[0].strip()
            if not _HEX.fullmatch(size_text):
                raise BadResponse("bad chunk size")
            size = int(size_text, 16)
            if size == 0:
                break
            total += size
            if total > _MAX_BODY:
                raise BadResponse("answer too large")
            parts.append(self._exactly(size))
            if self._line():
                raise BadResponse("chunk not followed by CRLF")
        for _ in range(_MAX_HEADERS + 1):  # trailer fields, ignored
            if not self._line():
                return b"".join(parts)
        raise BadResponse("too many trailer lines")

    def _line(self) -> bytes:
        """The next line without its line ending (CRLF, or a bare LF)."""
        start = 0
        while True:
            end = self._buf.find(b"\n", start)
            if end >= 0:
                line, self._buf = self._buf[:end], self._buf[end + 1 :]
                if line.endswith(b"\r"):
                    line = line[:-1]
                if len(line) > _MAX_LINE:
                    raise BadResponse("line too long")
                return line
            start = len(self._buf)
            if start > _MAX_LINE:
                raise BadResponse("line too long")
            self._fill()

    def _exactly(self, n: int) -> bytes:
        if n > _MAX_BODY:
            raise BadResponse("answer too large")
        if len(self._buf) < n:
            # Collected in parts: appending each read to one buffer would copy it every time.
            parts, have, self._buf = [self._buf], len(self._buf), b""
            while have < n:
                self._fill()
                parts.append(self._buf)
                have += len(self._buf)
                self._buf = b""
            self._buf = b"".join(parts)
        data, self._buf = self._buf[:n], self._buf[n:]
        return data

    def _until_close(self) -> bytes:
        parts = [self._buf]
        total = len(self._buf)
        self._buf = b""
        assert self.sock is not None
        while True:
            data = _recv(self.sock)
            if not data:
                return b"".join(parts)
            total += len(data)
            if total > _MAX_BODY:
                raise BadResponse("answer too large")
            parts.append(data)

    def _fill(self) -> None:
        assert self.sock is not None
        data = _recv(self.sock)
        if not data:
            raise BadResponse("the connection closed before the answer ended")
        self._buf += data


def _kernel_timeouts(sock: socket.socket, timeout: float) -> None:
    """Make `sock` block in the kernel, with `timeout` as SO_RCVTIMEO and SO_SNDTIMEO.

    Python's own timeout mode polls before every send and receive: two system calls each, and
    each one lets go of the GIL, which with many exchange threads means a thread switch. A
    plain socket gets the same deadline per call from the kernel instead (an expired one is an
    EAGAIN, raised here as TimeoutError). TLS sockets keep Python's timeouts: OpenSSL would
    report an EAGAIN as a want-read, not as a timeout.
    """
    sock.settimeout(None)
    seconds = int(timeout)
    value = struct.pack("ll", seconds, int((timeout - seconds) * 1_000_000))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(_RECV)
    except BlockingIOError as exc:  # SO_RCVTIMEO ran out
        raise TimeoutError("timed out") from exc


def _checked(text: str, forbidden: re.Pattern[str]) -> str:
    """`text` for a request head, if nothing in it matches `forbidden`; ValueError otherwise
    (never sent). Characters beyond Latin-1 fail when the head is encoded, also unsent."""
    if forbidden.search(text):
        raise ValueError("forbidden character in an HTTP request head")
    return text


# Control characters (CR/LF would split the head) everywhere; spaces in the target and in
# header names, colons in header names too.
_VALUE = re.compile(r"[\x00-\x1f\x7f]")
_TARGET = re.compile(r"[\x00-\x20\x7f]")
_NAME = re.compile(r"[\x00-\x20\x7f:]")


def _length(text: str) -> int:
    if not text.isdigit() or len(text) > 12:
        raise BadResponse("bad Content-Length")
    return int(text)


class ConnectionPool:
    """Keep-alive connections to one http(s) server."""

    def __init__(
        self, parts: SplitResult, *, timeout: float, context: ssl.SSLContext | None = None
    ) -> None:
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("expected an http:// or https://host[:port] URL")
        self.https = parts.scheme == "https"
        self.host = parts.hostname
        default = 443 if self.https else 80
        self.port = parts.port or default
        self._timeout = timeout
        self._context = context
        if self.https and context is None:
            self._context = ssl.create_default_context()
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = host if parts.port in (None, default) else f"{host}:{self.port}"
        # A plain list used as a stack: append and pop are atomic, and a queue.LifoQueue's
        # Condition cost more than the rest of checking a connection out and in. (Two threads
        # checking in at once may keep one more than _POOL_IDLE: harmless.)
        self._idle: list[Connection] = []
        # Idle connections close with the pool, whoever drops it last.
        weakref.finalize(self, _close_all, self._idle)

    def __repr__(self) -> str:
        return f"ConnectionPool({self.host}:{self.port})"

    def checkout(self) -> Connection:
        while True:
            try:
                conn = self._idle.pop()
            except IndexError:
                break
            if _usable(conn):
                return conn
            conn.close()
        return Connection(self.host, self.port, self.host_header, self._timeout, self._context)

    def checkin(self, conn: Connection, response: Response) -> None:
        """Return `conn` after its `response` was read in full (closed if the server said so)."""
        if response.will_close or len(self._idle) >= _POOL_IDLE:
            conn.close()
            return
        self._idle.append(conn)

    def close(self) -> None:
        _close_all(self._idle)


def _close_all(idle: list[Connection]) -> None:
    while True:
        try:
            idle.pop().close()
        except IndexError:
            return


def _usable(conn: Connection) -> bool:
    """False if the server closed this idle connection (it is readable: EOF or junk)."""
    sock = conn.sock
    if sock is None:
        return True  # not connected yet: connects on first use
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return False
    return not readable
