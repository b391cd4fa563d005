"""`luigi-creds-broker audit verify|report|rotation|export|prune`: the ledger's admin commands.

Owns argument parsing and exit codes for the audit subcommands; it is their composition root, so
it is where the policy file and key files are read and the wall clock is consulted. Talks to the
audit store named in the config (SQLite file or PostgreSQL).

Exit codes: 0 ok, 1 tampering (or stale dangling intents) found, 2 usage, config or store error.
The commands never create key files or migrate the schema: an auditor's run changes nothing
except `prune`, which deletes what it was asked to.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TextIO

from broker import durations
from broker.audit import chain, open_store
from broker.audit.export import export_csv, export_jsonl
from broker.audit.key_files import KeyFileError, checkpoint_key_path, load_public_keys
from broker.audit.ledger import SqlLedger
from broker.audit.report import build_report, render
from broker.audit.rotation import Checkpoint as RotationCheckpoint
from broker.audit.rotation import (
    LedgerTrust,
    build_rotation,
    checkpoint_signature,
    ledger_trust,
)
from broker.audit.rotation import render as render_rotation
from broker.audit.verify import DEFAULT_DANGLING_GRACE, verify_ledger
from broker.config import BrokerSettings, Config, ConfigError
from broker.config_lint import load_config
from broker.errors import BrokerException
from broker.storage import StoreUnavailable

EXIT_OK, EXIT_TAMPERED, EXIT_USAGE = 0, 1, 2


class UsageError(BrokerException):
    """Bad arguments or configuration: exit 2."""


def _span(text: str) -> timedelta:
    """'7d', '12h', '1h30m', '2w' -> timedelta (the policy file's duration grammar)."""
    try:
        return timedelta(seconds=durations.seconds(text))
    except durations.DurationError as exc:
        raise UsageError(f"not a duration: {exc}") from None


def _when(text: str, now: datetime) -> datetime:
    """A duration back from now ('7d') or an ISO date/datetime (UTC if no offset)."""
    if not re.match(r"\d{4}-", text):
        try:
            return now - _span(text)
        except UsageError:
            raise UsageError(
                f"not a date or duration: {text!r} (use e.g. 7d, 12h, 2w or 2026-01-31)"
            ) from None
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError as exc:
        raise UsageError(f"not a date or duration: {text!r}") from exc
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `audit` with its four subcommands to the broker's argument parser."""
    audit = subparsers.add_parser("audit", help="verify, report on, export or prune the ledger")
    commands = audit.add_subparsers(dest="audit_command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", type=Path, help="broker.toml (audit_store, audit_key_file)")
        p.add_argument("--store", help="audit store URL; overrides the config's audit_store")
        p.add_argument(
            "--key-file", type=Path, help="checkpoint key (PEM; private or public) to verify with"
        )
        # `func` is what broker/__main__.py's main() dispatches on.
        p.set_defaults(func=run)

    verify = commands.add_parser("verify", help="check hash chain, Merkle roots and checkpoints")
    common(verify)
    verify.add_argument("--format", choices=("text", "json"), default="text")
    verify.add_argument(
        "--checkpoint",
        type=Path,
        action="append",
        default=[],
        help="a checkpoint note kept outside the store (repeatable)",
    )
    verify.add_argument(
        "--grace",
        default=f"{int(DEFAULT_DANGLING_GRACE.total_seconds())}s",
        help="how old a dangling intent may be before it fails verification",
    )

    report = commands.add_parser("report", help="credential-rotation report")
    common(report)
    report.add_argument("--since", default="7d", help="7d, 24h, or an ISO date")
    report.add_argument("--until", help="ISO date (default: now)")
    report.add_argument("--format", choices=("table", "json", "csv", "html"), default="table")
    report.add_argument("--output", type=Path, help="write here instead of stdout")

    rotation = commands.add_parser(
        "rotation",
        help="rotation audit: per task the grant, target, key or accessor, state and lifetime, "
        "with the ledger's verification and newest checkpoint signature on top",
    )
    common(rotation)
    rotation.add_argument("--since", default="7d", help="7d, 24h, or an ISO date")
    rotation.add_argument("--until", help="ISO date (default: now)")
    rotation.add_argument("--format", choices=("html", "json"), default="html")
    rotation.add_argument("--output", type=Path, help="write here instead of stdout")

    export = commands.add_parser("export", help="records as JSON lines or CSV for a SIEM")
    common(export)
    export.add_argument("--format", choices=("jsonl", "csv"), default="jsonl")
    export.add_argument("--since", help="7d, 24h, or an ISO date (default: everything)")
    export.add_argument("--output", type=Path, help="write here instead of stdout")

    prune = commands.add_parser("prune", help="delete records before a date, keeping an anchor")
    common(prune)
    prune.add_argument("--before", required=True, help="ISO date, or a duration back from now")


def _load(args: argparse.Namespace) -> tuple[Config, str, Path | None]:
    if args.config is not None:
        try:
            config = load_config(args.config)
        except ConfigError as exc:
            raise UsageError(f"{args.config}: {exc}") from exc
    elif args.store is None:
        raise UsageError("give --config broker.toml (or --store URL)")
    else:
        config = Config(broker=BrokerSettings(), issuers=(), grants=())
    url = args.store or config.broker.audit_store
    key_file = args.key_file or config.broker.audit_key_file
    if key_file is None:
        # The key `serve` creates beside a local store, if it has done so.
        default = checkpoint_key_path(dataclasses.replace(config.broker, audit_store=url))
        key_file = default if default is not None and default.exists() else None
    return config, url, key_file


def _ledger_trust(store: SqlLedger, key_file: Path | None, now: datetime) -> LedgerTrust:
    """The whole ledger verified (not just the window) and its newest checkpoint's signature."""
    if key_file is not None and not key_file.exists():
        raise UsageError(f"{key_file}: key file not found")
    keys = load_public_keys(key_file) if key_file is not None else None
    verification = verify_ledger(store, public_keys=keys, now=now)
    checkpoints = store.checkpoints()
    newest = None
    if checkpoints:
        cp = max(checkpoints, key=lambda c: c.size)
        verified = False
        if keys:
            try:
                chain.verify_checkpoint(cp.note, keys, store.origin)
                verified = True
            except chain.ChainError:
                verified = False
        newest = RotationCheckpoint(
            size=cp.size,
            time=cp.time,
            root=cp.root,
            signature=checkpoint_signature(cp.note),
            verified=verified,
        )
    return ledger_trust(verification, newest, keys_checked=keys is not None)


def _open(url: str) -> SqlLedger:
    try:
        # read-only use: no migration, and no key or salt file is ever created from here
        return open_store(url, migrate=False)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def _write(chunks: Iterable[str], output: Path | None, stdout: TextIO) -> None:
    if output is None:
        for chunk in chunks:
            stdout.write(chunk)
        return
    with output.open("w", encoding="utf-8") as fh:
        for chunk in chunks:
            fh.write(chunk)


def run(
    args: argparse.Namespace,
    *,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
    now: datetime | None = None,
) -> int:
    """Run one `audit` subcommand; return the process exit code."""
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    now = now or datetime.now(UTC)
    try:
        config, url, key_file = _load(args)
        store = _open(url)
        try:
            return _dispatch(args, store, config, key_file, now, out)
        finally:
            store.close()
    except UsageError as exc:
        err.write(f"audit: {exc}\n")
        return EXIT_USAGE
    except KeyFileError as exc:
        err.write(f"audit: {exc}\n")
        return EXIT_USAGE
    except StoreUnavailable as exc:
        err.write(f"audit: store unavailable: {exc}\n")
        return EXIT_USAGE


def _dispatch(
    args: argparse.Namespace,
    store: SqlLedger,
    config: Config,
    key_file: Path | None,
    now: datetime,
    out: TextIO,
) -> int:
    command = args.audit_command
    if command == "verify":
        if key_file is not None and not key_file.exists():
            raise UsageError(f"{key_file}: key file not found")
        keys = load_public_keys(key_file) if key_file is not None else None
        try:
            notes = [p.read_text(encoding="utf-8") for p in args.checkpoint]
        except OSError as exc:
            raise UsageError(str(exc)) from exc
        report = verify_ledger(
            store,
            public_keys=keys,
            now=now,
            dangling_grace=_span(args.grace),
            external_checkpoints=notes,
        )
        if args.format == "json":
            out.write(json.dumps(report.as_dict(), indent=2) + "\n")
        else:
            status = "OK" if report.ok else f"TAMPERED: first bad seq {report.first_bad_seq}"
            out.write(
                f"{status}\nrecords {report.first_seq}..{report.size - 1},"
                f" {report.checkpoints_verified} checkpoints verified,"
                f" {report.unsigned_tail} records after the last checkpoint\n"
            )
            for f in report.findings:
                where = "-" if f.seq is None else str(f.seq)
                level = "FAIL" if f.fatal else "note"
                out.write(f"{level} {f.kind} seq {where}: {f.message}\n")
            if report.in_flight:
                out.write(f"note {len(report.in_flight)} intents in flight\n")
        return EXIT_OK if report.ok else EXIT_TAMPERED
    if command == "report":
        since = _when(args.since, now)
        until = _when(args.until, now) if args.until else now
        result = build_report(store.events(since=since), config, since=since, until=until)
        _write([render(result, config, args.format)], args.output, out)
        return EXIT_OK
    if command == "rotation":
        since = _when(args.since, now)
        until = _when(args.until, now) if args.until else now
        trust = _ledger_trust(store, key_file, now)
        rotation_report = build_rotation(
            store.events(since=since), config, since=since, until=until, ledger=trust
        )
        _write([render_rotation(rotation_report, args.format)], args.output, out)
        return EXIT_OK
    if command == "export":
        start = _when(args.since, now) if args.since else None
        records = store.records(since=start)
        chunks = export_jsonl(records) if args.format == "jsonl" else export_csv(records)
        _write(chunks, args.output, out)
        return EXIT_OK
    if command == "prune":
        before = _when(args.before, now)
        pruned = store.prune(before)
        out.write(
            f"pruned {pruned.deleted} records; verification now starts at the checkpoint of"
            f" size {pruned.anchor_size}\n"
        )
        return EXIT_OK
    raise UsageError(f"unknown audit command {command!r}")
