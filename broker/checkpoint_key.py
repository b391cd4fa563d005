"""Which Ed25519 key signs the audit ledger's checkpoints. Pure: decides a path, touches no file.

Signed checkpoints are what let a verifier holding only the public key notice a rewritten ledger,
so they are on by default. With `[broker] audit_key_file` set, that file is the key. Without it,
an SQLite store gets `audit-checkpoint.ed25519` in the store's own directory (created 0600 on the
first start, by `broker.audit.keys.load_or_create_signing_key`), so a single-host broker signs
without any setup and `audit verify --config` finds the same key. A PostgreSQL store is shared by
replicas on different hosts, which must all sign with one key: no local default can be right, so
the operator must name the file, and `serve` refuses to start until they do.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlsplit

from broker.config import BrokerSettings

DEFAULT_KEY_NAME = "audit-checkpoint.ed25519"
# The accessor salt's default file, beside the checkpoint key: kept out of the database, since it
# both keys the audit's HMAC of Vault accessors and seals the session store's references
# (broker/sealing.py). Replicas sharing a PostgreSQL store share it as they share the key.
DEFAULT_SALT_NAME = "audit-accessor.salt"


class UnsignedAuditRefused(Exception):
    """The broker would write checkpoints nobody can verify; `str()` says what to set."""


def _sqlite_path(audit_store: str) -> Path | None:
    parts = urlsplit(audit_store)
    if parts.scheme.split("+", 1)[0] != "sqlite" or parts.netloc:
        return None
    path = unquote(parts.path)
    # sqlite:////abs/path.db parses to "//abs/path.db"; POSIX keeps a leading "//" distinct.
    return Path("/" + path.lstrip("/")) if path.startswith("/") else None


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
