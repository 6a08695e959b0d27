"""The sandbox runner (workload-isolation-type=sandbox: bubblewrap) through a worker's own
pipeline (the pipeline_rig), for real: what the action sees (its exec root at /execroot,
its TMPDIR, a read-only host, its own /proc, /run and /dev, no data directory), and the
attacks of milestones 4 and 6 under it (the Command's environment in a privileged process,
survivors, user namespaces, the host's loopback, memory). A bwrap that cannot start is
Stoker's failure (UNAVAILABLE), never the action's exit code."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.rpc import code_pb2

from engine.runners import sandbox
from tests.adversarial.adv_support import (
    EVIL_SCRIPT,
    build_evil_libs,
    evil_loads,
    evil_value,
    root_loads,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="slot uids need root")

PY = "/usr/bin/python3"
ENV = {"PATH": "/usr/bin:/bin"}
SANDBOX = {"workload-isolation-type": "sandbox"}


@pytest.fixture
def rig(make_pipeline_rig):
    rig = make_pipeline_rig()
    if "sandbox" not in rig.runners.runners:
        pytest.skip(f"no sandbox here: {rig.runners.unavailable.get('sandbox')}")
    return rig


def out(rig, outcome) -> str:
    return rig.read(outcome.result.stdout_digest).decode()


def err(rig, outcome) -> str:
    return rig.read(outcome.result.stderr_digest).decode()


def test_the_action_sees_its_exec_root_its_tmpdir_and_a_read_only_host(rig):
    script = textwrap.dedent("""
        id -u; pwd; echo "$TMPDIR $FOO"
        echo made > made.txt && echo root-writable
        touch /tmp/t && echo tmp-writable
        touch /var/tmp/t && echo var-tmp-writable
        for d in /usr /etc /var /opt /home; do touch $d/x 2>/dev/null && echo "wrote $d"; done
        ls -A /run | wc -l
        ls /proc | grep -c '^[0-9]'
        """)
    outcome = rig.run(["/bin/sh", "-c", script], env={**ENV, "FOO": "bar"},
                      platform={**SANDBOX}, output_paths=["made.txt"])
    assert outcome.status.code == code_pb2.OK, outcome.status.message
    lines = out(rig, outcome).splitlines()
    uid = int(lines[0])
    assert uid in rig.identities.uids
    assert lines[1:6] == ["/execroot", "/tmp bar", "root-writable", "tmp-writable",
                          "var-tmp-writable"], lines
    assert lines[6] == "0", lines  # /run is its own and empty: no host sockets
    assert int(lines[7]) <= 4, lines  # its own pid namespace: bwrap's init, sh, ls, grep
    [made] = outcome.result.output_files
    assert made.path == "made.txt" and rig.read(made.digest) == b"made\n"


def test_the_working_directory_is_below_the_fixed_exec_root(rig):
    b = rig.blobs
    root = b.directory(dirs=[("a", b.directory(dirs=[("b", b.directory())]))])
    outcome = rig.run(["/bin/pwd"], env=ENV, platform=SANDBOX, working_directory="a/b",
                      input_root=root)
    assert outcome.status.code == code_pb2.OK, outcome.status.message
    assert out(rig, outcome) == "/execroot/a/b\n"


def test_the_data_directory_and_other_actions_are_not_there(make_pipeline_rig):
    """With the data directory where a worker keeps it (not under /tmp, which is the
    action's own in a sandbox): it is empty, and another action's directory is not there
    even when it opens it to all."""
    base = Path(tempfile.mkdtemp(prefix="stoker-sandbox-data-", dir="/var/lib"))
    try:
        base.chmod(0o711)
        rig = make_pipeline_rig(data_dir=str(base / "data"))
        if "sandbox" not in rig.runners.runners:
            pytest.skip("no sandbox here")
        other = Path(rig.config.build_dir) / "worker-0" / "other-action"
        other.mkdir(parents=True)
        other.chmod(0o777)
        (other / "secret").write_text("other's")
        script = (f"echo entries $(ls -A {rig.config.data_dir} | wc -l); "
                  f"cat {other}/secret 2>/dev/null; echo end")
        outcome = rig.run(["/bin/sh", "-c", script], env=ENV, platform=SANDBOX)
        assert out(rig, outcome) == "entries 0\nend\n", err(rig, outcome)
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """World-readable, outside what the sandbox replaces (/tmp, /run), for the attack's
    library."""
    d = Path(tempfile.mkdtemp(prefix="stoker-sandbox-", dir="/srv"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("variable", ["LD_PRELOAD", "LD_LIBRARY_PATH", "LD_AUDIT", "GCONV_PATH"])
def test_the_commands_environment_reaches_neither_root_nor_bwrap(rig, shared_dir, variable):
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build the attack library")
    libs, log = build_evil_libs(shared_dir)
    outcome = rig.run(["/bin/sh", "-c", EVIL_SCRIPT],
                      env={**ENV, variable: evil_value(libs, variable)}, platform=SANDBOX)
    assert outcome.status.code == code_pb2.OK, outcome.status.message
    stderr = err(rig, outcome)
    assert root_loads(log, stderr) == [], f"{variable} ran code as root"
    loads = evil_loads(log, stderr)
    assert all(comm != "bwrap" for _, comm in loads), loads  # bwrap's own setup untouched
    if variable in ("LD_PRELOAD", "LD_AUDIT"):
        uid = int(out(rig, outcome).split()[-1])
        assert loads and all(euid == uid for euid, _ in loads), loads


def test_nothing_the_action_started_outlives_it(rig):
    # A setsid'd child that would go on writing into the exec root for 3 s.
    script = ("import os, time\nif os.fork() == 0:\n os.setsid()\n"
              " for i in range(30):\n  open('/execroot/late', 'a').write('x'); time.sleep(0.1)\n"
              "print('parent done')")
    outcome = rig.run([PY, "-c", script], env=ENV, platform=SANDBOX)
    assert out(rig, outcome) == "parent done\n"
    left = _running(rig.identities.uids)
    assert not left, left


def _running(uids: list[int]) -> list[str]:
    """The processes of these uids still there (zombies too), as 'pid state command'."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/status") as f:
                    status = f.read()
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
            if int(fields["Uid"].split()[0]) in uids:
                found.append(f"{entry} {fields['State'].strip()} {cmd} "
                             f"name={fields['Name'].strip()} ppid={fields['PPid'].strip()} "
                             f"me={os.getpid()}")
    return found


def test_a_timeout_kills_the_whole_sandbox(rig):
    start = time.monotonic()
    outcome = rig.run(["/bin/sh", "-c", "sleep 60 & sleep 60"], env=ENV, platform=SANDBOX,
                      timeout_s=1)
    assert time.monotonic() - start < 10
    assert outcome.status.code == code_pb2.DEADLINE_EXCEEDED, outcome.status
    left = _running(rig.identities.uids)
    assert not left, left


def test_no_user_namespaces_and_no_network_but_its_loopback(rig):
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    code = textwrap.dedent(f"""
        import os, socket, subprocess
        r = subprocess.run(["unshare", "-U", "true"], capture_output=True)
        print("userns", "refused" if r.returncode else "made")
        s = socket.socket(); s.settimeout(2)
        print("host loopback", "reached" if s.connect_ex(("127.0.0.1", {port})) == 0
              else "refused")
        print(sorted(n for _, n in socket.if_nameindex()))
        """)
    try:
        outcome = rig.run([PY, "-c", code], env=ENV, platform=SANDBOX)
    finally:
        listener.close()
    assert out(rig, outcome).splitlines() == ["userns refused", "host loopback refused",
                                              "['lo']"], err(rig, outcome)


def test_an_action_over_its_memory_limit_is_killed_and_told(make_pipeline_rig):
    rig = make_pipeline_rig(limits=True, action_memory_bytes=64 << 20)
    if "sandbox" not in rig.runners.runners:
        pytest.skip("no sandbox here")
    if rig.cgroups is None or rig.cgroups.memory_base is None:
        pytest.skip("no writable memory cgroup here")
    hog = "x = [bytearray(16 << 20) for _ in range(32)]\nprint('survived')"
    outcome = rig.run([PY, "-c", hog], env=ENV, timeout_s=60, platform=SANDBOX)
    assert "survived" not in out(rig, outcome)
    assert "more than its memory limit of 67108864 bytes" in err(rig, outcome)


def test_a_bwrap_that_cannot_start_is_stokers_failure(rig, shared_dir):
    fake = shared_dir / "bwrap"  # a stand-in that dies before the command starts
    fake.write_text("#!/bin/sh\necho 'bwrap: cannot do it' >&2\nexit 1\n")
    fake.chmod(0o755)
    rig.runners.runners["sandbox"].bwrap = str(fake)
    outcome = rig.run(["/bin/echo", "ran"], env=ENV, platform=SANDBOX)
    assert outcome.status.code == code_pb2.UNAVAILABLE, outcome.status
    assert "could not set the sandbox up (exit 1): bwrap: cannot do it" \
        in outcome.status.message


def test_a_sandbox_this_machine_cannot_make_is_refused_with_the_reason(make_pipeline_rig,
                                                                         monkeypatch):
    monkeypatch.setattr(sandbox, "find_bwrap", lambda: None)
    monkeypatch.setattr("engine.runners.select.find_bwrap", lambda: None)
    rig = make_pipeline_rig()
    outcome = rig.run(["/bin/true"], env=ENV, platform=SANDBOX)
    assert outcome.status.code == code_pb2.FAILED_PRECONDITION
    assert "workload-isolation-type='sandbox': not available on this executor: bwrap " \
           "(bubblewrap) is not installed" in outcome.status.message


def test_concurrent_sandboxes_do_not_see_each_other(rig):
    async def both():
        slow = rig.task(["/bin/sh", "-c", "echo mine > /tmp/m; sleep 1; ls /tmp"], env=ENV,
                        platform=SANDBOX)
        peek = rig.task(["/bin/sh", "-c", "sleep 0.3; ls /tmp; ls /proc | grep -c '^[0-9]'"],
                        env=ENV, platform=SANDBOX)
        return await asyncio.gather(rig.execute(slow), rig.execute(peek))

    a, b = asyncio.run(both())
    assert out(rig, a) == "m\n"
    lines = out(rig, b).splitlines()
    assert "m" not in lines and int(lines[-1]) <= 4, lines  # its own /tmp and pids


def test_an_allowed_network_reaches_out_but_not_the_hosts_loopback(make_pipeline_rig):
    """dockerNetwork=bridge under actions_may_request_network: the sandbox shares the
    action's user-mode network (slirp4netns), as the bare runner's actions do."""
    rig = make_pipeline_rig(actions_may_request_network=True)
    if "sandbox" not in rig.runners.runners or rig.bare.user_networks is None:
        pytest.skip("no sandbox or no user-mode network here")
    code = "import socket; print(sorted(n for _, n in socket.if_nameindex()))"
    outcome = rig.run([PY, "-c", code], env=ENV,
                      platform={**SANDBOX, "dockerNetwork": "bridge"})
    assert outcome.status.code == code_pb2.OK, outcome.status.message
    assert out(rig, outcome) == "['lo', 'tap0']\n", err(rig, outcome)


def test_an_action_asking_for_firecracker_is_refused_naming_what_is_missing(make_pipeline_rig):
    rig = make_pipeline_rig()
    outcome = rig.run(["/bin/true"], env=ENV, platform={"workload-isolation-type":
                                                        "firecracker"})
    assert outcome.status.code == code_pb2.FAILED_PRECONDITION
    assert "workload-isolation-type='firecracker': not available on this executor: this " \
           "machine lacks" in outcome.status.message
    assert "firecracker" not in rig.runners.offered()
