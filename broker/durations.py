"""Human durations: "15m", "12h", "900s", "1h30m", "2d", "1w", or int seconds.

The one grammar for every duration the broker reads: the policy file and the admin commands'
`--since`/`--before` alike, so a value that works in one works in the other. Owns only the
grammar; range checks belong to the caller that knows the upstream's limits. Talks to no
external system.
"""

from __future__ import annotations

import re

from broker.errors import BrokerException

# Units in descending order, each at most once: "1w2d3h4m5s". No fractions, no signs, no spaces,
# so a value reads the same to every operator and every parser.
_DURATION = re.compile(r"(?:(\d+)w)?(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")

# 10 years; anything longer is a typo, and keeps later arithmetic far from overflow surprises.
MAX_SECONDS = 10 * 365 * 86400


class DurationError(BrokerException, ValueError):
    """A duration that does not parse; the message is safe to show to an operator."""


def seconds(value: object) -> int:
    """Parse a duration into whole seconds, or raise DurationError saying why."""
    if isinstance(value, bool):
        raise DurationError(
            "expected a duration such as '15m' or seconds as an integer, got a bool"
        )
    if isinstance(value, int):
        total = value
    elif isinstance(value, str):
        match = _DURATION.fullmatch(value)
        if not value or match is None:
            raise DurationError(
                f"{value!r} is not a duration; use e.g. '900s', '15m', '1h30m', '12h', '2d', '1w'"
            )
        weeks, days, hours, minutes, secs = (int(part) if part else 0 for part in match.groups())
        total = weeks * 7 * 86400 + days * 86400 + hours * 3600 + minutes * 60 + secs
    else:
        kind = type(value).__name__
        raise DurationError(f"expected a duration such as '15m' or integer seconds, got {kind}")
    if total < 0:
        raise DurationError("a duration cannot be negative")
    if total > MAX_SECONDS:
        raise DurationError(f"{total} s is longer than 10 years")
    return total
