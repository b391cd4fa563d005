"""Credential references sealed at rest: what revocation needs, unreadable from the database alone.

The session store keeps, per session, what ending it must revoke: Vault token accessors, lease
ids with their holder's accessor, AWS AccessKeyIds. An accessor is not a token, but it revokes
one and looks its metadata up, which is why the audit only ever holds its HMAC. Kept in clear
beside that audit, a read of the database alone (a backup, a replica's dump) would undo the HMAC.

So each reference is encrypted with AES-256-GCM under a key derived (HKDF-SHA256) from the
per-deployment accessor salt, a file outside the database (`[broker] audit_salt_file`, by
default beside the checkpoint key). The session id and kind are the associated data, so a
sealed value moved to another session or kind does not open. The nonce is derived from the
plaintext with a separate HMAC key (a synthetic IV): sealing is deterministic, so recording one
credential twice stays a no-op under the table's primary key, and two different references
never share a nonce. Pure: no I/O.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from broker.errors import BrokerException

SEALED_PREFIX = "sealed1:"
_INFO = b"luigi-creds session credential refs v1"
_NONCE_BYTES = 12


class SealError(BrokerException, ValueError):
    """A sealed reference that does not open: another deployment's key, or altered."""


class RefSealer:
    """Seals and opens credential references with keys derived from one secret."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("the sealing secret must be at least 16 bytes")
        okm = HKDF(algorithm=hashes.SHA256(), length=64, salt=None, info=_INFO).derive(secret)
        self._aead = AESGCM(okm[:32])
        self._nonce_key = okm[32:]

    def __repr__(self) -> str:
        return "RefSealer(...)"  # never the key

    def seal(self, session_id: str, kind: str, ref: str) -> str:
        aad = _aad(session_id, kind)
        plain = ref.encode("utf-8")
        nonce = hmac.new(self._nonce_key, aad + b"\x00" + plain, hashlib.sha256).digest()
        nonce = nonce[:_NONCE_BYTES]
        sealed = nonce + self._aead.encrypt(nonce, plain, aad)
        return SEALED_PREFIX + base64.urlsafe_b64encode(sealed).decode("ascii")

    def open(self, session_id: str, kind: str, stored: str) -> str:
        """The reference in `stored`; a value stored before sealing existed is returned as is
        (the store seals those at start-up; see SessionStore.seal_existing)."""
        if not stored.startswith(SEALED_PREFIX):
            return stored
        try:
            raw = base64.urlsafe_b64decode(stored[len(SEALED_PREFIX) :])
            nonce, body = raw[:_NONCE_BYTES], raw[_NONCE_BYTES:]
            return self._aead.decrypt(nonce, body, _aad(session_id, kind)).decode("utf-8")
        except (InvalidTag, ValueError) as exc:
            raise SealError("a sealed credential reference does not open with this key") from exc

    @staticmethod
    def is_sealed(stored: str) -> bool:
        return stored.startswith(SEALED_PREFIX)


def _aad(session_id: str, kind: str) -> bytes:
    return session_id.encode("utf-8") + b"\x00" + kind.encode("utf-8")
