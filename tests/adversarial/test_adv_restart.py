"""Leftovers and dirty restarts: exec roots an action made 10,000 levels deep (partly chmod
000) with the worker SIGKILLed mid-action; a 5000-file input tree across a SIGKILL of the
whole Stoker (dirty index); a second `stoker up` on a data dir in use, also while only the
workers of a SIGKILLed supervisor live. Stoker must come back serving every time, never
halt in a crash loop, and never run twice on one data dir."""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.adversarial.adv_support import (
    ROOT_ONLY,
    Guard,
    attempt,
    background,
    describe,
    execute,
    find_file,
    health_problems,
    pid_alive,
    py_argv,
    stdout_of,
    stoker_pids,
    wait_for,
)
from tests.integration.support import Client, command, start

pytestmark = [ROOT_ONLY, pytest.mark.timeout(180)]

# argv: mark, depth, seconds. deep/d/d/... depth levels, every 97th chmod 000 (made on the
# way back up, so the walk down could still pass), then a ready file and a sleep.
DEEP = r"""
import os, sys, time
mark, depth, dur = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
top = os.open(".", os.O_RDONLY)
os.mkdir("deep")
os.chdir("deep")
for _ in range(depth):
    os.mkdir("d")
    os.chdir("d")
for i in range(depth):
    os.chdir("..")
    if i % 97 == 0:
        os.chmod("d", 0)
os.fchdir(top)
print("built", depth, flush=True)
open(f"ready-{mark}", "w").close()
time.sleep(dur)
"""


def halted(process) -> bool:
    return "halt" in process.log_tail(limit=1 << 20).lower()


def test_deep_trees_and_a_killed_worker(stoker_factory, sentinel, base_dir, mark):
    process = start(stoker_factory("deep", extra_args=["--drain-grace", "5s"]))
    client = Client(process.address)
    try:
        guard = Guard(process, client, sentinel, base_dir, mark)
        problems, results = [], []
        for depth in (1200, 10_000):
            r = attempt(problems, f"depth {depth}", execute, client,
                        py_argv(DEEP, mark, str(depth), "0"), mark=mark)
            if r is not None and (r.status.code != 0
                                  or stdout_of(client, r) != f"built {depth}\n"):
                problems.append(f"depth {depth}: " + describe(client, r))
            elif r is not None:
                results.append(r.result)
        problems += [f"after the deep actions: {p}" for p in health_problems(process, client)]

        # SIGKILL the worker while an action with a 10k-deep tree runs.
        outcome = "not run"
        if process.alive():
            killed = background(execute, client, py_argv(DEEP, mark + "-k", "10000", "3"),
                                mark=mark + "-k", exec_timeout=90)
            attempt(problems, "the deep action to start", wait_for,
                    lambda: find_file(process.build_dir, f"ready-{mark}-k") or killed.done(),
                    30)
            old = stoker_pids(process)
            if "worker-0" in old:
                os.kill(old["worker-0"], signal.SIGKILL)
            outcome = attempt(problems, "the killed action's Execute", lambda: describe(
                client, killed.result(timeout=90)))
            # (A Stoker that halted meanwhile ends the wait: health reports it below.)
            attempt(problems, "a new worker", wait_for, lambda: not process.alive() or (
                stoker_pids(process).get("worker-0") not in (None, old.get("worker-0"))), 30)
            problems += [f"after the worker was killed: {p}" for p in
                         health_problems(process, client)]

        # A clean stop and a start on the same data dir, leftovers and all.
        code = process.stop(grace=30)
        if code != 0:
            problems.append(f"SIGTERM: exit code {code}")
        if halted(process):
            problems.append("the supervisor log mentions a halt (crash loop)")
        try:
            process.start()
        except RuntimeError as e:
            problems.append(f"no start on the same data dir: {str(e)[-1500:]}")
        else:
            problems += [f"after the restart: {p}" for p in health_problems(process, client)]
            again = attempt(problems, "a deep action after the restart", execute, client,
                            py_argv(DEEP, mark + "-again", "1200", "0"), mark=mark)
            if again is not None and again.status.code != 0:
                problems.append("a deep action after the restart: " + describe(client, again))
        problems += guard.problems(results, health=process.alive())
        assert not problems, f"(the killed action's Execute: {outcome})\n" + "\n".join(
            problems)
    finally:
        client.close()


LISTING = "ls | wc -l; cat f0000 f4095 f4999"


def test_wide_input_tree_after_a_dirty_restart(stoker_factory, sentinel, base_dir, mark):
    process = start(stoker_factory("wide"))
    client = Client(process.address)
    try:
        guard = Guard(process, client, sentinel, base_dir, mark)
        inputs = {f"f{i:04d}": f"content {i}\n".encode() for i in range(5000)}
        want = "5000\ncontent 0\ncontent 4095\ncontent 4999\n"
        root = client.put_tree(inputs).root
        action = client.action(command(["/bin/sh", "-c", LISTING]), root)
        first = client.execute(action, skip_cache_lookup=True).response
        assert first.status.code == 0, describe(client, first)
        assert stdout_of(client, first) == want

        # SIGKILL everything (supervisor, server, workers): the index is left dirty.
        assert process.proc is not None
        pids = stoker_pids(process).values()
        os.killpg(process.proc.pid, signal.SIGKILL)
        process.proc.wait(timeout=10)
        wait_for(lambda: not any(pid_alive(p) for p in pids), 10,
                 what="the killed processes to go")
        start(process)

        problems = []
        again = client.execute(action, skip_cache_lookup=True, timeout=90).response
        if again.status.code != 0 or stdout_of(client, again) != want:
            problems.append("the same action after the dirty restart: "
                            + describe(client, again))
        variant = client.execute(client.action(command(
            ["/bin/sh", "-c", "ls | tail -n 1; cat f2048"]), root), timeout=90).response
        if variant.status.code != 0 or stdout_of(client, variant) != "f4999\ncontent 2048\n":
            problems.append("a variant after the dirty restart: " + describe(client, variant))
        problems += guard.problems([r.result for r in (first, again, variant)
                                    if r.HasField("result")])
        assert not problems, "\n".join(problems)
    finally:
        client.close()


def test_second_stoker_on_a_data_dir_in_use(stoker_factory, base_dir, mark):
    first = start(stoker_factory("inuse", extra_args=["--drain-grace", "5s"]))
    data = first.data_dir
    client = Client(first.address)
    problems = []
    try:
        def second_refuses(name: str, holders: set[int]) -> None:
            """A second `stoker up` on data must exit at once naming one of holders."""
            other = stoker_factory(name, data_dir=data)
            t0 = time.monotonic()
            try:
                other.start(ready_within=15)
            except RuntimeError as e:
                took = time.monotonic() - t0
                if not any(str(pid) in str(e) for pid in holders):
                    problems.append(f"{name}: refused without naming any of {holders}:\n"
                                    f"{str(e)[-1500:]}")
                if took > 10:
                    problems.append(f"{name}: took {took:.1f}s to refuse")
                return
            problems.append(f"{name}: a second stoker up served on a data dir in use")
            other.stop(grace=10)

        pids = stoker_pids(first)
        second_refuses("second", {pids["supervisor"]})

        # The supervisor alone dies; its workers drain a running action meanwhile.
        runner = background(execute, client, py_argv(
            "import sys, time; open(f'ready-{sys.argv[1]}', 'w').close(); time.sleep(8)",
            mark), mark=mark, exec_timeout=60)
        wait_for(lambda: find_file(first.build_dir, f"ready-{mark}") or runner.done(), 30,
                 what="the long action to start")
        pids = stoker_pids(first)
        os.kill(pids["supervisor"], signal.SIGKILL)
        first.proc.wait(timeout=10)
        survivors = {p for role, p in pids.items() if role != "supervisor" and pid_alive(p)}
        if survivors:
            second_refuses("third", survivors)
        else:
            problems.append("no child outlived the supervisor: the case is not exercised")

        # Once the old processes are gone, a new one starts (theirs must go within the
        # drain grace; past that, we end them so the rest can be checked).
        try:
            wait_for(lambda: not any(pid_alive(p) for p in survivors), 20,
                     what="the old children to exit")
        except AssertionError:
            problems.append(f"old children still alive 20s after the supervisor died: "
                            f"{[p for p in survivors if pid_alive(p)]}")
            for p in survivors:
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        runner.exception(timeout=60)
        fresh = stoker_factory("fresh", data_dir=data)
        try:
            fresh.start(ready_within=30)
        except RuntimeError as e:
            problems.append(f"no start once the old processes were gone:\n{str(e)[-1500:]}")
        else:
            fresh_client = Client(fresh.address)
            problems += health_problems(fresh, fresh_client)
            fresh_client.close()
        assert not problems, "\n".join(problems)
    finally:
        client.close()
