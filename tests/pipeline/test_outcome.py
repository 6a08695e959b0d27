"""OutcomeExecutor: what a raised error becomes, and what its status may say."""

import asyncio

from google.rpc import code_pb2

from engine import errors, logs
from engine.pipeline.context import ActionContext
from engine.pipeline.outcome import OutcomeExecutor
from engine.proto import re_pb2
from engine.task import ActionTask


class _Raises:
    def __init__(self, error: Exception):
        self.error = error

    async def execute(self, ctx: ActionContext) -> None:
        raise self.error


def _outcome(error: Exception) -> ActionContext:
    ctx = ActionContext(task=ActionTask(id="t", action=re_pb2.Action()))
    asyncio.run(OutcomeExecutor(_Raises(error)).execute(ctx))
    return ctx


def test_a_remote_cas_failure_is_retried_elsewhere():
    ctx = _outcome(errors.Unavailable("the remote CAS went away"))
    assert ctx.status.code == code_pb2.UNAVAILABLE and ctx.retry


def test_a_credential_quoted_back_in_an_error_never_reaches_the_status():
    jwt = "eyJ-a-task-jwt-quoted-back-by-a-cas"
    logs.redact(jwt)
    ctx = _outcome(errors.FailedPrecondition(f"refused token {jwt}"))
    assert jwt not in ctx.status.message and logs.REDACTED in ctx.status.message
    assert not ctx.retry
