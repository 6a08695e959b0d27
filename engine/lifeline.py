"""Children of the supervisor die with it, even when it is killed with SIGKILL."""

from __future__ import annotations

import ctypes
import os
import signal

PR_SET_PDEATHSIG = 1


def die_with_parent(expected_parent: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != expected_parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)
