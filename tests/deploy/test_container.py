"""The Dockerfile, built with podman and run: the native core compiles into the image, the
container serves /healthz and REAPI on published ports, executes an action as its non-root
user, and drains to a clean exit on SIGTERM.

No registry is reachable from these machines, so the base image is Debian bookworm made
with debootstrap and `podman import`ed as BASE; it is kept in podman's storage between runs
(delete it with `podman rmi localhost/stoker-test-base:bookworm`). The build's layers are
kept too, so a rebuild after a source edit only reinstalls Stoker. Cold (no base image, no
layers) this module takes a few minutes; warm, well under one.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.proto import re_pb2
from tests.integration.support import Client, free_port

REPO = Path(__file__).resolve().parents[2]
CONTAINERS_CONF = Path(__file__).with_name("containers.conf")
BASE = "localhost/stoker-test-base:bookworm"
IMAGE = "localhost/stoker:test"
MIRROR = "http://deb.debian.org/debian"
# The host's CA bundle, handed to pip in the build: where egress goes through a
# TLS-intercepting proxy, its CA is in there and not in the base image.
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
BUILD_CA = "/run/stoker-build-ca.crt"
UID = 10001

pytestmark = pytest.mark.timeout(900)  # a cold run debootstraps and downloads wheels


def _env() -> dict[str, str]:
    return {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}


def podman(*args: str, timeout: float = 60, check: bool = True,
           **kwargs) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["podman", *args], env=_env(), capture_output=True, text=True,
                            timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} exited {result.returncode}:\n"
                             f"{result.stderr[-4000:]}")
    return result


def _unusable() -> str | None:
    """Why podman cannot be used here, or None. Anything else that fails is a failure."""
    if shutil.which("podman") is None:
        return "podman is not installed (scripts/install-test-deps.sh installs it)"
    if os.geteuid() != 0:
        return "the base image is made with debootstrap, which needs root"
    try:
        info = podman("info", "--format", "{{.Host.OCIRuntime.Name}}", check=False, timeout=60)
    except subprocess.TimeoutExpired:
        return "`podman info` did not answer within 60 s"
    if info.returncode != 0:
        return f"`podman info` fails: {info.stderr.strip()[-500:]}"
    return None


_REASON = _unusable()
if _REASON:
    pytestmark = [pytestmark, pytest.mark.skip(reason=_REASON)]


@pytest.fixture(scope="module")
def base_image() -> str:
    """BASE, made once per machine: debootstrap a minimal bookworm and import it."""
    # Two test runs at once must not both debootstrap into the same tag.
    with open("/tmp/stoker-test-base.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if podman("image", "exists", BASE, check=False).returncode == 0:
            return BASE
        if shutil.which("debootstrap") is None:
            pytest.fail("debootstrap is not installed (scripts/install-test-deps.sh installs "
                        "it) and the base image is missing")
        with tempfile.TemporaryDirectory(prefix="stoker-rootfs-", dir="/var/tmp") as scratch:
            rootfs = os.path.join(scratch, "rootfs")
            done = subprocess.run(["debootstrap", "--variant=minbase", "bookworm", rootfs,
                                   MIRROR], capture_output=True, text=True, timeout=600)
            if done.returncode != 0:
                pytest.fail(f"debootstrap failed:\n{(done.stdout + done.stderr)[-4000:]}")
            tar = subprocess.Popen(["tar", "-C", rootfs, "-c", "."], stdout=subprocess.PIPE)
            try:
                podman("import", "-", BASE, stdin=tar.stdout, timeout=300)
            finally:
                tar.stdout.close()
                tar.wait(timeout=60)
    return BASE


@pytest.fixture(scope="module")
def image(base_image: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """IMAGE, built from the repository's Dockerfile on BASE."""
    log = tmp_path_factory.mktemp("build") / "build.log"
    args = ["build", "--format", "docker",  # docker format: OCI images drop HEALTHCHECK
            "--build-arg", f"BASE_IMAGE={base_image}", "-t", IMAGE, "-f", "Dockerfile"]
    if HOST_CA.exists():
        args += ["-v", f"{HOST_CA}:{BUILD_CA}:ro", "--build-arg", f"PIP_CERT={BUILD_CA}"]
    before = podman("image", "inspect", "--format", "{{.Id}}", IMAGE, check=False).stdout
    started = time.monotonic()
    with open(log, "w") as out:
        done = subprocess.run(["podman", *args, "."], cwd=REPO, env=_env(), stdout=out,
                              stderr=subprocess.STDOUT, timeout=840)
    text = log.read_text(errors="replace")
    if done.returncode != 0:
        pytest.fail(f"podman build exited {done.returncode}:\n{text[-6000:]}", pytrace=False)
    print(f"podman build: {time.monotonic() - started:.1f} s")
    # The builder stage refuses to finish without the native core; show that it said so.
    assert "digest implementation: native" in text
    # The previous build is superseded: drop it, or each source edit leaves a copy of the
    # virtualenv behind. The layers of the build's cache stay.
    after = podman("image", "inspect", "--format", "{{.Id}}", IMAGE).stdout
    if before.strip() and before != after:
        podman("rmi", before.strip(), check=False)
    return IMAGE


class Container:
    """One `podman run -d` of the image with the REAPI and health ports published."""

    def __init__(self, image: str) -> None:
        self.name = f"stoker-test-{uuid.uuid4().hex[:12]}"
        self.reapi_port = free_port()
        self.http_port = free_port()
        # A read-only root, as deployment.yaml asks for: only the data volume and podman's
        # /tmp tmpfs are writable. The healthcheck timer needs systemd, absent here; the
        # test runs the check itself.
        podman("run", "-d", "--name", self.name, "--read-only", "--health-interval", "disable",
               "-p", f"127.0.0.1:{self.reapi_port}:1985",
               "-p", f"127.0.0.1:{self.http_port}:8080", image)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http_port}{path}"

    def state(self) -> dict:
        out = podman("inspect", "--format", "{{json .State}}", self.name).stdout
        return json.loads(out)

    def logs(self) -> str:
        done = podman("logs", self.name, check=False)
        return f"--- container log ---\n{(done.stdout + done.stderr)[-6000:]}"

    def wait_healthy(self, within: float = 60.0) -> dict:
        """The /healthz answer once it is 200; fails with the log if the container exits."""
        deadline = time.monotonic() + within
        last: object = None
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url("/healthz"), timeout=2) as reply:
                    return json.loads(reply.read())
            except (urllib.error.URLError, OSError) as e:
                last = e
            if not self.state().get("Running"):
                pytest.fail(f"the container exited before /healthz answered\n{self.logs()}",
                            pytrace=False)
            time.sleep(0.25)
        pytest.fail(f"/healthz did not answer within {within:.0f} s ({last})\n{self.logs()}",
                    pytrace=False)

    def remove(self) -> None:
        podman("rm", "-f", "-v", "--time", "5", self.name, check=False, timeout=60)


@pytest.fixture(scope="module")
def container(image: str) -> Iterator[Container]:
    c = Container(image)
    try:
        c.wait_healthy()
        yield c
    finally:
        c.remove()


@pytest.fixture(scope="module")
def client(container: Container) -> Iterator[Client]:
    c = Client(f"127.0.0.1:{container.reapi_port}")
    yield c
    c.close()


def stdout_of(client: Client, result: re_pb2.ActionResult) -> bytes:
    return result.stdout_raw or client.read(result.stdout_digest)


def test_image_is_configured_as_documented(image: str) -> None:
    [inspected] = json.loads(podman("image", "inspect", image).stdout)
    config = inspected["Config"]
    assert config["User"] == f"{UID}:{UID}"
    assert set(config["ExposedPorts"]) == {"1985/tcp", "8080/tcp", "9090/tcp"}
    assert set(config["Volumes"]) == {"/var/lib/stoker"}
    assert config["Entrypoint"] == ["/usr/bin/tini", "--", "stoker"]
    assert config["Cmd"] == ["up", "--config", "/etc/stoker/executor.yaml"]
    assert config["StopSignal"] in ("SIGTERM", "15")
    assert not any(e.startswith("DEBIAN_FRONTEND=") for e in config["Env"])
    health = inspected["Healthcheck"]
    assert health and "http://127.0.0.1:8080/healthz" in " ".join(health["Test"])
    # The shipped config is valid where it is used, and the core compiled in.
    checked = podman("run", "--rm", image, "config", "check", "/etc/stoker/executor.yaml")
    assert "/etc/stoker/executor.yaml: OK" in checked.stdout
    version = podman("run", "--rm", image, "version").stdout
    assert "digest implementation: native" in version.splitlines()


def test_health_endpoints_and_healthcheck(container: Container) -> None:
    assert container.wait_healthy() == {"healthy": True}
    # Readiness follows once a worker holds a session with the embedded server.
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(container.url("/readyz"), timeout=2) as reply:
                assert json.loads(reply.read())["ready"] is True
                break
        except urllib.error.HTTPError as e:
            if time.monotonic() > deadline:
                pytest.fail(f"/readyz still {e.code}: {e.read()!r}\n{container.logs()}")
        time.sleep(0.25)
    # The image's own HEALTHCHECK command, run in the container, passes.
    check = podman("healthcheck", "run", container.name, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    assert container.state()["Running"]


def test_executes_an_action_as_the_image_user(container: Container, client: Client) -> None:
    script = ("set -e; cat in.txt; id -u; echo made > out/result.txt; "
              "sleep 60 >/dev/null 2>&1 &")  # an orphan for tini to reap
    ex = client.run(script, {"in.txt": b"hello from the input root\n"},
                    output_paths=["out/result.txt"])
    response = ex.response
    assert response.status.code == 0, (response.status, container.logs())
    result = response.result
    assert result.exit_code == 0, (stdout_of(client, result),
                                   client.read(result.stderr_digest), container.logs())
    assert stdout_of(client, result).decode().split("\n")[:2] == [
        "hello from the input root", str(UID)]
    [output] = result.output_files
    assert output.path == "out/result.txt"
    assert client.read(output.digest) == b"made\n"
    # What the action left behind was killed and reaped: no zombie lingers under PID 1.
    deadline = time.monotonic() + 10
    while True:
        states = podman("exec", container.name, "python3", "-c",
                        "import os; print(' '.join(open(f'/proc/{p}/stat').read().rsplit(')', 1)"
                        "[1].split()[0] for p in os.listdir('/proc') if p.isdigit()))").stdout
        if "Z" not in states.split() or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    assert "Z" not in states.split(), states


def test_sigterm_drains_to_a_clean_exit(container: Container) -> None:
    """Last in this module: it stops the shared container."""
    started = time.monotonic()
    podman("stop", "--time", "40", container.name, timeout=60)  # the image's STOPSIGNAL
    took = time.monotonic() - started
    state = container.state()
    assert not state["Running"]
    assert state["ExitCode"] == 0, container.logs()
    assert took < 30, f"stopping took {took:.1f} s with nothing running"
    assert "server stopping" in container.logs()
