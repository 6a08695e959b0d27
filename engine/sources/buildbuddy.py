"""BuildBuddy's executor protocol (scheduler.Scheduler and Execution/PublishOperation).

One executor per worker process, as BuildBuddy sees it: a fresh executor_id for each
process and slot, and a host id that stays with the machine (kept in the data directory).

    RegisterAndStreamWork  one bidi stream: the node registration up at once and every 5 s;
                           reservations down (EnqueueTaskReservationRequest, each acked), or
                           taken back (CancelTaskReservationRequest); ShuttingDownRequest up
                           on drain, naming the reservations still queued here.
    LeaseTask              one bidi stream per task claimed: the first reply carries the
                           ExecutionTask; the same request renews it well inside
                           lease_duration_seconds; finalize (or re_enqueue with a reason)
                           ends it. NOT_FOUND: another executor took it first.
    PublishOperation       one client stream per task: EXECUTING with BuildBuddy's
                           ExecutionProgress while it runs, then COMPLETED with the
                           ExecuteResponse, and closed before the lease is.
    ReEnqueueTask          when the lease stream did not close cleanly.

Reservations wait in a local priority queue (lower value first, then arrival); `claim(free)`
leases at most `free` of them, while their size fits what is free of the node.

Credentials, as upstream's executor sends them: the API key on the scheduler's own calls
(RegisterAndStreamWork, LeaseTask, ReEnqueueTask, TaskExists; `scheduler_metadata`, the
channel carrying none); the reservation's JWT too on LeaseTask and ReEnqueueTask; a task's
own calls (PublishOperation and, through ActionTask.cache_metadata, CAS, ByteStream and
ActionCache) its ExecutionTask.jwt (else the reservation's) and the client's RequestMetadata
with executor_details, never the API key. (A channel given with the key on every call, as
tests make it, still works: the key then rides along.)
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import heapq
import itertools
import json
import logging
import os
import platform
import socket
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc
from google.protobuf import any_pb2, timestamp_pb2
from google.protobuf.message import DecodeError
from google.rpc import code_pb2, status_pb2

from engine import __version__, logs
from engine import digest as dg
from engine.config import Config
from engine.proto import operations_pb2, re_grpc, re_pb2, sched_grpc, sched_pb2
from engine.sources.protocol import SourceUnavailable, Stage
from engine.sources.results import ResultStore
from engine.task import ActionOutcome, ActionTask, CallMetadata

log = logging.getLogger(__name__)

REGISTER_INTERVAL_S = 5.0  # BuildBuddy's schedulerCheckInInterval
CONNECT_TIMEOUT_S = 10.0
CLAIM_WAIT_S = 5.0  # an idle claim returns after this long (the loop calls again)
RPC_TIMEOUT_S = 10.0  # one lease reply, the close of a lease or publish stream
DEFAULT_LEASE_S = 10.0  # BuildBuddy's lease_duration, if a reply names none
KEEPALIVE_FRACTION = 0.5  # renew after this share of the lease: a slow reply still lands
LEASE_RECONNECT_S = 1.0  # how long a broken lease stream is retried (BuildBuddy: 1 s)
PUBLISH_RECONNECT_S = 5.0  # and a broken publish stream (BuildBuddy: 5 s)
PROGRESS_PING_S = 60.0  # the last progress is re-sent this often (BuildBuddy's default)
QUEUE_TRIM_S = 15.0  # how often the queue's head is checked with TaskExists
JWT_HEADER = "x-buildbuddy-jwt"
REQUEST_METADATA_HEADER = "build.bazel.remote.execution.v2.requestmetadata-bin"
HOST_ID_FILE = "executor_host_id"

_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}
_Progress = re_pb2.ExecutionProgress
_PROGRESS = {Stage.FETCHING: _Progress.DOWNLOADING_INPUTS,
             Stage.EXECUTING: _Progress.EXECUTING_COMMAND,
             Stage.UPLOADING: _Progress.UPLOADING_OUTPUTS}
# A broken stream that a retry on a new one may mend (a scheduler restarting).
_TRANSIENT = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL)
_STREAM_ERRORS = (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError)


def machine_arch() -> str:
    machine = platform.machine().lower()
    return _ARCH.get(machine, machine)


def executor_host_id(data_dir: str) -> str:
    """The machine's id for BuildBuddy, made once and kept in the data directory; every
    worker of this Stoker reads the same one."""
    path = os.path.join(data_dir, HOST_ID_FILE)
    try:
        with open(path, encoding="ascii") as f:
            value = f.read().strip()
        if value:
            return value
    except (FileNotFoundError, UnicodeDecodeError):
        pass
    os.makedirs(data_dir, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.{uuid.uuid4().hex}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, uuid.uuid4().hex.encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # atomic and exclusive: the first worker's id wins
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)
    with open(path, encoding="ascii") as f:
        return f.read().strip()


class _Publisher:
    """A task's PublishOperation stream: operations go out in order from one writer task; a
    stream that breaks is reopened and the unacknowledged operation sent again."""

    def __init__(self, stub: re_grpc.ExecutionStub, metadata: CallMetadata):
        self._stub = stub
        self._metadata = metadata
        self._queue: asyncio.Queue[operations_pb2.Operation | None] = asyncio.Queue()
        self._job: asyncio.Task | None = None
        self.error: str | None = None

    def send(self, op: operations_pb2.Operation) -> None:
        if self._job is None:
            self._job = asyncio.create_task(self._run())
        self._queue.put_nowait(op)

    async def close(self) -> bool:
        """Half-close and wait for the scheduler's reply. True if everything arrived."""
        if self._job is None:
            return True
        if self._job.done():
            return not self._job.cancelled() and self.error is None
        self._queue.put_nowait(None)
        try:
            await asyncio.wait_for(asyncio.shield(self._job), RPC_TIMEOUT_S + PUBLISH_RECONNECT_S)
        except TimeoutError:
            self.cancel()
            self.error = self.error or "the publish stream did not close in time"
        return self.error is None

    def cancel(self) -> None:
        if self._job is not None:
            self._job.cancel()

    async def _run(self) -> None:
        call = self._stub.PublishOperation(metadata=self._metadata)
        last: operations_pb2.Operation | None = None
        try:
            while (op := await self._queue.get()) is not None:
                last = op
                call = await self._write(call, op)
            call = await self._finish(call, last)
        except _STREAM_ERRORS as e:
            self.error = _describe(e)
            log.warning("publishing the operation failed: %s", self.error)
        finally:
            call.cancel()

    async def _write(self, call, op):
        return await self._retrying(call, lambda c: c.write(op))

    async def _finish(self, call, last):
        async def close(c) -> None:
            await c.done_writing()
            await asyncio.wait_for(c, RPC_TIMEOUT_S)
        # The close may not have been acknowledged, nor the last operation seen: a new stream
        # gets the last operation again.
        return await self._retrying(call, close, resend=last)

    async def _retrying(self, call, step, resend=None):
        """step(call), on a new stream again while a retryable error lasts (up to
        PUBLISH_RECONNECT_S); the stream that succeeded."""
        deadline = asyncio.get_running_loop().time() + PUBLISH_RECONNECT_S
        while True:
            try:
                await step(call)
                return call
            except _STREAM_ERRORS as e:
                if not _retryable(e) or asyncio.get_running_loop().time() > deadline:
                    raise
                call.cancel()
                await asyncio.sleep(0.1)
                call = self._stub.PublishOperation(metadata=self._metadata)
                if resend is not None:
                    await call.write(resend)


@dataclass
class _Lease:
    task_id: str
    call: grpc.aio.StreamStreamCall
    request: sched_pb2.LeaseTaskRequest  # what claimed it; re-sent to renew
    lease_id: str
    duration_s: float
    supports_reconnect: bool
    op_name: str
    action_digest: re_pb2.Digest
    publisher: _Publisher
    call_metadata: CallMetadata = ()
    task: ActionTask | None = None  # None: the leased task could not be read
    task_size: sched_pb2.TaskSize | None = None  # the scheduler's estimate, for the result
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    keepalive: asyncio.Task | None = None
    closing: bool = False
    revoked: bool = False
    # The last ExecutionProgress state sent.
    progress: re_pb2.ExecutionProgress.ExecutionState = _Progress.UNKNOWN_EXECUTION_STATE
    progress_sent_at: float = 0.0


class BuildBuddySource:
    protocol = "buildbuddy"
    hands_back = True

    def __init__(self, channel: grpc.aio.Channel, *, target: str, config: Config, slot: int,
                 name: str, register_interval_s: float = REGISTER_INTERVAL_S,
                 isolation_types: Sequence[str] = (), results: ResultStore | None = None,
                 scheduler_metadata: CallMetadata = ()):
        isolation_types = isolation_types or [config.isolation_type]
        self.target = target
        self.on_revoked = lambda task_id: None
        self._channel = channel
        self._stub = sched_grpc.SchedulerStub(channel)
        self._exec_stub = re_grpc.ExecutionStub(channel)
        self._name = name
        # Where successful results also go into the ActionCache (executor_writes_action_
        # cache): BuildBuddy apps before PR #8009 (2024-12-06) left that to executors.
        self._results = results
        # On the scheduler's own calls only (the API key, where the channel carries none):
        # RegisterAndStreamWork, LeaseTask, ReEnqueueTask, TaskExists.
        self._scheduler_metadata = tuple(scheduler_metadata)
        self._register_interval_s = register_interval_s
        self.executor_id = str(uuid.uuid4())  # per process and slot, as BuildBuddy's
        self._hostname = socket.gethostname()
        start = timestamp_pb2.Timestamp()
        start.GetCurrentTime()
        self._node = sched_pb2.ExecutionNode(
            host=self._hostname,
            port=1,  # deprecated upstream, but still set by BuildBuddy's own executor
            assignable_memory_bytes=config.slot_memory_bytes(slot),
            assignable_milli_cpu=config.slot_milli_cpu(slot),
            os_family="linux",
            arch=machine_arch(),
            # BuildBuddy's default pool is the empty one; "default" names it too.
            pool="" if config.pool_name.lower() == "default" else config.pool_name.lower(),
            version=__version__,
            executor_id=self.executor_id,
            executor_host_id=executor_host_id(config.data_dir),
            supported_isolation_types=list(isolation_types),
            supports_proactive_cancellation=True,
            start_time=start,
        )
        # The local queue: reservations by task id, a heap of (priority, arrival, id) over
        # them (entries of cancelled ones are skipped when popped), and those held back
        # by their `delay`.
        self._reservations: dict[str, sched_pb2.EnqueueTaskReservationRequest] = {}
        self._heap: list[tuple[int, int, str]] = []
        self._arrival = itertools.count()
        self._delayed: dict[str, asyncio.TimerHandle] = {}
        self._leases: dict[str, _Lease] = {}
        # The (milli-CPU, memory) each task leased here was admitted with.
        self._admitted: dict[str, tuple[int, int]] = {}
        self._changed = asyncio.Event()
        self._woken = False
        self._draining = False
        # The work stream and the tasks serving it.
        self._work: grpc.aio.StreamStreamCall | None = None
        self._outbox: asyncio.Queue[sched_pb2.RegisterAndStreamWorkRequest | None] | None = None
        self._jobs: list[asyncio.Task] = []
        self._lost: str | None = None

    # ---- the work stream ---------------------------------------------------------------

    async def connect(self) -> None:
        if self._work is not None and self._lost is None:
            return
        self._close_stream()
        try:
            await asyncio.wait_for(self._channel.channel_ready(), CONNECT_TIMEOUT_S)
        except TimeoutError:
            raise SourceUnavailable(f"no connection within {CONNECT_TIMEOUT_S:.0f}s") from None
        self._lost = None
        if self._draining:
            return  # no new registration; the leases held still need the scheduler
        self._work = self._stub.RegisterAndStreamWork(
            metadata=self._scheduler_metadata or None)
        self._outbox = asyncio.Queue()
        self._outbox.put_nowait(self._registration())  # first on the stream, as required
        self._jobs = [asyncio.create_task(self._write_work(self._work, self._outbox)),
                      asyncio.create_task(self._read_work(self._work)),
                      asyncio.create_task(self._register_periodically()),
                      asyncio.create_task(self._trim_periodically())]
        log.info("%s registering with %s as executor %s (pool %r, %d mCPU, %d bytes)",
                 self._name, self.target, self.executor_id, self._node.pool,
                 self._node.assignable_milli_cpu, self._node.assignable_memory_bytes)

    def _registration(self) -> sched_pb2.RegisterAndStreamWorkRequest:
        node = sched_pb2.ExecutionNode()
        node.CopyFrom(self._node)
        node.current_queue_length = len(self._reservations) + len(self._delayed)
        node.active_action_count = len(self._leases)
        return sched_pb2.RegisterAndStreamWorkRequest(
            register_executor_request=sched_pb2.RegisterExecutorRequest(node=node))

    def _send(self, message: sched_pb2.RegisterAndStreamWorkRequest | None) -> None:
        if self._outbox is not None:
            self._outbox.put_nowait(message)

    async def _write_work(self, call, outbox: asyncio.Queue) -> None:
        """The stream's only writer (grpc allows one write at a time). None half-closes."""
        try:
            while (message := await outbox.get()) is not None:
                await call.write(message)
            await call.done_writing()
        except _STREAM_ERRORS as e:
            self._lose(f"RegisterAndStreamWork: {_describe(e)}")

    async def _read_work(self, call) -> None:
        try:
            while True:
                response = await call.read()
                if response is grpc.aio.EOF:
                    if not self._draining:  # after ShuttingDownRequest an end is expected
                        self._lose("the scheduler ended the work stream")
                    return
                self._on_work(response)
        except _STREAM_ERRORS as e:
            self._lose(f"RegisterAndStreamWork: {_describe(e)}")

    async def _register_periodically(self) -> None:
        while not self._draining:
            await asyncio.sleep(self._register_interval_s)
            if not self._draining:
                self._send(self._registration())

    async def _trim_periodically(self) -> None:
        while not self._draining:
            await asyncio.sleep(QUEUE_TRIM_S)
            await self._trim_queue()

    def _lose(self, reason: str) -> None:
        if self._draining:
            # We already said goodbye on it; the leases still held watch their own streams.
            log.debug("work stream ended while draining: %s", reason)
            return
        if self._lost is None and self._work is not None:
            log.warning("lost the scheduler's work stream: %s", reason)
            self._lost = reason
        self._changed.set()

    def _close_stream(self) -> None:
        for job in self._jobs:
            if job is not asyncio.current_task():
                job.cancel()
        self._jobs = []
        if self._work is not None:
            self._work.cancel()
        self._work = None
        self._outbox = None

    def _on_work(self, response: sched_pb2.RegisterAndStreamWorkResponse) -> None:
        if response.HasField("enqueue_task_reservation_request"):
            if self._draining:
                return  # we said we are leaving: the scheduler places it elsewhere
            reservation = response.enqueue_task_reservation_request
            logs.redact(reservation.jwt)  # a scheduler or CAS may quote it in an error
            self._reserve(reservation)
            self._send(sched_pb2.RegisterAndStreamWorkRequest(
                enqueue_task_reservation_response=sched_pb2.EnqueueTaskReservationResponse(
                    task_id=reservation.task_id)))
        elif response.HasField("cancel_task_reservation_request"):
            self._unreserve(response.cancel_task_reservation_request.task_id)
        # ask_for_more_work_response: we never ask (the loop claims whenever it has room).

    # ---- the local queue ---------------------------------------------------------------

    def _reserve(self, reservation: sched_pb2.EnqueueTaskReservationRequest) -> None:
        task_id = reservation.task_id
        lease = self._leases.get(task_id)
        if task_id in self._reservations or task_id in self._delayed or \
                (lease is not None and not lease.closing):
            # A duplicate (after a reconnect, say). A lease being closed does not count:
            # that task was handed back and is offered again.
            return
        delay = reservation.delay.ToTimedelta().total_seconds() \
            if reservation.HasField("delay") else 0.0
        if delay > 0:
            self._delayed[task_id] = asyncio.get_running_loop().call_later(
                delay, self._release_delayed, reservation)
            return
        self._queue(reservation)

    def _release_delayed(self, reservation: sched_pb2.EnqueueTaskReservationRequest) -> None:
        if self._delayed.pop(reservation.task_id, None) is not None and not self._draining:
            self._queue(reservation)

    def _queue(self, reservation: sched_pb2.EnqueueTaskReservationRequest) -> None:
        self._reservations[reservation.task_id] = reservation
        heapq.heappush(self._heap, (reservation.scheduling_metadata.priority,
                                    next(self._arrival), reservation.task_id))
        self._changed.set()

    def _unreserve(self, task_id: str) -> None:
        # A queued reservation only, as upstream's executor (priority_task_scheduler.go
        # CancelTaskReservation): a task running here is cancelled through its lease,
        # whose next renewal is refused (NOT_FOUND), never through this.
        self._reservations.pop(task_id, None)
        timer = self._delayed.pop(task_id, None)
        if timer is not None:
            timer.cancel()

    def _pop(self) -> sched_pb2.EnqueueTaskReservationRequest | None:
        while self._heap:
            _, _, task_id = heapq.heappop(self._heap)
            reservation = self._reservations.pop(task_id, None)
            if reservation is not None:
                return reservation
        return None

    def _head(self) -> str | None:
        while self._heap and self._heap[0][2] not in self._reservations:
            heapq.heappop(self._heap)
        return self._heap[0][2] if self._heap else None

    async def _trim_queue(self) -> None:
        """Drops queued reservations whose task is already gone (another executor ran it)."""
        for _ in range(len(self._reservations)):
            head = self._head()
            if head is None:
                return
            try:
                reply = await self._stub.TaskExists(
                    sched_pb2.TaskExistsRequest(task_id=head), timeout=RPC_TIMEOUT_S,
                    metadata=self._scheduler_metadata or None)
            except grpc.aio.AioRpcError:
                return
            if reply.exists or self._head() != head:
                return
            self._pop()

    def _queued_ids(self) -> list[str]:
        return sorted(self._reservations, key=lambda t: self._reservations[t]
                      .scheduling_metadata.priority) + list(self._delayed)

    # ---- WorkSource ----------------------------------------------------------------------

    def wake(self) -> None:
        self._woken = True
        self._changed.set()

    async def claim(self, free: int) -> list[ActionTask]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CLAIM_WAIT_S
        while True:
            self._raise_if_lost()
            if free > 0 and not self._draining and self._reservations and \
                    self._head_fits():
                tasks = await self._lease_some(free)
                if tasks:
                    return tasks
                continue  # all taken by others: the queue is shorter now
            remaining = deadline - loop.time()
            if self._woken or remaining <= 0:
                break
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                break
        self._woken = False
        self._raise_if_lost()
        return []

    def _raise_if_lost(self) -> None:
        if self._lost is not None:
            reason = self._lost
            self._close_stream()  # connect() opens a new one; leases look after themselves
            raise SourceUnavailable(reason)

    def report(self, task_id: str, stage: Stage) -> None:
        lease = self._leases.get(task_id)
        state = _PROGRESS.get(stage)
        if lease is None or state is None or lease.closing or state <= lease.progress:
            return
        lease.progress = state
        self._publish_progress(lease)

    def _publish_progress(self, lease: _Lease) -> None:
        progress = _Progress(execution_state=lease.progress)
        progress.timestamp.GetCurrentTime()
        metadata = re_pb2.ExecuteOperationMetadata(stage=re_pb2.ExecutionStage.EXECUTING,
                                                   action_digest=lease.action_digest)
        metadata.partial_execution_metadata.auxiliary_metadata.add().Pack(progress)
        op = operations_pb2.Operation(name=lease.op_name, done=False)
        op.metadata.Pack(metadata)
        lease.progress_sent_at = asyncio.get_running_loop().time()
        lease.publisher.send(op)

    async def complete(self, task_id: str, outcome: ActionOutcome) -> None:
        lease = self._leases.get(task_id)
        if lease is None:
            log.debug("task %s: outcome for a lease no longer held; dropped", task_id)
            return
        if not outcome.retry:
            outcome = self._with_executor_metadata(lease, outcome)
            # While the lease is still renewed: a slow ActionCache must not let it lapse.
            await self._cache(lease, outcome)
        lease.closing = True
        async with lease.lock:  # a renewal in flight ends first
            if lease.revoked:
                return  # lost meanwhile: the scheduler runs it again, no outcome is due
            if lease.keepalive is not None:
                lease.keepalive.cancel()
            status = outcome.status
            retry = outcome.retry
            if not retry:
                lease.publisher.send(_final_operation(lease, outcome))
            if not await lease.publisher.close():
                if not retry:  # the result may not have arrived: let it run again
                    retry = True
                    status = status_pb2.Status(
                        code=code_pb2.UNAVAILABLE,
                        message=f"could not publish the result: {lease.publisher.error}")
            if retry and (status.code == code_pb2.OK or not status.message):
                status = status_pb2.Status(code=status.code or code_pb2.UNAVAILABLE,
                                           message=status.message or "the executor gave it back")
            await self._close_lease(lease, retry, status)
        self._leases.pop(task_id, None)
        self._release(task_id)
        self._changed.set()

    def _with_executor_metadata(self, lease: _Lease, outcome: ActionOutcome) -> ActionOutcome:
        """The result's metadata as upstream's executor fills it (ExecuteTaskAndStreamResults):
        worker is the host id (the app routes affinity on it), then BuildBuddy's own fields,
        from which the app sizes later tasks."""
        result = re_pb2.ActionResult()
        result.CopyFrom(outcome.result)
        metadata = result.execution_metadata
        metadata.worker = self._node.executor_host_id
        metadata.executor_id = self.executor_id
        usage = outcome.usage
        if usage.cpu_nanos or usage.peak_memory_bytes:
            metadata.usage_stats.cpu_nanos = usage.cpu_nanos
            metadata.usage_stats.peak_memory_bytes = usage.peak_memory_bytes
        io = metadata.io_stats
        io.file_download_count = usage.blobs_fetched
        io.local_cache_hits = usage.local_cache_hits
        io.file_download_duration_usec = int(usage.fetch_seconds * 1e6)
        io.file_upload_size_bytes = usage.bytes_uploaded
        io.file_upload_duration_usec = int(usage.upload_seconds * 1e6)
        if lease.task_size is not None:
            metadata.estimated_task_size.CopyFrom(lease.task_size)
        if lease.task is not None:
            metadata.do_not_cache = lease.task.action.do_not_cache
        return dataclasses.replace(outcome, result=result)

    async def _cache(self, lease: _Lease, outcome: ActionOutcome) -> None:
        """As upstream's executor did before the app took it over (cachetools.
        UploadActionResult in ExecuteTaskAndStreamResults): a result with status OK, exit
        code 0 and no do_not_cache, under the action digest, with the task's JWT. A write
        refused (a read-only key, say) costs the cache entry, never the result."""
        task = lease.task
        if self._results is None or task is None or not lease.action_digest.hash or \
                not outcome.ok or outcome.result.exit_code != 0 or task.action.do_not_cache:
            return
        try:
            await asyncio.wait_for(self._results.put_action_result(
                task.instance_name, task.digest_function, lease.action_digest,
                outcome.result, task.cache_metadata), RPC_TIMEOUT_S)
        except (grpc.aio.AioRpcError, TimeoutError) as e:
            log.warning("task %s: could not write its result to the ActionCache: %s",
                        lease.task_id, _describe(e))

    async def _close_lease(self, lease: _Lease, retry: bool, status: status_pb2.Status) -> None:
        request = sched_pb2.LeaseTaskRequest(task_id=lease.task_id,
                                             executor_id=self.executor_id)
        if retry:
            request.re_enqueue = True
            request.re_enqueue_reason.CopyFrom(status)
        else:
            request.finalize = True
        closed_cleanly = False
        for attempt in range(2):
            try:
                await lease.call.write(request)
                await lease.call.done_writing()
                async with asyncio.timeout(RPC_TIMEOUT_S):
                    while (reply := await lease.call.read()) is not grpc.aio.EOF:
                        closed_cleanly = closed_cleanly or reply.closed_cleanly
                break
            except (*_STREAM_ERRORS, TimeoutError) as e:
                log.warning("task %s: closing the lease failed: %s", lease.task_id,
                            _describe(e))
                # A stream broken by a scheduler restart: take the lease up on a new one
                # (as a renewal does) and close it there, rather than run the task again.
                if attempt or not lease.supports_reconnect or not _retryable(e) or \
                        await self._renew(lease) is not None:
                    break
        lease.call.cancel()
        if closed_cleanly:
            return
        # The scheduler may not know we are done with it: give it back explicitly.
        try:
            await self._stub.ReEnqueueTask(sched_pb2.ReEnqueueTaskRequest(
                task_id=lease.task_id, lease_id=lease.lease_id,
                reason=status.message if retry else ""), timeout=RPC_TIMEOUT_S,
                metadata=lease.call_metadata or None)
            log.info("task %s: lease did not close cleanly; re-enqueued it", lease.task_id)
        except grpc.aio.AioRpcError as e:
            log.warning("task %s: ReEnqueueTask failed: %s", lease.task_id, _describe(e))

    def begin_drain(self) -> None:
        if self._draining:
            return
        self._draining = True
        queued = self._queued_ids()
        for timer in self._delayed.values():
            timer.cancel()
        self._delayed.clear()
        self._reservations.clear()
        self._heap.clear()
        if self._lost is None and self._outbox is not None:
            log.info("draining: telling the scheduler; %d queued reservation(s) handed back",
                     len(queued))
            self._send(sched_pb2.RegisterAndStreamWorkRequest(
                shutting_down_request=sched_pb2.ShuttingDownRequest(task_id=queued)))
            self._send(None)  # and no more registrations
        self._changed.set()

    async def close(self) -> None:
        if not self._draining:
            self.begin_drain()  # the scheduler hears we are going and re-places our queue
        for task_id in list(self._leases):  # none after a drain; otherwise best effort
            await self.complete(task_id, ActionOutcome(
                status=status_pb2.Status(code=code_pb2.UNAVAILABLE,
                                         message="the executor is leaving"), retry=True))
        writer = self._jobs[0] if self._jobs else None
        if writer is not None and not writer.done():
            # Let ShuttingDownRequest go out before the stream ends.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(writer), RPC_TIMEOUT_S)
        self._close_stream()

    # ---- leases --------------------------------------------------------------------------

    # ---- admission by size -----------------------------------------------------------

    def _size_of(self, reservation: sched_pb2.EnqueueTaskReservationRequest
                 ) -> tuple[int, int]:
        """(milli-CPU, memory bytes) to admit a task with, as upstream's scheduler sizes it
        (getMostAccurateTaskSize): measured, else predicted, else the reservation's (then
        the deprecated scheduling_metadata.task_size); capped at this node, so that a task
        larger than the node still runs, alone."""
        md = reservation.scheduling_metadata
        for size in (md.measured_task_size, md.predicted_task_size, reservation.task_size,
                     md.task_size):
            if size.estimated_milli_cpu or size.estimated_memory_bytes:
                break
        return (min(size.estimated_milli_cpu, self._node.assignable_milli_cpu),
                min(size.estimated_memory_bytes, self._node.assignable_memory_bytes))

    def _fits(self, size: tuple[int, int]) -> bool:
        """As upstream's priority task scheduler (canFitTask): what is left of the node's
        milli-CPU and memory, with the tasks admitted here taken off, holds the task."""
        cpu = sum(c for c, _ in self._admitted.values())
        memory = sum(m for _, m in self._admitted.values())
        return (size[0] <= self._node.assignable_milli_cpu - cpu
                and size[1] <= self._node.assignable_memory_bytes - memory)

    def _head_fits(self) -> bool:
        head = self._head()
        return head is not None and self._fits(self._size_of(self._reservations[head]))

    def _release(self, task_id: str) -> None:
        if self._admitted.pop(task_id, None) is not None:
            self._changed.set()  # room for the next task

    async def _lease_some(self, free: int) -> list[ActionTask]:
        # The queue's head only, in priority order, while it fits (upstream looks past the
        # head only for custom resources, which Stoker does not offer).
        picked: list[sched_pb2.EnqueueTaskReservationRequest] = []
        while len(picked) < free and self._head_fits():
            reservation = self._pop()
            assert reservation is not None
            self._admitted[reservation.task_id] = self._size_of(reservation)
            picked.append(reservation)
        try:
            results = await asyncio.gather(*(self._lease(r) for r in picked),
                                           return_exceptions=True)
        finally:
            for reservation in picked:  # admitted only while leased here
                if reservation.task_id not in self._leases:
                    self._release(reservation.task_id)
        for reservation, result in zip(picked, results, strict=True):
            if isinstance(result, asyncio.CancelledError):
                raise result
            if isinstance(result, BaseException):  # a bug: that task only, never the others
                log.error("task %s: leasing failed: %r", reservation.task_id, result)
                lease = self._leases.get(reservation.task_id)
                if lease is not None:
                    self._revoke(lease, f"leasing failed: {result!r}")
        tasks = [t for t in results if isinstance(t, ActionTask)]
        unreachable = [r for r, t in zip(picked, results, strict=True) if t is _UNREACHABLE]
        for reservation in unreachable:
            self._queue(reservation)  # not lost: try again once the scheduler answers
        if unreachable and not tasks:
            raise SourceUnavailable("LeaseTask: the scheduler is unreachable")
        return tasks

    def _lease_metadata(self, jwt: str) -> CallMetadata:
        """LeaseTask's and ReEnqueueTask's: the scheduler's credentials and the
        reservation's JWT."""
        return self._scheduler_metadata + (((JWT_HEADER, jwt),) if jwt else ())

    def _task_metadata(self, jwt: str, execution: re_pb2.ExecutionTask | None) -> CallMetadata:
        """A task's own calls (publish, CAS, ByteStream, ActionCache), as upstream's executor
        makes them: the task's JWT, never the API key, and the client's RequestMetadata
        with executor_details naming this host."""
        request = re_pb2.RequestMetadata()
        if execution is not None and execution.HasField("request_metadata"):
            request.CopyFrom(execution.request_metadata)
        elif execution is not None:
            request.tool_invocation_id = execution.invocation_id
        request.executor_details.executor_host_id = self._node.executor_host_id
        return (((JWT_HEADER, jwt),) if jwt else ()) + (
            (REQUEST_METADATA_HEADER, request.SerializeToString()),)

    async def _lease(self, reservation: sched_pb2.EnqueueTaskReservationRequest):
        task_id = reservation.task_id
        request = sched_pb2.LeaseTaskRequest(task_id=task_id, executor_id=self.executor_id,
                                             executor_hostname=self._hostname,
                                             supports_reconnect=True)
        call_metadata = self._lease_metadata(reservation.jwt)
        call = self._stub.LeaseTask(metadata=call_metadata)
        try:
            await call.write(request)
            reply = await asyncio.wait_for(call.read(), RPC_TIMEOUT_S)
        except grpc.aio.AioRpcError as e:
            call.cancel()
            if e.code() == grpc.StatusCode.NOT_FOUND:
                log.debug("task %s was claimed elsewhere", task_id)
                return None
            log.warning("task %s: LeaseTask failed: %s", task_id, _describe(e))
            return _UNREACHABLE if e.code() == grpc.StatusCode.UNAVAILABLE else None
        except (TimeoutError, grpc.aio.UsageError, asyncio.InvalidStateError) as e:
            call.cancel()
            log.warning("task %s: LeaseTask failed: %s", task_id, _describe(e))
            return None
        if reply is grpc.aio.EOF or not reply.serialized_task:
            call.cancel()
            log.warning("task %s: the lease came without a task", task_id)
            return None
        try:
            execution = re_pb2.ExecutionTask.FromString(reply.serialized_task)
        except DecodeError as e:
            execution = None
            problem = f"the leased task is not an ExecutionTask: {e}"
        jwt = (execution.jwt if execution is not None else "") or reservation.jwt
        logs.redact(jwt)
        # As upstream's task leaser (TaskLease.pingServer): a lease can be resumed on a new
        # stream when the reply says supports_reconnect or carries a reconnect_token (field
        # 4, all some servers set); renewals then name it by its lease id (else that token).
        resumable = reply.supports_reconnect or bool(reply.reconnect_token)
        request.reconnect_token = (reply.lease_id or reply.reconnect_token) if resumable else ""
        lease = _Lease(
            task_id=task_id, call=call, request=request, lease_id=reply.lease_id,
            duration_s=float(reply.lease_duration_seconds or DEFAULT_LEASE_S),
            supports_reconnect=resumable,
            op_name=(execution.execution_id if execution is not None else "") or task_id,
            action_digest=execution.execute_request.action_digest if execution is not None
            else re_pb2.Digest(),
            publisher=_Publisher(self._exec_stub, self._task_metadata(jwt, execution)),
            call_metadata=call_metadata,
            task_size=reservation.scheduling_metadata.task_size
            if reservation.scheduling_metadata.HasField("task_size") else None)
        self._leases[task_id] = lease
        lease.keepalive = asyncio.create_task(self._keep_alive(lease))
        if execution is not None:
            try:
                lease.task = _task_of(task_id, execution,
                                      self._task_metadata(jwt, execution), jwt)
                return lease.task
            except ValueError as e:
                problem = str(e)
        log.warning("task %s: %s", task_id, problem)
        await self.complete(task_id, ActionOutcome(status=status_pb2.Status(
            code=code_pb2.INVALID_ARGUMENT, message=problem)))
        return None

    async def _keep_alive(self, lease: _Lease) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(max(0.05, lease.duration_s * KEEPALIVE_FRACTION))
            async with lease.lock:
                if lease.closing:
                    return
                problem = await self._renew(lease)
            if problem is not None:
                self._revoke(lease, problem)
                return
            if lease.progress and loop.time() - lease.progress_sent_at >= PROGRESS_PING_S:
                self._publish_progress(lease)  # keeps the operation stream warm

    async def _renew(self, lease: _Lease) -> str | None:
        """Renews the lease on its stream, or on a new one (with the lease id as the
        reconnect token) when the stream broke. None, or why the lease is lost."""
        loop = asyncio.get_running_loop()
        retry_until: float | None = None
        while True:
            try:
                await lease.call.write(lease.request)
                reply = await asyncio.wait_for(lease.call.read(), RPC_TIMEOUT_S)
                if reply is grpc.aio.EOF:
                    raise grpc.aio.UsageError("the scheduler ended the lease stream")
                if reply.lease_duration_seconds > 0:
                    lease.duration_s = float(reply.lease_duration_seconds)
                if reply.lease_id:
                    lease.lease_id = reply.lease_id
                if lease.supports_reconnect and (reply.lease_id or reply.reconnect_token):
                    lease.request.reconnect_token = reply.lease_id or reply.reconnect_token
                return None
            except (*_STREAM_ERRORS, TimeoutError) as e:
                problem = _describe(e)
                if not lease.supports_reconnect or not _retryable(e):
                    return problem
                if retry_until is None:
                    retry_until = loop.time() + LEASE_RECONNECT_S
                if loop.time() > retry_until:
                    return problem
            lease.call.cancel()
            await asyncio.sleep(0.1)
            lease.call = self._stub.LeaseTask(metadata=lease.call_metadata)

    def _revoke(self, lease: _Lease, problem: str) -> None:
        if self._leases.pop(lease.task_id, None) is None:
            return
        self._release(lease.task_id)
        log.warning("task %s: lost its lease (%s); stopping it", lease.task_id, problem)
        lease.closing = lease.revoked = True
        lease.publisher.cancel()
        lease.call.cancel()
        self.on_revoked(lease.task_id)
        self._changed.set()


_UNREACHABLE = object()  # _lease's answer when the scheduler could not be reached


def _tenant_of(jwt: str) -> str:
    """Whose build a task is, for keying what is reused across tasks (kept containers):
    the group of its JWT (BuildBuddy's runner pool keys by it), read without checking the
    signature (the scheduler sent it; this only keys, never grants); a JWT without one
    stands for itself; no JWT, ""."""
    if not jwt:
        return ""
    try:
        payload = jwt.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        group = claims.get("group_id") if isinstance(claims, dict) else None
        if isinstance(group, str) and group:
            return f"group:{group}"
    except (IndexError, ValueError, UnicodeDecodeError):
        pass
    return "jwt:" + hashlib.sha256(jwt.encode()).hexdigest()


def _task_of(task_id: str, execution: re_pb2.ExecutionTask,
             metadata: CallMetadata, jwt: str = "") -> ActionTask:
    request = execution.execute_request
    try:
        function = dg.function_from_enum(request.digest_function)
    except dg.DigestError as e:
        raise ValueError(str(e)) from None
    if not execution.HasField("action"):
        raise ValueError("the leased task carries no Action")
    d = request.action_digest
    return ActionTask(
        id=task_id, action=_with_overrides(execution), digest_function=function,
        instance_name=request.instance_name,
        action_digest=f"{d.hash}/{d.size_bytes}" if d.hash else "",
        command=execution.command if execution.HasField("command") else None,
        cache_metadata=metadata, tenant=_tenant_of(jwt))


def _with_overrides(execution: re_pb2.ExecutionTask) -> re_pb2.Action:
    """The Action, its platform with the task's platform_overrides (the build's
    x-buildbuddy-platform.* headers) laid over it, as upstream's platform.ParseProperties
    does: the Action's properties, else the Command's, then each override in place of any
    property of the same name (names compared without case)."""
    overrides = execution.platform_overrides.properties
    if not overrides:
        return execution.action
    action = re_pb2.Action()
    action.CopyFrom(execution.action)
    base = action.platform.properties or (
        execution.command.platform.properties if execution.HasField("command") else [])
    merged = {p.name.lower(): (p.name, p.value) for p in base}
    for p in overrides:
        merged[p.name.lower()] = (p.name, p.value.strip())
    action.platform.Clear()
    for name, value in sorted(merged.values()):
        action.platform.properties.add(name=name, value=value)
    return action


def _final_operation(lease: _Lease, outcome: ActionOutcome) -> operations_pb2.Operation:
    metadata = re_pb2.ExecuteOperationMetadata(stage=re_pb2.ExecutionStage.COMPLETED,
                                               action_digest=lease.action_digest)
    response = re_pb2.ExecuteResponse(status=outcome.status, result=outcome.result)
    op = operations_pb2.Operation(name=lease.op_name, done=True)
    op.metadata.Pack(metadata)
    packed = any_pb2.Any()
    packed.Pack(response)
    op.response.CopyFrom(packed)
    return op


def _retryable(e: BaseException) -> bool:
    if isinstance(e, grpc.aio.AioRpcError):
        return e.code() in _TRANSIENT
    return True  # a stream ended or unusable: a new one may work


def _describe(e: BaseException) -> str:
    if isinstance(e, grpc.aio.AioRpcError):
        return f"{e.code().name}: {e.details()}"
    return str(e) or type(e).__name__
