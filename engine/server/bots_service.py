"""The Remote Workers API Bots service: how workers lease actions from the embedded server.

Wire conventions, the same BuildGrid uses so one worker talks to both: a lease's payload is
the Action packed in an Any; a finished lease comes back COMPLETED with its `status` (OK,
DEADLINE_EXCEEDED with a partial result, FAILED_PRECONDITION for missing inputs...) and the
ActionResult packed in `result`; UNAVAILABLE or INTERNAL hand the action back for a retry.
worker.configs "capacity" is how many leases a bot runs at once, "milli_cpu" and
"memory_bytes" what the size estimates of its leases may add up to (engine/resources.py),
and "uploading" the comma-separated leases whose command has exited and that only upload
outputs now (they count against neither).
Stoker adds the action's digest function as the requirement property "digest-function"
(absent means SHA-256) and its digest as "action-digest" (hash/size, for logs).
"""

from __future__ import annotations

import time

from google.protobuf import timestamp_pb2

from engine.errors import InvalidArgument, NotFound
from engine.proto import bots_grpc, bots_pb2, re_pb2, worker_pb2
from engine.server import grpc_errors
from engine.server.scheduler import BotSessionState, ReportedLease, Scheduler

MAX_LONG_POLL_S = 20.0
DIGEST_FUNCTION_PROPERTY = "digest-function"
ACTION_DIGEST_PROPERTY = "action-digest"  # "hash/size": for the worker's logs


def _config(worker: worker_pb2.Worker, key: str, default: int, minimum: int) -> int:
    for i, config in enumerate(worker.configs):
        if config.key == key:
            value = config.value
            if not (value.isascii() and value.isdigit()) or int(value) < minimum:
                raise InvalidArgument(f"bot_session.worker.configs[{i}]: {key} "
                                      f"{config.value!r} must be an integer >= {minimum}")
            return int(config.value)
    return default


def _capacity(worker: worker_pb2.Worker) -> int:
    return _config(worker, "capacity", 1, 1)


def _uploading(worker: worker_pb2.Worker) -> set[str]:
    """Leases whose command has exited (their outputs upload): they no longer hold the
    resources their estimates reserved."""
    for config in worker.configs:
        if config.key == "uploading":
            return {lease for lease in config.value.split(",") if lease}
    return set()


class BotsService(bots_grpc.BotsServicer):
    def __init__(self, scheduler: Scheduler, keepalive_s: float):
        self._scheduler = scheduler
        self._keepalive_s = keepalive_s

    @grpc_errors.unary
    async def CreateBotSession(self, request, context):
        bot = request.bot_session
        if not bot.bot_id:
            raise InvalidArgument("bot_session.bot_id is required")
        session = self._scheduler.create_session(
            bot.bot_id, _capacity(bot.worker), _config(bot.worker, "milli_cpu", 0, 0),
            _config(bot.worker, "memory_bytes", 0, 0))
        return self._reply(session, bot)

    @grpc_errors.unary
    async def UpdateBotSession(self, request, context):
        bot = request.bot_session
        if request.name != bot.name:
            raise InvalidArgument(f"name {request.name!r} does not match bot_session.name "
                                  f"{bot.name!r}")
        session = self._scheduler.session(request.name)
        if session is None:
            raise NotFound(f"bot session {request.name!r} does not exist (expired or replaced); "
                           "create a new one")
        reported = [self._reported(i, lease) for i, lease in enumerate(bot.leases)]
        accepting = bot.status == bots_pb2.BotStatus.OK
        news = self._scheduler.update_session(session, reported, accepting,
                                              _capacity(bot.worker), _uploading(bot.worker))
        if not accepting and not session.leases:
            self._scheduler.close_session(session.name)
            return self._reply(session, bot)
        if not news:
            remaining = context.time_remaining()
            timeout = MAX_LONG_POLL_S if remaining is None else min(MAX_LONG_POLL_S,
                                                                    0.8 * remaining)
            if timeout > 0.05:
                await self._scheduler.wait_for_news(session, timeout)
        return self._reply(session, bot)

    def _reported(self, i: int, lease: bots_pb2.Lease) -> ReportedLease:
        if lease.state != bots_pb2.LeaseState.COMPLETED:
            return ReportedLease(id=lease.id, completed=False)
        result = None
        if lease.HasField("result"):
            result = re_pb2.ActionResult()
            if not lease.result.Unpack(result):
                raise InvalidArgument(f"bot_session.leases[{i}].result must hold an "
                                      f"ActionResult, not {lease.result.type_url}")
        return ReportedLease(id=lease.id, completed=True, status=lease.status, result=result)

    def _reply(self, session: BotSessionState, bot: bots_pb2.BotSession) -> bots_pb2.BotSession:
        reply = bots_pb2.BotSession(name=session.name, bot_id=session.bot_id, status=bot.status,
                                    version=bot.version)
        reply.worker.CopyFrom(bot.worker)
        reply.expire_time.CopyFrom(_timestamp(time.time() + self._keepalive_s))
        for job in session.leases.values():
            lease = reply.leases.add(
                id=job.name,
                state=(bots_pb2.LeaseState.ACTIVE if job.name in session.acknowledged
                       else bots_pb2.LeaseState.PENDING))
            lease.payload.Pack(job.action)
            d = job.action_digest
            lease.requirements.properties.add(key=ACTION_DIGEST_PROPERTY,
                                              value=f"{d.hash}/{d.size}")
            if job.action_digest.function != "sha256":
                lease.requirements.properties.add(key=DIGEST_FUNCTION_PROPERTY,
                                                  value=job.action_digest.function)
        return reply


def _timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts
