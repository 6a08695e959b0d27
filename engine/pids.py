"""Whether another process is still there, by its pid."""

from __future__ import annotations

import os


def pid_alive(pid: int) -> bool:
    """True while a process has pid (one we may not signal counts: it exists)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
