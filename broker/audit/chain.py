"""Tamper evidence for the audit ledger: canonical records, hash chain, Merkle tree, checkpoints.

Owns the bytes that get hashed and signed. Pure: no I/O, no clock; talks to no external system.

- A record is the canonical JSON (RFC 8785 style) of an `AuditEvent` plus `schema_version`, `seq`
  and `prev_hash`. `entry_hash = SHA-256(0x00 || canonical)`, the RFC 6962 leaf hash, so one hash
  serves both the `prev_hash` chain (cheap sequential check) and the Merkle tree.
- The Merkle tree is RFC 6962 / RFC 9162 section 2.1, with the semantics of transparency-dev/merkle:
  tree hash, inclusion and consistency proofs and their verification. Appends keep a compact range
  (the "frontier": roots of the perfect subtrees, left to right) so a root costs O(log n).
- A checkpoint is a C2SP tlog-checkpoint (`origin\\nsize\\nbase64(root)\\n`) in a C2SP signed note
  with an Ed25519 signature (https://c2sp.org/tlog-checkpoint, https://c2sp.org/signed-note).
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from broker.audit.events import AuditEvent, Outcome
from broker.errors import BrokerException

# Version 1: the original field set. Version 2 adds `policy_sha256`; a record carries version 2
# exactly when it has that field, so an event without it encodes byte for byte as before. A
# verifier accepts every version listed here so the chain stays continuous across an upgrade.
SCHEMA_VERSION = 1
SCHEMA_VERSION_POLICY = 2
KNOWN_SCHEMA_VERSIONS = frozenset({1, 2})

HASH_SIZE = 32
GENESIS_HASH = "00" * HASH_SIZE  # prev_hash of seq 0
EMPTY_ROOT = hashlib.sha256(b"").digest()  # RFC 6962 section 2.1: MTH({}) = SHA-256()


class ChainError(BrokerException, ValueError):
    """A record, proof or checkpoint does not verify."""


# ---------------------------------------------------------------------------------------------
# Canonical JSON


def format_time(value: datetime) -> str:
    """RFC 3339 in UTC with a `Z` and always microseconds, so the text form is one-to-one."""
    if value.tzinfo is not UTC:
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError("audit times must be timezone-aware")
        value = value.astimezone(UTC)
    if value.year >= 1000:
        # isoformat writes the same characters as the strftime below (a few times faster), but
        # pads years before 1000 where glibc's %Y does not: those keep strftime's form.
        return value.isoformat(timespec="microseconds")[:-6] + "Z"
    return value.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str) -> datetime:
    if not text.endswith("Z"):
        raise ValueError(f"not an RFC 3339 UTC time: {text!r}")
    if len(text) == 27 and text[10] == "T" and text[19] == ".":
        # The one form format_time writes; fromisoformat reads it some ten times faster.
        return datetime.fromisoformat(text[:-1]).replace(tzinfo=UTC)
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


def _utf16_key(key: str) -> bytes:
    # RFC 8785 section 3.2.3 sorts member names by their UTF-16 code units, not code points.
    return key.encode("utf-16-be", "surrogatepass")


def _canonical(value: Any, out: list[str]) -> None:
    if value is None or isinstance(value, bool):
        out.append("null" if value is None else ("true" if value else "false"))
    elif isinstance(value, int):
        out.append(str(value))
    elif isinstance(value, float):
        # NOTE: RFC 8785's ECMAScript number formatting is deliberately not ported: records carry
        # no floats (the store stringifies any that reach it), so no two encoders can disagree.
        raise TypeError("canonical audit JSON carries no floats")
    elif isinstance(value, str):
        out.append(json.dumps(value, ensure_ascii=False))
    elif isinstance(value, datetime):
        out.append(json.dumps(format_time(value)))
    elif isinstance(value, Mapping):
        out.append("{")
        keys = list(value)
        if not all(isinstance(k, str) for k in keys):
            raise TypeError("canonical audit JSON keys are strings")
        for i, key in enumerate(sorted(keys, key=_utf16_key)):
            if i:
                out.append(",")
            out.append(json.dumps(key, ensure_ascii=False))
            out.append(":")
            _canonical(value[key], out)
        out.append("}")
    elif isinstance(value, list | tuple):
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _canonical(item, out)
        out.append("]")
    else:
        raise TypeError(f"canonical audit JSON cannot encode {type(value).__name__}")


class _NonAsciiKey(BrokerException):
    """A member name outside ASCII: code point order may differ from UTF-16 order."""


# Values the json module writes exactly as `_canonical` does, by exact type (subclasses, like
# an enum's str, take the general path below).
_SCALARS = frozenset({str, int, bool, type(None)})


def _checked(value: Any) -> Any:
    """`value` with datetimes as text, after the checks `_canonical` makes; ASCII keys only."""
    if type(value) in _SCALARS:
        return value
    if type(value) is dict or isinstance(value, Mapping):
        plain = {}
        for key, item in value.items():
            if type(key) is not str and not isinstance(key, str):
                raise TypeError("canonical audit JSON keys are strings")
            if not key.isascii():
                raise _NonAsciiKey
            # Scalars inline: most members are, and a call per member was most of the cost.
            plain[key] = item if type(item) in _SCALARS else _checked(item)
        return plain
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        raise TypeError("canonical audit JSON carries no floats")
    if isinstance(value, datetime):
        return format_time(value)
    if isinstance(value, list | tuple):
        return [_checked(item) for item in value]
    raise TypeError(f"canonical audit JSON cannot encode {type(value).__name__}")


_ENCODE = json.JSONEncoder(
    ensure_ascii=False, sort_keys=True, separators=(",", ":"), check_circular=False
).encode


def canonical_json(value: Any) -> bytes:
    """Sorted keys, no insignificant whitespace, UTF-8; datetimes as RFC 3339 UTC `Z`; no floats."""
    try:
        # Fast path, byte for byte the same: with ASCII member names, code point order (what
        # the json module sorts by) is UTF-16 order, and the json module writes strings,
        # integers, booleans and null exactly as `_canonical` does.
        text = _ENCODE(_checked(value))
    except _NonAsciiKey:
        out: list[str] = []
        _canonical(value, out)
        text = "".join(out)
    # strict UTF-8: a lone surrogate raises instead of producing bytes no other parser accepts.
    return text.encode("utf-8")


def event_body(event: AuditEvent) -> dict[str, Any]:
    """The event's fields as the JSON object that is hashed (before seq/prev_hash are added)."""
    return {
        "time": format_time(event.time),
        "request_id": event.request_id,
        "outcome": str(event.outcome),
        "reason": event.reason,
        "kind": event.kind,
        "issuer": event.issuer,
        "subject": event.subject,
        "jti": event.jti,
        "token_sha256": event.token_sha256,
        "claims": dict(event.claims),
        "grant": event.grant,
        "target": event.target,
        "credential_ref": event.credential_ref,
        "expires_at": None if event.expires_at is None else format_time(event.expires_at),
        "session_id": event.session_id,
        "task": event.task,
        "client_addr": event.client_addr,
        "attempt": event.attempt,
        "detail": dict(event.detail),
    } | ({"policy_sha256": event.policy_sha256} if event.policy_sha256 else {})


def record_bytes(event: AuditEvent, *, seq: int, prev_hash: str) -> bytes:
    """The canonical record stored at `seq`: the event plus schema_version, seq and prev_hash."""
    body = event_body(event)
    body["schema_version"] = SCHEMA_VERSION_POLICY if event.policy_sha256 else SCHEMA_VERSION
    body["seq"] = seq
    body["prev_hash"] = prev_hash
    return canonical_json(body)


# A template's markers: this process's secret and a counter, unguessable from outside without
# a system call per record.
_MARKER_SECRET = secrets.token_hex(16)
_marker_numbers = itertools.count()


def _marker() -> str:
    return f"{_MARKER_SECRET}{next(_marker_numbers):x}"


class RecordTemplate:
    """An event's canonical record, encoded (and so checked) before its seq and prev_hash are
    known; `fill` completes it.

    Decision: the ledger writes a batch's records together just before the commit, holding the
    head lock, so the costly part of a record (canonical JSON) is done beforehand, outside it.
    Seq and prev_hash are encoded as two unguessable strings and replaced afterwards: canonical
    JSON orders members by name, so the result is byte for byte what `record_bytes` gives.
    """

    __slots__ = ("_parts",)

    def __init__(self, event: AuditEvent) -> None:
        while True:
            prev_marker, seq_marker = _marker(), _marker()
            body = event_body(event)
            body["schema_version"] = (
                SCHEMA_VERSION_POLICY if event.policy_sha256 else SCHEMA_VERSION
            )
            body["seq"] = seq_marker
            body["prev_hash"] = prev_marker
            raw = canonical_json(body)
            prev, seq = prev_marker.encode(), f'"{seq_marker}"'.encode()
            # Each marker once, prev_hash's member before seq's (name order); a marker that an
            # event's text happened to contain would make the split ambiguous: draw again.
            if raw.count(prev) == 1 and raw.count(seq) == 1 and raw.find(prev) < raw.find(seq):
                break
        head, rest = raw.split(prev)
        middle, tail = rest.split(seq)
        self._parts = (head, middle, tail)

    def fill(self, *, seq: int, prev_hash: str) -> bytes:
        """The record stored at `seq` after `prev_hash`: `record_bytes(event, seq=, prev_hash=)`."""
        head, middle, tail = self._parts
        return b"".join((head, prev_hash.encode("ascii"), middle, str(seq).encode(), tail))


def event_from_record(record: Mapping[str, Any]) -> AuditEvent:
    """Rebuild the AuditEvent from a parsed record (any known schema version)."""
    if record.get("schema_version") not in KNOWN_SCHEMA_VERSIONS:
        raise ChainError(f"unknown schema_version {record.get('schema_version')!r}")
    expires = record.get("expires_at")
    return AuditEvent(
        time=parse_time(record["time"]),
        request_id=record["request_id"],
        outcome=Outcome(record["outcome"]),
        reason=record.get("reason", ""),
        kind=record.get("kind", "exchange"),
        issuer=record.get("issuer", ""),
        subject=record.get("subject", ""),
        jti=record.get("jti", ""),
        token_sha256=record.get("token_sha256", ""),
        claims=record.get("claims", {}),
        grant=record.get("grant", ""),
        target=record.get("target", ""),
        credential_ref=record.get("credential_ref", ""),
        expires_at=None if expires is None else parse_time(expires),
        session_id=record.get("session_id", ""),
        task=record.get("task", ""),
        client_addr=record.get("client_addr", ""),
        attempt=record.get("attempt", 0),
        detail=record.get("detail", {}),
        policy_sha256=record.get("policy_sha256", ""),
    )


# ---------------------------------------------------------------------------------------------
# RFC 6962 Merkle tree


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def entry_hash(record: bytes) -> str:
    """Hex `SHA-256(0x00 || record)`: the chain link and the Merkle leaf."""
    return leaf_hash(record).hex()


def _split(n: int) -> int:
    """The largest power of two strictly smaller than n (n >= 2), RFC 6962 section 2.1's k."""
    return 1 << ((n - 1).bit_length() - 1)


def tree_hash(leaves: Sequence[bytes]) -> bytes:
    """MTH(D[n]) over leaf hashes (not leaf data)."""
    n = len(leaves)
    if n == 0:
        return EMPTY_ROOT
    if n == 1:
        return leaves[0]
    k = _split(n)
    return node_hash(tree_hash(leaves[:k]), tree_hash(leaves[k:]))


def inclusion_proof(index: int, leaves: Sequence[bytes]) -> list[bytes]:
    """PATH(m, D[n]) from RFC 6962 section 2.1.1."""
    n = len(leaves)
    if not 0 <= index < n:
        raise ValueError("leaf index outside the tree")
    if n == 1:
        return []
    k = _split(n)
    if index < k:
        return [*inclusion_proof(index, leaves[:k]), tree_hash(leaves[k:])]
    return [*inclusion_proof(index - k, leaves[k:]), tree_hash(leaves[:k])]


def _subproof(m: int, leaves: Sequence[bytes], whole: bool) -> list[bytes]:
    n = len(leaves)
    if m == n:
        return [] if whole else [tree_hash(leaves)]
    k = _split(n)
    if m <= k:
        return [*_subproof(m, leaves[:k], whole), tree_hash(leaves[k:])]
    return [*_subproof(m - k, leaves[k:], False), tree_hash(leaves[:k])]


def consistency_proof(size1: int, leaves: Sequence[bytes]) -> list[bytes]:
    """PROOF(m, D[n]) from RFC 6962 section 2.1.2; empty when m is 0 or n."""
    if not 0 <= size1 <= len(leaves):
        raise ValueError("old size outside the tree")
    if size1 in (0, len(leaves)):
        return []
    return _subproof(size1, leaves, True)


def _lsb(x: int) -> int:
    return x & 1


def root_from_inclusion(index: int, size: int, leaf: bytes, proof: Sequence[bytes]) -> bytes:
    """RFC 9162 section 2.1.3.2 (transparency-dev/merkle RootFromInclusionProof)."""
    if index >= size or index < 0:
        raise ChainError("leaf index outside the tree")
    if len(leaf) != HASH_SIZE or any(len(p) != HASH_SIZE for p in proof):
        raise ChainError("wrong hash size")
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            raise ChainError("inclusion proof too long")
        if _lsb(fn) or fn == sn:
            r = node_hash(p, r)
            if not _lsb(fn):
                while not _lsb(fn) and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ChainError("inclusion proof too short")
    return r


def verify_inclusion(
    index: int, size: int, leaf: bytes, proof: Sequence[bytes], root: bytes
) -> None:
    if root_from_inclusion(index, size, leaf, proof) != root:
        raise ChainError("inclusion proof does not lead to the root")


def verify_consistency(
    size1: int, size2: int, proof: Sequence[bytes], root1: bytes, root2: bytes
) -> None:
    """RFC 9162 section 2.1.4.2, with transparency-dev/merkle's handling of the trivial sizes."""
    if size2 < size1 or size1 < 0:
        raise ChainError("the second tree is smaller than the first")
    if size1 == size2:
        if proof or root1 != root2:
            raise ChainError("equal sizes need equal roots and an empty proof")
        return
    if size1 == 0:
        if proof:
            raise ChainError("a proof from the empty tree is empty")
        return
    if not proof:
        raise ChainError("empty consistency proof")
    if any(len(p) != HASH_SIZE for p in proof):
        raise ChainError("wrong hash size")
    path = list(proof)
    if size1 & (size1 - 1) == 0:  # size1 is a power of two: the old root is a node in the path
        path.insert(0, root1)
    fn, sn = size1 - 1, size2 - 1
    while _lsb(fn):
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise ChainError("consistency proof too long")
        if _lsb(fn) or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not _lsb(fn):
                while not _lsb(fn) and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    if sn != 0 or fr != root1 or sr != root2:
        raise ChainError("consistency proof does not match the roots")


def frontier_append(frontier: Sequence[bytes], size: int, leaf: bytes) -> list[bytes]:
    """Add one leaf to a compact range of `size` leaves; the result holds popcount(size+1) roots."""
    out = [*frontier, leaf]
    s = size
    while _lsb(s):
        right = out.pop()
        left = out.pop()
        out.append(node_hash(left, right))
        s >>= 1
    return out


def frontier_root(frontier: Sequence[bytes]) -> bytes:
    """MTH of the leaves a compact range stands for."""
    if not frontier:
        return EMPTY_ROOT
    root = frontier[-1]
    for h in reversed(frontier[:-1]):
        root = node_hash(h, root)
    return root


def encode_frontier(frontier: Iterable[bytes]) -> str:
    return ",".join(h.hex() for h in frontier)


def decode_frontier(text: str) -> list[bytes]:
    return [bytes.fromhex(h) for h in text.split(",")] if text else []


# ---------------------------------------------------------------------------------------------
# C2SP checkpoints in signed notes

_ALG_ED25519 = b"\x01"  # signed-note signature type for Ed25519


@dataclass(frozen=True)
class Checkpoint:
    origin: str
    size: int
    root: bytes

    def body(self) -> str:
        return f"{self.origin}\n{self.size}\n{base64.b64encode(self.root).decode()}\n"


def key_hash(name: str, public_key: Ed25519PublicKey) -> bytes:
    """signed-note key ID: SHA-256(name || 0x0A || 0x01 || public key)[:4]."""
    raw = public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return hashlib.sha256(name.encode() + b"\n" + _ALG_ED25519 + raw).digest()[:4]


def sign_checkpoint(checkpoint: Checkpoint, key: Ed25519PrivateKey) -> str:
    """The checkpoint as a signed note; the key name is the log origin."""
    body = checkpoint.body()
    sig = key.sign(body.encode())
    blob = base64.b64encode(key_hash(checkpoint.origin, key.public_key()) + sig).decode()
    return f"{body}\n\u2014 {checkpoint.origin} {blob}\n"


def parse_checkpoint(note: str) -> Checkpoint:
    """Parse a note's checkpoint body without checking any signature."""
    # an unsigned checkpoint (no signing key configured) is just the body
    body = note.partition("\n\n")[0] if "\n\n" in note else note.removesuffix("\n")
    lines = body.split("\n")
    if len(lines) < 3:
        raise ChainError("a checkpoint has origin, size and root lines")
    origin, size_text, root_text = lines[0], lines[1], lines[2]
    if not size_text.isdigit() or (size_text != "0" and size_text.startswith("0")):
        raise ChainError("checkpoint size is not a decimal number")
    try:
        root = base64.b64decode(root_text, validate=True)
    except ValueError as exc:
        raise ChainError("checkpoint root is not base64") from exc
    if len(root) != HASH_SIZE:
        raise ChainError("checkpoint root is not a SHA-256 hash")
    return Checkpoint(origin=origin, size=int(size_text), root=root)


def verify_checkpoint(note: str, keys: Sequence[Ed25519PublicKey], origin: str) -> Checkpoint:
    """Return the checkpoint if one signature by a trusted key (named `origin`) verifies."""
    checkpoint = parse_checkpoint(note)
    if checkpoint.origin != origin:
        raise ChainError(f"checkpoint origin {checkpoint.origin!r} is not {origin!r}")
    body, _, sigs = note.partition("\n\n")
    signed = (body + "\n").encode()
    wanted = {key_hash(origin, k): k for k in keys}
    for line in sigs.split("\n"):
        if not line.startswith("\u2014 "):
            continue
        name, _, blob = line[2:].rpartition(" ")
        if name != origin:
            continue  # another signer's line (e.g. a witness cosignature): ignored, per C2SP
        try:
            raw = base64.b64decode(blob, validate=True)
        except ValueError:
            continue
        key = wanted.get(raw[:4])
        if key is None or len(raw) != 4 + 64:
            continue
        try:
            key.verify(raw[4:], signed)
        except InvalidSignature:
            continue
        return checkpoint
    raise ChainError("no trusted signature on the checkpoint")
