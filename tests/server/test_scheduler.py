"""The embedded scheduler's rules, on its own event loop (no gRPC)."""

from __future__ import annotations

import asyncio

from google.rpc import code_pb2, status_pb2

from engine import digest as dg
from engine.proto import re_pb2
from engine.resources import TaskSize
from engine.server.scheduler import COMPLETED, EXECUTING, QUEUED, ReportedLease, Scheduler


def _action(n: int) -> tuple[dg.Digest, re_pb2.Action]:
    action = re_pb2.Action(salt=str(n).encode())
    return dg.of_bytes("sha256", action.SerializeToString()), action


def _scheduler(results: list) -> Scheduler:
    return Scheduler(lambda job, response: results.append((job.name, response)),
                     keepalive_s=60, max_attempts=2)


def test_job_waits_in_queue_until_a_bot_has_capacity():
    async def scenario():
        s = _scheduler([])
        job = s.submit(*_action(1), do_not_cache=False)
        assert job.stage == QUEUED and s.queue_depth() == 1
        bot = s.create_session("bot-a", capacity=1)
        assert job.stage == EXECUTING and list(bot.leases) == [job.name]
        assert s.queue_depth() == 0

    asyncio.run(scenario())


def test_identical_cacheable_actions_share_a_job_but_do_not_cache_ones_do_not():
    async def scenario():
        s = _scheduler([])
        digest, action = _action(1)
        assert s.submit(digest, action, False) is s.submit(digest, action, False)
        assert s.submit(digest, action, True) is not s.submit(digest, action, True)

    asyncio.run(scenario())


def test_completed_lease_finishes_the_job_and_notifies_watchers():
    async def scenario():
        results: list = []
        s = _scheduler(results)
        bot = s.create_session("bot-a", capacity=1)
        job = s.submit(*_action(1), do_not_cache=False)
        stages = []

        async def watch():
            async for j in s.watch(job):
                stages.append(j.stage)

        watcher = asyncio.create_task(watch())
        await asyncio.sleep(0)
        s.update_session(bot, [ReportedLease(job.name, completed=True,
                                             result=re_pb2.ActionResult(exit_code=3))], True)
        await asyncio.wait_for(watcher, 1)
        assert stages[-1] == COMPLETED
        assert job.response.result.exit_code == 3
        assert job.response.result.execution_metadata.HasField("queued_timestamp")
        assert results and results[0][0] == job.name
        assert not bot.leases

    asyncio.run(scenario())


def test_restarted_bot_gets_its_lost_leases_back_immediately():
    async def scenario():
        s = _scheduler([])
        old = s.create_session("bot-a", capacity=1)
        job = s.submit(*_action(1), do_not_cache=False)
        assert job.name in old.leases
        new = s.create_session("bot-a", capacity=1)
        assert job.name in new.leases and s.session(old.name) is None
        assert job.attempts == 2

    asyncio.run(scenario())


def test_unavailable_lease_is_retried_then_fails_after_max_attempts():
    async def scenario():
        s = _scheduler([])
        bot = s.create_session("bot-a", capacity=1)
        job = s.submit(*_action(1), do_not_cache=False)
        gone = status_pb2.Status(code=code_pb2.UNAVAILABLE, message="disk full")
        s.update_session(bot, [ReportedLease(job.name, completed=True, status=gone)], True)
        assert job.stage == EXECUTING and job.attempts == 2
        s.update_session(bot, [ReportedLease(job.name, completed=True, status=gone)], True)
        assert job.done and job.response.status.code == code_pb2.UNAVAILABLE
        assert "disk full" in job.response.status.message

    asyncio.run(scenario())


def test_expired_session_requeues_its_leases():
    async def scenario():
        s = Scheduler(lambda j, r: None, keepalive_s=0.0)
        bot = s.create_session("bot-a", capacity=1)
        job = s.submit(*_action(1), do_not_cache=False)
        await asyncio.sleep(0.01)
        s.reap_expired()
        assert s.session(bot.name) is None and job.stage == QUEUED

    asyncio.run(scenario())


def test_terminating_bot_gets_no_new_leases():
    async def scenario():
        s = _scheduler([])
        bot = s.create_session("bot-a", capacity=2)
        s.update_session(bot, [], accepting=False)
        job = s.submit(*_action(1), do_not_cache=False)
        assert job.stage == QUEUED and not bot.leases

    asyncio.run(scenario())


def test_long_poll_wakes_when_a_lease_is_assigned():
    async def scenario():
        s = _scheduler([])
        bot = s.create_session("bot-a", capacity=1)
        waiter = asyncio.create_task(s.wait_for_news(bot, timeout=5))
        await asyncio.sleep(0.01)
        s.submit(*_action(1), do_not_cache=False)
        await asyncio.wait_for(waiter, 1)
        assert s.has_unacknowledged(bot)

    asyncio.run(scenario())


def test_a_bot_raising_its_capacity_gets_another_lease_while_one_uploads():
    async def scenario():
        s = _scheduler([])
        bot = s.create_session("bot-a", capacity=1)
        first = s.submit(*_action(1), do_not_cache=False)
        second = s.submit(*_action(2), do_not_cache=False)
        assert list(bot.leases) == [first.name] and second.stage == QUEUED
        # first's command exited and its outputs upload: the bot reports capacity 2.
        s.update_session(bot, [ReportedLease(first.name, completed=False)], True, capacity=2)
        assert set(bot.leases) == {first.name, second.name}

    asyncio.run(scenario())


def _sized(n: int, cpu: int, mem: int) -> tuple:
    return (*_action(n), False, TaskSize(cpu, mem))


def test_jobs_are_admitted_by_their_estimates():
    async def scenario():
        s = _scheduler([])
        bot = s.create_session("bot-a", capacity=4, milli_cpu=2000, memory_bytes=8 << 30)
        a = s.submit(*_sized(1, 1500, 1 << 30))
        b = s.submit(*_sized(2, 1000, 1 << 30))  # 2500m would exceed 2000m: waits
        assert a.stage == EXECUTING and b.stage == QUEUED
        s.update_session(bot, [ReportedLease(a.name, completed=True,
                                             result=re_pb2.ActionResult())], True)
        assert b.stage == EXECUTING

    asyncio.run(scenario())


def test_memory_bounds_admission_too():
    async def scenario():
        s = _scheduler([])
        s.create_session("bot-a", capacity=4, milli_cpu=4000, memory_bytes=4 << 30)
        jobs = [s.submit(*_sized(i, 250, 3 << 30)) for i in range(2)]
        assert [j.stage for j in jobs] == [EXECUTING, QUEUED]

    asyncio.run(scenario())


def test_undeclared_jobs_take_one_slot_share_each():
    async def scenario():
        s = _scheduler([])
        bot = s.create_session("bot-a", capacity=4, milli_cpu=1000, memory_bytes=1 << 30)
        jobs = [s.submit(*_action(i), do_not_cache=False) for i in range(5)]
        assert [j.stage for j in jobs] == [EXECUTING] * 4 + [QUEUED]
        assert len(bot.leases) == 4

    asyncio.run(scenario())


def test_a_job_bigger_than_any_bot_runs_alone_and_the_queue_waits_behind_it():
    async def scenario():
        s = _scheduler([])
        bot = s.create_session("bot-a", capacity=4, milli_cpu=2000, memory_bytes=8 << 30)
        small = s.submit(*_sized(1, 500, 1 << 20))
        huge = s.submit(*_sized(2, 64000, 1 << 40))  # cut down to the whole bot
        after = s.submit(*_sized(3, 250, 1 << 20))  # would fit, but must not overtake
        assert (small.stage, huge.stage, after.stage) == (EXECUTING, QUEUED, QUEUED)
        s.update_session(bot, [ReportedLease(small.name, completed=True,
                                             result=re_pb2.ActionResult())], True)
        assert huge.stage == EXECUTING and after.stage == QUEUED
        assert list(bot.leases) == [huge.name]

    asyncio.run(scenario())


def test_leases_that_only_upload_hold_no_resources():
    async def scenario():
        s = _scheduler([])
        bot = s.create_session("bot-a", capacity=1, milli_cpu=1000, memory_bytes=1 << 30)
        first = s.submit(*_action(1), do_not_cache=False)
        second = s.submit(*_action(2), do_not_cache=False)
        assert (first.stage, second.stage) == (EXECUTING, QUEUED)
        # The worker says first's command exited: one more slot, and first's share is free.
        s.update_session(bot, [ReportedLease(first.name, completed=False)], True,
                         capacity=2, uploading={first.name})
        assert second.stage == EXECUTING

    asyncio.run(scenario())


# ---- executions nobody watches ------------------------------------------------------------

GRACE = 0.05


def _orphaning(results: list | None = None) -> Scheduler:
    return Scheduler(lambda job, response: (results if results is not None else []).append(
        (job.name, response)), keepalive_s=60, orphan_grace_s=GRACE)


async def _watch_until(s: Scheduler, job, stop: asyncio.Event) -> None:
    """A client's Execute/WaitExecution stream, open until stop is set (it disconnects)."""
    async def follow():
        async for _ in s.watch(job):
            pass
    task = asyncio.create_task(follow())
    await stop.wait()
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass


def test_a_queued_job_nobody_watches_is_cancelled_after_the_grace():
    async def scenario():
        results: list = []
        s = _orphaning(results)
        job = s.submit(*_action(1), do_not_cache=False)
        assert s.queue_depth() == 1
        await asyncio.sleep(GRACE * 3)
        assert job.done and job.response.status.code == code_pb2.CANCELLED
        assert "orphan_grace" in job.response.status.message
        assert s.queue_depth() == 0 and s.get(job.name) is job
        bot = s.create_session("bot-a", capacity=1)
        assert not bot.leases  # never handed out
        # The same action submitted again is a new job, not the cancelled one.
        assert s.submit(*_action(1), do_not_cache=False) is not job

    asyncio.run(scenario())


def test_a_running_job_whose_client_left_is_taken_back_from_its_bot():
    async def scenario():
        s = _orphaning()
        bot = s.create_session("bot-a", capacity=1)
        job = s.submit(*_action(1), do_not_cache=False)
        s.update_session(bot, [ReportedLease(job.name, completed=False)], True)  # ACTIVE
        gone = asyncio.Event()
        watcher = asyncio.create_task(_watch_until(s, job, gone))
        await asyncio.sleep(GRACE * 3)
        assert job.stage == EXECUTING and job.watchers == 1  # watched: it runs on
        poll = asyncio.create_task(s.wait_for_news(bot, timeout=5))
        gone.set()
        await watcher
        assert job.watchers == 0
        await asyncio.wait_for(poll, 1)  # the bot's long-poll answers: the lease is gone
        assert job.done and job.response.status.code == code_pb2.CANCELLED
        assert not bot.leases and not bot.acknowledged
        # The bot finishing it anyway changes nothing; its slot takes the next job.
        s.update_session(bot, [ReportedLease(job.name, completed=True,
                                             result=re_pb2.ActionResult())], True)
        assert job.response.status.code == code_pb2.CANCELLED
        nxt = s.submit(*_action(2), do_not_cache=False)
        assert list(bot.leases) == [nxt.name]

    asyncio.run(scenario())


def test_a_client_reconnecting_within_the_grace_keeps_its_job():
    async def scenario():
        s = _orphaning()
        bot = s.create_session("bot-a", capacity=1)
        job = s.submit(*_action(1), do_not_cache=False)
        first = asyncio.Event()
        watcher = asyncio.create_task(_watch_until(s, job, first))
        await asyncio.sleep(0)
        first.set()
        await watcher  # the stream dropped ...
        await asyncio.sleep(GRACE / 3)
        stages = []

        async def wait_execution():
            async for j in s.watch(job):
                stages.append(j.stage)

        again = asyncio.create_task(wait_execution())  # ... and WaitExecution came back
        await asyncio.sleep(GRACE * 3)
        assert not job.done
        s.update_session(bot, [ReportedLease(job.name, completed=True,
                                             result=re_pb2.ActionResult(exit_code=0))], True)
        await asyncio.wait_for(again, 1)
        assert stages[-1] == COMPLETED and job.response.status.code == code_pb2.OK

    asyncio.run(scenario())


def test_a_job_shared_by_two_clients_lives_while_either_watches():
    async def scenario():
        s = _orphaning()
        job = s.submit(*_action(1), do_not_cache=False)
        assert s.submit(*_action(1), do_not_cache=False) is job
        a, b = asyncio.Event(), asyncio.Event()
        watchers = [asyncio.create_task(_watch_until(s, job, e)) for e in (a, b)]
        await asyncio.sleep(0)
        a.set()
        await asyncio.sleep(GRACE * 3)
        assert not job.done and job.watchers == 1
        b.set()
        await asyncio.gather(*watchers)
        await asyncio.sleep(GRACE * 3)
        assert job.done and job.response.status.code == code_pb2.CANCELLED

    asyncio.run(scenario())


def test_polling_keeps_an_unwatched_job_alive_and_completed_jobs_are_untouched():
    async def scenario():
        results: list = []
        s = _orphaning(results)
        bot = s.create_session("bot-a", capacity=1)
        job = s.submit(*_action(1), do_not_cache=False)
        for _ in range(6):  # a client polling GetOperation
            await asyncio.sleep(GRACE / 2)
            s.touch(job)
        assert not job.done
        s.update_session(bot, [ReportedLease(job.name, completed=True,
                                             result=re_pb2.ActionResult(exit_code=0))], True)
        await asyncio.sleep(GRACE * 3)
        assert job.response.status.code == code_pb2.OK
        s.touch(job)
        s.cancel(job, "too late")
        assert job.response.status.code == code_pb2.OK and len(results) == 1

    asyncio.run(scenario())
