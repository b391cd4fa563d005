"""The HTTP edge: form parsing, RFC 6749 error bodies, health, metrics, OpenAPI.

Owns everything that is HTTP and nothing that is policy: it checks framing (method, content
type, size, duplicate or unknown parameters), hands a `TokenRequest` to the exchange use case
in a worker thread, and maps `ExchangeError` to status codes. Talks to clients only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import queue
import secrets
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypedDict, TypeVar
from urllib.parse import parse_qsl

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.datastructures import URL

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
T = TypeVar("T")
# ASGI's three arguments.
Scope = Mapping[str, Any]
Receive = Callable[[], Awaitable[Mapping[str, Any]]]
Send = Callable[[Mapping[str, Any]], Awaitable[None]]

_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
# What POST /v1/token accepts: TokenRequest's fields, and RFC 8693 / 6749 optional parameters
# we accept and ignore.
_TOKEN_FIELDS = frozenset(
    {
        "grant_type",
        "audience",
        "subject_token",
        "subject_token_type",
        "requested_token_type",
        "refresh_token",
        "duration",
        "task",
        "sibling_chains",
        "resource",
        "scope",
        "client_id",
    }
)
# refresh_token: the session proof that goes with revoking one of its Vault leases.
_REVOKE_FIELDS = frozenset({"token", "token_type_hint", "refresh_token"})
_EXPLAIN_FIELDS = frozenset({"subject_token", "subject_token_type", "refresh_token"})
# Every path the broker serves and its method (GET routes answer HEAD too).
ROUTES = {
    "/v1/token": "POST",
    "/v1/revoke": "POST",
    "/v1/explain": "POST",
    "/healthz": "GET",
    "/readyz": "GET",
    "/metrics": "GET",
    "/openapi.json": "GET",
}
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
) -> Answer:
    headers = {**_NO_STORE, **(extra_headers or {})}
    if server_timing:
        headers["Server-Timing"] = server_timing
    if exc.retry_after is not None:
        headers["Retry-After"] = str(exc.retry_after)
    body = {"error": exc.error, "error_description": exc.description, "request_id": request_id}
    return json_answer(body, status=exc.status, headers=headers)


class ClientGone(BrokerException):
    """The client disconnected before its request body arrived: nothing to answer."""


@dataclass(frozen=True)
class HttpRequest:
    """What the handlers need from one ASGI request: no framework object per request."""

    scope: Scope
    receive: Receive

    @property
    def method(self) -> str:
        return str(self.scope["method"])

    @property
    def client(self) -> str:
        client = self.scope.get("client")
        return str(client[0]) if client else ""

    def header(self, name: bytes) -> str | None:
        """The first value of header `name` (lower-case bytes), decoded as latin-1."""
        for key, value in self.scope["headers"]:
            if key == name:
                return str(value.decode("latin-1"))
        return None

    def header_values(self, name: bytes) -> tuple[str, ...]:
        return tuple(v.decode("latin-1") for k, v in self.scope["headers"] if k == name)

    def url(self) -> str:
        """The URL as the client addressed us (scheme, a valid Host header else the socket's
        address, path, query); through a trusted proxy, uvicorn has applied its headers.
        Starlette's URL builder: its Host header validation is what DPoP proofs were always
        checked against."""
        return str(URL(scope=dict(self.scope)))

    async def body(self, max_bytes: int) -> bytes:
        """The whole body, refused (413) as soon as it outgrows `max_bytes`."""
        body = bytearray()
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            body.extend(message.get("body", b""))
            if len(body) > max_bytes:
                raise BadForm(413, "body_too_large")
            if not message.get("more_body", False):
                return bytes(body)


@dataclass(frozen=True)
class Answer:
    """One HTTP answer: status, body and extra headers (lower-case names)."""

    status: int
    body: bytes = b""
    headers: Mapping[str, str] = field(default_factory=dict)
    content_type: str | None = None


def json_answer(
    content: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> Answer:
    body = json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return Answer(status, body.encode("utf-8"), headers or {}, "application/json")


def _text(status: int, text: str, headers: Mapping[str, str] | None = None) -> Answer:
    return Answer(status, text.encode("utf-8"), headers or {}, "text/plain; charset=utf-8")


async def _send(send: Send, answer: Answer, head: bool) -> None:
    headers = [(b"content-length", str(len(answer.body)).encode("ascii"))]
    if answer.content_type is not None:
        headers.append((b"content-type", answer.content_type.encode("latin-1")))
    headers.extend(
        (k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in answer.headers.items()
    )
    await send({"type": "http.response.start", "status": answer.status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head else answer.body})


async def read_form(
    request: HttpRequest, *, max_bytes: int, allowed: frozenset[str]
) -> dict[str, str]:
    """Parse an application/x-www-form-urlencoded body strictly: one declared UTF-8 charset,
    a size cap checked before and while reading, no unknown or repeated parameters."""
    content_type = request.header(b"content-type") or ""
    media, _, params = content_type.partition(";")
    if media.strip().lower() != "application/x-www-form-urlencoded":
        raise BadForm(400, "bad_content_type")
    charset = params.strip().lower()
    if charset and charset not in ("charset=utf-8", 'charset="utf-8"'):
        raise BadForm(400, "bad_charset")
    declared = request.header(b"content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > max_bytes):
        raise BadForm(413, "body_too_large")
    body = await request.body(max_bytes)
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


Handler = Callable[[HttpRequest], Awaitable[Answer]]


class _ProofFields(TypedDict):
    """ClientRequest's DPoP fields, typed so mypy checks them where they are unpacked."""

    dpop: tuple[str, ...]
    method: str
    url: str


class BrokerApp:
    """The broker's ASGI application: a fixed route table and nothing per request but the
    request itself.

    Decision: a plain ASGI callable instead of a web framework. Every exchange pays for the
    edge's CPU, and the framework's routing, middleware stack, request objects and its thread
    hop (anyio's capacity limiter and cancel scopes) cost more than the rest of a Vault-token
    exchange's Python code; the routes here are seven fixed paths. Blocking work (the exchange,
    readiness checks, shutdown) runs in one pool of worker threads (WorkerThreads).
    """

    def __init__(
        self,
        routes: Mapping[str, tuple[str, Handler]],
        *,
        workers: int,
        on_shutdown: Callable[[], None] | None = None,
    ) -> None:
        self._routes = routes
        self._on_shutdown = on_shutdown
        self.threads = WorkerThreads(workers)

    async def in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await self.threads.run(fn, *args)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = scope["method"]
        route = self._routes.get(scope["path"])
        head = method == "HEAD"
        if route is None:
            await _send(send, _text(404, "Not Found"), head)
            return
        allowed, handler = route
        if method != allowed and not (head and allowed == "GET"):
            allow = "GET, HEAD" if allowed == "GET" else allowed
            await _send(send, _text(405, "Method Not Allowed", {"allow": allow}), head)
            return
        try:
            answer = await handler(HttpRequest(scope, receive))
        except ClientGone:
            return
        except Exception:
            # Logged with its traceback (code locations, no request data) and answered 500.
            log.exception("unhandled error on %s", scope["path"])
            answer = _text(500, "Internal Server Error")
        await _send(send, answer, head)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                try:
                    if self._on_shutdown is not None:
                        await self.in_thread(self._on_shutdown)
                finally:
                    self.threads.close()
                await send({"type": "lifespan.shutdown.complete"})
                return


def create_app(
    exchanger: Exchanger,
    *,
    readiness: Readiness,
    metrics: Metrics,
    max_body_bytes: int,
    openapi: Mapping[str, Any],
    on_shutdown: Callable[[], None] | None = None,
    workers: int = 40,
) -> BrokerApp:
    """The broker's HTTP routes over `exchanger`. `workers`: threads running exchanges (each
    blocks on the store and the upstream call; 40 is what the previous framework allowed)."""
    counters = _LabelledCache()

    def dpop_fields(request: HttpRequest) -> _ProofFields:
        """What a DPoP proof is checked against: its header values, the method and the URL
        (scheme and host as the client addressed us; through a trusted proxy, as it says)."""
        proofs = request.header_values(b"dpop")
        # The URL only matters to a proof; requests without one skip building it.
        return {"dpop": proofs, "method": request.method, "url": request.url() if proofs else ""}

    def nonce_header() -> dict[str, str]:
        # Every answer carries a current nonce (RFC 9449 §8.2), so a client rarely needs the
        # use_dpop_nonce round trip more than once per job.
        return {NONCE_HEADER: exchanger.dpop_nonce()}

    async def audited_form(
        request: HttpRequest, request_id: str, client: str, allowed: frozenset[str]
    ) -> dict[str, str]:
        """The request's form; a framing error is audited like any deny, then raised."""
        try:
            return await read_form(request, max_bytes=max_body_bytes, allowed=allowed)
        except BadForm as exc:
            req = ClientRequest(request_id=request_id, client_addr=client)
            await app.in_thread(exchanger.reject, req, exc.status, exc.reason)
            raise AssertionError("reject always raises") from exc  # pragma: no cover

    def refused(endpoint: str, grant: str, exc: ExchangeError) -> None:
        counters.get(metrics.requests, endpoint, grant, exc.error).inc()
        counters.get(metrics.denials, endpoint, exc.reason).inc()

    async def token(request: HttpRequest) -> Answer:
        started = time.perf_counter()
        request_id = new_request_id()
        client = request.client
        audience = ""
        timings = Timings()
        try:
            form = await audited_form(request, request_id, client, _TOKEN_FIELDS)
            req = TokenRequest(
                request_id=request_id,
                client_addr=client,
                timings=timings,
                grant_type=form.get("grant_type", ""),
                audience=form.get("audience", ""),
                subject_token=form.get("subject_token", ""),
                subject_token_type=form.get("subject_token_type", ""),
                requested_token_type=form.get("requested_token_type", ""),
                refresh_token=form.get("refresh_token", ""),
                duration=form.get("duration", ""),
                task=form.get("task", ""),
                sibling_chains=form.get("sibling_chains", ""),
                **dpop_fields(request),
            )
            audience = req.audience
            issued = await app.in_thread(exchanger.handle, req)
        except ExchangeError as exc:
            # A grant label only once the caller authenticated: otherwise junk with
            # audience=<name> would tell anyone which grant names exist.
            refused("token", _known(audience, exchanger) if exc.authenticated else "-", exc)
            timings.total_since(started)
            return error_response(
                exc, request_id, server_timing=timings.header(), extra_headers=nonce_header()
            )
        finally:
            counters.get(metrics.latency, "token").observe(time.perf_counter() - started)
        timings.total_since(started)
        counters.get(metrics.requests, "token", _known(audience, exchanger), "issued").inc()
        # Server-Timing: where the request's time went (verify, policy, state, audit, mint),
        # in milliseconds; durations only, nothing about the identity or the credential.
        headers = {**_NO_STORE, "Server-Timing": timings.header(), **nonce_header()}
        return json_answer(issued.wire(), headers=headers)

    async def revoke(request: HttpRequest) -> Answer:
        request_id = new_request_id()
        client = request.client
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
                await app.in_thread(exchanger.revoke_lease, req)
            elif hint != REVOKE_HINT_REFRESH:
                # RFC 7009 §2.2.1: refresh handles and our own leases are all we revoke.
                await app.in_thread(exchanger.reject, req, 400, "unsupported_token_type")
            else:
                await app.in_thread(exchanger.revoke, req)
        except ExchangeError as exc:
            refused("revoke", "-", exc)
            return error_response(exc, request_id, extra_headers=nonce_header())
        counters.get(metrics.requests, "revoke", "-", "revoked").inc()
        return Answer(200, headers={**_NO_STORE, **nonce_header()})

    async def explain(request: HttpRequest) -> Answer:
        request_id = new_request_id()
        client = request.client
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
            answer = await app.in_thread(exchanger.explain, req)
        except ExchangeError as exc:
            refused("explain", "-", exc)
            return error_response(exc, request_id, extra_headers=nonce_header())
        counters.get(metrics.requests, "explain", "-", "explained").inc()
        return json_answer(answer, headers={**_NO_STORE, **nonce_header()})

    async def healthz(request: HttpRequest) -> Answer:
        return json_answer({"status": "ok"})

    async def readyz(request: HttpRequest) -> Answer:
        results: dict[str, str] = {}
        problems: dict[str, str] = {}
        for name, check in readiness.checks.items():
            try:
                await app.in_thread(check)
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
        return json_answer(body, status=200 if ok else 503)

    async def metrics_endpoint(request: HttpRequest) -> Answer:
        return Answer(200, generate_latest(metrics.registry), content_type=CONTENT_TYPE_LATEST)

    openapi_answer = json_answer(dict(openapi))

    async def openapi_endpoint(request: HttpRequest) -> Answer:
        return openapi_answer

    handlers: dict[str, Handler] = {
        "/v1/token": token,
        "/v1/revoke": revoke,
        "/v1/explain": explain,
        "/healthz": healthz,
        "/readyz": readyz,
        "/metrics": metrics_endpoint,
        "/openapi.json": openapi_endpoint,
    }
    app = BrokerApp(
        {path: (method, handlers[path]) for path, method in ROUTES.items()},
        workers=workers,
        on_shutdown=on_shutdown,
    )
    return app


class WorkerThreads:
    """Blocking calls run from the event loop on up to `size` threads, started as needed.

    Decision: not the loop's run_in_executor. Its ThreadPoolExecutor builds a work item and a
    concurrent Future per call, takes a semaphore and a lock, and asyncio then chains that Future
    to an asyncio one through two more callbacks: on the broker's hot path that machinery cost
    more Python than reading the form. Here a call is one queue entry and one loop callback.
    """

    def __init__(self, size: int) -> None:
        self._size = size
        self._queue: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._started = 0
        # Threads waiting for work that no queued call has claimed yet. A call claims one as it
        # is queued, or starts a thread of its own: counting threads as idle until they dequeue
        # let two calls queued back to back share one thread while the pool could grow.
        self._idle = 0

    def run(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """A future of `fn(*args)` run on a worker thread; await it on the running loop."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[T] = loop.create_future()
        self._queue.put((fn, args, loop, done))
        with self._lock:
            if self._idle > 0:
                self._idle -= 1
                return done
            if self._started >= self._size:
                return done  # every thread is busy: the call waits for the first to finish
            self._started += 1
            name = f"exchange_{self._started}"
        threading.Thread(target=self._work, name=name, daemon=True).start()
        return done

    def close(self) -> None:
        """Let every thread finish its call and end; calls queued after this never run."""
        with self._lock:
            for _ in range(self._started):
                self._queue.put(None)
            self._size = 0

    def _work(self) -> None:
        while True:
            call = self._queue.get()
            if call is None:
                return
            fn, args, loop, done = call
            try:
                result, error = fn(*args), None
            except BaseException as exc:  # handed to the awaiting request, as an executor would
                result, error = None, exc
            # A loop closed while the call ran has nobody waiting any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_settle, done, result, error)
            del call, fn, args, done, result, error  # no reference kept while idle
            with self._lock:
                self._idle += 1


# A queued call: the function, its arguments, the loop that waits, and the future it awaits.
_Call = tuple[Callable[..., Any], tuple[Any, ...], asyncio.AbstractEventLoop, "asyncio.Future[Any]"]


def _settle(done: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if done.cancelled():
        return  # the request was abandoned (the client went away): drop its answer
    if error is None:
        done.set_result(result)
    else:
        done.set_exception(error)


class _LabelledCache:
    """prometheus_client's `labels()` builds and locks on every call; the label sets here are
    few (endpoints, configured grants, fixed reason codes), so each child is looked up once."""

    def __init__(self) -> None:
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}

    def get(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child


def _known(grant: str, exchanger: Exchanger) -> str:
    """Label values come from config only, so a caller cannot blow up metric cardinality."""
    return grant if grant and exchanger.knows_grant(grant) else "-"
