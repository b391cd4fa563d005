"""A whole stack for broker integration tests: dev issuer, moto and one broker on the
`policy_toml` policy, started together (broker.dev.harness), with the audit records they wrote.

`start_upstreams` starts the issuer and moto alone, for a module whose tests each start their
own brokers on them (`Upstreams.config`, `Upstreams.start_broker`, `Upstreams.serve`).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker.audit import open_store
from broker.audit.events import AuditEvent, Outcome
from broker.dev.harness import (
    Broker,
    DevIssuer,
    Moto,
    policy_toml,
    start_broker,
    start_dev_issuer,
    start_moto,
)
from broker.dev.issuer import SigningKey
from broker.dev.processes import free_port
from broker.sealing import RefSealer

# For tests that read sessions and replay rows, never a sealed credential reference: any
# sealing key serves.
READ_ONLY_SEALER = RefSealer(bytes(32))


def tally_counts(audit_db: Path) -> Counter[tuple[str, str, str]]:
    """(kind, outcome, reason) -> how many unauthenticated refusals the `tallied` records count."""
    counts: Counter[tuple[str, str, str]] = Counter()
    for event in audit_events(audit_db):
        if event.outcome == Outcome.TALLIED:
            for entry in event.detail["counts"]:
                counts[(entry["kind"], entry["outcome"], entry["reason"])] += entry["count"]
    return counts


def wait_tallied(
    audit_db: Path, before: Counter[tuple[str, str, str]], kind: str, reason: str | None
) -> Counter[tuple[str, str, str]]:
    """Wait (a few tally windows) until the tallies count one more refusal of `kind` with
    `reason` (any reason if None) than `before`; return the new counts' increase."""
    deadline = time.monotonic() + 10
    while True:
        grown = tally_counts(audit_db) - before
        if any(k[0] == kind and (reason is None or k[2] == reason) for k in grown):
            return grown
        assert time.monotonic() < deadline, f"no {kind} refusal {reason} tallied"
        time.sleep(0.2)


def audit_events(audit_db: Path) -> list[AuditEvent]:
    """Every record of an SQLite audit store, read through the ledger."""
    store = open_store(f"sqlite:///{audit_db}")
    try:
        return list(store.events())
    finally:
        store.close()


@dataclass
class Stack:
    issuer: DevIssuer
    moto: Moto
    broker: Broker
    audit_db: Path
    workdir: Path
    role_arn: str

    @property
    def store_url(self) -> str:
        return f"sqlite:///{self.audit_db}"

    def events(self) -> list[AuditEvent]:
        return audit_events(self.audit_db)

    def events_for(self, request_id: str) -> list[AuditEvent]:
        return [e for e in self.events() if e.request_id == request_id]

    def tallies(self) -> Counter[tuple[str, str, str]]:
        return tally_counts(self.audit_db)

    def assert_tallied(
        self, request_id: str, before: Counter[tuple[str, str, str]], reason: str | None
    ) -> Counter[tuple[str, str, str]]:
        """An unauthenticated refusal: no record of its own, counted in a `tallied` record."""
        assert self.events_for(request_id) == []
        return wait_tallied(self.audit_db, before, "exchange", reason)

    def issuer_key(self, alg: str = "RS256") -> SigningKey:
        """The issuer's active private key, read from its state dir (generated at test time)."""
        entries = json.loads(
            (self.workdir / "dev-issuer-state" / "signing-keys.json").read_text("utf-8")
        )
        return [SigningKey.from_json(e) for e in entries if e["alg"] == alg][-1]

    def credentials(self, grant: str) -> dict[str, Any]:
        """AWS credentials for `grant`, exchanged for a fresh default GitLab token."""
        status, body, _ = self.broker.exchange(self.issuer.mint("gitlab"), grant=grant)
        assert status == 200, body
        creds: dict[str, Any] = body["credentials"]
        return creds

    def s3(self, creds: dict[str, Any]) -> Any:
        """An S3 client on moto signing with minted `creds`."""
        return self.moto.client("s3", **creds)

    def stop(self) -> None:
        self.broker.stop()
        self.moto.stop()
        self.issuer.stop()


@dataclass
class Upstreams:
    """The dev issuer and moto (with role etl-writer) that the brokers of a test or a module
    share; a context manager that stops both."""

    issuer: DevIssuer
    moto: Moto
    role_arn: str
    workdir: Path

    def config(self, audit_store: Path | str, **settings: str) -> str:
        """A policy_toml policy on these upstreams, listening on a free port; `settings`
        (listen, role_arn, moto_url, extra, broker_extra, issuer_extra) as policy_toml takes
        them."""
        defaults = {
            "listen": f"127.0.0.1:{free_port()}",
            "moto_url": self.moto.url,
            "role_arn": self.role_arn,
        }
        return policy_toml(issuer_url=self.issuer.url, audit_db=audit_store, **defaults | settings)

    def start_broker(self, workdir: Path, config: str, *, ca_file: Path | None = None) -> Broker:
        """`luigi-creds-broker serve` on `config`, signing its STS calls with its moto user
        (`ca_file`: the CA of the certificate a TLS config serves, as start_broker takes it)."""
        return start_broker(workdir, config, env=self.moto.broker_env, ca_file=ca_file)

    def serve(self, workdir: Path, **settings: str) -> Stack:
        """A broker under `workdir` on `config(workdir / "audit.db", **settings)`, as a Stack
        (whose `stop` stops these upstreams too)."""
        audit_db = workdir / "audit.db"
        broker = self.start_broker(workdir, self.config(audit_db, **settings))
        role_arn = settings.get("role_arn", self.role_arn)
        return Stack(self.issuer, self.moto, broker, audit_db, workdir, role_arn)

    def stop(self) -> None:
        self.moto.stop()
        self.issuer.stop()

    def __enter__(self) -> Upstreams:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_upstreams(workdir: Path) -> Upstreams:
    """Dev issuer + moto (with role etl-writer), logging under `workdir`."""
    with contextlib.ExitStack() as on_failure:
        issuer = start_dev_issuer(workdir)
        on_failure.callback(issuer.stop)
        moto = start_moto(workdir)
        on_failure.callback(moto.stop)
        upstreams = Upstreams(issuer, moto, moto.create_role("etl-writer"), workdir)
        on_failure.pop_all()
    return upstreams


def start_stack(workdir: Path, *, issuer_extra: str = "") -> Stack:
    """Dev issuer + moto (with role etl-writer) + a broker on the policy_toml policy;
    `issuer_extra` is TOML added to the issuer table (e.g. `require_jti = false`)."""
    # Unauthenticated refusals are tallied; a short window lets tests see them soon.
    tally_soon = 'denial_tally_seconds = "1s"'
    return start_upstreams(workdir).serve(
        workdir, broker_extra=tally_soon, issuer_extra=issuer_extra
    )
