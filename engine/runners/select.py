"""Which runner takes an action: the isolation type its platform asks for
(`workload-isolation-type`, as BuildBuddy's clients send it), else the executor's
`isolation.type`. A type this executor cannot run is refused, never run another way."""

from __future__ import annotations

from collections.abc import Mapping

from engine.errors import FailedPrecondition
from engine.platform import value_of
from engine.runners.bare import BareRunner
from engine.runners.protocol import Platform, Runner

ISOLATION_PROPERTY = "workload-isolation-type"


class RunnerChoice:
    def __init__(self, runners: Mapping[str, Runner], default: str):
        if default not in runners:
            raise ValueError(f"no runner for the default isolation type {default!r}")
        self.runners = dict(runners)
        self.default = default

    def choose(self, platform: Platform) -> Runner:
        wanted = value_of(platform, ISOLATION_PROPERTY) or self.default
        runner = self.runners.get(wanted)
        if runner is None:
            raise FailedPrecondition(
                f"platform property {ISOLATION_PROPERTY}={wanted!r}: this executor runs "
                f"{', '.join(sorted(self.runners))} only")
        return runner


def runners_for(default: str, bare: BareRunner) -> RunnerChoice:
    """The runners a worker offers."""
    return RunnerChoice({BareRunner.name: bare}, default)
