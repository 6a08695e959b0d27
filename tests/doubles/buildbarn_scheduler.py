"""A test DOUBLE of Buildbarn's scheduler (bb_scheduler), written from the public protocol
(bb-remote-execution pkg/proto/remoteworker/remoteworker.proto) and from what the real
scheduler (pkg/scheduler/in_memory_build_queue.go) and worker (pkg/builder/build_client.go)
do. It is not Buildbarn: no Buildbarn can run here, so this plays the scheduler's
worker-facing side on 127.0.0.1, inside the test's event loop:

    buildbarn.remoteworker.OperationQueue/Synchronize
    CAS   tests/doubles/cas.py: Stoker's own CAS, ByteStream and Capabilities servicers

Like bb_scheduler it keys workers by their worker_id map, answers executing workers at once
(next_synchronization_at = now + busy_sync_s), holds idle ones (and ones reporting completion
without prefer_being_idle) until an action is queued or idle_poll_s passes, re-sends the
action to a worker that reports idle while it should be executing (at most bb's 9 times, then
the action fails with INTERNAL), answers prefer_being_idle at once with idle, takes a worker's
size class as a platform queue does (predeclared or not: INVALID_ARGUMENT otherwise), forgets
a worker silent for a minute (failing what it held), and serves an ActionCache whose writes it
checks against each completion, as bb_worker makes them. Tests enqueue actions (inputs
uploaded to its CAS), await their ExecuteResponse, take actions back (`revoke`), restart it,
and inspect what it saw. Each broken rule it sees (RULES) is appended to `violations`; the
test fixture fails the test at teardown unless the list is empty.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from google.protobuf import any_pb2, empty_pb2, timestamp_pb2
from google.rpc import code_pb2, status_pb2

from engine import digest as dg
from engine.proto import bbcas_pb2, re_pb2, rw_grpc, rw_pb2
from tests.doubles.cas import CasDouble
from tests.doubles.scheduler import SchedulerDouble
from tests.integration.support import TreeSpec

RULES = [
    "prefix: instance_name_prefix is the one the worker was configured with",
    "platform: properties sorted by name then value, none twice (bb: INVALID_ARGUMENT)",
    "worker_id: set; a 'thread' key when a worker process runs more than one thread, none "
    "when it runs one (cmd/bb_worker/main.go: only for concurrency > 1)",
    "retries: an action re-sent to a worker that reports idle runs before the upstream limit "
    "(cmd/bb_scheduler/main.go WorkerTaskRetryCount 9, then INTERNAL)",
    "silent: a worker holding an action calls within a minute "
    "(WorkerWithNoSynchronizationsTimeout; sizeClassQueue.removeStaleWorker fails its action)",
    "ac: a completed action that succeeded (status OK, exit 0) and may be cached is in the "
    "ActionCache under its digest and full instance name before its completion is reported; "
    "any other outcome is not, and is kept in the CAS as a HistoricalExecuteResponse named in "
    "the message (pkg/builder/caching_build_executor.go Execute)",
    "state: current_state is set, and an executing state names its stage",
    "overlap: one Synchronize at a time per worker_id (bb: RESOURCE_EXHAUSTED)",
    "early: no call before next_synchronization_at - early_slack_s unless the state changed",
    "late: an executing worker calls by next_synchronization_at + late_slack_s",
    "given: executing/completed only for the action this worker_id was given (idle→completed, "
    "a wrong action_digest, an action taken back)",
    "order: stages never go back (started, fetching_inputs, running, uploading_outputs)",
    "response: completed carries an ExecuteResponse (a result, or a non-OK status)",
    "capacity: per worker process (worker_id without 'thread'), at assignment: fewer than "
    "commands_per_process actions short of uploading_outputs, fewer than actions_per_process "
    "in all",
]
STAGES = ("started", "fetching_inputs", "running", "uploading_outputs")
OVERLAP_GRACE_S = 0.5  # a call the worker cut may still be ending when its next one comes


def digest_key(d: re_pb2.Digest) -> str:
    return f"{d.hash}/{d.size_bytes}"


@dataclass
class Job:
    """One action as the double queues, hands out and completes it."""
    name: str
    action: re_pb2.Action
    digest: re_pb2.Digest
    digest_function: int
    suffix: str = ""
    auxiliary: list[any_pb2.Any] = field(default_factory=list)
    queued: timestamp_pb2.Timestamp = field(default_factory=timestamp_pb2.Timestamp)
    state: str = "queued"  # queued, executing, completed, revoked
    worker: str = ""  # the worker key it was last given to
    assignments: int = 0
    stages: list[str] = field(default_factory=list)  # as reported, repeats dropped
    response: re_pb2.ExecuteResponse | None = None
    revoke_requested: bool = False
    resends: int = 0  # sent again to a worker that reported idle instead
    done: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def key(self) -> str:
        return digest_key(self.digest)


@dataclass
class WorkerSeen:
    key: str  # the worker_id map as sorted JSON (bb's workerKey)
    worker_id: dict[str, str]
    process: str  # the worker_id without "thread": one Stoker worker process
    job: Job | None = None
    stage: str = ""
    expected: tuple[str, ...] = ("idle",)  # what it should report next, absent news
    due: float | None = None  # wall time we told it to call back by; None: no expectation
    executing: bool = False  # due is binding (the late rule)
    late_flagged: bool = False
    last_completed: Job | None = None
    may_be_unknown: bool = False  # the double forgot it in a restart
    busy: bool = False
    calls: int = 0
    last_seen: float = 0.0  # when its last call began or ended


@dataclass
class Sync:
    """One Synchronize as the double saw it."""
    at: float
    worker: str
    thread: str
    state: str  # "idle", a stage, or "completed"
    action: str  # digest key, "" when idle
    prefer_idle: bool
    answer: str = ""  # "idle", "executing <job>", "continue", or the error


class BuildbarnSchedulerDouble(SchedulerDouble):
    """See the module docstring. Use as `async with BuildbarnSchedulerDouble(dir) as bb:`."""

    UNTIL_POLL_S = 0.01

    def __init__(self, root: Path, *, instance_name_prefix: str = "",
                 commands_per_process: int = 0, actions_per_process: int = 0,
                 busy_sync_s: float = 0.5, idle_poll_s: float = 2.0,
                 idle_resync_s: float = 0.0, early_slack_s: float = 0.1,
                 late_slack_s: float = 2.0, size_classes: list[int] | None = None,
                 worker_timeout_s: float = 60.0, retry_limit: int = 9,
                 check_action_cache: bool = True):
        """size_classes: the platform queue's predeclared size classes (bb_scheduler's
        predeclared_platform_queues), None: not predeclared; worker_timeout_s and retry_limit
        are bb_scheduler's (a minute, 9); check_action_cache: the ac rule (off for workers
        that are given nowhere to store results)."""
        super().__init__()
        self.size_classes = size_classes
        self.worker_timeout_s = worker_timeout_s
        self.retry_limit = retry_limit
        self.check_action_cache = check_action_cache
        self._queue_size_classes: set[int] = set(size_classes or ())
        self.refused: list[str] = []  # INVALID_ARGUMENT answers given (size classes)
        self.assign_on_cut = False  # a cut idle poll takes the next queued action with it
        self._unnamed: set[str] = set()  # processes flagged under the worker_id rule
        self.root = Path(root)
        self.instance_name_prefix = instance_name_prefix
        self.commands_per_process = commands_per_process  # 0: unchecked
        self.actions_per_process = actions_per_process  # 0: unchecked
        self.busy_sync_s = busy_sync_s
        self.idle_poll_s = idle_poll_s
        self.idle_resync_s = idle_resync_s
        self.early_slack_s = early_slack_s
        self.late_slack_s = late_slack_s
        self.cas = CasDouble(self.root / "cas")
        self.port = 0
        self.workers: dict[str, WorkerSeen] = {}
        self.jobs: dict[str, Job] = {}
        self.queue: list[Job] = []
        self.syncs: list[Sync] = []
        self._forgotten: set[str] = set()
        self._new_work: asyncio.Future | None = None
        self._names = 0

    # ---- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", 8 << 20),
                                          ("grpc.max_send_message_length", 8 << 20),
                                          ("grpc.so_reuseport", 0)])
        rw_grpc.add_OperationQueueServicer_to_server(_OperationQueue(self), server)
        self.cas.add_to(server)
        await self._serve(server)

    async def stop(self) -> None:
        """Stops serving (calls in progress fail). Nobody can call a stopped scheduler on
        time, so no worker owes it a call until it has answered one again."""
        await self._stop_serving(grace=0.2)
        for w in self.workers.values():
            w.due, w.executing = None, False

    async def restart(self, *, forget: bool = False, down_s: float = 0.0) -> None:
        """Stops and starts on the same port. forget=True plays bb_scheduler's own restart
        (all in memory): workers are forgotten, and what they ran is queued again, as the
        clients would ask again."""
        await self.stop()
        if forget:
            self._forgotten.update(self.workers)
            for w in self.workers.values():
                if w.job is not None and w.job.state == "executing":
                    w.job.state = "queued"
                    self.queue.append(w.job)
            self.workers.clear()
        await asyncio.sleep(down_s)
        await self.start()

    def close(self) -> None:
        self.cas.close()

    # ---- the test's side ---------------------------------------------------------------

    def enqueue(self, command: re_pb2.Command, inputs: TreeSpec | None = None, *,
                suffix: str = "", function: str = dg.SHA256, timeout_s: float = 60.0,
                auxiliary: list[any_pb2.Any] | None = None, do_not_cache: bool = False,
                announce: bool = True) -> Job:
        """Command, inputs and Action into the CAS, and the action into the queue (bb's
        scheduler always sets the Action's timeout)."""
        action, digest = self.cas.action(command, inputs, timeout_s=timeout_s, function=function,
                                         do_not_cache=do_not_cache)
        return self.queue_action(action, digest, digest_function=dg.ENUM_BY_FUNCTION[function],
                                 suffix=suffix, auxiliary=list(auxiliary or []),
                                 announce=announce)

    def queue_action(self, action: re_pb2.Action, digest: re_pb2.Digest, *,
                     digest_function: int = re_pb2.DigestFunction.SHA256,
                     announce: bool = True, **fields) -> Job:
        """An Action already in the CAS (at digest) into the queue, as it stands; fields: the
        rest of its Job (suffix, auxiliary); announce=False: waiting polls are not woken."""
        self._names += 1
        job = Job(name=f"job-{self._names}", action=action, digest=digest,
                  digest_function=digest_function, **fields)
        job.queued.GetCurrentTime()
        self.jobs[job.name] = job
        self.queue.append(job)
        if announce:
            self._announce()
        return job

    def revoke(self, job: Job) -> None:
        """Takes the job back: the worker running it is told idle at its next call (as bb
        does when the client goes away or an operation is killed)."""
        job.revoke_requested = True
        if job.state == "queued":
            self.queue.remove(job)
            self._end(job, "revoked")

    async def result(self, job: Job, timeout: float = 30.0) -> re_pb2.ExecuteResponse:
        try:
            await asyncio.wait_for(job.done.wait(), timeout)
        except TimeoutError:
            raise AssertionError(f"{job.name} not done within {timeout}s (state {job.state}, "
                                 f"stages {job.stages}, violations {self.violations})") from None
        if job.response is None:
            raise AssertionError(f"{job.name} ended {job.state}, without a response")
        return job.response

    def syncs_of(self, job: Job) -> list[Sync]:
        return [s for s in self.syncs if s.action == job.key]

    def commands(self, process: str) -> int:
        return sum(1 for w in self.workers.values() if w.process == process
                   and w.job is not None and w.stage != STAGES[-1])

    # ---- the scheduler -----------------------------------------------------------------

    def _announce(self) -> None:
        if self._new_work is not None and not self._new_work.done():
            self._new_work.set_result(None)
        self._new_work = None

    async def _work_or_timeout(self, timeout: float) -> None:
        if self._new_work is None:
            self._new_work = asyncio.get_running_loop().create_future()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._new_work), timeout)

    def _end(self, job: Job, state: str, response: re_pb2.ExecuteResponse | None = None):
        job.state = state
        job.response = response
        job.done.set()

    def _worker(self, worker_id: dict[str, str]) -> WorkerSeen:
        key = json.dumps(dict(sorted(worker_id.items())))
        w = self.workers.get(key)
        if w is None:
            process = json.dumps({k: v for k, v in sorted(worker_id.items()) if k != "thread"})
            w = self.workers[key] = WorkerSeen(key=key, worker_id=dict(worker_id),
                                               process=process,
                                               may_be_unknown=key in self._forgotten)
        return w

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(0.05)
            now = time.time()
            for w in list(self.workers.values()):
                if not w.busy and w.last_seen and now - w.last_seen > self.worker_timeout_s:
                    self._expire(w)
                    continue
                if w.executing and w.due is not None and not w.late_flagged \
                        and not w.busy and now > w.due + self.late_slack_s:
                    w.late_flagged = True
                    self.violate(f"late: {w.key} executing {w.job.name if w.job else '?'} "
                                 f"has not called {now - w.due:.2f}s after "
                                 "next_synchronization_at")

    def _expire(self, w: WorkerSeen) -> None:
        """bb's removeStaleWorker: the worker is forgotten; an action it held fails with
        UNAVAILABLE (not requeued)."""
        del self.workers[w.key]
        job = w.job
        if job is not None and job.state == "executing":
            self.violate(f"silent: {w.key} holding {job.name} did not call for "
                         f"{self.worker_timeout_s:g}s")
            self._end(job, "completed", re_pb2.ExecuteResponse(status=status_pb2.Status(
                code=code_pb2.UNAVAILABLE,
                message=f"Worker {w.key} disappeared while task was executing")))

    def resend(self, w: WorkerSeen, job: Job) -> rw_pb2.SynchronizeResponse:
        """bb's getCurrentOrNextTask for a worker that reports idle while it should execute
        job: the same action again, up to retry_limit times; then the action fails."""
        if job.resends >= self.retry_limit:
            self.violate(f"retries: {job.name} was sent to {w.key} {job.resends + 1} times "
                         "and never ran")
            w.job, w.stage = None, ""
            self._end(job, "completed", re_pb2.ExecuteResponse(status=status_pb2.Status(
                code=code_pb2.INTERNAL,
                message=f"Attempted to execute task {job.resends + 1} times, but it never "
                        f"completed. This task may cause worker {w.key} to crash.")))
            return self.idle(w)
        job.resends += 1
        return self.assign(w, job)

    def sent_with_action(self, job: Job) -> bool:
        """Whether the worker was given job's Action (a hostile double may leave it out)."""
        return True

    def check_size_class(self, size_class: int) -> str | None:
        """bb's Synchronize for a platform queue that exists: the INVALID_ARGUMENT message,
        or None when the size class is taken."""
        if size_class in self._queue_size_classes:
            return None
        if self.size_classes is None:
            if not self._queue_size_classes:  # the first worker makes the queue
                self._queue_size_classes.add(size_class)
                return None
            return ("Cannot add multiple size classes to a platform queue that is not "
                    "predeclared")
        top = max(self.size_classes)
        if size_class > top:
            return (f"Worker provided size class {size_class}, which exceeds the predeclared "
                    f"maximum of {top}")
        if top > 0 and size_class == 0:
            return ("Worker did not provide a size class, even though this platform queue "
                    "uses them")
        self._queue_size_classes.add(size_class)  # made on demand, as bb does
        return None

    def check_action_cache_write(self, w: WorkerSeen, job: Job,
                                 response: re_pb2.ExecuteResponse) -> None:
        if not self.check_action_cache or response.status.code == code_pb2.UNAVAILABLE:
            return  # a hand-back (the worker's way to return an action), not an outcome
        if not self.sent_with_action(job) or \
                job.digest_function not in dg.FUNCTION_BY_ENUM:
            return  # bb's worker writes nothing for an action it cannot even read
        instance = "/".join(p for p in (self.instance_name_prefix, job.suffix) if p)
        key = (instance, job.digest_function, job.key)
        stored = self.cas.action_cache.entries.get(key)
        cacheable = (response.status.code == code_pb2.OK and response.result.exit_code == 0
                     and not job.action.do_not_cache)
        if cacheable:
            if stored is None:
                self.violate(f"ac: {w.key} completed {job.name}, which succeeded, without "
                             f"putting its result in the ActionCache as {key}")
            elif stored.SerializeToString(deterministic=True) != \
                    response.result.SerializeToString(deterministic=True):
                self.violate(f"ac: the ActionCache holds another result for {job.name} "
                             "than the one reported")
            return
        if stored is not None:
            self.violate(f"ac: {w.key} put {job.name}'s result in the ActionCache, but it "
                         f"must not be cached (status {response.status.code}, exit "
                         f"{response.result.exit_code}, do_not_cache "
                         f"{job.action.do_not_cache})")
        found = re.search(r"historical_execute_response ([0-9a-f]+)-(\d+)", response.message)
        if found is None:
            self.violate(f"ac: {job.name}'s message names no HistoricalExecuteResponse: "
                         f"{response.message!r}")
            return
        d = re_pb2.Digest(hash=found[1], size_bytes=int(found[2]))
        function = dg.function_from_enum(job.digest_function)
        if not self.cas.has(d, function):
            self.violate(f"ac: the HistoricalExecuteResponse of {job.name} is not in the CAS")
            return
        record = bbcas_pb2.HistoricalExecuteResponse.FromString(self.cas.get(d, function))
        if record.action_digest != job.digest or \
                record.execute_response.status != response.status:
            self.violate(f"ac: the HistoricalExecuteResponse of {job.name} does not match it")

    def response(self, w: WorkerSeen, *, desired: rw_pb2.DesiredState | None = None,
                 next_in: float) -> rw_pb2.SynchronizeResponse:
        w.due = time.time() + next_in
        w.late_flagged = False
        response = rw_pb2.SynchronizeResponse(desired_state=desired)
        response.next_synchronization_at.FromNanoseconds(int(w.due * 1e9))
        return response

    def idle(self, w: WorkerSeen) -> rw_pb2.SynchronizeResponse:
        w.expected, w.executing = ("idle",), False
        return self.response(w, desired=rw_pb2.DesiredState(idle=empty_pb2.Empty()),
                             next_in=self.idle_resync_s)

    def assign(self, w: WorkerSeen, job: Job) -> rw_pb2.SynchronizeResponse:
        if job.state != "executing" or job.worker != w.key:
            self._check_capacity(w)
            job.state, job.worker = "executing", w.key
            job.assignments += 1
        w.job, w.stage = job, STAGES[0]
        w.expected, w.executing = ("executing", job.key, STAGES[0]), True
        executing = rw_pb2.DesiredState.Executing(
            action_digest=job.digest, action=job.action, queued_timestamp=job.queued,
            auxiliary_metadata=job.auxiliary, instance_name_suffix=job.suffix,
            digest_function=job.digest_function)
        return self.response(w, desired=rw_pb2.DesiredState(executing=executing),
                             next_in=self.busy_sync_s)

    def _check_capacity(self, w: WorkerSeen) -> None:
        commands = self.commands(w.process)
        actions = sum(1 for x in self.workers.values()
                      if x.process == w.process and x.job is not None)
        if self.commands_per_process and commands >= self.commands_per_process:
            self.violate(f"capacity: {w.process} asked for work while {commands} of its "
                         f"actions are short of uploading_outputs (at most "
                         f"{self.commands_per_process})")
        if self.actions_per_process and actions >= self.actions_per_process:
            self.violate(f"capacity: {w.process} asked for work while holding {actions} "
                         f"actions (at most {self.actions_per_process})")

    async def next_work(self, w: WorkerSeen, prefer_idle: bool) -> rw_pb2.SynchronizeResponse:
        """bb's getNextTask: an action if one is queued, else hold the call (unless the
        worker prefers being idle) until one is or idle_poll_s passes."""
        if prefer_idle:
            return self.idle(w)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.idle_poll_s
        while True:
            if self.queue:
                return self.assign(w, self.queue.pop(0))
            if loop.time() >= deadline:
                return self.idle(w)
            await self._work_or_timeout(deadline - loop.time())


def _summary(request: rw_pb2.SynchronizeRequest) -> tuple[str, ...]:
    state = request.current_state
    if state.WhichOneof("worker_state") != "executing":
        return ("idle",)
    return ("executing", digest_key(state.executing.action_digest),
            state.executing.WhichOneof("execution_state") or "")


class _OperationQueue(rw_grpc.OperationQueueServicer):
    def __init__(self, double: BuildbarnSchedulerDouble):
        self.d = double

    async def Synchronize(self, request: rw_pb2.SynchronizeRequest, context):
        d = self.d
        now = time.time()
        if request.instance_name_prefix != d.instance_name_prefix:
            d.violate(f"prefix: instance_name_prefix {request.instance_name_prefix!r}, "
                      f"expected {d.instance_name_prefix!r}")
        props = [(p.name, p.value) for p in request.platform.properties]
        if any(a >= b for a, b in zip(props, props[1:], strict=False)):
            d.violate(f"platform: properties not sorted: {props}")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "Platform properties are not lexicographically sorted")
        if not request.worker_id:
            d.violate("worker_id: empty")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "No worker ID")
        refused = d.check_size_class(request.size_class)
        if refused is not None:
            d.refused.append(refused)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, refused)
        kind = request.current_state.WhichOneof("worker_state")
        if kind is None or (kind == "executing" and not request.current_state.executing
                            .WhichOneof("execution_state")):
            d.violate(f"state: {dict(request.worker_id)} sent no current state or no stage")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "Worker did not provide its current state")
        w = d._worker(dict(request.worker_id))
        w.last_seen = now
        siblings = [x for x in d.workers.values() if x.process == w.process and x is not w]
        if siblings and w.process not in d._unnamed and (
                "thread" not in w.worker_id or any("thread" not in x.worker_id
                                                   for x in siblings)):
            d._unnamed.add(w.process)
            d.violate(f"worker_id: {w.process} runs several threads, not all with a "
                      "'thread' key")
        if w.busy:
            deadline = asyncio.get_running_loop().time() + OVERLAP_GRACE_S
            while w.busy and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.01)
            if w.busy:
                d.violate(f"overlap: {w.key} called while its previous call is in progress")
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                    "Worker is already synchronizing with the scheduler")
        summary = _summary(request)
        sync = Sync(at=now, worker=w.key, thread=request.worker_id.get("thread", ""),
                    state=summary[-1] if kind == "executing" else "idle",
                    action=summary[1] if kind == "executing" else "",
                    prefer_idle=request.prefer_being_idle)
        d.syncs.append(sync)
        self._check_timing(w, summary, now)
        w.busy = True
        w.calls += 1
        w.due, w.executing = None, False
        try:
            response = await self._synchronize(w, request, summary)
        except asyncio.CancelledError:
            sync.answer = "cut"
            if d.assign_on_cut and d.queue and w.job is None and summary[0] == "idle":
                # As when bb assigns an action to a poll the worker is cutting: the answer
                # is lost, and the worker's next idle report gets the action again.
                d.assign(w, d.queue.pop(0))
            raise
        finally:
            w.busy = False
            w.last_seen = time.time()
        desired = response.desired_state.WhichOneof("worker_state") \
            if response.HasField("desired_state") else None
        sync.answer = {"idle": "idle", None: "continue"}.get(
            desired, f"executing {w.job.name if w.job else '?'}")
        return response

    def _check_timing(self, w: WorkerSeen, summary: tuple[str, ...], now: float) -> None:
        if w.due is None:
            return
        if summary == w.expected and now < w.due - self.d.early_slack_s:
            self.d.violate(f"early: {w.key} called {w.due - now:.2f}s before "
                           f"next_synchronization_at with nothing new ({summary[-1]})")
        if w.executing and not w.late_flagged and now > w.due + self.d.late_slack_s:
            w.late_flagged = True
            self.d.violate(f"late: {w.key} called {now - w.due:.2f}s after "
                           "next_synchronization_at")

    async def _synchronize(self, w: WorkerSeen, request: rw_pb2.SynchronizeRequest,
                           summary: tuple[str, ...]) -> rw_pb2.SynchronizeResponse:
        d = self.d
        prefer_idle = request.prefer_being_idle
        if summary[0] == "idle":
            if w.job is not None:  # it lost our answer: bb sends the same action again
                return d.resend(w, w.job)
            return await d.next_work(w, prefer_idle)
        _, key, stage = summary
        job = w.job
        if job is None or job.key != key:
            last = w.last_completed
            if stage == "completed" and last is not None and last.key == key:
                # The answer to its completion was lost; it says it again.
                return d.assign(w, job) if job is not None else await d.next_work(w, prefer_idle)
            if w.may_be_unknown:  # we forgot it in a restart: it cannot know
                w.may_be_unknown = False
            else:
                given = job.name if job is not None else "nothing"
                d.violate(f"given: {w.key} reports {stage} on {key}, but was given {given}")
            return d.assign(w, job) if job is not None else d.idle(w)
        if stage == "completed":
            response = request.current_state.executing.completed
            if not response.HasField("result") and response.status.code == 0:
                d.violate(f"response: {w.key} completed {job.name} without an ExecuteResponse")
            if job.stages[-1:] != ["completed"]:
                job.stages.append("completed")
            w.job, w.stage, w.last_completed = None, "", job
            if job.state == "executing":
                d.check_action_cache_write(w, job, response)
                d._end(job, "completed", response)
            return await d.next_work(w, prefer_idle)
        if STAGES.index(stage) < STAGES.index(w.stage or STAGES[0]):
            d.violate(f"order: {w.key} went back from {w.stage} to {stage} on {job.name}")
        w.stage = stage
        if job.stages[-1:] != [stage]:
            job.stages.append(stage)
        if job.revoke_requested:
            w.job, w.stage = None, ""
            d._end(job, "revoked")
            return d.idle(w)
        w.expected, w.executing = summary, True
        return d.response(w, next_in=d.busy_sync_s)
