"""Broker logging: one JSON object per line on stderr, with secrets scrubbed on the way out.

The broker never logs a secret on purpose; this filter is the second line of defence. It drops
values under secret-sounding keys in `extra=` fields and masks anything shaped like a JWT, an
AWS secret or a Vault token in the rendered message.
"""

from __future__ import annotations

import json
import logging
import re
from datetime import UTC, datetime

_SECRET_KEYS = re.compile(r"token|secret|password|credential|authorization", re.IGNORECASE)
_SECRET_SHAPES = re.compile(
    r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"  # compact JWS
    r"|\b(?:hvs|hvb|hvr|s|b)\.[A-Za-z0-9_-]{20,}"  # Vault/OpenBao tokens
    r"|(?<![A-Za-z0-9/+])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])"  # AWS secret access keys
)
_STANDARD = frozenset(vars(logging.makeLogRecord({})))


def scrub(text: str) -> str:
    return _SECRET_SHAPES.sub("[redacted]", text)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": scrub(record.getMessage()),
        }
        for key, value in vars(record).items():
            if key in _STANDARD or key.startswith("_"):
                continue
            entry[key] = "[redacted]" if _SECRET_KEYS.search(key) else scrub(str(value))
        if record.exc_info and record.exc_info[0] is not None:
            # The exception class only: messages and tracebacks may carry upstream payloads.
            entry["exception"] = record.exc_info[0].__name__
        return json.dumps(entry, sort_keys=True)


def configure(level: str = "INFO") -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
