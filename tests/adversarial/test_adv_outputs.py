"""Attacks on output collection: a survivor that keeps a writable fd on an output, symlink
swaps racing the walk and the digest, and a survivor racing the creation (mkdir, then chown)
of output parents. The cache must only ever serve bytes that match their digest, never a
byte of a root-only file, and nothing outside an exec root may change owner or mode."""

from __future__ import annotations

import time

import pytest

from tests.adversarial.adv_support import (
    ROOT_ONLY,
    SECRET,
    Guard,
    describe,
    execute,
    marked_procs,
    py_argv,
    result_digests,
    served_blobs,
    wait_for,
)
from tests.integration.support import Client, digest_of, key, start

pytestmark = [ROOT_ONLY, pytest.mark.timeout(150)]

# argv: mark, seconds, output paths. Writes 64 KiB to each output, forks a survivor (own
# session, so that killing the action's group misses it) that keeps rewriting the same byte
# range through the fds it inherited, then exits at once.
KEEP_FD = r"""
import os, sys, time
dur, outs = float(sys.argv[2]), sys.argv[3:]
fds = []
for out in outs:
    if "/" in out:
        os.makedirs(os.path.dirname(out), exist_ok=True)
    fds.append(os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644))
    os.write(fds[-1], b"A" * 65536)
if os.fork() == 0:
    os.setsid()
    end, i = time.time() + dur, 0
    while time.time() < end:
        i += 1
        for fd in fds:
            os.pwrite(fd, (b"%08d" % i) * 8192, 0)  # same size, other bytes
        time.sleep(0.002)
    os._exit(0)
print("exiting with the fds handed on")
"""


def test_survivor_writing_through_a_kept_fd(stoker_factory, sentinel, base_dir, mark):
    process = start(stoker_factory("keepfd"))
    client = Client(process.address)
    try:
        guard = Guard(process, client, sentinel, base_dir, mark)
        t0 = time.monotonic()
        response = execute(client, py_argv(KEEP_FD, mark, "3", "out.bin", "od/out.bin"),
                           mark=mark, output_files=["out.bin"], output_directories=["od"])
        assert response.status.code == 0, describe(client, response)
        result = response.result
        assert len(result.output_files) == 1 and len(result.output_directories) == 1, result
        problems = []
        for when in ("at once", "after the survivor's last write"):
            if when != "at once":
                time.sleep(max(0.0, 3.5 - (time.monotonic() - t0)))
            try:
                served_blobs(client, result_digests(client, result))
            except AssertionError as e:
                problems.append(f"{when}: {e}")
        alive = marked_procs(mark)
        # A clean restart (SIGTERM, then the same data dir) must serve the same bytes.
        process.stop()
        start(process)
        try:
            served_blobs(client, result_digests(client, result))
        except AssertionError as e:
            problems.append(f"after a clean restart: {e}")
        problems += guard.problems([])
        assert not problems, f"(survivors seen: {alive})\n" + "\n".join(problems)
    finally:
        client.close()


# argv: mark, which ("file": output d/out.txt, or "dir": output directory od), seconds.
# Leaves d/out.txt and od/cNN/out.txt ("public") among 400 small files in od, and a
# survivor that swaps d (or the cNN that od's listing returns first, so that the walk spends
# the rest of od between its lstat of cNN and its listing of cNN) with a relative symlink
# to the sentinel's root-only secretdir, as fast as it can (renameat2 RENAME_EXCHANGE: the
# name is always a directory or a link). Relative links, because an absolute one would
# fail the action (FAILED_PRECONDITION) instead of racing the walk and the digest.
SWAP = r"""
import ctypes, os, sys, time
which, dur = sys.argv[2], float(sys.argv[3])
libc = ctypes.CDLL(None, use_errno=True)
for d in ["d"] + [f"od/c{i:02d}" for i in range(20)]:
    os.makedirs(d, exist_ok=True)
    with open(d + "/out.txt", "w") as f:
        f.write("public\n")
for i in range(400):
    with open(f"od/f{i:04d}", "w") as f:
        f.write(f"filler {i}\n")
first = next(e.name for e in os.scandir("od") if e.name.startswith("c"))
up = "../" * 5  # exec root -> the directory holding data/ and sentinel/
for link, target in (("lnk1", up + "sentinel/secretdir"),
                     ("lnk2", "../" + up + "sentinel/secretdir")):
    try:
        os.symlink(target, link)
    except FileExistsError:
        pass
a, b = (b"d", b"lnk1") if which == "file" else (b"od/" + first.encode(), b"lnk2")
if os.fork() == 0:
    os.setsid()
    end = time.time() + dur
    while time.time() < end:
        for _ in range(200):
            libc.renameat2(-100, a, -100, b, 2)
    os._exit(0)
print("swapping", first)
"""


def test_symlink_swaps_racing_output_collection(stoker, client, guard, mark):
    results, statuses = [], []
    deadline = time.monotonic() + 10
    for i in range(15):
        if time.monotonic() > deadline:
            break
        m = f"{mark}-{i}"
        which = ("file", "dir", "dir")[i % 3]
        fields = {"output_files": ["d/out.txt"]} if which == "file" else {
            "output_directories": ["od"]}
        response = execute(client, py_argv(SWAP, m, which, "0.5"), mark=m, **fields)
        statuses.append((which, response.status.code))
        if response.HasField("result"):
            results.append(response.result)
        # One swapper at a time: wait for this one's end (bounded) before the next run.
        try:
            wait_for(lambda m=m: not marked_procs(m), 2.0, what="the swapper's end")
        except AssertionError:
            pass
    problems = guard.problems(results)
    if key(digest_of(SECRET)) not in client.missing([digest_of(SECRET)]):
        problems.append("the CAS holds the secret's digest")
    assert not problems, f"statuses {statuses}:\n" + "\n".join(problems)


# argv: mark, target, seconds. A survivor that, in every exec root it can reach, replaces a
# freshly made 'p' (the parent Stoker creates for the next action's output p/q/out) with a
# symlink to target, hoping Stoker's chown of p follows it.
CHOWN_RACE = r"""
import glob, os, sys, time
target, dur = sys.argv[2], float(sys.argv[3])
if os.fork() == 0:
    os.setsid()
    end = time.time() + dur
    roots = ["."]
    while time.time() < end:
        roots = [".", *glob.glob("../../*/root")] if int(time.time() * 10) % 5 == 0 else roots
        for r in roots:
            p = r + "/p"
            try:
                os.rename(p, p + ".x")
                os.symlink(target, p)
            except OSError:
                continue
            try:
                os.rmdir(p + ".x")
            except OSError:
                pass
    os._exit(0)
print("racing")
"""


def test_survivor_racing_output_parent_creation(stoker, client, guard, sentinel, mark):
    target = str(sentinel / "rootdir")
    response = execute(client, py_argv(CHOWN_RACE, mark, target, "5"), mark=mark)
    assert response.status.code == 0, describe(client, response)
    results, statuses = [response.result], []
    end = time.monotonic() + 5
    while time.monotonic() < end:
        victim = execute(client, ["/bin/sh", "-c", "echo victim > p/q/out"],
                         mark=mark + "-victim", output_files=["p/q/out"])
        statuses.append(victim.status.code)
        if victim.HasField("result"):
            results.append(victim.result)
    problems = guard.problems(results)
    assert not problems, f"{len(statuses)} victims, statuses {statuses}:\n" + "\n".join(
        problems)
