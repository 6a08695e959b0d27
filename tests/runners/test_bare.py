import asyncio
import os
import pathlib
import stat
import sys
import time

import pytest
import uvloop

from engine.errors import InvalidArgument
from engine.runners import containment, spawn
from engine.runners.bare import run
from engine.runners.protocol import RunRequest

SH = "/bin/sh"


@pytest.fixture(params=["asyncio", "uvloop"])
def run_sync(request):
    factory = uvloop.new_event_loop if request.param == "uvloop" else asyncio.new_event_loop

    def go(req):
        with asyncio.Runner(loop_factory=factory) as r:
            return r.run(run(req))

    return go


@pytest.fixture
def action(tmp_path):
    """A cwd and output files for one run; make(argv, **kw) builds the request."""
    cwd = tmp_path / "root"
    cwd.mkdir()
    tmp = tmp_path / "tmp"
    tmp.mkdir()

    class A:
        root = cwd

        @staticmethod
        def make(argv, env=None, **kw):
            return RunRequest(argv=argv, env={} if env is None else env, exec_root=str(cwd),
                              working_directory="",
                              stdout_path=str(tmp_path / "stdout"),
                              stderr_path=str(tmp_path / "stderr"), tmpdir=str(tmp), **kw)

        @staticmethod
        def out():
            return (tmp_path / "stdout").read_text()

        @staticmethod
        def err():
            return (tmp_path / "stderr").read_text()

    A.tmp = str(tmp)
    return A


def test_exit_codes_and_capture(run_sync, action):
    r = run_sync(action.make([SH, "-c", "echo out; echo err >&2; exit 3"]))
    assert (r.exit_code, r.timed_out) == (3, False)
    assert action.out() == "out\n" and action.err() == "err\n"
    assert r.start <= r.end and r.rusage is not None and r.spawn_error is None
    assert run_sync(action.make([SH, "-c", "true"])).exit_code == 0


def test_signal_death_maps_to_128_plus_signal(run_sync, action):
    assert run_sync(action.make([SH, "-c", "kill -TERM $$"])).exit_code == 143
    assert run_sync(action.make([SH, "-c", "kill -KILL $$"])).exit_code == 137


def test_environment_is_exactly_the_commands_plus_tmpdir(run_sync, action):
    run_sync(action.make(["/usr/bin/env"], env={"A": "1", "B": "two words"}))
    assert sorted(action.out().splitlines()) == ["A=1", "B=two words", f"TMPDIR={action.tmp}"]
    run_sync(action.make(["/usr/bin/env"], env={"TMPDIR": "/elsewhere"}))
    assert action.out().splitlines() == ["TMPDIR=/elsewhere"]


def test_cwd_and_stdin(run_sync, action):
    run_sync(action.make([SH, "-c", "pwd; cat; echo end"]))
    assert action.out() == f"{action.root}\nend\n"  # stdin is /dev/null: cat ends at once


def write_script(path, text="#!/bin/sh\necho \"ran $0 $*\"\n"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)


def test_argv0_is_looked_up_in_the_commands_path(run_sync, action, tmp_path):
    write_script(tmp_path / "tools/mytool")
    r = run_sync(action.make(["mytool", "x"], env={"PATH": f"/nonexistent:{tmp_path}/tools"}))
    assert r.exit_code == 0 and action.out() == f"ran {tmp_path}/tools/mytool x\n"


def test_argv0_is_passed_as_given(run_sync, action, tmp_path):
    (tmp_path / "tools").mkdir()
    os.symlink("/bin/cat", tmp_path / "tools/mycat")
    r = run_sync(action.make(["mycat", "/proc/self/cmdline"], env={"PATH": f"{tmp_path}/tools"}))
    assert r.exit_code == 0 and action.out() == "mycat\0/proc/self/cmdline\0"


def test_relative_path_entries_and_slash_paths_are_from_cwd(run_sync, action):
    write_script(action.root / "bin/tool")
    # Found from the cwd (the script sees the path it was run by, as execvp gives it).
    assert run_sync(action.make(["tool"], env={"PATH": "bin"})).exit_code == 0
    assert action.out() == "ran bin/tool \n"
    assert run_sync(action.make(["bin/tool", "a"])).exit_code == 0
    assert action.out() == "ran bin/tool a\n"
    assert run_sync(action.make(["./bin/tool"])).exit_code == 0


def test_bare_name_falls_back_to_the_working_directory(run_sync, action):
    write_script(action.root / "local_tool")
    r = run_sync(action.make(["local_tool"], env={"PATH": "/usr/bin"}))
    assert r.exit_code == 0 and action.out().startswith("ran ")


def test_path_entries_take_precedence_in_order(run_sync, action, tmp_path):
    write_script(tmp_path / "one/t", "#!/bin/sh\necho one\n")
    write_script(tmp_path / "two/t", "#!/bin/sh\necho two\n")
    run_sync(action.make(["t"], env={"PATH": f"{tmp_path}/two:{tmp_path}/one"}))
    assert action.out() == "two\n"


def test_spawn_failures_are_results(run_sync, action):
    r = run_sync(action.make(["no-such-tool"], env={"PATH": "/usr/bin"}))
    assert r.exit_code == 127 and "no-such-tool" in action.err() and r.spawn_error
    r = run_sync(action.make(["./missing"]))
    assert r.exit_code == 127 and "No such file" in action.err()
    (action.root / "noexec").write_text("#!/bin/sh\n")
    r = run_sync(action.make(["./noexec"]))
    assert r.exit_code == 126 and "Permission denied" in action.err()
    (action.root / "garbage").write_bytes(b"\x00\x01\x02 not a program")
    (action.root / "garbage").chmod(0o755)
    assert run_sync(action.make(["./garbage"])).exit_code == 126
    # Found through PATH but not runnable: that is the answer (as execvp), not "not found".
    r = run_sync(action.make(["garbage"], env={"PATH": "."}))
    assert r.exit_code == 126 and "Exec format error" in action.err()
    # What no process environment can hold is the client's error, named.
    with pytest.raises(InvalidArgument, match="environment_variables: BAD holds a NUL"):
        run_sync(action.make([SH, "-c", "true"], env={"BAD": "nul\0here"}))
    with pytest.raises(InvalidArgument, match="name 'A=B'"):
        run_sync(action.make([SH, "-c", "true"], env={"A=B": "x"}))


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[0] != b"Z"
    except FileNotFoundError:
        return False


# A grandchild that leaves the action's process group (only the session scan finds it).
OWN_GROUP = ("import os, time; os.setpgid(0, 0); "
             "open('pids', 'a').write(str(os.getpid()) + chr(10)); time.sleep(300)")
TREE_SCRIPT = f"""
sleep 300 &
echo $! >> pids
{sys.executable} -c "{OWN_GROUP}" &
{SH} -c '{SH} -c "sleep 300 & echo \\$! >> pids; wait" & wait' &
echo $$ >> pids
wait
"""


def test_timeout_kills_the_whole_tree(run_sync, action):
    t0 = time.monotonic()
    r = run_sync(action.make([SH, "-c", TREE_SCRIPT], timeout_s=1.5))
    assert r.timed_out and r.exit_code == 137
    assert time.monotonic() - t0 < 10
    pids = [int(x) for x in (action.root / "pids").read_text().split()]
    assert len(pids) == 4  # sleep, own-process-group grandchild, grand-grandchild, shell
    deadline = time.monotonic() + 5
    while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [p for p in pids if pid_alive(p)]


def test_no_timeout_when_zero(run_sync, action):
    r = run_sync(action.make([SH, "-c", "sleep 0.2; echo done"], timeout_s=0))
    assert (r.exit_code, r.timed_out, action.out()) == (0, False, "done\n")


def test_leftovers_in_the_process_group_die_with_the_action(run_sync, action):
    r = run_sync(action.make([SH, "-c", "sleep 300 & echo $! > bg"]))
    assert r.exit_code == 0
    pid = int((action.root / "bg").read_text())
    deadline = time.monotonic() + 5
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not pid_alive(pid)


def test_cancellation_kills_the_action(action):
    async def main():
        task = asyncio.create_task(run(action.make([SH, "-c", "echo $$ > me; exec sleep 300"])))
        for _ in range(200):
            await asyncio.sleep(0.02)
            if (action.root / "me").exists() and (action.root / "me").read_text():
                break
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        pid = int((action.root / "me").read_text())
        for _ in range(250):
            if not pid_alive(pid):
                break
            await asyncio.sleep(0.02)
        return pid

    pid = asyncio.run(main())
    assert not pid_alive(pid)


def test_runs_concurrently_without_blocking_the_loop(action, tmp_path):
    async def main():
        reqs = []
        for i in range(4):
            req = action.make([SH, "-c", "sleep 0.5"])
            req.stdout_path = str(tmp_path / f"o{i}")
            req.stderr_path = str(tmp_path / f"e{i}")
            reqs.append(req)
        t0 = time.monotonic()
        results = await asyncio.gather(*(run(r) for r in reqs))
        return time.monotonic() - t0, results

    elapsed, results = asyncio.run(main())
    assert all(r.exit_code == 0 for r in results)
    assert elapsed < 1.5


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to change uid")
@pytest.mark.parametrize("mechanism", [containment.PID_NAMESPACE, containment.UID_SWEEP])
def test_run_as_changes_uid_gid_and_drops_groups(open_dir, mechanism):
    if mechanism == containment.PID_NAMESPACE and containment.detect(
            True) != containment.PID_NAMESPACE:
        pytest.skip("no pid namespaces here")
    root = os.path.join(open_dir, "root")
    os.mkdir(root)
    os.chown(root, 65534, 65534)
    write_script(pathlib.Path(root) / "bin/whoami-tool", "#!/bin/sh\nid -u; id -g; id -G\n")
    out = os.path.join(open_dir, "out")
    req = RunRequest(["whoami-tool"], {"PATH": "/usr/bin:/bin:bin"}, root, "", out,
                     os.path.join(open_dir, "err"), root, run_as=(65534, 65534))
    r = asyncio.run(run(req, mechanism))
    assert r.exit_code == 0, open(req.stderr_path).read()
    assert open(out).read().split() == ["65534", "65534", "65534"]


def test_output_files_are_private_and_truncated(run_sync, action, tmp_path):
    run_sync(action.make([SH, "-c", "echo a long first line"]))
    assert stat.S_IMODE(os.stat(tmp_path / "stdout").st_mode) == 0o600
    run_sync(action.make([SH, "-c", "echo new"]))
    assert action.out() == "new\n"


def test_empty_argv_is_a_programming_error(action):
    with pytest.raises(ValueError, match="argv is empty"):
        asyncio.run(run(action.make([])))


@pytest.mark.skipif(os.geteuid() != 0, reason="the spawn helper switches uid as root only")
def test_a_failure_to_set_an_action_up_is_stokers_not_an_exit_code(open_dir):
    """The helper could not set the action up (here: its working directory is gone): that is
    UNAVAILABLE, retried elsewhere, never an exit code the action would be blamed for."""
    root = os.path.join(open_dir, "root")
    os.mkdir(root)
    req = RunRequest(["/bin/true"], {"PATH": "/usr/bin:/bin"}, root, "gone",
                     os.path.join(open_dir, "out"), os.path.join(open_dir, "err"), root,
                     run_as=(65534, 65534))
    with pytest.raises(spawn.SpawnError, match="setting the action up failed: chdir .*gone"):
        asyncio.run(run(req, containment.UID_SWEEP))
