"""OutcomeExecutor: the one place where raised errors become an action's status."""

from __future__ import annotations

import asyncio
import logging

from google.rpc import code_pb2

from engine import errors
from engine.pipeline.context import ActionContext, Executor
from engine.worker.inputs import InputError, MissingBlobs
from engine.worker.outputs import OutputError

log = logging.getLogger(__name__)


class OutcomeExecutor:
    def __init__(self, inner: Executor):
        self._inner = inner

    async def execute(self, ctx: ActionContext) -> None:
        try:
            await self._inner.execute(ctx)
        except asyncio.CancelledError:
            raise
        except MissingBlobs as e:
            ctx.status.CopyFrom(errors.to_status(errors.MissingInputs(e.digests)))
        except InputError as e:
            ctx.status.CopyFrom(errors.to_status(errors.InvalidArgument(str(e))))
        except OutputError as e:
            ctx.status.CopyFrom(errors.to_status(errors.FailedPrecondition(str(e))))
        except errors.StokerError as e:
            ctx.status.CopyFrom(errors.to_status(e))
        except OSError as e:
            # Disk trouble on this machine: another worker may well succeed.
            log.exception("action %s failed on this worker", ctx.task.id)
            ctx.status.CopyFrom(errors.to_status(errors.Internal(f"worker I/O error: {e}")))
            ctx.retry = True
        except Exception as e:
            log.exception("action %s crashed the pipeline", ctx.task.id)
            ctx.status.CopyFrom(errors.to_status(e))
            ctx.retry = ctx.status.code == code_pb2.INTERNAL
