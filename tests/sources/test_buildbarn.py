"""BuildbarnSource (engine/sources/buildbarn.py) against the Buildbarn scheduler double
(tests/doubles/buildbarn_scheduler.py), which records every protocol rule it sees broken; a
fixture fails the test at teardown unless it saw none.

First under the real WorkerLoop with a small in-test handler (no processes, fast), then end to
end: a real `stoker executor` process joined to the double, running a real action.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import any_pb2, empty_pb2
from google.rpc import code_pb2

from engine import transport
from engine.cas.local_disk import LocalDiskStore
from engine.cas.remote_cas import RemoteCasClient
from engine.config import Config
from engine.pipeline.storage import Storage
from engine.proto import re_pb2, rw_grpc, rw_pb2
from engine.sources.buildbarn import BuildbarnSource, instance_name
from engine.sources.protocol import Stage
from engine.sources.results import ResultStore
from engine.task import ActionOutcome, ActionTask
from engine.worker.loop import WorkerLoop
from tests.doubles.buildbarn_scheduler import BuildbarnSchedulerDouble, Job
from tests.doubles.scheduler import checked_doubles
from tests.integration.support import ExecutorProcess, command

# Channels that find a restarted double within a second (grpc's default backoff is slower).
FAST_RECONNECT = [("grpc.initial_reconnect_backoff_ms", 100),
                  ("grpc.min_reconnect_backoff_ms", 100),
                  ("grpc.max_reconnect_backoff_ms", 500)]
# Deliberately not in sorted order: the adapter must sort them.
PROPERTIES = {"OSFamily": "linux", "ISA": "x86-64", "container-image": "none", "Pool": "ci"}


@pytest.fixture
def make_double(tmp_path: Path):
    """Doubles for the test; at teardown each must be stopped and have seen no violation."""
    yield from checked_doubles(BuildbarnSchedulerDouble, tmp_path)


class Handler:
    """Stands in for the pipeline: reports stages, may wait on a gate per action, records
    what ran and what was stopped."""

    def __init__(self, *, stage_s: float = 0.0, run_s: float = 0.0, upload_s: float = 0.0,
                 exit_code: int = 0):
        self.exit_code = exit_code
        self.stage_s = stage_s
        self.run_s = run_s
        self.upload_s = upload_s
        self.gates: dict[str, asyncio.Event] = {}  # by action digest "hash/size"
        self.tasks: list[ActionTask] = []
        self.cancelled: list[ActionTask] = []
        self.commands = 0  # between FETCHING and UPLOADING
        self.peak = 0

    def gate(self, job: Job) -> asyncio.Event:
        return self.gates.setdefault(job.key, asyncio.Event())

    async def __call__(self, task: ActionTask, events) -> ActionOutcome:
        self.tasks.append(task)
        self.commands += 1
        self.peak = max(self.peak, self.commands)
        uploading = False
        try:
            events(Stage.FETCHING)
            await asyncio.sleep(self.stage_s)
            events(Stage.EXECUTING)
            gate = self.gates.get(task.action_digest)
            if gate is not None:
                await gate.wait()
            await asyncio.sleep(max(self.stage_s, self.run_s))
            self.commands -= 1
            uploading = True
            events(Stage.UPLOADING)
            await asyncio.sleep(self.upload_s)
            return ActionOutcome(result=re_pb2.ActionResult(
                exit_code=self.exit_code, stdout_raw=task.action_digest.encode()))
        except asyncio.CancelledError:
            self.cancelled.append(task)
            raise
        finally:
            if not uploading:
                self.commands -= 1

    def ran(self, job: Job) -> list[ActionTask]:
        return [t for t in self.tasks if t.action_digest == job.key]


@contextlib.asynccontextmanager
async def worker(double: BuildbarnSchedulerDouble, handler: Handler, *, capacity: int = 1,
                 prefix: str = "", drain_grace_s: float = 5.0,
                 connections: list[bool] | None = None, size_class: int = 0,
                 refusals: list[str | None] | None = None
                 ) -> AsyncIterator[tuple[BuildbarnSource, asyncio.Event, asyncio.Task]]:
    """The adapter under the real WorkerLoop, on a channel made as a joined Stoker makes it,
    storing results through the double's storage as a joined worker does."""
    config = Config(instance_name=prefix, concurrency=capacity, workers=1,
                    size_class=size_class)
    channel = transport.open_channel(double.target, options=FAST_RECONNECT)
    store = LocalDiskStore(str(double.root / f"worker-cas-{id(handler)}"), 0)
    storage = Storage(local=store, remote=RemoteCasClient(channel, store))
    source = BuildbarnSource(channel, target=double.target, config=config, slot=0,
                             name="test-0", properties=PROPERTIES,
                             results=ResultStore(channel, storage))
    loop = WorkerLoop(source, handler, capacity, drain_grace_s=drain_grace_s,
                      on_connection=connections.append if connections is not None else None,
                      on_refused=refusals.append if refusals is not None else None)
    stop = asyncio.Event()
    job = asyncio.create_task(loop.run(stop))
    try:
        yield source, stop, job
    finally:
        stop.set()
        try:
            await asyncio.wait_for(job, drain_grace_s + 15)
        finally:
            await channel.close()
            assert storage.remote is not None
            storage.remote.close()
            store.close()


def _echo(text: str) -> re_pb2.Command:
    return command(["/bin/echo", text])


# ---- the protocol, step by step -------------------------------------------------------------


def test_idle_then_executing_then_completed(tmp_path, make_double):
    """An action goes out with its Action, digest function and instance name suffix; its
    ExecuteResponse comes back with what the scheduler passed for the result's metadata."""
    async def main():
        async with make_double(instance_name_prefix="main", commands_per_process=1,
                               actions_per_process=2) as double:
            handler = Handler()
            aux = any_pb2.Any(type_url="type.example.com/x", value=b"\x01")
            plain = double.enqueue(_echo("a"), {"in.txt": b"input"}, suffix="team/a",
                                   auxiliary=[aux])
            blake = double.enqueue(_echo("b"), function="blake3")
            async with worker(double, handler, prefix="main"):
                first = await double.result(plain)
                second = await double.result(blake)
            assert first.status.code == code_pb2.OK
            assert first.result.stdout_raw == plain.key.encode()
            metadata = first.result.execution_metadata
            assert metadata.queued_timestamp == plain.queued
            assert list(metadata.auxiliary_metadata) == [aux]
            assert second.result.stdout_raw == blake.key.encode()
            one, two = handler.tasks
            assert (one.instance_name, one.digest_function) == ("main/team/a", "sha256")
            assert (two.instance_name, two.digest_function) == ("main", "blake3")
            assert one.action == plain.action and one.action_digest == plain.key
            assert one.id != two.id
            # One action at a time: one thread, and as bb_worker then, no "thread" key.
            ids = {tuple(sorted(w.worker_id.items())) for w in double.workers.values()}
            assert ids == {(("hostname", socket.gethostname()), ("worker", "test-0"))}
            assert [s.state for s in double.syncs_of(plain)][-1] == "completed"
            assert plain.assignments == blake.assignments == 1
    asyncio.run(main())


def test_instance_names_join_as_buildbarn_joins_them():
    assert instance_name("", "") == ""
    assert instance_name("a/b", "") == "a/b"
    assert instance_name("", "c") == "c"
    assert instance_name("a", "c/d") == "a/c/d"
    for bad in ("/c", "c/", "c//d", "c/blobs"):
        with pytest.raises(ValueError):
            instance_name("a", bad)


def test_stages_are_reported_in_order(tmp_path, make_double):
    async def main():
        async with make_double(busy_sync_s=5.0) as double:
            handler = Handler(stage_s=0.15, upload_s=0.15)
            job = double.enqueue(_echo("stages"))
            async with worker(double, handler):
                await double.result(job)
            assert job.stages == ["fetching_inputs", "running", "uploading_outputs",
                                  "completed"]
            # Each change went out at once, well before the 5 s the double asked for.
            syncs = double.syncs_of(job)
            assert syncs[-1].at - syncs[0].at < 2.0
    asyncio.run(main())


@pytest.mark.slow
def test_next_synchronization_at_is_honoured(tmp_path, make_double):
    """An executing thread calls back when told, not before (the double's early/late rules
    check every call); an idle thread that was answered idle waits before asking again."""
    async def main():
        async with make_double(busy_sync_s=0.25, idle_poll_s=0.2, idle_resync_s=0.3,
                               early_slack_s=0.05, late_slack_s=0.5) as double:
            handler = Handler()
            job = double.enqueue(_echo("slow"))
            handler.gate(job)
            async with worker(double, handler):
                await double.until(lambda: job.stages[-1:] == ["running"], what="running")
                await asyncio.sleep(1.3)
                handler.gate(job).set()
                await double.result(job)
                await asyncio.sleep(1.5)  # idle now: polls of 0.2 s, 0.3 s apart
            running = [s.at for s in double.syncs_of(job) if s.state == "running"]
            assert len(running) >= 5, running
            gaps = [b - a for a, b in zip(running, running[1:], strict=False)]
            assert all(0.2 <= g <= 0.5 for g in gaps), gaps
            done = double.syncs_of(job)[-1].at
            idle = [s.at for s in double.syncs if s.state == "idle" and s.at > done
                    and not s.prefer_idle]
            assert len(idle) >= 2, idle
            gaps = [b - a for a, b in zip(idle, idle[1:], strict=False)]
            assert all(g >= 0.45 for g in gaps), gaps
    asyncio.run(main())


@pytest.mark.slow
def test_asks_for_no_more_work_than_it_has_free_slots(tmp_path, make_double):
    async def main():
        capacity = 2
        async with make_double(commands_per_process=capacity,
                               actions_per_process=2 * capacity) as double:
            handler = Handler(run_s=0.05, upload_s=0.3)
            jobs = [double.enqueue(_echo(f"job {i}")) for i in range(6)]
            for job in jobs:
                handler.gate(job)
            async with worker(double, handler, capacity=capacity):
                await double.until(lambda: handler.commands == capacity, what="both running")
                calls = len(double.syncs)
                await asyncio.sleep(0.5)
                # Full: nothing assigned beyond the two, and no thread asked for more.
                assert [j.state for j in jobs].count("executing") == capacity
                assert not [s for s in double.syncs[calls:] if s.state == "idle"]
                for job in jobs:
                    handler.gate(job).set()
                for job in jobs:
                    assert (await double.result(job)).status.code == code_pb2.OK
            assert handler.peak == capacity
            threads = {s.thread for s in double.syncs}
            assert threads <= {str(i) for i in range(2 * capacity)}, threads
            # A command that exited gave its slot to the next one while it uploaded.
            assert max(_actions_at_once(double)) > capacity
    asyncio.run(main())


def _actions_at_once(double: BuildbarnSchedulerDouble) -> list[int]:
    """How many actions the worker process held after each call, from the double's log."""
    held: dict[str, str] = {}
    counts = []
    for s in double.syncs:
        if s.answer.startswith("executing"):
            held[s.worker] = s.answer
        elif s.answer == "idle" or s.state == "completed":
            held.pop(s.worker, None)
        counts.append(len(held))
    return counts


def test_an_action_taken_back_is_stopped(tmp_path, make_double):
    async def main():
        async with make_double(busy_sync_s=0.2) as double:
            handler = Handler()
            job = double.enqueue(_echo("revoked"))
            handler.gate(job)
            async with worker(double, handler):
                await double.until(lambda: job.stages[-1:] == ["running"], what="running")
                double.revoke(job)
                await double.until(lambda: handler.cancelled, what="the handler stopped")
                assert job.state == "revoked"
                after = double.enqueue(_echo("after"))
                assert (await double.result(after)).status.code == code_pb2.OK
            assert [t.action_digest for t in handler.cancelled] == [job.key]
            assert "completed" not in job.stages
    asyncio.run(main())


def test_drain_prefers_being_idle(tmp_path, make_double):
    """On stop: idle polls are cut and confirmed with prefer_being_idle, the running action
    finishes and is reported with it, and nothing more is taken."""
    async def main():
        async with make_double(busy_sync_s=0.2, idle_poll_s=5.0) as double:
            handler = Handler()
            job = double.enqueue(_echo("last one"))
            handler.gate(job)
            async with worker(double, handler, capacity=2) as (_, stop, loop_job):
                await double.until(lambda: job.stages[-1:] == ["running"], what="running")
                await double.until(lambda: any(s.state == "idle" and not s.answer
                                               for s in double.syncs), what="an idle poll")
                stop.set()
                await double.until(lambda: any(s.prefer_idle for s in double.syncs),
                                   what="prefer_being_idle")
                late = double.enqueue(_echo("too late"))
                await asyncio.sleep(0.3)
                handler.gate(job).set()
                await double.result(job)
                await asyncio.wait_for(loop_job, 10)
            assert late.state == "queued" and late.assignments == 0
            first = next(i for i, s in enumerate(double.syncs) if s.prefer_idle)
            assert all(s.prefer_idle for s in double.syncs[first:])
            completed = [s for s in double.syncs_of(job) if s.state == "completed"]
            assert completed and completed[-1].prefer_idle
            cut = [s for s in double.syncs[:first] if s.state == "idle" and s.answer == "cut"]
            assert cut, "the idle poll was not cut short"
    asyncio.run(main())


def test_an_action_assigned_as_the_drain_cuts_a_poll_is_run_not_failed(tmp_path, make_double):
    """The drain cuts an idle poll just as the scheduler assigned it an action (the answer is
    lost): the scheduler re-sends it to the confirming call. Handing it back would fail it
    (bb_scheduler can only complete it), so the draining worker runs it."""
    async def main():
        async with make_double(busy_sync_s=0.2, idle_poll_s=5.0) as double:
            handler = Handler()
            running = double.enqueue(_echo("running"))
            handler.gate(running)
            async with worker(double, handler, capacity=2) as (_, stop, loop_job):
                await double.until(lambda: running.stages[-1:] == ["running"], what="running")
                await double.until(lambda: any(s.state == "idle" and not s.answer
                                               for s in double.syncs), what="an idle poll")
                double.assign_on_cut = True
                caught = double.enqueue(_echo("caught by the cut"), announce=False)
                stop.set()
                await double.until(lambda: caught.resends >= 1, what="the re-send")
                handler.gate(running).set()
                response = await double.result(caught)
                await asyncio.wait_for(loop_job, 10)
            assert response.status.code == code_pb2.OK, response.status
            assert len(handler.ran(caught)) == 1 and caught.assignments == 1
            assert (await double.result(running)).status.code == code_pb2.OK
    asyncio.run(main())


@pytest.mark.slow
def test_reconnects_after_a_scheduler_restart(tmp_path, make_double):
    """The scheduler goes away mid-action: the claim fails, the thread keeps its state and
    reports the same action once the scheduler is back."""
    async def main():
        async with make_double(busy_sync_s=0.2) as double:
            handler = Handler()
            job = double.enqueue(_echo("survivor"))
            handler.gate(job)
            connections: list[bool] = []
            async with worker(double, handler, connections=connections):
                await double.until(lambda: job.stages[-1:] == ["running"], what="running")
                await double.restart(down_s=1.0)
                await double.until(lambda: connections[-1:] == [True] and False in connections,
                                   what="a reconnect")
                handler.gate(job).set()
                response = await double.result(job)
            assert response.status.code == code_pb2.OK
            assert connections[:3] == [True, False, True]
            assert job.assignments == 1 and not handler.cancelled
    asyncio.run(main())


def test_a_scheduler_that_forgot_its_workers_gets_the_action_again(tmp_path, make_double):
    """bb_scheduler keeps its state in memory: after its restart the action we report is
    unknown, we are told idle and stop it, and the client's retry comes to us again."""
    async def main():
        async with make_double(busy_sync_s=0.2) as double:
            handler = Handler()
            job = double.enqueue(_echo("forgotten"))
            handler.gate(job)
            async with worker(double, handler):
                await double.until(lambda: job.stages[-1:] == ["running"], what="running")
                await double.restart(forget=True, down_s=0.5)
                await double.until(lambda: len(handler.ran(job)) == 2, timeout=15,
                                   what="the action again")
                handler.gate(job).set()
                response = await double.result(job)
            assert response.status.code == code_pb2.OK
            assert [t.id for t in handler.cancelled] == [handler.ran(job)[0].id]
            assert job.assignments == 2
    asyncio.run(main())


@pytest.mark.slow
def test_the_double_catches_broken_rules(tmp_path, make_double):
    """The double is only worth its silence if it speaks up: a hand-written worker breaks
    rules on purpose."""
    async def main():
        async with make_double(instance_name_prefix="main", busy_sync_s=0.5,
                               idle_poll_s=0.2, commands_per_process=1) as double:
            channel = transport.open_channel(double.target)
            stub = rw_grpc.OperationQueueStub(channel)
            wid = {"hostname": "h", "worker": "w", "thread": "0"}
            platform = re_pb2.Platform(properties=[
                re_pb2.Platform.Property(name="b", value="1"),
                re_pb2.Platform.Property(name="a", value="1")])
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.Synchronize(rw_pb2.SynchronizeRequest(
                    worker_id=wid, instance_name_prefix="other", platform=platform,
                    current_state=rw_pb2.CurrentState(idle=empty_pb2.Empty())))
            assert len(double.take_violations("platform")) == 1
            assert len(double.take_violations("prefix")) == 1
            job = double.enqueue(_echo("x"))
            given = await stub.Synchronize(rw_pb2.SynchronizeRequest(
                worker_id=wid, instance_name_prefix="main",
                current_state=rw_pb2.CurrentState(idle=empty_pb2.Empty())))
            assert given.desired_state.executing.action_digest == job.digest

            def report(stage: str, digest=job.digest, **completed) -> rw_pb2.SynchronizeRequest:
                state = rw_pb2.CurrentState()
                state.executing.action_digest.CopyFrom(digest)
                if stage == "completed":
                    state.executing.completed.CopyFrom(re_pb2.ExecuteResponse(**completed))
                else:
                    getattr(state.executing, stage).SetInParent()
                return rw_pb2.SynchronizeRequest(worker_id=wid, instance_name_prefix="main",
                                                 current_state=state)

            await stub.Synchronize(report("running"))
            await stub.Synchronize(report("running"))  # nothing new, long before due
            assert len(double.take_violations("early")) == 1
            await stub.Synchronize(report("fetching_inputs"))
            assert len(double.take_violations("order")) == 1
            other = re_pb2.Digest(hash="0" * 64, size_bytes=1)
            await stub.Synchronize(report("running", digest=other))
            assert len(double.take_violations("given")) == 1
            await stub.Synchronize(report("completed"))  # nor a result in the ActionCache
            assert len(double.take_violations("response")) == 1
            assert len(double.take_violations("ac: ")) == 1
            await stub.Synchronize(report("completed", digest=other,
                                          result=re_pb2.ActionResult()))
            assert len(double.take_violations("given")) == 1
            await stub.Synchronize(rw_pb2.SynchronizeRequest(  # thread 0's sibling, unnamed
                worker_id={"hostname": "h", "worker": "w"}, instance_name_prefix="main",
                prefer_being_idle=True, current_state=rw_pb2.CurrentState(idle=empty_pb2.Empty())))
            assert len(double.take_violations("worker_id")) == 1
            job2 = double.enqueue(_echo("y"))
            double.enqueue(_echo("z"))
            for thread in ("0", "1"):  # thread 1 asks while thread 0 runs the one it may
                await stub.Synchronize(rw_pb2.SynchronizeRequest(
                    worker_id={**wid, "thread": thread}, instance_name_prefix="main",
                    current_state=rw_pb2.CurrentState(idle=empty_pb2.Empty())))
            assert len(double.take_violations("capacity")) == 1
            await asyncio.sleep(0.5 + double.late_slack_s + 0.2)
            assert len(double.take_violations("late")) == 2  # neither thread called back
            await stub.Synchronize(report("completed", digest=job2.digest,
                                          result=re_pb2.ActionResult(exit_code=1)))
            assert len(double.take_violations("names no HistoricalExecuteResponse")) == 1
            await channel.close()
    asyncio.run(main())


def test_the_double_plays_bb_schedulers_limits(tmp_path, make_double):
    """What bb_scheduler does to a worker that breaks its limits, played by the double: size
    classes of a predeclared queue (in_memory_build_queue.go Synchronize), an action re-sent
    to a worker that keeps reporting idle (WorkerTaskRetryCount), a silent worker forgotten
    with its action failed (removeStaleWorker)."""
    async def main():
        async with make_double(size_classes=[0, 4], worker_timeout_s=1.0,
                               retry_limit=3) as double:
            channel = transport.open_channel(double.target)
            stub = rw_grpc.OperationQueueStub(channel)
            idle = rw_pb2.CurrentState(idle=empty_pb2.Empty())

            async def sync(size_class: int, worker: str = "w", **fields):
                return await stub.Synchronize(rw_pb2.SynchronizeRequest(
                    worker_id={"worker": worker}, size_class=size_class,
                    current_state=fields.pop("state", idle), **fields))

            for size_class, said in ((5, "exceeds the predeclared maximum of 4"),):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await sync(size_class, prefer_being_idle=True)
                assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert said in (refused.value.details() or "")
            await sync(4, prefer_being_idle=True)
            await sync(2, worker="v", prefer_being_idle=True)  # made on demand, as bb does
            job = double.enqueue(_echo("never run"))
            for _ in range(4):  # given once and re-sent 3 times, it reports idle each time
                given = await sync(4)
                assert given.desired_state.executing.action_digest == job.digest
            assert (await sync(4)).desired_state.WhichOneof("worker_state") == "idle"
            response = await double.result(job)
            assert response.status.code == code_pb2.INTERNAL
            assert "Attempted to execute task 4 times" in response.status.message
            assert len(double.take_violations("retries")) == 1
            silent = double.enqueue(_echo("held"))
            assert (await sync(4)).desired_state.executing.action_digest == silent.digest
            response = await double.result(silent, timeout=10)
            assert response.status.code == code_pb2.UNAVAILABLE
            assert "disappeared while task was executing" in response.status.message
            assert len(double.take_violations("silent")) == 1
            await channel.close()
        async with make_double(size_classes=[1, 2]) as double:
            channel = transport.open_channel(double.target)
            stub = rw_grpc.OperationQueueStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Synchronize(rw_pb2.SynchronizeRequest(
                    worker_id={"worker": "w"}, prefer_being_idle=True,
                    current_state=rw_pb2.CurrentState(idle=empty_pb2.Empty())))
            assert "Worker did not provide a size class" in (refused.value.details() or "")
            await channel.close()
        async with make_double() as double:  # not predeclared: the first worker's, only
            channel = transport.open_channel(double.target)
            stub = rw_grpc.OperationQueueStub(channel)
            for size_class in (3, 1):
                request = rw_pb2.SynchronizeRequest(
                    worker_id={"worker": f"w{size_class}"}, size_class=size_class,
                    prefer_being_idle=True,
                    current_state=rw_pb2.CurrentState(idle=empty_pb2.Empty()))
                if size_class == 3:
                    await stub.Synchronize(request)
                    continue
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.Synchronize(request)
                assert "Cannot add multiple size classes" in (refused.value.details() or "")
            await channel.close()
    asyncio.run(main())


def test_results_go_into_the_action_cache_or_the_record_as_bb_worker_puts_them(
        tmp_path, make_double):
    """caching_build_executor.go Execute: exit 0 with status OK and no do_not_cache goes into
    the ActionCache under the action digest and the full instance name; exit 1 and
    do_not_cache are not cached, and kept in the CAS as a HistoricalExecuteResponse that
    the message names (the double checks each completion)."""
    async def main():
        async with make_double(instance_name_prefix="main") as double:
            ok = double.enqueue(_echo("ok"), suffix="team")
            private = double.enqueue(_echo("private"), do_not_cache=True)
            async with worker(double, Handler(), prefix="main"):
                cached = await double.result(ok)
                kept = await double.result(private)
            failing = double.enqueue(_echo("failing"))
            async with worker(double, Handler(exit_code=1), prefix="main"):
                failed = await double.result(failing)
            entries = double.cas.action_cache.entries
            assert list(entries) == [("main/team", re_pb2.DigestFunction.SHA256, ok.key)]
            assert entries["main/team", re_pb2.DigestFunction.SHA256, ok.key] == cached.result
            assert cached.message.startswith("Action details (cached result)")
            for response in (kept, failed):
                assert response.message.startswith(
                    "Action details (uncached result): historical_execute_response ")
            assert failed.result.exit_code == 1
    asyncio.run(main())


def test_size_class_is_sent_and_a_refusal_names_the_key(tmp_path, make_double):
    """size_class goes in every Synchronize; a scheduler that refuses it (INVALID_ARGUMENT)
    is a configuration error naming the key, said once and asked again only slowly, never a
    reconnect loop."""
    async def main():
        async with make_double(size_classes=[1, 2]) as double:
            refusals: list[str | None] = []
            connections: list[bool] = []
            async with worker(double, Handler(), refusals=refusals, connections=connections):
                await double.until(lambda: bool(refusals), what="the refusal")
                await asyncio.sleep(1.0)
                before_stop = list(connections)
                calls = len(double.refused)
            [why] = [r for r in refusals if r]
            assert "size_class (sent: 0)" in why and "executor.yaml" in why
            assert "Worker did not provide a size class" in why
            assert before_stop == [True, False], before_stop  # no reconnect loop
            assert 1 <= calls <= 2, f"{calls} calls: a refused worker must not retry at once"
            job = double.enqueue(_echo("sized"))
            async with worker(double, Handler(), size_class=2):
                response = await double.result(job)
            assert response.status.code == code_pb2.OK
    asyncio.run(main())


# ---- end to end: a real `stoker executor` ---------------------------------------------------


def executor_process(base: Path, double: BuildbarnSchedulerDouble, *, concurrency: int,
                     prefix: str) -> ExecutorProcess:
    """`python -m engine executor` (protocol: buildbarn) joined to the double, its log in a
    file."""
    platform = "".join(f"  {k}: {v}\n" for k, v in PROPERTIES.items())
    return ExecutorProcess(base / "data", base / "executor.log", server=double.target,
                           protocol="buildbarn", concurrency=concurrency,
                           yaml_extra=f"instance_name: {prefix}\n"
                                      "drain_grace: 10s\n"
                                      f"platform:\n{platform}")


@pytest.fixture
def e2e_base():
    # Not under pytest's 0700 basetemp: actions run as other uids when Stoker is root.
    base = Path(tempfile.mkdtemp(prefix="stoker-bbarn-", dir="/tmp"))
    base.chmod(0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.mark.slow  # starts stoker executor
def test_a_real_executor_runs_an_action_through_the_double(e2e_base, make_double):
    capacity = 2

    async def main():
        async with make_double(instance_name_prefix="main", commands_per_process=capacity,
                               actions_per_process=2 * capacity) as double:
            process = executor_process(e2e_base, double, concurrency=capacity, prefix="main")
            try:
                # Off the event loop, which serves the double: start() waits for /readyz.
                await asyncio.to_thread(process.start, 60)
                try:
                    await double.until(lambda: bool(double.syncs) or not process.alive(),
                                       timeout=60, what="the executor's first Synchronize")
                    assert double.syncs, "the executor exited"
                except AssertionError as e:
                    raise AssertionError(f"{e}\n{process.log_tail()}") from None
                produce = double.enqueue(command(
                    ["/bin/sh", "-c", "mkdir -p out && cat in.txt > out/copy.txt && "
                     "printf made > out/made.txt && echo to-stdout && echo to-stderr >&2"],
                    output_paths=["out/copy.txt", "out/made.txt"]),
                    {"in.txt": b"input bytes\n"}, suffix="team")
                fail = double.enqueue(command(["/bin/sh", "-c", "echo failing >&2; exit 3"]))
                produced = await double.result(produce, timeout=60)
                failed = await double.result(fail, timeout=60)
            finally:
                code = await asyncio.to_thread(process.stop, 30)
            log = process.log_tail()
            assert code == 0, log
            assert produced.status.code == code_pb2.OK, (produced.status, log)
            result = produced.result
            assert result.exit_code == 0
            assert double.cas.outputs(result) == {"out/copy.txt": b"input bytes\n",
                                                  "out/made.txt": b"made"}, (result, log)
            assert double.cas.get(result.stdout_digest) == b"to-stdout\n"
            assert double.cas.get(result.stderr_digest) == b"to-stderr\n"
            assert result.execution_metadata.queued_timestamp == produce.queued
            assert failed.status.code == code_pb2.OK and failed.result.exit_code == 3
            assert double.cas.get(failed.result.stderr_digest) == b"failing\n"
            assert produce.stages[-1] == "completed" and "running" in produce.stages
            # The drain left every thread idle, and said so.
            assert all(w.job is None for w in double.workers.values())
            assert any(s.prefer_idle for s in double.syncs)
    asyncio.run(main())
