"""What the scheduler doubles (buildbarn_scheduler.py, buildbuddy_scheduler.py) share: their
address, serving and stopping a gRPC server with a watchdog beside it, `async with`, the list
of broken rules, and waiting for a condition."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Self, TypeVar

import grpc


class SchedulerDouble:
    """A base for the doubles: they set `port` (0: any) and define start(), stop(), close()
    and _watch() (the watchdog, run while they serve)."""

    UNTIL_POLL_S = 0.02  # how often until() looks at its condition

    port: int

    def __init__(self) -> None:
        self.violations: list[str] = []
        self._server: grpc.aio.Server | None = None
        self._watchdog: asyncio.Task | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def target(self) -> str:
        return f"grpc://{self.address}"

    async def start(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    async def _watch(self) -> None:
        raise NotImplementedError

    async def _serve(self, server: grpc.aio.Server) -> None:
        """Listens on 127.0.0.1:port (the same one again after a restart), serves, and starts
        the watchdog."""
        port = server.add_insecure_port(f"127.0.0.1:{self.port}")
        if port == 0:
            raise OSError(f"the double cannot listen on 127.0.0.1:{self.port}")
        self.port = port
        await server.start()
        self._server = server
        self._watchdog = asyncio.create_task(self._watch())

    async def _stop_serving(self, grace: float) -> None:
        """The watchdog ended, then the server stopped (calls in progress fail)."""
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
            self._watchdog = None
        if self._server is not None:
            await self._server.stop(grace=grace)
            self._server = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()
        self.close()

    # ---- the test's side ---------------------------------------------------------------

    def violate(self, message: str) -> None:
        self.violations.append(message)

    def take_violations(self, fragment: str) -> list[str]:
        """Removes and returns the violations mentioning fragment (for tests that provoke
        them on purpose)."""
        taken = [v for v in self.violations if fragment in v]
        self.violations = [v for v in self.violations if fragment not in v]
        return taken

    async def until(self, condition: Callable[[], bool], timeout: float = 10.0,
                    what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} not reached within {timeout}s; violations: "
                                     f"{self.violations}")
            await asyncio.sleep(self.UNTIL_POLL_S)


D = TypeVar("D", bound=SchedulerDouble)


def checked_doubles(cls: type[D], root: Path) -> Iterator[Callable[..., D]]:
    """For a test's fixture (`yield from`): makes doubles of cls under root with the given
    keywords; after the test, each must be stopped and have seen no rule broken."""
    made: list[D] = []

    def make(**kwargs) -> D:
        double = cls(root / f"double-{len(made)}", **kwargs)
        made.append(double)
        return double

    yield make
    for double in made:
        assert double._server is None, "the test left the scheduler double running"
        assert not double.violations, "the scheduler double saw rules broken:\n  " + \
            "\n  ".join(double.violations)
