"""Bazel -> real BuildGrid 0.9.1 -> `stoker executor` (Remote Workers API) as its only bots:
the e2e workspace of tests/e2e builds with the same outputs as locally, failures reach Bazel,
and a worker killed mid-build does not fail it."""

from __future__ import annotations

import os
import signal
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.buildgrid.harness import BuildGridServer
from tests.e2e import test_bazel as e2e
from tests.e2e.test_bazel import (
    BAZEL,
    BAZEL_TIMEOUT,
    GOOD_TARGETS,
    Bazel,
    LocalReference,
    Result,
    _pid_alive,
    _wait_for_busy_worker,
    assert_same_outputs,
    collect_outputs,
    interrupt,
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
    salt = uuid.uuid4().hex
    build = remote.popen("build", *flags(buildgrid), f"--action_env=STOKER_E2E_SALT={salt}",
                         "//slow:all_slow")
    try:
        victim = _wait_for_busy_worker(executor, build, f"STOKER_E2E_SALT={salt}")
        os.kill(victim.pid, signal.SIGKILL)
        out, _ = build.communicate(timeout=BAZEL_TIMEOUT)
    finally:
        if build.poll() is None:
            interrupt(build)
    result = Result(build.returncode, out.decode(errors="replace"), 0.0)
    assert result.returncode == 0, remote.explain(result)
    bin_dir = remote.bin_dir()
    for i in range(8):
        assert (bin_dir / "slow" / f"slow_{i}.txt").read_text() == f"slow {i} {salt}\n"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        pid = executor.worker_pid(victim.slot)
        if pid is not None and pid != victim.pid and _pid_alive(pid):
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"worker {victim.slot} was not restarted\n{executor.log_tail()}")
