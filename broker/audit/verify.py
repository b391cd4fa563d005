"""`audit verify`: prove the ledger is the append-only history the checkpoints signed.

Owns the verification rules: a gap, an edit, a reordering, a truncation or a record rewritten
under a different key is found and named. Reads the store through its public reading methods;
talks to nothing else. Pure apart from that read.

Per record, in seq order: seq contiguous from 0 (or from the checkpoint a prune left as anchor),
the record parses with a known schema_version, it claims the seq it is stored at, its entry hash
recomputes, its prev_hash links to the previous record, its indexed columns agree with it, and it
does not repeat an earlier record. Then the head and every checkpoint: signature by a pinned key,
root equal to the Merkle root recomputed over the records, no two checkpoints of one size with
different roots (a fork), no checkpoint or head beyond the last record (truncation). Last,
intents with no terminal record older than a grace period (crash leftovers never reconciled).

Each finding names a seq. When one record is edited, only that record is named: the next
record's link is checked against the stored entry hash, so the damage does not cascade.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from broker.audit import chain
from broker.audit.events import Outcome
from broker.audit.ledger import TERMINAL, SqlLedger

# A crash can leave an intent without its terminal record; the broker reconciles those at start.
# Younger ones are requests still in flight, reported but not failed.
DEFAULT_DANGLING_GRACE = timedelta(minutes=5)
# Writers stamp `time` before they take the ledger lock, so neighbours can be out of order by the
# time an append waits for the lock; more than this is reported (not failed): order comes from seq.
TIME_TOLERANCE = timedelta(seconds=30)


@dataclass(frozen=True)
class Finding:
    kind: str  # edited|deleted|reordered|duplicated|truncated|bad_signature|fork|root_mismatch|...
    seq: int | None
    message: str
    fatal: bool = True


@dataclass(frozen=True)
class VerifyReport:
    size: int  # records present + pruned prefix: the next seq
    first_seq: int
    checkpoints_verified: int
    unsigned_tail: int  # records after the newest checkpoint, protected only by the chain
    findings: tuple[Finding, ...]
    in_flight: tuple[str, ...] = field(default=())  # request_ids of young dangling intents

    @property
    def ok(self) -> bool:
        return not any(f.fatal for f in self.findings)

    @property
    def first_bad_seq(self) -> int | None:
        seqs = [f.seq for f in self.findings if f.fatal and f.seq is not None]
        return min(seqs) if seqs else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "size": self.size,
            "first_seq": self.first_seq,
            "first_bad_seq": self.first_bad_seq,
            "checkpoints_verified": self.checkpoints_verified,
            "unsigned_tail": self.unsigned_tail,
            "in_flight": list(self.in_flight),
            "findings": [
                {"kind": f.kind, "seq": f.seq, "message": f.message, "fatal": f.fatal}
                for f in self.findings
            ],
        }


def _content_key(body: dict[str, Any]) -> bytes:
    rest = {k: v for k, v in body.items() if k not in ("seq", "prev_hash")}
    return hashlib.sha256(chain.canonical_json(rest)).digest()


def verify_ledger(
    store: SqlLedger,
    *,
    public_keys: Sequence[Ed25519PublicKey] | None,
    now: datetime,
    dangling_grace: timedelta = DEFAULT_DANGLING_GRACE,
    external_checkpoints: Iterable[str] = (),
) -> VerifyReport:
    """Check the whole ledger; `public_keys=None` skips signature checks (reported, not failed)."""
    findings: list[Finding] = []
    checkpoints = store.checkpoints()
    external = list(external_checkpoints)
    cp_sizes = {cp.size for cp in checkpoints}
    for note in external:
        with contextlib.suppress(chain.ChainError):  # an unreadable one is reported below
            cp_sizes.add(chain.parse_checkpoint(note).size)
    roots_at: dict[int, bytes] = {}

    records = store.records()
    first = next(records, None)
    first_seq = first.seq if first is not None else store.head().size
    frontier: list[bytes] = []
    prev = chain.GENESIS_HASH
    if first_seq > 0:
        anchors = [cp for cp in checkpoints if cp.size == first_seq]
        if anchors:
            frontier = chain.decode_frontier(anchors[0].frontier)
            prev = anchors[0].last_hash
            findings.append(
                Finding("pruned", None, f"records before seq {first_seq} were pruned", False)
            )
        elif first is not None:
            findings.append(
                Finding(
                    "deleted",
                    0,
                    f"records 0..{first_seq - 1} are missing and no checkpoint anchors seq "
                    f"{first_seq}",
                )
            )
    roots_at[first_seq] = chain.frontier_root(frontier)
    # leaves in `frontier`; differs from `expected` once records are missing
    leaves = first_seq if frontier else 0

    expected = first_seq
    prev_seq: int | None = None
    prev_hash_ok = True  # the previous record's stored entry hash matched its content
    prev_time: datetime | None = None
    seen: dict[bytes, int] = {}
    intents: dict[str, tuple[int, datetime]] = {}
    terminated: set[str] = set()

    def rows() -> Iterable[Any]:
        if first is not None:
            yield first
            yield from records

    for row in rows():
        if row.seq != expected:
            findings.append(
                Finding("deleted", expected, f"records {expected}..{row.seq - 1} are missing")
            )
            expected = row.seq
            prev_hash_ok = False
        raw = row.record.encode()
        recomputed = chain.entry_hash(raw)
        try:
            body = json.loads(raw)
            if not isinstance(body, dict):
                raise ValueError("record is not an object")
            event = chain.event_from_record(body)
        except (ValueError, KeyError, TypeError) as exc:
            findings.append(Finding("edited", row.seq, f"record {row.seq} does not parse: {exc}"))
            body, event = {}, None

        finding: Finding | None = None
        key = _content_key(body) if body else b""
        if body and key in seen and body.get("seq") != row.seq:
            finding = Finding("duplicated", row.seq, f"record {row.seq} repeats record {seen[key]}")
        elif body and body.get("seq") != row.seq:
            finding = Finding(
                "reordered",
                row.seq,
                f"record stored at seq {row.seq} was written as seq {body.get('seq')}",
            )
        elif recomputed != row.entry_hash:
            finding = Finding("edited", row.seq, f"record {row.seq} does not match its entry hash")
        elif body and (
            body.get("prev_hash") != row.prev_hash
            or body.get("time") != row.time
            or body.get("request_id") != row.request_id
            or body.get("outcome") != row.outcome
        ):
            finding = Finding("edited", row.seq, f"record {row.seq}'s columns were edited")
        elif row.prev_hash != prev and prev_seq is not None and prev_hash_ok:
            # this record is intact, so the previous one's stored hash was rewritten with it
            finding = Finding(
                "edited", prev_seq, f"record {prev_seq} was rewritten along with its entry hash"
            )
        elif row.prev_hash != prev and prev_seq is None and row.seq == 0:
            finding = Finding("edited", row.seq, "record 0 does not start the chain")
        if finding is not None and body:
            findings.append(finding)
        if body:
            seen.setdefault(key, row.seq)

        if event is not None:
            if prev_time is not None and prev_time - event.time > TIME_TOLERANCE:
                findings.append(
                    Finding(
                        "time_regression", row.seq, f"record {row.seq} goes back in time", False
                    )
                )
            prev_time = event.time
            if event.outcome == Outcome.TALLIED and not tally_well_formed(event.detail):
                findings.append(
                    Finding(
                        "malformed_tally",
                        row.seq,
                        f"record {row.seq} is a tally whose counts do not add up",
                    )
                )
            if event.outcome == Outcome.INTENT:
                intents[event.request_id] = (row.seq, event.time)
            elif event.outcome in TERMINAL:
                terminated.add(event.request_id)

        frontier = chain.frontier_append(frontier, leaves, bytes.fromhex(recomputed))
        leaves += 1
        prev_hash_ok = recomputed == row.entry_hash
        prev, prev_seq = row.entry_hash, row.seq
        expected += 1
        if expected in cp_sizes:
            roots_at[expected] = chain.frontier_root(frontier)

    size = expected
    truncated_reported = False

    def truncated(claimed: int, what: str) -> None:
        nonlocal truncated_reported
        if not truncated_reported:
            findings.append(
                Finding(
                    "truncated",
                    size,
                    f"{what} {claimed} records but the ledger ends before seq {size}",
                )
            )
            truncated_reported = True

    head = store.head()
    if head.size > size:
        truncated(head.size, "the ledger head counts")
    elif head.size < size:
        findings.append(Finding("edited", head.size, "the ledger head was moved back"))

    notes: list[tuple[str, str]] = [(cp.note, f"stored checkpoint {cp.size}") for cp in checkpoints]
    notes += [(note, "external checkpoint") for note in external]
    verified = 0
    signed_roots: dict[int, tuple[bytes, str]] = {}
    for note, label in notes:
        try:
            if public_keys is None:
                cp = chain.parse_checkpoint(note)
            else:
                cp = chain.verify_checkpoint(note, public_keys, store.origin)
                verified += 1
        except chain.ChainError as exc:
            try:
                size_hint: int | None = chain.parse_checkpoint(note).size
            except chain.ChainError:
                size_hint = None
            findings.append(
                Finding(
                    "bad_signature",
                    None if size_hint is None else max(size_hint - 1, 0),
                    f"{label}: {exc}",
                )
            )
            continue
        other = signed_roots.get(cp.size)
        if other is not None and other[0] != cp.root:
            findings.append(
                Finding(
                    "fork",
                    max(cp.size - 1, 0),
                    f"{label} and {other[1]} sign different roots for size {cp.size}",
                )
            )
        signed_roots.setdefault(cp.size, (cp.root, label))
        if cp.size > size:
            truncated(cp.size, f"{label} covers")
        elif cp.size in roots_at and roots_at[cp.size] != cp.root:
            findings.append(
                Finding(
                    "root_mismatch",
                    max(cp.size - 1, 0),
                    f"{label}: records 0..{cp.size - 1} do not hash to the signed root",
                )
            )
        elif cp.size < first_seq:
            pass  # pruned history: the signature is all that can be checked
    if public_keys is None and notes:
        findings.append(
            Finding("unsigned", None, "checkpoint signatures were not checked (no key)", False)
        )
    in_flight: list[str] = []
    for request_id, (seq, when) in intents.items():
        if request_id in terminated:
            continue
        if now - when > dangling_grace:
            findings.append(
                Finding(
                    "dangling_intent",
                    seq,
                    f"intent {seq} (request {request_id}) has no terminal or reconciled record",
                )
            )
        else:
            in_flight.append(request_id)

    newest = max((cp.size for cp in checkpoints if cp.size <= size), default=0)
    findings.sort(key=lambda f: (f.seq is None, f.seq or 0))
    return VerifyReport(
        size=size,
        first_seq=first_seq,
        checkpoints_verified=verified,
        unsigned_tail=size - max(newest, first_seq) if size else 0,
        findings=tuple(findings),
        in_flight=tuple(in_flight),
    )


def tally_well_formed(detail: Mapping[str, Any]) -> bool:
    """A `tallied` record (broker/denials.py): a window start <= end, positive counts per reason
    and per client address, both summing to `total`."""
    try:
        start = datetime.fromisoformat(detail["window_start"])
        end = datetime.fromisoformat(detail["window_end"])
        total = detail["total"]
        by_reason = [entry["count"] for entry in detail["counts"]]
        by_client = [entry["count"] for entry in detail["clients"]]
    except (KeyError, TypeError, ValueError):
        return False
    counts = [total, *by_reason, *by_client]
    if not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in counts):
        return False
    return start <= end and sum(by_reason) == total == sum(by_client)
