"""Fixtures for the monitor tests: real `python -m engine up` processes with their HTTP
endpoints on free loopback ports (helpers to read them are in support.py)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.support import RUNNING, Client, StokerProcess, start


@pytest.fixture(autouse=True)
def _stoker_log_on_failure(request: pytest.FixtureRequest) -> Iterator[None]:
    marks = {id(p): p.log_size() for p in RUNNING}
    yield
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        for p in RUNNING:
            print(f"\n[{p.address}] " + p.log_tail(since=marks.get(id(p), 0)))


@pytest.fixture(scope="module")
def base_dir() -> Iterator[Path]:
    # Searchable by 'nobody', who runs the actions when the tests run as root.
    base = Path(tempfile.mkdtemp(prefix="stoker-monitor-", dir="/tmp"))
    base.chmod(0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def stoker(base_dir: Path) -> Iterator[StokerProcess]:
    process = start(StokerProcess(base_dir / "data", base_dir / "stoker.log", workers=2,
                                  concurrency=2))
    yield process
    process.stop()


@pytest.fixture(scope="module")
def client(stoker: StokerProcess) -> Iterator[Client]:
    c = Client(stoker.address)
    yield c
    c.close()


@pytest.fixture
def stoker_factory(base_dir: Path) -> Iterator[Callable[..., StokerProcess]]:
    mine: list[StokerProcess] = []

    def make(name: str, **kwargs) -> StokerProcess:
        process = StokerProcess(base_dir / name, base_dir / f"{name}.log", **kwargs)
        mine.append(process)
        return process

    yield make
    for process in mine:
        process.stop()
