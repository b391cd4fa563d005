"""A small keep-alive JSON client for the Vault call every exchange makes (token creation).

Why not hvac/requests here: measured on one OpenBao, sequential token creations cost about
1.3-1.7 ms of broker CPU each through hvac (a client object per call) and requests, 0.45-0.6 ms
through urllib3, and 0.25-0.3 ms on a kept-alive `http.client` connection. Every exchange makes
this call, and the broker shares its cores with Vault, so the cheapest client wins. hvac stays for
the rarer calls (login, renewal, revocation, dynamic secrets), where its coverage matters more.

One pool per process: idle connections are kept (LIFO, so the warm ones are reused) and a
connection is used by one thread at a time. Nothing is built per request but the body.
"""

from __future__ import annotations

import http.client
import json
import queue
import select
import ssl
import weakref
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from broker.mint import UpstreamError

# Idle connections kept; more concurrent callers open (and then close) extra ones.
_POOL_IDLE = 32


class Forbidden(Exception):
    """Vault answered 403: the broker's token is no longer good (log in again and retry)."""


def classify(status: int, detail: str = "") -> UpstreamError:
    """A non-2xx answer as the broker's error, by status, like the hvac table in vault.py;
    `detail` (Vault's own error text, for the operator's log) rides along."""
    if status in (401, 403):
        reason, retryable = "upstream_denied", False
    elif status in (412, 429) or status >= 500:
        # 412: a performance standby behind; 429: a quota; 5xx: sealed, down or broken.
        reason, retryable = "upstream_unavailable", True
    else:  # 400, 404, 405 and anything else: Vault refused what we asked
        reason, retryable = "upstream_rejected", False
    return UpstreamError(reason, retryable=retryable, upstream="vault", detail=detail)


def error_detail(status: int, data: bytes, method: str, path: str) -> str:
    """`HTTP <status>: <Vault's errors> on <METHOD> <path>`; the path never holds a token."""
    try:
        errors = json.loads(data).get("errors") or ()
        text = "; ".join(" ".join(str(e).split()) for e in errors)
    except (ValueError, AttributeError):
        text = ""
    return f"HTTP {status}: {text or 'no error text'} on {method} {path}"


class VaultHTTP:
    """POST JSON to one Vault server over pooled keep-alive connections."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float,
        ca_cert: Path | None = None,
        namespace: str | None = None,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("upstream.vault.url must be http:// or https://host[:port]")
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._https else 80)
        self._prefix = parts.path.rstrip("/")
        self._timeout = timeout
        self._context: ssl.SSLContext | None = None
        if self._https:
            self._context = ssl.create_default_context(
                cafile=str(ca_cert) if ca_cert is not None else None
            )
        self._base_headers = {"Content-Type": "application/json"}
        if namespace:
            self._base_headers["X-Vault-Namespace"] = namespace
        self._idle: queue.LifoQueue[http.client.HTTPConnection] = queue.LifoQueue(_POOL_IDLE)
        # Idle connections close with the client, whoever drops it last.
        weakref.finalize(self, _close_all, self._idle)

    def __repr__(self) -> str:
        return f"VaultHTTP({self._host}:{self._port})"

    def post(self, path: str, token: str, body: dict[str, Any]) -> dict[str, Any]:
        """The decoded JSON answer of a 2xx; Forbidden on 403; UpstreamError otherwise."""
        payload = json.dumps(body, separators=(",", ":")).encode()
        headers = {**self._base_headers, "X-Vault-Token": token}
        conn = self._checkout()
        try:
            conn.request("POST", self._prefix + path, body=payload, headers=headers)
            response = conn.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException) as exc:
            # Refused, reset, timed out: the outcome is unknown, so never retried here (a second
            # POST could create a second token); the caller's bounded retries decide.
            conn.close()
            raise UpstreamError("upstream_unavailable", retryable=True) from exc
        if response.will_close:
            conn.close()
        else:
            self._checkin(conn)
        if response.status == 403:
            raise Forbidden()
        if not 200 <= response.status < 300:
            path_only = self._prefix + path
            raise classify(response.status, error_detail(response.status, data, "POST", path_only))
        try:
            answer = json.loads(data)
        except ValueError as exc:
            raise UpstreamError("upstream_unavailable", retryable=True) from exc
        if not isinstance(answer, dict):
            raise UpstreamError("upstream_unavailable", retryable=True)
        return answer

    def _checkout(self) -> http.client.HTTPConnection:
        while True:
            try:
                conn = self._idle.get_nowait()
            except queue.Empty:
                break
            if _usable(conn):
                return conn
            conn.close()
        if self._https:
            return http.client.HTTPSConnection(
                self._host, self._port, timeout=self._timeout, context=self._context
            )
        return http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)

    def _checkin(self, conn: http.client.HTTPConnection) -> None:
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
    """False if the server closed this idle connection (it is readable: EOF or junk).

    Checked before reuse, so a request is never sent on a connection Vault already dropped
    (its idle timeout); a request that then fails is a real failure, not a stale socket.
    """
    sock = conn.sock
    if sock is None:
        return True  # not connected yet: connects on first use
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return False
    return not readable
