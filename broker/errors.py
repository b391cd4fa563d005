"""The broker package's one base exception, so a caller can tell the broker's own refusals and
failures from everything else (a bug, a library's exception).

Every exception class the broker defines derives from `BrokerException`; those that are also a
kind of `ValueError` or `RuntimeError` keep that base too, so no `except` clause changes what it
catches. Named apart from the client's `luigi_creds.BrokerError` (an error answer *from* the
broker), which is a different thing in a package that never imports this one.
"""

from __future__ import annotations

__all__ = ["BrokerException"]


class BrokerException(Exception):
    """Base class of every exception the broker package raises on purpose."""
