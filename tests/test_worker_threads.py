"""Tests for broker.app.WorkerThreads: blocking calls run from the event loop."""

from __future__ import annotations

import asyncio
import threading

import pytest

from broker.app import WorkerThreads


def test_results_and_exceptions_reach_the_awaiting_coroutine_from_another_thread() -> None:
    threads = WorkerThreads(4)

    def fails() -> None:
        raise ValueError("refused")

    async def main() -> tuple[str, int]:
        name = await threads.run(lambda: threading.current_thread().name)
        with pytest.raises(ValueError, match="refused"):
            await threads.run(fails)
        return name, await threads.run(sum, [1, 2, 3])

    name, total = asyncio.run(main())
    threads.close()
    assert name.startswith("exchange_") and name != threading.current_thread().name
    assert total == 6


def test_threads_start_as_needed_up_to_the_limit_and_end_on_close() -> None:
    threads = WorkerThreads(3)
    gate = threading.Event()
    running = threading.Semaphore(0)

    def blocked() -> None:
        running.release()
        gate.wait(10)

    def alive() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if t.name.startswith("exchange_")}

    before = alive()

    async def main() -> None:
        calls = [threads.run(blocked) for _ in range(5)]
        for _ in range(3):  # three run at once; the other two wait for a free thread
            assert await asyncio.to_thread(running.acquire, True, 10)
        assert not running.acquire(timeout=0.05)
        assert len(alive() - before) == 3
        gate.set()
        await asyncio.gather(*calls)

    asyncio.run(main())
    ended = alive() - before
    threads.close()
    for thread in ended:
        thread.join(10)
        assert not thread.is_alive()


def test_an_abandoned_call_finishes_without_touching_its_cancelled_future() -> None:
    threads = WorkerThreads(1)
    release, finished = threading.Event(), threading.Event()

    def slow() -> str:
        release.wait(10)
        finished.set()
        return "late"

    async def main() -> str:
        call = threads.run(slow)
        call.cancel()  # the client went away
        release.set()
        assert await asyncio.to_thread(finished.wait, 10)
        return await threads.run(lambda: "next")  # the loop and the thread still serve

    assert asyncio.run(main()) == "next"
    threads.close()


def test_calls_queued_back_to_back_each_get_a_thread_while_the_pool_can_grow() -> None:
    """An idle thread serves one queued call, not every call queued before it wakes: pairs of
    calls that wait for each other always run at once."""
    threads = WorkerThreads(8)

    async def main() -> None:
        await threads.run(lambda: None)  # one thread started, now idle
        for _ in range(50):
            meet = threading.Barrier(2, timeout=5)
            await asyncio.gather(threads.run(meet.wait), threads.run(meet.wait))

    asyncio.run(main())
    threads.close()
