"""BuildBuddySource (engine/sources/buildbuddy.py) against the BuildBuddy scheduler double
(tests/doubles/buildbuddy_scheduler.py), which records every protocol rule it sees broken; a
fixture fails the test at teardown unless it saw none.

First under the real WorkerLoop with a small in-test handler (no processes, fast), then end to
end: a real `stoker executor` process joined to the double, running real actions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest
from google.rpc import code_pb2, status_pb2

from engine import __version__, transport
from engine.cas.local_disk import LocalDiskStore
from engine.cas.remote_cas import RemoteCasClient
from engine.config import Config
from engine.pipeline.storage import Storage
from engine.proto import operations_pb2, re_grpc, re_pb2, sched_grpc, sched_pb2
from engine.sources import buildbuddy
from engine.sources.buildbuddy import BuildBuddySource, machine_arch
from engine.sources.protocol import Stage
from engine.sources.results import ResultStore
from engine.task import ActionOutcome, ActionTask, Usage
from engine.transport import API_KEY_HEADER
from engine.worker.loop import WorkerLoop
from tests.adversarial.adv_support import (
    EVIL_SCRIPT,
    build_evil_libs,
    evil_loads,
    evil_value,
    root_loads,
)
from tests.doubles.buildbuddy_scheduler import JWT_HEADER, BuildBuddySchedulerDouble
from tests.doubles.scheduler import checked_doubles
from tests.integration.support import ExecutorProcess, command, digest_of

API_KEY = "bb-test-key-0123456789abcdef"
# Channels that find a restarted double within a second (grpc's default backoff is slower).
FAST_RECONNECT = [("grpc.initial_reconnect_backoff_ms", 100),
                  ("grpc.min_reconnect_backoff_ms", 100),
                  ("grpc.max_reconnect_backoff_ms", 500)]
Progress = re_pb2.ExecutionProgress


@pytest.fixture
def make_double(tmp_path: Path):
    """Doubles for the test; at teardown each must be stopped and have seen no violation."""
    yield from checked_doubles(BuildBuddySchedulerDouble, tmp_path)


def _config(tmp_path: Path, **overrides) -> Config:
    values = dict(data_dir=str(tmp_path / "data"), workers=1, milli_cpu=4000,
                  memory_bytes=8 << 30)
    values.update(overrides)
    return Config(**values)


class Handler:
    """Stands in for the pipeline: reports stages, may wait on a gate, records what ran."""

    def __init__(self, *, gate: asyncio.Event | None = None, hold_s: float = 0.0,
                 upload: bool = True,
                 outcome: Callable[[ActionTask, int], ActionOutcome] | None = None):
        self.gate = gate
        self.hold_s = hold_s
        self.upload = upload
        self.outcome = outcome or (lambda task, attempt: ActionOutcome())
        self.tasks: list[ActionTask] = []
        self.running = 0
        self.peak = 0
        self.cas_call: Callable | None = None  # run with each task (a CAS call, say)

    async def __call__(self, task: ActionTask, events) -> ActionOutcome:
        self.tasks.append(task)
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            events(Stage.FETCHING)
            if self.cas_call is not None:
                await self.cas_call(task)
            events(Stage.EXECUTING)
            if self.gate is not None:
                await self.gate.wait()
            await asyncio.sleep(self.hold_s)
            if self.upload:
                events(Stage.UPLOADING)
            attempt = sum(1 for t in self.tasks if t.id == task.id)
            return self.outcome(task, attempt)
        finally:
            self.running -= 1


@contextlib.asynccontextmanager
async def executor(double: BuildBuddySchedulerDouble, handler: Handler, config: Config, *,
                   capacity: int = 1, api_key: str | None = None, drain_grace_s: float = 5.0,
                   register_interval_s: float | None = None,
                   source_cls: type[BuildBuddySource] = BuildBuddySource,
                   writes_action_cache: bool = False
                   ) -> AsyncIterator[tuple[BuildBuddySource, asyncio.Event, asyncio.Task]]:
    """The adapter under the real WorkerLoop, on a channel made as a joined Stoker makes it
    for BuildBuddy (engine/worker/process.py: no API key on the channel; the source puts it
    on the scheduler's own calls); writes_action_cache: with where results go, as
    executor_writes_action_cache gives it."""
    channel = transport.open_channel(double.target, options=FAST_RECONNECT)
    results = None
    if writes_action_cache:
        store = LocalDiskStore(config.cache_dir, 0)
        results = ResultStore(channel, Storage(local=store,
                                               remote=RemoteCasClient(channel, store)))
    source = source_cls(channel, target=double.target, config=config, slot=0, name="test-0",
                        register_interval_s=register_interval_s or double.register_interval_s,
                        results=results, scheduler_metadata=(
                            ((transport.API_KEY_HEADER, api_key),) if api_key else ()))
    loop = WorkerLoop(source, handler, capacity, drain_grace_s=drain_grace_s)
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


def _echo(text: str = "hi") -> re_pb2.Command:
    return command(["/bin/echo", text])


def _op_stage(op: operations_pb2.Operation) -> tuple[int, int]:
    md = re_pb2.ExecuteOperationMetadata()
    assert op.metadata.Unpack(md)
    progress = 0
    for aux in md.partial_execution_metadata.auxiliary_metadata:
        state = Progress()
        if aux.Unpack(state):
            progress = state.execution_state
    return md.stage, progress


# ---- registration ---------------------------------------------------------------------------


@pytest.mark.slow
def test_registers_at_once_and_again_every_interval(tmp_path, make_double):
    async def main():
        async with make_double(register_interval_s=0.2, pool="") as double:
            config = _config(tmp_path)
            async with executor(double, Handler(), config) as (source, _, _):
                await double.until(lambda: len(double.executors) == 1, what="registration")
                seen = double.executor()
                await double.until(lambda: len(seen.registrations) >= 6, timeout=5,
                                   what="six registrations")
            node = seen.node
            assert node.executor_id == source.executor_id
            assert node.os_family == "linux" and node.arch == machine_arch()
            assert node.pool == ""  # pool_name "default" is BuildBuddy's default pool
            assert node.version == __version__
            assert list(node.supported_isolation_types) == ["none"]
            assert node.assignable_milli_cpu == config.slot_milli_cpu(0) == 4000
            assert node.assignable_memory_bytes == config.slot_memory_bytes(0)
            host_file = Path(config.data_dir) / buildbuddy.HOST_ID_FILE
            assert node.executor_host_id == host_file.read_text().strip()
            gaps = [b - a for a, b in zip(seen.registrations, seen.registrations[1:],
                                          strict=False)]
            assert max(gaps) < 0.4, gaps
            # Another process (or slot) on this machine: a new executor id, the same host.
            channel = grpc.aio.insecure_channel(double.address)
            again = BuildBuddySource(channel, target=double.target, config=config, slot=0,
                                     name="x")
            await channel.close()
            assert again.executor_id != source.executor_id
            assert again._node.executor_host_id == node.executor_host_id
    asyncio.run(main())


def test_pool_is_lower_cased(tmp_path, make_double):
    async def main():
        async with make_double(pool="gpu-pool") as double:
            config = _config(tmp_path, pool_name="GPU-Pool")
            async with executor(double, Handler(), config):
                await double.until(lambda: len(double.executors) == 1, what="registration")
            assert double.executor().node.pool == "gpu-pool"
    asyncio.run(main())


# ---- leasing, order and concurrency ---------------------------------------------------------


def test_leases_in_priority_order(tmp_path, make_double):
    async def main():
        async with make_double() as double:
            gate = asyncio.Event()
            handler = Handler(gate=gate)
            async with executor(double, handler, _config(tmp_path), capacity=1):
                blocker = double.enqueue(_echo("blocker"))
                await double.until(lambda: len(handler.tasks) == 1, what="first lease")
                ids = {p: double.enqueue(_echo(str(p)), priority=p) for p in (5, -1, 3, 0)}
                seen = double.executor()
                await double.until(lambda: set(ids.values()) <= set(seen.acked),
                                   what="reservations acked")
                gate.set()
                for task_id in ids.values():
                    assert (await double.result(task_id)).status.code == code_pb2.OK
            order = [task_id for task_id, _ in double.lease_order]
            assert order == [blocker, ids[-1], ids[0], ids[3], ids[5]]
    asyncio.run(main())


class CountingSource(BuildBuddySource):
    """Records each claim: (free slots offered, tasks returned)."""

    claims: list[tuple[int, int]]

    async def claim(self, free: int) -> list[ActionTask]:
        tasks = await super().claim(free)
        self.claims = getattr(self, "claims", [])
        self.claims.append((free, len(tasks)))
        return tasks


def test_never_leases_more_than_the_free_slots(tmp_path, make_double):
    # The loop may hold up to twice its capacity in leases (finished actions whose outcome
    # is not sent yet, or whose outputs are going up), never more commands than capacity.
    async def main():
        async with make_double(max_leases_per_executor=4) as double:
            handler = Handler(hold_s=0.15, upload=False)
            # Queued before the executor registers: its first claim finds them all there.
            ids = [double.enqueue(_echo(str(i))) for i in range(7)]
            async with executor(double, handler, _config(tmp_path), capacity=2,
                                source_cls=CountingSource) as (source, _, _):
                for task_id in ids:
                    assert (await double.result(task_id)).status.code == code_pb2.OK
            assert handler.peak == 2
            assert all(got <= free for free, got in source.claims), source.claims
            assert max(got for _, got in source.claims) == 2
            assert len(double.lease_order) == 7  # each leased once
    asyncio.run(main())


def test_reservations_duplicates_delay_cancellation_and_trimming(tmp_path, make_double,
                                                                  monkeypatch):
    monkeypatch.setattr(buildbuddy, "QUEUE_TRIM_S", 0.2)

    async def main():
        async with make_double() as double:
            gate = asyncio.Event()
            handler = Handler(gate=gate)
            async with executor(double, handler, _config(tmp_path), capacity=1):
                await double.until(lambda: len(double.executors) == 1, what="registration")
                seen = double.executor()
                busy = double.enqueue(_echo("busy"))
                await double.until(lambda: len(handler.tasks) == 1, what="first lease")
                cancelled = double.enqueue(_echo("run elsewhere, cancelled"))
                trimmed = double.enqueue(_echo("run elsewhere, not cancelled"), priority=-1)
                twice = double.enqueue(_echo("reserved twice"), priority=1)
                await double.until(lambda: {cancelled, trimmed, twice} <= set(seen.acked),
                                   what="acks")
                double.resend(twice)
                await double.until(lambda: seen.acked.count(twice) == 2, what="second ack")
                double.complete_elsewhere(cancelled)
                double.complete_elsewhere(trimmed, cancel=False)  # found by TaskExists
                await double.until(lambda: trimmed in double.task_exists_calls,
                                   what="TaskExists on the queue's head")
                gate.set()
                assert (await double.result(busy)).status.code == code_pb2.OK
                assert (await double.result(twice)).status.code == code_pb2.OK
                start = asyncio.get_running_loop().time()
                delayed = double.enqueue(_echo("delayed"), delay_s=0.6)
                await double.until(lambda: double.tasks[delayed].attempts == 1,
                                   what="the delayed lease")
                waited = asyncio.get_running_loop().time() - start
                assert (await double.result(delayed)).status.code == code_pb2.OK
            assert waited >= 0.6, waited
            assert [t for t, _ in double.lease_order] == [busy, twice, delayed]
            # Dropped from the local queue, not merely refused a lease.
            assert cancelled not in double.lease_requests
            assert trimmed not in double.lease_requests
    asyncio.run(main())


@pytest.mark.slow
def test_keeps_a_lease_alive_past_its_duration(tmp_path, make_double):
    async def main():
        async with make_double(lease_duration_s=1) as double:
            handler = Handler(hold_s=3.2)
            async with executor(double, handler, _config(tmp_path)):
                task_id = double.enqueue(_echo())
                response = await double.result(task_id, timeout=15)
            assert response.status.code == code_pb2.OK
            gaps = double.tasks[task_id].keepalives
            assert len(gaps) >= 5, gaps
            assert max(gaps) < 1.0, gaps
    asyncio.run(main())


# ---- results --------------------------------------------------------------------------------


def test_finalizes_after_publishing_every_stage(tmp_path, make_double):
    async def main():
        async with make_double() as double:
            result = re_pb2.ActionResult(exit_code=3, stdout_raw=b"")
            handler = Handler(outcome=lambda task, attempt: ActionOutcome(result=result))
            channel = grpc.aio.insecure_channel(double.address)
            cas = re_grpc.ContentAddressableStorageStub(channel)
            input_digest = digest_of(b"an input")

            async def cas_call(task: ActionTask) -> None:  # as the pipeline's fetch would
                await cas.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(
                    instance_name=task.instance_name, blob_digests=[input_digest]),
                    metadata=task.cache_metadata, timeout=5)

            handler.cas_call = cas_call
            cmd = _echo("finalize")
            async with executor(double, handler, _config(tmp_path)):
                task_id = double.enqueue(cmd, {"in.txt": b"an input"}, instance_name="main")
                response = await double.result(task_id)
            await channel.close()
            task = double.tasks[task_id]
            assert response.status.code == code_pb2.OK
            assert response.result.exit_code == 3
            assert task.state == "done" and task.attempts == 1 and not task.re_enqueue_reasons
            stages = [_op_stage(op) for op in task.operations]
            executing = re_pb2.ExecutionStage.EXECUTING
            assert stages == [(executing, Progress.DOWNLOADING_INPUTS),
                              (executing, Progress.EXECUTING_COMMAND),
                              (executing, Progress.UPLOADING_OUTPUTS),
                              (re_pb2.ExecutionStage.COMPLETED, 0)]
            assert all(op.name == task_id for op in task.operations)
            assert task.operations[-1].done
            # What the pipeline was handed: everything from the ExecutionTask, no fetch.
            (got,) = handler.tasks
            execution = task.execution
            assert got.id == task_id
            assert got.command == cmd and got.action == execution.action
            assert got.instance_name == "main" and got.digest_function == "sha256"
            d = execution.execute_request.action_digest
            assert got.action_digest == f"{d.hash}/{d.size_bytes}"
            assert got.cache_metadata[0] == (JWT_HEADER, task.jwt)
            header, value = got.cache_metadata[1]  # RequestMetadata, naming this host
            assert header == "build.bazel.remote.execution.v2.requestmetadata-bin"
            sent = re_pb2.RequestMetadata.FromString(value)
            assert sent.executor_details.executor_host_id == \
                double.executor().node.executor_host_id
            assert sent.tool_invocation_id == execution.invocation_id
            assert double.cas_calls[-1] == (
                "/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs",
                task.jwt)
    asyncio.run(main())


def test_a_retry_is_re_enqueued_with_its_reason(tmp_path, make_double):
    def outcome(task: ActionTask, attempt: int) -> ActionOutcome:
        if attempt == 1:
            return ActionOutcome(status=status_pb2.Status(code=code_pb2.UNAVAILABLE,
                                                          message="the disk fell off"),
                                 retry=True)
        if attempt == 2:
            return ActionOutcome(retry=True)  # no reason given: the adapter supplies one
        return ActionOutcome()

    async def main():
        async with make_double() as double:
            handler = Handler(outcome=outcome)
            async with executor(double, handler, _config(tmp_path)):
                task_id = double.enqueue(_echo())
                response = await double.result(task_id)
            task = double.tasks[task_id]
            assert response.status.code == code_pb2.OK
            assert task.attempts == 3
            first, second = task.re_enqueue_reasons
            assert (first.code, first.message) == (code_pb2.UNAVAILABLE, "the disk fell off")
            assert second.code == code_pb2.UNAVAILABLE and second.message
            # Retried attempts publish no result: only the last operation is done.
            assert [op.done for op in task.operations].count(True) == 1
    asyncio.run(main())


# ---- drain and reconnect --------------------------------------------------------------------


@pytest.mark.slow
def test_drain_names_queued_work_and_hands_running_work_back(tmp_path, make_double):
    async def main():
        async with make_double() as double:
            handler = Handler(gate=asyncio.Event())  # never opens: it must be handed back
            async with executor(double, handler, _config(tmp_path), capacity=1,
                                drain_grace_s=0.5) as (_, stop, job):
                await double.until(lambda: len(double.executors) == 1, what="registration")
                ids = [double.enqueue(_echo(str(i))) for i in range(3)]
                seen = double.executor()
                await double.until(lambda: len(handler.tasks) == 1 and
                                   set(ids) <= set(seen.acked), what="one running, all queued")
                running = handler.tasks[0].id
                stop.set()
                await asyncio.wait_for(job, 10)
            assert seen.shutdown_requests == [sorted(set(ids) - {running}, key=ids.index)]
            task = double.tasks[running]
            (reason,) = task.re_enqueue_reasons
            assert reason.code == code_pb2.UNAVAILABLE and "shutting down" in reason.message
            assert all(double.tasks[t].state == "queued" for t in ids)
            assert not [op for op in task.operations if op.done]
    asyncio.run(main())


def test_reconnects_after_a_scheduler_restart(tmp_path, make_double):
    async def main():
        async with make_double(lease_duration_s=2, register_interval_s=1.0) as double:
            gate = asyncio.Event()
            handler = Handler(gate=gate)
            async with executor(double, handler, _config(tmp_path)) as (source, _, _):
                first = double.enqueue(_echo("across the restart"))
                await double.until(lambda: len(handler.tasks) == 1, what="lease")
                await double.restart()
                seen = double.executor()
                await double.until(lambda: seen.streams == 2, timeout=15,
                                   what="a second registration stream")
                gate.set()
                assert (await double.result(first, timeout=20)).status.code == code_pb2.OK
                second = double.enqueue(_echo("after the restart"))
                assert (await double.result(second, timeout=20)).status.code == code_pb2.OK
            assert seen.executor_id == source.executor_id
            # The lease was taken up again on a new stream (its id as the reconnect token),
            # so the action that ran across the restart was not run twice.
            assert double.tasks[first].attempts == 1
            assert double.tasks[second].leased_by == [source.executor_id]
    asyncio.run(main())


@pytest.mark.parametrize("app_writes", [False, True], ids=["app-before-8009", "newer-app"])
def test_successful_results_go_into_the_action_cache_failed_ones_never(
        tmp_path, make_double, app_writes):
    """executor_writes_action_cache (the default): a result with status OK, exit 0 and no
    do_not_cache is written under the action digest with the task's JWT, as upstream's
    executor did before the app took it over (PR #8009); against a newer app that writes
    it too, the same result lands twice. Failed and do_not_cache results never."""
    def outcome(task: ActionTask, attempt: int) -> ActionOutcome:
        word = task.command.arguments[-1] if task.command is not None else ""
        return ActionOutcome(result=re_pb2.ActionResult(exit_code=1 if word == "fails" else 0))

    async def main():
        async with make_double(app_writes_action_cache=app_writes) as double:
            async with executor(double, Handler(outcome=outcome), _config(tmp_path),
                                writes_action_cache=True):
                ok = double.enqueue(_echo("works"), instance_name="main")
                fails = double.enqueue(_echo("fails"), instance_name="main")
                private = double.enqueue(_echo("private"), instance_name="main",
                                         do_not_cache=True)
                for task in (ok, fails, private):
                    await double.result(task)
            execution = double.tasks[ok].execution
            d = execution.execute_request.action_digest
            assert list(double.executor_ac_writes) == [("main", f"{d.hash}/{d.size_bytes}")]
            ac_calls = [jwt for method, jwt in double.cas_calls if "ActionCache" in method]
            assert ac_calls == [execution.jwt]
    asyncio.run(main())


def test_the_result_names_the_host_and_carries_buildbuddys_own_fields(tmp_path, make_double):
    """As upstream's executor fills ExecutedActionMetadata: worker is the executor host id
    (the app routes affinity on it), executor_id (1000), io_stats (1001), usage_stats
    (1002), estimated_task_size (1003, the reservation's), do_not_cache (1004)."""
    usage = Usage(cpu_nanos=1_500_000_000, peak_memory_bytes=64 << 20, blobs_fetched=3,
                  local_cache_hits=7, fetch_seconds=0.25, bytes_uploaded=4096,
                  upload_seconds=0.5)

    async def main():
        async with make_double() as double:
            handler = Handler(outcome=lambda task, attempt: ActionOutcome(usage=usage))
            async with executor(double, handler, _config(tmp_path)) as (source, _, _):
                task = double.enqueue(_echo("measured"), task_size=(2500, 3 << 30))
                response = await double.result(task)
            metadata = response.result.execution_metadata
            assert metadata.worker == double.executor().node.executor_host_id
            assert metadata.executor_id == source.executor_id
            assert (metadata.usage_stats.cpu_nanos,
                    metadata.usage_stats.peak_memory_bytes) == (1_500_000_000, 64 << 20)
            io = metadata.io_stats
            assert (io.file_download_count, io.local_cache_hits, io.file_download_duration_usec,
                    io.file_upload_size_bytes, io.file_upload_duration_usec) == \
                (3, 7, 250_000, 4096, 500_000)
            assert (metadata.estimated_task_size.estimated_milli_cpu,
                    metadata.estimated_task_size.estimated_memory_bytes) == (2500, 3 << 30)
            assert not metadata.do_not_cache
    asyncio.run(main())


def test_platform_overrides_are_laid_over_the_platform(tmp_path, make_double):
    """ExecutionTask.platform_overrides (the build's x-buildbuddy-platform.* headers) win
    over the Command's properties of the same name, compared without case, as upstream's
    platform.ParseProperties merges them."""
    async def main():
        async with make_double() as double:
            handler = Handler()
            async with executor(double, handler, _config(tmp_path)):
                cmd = _echo("overridden")
                for name, value in (("OSFamily", "linux"), ("container-image", "docker://a")):
                    cmd.platform.properties.add(name=name, value=value)
                task = double.enqueue(cmd, platform_overrides={
                    "Container-Image": "docker://b", "EstimatedCPU": " 2 "})
                await double.result(task)
            [seen] = handler.tasks
            assert [(p.name, p.value) for p in seen.action.platform.properties] == [
                ("Container-Image", "docker://b"), ("EstimatedCPU", "2"), ("OSFamily", "linux")]
    asyncio.run(main())


def test_tasks_are_admitted_while_their_size_fits_what_is_free(tmp_path, make_double):
    """As upstream's priority task scheduler (canFitTask): the queue's head is leased only
    while its milli-CPU and memory fit what the tasks running here leave of milli_cpu and
    memory_bytes, whatever the free slots; the measured size wins over the estimate; a task
    larger than the node is capped at it, and so runs alone (getMostAccurateTaskSize)."""
    async def main():
        async with make_double() as double:
            handler = Handler(hold_s=0.3)
            config = _config(tmp_path, milli_cpu=4000, memory_bytes=8 << 30)
            async with executor(double, handler, config, capacity=4):
                big = [double.enqueue(_echo(f"big {i}"), task_size=(3000, 1 << 30))
                       for i in range(2)]
                for task in big:
                    await double.result(task)
                assert handler.peak == 1  # 3000 + 3000 mCPU do not fit in 4000
                handler.peak = 0
                # Estimated large, measured small: admitted by the measurement, together.
                small = [double.enqueue(_echo(f"small {i}"), task_size=(3000, 1 << 30),
                                        measured_size=(1000, 1 << 30)) for i in range(3)]
                for task in small:
                    await double.result(task)
                assert handler.peak == 3
                handler.peak = 0
                huge = double.enqueue(_echo("huge"), task_size=(16000, 64 << 30))
                other = double.enqueue(_echo("other"), task_size=(500, 1 << 30))
                for task in (huge, other):
                    assert (await double.result(task)).status.code == code_pb2.OK
                assert handler.peak == 1  # capped at the node: it fits, alone
    asyncio.run(main())


def test_a_cancelled_reservation_never_stops_a_task_running_here(tmp_path, make_double):
    """CancelTaskReservation takes back a queued reservation only (upstream's executor:
    priority_task_scheduler.go); a running task is cancelled through its lease."""
    async def main():
        async with make_double() as double:
            gate = asyncio.Event()
            handler = Handler(gate=gate)
            async with executor(double, handler, _config(tmp_path)):
                running = double.enqueue(_echo("keeps running"))
                await double.until(lambda: len(handler.tasks) == 1, what="lease")
                double.cancel_reservation(running)
                await asyncio.sleep(0.5)
                gate.set()
                response = await double.result(running)
            assert response.status.code == code_pb2.OK
            assert double.tasks[running].attempts == 1
    asyncio.run(main())


def test_a_task_given_back_five_times_fails_as_upstream_ends_it(tmp_path, make_double):
    """scheduler_server.go reEnqueueTask: the fifth attempt given back ends the task
    (INTERNAL, with the last reason), as the double plays it."""
    async def main():
        async with make_double() as double:
            handler = Handler(outcome=lambda task, attempt: ActionOutcome(
                status=status_pb2.Status(code=code_pb2.UNAVAILABLE,
                                         message=f"flaky {attempt}"), retry=True))
            async with executor(double, handler, _config(tmp_path)):
                task = double.enqueue(_echo("never lands"))
                response = await double.result(task, timeout=30)
            assert response.status.code == code_pb2.INTERNAL
            assert "already attempted 5 times" in response.status.message
            assert "flaky" in response.status.message
            assert double.tasks[task].attempts == 5
    asyncio.run(main())


# ---- the API key ----------------------------------------------------------------------------


def test_api_key_on_every_scheduler_call_only_and_never_logged(tmp_path, make_double,
                                                               caplog):
    """The double refuses scheduler calls without the key and flags a task's own calls
    (publish, CAS) that carry it, or that lack RequestMetadata naming the host."""
    caplog.set_level(logging.DEBUG)

    async def main():
        async with make_double(api_key=API_KEY) as double:
            async with executor(double, Handler(), _config(tmp_path, api_key=API_KEY),
                                api_key=API_KEY):
                task_id = double.enqueue(_echo())
                assert (await double.result(task_id)).status.code == code_pb2.OK
            # Without the key the scheduler refuses, and the double records it.
            channel = grpc.aio.insecure_channel(double.address)
            call = sched_grpc.SchedulerStub(channel).RegisterAndStreamWork()
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call.read()
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            await channel.close()
            assert double.take_violations("api key")
    asyncio.run(main())
    logged = [r for r in caplog.records if API_KEY in r.getMessage() or
              API_KEY in repr(r.args) or API_KEY in str(getattr(r, "fields", ""))]
    assert not logged, [r.getMessage() for r in logged]
    assert any(r.name == buildbuddy.__name__ for r in caplog.records)


# ---- the double itself ----------------------------------------------------------------------


@pytest.mark.slow
def test_the_double_catches_broken_rules(tmp_path, make_double):
    """Each rule broken on purpose over raw stubs: the double must record it."""

    async def main():
        async with make_double(lease_duration_s=1) as double:
            channel = grpc.aio.insecure_channel(double.address)
            sched = sched_grpc.SchedulerStub(channel)
            publish = re_grpc.ExecutionStub(channel).PublishOperation
            cas = re_grpc.ContentAddressableStorageStub(channel)

            # A registration without the node's fields.
            work = sched.RegisterAndStreamWork()
            await work.write(sched_pb2.RegisterAndStreamWorkRequest(
                register_executor_request=sched_pb2.RegisterExecutorRequest(
                    node=sched_pb2.ExecutionNode(executor_id="bare"))))
            await double.until(lambda: "bare" in double.executors)
            assert double.take_violations("registration: node 'bare'")

            # A lease of a task never reserved to the executor.
            stranger = double.enqueue(_echo())
            double.tasks[stranger].ever_reserved_to.discard("bare")
            lease = sched.LeaseTask()
            await lease.write(sched_pb2.LeaseTaskRequest(task_id=stranger, executor_id="bare"))
            with pytest.raises(grpc.aio.AioRpcError):
                await lease.read()
            assert double.take_violations("never reserved")

            async def leased() -> tuple[str, grpc.aio.StreamStreamCall]:
                task_id = double.enqueue(_echo())
                call = sched.LeaseTask()
                await call.write(sched_pb2.LeaseTaskRequest(task_id=task_id,
                                                            executor_id="bare"))
                assert (await call.read()).serialized_task
                return task_id, call

            def op(task_id: str, stage: int, done: bool = False, progress: int = 0,
                   name: str = "") -> operations_pb2.Operation:
                md = re_pb2.ExecuteOperationMetadata(
                    stage=stage,
                    action_digest=double.tasks[task_id].execution.execute_request.action_digest)
                if progress:
                    md.partial_execution_metadata.auxiliary_metadata.add().Pack(
                        Progress(execution_state=progress))
                message = operations_pb2.Operation(name=name or task_id, done=done)
                message.metadata.Pack(md)
                return message

            async def publish_all(task_id: str, *ops, jwt: bool = True) -> None:
                md = ((JWT_HEADER, double.tasks[task_id].jwt),) if jwt else ()
                call = publish(metadata=md)
                for message in ops:
                    await call.write(message)
                await call.done_writing()
                await call

            # Finalize without a COMPLETED operation.
            task_id, call = await leased()
            await call.write(sched_pb2.LeaseTaskRequest(task_id=task_id, executor_id="bare",
                                                        finalize=True))
            await call.read()
            assert double.take_violations("without a COMPLETED")

            # re_enqueue without a reason.
            task_id, call = await leased()
            await call.write(sched_pb2.LeaseTaskRequest(task_id=task_id, executor_id="bare",
                                                        re_enqueue=True))
            await call.read()
            assert double.take_violations("without a reason")

            # Publishing under a wrong name, without the JWT, stages going back, COMPLETED
            # without done; then a lease left to lapse while its stream is open.
            task_id, call = await leased()
            await publish_all(task_id, op(task_id, re_pb2.ExecutionStage.EXECUTING,
                                          progress=Progress.EXECUTING_COMMAND,
                                          name="not-a-task"))
            assert double.take_violations("names no leased task")
            await publish_all(task_id, op(task_id, re_pb2.ExecutionStage.EXECUTING,
                                          progress=Progress.EXECUTING_COMMAND),
                              op(task_id, re_pb2.ExecutionStage.EXECUTING,
                                 progress=Progress.DOWNLOADING_INPUTS),
                              op(task_id, re_pb2.ExecutionStage.COMPLETED), jwt=False)
            assert double.take_violations("carried JWT")
            assert double.take_violations("stage went back")
            assert double.take_violations("done=False at stage COMPLETED")
            assert double.take_violations("COMPLETED without an ExecuteResponse")
            await asyncio.sleep(1.3)
            assert double.take_violations("not renewed")
            call.cancel()

            # More open leases than the executor may hold.
            await double.until(lambda: not double.executors["bare"].open_leases)
            double.max_leases_per_executor = 1
            held = [(await leased())[1] for _ in range(2)]
            assert double.take_violations("more than 1")
            for each in held:
                each.cancel()

            # A CAS call without the task's JWT, and with the API key.
            await cas.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(), timeout=5,
                                       metadata=((API_KEY_HEADER, "some-key"),))
            assert double.take_violations("without x-buildbuddy-jwt")
            assert double.take_violations("carried the executor's x-buildbuddy-api-key")
            # This hand-written executor sends no RequestMetadata on its task calls at all.
            assert double.take_violations("without RequestMetadata")

            # Silence on the work stream.
            double.register_interval_s = 0.1
            await asyncio.sleep(0.4)
            assert double.take_violations("silent for")
            work.cancel()
            lease.cancel()
            await channel.close()
    asyncio.run(main())


# ---- end to end: a real `stoker executor` ---------------------------------------------------


def executor_process(base: Path, double: BuildBuddySchedulerDouble, *,
                     concurrency: int) -> ExecutorProcess:
    """`python -m engine executor` (protocol: buildbuddy) joined to the double, its log in a
    file; the key is the file's (an EXECUTOR_API_KEY of the caller's would win over it)."""
    return ExecutorProcess(base / "data", base / "executor.log", server=double.target,
                           protocol="buildbuddy", concurrency=concurrency,
                           yaml_extra=f"api_key: {API_KEY}\ndrain_grace: 10s\n",
                           env={"EXECUTOR_API_KEY": ""})


@pytest.fixture
def e2e_base() -> Path:
    # Not under pytest's 0700 basetemp: actions run as other uids when Stoker is root.
    base = Path(tempfile.mkdtemp(prefix="stoker-bb-", dir="/tmp"))
    base.chmod(0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.mark.slow  # starts stoker executor
def test_a_real_executor_runs_actions_through_the_double(e2e_base, make_double):
    pytest.importorskip("engine.cas.remote_cas",
                        reason="engine/cas/remote_cas.py (RemoteCasClient) has not landed")
    capacity = 2

    async def main():
        async with make_double(api_key=API_KEY, max_leases_per_executor=2 * capacity) \
                as double:
            process = executor_process(e2e_base, double, concurrency=capacity)
            try:
                # Off the event loop, which serves the double: start() waits for /readyz.
                await asyncio.to_thread(process.start, 60)
                await double.until(lambda: len(double.executors) == 1 or not process.alive(),
                                   timeout=60, what="the executor's registration")
                assert process.alive(), process.log_tail()
                produce = double.enqueue(command(
                    ["/bin/sh", "-c", "mkdir -p out && cat in.txt > out/copy.txt && "
                     "printf made > out/made.txt && echo to-stdout && echo to-stderr >&2"],
                    output_paths=["out/copy.txt", "out/made.txt"]),
                    {"in.txt": b"input bytes\n"})
                fail = double.enqueue(command(["/bin/sh", "-c", "echo failing >&2; exit 3"]))
                produced = await double.result(produce, timeout=60)
                failed = await double.result(fail, timeout=60)
            finally:
                code = await asyncio.to_thread(process.stop, 30)
                print(process.log_tail())  # shown by pytest when the test fails
            log = process.log_tail()
            assert code == 0, log
            assert produced.status.code == code_pb2.OK, (produced.status, log)
            result = produced.result
            assert result.exit_code == 0
            outputs = {f.path: f.digest for f in result.output_files}
            assert set(outputs) == {"out/copy.txt", "out/made.txt"}, (result, log)
            for path, expected in (("out/copy.txt", b"input bytes\n"),
                                   ("out/made.txt", b"made")):
                assert outputs[path] == digest_of(expected)
                assert double.read_blob(outputs[path]) == expected
            assert double.read_blob(result.stdout_digest) == b"to-stdout\n"
            assert double.read_blob(result.stderr_digest) == b"to-stderr\n"
            assert failed.status.code == code_pb2.OK and failed.result.exit_code == 3
            assert double.read_blob(failed.result.stderr_digest) == b"failing\n"
            assert all(jwt for _, jwt in double.cas_calls if "Capabilities" not in _)
            assert not double.executor().open_leases
    asyncio.run(main())


@pytest.mark.slow  # starts stoker executor
@pytest.mark.skipif(os.geteuid() != 0, reason="Stoker as root: slot uids")
def test_a_joined_executor_gives_no_root_process_the_commands_environment(e2e_base, make_double):
    """In joined mode anyone who may submit builds to the pool chooses the Command's
    environment: LD_PRELOAD and its kin must reach no root process of the executor."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build the attack library")
    shared = Path(tempfile.mkdtemp(prefix="stoker-evil-", dir="/run"))
    shared.chmod(0o1777)
    libs, log = build_evil_libs(shared)
    variables = ("LD_PRELOAD", "LD_LIBRARY_PATH", "LD_AUDIT", "GCONV_PATH")

    async def main():
        async with make_double(api_key=API_KEY, max_leases_per_executor=2) as double:
            process = executor_process(e2e_base, double, concurrency=1)
            try:
                await asyncio.to_thread(process.start, 60)
                tasks = [double.enqueue(command(
                    ["/bin/sh", "-c", EVIL_SCRIPT],
                    env={"PATH": "/usr/bin:/bin", variable: evil_value(libs, variable)}))
                    for variable in variables]
                return [await double.result(t, timeout=60) for t in tasks], double
            finally:
                await asyncio.to_thread(process.stop, 30)
                print(process.log_tail())

    try:
        results, double = asyncio.run(main())
        loaded = 0
        for variable, r in zip(variables, results, strict=True):
            assert r.status.code == code_pb2.OK, (variable, r.status)
            assert int(double.read_blob(r.result.stdout_digest).split()[-1]) >= 60000
            stderr = double.read_blob(r.result.stderr_digest).decode()
            assert root_loads(log, stderr) == [], variable
            loaded += len(evil_loads(log, stderr))
        assert loaded  # the attack library did load: in the action's own processes
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def test_the_tenant_is_the_group_of_the_tasks_jwt():
    """Kept containers are keyed by it (BuildBuddy's runner pool keys by the group): read
    from the JWT's claims, unverified (it only keys, never grants)."""
    import base64
    import json

    def jwt(claims: dict) -> str:
        body = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
        return f"e30.{body}.sig"

    assert buildbuddy._tenant_of(jwt({"group_id": "GR123", "user_id": "US1"})) == "group:GR123"
    assert buildbuddy._tenant_of(jwt({"group_id": "GR123", "user_id": "US2"})) == "group:GR123"
    opaque = buildbuddy._tenant_of("not-a-jwt")
    assert opaque.startswith("jwt:") and opaque != buildbuddy._tenant_of("another")
    assert buildbuddy._tenant_of("") == ""
