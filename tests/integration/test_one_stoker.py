"""One data directory, one Stoker: a second `stoker up` on a data directory in use refuses,
naming the pid, also while the children of a SIGKILLed supervisor live (engine/datadir.py)."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from tests.integration.support import Client, StokerProcess, start


def _second(stoker: StokerProcess, base_dir: Path, name: str) -> StokerProcess:
    return StokerProcess(stoker.data_dir, base_dir / f"{name}.log")


def _refused(second: StokerProcess) -> str:
    """Start second, which must exit with code 2 at once; its log."""
    with pytest.raises(RuntimeError, match="exited with code 2 before serving"):
        second.start(ready_within=30)
    return second.log_tail()


def _alive(pid: int) -> bool:
    """Running, not a zombie (a zombie has closed its files)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_second_stoker_on_a_data_dir_in_use_refuses_naming_the_pid(stoker_factory, base_dir):
    first = start(stoker_factory("one-a"))
    second = _second(first, base_dir, "one-a-second")
    log = _refused(second)
    assert f"data_dir {first.data_dir} is in use by Stoker pid {first.proc.pid}" in log, log
    assert first.alive()
    client = Client(first.address)
    try:
        # Actions do not inherit the lock (the runner spawns with close_fds).
        result = client.run("ls -l /proc/self/fd/", do_not_cache=True).result
        assert result.exit_code == 0, client.read(result.stderr_digest)
        fds = client.read(result.stdout_digest).decode()
        assert "/dev/null" in fds and "stoker.lock" not in fds, fds
    finally:
        client.close()


def test_children_of_a_killed_supervisor_hold_the_data_dir_until_they_exit(stoker_factory,
                                                                           base_dir):
    first = start(stoker_factory("one-b", extra_args=["--drain-grace", "10s"]))
    client = Client(first.address)
    # A running action keeps its worker draining after the supervisor is gone.
    errors: list[BaseException] = []

    def execute() -> None:
        try:
            client.run("touch one-b-started && sleep 5", do_not_cache=True)
        except BaseException as e:  # noqa: BLE001 - the server goes away mid-call
            errors.append(e)

    thread = threading.Thread(target=execute, daemon=True)
    thread.start()
    run = first.data_dir / "run"
    children = [int(p.read_text()) for p in run.glob("*.pid")]
    assert len(children) == 3  # server, worker-0, monitor
    deadline = time.monotonic() + 30
    while not any(first.data_dir.rglob("one-b-started")):  # the action is running
        assert time.monotonic() < deadline, "the action never started"
        time.sleep(0.05)

    supervisor = first.proc.pid
    os.kill(supervisor, signal.SIGKILL)
    first.proc.wait(timeout=10)
    assert any(_alive(pid) for pid in children)
    second = _second(first, base_dir, "one-b-second")
    log = _refused(second)
    assert f"data_dir {first.data_dir} is in use by" in log and str(supervisor) in log, log

    # The children die with the supervisor (draining first); then the directory is free.
    deadline = time.monotonic() + 40
    while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in children), "children outlived their supervisor"
    third = _second(first, base_dir, "one-b-third")
    try:
        start(third)
        again = Client(third.address)
        try:
            assert again.run(["/bin/true"]).response.result.exit_code == 0
        finally:
            again.close()
    finally:
        assert third.stop() == 0, third.log_tail()
        client.close()
        thread.join(timeout=30)
