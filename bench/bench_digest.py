"""Digesting: Stoker (engine.hashing.hash_file, engine.pipeline.outputs.digest_files) against
the tools a user would reach for, in the same run.

- SHA-256 of a 1 GiB file vs `openssl dgst -sha256` (whole process; one core both).
- BLAKE3 of a 1 GiB file vs `b3sum` (its defaults: every core, mmap).
- SHA-256 of 100k files of 1-4 KiB vs a C loop that only opens and reads them (its own
  clock around the loop, so neither process start nor reading the list counts). The loop is
  compiled here with gcc; without gcc, `xargs cat >/dev/null` stands in (slower: it spawns
  `cat` per few thousand files, so it would flatter Stoker; the table says which ran).

Both sides read from the page cache: the files are read once before any timing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

from bench.common import Measured, alternate_timed, count, run_cmd
from engine.benchmark import probes
from engine.benchmark.scratch import Workspace

MB = 1e6
GIB = 1 << 30

_OPEN_READ_LOOP = r"""
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* argv[1]: a file of newline-separated paths. Opens and reads each to its end; prints
   "<files> <bytes> <nanoseconds of the loop>". */
int main(int argc, char **argv) {
    if (argc != 2) { fprintf(stderr, "usage: %s LIST\n", argv[0]); return 2; }
    int lf = open(argv[1], O_RDONLY | O_CLOEXEC);
    struct stat st;
    if (lf < 0 || fstat(lf, &st) < 0) { perror(argv[1]); return 1; }
    char *list = malloc(st.st_size + 1);
    size_t got = 0;
    while (got < (size_t)st.st_size) {
        ssize_t n = read(lf, list + got, st.st_size - got);
        if (n <= 0) { perror("read list"); return 1; }
        got += n;
    }
    list[got] = 0;
    close(lf);
    size_t count = 0;
    for (size_t i = 0; i < got; i++) count += list[i] == '\n';
    char **paths = malloc((count + 1) * sizeof *paths);
    size_t k = 0;
    for (char *p = list; *p && k < count; k++) {
        char *nl = strchr(p, '\n');
        *nl = 0;
        paths[k] = p;
        p = nl + 1;
    }
    static char buf[1 << 16];
    unsigned long long total = 0;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (size_t i = 0; i < k; i++) {
        int fd = open(paths[i], O_RDONLY | O_CLOEXEC);
        if (fd < 0) { perror(paths[i]); return 1; }
        ssize_t n;
        while ((n = read(fd, buf, sizeof buf)) > 0) total += n;
        if (n < 0) { perror(paths[i]); return 1; }
        close(fd);
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    unsigned long long ns = (t1.tv_sec - t0.tv_sec) * 1000000000ULL + t1.tv_nsec - t0.tv_nsec;
    printf("%zu %llu %llu\n", k, total, ns);
    return 0;
}
"""


def _proc_seconds(argv: list[str]) -> float:
    t0 = time.perf_counter()
    run_cmd(argv)
    return time.perf_counter() - t0


def sha256(ws: Workspace, repeats: int, size: int = GIB) -> list[Measured]:
    path = ws.big_file(size)
    ref = ["openssl", "dgst", "-sha256", path]
    _proc_seconds(ref)  # warm: the binary and its libraries, like Stoker's imports
    probes.hash_file("sha256", path, size)
    s, r = alternate_timed(repeats, size / MB, lambda: probes.hash_file("sha256", path, size),
                           lambda: _proc_seconds(ref))
    return [Measured(f"SHA-256 of a {_size(size)} file", "MB/s", s, r,
                     "`openssl dgst -sha256`", target=0.95,
                     note="one core both; the reference's time includes its process start")]


def blake3(ws: Workspace, repeats: int, size: int = GIB) -> list[Measured]:
    if not shutil.which("b3sum"):
        raise SystemExit("bench: b3sum is not installed (Debian package b3sum; "
                         "`make test-deps` installs it)")
    path = ws.big_file(size)
    ref = ["b3sum", path]
    _proc_seconds(ref)
    probes.hash_file("blake3", path, size)
    s, r = alternate_timed(repeats, size / MB, lambda: probes.hash_file("blake3", path, size),
                           lambda: _proc_seconds(ref))
    return [Measured(f"BLAKE3 of a {_size(size)} file", "MB/s", s, r,
                     "`b3sum` (all threads, mmap)", target=0.9,
                     note=f"both use every core ({len(os.sched_getaffinity(0))})")]


class _OpenReadLoop:
    """The small-file reference: the compiled C loop, or xargs cat without a compiler."""

    def __init__(self, ws: Workspace, paths: list[str]):
        self.list = ws.path(f"paths-{len(paths)}.txt")
        with open(self.list, "w") as f:
            f.write("".join(p + "\n" for p in paths))
        self.count = len(paths)
        self.binary = ""
        if shutil.which("gcc"):
            src, exe = ws.path("open_read_loop.c"), ws.path("open_read_loop")
            with open(src, "w") as f:
                f.write(_OPEN_READ_LOOP)
            subprocess.run(["gcc", "-O2", "-o", exe, src], check=True)
            self.binary = exe
        self.name = ("C open+read loop (gcc -O2)" if self.binary
                     else "`xargs cat >/dev/null` (no gcc here)")

    def seconds(self) -> float:
        if not self.binary:
            t0 = time.perf_counter()
            with open(self.list, "rb") as f:
                subprocess.run(["xargs", "cat"], stdin=f, stdout=subprocess.DEVNULL, check=True)
            return time.perf_counter() - t0
        out = subprocess.run([self.binary, self.list], check=True, capture_output=True,
                             text=True).stdout.split()
        files, _, ns = (int(x) for x in out)
        if files != self.count:
            raise RuntimeError(f"the open+read loop read {files} files, expected {self.count}")
        return ns / 1e9


def small_files(ws: Workspace, repeats: int, files: int = 100_000,
                dirs: int = 1_000) -> list[Measured]:
    ts = ws.input_tree(files, dirs)
    ref = _OpenReadLoop(ws, ts.paths)
    ref.seconds()
    probes.digest_files("sha256", ts.paths)
    s, r = alternate_timed(repeats, len(ts.paths),
                           lambda: probes.digest_files("sha256", ts.paths), ref.seconds)
    return [Measured(f"digest {count(files)} files of 1-4 KiB (SHA-256)", "files/s", s, r,
                     ref.name, target=0.8,
                     note=f"{dirs} directories, {ts.total_bytes / MB:.0f} MB in all; the "
                     "reference loop is one thread, digest_files splits a large batch over "
                     "threads")]


def _size(n: int) -> str:
    return f"{n / GIB:g} GiB" if n >= GIB else f"{n / (1 << 20):g} MiB"


def run(repeats: int, ws: Workspace | None = None) -> list[Measured]:
    own = ws is None
    ws = ws or Workspace()
    try:
        return sha256(ws, repeats) + blake3(ws, repeats) + small_files(ws, repeats)
    finally:
        if own:
            ws.close()


if __name__ == "__main__":
    from bench.common import table

    print(table(run(int(sys.argv[1]) if len(sys.argv) > 1 else 3)))
