"""Which runner takes an action: the isolation type its platform asks for
(`workload-isolation-type`, as BuildBuddy's clients send it), else the executor's
`isolation.type`. A type this executor cannot run is refused, never run another way."""

from __future__ import annotations

from collections.abc import Mapping

from engine.errors import FailedPrecondition
from engine.platform import value_of
from engine.runners.bare import BareRunner
from engine.runners.protocol import Platform, RunAs, Runner
from engine.runners.sandbox import SandboxRunner, find_bwrap, probe

ISOLATION_PROPERTY = "workload-isolation-type"


class RunnerChoice:
    def __init__(self, runners: Mapping[str, Runner], default: str,
                 unavailable: Mapping[str, str] | None = None):
        self.runners = dict(runners)
        self.unavailable = dict(unavailable or {})  # isolation type -> why not here
        if default not in runners:
            why = self.unavailable.get(default, "no runner for it")
            raise ValueError(f"the default isolation type {default!r} cannot run here: {why}")
        self.default = default

    def offered(self) -> list[str]:
        """The isolation types offered, the default first."""
        return [self.default, *sorted(set(self.runners) - {self.default})]

    def choose(self, platform: Platform) -> Runner:
        wanted = value_of(platform, ISOLATION_PROPERTY) or self.default
        runner = self.runners.get(wanted)
        if runner is None:
            why = self.unavailable.get(wanted)
            raise FailedPrecondition(
                f"platform property {ISOLATION_PROPERTY}={wanted!r}: "
                + (f"not available on this executor: {why}" if why else
                   f"this executor runs {', '.join(sorted(self.runners))} only"))
        return runner


def runners_for(default: str, bare: BareRunner, action_ids: RunAs | None) -> RunnerChoice:
    """The runners a worker offers: the bare runner, and each other one this machine can
    run for actions of action_ids (one of them; None: Stoker's own); the rest are refused
    with the reason."""
    runners: dict[str, Runner] = {BareRunner.name: bare}
    unavailable: dict[str, str] = {}
    bwrap = find_bwrap()
    why = probe(bwrap, *(action_ids or (None, None)))
    if why is None and bwrap is not None:
        runners[SandboxRunner.name] = SandboxRunner(bwrap, bare)
    else:
        unavailable[SandboxRunner.name] = why or "unknown"
    return RunnerChoice(runners, default, unavailable)
