"""Policy reload on a running broker: edited under load, refused when broken, SIGHUP, replicas.

Real processes: the local OIDC issuer, moto (IAM enforced) and `luigi-creds-broker serve`; two
replicas share one PostgreSQL. Client threads exchange continuously over HTTP while the policy
file is edited.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from stack import Upstreams, start_upstreams

from broker.audit import open_store
from broker.audit.events import Outcome
from broker.dev.harness import Broker, DevIssuer, fresh_pg_database
from broker.dev.policy_file import etl_project_grant
from broker.dev.processes import free_port

pytestmark = pytest.mark.integration

# The continuous client must not be throttled: the point is that no request fails.
UNTHROTTLED = (
    "rate_limit_identity = { per_second = 10000, burst = 10000 }\n"
    "rate_limit_grant = { per_second = 10000, burst = 10000 }"
)


def reader_grant(role_arn: str, ttl: str = "15m") -> str:
    """A second grant the first policy does not have."""
    return etl_project_grant("etl-reader", ttl=ttl, aws={"role_arn": role_arn})


@pytest.fixture(scope="module")
def upstreams(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstreams]:
    with start_upstreams(tmp_path_factory.mktemp("reload-upstreams")) as up:
        yield up


def _config(up: Upstreams, store: Path | str, listen: str, extra: str = "") -> str:
    return up.config(store, listen=listen, broker_extra=UNTHROTTLED, extra=extra)


def _edit(path: Path, text: str) -> None:
    """Replace the file atomically, as an editor's save or a ConfigMap update does."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


@dataclass
class Client:
    """A thread exchanging fresh tokens for one grant in a loop, remembering every answer."""

    broker: Broker
    issuer: DevIssuer
    grant: str
    answers: list[tuple[float, float, int, str]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def run(self) -> None:
        while not self.stop.is_set():
            token = self.issuer.mint("gitlab")
            started = time.monotonic()
            status, body, _ = self.broker.exchange(token, self.grant)
            reason = body.get("error", "") if status != 200 else ""
            self.answers.append((started, time.monotonic(), status, reason))

    def __enter__(self) -> Client:
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        assert self.thread is not None
        self.thread.join(timeout=30)

    def count(self) -> int:
        return len(self.answers)

    def wait_for(self, n: int, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while self.count() < n and time.monotonic() < deadline:
            time.sleep(0.02)
        assert self.count() >= n, f"the client made {self.count()} requests"


def _ready(broker: Broker) -> tuple[int, dict[str, object]]:
    status, text = broker.get("/readyz")
    return status, json.loads(text)


def _policy_state(broker: Broker) -> dict[str, object]:
    _, body = _ready(broker)
    state = body["policy"]
    assert isinstance(state, dict)
    return state


def _metric(broker: Broker, name: str) -> float:
    _, text = broker.get("/metrics")
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not exported")


def test_policy_edited_under_load(upstreams: Upstreams, tmp_path: Path) -> None:
    """While a client exchanges continuously: adding a grant applies within a second and no
    request fails; a broken edit is refused (logged, metric, /readyz) and the old policy keeps
    serving; every record names the policy it was decided under."""
    up = upstreams
    audit_db = tmp_path / "audit.db"
    listen = f"127.0.0.1:{free_port()}"
    first = _config(up, audit_db, listen)
    broker = up.start_broker(tmp_path, first)
    try:
        sha_first = _policy_state(broker)["sha256"]
        with Client(broker, up.issuer, "etl-writer") as writer:
            writer.wait_for(5)
            # The second grant does not exist yet.
            status, body, _ = broker.exchange(up.issuer.mint("gitlab"), "etl-reader")
            assert (status, body["error"]) == (400, "invalid_target")
            with Client(broker, up.issuer, "etl-reader") as reader:
                reader.wait_for(3)
                edited_at = time.monotonic()
                _edit(broker.config_path, first + reader_grant(up.role_arn))
                time.sleep(1.5)
                reader.wait_for(reader.count() + 3)
            # Every reader request that started a second after the edit was served.
            late = [a for a in reader.answers if a[0] >= edited_at + 1.0]
            assert late and all(a[2] == 200 for a in late), late
            first_ok = min(a[1] for a in reader.answers if a[2] == 200)
            applied_after = first_ok - edited_at
            assert applied_after < 1.0, applied_after
            sha_second = _policy_state(broker)["sha256"]
            assert sha_second != sha_first

            # A broken edit: refused, the old policy (with etl-reader) keeps serving.
            before = writer.count()
            _edit(broker.config_path, first + "[[grant]\nname = \n")
            deadline = time.monotonic() + 5
            while _policy_state(broker)["state"] != "refused_file_on_disk":
                assert time.monotonic() < deadline, "the broken edit was not noticed"
                time.sleep(0.05)
            status, ready = _ready(broker)
            assert status == 200 and ready["status"] == "ready"
            state = _policy_state(broker)
            assert state["sha256"] == sha_second
            refused = state["refused"]
            assert isinstance(refused, dict) and refused["problems"]
            assert _metric(broker, "luigi_creds_policy_refused") == 1.0
            status, _, _ = broker.exchange(up.issuer.mint("gitlab"), "etl-reader")
            assert status == 200
            writer.wait_for(before + 5)
        # Not one request of the continuous client failed, across both edits.
        failures = [a for a in writer.answers if a[2] != 200]
        assert not failures, failures
        print(
            f"\nunder load: {len(writer.answers)} writer requests, 0 failed; the new grant "
            f"applied {applied_after * 1000:.0f} ms after the edit"
        )
        assert "policy file refused" in broker.process.log_text()
    finally:
        broker.stop()

    store = open_store(f"sqlite:///{audit_db}")
    try:
        events = list(store.events())
    finally:
        store.close()
    loads = [e for e in events if e.kind == "policy"]
    assert [(e.outcome, e.policy_sha256) for e in loads] == [
        (Outcome.LOADED, sha_first),
        (Outcome.LOADED, sha_second),
        (Outcome.REFUSED, sha_second),
    ]
    assert loads[1].detail["previous_sha256"] == sha_first
    assert loads[2].detail["problems"]
    # Every record names a policy; each issued record names the one in force when it was made.
    assert all(e.policy_sha256 in (sha_first, sha_second) for e in events)
    reader_issued = [e for e in events if e.grant == "etl-reader" and e.outcome == Outcome.ISSUED]
    assert reader_issued and all(e.policy_sha256 == sha_second for e in reader_issued)


def test_sighup_reloads_an_edit_the_poll_cannot_see(upstreams: Upstreams, tmp_path: Path) -> None:
    """An in-place edit that keeps size and mtime is invisible to the stat poll; SIGHUP loads it."""
    up = upstreams
    listen = f"127.0.0.1:{free_port()}"
    before = _config(up, tmp_path / "audit.db", listen, reader_grant(up.role_arn, "15m"))
    after = _config(up, tmp_path / "audit.db", listen, reader_grant(up.role_arn, "16m"))
    assert len(before) == len(after)
    broker = up.start_broker(tmp_path, before)
    try:
        sha = _policy_state(broker)["sha256"]
        stat = broker.config_path.stat()
        broker.config_path.write_text(after, encoding="utf-8")
        os.utime(broker.config_path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        time.sleep(1.0)
        assert _policy_state(broker)["sha256"] == sha  # the poll saw nothing
        os.kill(broker.process.pid, signal.SIGHUP)
        deadline = time.monotonic() + 5
        while _policy_state(broker)["sha256"] == sha:
            assert time.monotonic() < deadline, "SIGHUP did not reload"
            time.sleep(0.05)
        status, body, _ = broker.exchange(up.issuer.mint("gitlab"), "etl-reader")
        assert status == 200 and 900 < body["expires_in"] <= 960
        assert broker.process.running()
    finally:
        broker.stop()


def test_reload_that_changes_the_broker_section_is_refused(
    upstreams: Upstreams, tmp_path: Path
) -> None:
    """A reload changes grants only: a new [broker] setting names the restart it needs."""
    up = upstreams
    listen = f"127.0.0.1:{free_port()}"
    config = _config(up, tmp_path / "audit.db", listen)
    broker = up.start_broker(tmp_path, config)
    try:
        _edit(broker.config_path, config.replace('leeway = "30s"', 'leeway = "10s"'))
        deadline = time.monotonic() + 5
        while _policy_state(broker)["state"] != "refused_file_on_disk":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        refused = _policy_state(broker)["refused"]
        assert isinstance(refused, dict)
        assert any("[broker]" in p and "restart" in p for p in refused["problems"])
        # Putting the old file back clears the refusal.
        _edit(broker.config_path, config)
        deadline = time.monotonic() + 5
        while _policy_state(broker)["state"] != "current":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert _metric(broker, "luigi_creds_policy_refused") == 0.0
    finally:
        broker.stop()


def test_two_replicas_on_one_postgresql_converge(upstreams: Upstreams, tmp_path: Path) -> None:
    """Each replica watches its own copy of the file; after the same edit both serve the new
    policy within a second, and each audited its own load in the shared ledger."""
    up = upstreams
    with fresh_pg_database("reload") as url:
        replicas = []
        try:
            for name in ("a", "b"):
                listen = f"127.0.0.1:{free_port()}"
                replicas.append(up.start_broker(tmp_path / name, _config(up, url, listen)))
            # The replicas' files differ only in their listen address (one host, two ports),
            # so each replica converges on the sha256 of its own new file.
            edited_at = time.monotonic()
            expected = {}
            for r in replicas:
                text = r.config_path.read_text(encoding="utf-8") + reader_grant(up.role_arn)
                _edit(r.config_path, text)
                expected[r.url] = hashlib.sha256(text.encode()).hexdigest()
            pending = list(replicas)
            while pending:
                assert time.monotonic() - edited_at < 3, "replicas did not converge"
                pending = [r for r in pending if _policy_state(r)["sha256"] != expected[r.url]]
                time.sleep(0.02)
            converged_after = time.monotonic() - edited_at
            assert converged_after < 1.0, converged_after
            for r in replicas:
                status, _, _ = r.exchange(up.issuer.mint("gitlab"), "etl-reader")
                assert status == 200
            print(f"\ntwo replicas reloaded {converged_after * 1000:.0f} ms after the edit")
        finally:
            for r in replicas:
                r.stop()
        store = open_store(url)
        try:
            loads = [e for e in store.events() if e.kind == "policy"]
        finally:
            store.close()
        reloads = [e for e in loads if e.reason == "reloaded"]
        assert len(reloads) == 2
        assert {e.detail["replica"] for e in reloads}.__len__() == 2
        assert all("etl-reader" in e.detail["grants"] for e in reloads)
