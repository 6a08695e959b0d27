"""recycle-runner=true under podman and docker (Debian's dockerd and podman's Docker-compatible
service, started here as in test_docker_runner.py), through a worker's own pipeline: a kept
container serves the next action with the same key and is thrown away the moment it is not
as clean as it was made (engine/runners/recycle.py).

Slot uids rotate (each slot has two with concurrency 1): actions 1 and 3 get the same uid,
hence the same kept container; action 2 gets the other uid's."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from collections.abc import Iterator

import pytest
from google.rpc import code_pb2

from tests.images import ImageError, base_image_or_skip, running_engine

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900),
              pytest.mark.skipif(os.geteuid() != 0, reason="containers and slot uids need root")]

ENV = {"PATH": "/usr/bin:/bin"}
# The container's identity (its hostname is its id) and what is running in it.
# The processes counted by the shell's own glob: `ls | grep` raced (grep not yet started
# when ls read /proc).
WHERE = "cat /proc/sys/kernel/hostname; set -- /proc/[0-9]*; echo $#"


@pytest.fixture(scope="module")
def image() -> str:
    return base_image_or_skip()


@pytest.fixture(scope="module", params=["podman", "dockerd", "podman-service"])
def engine(request, image) -> Iterator[tuple[str, str]]:
    """(isolation type, Docker Engine API socket or '')."""
    if request.param == "podman":
        yield "podman", ""
        return
    if request.param == "dockerd" and shutil.which("dockerd") is None:
        pytest.skip("dockerd is not installed (scripts/install-test-deps.sh installs "
                    "docker.io)")
    try:
        with running_engine(request.param, image) as sock:
            yield "docker", sock
    except ImageError as e:
        pytest.fail(str(e))


@pytest.fixture
def rig(make_pipeline_rig, image, engine):
    kind, sock = engine
    rig = make_pipeline_rig(default_image=image, concurrency=1,
                            **({"docker_socket": sock} if sock else {}))
    if kind not in rig.runners.runners:
        pytest.skip(f"no {kind} here: {rig.runners.unavailable.get(kind)}")
    if len(rig.identities.uids) != 2:
        pytest.skip("needs two slot uids (run as root)")
    rig.kind = kind
    yield rig
    asyncio.run(rig.runners.runners[kind].close())
    assert _containers(rig) == []


def kept(rig, **more: str) -> dict[str, str]:
    return {"workload-isolation-type": rig.kind, "recycle-runner": "true", **more}


def _containers(rig) -> list[str]:
    runner = rig.runners.runners[rig.kind]
    if rig.kind == "docker":
        return [c.name for c in runner.client.containers.list(all=True)
                if c.name.startswith(runner.prefix)]
    done = subprocess.run(["podman", "ps", "--all", "--format", "{{.Names}}"],
                          capture_output=True, text=True, timeout=60)
    return [n for n in done.stdout.split() if n.startswith(runner.prefix)]


def _remove_by_hand(rig) -> None:
    runner = rig.runners.runners[rig.kind]
    if rig.kind == "docker":
        for name in _containers(rig):
            runner.client.api.remove_container(name, force=True)
    else:
        subprocess.run(["podman", "rm", "--force", "--time", "0", *_containers(rig)],
                       capture_output=True, timeout=60)


def run(rig, script: str, **kwargs):
    outcome = rig.run(["/bin/sh", "-c", script], env=kwargs.pop("env", ENV),
                      platform=kwargs.pop("platform", None) or kept(rig), **kwargs)
    assert outcome.result.HasField("stdout_digest"), outcome.status
    out = rig.read(outcome.result.stdout_digest).decode()
    err = rig.read(outcome.result.stderr_digest).decode()
    return outcome, out, err


def test_the_next_action_of_the_same_uid_and_key_runs_in_the_kept_container(rig):
    first, out1, err1 = run(rig, f"{WHERE}; id -u")
    second, out2, _ = run(rig, f"{WHERE}; id -u")
    third, out3, _ = run(rig, f"{WHERE}; id -u")
    for o in (first, second, third):
        assert o.status.code == code_pb2.OK and o.result.exit_code == 0, (o.status, err1)
    host1, procs1, uid1 = out1.split()
    host2, _, uid2 = out2.split()
    host3, procs3, uid3 = out3.split()
    assert uid1 == uid3 != uid2
    assert host1 == host3 != host2  # the same container for the same uid, another for the other
    # The holder, the helper waiting on the command and the shell: nothing else.
    assert procs1 == procs3 == "3", (out1, out3)
    assert len(_containers(rig)) == 2


def test_nothing_an_action_leaves_reaches_the_next_one(rig):
    leave = ("(setsid sleep 300 &); sleep 200 & echo left > /tmp/t; echo left > /var/tmp/v; "
             "touch /etc/x 2>/dev/null && echo wrote-etc; "
             "touch /home/x 2>/dev/null && echo wrote-home; echo $SECRET > made.txt")
    first, out1, _ = run(rig, leave, env={**ENV, "SECRET": "s3cret"},
                         output_paths=["made.txt"])
    assert first.status.code == code_pb2.OK and out1 == "", out1
    run(rig, "true")  # the other uid
    look = f"{WHERE}; find /tmp /var/tmp . -mindepth 1 | wc -l; grep -c s3cret /proc/1/environ"
    second, out2, err2 = run(rig, look)
    lines = out2.split()
    assert lines[1] == "3", out2  # no sleep survived in the kept container
    # Nothing in /tmp, /var/tmp or the exec root; the secret not in the holder's environment.
    assert lines[2:] == ["0", "0"], (out2, err2)
    left = subprocess.run(["pgrep", "-f", "^sleep [23]00$"], capture_output=True, text=True)
    assert left.stdout == "", left.stdout


@pytest.mark.parametrize("leftover", [
    "echo x > /dev/shm/f",
    "perl -e 'shmget(0, 4096, 01000 | 0600) // die'",
])
def test_a_container_left_unclean_is_thrown_away(rig, leftover):
    first, out1, err1 = run(rig, f"{WHERE}; {leftover}")
    assert first.status.code == code_pb2.OK and first.result.exit_code == 0, err1
    assert len(_containers(rig)) == 0  # removed at once, not kept
    run(rig, "true")
    third, out3, _ = run(rig, WHERE)
    assert out3.split()[0] != out1.split()[0]  # a new container


def test_a_timeout_throws_the_container_away(rig):
    first, out1, _ = run(rig, "true")
    run(rig, "true")
    timed = rig.run(["/bin/sh", "-c", "sleep 60"], env=ENV, platform=kept(rig), timeout_s=2)
    assert timed.status.code == code_pb2.DEADLINE_EXCEEDED, timed.status
    assert len(_containers(rig)) == 1  # the other uid's only
    left = subprocess.run(["pgrep", "-f", "^sleep 60$"], capture_output=True, text=True)
    assert left.stdout == ""


def test_another_key_gets_another_container(rig):
    _, out1, _ = run(rig, WHERE)
    run(rig, "true")
    _, out3, _ = run(rig, WHERE, platform=kept(rig, EstimatedCPU="2"))
    assert out1.split()[0] != out3.split()[0]
    assert len(_containers(rig)) == 3


def test_without_the_property_every_action_gets_a_fresh_container(rig):
    plain = {"workload-isolation-type": rig.kind}
    _, out1, _ = run(rig, WHERE, platform=plain)
    run(rig, "true", platform=plain)
    _, out3, _ = run(rig, WHERE, platform=plain)
    assert out1.split()[0] != out3.split()[0]
    assert _containers(rig) == []


def test_a_kept_container_that_vanished_is_replaced(rig):
    _, out1, _ = run(rig, WHERE)
    run(rig, "true")
    _remove_by_hand(rig)
    third, out3, err3 = run(rig, WHERE)
    assert third.status.code == code_pb2.OK and third.result.exit_code == 0, err3
    assert out3.split()[0] != out1.split()[0]


def test_an_exec_failure_is_the_actions_and_keeps_the_container(rig):
    first, out1, _ = run(rig, WHERE)
    run(rig, "true")
    missing = rig.run(["/no/such/tool"], env=ENV, platform=kept(rig))
    assert missing.status.code == code_pb2.OK and missing.result.exit_code == 127
    run(rig, "true")
    _, out5, _ = run(rig, WHERE)
    assert out5.split()[0] == out1.split()[0]


def test_a_command_cannot_forge_the_verdict_nor_leave_a_process(rig):
    """The command kills the helper that waits on it (so no sweep and no verdict), after
    writing a forged clean verdict where it can reach (podman: the helper's status pipe
    through /proc, refused: the helper is not dumpable; docker: the status file, which is
    the uid's but no longer carries the verdict), and leaves a daemon: the host sees more
    than pid 1 in the container's cgroup and throws the container away."""
    forge = ("printf '\\nC0' > /proc/$PPID/fd/4 2>/dev/null && echo forged-pipe; "
             "printf 'X\\nC0' > /.stoker/action/docker-ctl/status 2>/dev/null; "
             "(setsid sleep 300 &); kill -9 $PPID; sleep 1")
    first, out1, _ = run(rig, f"{WHERE}; {forge}")
    assert "forged-pipe" not in out1, out1
    assert _containers(rig) == []  # removed at once
    left = subprocess.run(["pgrep", "-f", "^sleep 300$"], capture_output=True, text=True)
    assert left.stdout == "", left.stdout
    run(rig, "true")
    _, out3, _ = run(rig, WHERE)
    assert out3.split()[0] != out1.split()[0]  # a new container for the same uid


def test_another_tenant_gets_another_container(rig):
    """Two builds' tasks (BuildBuddy: the groups of their JWTs) never share one."""
    _, out1, _ = run(rig, WHERE, tenant="group:a")
    run(rig, "true", tenant="group:a")
    _, out3, _ = run(rig, WHERE, tenant="group:b")
    assert out1.split()[0] != out3.split()[0]
    run(rig, "true", tenant="group:b")
    _, out5, _ = run(rig, WHERE, tenant="group:a")
    assert out5.split()[0] == out1.split()[0]
