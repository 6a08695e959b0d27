"""Status files: small JSON facts in the run directory, each written by the process that
owns the fact and read by the monitor for /readyz and /statusz.

    status-supervisor.json   children, their pids and states, draining
    status-server.json       the embedded server is serving
    status-worker-N.json     worker N's connection to the scheduler

Writers write only when a fact changes (never per action), by rename, so a reader never
sees a torn file.
"""

from __future__ import annotations

import glob
import os

import orjson

PREFIX = "status-"


def status_path(run_dir: str, name: str) -> str:
    return os.path.join(run_dir, f"{PREFIX}{name}.json")


def write_status(run_dir: str, name: str, fields: dict) -> None:
    path = status_path(run_dir, name)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(orjson.dumps(fields))
    os.replace(tmp, path)


def read_statuses(run_dir: str) -> dict[str, dict]:
    """name → fields for every status file; a file that vanished or is unreadable is left
    out (its writer is gone or restarting)."""
    statuses: dict[str, dict] = {}
    for path in glob.glob(os.path.join(glob.escape(run_dir), f"{PREFIX}*.json")):
        name = os.path.basename(path)[len(PREFIX):-len(".json")]
        try:
            with open(path, "rb") as f:
                statuses[name] = orjson.loads(f.read())
        except (OSError, orjson.JSONDecodeError):
            continue
    return statuses


def remove_statuses(run_dir: str) -> None:
    """Clear a previous run's files (a worker slot that no longer exists, a stale pid)."""
    for path in glob.glob(os.path.join(glob.escape(run_dir), f"{PREFIX}*.json*")):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
