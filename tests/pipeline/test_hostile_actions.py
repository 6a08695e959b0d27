"""Milestone 6's attacks, run through a worker's own pipeline in this process (the
pipeline_rig): an action that tries to get root through its environment, to reach another
action or a listener on the host, to read other processes, to leave state for the next build
of its uid, to make user namespaces, or to take the machine's pids or memory. Each runs on
both containment paths where they differ (pid-namespace: the default as root; uid-sweep:
what a container without CAP_SYS_ADMIN gets). tests/adversarial/test_adv_privilege.py runs
the same through a real `stoker up` and `stoker executor`."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.rpc import code_pb2

from engine.runners import containment
from tests.adversarial.adv_support import (
    EVIL_SCRIPT,
    build_evil_libs,
    evil_loads,
    evil_value,
    root_loads,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="slot uids and namespaces need root")

PY = "/usr/bin/python3"  # the system's: the venv may sit under a home slot uids cannot enter
ENV = {"PATH": "/usr/bin:/bin"}


def mechanisms() -> list[str]:
    found = [containment.UID_SWEEP]
    if containment.detect(True) == containment.PID_NAMESPACE:
        found.insert(0, containment.PID_NAMESPACE)
    return found


@pytest.fixture(params=mechanisms())
def rig(request, make_pipeline_rig):
    return make_pipeline_rig(mechanism=request.param)


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory every uid may write, outside /tmp (an action's /tmp is its own) so that
    the test sees what processes of any uid left there."""
    d = Path(tempfile.mkdtemp(prefix="stoker-hostile-", dir="/run"))
    d.chmod(0o1777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def out(rig, outcome) -> str:
    return rig.read(outcome.result.stdout_digest).decode()


def err(rig, outcome) -> str:
    return rig.read(outcome.result.stderr_digest).decode()


# ---- no privileged process sees the Command's environment -------------------------------

@pytest.fixture
def evil_libs(shared_dir: Path) -> tuple[Path, Path]:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build the attack library")
    return build_evil_libs(shared_dir)


@pytest.mark.parametrize("variable", ["LD_PRELOAD", "LD_LIBRARY_PATH", "LD_AUDIT", "GCONV_PATH"])
def test_the_commands_environment_reaches_no_root_process(rig, evil_libs, variable):
    libs, log = evil_libs
    outcome = rig.run(["/bin/sh", "-c", EVIL_SCRIPT],
                      env={**ENV, variable: evil_value(libs, variable)})
    assert outcome.status.code == code_pb2.OK, outcome.status.message
    uid = int(out(rig, outcome).split()[-1])
    assert uid != 0
    stderr = err(rig, outcome)
    assert root_loads(log, stderr) == [], f"{variable} ran code as root"
    if variable in ("LD_PRELOAD", "LD_AUDIT"):
        # The attack itself works: the library was loaded, by the action's own processes.
        loads = evil_loads(log, stderr)
        assert loads and all(euid == uid for euid, _ in loads), loads


def test_argv0_is_looked_up_as_the_slot_uid(rig, shared_dir):
    """A bare name is found through the Command's PATH by the action's uid: a directory
    only root may enter is no place to find it (no existence oracle over root's files)."""
    secret = shared_dir / "root-only"
    secret.mkdir(mode=0o700)
    (secret / "tool").write_text("#!/bin/sh\necho found\n")
    (secret / "tool").chmod(0o755)
    outcome = rig.run(["tool"], env={"PATH": f"{secret}:/usr/bin:/bin"})
    assert outcome.result.exit_code == 126  # EACCES, as execvp says it: nothing about 'tool'
    assert "found" not in out(rig, outcome)
    assert "cannot execute 'tool': Permission denied" in err(rig, outcome)


# ---- actions reach neither Stoker nor each other ------------------------------------------

def test_an_action_cannot_reach_a_listener_on_the_hosts_loopback(make_pipeline_rig):
    rig = make_pipeline_rig()
    if rig.mechanism != containment.PID_NAMESPACE:
        pytest.skip("no network namespaces here (uid-sweep shares the host's network)")
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    abstract = socket.socket(socket.AF_UNIX)
    name = f"\0stoker-test-{uuid.uuid4().hex}"
    abstract.bind(name)
    abstract.listen()
    code = textwrap.dedent(f"""
        import socket
        for family, addr in ((socket.AF_INET, ("127.0.0.1", {port})),
                             (socket.AF_UNIX, {name!r})):
            s = socket.socket(family)
            s.settimeout(2)
            try:
                s.connect(addr)
                print("connected", addr)
            except OSError as e:
                print("refused", e.errno)
        """)
    try:
        outcome = rig.run([PY, "-c", code], env=ENV)
    finally:
        listener.close()
        abstract.close()
    text = out(rig, outcome)
    assert outcome.result.exit_code == 0, err(rig, outcome)
    assert "connected" not in text and text.count("refused") == 2, text


def test_concurrent_actions_cannot_talk_over_loopback_or_abstract_sockets(make_pipeline_rig):
    rig = make_pipeline_rig()
    if rig.mechanism != containment.PID_NAMESPACE:
        pytest.skip("no network namespaces here")
    name = f"stoker-test-{uuid.uuid4().hex}"
    server = textwrap.dedent(f"""
        import socket, time
        t = socket.create_server(("127.0.0.1", 47123))
        u = socket.socket(socket.AF_UNIX); u.bind("\\0{name}"); u.listen()
        t.settimeout(3); u.settimeout(0.1)
        try:
            t.accept(); print("tcp accepted")
        except OSError:
            print("tcp alone")
        try:
            u.accept(); print("unix accepted")
        except OSError:
            print("unix alone")
        """)
    client = textwrap.dedent(f"""
        import socket, time
        time.sleep(0.5)
        for family, addr in ((socket.AF_INET, ("127.0.0.1", 47123)),
                             (socket.AF_UNIX, "\\0{name}")):
            s = socket.socket(family)
            try:
                s.connect(addr); print("connected")
            except OSError:
                print("refused")
        """)

    async def both():
        return await asyncio.gather(rig.execute(rig.task([PY, "-c", server], env=ENV)),
                                    rig.execute(rig.task([PY, "-c", client], env=ENV)))

    a, b = asyncio.run(both())
    assert out(rig, a).split("\n")[:2] == ["tcp alone", "unix alone"], out(rig, a)
    assert out(rig, b).split() == ["refused", "refused"], out(rig, b)


def test_a_listener_left_by_an_action_is_gone_for_the_next_of_its_slot(make_pipeline_rig):
    """A slot's network namespace outlives its actions (it is kept for speed): nothing an
    action left listening there may answer the next build that gets the uid."""
    rig = make_pipeline_rig()
    if rig.mechanism != containment.PID_NAMESPACE:
        pytest.skip("no network namespaces here")
    serve = ("import os, socket, time\nif os.fork() == 0:\n os.setsid()\n"
             " s = socket.create_server(('127.0.0.1', 47125)); time.sleep(30)\n"
             "time.sleep(0.3); print(os.getuid())")
    left = rig.run([PY, "-c", serve], env=ENV)
    uid = out(rig, left).strip()
    probe = ("import os, socket\ns = socket.socket(); s.settimeout(2)\n"
             "print(os.getuid(), s.connect_ex(('127.0.0.1', 47125)))")
    same = 0
    for _ in range(len(rig.identities.uids) + 1):  # the slot's uids come round in turn
        later = rig.run([PY, "-c", probe], env=ENV)
        luid, code = out(rig, later).split()
        same += luid == uid
        assert code != "0", "a listener outlived its action"
    assert same, "no later action got the first one's uid"


# ---- private per-action state ---------------------------------------------------------------

def test_proc_shows_only_the_actions_own_processes(make_pipeline_rig):
    rig = make_pipeline_rig()
    if rig.mechanism != containment.PID_NAMESPACE:
        pytest.skip("no pid namespaces here")
    token = f"--token=secret-{uuid.uuid4().hex}"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", token])
    try:
        outcome = rig.run(["/bin/sh", "-c", "cat /proc/[0-9]*/cmdline | tr '\\0' ' '; echo; "
                           "ls -d /proc/[0-9]* | wc -l"], env=ENV)
    finally:
        other.kill()
        other.wait()
    text = out(rig, outcome)
    assert token not in text
    assert int(text.split()[-1]) <= 4, text  # sh, cat/tr or ls, wc: nothing of the host's


def test_tmp_and_shm_are_private_and_gone_after_the_action(rig, shared_dir):
    if rig.mechanism != containment.PID_NAMESPACE:
        pytest.skip("no mount namespaces here")
    host_file = Path("/tmp") / f"stoker-host-{uuid.uuid4().hex}"
    host_file.write_text("host")
    try:
        write = ("for d in /tmp /var/tmp /dev/shm; do echo left > $d/left-by-first; done; "
                 f"ls {host_file} 2>&1; echo $TMPDIR")
        first = rig.run(["/bin/sh", "-c", write], env=ENV)
        assert first.result.exit_code == 0, err(rig, first)
        assert "No such file" in out(rig, first)  # the host's /tmp is not the action's
        look = "for d in /tmp /var/tmp /dev/shm; do ls $d/left-by-first 2>/dev/null; done; true"
        for _ in range(3):  # the slot's uids rotate: each sees nothing the first left
            later = rig.run(["/bin/sh", "-c", look], env=ENV)
            assert out(rig, later) == ""
        for d in ("/tmp", "/var/tmp", "/dev/shm"):
            assert not os.path.exists(f"{d}/left-by-first")
    finally:
        host_file.unlink()


KEYCTL = textwrap.dedent("""
    import ctypes, os, sys
    libc = ctypes.CDLL(None, use_errno=True)
    USER_KEYRING = -4
    if sys.argv[1] == "add":
        r = libc.syscall(248, b"user", b"stoker-test", b"secret", 6, USER_KEYRING)  # add_key
    else:
        r = libc.syscall(250, 10, USER_KEYRING, b"user", b"stoker-test", 0)  # KEYCTL_SEARCH
    print(os.getuid(), r, ctypes.get_errno())
    """)


def test_a_slot_uids_keyring_does_not_reach_its_next_action(rig, _host):
    first = rig.run([PY, "-c", KEYCTL, "add"], env=ENV)
    uid, key, errno_ = out(rig, first).split()
    if _host.deny_userns:
        # seccomp: no keyring calls at all (the uid's persistent keyring would outlive the
        # action, and clearing the others is not enough).
        assert (key, errno_) == ("-1", "1"), out(rig, first)
        return
    if int(key) < 0:
        pytest.skip(f"keyrings refused here (errno {errno_})")
    same_uid = 0
    for _ in range(len(rig.identities.uids) + 1):
        later = rig.run([PY, "-c", KEYCTL, "search"], env=ENV)
        luid, found, _ = out(rig, later).split()
        if luid == uid:
            same_uid += 1
            assert int(found) < 0, "the next action of the uid found the key it was left"
    assert same_uid, "no later action got the first one's uid"


def test_the_hosts_files_are_read_only_and_other_actions_unseen(make_pipeline_rig):
    """No world-writable place of the host's (/run/lock, /dev/mqueue...) is a rendezvous
    between actions or a place to leave state; another action's directory is not there even
    when it opens it to all; the data directory is empty; /dev/null still works."""
    rig = make_pipeline_rig()
    if rig.mechanism != containment.PID_NAMESPACE:
        pytest.skip("no mount namespaces here")
    other = Path(rig.config.build_dir) / "worker-0" / "other-action"
    other.mkdir(parents=True)
    other.chmod(0o777)
    (other / "secret").write_text("other's")
    script = textwrap.dedent(f"""
        for d in /run/lock /var/lock /dev/mqueue /etc /usr/local; do
            [ -d $d ] && {{ touch $d/stoker-was-here 2>/dev/null && echo "wrote $d"; }}
        done
        cat {other}/secret 2>/dev/null && echo "read other"
        ls -A {rig.config.data_dir} | tr '\n' ' '; echo
        echo fine > /dev/null && echo > out.txt && echo "own ok"
        """)
    outcome = rig.run(["/bin/sh", "-c", script], env=ENV)
    text = out(rig, outcome)
    assert "wrote" not in text and "read other" not in text, text
    assert "own ok" in text, err(rig, outcome)
    # The data directory shows only the way to the action's own directory.
    listed = text.splitlines()[-2].split()
    assert set(listed) <= {"build"}, listed


def test_actions_cannot_make_user_namespaces(rig, _host):
    if not _host.deny_userns:
        pytest.skip("seccomp is not available here")
    code = ("import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
            "r = libc.unshare(0x10000000)\n"  # CLONE_NEWUSER
            "print('made' if r == 0 else 'denied', ctypes.get_errno())")
    outcome = rig.run([PY, "-c", code], env=ENV)
    assert out(rig, outcome).split() == ["denied", "1"], err(rig, outcome)  # EPERM
    outcome = rig.run(["/bin/sh", "-c", "unshare -U -r true && echo made || echo denied"],
                      env=ENV)
    assert out(rig, outcome).strip() == "denied"


# ---- memory and pids ------------------------------------------------------------------------

FORK_BOMB = textwrap.dedent("""
    import os, time
    n = 0
    while n < 10000:
        try:
            pid = os.fork()
        except OSError:
            break
        if pid == 0:
            time.sleep(30)
            os._exit(0)
        n += 1
    print(n)
    """)


@pytest.mark.parametrize("mechanism", mechanisms())
def test_a_fork_bomb_stops_at_the_actions_pid_limit(make_pipeline_rig, mechanism):
    rig = make_pipeline_rig(mechanism=mechanism, action_pids=64)
    outcome = rig.run([PY, "-c", FORK_BOMB], env=ENV, timeout_s=60)
    assert outcome.status.code == code_pb2.OK, outcome.status.message
    assert int(out(rig, outcome)) < 64
    after = rig.run(["/bin/echo", "fine"], env=ENV)  # nothing of the bomb is left in the way
    assert out(rig, after) == "fine\n"


def test_an_action_over_its_memory_limit_is_killed_and_told(make_pipeline_rig):
    rig = make_pipeline_rig(limits=True, action_memory_bytes=64 << 20)
    if rig.cgroups is None or rig.cgroups.memory_base is None:
        pytest.skip("no writable memory cgroup here")
    hog = "x = [bytearray(16 << 20) for _ in range(32)]\nprint('survived')"
    outcome = rig.run([PY, "-c", hog], env=ENV, timeout_s=60)
    assert outcome.result.exit_code == 137
    assert "survived" not in out(rig, outcome)
    assert "more than its memory limit of 67108864 bytes" in err(rig, outcome)
    fine = rig.run(["/bin/sh", "-c", "cat /proc/self/oom_score_adj"], env=ENV)
    assert out(rig, fine) == "1000\n"  # the OOM killer's first choice, always


def test_an_action_asking_for_network_is_refused_never_run_without_it(pipeline_rig):
    for prop in ({"dockerNetwork": "bridge"}, {"network": "on"}, {"dockerNetwork": "host"}):
        outcome = pipeline_rig.run(["/bin/true"], env=ENV, platform=prop)
        assert outcome.status.code == code_pb2.FAILED_PRECONDITION
        [(name, value)] = prop.items()
        assert f"platform property {name}={value}: network access for actions is not " \
               "allowed on this executor (actions_may_request_network is off" \
               in outcome.status.message
    for prop in ({"dockerNetwork": "off"}, {"network": "none"}):
        assert pipeline_rig.run(["/bin/true"], env=ENV, platform=prop).status.code == 0


def _host_address() -> str | None:
    """An address of this machine other than loopback (where a user-mode network leads)."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.1", 9))  # no packet is sent: this only picks a source
        address = probe.getsockname()[0]
    except OSError:
        return None
    finally:
        probe.close()
    return None if address.startswith("127.") else address


@pytest.fixture
def network_rig(make_pipeline_rig):
    rig = make_pipeline_rig(actions_may_request_network=True)
    if rig.mechanism != containment.PID_NAMESPACE:
        pytest.skip("no network namespaces here (actions share the host's network)")
    if shutil.which("slirp4netns") is None:
        pytest.skip("slirp4netns is not installed (scripts/install-test-deps.sh installs it)")
    return rig


def test_an_allowed_network_reaches_out_but_never_the_hosts_loopback(network_rig):
    """dockerNetwork: bridge under actions_may_request_network: the action's connections go
    out through slirp4netns, which never connects to the host's loopback (Stoker's REAPI,
    health and metrics listeners in their default places, another action's nothing)."""
    outside = _host_address()
    if outside is None:
        pytest.skip("this machine has no address but loopback")
    loop_listener = socket.create_server(("127.0.0.1", 0))
    out_listener = socket.create_server((outside, 0))
    out_listener.settimeout(10)
    lport, oport = loop_listener.getsockname()[1], out_listener.getsockname()[1]
    code = textwrap.dedent(f"""
        import socket
        for addr in (("127.0.0.1", {lport}), ("10.0.2.2", {lport}), ("{outside}", {lport}),
                     ("{outside}", {oport})):
            s = socket.socket()
            s.settimeout(3)
            try:
                s.connect(addr)
                print("connected", addr[0], addr[1])
            except OSError as e:
                print("refused", addr[0], addr[1], e.errno)
        """)
    try:
        outcome = network_rig.run([PY, "-c", code], env=ENV,
                                  platform={"dockerNetwork": "bridge"})
        accepted, _ = out_listener.accept()  # it really came through, from the outside
        accepted.close()
    finally:
        loop_listener.close()
        out_listener.close()
    assert outcome.status.code == 0 and outcome.result.exit_code == 0, err(network_rig, outcome)
    lines = out(network_rig, outcome).splitlines()
    assert lines[0].startswith("refused 127.0.0.1"), lines
    assert lines[1].startswith("refused 10.0.2.2"), lines  # slirp's way to the host's loopback
    assert lines[2].startswith(f"refused {outside}"), lines  # not listening there
    assert lines[3] == f"connected {outside} {oport}", lines


def test_an_allowed_network_is_the_actions_own_and_gone_after_it(network_rig):
    """Two actions with network at once each get their own; the next action of the slot, not
    asking, has only its loopback again; no slirp4netns is left behind."""
    show = [PY, "-c", "import socket; print(sorted(n for _, n in socket.if_nameindex()))"]

    async def both():
        return await asyncio.gather(*(
            network_rig.execute(network_rig.task(show, env=ENV, platform={"network": "on"}))
            for _ in range(2)))

    for asked in asyncio.run(both()):
        assert out(network_rig, asked).strip() == "['lo', 'tap0']", err(network_rig, asked)
    for _ in range(len(network_rig.identities.uids)):  # every slot uid's kept namespace
        plain = network_rig.run(show, env=ENV)
        assert out(network_rig, plain).strip() == "['lo']"
    left = subprocess.run(["pgrep", "-f", f"slirp4netns.*{network_rig.networks.directory}"],
                          capture_output=True, text=True)
    assert left.stdout == "", left.stdout
    assert [e for e in os.listdir(network_rig.networks.directory)
            if e.startswith("netns-user-")] == []


def test_the_hosts_network_itself_is_never_given(network_rig):
    outcome = network_rig.run(["/bin/true"], env=ENV, platform={"dockerNetwork": "host"})
    assert outcome.status.code == code_pb2.FAILED_PRECONDITION
    assert "dockerNetwork=host: the host's network is not given to actions" \
        in outcome.status.message


def test_a_network_that_does_not_come_up_is_stokers_failure_not_a_run_without_it(network_rig):
    """slirp4netns dying at start (here: a stand-in that exits at once) is UNAVAILABLE, retried
    elsewhere; the action never runs, with or without a network."""
    assert network_rig.bare.user_networks is not None
    network_rig.bare.user_networks.slirp = "/bin/false"
    outcome = network_rig.run(["/bin/sh", "-c", "echo ran"], env=ENV,
                              platform={"dockerNetwork": "bridge"})
    assert outcome.status.code == code_pb2.UNAVAILABLE
    assert "/bin/false did not come up" in outcome.status.message
    assert not outcome.result.stdout_digest.hash or out(network_rig, outcome) == ""
    assert [e for e in os.listdir(network_rig.networks.directory)
            if e.startswith("netns-user-")] == []


@pytest.mark.parametrize("isolation", ["none", "sandbox"])
def test_the_command_starts_with_default_signals(pipeline_rig, isolation):
    """Python ignores SIGPIPE and SIGXFSZ; the command must not inherit that (`yes | head`
    would see EPIPE instead of dying quietly)."""
    if isolation not in pipeline_rig.runners.runners:
        pytest.skip(f"no {isolation} here")
    outcome = pipeline_rig.run(["/bin/sh", "-c", "grep -E '^Sig(Ign|Blk)' /proc/self/status; "
                                "yes | head -1"], env=ENV,
                               platform={"workload-isolation-type": isolation})
    lines = out(pipeline_rig, outcome).splitlines()
    ignored = int(lines[0].split()[1], 16) if lines[0].startswith("SigIgn") else \
        int(lines[1].split()[1], 16)
    assert not ignored & (1 << (13 - 1)), lines  # SIGPIPE
    assert not ignored & (1 << (25 - 1)), lines  # SIGXFSZ
    assert lines[-1] == "y" and err(pipeline_rig, outcome) == "", err(pipeline_rig, outcome)


# The cgroup files of the action's own CPU cgroup (v1's cpu controller or v2's), as it sees
# them through /proc/self/cgroup.
CPU_WEIGHT = ("awk -F: '$2 ~ /(^|,)cpu(,|$)/ {print \"/sys/fs/cgroup/cpu\" $3 \"/cpu.shares\"} "
              "$2 == \"\" {print \"/sys/fs/cgroup\" $3 \"/cpu.weight\"}' /proc/self/cgroup | "
              "while read f; do [ -f \"$f\" ] && echo \"$f\" && cat \"$f\"; done")


@pytest.mark.parametrize("isolation", ["none", "sandbox"])
def test_cpu_weight_follows_estimated_cpu(make_pipeline_rig, isolation):
    """EstimatedCPU=2 is twice a core's weight (cgroup v1's cpu.shares 2048, v2's cpu.weight
    200), in a CPU cgroup of the action's own; without it the action stays in the worker's."""
    rig = make_pipeline_rig(limits=True)
    if rig.cgroups is None or rig.cgroups.cpu_base is None:
        pytest.skip("no writable CPU cgroup here")
    if isolation not in rig.runners.runners:
        pytest.skip(f"no {isolation} here")
    kind = {"workload-isolation-type": isolation}
    weighted = rig.run(["/bin/sh", "-c", CPU_WEIGHT], env=ENV,
                       platform={**kind, "EstimatedCPU": "2"})
    assert weighted.status.code == code_pb2.OK, weighted.status.message
    path, value = out(rig, weighted).split()[-2:]
    assert f"stoker-{os.path.basename(rig.base)}/" in path, path
    assert value in ("2048", "200"), (path, value)
    plain = rig.run(["/bin/sh", "-c", CPU_WEIGHT], env=ENV, platform=kind)
    assert "stoker-" not in out(rig, plain), out(rig, plain)
