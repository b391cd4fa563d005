"""AWS Signature Version 4 for the one kind of request the broker signs: a form-encoded STS
Query API POST to a fixed endpoint (broker/mint/sts_http.py).

Why not botocore's `SigV4Auth`: it rebuilds everything per request (an `AWSRequest`, the URL
split three times, a case-insensitive header map twice, every step through generic code) and
cost more than the rest of the STS call's client CPU, measured in-process. Here what is fixed
per endpoint (host, canonical path, scope suffix) is computed once, the day's signing key is
kept until the date or the secret changes, and a request costs two SHA-256 and two HMACs.
tests/test_sigv4.py checks the headers against botocore's `SigV4Auth` byte for byte, and moto
verifies every signature in the AWS integration tests.

The algorithm, for a body-carrying POST without a query string, signing every header sent
(Content-Type, Host, X-Amz-Date and, with temporary credentials, X-Amz-Security-Token):
  canonical request = method, path, "", "name:value" lines (lower-case names, sorted, values
                      whitespace-collapsed), "", signed names, hex SHA-256 of the body
  string to sign    = "AWS4-HMAC-SHA256", timestamp, date/region/service/aws4_request,
                      hex SHA-256 of the canonical request
  key               = HMAC chain of "AWS4"+secret over date, region, service, "aws4_request"
"""

from __future__ import annotations

import hashlib
import hmac
import time
from typing import NamedTuple
from urllib.parse import quote

from botocore.utils import normalize_url_path

_ALGORITHM = "AWS4-HMAC-SHA256"


class FrozenCredentials(NamedTuple):
    """One consistent set (botocore's `get_frozen_credentials()` gives this shape)."""

    access_key: str
    secret_key: str
    token: str | None


class SigV4Signer:
    """Signs POSTs to one endpoint (`host` as sent in the Host header, `path` as requested)."""

    def __init__(self, *, host: str, path: str, region: str, service: str) -> None:
        self._host = " ".join(host.split())
        self._path = quote(normalize_url_path(path), safe="/~")
        self._region = region
        self._service = service
        self._scope_tail = f"/{region}/{service}/aws4_request"
        self._key: tuple[str, str, bytes] | None = None  # (secret, date, signing key)

    def headers(
        self,
        credentials: FrozenCredentials,
        body: bytes,
        content_type: str,
        *,
        timestamp: str | None = None,
    ) -> dict[str, str]:
        """The headers to send with `body`: Content-Type, X-Amz-Date, X-Amz-Security-Token
        (with temporary credentials) and Authorization. `timestamp` (`YYYYMMDDTHHMMSSZ`, UTC)
        only for tests; the current time otherwise."""
        amz_date = timestamp or time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        date = amz_date[:8]
        token = credentials.token
        canonical = [
            "POST",
            self._path,
            "",
            "content-type:" + " ".join(content_type.split()),
            "host:" + self._host,
            "x-amz-date:" + amz_date,
        ]
        if token:
            canonical.append("x-amz-security-token:" + " ".join(token.split()))
            signed = "content-type;host;x-amz-date;x-amz-security-token"
        else:
            signed = "content-type;host;x-amz-date"
        canonical += ["", signed, hashlib.sha256(body).hexdigest()]
        scope = date + self._scope_tail
        to_sign = "\n".join(
            (
                _ALGORITHM,
                amz_date,
                scope,
                hashlib.sha256("\n".join(canonical).encode("utf-8")).hexdigest(),
            )
        )
        signature = hmac.new(
            self._signing_key(credentials.secret_key, date), to_sign.encode("utf-8"), "sha256"
        ).hexdigest()
        headers = {"Content-Type": content_type, "X-Amz-Date": amz_date}
        if token:
            headers["X-Amz-Security-Token"] = token
        headers["Authorization"] = (
            f"{_ALGORITHM} Credential={credentials.access_key}/{scope},"
            f" SignedHeaders={signed}, Signature={signature}"
        )
        return headers

    def _signing_key(self, secret: str, date: str) -> bytes:
        kept = self._key
        if kept is not None and kept[0] == secret and kept[1] == date:
            return kept[2]
        key = ("AWS4" + secret).encode("utf-8")
        for part in (date, self._region, self._service, "aws4_request"):
            key = hmac.digest(key, part.encode("utf-8"), "sha256")
        self._key = (secret, date, key)
        return key
