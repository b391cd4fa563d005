"""The job's local credential agent: one refresh session, shared with forked workers over loopback.

Owns how a Luigi job's broker session is shared. The session (the rotating refresh handle) must
have exactly one holder, or two processes would spend the same handle and the broker would revoke
the whole session as stolen. So the process that starts the job holds the `BrokerClient` and runs
this agent: an HTTP server on 127.0.0.1, port chosen by the kernel, guarded by a random 256-bit
bearer token. Forked Luigi workers, `force_multiprocessing` task processes and any subprocess
reach it through two environment variables (`LUIGI_CREDS_AGENT_URL`, `LUIGI_CREDS_AGENT_TOKEN`)
and never see the handle. Nothing is written to disk.

Endpoints (all need `Authorization: <bearer>` or `Bearer <bearer>`):
- `POST /v1/mint` JSON `{"grant", "task", "duration"?}`: mints through the job session; the body
  is the broker's 200 shape (`issued_token_type`, `credentials`, `request_id`, `expires_in`).
- `POST /v1/revoke-lease` JSON `{"lease_id"}`: revokes one Vault lease the session minted (the
  broker's `/v1/revoke` with `token_type_hint` vault-secret and the current refresh handle), so a
  task's dynamic secret ends with the task while the job's session lives on. 204 on success.
- `GET /v1/aws?grant=G&task=T`: the AWS container-credentials protocol (`AccessKeyId`,
  `SecretAccessKey`, `Token`, `Expiration`), refreshed per (grant, task) with `refresh.Refresher`;
  point `AWS_CONTAINER_CREDENTIALS_FULL_URI` at it and any AWS SDK refreshes by itself.
Talks to the broker only through the `mint` and `revoke_lease` callables it is given.
"""

from __future__ import annotations

import hmac
import json
import logging
import secrets
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import httpx

from luigi_creds.client import (
    AWS_CREDENTIALS,
    VAULT_SECRET,
    VAULT_TOKEN,
    AwsCredentials,
    BrokerError,
    Credential,
    VaultToken,
    parse_credential,
)
from luigi_creds.refresh import Refresher

__all__ = [
    "AGENT_TOKEN_VARIABLE",
    "AGENT_URL_VARIABLE",
    "AgentClient",
    "AgentEndpoint",
    "CredentialAgent",
    "container_env",
    "credential_to_wire",
]

log = logging.getLogger(__name__)

AGENT_URL_VARIABLE = "LUIGI_CREDS_AGENT_URL"
AGENT_TOKEN_VARIABLE = "LUIGI_CREDS_AGENT_TOKEN"
MAX_REQUEST_BYTES = 16 * 1024

Mint = Callable[[str, str | None, int | None], Credential]
RevokeLease = Callable[[str], None]
# Vault lease ids are paths such as database/creds/warehouse/<id>; far below this.
MAX_LEASE_ID = 1024


def credential_to_wire(cred: Credential) -> dict[str, Any]:
    """The broker's 200 body for `cred` (what `parse_credential` reads back)."""
    creds: dict[str, Any]
    if isinstance(cred, AwsCredentials):
        token_type, creds = AWS_CREDENTIALS, cred.credential_process()
    elif isinstance(cred, VaultToken):
        token_type = VAULT_TOKEN
        creds = {
            "token": cred.token,
            "accessor": cred.accessor,
            "policies": list(cred.policies),
            "renewable": cred.renewable,
            "lease_duration": cred.lease_duration,
        }
    else:
        token_type = VAULT_SECRET
        creds = {
            "lease_id": cred.lease_id,
            "lease_duration": cred.lease_duration,
            "renewable": cred.renewable,
            "data": dict(cred.data),
            "renew_token": cred.renew_token,
        }
    remaining = int((cred.expires_at - datetime.now(UTC)).total_seconds())
    return {
        "issued_token_type": token_type,
        "token_type": "N_A",
        "credentials": creds,
        "request_id": cred.request_id,
        "expires_in": max(remaining, 0),
        "expires_at": cred.expires_at.isoformat(),
    }


@dataclass(frozen=True)
class AgentEndpoint:
    """Where a running agent listens, and the bearer that opens it."""

    url: str
    bearer: str = field(repr=False)

    def env(self) -> dict[str, str]:
        return {AGENT_URL_VARIABLE: self.url, AGENT_TOKEN_VARIABLE: self.bearer}

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> AgentEndpoint | None:
        url, bearer = environ.get(AGENT_URL_VARIABLE), environ.get(AGENT_TOKEN_VARIABLE)
        return cls(url, bearer) if url and bearer else None


def container_env(endpoint: AgentEndpoint, grant: str, task: str | None) -> dict[str, str]:
    """Variables that make any AWS SDK fetch `grant`'s credentials from the agent."""
    query = f"grant={quote(grant, safe='')}"
    if task:
        query += f"&task={quote(task, safe='')}"
    return {
        "AWS_CONTAINER_CREDENTIALS_FULL_URI": f"{endpoint.url}/v1/aws?{query}",
        "AWS_CONTAINER_AUTHORIZATION_TOKEN": endpoint.bearer,
    }


class CredentialAgent:
    """The loopback server. `start()` returns its endpoint; `stop()` shuts it down."""

    def __init__(
        self,
        mint: Mint,
        *,
        clock: Callable[[], datetime],
        revoke_lease: RevokeLease | None = None,
    ) -> None:
        self._mint = mint
        self._revoke_lease = revoke_lease
        self._clock = clock
        self._bearer = secrets.token_urlsafe(32)
        self._lock = threading.Lock()
        self._aws: dict[tuple[str, str | None], Refresher[AwsCredentials]] = {}
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"CredentialAgent(running={self._server is not None})"

    def start(self) -> AgentEndpoint:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, args=(0.1,), name="luigi-creds-agent", daemon=True
        )
        self._thread.start()
        host, port = server.server_address[:2]
        return AgentEndpoint(f"http://{host!s}:{port}", self._bearer)

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()

    def authorized(self, header: str | None) -> bool:
        if not header:
            return False
        presented = header.removeprefix("Bearer ").strip()
        return hmac.compare_digest(presented.encode(), self._bearer.encode())

    def mint(self, grant: str, task: str | None, duration: int | None) -> Credential:
        return self._mint(grant, task, duration)

    def revoke_lease(self, lease_id: str) -> None:
        if self._revoke_lease is None:
            raise BrokerError(
                "this credential agent cannot revoke Vault leases", error="unsupported_token_type"
            )
        self._revoke_lease(lease_id)

    def aws(self, grant: str, task: str | None) -> AwsCredentials:
        with self._lock:
            refresher = self._aws.get((grant, task))
            if refresher is None:
                refresher = Refresher(
                    lambda: self._fetch_aws(grant, task),
                    clock=self._clock,
                    name=f"AWS credentials for grant {grant!r}",
                )
                self._aws[(grant, task)] = refresher
        return refresher.get().value

    def _fetch_aws(self, grant: str, task: str | None) -> tuple[AwsCredentials, datetime]:
        cred = self._mint(grant, task, None)
        if not isinstance(cred, AwsCredentials):
            raise BrokerError(
                f"grant {grant!r} does not issue AWS credentials", error="invalid_target"
            )
        return cred, cred.expires_at


def _handler_for(agent: CredentialAgent) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "luigi-creds-agent"
        sys_version = ""

        def log_message(self, format: str, *args: Any) -> None:
            # NOTE: the default logs full request lines to stderr; task ids are fine, but keep
            # the agent quiet and route through logging at debug level.
            log.debug("agent: " + format, *args)

        def do_GET(self) -> None:
            if not self._authorized():
                return
            parts = urlsplit(self.path)
            if parts.path != "/v1/aws":
                self._send(404, {"error": "not_found"})
                return
            query = parse_qs(parts.query)
            grant = (query.get("grant") or [""])[0]
            task = (query.get("task") or [""])[0] or None
            if not grant:
                self._send(400, {"error": "invalid_request", "error_description": "grant"})
                return
            try:
                cred = agent.aws(grant, task)
            except Exception as exc:
                self._fail(exc)
                return
            body = cred.credential_process()
            self._send(
                200,
                {
                    "AccessKeyId": body["AccessKeyId"],
                    "SecretAccessKey": body["SecretAccessKey"],
                    "Token": body["SessionToken"],
                    "Expiration": body["Expiration"],
                },
            )

        def do_POST(self) -> None:
            if not self._authorized():
                return
            path = urlsplit(self.path).path
            if path not in ("/v1/mint", "/v1/revoke-lease"):
                self._send(404, {"error": "not_found"})
                return
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_REQUEST_BYTES:
                self._send(413, {"error": "invalid_request"})
                return
            if path == "/v1/revoke-lease":
                self._revoke_lease(self.rfile.read(length))
                return
            try:
                request = json.loads(self.rfile.read(length) or b"{}")
                grant = request["grant"]
                task = request.get("task")
                duration = request.get("duration")
                if not isinstance(grant, str) or not (task is None or isinstance(task, str)):
                    raise TypeError
                if not (duration is None or isinstance(duration, int)):
                    raise TypeError
            except (ValueError, KeyError, TypeError):
                self._send(400, {"error": "invalid_request", "error_description": "bad body"})
                return
            try:
                cred = agent.mint(grant, task, duration)
            except Exception as exc:
                self._fail(exc)
                return
            self._send(200, credential_to_wire(cred))

        def _revoke_lease(self, raw: bytes) -> None:
            try:
                lease_id = json.loads(raw or b"{}")["lease_id"]
                if not isinstance(lease_id, str) or not 0 < len(lease_id) <= MAX_LEASE_ID:
                    raise TypeError
            except (ValueError, KeyError, TypeError):
                self._send(400, {"error": "invalid_request", "error_description": "bad body"})
                return
            try:
                agent.revoke_lease(lease_id)
            except Exception as exc:
                self._fail(exc)
                return
            self.send_response(204)
            self.send_header("Content-Length", "0")
            self.send_header("Cache-Control", "no-store")
            self.end_headers()

        def _authorized(self) -> bool:
            if agent.authorized(self.headers.get("Authorization")):
                return True
            self._send(401, {"error": "unauthorized"})
            return False

        def _fail(self, exc: Exception) -> None:
            cause: BaseException | None = exc
            while cause is not None and not isinstance(cause, BrokerError):
                cause = cause.__cause__
            if isinstance(cause, BrokerError):
                status = cause.status if 400 <= cause.status < 600 else 502
                self._send(
                    status,
                    {
                        "error": cause.error,
                        "error_description": str(cause),
                        "request_id": cause.request_id,
                    },
                )
            else:
                log.warning("agent request failed", exc_info=True)
                self._send(502, {"error": "agent_error", "error_description": type(exc).__name__})

        def _send(self, status: int, body: Mapping[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            try:
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                # The worker hung up (it was killed or timed out): nobody is left to answer,
                # and a traceback on the job's stderr would only be noise.
                self.close_connection = True

    return Handler


class AgentClient:
    """Mints through a running agent; what forked workers and subprocesses use."""

    def __init__(self, endpoint: AgentEndpoint, *, http: httpx.Client) -> None:
        self.endpoint = endpoint
        self._http = http

    def __repr__(self) -> str:
        return f"AgentClient({self.endpoint.url!r})"

    def revoke_lease(self, lease_id: str) -> None:
        """Ask the agent to revoke one Vault lease of the job's session (BrokerError if not)."""
        try:
            response = self._http.post(
                f"{self.endpoint.url}/v1/revoke-lease",
                json={"lease_id": lease_id},
                headers={"Authorization": f"Bearer {self.endpoint.bearer}"},
            )
        except httpx.HTTPError as exc:
            raise BrokerError(
                f"the job's credential agent at {self.endpoint.url} is unreachable to revoke a "
                f"Vault lease ({type(exc).__name__})",
                error="unreachable",
            ) from None
        if response.status_code != 204:
            try:
                payload = response.json()
            except ValueError:
                payload = {}
            payload = payload if isinstance(payload, dict) else {}
            description = payload.get("error_description")
            raise BrokerError(
                description
                if isinstance(description, str)
                else f"credential agent answered HTTP {response.status_code} to a lease revoke",
                error=str(payload.get("error") or f"http_{response.status_code}"),
                status=response.status_code,
            )

    def mint(self, grant: str, task: str | None = None, duration: int | None = None) -> Credential:
        body: dict[str, Any] = {"grant": grant, "task": task}
        if duration is not None:
            body["duration"] = duration
        try:
            response = self._http.post(
                f"{self.endpoint.url}/v1/mint",
                json=body,
                headers={"Authorization": f"Bearer {self.endpoint.bearer}"},
            )
        except httpx.HTTPError as exc:
            raise BrokerError(
                f"the job's credential agent at {self.endpoint.url} is unreachable for grant "
                f"{grant!r} ({type(exc).__name__}); did the process that started the job exit?",
                error="unreachable",
                grant=grant,
            ) from None
        try:
            payload = response.json()
        except ValueError:
            payload = {}
        if not isinstance(payload, dict):
            payload = {}
        if response.status_code != 200:
            description = payload.get("error_description")
            raise BrokerError(
                description
                if isinstance(description, str)
                else f"credential agent answered HTTP {response.status_code} for grant {grant!r}",
                error=str(payload.get("error") or f"http_{response.status_code}"),
                status=response.status_code,
                request_id=payload.get("request_id")
                if isinstance(payload.get("request_id"), str)
                else None,
                grant=grant,
            )
        expires_at = payload.get("expires_at")
        try:
            cred = parse_credential(payload, grant=grant, now=datetime.now(UTC))
            if isinstance(expires_at, str) and not isinstance(cred, AwsCredentials):
                cred = replace(cred, expires_at=datetime.fromisoformat(expires_at))
        except (KeyError, TypeError, ValueError) as exc:
            raise BrokerError(
                f"credential agent answered grant {grant!r} with a malformed credential",
                error="invalid_response",
                status=200,
                grant=grant,
            ) from exc
        return cred
