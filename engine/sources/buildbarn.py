"""Buildbarn's worker protocol (buildbarn.remoteworker.OperationQueue/Synchronize): bb_scheduler.

Buildbarn gives each worker_id one action at a time, so this source runs one Synchronize
"thread" per action it may hold, each with a worker_id of its own ({"hostname", "worker",
"thread"}, like bb_worker's runner threads) and its own state:

    idle ──Synchronize(idle)──▶ executing: started → fetching_inputs → running →
    uploading_outputs ──Synchronize(completed{ExecuteResponse})──▶ idle or the next action

An executing thread reports at the scheduler's next_synchronization_at, or at once when its
stage changes (the scheduler answers those calls at once). An idle thread asks only while the
worker loop has a free slot for it: its Synchronize(idle) long-polls until the scheduler hands
it an action; a completion sent while there is a free slot asks for the next action the same
way, otherwise it carries prefer_being_idle and is answered at once. A desired state of idle
(or of another action) while executing means the scheduler took the action back.

There are twice as many threads as the loop runs commands: an action whose command exited
keeps its thread while its outputs upload (the scheduler sees uploading_outputs), and the loop
starts the next one meanwhile. A new thread asks only once those uploading stages have
reached the scheduler, so its view of this worker never holds more commands than we run.

Draining sends prefer_being_idle on every call and cuts idle long-polls short; each cut poll
is followed by one non-blocking Synchronize(idle, prefer_being_idle), because the scheduler
may have assigned an action just before the cut. It then re-sends it (up to 9 times, then
fails it), and we run it: a worker cannot hand an action back to bb_scheduler without
failing it, so the loop runs what it is still given while it drains (within the grace).
A failed Synchronize keeps the thread's state; it is sent again once `connect` succeeds.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import re
import socket
import time
from dataclasses import dataclass, field

import grpc
from google.protobuf import any_pb2, empty_pb2, timestamp_pb2
from google.rpc import code_pb2, status_pb2

from engine import digest as dg
from engine.config import Config
from engine.proto import bbcas_pb2, re_pb2, rw_grpc, rw_pb2
from engine.sources.protocol import SourceRefused, SourceUnavailable, Stage
from engine.sources.results import ResultStore
from engine.task import ActionOutcome, ActionTask

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0
CALL_TIMEOUT_S = 30.0  # a call the scheduler answers at once (executing, prefer_being_idle)
POLL_TIMEOUT_S = 180.0  # a long-poll: bb_scheduler holds idle calls for up to 2 minutes
CLAIM_WAIT_S = 30.0  # an idle claim returns after this long (the loop calls again)
UPLOADS_REPORTED_WAIT_S = 2.0  # at most this long before asking, see the module docstring
CLOSE_FLUSH_S = 10.0  # on close, how long outcomes still unsent may take to go out
MAX_SYNC_DELAY_S = 600.0  # a next_synchronization_at further out than this is not believed
BUSY_RETRY_S = 0.05  # "already synchronizing": our cut call is still ending on the server
BUSY_RETRIES = 100

# Stages in the order the protocol allows (CurrentState.Executing's oneof).
_STAGES = ("started", "fetching_inputs", "running", "uploading_outputs")
_STAGE_OF = {Stage.FETCHING: "fetching_inputs", Stage.EXECUTING: "running",
             Stage.UPLOADING: "uploading_outputs"}
# bb_scheduler's INVALID_ARGUMENTs about the worker's configuration (in_memory_build_queue.go
# Synchronize, platform/key.go NewKey), not about one state it was sent.
_CONFIG_REFUSAL = re.compile(r"size class|platform|instance name", re.IGNORECASE)
# Words bb-storage refuses as an instance name component (they would make URLs ambiguous).
_RESERVED = {"blobs", "uploads", "actions", "actionResults", "operations", "capabilities",
             "compressed-blobs"}


class _Interrupted(Exception):
    """A long-poll was cut short by us (drain, close, fewer free slots)."""


class _Unreachable(Exception):
    """A Synchronize failed; the thread waits for the next `connect`."""


class _Refused(_Unreachable):
    """The scheduler refused a Synchronize as invalid: our configuration, not the network."""


@dataclass
class _Action:
    digest: re_pb2.Digest
    task: ActionTask | None  # None: it cannot run here; only its outcome goes back
    stage: str = "started"
    acked: str = ""  # the last stage the scheduler answered for
    outcome: ActionOutcome | None = None
    delivered: bool = False  # given to the loop by `claim`
    queued: timestamp_pb2.Timestamp | None = None
    auxiliary: list[any_pb2.Any] = field(default_factory=list)


@dataclass
class _Thread:
    index: int
    worker_id: dict[str, str]
    action: _Action | None = None
    due: float = 0.0  # loop time of the scheduler's next_synchronization_at
    asking: bool = False  # holds one of the loop's free slots: may ask for work
    # An idle or completed call went unanswered: the scheduler may think we hold an action.
    unconfirmed: bool = False
    in_call: bool = False
    news: asyncio.Event = field(default_factory=asyncio.Event)
    interrupt: asyncio.Event = field(default_factory=asyncio.Event)


def _retry_status(outcome: ActionOutcome) -> status_pb2.Status:
    # Buildbarn itself fails an action whose worker vanished with UNAVAILABLE, which clients
    # retry; it has no other way to take an action back from a worker.
    return status_pb2.Status(code=code_pb2.UNAVAILABLE,
                             message=outcome.status.message or "the worker handed it back")


def instance_name(prefix: str, suffix: str) -> str:
    """The instance name of an action's storage calls, joined as Buildbarn joins them."""
    if suffix.startswith("/") or suffix.endswith("/") or "//" in suffix:
        raise ValueError(f"instance_name_suffix {suffix!r} has redundant slashes")
    if _RESERVED.intersection(suffix.split("/")):
        raise ValueError(f"instance_name_suffix {suffix!r} holds a reserved word")
    return "/".join(part for part in (prefix, suffix) if part)


class BuildbarnSource:
    protocol = "buildbarn"
    hands_back = False  # bb_scheduler can only fail an action a worker returns

    def __init__(self, channel: grpc.aio.Channel, *, target: str, config: Config, slot: int,
                 name: str, properties: dict[str, str] | None = None,
                 results: ResultStore | None = None):
        self.target = target
        self.on_revoked = lambda task_id: None
        self._channel = channel
        self._stub = rw_grpc.OperationQueueStub(channel)
        self._name = name
        self._prefix = config.instance_name
        self._size_class = config.size_class
        # The worker writes the ActionCache in Buildbarn (bb_worker's caching build
        # executor); the scheduler never does. None: tests of the protocol alone.
        self._results = results
        # bb_scheduler refuses properties not sorted by name, then value.
        self._platform = re_pb2.Platform(properties=[
            re_pb2.Platform.Property(name=k, value=v)
            for k, v in sorted((properties or {}).items())])
        host = socket.gethostname()
        # As bb_worker: a "thread" key only where there is more than one thread (one action
        # at a time: one thread, so that its worker_id stays the same across restarts).
        capacity = max(1, config.slot_capacity(slot))
        count = 1 if capacity == 1 else 2 * capacity
        self._threads = [
            _Thread(index=i, worker_id={"hostname": host, "worker": name,
                                        **({"thread": str(i)} if count > 1 else {})})
            for i in range(count)]
        self._by_task: dict[str, _Thread] = {}
        self._offers: list[_Thread] = []  # holding an action not yet given to the loop
        self._seq = itertools.count(1)
        self._draining = False
        self._closing = False
        self._broken: str | None = None
        self._refused = False  # _broken is the scheduler refusing our configuration
        self._healthy = asyncio.Event()
        self._changed = asyncio.Event()  # cuts a waiting claim short
        self._answered = asyncio.Event()  # some Synchronize was answered
        self._jobs: list[asyncio.Task] = []

    # ---- WorkSource ----------------------------------------------------------------------

    async def connect(self) -> None:
        if self._closing:
            raise SourceUnavailable("the source is closed")
        try:
            await asyncio.wait_for(self._channel.channel_ready(), CONNECT_TIMEOUT_S)
        except TimeoutError:
            raise SourceUnavailable(f"no connection within {CONNECT_TIMEOUT_S:.0f}s") from None
        self._broken = None
        self._refused = False
        self._healthy.set()
        if not self._jobs:
            self._jobs = [asyncio.create_task(self._run(t), name=f"buildbarn-thread-{t.index}")
                          for t in self._threads]

    async def claim(self, free: int) -> list[ActionTask]:
        self._raise_if_broken()
        self._changed.clear()
        tasks = self._take_offers(free)
        self._grant(free - len(tasks) - len(self._offers))
        if tasks:
            return tasks
        # Draining, the loop watches its grace period between claims.
        await _wait(self._changed, 1.0 if self._draining else CLAIM_WAIT_S)
        self._raise_if_broken()
        return self._take_offers(free)

    def _raise_if_broken(self) -> None:
        if self._broken:
            raise (SourceRefused if self._refused else SourceUnavailable)(self._broken)

    def wake(self) -> None:
        self._changed.set()

    def report(self, task_id: str, stage: Stage) -> None:
        t = self._by_task.get(task_id)
        new = _STAGE_OF.get(stage)
        if t is None or t.action is None or new is None or t.action.outcome is not None:
            return
        if _STAGES.index(new) > _STAGES.index(t.action.stage):  # never backwards
            t.action.stage = new
            t.news.set()

    async def complete(self, task_id: str, outcome: ActionOutcome) -> None:
        t = self._by_task.get(task_id)
        if t is None or t.action is None or t.action.task is None \
                or t.action.task.id != task_id:
            return  # taken back meanwhile: the scheduler wants no outcome
        action = t.action
        if not outcome.retry:
            outcome = _with_scheduler_metadata(action, outcome)
        if self._results is not None and not outcome.retry:
            outcome = await self._store(action, outcome)
            if t.action is not action:
                return  # taken back while it was stored
        action.outcome = outcome
        t.news.set()

    async def _store(self, action: _Action, outcome: ActionOutcome) -> ActionOutcome:
        """As bb_worker's caching build executor (pkg/builder/caching_build_executor.go,
        Execute): a result with status OK, exit code 0 and no do_not_cache goes into the
        ActionCache under the action digest; any other outcome is kept in the CAS as a
        HistoricalExecuteResponse (under the digest of its bytes), for the record. A store
        that fails fails an action that had succeeded, with the store's status."""
        task = action.task
        assert task is not None and self._results is not None
        cached = (outcome.ok and outcome.result.exit_code == 0
                  and not task.action.do_not_cache)
        try:
            if cached:
                await self._results.put_action_result(
                    task.instance_name, task.digest_function, action.digest, outcome.result,
                    task.cache_metadata)
                return dataclasses.replace(outcome, message=(
                    f"Action details (cached result): action {_key(action.digest)}"))
            record = bbcas_pb2.HistoricalExecuteResponse(
                action_digest=action.digest, execute_response=_execute_response(action, outcome))
            kept = await self._results.put_blob(task.instance_name, task.digest_function,
                                                record.SerializeToString(), task.cache_metadata)
            return dataclasses.replace(outcome, message=(
                "Action details (uncached result): historical_execute_response "
                f"{kept.hash}-{kept.size}"))
        except Exception as e:
            what = ("store cached action result" if cached
                    else "store historical execute response")
            log.warning("task %s: could not %s: %s", task.id, what, e)
            if not outcome.ok:
                return outcome
            code = e.code().value[0] if isinstance(e, grpc.aio.AioRpcError) \
                else code_pb2.INTERNAL
            details = e.details() if isinstance(e, grpc.aio.AioRpcError) else str(e)
            return dataclasses.replace(outcome, status=status_pb2.Status(
                code=code, message=f"Failed to {what}: {details}"))

    def begin_drain(self) -> None:
        # Actions assigned but not yet given to the loop stay offered: handing one back
        # would fail it (bb_scheduler has no other way to take it back); the loop runs them.
        self._draining = True
        self._grant(0)
        self._changed.set()

    async def close(self) -> None:
        """Sends what is left (outcomes, confirmations of cut polls), then stops the threads.
        An action still only offered is handed back: it ends UNAVAILABLE, which clients
        retry, as when bb_scheduler loses a worker."""
        self._draining = True
        self._grant(0)
        for t in self._offers:
            if t.action is not None and t.action.outcome is None:
                t.action.outcome = ActionOutcome(status=status_pb2.Status(
                    code=code_pb2.UNAVAILABLE, message="the worker is shutting down"), retry=True)
                t.news.set()
        self._offers.clear()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CLOSE_FLUSH_S
        while self._jobs and not self._broken and loop.time() < deadline and not all(
                self._settled(t) for t in self._threads):
            self._answered.clear()
            await _wait(self._answered, 0.1)
        unsent = sum(1 for t in self._threads if not self._settled(t))
        if unsent:
            log.warning("leaving %s with %d worker thread(s) not settled", self.target, unsent)
        self._closing = True
        for job in self._jobs:
            job.cancel()
        await asyncio.gather(*self._jobs, return_exceptions=True)
        self._jobs = []

    # ---- the loop's slots ----------------------------------------------------------------

    def _take_offers(self, free: int) -> list[ActionTask]:
        tasks: list[ActionTask] = []
        while self._offers and len(tasks) < free:
            t = self._offers.pop(0)
            action = t.action
            if action is None or action.task is None or action.delivered:
                continue
            action.delivered = True
            tasks.append(action.task)
        return tasks

    def _grant(self, want: int) -> None:
        """Lets `want` threads ask for work: threads with an outcome to send first (their
        completion asks for the next action), then idle ones, lowest index first."""
        want = 0 if self._draining else max(0, want)
        asking = [t for t in self._threads if t.asking]
        for t in reversed(asking[want:]):
            t.asking = False
            t.interrupt.set()
            t.news.set()
        count = min(len(asking), want)
        finished = [t for t in self._threads
                    if not t.asking and t.action is not None and t.action.outcome is not None]
        idle = [t for t in self._threads if not t.asking and t.action is None]
        for t in finished + idle:
            if count >= want:
                break
            t.asking = True
            t.news.set()
            count += 1

    @staticmethod
    def _settled(t: _Thread) -> bool:
        if t.in_call:
            return False
        if t.action is None:
            return not t.unconfirmed
        return t.action.outcome is None  # still running: nothing to send yet

    # ---- one thread ----------------------------------------------------------------------

    async def _run(self, t: _Thread) -> None:
        while not self._closing:
            if self._broken:
                await self._healthy.wait()
                continue
            try:
                await self._step(t)
            except _Unreachable as e:
                if self._broken is None and not isinstance(e, _Refused):
                    log.warning("buildbarn scheduler %s: %s", self.target, e)
                self._broken = str(e)
                self._refused = isinstance(e, _Refused)
                self._healthy.clear()
                self._changed.set()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug here must not stop the thread's reports for good
                log.exception("buildbarn worker thread %d failed; going on", t.index)
                await asyncio.sleep(1.0)

    async def _step(self, t: _Thread) -> None:
        """One decision of a thread: wait for something to say, or say it."""
        loop = asyncio.get_running_loop()
        t.news.clear()
        action = t.action
        if action is None:
            if not t.asking:
                if t.unconfirmed:  # see the module docstring: a cut poll
                    await self._sync(t, _idle(), prefer_idle=True, blocking=False)
                else:
                    await t.news.wait()
                return
            if loop.time() < t.due:
                await _wait(t.news, t.due - loop.time())
                return
            await self._uploads_reported(t)
            t.interrupt.clear()
            if t.asking:
                await self._sync(t, _idle(), prefer_idle=False, blocking=True)
            return
        if action.outcome is None:
            if action.stage == action.acked and loop.time() < t.due:
                await _wait(t.news, t.due - loop.time())
                return
            await self._sync(t, self._executing(action), prefer_idle=self._draining,
                             blocking=False)
            return
        ask = t.asking
        if ask:
            await self._uploads_reported(t)
            t.interrupt.clear()
            ask = t.asking
        await self._sync(t, self._completed(action), prefer_idle=not ask, blocking=ask)

    async def _uploads_reported(self, asking: _Thread) -> None:
        """Waits (bounded) until every other thread whose command has exited has told the
        scheduler so, so the scheduler never sees more commands here than the loop runs."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + UPLOADS_REPORTED_WAIT_S

        def lagging() -> bool:
            # A thread that asks too sends its completion in the same call as its ask, so
            # the scheduler drops its stale stage before it assigns anything.
            return any(t is not asking and not t.asking and t.action is not None
                       and (t.action.outcome is not None or t.action.stage == _STAGES[-1])
                       and t.action.acked != _STAGES[-1] for t in self._threads)

        while lagging() and not self._broken and loop.time() < deadline:
            self._answered.clear()
            await _wait(self._answered, deadline - loop.time())

    async def _sync(self, t: _Thread, state: rw_pb2.CurrentState, *, prefer_idle: bool,
                    blocking: bool) -> None:
        request = rw_pb2.SynchronizeRequest(
            worker_id=t.worker_id, instance_name_prefix=self._prefix, platform=self._platform,
            size_class=self._size_class, current_state=state,
            prefer_being_idle=prefer_idle or self._draining)
        sent = t.action
        sent_stage = sent.stage if sent is not None and sent.outcome is None else ""
        completed = state.executing.HasField("completed")
        for _ in range(BUSY_RETRIES):
            try:
                response = await self._call(t, request, blocking)
                break
            except _Interrupted:
                t.unconfirmed = True
                return
            except grpc.aio.AioRpcError as e:
                if sent is None or completed:
                    t.unconfirmed = True
                if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    await asyncio.sleep(BUSY_RETRY_S)
                    continue
                if blocking and e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    return  # a poll that outlived our deadline: ask again
                if e.code() == grpc.StatusCode.INVALID_ARGUMENT and \
                        _CONFIG_REFUSAL.search(e.details() or ""):
                    raise _Refused(self._refusal(e.details() or "")) from None
                raise _Unreachable(f"Synchronize: {e.code().name}: {e.details()}") from None
        else:
            raise _Unreachable("Synchronize: the scheduler keeps answering that this worker "
                               "is already synchronizing")
        self._apply(t, sent, sent_stage, completed, response)

    def _refusal(self, details: str) -> str:
        """bb_scheduler's INVALID_ARGUMENT (in_memory_build_queue.go Synchronize, key.go
        NewKey), with the key of executor.yaml it is about."""
        lower = details.lower()
        if "size class" in lower:
            key = f"size_class (sent: {self._size_class})"
        elif "platform" in lower:
            key = "platform (sent: " + ", ".join(
                f"{p.name}={p.value}" for p in self._platform.properties) + ")"
        elif "instance name" in lower:
            key = f"instance_name (sent: {self._prefix!r})"
        else:
            key = "instance_name"
        return f"INVALID_ARGUMENT: {details}; check {key} in executor.yaml"

    async def _call(self, t: _Thread, request: rw_pb2.SynchronizeRequest,
                    blocking: bool) -> rw_pb2.SynchronizeResponse:
        call = self._stub.Synchronize(request,
                                      timeout=POLL_TIMEOUT_S if blocking else CALL_TIMEOUT_S)
        t.in_call = True
        try:
            if not blocking:
                return await call
            answer = asyncio.ensure_future(call)
            answer.add_done_callback(lambda f: f.cancelled() or f.exception())
            cut = asyncio.ensure_future(t.interrupt.wait())
            try:
                await asyncio.wait([answer, cut], return_when=asyncio.FIRST_COMPLETED)
            finally:
                cut.cancel()
                if not answer.done():
                    call.cancel()
            if answer.done() and not answer.cancelled():
                return answer.result()
            raise _Interrupted
        finally:
            t.in_call = False

    def _apply(self, t: _Thread, sent: _Action | None, sent_stage: str, completed: bool,
               response: rw_pb2.SynchronizeResponse) -> None:
        loop = asyncio.get_running_loop()
        t.unconfirmed = False
        at = response.next_synchronization_at
        delay = at.seconds + at.nanos / 1e9 - time.time()
        t.due = loop.time() + min(max(0.0, delay), MAX_SYNC_DELAY_S)
        self._answered.set()
        if sent is not None and sent_stage:
            sent.acked = sent_stage
        if completed and sent is not None and t.action is sent:
            self._forget(t)  # the scheduler has the outcome
        current = t.action
        desired = (response.desired_state.WhichOneof("worker_state")
                   if response.HasField("desired_state") else None)
        if desired == "executing":
            executing = response.desired_state.executing
            if current is not None and current.digest == executing.action_digest:
                return  # the one we hold: carry on (its outcome, if any, goes next)
            if current is not None:
                self._take_back(t, "the scheduler assigned another action")
            self._accept(t, executing)
        elif desired == "idle" and current is not None:
            self._take_back(t, "the scheduler wants this worker idle")

    def _accept(self, t: _Thread, executing: rw_pb2.DesiredState.Executing) -> None:
        task_id = f"{self._name}/{t.index}/{next(self._seq)}"
        # Assigned means "started" to the scheduler: nothing new to tell it until a stage.
        action = _Action(digest=re_pb2.Digest(hash=executing.action_digest.hash,
                                              size_bytes=executing.action_digest.size_bytes),
                         task=None, acked=_STAGES[0],
                         auxiliary=list(executing.auxiliary_metadata))
        if executing.HasField("queued_timestamp"):
            action.queued = executing.queued_timestamp
        try:
            action.task = self._task(task_id, executing)
        except ValueError as e:
            log.warning("action %s/%d cannot run here: %s", executing.action_digest.hash,
                        executing.action_digest.size_bytes, e)
            action.outcome = ActionOutcome(status=status_pb2.Status(
                code=code_pb2.INVALID_ARGUMENT, message=str(e)))
        t.action = action
        t.asking = False
        self._by_task[task_id] = t
        if action.outcome is not None:
            t.news.set()
            # The slot this thread asked for is free again: the loop's claim grants it anew
            # (else no thread asks for work until the claim times out, CLAIM_WAIT_S later).
            self._changed.set()
        else:  # draining too: see begin_drain
            self._offers.append(t)
            self._changed.set()

    def _task(self, task_id: str, executing: rw_pb2.DesiredState.Executing) -> ActionTask:
        if not executing.HasField("action"):
            raise ValueError("the desired state carries no Action")
        try:
            function = dg.function_from_enum(executing.digest_function)
        except dg.DigestError as e:
            raise ValueError(str(e)) from None
        d = executing.action_digest
        return ActionTask(id=task_id, action=executing.action, digest_function=function,
                          instance_name=instance_name(self._prefix,
                                                      executing.instance_name_suffix),
                          action_digest=f"{d.hash}/{d.size_bytes}")

    def _take_back(self, t: _Thread, reason: str) -> None:
        action = t.action
        self._forget(t)
        if action is None or action.task is None:
            return
        if action.delivered and action.outcome is None:
            log.info("task %s (%s) taken back: %s", action.task.id, action.task.action_digest,
                     reason)
            self.on_revoked(action.task.id)
            self._changed.set()  # its slot is free: the loop claims again

    def _forget(self, t: _Thread) -> None:
        if t.action is not None and t.action.task is not None:
            self._by_task.pop(t.action.task.id, None)
        self._offers = [o for o in self._offers if o is not t]
        t.action = None

    # ---- messages ------------------------------------------------------------------------

    @staticmethod
    def _executing(action: _Action) -> rw_pb2.CurrentState:
        state = rw_pb2.CurrentState()
        state.executing.action_digest.CopyFrom(action.digest)
        getattr(state.executing, action.stage).SetInParent()
        return state

    @staticmethod
    def _completed(action: _Action) -> rw_pb2.CurrentState:
        state = rw_pb2.CurrentState()
        state.executing.action_digest.CopyFrom(action.digest)
        assert action.outcome is not None
        state.executing.completed.CopyFrom(_execute_response(action, action.outcome))
        return state


def _idle() -> rw_pb2.CurrentState:
    return rw_pb2.CurrentState(idle=empty_pb2.Empty())


def _key(d: re_pb2.Digest) -> str:
    return f"{d.hash}-{d.size_bytes}"


def _execute_response(action: _Action, outcome: ActionOutcome) -> re_pb2.ExecuteResponse:
    response = re_pb2.ExecuteResponse()
    if outcome.retry:
        response.status.CopyFrom(_retry_status(outcome))
        return response
    response.message = outcome.message
    response.status.CopyFrom(outcome.status)
    response.result.SetInParent()
    response.result.CopyFrom(outcome.result)
    return response


def _with_scheduler_metadata(action: _Action, outcome: ActionOutcome) -> ActionOutcome:
    """What the scheduler passed along for the result's metadata (unless the pipeline set
    it), in the result itself: the ActionCache gets the result as it is reported."""
    result = re_pb2.ActionResult()
    result.CopyFrom(outcome.result)
    metadata = result.execution_metadata
    if action.queued is not None and not metadata.HasField("queued_timestamp"):
        metadata.queued_timestamp.CopyFrom(action.queued)
    if action.auxiliary and not metadata.auxiliary_metadata:
        metadata.auxiliary_metadata.extend(action.auxiliary)
    return dataclasses.replace(outcome, result=result)


async def _wait(event: asyncio.Event, timeout: float) -> None:
    try:
        await asyncio.wait_for(event.wait(), max(0.0, timeout))
    except TimeoutError:
        pass
