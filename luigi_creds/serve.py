"""The job's local credential agent: one refresh session, shared with other processes over loopback.

Owns how a Luigi job's broker session is shared, and what each process may do with it. The
session (the rotating refresh handle) must have exactly one holder, or two processes would spend
the same handle and the broker would revoke the whole session as stolen. So the process that
starts the job holds the `BrokerClient` and runs this agent: an HTTP server on 127.0.0.1, port
chosen by the kernel. Other processes reach it through `LUIGI_CREDS_AGENT_URL` and a bearer
(`LUIGI_CREDS_AGENT_TOKEN`; agent_client.py) and never see the handle. Nothing is written to disk.

Bearers are scoped (`Scope`): the root one (every grant, any task, may delegate) never leaves the
owning process; a delegating one (some grants, any task) goes to a scheduling process; a task's
(its grants, its task id, bound to its process) goes to the task and its children. Whatever asks
beyond its scope is refused (403 `access_denied`), logged, and reported to the broker's audit.
When a task's scope ends (released, or its process gone), the Vault credentials minted for the
task are released in the background and its bearers stop working.

Endpoints (all need `Authorization: <bearer>` or `Bearer <bearer>`):
- `POST /v1/mint` JSON `{"grant", "task", "duration"?}`: mints through the job session; the body
  is the broker's 200 shape (`issued_token_type`, `credentials`, `request_id`, `expires_in`).
- `GET /v1/aws?grant=G&task=T`: the AWS container-credentials protocol (`AccessKeyId`,
  `SecretAccessKey`, `Token`, `Expiration`), refreshed per (grant, task) with `refresh.Refresher`;
  point `AWS_CONTAINER_CREDENTIALS_FULL_URI` at it and any AWS SDK refreshes by itself.
- `POST /v1/bearer` JSON `{"grants", "task", "delegate", "pid", "aws", "wait", "mint"}`: a
  narrower bearer; each AWS grant in `aws` is minted at once and, unless `wait` is false,
  returned in the same answer (a task's start). Each `{"grant", "duration"?}` in `mint` is
  minted for the task as `/v1/mint` would and returned under `minted` (a CredentialsMixin task's
  start, in one round trip); if one fails, the new scope is ended and the refusal returned.
  With `wait` false the answer comes at once and the `mint` list is minted meanwhile, for
  `/v1/claim` to return.
- `POST /v1/claim` JSON `{"task", "pid", "aws"?, "minted"?}`, for a delegating bearer: binds
  `task`'s bearers that have no process yet to process `pid` (from then on the task is
  released when that process is gone) and, with `aws` (a grant), answers with the task's AWS
  credentials in the container shape under `aws`, waiting for the mint its bearer request
  started; with `minted` true, also the credentials of the `mint` list its bearer request
  (`wait` false) started, under `minted`, or the refusal of one of them (the task's scope then
  ended). A scheduling process sends it right after forking the task's process, on the
  connection it asked for the task's bearer on, and the forked process reads both answers
  (luigi_creds/launch.py).
- `POST /v1/release` JSON `{"task"?}`: ends the caller's task scope (or, for a delegating
  caller, `task`). 204.
- `POST /v1/revoke-lease` JSON `{"lease_id"}`: revokes one Vault lease the session minted (the
  broker's `/v1/revoke` with `token_type_hint` vault-secret and the current refresh handle), so a
  task's dynamic secret ends with the task while the job's session lives on. 204 on success.
Talks to the broker only through the callables it is given.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NoReturn
from urllib.parse import parse_qs, urlsplit

from luigi_creds.agent_client import (
    AGENT_TOKEN_VARIABLE,
    AGENT_URL_VARIABLE,
    AgentClient,
    AgentEndpoint,
    container_env,
)
from luigi_creds.credentials import (
    AWS_CREDENTIALS,
    VAULT_SECRET,
    VAULT_TOKEN,
    AwsCredentials,
    BrokerError,
    Credential,
    VaultSecret,
    VaultToken,
)
from luigi_creds.refresh import Refresher
from luigi_creds.summary import MintLog

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
class Scope:
    """What one bearer may do. The job's root bearer never leaves the process that owns the
    session; everything handed to another process is a narrower scope derived from it.

    `grants` None means every grant; `task` None means any task (only delegating scopes, held by
    a scheduling process that starts tasks, have that). A task's scope names its task and its
    grants and cannot delegate, so a task or anything it starts can mint nothing else. `pid` is
    the process that asked for a task scope: when it is gone, the agent releases what the task
    held, however the task ended.
    """

    grants: frozenset[str] | None
    task: str | None
    delegate: bool
    pid: int | None = None

    def allows(self, grant: str, task: str | None) -> bool:
        if self.grants is not None and grant not in self.grants:
            return False
        return self.task is None or task == self.task

    def covers(self, other: Scope) -> bool:
        """True if `other` is no wider than this scope in any way (grants, task, delegation)."""
        if self.grants is not None and (other.grants is None or not other.grants <= self.grants):
            return False
        if self.task is not None and other.task != self.task:
            return False
        return self.delegate or not other.delegate

    def describe(self) -> str:
        grants = "every grant" if self.grants is None else f"grants {sorted(self.grants)}"
        task = "any task" if self.task is None else f"task {self.task!r}"
        return f"{grants}, {task}"


ROOT_SCOPE = Scope(grants=None, task=None, delegate=True)


class ScopeRefused(BrokerError):
    """A bearer asked for more than its scope allows; refused and logged (never minted)."""


Release = Callable[[str, Sequence[Credential]], None]
# (grant, task, what was refused: one of client.AGENT_REFUSALS)
ReportRefusal = Callable[[str, str | None, str], None]


class CredentialAgent:
    """The loopback server. `start()` returns its root endpoint; `stop()` shuts it down.

    `release(task, creds)` is called (on a background thread) with the Vault credentials minted
    for a task when the task's scope ends: released by the task, or its process gone.
    """

    # How often the agent looks for task processes that died without releasing their scope.
    REAP_INTERVAL = 0.5

    def __init__(
        self,
        mint: Mint,
        *,
        clock: Callable[[], datetime],
        revoke_lease: RevokeLease | None = None,
        release: Release | None = None,
        report_refusal: ReportRefusal | None = None,
        mint_log: MintLog | None = None,
    ) -> None:
        self._mint = mint
        # What was minted (nothing secret), for the job summary: GET /v1/summary.
        self.mint_log = mint_log
        self._report_refusal = report_refusal
        self._reported: set[tuple[str, str | None, str]] = set()
        self._revoke_lease = revoke_lease
        self._release = release
        self._clock = clock
        self._bearer = secrets.token_urlsafe(32)
        self._lock = threading.Lock()
        self._scopes: dict[bytes, Scope] = {_digest(self._bearer): ROOT_SCOPE}
        self._aws: dict[tuple[str, str | None], Refresher[AwsCredentials]] = {}
        self._prefetch_failed: dict[tuple[str, str | None], Exception] = {}
        self._prefetching: dict[tuple[str, str | None], threading.Event] = {}
        # A task's mints started with its bearer (a CredentialsMixin task's launch): the
        # event set once all are done, and their credentials or the refusal.
        self._minting: dict[str, tuple[threading.Event, dict[str, Any]]] = {}
        # Vault credentials minted per task (released with the task) and each lease's task.
        self._held: dict[str, list[Credential]] = {}
        self._lease_task: dict[str, str | None] = {}
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()
        self.refusals = 0

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
        threading.Thread(target=self._reap, name="luigi-creds-reaper", daemon=True).start()
        host, port = server.server_address[:2]
        self.url = f"http://{host!s}:{port}"
        return AgentEndpoint(self.url, self._bearer)

    def stop(self) -> None:
        self._stopped.set()
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()

    def scope_of(self, header: str | None) -> Scope | None:
        """The scope of the bearer in an Authorization header, or None (unknown bearer)."""
        if not header:
            return None
        presented = header.removeprefix("Bearer ").strip()
        with self._lock:
            return self._scopes.get(_digest(presented))

    def authorized(self, header: str | None) -> bool:
        return self.scope_of(header) is not None

    def issue(self, caller: Scope, wanted: Scope) -> str:
        """A new bearer for `wanted`, which `caller` must cover."""
        if not caller.covers(wanted) or (wanted.task is None and not wanted.delegate):
            self._refuse(
                f"a bearer for {caller.describe()} cannot hand out one for {wanted.describe()}",
                task=wanted.task,
                grant=",".join(sorted(wanted.grants or ())) or "-",
                asker=caller.task,
                refused="delegation",
            )
        bearer = secrets.token_urlsafe(32)
        with self._lock:
            self._scopes[_digest(bearer)] = wanted
        return bearer

    def release_scope(self, header: str | None) -> None:
        """Forget the caller's bearer and release what its task held (the root is kept)."""
        presented = (header or "").removeprefix("Bearer ").strip()
        with self._lock:
            scope = self._scopes.get(_digest(presented))
            if scope is None or scope is ROOT_SCOPE:
                return
            del self._scopes[_digest(presented)]
        if scope.task is not None:
            self._end_task(scope.task)  # and every bearer the task handed on

    def bind_process(self, task: str, pid: int, scope: Scope = ROOT_SCOPE) -> bool:
        """For a delegating caller: bind `task`'s bearers issued without a process (asked for
        before the task's process existed) to process `pid`; False if the task has none left
        (it ended). A task already bound to another process, or a caller that cannot start
        tasks, is refused (audited as `task_end`: like ending a task, it is a delegating
        bearer's say over a task's lifetime)."""
        if scope.delegate and scope.task is None:
            with self._lock:
                digests = [d for d, s in self._scopes.items() if s.task == task]
                if all(self._scopes[d].pid in (None, pid) for d in digests):
                    for digest in digests:
                        self._scopes[digest] = replace(self._scopes[digest], pid=pid)
                    return bool(digests)
        self._refuse(
            f"a bearer for {scope.describe()} cannot bind task {task!r} to process {pid}",
            task=task,
            grant="-",
            asker=scope.task,
            refused="task_end",
        )

    def release_task(self, task: str, scope: Scope = ROOT_SCOPE) -> None:
        """End `task` for a delegating caller: its bearers stop working, its Vault credentials
        are released in the background."""
        if not scope.delegate or scope.task is not None:
            self._refuse(
                f"a bearer for {scope.describe()} cannot end tasks",
                task=task,
                grant="-",
                refused="task_end",
            )
        self._end_task(task)

    def mint(
        self, grant: str, task: str | None, duration: int | None, scope: Scope = ROOT_SCOPE
    ) -> Credential:
        task = self._check(scope, grant, task)
        cred = self._mint(grant, task, duration)
        if isinstance(cred, AwsCredentials):
            # The task's SDKs, asking the container endpoint, get this one instead of a new mint.
            self._refresher(grant, task).seed(cred, cred.expires_at)
        if isinstance(cred, VaultToken | VaultSecret) and task is not None:
            with self._lock:
                self._held.setdefault(task, []).append(cred)
                if isinstance(cred, VaultSecret):
                    self._lease_task[cred.lease_id] = task
        return cred

    def revoke_lease(self, lease_id: str, scope: Scope = ROOT_SCOPE) -> None:
        if self._revoke_lease is None:
            raise BrokerError(
                "this credential agent cannot revoke Vault leases", error="unsupported_token_type"
            )
        with self._lock:
            task = self._lease_task.get(lease_id)
        if scope.task is not None and task != scope.task:
            self._refuse(
                f"a bearer for {scope.describe()} cannot revoke a lease of another task",
                task=scope.task,
                grant="-",
                refused="lease",
            )
        self._revoke_lease(lease_id)
        with self._lock:
            self._lease_task.pop(lease_id, None)
            if task is not None:
                held = self._held.get(task, [])
                self._held[task] = [
                    c for c in held if not (isinstance(c, VaultSecret) and c.lease_id == lease_id)
                ]

    def aws(self, grant: str, task: str | None, scope: Scope = ROOT_SCOPE) -> AwsCredentials:
        task = self._check(scope, grant, task)
        refresher = self._refresher(grant, task)
        with self._lock:
            inflight = self._prefetching.get((grant, task))
        if inflight is not None:
            inflight.wait()
        with self._lock:
            failed = self._prefetch_failed.pop((grant, task), None)
        if failed is not None and refresher.current is None:
            raise failed
        return refresher.get().value

    def prefetch(self, grant: str, task: str | None, scope: Scope) -> threading.Thread:
        """Mint (grant, task) in the background; `aws()` from now on waits for that mint.
        Returns the thread, not yet started: the caller starts it once it has answered, so
        the answer is not held behind the mint's own work (the GIL changes hands every 5 ms)."""
        task = self._check(scope, grant, task)
        done = threading.Event()
        with self._lock:
            self._prefetching[(grant, task)] = done
        return threading.Thread(target=self._warm, args=(grant, task, done), daemon=True)

    def mint_later(
        self, task: str, mints: Sequence[tuple[str, int | None]], scope: Scope
    ) -> threading.Thread:
        """Mint each (grant, duration) for `task` in the background, in order, as `mint` would;
        `minted(task)` waits for them. If one is refused, the task's scope is ended (what was
        minted is released) and the refusal kept for `minted`. Returns the thread, not yet
        started (see `prefetch`)."""
        done, slot = threading.Event(), dict[str, Any]()
        entry = (done, slot)
        with self._lock:
            self._minting[task] = entry

        def run() -> None:
            try:
                slot["minted"] = {g: self.mint(g, task, d, scope) for g, d in mints}
            except Exception as exc:
                slot["error"] = exc
                # The scope ends now (what was minted is released); the refusal stays for
                # `minted` to answer with.
                self._end_task(task, keep=entry)
            else:
                with self._lock:
                    # The task ended while this minted (`minted` leaves the entry in place
                    # until these mints are done; `_end_task` removes it).
                    ended = self._minting.get(task) is not entry
                if ended:
                    self._end_task(task)  # releases what was just minted
            finally:
                done.set()

        return threading.Thread(target=run, daemon=True)

    def minted(self, task: str) -> dict[str, Credential]:
        """The credentials `mint_later` started for `task`, once (waiting for them)."""
        with self._lock:
            entry = self._minting.get(task)
        if entry is None:
            raise BrokerError(
                f"no mint was started for task {task!r}", error="invalid_request", status=400
            )
        done, slot = entry
        done.wait()
        with self._lock:
            if self._minting.get(task) is entry:
                del self._minting[task]
        if "error" in slot:
            raise slot["error"]
        return dict(slot["minted"])

    def _warm(self, grant: str, task: str | None, done: threading.Event) -> None:
        try:
            self._refresher(grant, task).get()
        except Exception as exc:
            # Kept for whoever asks next (the task, at once), so a refusal reaches the broker
            # once, not again for the same question.
            with self._lock:
                self._prefetch_failed[(grant, task)] = exc
        finally:
            with self._lock:
                self._prefetching.pop((grant, task), None)
            done.set()

    def _check(self, scope: Scope, grant: str, task: str | None) -> str | None:
        if scope.task is not None and task is None:
            task = scope.task  # a task's bearer mints for its own task by default
        if not scope.allows(grant, task):
            self._refuse(
                f"grant {grant!r} for task {task!r} is outside this bearer's scope "
                f"({scope.describe()})",
                task=task,
                grant=grant,
                asker=scope.task,
                refused="scope",
            )
        return task

    def _refuse(
        self,
        reason: str,
        *,
        task: str | None,
        grant: str,
        refused: str,
        asker: str | None = None,
    ) -> NoReturn:
        """Refuse, log, and have the broker record it as `refused` (each kind, grant and asking
        task once, in the background, so a looping child neither waits on nor floods the
        broker)."""
        self.refusals += 1
        log.warning("luigi-creds agent refused: %s", reason)
        key = (grant, asker if asker is not None else task, refused)
        with self._lock:
            first = key not in self._reported
            self._reported.add(key)
        if first and self._report_refusal is not None:
            threading.Thread(
                target=_report_quietly, args=(self._report_refusal, *key), daemon=True
            ).start()
        raise ScopeRefused(
            f"the job's credential agent refused: {reason}",
            error="access_denied",
            status=403,
            grant=grant,
        )

    def _refresher(self, grant: str, task: str | None) -> Refresher[AwsCredentials]:
        with self._lock:
            refresher = self._aws.get((grant, task))
            if refresher is None:
                refresher = Refresher(
                    lambda: self._fetch_aws(grant, task),
                    clock=self._clock,
                    name=f"AWS credentials for grant {grant!r}",
                )
                self._aws[(grant, task)] = refresher
        return refresher

    def _fetch_aws(self, grant: str, task: str | None) -> tuple[AwsCredentials, datetime]:
        cred = self._mint(grant, task, None)
        if not isinstance(cred, AwsCredentials):
            raise BrokerError(
                f"grant {grant!r} does not issue AWS credentials", error="invalid_target"
            )
        return cred, cred.expires_at

    def _end_task(self, task: str, keep: object = None) -> None:
        with self._lock:
            for digest in [d for d, s in self._scopes.items() if s.task == task]:
                del self._scopes[digest]
            for key in [k for k in self._aws if k[1] == task]:
                del self._aws[key]
            for key in [k for k in self._prefetch_failed if k[1] == task]:
                del self._prefetch_failed[key]
            if self._minting.get(task) is not keep:
                self._minting.pop(task, None)
            held = self._held.pop(task, [])
            for cred in held:
                if isinstance(cred, VaultSecret):
                    self._lease_task.pop(cred.lease_id, None)
        if held and self._release is not None:
            release = self._release
            # Nothing in the task waits for Vault to answer: it is released in the background.
            threading.Thread(
                target=_release_quietly, args=(release, task, held), daemon=True
            ).start()

    def _reap(self) -> None:
        """Release the scope of every task process that exited without releasing it."""
        while not self._stopped.wait(self.REAP_INTERVAL):
            with self._lock:
                dead = [
                    (digest, scope)
                    for digest, scope in self._scopes.items()
                    if scope.pid is not None and not _alive(scope.pid)
                ]
                for digest, _ in dead:
                    del self._scopes[digest]
            for _, scope in dead:
                if scope.task is not None:
                    log.info("luigi-creds: task %s ended without releasing; releasing", scope.task)
                    self._end_task(scope.task)


def container_body(cred: AwsCredentials) -> dict[str, str]:
    """The AWS container-credentials answer for `cred`."""
    body = cred.credential_process()
    return {
        "AccessKeyId": body["AccessKeyId"],
        "SecretAccessKey": body["SecretAccessKey"],
        "Token": body["SessionToken"],
        "Expiration": body["Expiration"],
    }


def _report_quietly(report: ReportRefusal, grant: str, task: str | None, refused: str) -> None:
    try:
        report(grant, task, refused)
    except Exception as exc:
        log.warning("luigi-creds: recording a refusal with the broker failed: %s", exc)


def _release_quietly(release: Release, task: str, held: Sequence[Credential]) -> None:
    try:
        release(task, held)
    except Exception as exc:
        # Vault's error bodies are not ours to vet; our own messages are secret-free.
        reason = exc if isinstance(exc, BrokerError) else type(exc).__name__
        log.warning("luigi-creds: releasing the Vault credentials of %s failed: %s", task, reason)


def _is_mint_request(item: Any) -> bool:
    """`{"grant": str, "duration": int | None}`, one entry of a start request's `mint`."""
    if not isinstance(item, dict) or not isinstance(item.get("grant"), str):
        return False
    duration = item.get("duration")
    return duration is None or (isinstance(duration, int) and not isinstance(duration, bool))


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        # A dead child not yet waited for is a zombie: gone for our purposes.
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().split(b") ", 1)[1][:1] != b"Z"
    except (OSError, IndexError):
        return True


def _digest(bearer: str) -> bytes:
    # Scopes are looked up by a hash of the bearer, so no comparison ever runs over the secret.
    return hashlib.sha256(bearer.encode()).digest()


MAX_HEADERS = 100


class _Head:
    """A request's header fields as the handler reads them: `get(name)`, any case."""

    __slots__ = ("_fields",)

    def __init__(self, fields: dict[str, str]) -> None:
        self._fields = fields

    def get(self, name: str, default: str | None = None) -> str | None:
        return self._fields.get(name.lower(), default)


def _handler_for(agent: CredentialAgent) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "luigi-creds-agent"
        sys_version = ""
        # Keep-alive: a worker's pooled connection serves all its requests, every answer has a
        # Content-Length.
        protocol_version = "HTTP/1.1"
        # Buffered, flushed once per answer: headers and body leave in one segment. Written
        # apart, Nagle's algorithm holds the body until the client's delayed ACK (about 40 ms
        # per request on Linux) on a kept-alive connection.
        wbufsize = -1

        def parse_request(self) -> bool:
            """The request line and head, read without the email package (which
            `BaseHTTPRequestHandler` parses headers with: about a third of the agent's CPU per
            request). HTTP/1.0 and 1.1 only, at most MAX_HEADERS header lines of up to 64 kB;
            a header given twice keeps its first value."""
            self.command = ""  # for send_error's log line if the request line is bad
            self.request_version = "HTTP/1.0"  # so that an error answer has a status line
            raw: bytes = self.raw_requestline  # type: ignore[attr-defined]  # set by the caller
            self.requestline = requestline = str(raw, "latin-1").rstrip("\r\n")
            words = requestline.split()
            if len(words) != 3 or not words[2].startswith("HTTP/1."):
                self.close_connection = True
                self.send_error(400, "Bad request line")
                return False
            self.command, self.path, self.request_version = words
            version = words[2]
            fields: dict[str, str] = {}
            for _ in range(MAX_HEADERS + 1):
                line = self.rfile.readline(65537)
                if len(line) > 65536:
                    self.close_connection = True
                    self.send_error(431, "Header line too long")
                    return False
                if line in (b"\r\n", b"\n", b""):
                    break
                name, colon, value = str(line, "latin-1").partition(":")
                if not colon:
                    self.close_connection = True
                    self.send_error(400, "Bad header line")
                    return False
                fields.setdefault(name.strip().lower(), value.strip())
            else:
                self.close_connection = True
                self.send_error(431, "Too many headers")
                return False
            self.headers = _Head(fields)  # type: ignore[assignment]
            connection = fields.get("connection", "").lower()
            self.close_connection = connection == "close" or (
                version == "HTTP/1.0" and connection != "keep-alive"
            )
            return True

        def handle(self) -> None:
            try:
                super().handle()
            except (BrokenPipeError, ConnectionResetError):
                # A task's process sends its release and exits without reading the answer,
                # which resets the kept-alive connection: nothing is left to serve on it, and a
                # traceback on the job's stderr would only be noise.
                self.close_connection = True

        def log_message(self, format: str, *args: Any) -> None:
            # NOTE: the default logs full request lines to stderr; task ids are fine, but keep
            # the agent quiet and route through logging at debug level.
            log.debug("agent: " + format, *args)

        def do_GET(self) -> None:
            scope = self._scope()
            if scope is None:
                return
            parts = urlsplit(self.path)
            if parts.path == "/v1/summary" and agent.mint_log is not None:
                self._send(200, agent.mint_log.as_json())
                return
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
                cred = agent.aws(grant, task, scope)
            except Exception as exc:
                self._fail(exc)
                return
            self._send(200, container_body(cred))

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_REQUEST_BYTES:
                self.close_connection = True
                self._send(413, {"error": "invalid_request"})
                return
            raw = self.rfile.read(length)
            scope = self._scope()
            if scope is None:
                return
            path = urlsplit(self.path).path
            handlers = {
                "/v1/mint": self._mint,
                "/v1/revoke-lease": self._revoke_lease,
                "/v1/bearer": self._bearer,
                "/v1/release": self._release,
                "/v1/claim": self._claim,
            }
            handler = handlers.get(path)
            if handler is None:
                self._send(404, {"error": "not_found"})
                return
            try:
                request = json.loads(raw or b"{}")
                if not isinstance(request, dict):
                    raise TypeError
                handler(scope, request)
            except (ValueError, KeyError, TypeError):
                self._send(400, {"error": "invalid_request", "error_description": "bad body"})
            except Exception as exc:
                self._fail(exc)

        def _mint(self, scope: Scope, request: dict[str, Any]) -> None:
            grant = request["grant"]
            task = request.get("task")
            duration = request.get("duration")
            if not isinstance(grant, str) or not (task is None or isinstance(task, str)):
                raise TypeError
            if not (duration is None or isinstance(duration, int)):
                raise TypeError
            self._send(200, credential_to_wire(agent.mint(grant, task, duration, scope)))

        def _revoke_lease(self, scope: Scope, request: dict[str, Any]) -> None:
            lease_id = request["lease_id"]
            if not isinstance(lease_id, str) or not 0 < len(lease_id) <= MAX_LEASE_ID:
                raise TypeError
            agent.revoke_lease(lease_id, scope)
            self._no_content()

        def _bearer(self, scope: Scope, request: dict[str, Any]) -> None:
            grants = request.get("grants")
            task = request.get("task")
            pid = request.get("pid")
            aws_grants = request.get("aws") or []
            delegate = request.get("delegate") is True
            if grants is not None and not (
                isinstance(grants, list) and all(isinstance(g, str) for g in grants)
            ):
                raise TypeError
            if not (task is None or isinstance(task, str)):
                raise TypeError
            if not (pid is None or (isinstance(pid, int) and pid > 0)):
                raise TypeError
            if not (isinstance(aws_grants, list) and all(isinstance(g, str) for g in aws_grants)):
                raise TypeError
            wanted = Scope(
                grants=None if grants is None else frozenset(grants),
                task=task,
                delegate=delegate,
                pid=pid,
            )
            mints = request.get("mint") or []
            if not (isinstance(mints, list) and all(_is_mint_request(m) for m in mints)):
                raise TypeError
            if mints and task is None:
                raise TypeError  # minting at start is for a task's own scope
            bearer = agent.issue(scope, wanted)
            if mints and task is not None and request.get("wait") is False:
                # A launch: answer now, mint meanwhile; the task's claim gets the credentials.
                thread = agent.mint_later(
                    task, [(m["grant"], m.get("duration")) for m in mints], wanted
                )
                try:
                    self._send(200, {"bearer": bearer, "aws": {}})
                    self._flush()
                finally:
                    thread.start()
                return
            if mints and task is not None:
                try:
                    minted = {
                        m["grant"]: credential_to_wire(
                            agent.mint(m["grant"], task, m.get("duration"), wanted)
                        )
                        for m in mints
                    }
                except Exception:
                    # Nobody holds the new bearer: end the task's scope here (releasing what
                    # this request minted) and answer with the refusal.
                    agent.release_task(task)
                    raise
                self._send(200, {"bearer": bearer, "aws": {}, "minted": minted})
                return
            if request.get("wait") is False:
                # Mint now, answer now: the task sets itself up while the broker works, and
                # its first credential request waits for this same mint.
                warming = [agent.prefetch(grant, task, wanted) for grant in aws_grants]
                try:
                    self._send(200, {"bearer": bearer, "aws": {}})
                    self._flush()  # the answer leaves before the mint takes the GIL
                finally:
                    for thread in warming:
                        thread.start()
                return
            aws = {g: container_body(agent.aws(g, task, wanted)) for g in aws_grants}
            self._send(200, {"bearer": bearer, "aws": aws})

        def _claim(self, scope: Scope, request: dict[str, Any]) -> None:
            task, pid, grant = request["task"], request["pid"], request.get("aws")
            if not (isinstance(pid, int) and not isinstance(pid, bool) and pid > 0):
                raise TypeError
            if not isinstance(task, str) or not (grant is None or isinstance(grant, str)):
                raise TypeError
            live = agent.bind_process(task, pid, scope)
            answer: dict[str, Any] = {"aws": {}}
            if request.get("minted") is True:
                # The refusal of one of them, if any, even though it ended the task's scope.
                minted = agent.minted(task)
                answer["minted"] = {g: credential_to_wire(c) for g, c in minted.items()}
            if grant:
                if not live:  # never a first mint for a task that has ended
                    raise BrokerError(
                        f"task {task!r} has ended", error="invalid_request", status=400
                    )
                answer["aws"] = {grant: container_body(agent.aws(grant, task, scope))}
            self._send(200, answer)

        def _release(self, scope: Scope, request: dict[str, Any]) -> None:
            task = request.get("task")
            if task is None:
                agent.release_scope(self.headers.get("Authorization"))
            elif isinstance(task, str):
                agent.release_task(task, scope)
            else:
                raise TypeError
            self._no_content()

        def _scope(self) -> Scope | None:
            scope = agent.scope_of(self.headers.get("Authorization"))
            if scope is None:
                self._send(401, {"error": "unauthorized"})
            return scope

        def _no_content(self) -> None:
            self.send_response(204)
            self.send_header("Content-Length", "0")
            self.send_header("Cache-Control", "no-store")
            self.end_headers()

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

        def _flush(self) -> None:
            try:
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True

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
