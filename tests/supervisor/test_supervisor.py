"""The supervisor's rules with real child processes (stand-in children where a rule is about
process lifecycle, not about what the child does)."""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import sys
import tempfile
import time

import pytest

from engine import supervisor as sup
from engine.config import Config

pytestmark = pytest.mark.slow  # a real supervisor with child processes


def _supervisor(tmp_path, workers: int, child_code: str) -> sup.Supervisor:
    config = Config(data_dir=str(tmp_path), workers=workers, heartbeat_timeout_s=2.0,
                    drain_grace_s=2.0).validated()
    s = sup.Supervisor(config, embedded_server=False)
    for child in s._children:
        child.argv = [sys.executable, "-c", child_code]
    return s


def _read_pid(path: str) -> int:
    with open(path) as f:
        return int(f.read())


def test_a_crashed_worker_is_restarted_alone(tmp_path):
    s = _supervisor(tmp_path, 2, "import time; time.sleep(60)")
    for c in s._children:
        s.spawn(c)
    try:
        victim, bystander = s._children
        bystander_pid = bystander.proc.pid
        old = victim.proc.pid
        os.kill(old, signal.SIGKILL)
        victim.proc.wait()
        s.reap_children()
        deadline = time.monotonic() + 5
        while victim.proc is None and time.monotonic() < deadline:
            time.sleep(0.05)
            s.restart_children()
        assert victim.proc is not None and victim.proc.pid != old
        assert _read_pid(victim.pid_file) == victim.proc.pid
        assert bystander.proc.pid == bystander_pid and bystander.proc.poll() is None
    finally:
        s.stop_all(grace_s=1)


def test_a_crash_loop_halts_with_a_clear_message(tmp_path):
    s = _supervisor(tmp_path, 1, "import sys; sys.exit(3)")
    child = s._children[0]
    s.spawn(child)
    with pytest.raises(sup.CrashLoop, match=r"worker-0 exited 5 times .*code 3"):
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if child.proc is not None:
                child.proc.wait()
            s.reap_children()
            time.sleep(0.05)
            s.restart_children()


def test_a_worker_with_a_stale_heartbeat_is_killed(tmp_path, monkeypatch):
    monkeypatch.setattr(sup, "BOOT_ALLOWANCE_S", 0.0)
    s = _supervisor(tmp_path, 1, "import time; time.sleep(60)")  # never beats
    child = s._children[0]
    s.spawn(child)
    old = os.stat(child.heartbeat_file).st_mtime
    os.utime(child.heartbeat_file, (old - 10, old - 10))
    s.kill_stale_children()
    assert child.proc.wait(timeout=5) == -signal.SIGKILL
    s.reap_children()
    assert child.restart_at is not None


def test_drain_stops_workers_gracefully_within_the_grace(tmp_path):
    code = ("import signal, sys, time\n"
            "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\n"
            "time.sleep(60)\n")
    s = _supervisor(tmp_path, 2, code)
    for c in s._children:
        s.spawn(c)
    time.sleep(0.5)  # let the children install their handlers
    procs = [c.proc for c in s._children]
    t0 = time.monotonic()
    s.drain()
    assert [p.returncode for p in procs] == [0, 0]
    assert time.monotonic() - t0 < 2


def test_drain_kills_workers_that_overrun_the_grace(tmp_path):
    code = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(60)\n"
    s = _supervisor(tmp_path, 1, code)
    s.spawn(s._children[0])
    time.sleep(0.5)
    proc = s._children[0].proc
    s._stop(s._children, grace_s=0.5)
    assert proc.returncode == -signal.SIGKILL


def test_heartbeats_and_metrics_live_in_a_private_fresh_directory(tmp_path):
    """/dev/shm is world-writable: a name an action can predict (from the supervisor's pid)
    could be its symlink, and root would write through it."""
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    if shm is None:
        pytest.skip("no /dev/shm")
    stale = tempfile.mkdtemp(prefix="stoker-4194321-", dir=shm)  # nobody holds its lock
    open(os.path.join(stale, "lock"), "w").close()
    busy = tempfile.mkdtemp(prefix="stoker-4194322-", dir=shm)  # another Stoker's, in use
    holder = open(os.path.join(busy, "lock"), "w")  # noqa: SIM115
    fcntl.flock(holder, fcntl.LOCK_EX)
    planted = os.path.join(shm, f"stoker-{os.getpid()}-worker-0")
    victim = tmp_path / "victim"
    victim.write_text("untouched")
    os.symlink(victim, planted)
    try:
        s = _supervisor(tmp_path, 1, "import time; time.sleep(60)")
        assert not os.path.exists(stale)
        assert os.path.isdir(busy)
        st = os.lstat(s.shm_dir)
        assert os.path.dirname(s.shm_dir) == shm
        assert (st.st_uid, st.st_mode & 0o777) == (os.geteuid(), 0o700)
        for child in s._children:
            assert os.path.dirname(child.heartbeat_file) == s.shm_dir
        assert os.path.dirname(s.metrics_dir) == s.shm_dir
        for child in s._children:
            s.spawn(child)
        s.stop_all(grace_s=2.0)
        assert victim.read_text() == "untouched"
        shutil.rmtree(s.shm_dir)
    finally:
        os.unlink(planted)
        holder.close()
        shutil.rmtree(busy, ignore_errors=True)
        shutil.rmtree(stale, ignore_errors=True)
