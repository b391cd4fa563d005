"""Unit tests for broker.audit.chain: canonical JSON, RFC 6962 Merkle proofs, signed checkpoints.

Merkle vectors are the known answers from transparency-dev/merkle (proof/verify_test.go), which
come from RFC 6962's reference implementation.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.audit import chain
from broker.audit.events import AuditEvent, Outcome

LEAVES = [
    bytes.fromhex(h)
    for h in [
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    ]
]
ROOTS = [
    bytes.fromhex(h)
    for h in [
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
        "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
        "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
        "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
    ]
]
H = bytes.fromhex
# (1-based leaf, tree size, proof)
INCLUSION = [
    (1, 1, []),
    (
        1,
        8,
        [
            H("96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7"),
            H("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
            H("6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"),
        ],
    ),
    (
        6,
        8,
        [
            H("bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"),
            H("ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0"),
            H("d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"),
        ],
    ),
    (3, 3, [H("fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125")]),
    (
        2,
        5,
        [
            H("6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"),
            H("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
            H("bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"),
        ],
    ),
]
CONSISTENCY = [
    (1, 1, []),
    (
        1,
        8,
        [
            H("96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7"),
            H("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
            H("6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"),
        ],
    ),
    (
        6,
        8,
        [
            H("0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a"),
            H("ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0"),
            H("d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"),
        ],
    ),
    (
        2,
        5,
        [
            H("5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e"),
            H("bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"),
        ],
    ),
    (
        6,
        7,
        [
            H("0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a"),
            H("b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f"),
            H("d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"),
        ],
    ),
]
LEAF_HASHES = [chain.leaf_hash(leaf) for leaf in LEAVES]


def test_tree_hash_matches_rfc6962_roots() -> None:
    """The tree hash of the first n reference leaves equals the published root for n = 1..8."""
    assert chain.tree_hash([]).hex() == (
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    )
    for n in range(1, 9):
        assert chain.tree_hash(LEAF_HASHES[:n]) == ROOTS[n - 1]


def test_frontier_tracks_tree_hash() -> None:
    """Appending leaves to a compact range yields the same root as hashing the whole tree."""
    frontier: list[bytes] = []
    for n in range(1, 9):
        frontier = chain.frontier_append(frontier, n - 1, LEAF_HASHES[n - 1])
        assert chain.frontier_root(frontier) == ROOTS[n - 1]
        assert len(frontier) == bin(n).count("1")
    assert chain.decode_frontier(chain.encode_frontier(frontier)) == frontier


@pytest.mark.parametrize(("leaf", "size", "proof"), INCLUSION)
def test_inclusion_proofs_match_known_answers(leaf: int, size: int, proof: list[bytes]) -> None:
    """Generated inclusion proofs equal the reference ones and verify against the reference root."""
    leaves = LEAF_HASHES[:size]
    assert chain.inclusion_proof(leaf - 1, leaves) == proof
    chain.verify_inclusion(leaf - 1, size, LEAF_HASHES[leaf - 1], proof, ROOTS[size - 1])


@pytest.mark.parametrize(("leaf", "size", "proof"), [v for v in INCLUSION if v[2]])
def test_corrupted_inclusion_proofs_fail(leaf: int, size: int, proof: list[bytes]) -> None:
    """Inclusion verification rejects a wrong index, size, leaf, root, or an edited/padded proof."""
    root, lh, i = ROOTS[size - 1], LEAF_HASHES[leaf - 1], leaf - 1
    flipped = [bytes([proof[0][0] ^ 8]) + proof[0][1:], *proof[1:]]
    probes = [
        (i + 1, size, lh, proof, root),
        (i ^ 2, size, lh, proof, root),
        (i, size * 2, lh, proof, root),
        (i, size, chain.leaf_hash(b"wrong"), proof, root),
        (i, size, lh, proof, chain.EMPTY_ROOT),
        (i, size, lh, [*proof, root], root),
        (i, size, lh, [root, *proof], root),
        (i, size, lh, proof[:-1], root),
        (i, size, lh, flipped, root),
    ]
    for args in probes:
        with pytest.raises(chain.ChainError):
            chain.verify_inclusion(*args)


@pytest.mark.parametrize(("size1", "size2", "proof"), CONSISTENCY)
def test_consistency_proofs_match_known_answers(size1: int, size2: int, proof: list[bytes]) -> None:
    """Generated consistency proofs equal the reference ones and verify between the two roots."""
    assert chain.consistency_proof(size1, LEAF_HASHES[:size2]) == proof
    chain.verify_consistency(size1, size2, proof, ROOTS[size1 - 1], ROOTS[size2 - 1])


@pytest.mark.parametrize(("size1", "size2", "proof"), [v for v in CONSISTENCY if v[2]])
def test_corrupted_consistency_proofs_fail(size1: int, size2: int, proof: list[bytes]) -> None:
    """Consistency verification rejects wrong sizes, swapped roots, and edited or padded proofs."""
    r1, r2 = ROOTS[size1 - 1], ROOTS[size2 - 1]
    flipped = [*proof[:-1], bytes([proof[-1][0] ^ 16]) + proof[-1][1:]]
    probes = [
        (size1 + 1, size2, proof, r1, r2),
        (size1, size2 * 2, proof, r1, r2),
        (size1, size2, proof, r2, r1),
        (size1, size2, [], r1, r2),
        (size1, size2, [*proof, r1], r1, r2),
        (size1, size2, [proof[0], *proof], r1, r2),
        (size1, size2, proof[:-1], r1, r2),
        (size1, size2, flipped, r1, r2),
    ]
    for args in probes:
        with pytest.raises(chain.ChainError):
            chain.verify_consistency(*args)


def test_all_generated_proofs_verify() -> None:
    """Every inclusion and consistency proof over trees of 1..20 leaves verifies."""
    leaves = [chain.leaf_hash(bytes([i])) for i in range(20)]
    for n in range(1, 21):
        root = chain.tree_hash(leaves[:n])
        for i in range(n):
            chain.verify_inclusion(i, n, leaves[i], chain.inclusion_proof(i, leaves[:n]), root)
        for m in range(0, n + 1):
            proof = chain.consistency_proof(m, leaves[:n])
            chain.verify_consistency(m, n, proof, chain.tree_hash(leaves[:m]), root)


def test_canonical_json_is_sorted_compact_utf8() -> None:
    """Canonical JSON sorts keys by UTF-16 units, has no whitespace, keeps UTF-8, formats times."""
    when = datetime(2026, 1, 2, 4, 5, 6, tzinfo=timezone(timedelta(hours=1)))
    got = chain.canonical_json(
        {"b": [1, True, None], "a": "é\n", "\U0001f600": 1, "\uff61": 2, "t": when}
    )
    assert (
        got
        == (
            '{"a":"é\\n","b":[1,true,null],"t":"2026-01-02T03:05:06.000000Z",'
            '"\U0001f600":1,"\uff61":2}'
        ).encode()
    )


@pytest.mark.parametrize("bad", [1.5, {"x": float("nan")}, {1: "a"}, "\ud800", object()])
def test_canonical_json_rejects_what_it_cannot_encode_uniquely(bad: object) -> None:
    """Floats, non-string keys, lone surrogates and unknown types never reach a hashed record."""
    with pytest.raises((TypeError, ValueError)):
        chain.canonical_json(bad)


def test_naive_datetimes_are_refused() -> None:
    """A record time without a timezone is refused instead of being guessed."""
    with pytest.raises(ValueError):
        chain.format_time(datetime(2026, 1, 1))


def test_record_round_trips_to_the_same_event() -> None:
    """A stored record parses back into an equal AuditEvent and carries seq and prev_hash."""
    event = AuditEvent(
        time=datetime(2026, 11, 20, 10, 0, tzinfo=UTC),
        request_id="r1",
        outcome=Outcome.ISSUED,
        reason="issued",
        issuer="gitlab",
        subject="project_path:g/p",
        claims={"ref": "main", "project_id": "42"},
        grant="etl-writer",
        credential_ref="ASIAEXAMPLE",
        expires_at=datetime(2026, 11, 20, 10, 15, tzinfo=UTC),
        attempt=1,
        detail={"n": [1, 2]},
    )
    raw = chain.record_bytes(event, seq=7, prev_hash=chain.GENESIS_HASH)
    parsed = json.loads(raw)
    assert parsed["seq"] == 7 and parsed["prev_hash"] == chain.GENESIS_HASH
    assert parsed["schema_version"] == chain.SCHEMA_VERSION
    assert chain.event_from_record(parsed) == event
    assert chain.entry_hash(raw) == chain.leaf_hash(raw).hex()


def test_checkpoint_signature_verifies_and_rejects_tampering() -> None:
    """A signed checkpoint verifies with its key and fails with another key or an edited body."""
    key = Ed25519PrivateKey.generate()
    cp = chain.Checkpoint(origin="luigi-creds.test/audit", size=8, root=ROOTS[7])
    note = chain.sign_checkpoint(cp, key)
    lines = note.split("\n")
    assert lines[:4] == [
        "luigi-creds.test/audit",
        "8",
        chain.base64.b64encode(ROOTS[7]).decode(),
        "",
    ]
    assert lines[4].startswith("\u2014 luigi-creds.test/audit ")
    assert chain.verify_checkpoint(note, [key.public_key()], cp.origin) == cp
    with pytest.raises(chain.ChainError):
        chain.verify_checkpoint(note, [Ed25519PrivateKey.generate().public_key()], cp.origin)
    with pytest.raises(chain.ChainError):
        chain.verify_checkpoint(note.replace("\n8\n", "\n9\n"), [key.public_key()], cp.origin)
    with pytest.raises(chain.ChainError):
        chain.verify_checkpoint(note, [key.public_key()], "other-origin")


def test_checkpoint_ignores_unknown_cosignatures() -> None:
    """An extra witness signature line is ignored and the log's own signature still verifies."""
    key = Ed25519PrivateKey.generate()
    cp = chain.Checkpoint(origin="o", size=1, root=ROOTS[0])
    note = chain.sign_checkpoint(cp, key) + "\u2014 witness AAAAAAAA\n"
    assert chain.verify_checkpoint(note, [key.public_key()], "o") == cp


def test_canonical_json_fast_path_matches_the_reference_encoder() -> None:
    """The json-module fast path writes the same bytes as the member-by-member encoder."""
    when = datetime(2026, 5, 1, 12, 0, 0, 7, tzinfo=UTC)
    values: list[Any] = [
        {"b": 1, "a": [True, False, None, -(2**70)], "c": {"z": 'é\u2028"\\\x01', "y": when}},
        {"": "", "a_b": [[], {}], "A": "\U0001f600"},
        {"\ue000": 1, "\U0001f600": 2},  # non-ASCII names: UTF-16 order, the reference path
        ["x", 0, {"k": [1, 2, 3]}],
    ]
    for value in values:
        out: list[str] = []
        chain._canonical(value, out)
        assert chain.canonical_json(value) == "".join(out).encode("utf-8")
    assert chain.canonical_json({"\ue000": 1, "\U0001f600": 2}).index(b"\xf0") < 5
    with pytest.raises(TypeError):
        chain.canonical_json({"a": 1.5})
    with pytest.raises(TypeError):
        chain.canonical_json({1: "a"})


def test_format_time_writes_what_strftime_writes() -> None:
    """The isoformat fast path is the same text as the RFC 3339 strftime form it replaced."""
    east = timezone(timedelta(hours=5, minutes=30))
    for when in (
        datetime(2026, 5, 1, 12, 0, 0, 7, tzinfo=UTC),
        datetime(2026, 5, 1, 0, 0, tzinfo=east),
        datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(999, 1, 2, 3, 4, 5, tzinfo=UTC),
        datetime(1, 1, 1, tzinfo=UTC),
    ):
        expected = when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        assert chain.format_time(when) == expected


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"policy_sha256": "ab" * 32},
        # Member names and text that look like the filled-in members, and text beyond ASCII.
        {"claims": {"seq": 0, "prev_hash": "", "ünï": "ç\u2028"}, "reason": '"seq":"x"'},
        {"detail": {"nested": {"seq": [1, 2], "z": None}}, "task": "Task(a=1)"},
    ],
)
def test_a_record_template_fills_in_to_the_bytes_record_bytes_writes(
    changes: dict[str, Any],
) -> None:
    base = {
        "time": datetime(2026, 12, 2, 4, 30, tzinfo=UTC),
        "request_id": "req-1",
        "outcome": Outcome.ISSUED,
        "reason": "issued",
        "issuer": "https://gitlab.example",
        "subject": "project_path:etl",
        "claims": {"ref": "main"},
    }
    event = AuditEvent(**(base | changes))
    template = chain.RecordTemplate(event)
    for seq, prev in ((0, chain.GENESIS_HASH), (12345, "f0" * 32)):
        filled = template.fill(seq=seq, prev_hash=prev)
        assert filled == chain.record_bytes(event, seq=seq, prev_hash=prev)
        assert json.loads(filled)["seq"] == seq
