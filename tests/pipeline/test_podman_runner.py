"""The podman runner (workload-isolation-type=podman) through a worker's own pipeline, with
real podman and the base image of tests/images.py: what the action sees in its container,
the attacks of milestones 4 and 6 under it, and podman's own failures as Stoker's."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.rpc import code_pb2

from tests.adversarial.adv_support import build_evil_libs, evil_value, root_loads
from tests.images import base_image_or_skip

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

PODMAN = {"workload-isolation-type": "podman"}
ENV = {"PATH": "/usr/bin:/bin"}


@pytest.fixture(scope="module")
def image() -> str:
    return base_image_or_skip()


@pytest.fixture
def rig(make_pipeline_rig, image):
    rig = make_pipeline_rig(default_image=image)
    if "podman" not in rig.runners.runners:
        pytest.skip(f"no podman here: {rig.runners.unavailable.get('podman')}")
    return rig


def out(rig, outcome) -> str:
    return rig.read(outcome.result.stdout_digest).decode()


def err(rig, outcome) -> str:
    return rig.read(outcome.result.stderr_digest).decode()


def _containers(rig) -> list[str]:
    prefix = rig.runners.runners["podman"].prefix
    done = subprocess.run(["podman", "ps", "--all", "--format", "{{.Names}}"],
                          capture_output=True, text=True, timeout=60)
    return [n for n in done.stdout.split() if n.startswith(prefix)]


def test_the_action_runs_in_its_image_as_its_slot_uid(rig):
    b = rig.blobs
    root = b.directory(dirs=[("sub", b.directory())])
    script = textwrap.dedent("""
        id -u; pwd; printf '%s|' "$FOO"; echo; echo "$TMPDIR"
        touch /tmp/t && echo tmp-writable
        echo made > made.txt
        head -1 /etc/os-release
        python3 -c 'import socket; print(sorted(n for _, n in socket.if_nameindex()))' \\
            2>/dev/null || cat /sys/class/net/*/ifindex | wc -l
        """)
    outcome = rig.run(["/bin/sh", "-c", script], env={**ENV, "FOO": "a b\nc"},
                      platform=PODMAN, working_directory="sub", input_root=root,
                      output_paths=["made.txt"])
    assert outcome.status.code == code_pb2.OK, outcome.status.message
    lines = out(rig, outcome).splitlines()
    assert int(lines[0]) in rig.identities.uids
    assert lines[1:6] == ["/execroot/sub", "a b", "c|", "/tmp", "tmp-writable"], lines
    assert "Debian" in lines[6], lines
    assert lines[7] in ("1", "['lo']"), lines  # loopback only: --network none
    [made] = outcome.result.output_files
    assert rig.read(made.digest) == b"made\n"
    assert _containers(rig) == []  # --rm


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="stoker-podman-", dir="/srv"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("variable", ["LD_PRELOAD", "LD_LIBRARY_PATH", "LD_AUDIT"])
def test_the_commands_environment_reaches_no_root_process(rig, shared_dir, variable):
    """podman, conmon and runc run as root on the host, where the library is: none of them
    may load it (they get an environment of Stoker's, never the Command's)."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build the attack library")
    libs, log = build_evil_libs(shared_dir)
    outcome = rig.run(["/bin/true"], env={**ENV, variable: evil_value(libs, variable)},
                      platform=PODMAN)
    assert outcome.status.code == code_pb2.OK, outcome.status.message
    assert root_loads(log, err(rig, outcome)) == [], f"{variable} ran code as root"


def test_a_timeout_kills_the_container(rig):
    start = time.monotonic()
    outcome = rig.run(["/bin/sh", "-c", "sleep 60 & sleep 60"], env=ENV, platform=PODMAN,
                      timeout_s=2)
    assert outcome.status.code == code_pb2.DEADLINE_EXCEEDED, outcome.status
    assert time.monotonic() - start < 30
    assert _containers(rig) == []


def test_nothing_outlives_the_command(rig):
    outcome = rig.run(["/bin/sh", "-c", "(setsid sleep 30 &) ; echo started"], env=ENV,
                      platform=PODMAN)
    assert out(rig, outcome) == "started\n"
    assert _containers(rig) == []
    left = subprocess.run(["pgrep", "-f", "^sleep 30$"], capture_output=True, text=True)
    assert left.stdout == "", left.stdout


def test_the_hosts_loopback_is_out_of_reach(rig):
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    probe = ("use IO::Socket::INET; my $s = IO::Socket::INET->new(PeerAddr => "
             f"'127.0.0.1:{port}', Timeout => 2); print $s ? qq(reached\\n) : qq(refused\\n)")
    try:
        outcome = rig.run(["perl", "-e", probe], env=ENV, platform=PODMAN)
    finally:
        listener.close()
    assert out(rig, outcome) == "refused\n", err(rig, outcome)


def test_an_unknown_image_is_refused_naming_it(rig):
    outcome = rig.run(["/bin/true"], env=ENV, platform={
        **PODMAN, "container-image": "docker://localhost/stoker-no-such-image:1"})
    assert outcome.status.code == code_pb2.FAILED_PRECONDITION, outcome.status
    assert "container image 'localhost/stoker-no-such-image:1' is not on this machine and " \
           "could not be pulled" in outcome.status.message
    other = rig.run(["/bin/true"], env=ENV, platform={**PODMAN, "container-image": "ubuntu"})
    assert other.status.code == code_pb2.FAILED_PRECONDITION
    assert "only docker:// images are supported" in other.status.message


def test_a_podman_that_cannot_start_the_container_is_stokers_failure(rig, shared_dir):
    fake = shared_dir / "runtime"  # an OCI runtime that starts nothing
    fake.write_text("#!/bin/sh\necho 'runtime: cannot do it' >&2\nexit 1\n")
    fake.chmod(0o755)
    rig.runners.runners["podman"].runtime = str(fake)
    outcome = rig.run(["/bin/echo", "ran"], env=ENV, platform=PODMAN)
    assert outcome.status.code == code_pb2.UNAVAILABLE, outcome.status
    assert "podman could not start the container" in outcome.status.message
    assert _containers(rig) == []


def test_an_action_over_its_memory_limit_is_killed(make_pipeline_rig, image):
    rig = make_pipeline_rig(default_image=image, action_memory_bytes=64 << 20)
    if "podman" not in rig.runners.runners:
        pytest.skip("no podman here")
    outcome = rig.run(["perl", "-e", "$x = q(x) x (512 << 20); print qq(survived\\n)"],
                      env=ENV, platform=PODMAN, timeout_s=60)
    assert "survived" not in out(rig, outcome), err(rig, outcome)
    assert outcome.result.exit_code == 137, err(rig, outcome)  # the kernel's SIGKILL


def test_containers_a_killed_worker_left_are_removed(rig, image):
    runner = rig.runners.runners["podman"]
    name = f"{runner.prefix}left-behind"
    subprocess.run(["podman", "--cgroup-manager=cgroupfs", "--events-backend=file", "create",
                    "--name", name, image, "true"], check=True, capture_output=True, timeout=60)
    import asyncio

    assert asyncio.run(runner.remove_leftovers()) == 1
    assert _containers(rig) == []


def test_network_when_asked_and_allowed_or_by_network_mode(make_pipeline_rig, image):
    """slirp4netns (tap0) for an action that asks (dockerNetwork: bridge) where the operator
    allows it, or for every action under isolation.network_mode: bridge; none otherwise."""
    show = ["/bin/sh", "-c", "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | sort"]
    asking = {**PODMAN, "dockerNetwork": "bridge"}
    allowed = make_pipeline_rig(default_image=image, actions_may_request_network=True)
    if "podman" not in allowed.runners.runners:
        pytest.skip("no podman here")
    assert out(allowed, allowed.run(show, env=ENV, platform=asking)).split() == ["lo", "tap0"]
    assert out(allowed, allowed.run(show, env=ENV, platform=PODMAN)).split() == ["lo"]
    by_mode = make_pipeline_rig(default_image=image, actions_may_request_network=True,
                                network_mode="bridge")
    assert out(by_mode, by_mode.run(show, env=ENV, platform=PODMAN)).split() == ["lo", "tap0"]
    off = {**PODMAN, "dockerNetwork": "off"}
    assert out(by_mode, by_mode.run(show, env=ENV, platform=off)).split() == ["lo"]
    refused = make_pipeline_rig(default_image=image).run(show, env=ENV, platform=asking)
    assert refused.status.code == code_pb2.FAILED_PRECONDITION
    assert "actions_may_request_network is off" in refused.status.message


def test_cpu_weight_follows_estimated_cpu(rig):
    """EstimatedCPU=2 is twice a core's weight (2048 shares; cgroup v1's cpu.shares)."""
    show = ["/bin/sh", "-c", "cat /sys/fs/cgroup/cpu/cpu.shares 2>/dev/null || "
            "cat /sys/fs/cgroup/cpu.weight"]
    outcome = rig.run(show, env=ENV, platform={**PODMAN, "EstimatedCPU": "2"})
    assert outcome.status.code == code_pb2.OK, outcome.status.message
    value = out(rig, outcome).strip()
    assert value in ("2048", "79"), value  # v2's cpu.weight for 2048 shares is 79


def test_a_build_directory_containers_cannot_bind_is_said_not_misparsed(make_pipeline_rig):
    """Bind mounts are SRC:DST strings to podman and Docker: a ':' in the build directory's
    path would be read as a separator, so neither container runner is offered there."""
    base = tempfile.mkdtemp(prefix="stoker:colon-", dir="/var/tmp")
    try:
        rig = make_pipeline_rig(data_dir=f"{base}/data")
        for kind in ("podman", "docker"):
            assert kind not in rig.runners.runners
            assert "holds ':' or ','" in rig.runners.unavailable[kind], rig.runners.unavailable
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_docker_user_root_is_root_only_over_what_its_slot_uid_owns(rig):
    """dockerUser=root: root inside a user namespace of the container's own that maps it to
    the slot uid. It owns its exec root (outputs are made and collected); the cache's
    hardlinked inputs belong to no uid it has, so it can neither write nor chmod them."""
    b = rig.blobs
    cached = b"cached\n"
    root = b.directory(files=[("input.txt", cached, False)])
    script = ("id -u; tr -s ' ' < /proc/self/uid_map; stat -c %u input.txt; "
              "echo x >> input.txt 2>/dev/null && echo wrote-input; "
              "chmod 666 input.txt 2>/dev/null && echo chmod-input; echo made > made.txt")
    outcome = rig.run(["/bin/sh", "-c", script], env=ENV, input_root=root,
                      platform={**PODMAN, "dockerUser": "root"}, output_paths=["made.txt"])
    assert outcome.status.code == code_pb2.OK, outcome.status.message
    lines = out(rig, outcome).splitlines()
    slot = lines[1].split()[1] if len(lines) > 1 else ""
    assert lines == ["0", f" 0 {slot} 1", "65534"], (lines, err(rig, outcome))
    assert int(slot) in rig.identities.uids
    [made] = outcome.result.output_files
    assert rig.read(made.digest) == b"made\n"
    assert rig.store.read_bytes(rig.blobs.put(cached)) == cached  # the cached blob unchanged


@pytest.mark.parametrize("user", ["nobody", "1000", "1000:1000"])
def test_a_docker_user_other_than_root_or_the_slot_uid_is_refused(rig, user):
    outcome = rig.run(["/bin/true"], env=ENV, platform={**PODMAN, "dockerUser": user})
    assert outcome.status.code == code_pb2.FAILED_PRECONDITION, outcome.status
    assert f"platform property dockerUser={user!r}: only root" in outcome.status.message


def test_a_fork_bomb_is_held_by_the_pids_limit(make_pipeline_rig, image):
    rig = make_pipeline_rig(default_image=image, action_pids=64)
    if "podman" not in rig.runners.runners:
        pytest.skip("no podman here")
    bomb = rig.run(["/bin/sh", "-c", "b() { b | b & }; b; sleep 2; ls /proc | grep -c '^[0-9]'"],
                   env=ENV, platform=PODMAN, timeout_s=30)
    assert bomb.status.code in (code_pb2.OK, code_pb2.DEADLINE_EXCEEDED), bomb.status
    if bomb.status.code == code_pb2.OK and bomb.result.stdout_digest.size_bytes:
        assert int(out(rig, bomb).split()[-1]) <= 64
    after = rig.run(["/bin/echo", "fine"], env=ENV, platform=PODMAN)
    assert out(rig, after) == "fine\n"
    assert _containers(rig) == []
