"""A whole stack for broker integration tests: dev issuer, moto and one broker on the
`policy_toml` policy, started together (broker.dev.harness), with the audit records they wrote.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

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

    def stop(self) -> None:
        self.broker.stop()
        self.moto.stop()
        self.issuer.stop()


def start_stack(workdir: Path, *, issuer_extra: str = "") -> Stack:
    """Dev issuer + moto (with role etl-writer) + a broker on the policy_toml policy;
    `issuer_extra` is TOML added to the issuer table (e.g. `require_jti = false`)."""
    issuer = start_dev_issuer(workdir)
    moto = start_moto(workdir)
    role_arn = moto.create_role("etl-writer")
    audit_db = workdir / "audit.db"
    config = policy_toml(
        issuer_url=issuer.url,
        audit_db=audit_db,
        listen=f"127.0.0.1:{free_port()}",
        moto_url=moto.url,
        role_arn=role_arn,
        # Unauthenticated refusals are tallied; a short window lets tests see them soon.
        broker_extra='denial_tally_seconds = "1s"',
        issuer_extra=issuer_extra,
    )
    broker = start_broker(workdir, config, env=moto.broker_env)
    return Stack(issuer, moto, broker, audit_db, workdir, role_arn)
