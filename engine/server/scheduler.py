"""The embedded scheduler: a queue of jobs and the bot sessions that lease them.

Data flow (all on the server's one event loop, so no locks):

    Execute ──submit()──▶ queue ──_dispatch()──▶ BotSessionState.leases ──▶ UpdateBotSession reply
                                                     ▲                              │
    Execute/WaitExecution ◀── watch(job) ◀── complete() ◀── leases reported COMPLETED ┘

A job nobody watches (no Execute or WaitExecution stream open on it) for orphan_grace_s is
cancelled: taken out of the queue, or out of its bot's leases, which the bot sees missing
from its next reply and stops. Its operation then reports CANCELLED. The grace covers a
client reconnecting with WaitExecution after a dropped stream, as Bazel does.
The server's view of a session's leases is authoritative: every reply carries every lease the
session holds, so a reply lost to a cancelled long-poll is simply sent again. A session that
is replaced (same bot_id: a restarted worker) or expires hands its leases back to the queue.
This module knows nothing of gRPC; bots_service.py and execution_service.py are its edges.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field

from google.protobuf import timestamp_pb2
from google.rpc import code_pb2, status_pb2

from engine.digest import Digest
from engine.proto import re_pb2
from engine.resources import TaskSize

log = logging.getLogger(__name__)

QUEUED = re_pb2.ExecutionStage.QUEUED
EXECUTING = re_pb2.ExecutionStage.EXECUTING
COMPLETED = re_pb2.ExecutionStage.COMPLETED

# Lease statuses that mean "the infrastructure failed, run it again" (as BuildGrid treats them).
RETRIABLE_CODES = {code_pb2.UNAVAILABLE, code_pb2.INTERNAL}
KEEP_COMPLETED_JOBS = 10_000


def now_timestamp() -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.GetCurrentTime()
    return ts


@dataclass(eq=False)
class Job:
    name: str
    action_digest: Digest
    action: re_pb2.Action
    do_not_cache: bool
    size: TaskSize | None = None  # its declared estimate, for admission
    stage: re_pb2.ExecutionStage.Value = QUEUED
    response: re_pb2.ExecuteResponse | None = None
    attempts: int = 0
    queued_at: timestamp_pb2.Timestamp = field(default_factory=now_timestamp)
    session: str | None = None
    watchers: int = 0  # Execute and WaitExecution streams watching it now
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _orphan_timer: asyncio.TimerHandle | None = None  # set while nobody watches

    @property
    def done(self) -> bool:
        return self.stage == COMPLETED

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()


@dataclass(eq=False)
class BotSessionState:
    name: str
    bot_id: str
    capacity: int  # leases at once (raised while finished leases upload)
    milli_cpu: int = 0  # what its leases' estimates may add up to; 0: no bound
    memory_bytes: int = 0
    slots: int = 1  # the capacity it was created with: what an undeclared job's share is of
    uploading: set[str] = field(default_factory=set)  # leases that hold no resources now
    leases: dict[str, Job] = field(default_factory=dict)
    acknowledged: set[str] = field(default_factory=set)  # lease ids the bot has reported
    accepting: bool = True
    last_seen: float = field(default_factory=time.monotonic)
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def free(self) -> int:
        return self.capacity - len(self.leases) if self.accepting else 0

    def fits(self, job: Job) -> bool:
        """Whether job's estimate fits beside the leases this bot runs."""
        size = self.size_of(job)
        held = [self.size_of(j) for name, j in self.leases.items()
                if name not in self.uploading]
        if self.milli_cpu and size.milli_cpu + sum(h.milli_cpu for h in held) > self.milli_cpu:
            return False
        return not self.memory_bytes or \
            size.memory_bytes + sum(h.memory_bytes for h in held) <= self.memory_bytes

    def size_of(self, job: Job) -> TaskSize:
        """A job that declares no size takes one slot's share; one bigger than the whole
        bot counts as the whole bot, so it then runs alone."""
        if job.size is None:
            return TaskSize(self.milli_cpu // self.slots, self.memory_bytes // self.slots)
        return job.size.clamped(self.milli_cpu, self.memory_bytes)


@dataclass
class ReportedLease:
    id: str
    completed: bool
    status: status_pb2.Status | None = None
    result: re_pb2.ActionResult | None = None


class Scheduler:
    def __init__(
        self,
        on_result: Callable[[Job, re_pb2.ExecuteResponse], None],
        *,
        keepalive_s: float = 60.0,
        max_attempts: int = 5,
        orphan_grace_s: float = 60.0,
    ):
        self._on_result = on_result
        self._keepalive_s = keepalive_s
        self.orphan_grace_s = orphan_grace_s
        self._max_attempts = max_attempts
        self._queue: collections.deque[Job] = collections.deque()
        self._jobs: dict[str, Job] = {}
        self._completed: collections.OrderedDict[str, Job] = collections.OrderedDict()
        self._in_flight: dict[Digest, Job] = {}
        self._sessions: dict[str, BotSessionState] = {}
        self._session_by_bot: dict[str, str] = {}

    # ---- jobs -----------------------------------------------------------------------------

    def submit(self, action_digest: Digest, action: re_pb2.Action, do_not_cache: bool,
               size: TaskSize | None = None) -> Job:
        """Queue an action; identical cacheable actions already in flight share one job."""
        if not do_not_cache:
            existing = self._in_flight.get(action_digest)
            if existing is not None and not existing.done:
                return existing
        job = Job(name=str(uuid.uuid4()), action_digest=action_digest, action=action,
                  do_not_cache=do_not_cache, size=size)
        self._jobs[job.name] = job
        if not do_not_cache:
            self._in_flight[action_digest] = job
        self._queue.append(job)
        self._unwatched(job)  # until its Execute stream watches it
        self._dispatch()
        return job

    def get(self, name: str) -> Job | None:
        return self._jobs.get(name) or self._completed.get(name)

    async def watch(self, job: Job) -> AsyncGenerator[Job, None]:
        """Yield the job now and on every stage change, until it completes. While any
        watch is open the job is watched; when the last one ends (the client went away),
        the orphan grace starts."""
        job.watchers += 1
        self._stop_orphan_timer(job)
        try:
            last = None
            while True:
                changed = job._changed
                if job.stage != last:
                    last = job.stage
                    yield job
                if job.done:
                    return
                await changed.wait()
        finally:
            job.watchers -= 1
            if not job.watchers:
                self._unwatched(job)

    def touch(self, job: Job) -> None:
        """Someone asked about the job (GetOperation): an unwatched job's grace restarts."""
        if not job.watchers:
            self._unwatched(job)

    def cancel(self, job: Job, message: str) -> None:
        """Finish a job that has not completed as CANCELLED: out of the queue, or out of
        its bot's leases (the bot stops the action when its next reply lacks the lease)."""
        if job.done:
            return
        if job.stage == QUEUED:
            try:
                self._queue.remove(job)
            except ValueError:
                pass
        session = self._sessions.get(job.session) if job.session else None
        if session is not None and session.leases.pop(job.name, None) is not None:
            session.acknowledged.discard(job.name)
            session.uploading.discard(job.name)
            session.wake.set()  # a long-poll answers now, without the lease
        log.info("cancelling %s (action %s): %s", job.name, job.action_digest, message)
        self._finish(job, re_pb2.ExecuteResponse(status=status_pb2.Status(
            code=code_pb2.CANCELLED, message=message)))
        self._dispatch()

    def _unwatched(self, job: Job) -> None:
        """Start (or restart) the grace after which a job nobody watches is cancelled."""
        self._stop_orphan_timer(job)
        if job.done:
            return
        job._orphan_timer = asyncio.get_running_loop().call_later(
            self.orphan_grace_s, self._cancel_orphan, job)

    def _stop_orphan_timer(self, job: Job) -> None:
        if job._orphan_timer is not None:
            job._orphan_timer.cancel()
            job._orphan_timer = None

    def _cancel_orphan(self, job: Job) -> None:
        job._orphan_timer = None
        if not job.watchers:
            self.cancel(job, f"cancelled: no client watched this execution for "
                             f"{self.orphan_grace_s:g}s (orphan_grace)")

    def queue_depth(self) -> int:
        return len(self._queue)

    def _finish(self, job: Job, response: re_pb2.ExecuteResponse) -> None:
        self._stop_orphan_timer(job)
        job.stage = COMPLETED
        job.response = response
        job.session = None
        self._jobs.pop(job.name, None)
        if self._in_flight.get(job.action_digest) is job:
            del self._in_flight[job.action_digest]
        self._completed[job.name] = job
        while len(self._completed) > KEEP_COMPLETED_JOBS:
            self._completed.popitem(last=False)
        try:
            self._on_result(job, response)
        except Exception:  # a failing cache write must not lose the result
            log.exception("storing the result of %s failed", job.name)
        job._notify()

    def _requeue(self, job: Job, reason: str) -> None:
        job.session = None
        if job.attempts >= self._max_attempts:
            self._finish(job, re_pb2.ExecuteResponse(status=status_pb2.Status(
                code=code_pb2.UNAVAILABLE,
                message=f"action failed on {job.attempts} workers; last: {reason}")))
            return
        log.info("requeueing %s: %s", job.name, reason)
        job.stage = QUEUED
        self._queue.appendleft(job)
        job._notify()
        self._dispatch()

    def _dispatch(self) -> None:
        """Hand queued jobs to bots, oldest first; a head job that fits no bot waits (and
        the jobs behind it with it), so big jobs are not starved by small ones."""
        while self._queue:
            job = self._queue[0]
            if job.done:
                self._queue.popleft()
                continue
            sessions = [s for s in self._sessions.values() if s.free > 0 and s.fits(job)]
            if not sessions:
                return
            session = max(sessions, key=lambda s: s.free)
            self._queue.popleft()
            job.stage = EXECUTING
            job.attempts += 1
            job.session = session.name
            session.leases[job.name] = job
            session.wake.set()
            job._notify()

    # ---- bot sessions ---------------------------------------------------------------------

    def create_session(self, bot_id: str, capacity: int, milli_cpu: int = 0,
                       memory_bytes: int = 0) -> BotSessionState:
        old = self._session_by_bot.get(bot_id)
        if old is not None:
            self._drop_session(old, "bot restarted with a new session")
        session = BotSessionState(name=str(uuid.uuid4()), bot_id=bot_id, capacity=max(1, capacity),
                                  milli_cpu=milli_cpu, memory_bytes=memory_bytes,
                                  slots=max(1, capacity))
        self._sessions[session.name] = session
        self._session_by_bot[bot_id] = session.name
        self._dispatch()
        return session

    def session(self, name: str) -> BotSessionState | None:
        return self._sessions.get(name)

    def update_session(self, session: BotSessionState, reported: list[ReportedLease],
                       accepting: bool, capacity: int | None = None,
                       uploading: set[str] | None = None) -> bool:
        """Apply a bot's report. True when the reply has news (so no long-poll is needed).

        A bot may change its capacity on any update: Stoker's workers raise it while a
        finished command's outputs upload, so the slot is reused at once."""
        session.last_seen = time.monotonic()
        if capacity is not None:
            session.capacity = max(1, capacity)
        if uploading is not None:
            session.uploading = uploading
        news = False
        for lease in reported:
            job = session.leases.get(lease.id)
            if job is None:
                continue  # already completed, cancelled or handed to someone else
            session.acknowledged.add(lease.id)
            if lease.completed:
                news = True
                del session.leases[lease.id]
                session.acknowledged.discard(lease.id)
                self._complete_lease(job, lease)
        session.accepting = accepting
        if not accepting and not session.leases:
            news = True
        self._dispatch()
        return news or self.has_unacknowledged(session)

    def has_unacknowledged(self, session: BotSessionState) -> bool:
        return any(lid not in session.acknowledged for lid in session.leases)

    def _complete_lease(self, job: Job, lease: ReportedLease) -> None:
        status = lease.status or status_pb2.Status(code=code_pb2.OK)
        if status.code in RETRIABLE_CODES:
            self._requeue(job, status.message or code_pb2.Code.Name(status.code))
            return
        result = lease.result or re_pb2.ActionResult()
        result.execution_metadata.queued_timestamp.CopyFrom(job.queued_at)
        self._finish(job, re_pb2.ExecuteResponse(result=result, status=status))

    async def wait_for_news(self, session: BotSessionState, timeout: float) -> None:
        session.wake.clear()
        if self.has_unacknowledged(session):
            return
        try:
            await asyncio.wait_for(session.wake.wait(), timeout)
        except TimeoutError:
            pass
        session.last_seen = time.monotonic()

    def _drop_session(self, name: str, reason: str) -> None:
        session = self._sessions.pop(name, None)
        if session is None:
            return
        if self._session_by_bot.get(session.bot_id) == name:
            del self._session_by_bot[session.bot_id]
        session.wake.set()
        for job in list(session.leases.values()):
            self._requeue(job, f"{reason} ({session.bot_id})")
        session.leases.clear()

    def reap_expired(self) -> None:
        deadline = time.monotonic() - self._keepalive_s
        for name, session in list(self._sessions.items()):
            if session.last_seen < deadline:
                self._drop_session(name, "bot session expired")

    def close_session(self, name: str) -> None:
        self._drop_session(name, "bot closed its session")

    def stats(self) -> dict[str, int]:
        return {
            "queued": len(self._queue),
            "executing": sum(len(s.leases) for s in self._sessions.values()),
            "bots": len(self._sessions),
        }
