"""Fixtures for the integration tests: one shared Stoker for the session, a client, extra
instances on demand (restart tests), and the sentinel that escape attempts would touch.

Layout of the session's scratch directory (searchable by 'nobody', who runs the actions):

    <base>/data/         the shared Stoker's --data-dir (exec roots in data/build/...)
    <base>/sentinel/     world-writable, holds secret.txt: what an escaping action would reach
    <base>/stoker.log    the shared Stoker's stderr
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.support import CANARY, RUNNING, SECRET, Client, StokerProcess, start


@pytest.fixture(scope="session")
def base_dir() -> Iterator[Path]:
    # Not under pytest's basetemp: that is 0700, and actions run as 'nobody' must reach
    # their exec roots below it.
    base = Path(tempfile.mkdtemp(prefix="stoker-it-", dir="/tmp"))
    base.chmod(0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def sentinel(base_dir: Path) -> Path:
    path = base_dir / "sentinel"
    path.mkdir()
    path.chmod(0o777)  # so a write that escaped the exec root would really succeed
    secret = path / "secret.txt"
    secret.write_bytes(SECRET)
    secret.chmod(0o644)
    return path


@pytest.fixture(scope="session")
def stoker(base_dir: Path, sentinel: Path) -> Iterator[StokerProcess]:
    """The shared Stoker: one worker running two actions at once."""
    process = start(StokerProcess(base_dir / "data", base_dir / "stoker.log"))
    yield process
    if process.stop() != 0:
        print(process.log_tail())


@pytest.fixture(scope="session")
def client(stoker: StokerProcess) -> Iterator[Client]:
    c = Client(stoker.address)
    yield c
    c.close()


@pytest.fixture
def stoker_factory(base_dir: Path) -> Iterator[Callable[..., StokerProcess]]:
    """Extra Stoker instances, each with its own data directory; stopped after the test.
    Start them with support.start()."""
    mine: list[StokerProcess] = []

    def make(name: str, **kwargs) -> StokerProcess:
        process = StokerProcess(base_dir / name, base_dir / f"{name}.log", **kwargs)
        mine.append(process)
        return process

    yield make
    for process in mine:
        process.stop()


@pytest.fixture(autouse=True)
def _stoker_log_on_failure(request: pytest.FixtureRequest) -> Iterator[None]:
    """When a test fails, print what each running Stoker logged during it."""
    marks = {id(p): p.log_size() for p in RUNNING}
    yield
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        for p in RUNNING:
            print(f"\n[{p.address}] " + p.log_tail(since=marks.get(id(p), 0)))


# ---- escape detection -----------------------------------------------------------------------


def snapshot(path: Path) -> dict[str, bytes | str]:
    """Every entry under path: file contents, symlink targets, 'dir' for directories."""
    out: dict[str, bytes | str] = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, path)
            if os.path.islink(full):
                out[rel] = "-> " + os.readlink(full)
            elif os.path.isdir(full):
                out[rel] = "dir"
            else:
                with open(full, "rb") as f:
                    out[rel] = f.read()
    return out


def canaries_outside(base: Path, build_dirs: list[Path]) -> list[str]:
    """Entries named like CANARY anywhere under base except the build directories, and at
    the top of / and /tmp (where '..' chains and absolute targets would lead)."""
    found = []
    skip = {str(b) for b in build_dirs}
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = [d for d in dirnames if os.path.join(dirpath, d) not in skip]
        found += [os.path.join(dirpath, n) for n in dirnames + filenames if CANARY in n]
    for top in ("/", "/tmp"):
        found += [os.path.join(top, n) for n in os.listdir(top) if CANARY in n]
    return found


@pytest.fixture
def no_escape(base_dir: Path, sentinel: Path, stoker: StokerProcess) -> Iterator[None]:
    """After the test: the sentinel is unchanged, no canary exists outside data/build, and
    the server is still up."""
    assert snapshot(sentinel) == {"secret.txt": SECRET}
    yield
    assert snapshot(sentinel) == {"secret.txt": SECRET}, "the sentinel directory changed"
    assert canaries_outside(base_dir, [stoker.build_dir]) == []
    assert stoker.alive(), f"stoker died\n{stoker.log_tail()}"
