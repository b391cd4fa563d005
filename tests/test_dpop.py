"""DPoP proofs (RFC 9449) as the broker checks them: the client's real proofs, and each way a
proof can be wrong, refused with its own reason; jtis spent once across two brokers' views of one
store; nonces any replica sharing the store accepts."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from stack import READ_ONLY_SEALER

from broker.dpop import (
    ERROR_INVALID_PROOF,
    ERROR_USE_NONCE,
    DpopGuard,
    NonceSource,
    ProofError,
    normalize_htu,
    verify_proof,
)
from broker.jwk import b64url_decode, b64url_encode
from broker.sessions import open_state
from broker.storage import Database
from luigi_creds.dpop import DpopKey

URL = "https://broker.example:8443/v1/token"
# Near the real time: spent proof jtis expire by the database's clock (a replica's own clock
# never decides when a replay row may go), so a fixed date would let them lapse at once.
NOW = datetime.now(UTC).replace(microsecond=0)
NONCES = NonceSource(b"k" * 32)


def verify(raw: str, *, method: str = "POST", url: str = URL, now: datetime = NOW) -> str:
    return verify_proof(raw, method=method, url=url, now=now, leeway=30, nonces=NONCES).jkt


def refused(raw: str, **kwargs: object) -> ProofError:
    with pytest.raises(ProofError) as caught:
        verify(raw, **kwargs)  # type: ignore[arg-type]
    return caught.value


def tampered(raw: str, *, header: dict[str, object] | None = None, **claims: object) -> str:
    """`raw` with header members or claims replaced (the signature no longer matches)."""
    head, body, sig = raw.split(".")
    h = json.loads(b64url_decode(head)) | (header or {})
    c = json.loads(b64url_decode(body)) | claims
    return ".".join(
        (b64url_encode(json.dumps(h).encode()), b64url_encode(json.dumps(c).encode()), sig)
    )


def test_the_clients_proof_verifies_and_names_its_key() -> None:
    key = DpopKey()
    for _ in range(20):  # low-S normalisation: every signature is accepted, not about half
        assert verify(key.proof("POST", URL, now=NOW, nonce=NONCES.issue(NOW))) == key.thumbprint


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"method": "GET"}, "dpop_htm_mismatch"),
        ({"url": "https://broker.example:8443/v1/revoke"}, "dpop_htu_mismatch"),
        ({"url": "https://other.example:8443/v1/token"}, "dpop_htu_mismatch"),
        ({"now": NOW + timedelta(seconds=91)}, "dpop_iat_too_old"),
        ({"now": NOW - timedelta(seconds=31)}, "dpop_iat_in_future"),
    ],
)
def test_a_proof_for_another_request_or_time_is_refused(
    kwargs: dict[str, object], reason: str
) -> None:
    proof = DpopKey().proof("POST", URL, now=NOW, nonce=NONCES.issue(NOW))
    error = refused(proof, **kwargs)
    assert (error.error, error.reason) == (ERROR_INVALID_PROOF, reason)
    assert error.jkt, "a verified key is named in the audit record"


def test_htu_is_compared_normalised() -> None:
    assert normalize_htu("HTTPS://Broker.Example:443/v1/token?x=1#f") == (
        "https://broker.example/v1/token"
    )
    assert normalize_htu("http://127.0.0.1:80/v1/token") == "http://127.0.0.1/v1/token"
    assert normalize_htu("http://[::1]:8480/v1/token") == "http://[::1]:8480/v1/token"


def test_nonces_missing_or_stale_ask_for_the_current_one() -> None:
    key = DpopKey()
    missing = refused(key.proof("POST", URL, now=NOW))
    assert (missing.error, missing.reason) == (ERROR_USE_NONCE, "dpop_nonce_missing")
    old = NONCES.issue(NOW - timedelta(minutes=11))
    stale = refused(key.proof("POST", URL, now=NOW, nonce=old))
    assert (stale.error, stale.reason) == (ERROR_USE_NONCE, "dpop_nonce_stale")
    forged = refused(key.proof("POST", URL, now=NOW, nonce=NonceSource.random().issue(NOW)))
    assert forged.reason == "dpop_nonce_stale"
    # Where no nonce is required (an exchange), a proof without one passes; a bad one does not.
    none = key.proof("POST", URL, now=NOW)
    assert (
        verify_proof(
            none, method="POST", url=URL, now=NOW, leeway=30, nonces=NONCES, nonce_required=False
        ).jkt
        == key.thumbprint
    )
    with pytest.raises(ProofError) as caught:
        verify_proof(
            key.proof("POST", URL, now=NOW, nonce=old),
            method="POST", url=URL, now=NOW, leeway=30, nonces=NONCES, nonce_required=False,
        )  # fmt: skip
    assert caught.value.error == ERROR_USE_NONCE
    # The previous window's nonce is still good: a nonce lives 5 to 10 minutes.
    previous = NONCES.issue(NOW - timedelta(minutes=5))
    assert verify(key.proof("POST", URL, now=NOW, nonce=previous)) == key.thumbprint


@pytest.mark.parametrize(
    ("header", "claims", "reason"),
    [
        ({"typ": "JWT"}, {}, "dpop_wrong_type"),
        ({"alg": "none"}, {}, "dpop_alg_none"),
        ({"alg": "HS256"}, {}, "dpop_alg_not_allowed"),
        ({"jwk": None}, {}, "dpop_missing_jwk"),
        ({"jwk": {"kty": "oct", "k": "c2VjcmV0"}}, {}, "dpop_bad_jwk"),
        ({"x5u": "https://evil.example/cert"}, {}, "dpop_forbidden_header"),
        ({}, {"htm": "POST", "extra": 1}, "dpop_bad_signature"),
    ],
)
def test_malformed_or_forged_proofs_are_refused(
    header: dict[str, object], claims: dict[str, object], reason: str
) -> None:
    proof = DpopKey().proof("POST", URL, now=NOW, nonce=NONCES.issue(NOW))
    if header.get("jwk", {}) is None:
        header = {}
        head, body, sig = proof.split(".")
        h = json.loads(b64url_decode(head))
        del h["jwk"]
        proof = ".".join((b64url_encode(json.dumps(h).encode()), body, sig))
    error = refused(tampered(proof, header=header, **claims) if header or claims else proof)
    assert (error.error, error.reason) == (ERROR_INVALID_PROOF, reason)


def test_a_private_key_in_the_header_is_refused() -> None:
    proof = DpopKey().proof("POST", URL, now=NOW, nonce=NONCES.issue(NOW))
    head = json.loads(b64url_decode(proof.split(".")[0]))
    jwk = head["jwk"] | {"d": b64url_encode(b"\x01" * 32)}
    assert refused(tampered(proof, header={"jwk": jwk})).reason == "dpop_bad_jwk"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[str]:
    yield f"sqlite:///{tmp_path / 'state.db'}"


def test_a_proof_jti_is_spent_once_across_brokers_on_one_store(store: str) -> None:
    """Two brokers' guards on one store (as replicas on one PostgreSQL): the nonce one issues
    the other accepts, and a proof one accepted the other refuses as replayed."""
    guards = []
    for _ in range(2):
        db = Database.open(store)
        replay, _sessions = open_state(db, sealer=READ_ONLY_SEALER)
        guards.append(DpopGuard(replay, NonceSource.from_store(db), leeway=30))
    key = DpopKey()
    # The time of this test, not of the module's import: a spent jti lives about 90 s by the
    # database's clock, and the suite may reach this test minutes after collecting it.
    now = datetime.now(UTC).replace(microsecond=0)
    proof = key.proof("POST", URL, now=now, nonce=guards[0].nonces.issue(now))
    check = {"method": "POST", "url": URL, "now": now, "bound_jkt": key.thumbprint}
    accepted = guards[1].check([proof], required=False, **check)  # type: ignore[arg-type]
    assert accepted is not None and accepted.jkt == key.thumbprint
    with pytest.raises(ProofError) as caught:
        guards[0].check([proof], required=False, **check)  # type: ignore[arg-type]
    assert caught.value.reason == "dpop_replayed"


def test_guard_binding_rules(store: str) -> None:
    db = Database.open(store)
    replay, _sessions = open_state(db, sealer=READ_ONLY_SEALER)
    guard = DpopGuard(replay, NonceSource.from_store(db), leeway=30)
    owner, thief = DpopKey(), DpopKey()
    nonce = guard.nonces.issue(NOW)
    common = {"method": "POST", "url": URL, "now": NOW}

    def reason(headers: list[str], bound: str | None, required: bool) -> str:
        with pytest.raises(ProofError) as caught:
            guard.check(headers, bound_jkt=bound, required=required, **common)  # type: ignore[arg-type]
        return caught.value.reason

    assert guard.check([], bound_jkt=None, required=False, **common) is None  # type: ignore[arg-type]
    assert reason([], None, True) == "dpop_required"
    assert reason([], owner.thumbprint, False) == "dpop_missing_for_bound_session"
    two = [owner.proof("POST", URL, now=NOW, nonce=nonce) for _ in range(2)]
    assert reason(two, owner.thumbprint, False) == "dpop_multiple_proofs"
    stolen = [thief.proof("POST", URL, now=NOW, nonce=nonce)]
    assert reason(stolen, owner.thumbprint, False) == "dpop_wrong_key"


def test_a_proof_checked_without_spending_is_spent_by_the_callers_write(store: str) -> None:
    """A refresh checks the proof with a read and spends its jti in the rotation's write: until
    then it passes the read check again; once spent, it is refused either way."""
    db = Database.open(store)
    replay, _sessions = open_state(db, sealer=READ_ONLY_SEALER)
    guard = DpopGuard(replay, NonceSource.from_store(db), leeway=30)
    now = datetime.now(UTC).replace(microsecond=0)  # spent jtis expire by the database clock
    key = DpopKey()
    proof = key.proof("POST", URL, now=now, nonce=guard.nonces.issue(now))
    check = {"method": "POST", "url": URL, "now": now, "bound_jkt": key.thumbprint}
    first = guard.check([proof], required=False, spend=False, **check)  # type: ignore[arg-type]
    assert first is not None
    assert guard.check([proof], required=False, spend=False, **check) is not None  # type: ignore[arg-type]
    assert db.write(guard.spender(first, now)) is True
    assert db.write(guard.spender(first, now)) is False
    for spend in (False, True):
        with pytest.raises(ProofError) as caught:
            guard.check([proof], required=False, spend=spend, **check)  # type: ignore[arg-type]
        assert caught.value.reason == "dpop_replayed"


def test_a_kept_proof_key_still_checks_every_signature() -> None:
    """A proof key is built once and kept for the session's next proofs; a proof naming that
    key but signed by another is still refused, and the key's own proofs still verify."""
    owner, thief = DpopKey(), DpopKey()
    assert verify(owner.proof("POST", URL, now=NOW, nonce=NONCES.issue(NOW))) == owner.thumbprint
    stolen_name = tampered(
        thief.proof("POST", URL, now=NOW, nonce=NONCES.issue(NOW)),
        header={"jwk": owner.public_jwk},
    )
    error = refused(stolen_name)
    assert (error.reason, error.jkt) == ("dpop_bad_signature", owner.thumbprint)
    assert verify(owner.proof("POST", URL, now=NOW, nonce=NONCES.issue(NOW))) == owner.thumbprint


def test_more_proof_keys_than_are_kept_all_verify() -> None:
    keys = [DpopKey() for _ in range(70)]
    for _ in range(2):
        for key in keys:
            proof = key.proof("POST", URL, now=NOW, nonce=NONCES.issue(NOW))
            assert verify(proof) == key.thumbprint


def test_a_refused_proof_key_is_refused_every_time() -> None:
    proof = DpopKey().proof("POST", URL, now=NOW, nonce=NONCES.issue(NOW))
    head = json.loads(b64url_decode(proof.split(".")[0]))
    private = tampered(proof, header={"jwk": head["jwk"] | {"d": b64url_encode(b"\x01" * 32)}})
    for _ in range(2):
        assert refused(private).reason == "dpop_bad_jwk"
