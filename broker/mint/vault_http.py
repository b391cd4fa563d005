"""A small keep-alive JSON client for the Vault call every exchange makes (token creation).

Why not hvac/requests here: measured on one OpenBao, sequential token creations cost about
1.3-1.7 ms of broker CPU each through hvac (a client object per call) and requests, 0.45-0.6 ms
through urllib3, and 0.25-0.3 ms on a kept-alive `http.client` connection, less again on the
lean HTTP/1.1 exchange of broker/mint/keepalive.py (one send per request, no `email` header
parser). Every exchange makes this call, and the broker shares its cores with Vault, so the
cheapest client wins. hvac stays for the rarer calls (login, renewal, revocation, dynamic
secrets), where its coverage matters more.

One pool per process (broker/mint/keepalive.py). Nothing is built per request but the body.
"""

from __future__ import annotations

import json
import ssl
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from broker.errors import BrokerException
from broker.mint import UpstreamError
from broker.mint.keepalive import BadResponse, ConnectionPool


class Forbidden(BrokerException):
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
        self._prefix = parts.path.rstrip("/")
        context = None
        if parts.scheme == "https":
            context = ssl.create_default_context(
                cafile=str(ca_cert) if ca_cert is not None else None
            )
        self._pool = ConnectionPool(parts, timeout=timeout, context=context)
        self._base_headers = {"Content-Type": "application/json"}
        if namespace:
            self._base_headers["X-Vault-Namespace"] = namespace

    def __repr__(self) -> str:
        return f"VaultHTTP({self._pool.host}:{self._pool.port})"

    def post(self, path: str, token: str, body: dict[str, Any]) -> dict[str, Any]:
        """The decoded JSON answer of a 2xx; Forbidden on 403; UpstreamError otherwise."""
        payload = json.dumps(body, separators=(",", ":")).encode()
        headers = {**self._base_headers, "X-Vault-Token": token}
        conn = self._pool.checkout()
        try:
            response = conn.request("POST", self._prefix + path, headers, payload)
        except (OSError, BadResponse) as exc:
            # Refused, reset, timed out, garbled: the outcome is unknown, so never retried here
            # (a second POST could create a second token); the caller's bounded retries decide.
            raise UpstreamError("upstream_unavailable", retryable=True) from exc
        self._pool.checkin(conn, response)
        data = response.body
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

    def close(self) -> None:
        self._pool.close()
