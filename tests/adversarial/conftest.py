"""Fixtures for the adversarial tests (helpers and the Guard are in adv_support.py): a Stoker
per test module, a client, extra instances on demand, the sentinel tree, and a marker per
test whose processes are killed afterwards."""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.adversarial.adv_support import Guard, kill_marked, make_sentinel, remove_tree
from tests.integration.support import RUNNING, Client, StokerProcess, start


@pytest.fixture(scope="module")
def base_dir() -> Iterator[Path]:
    # Under /tmp, not pytest's 0700 basetemp: action uids must reach their exec roots.
    base = Path(tempfile.mkdtemp(prefix="stoker-adv-", dir="/tmp"))
    base.chmod(0o755)
    yield base
    remove_tree(base)


@pytest.fixture(scope="module")
def sentinel(base_dir: Path) -> Path:
    return make_sentinel(base_dir)


@pytest.fixture(scope="module")
def stoker(base_dir: Path, sentinel: Path) -> Iterator[StokerProcess]:
    """The module's Stoker: one worker, two actions at once."""
    process = start(StokerProcess(base_dir / "data", base_dir / "stoker.log", workers=1,
                                  concurrency=2))
    yield process
    process.stop()


@pytest.fixture(scope="module")
def client(stoker: StokerProcess) -> Iterator[Client]:
    c = Client(stoker.address)
    yield c
    c.close()


@pytest.fixture
def stoker_factory(base_dir: Path, request: pytest.FixtureRequest
                   ) -> Iterator[Callable[..., StokerProcess]]:
    """Extra instances (own data dir unless data_dir= is given), stopped after the test;
    their logs are printed when it failed."""
    mine: list[StokerProcess] = []

    def make(name: str, data_dir: Path | None = None, **kwargs) -> StokerProcess:
        kwargs.setdefault("workers", 1)
        kwargs.setdefault("concurrency", 2)
        p = StokerProcess(data_dir or base_dir / name, base_dir / f"{name}.log", **kwargs)
        mine.append(p)
        return p

    yield make
    report = getattr(request.node, "rep_call", None)
    for p in mine:
        if report is not None and report.failed:
            print(f"\n[{p.address} {p.data_dir.name}] " + p.log_tail(limit=6000))
        p.stop(grace=20)


@pytest.fixture
def mark() -> Iterator[str]:
    """This test's marker; whatever still carries it afterwards is SIGKILLed (our own
    survivors, by pid) so that one test's leftovers never attack the next."""
    m = f"advmark-{uuid.uuid4().hex[:12]}"
    yield m
    kill_marked(m)


@pytest.fixture
def guard(stoker: StokerProcess, client: Client, sentinel: Path, base_dir: Path,
          mark: str) -> Guard:
    return Guard(stoker, client, sentinel, base_dir, mark)


@pytest.fixture(autouse=True)
def _stoker_log_on_failure(request: pytest.FixtureRequest) -> Iterator[None]:
    """When a test fails, print what each running Stoker logged during it."""
    marks = {id(p): p.log_size() for p in RUNNING}
    yield
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        for p in RUNNING:
            print(f"\n[{p.address}] " + p.log_tail(since=marks.get(id(p), 0), limit=4000))
