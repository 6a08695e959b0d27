"""Shared by every test directory."""

import os
import shutil
import tempfile
from pathlib import Path

import pytest

_TESTS = Path(__file__).parent
# Directories whose tests start Stoker, Bazel or BuildGrid (with PostgreSQL): `slow`, left
# out of `make check`, except the modules named below, which run in this process. Elsewhere
# a module or a test says so itself (pytestmark, @pytest.mark.slow).
_SLOW_DIRS = [_TESTS / name for name in ("adversarial", "buildgrid", "e2e", "integration")]
_FAST_MODULES = [_TESTS / "integration" / "test_upload_paths.py"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path in _FAST_MODULES:
            continue
        if any(item.path.is_relative_to(d) for d in _SLOW_DIRS):
            item.add_marker(pytest.mark.slow)


# Each test's report per phase (item.rep_setup, rep_call, rep_teardown), so fixtures can
# print a Stoker's log when the test they served failed.
@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


@pytest.fixture
def open_dir():
    """A directory every user can reach (pytest's own tmp dirs are private to root), for
    tests that run actions as another user."""
    path = tempfile.mkdtemp(prefix="stoker-worker-test-")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path)
