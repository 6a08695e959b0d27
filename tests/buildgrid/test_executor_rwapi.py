"""`stoker executor` joined to a real BuildGrid 0.9.1 over the Remote Workers API: actions go
client -> BuildGrid -> Stoker's workers, and inputs and outputs through BuildGrid's CAS."""

from __future__ import annotations

import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from tests.buildgrid.harness import BuildGridServer
from tests.integration.support import Client, ExecutorProcess, File

pytestmark = pytest.mark.timeout(300)


def stdout_of(client: Client, ex) -> str:
    return client.read(ex.result.stdout_digest).decode()


def _data_dir() -> Path:
    # Actions run as slot uids: the data dir must be searchable by them (pytest's are 0700).
    path = Path(tempfile.mkdtemp(prefix="stoker-bgd-"))
    path.chmod(0o711)
    return path


@pytest.fixture
def executor_factory(tmp_path: Path) -> Iterator[Callable[..., ExecutorProcess]]:
    made: list[ExecutorProcess] = []

    def make(server: BuildGridServer, *, workers: int = 1, concurrency: int = 2,
             extra_args: tuple[str, ...] = (), start: bool = True) -> ExecutorProcess:
        process = ExecutorProcess(_data_dir(), tmp_path / f"executor-{len(made)}.log",
                                  server=f"grpc://{server.address}", protocol="rwapi",
                                  workers=workers, concurrency=concurrency,
                                  extra_args=extra_args)
        made.append(process)
        if start:
            process.start(ready_within=60)
        return process

    yield make
    for process in made:
        process.stop()
        if process.proc is not None and process.proc.returncode not in (0, None, -15):
            print(process.log_tail())


@pytest.fixture
def client(buildgrid: BuildGridServer) -> Iterator[Client]:
    c = Client(buildgrid.address)
    yield c
    c.close()


def test_an_action_runs_through_buildgrid_on_stoker(buildgrid, executor_factory, client):
    executor = executor_factory(buildgrid)
    ex = client.run("cat in/a.txt | tr a-z A-Z > out.txt; echo to-stderr >&2",
                    {"in": {"a.txt": File(b"hello buildgrid\n")}},
                    output_files=["out.txt"], skip_cache_lookup=True)
    assert ex.response.status.code == 0, ex.response
    assert ex.result.exit_code == 0
    (out,) = ex.result.output_files
    assert out.path == "out.txt"
    assert client.read(out.digest) == b"HELLO BUILDGRID\n"
    assert client.read(ex.result.stderr_digest) == b"to-stderr\n"
    meta = ex.result.execution_metadata
    assert meta.worker.startswith(os.uname().nodename)  # Stoker ran it, and said so
    status = executor.statusz()
    assert status["scheduler"]["protocol"] == "rwapi"
    assert status["scheduler"]["workers_connected"] == 1
    assert status["actions"]["completed"] >= 1


def test_buildgrid_writes_the_action_cache_from_what_stoker_reports(buildgrid,
                                                                     executor_factory, client):
    """Over the Remote Workers API the scheduler writes the ActionCache from the result the
    completed lease carries (BuildGrid's scheduler, on completion; Stoker writes none for
    rwapi): the same action again is a hit with the same outputs."""
    executor_factory(buildgrid)
    first = client.run(f"echo {os.getpid()}-{time.time_ns()} > out.txt",
                       output_files=["out.txt"])
    assert first.response.status.code == 0 and not first.response.cached_result
    again = client.execute(first.action_digest)
    assert again.response.cached_result
    assert again.result.output_files == first.result.output_files
    assert again.result.execution_metadata.worker == first.result.execution_metadata.worker


def test_a_failing_command_reports_its_exit_code_and_stderr(buildgrid, executor_factory,
                                                            client):
    executor_factory(buildgrid)
    ex = client.run("echo it broke >&2; exit 3", skip_cache_lookup=True)
    assert ex.response.status.code == 0
    assert ex.result.exit_code == 3
    assert client.read(ex.result.stderr_digest) == b"it broke\n"


def test_concurrent_actions_share_the_slots(buildgrid, executor_factory, client):
    executor_factory(buildgrid, concurrency=2)
    results: dict[int, str] = {}

    def one(i: int) -> None:
        ex = client.run(f"sleep 1; echo {i}", skip_cache_lookup=True)
        results[i] = stdout_of(client, ex)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == {i: f"{i}\n" for i in range(6)}
    assert time.monotonic() - started < 6 * 1.0  # not one at a time


def test_buildgrid_restart_is_survived(buildgrid_factory, executor_factory):
    server = buildgrid_factory()
    executor = executor_factory(server)
    client = Client(server.address)
    try:
        assert client.run("echo before", skip_cache_lookup=True).result.exit_code == 0
        server.restart()
        deadline = time.monotonic() + 60
        while not executor.ready():  # reconnected, with no manual step
            assert time.monotonic() < deadline, executor.log_tail()
            time.sleep(0.2)
        ex = client.run("echo after", skip_cache_lookup=True)
        assert stdout_of(client, ex) == "after\n"
    finally:
        client.close()


def wait_started(executor, deadline_s: float = 60) -> None:
    """Until an action of executor's has touched `started` in its exec root (an action can
    leave nothing anywhere else: the host's files are read-only to it, its /tmp its own)."""
    deadline = time.monotonic() + deadline_s
    while not any(executor.build_dir.rglob("started")):
        assert time.monotonic() < deadline, executor.log_tail()
        time.sleep(0.05)


def test_a_killed_worker_action_is_retried(buildgrid, executor_factory, client):
    executor = executor_factory(buildgrid)
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["ex"] = client.run("touch started; sleep 3; echo survived",
                                       skip_cache_lookup=True, timeout=120)
        except grpc.RpcError as e:
            outcome["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    wait_started(executor)
    victim = executor.worker_pid(0)
    killed_at = time.time()
    os.kill(victim, signal.SIGKILL)
    thread.join(150)
    assert "error" not in outcome, outcome
    ex = outcome["ex"]
    assert ex.result.exit_code == 0 and stdout_of(client, ex) == "survived\n"
    # It ran again, on the replaced worker: the run reported started after the kill.
    started = ex.result.execution_metadata.execution_start_timestamp
    assert started.seconds + started.nanos / 1e9 > killed_at
    assert executor.worker_pid(0) != victim


def test_sigterm_hands_running_leases_back_within_the_drain_grace(buildgrid, executor_factory,
                                                                  client):
    first = executor_factory(buildgrid, extra_args=("--drain-grace", "2s"))
    outcome: dict[str, object] = {}

    def run() -> None:
        outcome["ex"] = client.run("touch started; sleep 20; echo finished elsewhere",
                                   skip_cache_lookup=True, timeout=240)

    thread = threading.Thread(target=run)
    thread.start()
    wait_started(first)
    started = time.monotonic()
    code = first.stop(grace=30)
    assert code == 0, first.log_tail()
    assert time.monotonic() - started < 2 + 8  # the grace period, then out
    log = first.log_tail()
    assert "draining" in log
    # The lease went back to BuildGrid, which gives it to the next bot.
    executor_factory(buildgrid)
    thread.join(200)
    ex = outcome["ex"]
    assert ex.result.exit_code == 0, ex.response
    assert stdout_of(client, ex) == "finished elsewhere\n"


def test_inputs_are_fetched_once_into_the_local_cas(buildgrid, executor_factory, client):
    executor = executor_factory(buildgrid, workers=2, concurrency=1)
    big = os.urandom(3 << 20)  # over a batch: ByteStream both ways
    inputs = {"big.bin": File(big), "d": {"e": {"small.txt": File(b"small\n")}}}
    for _ in range(3):
        ex = client.run("sha256sum big.bin d/e/small.txt > sums; cp big.bin copy.bin",
                        inputs, output_files=["sums", "copy.bin"], skip_cache_lookup=True)
        assert ex.result.exit_code == 0, client.read(ex.result.stderr_digest)
        outputs = {f.path: f for f in ex.result.output_files}
        assert client.read(outputs["copy.bin"].digest) == big
    cache = executor.statusz()["cache"]
    # Two input files: downloaded by the first run only, whichever worker ran the others.
    assert cache["cas_misses"] == 2, cache
    assert cache["cas_hits"] == 4, cache
