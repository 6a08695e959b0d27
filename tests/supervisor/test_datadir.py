"""engine/datadir.py on its own: the lock refuses a second holder, a child keeps it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from engine import datadir
from engine.config import Config


def test_a_second_lock_is_refused_naming_the_holder(tmp_path):
    fd = datadir.lock(str(tmp_path))
    try:
        assert os.stat(tmp_path / datadir.LOCK_NAME).st_mode & 0o777 == 0o600
        with pytest.raises(datadir.DataDirInUse, match=f"Stoker pid {os.getpid()}"):
            datadir.lock(str(tmp_path))
    finally:
        os.close(fd)
    os.close(datadir.lock(str(tmp_path)))  # released with the last fd


def test_a_child_that_inherited_the_lock_keeps_it_after_the_holder_lets_go(tmp_path):
    fd = datadir.lock(str(tmp_path))
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                             pass_fds=(fd,))
    try:
        os.close(fd)  # as if the supervisor were gone: its pid names no process now
        gone = _dead_pid()
        (tmp_path / datadir.LOCK_NAME).write_text(f"{gone}\n")
        with pytest.raises(datadir.DataDirInUse,
                           match=rf"pids {child.pid}\) of Stoker pid {gone}, which is gone"):
            datadir.lock(str(tmp_path))
    finally:
        child.kill()
        child.wait()
    os.close(datadir.lock(str(tmp_path)))


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_secure_makes_lock_files_private_and_private_dirs_0700_as_root(tmp_path):
    config = Config(data_dir=str(tmp_path / "data")).validated()
    cache = tmp_path / "data" / "cache"
    cache.mkdir(parents=True, mode=0o755)
    (cache / "lock").touch(mode=0o644)
    datadir.secure(config)
    assert (cache / "lock").stat().st_mode & 0o777 == 0o600
    if os.geteuid() == 0:
        assert (tmp_path / "data").stat().st_mode & 0o777 == 0o711
        for d in ("cache", "cache/cas", "cache/tmp", "ac", "uploads", "run"):
            assert (tmp_path / "data" / d).stat().st_mode & 0o777 == 0o700, d
