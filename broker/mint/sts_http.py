"""A small SigV4-signed keep-alive client for the STS Query API calls the broker makes.

Why not boto3 here: every AWS exchange makes one AssumeRole, and through a boto3 client that
call cost 2.4-2.9 ms of client CPU (request building and validation through the service model,
event hooks, the retry handler, XML parsing through the model), more than the rest of the
exchange; this client cost about 1.1 ms on the same calls (both measured against moto, which
closes the connection after each answer, so a TCP connect is in both), and 0.3 ms since it signs
with its own signer (sigv4.py; botocore's `SigV4Auth` was the largest part of the call's client
CPU once the rest was lean), sends on the lean keep-alive client (keepalive.py) and finds the
answer's few fixed elements by a direct walk. The answer is parsed with ElementTree after
refusing anything with a DTD. (In-process, against a canned STS answer with a connect per call:
0.97 ms of client CPU per AssumeRole with SigV4Auth and http.client, 0.30 ms now.)

boto3 still resolves what it is good at: the regional endpoint, once at startup, and the
broker's credentials through its default chain (kept by the boto3 session once found;
refreshable credentials refresh themselves).

No retries here: the exchange retries retryable failures itself, each attempt after its own
durable `intent`, so an attempt the audit does not know about is never made.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

from broker.errors import BrokerException
from broker.mint.keepalive import BadResponse, ConnectionPool
from broker.mint.sigv4 import FrozenCredentials, SigV4Signer

STS_API_VERSION = "2011-06-15"
_FORM = "application/x-www-form-urlencoded; charset=utf-8"


@dataclass(frozen=True)
class StsRefusal(BrokerException):
    """STS answered with an error: its code, HTTP status, own message and request id."""

    code: str
    status: int
    message: str
    request_id: str

    def __str__(self) -> str:
        return f"{self.code or 'error'} (HTTP {self.status})"


class StsUnreachable(BrokerException):
    """No answer from STS (refused, reset, timed out) or one that is not an STS answer."""


class StsHTTP:
    """Signed Query API POSTs to one STS endpoint over pooled keep-alive connections."""

    def __init__(
        self, endpoint_url: str, region: str, credentials: Callable[[], Any], *, timeout: float
    ) -> None:
        """`credentials()`: the broker's botocore credentials (plain or refreshable), or None
        while none can be found; asked once per call, so a broker started before its instance
        profile answered becomes able to mint without a restart (and is not ready until then)."""
        parts = urlsplit(endpoint_url)
        self._path = (parts.path.rstrip("/") or "") + "/"
        self._pool = ConnectionPool(parts, timeout=timeout)
        self._region = region
        self._credentials = credentials
        self._signer = SigV4Signer(
            host=self._pool.host_header, path=self._path, region=region, service="sts"
        )

    def __repr__(self) -> str:
        return f"StsHTTP({self._pool.host}:{self._pool.port}, {self._region})"

    def call(self, action: str, params: Mapping[str, str]) -> ET.Element:
        """The `<{action}Result>` element of a 200 answer; StsRefusal or StsUnreachable else."""
        body = _form({"Action": action, "Version": STS_API_VERSION, **params})
        credentials = self._credentials()
        if credentials is None:
            raise StsUnreachable("no AWS credentials found for the broker")
        # Frozen per call: a refreshable set may rotate between reading its three parts (and
        # refreshes itself here when near its expiry).
        frozen = credentials.get_frozen_credentials()
        headers = self._signer.headers(
            FrozenCredentials(frozen.access_key, frozen.secret_key, frozen.token), body, _FORM
        )
        conn = self._pool.checkout()
        try:
            response = conn.request("POST", self._path, headers, body)
        except (OSError, BadResponse) as exc:
            raise StsUnreachable(f"{type(exc).__name__}: {exc}") from exc
        self._pool.checkin(conn, response)
        root = _parse(response.body)
        if response.status != 200:
            raise _refusal(response.status, root)
        result = None if root is None else _find(root, f"{action}Result")
        if result is None:
            raise StsUnreachable(f"HTTP {response.status} without a {action}Result")
        return result

    def close(self) -> None:
        self._pool.close()


# Characters a form value keeps as they are (`quote(..., safe="")` leaves these alone).
_UNRESERVED = re.compile(r"[A-Za-z0-9_.~-]*")


# ASCII characters outside the unreserved set, each to its percent escape (as `quote` writes).
_ESCAPES = {c: f"%{c:02X}" for c in range(128) if not _UNRESERVED.fullmatch(chr(c))}


def _escaped(text: str) -> str:
    if _UNRESERVED.fullmatch(text):
        return text
    if text.isascii():
        return text.translate(_ESCAPES)  # one C loop, not `quote`'s per-byte Python
    return quote(text, safe="")


def _form(fields: Mapping[str, str]) -> bytes:
    """`urlencode(fields, quote_via=quote)`, quoting only what needs it (most values are plain)."""
    return "&".join(_escaped(k) + "=" + _escaped(v) for k, v in fields.items()).encode("ascii")


def text(parent: ET.Element, path: str) -> str:
    """The text at `path` (namespace-agnostic, `/`-separated); StsUnreachable if absent."""
    node = _find(parent, path)
    if node is None or not node.text:
        raise StsUnreachable(f"the STS answer has no {path}")
    return node.text


def _parse(data: bytes) -> ET.Element | None:
    # STS answers never carry a DTD, comments or CDATA; refusing `<!` keeps entity expansion
    # (and anything else a DTD enables) out of the parser entirely.
    if b"<!" in data:
        return None
    try:
        return ET.fromstring(data)  # noqa: S314 (no DTD can reach here: refused above)
    except ET.ParseError:
        return None


def _refusal(status: int, root: ET.Element | None) -> StsRefusal:
    # The Query API's two error shapes, as botocore reads them: <ErrorResponse><Error> (STS)
    # and <Response><Errors><Error> (other Query services, and moto's IAM enforcement).
    def find(*paths: str) -> str:
        for path in paths:
            node = None if root is None else _find(root, path)
            if node is not None and node.text:
                return node.text
        return ""

    return StsRefusal(
        code=find("Error/Code", "Errors/Error/Code"),
        status=status,
        message=" ".join(find("Error/Message", "Errors/Error/Message").split()),
        request_id=find("RequestId", "RequestID", "ResponseMetadata/RequestId"),
    )


def _find(parent: ET.Element, path: str) -> ET.Element | None:
    """The first element at `path` (`/`-separated local names) in any namespace or none: what
    ElementTree's `{*}a/{*}b` finds, walked directly (ElementPath compiles and dispatches per
    call, which was most of reading an answer)."""
    node = parent
    for step in path.split("/"):
        suffix = "}" + step
        for child in node:
            tag = child.tag
            if tag == step or (tag.endswith(suffix) and tag.startswith("{")):
                node = child
                break
        else:
            return None
    return node
