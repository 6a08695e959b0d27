"""The embedded scheduler: a queue of jobs and the bot sessions that lease them.

Data flow (all on the server's one event loop, so no locks):

    Execute ──submit()──▶ queue ──_dispatch()──▶ BotSessionState.leases ──▶ UpdateBotSession reply
                                                     ▲                              │
    Execute/WaitExecution ◀── watch(job) ◀── complete() ◀── leases reported COMPLETED ┘

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
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from google.protobuf import timestamp_pb2
from google.rpc import code_pb2, status_pb2

from engine.digest import Digest
from engine.proto import re_pb2

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
    stage: int = QUEUED
    response: re_pb2.ExecuteResponse | None = None
    attempts: int = 0
    queued_at: timestamp_pb2.Timestamp = field(default_factory=now_timestamp)
    session: str | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

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
    capacity: int
    leases: dict[str, Job] = field(default_factory=dict)
    acknowledged: set[str] = field(default_factory=set)  # lease ids the bot has reported
    accepting: bool = True
    last_seen: float = field(default_factory=time.monotonic)
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def free(self) -> int:
        return self.capacity - len(self.leases) if self.accepting else 0


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
    ):
        self._on_result = on_result
        self._keepalive_s = keepalive_s
        self._max_attempts = max_attempts
        self._queue: collections.deque[Job] = collections.deque()
        self._jobs: dict[str, Job] = {}
        self._completed: collections.OrderedDict[str, Job] = collections.OrderedDict()
        self._in_flight: dict[Digest, Job] = {}
        self._sessions: dict[str, BotSessionState] = {}
        self._session_by_bot: dict[str, str] = {}

    # ---- jobs -----------------------------------------------------------------------------

    def submit(self, action_digest: Digest, action: re_pb2.Action, do_not_cache: bool) -> Job:
        """Queue an action; identical cacheable actions already in flight share one job."""
        if not do_not_cache:
            existing = self._in_flight.get(action_digest)
            if existing is not None and not existing.done:
                return existing
        job = Job(name=str(uuid.uuid4()), action_digest=action_digest, action=action,
                  do_not_cache=do_not_cache)
        self._jobs[job.name] = job
        if not do_not_cache:
            self._in_flight[action_digest] = job
        self._queue.append(job)
        self._dispatch()
        return job

    def get(self, name: str) -> Job | None:
        return self._jobs.get(name) or self._completed.get(name)

    async def watch(self, job: Job) -> AsyncIterator[Job]:
        """Yield the job now and on every stage change, until it completes."""
        last = None
        while True:
            changed = job._changed
            if job.stage != last:
                last = job.stage
                yield job
            if job.done:
                return
            await changed.wait()

    def queue_depth(self) -> int:
        return len(self._queue)

    def _finish(self, job: Job, response: re_pb2.ExecuteResponse) -> None:
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
        while self._queue:
            sessions = [s for s in self._sessions.values() if s.free > 0]
            if not sessions:
                return
            session = max(sessions, key=lambda s: s.free)
            job = self._queue.popleft()
            if job.done:
                continue
            job.stage = EXECUTING
            job.attempts += 1
            job.session = session.name
            session.leases[job.name] = job
            session.wake.set()
            job._notify()

    # ---- bot sessions ---------------------------------------------------------------------

    def create_session(self, bot_id: str, capacity: int) -> BotSessionState:
        old = self._session_by_bot.get(bot_id)
        if old is not None:
            self._drop_session(old, "bot restarted with a new session")
        session = BotSessionState(name=str(uuid.uuid4()), bot_id=bot_id, capacity=max(1, capacity))
        self._sessions[session.name] = session
        self._session_by_bot[bot_id] = session.name
        self._dispatch()
        return session

    def session(self, name: str) -> BotSessionState | None:
        return self._sessions.get(name)

    def update_session(self, session: BotSessionState, reported: list[ReportedLease],
                       accepting: bool, capacity: int | None = None) -> bool:
        """Apply a bot's report. True when the reply has news (so no long-poll is needed).

        A bot may change its capacity on any update: Stoker's workers raise it while a
        finished command's outputs upload, so the slot is reused at once."""
        session.last_seen = time.monotonic()
        if capacity is not None:
            session.capacity = max(1, capacity)
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
