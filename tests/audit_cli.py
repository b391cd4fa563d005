"""The audit CLI (`luigi-creds-broker audit ...`) run in-process at a fixed time, on an SQLite
ledger seeded with hand-computed events under a small policy file, for the report and rotation
tests."""

from __future__ import annotations

import argparse
import io
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path

from broker.audit import cli, open_store
from broker.audit.events import AuditEvent
from broker.dev import policy_file


def ledger_policy(*grants: str, **broker_settings: policy_file.TomlValue) -> str:
    """A policy for `seed_ledger`: the ledger at `{url}`, its checkpoint key `key.pem` beside
    the file, `broker_settings`, a gitlab.com issuer and `grants`."""
    broker = {"audit_store": "{url}", "audit_key_file": "key.pem", **broker_settings}
    gitlab = policy_file.issuer("gitlab", "https://gitlab.com", ["https://broker.example.com"])
    return "\n".join((policy_file.toml_table("[broker]", broker), gitlab, *grants))


def project_grant(name: str, *, refs: Sequence[str] = (), **settings: policy_file.TomlValue) -> str:
    """A grant of project 42 on gitlab.com (on `refs` only if given) assuming the role named
    like it."""
    match: dict[str, policy_file.TomlValue] = {"project_id": "42"}
    if refs:
        match["ref"] = list(refs)
    role = {"role_arn": f"arn:aws:iam::123456789012:role/{name}"}
    return policy_file.grant(name, match, aws=role, **settings)


def run_audit_cli(*argv: str, now: datetime) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of `luigi-creds-broker ARGV` with the clock at `now`."""
    parser = argparse.ArgumentParser(prog="luigi-creds-broker")
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(list(argv))
    out, err = io.StringIO(), io.StringIO()
    code = cli.run(args, stdout=out, stderr=err, now=now)
    return code, out.getvalue(), err.getvalue()


def seed_ledger(
    workdir: Path,
    events: Iterable[AuditEvent],
    *,
    policy: str,
    now: datetime,
    checkpoint_every: int,
) -> Path:
    """`workdir/broker.toml` (`policy` with its `{url}` filled in) on an SQLite ledger holding
    `events`, appended at `now` and checkpointed every `checkpoint_every` records."""
    url = f"sqlite:///{workdir}/audit.db"
    store = open_store(
        url,
        signing_key_path=workdir / "key.pem",
        salt_path=workdir / "salt",
        clock=lambda: now,
        checkpoint_every=checkpoint_every,
    )
    for event in events:
        store.append(event)
    store.close()
    path = workdir / "broker.toml"
    path.write_text(policy.format(url=url))
    return path
