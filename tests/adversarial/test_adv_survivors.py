"""Processes that outlive their action: setsid, setpgid, double fork, and children of an
action that times out. Each survivor spends a few seconds writing into its exec root and
planting canaries wherever a later action (or the build tree) would see them. Containment
means: all of them are dead when Execute answers, and the next action's exec root holds
exactly its inputs."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.adversarial.adv_support import (
    CANARY,
    PYTHON,
    ROOT_ONLY,
    execute,
    marked_procs,
    py_argv,
    sh_argv,
    start_with_env,
    statusz,
    stdout_of,
)
from tests.integration.support import StokerProcess

pytestmark = [ROOT_ONLY, pytest.mark.timeout(120)]

# STOKER_CONTAINMENT forces the weaker mechanism where the machine allows the stronger one:
# uid-sweep is what deployments without CAP_SYS_ADMIN get, so both must hold.
CONTAINMENTS = {"default": {}, "uid-sweep": {"STOKER_CONTAINMENT": "uid-sweep"}}


@pytest.fixture(scope="module", params=sorted(CONTAINMENTS))
def stoker(request, base_dir, sentinel) -> Iterator[StokerProcess]:
    """This module's Stoker, once per containment mechanism."""
    name = request.param
    # Without network namespaces (uid-sweep) `stoker up` wants keys or this explicit consent.
    extra = ["--actions-share-network"] if CONTAINMENTS[name] else []
    process = start_with_env(StokerProcess(base_dir / f"data-{name}", base_dir / f"{name}.log",
                                           workers=1, concurrency=2, extra_args=extra),
                             CONTAINMENTS[name])
    yield process
    process.stop()

SURVIVE_S = 4.0

# The survivor: argv is [-c, mark, canary]. For SURVIVE_S seconds it appends to a log in its
# cwd (an exec root that may be handed to the next action) and tries to plant a canary in
# the worker and build directories and in every exec root it can discover.
SURVIVOR = r"""
import glob, os, sys, time
mark, canary = sys.argv[1], sys.argv[2]
end = time.time() + float(sys.argv[3])
n = 0
while time.time() < end:
    n += 1
    for d in [".", "..", "../..", "../../..", *glob.glob("../../*/root"),
              *glob.glob("../../../*/*/root")]:
        name = "survivor-" + mark + ".log" if d == "." else canary + "-" + mark
        try:
            with open(os.path.join(d, name), "a") as f:
                f.write(f"{os.getpid()} {n}\n")
        except OSError:
            pass
    time.sleep(0.02)
"""


def survivor_cmd(mark: str) -> str:
    """A shell word list that execs the survivor with the marker in argv."""
    code = SURVIVOR.replace("'", "'\"'\"'")
    return f"{PYTHON} -c '{code}' {mark} {CANARY} {SURVIVE_S}"


def variants(mark: str) -> dict[str, tuple[list[str], float | None]]:
    """name -> (argv, Action timeout). Every main process returns within a second (or is
    killed by its timeout) while the survivor it started keeps going."""
    surv = survivor_cmd(mark)
    fork_then = f"""
import os, subprocess, sys, time
mark = sys.argv[1]
def survivor():
    os.execv({PYTHON!r}, [{PYTHON!r}, "-c", {SURVIVOR!r}, mark, {CANARY!r}, "{SURVIVE_S}"])
"""
    return {
        # setsid(1) from a background job: a new session, out of the action's group.
        "setsid": (sh_argv(f"setsid {surv} & sleep 0.2; echo started", mark), None),
        # bash's job control gives the background job a process group of its own (setpgid;
        # dash would refuse without a tty).
        "setpgid-sh": (["/bin/bash", "-c", f"set -m; {surv} & sleep 0.2; echo started",
                        mark], None),
        # The subshell variant: ignores SIGHUP, stays in the group.
        "nohup-subshell": (sh_argv(f"(trap '' HUP; exec {surv}) & sleep 0.2; echo started",
                                   mark), None),
        "setpgid-py": (py_argv(fork_then + """
if os.fork() == 0:
    os.setpgid(0, 0)
    survivor()
time.sleep(0.2); print("started")
""", mark), None),
        "setsid-py": (py_argv(fork_then + """
if os.fork() == 0:
    os.setsid()
    survivor()
time.sleep(0.2); print("started")
""", mark), None),
        # The classic daemon: fork, setsid, fork again, the middle one exits.
        "double-fork": (py_argv(fork_then + """
pid = os.fork()
if pid == 0:
    os.setsid()
    if os.fork() == 0:
        survivor()
    os._exit(0)
os.waitpid(pid, 0)
time.sleep(0.2); print("started")
""", mark), None),
        # Times out with children: one left in the group, one in a session of its own.
        "timeout": (py_argv(fork_then + """
if os.fork() == 0:
    os.setsid()
    survivor()
if os.fork() == 0:
    survivor()
print("started", flush=True)
time.sleep(60)
""", mark), 1.5),
    }


VARIANTS = ["setsid", "setpgid-sh", "nohup-subshell", "setpgid-py", "setsid-py",
            "double-fork", "timeout"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_survivors_are_dead_before_the_result(stoker, client, guard, mark, variant):
    argv, timeout = variants(mark)[variant]
    t0 = time.monotonic()
    response = execute(client, argv, {"in.txt": b"attacker input\n"}, mark=mark,
                       timeout=timeout)
    # Right after Execute answers: nothing of the action may still run.
    left = marked_procs(mark, stoker.build_dir)
    elapsed = time.monotonic() - t0
    problems = []
    if timeout is None:
        assert response.status.code == 0, response.status
        assert stdout_of(client, response) == "started\n"
    else:
        assert response.status.code == 4, response.status  # DEADLINE_EXCEEDED
    if left:
        problems.append(f"{len(left)} process(es) of the action outlived it: {left}")

    # A later action (same slots, maybe the same directory) sees exactly its inputs, even
    # after the survivors had a second more to plant things.
    time.sleep(1.0)
    later = execute(client, ["/bin/sh", "-c", "find . -mindepth 1 | sort; echo --; id -u"],
                    {"mine.txt": b"later input\n"}, mark=mark + "-later")
    assert later.status.code == 0, later.status
    listing, _, uid = stdout_of(client, later).partition("--\n")
    if listing != "./mine.txt\n":
        problems.append(f"the later action's exec root holds more than its input:\n{listing}")
    left = marked_procs(mark, stoker.build_dir)
    if left:
        problems.append(f"still alive {time.monotonic() - t0:.1f}s later: {left}")
    # Let what survived finish (or kill it: the mark fixture does) before the final checks.
    problems += guard.problems([response.result, later.result])
    assert not problems, f"variant {variant} ({elapsed:.1f}s):\n" + "\n".join(problems)


def test_statusz_names_the_containment(stoker, request):
    """As root, never the weak 'session' kind: one of the mechanisms that kill everything."""
    status = statusz(stoker)
    named = status.get("containment")
    named = [named] if isinstance(named, str) else named
    assert named and set(named) <= {"pid-namespace", "uid-sweep", "cgroup"}, status
    forced = CONTAINMENTS[request.node.callspec.params["stoker"]].get("STOKER_CONTAINMENT")
    if forced:
        assert named == [forced], status
