"""A test DOUBLE of BuildBuddy's scheduler, written from the public protocol (proto/scheduler.proto,
the BuildBuddy part of proto/remote_execution.proto, and what BuildBuddy's own executor does:
/work/shared/reference/buildbuddy.md section 1). It is not BuildBuddy: no BuildBuddy server can
run here, so this plays its executor-facing side on 127.0.0.1, inside the test's event loop:

    scheduler.Scheduler   RegisterAndStreamWork, LeaseTask, ReEnqueueTask, TaskExists
    Execution             PublishOperation only
    CAS                   Stoker's own ContentAddressableStorage, ByteStream and Capabilities
                          servicers over a LocalDiskStore in the double's directory

Tests enqueue tasks (Command + inputs, uploaded to its CAS, wrapped in an ExecutionTask with a
JWT), await their ExecuteResponse, and inspect what the double saw. It never lets a broken
rule pass silently: each one it sees is appended to `violations` (RULES lists them all), and
the test fixture fails the test at teardown unless the list is empty.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import grpc
from google.protobuf import duration_pb2
from google.rpc import code_pb2, status_pb2

from engine import digest as dg
from engine.cas.local_disk import LocalDiskStore
from engine.proto import bs_grpc, operations_pb2, re_grpc, re_pb2, sched_grpc, sched_pb2
from engine.server.bytestream_service import ByteStreamService
from engine.server.capabilities_service import CapabilitiesService
from engine.server.cas_service import CasService
from tests.doubles.scheduler import SchedulerDouble
from tests.integration.support import TreeSpec, build_tree

API_KEY_HEADER = "x-buildbuddy-api-key"
JWT_HEADER = "x-buildbuddy-jwt"
MAX_ATTEMPTS = 5  # BuildBuddy's maxTaskAttemptCount
OS_FAMILIES = ("linux", "darwin", "windows")
ARCHES = ("amd64", "arm64")
_CAS_METHODS = ("/build.bazel.remote.execution.v2.ContentAddressableStorage/",
                "/google.bytestream.ByteStream/",
                "/build.bazel.remote.execution.v2.ActionCache/")
_SCHEDULER = "/scheduler.Scheduler/"
_PUBLISH = "/build.bazel.remote.execution.v2.Execution/PublishOperation"
REQUEST_METADATA_HEADER = "build.bazel.remote.execution.v2.requestmetadata-bin"
_WATCH_EVERY_S = 0.05
_Stage = re_pb2.ExecutionStage
_Progress = re_pb2.ExecutionProgress

# Every rule the double enforces, as the report lists them.
RULES = (
    "registration: the first message on a work stream registers the executor",
    "registration: one field set per RegisterAndStreamWorkRequest",
    "registration: the node has executor_id, executor_host_id, version, os_family "
    "(linux/darwin/windows), arch (amd64/arm64), a lower-case pool equal to the expected "
    "one, assignable_milli_cpu > 0, assignable_memory_bytes > 0, supported isolation types",
    "registration: executor_id does not change on a stream",
    "registration: re-sent within 2x the interval while the stream is open",
    "registration: none after ShuttingDownRequest",
    "api key: present (exactly once) and correct on every scheduler call when required",
    "reservations: acks name a task reserved to that executor",
    "shutdown: ShuttingDownRequest names only tasks reserved to that executor",
    "lease: LeaseTask names a registered executor and a task reserved to it",
    "lease: no more open leases per executor than it may run",
    "lease: renewed within lease_duration_seconds while the stream is open",
    "lease: finalize and re_enqueue are not both set",
    "lease: finalize only after a COMPLETED operation was published for the attempt, and "
    "after the publish stream closed",
    "lease: re_enqueue carries a reason (a non-OK code and a message)",
    "publish: carries the task's JWT; names a task leased now; one name per stream",
    "publish: metadata is ExecuteOperationMetadata with the task's action digest",
    "publish: stages never go back (EXECUTING progress states neither); nothing new after "
    "COMPLETED; EXECUTING carries an ExecutionProgress",
    "publish: COMPLETED has done=True and an ExecuteResponse; done only with COMPLETED; "
    "Operation.error never set",
    "cas: every CAS/ByteStream/ActionCache call carries the JWT of a task the double "
    "handed out",
    "credentials: a task's own calls (PublishOperation, CAS, ByteStream, ActionCache) "
    "never carry the executor's API key, and carry RequestMetadata with "
    "executor_details.executor_host_id (upstream's executor: runTask, "
    "propagateExecutionTaskValuesToContext)",
    "ac: the executor never writes a failed (status not OK, exit code not 0) or "
    "do_not_cache result; where the app leaves the ActionCache to executors (before "
    "buildbuddy-io/buildbuddy PR #8009, 2024-12-06), a cacheable result is in it when the "
    "task is finalized (execution_server.go cacheActionResult's conditions)",
)


@dataclass
class ExecutorSeen:
    executor_id: str
    node: sched_pb2.ExecutionNode
    registrations: list[float] = field(default_factory=list)  # monotonic times
    streams: int = 0  # work streams opened (reconnects make more)
    stream: _WorkStream | None = None
    shutting_down: bool = False
    shutdown_requests: list[list[str]] = field(default_factory=list)
    acked: list[str] = field(default_factory=list)
    open_leases: set[str] = field(default_factory=set)
    peak_leases: int = 0


@dataclass
class TaskSeen:
    task_id: str
    jwt: str
    priority: int
    execution: re_pb2.ExecutionTask
    size: sched_pb2.TaskSize
    delay_s: float = 0.0
    measured: sched_pb2.TaskSize | None = None
    state: str = "queued"  # queued, leased, done
    attempts: int = 0
    reserved_to: set[str] = field(default_factory=set)  # this attempt
    ever_reserved_to: set[str] = field(default_factory=set)
    lease_id: str = ""
    lease_executor: str = ""
    lease_stream_open: bool = False
    lease_stream: object | None = None  # the LeaseTask call holding it
    last_ping: float = 0.0
    lease_overdue: bool = False
    keepalives: list[float] = field(default_factory=list)  # gaps, this attempt
    publish_streams_open: int = 0
    last_op: operations_pb2.Operation | None = None  # this attempt
    stage: tuple[int, int] = (0, 0)  # (stage, progress) last published, this attempt
    completed: re_pb2.ExecuteResponse | None = None  # this attempt's COMPLETED
    operations: list[operations_pb2.Operation] = field(default_factory=list)  # all attempts
    re_enqueue_reasons: list[status_pb2.Status] = field(default_factory=list)
    re_enqueue_calls: list[sched_pb2.ReEnqueueTaskRequest] = field(default_factory=list)
    leased_by: list[str] = field(default_factory=list)
    response: re_pb2.ExecuteResponse | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class _WorkStream:
    outbox: asyncio.Queue
    executor: ExecutorSeen | None = None
    open: bool = True
    overdue: bool = False


class BuildBuddySchedulerDouble(SchedulerDouble):
    """See the module docstring. Use as `async with BuildBuddySchedulerDouble(dir) as bb:`."""

    def __init__(self, root: Path, *, api_key: str = "", lease_duration_s: int = 10,
                 register_interval_s: float = 5.0, max_leases_per_executor: int = 0,
                 pool: str | None = "", probes: int = 3, require_jwt: bool = True,
                 app_writes_action_cache: bool = True):
        """app_writes_action_cache: the app writes the ActionCache on COMPLETED, as
        BuildBuddy since PR #8009 (2024-12-06); False plays an older app, which left it to
        the executor."""
        super().__init__()
        self.app_writes_action_cache = app_writes_action_cache
        self.action_cache = _ActionCache(self)
        # (instance name, digest key) -> result, as the executor wrote it
        self.executor_ac_writes: dict[tuple[str, str], re_pb2.ActionResult] = {}
        self.root = Path(root)
        self.api_key = api_key
        self.lease_duration_s = lease_duration_s
        self.register_interval_s = register_interval_s
        self.max_leases_per_executor = max_leases_per_executor  # 0: unchecked
        self.pool = pool  # None: any pool
        self.probes = probes
        self.require_jwt = require_jwt
        self.port = 0
        self.executors: dict[str, ExecutorSeen] = {}
        self.tasks: dict[str, TaskSeen] = {}
        self.lease_order: list[tuple[str, str]] = []  # (task id, executor id) per lease
        self.lease_requests: list[str] = []  # task ids of every LeaseTask, granted or not
        self.cas_calls: list[tuple[str, str]] = []  # (method, jwt or "")
        self.task_exists_calls: list[str] = []
        self.store = LocalDiskStore(str(self.root / "cas"), 0)
        self._bytestream: ByteStreamService | None = None
        self._jwts: set[str] = set()

    # ---- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        server = grpc.aio.server(interceptors=[_Checks(self)], options=[
            ("grpc.max_receive_message_length", 8 << 20),
            ("grpc.max_send_message_length", 8 << 20),
            ("grpc.so_reuseport", 0)])
        sched_grpc.add_SchedulerServicer_to_server(_Scheduler(self), server)
        re_grpc.add_ExecutionServicer_to_server(_Execution(self), server)
        re_grpc.add_ContentAddressableStorageServicer_to_server(CasService(self.store), server)
        re_grpc.add_CapabilitiesServicer_to_server(CapabilitiesService(), server)
        re_grpc.add_ActionCacheServicer_to_server(self.action_cache, server)
        self._bytestream = ByteStreamService(self.store, str(self.root / "uploads"),
                                             client_max_bytes=1 << 30)
        bs_grpc.add_ByteStreamServicer_to_server(self._bytestream, server)
        await self._serve(server)

    async def stop(self) -> None:
        """Stops serving; tasks and what was seen stay (a restart keeps them, as BuildBuddy
        keeps tasks in Redis)."""
        await self._stop_serving(grace=0.5)
        for executor in self.executors.values():
            self._end_stream(executor.stream)
        for task in self.tasks.values():
            task.lease_stream_open = False
            task.publish_streams_open = 0

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    def close(self) -> None:
        self.store.close()

    # ---- the test's side ---------------------------------------------------------------

    def put_blob(self, data: bytes) -> re_pb2.Digest:
        d = dg.of_bytes(dg.SHA256, data)
        self.store.write_bytes(d, data)
        return re_pb2.Digest(hash=d.hash, size_bytes=d.size)

    def read_blob(self, d: re_pb2.Digest) -> bytes:
        return self.store.read_bytes(dg.from_proto(dg.SHA256, d))

    def has_blob(self, d: re_pb2.Digest) -> bool:
        return self.store.has(dg.from_proto(dg.SHA256, d))

    def enqueue(self, command: re_pb2.Command, inputs: TreeSpec | None = None, *,
                priority: int = 0, instance_name: str = "", jwt: str | None = None,
                timeout_s: float = 0.0, delay_s: float = 0.0,
                task_size: tuple[int, int] = (600, 400_000_000),
                do_not_cache: bool = False,
                platform_overrides: dict[str, str] | None = None,
                measured_size: tuple[int, int] | None = None) -> str:
        """A task as BuildBuddy's app would schedule it: Command, input tree and Action in
        the CAS; an ExecutionTask with both already resolved; reservations to executors."""
        tree = build_tree(inputs or {})
        for data in tree.blobs.values():
            self.put_blob(data)
        action = re_pb2.Action(command_digest=self.put_blob(command.SerializeToString()),
                               input_root_digest=tree.root, do_not_cache=do_not_cache)
        if timeout_s:
            action.timeout.FromTimedelta(timedelta(seconds=timeout_s))
        action_digest = self.put_blob(action.SerializeToString())
        prefix = f"{instance_name}/" if instance_name else ""
        task_id = (f"{prefix}uploads/{uuid.uuid4()}/blobs/{action_digest.hash}/"
                   f"{action_digest.size_bytes}")
        jwt = f"jwt-{uuid.uuid4().hex}" if jwt is None else jwt
        if jwt:
            self._jwts.add(jwt)
        execution = re_pb2.ExecutionTask(
            execute_request=re_pb2.ExecuteRequest(
                instance_name=instance_name, action_digest=action_digest,
                digest_function=re_pb2.DigestFunction.SHA256),
            jwt=jwt, invocation_id=str(uuid.uuid4()), action=action, command=command,
            execution_id=task_id)
        for name, value in (platform_overrides or {}).items():  # x-buildbuddy-platform.*
            execution.platform_overrides.properties.add(name=name, value=value)
        execution.queued_timestamp.GetCurrentTime()
        milli_cpu, memory = task_size
        self.tasks[task_id] = TaskSeen(
            task_id=task_id, jwt=jwt, priority=priority, execution=execution,
            size=sched_pb2.TaskSize(estimated_milli_cpu=milli_cpu,
                                    estimated_memory_bytes=memory),
            delay_s=delay_s,
            measured=None if measured_size is None else sched_pb2.TaskSize(
                estimated_milli_cpu=measured_size[0], estimated_memory_bytes=measured_size[1]))
        self._dispatch()
        return task_id

    def complete_elsewhere(self, task_id: str, *, cancel: bool = True) -> None:
        """As if another executor ran the task: done here, and (cancel) the reservations
        still out for it are taken back with CancelTaskReservationRequest."""
        task = self.tasks[task_id]
        if cancel:
            self._cancel_elsewhere(task, taker="")
        self._finish(task, re_pb2.ExecuteResponse(status=status_pb2.Status()))

    def cancel_reservation(self, task_id: str) -> None:
        """CancelTaskReservationRequest for the task to every executor it was reserved to,
        whatever it is doing there (a stray or late one: upstream sends it for queued
        reservations only)."""
        task = self.tasks[task_id]
        for executor_id in task.ever_reserved_to:
            executor = self.executors.get(executor_id)
            if executor is not None and executor.stream is not None and executor.stream.open:
                executor.stream.outbox.put_nowait(sched_pb2.RegisterAndStreamWorkResponse(
                    cancel_task_reservation_request=sched_pb2.CancelTaskReservationRequest(
                        task_id=task_id)))

    def resend(self, task_id: str) -> None:
        """Sends the task's reservations again (a duplicate, as after AskForMoreWork)."""
        task = self.tasks[task_id]
        for executor in self._eligible():
            if executor.executor_id in task.reserved_to:
                self._reserve(task, executor)

    async def result(self, task_id: str, timeout: float = 30.0) -> re_pb2.ExecuteResponse:
        task = self.tasks[task_id]
        try:
            await asyncio.wait_for(task.done.wait(), timeout)
        except TimeoutError:
            raise AssertionError(f"task {task_id} not done within {timeout}s (state "
                                 f"{task.state}, attempts {task.attempts}, violations "
                                 f"{self.violations})") from None
        assert task.response is not None
        return task.response

    def executor(self) -> ExecutorSeen:
        """The one executor (for tests with one)."""
        assert len(self.executors) == 1, f"{len(self.executors)} executors registered"
        return next(iter(self.executors.values()))

    # ---- scheduling --------------------------------------------------------------------

    def _eligible(self) -> list[ExecutorSeen]:
        return [e for e in self.executors.values()
                if e.stream is not None and e.stream.open and not e.shutting_down]

    def _dispatch(self, fresh: ExecutorSeen | None = None) -> None:
        """Reserves each queued task to up to `probes` executors; an executor that just
        (re)joined gets every queued task (it ignores duplicates)."""
        eligible = self._eligible()
        for task in self.tasks.values():
            if task.state != "queued":
                continue
            live = {e for e in task.reserved_to if any(x.executor_id == e for x in eligible)}
            for executor in eligible:
                if executor is not fresh and (executor.executor_id in task.reserved_to or
                                              len(live) >= self.probes):
                    continue
                self._reserve(task, executor)
                live.add(executor.executor_id)

    def _reserve(self, task: TaskSeen, executor: ExecutorSeen) -> None:
        task.reserved_to.add(executor.executor_id)
        task.ever_reserved_to.add(executor.executor_id)
        request = sched_pb2.EnqueueTaskReservationRequest(
            task_id=task.task_id, task_size=task.size, executor_id=executor.executor_id,
            jwt=task.jwt, scheduling_metadata=sched_pb2.SchedulingMetadata(
                task_size=task.size, os="linux", arch=executor.node.arch,
                pool=executor.node.pool, priority=task.priority))
        if task.measured is not None:  # what the app learned from earlier runs
            request.scheduling_metadata.measured_task_size.CopyFrom(task.measured)
        if task.delay_s:
            request.delay.CopyFrom(duration_pb2.Duration(
                seconds=int(task.delay_s), nanos=int(task.delay_s % 1 * 1e9)))
        executor.stream.outbox.put_nowait(sched_pb2.RegisterAndStreamWorkResponse(
            enqueue_task_reservation_request=request))

    def _cancel_elsewhere(self, task: TaskSeen, taker: str) -> None:
        for executor_id in task.reserved_to - {taker}:
            executor = self.executors.get(executor_id)
            if executor is not None and executor.stream is not None and executor.stream.open \
                    and executor.node.supports_proactive_cancellation:
                executor.stream.outbox.put_nowait(sched_pb2.RegisterAndStreamWorkResponse(
                    cancel_task_reservation_request=sched_pb2.CancelTaskReservationRequest(
                        task_id=task.task_id)))

    def _requeue(self, task: TaskSeen) -> None:
        self._drop_lease(task)
        if task.attempts >= MAX_ATTEMPTS:
            # scheduler_server.go reEnqueueTask: the task is deleted and marked failed.
            last = task.re_enqueue_reasons[-1].message if task.re_enqueue_reasons else ""
            self._finish(task, re_pb2.ExecuteResponse(status=status_pb2.Status(
                code=code_pb2.INTERNAL, message=f"Task {task.task_id!r} already attempted "
                f"{task.attempts} times. Last failure: {last}")))
            return
        task.state = "queued"
        task.reserved_to = set()
        self._dispatch()

    def _drop_lease(self, task: TaskSeen) -> None:
        executor = self.executors.get(task.lease_executor)
        if executor is not None:
            executor.open_leases.discard(task.task_id)
        task.lease_id = ""
        task.lease_executor = ""
        task.lease_stream_open = False
        task.lease_overdue = False
        task.completed = None
        task.last_op = None
        task.stage = (0, 0)

    def _finish(self, task: TaskSeen, response: re_pb2.ExecuteResponse) -> None:
        self._drop_lease(task)
        task.state = "done"
        task.response = response
        task.done.set()

    def _end_stream(self, stream: _WorkStream | None) -> None:
        if stream is not None and stream.open:
            stream.open = False
            stream.outbox.put_nowait(None)

    async def _watch(self) -> None:
        """Rules that are broken by silence: a registration or a renewal that never came."""
        while True:
            await asyncio.sleep(_WATCH_EVERY_S)
            now = time.monotonic()
            for executor in self.executors.values():
                stream = executor.stream
                if stream is None or not stream.open or executor.shutting_down or \
                        stream.overdue or not executor.registrations:
                    continue
                gap = now - executor.registrations[-1]
                if gap > 2 * self.register_interval_s:
                    stream.overdue = True
                    self.violate(f"registration: executor {executor.executor_id} silent for "
                                 f"{gap:.1f}s (interval {self.register_interval_s}s)")
            for task in self.tasks.values():
                if task.state != "leased":
                    continue
                gap = now - task.last_ping
                if gap <= self.lease_duration_s:
                    continue
                if task.lease_stream_open:
                    if not task.lease_overdue:
                        task.lease_overdue = True
                        self.violate(f"lease: task {task.task_id} not renewed for {gap:.1f}s "
                                     f"(lease_duration {self.lease_duration_s}s)")
                else:  # the executor went away: the lease lapses and the task runs again
                    self._requeue(task)

    # ---- checks --------------------------------------------------------------------------

    def check_api_key(self, method: str, metadata: Iterable[tuple[str, str | bytes]]) -> bool:
        keys = [v for k, v in metadata if k == API_KEY_HEADER]
        if not self.api_key:
            return True
        if not keys:
            self.violate(f"api key: {method} came without {API_KEY_HEADER}")
            return False
        if len(keys) > 1:
            self.violate(f"api key: {method} carried {API_KEY_HEADER} {len(keys)} times")
        if any(k != self.api_key for k in keys):
            self.violate(f"api key: {method} carried a wrong {API_KEY_HEADER}")
            return False
        return True

    def check_cas_jwt(self, method: str, metadata: Iterable[tuple[str, str | bytes]]) -> None:
        jwts = [v for k, v in metadata if k == JWT_HEADER]
        self.cas_calls.append((method, jwts[0] if jwts else ""))
        if not jwts:
            if self.require_jwt:
                self.violate(f"cas: {method} came without {JWT_HEADER}")
        elif jwts[0] not in self._jwts:
            self.violate(f"cas: {method} carried a {JWT_HEADER} no task was given")

    def check_action_cache(self, task: TaskSeen, response: re_pb2.ExecuteResponse) -> None:
        """At finalize: the ac rule; then, as a newer app, the app's own write."""
        request = task.execution.execute_request
        key = (request.instance_name, f"{request.action_digest.hash}/"
                                      f"{request.action_digest.size_bytes}")
        cacheable = (response.status.code == code_pb2.OK and response.result.exit_code == 0
                     and not task.execution.action.do_not_cache)
        written = self.executor_ac_writes.get(key)
        if written is not None and not cacheable:
            self.violate(f"ac: the executor wrote {task.task_id}'s result, which must not be "
                         f"cached (status {response.status.code}, exit "
                         f"{response.result.exit_code}, do_not_cache "
                         f"{task.execution.action.do_not_cache})")
        if cacheable and written is None and not self.app_writes_action_cache:
            self.violate(f"ac: {task.task_id} succeeded, but its result is not in the "
                         "ActionCache, which this app leaves to executors")
        if cacheable and self.app_writes_action_cache:
            self.action_cache.entries[key] = response.result

    def lease_reply(self, lease_id: str) -> sched_pb2.LeaseTaskResponse:
        """A server that resumes leases but says so only with reconnect_token (field 4),
        never supports_reconnect (upstream's executor takes either: TaskLease.pingServer);
        the token is the lease id, and a resumed lease may name either."""
        return sched_pb2.LeaseTaskResponse(lease_duration_seconds=self.lease_duration_s,
                                           lease_id=lease_id, reconnect_token=lease_id)

    def check_task_credentials(self, method: str,
                               metadata: Iterable[tuple[str, str | bytes]]) -> None:
        metadata = list(metadata)
        if any(k == API_KEY_HEADER for k, _ in metadata):
            self.violate(f"credentials: {method} carried the executor's {API_KEY_HEADER}")
        found = [v for k, v in metadata if k == REQUEST_METADATA_HEADER]
        request = re_pb2.RequestMetadata()
        try:
            if found:
                request.ParseFromString(bytes(found[0]))  # type: ignore[arg-type]
        except Exception:
            found = []
        if not found or not request.executor_details.executor_host_id:
            self.violate(f"credentials: {method} came without RequestMetadata naming the "
                         "executor's host (executor_details)")

    def check_node(self, node: sched_pb2.ExecutionNode) -> None:
        problems = []
        for name in ("executor_id", "executor_host_id", "version"):
            if not getattr(node, name):
                problems.append(f"no {name}")
        if node.os_family not in OS_FAMILIES:
            problems.append(f"os_family {node.os_family!r}")
        if node.arch not in ARCHES:
            problems.append(f"arch {node.arch!r}")
        if node.pool != node.pool.lower() or (self.pool is not None and node.pool != self.pool):
            problems.append(f"pool {node.pool!r} (expected {self.pool!r})")
        if node.assignable_milli_cpu <= 0 or node.assignable_memory_bytes <= 0:
            problems.append(f"assignable {node.assignable_milli_cpu} mCPU, "
                            f"{node.assignable_memory_bytes} bytes")
        if not node.supported_isolation_types:
            problems.append("no supported_isolation_types")
        if node.current_queue_length < 0 or node.active_action_count < 0:
            problems.append("negative queue length or action count")
        if problems:
            self.violate(f"registration: node {node.executor_id!r}: {'; '.join(problems)}")


class _ActionCache(re_grpc.ActionCacheServicer):
    """What the app's ActionCache keeps, by (instance name, digest); writes by the executor
    are also recorded apart (the ac rule)."""

    def __init__(self, double: BuildBuddySchedulerDouble):
        self.d = double
        self.entries: dict[tuple[str, str], re_pb2.ActionResult] = {}

    @staticmethod
    def _key(request) -> tuple[str, str]:
        d = request.action_digest
        return request.instance_name, f"{d.hash}/{d.size_bytes}"

    async def GetActionResult(self, request, context):
        found = self.entries.get(self._key(request))
        if found is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such action result")
        return found

    async def UpdateActionResult(self, request, context):
        key = self._key(request)
        self.entries[key] = request.action_result
        self.d.executor_ac_writes[key] = request.action_result
        return request.action_result


def _metadata(context) -> list[tuple[str, str | bytes]]:
    return [(m[0], m[1]) for m in (context.invocation_metadata() or ())]


class _Checks(grpc.aio.ServerInterceptor):
    """API key on scheduler calls, JWT on CAS calls; a call without a good API key is
    refused with UNAUTHENTICATED, as BuildBuddy does when it requires authorization."""

    def __init__(self, double: BuildBuddySchedulerDouble):
        self._double = double

    async def intercept_service(self, continuation, details):
        method = details.method
        metadata = [(m[0], m[1]) for m in (details.invocation_metadata or ())]
        if method.startswith(_SCHEDULER):
            if not self._double.check_api_key(method, metadata):
                return _refusal(method)
        elif method.startswith(_CAS_METHODS):
            self._double.check_cas_jwt(method, metadata)
            self._double.check_task_credentials(method, metadata)
        elif method == _PUBLISH:
            self._double.check_task_credentials(method, metadata)
        return await continuation(details)


def _refusal(method: str) -> grpc.RpcMethodHandler:
    async def refuse_unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "bad or missing API key")

    async def refuse_stream(request_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "bad or missing API key")

    if method.endswith(("/RegisterAndStreamWork", "/LeaseTask")):
        return grpc.stream_stream_rpc_method_handler(refuse_stream)
    return grpc.unary_unary_rpc_method_handler(refuse_unary)


class _Scheduler(sched_grpc.SchedulerServicer):
    def __init__(self, double: BuildBuddySchedulerDouble):
        self.d = double

    # ---- RegisterAndStreamWork -----------------------------------------------------------

    async def RegisterAndStreamWork(self, request_iterator, context):
        stream = _WorkStream(outbox=asyncio.Queue())
        reader = asyncio.create_task(self._read_work(stream, request_iterator))
        try:
            while (message := await stream.outbox.get()) is not None:
                await context.write(message)
        finally:
            reader.cancel()
            self.d._end_stream(stream)

    async def _read_work(self, stream: _WorkStream, request_iterator) -> None:
        try:
            async for request in request_iterator:
                self._on_work(stream, request)
        except (grpc.aio.AioRpcError, asyncio.CancelledError):
            pass
        finally:
            self.d._end_stream(stream)

    def _on_work(self, stream: _WorkStream, request: sched_pb2.RegisterAndStreamWorkRequest):
        d = self.d
        fields = [f.name for f, _ in request.ListFields()]
        if len(fields) != 1:
            d.violate(f"registration: a RegisterAndStreamWorkRequest with fields {fields}")
        if stream.executor is None and not request.HasField("register_executor_request"):
            d.violate(f"registration: the stream began with {fields}, not a registration")
            return
        if request.HasField("register_executor_request"):
            self._on_registration(stream, request.register_executor_request.node)
        executor = stream.executor
        if request.HasField("enqueue_task_reservation_response"):
            task_id = request.enqueue_task_reservation_response.task_id
            task = d.tasks.get(task_id)
            if task is None or executor.executor_id not in task.ever_reserved_to:
                d.violate(f"reservations: {executor.executor_id} acked {task_id!r}, never "
                          "reserved to it")
            executor.acked.append(task_id)
        if request.HasField("shutting_down_request"):
            ids = list(request.shutting_down_request.task_id)
            executor.shutdown_requests.append(ids)
            executor.shutting_down = True
            for task_id in ids:
                task = d.tasks.get(task_id)
                if task is None or executor.executor_id not in task.ever_reserved_to:
                    d.violate(f"shutdown: {executor.executor_id} named {task_id!r}, never "
                              "reserved to it")
                    continue
                task.reserved_to.discard(executor.executor_id)
            d._dispatch()  # the handed-back reservations go to whoever is left

    def _on_registration(self, stream: _WorkStream, node: sched_pb2.ExecutionNode) -> None:
        d = self.d
        d.check_node(node)
        now = time.monotonic()
        executor = stream.executor
        if executor is None:
            executor = d.executors.get(node.executor_id)
            if executor is None:
                executor = d.executors[node.executor_id] = ExecutorSeen(node.executor_id, node)
            elif executor.node.executor_host_id != node.executor_host_id:
                d.violate(f"registration: {node.executor_id} changed its host id")
            executor.streams += 1
            executor.stream = stream
            executor.shutting_down = False
            stream.executor = executor
            executor.node = node
            executor.registrations.append(now)
            d._dispatch(fresh=executor)
            return
        if node.executor_id != executor.executor_id:
            d.violate(f"registration: executor_id changed from {executor.executor_id} to "
                      f"{node.executor_id} on one stream")
        if executor.shutting_down:
            d.violate(f"registration: {executor.executor_id} registered after "
                      "ShuttingDownRequest")
        gap = now - executor.registrations[-1]
        if gap > 2 * d.register_interval_s and not stream.overdue:
            stream.overdue = True
            d.violate(f"registration: {executor.executor_id} re-registered after {gap:.1f}s "
                      f"(interval {d.register_interval_s}s)")
        executor.node = node
        executor.registrations.append(now)

    # ---- LeaseTask ---------------------------------------------------------------------

    async def LeaseTask(self, request_iterator, context):
        d = self.d
        task: TaskSeen | None = None
        lease_id = ""
        me = object()
        try:
            async for request in request_iterator:
                if task is None:
                    task, lease_id, reply = self._claim(request)
                    if task is None:
                        await context.abort(grpc.StatusCode.NOT_FOUND, reply)
                    task.lease_stream = me
                    yield reply
                    continue
                if task.lease_id != lease_id:
                    await context.abort(grpc.StatusCode.NOT_FOUND, "the lease is gone")
                self._check_renewal(task)
                if request.finalize or request.re_enqueue:
                    yield self._close(task, request)
                    return
                yield d.lease_reply(lease_id)
        finally:
            if task is not None and task.lease_id == lease_id and task.state == "leased" \
                    and task.lease_stream is me:  # not when a reconnect took it over
                task.lease_stream_open = False  # lapses unless the executor reconnects
                executor = d.executors.get(task.lease_executor)
                if executor is not None:
                    executor.open_leases.discard(task.task_id)

    def _claim(self, request: sched_pb2.LeaseTaskRequest):
        d = self.d
        d.lease_requests.append(request.task_id)
        task = d.tasks.get(request.task_id)
        executor = d.executors.get(request.executor_id)
        if executor is None:
            d.violate(f"lease: LeaseTask from unregistered executor {request.executor_id!r}")
            return None, "", "unknown executor"
        if task is None or request.executor_id not in task.ever_reserved_to:
            d.violate(f"lease: {request.executor_id} leased {request.task_id!r}, never "
                      "reserved to it")
            return None, "", "no such task"
        if request.finalize or request.re_enqueue:
            d.violate(f"lease: {request.task_id} closed on a stream that never leased it")
            return None, "", "not leased here"
        serialized = b""
        if task.state == "leased" and request.reconnect_token and \
                request.reconnect_token == task.lease_id and \
                request.executor_id == task.lease_executor:
            self._check_renewal(task)  # a reconnect renews the same lease
        elif task.state != "queued":
            return None, "", "already claimed"
        else:
            task.state = "leased"
            task.attempts += 1
            task.lease_id = str(uuid.uuid4())
            task.lease_executor = request.executor_id
            task.last_ping = time.monotonic()
            task.keepalives = []
            task.leased_by.append(request.executor_id)
            d.lease_order.append((task.task_id, request.executor_id))
            d._cancel_elsewhere(task, request.executor_id)
            serialized = task.execution.SerializeToString()
        task.lease_stream_open = True
        executor.open_leases.add(task.task_id)
        executor.peak_leases = max(executor.peak_leases, len(executor.open_leases))
        limit = d.max_leases_per_executor
        if limit and len(executor.open_leases) > limit:
            d.violate(f"lease: {executor.executor_id} holds {len(executor.open_leases)} "
                      f"leases, more than {limit}")
        reply = d.lease_reply(task.lease_id)
        reply.serialized_task = serialized
        return task, task.lease_id, reply

    def _check_renewal(self, task: TaskSeen) -> None:
        now = time.monotonic()
        gap = now - task.last_ping
        task.keepalives.append(gap)
        if gap > self.d.lease_duration_s and not task.lease_overdue:
            task.lease_overdue = True
            self.d.violate(f"lease: task {task.task_id} renewed after {gap:.2f}s "
                           f"(lease_duration {self.d.lease_duration_s}s)")
        task.last_ping = now

    def _close(self, task: TaskSeen, request: sched_pb2.LeaseTaskRequest):
        d = self.d
        task.keepalives.pop()  # the closing request is no renewal
        reply = sched_pb2.LeaseTaskResponse(closed_cleanly=True)
        if request.finalize and request.re_enqueue:
            d.violate(f"lease: task {task.task_id}: finalize and re_enqueue both set")
        if request.re_enqueue:
            reason = request.re_enqueue_reason
            if not request.HasField("re_enqueue_reason") or reason.code == code_pb2.OK or \
                    not reason.message:
                d.violate(f"lease: task {task.task_id} re-enqueued without a reason "
                          f"({reason})")
            task.re_enqueue_reasons.append(reason)
            d._requeue(task)
            return reply
        if task.completed is None:
            d.violate(f"lease: task {task.task_id} finalized without a COMPLETED operation")
            d._finish(task, re_pb2.ExecuteResponse(status=status_pb2.Status(
                code=code_pb2.INTERNAL, message="finalized without a result")))
            return reply
        if task.publish_streams_open:
            d.violate(f"lease: task {task.task_id} finalized before its publish stream closed")
        d.check_action_cache(task, task.completed)
        d._finish(task, task.completed)
        return reply

    # ---- unary ---------------------------------------------------------------------------

    async def ReEnqueueTask(self, request, context):
        task = self.d.tasks.get(request.task_id)
        if task is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such task")
        task.re_enqueue_calls.append(request)
        if task.state == "leased" and request.lease_id == task.lease_id:
            self.d._requeue(task)
        return sched_pb2.ReEnqueueTaskResponse()

    async def TaskExists(self, request, context):
        self.d.task_exists_calls.append(request.task_id)
        task = self.d.tasks.get(request.task_id)
        return sched_pb2.TaskExistsResponse(exists=task is not None and task.state != "done")


class _Execution(re_grpc.ExecutionServicer):
    def __init__(self, double: BuildBuddySchedulerDouble):
        self.d = double

    async def PublishOperation(self, request_iterator, context):
        d = self.d
        jwts = [v for k, v in _metadata(context) if k == JWT_HEADER]
        name = None
        task: TaskSeen | None = None
        try:
            async for op in request_iterator:
                if name is None:
                    name = op.name
                    task = d.tasks.get(op.name)
                    if task is None or task.state != "leased":
                        d.violate(f"publish: operation {op.name!r} names no leased task")
                        task = None
                    else:
                        task.publish_streams_open += 1
                        if task.jwt and jwts != [task.jwt]:
                            d.violate(f"publish: stream for {op.name} carried JWT(s) "
                                      f"{len(jwts)} not the task's")
                elif op.name != name:
                    d.violate(f"publish: one stream named {name!r} and then {op.name!r}")
                if task is not None:
                    self._on_operation(task, op)
        finally:
            if task is not None:
                task.publish_streams_open -= 1
        return re_pb2.PublishOperationResponse()

    def _on_operation(self, task: TaskSeen, op: operations_pb2.Operation) -> None:
        d = self.d
        task.operations.append(op)
        metadata = re_pb2.ExecuteOperationMetadata()
        if not op.metadata.Unpack(metadata):
            d.violate(f"publish: {task.task_id}: metadata is {op.metadata.type_url!r}")
            return
        if metadata.action_digest != task.execution.execute_request.action_digest:
            d.violate(f"publish: {task.task_id}: action_digest {metadata.action_digest} is "
                      "not the task's")
        if op.HasField("error"):
            d.violate(f"publish: {task.task_id}: Operation.error set ({op.error})")
        progress = 0
        if metadata.stage == _Stage.EXECUTING:
            found = [p for p in metadata.partial_execution_metadata.auxiliary_metadata
                     if p.Is(_Progress.DESCRIPTOR)]
            if not found:
                d.violate(f"publish: {task.task_id}: EXECUTING without ExecutionProgress")
            else:
                state = _Progress()
                found[0].Unpack(state)
                progress = state.execution_state
        position = (metadata.stage, progress)
        if task.last_op is not None and op == task.last_op:
            return  # re-sent after a reconnect
        if task.stage[0] == _Stage.COMPLETED:
            d.violate(f"publish: {task.task_id}: an operation after COMPLETED")
        elif position < task.stage:
            d.violate(f"publish: {task.task_id}: stage went back from {task.stage} to "
                      f"{position}")
        task.stage = max(task.stage, position)
        task.last_op = op
        completed = metadata.stage == _Stage.COMPLETED
        if op.done != completed:
            d.violate(f"publish: {task.task_id}: done={op.done} at stage "
                      f"{_Stage.Value.Name(metadata.stage)}")
        if completed:
            response = re_pb2.ExecuteResponse()
            if op.WhichOneof("result") != "response" or not op.response.Unpack(response):
                d.violate(f"publish: {task.task_id}: COMPLETED without an ExecuteResponse")
                return
            task.completed = response
