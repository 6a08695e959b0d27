"""`stoker up` as a whole: drain on SIGTERM and surviving a killed worker, with real actions."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from support import Client, digest_of, start


def _in_thread(fn):
    out: dict = {}

    def target():
        try:
            out["value"] = fn()
        except BaseException as e:  # surfaced by the assertion in the test
            out["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, out


def _worker_pid(stoker, slot: int = 0) -> int:
    return int((stoker.data_dir / "run" / f"worker-{slot}.pid").read_text())


def _wait_for_file_under(path, name: str, within: float = 15.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if any(p.name == name for p in path.rglob(name)):
            return
        time.sleep(0.05)
    raise AssertionError(f"{name} never appeared under {path}")


def test_sigterm_lets_the_running_action_finish_and_exits_zero(stoker_factory):
    stoker = start(stoker_factory("drain", workers=1))
    client = Client(stoker.address)
    try:
        script = "touch started; sleep 2; echo finished > out.txt"
        t, out = _in_thread(lambda: client.run(script, output_files=["out.txt"]))
        _wait_for_file_under(stoker.build_dir, "started")
        t0 = time.monotonic()
        assert stoker.stop(grace=30) == 0
        t.join(10)
        execution = out.get("value")
        assert execution is not None, out.get("error")
        assert execution.result.exit_code == 0
        [f] = execution.result.output_files
        assert f.digest == digest_of(b"finished\n")  # the server is gone: compare digests
        assert time.monotonic() - t0 < 15
    finally:
        client.close()


def test_sigterm_hands_back_actions_that_overrun_the_grace(stoker_factory):
    stoker = start(stoker_factory("overrun", workers=1, extra_args=["--drain-grace", "1s"]))
    client = Client(stoker.address)
    try:
        t, _ = _in_thread(lambda: client.run("touch started; sleep 60", timeout=120))
        _wait_for_file_under(stoker.build_dir, "started")
        t0 = time.monotonic()
        assert stoker.stop(grace=30) == 0
        assert time.monotonic() - t0 < 12
        assert not any(stoker.build_dir.rglob("started")), "the exec root was left behind"
    finally:
        client.close()


def test_a_worker_killed_mid_action_is_restarted_and_the_action_still_succeeds(stoker_factory):
    stoker = start(stoker_factory("killed", workers=1))
    client = Client(stoker.address)
    # Once the first attempt runs, the test leaves a marker where actions can read it (not
    # under /tmp: theirs is private), so the second attempt finishes fast.
    markers = Path(tempfile.mkdtemp(prefix="stoker-test-", dir="/run"))
    markers.chmod(0o755)
    try:
        marker = markers / "killed-attempted"
        script = (f"if [ -e {marker} ]; then echo second > out.txt; exit 0; fi; "
                  f"touch started; sleep 30")
        t, out = _in_thread(lambda: client.run(script, output_files=["out.txt"]))
        _wait_for_file_under(stoker.build_dir, "started")
        marker.touch()
        old = _worker_pid(stoker)
        os.kill(old, signal.SIGKILL)
        t.join(30)
        execution = out.get("value")
        assert execution is not None, out.get("error")
        assert execution.result.exit_code == 0
        [f] = execution.result.output_files
        assert client.read(f.digest) == b"second\n"
        assert _worker_pid(stoker) != old
        assert stoker.alive()
        # The first attempt's `sleep 30` was ended by the worker that took over the slot.
        sleeping = subprocess.run(["pgrep", "-f", "-x", "sleep 30"], capture_output=True)
        assert sleeping.returncode == 1, f"orphaned action still running: {sleeping.stdout}"
    finally:
        client.close()
        shutil.rmtree(markers, ignore_errors=True)
