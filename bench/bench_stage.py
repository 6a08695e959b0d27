"""Staging an input tree from a warm local CAS: Stoker (engine.pipeline.inputs.stage with a
real LocalDiskStore) against `cp -al` of the same tree, in the same run.

The tree (100k distinct files of 1-4 KiB in 1k directories) is resolved as a worker
resolves an input root, every blob is in the local CAS, and the tree is staged once to give
`cp -al` its source: both sides then make the same 1k directories and 100k hardlinks on the
same filesystem. Each run goes to a fresh directory; all of them are removed (untimed) at
the end, not between runs: on this ext4 (no journal) every deleted directory inode slows
the next mkdirs for minutes (measured on this machine), so deleting between runs makes each run
slower than the last (86k -> 50k files/s over 8 runs here, cp -al alike) and the figure
would depend on what ran before it.
"""

from __future__ import annotations

import sys
import time

from bench.common import Measured, alternate_timed, count, run_cmd
from engine.benchmark import probes
from engine.benchmark.scratch import Workspace, remove_tree


def stage(ws: Workspace, repeats: int, files: int = 100_000,
          dirs: int = 1_000) -> list[Measured]:
    ts = ws.input_tree(files, dirs)
    made: list[str] = []

    def stoker() -> float:
        made.append(ws.fresh_path("exec-root"))
        return probes.stage(ts.tree, ts.store, made[-1])

    def reference() -> float:
        made.append(ws.fresh_path("cp-al"))
        t0 = time.perf_counter()
        run_cmd(["cp", "-al", ts.source, made[-1]])
        return time.perf_counter() - t0

    try:
        reference()  # warm: cp and the source's dentries, as staging it once warmed Stoker's
        s, r = alternate_timed(repeats, len(ts.tree.files), stoker, reference)
    finally:
        for path in made:
            remove_tree(path)
    return [Measured(f"stage {count(files)} files, {count(dirs)} dirs from a warm local CAS",
                     "files/s",
                     s, r, "`cp -al` of the same tree", target=1.0,
                     note=f"on {ws.filesystem}; both make {dirs} directories and {files} "
                     "hardlinks")]


def run(repeats: int, ws: Workspace | None = None) -> list[Measured]:
    own = ws is None
    ws = ws or Workspace()
    try:
        return stage(ws, repeats)
    finally:
        if own:
            ws.close()


if __name__ == "__main__":
    from bench.common import table

    print(table(run(int(sys.argv[1]) if len(sys.argv) > 1 else 3)))
