"""The package's one base exception, so a caller can catch everything luigi-creds raises.

Standard library only: the pure modules (`refresh`, `identity`) import it without pulling in Luigi,
boto3 or hvac. Every message names what failed and why, never a token or credential.
"""

from __future__ import annotations

__all__ = ["LuigiCredsError"]


class LuigiCredsError(Exception):
    """Base class of every error luigi-creds raises on purpose (broker, config, identity, ...)."""
