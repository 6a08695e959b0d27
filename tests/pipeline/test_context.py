"""in_thread: a cancelled pipeline link does not go on before its thread is done with the
action's directory."""

import asyncio
import threading
import time

import pytest

from engine.pipeline.context import in_thread


def test_a_cancel_waits_for_the_thread_to_finish():
    finished = threading.Event()

    def work() -> None:
        time.sleep(0.3)
        finished.set()

    async def main() -> None:
        task = asyncio.create_task(in_thread(work))
        await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.sleep(0)
        task.cancel()  # a second cancel while it waits changes nothing
        with pytest.raises(asyncio.CancelledError):
            await task
        assert finished.is_set()

    asyncio.run(main())


def test_results_and_errors_pass_through():
    async def main() -> None:
        assert await in_thread(lambda a, b: a + b, 2, 3) == 5
        with pytest.raises(ZeroDivisionError):
            await in_thread(lambda: 1 / 0)

    asyncio.run(main())
