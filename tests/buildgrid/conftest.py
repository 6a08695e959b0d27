"""Fixtures for tests against a real BuildGrid 0.9.1 (tests/buildgrid/harness.py).

One PostgreSQL cluster for the session (1 s to start); BuildGrid servers get a fresh database
each. The shared server is per module: a bgd start costs 6-9 s on 2 cores, and tests in one
module may share its queue, while a module that kills or restarts it cannot disturb another.
Tests that restart or kill a server take their own from buildgrid_factory.

The first run builds BuildGrid's venv (Python 3.13, about 40 s) under ~/.cache/stoker-tests.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.buildgrid.harness import BuildGridServer, Postgres, Python313Missing, bgd_venv
from tests.buildgrid.instant_bot import InstantBotProcess

_RUNNING: list[BuildGridServer] = []  # for the logs of a failed test


@pytest.fixture(scope="session")
def buildgrid_pg() -> Iterator[Postgres]:
    try:
        bgd_venv()  # first, so a missing 3.13 skips before a cluster is made
    except Python313Missing as e:
        pytest.skip(str(e))
    with Postgres() as pg:
        yield pg


def _server(workdir: Path, pg: Postgres, **kwargs) -> BuildGridServer:
    server = BuildGridServer(workdir, pg, start=False, **kwargs)
    _RUNNING.append(server)
    server.start()
    return server


def _close(server: BuildGridServer) -> None:
    server.close()
    if server in _RUNNING:
        _RUNNING.remove(server)


@pytest.fixture(scope="module")
def buildgrid(buildgrid_pg: Postgres,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[BuildGridServer]:
    """A tuned BuildGrid for the module, no bot attached."""
    server = _server(tmp_path_factory.mktemp("bgd"), buildgrid_pg)
    yield server
    _close(server)


@pytest.fixture(scope="module")
def instant_bot(buildgrid: BuildGridServer) -> Iterator[InstantBotProcess]:
    """Two instant bots (4 leases each) attached to the module's BuildGrid."""
    with InstantBotProcess(buildgrid.address, buildgrid.dir / "instant_bot.log",
                           lifetime_s=900) as bot:
        yield bot


@pytest.fixture
def buildgrid_factory(buildgrid_pg: Postgres,
                      tmp_path: Path) -> Iterator[Callable[..., BuildGridServer]]:
    """Started BuildGrid servers of the test's own (kwargs as BuildGridServer's), closed
    after it."""
    mine: list[BuildGridServer] = []

    def make(name: str = "bgd", **kwargs) -> BuildGridServer:
        server = _server(tmp_path / name, buildgrid_pg, **kwargs)
        mine.append(server)
        return server

    yield make
    for server in mine:
        _close(server)


@pytest.fixture(autouse=True)
def _buildgrid_log_on_failure(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        for server in _RUNNING:
            print("\n" + server.log_tail())
