"""Remote Workers API adapter: leases actions over google.devtools.remoteworkers.v1test2.Bots
(the embedded server, or BuildGrid) and turns them into ActionTasks for the pipeline.

One loop owns the session. It keeps an UpdateBotSession long-poll open; when a local lease
finishes it cancels that poll and sends the news at once. The server's reply lists every
lease the session holds, so a reply lost to a cancelled poll costs nothing: the next reply
carries the same leases. A lease missing from a reply was taken back (cancelled, or given to
another bot after our session expired), and its action is stopped here.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc
from google.rpc import code_pb2, status_pb2

from engine.proto import bots_grpc, bots_pb2, re_pb2, worker_pb2
from engine.task import ActionOutcome, ActionTask

log = logging.getLogger(__name__)

POLL_DEADLINE_S = 30.0
DIGEST_FUNCTION_PROPERTY = "digest-function"
ACTION_DIGEST_PROPERTY = "action-digest"  # "hash/size" (the embedded server sends it)
Handler = Callable[[ActionTask, Callable[[], None]], Awaitable[ActionOutcome]]
# A finished command whose upload is still running after this long frees its slot at the
# scheduler; shorter uploads (most) are not worth an extra round trip.
EARLY_RELEASE_AFTER_S = 0.005


@dataclass
class _Lease:
    id: str
    task: asyncio.Task | None = None
    outcome: ActionOutcome | None = None  # set when finished, until the server has it
    uploading: bool = False  # the command has exited; its slot may be leased again


class SessionLost(Exception):
    pass


class RwapiSource:
    # Told when the connection to the scheduler comes or goes (the worker's status file);
    # only on change, never per lease.
    on_connection: Callable[[bool], None] | None = None
    _connected: bool | None = None

    def __init__(self, channel: grpc.aio.Channel, *, bot_id: str, instance_name: str = "",
                 capacity: int = 1, properties: dict[str, str] | None = None,
                 milli_cpu: int = 0, memory_bytes: int = 0):
        self._stub = bots_grpc.BotsStub(channel)
        self._bot_id = bot_id
        self._instance = instance_name
        self._capacity = capacity
        self._properties = properties or {}
        self._resources = {"milli_cpu": milli_cpu, "memory_bytes": memory_bytes}
        self._leases: dict[str, _Lease] = {}
        self._changed = asyncio.Event()
        self._session: bots_pb2.BotSession | None = None
        self._draining = False

    def _worker(self) -> worker_pb2.Worker:
        worker = worker_pb2.Worker()
        device = worker.devices.add(handle=self._bot_id)
        for key, value in sorted(self._properties.items()):
            device.properties.add(key=key, value=value)
        uploading = [lease.id for lease in self._leases.values()
                     if lease.uploading and lease.outcome is None]
        worker.configs.add(key="capacity", value=str(self._capacity + len(uploading)))
        if uploading:
            worker.configs.add(key="uploading", value=",".join(uploading))
        for key, value in self._resources.items():
            if value:
                worker.configs.add(key=key, value=str(value))
        return worker

    async def run(self, handle: Handler, stop: asyncio.Event, drain_grace_s: float) -> None:
        """Lease and run actions until stop is set, then drain: finish what runs within the
        grace period, hand the rest back, and close the session."""
        self._handle = handle
        drain_deadline: float | None = None
        loop = asyncio.get_running_loop()
        backoff = 0.1
        while True:
            if stop.is_set() and not self._draining:
                self._draining = True
                drain_deadline = loop.time() + drain_grace_s
                log.info("draining: %d action(s) in flight", self._running())
            if self._draining and loop.time() >= drain_deadline:
                self._hand_back_all("worker is shutting down")
            try:
                if self._session is None:
                    await self._create()
                self._set_connected(True)
                done = await self._update(stop)
                backoff = 0.1
                if done:
                    self._set_connected(False)
                    return
            except SessionLost as e:
                log.warning("bot session lost (%s); stopping its actions and starting anew", e)
                self._set_connected(False)
                self._abandon_all()
                self._session = None
            except grpc.aio.AioRpcError as e:
                self._set_connected(False)
                if self._draining and (not self._leases or loop.time() >= drain_deadline):
                    log.warning("scheduler unreachable while draining; giving up: %s", e.code())
                    self._abandon_all()
                    return
                log.warning("scheduler call failed (%s); retrying in %.1fs", e.code(), backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0) * (0.8 + 0.4 * random.random())

    def _set_connected(self, connected: bool) -> None:
        if connected != self._connected:
            self._connected = connected
            if self.on_connection is not None:
                self.on_connection(connected)

    def _running(self) -> int:
        return sum(1 for lease in self._leases.values() if lease.outcome is None)

    async def _create(self) -> None:
        request = bots_pb2.CreateBotSessionRequest(
            parent=self._instance,
            bot_session=bots_pb2.BotSession(bot_id=self._bot_id, status=bots_pb2.BotStatus.OK,
                                             worker=self._worker()))
        self._session = await self._stub.CreateBotSession(request, wait_for_ready=True,
                                                          timeout=POLL_DEADLINE_S)
        log.info("bot session %s created for %s", self._session.name, self._bot_id)
        self._accept(self._session)

    def _build_session(self) -> tuple[bots_pb2.BotSession, list[str]]:
        session = bots_pb2.BotSession(
            name=self._session.name, bot_id=self._bot_id, version=self._session.version,
            status=(bots_pb2.BotStatus.BOT_TERMINATING if self._draining
                    else bots_pb2.BotStatus.OK))
        session.worker.CopyFrom(self._worker())
        reported = []
        for lease in self._leases.values():
            pb = session.leases.add(id=lease.id)
            if lease.outcome is None:
                pb.state = bots_pb2.LeaseState.ACTIVE
                continue
            pb.state = bots_pb2.LeaseState.COMPLETED
            status = lease.outcome.status
            if lease.outcome.retry:
                status = status_pb2.Status(code=code_pb2.UNAVAILABLE, message=status.message)
            pb.status.CopyFrom(status)
            pb.result.Pack(lease.outcome.result)
            reported.append(lease.id)
        return session, reported

    async def _update(self, stop: asyncio.Event) -> bool:
        """One UpdateBotSession round. True when a drained session has been closed."""
        self._changed.clear()
        session, reported = self._build_session()
        call = self._stub.UpdateBotSession(
            bots_pb2.UpdateBotSessionRequest(name=session.name, bot_session=session),
            timeout=POLL_DEADLINE_S)
        if not reported:
            # Nothing to tell: wait for the reply, but cut the poll short when a lease
            # finishes or a drain starts.
            waiter = asyncio.ensure_future(self._changed.wait())
            stopper = asyncio.ensure_future(stop.wait()) if not self._draining else None
            call_future = asyncio.ensure_future(call)
            pending = [f for f in (waiter, stopper, call_future) if f is not None]
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED,
                                         timeout=self._poll_timeout())
            for f in (waiter, stopper):
                if f is not None and f not in done:
                    f.cancel()
            if call_future not in done:
                call.cancel()
                try:
                    await call_future
                except (asyncio.CancelledError, grpc.aio.AioRpcError):
                    pass
                return False
            reply = _session_reply(call_future.result)
        else:
            reply = await _await_session_reply(call)
        for lease_id in reported:
            self._leases.pop(lease_id, None)
        self._session = reply
        if self._draining and not self._leases and session.status == \
                bots_pb2.BotStatus.BOT_TERMINATING:
            return True
        self._accept(reply)
        return False

    def _poll_timeout(self) -> float | None:
        return 1.0 if self._draining else None

    def _accept(self, reply: bots_pb2.BotSession) -> None:
        offered = {lease.id: lease for lease in reply.leases}
        for lease_id, lease in list(self._leases.items()):
            if lease_id not in offered and lease.outcome is None and lease.task is not None:
                log.info("lease %s was taken back by the scheduler; stopping it", lease_id)
                lease.task.cancel()
                del self._leases[lease_id]
        for lease_id, pb in offered.items():
            if lease_id in self._leases:
                continue
            if pb.state not in (bots_pb2.LeaseState.PENDING, bots_pb2.LeaseState.ACTIVE):
                continue
            lease = _Lease(id=lease_id)
            self._leases[lease_id] = lease
            if self._draining:
                lease.outcome = _handed_back("worker is shutting down")
                self._changed.set()
                continue
            try:
                task = _task_from_lease(pb)
            except ValueError as e:
                lease.outcome = ActionOutcome(status=status_pb2.Status(
                    code=code_pb2.INVALID_ARGUMENT, message=str(e)))
                self._changed.set()
                continue
            lease.task = asyncio.create_task(self._run_one(lease, task))

    async def _run_one(self, lease: _Lease, task: ActionTask) -> None:
        loop = asyncio.get_running_loop()

        def release_slot() -> None:
            lease.uploading = True
            loop.call_later(EARLY_RELEASE_AFTER_S,
                            lambda: lease.outcome is None and self._changed.set())

        try:
            lease.outcome = await self._handle(task, release_slot)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the pipeline reports failures; this is a last resort
            log.exception("lease %s crashed", lease.id)
            lease.outcome = _handed_back(f"worker crashed: {e}")
        self._changed.set()

    def _hand_back_all(self, reason: str) -> None:
        for lease in self._leases.values():
            if lease.outcome is None:
                if lease.task is not None:
                    lease.task.cancel()
                lease.outcome = _handed_back(reason)

    def _abandon_all(self) -> None:
        for lease in self._leases.values():
            if lease.task is not None and lease.outcome is None:
                lease.task.cancel()
        self._leases.clear()


_LOST_CODES = (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)


def _session_reply(get):
    try:
        return get()
    except grpc.aio.AioRpcError as e:
        if e.code() in _LOST_CODES:
            raise SessionLost(e.details()) from None
        raise


async def _await_session_reply(call):
    try:
        return await call
    except grpc.aio.AioRpcError as e:
        if e.code() in _LOST_CODES:
            raise SessionLost(e.details()) from None
        raise


def _handed_back(reason: str) -> ActionOutcome:
    return ActionOutcome(status=status_pb2.Status(code=code_pb2.UNAVAILABLE, message=reason),
                         retry=True)


def _task_from_lease(lease: bots_pb2.Lease) -> ActionTask:
    action = re_pb2.Action()
    if not lease.payload.Unpack(action):
        raise ValueError(f"lease {lease.id}: payload {lease.payload.type_url!r} is not an Action")
    function = "sha256"
    action_digest = ""
    for prop in lease.requirements.properties:
        if prop.key == DIGEST_FUNCTION_PROPERTY:
            function = prop.value
        elif prop.key == ACTION_DIGEST_PROPERTY:
            action_digest = prop.value
    if function not in ("sha256", "blake3"):
        raise ValueError(f"lease {lease.id}: unsupported digest function {function!r}")
    return ActionTask(id=lease.id, action=action, digest_function=function,
                      action_digest=action_digest)
