"""OutcomeExecutor: the one place where raised errors become an action's status.

A client's fault is the client's status, never retried: malformed inputs (InputError) and
paths the kernel refuses while the inputs are staged or the command started (ENAMETOOLONG,
ELOOP) are INVALID_ARGUMENT. A full disk (ENOSPC, EDQUOT) is RESOURCE_EXHAUSTED, naming the
path and what was being done, and is not retried either: in embedded mode every worker
shares that disk, and the scheduler would turn a retry into UNAVAILABLE after five more
fills. Any other OSError is this machine's trouble: INTERNAL, retried elsewhere. A remote CAS
that fails (joined mode) is UNAVAILABLE, retried too. Whatever
was raised, the status is never OK (outputs that could not be captured are no result).
"""

from __future__ import annotations

import asyncio
import logging

from google.rpc import code_pb2

from engine import errors, logs
from engine.cas.remote_wire import RemoteCasError
from engine.pipeline.context import ActionContext, Executor
from engine.pipeline.inputs import InputError, MissingBlobs
from engine.pipeline.outputs import OutputError

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
            ctx.retry = ctx.status.code == code_pb2.UNAVAILABLE  # e.g. the remote CAS failed
        except RemoteCasError as e:  # joined mode: the scheduler's CAS refused our outputs
            log.warning("action %s: the remote CAS failed: %s", ctx.task.id, e)
            ctx.status.CopyFrom(errors.to_status(errors.Unavailable(f"remote CAS: {e}")))
            ctx.retry = True
        except OSError as e:
            ctx.status.CopyFrom(errors.to_status(self._os_error(ctx, e)))
            ctx.retry = ctx.status.code == code_pb2.INTERNAL
        except Exception as e:
            log.exception("action %s crashed the pipeline", ctx.task.id)
            ctx.status.CopyFrom(errors.to_status(e))
            ctx.retry = ctx.status.code == code_pb2.INTERNAL
        else:
            return
        # A scheduler's CAS may quote a task's credentials back in its error.
        ctx.status.message = logs.scrub(ctx.status.message)
        if ctx.status.code == code_pb2.OK:  # no error may pass for a result
            ctx.status.CopyFrom(errors.to_status(errors.Internal("the pipeline failed")))
            ctx.retry = True

    @staticmethod
    def _os_error(ctx: ActionContext, e: OSError) -> errors.StokerError:
        doing = _phase(ctx)
        paths = errors.os_error_paths(e)
        where = f" ({paths})" if paths else ""
        reason = e.strerror or str(e)
        if e.errno in errors.NO_SPACE:
            log.error("action %s: disk full while %s%s: %s", ctx.task.id, doing, where, reason)
            return errors.ResourceExhausted(f"the worker's disk is full: {reason} while "
                                            f"{doing}{where}")
        if e.errno in errors.CLIENT_PATH and ctx.tree is not None and ctx.run is None:
            return errors.InvalidArgument(f"the inputs or the Command name a path the "
                                          f"kernel refuses while {doing}: {reason}{where}")
        # Disk trouble on this machine: another worker may well succeed.
        log.exception("action %s failed on this worker while %s", ctx.task.id, doing)
        return errors.Internal(f"worker I/O error while {doing}: {e}")


def _phase(ctx: ActionContext) -> str:
    """What the pipeline was doing, from how far ctx got."""
    if ctx.tree is None:
        return "fetching the inputs"
    if ctx.action_dir is None:
        return "staging the inputs"
    if ctx.run is None:
        return "running the command"
    return "capturing the outputs"
