"""DPoP (RFC 9449): proofs that the caller holds the private key a refresh session is bound to.

A client that sends a proof with its token exchange opens a session bound to the proof key's
RFC 7638 thumbprint (`cnf.jkt`); every later request on that session (refresh, revoke, explain)
must carry a fresh proof signed by the same key. A stolen refresh handle alone is then worthless.

Owns three things:
- `verify_proof`: pure. The proof is parsed and its signature checked by the same strict JOSE code
  as subject tokens (broker/tokens.py, broker/jwk.py); only the header's `jwk` member, which a
  subject token may never carry, is allowed here. Then `typ`, `htm`, `htu`, `iat`, `jti` and the
  server nonce are checked.
- `NonceSource`: server nonces (RFC 9449 §8) that any replica can check without a write: the HMAC
  of a time window under a key kept in the shared store, valid for the current and the previous
  window. Required on every request on a bound session, so a proof made in advance (by someone
  who had the key for a moment) expires with its nonce. Not required on the exchange, whose proof
  is tied to a one-time subject token consumed by the same request: the nonce would add a round
  trip to every job's start and protect nothing more. A nonce an exchange does send is checked.
- `DpopGuard`: the use case's one call: verify, compare with the session's key, remember the
  proof's `jti` in the replay ledger (shared by every replica) so a captured proof is spent once.
  A caller with a write of its own to come (a refresh: the handle rotation) can have the check
  only read the ledger and spend the jti in that write (`spender`), saving a durable write.

Every refusal is a `ProofError` whose `reason` is the stable code for the audit record and whose
`error` is the RFC 9449 error code (`invalid_dpop_proof`, or `use_dpop_nonce` with a fresh nonce
in the `DPoP-Nonce` header). No function here reads the clock: `now` is a parameter.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final
from urllib.parse import urlsplit

from broker.errors import BrokerException
from broker.jwk import KeySetError, VerificationKey, b64url_encode, parse_jwk
from broker.replay import ReplayLedger
from broker.storage import Database, Migration, Tx
from broker.tokens import MAX_JTI_LENGTH, TokenError, parse_token, verify_signature

ERROR_INVALID_PROOF: Final = "invalid_dpop_proof"
ERROR_USE_NONCE: Final = "use_dpop_nonce"
NONCE_HEADER: Final = "DPoP-Nonce"

# Asymmetric algorithms only (RFC 9449 §4.2: no MAC, no "none"); a client key per job is ES256.
PROOF_ALGORITHMS: Final = ("ES256", "ES384", "ES512", "PS256", "PS384", "PS512", "RS256", "EdDSA")
# A proof is a header, a small JSON payload and a signature: 4 KiB fits an RSA-4096 jwk.
MAX_PROOF_LENGTH: Final = 4096
# How long after its `iat` a proof is accepted (plus the broker's clock leeway either side). A
# proof is made for one request, so this is the network delay, not a session lifetime.
PROOF_MAX_AGE: Final = timedelta(seconds=60)
# A nonce is valid in the window it was issued in and the next one: 5 to 10 minutes.
NONCE_WINDOW_SECONDS: Final = 300
# Namespace of proof jtis in the replay ledger, per key: one client cannot burn another's jti.
_REPLAY_PREFIX: Final = "dpop:"


def _make_nonce_key(tx: Tx) -> None:
    # One random key for every replica on this store, made once by the first broker.
    tx.execute(
        "INSERT INTO dpop_nonce_key (id, secret) VALUES (1, ?) ON CONFLICT (id) DO NOTHING",
        (secrets.token_hex(32),),
    )


MIGRATIONS = (
    Migration(
        1,
        "dpop nonce key",
        (
            """CREATE TABLE IF NOT EXISTS dpop_nonce_key (
            id INTEGER PRIMARY KEY,
            secret TEXT NOT NULL)""",
            _make_nonce_key,
        ),
    ),
)


class ProofError(BrokerException):
    """A DPoP proof (or its absence) we refuse; `reason` is the audit code, `error` RFC 9449's."""

    def __init__(self, reason: str, *, error: str = ERROR_INVALID_PROOF, jkt: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.error = error
        self.jkt = jkt  # the presenting key's thumbprint, once known: for the audit record


@dataclass(frozen=True)
class Proof:
    """A verified proof: its key's thumbprint, its unique id and when it was made."""

    jkt: str
    jti: str
    iat: int


def normalize_htu(url: str) -> str:
    """`url` as RFC 9449 §4.3 compares it: scheme and host lowercased, the default port
    dropped, no query or fragment (RFC 3986 §6.2.2-6.2.3 normalisation)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        return ""
    default = {"http": 80, "https": 443}.get(scheme)
    netloc = host if port is None or port == default else f"{host}:{port}"
    return f"{scheme}://{netloc}{parts.path or '/'}"


def verify_proof(
    raw: str,
    *,
    method: str,
    url: str,
    now: datetime,
    leeway: int,
    nonces: NonceSource,
    nonce_required: bool = True,
) -> Proof:
    """Verify one DPoP proof JWT for a `method` request to `url`; raise ProofError otherwise.

    Order: structure and header rules (strict JOSE), the embedded key, the signature, then the
    claims; the nonce last, so a client is only asked to retry with a proof that was otherwise
    good.
    """
    try:
        token = parse_token(raw, max_length=MAX_PROOF_LENGTH, embedded_key=True)
    except TokenError as exc:
        raise ProofError(f"dpop_{exc.reason}") from exc
    header = token.header
    if header.get("typ") != "dpop+jwt":  # RFC 9449 §4.3 check 4: exactly this type
        raise ProofError("dpop_wrong_type")
    if token.alg not in PROOF_ALGORITHMS:
        raise ProofError("dpop_alg_not_allowed")
    jwk = header.get("jwk")
    if not isinstance(jwk, dict):
        raise ProofError("dpop_missing_jwk")
    try:
        key = _proof_key(jwk)  # refuses private members and symmetric keys
    except KeySetError as exc:
        raise ProofError("dpop_bad_jwk") from exc
    jkt = key.thumbprint()
    try:
        verify_signature(token, key, PROOF_ALGORITHMS)
    except TokenError as exc:
        raise ProofError(f"dpop_{exc.reason}", jkt=jkt) from exc
    claims = token.claims
    jti = claims.get("jti")
    if not isinstance(jti, str) or not jti or len(jti) > MAX_JTI_LENGTH:
        raise ProofError("dpop_bad_jti", jkt=jkt)
    if claims.get("htm") != method:
        raise ProofError("dpop_htm_mismatch", jkt=jkt)
    htu = claims.get("htu")
    if not isinstance(htu, str) or normalize_htu(htu) != normalize_htu(url):
        raise ProofError("dpop_htu_mismatch", jkt=jkt)
    iat = claims.get("iat")
    if isinstance(iat, bool) or not isinstance(iat, int):
        raise ProofError("dpop_bad_iat", jkt=jkt)
    current = now.timestamp()
    if iat > current + leeway:
        raise ProofError("dpop_iat_in_future", jkt=jkt)
    if iat < current - PROOF_MAX_AGE.total_seconds() - leeway:
        raise ProofError("dpop_iat_too_old", jkt=jkt)
    nonce = claims.get("nonce")
    if nonce is None:
        if not nonce_required:
            return Proof(jkt=jkt, jti=jti, iat=iat)
        raise ProofError("dpop_nonce_missing", error=ERROR_USE_NONCE, jkt=jkt)
    if not isinstance(nonce, str) or not nonces.valid(nonce, now):
        raise ProofError("dpop_nonce_stale", error=ERROR_USE_NONCE, jkt=jkt)
    return Proof(jkt=jkt, jti=jti, iat=iat)


# Proof keys that passed parse_jwk, by their members: a job's agent signs every proof of its
# session with one key, and building the key (decoding, the point check, the thumbprint) again
# for each proof cost as much as checking the proof's signature with it. Only keys whose members
# are all strings (a `key_ops` list could be changed under the next reader); bounded and emptied
# when full, so keys made up by clients cannot grow it, they only miss.
_PROOF_KEYS: dict[tuple[tuple[str, str], ...], VerificationKey] = {}
_PROOF_KEYS_KEPT = 64


def _proof_key(jwk: dict[str, object]) -> VerificationKey:
    """parse_jwk(jwk), kept for the next proof by the same key; KeySetError as parse_jwk."""
    flat = tuple((name, value) for name, value in sorted(jwk.items()) if isinstance(value, str))
    if len(flat) != len(jwk):
        return parse_jwk(jwk)
    key = _PROOF_KEYS.get(flat)
    if key is None:
        key = parse_jwk(jwk)
        if len(_PROOF_KEYS) >= _PROOF_KEYS_KEPT:
            _PROOF_KEYS.clear()
        _PROOF_KEYS[flat] = key
    return key


class NonceSource:
    """Server nonces: `<window>.<HMAC(key, window)>`, checkable by every replica sharing `key`."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 32:
            raise ValueError("the nonce key must be at least 32 bytes")
        self._key = key
        # Every answer carries the current nonce: the last window's is kept, not re-MACed.
        self._last: tuple[int, str] = (-1, "")

    @classmethod
    def random(cls) -> NonceSource:
        """A key for one process only (tests, a single broker without a shared store)."""
        return cls(secrets.token_bytes(32))

    @classmethod
    def from_store(cls, db: Database) -> NonceSource:
        """The key every broker on `db` shares; made on first use. Raises StoreUnavailable."""
        db.migrate("dpop_schema_migrations", MIGRATIONS, lambda: datetime.now(UTC).isoformat())

        def work(tx: Tx) -> str:
            row = tx.execute("SELECT secret FROM dpop_nonce_key WHERE id = 1").fetchone()
            return str(row[0])

        return cls(bytes.fromhex(db.read(work)))

    def issue(self, now: datetime) -> str:
        return self._nonce(int(now.timestamp()) // NONCE_WINDOW_SECONDS)

    def valid(self, nonce: str, now: datetime) -> bool:
        window = int(now.timestamp()) // NONCE_WINDOW_SECONDS
        return any(hmac.compare_digest(nonce, self._nonce(w)) for w in (window, window - 1))

    def _nonce(self, window: int) -> str:
        last_window, last = self._last
        if window == last_window:
            return last
        mac = hmac.new(self._key, str(window).encode("ascii"), hashlib.sha256).digest()
        nonce = f"{window}.{b64url_encode(mac[:18])}"
        if window > last_window:
            self._last = (window, nonce)
        return nonce


class DpopGuard:
    """Checks the DPoP header of one request against the session's key and the replay ledger."""

    def __init__(self, replay: ReplayLedger, nonces: NonceSource, *, leeway: int) -> None:
        self._replay = replay
        self.nonces = nonces
        self._leeway = leeway

    def check(
        self,
        headers: Sequence[str],
        *,
        method: str,
        url: str,
        now: datetime,
        bound_jkt: str | None,
        required: bool,
        spend: bool = True,
    ) -> Proof | None:
        """The proof the request carried, verified; None when it sent none and needed none.

        `headers`: every `DPoP` header value of the request (more than one is refused, RFC 9449
        §4.3 check 1). `bound_jkt`: the session's key; a proof by any other key is refused.
        `required`: a proof is needed even for an unbound request (policy `require_dpop`).
        A server nonce is required on a bound session's requests only (see the module docstring).
        `spend`: consume the proof's jti now (a write); False: only refuse a jti already spent,
        and the caller must run `spender(proof, now)` in its own write transaction.
        Raises ProofError; StoreUnavailable when the replay ledger cannot be read or written.
        """
        if not headers:
            if bound_jkt is not None:
                raise ProofError("dpop_missing_for_bound_session")
            if required:
                raise ProofError("dpop_required")
            return None
        if len(headers) > 1:
            raise ProofError("dpop_multiple_proofs")
        proof = verify_proof(
            headers[0],
            method=method,
            url=url,
            now=now,
            leeway=self._leeway,
            nonces=self.nonces,
            nonce_required=bound_jkt is not None,
        )
        if bound_jkt is not None and not hmac.compare_digest(proof.jkt, bound_jkt):
            raise ProofError("dpop_wrong_key", jkt=proof.jkt)
        if spend:
            if not self._replay.database.write(self.spender(proof, now)):
                raise ProofError("dpop_replayed", jkt=proof.jkt)
        elif self._replay.seen(_REPLAY_PREFIX + proof.jkt, proof.jti, now=now):
            raise ProofError("dpop_replayed", jkt=proof.jkt)
        return proof

    def spender(self, proof: Proof, now: datetime) -> Callable[[Tx], bool]:
        """The step spending `proof`'s jti inside a write transaction: False if already spent."""
        # Remembered until the proof could verify no more (iat + max age + leeway), so replicas
        # sharing the store refuse a replay for as long as it would otherwise pass.
        expires = datetime.fromtimestamp(proof.iat, now.tzinfo) + PROOF_MAX_AGE
        expires += timedelta(seconds=2 * self._leeway)
        return self._replay.consumer(
            _REPLAY_PREFIX + proof.jkt, proof.jti, expires_at=expires, now=now
        )
