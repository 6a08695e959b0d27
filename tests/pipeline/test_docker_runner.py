"""The docker runner (workload-isolation-type=docker) through a worker's own pipeline, for
real, against two Docker Engine APIs: Debian's docker.io daemon (dockerd, started here on a
socket of its own, with no bridge and no iptables of the host touched) and podman's
Docker-compatible service (`podman system service`). The base image of tests/images.py is
loaded into each. What the action sees, the attacks of milestones 4 and 6, and the engine's
own failures as Stoker's."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.rpc import code_pb2

from tests.adversarial.adv_support import build_evil_libs, evil_value, root_loads
from tests.images import ImageError, base_image_or_skip, running_engine

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900),
              pytest.mark.skipif(os.geteuid() != 0, reason="engines and slot uids need root")]

DOCKER = {"workload-isolation-type": "docker"}
ENV = {"PATH": "/usr/bin:/bin"}


@pytest.fixture(scope="module")
def image() -> str:
    return base_image_or_skip()


@pytest.fixture(scope="module", params=["dockerd", "podman-service"])
def engine(request, image) -> Iterator[str]:
    """The socket of a running Docker Engine API with the base image."""
    if request.param == "dockerd" and shutil.which("dockerd") is None:
        pytest.skip("dockerd is not installed (scripts/install-test-deps.sh installs "
                    "docker.io)")
    try:
        with running_engine(request.param, image) as sock:
            yield sock
    except ImageError as e:
        pytest.fail(str(e))


@pytest.fixture
def rig(make_pipeline_rig, engine, image):
    rig = make_pipeline_rig(docker_socket=engine, default_image=image)
    if "docker" not in rig.runners.runners:
        pytest.skip(f"no docker runner here: {rig.runners.unavailable.get('docker')}")
    return rig


def out(rig, outcome) -> str:
    return rig.read(outcome.result.stdout_digest).decode()


def err(rig, outcome) -> str:
    return rig.read(outcome.result.stderr_digest).decode()


def _containers(rig) -> list[str]:
    runner = rig.runners.runners["docker"]
    return [c.name for c in runner.client.containers.list(all=True)
            if c.name.startswith(runner.prefix)]


def test_the_action_runs_in_its_image_as_its_slot_uid(rig):
    b = rig.blobs
    root = b.directory(dirs=[("sub", b.directory())])
    script = ("id -u; pwd; printf '%s|' \"$FOO\"; echo; echo \"$TMPDIR\"; "
              "touch /tmp/t && echo tmp-writable; echo made > made.txt; "
              "head -1 /etc/os-release; echo to-stderr >&2")
    outcome = rig.run(["/bin/sh", "-c", script], env={**ENV, "FOO": "a b\nc"},
                      platform=DOCKER, working_directory="sub", input_root=root,
                      output_paths=["made.txt"])
    assert outcome.status.code == code_pb2.OK, outcome.status.message
    lines = out(rig, outcome).splitlines()
    assert int(lines[0]) in rig.identities.uids
    assert lines[1:6] == ["/execroot/sub", "a b", "c|", "/tmp", "tmp-writable"], lines
    assert "Debian" in lines[6], lines
    assert err(rig, outcome) == "to-stderr\n"
    [made] = outcome.result.output_files
    assert rig.read(made.digest) == b"made\n"
    assert _containers(rig) == []


def test_no_network_and_not_the_hosts_loopback(rig):
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    probe = ("use IO::Socket::INET; my $s = IO::Socket::INET->new(PeerAddr => "
             f"'127.0.0.1:{port}', Timeout => 2); print $s ? qq(reached\\n) : qq(refused\\n)")
    try:
        outcome = rig.run(["perl", "-e", probe], env=ENV, platform=DOCKER)
    finally:
        listener.close()
    assert out(rig, outcome) == "refused\n", err(rig, outcome)


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="stoker-docker-", dir="/srv"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("variable", ["LD_PRELOAD", "LD_LIBRARY_PATH"])
def test_the_commands_environment_reaches_no_root_process(rig, shared_dir, variable):
    """The engine, containerd and runc run as root on the host, where the library is: the
    Command's environment never reaches them (it is a file the helper reads in the
    container)."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build the attack library")
    libs, log = build_evil_libs(shared_dir)
    outcome = rig.run(["/bin/true"], env={**ENV, variable: evil_value(libs, variable)},
                      platform=DOCKER)
    assert outcome.status.code == code_pb2.OK, outcome.status.message
    assert root_loads(log, err(rig, outcome)) == [], f"{variable} ran code as root"


def test_a_timeout_kills_the_container(rig):
    start = time.monotonic()
    outcome = rig.run(["/bin/sh", "-c", "sleep 60 & sleep 60"], env=ENV, platform=DOCKER,
                      timeout_s=2)
    assert outcome.status.code == code_pb2.DEADLINE_EXCEEDED, outcome.status
    assert time.monotonic() - start < 30
    assert _containers(rig) == []


def test_a_command_that_cannot_be_executed_is_the_actions_failure(rig):
    outcome = rig.run(["/no/such/tool"], env=ENV, platform=DOCKER)
    assert outcome.status.code == code_pb2.OK, outcome.status
    assert outcome.result.exit_code == 127
    assert "cannot execute '/no/such/tool'" in err(rig, outcome)


def test_an_unknown_image_is_refused_naming_it(rig):
    outcome = rig.run(["/bin/true"], env=ENV, platform={
        **DOCKER, "container-image": "docker://localhost/stoker-no-such-image:1"})
    assert outcome.status.code == code_pb2.FAILED_PRECONDITION, outcome.status
    assert "container image 'localhost/stoker-no-such-image:1' is not on this machine and " \
           "could not be pulled" in outcome.status.message


def test_an_action_over_its_memory_limit_is_killed_and_told(make_pipeline_rig, engine,
                                                              image, request):
    rig = make_pipeline_rig(docker_socket=engine, default_image=image,
                            action_memory_bytes=64 << 20)
    if "docker" not in rig.runners.runners:
        pytest.skip("no docker runner here")
    outcome = rig.run(["perl", "-e", "$x = q(x) x (512 << 20); print qq(survived\\n)"],
                      env=ENV, platform=DOCKER, timeout_s=60)
    assert "survived" not in out(rig, outcome)
    assert outcome.result.exit_code == 137, err(rig, outcome)
    if request.node.callspec.params["engine"] == "dockerd":
        # dockerd says the kernel killed it for memory (State.OOMKilled); podman's
        # compatible service does not, and the result then says only exit 137.
        assert "more than its memory limit of 67108864 bytes" in err(rig, outcome)


def test_actions_one_after_another_in_a_reused_directory(rig):
    """Each slot's action directory is reused: the control files of the one before are no
    obstacle (nor anything the action before could have left in them)."""
    for i in range(len(rig.identities.uids) + 2):
        outcome = rig.run(["/bin/echo", f"run {i}"], env=ENV, platform=DOCKER)
        assert outcome.status.code == code_pb2.OK, outcome.status.message
        assert out(rig, outcome) == f"run {i}\n"


def test_docker_user_root_is_refused_naming_the_runner_that_can(rig):
    """The Docker Engine API gives no container a user namespace of its own: root inside
    would be the host's root over the exec root and the cache's hardlinked inputs."""
    outcome = rig.run(["/bin/true"], env=ENV, platform={**DOCKER, "dockerUser": "root"})
    assert outcome.status.code == code_pb2.FAILED_PRECONDITION, outcome.status
    assert "platform property dockerUser='root': root in the container needs a user " \
           "namespace" in outcome.status.message
    assert "the podman runner can" in outcome.status.message
    assert _containers(rig) == []
