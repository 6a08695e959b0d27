"""WorkerLoop: takes work from one WorkSource and runs it through the pipeline.

The loop, not the scheduler, decides how many actions run here: `capacity` commands at once,
plus as many again whose command has exited and whose outputs are still going up (each slot
has two uids for that reason: engine/pipeline/identities.py). It reconnects with jittered
backoff, and on stop it drains: no new work, running actions get `drain_grace_s` to finish,
the rest are handed back for another worker, then the source is closed.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from google.rpc import code_pb2, status_pb2

from engine.sources.protocol import SourceRefused, SourceUnavailable, Stage, WorkSource
from engine.task import ActionOutcome, ActionTask

log = logging.getLogger(__name__)

Handler = Callable[[ActionTask, Callable[[Stage], None]], Awaitable[ActionOutcome]]
# A command that has exited frees its run slot at once, but the scheduler is told only if the
# upload is still going after this long: most finish sooner, and the completion says it all.
# The embedded server answers in microseconds; a remote scheduler's round trip costs more.
EARLY_RELEASE_AFTER_S = 0.005
EARLY_RELEASE_REMOTE_S = 0.1
BACKOFF_FIRST_S = 0.1
BACKOFF_MAX_S = 5.0
REFUSED_RETRY_S = 30.0  # a scheduler that refuses this worker's configuration: ask again


@dataclass
class _Running:
    task: ActionTask
    job: asyncio.Task | None = None
    stage: Stage = Stage.FETCHING


def handed_back(reason: str) -> ActionOutcome:
    """An outcome that gives the task back to the scheduler to run elsewhere."""
    return ActionOutcome(status=status_pb2.Status(code=code_pb2.UNAVAILABLE, message=reason),
                         retry=True)


# A worker that cannot reach its scheduler this long exits, and the supervisor starts a new
# one: longer than a scheduler's restart, short enough that a broken channel is not forever.
GIVE_UP_AFTER_S = 300.0


class WorkerLoop:
    def __init__(self, source: WorkSource, handle: Handler, capacity: int, *,
                 drain_grace_s: float, early_release_s: float = EARLY_RELEASE_AFTER_S,
                 on_connection: Callable[[bool], None] | None = None,
                 give_up_after_s: float = GIVE_UP_AFTER_S,
                 on_refused: Callable[[str | None], None] | None = None):
        self._source = source
        self._handle = handle
        self._capacity = max(1, capacity)
        self._drain_grace_s = drain_grace_s
        self._early_release_s = early_release_s
        self._on_connection = on_connection
        self._on_refused = on_refused  # told the scheduler's refusal, None once it accepts
        self._refused: str | None = None
        self._give_up_after_s = give_up_after_s
        self.gave_up = False  # run() returned because the scheduler stayed unreachable
        self._connected: bool | None = None
        self._running: dict[str, _Running] = {}
        self._done: dict[str, ActionOutcome] = {}  # finished, not yet accepted by the source
        source.on_revoked = self._revoke
        self.tasks_run = 0  # counted for tests and /statusz

    @property
    def in_flight(self) -> int:
        return len(self._running) + len(self._done)

    def free_slots(self) -> int:
        commands = sum(1 for r in self._running.values() if r.stage != Stage.UPLOADING)
        return max(0, min(self._capacity - commands,
                          2 * self._capacity - len(self._running) - len(self._done)))

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        waker = asyncio.ensure_future(self._wake_on(stop))
        drain_deadline: float | None = None
        backoff = BACKOFF_FIRST_S
        unreachable_since: float | None = None
        try:
            while True:
                if stop.is_set() and drain_deadline is None:
                    drain_deadline = loop.time() + self._drain_grace_s
                    log.info("draining: %d action(s) in flight", self.in_flight)
                    self._source.begin_drain()
                draining = drain_deadline is not None
                if drain_deadline is not None and loop.time() >= drain_deadline:
                    self._hand_back_all("the worker is shutting down")
                try:
                    if not self._connected:
                        await self._source.connect()
                        self._set_connected(True)
                        unreachable_since = None  # it answered: not a broken channel
                    await self._flush()
                    if self._done:  # finished while the others were sent: no wake is lost
                        continue
                    if draining and not self._running and not self._done:
                        await self._source.close()
                        return
                    # Draining, a source that cannot hand work back may still be given
                    # some (an action its scheduler assigned as the drain began): run it.
                    free = 0 if draining and self._source.hands_back else self.free_slots()
                    offered = await self._source.claim(free)
                    backoff = BACKOFF_FIRST_S
                    unreachable_since = None
                    self._set_refused(None)
                    self._start(offered, free, draining)
                except Exception as e:
                    if not isinstance(e, SourceUnavailable):  # a bug: never the whole worker
                        log.exception("%s source failed", self._source.protocol)
                    self._set_connected(False)
                    if drain_deadline is not None and (not self.in_flight
                                                       or loop.time() >= drain_deadline):
                        log.warning("scheduler unreachable while draining; leaving: %s", e)
                        self._abandon_all()
                        return
                    if isinstance(e, SourceRefused):
                        # A configuration the scheduler refuses: a new process would be
                        # refused the same. Said once, asked again at the slowest pace.
                        self._set_refused(str(e))
                        unreachable_since = None
                        backoff = REFUSED_RETRY_S
                    if unreachable_since is None:
                        unreachable_since = loop.time()
                    elif loop.time() - unreachable_since > self._give_up_after_s:
                        # A channel can break for good (threads it could not start under a
                        # pid limit, say): a fresh process gets a fresh one. Not ready
                        # meanwhile (disconnected), and the supervisor restarts us.
                        log.error("%s scheduler %s unreachable for %.0fs: restarting this "
                                  "worker", self._source.protocol, self._source.target,
                                  loop.time() - unreachable_since)
                        self.gave_up = True
                        return
                    if not isinstance(e, SourceRefused):
                        log.warning("%s scheduler %s: %s; retrying in %.1fs",
                                    self._source.protocol, self._source.target, e, backoff)
                    try:
                        await asyncio.wait_for(asyncio.shield(stop.wait()),
                                               backoff if not draining else min(backoff, 1.0))
                    except TimeoutError:
                        pass
                    backoff = min(backoff * 2, BACKOFF_MAX_S) * (0.8 + 0.4 * random.random())
        finally:
            waker.cancel()
            self._abandon_all()
            self._set_connected(False)

    async def _wake_on(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self._source.wake()

    def _set_refused(self, why: str | None) -> None:
        if why != self._refused:
            self._refused = why
            if why is not None:
                log.error("%s scheduler %s refuses this worker: %s; asking again every "
                          "%.0fs", self._source.protocol, self._source.target, why,
                          REFUSED_RETRY_S)
            if self._on_refused is not None:
                self._on_refused(why)

    def _set_connected(self, connected: bool) -> None:
        if connected != self._connected:
            self._connected = connected
            if self._on_connection is not None:
                self._on_connection(connected)

    async def _flush(self) -> None:
        """Hands every finished outcome to the source; what it cannot take stays for the
        next round (after a reconnect)."""
        # At once: a source may spend round trips on each (close a stream, end a lease).
        ids = list(self._done)
        results = await asyncio.gather(*(self._source.complete(i, self._done[i]) for i in ids),
                                       return_exceptions=True)
        lost = None
        for task_id, result in zip(ids, results, strict=True):
            if isinstance(result, SourceUnavailable):
                lost = result
            elif isinstance(result, BaseException):
                raise result
            else:
                self._done.pop(task_id, None)
        if lost is not None:
            raise lost

    def _start(self, offered: list[ActionTask], free: int, draining: bool) -> None:
        for i, task in enumerate(offered):
            if task.id in self._running or task.id in self._done:
                continue  # offered again while we still hold it
            if (draining and self._source.hands_back) or i >= free:
                # Never trust the scheduler with our concurrency: more than we asked for
                # goes straight back.
                self._done[task.id] = handed_back(
                    "the worker is shutting down" if draining else "the worker is full")
                self._source.wake()
                continue
            running = _Running(task=task)
            self._running[task.id] = running
            running.job = asyncio.create_task(self._run_one(running))

    async def _run_one(self, running: _Running) -> None:
        task = running.task
        loop = asyncio.get_running_loop()

        def event(stage: Stage) -> None:
            running.stage = stage
            self._source.report(task.id, stage)
            if stage == Stage.UPLOADING:
                loop.call_later(self._early_release_s, self._wake_if_running, task.id)

        try:
            outcome = await self._handle(task, event)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the pipeline reports failures itself; this is a last resort
            log.exception("task %s crashed the worker", task.id)
            outcome = handed_back(f"the worker crashed: {e}")
        if self._running.pop(task.id, None) is None:
            return  # revoked meanwhile: nobody wants the outcome
        self.tasks_run += 1
        self._done[task.id] = outcome
        self._source.report(task.id, Stage.COMPLETED)
        self._source.wake()

    def _wake_if_running(self, task_id: str) -> None:
        if task_id in self._running:
            self._source.wake()

    def _revoke(self, task_id: str) -> None:
        running = self._running.pop(task_id, None)
        self._done.pop(task_id, None)
        if running is not None and running.job is not None:
            log.info("task %s was taken back by the scheduler; stopping it", task_id)
            running.job.cancel()

    def _hand_back_all(self, reason: str) -> None:
        for task_id, running in list(self._running.items()):
            if running.job is not None:
                running.job.cancel()
            del self._running[task_id]
            self._done[task_id] = handed_back(reason)

    def _abandon_all(self) -> None:
        for running in self._running.values():
            if running.job is not None:
                running.job.cancel()
        self._running.clear()
