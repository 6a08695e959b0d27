"""The runner seam (DESIGN.md section 11): the pipeline hands a Runner one RunRequest per
action and gets a RunResult back once every process the action started is gone. How the
command is isolated (a bare process, a sandbox, a container) is the runner's own business."""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass, field
from typing import Protocol

# (uid, gid) an action runs as; None: as Stoker itself.
RunAs = tuple[int, int]
# The action's platform properties, sorted by name then value.
Platform = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Limits:
    """What one action may use; 0 means no limit of that kind."""
    memory_bytes: int = 0
    pids: int = 0


@dataclass
class RunRequest:
    argv: list[str]
    env: dict[str, str]  # exactly the Command's; TMPDIR is added unless it sets one
    exec_root: str  # absolute
    working_directory: str  # relative to exec_root, '' for the root itself
    stdout_path: str
    stderr_path: str
    tmpdir: str
    timeout_s: float = 0.0  # 0 = no timeout
    run_as: RunAs | None = None
    platform: Platform = ()
    limits: Limits = field(default_factory=Limits)
    instance_name: str = ""  # the REAPI instance the action came from (kept containers' key)
    tenant: str = ""  # whose build it is, where the scheduler says (kept containers' key)

    @property
    def cwd(self) -> str:
        return os.path.join(self.exec_root, self.working_directory)


@dataclass
class RunResult:
    exit_code: int  # a death by signal N is 128+N, as a shell reports it
    timed_out: bool
    start: float  # time.time()
    end: float
    rusage: resource.struct_rusage | None = None
    spawn_error: str | None = None  # set when the command could not be started
    oom_killed: bool = False  # the kernel killed a process of it for its memory limit


class Runner(Protocol):
    """Runs one command to completion; nothing it started outlives run()."""

    name: str  # the isolation type, as /statusz and the logs show it

    async def run(self, req: RunRequest) -> RunResult: ...
