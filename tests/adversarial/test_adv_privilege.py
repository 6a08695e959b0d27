"""Milestone 6 through a real `stoker up` (the module's Stoker, as root): the Command's
environment reaches no root process, an action reaches none of Stoker's listeners, and
Stoker's own processes are the OOM killer's last choice while actions are its first. The
same attacks run in process on both containment paths in tests/pipeline/test_hostile_actions.py,
and through `stoker executor` in tests/sources/test_buildbuddy.py."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.rpc import code_pb2

from tests.adversarial.adv_support import (
    EVIL_SCRIPT,
    build_evil_libs,
    describe,
    evil_value,
    execute,
    marked_env,
    py_argv,
    root_loads,
    sh_argv,
    statusz,
    stderr_of,
    stdout_of,
    stoker_pids,
)
from tests.integration.support import Client, start

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="Stoker as root: slot uids")


@pytest.fixture(scope="module")
def evil(base_dir: Path) -> Iterator[tuple[Path, Path]]:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build the attack library")
    shared = Path(tempfile.mkdtemp(prefix="stoker-evil-", dir="/run"))
    shared.chmod(0o1777)
    yield build_evil_libs(shared)
    shutil.rmtree(shared, ignore_errors=True)


@pytest.mark.parametrize("variable", ["LD_PRELOAD", "LD_LIBRARY_PATH", "LD_AUDIT",
                                      "GCONV_PATH"])
def test_the_commands_environment_reaches_no_root_process(client, evil, mark, variable):
    libs, log = evil
    env = marked_env(mark, **{variable: evil_value(libs, variable)})
    r = execute(client, sh_argv(EVIL_SCRIPT, mark), mark=mark, env=env)
    assert r.status.code == code_pb2.OK, describe(client, r)
    assert int(stdout_of(client, r).split()[-1]) >= 60000
    assert root_loads(log, stderr_of(client, r)) == []


CONNECT = textwrap.dedent("""
    import socket, sys
    for port in sys.argv[2:]:
        s = socket.socket()
        s.settimeout(2)
        try:
            s.connect(("127.0.0.1", int(port)))
            print("reached", port)
        except OSError as e:
            print("refused", port, e.errno)
    """)


def test_an_action_reaches_none_of_stokers_listeners(stoker, client, mark):
    ports = [stoker.address.rpartition(":")[2], str(stoker.health_port),
             str(stoker.metrics_port)]
    r = execute(client, py_argv(CONNECT, mark, *ports), mark=mark)
    text = stdout_of(client, r)
    assert r.status.code == code_pb2.OK, describe(client, r)
    assert "reached" not in text and text.count("refused") == 3, text


def test_an_action_allowed_network_gets_its_own_and_not_stokers(stoker_factory, mark):
    """stoker up --actions-may-request-network: dockerNetwork: bridge gets the action a
    user-mode network (tap0), from which Stoker's loopback listeners are still out of reach."""
    if shutil.which("slirp4netns") is None:
        pytest.skip("slirp4netns is not installed (scripts/install-test-deps.sh installs it)")
    up = start(stoker_factory("netup", extra_args=["--actions-may-request-network"]))
    [worker] = statusz(up)["workers"]
    if worker["containment"] != "pid-namespace":
        pytest.skip("no network namespaces here")
    assert worker["action_network"].endswith("user-mode (slirp4netns) for actions that ask")
    c = Client(up.address)
    try:
        ports = [up.address.rpartition(":")[2], str(up.health_port), str(up.metrics_port)]
        code = CONNECT + "import socket\nprint(sorted(n for _, n in socket.if_nameindex()))\n"
        r = execute(c, py_argv(code, mark, *ports), mark=mark,
                    platform={"dockerNetwork": "bridge"})
        text = stdout_of(c, r)
        assert r.status.code == code_pb2.OK, describe(c, r)
        assert "reached" not in text and text.count("refused") == 3, text
        assert "['lo', 'tap0']" in text, text
    finally:
        c.close()


PERL_CONNECT = ("use IO::Socket::INET; for my $p (@ARGV) { my $s = IO::Socket::INET->new("
                "PeerAddr => qq(127.0.0.1:$p), Timeout => 2); print $s ? qq(reached $p\\n) "
                ": qq(refused $p\\n) }")


@pytest.mark.parametrize("isolation", ["sandbox", "podman", "podman-kept"])
def test_under_each_runner_no_root_process_sees_the_command_nor_reaches_stoker(
        stoker, client, evil, mark, isolation):
    """Through `stoker up`, under the sandbox and podman runners (where this machine offers
    them; podman also in kept containers, recycle-runner): the loader variables of the
    Command reach no process of uid 0 (bwrap, podman, conmon, runc), the action runs as a
    slot uid, and none of Stoker's listeners answer it."""
    kept = isolation.endswith("-kept")
    isolation = isolation.removesuffix("-kept")
    worker = probed_worker(stoker)
    if isolation not in worker["isolation_types"]:
        pytest.skip(f"{isolation}: {worker['isolation_types_unavailable'].get(isolation)}")
    platform = {"workload-isolation-type": isolation}
    if isolation == "podman":
        from tests.images import ImageError, ensure_base_image

        try:
            platform["container-image"] = f"docker://{ensure_base_image()}"
        except ImageError as e:
            pytest.fail(str(e))
    if kept:
        platform["recycle-runner"] = "true"
    attack_as_root_and_stoker(stoker, client, evil, mark, platform)


@pytest.mark.parametrize("kept", [False, True], ids=["fresh", "kept"])
def test_under_docker_no_root_process_sees_the_command_nor_reaches_stoker(
        stoker_factory, evil, mark, base_dir, kept):
    """The same through `stoker up` with `isolation.type: docker` against Debian's dockerd
    (started here on a socket of its own): dockerd, containerd and runc are root."""
    from tests.images import ImageError, ensure_base_image, running_engine

    if shutil.which("dockerd") is None:
        pytest.skip("dockerd is not installed (scripts/install-test-deps.sh installs docker.io)")
    with contextlib.ExitStack() as stack:
        try:
            image = ensure_base_image()
            sock = stack.enter_context(running_engine("dockerd", image))
        except ImageError as e:
            pytest.fail(str(e))
        config = base_dir / f"docker-{kept}.yaml"
        config.write_text(f"executor:\n  isolation:\n    type: docker\n"
                          f"    docker_socket: {sock}\n    default_image: {image}\n")
        config.chmod(0o600)
        up = start(stoker_factory(f"docker-{kept}", extra_args=["--config", str(config)]))
        worker = probed_worker(up)
        if "docker" not in worker["isolation_types"]:
            pytest.fail(f"docker: {worker['isolation_types_unavailable'].get('docker')}")
        c = Client(up.address)
        try:
            attack_as_root_and_stoker(up, c, evil, mark,
                                      {"recycle-runner": "true"} if kept else {})
        finally:
            c.close()
            up.stop(grace=20)  # its kept containers go before the engine does


def probed_worker(up) -> dict:
    """The one worker's /statusz once it says which isolation types it offers (it probes
    them after it starts)."""
    deadline = time.monotonic() + 60
    while True:
        [worker] = statusz(up)["workers"]
        if worker.get("isolation_types"):
            return worker
        assert time.monotonic() < deadline, worker
        time.sleep(0.2)


def attack_as_root_and_stoker(stoker, client, evil, mark, platform: dict[str, str]) -> None:
    libs, log = evil
    ports = [stoker.address.rpartition(":")[2], str(stoker.health_port),
             str(stoker.metrics_port)]
    for variable in ("LD_PRELOAD", "LD_LIBRARY_PATH", "LD_AUDIT"):
        env = marked_env(mark, **{variable: evil_value(libs, variable)})
        r = execute(client, ["/bin/sh", "-c", 'id -u; code=$1; shift; perl -e "$code" "$@"',
                             mark, PERL_CONNECT, *ports], mark=mark, env=env, platform=platform)
        assert r.status.code == code_pb2.OK, describe(client, r)
        lines = stdout_of(client, r).split("\n")
        assert int(lines[0]) >= 60000, lines
        assert lines[1:4] == [f"refused {p}" for p in ports], lines
        assert root_loads(log, stderr_of(client, r)) == [], f"{variable} ran code as root"


def has_cap_sys_resource() -> bool:
    with open("/proc/self/status") as f:
        eff = next(line for line in f if line.startswith("CapEff:")).split()[1]
    return bool(int(eff, 16) >> 24 & 1)  # CAP_SYS_RESOURCE: needed to lower the score


def test_stoker_is_the_oom_killers_last_choice_and_actions_its_first(stoker, client, mark):
    # Without CAP_SYS_RESOURCE (this machine's sandbox, the shipped deployments) Stoker keeps
    # its score and says so; actions still go first.
    expected = "-900" if has_cap_sys_resource() else "0"
    for role, pid in stoker_pids(stoker).items():
        with open(f"/proc/{pid}/oom_score_adj") as f:
            assert f.read().strip() == expected, role
    if expected == "0":
        assert "Stoker's OOM score stays as it is" in stoker.log_path.read_text()
    r = execute(client, sh_argv("cat /proc/self/oom_score_adj", mark), mark=mark)
    assert stdout_of(client, r) == "1000\n"


def test_statusz_says_how_actions_are_kept_in(stoker):
    [worker] = statusz(stoker)["workers"]
    assert worker["containment"] == "pid-namespace"
    assert worker["action_network"] == "loopback only (own namespace)"
    assert worker["action_limits"].startswith("memory: ")
    assert worker["action_limits"].endswith("processes: RLIMIT_NPROC per slot uid")
    assert worker["user_namespaces"] in ("denied (seccomp)", "allowed")
