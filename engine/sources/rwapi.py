"""Remote Workers API (google.devtools.remoteworkers.v1test2.Bots): the embedded server and
BuildGrid.

One bot session per worker. `claim` is one UpdateBotSession round: the session carries every
lease we hold (ACTIVE while it runs, COMPLETED with its result once done). Without news the
round is a long-poll, cut short by `wake`; a reply lost to a cut poll costs nothing, since the
next reply lists the same leases. A lease missing from a reply was taken back (cancelled, or
given to another bot after our session expired) and is revoked.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import grpc
from google.rpc import code_pb2, status_pb2

from engine.proto import bots_grpc, bots_pb2, re_pb2, worker_pb2
from engine.sources.protocol import SourceUnavailable, Stage
from engine.task import ActionOutcome, ActionTask

log = logging.getLogger(__name__)

POLL_DEADLINE_S = 30.0
# While every slot is busy there is nothing to ask for: no poll is held open then (each costs
# the scheduler a round of lease bookkeeping), only a renewal this often, far inside
# BuildGrid's session keepalive (120 s in its reference config).
FULL_RENEW_S = 20.0
DIGEST_FUNCTION_PROPERTY = "digest-function"
ACTION_DIGEST_PROPERTY = "action-digest"  # "hash/size" (the embedded server sends it)
# Session errors that mean the scheduler no longer knows us: start a new session.
_LOST_CODES = (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)


@dataclass
class _Lease:
    id: str
    outcome: ActionOutcome | None = None  # set when finished, until the server has it
    uploading: bool = False  # the command has exited: it no longer takes a slot


class RwapiSource:
    protocol = "rwapi"
    hands_back = True

    def __init__(self, channel: grpc.aio.Channel, *, target: str, bot_id: str,
                 capacity: int = 1, instance_name: str = "",
                 properties: dict[str, str] | None = None,
                 milli_cpu: int = 0, memory_bytes: int = 0):
        self.target = target
        self.on_revoked = lambda task_id: None
        self._stub = bots_grpc.BotsStub(channel)
        self._bot_id = bot_id
        self._instance = instance_name
        self._properties = properties or {}
        self._resources = {"milli_cpu": milli_cpu, "memory_bytes": memory_bytes}
        self._leases: dict[str, _Lease] = {}
        self._changed = asyncio.Event()
        self._session: bots_pb2.BotSession | None = None
        self._draining = False
        self._capacity = capacity
        self._pending_offers: list[ActionTask] = []
        self._last_reply = float("-inf")  # loop time of the last UpdateBotSession reply

    def _worker(self) -> worker_pb2.Worker:
        worker = worker_pb2.Worker()
        device = worker.devices.add(handle=self._bot_id)
        for key, value in sorted(self._properties.items()):
            device.properties.add(key=key, value=value)
        # Leases that only upload hold no run slot: the capacity grows by them, and the
        # embedded server also frees their resources (BuildGrid only reads the capacity).
        uploading = [lease.id for lease in self._leases.values()
                     if lease.uploading and lease.outcome is None]
        worker.configs.add(key="capacity", value=str(self._capacity + len(uploading)))
        if uploading:
            worker.configs.add(key="uploading", value=",".join(uploading))
        for key, amount in self._resources.items():
            if amount:
                worker.configs.add(key=key, value=str(amount))
        return worker

    async def connect(self) -> None:
        if self._session is not None:
            return  # a dropped connection keeps the session: the next round tells
        request = bots_pb2.CreateBotSessionRequest(
            parent=self._instance,
            bot_session=bots_pb2.BotSession(bot_id=self._bot_id, status=self._status(),
                                             worker=self._worker()))
        try:
            self._session = await self._stub.CreateBotSession(
                request, wait_for_ready=True, timeout=POLL_DEADLINE_S)
        except grpc.aio.AioRpcError as e:
            raise SourceUnavailable(f"CreateBotSession: {e.code().name}: {e.details()}") from None
        log.info("bot session %s created for %s", self._session.name, self._bot_id)
        self._pending_offers = self._accept(self._session)

    def _status(self) -> bots_pb2.BotStatus:
        return bots_pb2.BotStatus.BOT_TERMINATING if self._draining else bots_pb2.BotStatus.OK

    def wake(self) -> None:
        self._changed.set()

    def report(self, task_id: str, stage: Stage) -> None:
        lease = self._leases.get(task_id)
        if lease is not None and stage == Stage.UPLOADING:
            lease.uploading = True

    async def complete(self, task_id: str, outcome: ActionOutcome) -> None:
        lease = self._leases.get(task_id)
        if lease is None:
            lease = self._leases[task_id] = _Lease(id=task_id)  # an offer handed straight back
        lease.outcome = outcome
        self._changed.set()

    def begin_drain(self) -> None:
        self._draining = True
        self._changed.set()

    async def close(self) -> None:
        """One last round: the results not yet sent, and BOT_TERMINATING when draining."""
        if self._session is None:
            return
        session, _ = self._build_session()
        try:
            await self._stub.UpdateBotSession(
                bots_pb2.UpdateBotSessionRequest(name=session.name, bot_session=session),
                timeout=10.0)
        except grpc.aio.AioRpcError as e:
            log.warning("could not close the bot session: %s", e.code().name)
        self._session = None

    async def claim(self, free: int) -> list[ActionTask]:
        if self._pending_offers:  # leases that came with CreateBotSession
            offers, self._pending_offers = self._pending_offers, []
            return offers
        self._changed.clear()
        session, reported = self._build_session()
        loop = asyncio.get_running_loop()
        if free <= 0 and not reported and not self._draining and \
                loop.time() - self._last_reply < FULL_RENEW_S:
            try:
                await asyncio.wait_for(self._changed.wait(),
                                       FULL_RENEW_S - (loop.time() - self._last_reply))
            except TimeoutError:
                pass
            return []
        call = self._stub.UpdateBotSession(
            bots_pb2.UpdateBotSessionRequest(name=session.name, bot_session=session),
            timeout=POLL_DEADLINE_S)
        try:
            if reported:
                reply = await call
            else:
                reply = await self._poll(call)
                if reply is None:
                    return []
        except grpc.aio.AioRpcError as e:
            if e.code() in _LOST_CODES:
                log.warning("bot session lost (%s); its leases are revoked", e.details())
                self._session = None
                for lease_id in list(self._leases):
                    if self._leases.pop(lease_id).outcome is None:
                        self.on_revoked(lease_id)
            raise SourceUnavailable(f"UpdateBotSession: {e.code().name}: {e.details()}") \
                from None
        for lease_id in reported:
            self._leases.pop(lease_id, None)
        self._session = reply
        self._last_reply = loop.time()
        return self._accept(reply)

    async def _poll(self, call) -> bots_pb2.BotSession | None:
        """Waits for the reply, or gives the poll up when there is news to send."""
        call_future = asyncio.ensure_future(call)
        waiter = asyncio.ensure_future(self._changed.wait())
        done, _ = await asyncio.wait([call_future, waiter], return_when=asyncio.FIRST_COMPLETED,
                                     timeout=1.0 if self._draining else None)
        waiter.cancel()
        if call_future in done:
            return call_future.result()
        call.cancel()
        try:
            await call_future
        except (asyncio.CancelledError, grpc.aio.AioRpcError):
            pass
        return None

    def _build_session(self) -> tuple[bots_pb2.BotSession, list[str]]:
        current = self._session
        if current is None:
            raise RuntimeError("no bot session: connect() comes first")
        session = bots_pb2.BotSession(name=current.name, bot_id=self._bot_id,
                                      version=current.version, status=self._status())
        session.worker.CopyFrom(self._worker())
        reported = []
        for lease in self._leases.values():
            pb = session.leases.add(id=lease.id)
            if lease.outcome is None:
                pb.state = bots_pb2.LeaseState.ACTIVE
                continue
            pb.state = bots_pb2.LeaseState.COMPLETED
            status = lease.outcome.status
            if lease.outcome.retry:  # BuildGrid and the embedded server retry UNAVAILABLE
                status = status_pb2.Status(code=code_pb2.UNAVAILABLE, message=status.message)
            pb.status.CopyFrom(status)
            pb.result.Pack(lease.outcome.result)
            reported.append(lease.id)
        return session, reported

    def _accept(self, reply: bots_pb2.BotSession) -> list[ActionTask]:
        offered = {lease.id: lease for lease in reply.leases}
        for lease_id, lease in list(self._leases.items()):
            if lease_id not in offered and lease.outcome is None:
                del self._leases[lease_id]
                self.on_revoked(lease_id)
        tasks = []
        for lease_id, pb in offered.items():
            if pb.state == bots_pb2.LeaseState.CANCELLED:  # how older BuildGrids cancel
                held = self._leases.pop(lease_id, None)
                if held is not None and held.outcome is None:
                    self.on_revoked(lease_id)
                continue
            if lease_id in self._leases:
                continue
            if pb.state not in (bots_pb2.LeaseState.PENDING, bots_pb2.LeaseState.ACTIVE):
                continue
            lease = self._leases[lease_id] = _Lease(id=lease_id)
            try:
                tasks.append(_task_from_lease(pb, self._instance))
            except ValueError as e:
                lease.outcome = ActionOutcome(status=status_pb2.Status(
                    code=code_pb2.INVALID_ARGUMENT, message=str(e)))
                self._changed.set()
        return tasks


def _task_from_lease(lease: bots_pb2.Lease, instance_name: str) -> ActionTask:
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
                      instance_name=instance_name, action_digest=action_digest)
