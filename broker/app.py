"""The HTTP edge: form parsing, RFC 6749 error bodies, health, metrics, OpenAPI.

Owns everything that is HTTP and nothing that is policy: it checks framing (method, content
type, size, duplicate or unknown parameters), hands a `TokenRequest` to the exchange use case
in a worker thread, and maps `ExchangeError` to status codes. Talks to clients only.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from broker.dpop import NONCE_HEADER
from broker.errors import BrokerException
from broker.exchange import ExchangeError, Exchanger
from broker.logs import scrub
from broker.metrics import Metrics
from broker.mint import UpstreamError
from broker.protocol import (
    REVOKE_HINT_LEASE,
    REVOKE_HINT_REFRESH,
    ClientRequest,
    ExplainRequest,
    RevokeRequest,
    Timings,
    TokenRequest,
)
from broker.upstream_check import NotReady

log = logging.getLogger("broker.app")

_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
_TOKEN_FIELDS = frozenset(
    {
        "grant_type",
        "subject_token",
        "subject_token_type",
        "audience",
        "requested_token_type",
        "duration",
        "task",
        "refresh_token",
        # RFC 8693 / 6749 optional parameters we accept and ignore.
        "resource",
        "scope",
        "client_id",
    }
)
# refresh_token: the session proof that goes with revoking one of its Vault leases.
_REVOKE_FIELDS = frozenset({"token", "token_type_hint", "refresh_token"})
_EXPLAIN_FIELDS = frozenset({"subject_token", "subject_token_type", "refresh_token"})
# A form with more fields than we know is hostile; parse_qsl stops counting here.
_MAX_FIELDS = 16


class BadForm(BrokerException):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Readiness:
    """Named checks for /readyz; each raises (any exception) when not ready. `details` are
    shown in the body under their name and never change the status (e.g. the policy in force
    and a refused policy file: the old policy still serves, so the replica stays in rotation)."""

    checks: Mapping[str, Callable[[], None]]
    details: Mapping[str, Callable[[], Mapping[str, Any]]] = field(default_factory=dict)


def readiness_problem(exc: BaseException) -> str:
    """What /readyz and the log say about a failed check: operator-worded messages and the
    upstream's own error text (scrubbed); for anything else only the class name, since an
    arbitrary exception's text may carry an upstream payload."""
    if isinstance(exc, NotReady):
        return scrub(str(exc))
    if isinstance(exc, UpstreamError):
        return scrub(f"{exc.upstream or 'upstream'} {exc.reason}: {exc.detail or 'no detail'}")
    return type(exc).__name__


def new_request_id() -> str:
    return secrets.token_hex(10)


def error_response(
    exc: ExchangeError,
    request_id: str,
    *,
    server_timing: str = "",
    extra_headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    headers = {**_NO_STORE, **(extra_headers or {})}
    if server_timing:
        headers["Server-Timing"] = server_timing
    if exc.retry_after is not None:
        headers["Retry-After"] = str(exc.retry_after)
    body = {"error": exc.error, "error_description": exc.description, "request_id": request_id}
    return JSONResponse(body, status_code=exc.status, headers=headers)


async def read_form(request: Request, *, max_bytes: int, allowed: frozenset[str]) -> dict[str, str]:
    """Parse an application/x-www-form-urlencoded body strictly: one declared UTF-8 charset,
    a size cap checked before and while reading, no unknown or repeated parameters."""
    content_type = request.headers.get("content-type", "")
    media, _, params = content_type.partition(";")
    if media.strip().lower() != "application/x-www-form-urlencoded":
        raise BadForm(400, "bad_content_type")
    charset = params.strip().lower()
    if charset and charset not in ("charset=utf-8", 'charset="utf-8"'):
        raise BadForm(400, "bad_charset")
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > max_bytes):
        raise BadForm(413, "body_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > max_bytes:
            raise BadForm(413, "body_too_large")
    try:
        text = body.decode("ascii")
        pairs = parse_qsl(
            text,
            keep_blank_values=True,
            strict_parsing=bool(text),
            encoding="utf-8",
            errors="strict",
            max_num_fields=_MAX_FIELDS,
        )
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadForm(400, "bad_form_encoding") from exc
    form: dict[str, str] = {}
    for name, value in pairs:
        if name not in allowed:
            raise BadForm(400, "unknown_parameter")
        if name in form:
            # RFC 6749 §3.2: parameters MUST NOT be included more than once.
            raise BadForm(400, "repeated_parameter")
        form[name] = value
    return form


def create_app(
    exchanger: Exchanger,
    *,
    readiness: Readiness,
    metrics: Metrics,
    max_body_bytes: int,
    openapi: Mapping[str, Any],
    on_shutdown: Callable[[], None] | None = None,
) -> Starlette:
    def dpop_fields(request: Request) -> dict[str, Any]:
        """What a DPoP proof is checked against: its header values, the method and the URL
        (scheme and host as the client addressed us; through a trusted proxy, as it says)."""
        return {
            "dpop": tuple(request.headers.getlist("dpop")),
            "method": request.method,
            "url": str(request.url),
        }

    def nonce_header() -> dict[str, str]:
        # Every answer carries a current nonce (RFC 9449 §8.2), so a client rarely needs the
        # use_dpop_nonce round trip more than once per job.
        return {NONCE_HEADER: exchanger.dpop_nonce()}

    async def audited_form(
        request: Request, request_id: str, client: str, allowed: frozenset[str]
    ) -> dict[str, str]:
        """The request's form; a framing error is audited like any deny, then raised."""
        try:
            return await read_form(request, max_bytes=max_body_bytes, allowed=allowed)
        except BadForm as exc:
            req = ClientRequest(request_id=request_id, client_addr=client)
            await run_in_threadpool(exchanger.reject, req, exc.status, exc.reason)
            raise AssertionError("reject always raises") from exc  # pragma: no cover

    async def token(request: Request) -> Response:
        started = time.perf_counter()
        request_id = new_request_id()
        client = request.client.host if request.client else ""
        audience = ""
        timings = Timings()
        try:
            form = await audited_form(request, request_id, client, _TOKEN_FIELDS)
            req = TokenRequest(
                request_id=request_id,
                client_addr=client,
                grant_type=form.get("grant_type", ""),
                audience=form.get("audience", ""),
                subject_token=form.get("subject_token", ""),
                subject_token_type=form.get("subject_token_type", ""),
                requested_token_type=form.get("requested_token_type", ""),
                refresh_token=form.get("refresh_token", ""),
                duration=form.get("duration", ""),
                task=form.get("task", ""),
                timings=timings,
                **dpop_fields(request),
            )
            audience = req.audience
            issued = await run_in_threadpool(exchanger.handle, req)
        except ExchangeError as exc:
            # A grant label only once the caller authenticated: otherwise junk with
            # audience=<name> would tell anyone which grant names exist.
            grant = _known(audience, exchanger) if exc.authenticated else "-"
            metrics.requests.labels("token", grant, exc.error).inc()
            metrics.denials.labels("token", exc.reason).inc()
            return error_response(
                exc, request_id, server_timing=timings.header(), extra_headers=nonce_header()
            )
        finally:
            metrics.latency.labels("token").observe(time.perf_counter() - started)
        metrics.requests.labels("token", _known(audience, exchanger), "issued").inc()
        # Server-Timing: where the request's time went (verify, policy, state, audit, mint),
        # in milliseconds; durations only, nothing about the identity or the credential.
        headers = {**_NO_STORE, "Server-Timing": timings.header(), **nonce_header()}
        return JSONResponse(issued.wire(), headers=headers)

    async def revoke(request: Request) -> Response:
        request_id = new_request_id()
        client = request.client.host if request.client else ""
        try:
            form = await audited_form(request, request_id, client, _REVOKE_FIELDS)
            hint = form.get("token_type_hint", REVOKE_HINT_REFRESH)
            lease = hint == REVOKE_HINT_LEASE
            req = RevokeRequest(
                request_id=request_id,
                client_addr=client,
                refresh_token=form.get("refresh_token" if lease else "token", ""),
                lease_id=form.get("token", "") if lease else "",
                **dpop_fields(request),
            )
            if lease:
                await run_in_threadpool(exchanger.revoke_lease, req)
            elif hint != REVOKE_HINT_REFRESH:
                # RFC 7009 §2.2.1: refresh handles and our own leases are all we revoke.
                await run_in_threadpool(exchanger.reject, req, 400, "unsupported_token_type")
            else:
                await run_in_threadpool(exchanger.revoke, req)
        except ExchangeError as exc:
            metrics.requests.labels("revoke", "-", exc.error).inc()
            metrics.denials.labels("revoke", exc.reason).inc()
            return error_response(exc, request_id, extra_headers=nonce_header())
        metrics.requests.labels("revoke", "-", "revoked").inc()
        return Response(status_code=200, headers={**_NO_STORE, **nonce_header()})

    async def explain(request: Request) -> Response:
        request_id = new_request_id()
        client = request.client.host if request.client else ""
        try:
            form = await audited_form(request, request_id, client, _EXPLAIN_FIELDS)
            req = ExplainRequest(
                request_id=request_id,
                client_addr=client,
                subject_token=form.get("subject_token", ""),
                subject_token_type=form.get("subject_token_type", ""),
                refresh_token=form.get("refresh_token", ""),
                **dpop_fields(request),
            )
            answer = await run_in_threadpool(exchanger.explain, req)
        except ExchangeError as exc:
            metrics.requests.labels("explain", "-", exc.error).inc()
            metrics.denials.labels("explain", exc.reason).inc()
            return error_response(exc, request_id, extra_headers=nonce_header())
        metrics.requests.labels("explain", "-", "explained").inc()
        return JSONResponse(answer, headers={**_NO_STORE, **nonce_header()})

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        results: dict[str, str] = {}
        problems: dict[str, str] = {}
        for name, check in readiness.checks.items():
            try:
                await run_in_threadpool(check)
                results[name] = "ok"
            except Exception as exc:
                results[name] = "fail"
                problems[name] = readiness_problem(exc)
                log.warning("readiness check %s failed: %s", name, problems[name])
        ok = all(v == "ok" for v in results.values())
        body: dict[str, Any] = {"status": "ready" if ok else "not_ready", "checks": results}
        if problems:
            body["problems"] = problems
        for name, detail in readiness.details.items():
            body[name] = dict(detail())
        return JSONResponse(body, status_code=200 if ok else 503)

    async def metrics_endpoint(request: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def openapi_endpoint(request: Request) -> Response:
        return JSONResponse(dict(openapi))

    routes = [
        Route("/v1/token", token, methods=["POST"]),
        Route("/v1/revoke", revoke, methods=["POST"]),
        Route("/v1/explain", explain, methods=["POST"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        Route("/openapi.json", openapi_endpoint, methods=["GET"]),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        if on_shutdown is not None:
            await run_in_threadpool(on_shutdown)

    return Starlette(routes=routes, lifespan=lifespan)


def _known(grant: str, exchanger: Exchanger) -> str:
    """Label values come from config only, so a caller cannot blow up metric cardinality."""
    return grant if grant and exchanger.knows_grant(grant) else "-"
