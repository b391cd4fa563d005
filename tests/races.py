"""Racing threads for the tests of what must happen exactly once under concurrency."""

from __future__ import annotations

import threading
from collections.abc import Callable


def run_at_once(worker: Callable[[], None], count: int) -> None:
    """Run `worker` in `count` threads released together by one barrier; wait for them all."""
    barrier = threading.Barrier(count)

    def released() -> None:
        barrier.wait()
        worker()

    threads = [threading.Thread(target=released) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
