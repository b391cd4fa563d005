"""The secret scanner: is a policy-file key or string an inline credential? Pure.

The policy file must hold no secret: every credential has a `<key>_file` form. The lint refuses
keys named like a secret (`SECRET_KEYS`) and any string shaped like a credential
(`looks_like_credential`), whatever key holds it.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from urllib.parse import urlsplit

# Keys that would put a secret in the file. Each has a `<key>_file` form or no place at all.
SECRET_KEYS = frozenset(
    {
        "secret_id",
        "role_id",
        "token",
        "password",
        "secret_access_key",
        "aws_secret_access_key",
        "session_token",
        "client_secret",
        "private_key",
        "api_key",
        "secret",  # only refused outside [grant.vault], where `secret` is a Vault path
    }
)

# Credential shapes refused anywhere in the file, whatever the key is called.
_AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b")
_VAULT_TOKEN = re.compile(r"\b(?:hv[sbr]\.[A-Za-z0-9_-]{20,}|s\.[A-Za-z0-9]{24})\b")
_PEM = re.compile(r"-----BEGIN")
_B64ISH = re.compile(r"[A-Za-z0-9+/_=-]{32,}")


def _entropy(value: str) -> float:
    counts = Counter(value)
    return -sum(n / len(value) * math.log2(n / len(value)) for n in counts.values())


def looks_like_credential(value: str) -> str | None:
    """Name the kind of credential a string looks like, or None."""
    if _AWS_KEY_ID.search(value):
        return "an AWS access key id"
    if _VAULT_TOKEN.search(value):
        return "a Vault token"
    if _PEM.search(value):
        return "a PEM key or certificate"
    if value.startswith(("https://", "http://")):
        # A URL's host and path are identifiers (an EKS issuer ends in a 32-hex-digit cluster
        # id); only its userinfo and query can carry a secret.
        try:
            parts = urlsplit(value)
        except ValueError:  # e.g. "http://[127.0.0.1]/": not a URL, so all of it is scanned
            pass
        else:
            value = f"{parts.username or ''}:{parts.password or ''}?{parts.query}"
    for run in _B64ISH.findall(value):
        # Measured with secrets.token_urlsafe: 32 random base64 chars average 4.56 bits/char
        # (rare draws fall to ~4.0); paths and names sit lower ("database/creds/warehouse-writer"
        # ~3.9). NOTE: very long mixed-case names with digits can reach ~4.3 and are refused too;
        # we accept that false positive over letting a pasted secret through.
        mixed = (
            any(c.isupper() for c in run)
            and any(c.islower() for c in run)
            and any(c.isdigit() for c in run)
        )
        if mixed and _entropy(run) >= 4.2:
            return "a high-entropy secret"
    return None
