"""Shared by every test directory."""

import pytest


# Each test's report per phase (item.rep_setup, rep_call, rep_teardown), so fixtures can
# print a Stoker's log when the test they served failed.
@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report
