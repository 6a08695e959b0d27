"""WorkerLoop against a scripted source (a fake: it only records what the loop does), so each
rule of the loop is checked on its own. The real sources run under the same loop in
tests/sources/ and tests/buildgrid/."""

from __future__ import annotations

import asyncio
import time

import pytest

from engine.proto import re_pb2
from engine.sources.protocol import SourceUnavailable, Stage
from engine.task import ActionOutcome, ActionTask
from engine.worker.loop import WorkerLoop


class FakeSource:
    protocol = "fake"
    hands_back = True
    target = "nowhere"

    def __init__(self, offers: list[list[str]] | None = None):
        self.offers = list(offers or [])  # one list of task ids per claim
        self.frees: list[int] = []
        self.completed: dict[str, ActionOutcome] = {}
        self.stages: list[tuple[str, Stage]] = []
        self.connects = 0
        self.fail_next: int = 0  # claims that raise SourceUnavailable
        self.crash_next: int = 0  # claims that raise a bug's exception
        self.drained = False
        self.closed = False
        self._wake = asyncio.Event()

    on_revoked = staticmethod(lambda task_id: None)

    async def connect(self) -> None:
        self.connects += 1

    async def claim(self, free: int) -> list[ActionTask]:
        self.frees.append(free)
        if self.fail_next:
            self.fail_next -= 1
            raise SourceUnavailable("scripted outage")
        if self.crash_next:
            self.crash_next -= 1
            raise RuntimeError("scripted bug")
        if self.offers and free and not self.drained:
            return [ActionTask(id=i, action=re_pb2.Action()) for i in self.offers.pop(0)]
        self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), 0.05)
        except TimeoutError:
            pass
        return []

    def wake(self) -> None:
        self._wake.set()

    def report(self, task_id: str, stage: Stage) -> None:
        self.stages.append((task_id, stage))

    async def complete(self, task_id: str, outcome: ActionOutcome) -> None:
        self.completed[task_id] = outcome

    def begin_drain(self) -> None:
        self.drained = True

    async def close(self) -> None:
        self.closed = True


def _handler(gate: asyncio.Event | None = None, running: list[int] | None = None,
             peak: list[int] | None = None, upload_s: float = 0.0):
    async def handle(task, events):
        if running is not None:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        try:
            events(Stage.FETCHING)
            events(Stage.EXECUTING)
            if gate is not None:
                await gate.wait()
            events(Stage.UPLOADING)
            await asyncio.sleep(upload_s)
            return ActionOutcome()
        finally:
            if running is not None:
                running[0] -= 1
    return handle


async def _until(cond, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def test_never_runs_more_than_capacity_and_hands_back_extra_offers():
    async def main():
        source = FakeSource([["a", "b", "c"], ["d"]])
        gate = asyncio.Event()
        running, peak = [0], [0]
        loop = WorkerLoop(source, _handler(gate, running, peak), 2, drain_grace_s=5)
        stop = asyncio.Event()
        job = asyncio.create_task(loop.run(stop))
        await _until(lambda: running[0] == 2 and "c" in source.completed)
        assert source.completed["c"].retry  # offered beyond free slots: straight back
        assert source.frees[0] == 2
        gate.set()
        await _until(lambda: {"a", "b", "d"} <= set(source.completed))
        stop.set()
        await asyncio.wait_for(job, 5)
        assert peak[0] == 2
        assert all(source.completed[t].ok for t in "abd")
        assert source.closed
    asyncio.run(main())


def test_a_command_that_exited_frees_its_slot_while_it_uploads():
    async def main():
        source = FakeSource([["a"], ["b"]])
        loop = WorkerLoop(source, _handler(upload_s=0.3), 1, drain_grace_s=5)
        stop = asyncio.Event()
        job = asyncio.create_task(loop.run(stop))
        await _until(lambda: ("a", Stage.UPLOADING) in source.stages)
        await _until(lambda: ("b", Stage.EXECUTING) in source.stages, timeout=0.25)
        assert "a" not in source.completed  # b started while a was still uploading
        stop.set()
        await asyncio.wait_for(job, 5)
    asyncio.run(main())


def test_drain_hands_back_what_outlives_the_grace_period():
    async def main():
        source = FakeSource([["slow"]])
        gate = asyncio.Event()  # never set: the action outlives the grace period
        loop = WorkerLoop(source, _handler(gate), 1, drain_grace_s=0.3)
        stop = asyncio.Event()
        job = asyncio.create_task(loop.run(stop))
        await _until(lambda: ("slow", Stage.EXECUTING) in source.stages)
        stop.set()
        await asyncio.wait_for(job, 5)
        assert source.drained and source.closed
        assert source.completed["slow"].retry
        assert source.frees[-1] == 0  # no work asked for once draining
    asyncio.run(main())


def test_drain_lets_actions_finish_within_the_grace_period():
    async def main():
        source = FakeSource([["quick"]])
        gate = asyncio.Event()
        loop = WorkerLoop(source, _handler(gate), 1, drain_grace_s=10)
        stop = asyncio.Event()
        job = asyncio.create_task(loop.run(stop))
        await _until(lambda: ("quick", Stage.EXECUTING) in source.stages)
        stop.set()
        await asyncio.sleep(0.1)
        gate.set()
        await asyncio.wait_for(job, 5)
        assert source.completed["quick"].ok and not source.completed["quick"].retry
    asyncio.run(main())


def test_a_revoked_task_is_stopped_and_reports_nothing():
    async def main():
        source = FakeSource([["gone"]])
        gate = asyncio.Event()
        loop = WorkerLoop(source, _handler(gate), 1, drain_grace_s=5)
        stop = asyncio.Event()
        job = asyncio.create_task(loop.run(stop))
        await _until(lambda: ("gone", Stage.EXECUTING) in source.stages)
        source.on_revoked("gone")
        await _until(lambda: loop.in_flight == 0)
        stop.set()
        await asyncio.wait_for(job, 5)
        assert "gone" not in source.completed
    asyncio.run(main())


def test_reconnects_with_backoff_after_the_scheduler_goes_away():
    async def main():
        source = FakeSource([["after"]])
        source.fail_next = 3
        seen: list[bool] = []
        loop = WorkerLoop(source, _handler(), 1, drain_grace_s=5, on_connection=seen.append)
        stop = asyncio.Event()
        job = asyncio.create_task(loop.run(stop))
        await _until(lambda: "after" in source.completed)
        stop.set()
        await asyncio.wait_for(job, 5)
        assert source.connects == 4  # once, then after each of the three outages
        assert seen[:3] == [True, False, True]
    asyncio.run(main())


def test_a_bug_in_the_source_is_logged_and_survived(caplog):
    async def main():
        source = FakeSource([["after"]])
        source.crash_next = 1
        loop = WorkerLoop(source, _handler(), 1, drain_grace_s=5)
        stop = asyncio.Event()
        job = asyncio.create_task(loop.run(stop))
        await _until(lambda: "after" in source.completed)
        stop.set()
        await asyncio.wait_for(job, 5)
    asyncio.run(main())
    assert "scripted bug" in caplog.text


@pytest.mark.parametrize("capacity", [1, 3])
def test_free_slots_count_uploads_twice_at_most(capacity):
    async def main():
        loop = WorkerLoop(FakeSource(), _handler(), capacity, drain_grace_s=1)
        assert loop.free_slots() == capacity
    asyncio.run(main())


def test_a_worker_that_cannot_reach_its_scheduler_gives_up_in_bounded_time():
    """A channel may break for good (gRPC threads that could not start under a pid limit):
    past give_up_after_s of failures the loop returns, not ready all along, so that the
    worker process exits and the supervisor starts a fresh one."""
    class Unreachable(FakeSource):
        async def connect(self) -> None:
            raise SourceUnavailable("connection refused")

    async def main():
        source = Unreachable()
        seen: list[bool] = []
        loop = WorkerLoop(source, _handler(), 1, drain_grace_s=5, on_connection=seen.append,
                          give_up_after_s=0.5)
        t0 = time.monotonic()
        await asyncio.wait_for(loop.run(asyncio.Event()), 10)
        return loop, time.monotonic() - t0, seen
    loop, elapsed, seen = asyncio.run(main())
    assert loop.gave_up and 0.5 <= elapsed < 5
    assert seen == [False]  # never ready meanwhile


def test_a_scheduler_back_in_time_resets_the_give_up_clock():
    async def main():
        source = FakeSource()
        loop = WorkerLoop(source, _handler(), 1, drain_grace_s=5, give_up_after_s=0.6)
        stop = asyncio.Event()
        runner = asyncio.ensure_future(loop.run(stop))
        for _ in range(3):  # outages shorter than the limit, with contact between them
            source.fail_next = 2
            await asyncio.sleep(0.5)
        stop.set()
        await asyncio.wait_for(runner, 10)
        return loop
    assert not asyncio.run(main()).gave_up
