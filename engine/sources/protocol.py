"""The one interface between the worker loop and a scheduler: a WorkSource.

Each scheduler protocol (Remote Workers API, BuildBuddy's scheduler, Buildbarn's remoteworker)
is an adapter behind it. Wire messages stop in the adapter: the loop and the pipeline only see
ActionTask, Stage and ActionOutcome. Local concurrency is the loop's business; a source never
hands out more tasks than `claim` was told there are free slots for.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Protocol

from engine.task import ActionOutcome, ActionTask


class Stage(enum.Enum):
    """Where an action is, reported to the scheduler as its protocol allows."""

    FETCHING = "fetching"
    EXECUTING = "executing"
    UPLOADING = "uploading"  # the command has exited; its outputs are going up
    COMPLETED = "completed"


class SourceUnavailable(Exception):
    """The scheduler cannot be reached or dropped us. The loop backs off and calls
    `connect` again; tasks the scheduler has taken back were already revoked."""


class SourceRefused(SourceUnavailable):
    """The scheduler answers, but refuses this worker as it is configured (the message names
    the key). Reconnecting at once cannot help: the loop says so in the log and /statusz
    and asks again only now and then (the scheduler's configuration may change)."""


class WorkSource(Protocol):
    protocol: str  # "rwapi", "buildbuddy", "buildbarn": for logs and /statusz
    target: str  # where it connects (never carries a credential)
    # Whether a task handed back (outcome.retry) is run elsewhere. False (Buildbarn: the
    # scheduler can only fail it): while draining, the loop runs what it is still given.
    hands_back: bool
    # Set by the loop: called with a task id the scheduler took back (cancelled it, or gave
    # it to another worker after losing us). The loop stops that action; no outcome is due.
    on_revoked: Callable[[str], None]

    async def connect(self) -> None:
        """Dial and register. Raises SourceUnavailable."""

    async def claim(self, free: int) -> list[ActionTask]:
        """Wait for work: at most `free` new tasks (0 while draining or full: then it only
        keeps the registration alive and flushes reports). Returns early, maybe empty, when
        `wake` is called. Raises SourceUnavailable."""

    def wake(self) -> None:
        """Cut a waiting `claim` short: a slot freed, an outcome is ready, a drain began."""

    def report(self, task_id: str, stage: Stage) -> None:
        """Best-effort progress, sent in the background or with the next claim."""

    async def complete(self, task_id: str, outcome: ActionOutcome) -> None:
        """The task's result. outcome.retry asks the scheduler to run it again elsewhere
        (that is also how a drain hands work back). May be sent with the next claim."""

    def begin_drain(self) -> None:
        """Tell the scheduler (now or on the next claim) to send no more work."""

    async def close(self) -> None:
        """Leave: after a drain every outcome has been sent; otherwise best effort."""
