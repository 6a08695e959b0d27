"""One action against another and against the data directory: two actions at once must run
as different uids, neither able to find, read or write the other's exec root; and no action
may open, list or lock anything of the data directory (a lock held by an action would stall
every CAS write)."""

from __future__ import annotations

import os
import stat
import time
import uuid

import pytest

from engine.proto import re_pb2
from tests.adversarial.adv_support import (
    ACTION_UIDS,
    CANARY,
    ROOT_ONLY,
    background,
    describe,
    execute,
    find_file,
    py_argv,
    stdout_of,
)
from tests.integration.support import blob_resource, digest_of

pytestmark = [ROOT_ONLY, pytest.mark.timeout(120)]

# B: the victim. Prints its uid, signals it runs (ready-<mark> in its exec root), waits
# while A attacks, then reports its own inputs and exec root and writes its output.
VICTIM = r"""
import os, sys, time
mark = sys.argv[1]
print(os.getuid(), flush=True)
open(f"ready-{mark}", "w").close()
time.sleep(float(sys.argv[2]))
print(open("b_input.txt").read(), end="")
print(sorted(os.listdir(".")))
with open("b_out.txt", "w") as f:
    f.write("B wrote this\n")
"""

# A: the attacker. Prints its uid, then for a few seconds looks for other exec roots by
# listing the build tree, by globbing from its cwd and through /proc/<pid>/cwd, and tries to
# list, read and write each one it finds. Every success is a line of stdout.
ATTACKER = r"""
import glob, os, sys, time
mark, canary, dur = sys.argv[1], sys.argv[2], float(sys.argv[3])
print(os.getuid(), flush=True)
own = os.path.realpath(".")
done = set()
def report(line):
    if line not in done:
        done.add(line)
        print(line, flush=True)
end = time.time() + dur
while time.time() < end:
    for d in ("..", "../..", "../../..", "../../../.."):
        try:
            os.listdir(d)
            if d != "..":
                report(f"LISTED {os.path.realpath(d)}")
        except OSError:
            pass
    roots = set(glob.glob("../../*/root") + glob.glob("../../../*/*/root"))
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            roots.add(f"/proc/{pid}/cwd")
    for r in roots:
        try:
            if os.path.realpath(r) == own or os.path.samefile(r, "."):
                continue
        except OSError:
            continue
        try:
            names = os.listdir(r)
            if "b_input.txt" in names:
                report(f"LISTED victim root {r}: {sorted(names)}")
        except OSError:
            pass
        try:
            with open(os.path.join(r, "b_input.txt")) as f:
                report(f"READ {r}/b_input.txt: {f.read()!r}")
        except OSError:
            pass
        try:
            with open(os.path.join(r, "b_out.txt"), "w") as f:
                f.write("A was here\n")
            report(f"WROTE {r}/b_out.txt")
        except OSError:
            pass
        try:
            open(os.path.join(r, f"{canary}-{mark}"), "w").close()
            report(f"WROTE {r}/{canary}-{mark}")
        except OSError:
            pass
    time.sleep(0.05)
"""


def test_concurrent_actions_cannot_reach_each_other(stoker, client, guard, mark):
    b_input = f"B's input {uuid.uuid4()}\n".encode()
    victim = background(execute, client, py_argv(VICTIM, mark + "-b", "5"),
                        {"b_input.txt": b_input}, mark=mark + "-b",
                        output_files=["b_out.txt"])
    # A starts once B really runs (its ready file exists below the build dir).
    wait_for_file = time.monotonic() + 20
    while find_file(stoker.build_dir, f"ready-{mark}-b") is None:
        assert time.monotonic() < wait_for_file, "the victim never started"
        assert not victim.done(), describe(client, victim.result())
        time.sleep(0.05)
    a = execute(client, py_argv(ATTACKER, mark + "-a", CANARY, "2.5"), {"a.txt": b"a"},
                mark=mark + "-a")
    b = victim.result(timeout=60)
    assert a.status.code == 0, describe(client, a)
    assert b.status.code == 0, describe(client, b)
    a_uid, *a_found = stdout_of(client, a).splitlines()
    b_lines = stdout_of(client, b).splitlines()
    problems = [f"A managed: {line}" for line in a_found]
    if a_uid == b_lines[0]:
        problems.append(f"A and B ran as the same uid {a_uid}")
    bad_uids = [u for u in (a_uid, b_lines[0]) if int(u) not in ACTION_UIDS]
    if bad_uids:
        problems.append(f"uids {bad_uids} are not from the action_uids range")
    if b_lines[1:] != [b_input.decode().strip(),
                       str(sorted(["b_input.txt", f"ready-{mark}-b"]))]:
        problems.append(f"B saw its exec root changed: {b_lines[1:]}")
    outs = {f.path: client.read(f.digest) for f in b.result.output_files}
    if outs != {"b_out.txt": b"B wrote this\n"}:
        problems.append(f"B's outputs are not what B wrote: {outs}")
    problems += guard.problems([a.result, b.result])
    assert not problems, "\n".join(problems)


# argv: mark, seconds. Opens (read, write, read-write) every file it finds in the data dir
# (walking up from its cwd, and at the known layout paths), tries flock and lockf, shared
# and exclusive, on each, prints what worked, drops a ready file and sleeps holding it all.
LOCKER = r"""
import fcntl, os, sys, time
mark, dur = sys.argv[1], float(sys.argv[2])
own = os.path.realpath("..")  # this action's own directory (exec root, stdout, tmp)
data = os.path.realpath("../../../..")
paths = set()
for top in (data, "../../../.."):
    for dirpath, dirnames, filenames in os.walk(top):
        real = os.path.realpath(dirpath)
        if real == own or real.startswith(own + "/"):
            dirnames[:] = []
            continue
        paths.update(os.path.realpath(os.path.join(dirpath, n)) for n in filenames)
        if len(paths) > 5000:
            break
for rel in ("cache/lock", "cache/index", "run/server.pid", "run/worker-0.pid",
            "run/status-supervisor.json", "run/workers.sock"):
    paths.add(os.path.join(data, rel))
held = []
for p in sorted(paths):
    if p.startswith(own + "/"):
        continue
    for flags, how in ((os.O_RDONLY, "r"), (os.O_WRONLY, "w"), (os.O_RDWR, "rw")):
        try:
            fd = os.open(p, flags | os.O_NONBLOCK | os.O_NOCTTY)
        except OSError:
            continue
        print("OPEN", how, p)
        held.append(fd)
        for fn, op, name in ((fcntl.flock, fcntl.LOCK_SH, "flock-sh"),
                             (fcntl.flock, fcntl.LOCK_EX, "flock-ex"),
                             (fcntl.lockf, fcntl.LOCK_SH, "lockf-sh"),
                             (fcntl.lockf, fcntl.LOCK_EX, "lockf-ex")):
            try:
                fn(fd, op | fcntl.LOCK_NB)
                print("LOCK", name, how, p)
            except OSError:
                pass
sys.stdout.flush()
open(f"ready-{mark}", "w").close()
time.sleep(dur)
"""


def test_action_cannot_open_or_lock_the_data_dir(stoker, client, guard, mark):
    # Something in the CAS, the action cache and uploads/ for the action to find.
    warm = execute(client, ["/bin/sh", "-c", "echo warm > o"], {"i": b"warm"}, mark=mark,
                   output_files=["o"])
    assert warm.status.code == 0, describe(client, warm)
    locker = background(execute, client, py_argv(LOCKER, mark, "6"), mark=mark)
    deadline = time.monotonic() + 30
    while find_file(stoker.build_dir, f"ready-{mark}") is None:
        assert time.monotonic() < deadline, "the locking action never got ready"
        assert not locker.done(), describe(client, locker.result())
        time.sleep(0.05)
    # While it holds whatever it got: CAS writes (both ways) finish within a few seconds.
    problems = []
    for how in ("BatchUpdateBlobs", "ByteStream"):
        data = f"written while an action holds locks {uuid.uuid4()} {how}".encode() * 1000
        t0 = time.monotonic()
        try:
            if how == "BatchUpdateBlobs":
                reply = client.cas.BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(
                    requests=[re_pb2.BatchUpdateBlobsRequest.Request(
                        digest=digest_of(data), data=data)]), timeout=5)
                assert reply.responses[0].status.code == 0, reply.responses[0].status
            else:
                resource = blob_resource(digest_of(data), upload=str(uuid.uuid4()))
                client.bs_write(resource, [data[:len(data) // 2], data[len(data) // 2:]])
            assert client.read(digest_of(data)) == data
        except Exception as e:  # noqa: BLE001 - a timeout is the finding
            problems.append(f"{how} while the action held its locks: {e!r}"[:300])
        elapsed = time.monotonic() - t0
        if elapsed > 5:
            problems.append(f"{how} took {elapsed:.1f}s while the action held its locks")
    response = locker.result(timeout=60)
    assert response.status.code == 0, describe(client, response)
    got = stdout_of(client, response).splitlines()
    opened = [line for line in got if line.startswith("OPEN")]
    locked = [line for line in got if line.startswith("LOCK")]
    if opened or locked:
        # The lock and index files first: those are what stall the CAS.
        locked.sort(key=lambda line: "/cas/" in line)
        opened.sort(key=lambda line: "/cas/" in line)
        problems.append(f"the action opened {len(opened)} and locked {len(locked)} files of the "
                        f"data dir, e.g.:\n  " + "\n  ".join((locked + opened)[:12]))
    problems += guard.problems([warm.result, response.result])
    assert not problems, "\n".join(problems)


def test_data_dir_layout_is_closed_to_actions(stoker, client, mark):
    """The modes the design promises, checked directly (the attacks above check their
    effect): nothing of the data dir is listable or writable by an action uid."""
    execute(client, ["/bin/true"], mark=mark)  # so that build/worker-0 exists
    data = stoker.data_dir
    want = {".": 0o711, "build": 0o711, "build/worker-0": 0o711, "cache": 0o700, "ac": 0o700,
            "uploads": 0o700, "run": 0o700, "cache/lock": 0o600, "cache/index": 0o600}
    wrong = []
    for rel, mode in want.items():
        st = os.lstat(data / rel)
        if (stat.S_IMODE(st.st_mode), st.st_uid) != (mode, 0):
            wrong.append(f"{rel}: {oct(stat.S_IMODE(st.st_mode))} uid {st.st_uid}, "
                         f"want {oct(mode)} uid 0")
    assert not wrong, "\n".join(wrong)
