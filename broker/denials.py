"""Refusals of requests that never authenticated: counted per window, not recorded one by one.

A request that proves no identity (a malformed form, a token that does not verify, an unknown
refresh handle) tells the audit nothing about anyone, yet one durable record each would let a
junk flood fill the disk until every request fails closed. Such refusals are tallied in memory
by (kind, outcome, reason, issuer) and by client address, and written as one `tallied` record
per window: periodically, and at shutdown. Requests that authenticated keep their individual
records. Pure bookkeeping: thread-safe, no I/O; every time is a `now` parameter (aware UTC).

A crash loses at most one window of counts, never an individual record of an authenticated
request, and never anything issued: tallied requests were refused before any state changed.
"""

from __future__ import annotations

import secrets
import threading
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime

from broker.audit.events import AuditEvent, Outcome

# Seconds between tally records while refusals keep coming.
DEFAULT_WINDOW_SECONDS = 60
# Distinct client addresses named per window; the rest are summed under "other". Bounds memory
# and the record's size whatever the flood's spread of addresses.
MAX_CLIENTS = 100
TALLY_KIND = "denials"
TALLY_REASON = "unauthenticated"
OTHER_CLIENTS = "other"


@dataclass
class Window:
    """The refusals counted since `start`."""

    start: datetime
    counts: Counter[tuple[str, str, str, str]] = field(default_factory=Counter)
    clients: Counter[str] = field(default_factory=Counter)

    def total(self) -> int:
        return sum(self.counts.values())

    def event(self, end: datetime) -> AuditEvent:
        """The `tallied` audit record of this window, ended at `end`."""
        return AuditEvent(
            time=end,
            request_id="tally_" + secrets.token_hex(8),
            outcome=Outcome.TALLIED,
            reason=TALLY_REASON,
            kind=TALLY_KIND,
            detail={
                "window_start": self.start.isoformat(),
                "window_end": end.isoformat(),
                "total": self.total(),
                "counts": [
                    {"kind": k, "outcome": o, "reason": r, "issuer": i, "count": n}
                    for (k, o, r, i), n in sorted(self.counts.items())
                ],
                "clients": [
                    {"client_addr": addr, "count": n}
                    for addr, n in sorted(self.clients.items(), key=lambda kv: (-kv[1], kv[0]))
                ],
            },
        )


class DenialTally:
    """Counts of unauthenticated refusals, handed out one window at a time."""

    def __init__(self, window_seconds: float = DEFAULT_WINDOW_SECONDS) -> None:
        if window_seconds <= 0:
            raise ValueError("window_seconds must be positive")
        self.window_seconds = float(window_seconds)
        self._window: Window | None = None
        self._lock = threading.Lock()

    def add(
        self, *, kind: str, outcome: str, reason: str, issuer: str, client: str, now: datetime
    ) -> None:
        with self._lock:
            if self._window is None:
                self._window = Window(start=now)
            window = self._window
            window.counts[(kind, outcome, reason, issuer)] += 1
            if client in window.clients or len(window.clients) < MAX_CLIENTS:
                window.clients[client] += 1
            else:
                window.clients[OTHER_CLIENTS] += 1

    def due(self, now: datetime) -> bool:
        """A window is open and has lasted `window_seconds`."""
        with self._lock:
            window = self._window
            return (
                window is not None and (now - window.start).total_seconds() >= self.window_seconds
            )

    def take(self) -> Window | None:
        """The open window (None if nothing was counted); counting starts afresh."""
        with self._lock:
            window, self._window = self._window, None
            return window

    def put_back(self, window: Window) -> None:
        """A window whose record could not be written: its counts join the open window."""
        with self._lock:
            current = self._window
            if current is None:
                self._window = window
                return
            current.start = min(current.start, window.start)
            current.counts.update(window.counts)
            for addr, n in window.clients.items():
                if addr in current.clients or len(current.clients) < MAX_CLIENTS:
                    current.clients[addr] += n
                else:
                    current.clients[OTHER_CLIENTS] += n
