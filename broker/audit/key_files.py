"""Key files of the audit ledger: where the checkpoint signing key lives, and how it and the
accessor HMAC salt are loaded or created.

Owns two small files on the local file system and nothing else. Talks to no network service.

Where the checkpoint key lives: signed checkpoints are what let a verifier holding only the
public key notice a rewritten ledger, so they are on by default. With `[broker] audit_key_file`
set, that file is the key. Without it, an SQLite store gets `audit-checkpoint.ed25519` in the
store's own directory (created 0600 on the first start by `load_or_create_signing_key`), so a
single-host broker signs without any setup and `audit verify --config` finds the same key. A
PostgreSQL store is shared by replicas on different hosts, which must all sign with one key: no
local default can be right, so the operator must name the file, and `serve` refuses to start
until they do. Deciding the path is pure; only the load/create functions touch files.

Decision: when a configured file is absent it is created (O_EXCL, mode 0600), so the embedded
default (`make demo`, a fresh SQLite ledger) needs nothing set up by hand. O_EXCL makes two
replicas racing on a shared volume end up with one key. A key that is later deleted and
regenerated cannot pass itself off as the old one: `audit verify` pins the public key and every
earlier checkpoint then fails its signature check. Production deployments should provision the
key from a KMS/HSM-backed file and copy only the public half to the verifier.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_pem_private_key,
    load_pem_public_key,
)

from broker.config import BrokerSettings
from broker.errors import BrokerException
from broker.storage import StoreURL

DEFAULT_KEY_NAME = "audit-checkpoint.ed25519"
# The accessor salt's default file, beside the checkpoint key: kept out of the database, since it
# both keys the audit's HMAC of Vault accessors and seals the session store's references
# (broker/sealing.py). Replicas sharing a PostgreSQL store share it as they share the key.
DEFAULT_SALT_NAME = "audit-accessor.salt"
SALT_BYTES = 32  # HMAC-SHA256 key length; shorter salts are refused below 16 bytes
MIN_SALT_BYTES = 16


class KeyFileError(BrokerException, ValueError):
    """A key or salt file exists but does not hold what it should."""


class UnsignedAuditRefused(BrokerException):
    """The broker would write checkpoints nobody can verify; `str()` says what to set."""


def _sqlite_path(audit_store: str) -> Path | None:
    """The SQLite file the store opens, by storage's own URL rule; None for PostgreSQL or a URL
    the store refuses (the config lint reports that one, and opening the store fails)."""
    try:
        url = StoreURL.parse(audit_store)
    except ValueError:
        return None
    return Path(url.target) if url.dialect == "sqlite" else None


def checkpoint_key_path(settings: BrokerSettings) -> Path | None:
    """The key file checkpoints are signed with, or None when no safe default exists."""
    if settings.audit_key_file is not None:
        return settings.audit_key_file
    db = _sqlite_path(settings.audit_store)
    return db.parent / DEFAULT_KEY_NAME if db is not None else None


def required_checkpoint_key_path(settings: BrokerSettings) -> Path:
    """`checkpoint_key_path`, or UnsignedAuditRefused naming the setting to add."""
    path = checkpoint_key_path(settings)
    if path is None:
        raise UnsignedAuditRefused(
            "audit checkpoints cannot be signed: the audit store is not a local SQLite file and "
            "[broker] audit_key_file is not set. Set audit_key_file to an Ed25519 private key "
            "in PEM that every replica reads (create it once with `openssl genpkey -algorithm "
            "ed25519 -out audit-checkpoint.ed25519`, mode 0600), then start the broker again. "
            "`luigi-creds-broker dev` sets one for you."
        )
    return path


def accessor_salt_path(settings: BrokerSettings) -> Path | None:
    """`[broker] audit_salt_file`, else the salt file beside the checkpoint key, else None."""
    if settings.audit_salt_file is not None:
        return settings.audit_salt_file
    key = checkpoint_key_path(settings)
    return key.parent / DEFAULT_SALT_NAME if key is not None else None


def _create_exclusive(path: Path, data: bytes) -> bool:
    """Write `data` to a new file readable only by us; False if someone else created it first.

    The content is written and fsync'd under a private temporary name, then hard-linked into
    place: link(2) fails if the name exists, and a reader never sees a half-written file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        return True
    finally:
        tmp.unlink(missing_ok=True)


def load_or_create_signing_key(path: Path) -> Ed25519PrivateKey:
    """The Ed25519 checkpoint key in PEM (PKCS#8) at `path`, generated there if absent."""
    if not path.exists():
        fresh = Ed25519PrivateKey.generate()
        pem = fresh.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
        if _create_exclusive(path, pem):
            return fresh
    try:
        key = load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path}: not an unencrypted PEM private key") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path}: audit checkpoints are signed with Ed25519 keys only")
    return key


def load_public_keys(path: Path) -> list[Ed25519PublicKey]:
    """Verification keys from a PEM file holding Ed25519 private and/or public keys (rotation)."""
    text = path.read_bytes()
    keys: list[Ed25519PublicKey] = []
    marker = b"-----BEGIN "
    blocks = [marker + b for b in text.split(marker)[1:]]
    for block in blocks:
        try:
            if b"PRIVATE KEY" in block.split(b"\n", 1)[0]:
                private = load_pem_private_key(block, password=None)
                if isinstance(private, Ed25519PrivateKey):
                    keys.append(private.public_key())
            else:
                public = load_pem_public_key(block)
                if isinstance(public, Ed25519PublicKey):
                    keys.append(public)
        except (ValueError, TypeError) as exc:
            raise KeyFileError(f"{path}: unreadable PEM block") from exc
    if not keys:
        raise KeyFileError(f"{path}: no Ed25519 key")
    return keys


def write_salt(path: Path, salt: bytes) -> bool:
    """Create the salt file at `path` holding `salt`; False if the file already existed."""
    return _create_exclusive(path, salt.hex().encode() + b"\n")


def load_or_create_salt(path: Path) -> bytes:
    """The per-deployment HMAC salt (hex text) at `path`, generated there if absent."""
    if not path.exists():
        fresh = secrets.token_bytes(SALT_BYTES)
        if write_salt(path, fresh):
            return fresh
    try:
        salt = bytes.fromhex(path.read_text().strip())
    except ValueError as exc:
        raise KeyFileError(f"{path}: the salt file holds hex") from exc
    if len(salt) < MIN_SALT_BYTES:
        raise KeyFileError(f"{path}: salt shorter than {MIN_SALT_BYTES} bytes")
    return salt


def hmac_ref(salt: bytes, value: str) -> str:
    """`hmac-sha256:<hex>`, the form Vault's audit devices use for hashed values."""
    return "hmac-sha256:" + hmac.new(salt, value.encode(), hashlib.sha256).hexdigest()
