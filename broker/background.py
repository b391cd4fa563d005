"""One background job on its own thread: run now and then, or at once when asked.

The broker's watchers (policy file, TLS certificate) and its denial-tally flusher share this
shape: a daemon thread that sleeps until its interval passes or someone asks (a SIGHUP handler,
which may only set an event), runs one tick, and goes on until stopped.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger("broker.background")


class Periodic:
    """Once started, calls `tick(requested)` every `interval` seconds (0: only when asked) on a
    daemon thread named `name`; `requested` is True when `request()` woke it (a request made
    before `start` is kept). A tick that raises is logged and the next one runs as usual: a
    watcher must outlive one bad read."""

    def __init__(self, name: str, tick: Callable[[bool], object]) -> None:
        self.name = name
        self._tick = tick
        self._interval = 0.0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def request(self) -> None:
        """Run a tick now. Safe in a signal handler: it only sets an event."""
        self._wake.set()

    def start(self, interval: float) -> None:
        self._interval = interval
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            requested = self._wake.wait(self._interval if self._interval > 0 else None)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self._tick(requested)
            except Exception:
                log.exception("%s failed; it runs again at its next turn", self.name)
