"""Bazel -> real BuildGrid 0.9.1 -> `stoker executor` (Remote Workers API) as its only bots:
the e2e workspace of tests/e2e builds with the same outputs as locally, failures reach Bazel,
and a worker killed mid-build does not fail it."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.buildgrid.harness import BuildGridServer
from tests.e2e import test_bazel as e2e
from tests.e2e.test_bazel import (
    BAZEL,
    GOOD_TARGETS,
    Bazel,
    LocalReference,
    Result,
    assert_same_outputs,
    collect_outputs,
    run_hello,
)
from tests.integration.support import ExecutorProcess

# The e2e workspace and its local build, as the Bazel e2e tests make them.
root = e2e.root
workspace = e2e.workspace
local_reference = e2e.local_reference

pytestmark = [
    pytest.mark.skipif(not os.path.exists(BAZEL), reason=f"{BAZEL} is absent"),
    pytest.mark.timeout(400),
]


@pytest.fixture(scope="module")
def executor(buildgrid: BuildGridServer, root: Path) -> Iterator[ExecutorProcess]:
    data_dir = Path(tempfile.mkdtemp(prefix="stoker-bgd-bazel-"))
    data_dir.chmod(0o711)  # the slot uids must reach their exec roots
    process = ExecutorProcess(data_dir, root / "executor.log", server=f"grpc://{buildgrid.address}",
                              protocol="rwapi", workers=2, concurrency=2, default_timeout="60s")
    process.start(ready_within=60)
    yield process
    process.stop()


@pytest.fixture(scope="module")
def remote(workspace: Path, root: Path, executor: ExecutorProcess) -> Iterator[Bazel]:
    bazel = Bazel(workspace, root, "buildgrid", executor)
    yield bazel
    bazel.shutdown()


def flags(buildgrid: BuildGridServer) -> list[str]:
    return [f"--remote_executor=grpc://{buildgrid.address}", "--remote_timeout=60",
            "--spawn_strategy=remote", "--jobs=8"]


@pytest.fixture(scope="module")
def remote_build(local_reference: LocalReference, remote: Bazel,
                 buildgrid: BuildGridServer) -> Result:
    result = remote.run("build", *flags(buildgrid), *GOOD_TARGETS)
    assert result.returncode == 0, remote.explain(result)
    return result


def test_build_through_buildgrid_matches_the_local_build(remote, remote_build, local_reference):
    bin_dir = remote.bin_dir()
    assert_same_outputs(local_reference.outputs, collect_outputs(bin_dir))
    assert run_hello(bin_dir) == local_reference.hello_stdout
    counts = remote_build.processes()
    assert counts.get("remote", 0) >= 10, remote.explain(remote_build)
    assert set(counts) <= {"remote", "internal"}, remote.explain(remote_build)


def test_a_failing_action_shows_its_stderr_in_bazel(remote, remote_build, buildgrid):
    result = remote.run("build", *flags(buildgrid), "//fail:broken")
    assert result.returncode == 1, remote.explain(result)
    assert "STOKER-E2E-BROKEN: the action failed on purpose" in result.output, \
        remote.explain(result)


def test_a_killed_worker_does_not_fail_the_build(remote, remote_build, buildgrid, executor):
    e2e.build_survives_a_killed_worker(remote, executor, flags(buildgrid))
    assert executor.alive(), executor.log_tail()
