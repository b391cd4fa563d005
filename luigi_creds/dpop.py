"""The job's DPoP key (RFC 9449): an ephemeral P-256 key that proves the job holds its session.

The broker binds the refresh session to this key's thumbprint at the exchange; every later
request on the session carries a proof signed with it, so the refresh handle alone (in a log, a
core dump, a compromised task) mints nothing. The key is made in memory when the job's broker
client is built, in the process that owns the session (the agent's), and is never written
anywhere: forked workers and subprocesses reach the broker through the agent and never see it.

Decision: a forked child inherits the key's memory, but not the right to sign with it. `proof()`
in any process but the one that made the key raises `ForkedKeyError`: the broker would take the
child's proofs for the session holder's, and a child refreshing on the parent's session rotates
the handle under the parent (whose next refresh then looks like theft and ends the session).
A forked child reaches the broker through the job's agent, or makes a client (and key) of its own.

Pure apart from the key generation: the time is a parameter.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
from datetime import datetime

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from luigi_creds.errors import LuigiCredsError

__all__ = ["DpopKey", "ForkedKeyError"]

# P-256 group order (SEC 2 v2 §2.4.2): signatures are sent in low-S form, the only form the
# broker's strict JOSE code accepts (a high-S twin would be a second encoding of one proof).
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class ForkedKeyError(LuigiCredsError):
    """A DPoP key was asked to sign in a process forked from the one that made it."""


class DpopKey:
    """One ephemeral ES256 key and the proofs it signs. Never pickled, printed or stored, and
    signs only in the process that made it."""

    def __init__(self) -> None:
        self._private = ec.generate_private_key(ec.SECP256R1())
        self._pid = os.getpid()
        point = self._private.public_key().public_numbers()
        self.public_jwk = {
            "crv": "P-256",
            "kty": "EC",
            "x": _b64(point.x.to_bytes(32, "big")),
            "y": _b64(point.y.to_bytes(32, "big")),
        }
        canonical = json.dumps(self.public_jwk, separators=(",", ":"), sort_keys=True)
        # RFC 7638 thumbprint: what the broker stores as the session's `cnf.jkt`.
        self.thumbprint = _b64(hashlib.sha256(canonical.encode("ascii")).digest())

    def __repr__(self) -> str:
        return f"DpopKey(jkt={self.thumbprint!r})"

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("a DPoP key stays in the process that made it")

    def proof(self, method: str, url: str, *, now: datetime, nonce: str | None = None) -> str:
        """A DPoP proof JWT for one `method` request to `url` (no query or fragment)."""
        if os.getpid() != self._pid:
            raise ForkedKeyError(
                f"DPoP key {self.thumbprint} belongs to process {self._pid}; process "
                f"{os.getpid()} was forked from it and may not sign as the session's holder"
            )
        header = {"alg": "ES256", "jwk": self.public_jwk, "typ": "dpop+jwt"}
        claims: dict[str, object] = {
            "htm": method,
            "htu": url.split("?", 1)[0].split("#", 1)[0],
            "iat": int(now.timestamp()),
            "jti": secrets.token_urlsafe(16),
        }
        if nonce is not None:
            claims["nonce"] = nonce
        signing_input = ".".join(
            _b64(json.dumps(part, separators=(",", ":")).encode("utf-8"))
            for part in (header, claims)
        )
        der = self._private.sign(signing_input.encode("ascii"), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        s = min(s, _P256_ORDER - s)
        signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
        return f"{signing_input}.{_b64(signature)}"
