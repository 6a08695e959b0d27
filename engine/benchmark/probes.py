"""One timed run of each hot-path step, through the engine's public entry points.

Each probe returns the seconds the step took (and checks that it did the work), so a
caller can turn repetitions into rates. The set-up a step needs (a fresh exec root) is done
outside the timed part.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

from engine import hashing
from engine.cas.local_disk import LocalDiskStore
from engine.pipeline import inputs, outputs
from engine.pipeline.inputs import InputTree


def implementation() -> str:
    """Which digest implementation the measured entry points use, e.g. 'native' or
    'python (native core: native)' while engine.hashing does not use the core yet."""
    name = hashing.IMPLEMENTATION
    try:
        from engine import native
    except ImportError:
        return name
    core = native.IMPLEMENTATION
    return name if core == name else f"{name} (native core: {core})"


def hash_file(function: str, path: str, expected_size: int) -> float:
    """engine.hashing.hash_file of one file."""
    t0 = time.perf_counter()
    _, size = hashing.hash_file(function, path)
    elapsed = time.perf_counter() - t0
    if size != expected_size:
        raise RuntimeError(f"hash_file read {size} bytes of {path}, expected {expected_size}")
    return elapsed


def hash_file_parallel(function: str, path: str, expected_size: int, threads: int) -> float:
    """threads concurrent hash_file calls of the same (cached) file: the rate with every
    core digesting, as when several outputs are digested at once."""
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda _: None, range(threads)))  # start the threads before timing
        t0 = time.perf_counter()
        sizes = list(pool.map(lambda _: hashing.hash_file(function, path)[1], range(threads)))
        elapsed = time.perf_counter() - t0
    if any(s != expected_size for s in sizes):
        raise RuntimeError(f"hash_file read {sizes} bytes of {path}, expected {expected_size}")
    return elapsed


def digest_files(function: str, paths: list[str]) -> float:
    """engine.pipeline.outputs.digest_files of many files at once, as output collection does."""
    t0 = time.perf_counter()
    digests = outputs.digest_files(function, paths)
    elapsed = time.perf_counter() - t0
    if len(digests) != len(paths):
        raise RuntimeError(f"digest_files returned {len(digests)} digests for {len(paths)} "
                           "files")
    return elapsed


def stage(tree: InputTree, store: LocalDiskStore, dest: str) -> float:
    """engine.pipeline.inputs.stage of a resolved tree into a new, empty exec root dest."""
    os.mkdir(dest)
    t0 = time.perf_counter()
    inputs.stage(tree, store, dest)
    return time.perf_counter() - t0


def spawn(n: int, program: str = "/bin/true") -> float:
    """n posix_spawn + waitpid of program, one at a time: the floor under any action."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    t0 = time.perf_counter()
    for _ in range(n):
        pid = os.posix_spawn(program, [program], env)
        _, status = os.waitpid(pid, 0)
        if status:
            raise RuntimeError(f"{program} exited with status {status}")
    return time.perf_counter() - t0
