"""Shared by every test directory."""

import os
import shutil
import tempfile

import pytest


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
