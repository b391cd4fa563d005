"""Policy reload without restart: the policy in force, and the watcher that replaces it.

Owns which compiled policy answers requests (`ActivePolicy`) and when a changed policy file
replaces it (`PolicyReloader`). A reload is triggered by SIGHUP or by the file changing on disk
(polled: one stat() per interval, the file is read and hashed only when its mtime, size or inode
moved). The new file is parsed and linted exactly like at start-up; it takes effect by one
reference assignment, so a request sees either the old policy or the new one, never a mix.

Rules, each chosen to fail closed or to keep serving:
- A file that does not parse or lint is refused: every problem is logged, the refusal is
  audited and counted, `/readyz` shows it, and the policy in force keeps serving. Readiness
  stays 200: a broken edit pushed to every replica must not take the whole fleet out of the
  load balancer while the old policy answers correctly.
- A reload changes grants only. [broker], [[issuer]] and [upstream.*] set up listeners, stores
  and clients at start-up; a file that changes them is refused with a problem saying a restart
  applies it, rather than half-applied. So is a grant kind (aws, vault) the broker started
  without a minter for.
- A policy takes effect only after its `loaded` audit record is durable: if the audit store is
  down, the old policy stays and the next poll tries again.
- Several replicas: each watches its own file and audits its own loads (the record names the
  replica's host and pid); replicas reading the same content converge on the same sha256.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from broker.audit.events import AuditEvent, Outcome
from broker.audit.store import AuditStore
from broker.background import Periodic
from broker.config import Config, ConfigError, GrantConfig, Problem
from broker.config_lint import parse_config
from broker.policy import Policy
from broker.storage import StoreUnavailable

log = logging.getLogger("broker.policy_reload")

# How often the file is stat()ed: a saved edit applies within this plus one parse (< 1 s).
POLL_SECONDS = 0.25

# Sections a reload may not change (they configure what start-up built).
_RESTART_SECTIONS = (("broker", "[broker]"), ("issuers", "[[issuer]]"), ("aws", "[upstream.aws]"))


@dataclass(frozen=True)
class LoadedPolicy:
    """One policy file as compiled: what requests are decided under."""

    config: Config
    policy: Policy
    sha256: str  # of the file's bytes; "" for a policy built in memory (tests, tools)
    loaded_at: datetime | None = None


class ActivePolicy:
    """The policy in force. Readers take `current` once per decision; `swap` replaces it with
    a single reference assignment (atomic under the GIL) and then tells subscribers."""

    def __init__(self, loaded: LoadedPolicy) -> None:
        self._current = loaded
        self._subscribers: list[Callable[[LoadedPolicy], None]] = []

    @property
    def current(self) -> LoadedPolicy:
        return self._current

    def subscribe(self, callback: Callable[[LoadedPolicy], None]) -> None:
        """Call `callback(new)` after every swap (e.g. to drop cached denials)."""
        self._subscribers.append(callback)

    def swap(self, loaded: LoadedPolicy) -> None:
        self._current = loaded
        for callback in self._subscribers:
            callback(loaded)


def file_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_policy(path: Path, clock: Callable[[], datetime]) -> LoadedPolicy:
    """Read, lint and compile one policy file; raise ConfigError listing every problem."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError([Problem("file", f"cannot read: {exc}")], source=str(path)) from None
    return _compile(data, path, clock)


def _compile(data: bytes, path: Path, clock: Callable[[], datetime]) -> LoadedPolicy:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([Problem("file", f"not UTF-8: {exc}")], source=str(path)) from None
    config = parse_config(text, source=str(path), base_dir=path.parent)
    return LoadedPolicy(config, Policy.compile(config), file_sha256(data), clock())


def restart_only_changes(
    old: Config, new: Config, *, can_mint: Callable[[GrantConfig], str | None]
) -> list[Problem]:
    """What in `new` a reload cannot apply. Pure."""
    problems = [
        Problem(label, "changed; a restart applies it (a reload changes grants only)")
        for attr, label in _RESTART_SECTIONS
        if getattr(old, attr) != getattr(new, attr)
    ]
    if old.vault != new.vault:
        problems.append(
            Problem(
                "[upstream.vault]", "changed; a restart applies it (a reload changes grants only)"
            )
        )
    for grant in new.grants:
        why = can_mint(grant)
        if why:
            problems.append(Problem(f"grant[{grant.name}]", why))
    return problems


class PolicyMetrics:
    """Prometheus series for reloads, on the broker's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.reloads = Counter(
            "luigi_creds_policy_reloads",
            "Policy file loads by outcome (loaded, refused, unchanged is not counted).",
            ["outcome"],
            registry=registry,
        )
        self.refused = Gauge(
            "luigi_creds_policy_refused",
            "1 while the policy file on disk was refused and an older policy is serving.",
            registry=registry,
        )
        self.loaded_at = Gauge(
            "luigi_creds_policy_loaded_timestamp_seconds",
            "Unix time the policy in force was loaded.",
            registry=registry,
        )
        self.info = Gauge(
            "luigi_creds_policy_info",
            "The policy in force: 1 for its sha256 (first 16 hex digits) and grant count.",
            ["sha256"],
            registry=registry,
        )


@dataclass
class _Refusal:
    sha256: str
    problems: tuple[Problem, ...]
    at: datetime


@dataclass
class _FileStamp:
    mtime_ns: int
    size: int
    inode: int


@dataclass
class PolicyReloader:
    """Watches one policy file and swaps `active` when it changes to a valid policy."""

    path: Path
    active: ActivePolicy
    audit: AuditStore
    clock: Callable[[], datetime]
    metrics: PolicyMetrics | None = None
    can_mint: Callable[[GrantConfig], str | None] = lambda grant: None
    stamp: Callable[[str], None] = lambda sha256: None
    poll_seconds: float = POLL_SECONDS
    _file: _FileStamp | None = None
    _refusal: _Refusal | None = None
    _watcher: Periodic = field(init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        # A check that raises leaves the policy in force untouched; the watcher goes on.
        self._watcher = Periodic("policy-reload", lambda requested: self.check(force=requested))

    # -- loading ------------------------------------------------------------------------------

    def announce(self, reason: str = "startup") -> None:
        """Audit and publish the policy in force (at start-up). Raises StoreUnavailable."""
        current = self.active.current
        self.audit.append(self._event(Outcome.LOADED, reason, current.sha256, current.config))
        self.stamp(current.sha256)
        self._published(current)
        self._file = self._stat()

    def check(self, *, force: bool = False) -> str:
        """Look at the file once; load it if it changed (or `force`). Returns what happened:
        unchanged | loaded | refused | retry (audit store down; the next check tries again)."""
        with self._lock:
            stamp = self._stat()
            if not force and stamp is not None and stamp == self._file:
                return "unchanged"
            try:
                data = self.path.read_bytes()
            except OSError as exc:
                return self._refuse("", (Problem("file", f"cannot read: {exc}"),), stamp)
            sha = file_sha256(data)
            current = self.active.current
            if sha == current.sha256:
                self._file = stamp
                if self._refusal is not None:
                    # The file went back to the policy in force: nothing is refused any more.
                    self._refusal = None
                    self._set_refused(False)
                return "unchanged"
            if self._refusal is not None and self._refusal.sha256 == sha:
                self._file = stamp
                return "refused"
            return self._load(data, sha, current, stamp)

    def _load(self, data: bytes, sha: str, current: LoadedPolicy, stamp: _FileStamp | None) -> str:
        try:
            loaded = _compile(data, self.path, self.clock)
        except ConfigError as exc:
            return self._refuse(sha, exc.problems, stamp)
        config = loaded.config
        problems = restart_only_changes(current.config, config, can_mint=self.can_mint)
        if problems:
            return self._refuse(sha, tuple(problems), stamp)
        try:
            self.audit.append(self._event(Outcome.LOADED, "reloaded", sha, config, current))
        except StoreUnavailable:
            log.error("policy not reloaded: its audit record could not be written; will retry")
            return "retry"
        self.active.swap(loaded)
        self.stamp(sha)
        self._file = stamp
        self._refusal = None
        self._published(loaded)
        log.info(
            "policy reloaded",
            extra={"sha256": sha, "previous": current.sha256, "grants": len(config.grants)},
        )
        return "loaded"

    def _refuse(self, sha: str, problems: Sequence[Problem], stamp: _FileStamp | None) -> str:
        self._file = stamp
        self._refusal = _Refusal(sha, tuple(problems), self.clock())
        for problem in problems:
            log.error(
                "policy file refused; the policy in force keeps serving",
                extra={"where": problem.where, "problem": problem.message, "sha256": sha},
            )
        current = self.active.current
        event = self._event(Outcome.REFUSED, "policy_invalid", current.sha256, None, current)
        detail = {
            **event.detail,
            "refused_sha256": sha,
            "problems": [f"{p.where}: {p.message}"[:300] for p in problems[:50]],
        }
        try:
            self.audit.append(dataclasses.replace(event, detail=detail))
        except StoreUnavailable:
            log.error("the policy refusal could not be audited")
        if self.metrics is not None:
            self.metrics.reloads.labels("refused").inc()
        self._set_refused(True)
        return "refused"

    def _event(
        self,
        outcome: Outcome,
        reason: str,
        sha: str,
        config: Config | None,
        previous: LoadedPolicy | None = None,
    ) -> AuditEvent:
        detail: dict[str, Any] = {
            "file": str(self.path),
            "replica": f"{socket.gethostname()}:{os.getpid()}",
        }
        if config is not None:
            detail["grants"] = [g.name for g in config.grants]
        if previous is not None:
            detail["previous_sha256"] = previous.sha256
        return AuditEvent(
            time=self.clock(),
            request_id=f"policy-{sha[:16] or 'unreadable'}",
            outcome=outcome,
            reason=reason,
            kind="policy",
            detail=detail,
            policy_sha256=sha,
        )

    def _stat(self) -> _FileStamp | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return _FileStamp(st.st_mtime_ns, st.st_size, st.st_ino)

    def _published(self, loaded: LoadedPolicy) -> None:
        if self.metrics is None:
            return
        self.metrics.reloads.labels("loaded").inc()
        self.metrics.info.clear()
        self.metrics.info.labels(loaded.sha256[:16]).set(1)
        if loaded.loaded_at is not None:
            self.metrics.loaded_at.set(loaded.loaded_at.timestamp())
        self._set_refused(False)

    def _set_refused(self, refused: bool) -> None:
        if self.metrics is not None:
            self.metrics.refused.set(1 if refused else 0)

    # -- status -------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """What /readyz shows under "policy": the sha256 in force and any refused file."""
        current = self.active.current
        body: dict[str, Any] = {
            "sha256": current.sha256,
            "loaded_at": current.loaded_at.isoformat() if current.loaded_at else None,
            "grants": len(current.config.grants),
            "state": "current",
        }
        refusal = self._refusal
        if refusal is not None:
            body["state"] = "refused_file_on_disk"
            body["refused"] = {
                "sha256": refusal.sha256,
                "at": refusal.at.isoformat(),
                "problems": [f"{p.where}: {p.message}" for p in refusal.problems],
            }
        return body

    # -- the watcher thread -------------------------------------------------------------------

    def request_reload(self) -> None:
        """SIGHUP: reload now, even if the file looks unchanged. Safe in a signal handler."""
        self._watcher.request()

    def start(self) -> None:
        self._watcher.start(self.poll_seconds)

    def stop(self) -> None:
        self._watcher.stop()
